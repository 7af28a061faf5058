"""The one place that puts the kernel side and containment together from a Config.

The daemon and every command that works on the kernel state without one
(`ebpfmon quarantine cut` and `release` with no daemon running) build them here,
so both apply the operator's configuration: the agent root and level, dry run,
keep_open, the deny lists from the configuration and the rules, the GPU policy
and its grants. `ebpfmon trace` gets its probes here too, without enforcement.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from ebpfmon.alerts.sinks import make_sink
from ebpfmon.config import Config
from ebpfmon.containment.actions import Containment
from ebpfmon.containment.quarantine import QuarantineStore, Record
from ebpfmon.errors import ConfigError, EbpfmonError
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.host.gpus import DeviceModel
from ebpfmon.host.network import NetworkClassifier
from ebpfmon.kernel.enforcer import Enforcer, pin_dir
from ebpfmon.kernel.probeset import ProbeSet, require_root
from ebpfmon.events import DnsEvent
from ebpfmon.policy.dnsproxy import DnsProxy
from ebpfmon.policy.profiles import compiled
from ebpfmon.rules.fields import Context
from ebpfmon.rules.loader import load_rules, rule_paths
from ebpfmon.rules.ruleset import RuleSet
from ebpfmon.stream.decode import CgroupChange
from ebpfmon.stream.stream import EventStream


def load_ruleset(config: Config) -> RuleSet:
    """The configured rules: the shipped packs unless left out, then the operator's files."""
    return load_rules(rule_paths(config.rules))


def device_model(config: Config) -> DeviceModel:
    """The node's GPUs and their device numbers, with the nodes under the directories of the
    configured GPU prefixes too (a node made elsewhere is still judged by its number)."""
    dirs = {prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] for prefix in config.gpu_prefixes}
    return DeviceModel.read(extra_dirs=tuple(sorted(d for d in dirs if d)))


def rule_context(config: Config, gpu_entitled: Callable[[str], bool] | None = None) -> Context:
    """What rule fields need from the configuration and the node; gpu_entitled: whether an agent
    may use GPUs now (the grants), else the configuration's globs decide."""
    return Context(agents=config.agents, gpu_entitled=config.gpu_entitled, gpu_granted=gpu_entitled,
                   networks=NetworkClassifier(config.internal_networks, use_routes=config.internal_from_routes),
                   name_label=config.containers.name_label)


def check_sinks(config: Config, source: str = "configuration") -> None:
    """Each sink's secrets readable (what Alerting will read), or a ConfigError naming the sink's key."""
    for i, settings in enumerate(config.alerts.sinks):
        try:
            make_sink(settings, "check")
        except ConfigError as e:
            raise ConfigError(f"{source}: alerts.sinks[{i}] ({settings.name or settings.type}): {e.message}",
                              e.fix) from None


def deny_ports(config: Config, lists: dict[str, list[str]]) -> tuple[int, ...]:
    """The ports no agent may reach: configured, or the rules' mining_pool_ports list."""
    if config.enforce.deny_ports is not None:
        return config.enforce.deny_ports
    return tuple(int(p) for p in lists.get("mining_pool_ports", []) if str(p).isdigit())


def identified_programs(lists: dict[str, list[str]]) -> list[str]:
    """The installed programs the enricher recognises by their file (proc.exe_is)."""
    return [str(name) for name in lists.get("programs_identified_by_content", [])]


def deny_networks(config: Config, lists: dict[str, list[str]]) -> tuple[str, ...]:
    """The networks no agent may reach from the start: configured, and the rules'
    mining_pool_networks list. A list item that is not a network is an error that names it."""
    networks = tuple(config.enforce.deny_networks) + tuple(str(n) for n in lists.get("mining_pool_networks", []))
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise EbpfmonError(f"{network!r} in enforce.deny_networks or the rules' mining_pool_networks list "
                               "is not an IP network", "Write it as an address or a CIDR, such as "
                               "192.0.2.0/24.") from None
    return networks


def configure_enforcer(enforcer: Enforcer, config: Config, lists: dict[str, list[str]],
                       devices: DeviceModel | None = None) -> None:
    """The enforcement policy from the configuration and the rules' lists, egress profiles included."""
    enforcer.configure(dry_run=config.enforce.dry_run, gpu_default_deny="*" not in config.gpu_entitled,
                       keep_open=config.enforce.keep_open, deny_ports=deny_ports(config, lists),
                       deny_networks=deny_networks(config, lists), devices=devices or device_model(config))
    enforcer.labels_choose = bool(config.containers.enabled and config.containers.profile_label)
    enforcer.set_egress(compiled(config.egress), enforcer.agents.agents(enforcer.hierarchy))


def event_stream(config: Config, hierarchy: Hierarchy,
                 on_cgroup: Callable[[CgroupChange], None] | None = None) -> EventStream:
    """Every kind of event from the agents, with the enforcement programs loaded beside the
    probes (their maps pinned, so cuts outlive the daemon)."""
    ProbeSet.preflight()  # a user without root or bcc hears that, not a cgroup error
    hierarchy.ensure(config.agent_root)
    return EventStream(config, hierarchy=hierarchy, enforce_pins=pin_dir(hierarchy, config.agent_root),
                       on_cgroup=on_cgroup)


def trace_stream(config: Config, kinds: Iterable[str], cgroups: Iterable[str] = (),
                 all_cgroups: bool = False) -> EventStream:
    """The probes for the kinds asked, scoped to cgroups (the agent root by default) or to the
    whole host; no enforcement programs: tracing changes nothing."""
    return EventStream(config, kinds, cgroups=cgroups, all_cgroups=all_cgroups)


def enforcement(probes: ProbeSet, hierarchy: Hierarchy, config: Config, lists: dict[str, list[str]],
                devices: DeviceModel | None = None) -> Enforcer:
    """The enforcement programs configured and attached at the agent root."""
    enforcer = Enforcer(probes, hierarchy, config.agents)
    configure_enforcer(enforcer, config, lists, devices)
    enforcer.attach()
    return enforcer


def dns_proxy(enforcer: Enforcer, config: Config, on_event: Callable[[DnsEvent], None]) -> DnsProxy | None:
    """The DNS proxy, started, where a profile is in force (its agents' DNS goes there); None
    where none is (their DNS is judged as any other destination)."""
    if not compiled(config.egress).resolves_names:
        return None
    return DnsProxy(enforcer, config.egress, on_event).start()


def containment(enforcer: Enforcer, hierarchy: Hierarchy, config: Config, lists: dict[str, list[str]],
                on_release: Callable[[Record], None] | None = None,
                on_action: Callable[[str, str], None] | None = None,
                devices: DeviceModel | None = None) -> Containment:
    """Containment over the enforcer, with the quarantine records in the state directory,
    and the GPU grants of the entitled agents in place."""
    result = Containment(enforcer, hierarchy, config, QuarantineStore(config.state_dir), on_release=on_release,
                         on_action=on_action, lists=lists, devices=devices or device_model(config))
    result.grant_gpus(result.agent_paths())
    return result


def offline_containment(config: Config, on_release: Callable[[Record], None] | None = None) -> Containment:
    """Containment straight on the kernel's pinned state, for a command run with no daemon:
    the enforcement programs loaded and attached as the daemon would, from the same
    configuration and rules."""
    require_root()
    hierarchy = Hierarchy()
    hierarchy.ensure(config.agent_root)
    probes = ProbeSet(["enforce"], pin_dir=pin_dir(hierarchy, config.agent_root)).load()
    lists = load_ruleset(config).lists
    devices = device_model(config)
    return containment(enforcement(probes, hierarchy, config, lists, devices), hierarchy, config, lists,
                       on_release=on_release, devices=devices)
