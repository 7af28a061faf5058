"""ctypes mirror of probes/events.h: the one place Python knows the kernel's layout.

tests/kernel/test_abi.py checks every size, offset and constant here against
the C header, compiled by the same compiler as the probes.
"""

import ctypes
import struct
from enum import IntEnum

COMM_LEN = 16
PATH_MAX_CAPTURE = 256
EXEC_MAX_ARGS = 64
EXEC_ARG_MAX = 256
EXEC_ARGS_SIZE = 8192
PAYLOAD_MAX = 256
GPU_PREFIX_MAX = 64
GPU_PREFIXES_MAX = 16
EGRESS_RANGES = 8
EGRESS_UNCLASSIFIED = 0xFFFF
SCOPE_MAX_DEPTH = 16


class EventKind(IntEnum):
    EXEC = 1
    CONNECT = 2
    UDP_SEND = 3
    GPU_OPEN = 4
    FORK = 5
    EXIT = 6
    CGROUP_MKDIR = 7
    CGROUP_RMDIR = 8
    REFUSED = 9
    DEVICE = 10
    UNIX_CONNECT = 11


EVENT_KIND_MAX = 12


class RefuseReason(IntEnum):
    CUT = 1
    PORT = 2
    NET = 3
    GPU = 4
    EGRESS = 5


REFUSE_REASON_MAX = 6


class EgressMode(IntEnum):
    OFF = 0
    AUDIT = 1
    ENFORCE = 2


class GpuMajor(IntEnum):
    NVIDIA = 1  # nvidiaN is GPU N; 254 and 255 (nvidia-modeset, nvidiactl) are control nodes
    SHARED = 2  # every minor is a control node (nvidia-uvm, nvidia-uvm-tools, kfd)
    DRM = 3  # cardN, controlD(64+N) and renderD(128+N) are GPU N unless sysfs says otherwise
    INDEXED = 4  # minor N is accelerator N (accel)
    ADMIN = 5  # the driver's administration: MIG config and monitor, NVSwitch, NVLink, IMEX channels


class GpuNodeClass(IntEnum):
    GPU = 1  # one GPU's node: open to an agent granted that GPU (or a MIG instance on it)
    SHARED = 2  # a control node: open to every agent granted any GPU
    MIG = 3  # a MIG capability: open to an agent granted its GPU whole, or that instance
    ADMIN = 4  # administration: open only to an agent granted every GPU


GPU_INDEX_MAX = 64


class RefuseOp(IntEnum):
    CONNECT = 1
    SENDMSG = 2
    DEVICE = 3


class Counter(IntEnum):
    LOST = 0
    TRUNCATED = 1
    THROTTLED = 2


COUNTER_MAX = 3

EVENT_F_ARGV_TRUNCATED = 1 << 0
EVENT_F_ARG_TRUNCATED = 1 << 1
EVENT_F_PATH_TRUNCATED = 1 << 2
EVENT_F_ARGV_UNREADABLE = 1 << 3
EVENT_F_PAYLOAD_TRUNCATED = 1 << 4
EVENT_F_FROM_HOOK = 1 << 5

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32 = ctypes.c_int32


class EventHeader(ctypes.Structure):
    _fields_ = [
        ("kind", u16),
        ("flags", u16),
        ("size", u32),
        ("time_ns", u64),
        ("cgroup_id", u64),
        ("pid", u32),
        ("tid", u32),
        ("ppid", u32),
        ("_reserved", u32),
        ("uid", u32),
        ("gid", u32),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class ExecEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("retval", s32),
        ("argc", u32),
        ("args_size", u32),
        ("syscall", u32),
        ("dfd", s32),
        ("at_flags", u32),
        ("filename", ctypes.c_char * PATH_MAX_CAPTURE),
        ("args", ctypes.c_char * EXEC_ARGS_SIZE),
    ]


class SockaddrEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("retval", s32),
        ("fd", s32),
        ("family", u16),
        ("dport", u16),
        ("sock_type", u16),
        ("protocol", u16),
        ("addr", u8 * 16),
        ("length", u32),
        ("payload_len", u32),
        ("payload", u8 * PAYLOAD_MAX),
    ]


class GpuOpenEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("retval", s32),
        ("dfd", s32),
        ("flags", u32),
        ("syscall", u32),
        ("path", ctypes.c_char * PATH_MAX_CAPTURE),
    ]


class ForkEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("child_pid", u32), ("parent_pid", u32)]


class ExitEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader)]


class CgroupEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("id", u64),
        ("level", s32),
        ("_pad", u32),
        ("path", ctypes.c_char * PATH_MAX_CAPTURE),
    ]


class RefusedEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("agent_id", u64),
        ("reason", u32),
        ("op", u32),
        ("dry_run", u32),
        ("family", u16),
        ("dport", u16),
        ("sock_type", u16),
        ("protocol", u16),
        ("addr", u8 * 16),
        ("major", u32),
        ("minor", u32),
        ("access", u32),
        ("profile", u32),
    ]


class DeviceEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("agent_id", u64),
        ("major", u32),
        ("minor", u32),
        ("access", u32),
        ("_pad", u32),
    ]


class EnforceConfig(ctypes.Structure):
    _fields_ = [("agent_level", u32), ("dry_run", u32), ("gpu_default_deny", u32), ("dns_proxy_port", u32)]


class GpuPolicy(ctypes.Structure):
    _fields_ = [("allow", u32), ("every_gpu", u32), ("gpu_mask", u64), ("mig_mask", u64)]


class GpuNode(ctypes.Structure):
    _fields_ = [("node_class", u32), ("gpu", u32)]


class GpuMigKey(ctypes.Structure):
    _fields_ = [("agent_id", u64), ("major", u32), ("minor", u32)]


class LpmV4(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class LpmV6(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class EgressClass(ctypes.Structure):
    _fields_ = [("profile", u32), ("mode", u32)]


class EgressGeneration(ctypes.Structure):
    _fields_ = [("fallback", EgressClass), ("classified_only", u32), ("_pad", u32)]


class EgressState(ctypes.Structure):
    _fields_ = [("active", u32), ("_pad", u32), ("generation", EgressGeneration * 2)]


class EgressAgentKey(ctypes.Structure):
    _fields_ = [("agent", u64), ("generation", u32), ("_pad", u32)]


class EgressRange(ctypes.Structure):
    _fields_ = [("lo", u16), ("hi", u16), ("proto", u8), ("from_name", u8), ("_pad", u8 * 2)]


class EgressAllow(ctypes.Structure):
    _fields_ = [("expires_ns", u64), ("count", u32), ("_pad", u32), ("range", EgressRange * EGRESS_RANGES)]


class EgressV4(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("scope", u32), ("addr", u8 * 4)]


class EgressV6(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("scope", u32), ("addr", u8 * 16)]


class DnsClient(ctypes.Structure):
    _fields_ = [("agent_id", u64), ("cgroup_id", u64), ("pid", u32), ("tid", u32), ("uid", u32), ("gid", u32),
                ("family", u16), ("port", u16), ("addr", u8 * 16), ("comm", ctypes.c_char * COMM_LEN)]


class DnsClientKey(ctypes.Structure):
    _fields_ = [("ip_version", u8), ("protocol", u8), ("port", u16)]


class ProbeConfig(ctypes.Structure):
    _fields_ = [("all_cgroups", u32), ("ignore_tgid", u32), ("scope_generation", u32)]


class GpuPrefix(ctypes.Structure):
    _fields_ = [("len", u32), ("prefix", ctypes.c_char * GPU_PREFIX_MAX)]


# C struct name -> mirror, for the layout check
STRUCTS = {
    "event_header": EventHeader,
    "exec_event": ExecEvent,
    "sockaddr_event": SockaddrEvent,
    "gpu_open_event": GpuOpenEvent,
    "fork_event": ForkEvent,
    "exit_event": ExitEvent,
    "cgroup_event": CgroupEvent,
    "refused_event": RefusedEvent,
    "device_event": DeviceEvent,
    "enforce_config": EnforceConfig,
    "gpu_policy": GpuPolicy,
    "gpu_node": GpuNode,
    "gpu_mig_key": GpuMigKey,
    "lpm_v4": LpmV4,
    "lpm_v6": LpmV6,
    "probe_config": ProbeConfig,
    "gpu_prefix": GpuPrefix,
    "egress_class": EgressClass,
    "egress_generation": EgressGeneration,
    "egress_state": EgressState,
    "egress_agent_key": EgressAgentKey,
    "egress_range": EgressRange,
    "egress_allow": EgressAllow,
    "egress_v4": EgressV4,
    "egress_v6": EgressV6,
    "dns_client": DnsClient,
    "dns_client_key": DnsClientKey,
}

# record kind -> struct; records may be shorter than the struct (variable tail)
RECORDS = {
    EventKind.EXEC: ExecEvent,
    EventKind.CONNECT: SockaddrEvent,
    EventKind.UDP_SEND: SockaddrEvent,
    EventKind.GPU_OPEN: GpuOpenEvent,
    EventKind.FORK: ForkEvent,
    EventKind.EXIT: ExitEvent,
    EventKind.CGROUP_MKDIR: CgroupEvent,
    EventKind.CGROUP_RMDIR: CgroupEvent,
    EventKind.REFUSED: RefusedEvent,
    EventKind.UNIX_CONNECT: SockaddrEvent,
    EventKind.DEVICE: DeviceEvent,
}

# C constant name -> value, for the constants check
CONSTANTS = {
    "COMM_LEN": COMM_LEN,
    "PATH_MAX_CAPTURE": PATH_MAX_CAPTURE,
    "EXEC_MAX_ARGS": EXEC_MAX_ARGS,
    "EXEC_ARG_MAX": EXEC_ARG_MAX,
    "EXEC_ARGS_SIZE": EXEC_ARGS_SIZE,
    "PAYLOAD_MAX": PAYLOAD_MAX,
    "GPU_PREFIX_MAX": GPU_PREFIX_MAX,
    "GPU_PREFIXES_MAX": GPU_PREFIXES_MAX,
    "SCOPE_MAX_DEPTH": SCOPE_MAX_DEPTH,
    "GPU_INDEX_MAX": GPU_INDEX_MAX,
    **{f"GPU_MAJOR_{m.name}": m.value for m in GpuMajor},
    **{f"GPU_NODE_{c.name}": c.value for c in GpuNodeClass},
    "EGRESS_RANGES": EGRESS_RANGES,
    "EGRESS_UNCLASSIFIED": EGRESS_UNCLASSIFIED,
    **{f"EGRESS_{m.name}": m.value for m in EgressMode},
    "EVENT_KIND_MAX": EVENT_KIND_MAX,
    "COUNTER_MAX": COUNTER_MAX,
    "EVENT_F_ARGV_TRUNCATED": EVENT_F_ARGV_TRUNCATED,
    "EVENT_F_ARG_TRUNCATED": EVENT_F_ARG_TRUNCATED,
    "EVENT_F_PATH_TRUNCATED": EVENT_F_PATH_TRUNCATED,
    "EVENT_F_ARGV_UNREADABLE": EVENT_F_ARGV_UNREADABLE,
    "EVENT_F_PAYLOAD_TRUNCATED": EVENT_F_PAYLOAD_TRUNCATED,
    "EVENT_F_FROM_HOOK": EVENT_F_FROM_HOOK,
    "REFUSE_REASON_MAX": REFUSE_REASON_MAX,
    **{f"REFUSE_{r.name}": r.value for r in RefuseReason},
    **{f"OP_{o.name}": o.value for o in RefuseOp},
    **{f"EVENT_{kind.name}": kind.value for kind in EventKind},
    **{f"COUNTER_{c.name}": c.value for c in Counter},
}


_STRUCT_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q",
                 ctypes.c_int32: "i"}


def _flatten(cls: type[ctypes.Structure], base: int = 0):
    """(offset, name, struct code) of every field; nested struct fields are named "hdr.pid"."""
    for name, ftype in cls._fields_:
        offset = base + getattr(cls, name).offset
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            for sub_offset, sub_name, code in _flatten(ftype, offset):
                yield sub_offset, f"{name}.{sub_name}", code
        elif issubclass(ftype, ctypes.Array):
            yield offset, name, f"{ctypes.sizeof(ftype)}s"
        else:
            yield offset, name, _STRUCT_CODES[ftype]


def unpacker(cls: type[ctypes.Structure], upto: str | None = None,
             after_header: bool = False) -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct.Struct reading cls's fields (up to, not including, field upto; after the event
    header, to unpack at its end, with after_header) and their names.

    Decoding with struct is several times faster than ctypes attribute access,
    and the layout still comes from the one mirror above.
    """
    fmt, names, pos = "<", [], 0
    start = ctypes.sizeof(EventHeader) if after_header else 0
    for offset, name, code in _flatten(cls):
        if name == upto:
            break
        if offset < start:
            continue
        offset -= start
        if offset > pos:
            fmt += f"{offset - pos}x"
        fmt += code
        names.append(name)
        pos = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt), tuple(names)
