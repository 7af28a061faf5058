"""What the agents had going before the daemon started, as events judged like new ones: the
connections they held (connect events, source "existing") and the programs they run (exec
events, found_at_start), so a tunnel or a miner started while the daemon was down is found."""

from __future__ import annotations

import time
from collections.abc import Iterator

from ebpfmon import events as ev
from ebpfmon.host import sockets
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.stream.proctree import ProcessTree, read_proc

def existing_connections(agents: list[str], hierarchy: Hierarchy, tree: ProcessTree,
                         ancestry_depth: int) -> Iterator[ev.ConnectEvent]:
    """TCP connections established or being set up by the agents' processes, from sock_diag."""
    for agent, held in sockets.connections_of({agent: hierarchy.path(agent) for agent in agents}).items():
        for conn in held:
            if conn["protocol"] == "tcp" and conn["state"] in ("established", "syn-sent"):
                yield connection_event(agent, hierarchy.cgroup_id(agent), conn, tree, ancestry_depth)


def connection_event(agent: str, agent_id: int, conn: dict, tree: ProcessTree,
                     ancestry_depth: int) -> ev.ConnectEvent:
    host, _, port = conn["remote"].rpartition(":")
    pid = conn["pid"] or 0
    node = tree.get(pid) if pid else None
    proc = ev.Process(pid=pid, tid=pid, ppid=node.ppid if node else 0, uid=0, gid=0,
                      comm=conn["comm"] or "?", exe=node.exe if node else None,
                      argv=node.argv if node else None)
    return ev.ConnectEvent(time_ns=time.time_ns(), cgroup_id=agent_id, cgroup=agent, proc=proc,
                           ancestry=tree.ancestry(pid, ancestry_depth) if pid else [],
                           family="inet6" if ":" in host else "inet", address=host.strip("[]"),
                           port=int(port), sock_type="stream", protocol="tcp", retval=0, source="existing")


def existing_processes(agents: list[str], hierarchy: Hierarchy, proc: str = "/proc") -> Iterator[ev.ExecEvent]:
    """The programs the agents' processes run now, one exec event each (argv from /proc), for
    the enricher and the rules like any exec."""
    for agent in agents:
        agent_id = hierarchy.cgroup_id_or_none(agent)
        if agent_id is None:
            continue
        _, pids = sockets.subtree(hierarchy.path(agent))
        for pid in sorted(pids):
            node = read_proc(pid, proc)
            if node is None or not node.argv:
                continue  # gone, or a zombie
            uid, gid = _ids(pid, proc)
            yield ev.ExecEvent(time_ns=time.time_ns(), cgroup_id=agent_id, cgroup=None,
                               proc=ev.Process(pid, pid, node.ppid, uid, gid, node.comm or "?"),
                               filename=node.exe or node.argv[0], argv=node.argv, argv_source="proc",
                               found_at_start=True)


def _ids(pid: int, proc: str) -> tuple[int, int]:
    """The real uid and gid of a process (0, 0 when it is gone)."""
    uid = gid = 0
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return uid, gid
