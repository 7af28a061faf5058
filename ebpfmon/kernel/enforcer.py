"""The enforcement programs at the agent root, and the pinned maps behind them.

Attached with no flags, so attaching again (a restarted daemon) replaces our
earlier program on each hook atomically; the cut list, deny lists and GPU
policy live in maps pinned per agent root, so they survive the daemon.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import threading
from pathlib import Path

from ebpfmon.host.cgroups import AgentLayout, Hierarchy
from ebpfmon.errors import CgroupError, ProbeLoadError
from ebpfmon.kernel import abi
from ebpfmon.kernel.probeset import BPFFS, ProbeSet, import_bcc
from ebpfmon.policy.profiles import Policy

# program name -> (program type, attach type)
HOOKS = {
    "enforce_egress": ("CGROUP_SKB", "CGROUP_INET_EGRESS"),
    "enforce_ingress": ("CGROUP_SKB", "CGROUP_INET_INGRESS"),
    "enforce_connect4": ("CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    "enforce_connect6": ("CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    "enforce_sendmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    "enforce_sendmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    "enforce_device": ("CGROUP_DEVICE", "CGROUP_DEVICE"),
}

# character majors of GPUs and accelerators that do not depend on a driver's
# registration order; others come from /proc/devices by driver name
STATIC_GPU_MAJORS = {195: "nvidia", 226: "drm"}
GPU_DRIVERS = ("nvidia-uvm", "nvidia-caps", "nvidia-nvlink", "nvidia-frontend", "kfd", "accel")


def pin_dir(hierarchy: Hierarchy, agent_root: str) -> Path:
    """Where the state of enforcement at this agent root is pinned."""
    return BPFFS / "ebpfmon" / str(hierarchy.cgroup_id(agent_root))


def gpu_majors(proc_devices: str = "/proc/devices") -> set[int]:
    from ebpfmon.host.devices import char_drivers

    majors = set(STATIC_GPU_MAJORS)
    for major, name in char_drivers(proc_devices).items():
        if name in GPU_DRIVERS:
            majors.add(major)
    return majors


def _write_batch(table, scope: int, prefixes: list) -> None:
    """Trie entries for one profile: the scope always matches whole, then the prefix. In one
    batch where the kernel takes batches of a trie, else one by one."""
    if not prefixes:
        return
    keys, leaves = (table.Key * len(prefixes))(), (table.Leaf * len(prefixes))()
    for key, leaf, (network, ranges) in zip(keys, leaves, prefixes):
        key.prefixlen = 32 + network.prefixlen
        key.scope = scope
        ctypes.memmove(key.addr, network.network_address.packed, len(network.network_address.packed))
        leaf.count = len(ranges)
        for part, r in zip(leaf.range, ranges):
            part.lo, part.hi, part.proto = r.lo, r.hi, r.proto
    try:
        table.items_update_batch(keys, leaves)
    except Exception:  # bcc raises a bare Exception; older kernels have no batch for tries
        for key, leaf in zip(keys, leaves):
            table[key] = leaf


def _class_of(profile) -> abi.EgressClass:
    """A profile as the kernel keeps it for an agent: its id and mode (none: 0, off)."""
    if profile is None:
        return abi.EgressClass(profile=0, mode=abi.EgressMode.OFF)
    return abi.EgressClass(profile=profile.id, mode=abi.EgressMode[profile.mode.upper()])


def _lpm_key(table, network: str):
    net = ipaddress.ip_network(network, strict=False)
    key = table.Key()
    key.prefixlen = net.prefixlen
    ctypes.memmove(key.addr, net.network_address.packed, len(net.network_address.packed))
    return key


def _canonical(network: str) -> str:
    """'198.51.100.9' -> '198.51.100.9/32', the form denied_networks() reads back."""
    return str(ipaddress.ip_network(network, strict=False))


def _lpm_network(key, size: int) -> str:
    address = ipaddress.ip_address(bytes(key.addr)[:size])
    return str(ipaddress.ip_network(f"{address}/{key.prefixlen}", strict=False))


class Enforcer:
    def __init__(self, probes: ProbeSet, hierarchy: Hierarchy, agents: AgentLayout):
        root = hierarchy.relative(hierarchy.path(agents.root))
        if root == "/":
            raise CgroupError("the agent root cannot be the root cgroup: enforcement there would reach "
                              "every process on the host.", "Set an agent root such as /ebpfmon-agents.")
        self.probes = probes
        self.hierarchy = hierarchy
        self.agents = AgentLayout(root, agents.level)
        self._attached: list[tuple] = []
        # the deny lists have two owners: the configuration and the quarantines'
        # deny_connect actions; an entry goes when neither holds it any more
        self.configured_networks: frozenset[str] = frozenset()
        self.held_networks: frozenset[str] = frozenset()
        # the egress policy in force, and the generation it was written to; agents come and go
        # from the reader's thread while a reload (control socket, SIGHUP) writes a new one
        self.egress_policy = Policy()
        self.egress_generation = 0
        self._egress_lock = threading.Lock()

    @property
    def bpf(self):
        return self.probes.bpf

    def configure(self, dry_run: bool, gpu_default_deny: bool, keep_open: tuple[str, ...],
                  deny_ports: tuple[int, ...], deny_networks: tuple[str, ...] = ()) -> None:
        """Writes the policy the programs read; deny_networks are the configured ones (actions add
        theirs with hold_network)."""
        self.bpf[b"enforce_config"][ctypes.c_int(0)] = abi.EnforceConfig(
            agent_level=self.agents.absolute_level, dry_run=int(dry_run), gpu_default_deny=int(gpu_default_deny))
        for name in (b"cut_allow4", b"cut_allow6"):
            self.bpf[name].clear()
        for network in keep_open:
            family = ipaddress.ip_network(network, strict=False).version
            table = self.bpf[b"cut_allow4" if family == 4 else b"cut_allow6"]
            table[_lpm_key(table, network)] = ctypes.c_uint8(1)
        ports = self.bpf[b"deny_ports"]
        ports.clear()
        for port in deny_ports:
            ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        before = self.configured_networks | self.held_networks
        self.configured_networks = frozenset(_canonical(n) for n in deny_networks)
        self._apply_networks(before)
        majors = self.bpf[b"gpu_majors"]
        majors.clear()
        for major in gpu_majors():
            majors[ctypes.c_uint32(major)] = ctypes.c_uint8(1)

    def attach(self) -> None:
        """Attaches every program at the agent root, replacing earlier ones of ours."""
        fd = os.open(self.hierarchy.path(self.agents.root), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, fn, attach in load_programs(self.bpf):
                try:
                    self.bpf.attach_func(fn, fd, attach)
                except Exception as e:
                    raise ProbeLoadError(f"cannot attach {name} at {self.agents.root}: {e}.",
                                         "Run 'ebpfmon doctor' (cgroup hook rows).") from e
                self._attached.append((fn, attach))
        finally:
            os.close(fd)

    def detach(self) -> None:
        """Takes the programs off the agent root (the cut list stays pinned)."""
        fd = os.open(self.hierarchy.path(self.agents.root), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for fn, attach in self._attached:
                self.bpf.detach_func(fn, fd, attach)
        finally:
            os.close(fd)
        self._attached.clear()

    # ---- the cut list ----

    def cut(self, agent_id: int, since_ns: int) -> None:
        self.bpf[b"cut_cgroups"][ctypes.c_uint64(agent_id)] = ctypes.c_uint64(since_ns)

    def uncut(self, agent_id: int) -> None:
        try:
            del self.bpf[b"cut_cgroups"][ctypes.c_uint64(agent_id)]
        except KeyError:
            pass

    def cut_agents(self) -> dict[int, int]:
        """agent cgroup id -> time it was cut (ns)."""
        return {k.value: v.value for k, v in self.bpf[b"cut_cgroups"].items()}

    # ---- egress profiles ----

    def set_egress(self, policy: Policy, agents: list[str]) -> None:
        """Writes the policy whole into the generation not in force, then flips to it: a connect
        is judged by the old policy or by the new one, never by a mix, never by none."""
        with self._egress_lock:
            states = self.bpf[b"egress_state"]
            state = states[ctypes.c_int(0)]
            active = state.active & 1
            new = 1 - active
            self._drop_egress_generation(new)  # what the policy before the one in force left there
            for profile in policy.profiles:
                scope = new << 16 | profile.id
                for version, name in ((4, b"egress_allow4"), (6, b"egress_allow6")):
                    _write_batch(self.bpf[name], scope, [(n, r) for n, r in profile.prefixes.items()
                                                         if n.version == version])
            for agent in agents:
                self._assign_egress(policy, agent, new)
            # two writes: the first changes only the new generation's part, the second only the
            # active index, so no reader sees a torn mix of both
            part, fallback = state.generation[new], _class_of(policy.default)
            part.fallback.profile, part.fallback.mode = fallback.profile, fallback.mode
            part.classified_only = int(policy.classified_only)
            states[ctypes.c_int(0)] = state
            state.active = new
            states[ctypes.c_int(0)] = state
            self.egress_policy, self.egress_generation = policy, new

    def assign_egress(self, agent: str) -> None:
        """A new agent cgroup gets the profile its path matches (the default applies meanwhile)."""
        with self._egress_lock:
            self._assign_egress(self.egress_policy, agent, self.egress_generation)

    def forget_egress(self, agent_id: int) -> None:
        agents = self.bpf[b"egress_agents"]
        for generation in (0, 1):
            key = agents.Key(agent=agent_id, generation=generation)
            try:
                del agents[key]
            except KeyError:
                pass

    def _assign_egress(self, policy: Policy, agent: str, generation: int) -> None:
        """The agent's classification: its profile's id, 0 for none. Without globs every agent
        has the default, which the kernel applies by itself."""
        if not policy.classified_only or not self.agents.is_agent(agent):
            return
        agent_id = self.hierarchy.cgroup_id_or_none(agent)
        if agent_id is None:
            return  # gone already
        agents = self.bpf[b"egress_agents"]
        agents[agents.Key(agent=agent_id, generation=generation)] = _class_of(policy.profile_for(agent))

    def _drop_egress_generation(self, generation: int) -> None:
        for name, generation_of in ((b"egress_allow4", lambda k: k.scope >> 16),
                                    (b"egress_allow6", lambda k: k.scope >> 16),
                                    (b"egress_agents", lambda k: k.generation)):
            table = self.bpf[name]
            for key in [k for k in table.keys() if generation_of(k) == generation]:
                del table[key]

    # ---- denied destinations ----

    def hold_network(self, network: str) -> None:
        """Denies a network on behalf of a quarantine (a deny_connect action)."""
        self.held_networks |= {_canonical(network)}
        self._deny_network(network)

    def _deny_table(self, network: str):
        family = ipaddress.ip_network(network, strict=False).version
        return self.bpf[b"deny_nets4" if family == 4 else b"deny_nets6"]

    def _deny_network(self, network: str) -> None:
        table = self._deny_table(network)
        table[_lpm_key(table, network)] = ctypes.c_uint8(1)

    def hold_networks(self, networks) -> None:
        """The networks the quarantines deny now: those they held before and no longer do are
        opened again, unless configured."""
        before = self.configured_networks | self.held_networks
        self.held_networks = frozenset(_canonical(n) for n in networks)
        self._apply_networks(before)

    def _apply_networks(self, before: frozenset[str]) -> None:
        wanted = self.configured_networks | self.held_networks
        present = set(self.denied_networks())
        for network in wanted - present:
            self._deny_network(network)
        for network in (before - wanted) & present:  # only what an owner let go
            self._open_network(network)

    def drop_unowned_networks(self) -> list[str]:
        """Opens denied networks that neither the configuration nor a quarantine holds (left by
        an earlier configuration while no daemon ran); returns them."""
        stale = sorted(set(self.denied_networks()) - self.configured_networks - self.held_networks)
        for network in stale:
            self._open_network(network)
        return stale

    def _open_network(self, network: str) -> None:
        table = self._deny_table(network)
        del table[_lpm_key(table, network)]

    def denied_networks(self) -> list[str]:
        return ([_lpm_network(k, 4) for k in self.bpf[b"deny_nets4"].keys()] +
                [_lpm_network(k, 16) for k in self.bpf[b"deny_nets6"].keys()])

    # ---- GPUs ----

    def set_gpu(self, agent_id: int, allow: bool, minors: list[int] | None = None) -> None:
        mask = sum(1 << m for m in minors or [] if 0 <= m < 64)
        self.bpf[b"gpu_policy"][ctypes.c_uint64(agent_id)] = abi.GpuPolicy(
            allow=int(allow), limit_minors=int(minors is not None), minor_mask=mask)

    def clear_gpu(self, agent_id: int) -> None:
        try:
            del self.bpf[b"gpu_policy"][ctypes.c_uint64(agent_id)]
        except KeyError:
            pass

    def gpu_policies(self) -> dict[int, tuple[bool, int | None]]:
        return {k.value: (bool(v.allow), v.minor_mask if v.limit_minors else None)
                for k, v in self.bpf[b"gpu_policy"].items()}

    def counters(self) -> dict[str, int]:
        """Refusals by reason, and packets dropped by cuts, since the programs were loaded."""
        table = self.bpf[b"enforce_counters"]
        out = {r.name.lower(): sum(table[ctypes.c_int(r.value)]) for r in abi.RefuseReason}
        out["skb_dropped"] = sum(table[ctypes.c_int(abi.REFUSE_REASON_MAX)])
        return out


def load_programs(bpf) -> list[tuple[str, object, object]]:
    """Loads (verifies) every enforcement program: (name, function, attach type)."""
    bcc = import_bcc()
    loaded = []
    for name, (prog_type, attach_type) in HOOKS.items():
        attach = getattr(bcc.BPFAttachType, attach_type)
        kwargs = {"attach_type": attach} if prog_type == "CGROUP_SOCK_ADDR" else {}
        try:
            fn = bpf.load_func(name.encode(), getattr(bcc.BPF, prog_type), **kwargs)
        except Exception as e:
            raise ProbeLoadError(f"the kernel refused {name}: {e}.",
                                 "Run 'ebpfmon doctor' (cgroup hook rows).") from e
        loaded.append((name, fn, attach))
    return loaded


def check_loads() -> None:
    """Compiles and verifies the enforcement programs without attaching them (doctor)."""
    pins = BPFFS / "ebpfmon" / f"doctor-{os.getpid()}"
    try:
        probes = ProbeSet(["enforce"], pin_dir=pins).load()
        try:
            load_programs(probes.bpf)
        finally:
            probes.close()
    finally:
        shutil.rmtree(pins, ignore_errors=True)


def remove_pins(hierarchy: Hierarchy, agent_root: str) -> None:
    """Forgets the pinned state of an agent root (tests, uninstall)."""
    shutil.rmtree(pin_dir(hierarchy, agent_root), ignore_errors=True)
