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
import time
from pathlib import Path

from ebpfmon.host.cgroups import AgentLayout, Hierarchy
from ebpfmon.host.gpus import DeviceModel, Selection
from ebpfmon.errors import CgroupError, ProbeLoadError
from ebpfmon.kernel import abi
from ebpfmon.kernel.probeset import BPFFS, ProbeSet, import_bcc
from ebpfmon.policy.profiles import Policy, Profile, merged

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# program name -> (program type, attach type)
HOOKS = {
    "enforce_egress": ("CGROUP_SKB", "CGROUP_INET_EGRESS"),
    "enforce_ingress": ("CGROUP_SKB", "CGROUP_INET_INGRESS"),
    "enforce_connect4": ("CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    "enforce_connect6": ("CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    "enforce_sendmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    "enforce_sendmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    "enforce_recvmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    "enforce_recvmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
    "enforce_getpeername4": ("CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME"),
    "enforce_getpeername6": ("CGROUP_SOCK_ADDR", "CGROUP_INET6_GETPEERNAME"),
    "enforce_device": ("CGROUP_DEVICE", "CGROUP_DEVICE"),
}


def pin_dir(hierarchy: Hierarchy, agent_root: str) -> Path:
    """Where the state of enforcement at this agent root is pinned."""
    return BPFFS / "ebpfmon" / str(hierarchy.cgroup_id(agent_root))


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
        _fill(leaf, ranges, ())
    try:
        table.items_update_batch(keys, leaves)
    except Exception:  # bcc raises a bare Exception; older kernels have no batch for tries
        for key, leaf in zip(keys, leaves):
            table[key] = leaf


def _fill(leaf, ranges, from_names, expires_ns: int = 0):
    """A trie leaf allowing ranges, and from_names until expires_ns."""
    leaf.count = len(ranges) + len(from_names)
    leaf.expires_ns = expires_ns
    for part, (r, named) in zip(leaf.range, [(r, 0) for r in ranges] + [(r, 1) for r in from_names]):
        part.lo, part.hi, part.proto, part.from_name = r.lo, r.hi, r.proto, named
    return leaf


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
        # agent -> the profile its container's trusted label chose (by name); with labels_choose,
        # every agent is classified by the daemon (an agent it has not classified is refused
        # everything), and a container only once its labels are read
        self.chosen_profiles: dict[str, str] = {}
        self.labels_choose = False
        self._egress_lock = threading.Lock()
        # addresses allowed because an agent resolved a name through the DNS proxy:
        # (profile name, address) -> {name: expiry, monotonic ns}
        self.name_grants: dict[tuple[str, IPAddress], dict[str, int]] = {}
        self.dns_proxy_port = 0
        self._config = abi.EnforceConfig()
        # agent id -> its MIG capability nodes, for every agent with a GPU entry: read from the
        # pinned maps once, then kept by our own writes. Asking the kernel meant a walk of every
        # agent's entries (a syscall each) on each agent's creation and removal.
        self._gpu_entries: dict[int, set[tuple[int, int]]] | None = None

    @property
    def bpf(self):
        return self.probes.bpf

    def configure(self, dry_run: bool, gpu_default_deny: bool, keep_open: tuple[str, ...],
                  deny_ports: tuple[int, ...], deny_networks: tuple[str, ...] = (),
                  devices: DeviceModel | None = None) -> None:
        """Writes the policy the programs read; deny_networks are the configured ones (actions add
        theirs with hold_network)."""
        self._config = abi.EnforceConfig(agent_level=self.agents.absolute_level, dry_run=int(dry_run),
                                         gpu_default_deny=int(gpu_default_deny))
        self.set_dns_proxy(self.dns_proxy_port)
        # what changes is added before what goes is removed, never cleared and refilled: an
        # agent's connect meanwhile meets the old policy or the new one, not an empty one
        for name, family in ((b"cut_allow4", 4), (b"cut_allow6", 6)):
            table = self.bpf[name]
            wanted = {bytes(key): key for key in (_lpm_key(table, n) for n in keep_open
                                                   if ipaddress.ip_network(n, strict=False).version == family)}
            for key in wanted.values():
                table[key] = ctypes.c_uint8(1)
            for key in [k for k in table.keys() if bytes(k) not in wanted]:
                del table[key]
        ports = self.bpf[b"deny_ports"]
        for port in deny_ports:
            ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        for key in [k for k in ports.keys() if k.value not in set(deny_ports)]:
            del ports[key]
        before = self.configured_networks | self.held_networks
        self.configured_networks = frozenset(_canonical(n) for n in deny_networks)
        self._apply_networks(before)
        self.set_devices(devices or DeviceModel.read())

    def set_devices(self, devices: DeviceModel) -> None:
        """What each GPU device number is (host/gpus.py): majors by their rule, nodes the rule
        does not tell (DRM nodes by their PCI device, MIG capabilities)."""
        majors, nodes = self.bpf[b"gpu_majors"], self.bpf[b"gpu_nodes"]
        for major, kind in devices.majors.items():
            majors[ctypes.c_uint32(major)] = ctypes.c_uint32(kind)
        for major in [k.value for k in majors.keys() if k.value not in devices.majors]:
            del majors[ctypes.c_uint32(major)]
        wanted = {(major << 32 | minor): node for (major, minor), node in devices.nodes.items()}
        for number, node in wanted.items():
            nodes[ctypes.c_uint64(number)] = abi.GpuNode(node_class=node.node_class, gpu=node.gpu or 0)
        for number in [k.value for k in nodes.keys() if k.value not in wanted]:
            del nodes[ctypes.c_uint64(number)]

    def set_dns_proxy(self, port: int) -> None:
        """Where agents with a profile send their DNS from now on (0: nowhere, judged as the rest)."""
        self.dns_proxy_port = self._config.dns_proxy_port = port
        self.bpf[b"enforce_config"][ctypes.c_int(0)] = self._config

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
        self._delete(self.bpf[b"cut_cgroups"], ctypes.c_uint64(agent_id))

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
            self._carry_grants(policy, new)
            # two writes: the first changes only the new generation's part, the second only the
            # active index, so no reader sees a torn mix of both
            part, fallback = state.generation[new], _class_of(policy.default)
            part.fallback.profile, part.fallback.mode = fallback.profile, fallback.mode
            part.classified_only = int(policy.classified_only or self.labels_choose)
            states[ctypes.c_int(0)] = state
            state.active = new
            states[ctypes.c_int(0)] = state
            self.egress_policy, self.egress_generation = policy, new

    def egress_profile_of(self, agent_id: int) -> Profile | None:
        """The profile the kernel applies to an agent now (as egress_scope in probes/enforce.bpf.c);
        None for none, an unclassified agent, or a profile that is off."""
        with self._egress_lock:
            state = self.bpf[b"egress_state"][ctypes.c_int(0)]
            generation = state.active & 1
            agents = self.bpf[b"egress_agents"]
            named = agents.get(agents.Key(agent=agent_id, generation=generation))
            part = state.generation[generation]
            if named is None and part.classified_only:
                return None
            profile_id = (named or part.fallback).profile
            profile = next((p for p in self.egress_policy.profiles if p.id == profile_id), None)
            return profile if profile and profile.mode != "off" else None

    def grant_name(self, profile: Profile, name: str, addresses: list[IPAddress], expires_ns: int) -> None:
        """Allows the addresses name resolved to, to the profile's agents, on the ports its name
        entries give, until expires_ns (monotonic, as bpf_ktime_get_ns)."""
        with self._egress_lock:
            if self.egress_policy.by_name(profile.name) is not profile:
                return  # a reload came between: the new policy decides the next answer
            for ip in addresses:
                names = self.name_grants.setdefault((profile.name, ip), {})
                names[name] = max(names.get(name, 0), expires_ns)
                self._write_grant(profile, ip, names, self.egress_generation)

    def expire_grants(self, now_ns: int | None = None) -> int:
        """Forgets names whose time is over (the kernel stops honouring them by itself at their
        expiry; this keeps the trie small). Returns how many addresses went."""
        now_ns = now_ns or time.monotonic_ns()
        gone = 0
        with self._egress_lock:
            for (profile_name, ip), names in list(self.name_grants.items()):
                if all(expiry > now_ns for expiry in names.values()):
                    continue
                for name in [n for n, expiry in names.items() if expiry <= now_ns]:
                    del names[name]
                profile = self.egress_policy.by_name(profile_name)
                if profile is not None:
                    self._write_grant(profile, ip, names, self.egress_generation)
                if not names:
                    del self.name_grants[(profile_name, ip)]
                    gone += 1
        return gone

    def _carry_grants(self, policy: Policy, generation: int) -> None:
        """Names resolved under the policy before stay allowed under the new one where it still
        allows them: an agent that resolved a name just before a reload connects just after."""
        for (profile_name, ip), names in list(self.name_grants.items()):
            profile = policy.by_name(profile_name)
            kept = {n: e for n, e in names.items() if profile and profile.name_entry(n)}
            if kept:
                self.name_grants[(profile_name, ip)] = kept
                self._write_grant(profile, ip, kept, generation)
            else:
                del self.name_grants[(profile_name, ip)]

    def _write_grant(self, profile: Profile, ip: IPAddress, names: dict[str, int], generation: int) -> None:
        """The address's trie entry: what the prefixes written allow it, and what its names
        allow until the last of them expires."""
        table = self.bpf[b"egress_allow4" if ip.version == 4 else b"egress_allow6"]
        key = table.Key(prefixlen=32 + ip.max_prefixlen, scope=generation << 16 | profile.id)
        ctypes.memmove(key.addr, ip.packed, len(ip.packed))
        own = profile.static_ranges(ip)
        from_names = [r for r in merged(r for n in names for r in profile.name_ranges(n)) if r not in own]
        if not from_names:
            if ipaddress.ip_network(ip) in profile.prefixes:  # the address is written as such: back to that
                table[key] = _fill(table.Leaf(), own, ())
            else:
                try:
                    del table[key]
                except KeyError:
                    pass
            return
        room = abi.EGRESS_RANGES - len(own)
        table[key] = _fill(table.Leaf(), own, from_names[:room], max(names.values()))

    def name_grant_list(self) -> list[tuple[str, str, str, float]]:
        """(profile, address, name, seconds left) of every name's address allowed now."""
        now = time.monotonic_ns()
        with self._egress_lock:
            return sorted((profile, str(ip), name, (expiry - now) / 1e9)
                          for (profile, ip), names in self.name_grants.items()
                          for name, expiry in names.items() if expiry > now)

    def assign_egress(self, agent: str) -> None:
        """A new agent cgroup gets the profile its path matches (the default applies meanwhile)."""
        with self._egress_lock:
            self._assign_egress(self.egress_policy, agent, self.egress_generation)

    def choose_profile(self, agent: str, name: str | None) -> str | None:
        """The profile a container's label names for the agent (None: its globs decide), in force
        at once; returns why a name was not taken."""
        with self._egress_lock:
            problem = None
            if name and self.egress_policy.by_name(name) is None:
                problem = f"no egress profile is named {name!r}"
                name = None
            if name:
                self.chosen_profiles[agent] = name
            else:
                self.chosen_profiles.pop(agent, None)
            self._assign_egress(self.egress_policy, agent, self.egress_generation)
            return problem

    def forget_egress(self, agent_id: int, agent: str | None = None) -> None:
        self.chosen_profiles.pop(agent, None)
        agents = self.bpf[b"egress_agents"]
        for generation in (0, 1):
            self._delete(agents, agents.Key(agent=agent_id, generation=generation))

    def _assign_egress(self, policy: Policy, agent: str, generation: int) -> None:
        """The agent's classification: its profile's id, 0 for none. Without globs every agent
        has the default, which the kernel applies by itself."""
        if not (policy.classified_only or self.labels_choose) or not self.agents.is_agent(agent):
            return
        agent_id = self.hierarchy.cgroup_id_or_none(agent)
        if agent_id is None:
            return  # gone already
        chosen = self.chosen_profiles.get(agent)
        profile = (policy.by_name(chosen) if chosen else None) or policy.profile_for(agent)
        agents = self.bpf[b"egress_agents"]
        agents[agents.Key(agent=agent_id, generation=generation)] = _class_of(profile)

    def drop_entries_of_others(self, agent_ids: set[int]) -> int:
        """Drops the GPU and egress entries of cgroups not among agent_ids (agents removed while
        no daemon watched: the maps are pinned); returns how many agents had some. No process
        can be in a removed cgroup, so no program reads them, in either egress generation."""
        dead = {a for a in self._gpu_mirror() if a not in agent_ids}
        for agent_id in dead:
            self.clear_gpu(agent_id)
        with self._egress_lock:
            agents = self.bpf[b"egress_agents"]
            stale = [k for k in agents.keys() if k.agent not in agent_ids]
            for key in stale:
                self._delete(agents, key)
        return len(dead | {k.agent for k in stale})

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

    def _gpu_mirror(self) -> dict[int, set[tuple[int, int]]]:
        if self._gpu_entries is None:
            entries: dict[int, set[tuple[int, int]]] = {k.value: set() for k in self.bpf[b"gpu_grants"].keys()}
            for k in self.bpf[b"gpu_mig_grants"].keys():
                entries.setdefault(k.agent_id, set()).add((k.major, k.minor))
            self._gpu_entries = entries
        return self._gpu_entries

    @property
    def gpu_entries(self) -> int:
        """Agents with a GPU entry of their own (the rest have the default)."""
        return len(self._gpu_mirror())

    def set_gpu(self, agent_id: int, allow: bool, selection: Selection | None = None,
                mig_nodes: set[tuple[int, int]] = frozenset()) -> None:
        """The GPU nodes one agent may open: none (allow False), every one (selection None or
        every), or the selection's GPUs whole, their control nodes and its MIG instances'
        capability nodes (mig_nodes, from the device model)."""
        every = selection is None or selection.every
        gpu_mask = 0 if every else sum(1 << g for g in selection.gpus if 0 <= g < abi.GPU_INDEX_MAX)
        mig_mask = 0 if every else sum(1 << g for g, _, _ in selection.mig if 0 <= g < abi.GPU_INDEX_MAX)
        grants = self.bpf[b"gpu_mig_grants"]
        wanted = set(mig_nodes) if allow and not every else set()
        held = self._gpu_mirror().setdefault(agent_id, set())
        for major, minor in held - wanted:
            self._delete(grants, abi.GpuMigKey(agent_id=agent_id, major=major, minor=minor))
        for major, minor in wanted - held:
            grants[abi.GpuMigKey(agent_id=agent_id, major=major, minor=minor)] = ctypes.c_uint8(1)
        held.clear()
        held.update(wanted)
        self.bpf[b"gpu_grants"][ctypes.c_uint64(agent_id)] = abi.GpuPolicy(
            allow=int(allow), every_gpu=int(allow and every), gpu_mask=gpu_mask, mig_mask=mig_mask)

    def clear_gpu(self, agent_id: int) -> None:
        """Back to the default for agents without an entry (gpu_default_deny)."""
        held = self._gpu_mirror().pop(agent_id, None)
        if held is None:
            return
        self._delete(self.bpf[b"gpu_grants"], ctypes.c_uint64(agent_id))
        grants = self.bpf[b"gpu_mig_grants"]
        for major, minor in held:
            self._delete(grants, abi.GpuMigKey(agent_id=agent_id, major=major, minor=minor))

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    def gpu_policies(self) -> dict[int, tuple[bool, frozenset[int] | None]]:
        """agent id -> (allowed any GPU, the GPUs whose node it may open; None: every node)."""
        def gpus(mask: int) -> frozenset[int]:
            return frozenset(i for i in range(abi.GPU_INDEX_MAX) if mask >> i & 1)
        return {k.value: (bool(v.allow), None if v.every_gpu else gpus(v.gpu_mask | v.mig_mask))
                for k, v in self.bpf[b"gpu_grants"].items()}

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
