"""Configuration: built-in defaults, and one YAML file that overrides them.

Every setting is a field of a frozen dataclass below; the YAML file uses the
same names. Loading validates every value against the field's type and
refuses unknown keys, naming the key path and its line: a typo is an error,
never silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebpfmon.alerts.sinks import SINKS, SYSLOG_FACILITIES
from ebpfmon.errors import ConfigError
from ebpfmon.events import EVENT_TYPES
from ebpfmon.host.cgroups import AgentLayout
from ebpfmon.host.gpus import GpuNameError, parse_gpu_name
from ebpfmon.host.network import DEFAULT_INTERNAL_NETWORKS
from ebpfmon.policy.profiles import compile_policy, compiled
from ebpfmon.rules.vocabulary import PRIORITIES

# keys that were renamed: the old name is an error that names the new one
RENAMED = {"gpu_minors": "gpu_devices"}
GPU_HOLDER_ACTIONS = ("freeze", "kill", "keep")
SINK_FORMATS = ("ebpfmon", "falco")

# Device paths of GPUs and accelerators. Matched as prefixes in the kernel, so
# "/dev/nvidia" covers /dev/nvidia0..N, /dev/nvidiactl and /dev/nvidia-uvm*.
DEFAULT_GPU_PREFIXES = (
    "/dev/nvidia",
    "/dev/dri/renderD",
    "/dev/dri/card",
    "/dev/kfd",
    "/dev/accel/",
)

# cgroup (relative to the cgroup2 mount) under which every agent runs, one
# child cgroup per agent. Not a .slice: systemd owns those names.
DEFAULT_AGENT_ROOT = "/ebpfmon-agents"
DEFAULT_CONFIG = "/etc/ebpfmon/config.yaml"


@dataclass(frozen=True)
class EnforceSettings:
    """What containment may do, and what it leaves alone."""

    # report what would be refused or cut, enforce nothing
    dry_run: bool = False
    # destinations a cut agent may still reach; none by default: a cut agent must not reach
    # the node's own services (its sshd among them) either
    keep_open: tuple[str, ...] = ()
    # ports no agent may connect or send to; None: the rules' mining_pool_ports list
    deny_ports: tuple[int, ...] | None = None
    deny_networks: tuple[str, ...] = ()
    # what deny_gpu does to the agent's processes that hold GPU nodes open already (a cgroup
    # device program refuses opens, it cannot take back a descriptor): freeze the agent, kill
    # the holders, or keep them running (report only)
    gpu_holders: str = "freeze"
    # the breaker, per rule: a rule whose automatic cuts, freezes and kills reach more distinct
    # agents within breaker_seconds than the larger of breaker_agents and breaker_fraction of
    # the agents on the node is suspended (it still alerts) for breaker_resume_seconds, or until
    # `ebpfmon rules resume`: a misfiring rule must not cut the fleet, and the rules that are
    # right keep containing. Rules marked never_suspend, and the kernel's policy, are never under it.
    breaker_agents: int = 20
    breaker_fraction: float = 0.5
    breaker_seconds: float = 60.0
    breaker_resume_seconds: float = 900.0


@dataclass(frozen=True)
class RuleSettings:
    defaults: bool = True  # load the shipped packs first
    files: tuple[str, ...] = ()  # your rule files and directories, loaded after them


@dataclass(frozen=True)
class SinkSettings:
    """One alert destination. Secrets come from *_file or *_env, or inline (then masked when shown)."""

    type: str
    name: str = ""  # for metrics and logs; the type by default
    min_priority: str = "DEBUG"  # alerts less severe than this are not sent here
    # webhook, jsonl: "ebpfmon" (the alert as ebpfmon has it) or "falco" (Falco's JSON output:
    # falcosidekick and its outputs take it unchanged; resolves are not sent, Falco has none)
    format: str = "ebpfmon"
    path: str = ""  # jsonl
    url: str = ""  # webhook, slack, alertmanager (base URL), pagerduty (events API)
    url_file: str = ""
    url_env: str = ""
    routing_key: str = ""  # pagerduty
    routing_key_file: str = ""
    routing_key_env: str = ""
    # syslog: RFC 5424 over TCP (octet-counted frames) to HOST:PORT, TLS when tls is true
    # (verified against tls_ca_file, else the system's CAs), with this facility
    address: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    facility: str = "authpriv"
    # nats (url: nats://HOST:4222): JetStream subjects SUBJECT.NODE.alert.PRIORITY, in the stream
    # named here (made when missing, over SUBJECT.>); a publish counts when JetStream acknowledged it
    subject: str = "ebpfmon"
    stream: str = "EBPFMON"
    # nats: events of these kinds (or "all") also go out, on SUBJECT.NODE.event.KIND, read
    # from the audit log behind the daemon; of the agents these cgroup globs match (none: all)
    events: tuple[str, ...] = ()
    event_agents: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class AlertSettings:
    # a verdict for the same (rule, agent) within this many seconds is counted on the
    # open incident, not sent again
    dedup_seconds: float = 60.0
    # alerts kept on disk until every sink took them; past this, the oldest go (counted)
    spool_max: int = 100_000
    sinks: tuple[SinkSettings, ...] = (SinkSettings(type="console"),)


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class AuditSettings:
    """Every agent event and refusal as JSON lines, rotated, under the state directory."""

    enabled: bool = True
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True)
class ContainerSettings:
    """Agents that are containers (their cgroup is the one a runtime made, under the agent root):
    name, image and labels asked of the runtime by the command that inspects one container
    (its id appended; JSON as `podman inspect` writes it)."""

    enabled: bool = True
    podman: tuple[str, ...] = ("podman", "inspect", "--type", "container")
    docker: tuple[str, ...] = ("docker", "inspect", "--type", "container")
    # agent.name from this label, where a container has it (else the container's name)
    name_label: str = "ebpfmon.agent"
    # labels that choose a container's egress profile (by name) and GPUs ("0,1", "all", "none"):
    # empty, labels choose nothing. Set them only where the launcher alone sets labels (an agent
    # that can start containers could label its own).
    profile_label: str = ""
    gpus_label: str = ""


@dataclass(frozen=True)
class EgressAllow:
    """One destination an egress profile allows: a network (cidr), with ports and a protocol."""

    cidr: str = ""  # an address or a CIDR, IPv4 or IPv6
    name: str = ""  # a DNS name (exact, or *.example.org)
    ports: tuple[int | str, ...] = ()  # 443, or "8000-8999"; none: every port
    proto: str = ""  # tcp or udp; empty: both


@dataclass(frozen=True)
class EgressProfile:
    """What the agents it applies to may reach: the allow entries, and nothing else."""

    name: str
    agents: tuple[str, ...] = ()  # cgroup globs; the first profile that matches an agent wins
    mode: str = "enforce"  # enforce: refuse the rest; audit: allow it, report would-refuse; off
    allow: tuple[EgressAllow, ...] = ()


@dataclass(frozen=True)
class EgressSettings:
    """The sandbox: egress profiles, enforced in the kernel on every connect and datagram."""

    # the profile of agents no profile's globs name; null: no policy for them
    default_profile: str | None = None
    # the DNS proxy agents with a profile ask, whatever server they name: where it asks
    # ("198.51.100.53", "[2001:db8::53]:5353"; empty: the host's resolvers), on which loopback
    # port it listens (0: one the kernel picks), how long an address a name resolved to stays
    # allowed at least (seconds; the answer's TTL when longer), and what a name the profile
    # does not allow gets (refused or nxdomain)
    dns_upstream: tuple[str, ...] = ()
    dns_proxy_port: int = 0
    dns_ttl_floor: int = 30
    dns_refuse_with: str = "refused"
    profiles: tuple[EgressProfile, ...] = ()


@dataclass(frozen=True)
class Config:
    agent_root: str = DEFAULT_AGENT_ROOT
    # the agent is the cgroup this many levels below the agent root
    agent_level: int = 1
    state_dir: str = "/var/lib/ebpfmon"
    gpu_prefixes: tuple[str, ...] = field(default=DEFAULT_GPU_PREFIXES)
    # cgroup globs of agents allowed to use GPUs; every agent by default
    gpu_entitled: tuple[str, ...] = ("*",)
    # entitled agents limited to some GPUs: (cgroup glob, GPUs), first match wins; a GPU is an
    # index (0), a UUID (GPU-...), a PCI bus id (0000:18:00.0) or a MIG instance (gpu0/gi1/ci0).
    # Grants from the scheduler (ebpfmon gpu grant, ebpfmon exec --gpus) come before these.
    gpu_devices: tuple[tuple[str, tuple[int | str, ...]], ...] = ()
    # destinations counted as internal (fd.is_internal), besides what the
    # node's own routes reach other than by the default route
    internal_networks: tuple[str, ...] = DEFAULT_INTERNAL_NETWORKS
    # whether what the node's routes reach other than by the default route is internal too
    # (false: only internal_networks; for a node whose routes also lead outside, e.g. a VPN)
    internal_from_routes: bool = True
    # 4 MiB: room for the bursts a storm of agents makes while the reader judges
    # (how fast it drains, and what overflows it: bench/README.md)
    ringbuf_pages: int = 1024
    # longest a no-wakeup event waits in the ring before the reader drains it
    drain_interval_ms: int = 50
    # ancestors (parent, grandparent...) attached to every event
    ancestry_depth: int = 8
    # nice value of the daemon's threads (the one that reads events and contains agents above
    # all): ahead of the agents' own work, so a busy node does not delay a cut (-20..19; below
    # 0 needs CAP_SYS_NICE)
    reader_nice: int = -20
    rules: RuleSettings = field(default_factory=RuleSettings)
    enforce: EnforceSettings = field(default_factory=EnforceSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    containers: ContainerSettings = field(default_factory=ContainerSettings)

    @property
    def agents(self) -> AgentLayout:
        return AgentLayout(self.agent_root, self.agent_level)


# ---- loading ----

def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


class _Loader:
    def __init__(self, source: str, lines: dict[str, int]):
        self.source = source
        self.lines = lines  # key path -> line in the file

    def error(self, path: str, message: str) -> ConfigError:
        line = self.lines.get(path)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {path}: {message}.", "See 'ebpfmon config show' for every key and its default.")

    def value(self, hint, raw, path: str):
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            args = typing.get_args(hint)
            if raw is None and type(None) in args:
                return None
            choices = [a for a in args if a is not type(None)]
            if len(choices) > 1:  # the first that takes the value
                for choice in choices:
                    try:
                        return self.value(choice, raw, path)
                    except ConfigError:
                        pass
                raise self.error(path, f"expected {_describe(hint)}, got {raw!r}")
            hint = choices[0]
            origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.dataclass(hint, raw, path)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if path == "gpu_devices" and isinstance(raw, dict):
                return tuple((str(k), self.value(tuple[int | str, ...], v, f"{path}.{k}")) for k, v in raw.items())
            if not isinstance(raw, list):
                raise self.error(path, f"expected {_describe(hint)}, got {raw!r}")
            return tuple(self.value(item, v, f"{path}[{i}]") for i, v in enumerate(raw))
        if hint is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if hint in (int, str, bool) and type(raw) is hint:
            return raw
        raise self.error(path, f"expected {_describe(hint)}, got {raw!r}")

    def dataclass(self, cls, raw, path: str):
        if not isinstance(raw, dict):
            raise self.error(path or "(top level)", f"expected a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, item in raw.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key in RENAMED and RENAMED[key] in known:
                raise self.error(key_path, f"renamed to {RENAMED[key]} (same values)")
            if key not in known:
                raise self.error(key_path, f"unknown key (known here: {', '.join(sorted(known))})")
            values[key] = self.value(hints[key], item, key_path)
        try:
            return cls(**values)
        except TypeError as e:
            raise self.error(path or "(top level)", f"missing a required key ({e})") from None


def _key_lines(node, prefix: str = "", lines: dict[str, int] | None = None) -> dict[str, int]:
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[path] = key.start_mark.line + 1
            _key_lines(value, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = value.start_mark.line + 1
            _key_lines(value, path, lines)
    return lines


def load_config(path: str | Path) -> Config:
    """The configuration in a YAML file, over the built-in defaults; ConfigError names what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the configuration {path}: {e.strerror}.",
                          "Give an existing file with --config, or none for the built-in defaults.") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}.", "Fix the YAML syntax.") from e
    loader = _Loader(str(path), _key_lines(node) if node is not None else {})
    config = loader.dataclass(Config, raw or {}, "")
    validate(config, loader)
    return config


def validate(config: Config, loader: _Loader | None = None) -> None:
    """Checks of meaning, beyond types."""
    loader = loader or _Loader("configuration", {})
    if not config.agent_root.startswith("/") or config.agent_root.rstrip("/") == "":
        raise loader.error("agent_root", "must be an absolute cgroup path below the root, such as /ebpfmon-agents")
    if config.agent_level < 1:
        raise loader.error("agent_level", "must be 1 or more")
    if config.ringbuf_pages <= 0 or config.ringbuf_pages & (config.ringbuf_pages - 1):
        raise loader.error("ringbuf_pages", "must be a power of two")
    if not -20 <= config.reader_nice <= 19:
        raise loader.error("reader_nice", f"must be a nice value from -20 to 19, got {config.reader_nice}")
    for i, sink in enumerate(config.alerts.sinks):
        where = f"alerts.sinks[{i}]"
        if sink.type not in SINKS:
            raise loader.error(f"{where}.type", f"{sink.type!r} is not one of {', '.join(SINKS)}")
        if sink.min_priority.upper() not in PRIORITIES:
            raise loader.error(f"{where}.min_priority", f"{sink.min_priority!r} is not one of {', '.join(PRIORITIES)}")
        if sink.format not in SINK_FORMATS:
            raise loader.error(f"{where}.format", f"{sink.format!r} is not one of {', '.join(SINK_FORMATS)}")
        if sink.format != "ebpfmon" and sink.type not in ("webhook", "jsonl"):
            raise loader.error(f"{where}.format", f"a {sink.type} sink speaks its service's format; format is "
                                                  "for webhook and jsonl sinks")
        if sink.type == "syslog":
            host, _, port = sink.address.rpartition(":")
            if not host or not port.isdigit():
                raise loader.error(f"{where}.address", f"a syslog sink needs HOST:PORT, got {sink.address!r}")
            if sink.facility not in SYSLOG_FACILITIES:
                raise loader.error(f"{where}.facility", f"{sink.facility!r} is not one of "
                                                        f"{', '.join(SYSLOG_FACILITIES)}")
        if sink.events and sink.type != "nats":
            raise loader.error(f"{where}.events", f"a {sink.type} sink takes alerts only; events go to nats sinks")
        for j, kind in enumerate(sink.events):
            if kind != "all" and kind not in EVENT_TYPES:
                raise loader.error(f"{where}.events[{j}]", f"{kind!r} is not one of all, {', '.join(EVENT_TYPES)}")
        if sink.event_agents and not sink.events:
            raise loader.error(f"{where}.event_agents", "chooses the agents whose events go out: name the kinds "
                                                        "in events too")
        if sink.events and not config.audit.enabled:
            raise loader.error(f"{where}.events", "events are exported from the audit log: audit.enabled must "
                                                  "be true")
        if sink.type == "jsonl" and not sink.path:
            raise loader.error(f"{where}.path", "a jsonl sink needs a path")
        if sink.type in ("webhook", "slack", "alertmanager", "nats") and not (sink.url or sink.url_file or sink.url_env):
            raise loader.error(f"{where}.url", f"a {sink.type} sink needs url, url_file or url_env")
        if sink.type == "pagerduty" and not (sink.routing_key or sink.routing_key_file or sink.routing_key_env):
            raise loader.error(f"{where}.routing_key", "a pagerduty sink needs routing_key, routing_key_file or "
                                                       "routing_key_env")
    for glob, names in config.gpu_devices:
        for i, name in enumerate(names):
            try:
                parse_gpu_name(name)
            except GpuNameError as e:
                raise loader.error(f"gpu_devices.{glob}[{i}]", str(e)) from None
    for key, networks in (("internal_networks", config.internal_networks),
                          ("enforce.keep_open", config.enforce.keep_open),
                          ("enforce.deny_networks", config.enforce.deny_networks)):
        for i, network in enumerate(networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise loader.error(f"{key}[{i}]", f"{network!r} is not an IP network: write an address or a "
                                                  "CIDR, such as 192.0.2.0/24") from None
    if config.enforce.gpu_holders not in GPU_HOLDER_ACTIONS:
        raise loader.error("enforce.gpu_holders", f"{config.enforce.gpu_holders!r} is not one of "
                                                  f"{', '.join(GPU_HOLDER_ACTIONS)}")
    host, _, port = config.metrics.listen.rpartition(":")
    if not host or not port.isdigit():
        raise loader.error("metrics.listen", f"expected host:port, got {config.metrics.listen!r}")
    try:
        compiled(config.egress)
    except ConfigError:  # again, for the error that names the file and line
        compile_policy(config.egress, loader.error)


SECRET_FIELDS = ("url", "routing_key")


def effective(config: Config) -> dict[str, Any]:
    """The configuration as a plain mapping, inline secrets masked (config show)."""
    data = dataclasses.asdict(config)
    for sink in data["alerts"]["sinks"]:
        for key in SECRET_FIELDS:
            if sink.get(key) and (key == "routing_key" or sink["type"] in ("slack", "webhook")):
                sink[key] = "***"
    data["gpu_devices"] = {glob: list(names) for glob, names in config.gpu_devices}
    return data
