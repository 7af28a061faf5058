"""The project's exceptions.

Every error a user can meet carries a message (what is wrong, where) and a fix
(what to do about it). Lower-level bcc, OS and cgroup errors are mapped to the
most specific of these where they happen, so the CLI prints a paragraph, never
a traceback.
"""


class EbpfmonError(Exception):
    """Base of all errors ebpfmon reports to a user."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} {self.fix}".strip()


class PrerequisiteError(EbpfmonError):
    """Something the machine must provide is missing."""


class NotRootError(PrerequisiteError):
    """Loading BPF programs and moving processes between cgroups needs root."""


class BccMissingError(PrerequisiteError):
    """The bcc Python module (Debian's python3-bpfcc) cannot be imported."""


class NoCgroup2Error(PrerequisiteError):
    """No cgroup v2 hierarchy is mounted."""


class TracefsError(PrerequisiteError):
    """tracefs is not mounted, so tracepoints cannot be found."""


class KernelError(EbpfmonError):
    """The kernel refused something: compiling, loading or attaching a program."""


class ProbeCompileError(KernelError):
    """bcc could not compile a probe (usually missing kernel headers)."""


class ProbeLoadError(KernelError):
    """The kernel refused to load or attach a probe (verifier, missing feature)."""


class CgroupError(EbpfmonError):
    """A cgroup could not be found, created or joined."""


class ConfigError(EbpfmonError):
    """A configuration value is invalid."""


class DecodeError(EbpfmonError):
    """A record from the kernel or a recorded trace is malformed."""
