"""The connections a cgroup's processes hold, from the kernel's sock_diag (pyroute2).

sock_diag reports each socket's cgroup id, so sockets are picked by the cgroup
and its descendants; the owning process is found by socket inode in /proc.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

TCP_STATES = {1: "established", 2: "syn-sent", 3: "syn-recv", 4: "fin-wait-1", 5: "fin-wait-2",
              6: "time-wait", 7: "close", 8: "close-wait", 9: "last-ack", 10: "listen", 11: "closing"}
ALL_STATES = 0xFFF


def subtree(path: Path) -> tuple[set[int], set[int]]:
    """cgroup ids and pids of a cgroup and everything below it."""
    ids, pids = set(), set()
    for directory, _, _ in os.walk(path):
        try:
            ids.add(os.stat(directory).st_ino)
            with open(os.path.join(directory, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue  # removed while we walked
    return ids, pids


def socket_owners(pids: set[int]) -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, comm) for the given processes."""
    owners = {}
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = (pid, comm)
        except OSError:
            continue  # gone
    return owners


def connections(cgroup_dir: Path) -> list[dict]:
    """TCP and UDP sockets of the cgroup subtree: protocol, state, local and remote ends, owner."""
    return connections_of({cgroup_dir: cgroup_dir})[cgroup_dir]


def connections_of(cgroup_dirs: dict) -> dict:
    """connections() of many cgroup subtrees (by any key), from one sock_diag dump: asking
    the kernel once per agent was most of a start with a thousand agents."""
    from pyroute2 import DiagSocket

    owner_of_cgroup, pids = {}, set()
    for key, directory in cgroup_dirs.items():
        ids, more = subtree(directory)
        owner_of_cgroup.update((cgroup_id, key) for cgroup_id in ids)
        pids |= more
    owners = socket_owners(pids)
    found: dict = {key: [] for key in cgroup_dirs}
    with DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for protocol, name in ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp")):
                for msg in diag.get_sock_stats(family=family, protocol=protocol, states=ALL_STATES):
                    key = owner_of_cgroup.get(msg.get_attr("INET_DIAG_CGROUP_ID"))
                    if key is None:
                        continue
                    pid, comm = owners.get(msg["idiag_inode"], (None, None))
                    found[key].append({
                        "protocol": name,
                        "state": TCP_STATES.get(msg["idiag_state"], str(msg["idiag_state"])) if name == "tcp"
                        else "-",
                        "local": f"{msg['idiag_src']}:{msg['idiag_sport']}",
                        "remote": f"{msg['idiag_dst']}:{msg['idiag_dport']}",
                        "pid": pid,
                        "comm": comm,
                    })
    return found
