"""Decode: ring-buffer records (bytes) -> typed events, not yet enriched.

The decoder knows only what the record says; ppid, cgroup path and ancestry
are filled in by the enricher. Malformed records raise DecodeError.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass

from ebpfmon import events as ev
from ebpfmon.errors import DecodeError
from ebpfmon.kernel import abi

HEADER_SIZE = ctypes.sizeof(abi.EventHeader)

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


def _struct(record: bytes, cls: type[ctypes.Structure]) -> ctypes.Structure:
    # records with a variable tail are shorter than the struct: pad with zeros
    size = ctypes.sizeof(cls)
    if len(record) < size:
        record = record + bytes(size - len(record))
    return cls.from_buffer_copy(record[:size])


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


def _address(family: int, raw: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4]))
    addr = ipaddress.IPv6Address(raw[:16])
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


class Decoder:
    def __init__(self) -> None:
        self.clock_offset = boot_to_wall_offset()

    def resync_clock(self) -> None:
        """Call now and then: the wall clock may be stepped (NTP) while we run."""
        self.clock_offset = boot_to_wall_offset()

    def decode(self, record: bytes) -> ev.Event | CgroupChange:
        if len(record) < HEADER_SIZE:
            raise DecodeError(f"record of {len(record)} bytes is shorter than an event header ({HEADER_SIZE})")
        hdr = abi.EventHeader.from_buffer_copy(record[:HEADER_SIZE])
        if hdr.size != len(record):
            raise DecodeError(f"record says it has {hdr.size} bytes but has {len(record)} (kind {hdr.kind})")
        try:
            kind = abi.EventKind(hdr.kind)
        except ValueError:
            raise DecodeError(f"unknown event kind {hdr.kind} in a record of {len(record)} bytes") from None
        if kind in (abi.EventKind.CGROUP_MKDIR, abi.EventKind.CGROUP_RMDIR):
            c = _struct(record, abi.CgroupEvent)
            return CgroupChange(kind == abi.EventKind.CGROUP_MKDIR, c.id, ev.text(c.path))
        common = {
            "time_ns": hdr.time_ns + self.clock_offset,
            "cgroup_id": hdr.cgroup_id,
            "cgroup": None,
            "proc": ev.Process(pid=hdr.pid, tid=hdr.tid, ppid=hdr.ppid, uid=hdr.uid, gid=hdr.gid,
                               comm=ev.text(hdr.comm)),
        }
        return getattr(self, f"_{kind.name.lower()}")(record, hdr, common)

    def _exec(self, record, hdr, common) -> ev.ExecEvent:
        e = _struct(record, abi.ExecEvent)
        # raw bytes: a c_char array field would stop at the first NUL
        start = abi.ExecEvent.args.offset
        args = record[start:start + e.args_size].split(b"\0")[:e.argc]
        truncated = bool(hdr.flags & (abi.EVENT_F_ARGV_TRUNCATED | abi.EVENT_F_ARG_TRUNCATED |
                                      abi.EVENT_F_ARGV_UNREADABLE))
        return ev.ExecEvent(**common, filename=ev.text(e.filename), argv=[ev.text(a) for a in args],
                            retval=e.retval, argv_truncated=truncated,
                            syscall=EXEC_SYSCALLS[e.syscall] if e.syscall < 2 else str(e.syscall))

    def _sockaddr_fields(self, e) -> dict:
        sock_type = SOCK_TYPES.get(e.sock_type)
        protocol = PROTOCOLS.get(e.protocol) if e.protocol else DEFAULT_PROTOCOL.get(sock_type)
        return {
            "family": FAMILIES.get(e.family, str(e.family)),
            "address": _address(e.family, bytes(e.addr)),
            "port": e.dport,
            "sock_type": sock_type,
            "protocol": protocol,
            "retval": e.retval,
            "fd": e.fd,
        }

    def _connect(self, record, hdr, common) -> ev.ConnectEvent:
        return ev.ConnectEvent(**common, **self._sockaddr_fields(_struct(record, abi.SockaddrEvent)))

    def _udp_send(self, record, hdr, common) -> ev.UdpSendEvent:
        e = _struct(record, abi.SockaddrEvent)
        payload = bytes(e.payload)[:e.payload_len]
        return ev.UdpSendEvent(**common, **self._sockaddr_fields(e), length=e.length,
                               dns_query=dns_query_name(payload) if e.dport == 53 else None)

    def _gpu_open(self, record, hdr, common) -> ev.GpuOpenEvent:
        e = _struct(record, abi.GpuOpenEvent)
        return ev.GpuOpenEvent(**common, path=ev.text(e.path), flags=e.flags,
                               access=ACCESS[e.flags & O_ACCMODE], retval=e.retval,
                               path_truncated=bool(hdr.flags & abi.EVENT_F_PATH_TRUNCATED),
                               syscall=OPEN_SYSCALLS[e.syscall] if e.syscall < 3 else str(e.syscall))

    def _fork(self, record, hdr, common) -> ev.ForkEvent:
        return ev.ForkEvent(**common, child_pid=_struct(record, abi.ForkEvent).child_pid)

    def _exit(self, record, hdr, common) -> ev.ExitEvent:
        return ev.ExitEvent(**common)
