"""Egress profiles compiled from the configuration: for the kernel (probes/enforce.bpf.c judges
every connect and datagram of an agent against its profile) and for `ebpfmon policy check`,
which judges a destination the same way here and names the entry that decided.

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
class Profile:
    id: int  # 1.., its place in the configuration
    name: str
    agents: tuple[str, ...]
    mode: str
    allows: tuple[Allow, ...]

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
        allows = []
        for j, entry in enumerate(spec.allow):
            where = f"{path}.allow[{j}]"
            if entry.name:
                raise error(f"{where}.name", "DNS names in profiles need the daemon's DNS proxy, which this "
                                             "version does not have yet: allow the addresses by cidr")
            if not entry.cidr:
                raise error(where, "an allow entry needs a cidr")
            if entry.proto not in PROTOCOLS:
                raise error(f"{where}.proto", f"{entry.proto!r} is not tcp or udp (or empty: both)")
            allows.append(Allow(_network(entry.cidr, where, error),
                                _ports(entry.ports, PROTOCOLS[entry.proto], where, error), where))
        profile = Profile(i + 1, spec.name, tuple(spec.agents), spec.mode, tuple(allows))
        profile.__dict__["prefixes"] = fold(profile.allows, error)  # too many ranges: said here, not at load
        profiles.append(profile)
    default = None
    if settings.default_profile is not None:
        default = next((p for p in profiles if p.name == settings.default_profile), None)
        if default is None:
            raise error("egress.default_profile", f"no profile is named {settings.default_profile!r} "
                                                  f"(profiles: {', '.join(seen) or 'none'})")
    return Policy(tuple(profiles), default)
