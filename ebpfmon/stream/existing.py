"""Connections the agents held before the daemon started, as connect events (source
"existing"), so they are judged like new ones."""

from __future__ import annotations

import time
from collections.abc import Iterator

from ebpfmon import events as ev
from ebpfmon.host import sockets
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.stream.proctree import ProcessTree

def existing_connections(agents: list[str], hierarchy: Hierarchy, tree: ProcessTree,
                         ancestry_depth: int) -> Iterator[ev.ConnectEvent]:
    """TCP connections established or being set up by the agents' processes, from sock_diag."""
    for agent in agents:
        for conn in sockets.connections(hierarchy.path(agent)):
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
