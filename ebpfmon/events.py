"""Typed events and their one JSON form.

This is the contract between the kernel reader, the rules, recorded traces,
replay and every sink. Strings that come from agents (argv, paths, comm) are
bytes in the kernel; they are decoded as UTF-8 with surrogateescape, so bytes
that are not UTF-8 survive as lone surrogates. json.dumps writes those as
\\udcXX escapes and json.loads reads them back: a recorded trace keeps every
byte. Use raw_bytes() to get the original bytes back.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import operator
from dataclasses import dataclass, field, fields
from collections.abc import Iterator
from typing import Any

import orjson


def text(raw: bytes) -> str:
    """Kernel bytes as str, losslessly."""
    return raw.decode("utf-8", "surrogateescape")


def raw_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


ERROR_NAMES = {-number: name for number, name in errno.errorcode.items()}  # -2 -> ENOENT


def error_name(retval: int) -> str | None:
    """'ENOENT' for -2; None for success (retval >= 0)."""
    if retval >= 0:
        return None
    return ERROR_NAMES.get(retval) or f"E{-retval}"


def vars_of(obj) -> dict[str, Any]:
    return dict(obj.__dict__)  # the dataclass's fields, copied at C speed


@dataclass
class Process:
    pid: int
    tid: int
    ppid: int
    uid: int
    gid: int
    comm: str
    exe: str | None = None
    argv: list[str] | None = None  # of the program the process runs, when known


@dataclass
class Ancestor:
    pid: int
    comm: str | None = None
    exe: str | None = None
    argv: list[str] | None = None


@dataclass(frozen=True)
class Container:
    """Field names as Falco's container.* fields. Only id and runtime until the runtime answered
    (known is then True)."""

    id: str
    runtime: str
    name: str | None = None
    image: str | None = None  # as given to the runtime: registry/repository:tag, or None (a rootfs)
    labels: dict[str, str] = field(default_factory=dict)
    known: bool = False

    def __hash__(self) -> int:  # labels are a dict; a container's are fixed for its id
        return hash((self.id, self.known))

    @property
    def image_repository(self) -> str | None:
        return image_parts(self.image)[0]

    @property
    def image_tag(self) -> str | None:
        return image_parts(self.image)[1]

    def describe(self) -> str:
        """For people: the name, image and id in short."""
        image = f" ({self.image})" if self.image else ""
        return f"{self.runtime} container {self.name or '?'}{image} {self.id[:12]}"


def image_parts(image: str | None) -> tuple[str | None, str | None]:
    """registry/repo:tag@digest -> (registry/repo, tag); a port in the registry is not a tag."""
    if not image:
        return None, None
    name = image.split("@", 1)[0]
    repository, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        return name, None
    return repository, tag


class Ancestry(list):
    """Ancestors, parent first. The process tree shares one between the events of a process
    while the tree does not change, so its JSON is made once, with it: long ancestor command
    lines (container shims, agent runtimes) were most of the audit log's cost per event. Made
    whole, then not changed: its id and JSON are of what it held when made."""

    __slots__ = ("id", "json", "pids")

    def __init__(self, ancestors=()):
        super().__init__(ancestors)
        self.pids = frozenset(a.pid for a in self)
        try:
            raw = orjson.dumps(list(self))
        except orjson.JSONEncodeError:  # lone surrogates
            raw = b""
        if not raw.isascii() or not raw:
            raw = json.dumps([vars_of(a) for a in self], separators=(",", ":")).encode()
        self.id = hashlib.blake2b(raw, digest_size=8).hexdigest()  # names the list in the audit log
        self.json = orjson.Fragment(raw)  # ASCII


def ancestry_line(ancestry_id: str, fragment: orjson.Fragment) -> bytes:
    """The audit log's line for an ancestry its events name by ancestry_id."""
    return orjson.dumps({"kind": "ancestry", "id": ancestry_id, "ancestry": fragment})


# orjson's defaults for an event's Ancestry (the one type in an event it does not write itself):
# by id for the audit log, listed for an event's own line. C callables: orjson calls one per event.
_ancestry_id = operator.attrgetter("id")
_ancestry_listed = operator.attrgetter("json")


def kind_field(kind: str):
    """The event's kind: the first field of its JSON, set by the class (keyword-only, so
    builders pass the other fields by position). An instance attribute, not a ClassVar:
    CPython 3.11 reads those fast, and orjson writes it with the rest."""
    return field(default=kind, kw_only=True, repr=False)


@dataclass
class Event:
    """Fields every event has. Subclasses add what their kind carries."""

    kind: str = kind_field("")
    time_ns: int  # wall clock, ns since the epoch
    cgroup_id: int
    cgroup: str | None  # path relative to the cgroup2 mount; None if unknown
    proc: Process
    ancestry: list[Ancestor] = field(default_factory=list)
    # the container the agent is, when it is one (host/containers.py); keyword-only, so the
    # kinds' own fields keep their positions
    container: Container | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and is the slowest part of JSON output
        data = {name: getattr(self, name) for name in self._field_names()}
        data["proc"] = vars_of(self.proc)
        data["ancestry"] = [vars_of(a) for a in self.ancestry]
        if self.container is not None:
            data["container"] = {**vars_of(self.container), "labels": dict(self.container.labels)}
        return data

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_names")
        if names is None:
            names = tuple(f.name for f in fields(cls))
            cls._names = names
        return names

    def _shared_ancestry(self) -> Ancestry:
        """The ancestry as an Ancestry, which keeps its JSON (a plain list becomes one)."""
        if not isinstance(self.ancestry, Ancestry):
            self.ancestry = Ancestry(self.ancestry)
        return self.ancestry

    def to_json(self, ancestry_by_id: bool = False) -> str:
        """One line of ASCII JSON. ancestry_by_id: the ancestry's id (a string) in place of the
        list (the audit log writes the list once, in an ancestry line with that id)."""
        return self.json_bytes(ancestry_by_id).decode()

    def json_bytes(self, ancestry_by_id: bool = False) -> bytes:
        """to_json's line as bytes (the audit log writes bytes). orjson (much faster: the
        audit log writes every event) when it can, from the dataclass itself (no dict made of
        it first); json, which escapes them, for text with lone surrogates
        (bytes that are not UTF-8) or other non-ASCII characters (an agent's bidi overrides must
        not reach a responder's terminal raw)."""
        self._shared_ancestry()
        try:
            # the ancestry is a list subclass: passed through to the default, which writes it
            body = orjson.dumps(self, default=_ancestry_id if ancestry_by_id else _ancestry_listed,
                                option=orjson.OPT_PASSTHROUGH_SUBCLASS)
        except orjson.JSONEncodeError:  # lone surrogates, or a value orjson does not know
            pass
        else:
            if body.isascii():
                return body
        data = self.to_dict()
        if ancestry_by_id:
            data["ancestry"] = self.ancestry.id
        return json.dumps(data, separators=(",", ":")).encode()

    @property
    def error(self) -> str | None:
        return error_name(getattr(self, "retval", 0))


@dataclass
class ExecEvent(Event):
    kind: str = kind_field("exec")
    filename: str = ""
    argv: list[str] = field(default_factory=list)
    retval: int = 0
    argv_truncated: bool = False  # an argument was cut, or arguments were dropped
    syscall: str = "execve"
    # where argv comes from: "kernel" (the probe, at the call), "proc" (/proc/PID/cmdline after
    # the exec: the probe could not read the caller's memory), "none" (neither could)
    argv_source: str = "kernel"
    # an ssh client's configuration lines that ask for a remote forward or a tun device
    # ("file:line: key values", host/sshconfig.py), read by the enricher
    ssh_config: list[str] = field(default_factory=list)
    # the installed programs (by name) the executable is a copy of or a link to, by content
    # (host/programs.py), whatever its own name
    exe_is: list[str] = field(default_factory=list)
    loader: str | None = None  # the dynamic loader the program was started through, if it was
    found_at_start: bool = False  # not an exec seen: a process an agent ran when the daemon started


@dataclass
class ConnectEvent(Event):
    kind: str = kind_field("connect")
    family: str = "inet"  # inet or inet6
    address: str = ""  # IPv4-mapped IPv6 addresses are shown as IPv4
    port: int = 0
    sock_type: str | None = None  # stream, dgram, raw...; None when unknown
    protocol: str | None = None  # tcp, udp... when it can be known
    retval: int = 0
    fd: int = -1
    source: str = "syscall"  # or "cgroup_hook": a connect no syscall probe saw (io_uring), no result


@dataclass
class UdpSendEvent(ConnectEvent):
    """A datagram sent to an address (sendto/sendmsg/sendmmsg)."""

    kind: str = kind_field("udp_send")
    length: int = 0  # bytes asked to send; retval is bytes (or messages) sent
    dns_query: str | None = None  # the name asked, for datagrams to port 53


@dataclass
class UnixConnectEvent(Event):
    """A connect() to a Unix socket: a service on this node, such as a container runtime's API."""

    kind: str = kind_field("unix_connect")
    path: str = ""  # as given; "@name" for an abstract socket
    resolved: str = ""  # absolute, from the caller's working directory, directories' links followed
    retval: int = 0
    fd: int = -1


@dataclass
class GpuOpenEvent(Event):
    kind: str = kind_field("gpu_open")
    path: str = ""
    flags: int = 0
    access: str = ""  # r, w or rw
    retval: int = 0
    device: str | None = None  # "major:minor" when the path resolves to a device
    vendor: str | None = None  # nvidia, amd, intel... when known
    path_truncated: bool = False
    syscall: str = "openat"


@dataclass
class RefusedEvent(Event):
    """Enforcement refused something, synchronously, in the kernel."""

    kind: str = kind_field("refused")
    reason: str = ""  # cut, port, net, gpu, egress
    op: str = ""  # connect, sendmsg, device
    dry_run: bool = False  # only reported: the call went through
    agent_id: int = 0
    agent: str | None = None  # the agent's cgroup path
    family: str | None = None
    address: str | None = None
    port: int | None = None
    sock_type: str | None = None
    protocol: str | None = None
    device: str | None = None  # major:minor
    vendor: str | None = None
    access: str | None = None  # r, w, rw, m (mknod)
    profile_id: int = 0  # egress: the id of the profile that refused
    profile: str | None = None  # egress: its name

    @property
    def retval(self) -> int:
        return 0 if self.dry_run else -1  # EPERM


@dataclass
class DeviceEvent(Event):
    """A GPU device access seen by the cgroup device hook, not by the open probes
    (a relative path, a path outside the GPU prefixes)."""

    kind: str = kind_field("device")
    device: str = ""
    vendor: str | None = None
    access: str = ""
    agent_id: int = 0
    agent: str | None = None


@dataclass
class GpuHeldEvent(Event):
    """A GPU device an agent holds open that its grant does not cover (a grant revoked, a
    descriptor inherited): found by the daemon's scan of the agent's descriptors."""

    kind: str = kind_field("gpu_held")
    path: str = ""  # what the descriptor names
    fd: int = 0
    device: str = ""  # major:minor
    vendor: str | None = None
    node: str = ""  # what the number is: gpu 1, control, mig gpu0/gi1/ci0, admin
    access: str = ""
    agent: str | None = None


@dataclass
class DnsEvent(Event):
    """A question an agent asked and what the daemon's DNS proxy answered (its egress profile
    decides: a name it allows is answered, and its addresses allowed; others are refused)."""

    kind: str = kind_field("dns")
    dns_query: str = ""  # the name asked, lower case, no trailing dot
    qtype: str = ""  # A, AAAA, TXT...
    verdict: str = ""  # answered, refused, would-refuse (audit mode: answered all the same), failed
    rcode: str = ""  # NOERROR, NXDOMAIN, REFUSED, SERVFAIL...
    answers: list[str] = field(default_factory=list)  # the addresses in the answer
    ttl: int | None = None  # seconds: the shortest TTL of the answer's records
    server: str = ""  # the server the agent asked, address:port
    protocol: str = "udp"
    agent_id: int = 0
    agent: str | None = None
    profile: str | None = None

    @property
    def retval(self) -> int:
        return 0 if self.verdict in ("answered", "would-refuse") else -1


@dataclass
class ForkEvent(Event):
    kind: str = kind_field("fork")
    child_pid: int = 0


@dataclass
class ExitEvent(Event):
    kind: str = kind_field("exit")


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (ExecEvent, ConnectEvent, UdpSendEvent, UnixConnectEvent, GpuOpenEvent, RefusedEvent,
                              DeviceEvent, GpuHeldEvent, DnsEvent, ForkEvent, ExitEvent)
}

# what a user asks `trace` for -> event kinds shown
KIND_GROUPS = {
    "exec": ("exec",),
    "connect": ("connect", "udp_send", "unix_connect"),
    "gpu": ("gpu_open", "device"),
}
KIND_GROUPS["all"] = tuple(k for group in KIND_GROUPS.values() for k in group) + ("refused", "dns")


def from_dict(data: dict[str, Any]) -> Event:
    """An event from its JSON form; KeyError/TypeError/ValueError on bad input."""
    data = dict(data)
    kind = data.pop("kind")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}; known: {sorted(EVENT_TYPES)}")
    names = {f.name for f in fields(cls)}
    extra = set(data) - names
    if extra:
        raise ValueError(f"unknown field(s) {sorted(extra)} for a {kind} event")
    data["proc"] = Process(**data["proc"])
    data["ancestry"] = [Ancestor(**a) for a in data.get("ancestry", [])]
    if data.get("container") is not None:
        data["container"] = Container(**data["container"])
    return cls(**data)


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))


def read_jsonl(path) -> Iterator[tuple[int, "Event | Exception"]]:
    """(line number, event) for each line of a recorded trace or an audit log, gzipped or not (whose events
    name their ancestry by id, from an ancestry line before them); a bad line yields a
    DecodeError naming the line instead, and reading goes on."""
    from ebpfmon.errors import DecodeError

    ancestries: dict[str, list] = {}
    opener = gzip.open if str(path).endswith(".gz") else open  # rotated logs are often compressed
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                data.pop("prev", None)  # the audit log's hash chain: the log's, not the event's
                if data.get("kind") == "ancestry":
                    ancestries[data["id"]] = data["ancestry"]
                    continue
                if isinstance(data.get("ancestry"), str):
                    ancestry_id = data["ancestry"]
                    if ancestry_id not in ancestries:
                        raise ValueError(f"ancestry {ancestry_id!r} has no ancestry line before it")
                    data["ancestry"] = ancestries[ancestry_id]
                yield number, from_dict(data)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                yield number, DecodeError(f"{path}:{number}: not an event: {e}")
