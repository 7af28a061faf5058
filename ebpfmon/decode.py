"""Decode: ring-buffer records (bytes) -> typed events, not yet enriched.

The decoder knows only what the record says; ppid, cgroup path and ancestry
are filled in by the enricher. Malformed records raise DecodeError.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from ebpfmon import events as ev
from ebpfmon.errors import DecodeError
from ebpfmon.kernel import abi

HEADER, _ = abi.unpacker(abi.EventHeader)
HEADER_SIZE = HEADER.size
# fixed part of each record; exec args and datagram payloads follow it
LAYOUTS = {
    abi.EventKind.EXEC: abi.unpacker(abi.ExecEvent, upto="args"),
    abi.EventKind.CONNECT: abi.unpacker(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.UDP_SEND: abi.unpacker(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.GPU_OPEN: abi.unpacker(abi.GpuOpenEvent),
    abi.EventKind.FORK: abi.unpacker(abi.ForkEvent),
    abi.EventKind.EXIT: abi.unpacker(abi.ExitEvent),
    abi.EventKind.CGROUP_MKDIR: abi.unpacker(abi.CgroupEvent),
    abi.EventKind.CGROUP_RMDIR: abi.unpacker(abi.CgroupEvent),
    abi.EventKind.REFUSED: abi.unpacker(abi.RefusedEvent),
    abi.EventKind.DEVICE: abi.unpacker(abi.DeviceEvent),
}
REFUSE_REASONS = {r.value: r.name.lower() for r in abi.RefuseReason}
REFUSE_OPS = {o.value: o.name.lower() for o in abi.RefuseOp}


def device_access(bits: int) -> str:
    """BPF_DEVCG_ACC_* bits (mknod 1, read 2, write 4) as r, w, rw or m."""
    text = ("r" if bits & 2 else "") + ("w" if bits & 4 else "")
    return text or ("m" if bits & 1 else "")

SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket"}
# socket() protocol numbers; 0 means the family's default for the type
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite", 262: "mptcp"}
DEFAULT_PROTOCOL = {"stream": "tcp", "dgram": "udp"}
FAMILIES = {2: "inet", 10: "inet6"}
EXEC_SYSCALLS = ("execve", "execveat")
OPEN_SYSCALLS = ("open", "openat", "openat2")
O_ACCMODE = 3
ACCESS = {0: "r", 1: "w", 2: "rw", 3: "rw"}


@dataclass
class CgroupChange:
    """A cgroup created or removed: keeps id -> path current. Not an agent event."""

    created: bool
    cgroup_id: int
    path: str


def boot_to_wall_offset() -> int:
    """ns to add to CLOCK_BOOTTIME (bpf_ktime_get_boot_ns) to get wall-clock time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def cstr(raw: bytes) -> str:
    """A NUL-terminated char array as text."""
    return ev.text(raw.split(b"\0", 1)[0])


def dns_query_name(payload: bytes) -> str | None:
    """The first question's name of a DNS query, or None if it does not parse."""
    if len(payload) < 13:
        return None
    labels, pos = [], 12
    while pos < len(payload):
        length = payload[pos]
        if length == 0:
            return ".".join(labels) if labels else None
        if length > 63 or pos + 1 + length > len(payload):
            return None
        labels.append(payload[pos + 1:pos + 1 + length].decode("ascii", "backslashreplace"))
        pos += 1 + length
    return None


IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw.startswith(IPV4_MAPPED_PREFIX):
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


class Decoder:
    def __init__(self) -> None:
        self.clock_offset = boot_to_wall_offset()

    def resync_clock(self) -> None:
        """Call now and then: the wall clock may be stepped (NTP) while we run."""
        self.clock_offset = boot_to_wall_offset()

    def decode(self, record: bytes) -> ev.Event | CgroupChange:
        if len(record) < HEADER_SIZE:
            raise DecodeError(f"record of {len(record)} bytes is shorter than an event header ({HEADER_SIZE})")
        kind_value, _, size = HEADER.unpack_from(record)[:3]
        if size != len(record):
            raise DecodeError(f"record says it has {size} bytes but has {len(record)} (kind {kind_value})")
        try:
            kind = abi.EventKind(kind_value)
        except ValueError:
            raise DecodeError(f"unknown event kind {kind_value} in a record of {len(record)} bytes") from None
        layout, names = LAYOUTS[kind]
        if len(record) < layout.size:
            raise DecodeError(f"{kind.name.lower()} record of {len(record)} bytes is shorter than its fixed "
                              f"part ({layout.size})")
        f = dict(zip(names, layout.unpack_from(record)))
        if kind in (abi.EventKind.CGROUP_MKDIR, abi.EventKind.CGROUP_RMDIR):
            return CgroupChange(kind == abi.EventKind.CGROUP_MKDIR, f["id"], cstr(f["path"]))
        common = {
            "time_ns": f["hdr.time_ns"] + self.clock_offset,
            "cgroup_id": f["hdr.cgroup_id"],
            "cgroup": None,
            "proc": ev.Process(pid=f["hdr.pid"], tid=f["hdr.tid"], ppid=f["hdr.ppid"], uid=f["hdr.uid"],
                               gid=f["hdr.gid"], comm=cstr(f["hdr.comm"])),
        }
        tail = record[layout.size:]
        return getattr(self, f"_{kind.name.lower()}")(f, tail, common)

    def _exec(self, f, tail, common) -> ev.ExecEvent:
        args = tail[:f["args_size"]].split(b"\0")[:f["argc"]]
        truncated = bool(f["hdr.flags"] & (abi.EVENT_F_ARGV_TRUNCATED | abi.EVENT_F_ARG_TRUNCATED |
                                       abi.EVENT_F_ARGV_UNREADABLE))
        return ev.ExecEvent(**common, filename=cstr(f["filename"]), argv=[ev.text(a) for a in args],
                            retval=f["retval"], argv_truncated=truncated,
                            syscall=_name(EXEC_SYSCALLS, f["syscall"]))

    @staticmethod
    def _sockaddr_fields(f) -> dict:
        sock_type = SOCK_TYPES.get(f["sock_type"])
        protocol = PROTOCOLS.get(f["protocol"]) if f["protocol"] else DEFAULT_PROTOCOL.get(sock_type)
        return {
            "family": FAMILIES.get(f["family"], str(f["family"])),
            "address": _address(f["family"], f["addr"]),
            "port": f["dport"],
            "sock_type": sock_type,
            "protocol": protocol,
            "retval": f["retval"],
            "fd": f["fd"],
        }

    def _connect(self, f, tail, common) -> ev.ConnectEvent:
        hooked = bool(f["hdr.flags"] & abi.EVENT_F_FROM_HOOK)
        return ev.ConnectEvent(**common, **self._sockaddr_fields(f), source="cgroup_hook" if hooked else "syscall")

    def _udp_send(self, f, tail, common) -> ev.UdpSendEvent:
        payload = tail[:f["payload_len"]]
        return ev.UdpSendEvent(**common, **self._sockaddr_fields(f), length=f["length"],
                               dns_query=dns_query_name(payload) if f["dport"] == 53 else None)

    def _gpu_open(self, f, tail, common) -> ev.GpuOpenEvent:
        return ev.GpuOpenEvent(**common, path=cstr(f["path"]), flags=f["flags"],
                               access=ACCESS[f["flags"] & O_ACCMODE], retval=f["retval"],
                               path_truncated=bool(f["hdr.flags"] & abi.EVENT_F_PATH_TRUNCATED),
                               syscall=_name(OPEN_SYSCALLS, f["syscall"]))

    def _refused(self, f, tail, common) -> ev.RefusedEvent:
        op = REFUSE_OPS.get(f["op"], str(f["op"]))
        fields = {}
        if op == "device":
            fields = {"device": f"{f['major']}:{f['minor']}", "access": device_access(f["access"])}
        elif f["family"] in FAMILIES:
            sock = self._sockaddr_fields({**f, "retval": 0, "fd": -1})
            fields = {k: sock[k] for k in ("family", "address", "port", "sock_type", "protocol")}
        return ev.RefusedEvent(**common, reason=REFUSE_REASONS.get(f["reason"], str(f["reason"])), op=op,
                               dry_run=bool(f["dry_run"]), agent_id=f["agent_id"], **fields)

    def _device(self, f, tail, common) -> ev.DeviceEvent:
        return ev.DeviceEvent(**common, device=f"{f['major']}:{f['minor']}", access=device_access(f["access"]),
                              agent_id=f["agent_id"])

    def _fork(self, f, tail, common) -> ev.ForkEvent:
        return ev.ForkEvent(**common, child_pid=f["child_pid"])

    def _exit(self, f, tail, common) -> ev.ExitEvent:
        return ev.ExitEvent(**common)


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if index < len(names) else str(index)
