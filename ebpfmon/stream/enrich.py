"""Enrich: decoded events -> events with cgroup path, ppid, ancestry, device.

Also the one place that applies fork/exit/exec and cgroup changes to the
process tree and the cgroup names, in ring-buffer order.
"""

from __future__ import annotations

import os

from ebpfmon import events as ev
from ebpfmon.host.cgroups import CgroupNames
from ebpfmon.host.containers import ContainerIdentity
from ebpfmon.stream.decode import CgroupChange
from ebpfmon.host.devices import DeviceResolver
from ebpfmon.host.programs import LOADER, ProgramIdentifier, loaded_program
from ebpfmon.host.sshconfig import SshConfigReader
from ebpfmon.kernel.abi import EventKind
from ebpfmon.rules.argv import parse_ssh, ssh_client_name
from ebpfmon.stream.proctree import Node, ProcessTree, read_proc


FORK = EventKind.FORK.value


class Enricher:
    def __init__(self, cgroups: CgroupNames, tree: ProcessTree, devices: DeviceResolver,
                 ancestry_depth: int = 8, containers: ContainerIdentity | None = None):
        self.cgroups = cgroups
        self.containers = containers
        self.tree = tree
        self.devices = devices
        self.ancestry_depth = ancestry_depth
        self.egress_profiles: dict[int, str] = {}  # id -> name, set by whoever writes the policy
        self.ssh_config = SshConfigReader(tree.proc)
        self.programs = ProgramIdentifier()  # told what to look for by whoever loads the rules
        # what some kinds need besides what every event gets, found by kind: one dict lookup
        # per event, not an isinstance test per kind (every connect an agent makes comes here)
        self._after = {"gpu_open": self._gpu_device, "refused": self._agent_and_vendor,
                       "device": self._agent_and_vendor, "dns": self._agent_and_vendor,
                       "unix_connect": self._unix_path}

    def apply(self, item: ev.Event | CgroupChange) -> ev.Event | None:
        """Updates state from the item; returns the enriched event (None for cgroup changes)."""
        if isinstance(item, CgroupChange):
            if item.created:
                self.cgroups.added(item.cgroup_id, item.path)
                if self.containers:
                    self.containers.created(item.path)
            else:
                self.cgroups.removed(item.cgroup_id)
                if self.containers:
                    self.containers.forget(item.path)
            return None
        kind = item.kind
        if kind == "exec":
            self._executed(item)
        proc = item.proc
        item.cgroup = cgroup = self.cgroups.path(item.cgroup_id)
        if self.containers:
            item.container = self.containers.of(cgroup)
        node = self.tree.seen(proc.pid, proc.ppid, proc.comm)
        proc.ppid, proc.exe, proc.argv = node.ppid, node.exe, node.argv
        item.ancestry = self.tree.ancestry(proc.pid, self.ancestry_depth)
        after = self._after.get(kind)
        if after is not None:
            after(item)
        return item

    def tree_change(self, kind: int, pid: int, tid: int, child: int, comm: str) -> None:
        """A fork or an exit (Decoder.tree_change): the tree's alone, no event."""
        if kind == FORK:
            self.tree.forked(pid, child, comm)
        else:
            self.tree.exited(tid)

    def _executed(self, item: ev.ExecEvent) -> None:
        if item.retval != 0:
            return
        proc = item.proc
        # unreadable, or cut at the probe's limits (an option hidden after many others): /proc
        # has it whole while the process lives
        exe, gone = None, False
        if item.argv_source == "none" or item.argv_truncated:
            node = read_proc(proc.pid, self.tree.proc)
            # gone already (a storm's short-lived programs): nothing more is read of its pid,
            # which may be another process's by the next read
            gone = node is None
            exe = self._argv_from_proc(item, node)
        exe = exe or (item.filename if gone else self._exe(proc.pid, item.filename))
        item.exe_is = list(self._identify(item, gone))
        if LOADER in item.exe_is:
            exe = self._through_loader(item, exe)
        self.tree.executed(proc.pid, proc.ppid, proc.comm, exe, item.argv)
        # the clients that read ssh_config; the name first: argv is parsed only for them
        ssh = (parse_ssh(tuple(item.argv), exe, tuple(item.exe_is))
               if ssh_client_name(item.argv, exe, item.exe_is) in ("ssh", "autossh") else None)
        if ssh is not None:
            config = [v for o, v in ssh.options if o == "F" and v is not None]
            options = [v for o, v in ssh.options if o == "o" and v is not None]
            item.ssh_config = [str(f) for f in self.ssh_config.findings(proc.pid, proc.uid, config[-1] if config
                                                                         else None, ssh.host, options)]

    def _identify(self, item: ev.ExecEvent, gone: bool) -> tuple[str, ...]:
        """What the exec'd file is: /proc/PID/exe reaches a copy, a link, a memfd, a deleted
        file; but by the time it is read the process may have exec'd again (a shell's `exec
        ssh`), and a name found then is the later program's: the comm says which (each exec
        sets it). Then the path the kernel was given, when it is one (and the only way when the
        process was gone)."""
        if not gone:
            pid = item.proc.pid
            found = self.programs.identify(f"{self.tree.proc}/{pid}/exe")
            if not found:
                return found
            try:
                with open(f"{self.tree.proc}/{pid}/comm", "rb") as f:
                    same = ev.text(f.read().rstrip(b"\n")) == item.proc.comm
            except OSError:
                same = False
            if same:
                return found
        if item.filename.startswith("/") and not item.filename.startswith(("/dev/fd/", "/proc/")):
            return self.programs.identify(item.filename)
        return ()

    def _through_loader(self, item: ev.ExecEvent, loader: str) -> str:
        """`ld.so [OPTIONS] PROGRAM ARGS` runs PROGRAM: the event becomes that program's exec, with
        the argv it sees; the loader stays in item.loader. Returns the program's path."""
        loaded = loaded_program(item.argv)
        if loaded is None:
            return loader
        path, item.argv = loaded
        if not path.startswith("/"):
            try:
                path = os.path.join(ev.text(os.readlink(f"{self.tree.proc}/{item.proc.pid}/cwd".encode())), path)
            except OSError:
                pass
        item.loader = loader
        item.exe_is = list(self.programs.identify(path))
        return os.path.normpath(path)

    def _gpu_device(self, item: ev.GpuOpenEvent) -> None:
        device = self.devices.resolve(item.path, item.proc.pid)
        if device is not None:
            item.device, item.vendor = device.number, device.vendor

    def _agent_and_vendor(self, item: ev.RefusedEvent | ev.DeviceEvent | ev.DnsEvent) -> None:
        item.agent = self.cgroups.path(item.agent_id) if item.agent_id else None
        if item.kind == "refused" and item.profile_id:
            item.profile = self.egress_profiles.get(item.profile_id, str(item.profile_id))
        if getattr(item, "device", None):
            item.vendor = self.devices.vendor_of(item.device)

    @staticmethod
    def _unix_path(item: ev.UnixConnectEvent) -> None:
        item.resolved = resolve_socket_path(item.path, item.proc.pid)

    @staticmethod
    def _argv_from_proc(item: ev.ExecEvent, node: Node | None) -> str | None:
        """The probe cut argv at its limits, or could not read it: after fork, a child's pages of the program's
        constants (execve("/bin/sh", {"sh", ...}) with literals) are not mapped until touched,
        and a probe cannot fault them in. The exec is done: /proc has the new argv while the
        process lives, which a tunnel or a miner does: node is what /proc says of it now. Returns
        the exe /proc names, if taken."""
        # the same comm: still the program of this exec, not one it has exec'd since
        if node is None or not node.argv or node.comm != item.proc.comm:
            return None
        # a truncated copy: the arguments the probe read whole must begin /proc's (the last one
        # read may be cut), or the process rewrote its arguments since
        whole = item.argv[:-1]
        if item.argv_source == "kernel" and (len(node.argv) < len(item.argv) or node.argv[:len(whole)] != whole):
            return None
        item.argv, item.argv_source, item.argv_truncated = node.argv, "proc", False
        return node.exe

    def _exe(self, pid: int, filename: str) -> str:
        """The absolute program path: the filename when absolute, else /proc/PID/exe (a relative
        name, or a descriptor's: fexecve of a memfd is /dev/fd/N to the kernel)."""
        if filename.startswith("/") and not filename.startswith(("/dev/fd/", "/proc/")):
            return filename
        try:
            return ev.text(os.readlink(f"{self.tree.proc}/{pid}/exe".encode()))
        except OSError:
            return filename


def resolve_socket_path(path: str, pid: int) -> str:
    """A Unix socket's path as rules compare it: relative to the caller's working directory
    when relative (read while it lives), the directories' symbolic links followed
    (/var/run/docker.sock is /run/docker.sock), in this node's view of the files; an abstract
    name ("@...") as it is."""
    if path.startswith("@") or not path:
        return path
    if not path.startswith("/"):
        try:
            path = os.path.join(ev.text(os.readlink(f"/proc/{pid}/cwd".encode())), path)
        except OSError:
            return os.path.normpath(path)
    directory, name = os.path.split(os.path.normpath(path))
    return os.path.join(os.path.realpath(directory), name)
