"""What an ssh client's configuration files ask for, read as the client reads them.

A reverse forward or a tun device need not be on the command line: `RemoteForward`
or `Tunnel` in the user's `~/.ssh/config`, in a file given with `-F`, in
`/etc/ssh/ssh_config`, or in a file any of them pulls in with `Include`, applies to
every `Host` block whose patterns match the destination. So for an ssh exec the
enricher reads the same files, in the process's own view of the file system
(/proc/PID/root, /proc/PID/cwd), the user taken from the process's uid as ssh
does (its passwd entry, not $HOME), and reports the lines that ask for either.

Bounded: regular files only (a FIFO would block the reader), MAX_FILE_BYTES each,
MAX_FILES in all, Include nested at most MAX_DEPTH deep (OpenSSH's own limit is
16). `Match` blocks are taken to apply (their tests, `exec` among them, cannot be
run here): a forward under any Match counts. Parsed files are cached by
(device, inode, size, mtime).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
import stat
from dataclasses import dataclass

MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 32
MAX_DEPTH = 8
CACHE_MAX = 256
FORWARD_KEYS = {"remoteforward": "remote_forward", "tunnel": "tun", "tunneldevice": "tun"}
SYSTEM_CONFIG = "/etc/ssh/ssh_config"


@dataclass(frozen=True)
class Finding:
    """A configuration line that asks for a remote forward or a tun device."""

    what: str  # remote_forward or tun
    where: str  # file:line, as the process sees the file
    line: str

    def __str__(self) -> str:
        return f"{self.where}: {self.line}"


class SshConfigReader:
    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self._parsed: dict[tuple, list[tuple[int, str, list[str]]]] = {}

    def findings(self, pid: int, uid: int, config_file: str | None, host: str | None,
                 options: list[str]) -> list[Finding]:
        """What the files ssh reads for host ask for. config_file: the -F argument (none: the
        user's file, then the system's); options: the -o values, which come first in ssh too
        (an `-o Include=...` pulls a file in like one in a file)."""
        root, cwd = f"{self.proc}/{pid}/root", f"{self.proc}/{pid}/cwd"
        home = self._home(root, uid)
        found: list[Finding] = []
        budget = [MAX_FILES]
        for option in options:
            parsed = _parse(option.encode("utf-8", "surrogateescape"))
            if parsed and parsed[0][1] == "include":
                for pattern in parsed[0][2]:
                    self._include(root, f"{home}/.ssh" if home else "/", home, pattern, host, found, budget, 1,
                                  user=True)
        if config_file is not None:
            if config_file != "none":
                self._read(root, _absolute(config_file, cwd, home), host, home, found, budget, 0, user=True)
            return found
        if home:
            self._read(root, f"{home}/.ssh/config", host, home, found, budget, 0, user=True)
        self._read(root, SYSTEM_CONFIG, host, home, found, budget, 0, user=False)
        return found

    def _home(self, root: str, uid: int) -> str | None:
        try:
            with open(f"{root}/etc/passwd", "rb") as f:
                for raw in f.read(MAX_FILE_BYTES).split(b"\n"):
                    fields = raw.decode("utf-8", "surrogateescape").split(":")
                    if len(fields) >= 6 and fields[2] == str(uid):
                        return fields[5] or None
        except OSError:
            pass
        return None

    def _read(self, root: str, path: str, host: str | None, home: str | None, found: list[Finding],
              budget: list[int], depth: int, user: bool) -> None:
        if budget[0] <= 0 or depth > MAX_DEPTH:
            return
        budget[0] -= 1
        lines = self._lines(f"{root}{path}")
        applies = True  # before any Host or Match: for every destination
        for number, key, values in lines:
            if key == "host":
                applies = _host_matches(values, host)
            elif key == "match":
                applies = True  # its tests cannot be run here: assume it applies
            elif not applies:
                continue
            elif key == "include":
                for pattern in values:
                    # relative: to ~/.ssh in the user's files, to /etc/ssh in the system's
                    base = f"{home}/.ssh" if user and home else "/etc/ssh"
                    self._include(root, base, home, pattern, host, found, budget, depth + 1, user)
            elif key in FORWARD_KEYS and not (key == "tunnel" and values and values[0].lower() == "no"):
                found.append(Finding(FORWARD_KEYS[key], f"{path}:{number}", " ".join([key, *values])))

    def _include(self, root: str, base: str, home: str | None, pattern: str, host: str | None,
                 found: list[Finding], budget: list[int], depth: int, user: bool) -> None:
        if pattern.startswith("~/") and home:
            pattern = f"{home}/{pattern[2:]}"
        elif not pattern.startswith("/"):
            pattern = f"{base}/{pattern}"
        for match in sorted(glob.glob(glob.escape(root) + pattern))[:MAX_FILES]:
            self._read(root, match[len(root):], host, home, found, budget, depth, user)

    def _lines(self, path: str) -> list[tuple[int, str, list[str]]]:
        """(line number, lower-cased key, values) of a regular file; [] for anything else."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return []
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return []
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            parsed = self._parsed.get(key)
            if parsed is None:
                parsed = _parse(os.read(fd, MAX_FILE_BYTES))
                if len(self._parsed) >= CACHE_MAX:
                    self._parsed.clear()
                self._parsed[key] = parsed
            return parsed
        except OSError:
            return []
        finally:
            os.close(fd)


# "Key value", "Key=value", "Key = value", tabs: as ssh_config(5) allows
LINE = re.compile(r"([^\s=]+)\s*(?:=\s*|\s+|$)(.*)")


def _parse(raw: bytes) -> list[tuple[int, str, list[str]]]:
    lines = []
    for number, text in enumerate(raw.decode("utf-8", "surrogateescape").splitlines(), 1):
        text = text.strip()
        match = LINE.match(text)
        if not text or text.startswith("#") or not match:
            continue
        lines.append((number, match.group(1).lower(), _words(match.group(2))))
    return lines


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote: ssh refuses the file; read the words anyway
        return text.split()


def _host_matches(patterns: list[str], host: str | None) -> bool:
    """ssh's Host rule: any pattern matches and no negated one does; without a known
    destination, every block may apply."""
    if host is None:
        return True
    name = host.rpartition("@")[2].lower()
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(name, pattern[1:].lower() if negated else pattern.lower()):
            if negated:
                return False
            matched = True
    return matched


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "/"


def _absolute(path: str, cwd: str, home: str | None) -> str:
    """A -F path in the process's view: ~/ from the user's home, relative ones from the
    process's working directory."""
    if path.startswith("~/") and home:
        return f"{home}/{path[2:]}"
    if path.startswith("/"):
        return path
    return os.path.normpath(f"{_link(cwd)}/{path}")
