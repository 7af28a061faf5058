"""cgroup v2: find the hierarchy, name cgroups, create agent cgroups, move processes.

Paths are given to users relative to the cgroup2 mount ("/ebpfmon-agents/a1"),
the form the kernel's cgroup tracepoints and /proc/PID/cgroup use. Ids are the
cgroup directory's inode number, which is what bpf_get_current_cgroup_id()
returns on the v2 hierarchy.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ebpfmon.errors import CgroupError, NoCgroup2Error

log = logging.getLogger(__name__)

MOUNTS = "/proc/self/mounts"


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def cgroup2_mount(mounts_file: str = MOUNTS) -> Path:
    """The mount point of the cgroup v2 hierarchy; never assume /sys/fs/cgroup."""
    try:
        with open(mounts_file) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return Path(_unescape_mount_field(fields[1]))
    except OSError as e:
        raise NoCgroup2Error(f"cannot read {mounts_file}: {e.strerror}.") from e
    raise NoCgroup2Error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mounts).",
        "ebpfmon scopes agents by cgroup v2. Mount it with "
        "'mount -t cgroup2 none /sys/fs/cgroup/unified' (hybrid hosts) or boot with "
        "systemd.unified_cgroup_hierarchy=1.",
    )


class Hierarchy:
    """The mounted cgroup v2 hierarchy, and paths within it."""

    def __init__(self, mount: Path | None = None):
        self.mount = Path(mount) if mount else cgroup2_mount()

    def path(self, name: str) -> Path:
        """Absolute directory of a cgroup given absolute or relative to the mount."""
        p = Path(name)
        if p.is_absolute() and (p == self.mount or self.mount in p.parents):
            return p
        return self.mount / str(name).lstrip("/")

    def relative(self, path: Path) -> str:
        rel = Path(path).relative_to(self.mount).as_posix()
        return "/" if rel == "." else "/" + rel

    def cgroup_id(self, name: str) -> int:
        path = self.path(name)
        try:
            return os.stat(path).st_ino
        except FileNotFoundError as e:
            raise CgroupError(f"cgroup {self.relative(path)} does not exist ({path}).",
                              "Create it first, or check the name.") from e

    def cgroup_id_or_none(self, name: str) -> int | None:
        try:
            return os.stat(self.path(name)).st_ino
        except OSError:
            return None

    def ensure(self, name: str) -> Path:
        """Creates the cgroup (and its parents) when missing."""
        path = self.path(name)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}.",
                              "Run as root, on a writable cgroup v2 hierarchy.") from e
        return path

    def join(self, name: str, pid: int = 0) -> None:
        """Moves a process (0: the caller) into the cgroup."""
        procs = self.path(name) / "cgroup.procs"
        try:
            procs.write_text(str(pid or os.getpid()))
        except OSError as e:
            raise CgroupError(f"cannot move process {pid or os.getpid()} into {procs}: {e.strerror}.",
                              "Run as root; a cgroup with controllers enabled for its children "
                              "cannot hold processes itself.") from e

    def child(self, root: str, name: str) -> str:
        """The cgroup NAME below ROOT, refusing names that would escape it."""
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise CgroupError(f"cgroup name {name!r} must be a relative path below the agent root {root}, "
                              "without '..'.", "Use a plain name such as 'agent-1'.")
        return str(Path(self.relative(self.path(root))) / name)


@dataclass(frozen=True)
class AgentLayout:
    """Where the agents are: each agent is the cgroup `level` levels below `root`
    (level 1: /ebpfmon-agents/a1; level 2: /ebpfmon-agents/team/a1), and every cgroup
    below an agent is part of it. The one definition the rules, containment and the
    kernel's agent-level setting share."""

    root: str
    level: int = 1

    @property
    def root_path(self) -> str:
        return "/" + self.root.strip("/")

    def _below_root(self, cgroup: str) -> list[str] | None:
        """The path's parts below the root (None: not below it)."""
        root = self.root_path.rstrip("/")
        cgroup = "/" + cgroup.strip("/")
        if not cgroup.startswith(root + "/"):
            return None
        return [p for p in cgroup[len(root):].split("/") if p]

    def levels_below_root(self, cgroup: str) -> int | None:
        """How deep below the root a cgroup is (None: not below it)."""
        parts = self._below_root(cgroup)
        return None if parts is None else len(parts)

    def agent_of(self, cgroup: str | None) -> str | None:
        """The agent a cgroup belongs to (itself or its ancestor at the agent level), or None."""
        parts = self._below_root(cgroup) if cgroup else None
        if parts is None or len(parts) < self.level:
            return None
        return self.root_path.rstrip("/") + "/" + "/".join(parts[:self.level])

    def is_agent(self, cgroup: str) -> bool:
        return self.levels_below_root(cgroup) == self.level

    @property
    def absolute_level(self) -> int:
        """The agents' level below the cgroup2 mount, as the kernel counts ancestors."""
        return len([p for p in self.root_path.split("/") if p]) + self.level

    def agents(self, hierarchy: Hierarchy) -> list[str]:
        """The agent cgroups that exist now."""
        found = []
        for directory, below, _ in os.walk(hierarchy.path(self.root_path)):
            relative = hierarchy.relative(Path(directory))
            if self.is_agent(relative):
                found.append(relative)
                below.clear()  # an agent's own cgroups are not agents
        return found


def cgroup_of(pid: int) -> str | None:
    """The v2 cgroup path of a process, from /proc/PID/cgroup ('0::/path')."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


class CgroupNames:
    """cgroup id -> path, kept current by mkdir/rmdir events, rescanned on a miss.

    A miss rescans the hierarchy at most once per rescan_interval; ids still
    unknown after that are reported as None (an "unknown" cgroup), never an
    exception in the event path.
    """

    def __init__(self, hierarchy: Hierarchy, rescan_interval: float = 1.0):
        self.hierarchy = hierarchy
        self.rescan_interval = rescan_interval
        self._paths: dict[int, str] = {}
        self._last_scan = 0.0
        self.rescan()

    def rescan(self) -> None:
        paths: dict[int, str] = {os.stat(self.hierarchy.mount).st_ino: "/"}
        stack = [self.hierarchy.mount]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            paths[entry.inode()] = self.hierarchy.relative(Path(entry.path))
                            stack.append(Path(entry.path))
            except OSError:
                continue  # removed while we walked
        self._paths = paths
        self._last_scan = time.monotonic()

    def added(self, cgroup_id: int, path: str) -> None:
        self._paths[cgroup_id] = path

    def removed(self, cgroup_id: int) -> None:
        self._paths.pop(cgroup_id, None)

    def path(self, cgroup_id: int) -> str | None:
        path = self._paths.get(cgroup_id)
        if path is None and time.monotonic() - self._last_scan >= self.rescan_interval:
            self.rescan()
            path = self._paths.get(cgroup_id)
            if path is None:
                log.warning("cgroup id %d has no path (removed before it could be named)", cgroup_id)
        return path
