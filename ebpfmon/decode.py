"""Decode: ring-buffer records (bytes) -> typed events, not yet enriched.

The decoder knows only what the record says; ppid, cgroup path and ancestry
are filled in by the enricher. Malformed records raise DecodeError.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import namedtuple
from dataclasses import dataclass

from ebpfmon import events as ev
from ebpfmon.errors import DecodeError
from ebpfmon.kernel import abi

# kind, flags and size: enough to pick the record's layout and check its length
PREFIX = struct.Struct("<HHI")
HEADER_SIZE = abi.unpacker(abi.EventHeader)[0].size


def layout(cls, upto: str | None = None) -> tuple[struct.Struct, type]:
    """The struct reading a record's fixed part and a named tuple of its fields, named as
    in the abi mirror with "hdr.pid" as hdr_pid (padding renamed; a tuple, not a dict: half the
    decode time)."""
    unpacker, names = abi.unpacker(cls, upto)
    return unpacker, namedtuple(cls.__name__ + "Fields", [n.replace(".", "_") for n in names], rename=True)


# fixed part of each record; exec args and datagram payloads follow it
LAYOUTS = {
    abi.EventKind.EXEC: layout(abi.ExecEvent, upto="args"),
    abi.EventKind.CONNECT: layout(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.UDP_SEND: layout(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.GPU_OPEN: layout(abi.GpuOpenEvent),
    abi.EventKind.FORK: layout(abi.ForkEvent),
    abi.EventKind.EXIT: layout(abi.ExitEvent),
    abi.EventKind.CGROUP_MKDIR: layout(abi.CgroupEvent),
    abi.EventKind.CGROUP_RMDIR: layout(abi.CgroupEvent),
    abi.EventKind.REFUSED: layout(abi.RefusedEvent),
    abi.EventKind.DEVICE: layout(abi.DeviceEvent),
}
# where the variable part of a record starts: exec arguments, datagram payloads
EXEC_ARGS = LAYOUTS[abi.EventKind.EXEC][0].size
PAYLOAD = LAYOUTS[abi.EventKind.UDP_SEND][0].size
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


# entries each text cache keeps before it starts afresh (bounded memory, whatever agents do)
TEXT_CACHE_MAX = 4096


def _remember(cache: dict, key, value):
    """Puts value in a text cache, emptying it first when full; returns value."""
    if len(cache) >= TEXT_CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


class Decoder:
    """The builders of the frequent kinds pass an event's fields by position, in the order the
    event class declares them: keyword arguments were a fifth of decoding a connect."""

    def __init__(self) -> None:
        self.clock_offset = boot_to_wall_offset()
        # kind number -> (struct, fields tuple, builder): one dict lookup per record
        self.kinds = {kind.value: (unpacker, fields, getattr(self, f"_{kind.name.lower()}"))
                      for kind, (unpacker, fields) in LAYOUTS.items()}
        # the same few comms and destinations recur in every event of a process: their text
        # is made once (it was half of decoding a connect)
        self._comms: dict[bytes, str] = {}
        self._sockets: dict[tuple, tuple[str, str, str | None, str | None]] = {}

    def resync_clock(self) -> None:
        """Call now and then: the wall clock may be stepped (NTP) while we run."""
        self.clock_offset = boot_to_wall_offset()

    def decode(self, record: bytes) -> ev.Event | CgroupChange:
        length = len(record)
        if length < HEADER_SIZE:
            raise DecodeError(f"record of {length} bytes is shorter than an event header ({HEADER_SIZE})")
        kind_value = record[0] | record[1] << 8  # the header's first field, u16 little-endian
        try:
            unpacker, fields, build = self.kinds[kind_value]
        except KeyError:
            raise DecodeError(f"unknown event kind {kind_value} in a record of {length} bytes") from None
        if length < unpacker.size:
            self._check_size(record, length)
            raise DecodeError(f"{abi.EventKind(kind_value).name.lower()} record of {length} bytes is "
                              f"shorter than its fixed part ({unpacker.size})")
        f = fields._make(unpacker.unpack_from(record))
        if f.hdr_size != length:
            self._check_size(record, length)
        return build(f, record)

    @staticmethod
    def _check_size(record: bytes, length: int) -> None:
        kind_value, _, size = PREFIX.unpack_from(record)
        if size != length:
            raise DecodeError(f"record says it has {size} bytes but has {length} (kind {kind_value})")

    def _process(self, f) -> ev.Process:
        comm = self._comms.get(f.hdr_comm)
        if comm is None:
            comm = _remember(self._comms, f.hdr_comm, cstr(f.hdr_comm))
        return ev.Process(f.hdr_pid, f.hdr_tid, f.hdr_ppid, f.hdr_uid, f.hdr_gid, comm)

    def _exec(self, f, record) -> ev.ExecEvent:
        args = record[EXEC_ARGS:EXEC_ARGS + f.args_size].split(b"\0")[:f.argc]
        truncated = bool(f.hdr_flags & (abi.EVENT_F_ARGV_TRUNCATED | abi.EVENT_F_ARG_TRUNCATED |
                                        abi.EVENT_F_ARGV_UNREADABLE))
        return ev.ExecEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [],
                            cstr(f.filename), [ev.text(a) for a in args], f.retval, truncated,
                            _name(EXEC_SYSCALLS, f.syscall),
                            "none" if f.hdr_flags & abi.EVENT_F_ARGV_UNREADABLE else "kernel")

    def _socket(self, f) -> tuple[str, str, str | None, str | None]:
        """family, address, socket type and protocol of a sockaddr or refused record."""
        key = (f.family, f.addr, f.sock_type, f.protocol)
        known = self._sockets.get(key)
        if known is None:
            sock_type = SOCK_TYPES.get(f.sock_type)
            protocol = PROTOCOLS.get(f.protocol) if f.protocol else DEFAULT_PROTOCOL.get(sock_type)
            known = _remember(self._sockets, key, (FAMILIES.get(f.family, str(f.family)),
                                                   _address(f.family, f.addr), sock_type, protocol))
        return known

    def _connect(self, f, record) -> ev.ConnectEvent:
        family, address, sock_type, protocol = self._socket(f)
        return ev.ConnectEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [],
                               family, address, f.dport, sock_type, protocol, f.retval, f.fd,
                               "cgroup_hook" if f.hdr_flags & abi.EVENT_F_FROM_HOOK else "syscall")

    def _udp_send(self, f, record) -> ev.UdpSendEvent:
        family, address, sock_type, protocol = self._socket(f)
        return ev.UdpSendEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [],
                               family, address, f.dport, sock_type, protocol, f.retval, f.fd, "syscall",
                               f.length,
                               dns_query_name(record[PAYLOAD:PAYLOAD + f.payload_len]) if f.dport == 53 else None)

    def _gpu_open(self, f, record) -> ev.GpuOpenEvent:
        return ev.GpuOpenEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [],
                               cstr(f.path), f.flags, ACCESS[f.flags & O_ACCMODE], f.retval, None, None,
                               bool(f.hdr_flags & abi.EVENT_F_PATH_TRUNCATED), _name(OPEN_SYSCALLS, f.syscall))

    def _refused(self, f, record) -> ev.RefusedEvent:
        op = REFUSE_OPS.get(f.op, str(f.op))
        fields = {}
        if op == "device":
            fields = {"device": f"{f.major}:{f.minor}", "access": device_access(f.access)}
        elif f.family in FAMILIES:
            family, address, sock_type, protocol = self._socket(f)
            fields = {"family": family, "address": address, "port": f.dport, "sock_type": sock_type,
                      "protocol": protocol}
        return ev.RefusedEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f),
                               reason=REFUSE_REASONS.get(f.reason, str(f.reason)), op=op,
                               dry_run=bool(f.dry_run), agent_id=f.agent_id, **fields)

    def _device(self, f, record) -> ev.DeviceEvent:
        return ev.DeviceEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f),
                              device=f"{f.major}:{f.minor}", access=device_access(f.access), agent_id=f.agent_id)

    def _fork(self, f, record) -> ev.ForkEvent:
        return ev.ForkEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [],
                            f.child_pid)

    def _exit(self, f, record) -> ev.ExitEvent:
        return ev.ExitEvent(f.hdr_time_ns + self.clock_offset, f.hdr_cgroup_id, None, self._process(f), [])

    @staticmethod
    def _cgroup_change(f, created: bool) -> CgroupChange:
        return CgroupChange(created, f.id, cstr(f.path))

    def _cgroup_mkdir(self, f, record) -> CgroupChange:
        return self._cgroup_change(f, True)

    def _cgroup_rmdir(self, f, record) -> CgroupChange:
        return self._cgroup_change(f, False)


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if index < len(names) else str(index)
