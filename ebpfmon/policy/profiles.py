"""Egress profiles compiled from the configuration: for the kernel (probes/enforce.bpf.c judges
every connect and datagram of an agent against its profile) and for `ebpfmon policy check`,
which judges a destination the same way here and names the entry that decided.

A name entry allows the addresses a name resolves to, once the agent resolved it: the
daemon's DNS proxy (ebpfmon/policy/dnsproxy.py) answers the agents with a profile, and allows
what it answers before the agent has it.

An agent's profile is the first whose globs match its cgroup, else the default profile, else
none (no policy: today's behaviour). A profile allows what its entries list and nothing else,
loopback included. The kernel looks destinations up in a longest-prefix trie, so each prefix
carries the port ranges of every entry that contains it (fold()).
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ebpfmon.errors import ConfigError
from ebpfmon.kernel.abi import EGRESS_RANGES, EGRESS_UNCLASSIFIED

if TYPE_CHECKING:
    from ebpfmon.config import EgressSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ErrorAt = Callable[[str, str], Exception]  # (key path, message) -> the error to raise

MODES = ("off", "audit", "enforce")
DNS_REFUSALS = ("refused", "nxdomain")  # the answer to a name the profile does not allow
PROTOCOLS = {"": 0, "tcp": 6, "udp": 17}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def config_error(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}.", "See docs/policy.md for how egress profiles are written.")


@dataclass(frozen=True, order=True)
class PortRange:
    lo: int
    hi: int
    proto: int = 0  # IPPROTO_TCP, IPPROTO_UDP; 0 both

    def covers(self, port: int, proto: int) -> bool:
        return self.lo <= port <= self.hi and (not self.proto or self.proto == proto)

    def __str__(self) -> str:
        ports = "any port" if (self.lo, self.hi) == (0, 65535) else (
            f"port {self.lo}" if self.lo == self.hi else f"ports {self.lo}-{self.hi}")
        return ports + (f"/{PROTOCOL_NAMES[self.proto]}" if self.proto else "")


@dataclass(frozen=True)
class Allow:
    """One allow entry as written, where it was written."""

    network: Network
    ranges: tuple[PortRange, ...]
    where: str  # its key path in the configuration

    def __str__(self) -> str:
        return f"{self.network} {', '.join(map(str, self.ranges))} ({self.where})"


@dataclass(frozen=True)
class NameAllow:
    """A DNS name entry: an exact name, or *.example.org (any name below example.org)."""

    pattern: str  # lower case, no trailing dot
    ranges: tuple[PortRange, ...]
    where: str

    def matches(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])
        return name == self.pattern

    def __str__(self) -> str:
        return f"name {self.pattern} {', '.join(map(str, self.ranges))} ({self.where})"


@dataclass(frozen=True)
class Profile:
    id: int  # 1.., its place in the configuration
    name: str
    agents: tuple[str, ...]
    mode: str
    allows: tuple[Allow, ...]
    names: tuple[NameAllow, ...] = ()

    def name_entry(self, name: str) -> NameAllow | None:
        """The first name entry that allows name, or None."""
        return next((n for n in self.names if n.matches(name)), None)

    def name_ranges(self, name: str) -> tuple[PortRange, ...]:
        """The ports the addresses of name get: those of every name entry that matches it."""
        return merged(r for n in self.names if n.matches(name) for r in n.ranges)

    def static_ranges(self, ip) -> tuple[PortRange, ...]:
        """What the longest prefix written that contains ip allows (what the kernel's trie
        finds for it without names)."""
        network = ipaddress.ip_network(ip)
        for length in self.prefix_lengths[ip.version]:
            found = self.prefixes.get(network.supernet(new_prefix=length) if length < ip.max_prefixlen else network)
            if found is not None:
                return found
        return ()

    @functools.cached_property
    def prefix_lengths(self) -> dict[int, list[int]]:
        """The lengths of the prefixes written, longest first, by IP version."""
        return {version: sorted({n.prefixlen for n in self.prefixes if n.version == version}, reverse=True)
                for version in (4, 6)}

    def matches(self, agent: str) -> bool:
        return any(fnmatch.fnmatchcase(agent, glob) for glob in self.agents)

    def decide(self, address: str, port: int, proto: str = "tcp") -> Allow | None:
        """The entry that allows the destination (the longest prefix that does), or None."""
        ip = judged_address(ipaddress.ip_address(address))
        number = PROTOCOLS[proto]
        containing = [a for a in self.allows if a.network.version == ip.version and ip in a.network]
        for allow in sorted(containing, key=lambda a: -a.network.prefixlen):
            if any(r.covers(port, number) for r in allow.ranges):
                return allow
        return None

    @functools.cached_property
    def prefixes(self) -> dict[Network, tuple[PortRange, ...]]:
        """Each prefix with the ranges of every entry containing it, as the kernel's trie needs."""
        return fold(self.allows)


@dataclass(frozen=True)
class Policy:
    profiles: tuple[Profile, ...] = ()
    default: Profile | None = None

    def profile_for(self, agent: str) -> Profile | None:
        return next((p for p in self.profiles if p.matches(agent)), self.default)

    @property
    def classified_only(self) -> bool:
        """Whether a glob may name an agent: then an agent the daemon has not classified yet is
        refused everything until it is (its profile may allow less than the default)."""
        return any(p.agents for p in self.profiles)

    @property
    def resolves_names(self) -> bool:
        """Whether a profile is in force (audit or enforce): its agents' DNS goes to the proxy."""
        return any(p.mode != "off" for p in self.profiles)

    def by_name(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)

    @property
    def names(self) -> dict[int, str]:
        return {EGRESS_UNCLASSIFIED: "unclassified", **{p.id: p.name for p in self.profiles}}


def judged_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """An IPv4-mapped IPv6 address is judged as the IPv4 address, as the kernel does."""
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def merged(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """The same ports in as few ranges as they fit, per protocol."""
    out: list[PortRange] = []
    for r in sorted(set(ranges), key=lambda r: (r.proto, r.lo, r.hi)):
        last = out[-1] if out else None
        if last and last.proto == r.proto and r.lo <= last.hi + 1:
            out[-1] = PortRange(last.lo, max(last.hi, r.hi), r.proto)
        else:
            out.append(r)
    both = [r for r in out if r.proto == 0]  # a range for both protocols covers the others' parts
    return tuple(r for r in out if r.proto == 0 or not any(b.lo <= r.lo and r.hi <= b.hi for b in both))


def fold(allows: Iterable[Allow], error: ErrorAt = config_error) -> dict[Network, tuple[PortRange, ...]]:
    own: dict[Network, list[PortRange]] = {}
    where: dict[Network, str] = {}
    for allow in allows:
        own.setdefault(allow.network, []).extend(allow.ranges)
        where.setdefault(allow.network, allow.where)
    lengths = {version: sorted({n.prefixlen for n in own if n.version == version}) for version in (4, 6)}
    folded = {}
    for network, ranges in own.items():
        found = list(ranges)
        for length in lengths[network.version]:  # the shorter prefixes written that could hold it
            if length >= network.prefixlen:
                break
            found.extend(own.get(network.supernet(new_prefix=length), ()))
        folded[network] = merged(found)
        if len(folded[network]) > EGRESS_RANGES:
            raise error(where[network], f"{len(folded[network])} port ranges apply to {network} (its own and "
                                        f"those of the entries containing it); at most {EGRESS_RANGES} fit")
    return folded


def _ports(raw: tuple, proto: int, path: str, error: ErrorAt) -> tuple[PortRange, ...]:
    if not raw:
        return (PortRange(0, 65535, proto),)
    ranges = []
    for i, item in enumerate(raw):
        text = str(item).strip()
        lo, sep, hi = text.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise error(f"{path}.ports[{i}]", f"{item!r} is not a port (443) or a range of ports ('8000-8999')")
        low, high = int(lo), int(hi) if sep else int(lo)
        if not 1 <= low <= high <= 65535:
            raise error(f"{path}.ports[{i}]", f"{item!r}: ports are 1 to 65535, the low end first")
        ranges.append(PortRange(low, high, proto))
    return merged(ranges)


def _network(text: str, path: str, error: ErrorAt) -> Network:
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            wanted = ipaddress.ip_network(text.strip(), strict=False)
            raise error(f"{path}.cidr", f"{text!r} has host bits set: write {wanted} (the network) or the "
                                        f"address alone") from None
        raise error(f"{path}.cidr", f"{text!r} is not an IP address or network") from None
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(IPV4_MAPPED):
        network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def parse_upstream(text: str, path: str = "egress.dns_upstream", error: ErrorAt = config_error) -> tuple[str, int]:
    """'198.51.100.53', '198.51.100.53:5353', '2001:db8::53', '[2001:db8::53]:5353' -> (address, port)."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise error(path, f"{text!r} is not a server's address (198.51.100.53, [2001:db8::53]:5353)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise error(path, f"{text!r}: the port is 1 to 65535")
    return host, int(port)


def _name(text: str, path: str, error: ErrorAt) -> str:
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    body = labels[1:] if labels[0] == "*" else labels
    if name in ("*", "") or not body or not all(
            label and len(label) <= 63 and all(ch.isalnum() or ch in "-_" for ch in label) for label in body):
        raise error(f"{path}.name", f"{text!r} is not a DNS name (mirror.example.org) or a wildcard below one "
                                    f"(*.example.org); to allow every address write cidr: 0.0.0.0/0")
    return name


@functools.lru_cache(maxsize=4)
def compiled(settings: EgressSettings) -> Policy:
    """compile_policy, once per distinct settings (a large policy takes seconds): the check at
    load, the start and each reload share it."""
    return compile_policy(settings)


def compile_policy(settings: EgressSettings, error: ErrorAt = config_error) -> Policy:
    """The policy the settings describe; error(path, message) makes what is raised for a problem."""
    profiles: list[Profile] = []
    seen: set[str] = set()
    for i, spec in enumerate(settings.profiles):
        path = f"egress.profiles[{i}]"
        if not spec.name.strip():
            raise error(f"{path}.name", "a profile needs a name")
        if spec.name in seen:
            raise error(f"{path}.name", f"a second profile named {spec.name!r}")
        seen.add(spec.name)
        if spec.mode not in MODES:
            raise error(f"{path}.mode", f"{spec.mode!r} is not one of {', '.join(MODES)}")
        allows, names = [], []
        for j, entry in enumerate(spec.allow):
            where = f"{path}.allow[{j}]"
            if bool(entry.cidr) == bool(entry.name):
                raise error(where, "an allow entry needs a cidr or a name (one of them)")
            if entry.proto not in PROTOCOLS:
                raise error(f"{where}.proto", f"{entry.proto!r} is not tcp or udp (or empty: both)")
            ranges = _ports(entry.ports, PROTOCOLS[entry.proto], where, error)
            if entry.name:
                names.append(NameAllow(_name(entry.name, where, error), ranges, where))
            else:
                allows.append(Allow(_network(entry.cidr, where, error), ranges, where))
        profile = Profile(i + 1, spec.name, tuple(spec.agents), spec.mode, tuple(allows), tuple(names))
        profile.__dict__["prefixes"] = fold(profile.allows, error)  # too many ranges: said here, not at load
        profiles.append(profile)
    for i, server in enumerate(settings.dns_upstream):
        parse_upstream(server, f"egress.dns_upstream[{i}]", error)
    if settings.dns_refuse_with not in DNS_REFUSALS:
        raise error("egress.dns_refuse_with", f"{settings.dns_refuse_with!r} is not one of {', '.join(DNS_REFUSALS)}")
    if settings.dns_ttl_floor < 0:
        raise error("egress.dns_ttl_floor", "seconds, 0 or more")
    if not 0 <= settings.dns_proxy_port <= 65535:
        raise error("egress.dns_proxy_port", "a port, 1 to 65535 (0: one the kernel picks)")
    default = None
    if settings.default_profile is not None:
        default = next((p for p in profiles if p.name == settings.default_profile), None)
        if default is None:
            raise error("egress.default_profile", f"no profile is named {settings.default_profile!r} "
                                                  f"(profiles: {', '.join(seen) or 'none'})")
    return Policy(tuple(profiles), default)
