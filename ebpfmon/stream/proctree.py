"""The process tree, kept from fork/exec/exit events and bootstrapped from /proc.

The probes never walk kernel structs, so parentage comes from
sched_process_fork (parent tgid -> child) and what programs run from exec
events. Processes that were already running, or that entered an agent cgroup
from outside (their fork was not in scope), are read from /proc once, when
first needed. Memory is bounded: exited processes are kept a while (their
children's events may still name them as ancestors), then forgotten oldest
first; live entries are capped too.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

from ebpfmon.events import Ancestor, Ancestry, text

log = logging.getLogger(__name__)

MAX_CACHED_ANCESTRIES = 16384  # processes with a cached chain


@dataclass
class Node:
    pid: int
    ppid: int
    comm: str | None = None
    exe: str | None = None
    argv: list[str] | None = None


# a command line read from /proc is cut here (the kernel allows megabytes): one agent's huge
# argv must not grow the daemon by as much for each of its processes
PROC_CMDLINE_MAX = 128 << 10


def _read(path: str, limit: int = PROC_CMDLINE_MAX) -> bytes:
    # os.open/os.read: no file object per read (every exec whose argv the probe could not read
    # comes here, three files each); a /proc file gives its whole text to one read
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_proc(pid: int, proc: str = "/proc") -> Node | None:
    """A process as /proc shows it now, or None when it is gone, or has exited and waits to be
    reaped (a zombie: no program, no arguments left to read)."""
    base = f"{proc}/{pid}"
    try:
        stat = _read(f"{base}/stat")
    except OSError:
        return None
    # comm is in parentheses and may itself contain ') '
    close = stat.rfind(b")")
    if stat[close + 2:close + 3] == b"Z":
        return None
    comm = stat[stat.find(b"(") + 1:close]
    ppid = int(stat[close + 2:].split(maxsplit=2)[1])
    try:
        exe = text(os.readlink(f"{base}/exe".encode()))
    except OSError:
        exe = None  # kernel thread, or no permission
    try:
        argv = [text(a) for a in _read(f"{base}/cmdline").split(b"\0")[:-1]]
    except OSError:
        argv = None
    return Node(pid=pid, ppid=ppid, comm=text(comm), exe=exe, argv=argv)


class ProcessTree:
    def __init__(self, max_live: int = 65536, max_exited: int = 8192, proc: str = "/proc"):
        self.max_live = max_live
        self.max_exited = max_exited
        self.proc = proc
        self._live: OrderedDict[int, Node] = OrderedDict()
        self._exited: OrderedDict[int, Node] = OrderedDict()
        self.evicted = 0
        # ancestry is asked for on every event: a process's chain is its parent's line, which
        # is cached per parent (all children of a shell or a build tool share one, and an exec
        # storm walks nothing) until a process the chain names changes (then all go: rare, as
        # an exec or a fork changes a process no cached chain names yet)
        self._ancestry_cache: dict[int, dict[int, Ancestry]] = {}  # parent pid -> depth -> chain
        self._named_in_cache: set[int] = set()  # pids in cached chains (a superset)

    def bootstrap(self) -> int:
        """Reads every running process from /proc; returns how many."""
        for name in os.listdir(self.proc):
            if name.isdigit():
                node = read_proc(int(name), self.proc)
                if node:
                    self._put(node)
        return len(self._live)

    def _changed(self, pid: int) -> None:
        """pid's node changed (or is new): the chains naming it are stale (its own is read from
        its parent's line each time)."""
        if pid in self._named_in_cache or len(self._ancestry_cache) > MAX_CACHED_ANCESTRIES:
            self._ancestry_cache.clear()
            self._named_in_cache.clear()

    def _put(self, node: Node) -> None:
        self._changed(node.pid)
        self._exited.pop(node.pid, None)
        self._live[node.pid] = node
        self._live.move_to_end(node.pid)
        if len(self._live) > self.max_live:
            evicted, _ = self._live.popitem(last=False)
            self._changed(evicted)
            self.evicted += 1

    def get(self, pid: int) -> Node | None:
        """The process, from events, /proc, or recent exits; None when unknown."""
        node = self._live.get(pid) or self._exited.get(pid)
        if node is None and pid > 0:
            node = read_proc(pid, self.proc)
            if node:
                self._put(node)
        return node

    def forked(self, parent: int, child: int, comm: str) -> None:
        # the child runs the parent's program until it execs
        parent_node = self.get(parent)
        self._put(Node(pid=child, ppid=parent, comm=comm,
                       exe=parent_node.exe if parent_node else None,
                       argv=parent_node.argv if parent_node else None))

    def seen(self, pid: int, ppid: int, comm: str) -> Node:
        """The node of a process an event came from; the kernel's ppid (parent at
        fork, 0 when unknown) wins over what /proc says now (reparenting)."""
        node = self._live.get(pid) or self.get(pid)  # the first: every event of a live process
        if node is None:
            node = Node(pid=pid, ppid=ppid, comm=comm)
            self._put(node)
        elif ppid and node.ppid != ppid:
            node.ppid = ppid
            self._changed(pid)
        return node

    def executed(self, pid: int, ppid: int, comm: str, exe: str, argv: list[str]) -> None:
        node = self.seen(pid, ppid, comm)
        node.comm, node.exe, node.argv = comm, exe, argv
        self._changed(pid)

    def exited(self, pid: int) -> None:
        node = self._live.pop(pid, None)
        if node is None:
            return
        self._exited[pid] = node  # chains naming it stay as they are
        if len(self._exited) > self.max_exited:
            forgotten, _ = self._exited.popitem(last=False)
            self._changed(forgotten)

    def ancestry(self, pid: int, depth: int) -> Ancestry:
        """Parent first, up to depth generations or pid 1. Shared between the events of a
        process and its siblings while the tree does not change: do not modify it."""
        node = self.get(pid)
        if node is None or node.ppid <= 0 or node.ppid == pid or depth <= 0:
            return NO_ANCESTRY
        chain = self._line_of(node.ppid, depth)
        if pid in chain.pids:  # a loop (what /proc said of reused pids): walked for this process alone
            return self._walk(node.ppid, depth, {pid})
        return chain

    def _line_of(self, pid: int, depth: int) -> Ancestry:
        """pid and its ancestors, depth of them in all: the ancestry of pid's children."""
        by_depth = self._ancestry_cache.get(pid)
        if by_depth is None:
            by_depth = self._ancestry_cache[pid] = {}
        cached = by_depth.get(depth)
        if cached is None:
            cached = by_depth[depth] = self._walk(pid, depth, set())
            self._named_in_cache.update(cached.pids)
        return cached

    def _walk(self, pid: int, depth: int, seen: set[int]) -> Ancestry:
        chain = []
        while len(chain) < depth and pid > 0 and pid not in seen:
            seen.add(pid)
            node = self.get(pid)
            if node is None:
                chain.append(Ancestor(pid=pid))
                break
            chain.append(Ancestor(pid=node.pid, comm=node.comm, exe=node.exe, argv=node.argv))
            pid = node.ppid
        return Ancestry(chain)


NO_ANCESTRY = Ancestry()
