"""Decode: ring-buffer records (bytes) -> typed events, not yet enriched.

The decoder knows only what the record says; ppid, cgroup path and ancestry
are filled in by the enricher. Malformed records raise DecodeError.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from ebpfmon import events as ev
from ebpfmon.stream import _decode
from ebpfmon.errors import DecodeError
from ebpfmon.kernel import abi

# every record starts with the header; its comm is the last field
HEADER = abi.unpacker(abi.EventHeader)[0]
HEADER_SIZE = HEADER.size


def body(cls, upto: str | None = None) -> tuple[struct.Struct, tuple[str, ...]]:
    """The struct reading a record's fixed part after the header, and the fields' names. Its
    builder below takes the values as parameters of those names, in that order (checked by
    tests/unit/test_decode.py): a named tuple per record costs more than the fields."""
    return abi.unpacker(cls, upto, after_header=True)


# fixed part of each record after the header; exec args and datagram payloads follow it
BODIES = {
    abi.EventKind.EXEC: body(abi.ExecEvent, upto="args"),
    abi.EventKind.CONNECT: body(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.UDP_SEND: body(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.UNIX_CONNECT: body(abi.SockaddrEvent, upto="payload"),
    abi.EventKind.GPU_OPEN: body(abi.GpuOpenEvent),
    abi.EventKind.FORK: body(abi.ForkEvent),
    abi.EventKind.EXIT: body(abi.ExitEvent),
    abi.EventKind.CGROUP_MKDIR: body(abi.CgroupEvent),
    abi.EventKind.CGROUP_RMDIR: body(abi.CgroupEvent),
    abi.EventKind.REFUSED: body(abi.RefusedEvent),
    abi.EventKind.DEVICE: body(abi.DeviceEvent),
}
# where an exec record's arguments start, and a sockaddr record's payload
EXEC_ARGS = HEADER_SIZE + BODIES[abi.EventKind.EXEC][0].size
SOCKADDR_PAYLOAD = HEADER_SIZE + BODIES[abi.EventKind.CONNECT][0].size
# forks and exits only keep the process tree (no stream delivers them) and come with every
# exec, two records of its three: read whole (header and body) without an event made of them
SIZE_FIELD, SIZE_OFFSET = struct.Struct("<I"), abi.EventHeader.size.offset
TREE_RECORDS = {abi.EventKind.FORK.value: abi.unpacker(abi.ForkEvent)[0],
                abi.EventKind.EXIT.value: abi.unpacker(abi.ExitEvent)[0]}
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
    """Records -> events. Connect and datagram records (every connect an agent makes) are
    decoded in C, ebpfmon/stream/_decode.c, through the probes' own struct; it builds the same events
    from the same caches and hands every other record to decode_other. Each Python builder below
    takes the header's parts (time, cgroup id, process, flags), the record, and the fixed part's
    fields by position; frequent kinds build their event by position too, in the order its class
    declares the fields (keywords are a large part of decoding a connect).

    decode(record) -> event or CgroupChange; DecodeError for a malformed record."""

    def __init__(self) -> None:
        # kind number -> (struct, builder): one dict lookup per record; no builder for the kinds
        # decoded in C
        self.kinds = {kind.value: (unpacker, getattr(self, f"_{kind.name.lower()}", None))
                      for kind, (unpacker, _) in BODIES.items()}
        # the same few comms and destinations recur in every event of a process: their text
        # is made once (making it is most of decoding a connect)
        self._comms: dict[bytes, str] = {}
        self._sockets: dict[tuple, tuple[str, str, str | None, str | None]] = {}
        self.decode = _decode.SockaddrDecoder(self._comms, self._sockets, self._comm_text, self._socket,
                                              dns_query_name, ev.Process, ev.ConnectEvent, ev.UdpSendEvent,
                                              self.decode_other)
        self.resync_clock()

    @property
    def clock_offset(self) -> int:
        """ns added to the records' CLOCK_BOOTTIME times: wall-clock times."""
        return self.decode.clock_offset

    def resync_clock(self) -> None:
        """Call now and then: the wall clock may be stepped (NTP) while we run."""
        self.decode.clock_offset = boot_to_wall_offset()

    def decode_other(self, record: bytes) -> ev.Event | CgroupChange:
        """Records of the kinds decoded here, and malformed records of any kind (DecodeError)."""
        length = len(record)
        if length < HEADER_SIZE:
            raise DecodeError(f"record of {length} bytes is shorter than an event header ({HEADER_SIZE})")
        kind_value, hdr_flags, size, time_ns, cgroup_id, pid, tid, ppid, _, uid, gid, raw_comm = \
            HEADER.unpack_from(record)
        if size != length:
            raise DecodeError(f"record says it has {size} bytes but has {length} (kind {kind_value})")
        try:
            unpacker, build = self.kinds[kind_value]
        except KeyError:
            raise DecodeError(f"unknown event kind {kind_value} in a record of {length} bytes") from None
        if length < HEADER_SIZE + unpacker.size:
            raise DecodeError(f"{abi.EventKind(kind_value).name.lower()} record of {length} bytes is "
                              f"shorter than its fixed part ({HEADER_SIZE + unpacker.size})")
        if build is None:  # a kind decoded in C, given as a bytearray or a memoryview
            return self.decode(bytes(record))
        comm = self._comms.get(raw_comm)
        if comm is None:
            comm = self._comm_text(raw_comm)
        return build(time_ns + self.decode.clock_offset, cgroup_id, ev.Process(pid, tid, ppid, uid, gid, comm),
                     hdr_flags, record, *unpacker.unpack_from(record, HEADER_SIZE))

    def tree_change(self, record: bytes) -> tuple[int, int, int, int, str]:
        """A fork or exit record (TREE_RECORDS) as (kind, pid, tid, child pid or 0, comm);
        DecodeError when malformed."""
        fields = TREE_RECORDS[record[0]]
        length = len(record)
        # the header's size field must say that length too
        if length != fields.size or SIZE_FIELD.unpack_from(record, SIZE_OFFSET)[0] != length:
            self.decode_other(record)  # says what is wrong with it
            raise DecodeError(f"{abi.EventKind(record[0]).name.lower()} record of {length} bytes, not {fields.size}")
        kind, _, _, _, _, pid, tid, _, _, _, _, raw_comm, *child = fields.unpack_from(record)
        comm = self._comms.get(raw_comm)
        if comm is None:
            comm = self._comm_text(raw_comm)
        return kind, pid, tid, child[0] if child else 0, comm

    def _comm_text(self, raw_comm: bytes) -> str:
        return _remember(self._comms, raw_comm, cstr(raw_comm))

    def _exec(self, time_ns, cgroup_id, proc, hdr_flags, record,
              retval, argc, args_size, syscall, dfd, at_flags, filename) -> ev.ExecEvent:
        args = record[EXEC_ARGS:EXEC_ARGS + args_size].split(b"\0")[:argc]
        truncated = bool(hdr_flags & (abi.EVENT_F_ARGV_TRUNCATED | abi.EVENT_F_ARG_TRUNCATED |
                                      abi.EVENT_F_ARGV_UNREADABLE))
        return ev.ExecEvent(time_ns, cgroup_id, None, proc, [], cstr(filename), [ev.text(a) for a in args], retval,
                            truncated, _name(EXEC_SYSCALLS, syscall),
                            "none" if hdr_flags & abi.EVENT_F_ARGV_UNREADABLE else "kernel")

    def _socket(self, family, addr, sock_type, protocol) -> tuple[str, str, str | None, str | None]:
        """family, address, socket type and protocol of a sockaddr or refused record, as text
        (called from C on a miss, with the same key)."""
        key = (family, addr, sock_type, protocol)
        known = self._sockets.get(key)
        if known is None:
            type_name = SOCK_TYPES.get(sock_type)
            protocol_name = PROTOCOLS.get(protocol) if protocol else DEFAULT_PROTOCOL.get(type_name)
            known = _remember(self._sockets, key, (FAMILIES.get(family, str(family)), _address(family, addr),
                                                   type_name, protocol_name))
        return known

    def _unix_connect(self, time_ns, cgroup_id, proc, hdr_flags, record,
                      retval, fd, family, dport, sock_type, protocol, addr, length, payload_len) -> ev.UnixConnectEvent:
        raw = record[SOCKADDR_PAYLOAD:SOCKADDR_PAYLOAD + payload_len]
        path = "@" + ev.text(raw[1:].rstrip(b"\0")) if raw.startswith(b"\0") else cstr(raw)
        return ev.UnixConnectEvent(time_ns, cgroup_id, None, proc, [], path, "", retval, fd)

    def _gpu_open(self, time_ns, cgroup_id, proc, hdr_flags, record,
                  retval, dfd, flags, syscall, path) -> ev.GpuOpenEvent:
        return ev.GpuOpenEvent(time_ns, cgroup_id, None, proc, [], cstr(path), flags, ACCESS[flags & O_ACCMODE],
                               retval, None, None, bool(hdr_flags & abi.EVENT_F_PATH_TRUNCATED),
                               _name(OPEN_SYSCALLS, syscall))

    def _refused(self, time_ns, cgroup_id, proc, hdr_flags, record,
                 agent_id, reason, op, dry_run, family, dport, sock_type, protocol, addr, major, minor, access,
                 profile) -> ev.RefusedEvent:
        op_name = REFUSE_OPS.get(op, str(op))
        fields = {}
        if op_name == "device":
            fields = {"device": f"{major}:{minor}", "access": device_access(access)}
        elif family in FAMILIES:
            family_name, address, type_name, protocol_name = self._socket(family, addr, sock_type, protocol)
            fields = {"family": family_name, "address": address, "port": dport, "sock_type": type_name,
                      "protocol": protocol_name}
        return ev.RefusedEvent(time_ns, cgroup_id, None, proc, reason=REFUSE_REASONS.get(reason, str(reason)),
                               op=op_name, dry_run=bool(dry_run), agent_id=agent_id, profile_id=profile, **fields)

    def _device(self, time_ns, cgroup_id, proc, hdr_flags, record,
                agent_id, major, minor, access, _pad) -> ev.DeviceEvent:
        return ev.DeviceEvent(time_ns, cgroup_id, None, proc, device=f"{major}:{minor}", access=device_access(access),
                              agent_id=agent_id)

    def _fork(self, time_ns, cgroup_id, proc, hdr_flags, record, child_pid, parent_pid) -> ev.ForkEvent:
        return ev.ForkEvent(time_ns, cgroup_id, None, proc, [], child_pid)

    def _exit(self, time_ns, cgroup_id, proc, hdr_flags, record) -> ev.ExitEvent:
        return ev.ExitEvent(time_ns, cgroup_id, None, proc, [])

    def _cgroup_mkdir(self, time_ns, cgroup_id, proc, hdr_flags, record,
                      id, level, _pad, path) -> CgroupChange:  # noqa: A002 (the field's name)
        return CgroupChange(True, id, cstr(path))

    def _cgroup_rmdir(self, time_ns, cgroup_id, proc, hdr_flags, record,
                      id, level, _pad, path) -> CgroupChange:  # noqa: A002 (the field's name)
        return CgroupChange(False, id, cstr(path))


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if index < len(names) else str(index)
