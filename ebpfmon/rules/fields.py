"""The fields conditions and outputs can name, and how each is read from an event.

Falco's names where Falco has the concept (evt.type, proc.name, proc.cmdline,
proc.aname[N], fd.sip, fd.sport...), with Falco's meaning; our own where it
has none (cgroup.path, agent.name, gpu.device, exec.argv[N], dns.query...).
A field that does not apply to an event's kind reads as None, and every
comparison with None is false, as in Falco.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ebpfmon import events as ev
from ebpfmon.config import DEFAULT_AGENT_ROOT
from ebpfmon.host.cgroups import AgentLayout
from ebpfmon.host.network import NetworkClassifier
from ebpfmon.host.users import user_name
from ebpfmon.rules.argv import parse_ssh

EXEC, CONNECT, UDP, GPU = "exec", "connect", "udp_send", "gpu_open"
REFUSED, DEVICE, DNS, UNIX, HELD = "refused", "device", "dns", "unix_connect", "gpu_held"
ALL_KINDS = frozenset({EXEC, CONNECT, UDP, GPU, REFUSED, DEVICE, DNS, UNIX, HELD})
# kinds with a destination; a refused event has one unless it refused a device
SOCKET_KINDS = frozenset({CONNECT, UDP, REFUSED})
DEVICE_KINDS = frozenset({GPU, DEVICE, REFUSED, HELD})

STR, INT, BOOL, IP = "string", "number", "bool", "ip address"


@dataclass
class Context:
    """What fields need besides the event: configuration and node lookups."""

    agents: AgentLayout = field(default_factory=lambda: AgentLayout(DEFAULT_AGENT_ROOT))
    gpu_entitled: tuple[str, ...] = ()  # cgroup path globs of agents allowed to use GPUs
    gpu_granted: Callable[[str], bool] | None = None  # the daemon's grants, which decide when known
    networks: NetworkClassifier = field(default_factory=NetworkClassifier)
    name_label: str = "ebpfmon.agent"  # a container's label that names its agent (agent.name)
    _users: dict[int, str] = field(default_factory=dict)
    _agents: dict[str, str | None] = field(default_factory=dict)

    def agent_cgroup(self, cgroup: str | None) -> str | None:
        if not cgroup:
            return None
        known = self._agents.get(cgroup, MISSING)
        if known is MISSING:
            if len(self._agents) > 65536:
                self._agents.clear()
            known = self._agents[cgroup] = self.agents.agent_of(cgroup)
        return known

    def forget(self, cgroup: str | None) -> None:
        """The cgroup was removed."""
        self._agents.pop(cgroup, None)

    def user_name(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            name = self._users[uid] = user_name(uid)
        return name


MISSING = object()
Extractor = Callable[[ev.Event, Context], Any]
# names the inline expressions below may use
INLINE_NAMES = {"_error_name": ev.error_name}


def _inline(expression: str) -> Extractor:
    """An extractor written as an expression of the event e and the context c. Compiled rules
    evaluate the expression in place, without a call (ebpfmon/rules/codegen.py: a call per
    field is a large part of judging an event); everything else calls the function made of it."""
    extract = eval(f"lambda e, c: {expression}", dict(INLINE_NAMES))  # noqa: S307 (our constant text)
    extract.inline = expression
    return extract


@dataclass(frozen=True)
class Field:
    name: str
    kinds: frozenset[str]
    type: str
    extract: Extractor
    doc: str
    is_list: bool = False  # multi-valued: comparisons hold when any value matches
    indexed: bool = False  # takes [N]
    keyed: bool = False  # takes [KEY]: a name, not a position
    # a leaner extractor for some kinds (rules are compiled per kind: ebpfmon/rules/codegen.py)
    by_kind: tuple[tuple[str, Extractor], ...] = ()
    attribute: str | None = None  # the field is this attribute of the event ("port", "proc.pid")

    def extractor_for(self, kind: str | None) -> Extractor:
        return next((fn for k, fn in self.by_kind if k == kind), self.extract)


FIELDS: dict[str, Field] = {}


def _field(name, kinds, type_, doc, is_list=False, indexed=False, by_kind=(), attribute=None, keyed=False):
    def register(fn: Extractor) -> Extractor:
        FIELDS[name] = Field(name, frozenset(kinds), type_, fn, doc, is_list, indexed or keyed, keyed,
                             tuple(by_kind), attribute)
        return fn
    return register


def _attribute(name, kinds, type_, doc, path):
    """A field that is an attribute of every event of its kinds (None where they have none):
    compiled rules read it inline, without a call (ebpfmon/rules/codegen.py)."""
    get = operator.attrgetter(path)
    _field(name, kinds, type_, doc, attribute=path)(lambda e, c: get(e))


def _argv(e: ev.Event) -> list[str]:
    if isinstance(e, ev.ExecEvent):
        return e.argv
    return e.proc.argv or []


def _basename(path: str | None) -> str | None:
    return path.rpartition("/")[2] if path else None


EVT_TYPES = {CONNECT: "connect", UDP: "sendto", REFUSED: "refused", DEVICE: "device", DNS: "dns", UNIX: "connect",
             HELD: "held"}


@_field("evt.type", ALL_KINDS, STR, "the system call: execve, execveat, connect, sendto, open, openat, openat2; "
        "refused for enforcement refusals, device for GPU accesses seen by the cgroup device hook, dns for "
        "questions the DNS proxy answered or refused, held for GPU descriptors an agent holds beyond its grant")
def _evt_type(e, c):
    if isinstance(e, (ev.ExecEvent, ev.GpuOpenEvent)):
        return e.syscall
    return EVT_TYPES[e.kind]


_attribute("evt.kind", ALL_KINDS, STR, "ebpfmon's event kind: exec, connect, udp_send, gpu_open", "kind")
_field("evt.dir", ALL_KINDS, STR, "always '<': events are reported when the call returns (Falco compatibility)")(
    lambda e, c: "<")
_attribute("evt.time", ALL_KINDS, INT, "wall-clock time, ns since the epoch", "time_ns")
_attribute("evt.rawres", ALL_KINDS, INT, "the call's return value (negative errno on failure)", "retval")
_field("evt.res", ALL_KINDS, STR, "SUCCESS, or the errno name (ENOENT, ECONNREFUSED, EINPROGRESS...)")(
    _inline('"SUCCESS" if e.retval >= 0 else _error_name(e.retval)'))
_field("evt.failed", ALL_KINDS, BOOL, "true when the call returned an error")(_inline("e.retval < 0"))

_attribute("proc.pid", ALL_KINDS, INT, "process id", "proc.pid")
_attribute("thread.tid", ALL_KINDS, INT, "thread id", "proc.tid")
_attribute("proc.ppid", ALL_KINDS, INT, "parent process id (the parent at fork)", "proc.ppid")
_field("proc.name", ALL_KINDS, STR, "name of the program file (basename of proc.exepath); the comm "
       "when the path is not known")(lambda e, c: _basename(e.proc.exe) or e.proc.comm)
_attribute("proc.comm", ALL_KINDS, STR, "the thread's comm (15 bytes, settable by the program itself)", "proc.comm")
_field("proc.exe", ALL_KINDS, STR, "first command-line argument (argv[0])")(
    lambda e, c: (_argv(e) or [None])[0])
_attribute("proc.exepath", ALL_KINDS, STR, "full path of the program", "proc.exe")
_field("proc.exe_is", {EXEC}, STR, "the installed programs (list programs_identified_by_content) this "
       "executable is, by its file (a link, a copy, a memfd, a deleted file), whatever its name: "
       "`proc.exe_is in (relay_binaries)`", is_list=True)(lambda e, c: e.exe_is)
_field("proc.is_exe_from_memfd", ALL_KINDS, BOOL, "the program runs from a memfd (a file only in memory), as "
       "in Falco")(lambda e, c: (e.proc.exe or "").startswith("/memfd:"))
_attribute("proc.loader", {EXEC}, STR, "the dynamic loader the program was started through "
           "(ld-linux-x86-64.so.2 PROGRAM ...): the event shows PROGRAM and its argv", "loader")


@_field("proc.cmdline", ALL_KINDS, STR, "proc.name followed by the arguments, as in Falco")
def _cmdline(e, c):
    return " ".join([e.proc.comm, *_argv(e)[1:]])


_field("proc.args", ALL_KINDS, STR, "the arguments after argv[0], joined by spaces")(
    lambda e, c: " ".join(_argv(e)[1:]))
_field("proc.args_words", ALL_KINDS, STR, "the arguments after argv[0] that are one word (no whitespace), joined "
       "by spaces: options and their values, without the code, commands and prose that shells and interpreters "
       "take as one argument (sh -c '...', python -c '...', a message)")(
    lambda e, c: " ".join(a for a in _argv(e)[1:] if not _has_space(a)))


def _has_space(text: str) -> bool:
    return any(ch.isspace() for ch in text)


def _ancestor(e: ev.Event, n: int) -> ev.Ancestor | None:
    return e.ancestry[n - 1] if 0 < n <= len(e.ancestry) else None


def _self_as_ancestor(e: ev.Event) -> ev.Ancestor:
    return ev.Ancestor(pid=e.proc.pid, comm=e.proc.comm, exe=e.proc.exe, argv=_argv(e))


def _ancestor_field(attr: str, transform=None):
    get = operator.attrgetter(attr)

    def extract(e, c, index=None):
        if index is None:  # every ancestor, parent first
            values = [v for v in map(get, e.ancestry) if v is not None]
            return values if transform is None else [transform(v) for v in values]
        a = _self_as_ancestor(e) if index == 0 else _ancestor(e, index)
        value = get(a) if a is not None else None
        return value if value is None or transform is None else transform(value)
    return extract


_field("proc.aname", ALL_KINDS, STR, "name of an ancestor: [1] parent, [2] grandparent ([0] the process); "
       "without [N], any ancestor", is_list=True, indexed=True)(_ancestor_field("comm"))
_field("proc.apid", ALL_KINDS, INT, "pid of an ancestor, as proc.aname", is_list=True, indexed=True)(
    _ancestor_field("pid"))
_field("proc.aexepath", ALL_KINDS, STR, "program path of an ancestor, as proc.aname", is_list=True,
       indexed=True)(_ancestor_field("exe"))
_field("proc.acmdline", ALL_KINDS, STR, "command line of an ancestor, as proc.aname", is_list=True,
       indexed=True)(_ancestor_field("argv", lambda argv: " ".join(argv)))
_field("proc.pname", ALL_KINDS, STR, "parent's name")(lambda e, c: _ancestor_field("comm")(e, c, 1))
_field("proc.pexepath", ALL_KINDS, STR, "parent's program path")(lambda e, c: _ancestor_field("exe")(e, c, 1))
_field("proc.pcmdline", ALL_KINDS, STR, "parent's command line")(
    lambda e, c: _ancestor_field("argv", lambda argv: " ".join(argv))(e, c, 1))

_attribute("user.uid", ALL_KINDS, INT, "user id", "proc.uid")
_field("user.name", ALL_KINDS, STR, "user name (the uid when it has none)")(lambda e, c: c.user_name(e.proc.uid))
_attribute("group.gid", ALL_KINDS, INT, "group id", "proc.gid")

_attribute("exec.filename", {EXEC}, STR, "the path given to execve", "filename")


@_field("exec.argv", {EXEC}, STR, "an argument by position ([0] is argv[0]); without [N], any argument",
        is_list=True, indexed=True)
def _exec_argv(e, c, index=None):
    if index is None:
        return e.argv
    return e.argv[index] if index < len(e.argv) else None


_field("exec.argc", {EXEC}, INT, "number of arguments captured")(lambda e, c: len(e.argv))
_attribute("exec.argv_truncated", {EXEC}, BOOL, "true when arguments were cut or dropped (limits: events.h)",
           "argv_truncated")
_attribute("exec.argv_source", {EXEC}, STR, "kernel (read at the call), proc (read back from /proc: the probe "
       "could not read the caller's memory) or none (unreadable, and the process gone)", "argv_source")

def _socket_field(name, type_, doc, extract):
    """A field of the destination. Connects and datagrams always have one, so they read it
    directly (every connect an agent makes is judged); a refused device has none: None."""
    _field(name, SOCKET_KINDS, type_, doc, by_kind=((CONNECT, extract), (UDP, extract)))(
        lambda e, c: extract(e, c) if e.address is not None else None)


_attribute("fd.sip", SOCKET_KINDS, IP, "destination (server) address", "address")
_attribute("fd.rip", SOCKET_KINDS, IP, "remote address (same as fd.sip for outbound connections)", "address")
_attribute("fd.sport", SOCKET_KINDS, INT, "destination (server) port", "port")
_attribute("fd.rport", SOCKET_KINDS, INT, "remote port (same as fd.sport for outbound connections)", "port")
_socket_field("fd.l4proto", STR, "tcp, udp... ('unknown' when the socket type is not known)",
              _inline('e.protocol or "unknown"'))
_socket_field("fd.type", STR, "ipv4 or ipv6", _inline('"ipv4" if e.family == "inet" else "ipv6"'))
_socket_field("fd.typechar", STR, "4 or 6", _inline('"4" if e.family == "inet" else "6"'))
_field("fd.sockfamily", SOCKET_KINDS | {UNIX}, STR, "ip, or unix for a connect to a Unix socket",
       by_kind=((CONNECT, lambda e, c: "ip"), (UDP, lambda e, c: "ip"), (UNIX, lambda e, c: "unix")))(
    lambda e, c: "unix" if isinstance(e, ev.UnixConnectEvent) else "ip" if e.address is not None else None)
_attribute("fd.num", {CONNECT, UDP}, INT, "file descriptor number", "fd")
_socket_field("fd.is_internal", BOOL, "destination is in an internal network: configured, loopback, or routed "
              "other than by the default route", _inline("c.networks.is_internal(e.address)"))
_socket_field("fd.is_local", BOOL, "destination is this node: loopback or one of its own addresses (a service "
              "there, such as sshd, runs outside the agent's cgroup)", _inline("c.networks.is_local(e.address)"))
_socket_field("fd.is_loopback", BOOL, "destination is a loopback address",
              _inline('e.address.startswith("127.") or e.address == "::1"'))
_attribute("evt.source", {CONNECT}, STR, "syscall, or cgroup_hook for a connect only the cgroup hooks saw "
       "(io_uring): its result is not known", "source")


@_field("fd.name", SOCKET_KINDS | {GPU, UNIX}, STR, "address:port for sockets, the path for GPU opens and Unix "
        "sockets (as unix.path)")
def _fd_name(e, c):
    if isinstance(e, ev.GpuOpenEvent):
        return e.path
    if isinstance(e, ev.UnixConnectEvent):
        return e.resolved or e.path
    if e.address is None:
        return None
    return f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}"


_field("unix.path", {UNIX}, STR, "the Unix socket connected to: absolute, relative paths taken from the caller's "
       "working directory, directories' links followed (/var/run is /run); @name for an abstract socket")(
    lambda e, c: e.resolved or e.path)
_attribute("unix.path_given", {UNIX}, STR, "the path as the caller gave it", "path")
_attribute("dns.query", {UDP, DNS}, STR, "the name asked in a DNS query (datagrams to port 53; the question "
           "the DNS proxy had)", "dns_query")
_attribute("dns.verdict", {DNS}, STR, "what the DNS proxy did: answered, refused (the profile does not allow the "
           "name), would-refuse (audit mode: answered), failed (no upstream answered)", "verdict")
_attribute("dns.rcode", {DNS}, STR, "the answer's code: NOERROR, NXDOMAIN, REFUSED, SERVFAIL...", "rcode")
_attribute("dns.qtype", {DNS}, STR, "the type asked: A, AAAA, TXT...", "qtype")
_attribute("dns.server", {DNS}, STR, "the server the agent asked (address:port); the proxy answered", "server")
_attribute("dns.profile", {DNS}, STR, "the egress profile that decided", "profile")
_field("dns.answers", {DNS}, IP, "the addresses in the answer", is_list=True)(lambda e, c: e.answers)


@_field("dns.query_suffixes", {UDP, DNS}, STR, "the name asked and each parent domain (a.pool.example.com, "
        "pool.example.com, example.com, com): `in (domains)` matches subdomains too", is_list=True)
def _dns_suffixes(e, c):
    if not e.dns_query:
        return None
    labels = e.dns_query.lower().rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]
_attribute("udp.length", {UDP}, INT, "bytes the datagram carried", "length")

_attribute("gpu.path", {GPU, HELD}, STR, "the device path opened (held: the path its descriptor names)", "path")
_attribute("gpu.node", {HELD}, STR, "what the device number is: gpu N, control, mig gpuN/giM/ciK, admin", "node")
_attribute("gpu.device", DEVICE_KINDS, STR, "major:minor of the device, when it resolves", "device")
_attribute("gpu.vendor", DEVICE_KINDS, STR, "nvidia, amd, intel, habana... when known", "vendor")
_attribute("gpu.access", DEVICE_KINDS, STR, "r, w, rw; m for mknod", "access")

_attribute("refused.reason", {REFUSED}, STR, "why enforcement refused: cut, port, net, gpu, egress", "reason")
_attribute("refused.op", {REFUSED}, STR, "what was refused: connect, sendmsg, device", "op")
_attribute("refused.dry_run", {REFUSED}, BOOL, "true when enforcement only reported (dry run, or an egress "
           "profile in audit mode)", "dry_run")
_attribute("refused.profile", {REFUSED}, STR, "egress: the profile that refused the destination", "profile")

def _ssh(e, c):
    return parse_ssh(tuple(e.argv), e.proc.exe, tuple(e.exe_is))


def _from_config(e, key: str) -> bool:
    """A configuration line of the event that asks for key (tunnel: Tunnel or TunnelDevice)."""
    return any(line.partition(": ")[2].startswith(key) for line in e.ssh_config)


_field("ssh.client", {EXEC}, BOOL, "the program is an ssh-family client (ssh, autossh, dbclient, plink)")(
    lambda e, c: _ssh(e, c) is not None)
_field("ssh.remote_forward", {EXEC}, BOOL, "an ssh-family client asked for a remote (reverse) forward: -R in "
       "any spelling, -o RemoteForward, or RemoteForward in the configuration files it reads for the destination "
       "(ssh.config)")(
    lambda e, c: bool((cmd := _ssh(e, c)) and (cmd.remote_forward or _from_config(e, "remoteforward"))))
_field("ssh.local_forward", {EXEC}, BOOL, "an ssh-family client asked for -L, -D or LocalForward")(
    lambda e, c: bool((cmd := _ssh(e, c)) and cmd.local_forward))
_field("ssh.tun", {EXEC}, BOOL, "an ssh client asked for a tun device (-w, -o Tunnel, or Tunnel in its "
       "configuration files)")(
    lambda e, c: bool((cmd := _ssh(e, c)) and (cmd.tun or _from_config(e, "tunnel"))))
_field("ssh.config", {EXEC}, STR, "the lines of the ssh client's configuration files that ask for a remote "
       "forward or a tun device (file:line: key values), '; '-separated")(
    lambda e, c: "; ".join(e.ssh_config) or None)
_field("ssh.host", {EXEC}, STR, "the destination an ssh-family client was given")(
    lambda e, c: (cmd := _ssh(e, c)) and cmd.host)

_attribute("cgroup.path", ALL_KINDS, STR, "cgroup path relative to the cgroup2 mount", "cgroup")
_attribute("cgroup.id", ALL_KINDS, INT, "cgroup id", "cgroup_id")
_field("agent.cgroup", ALL_KINDS, STR, "the agent's cgroup: the one at the agent level below the agent root")(
    lambda e, c: c.agent_cgroup(e.cgroup))
@_field("agent.name", ALL_KINDS, STR, "the agent's name: for a container, its label named by "
        "containers.name_label (ebpfmon.agent) or else its name; otherwise the last part of agent.cgroup")
def _agent_name(e, c):
    container = e.container
    if container is not None and container.known:
        return container.labels.get(c.name_label) or container.name
    return _basename(c.agent_cgroup(e.cgroup))


_field("container.id", ALL_KINDS, STR, "the container the agent is (its full id, from its cgroup's name); 'host' "
       "for an agent in no container, as in Falco")(_inline('e.container.id if e.container else "host"'))
_field("container.name", ALL_KINDS, STR, "the container's name, from its runtime ('host' for none; none until the "
       "runtime answered, the first milliseconds of a container)")(
    _inline('(e.container.name if e.container.known else None) if e.container else "host"'))
_field("container.image", ALL_KINDS, STR, "the container's image as given to the runtime "
       "(registry/repository:tag)")(_inline("e.container.image if e.container else None"))
_field("container.image.repository", ALL_KINDS, STR, "the image without its tag or digest")(
    _inline("e.container.image_repository if e.container else None"))
_field("container.image.tag", ALL_KINDS, STR, "the image's tag")(
    _inline("e.container.image_tag if e.container else None"))
_field("container.runtime", ALL_KINDS, STR, "podman, docker, cri-o or containerd, from the cgroup's name")(
    _inline("e.container.runtime if e.container else None"))


@_field("container.label", ALL_KINDS, STR, "a label of the container: container.label[ebpfmon.agent]; "
        "without [KEY], every KEY=VALUE", is_list=True, keyed=True)
def _container_label(e, c, key=None):
    labels = e.container.labels if e.container else {}
    if key is None:
        return [f"{k}={v}" for k, v in labels.items()]
    return labels.get(key)


@_field("agent.gpu_entitled", ALL_KINDS, BOOL, "the agent may use GPUs: a scheduler's grant (ebpfmon gpu grant) "
        "or, without one, a glob of gpu_entitled")
def _gpu_entitled(e, c):
    agent = c.agent_cgroup(e.cgroup)
    if agent is None:
        return False
    if c.gpu_granted is not None:
        return c.gpu_granted(agent)
    return any(fnmatch.fnmatchcase(agent, g) for g in c.gpu_entitled)
