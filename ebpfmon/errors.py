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


class RuleLoadError(EbpfmonError):
    """Rule files with problems, every one listed as file:line:col: message."""

    def __init__(self, problems: list):
        self.problems = problems
        listing = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the rules:\n{listing}",
                         "Fix them; a daemon keeps running on its last good rules meanwhile.")


class ConditionError(EbpfmonError):
    """A problem at a position of a condition; the loader turns pos into file:line:col."""

    def __init__(self, message: str, pos: int, text: str = "", where: str = ""):
        super().__init__(message)
        self.pos = pos
        self.text = text  # the token at pos, to find it in the YAML source
        self.where = where  # the macro the error is in, when it is not the rule's own condition


class ContainmentRefused(EbpfmonError):
    """A containment request that would touch something it must never touch."""


class DeliveryError(EbpfmonError):
    """A remote sink did not take the alert; it will be tried again, unless permanent (the
    service refused this alert for good: a 4xx other than 408 and 429)."""

    def __init__(self, message: str, fix: str = "", permanent: bool = False):
        super().__init__(message, fix)
        self.permanent = permanent
