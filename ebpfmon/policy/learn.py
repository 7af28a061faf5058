"""A profile learned from what agents did: the destinations their connects and datagrams
reached, read back from the audit log, as an egress section a person reviews before use.

Reached means a connect that succeeded or was under way (0, EINPROGRESS), or a datagram sent;
what an audit-mode profile reports it would refuse is not itself reached (the connect or send
beside it says how it went: a connect io_uring made is reported by the cgroup hook as a connect
once let through). Failed attempts are left out: a profile
learned from a scan would allow the scan. A non-blocking connect returns EINPROGRESS whatever
comes of it, and the outcome is not an event: such connects are learned as reached, which is
why the result is for a person to review.

Names come from the DNS proxy's answers (dns events): an address a name the agents resolved
gave is learned as that name, with the ports reached there; the rest by address. DNS itself
(port 53) is left out: under a profile it goes to the proxy, whatever the server.
"""

from __future__ import annotations

import datetime as dt
import errno
import fnmatch
import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from ebpfmon import events as ev
from ebpfmon.host.cgroups import AgentLayout
from ebpfmon.kernel.abi import EGRESS_RANGES
from ebpfmon.policy.profiles import PortRange, judged_address, merged

REACHED = (0, -errno.EINPROGRESS)


@dataclass
class Seen:
    """One destination (address and protocol) and what reached it."""

    ports: set[int] = field(default_factory=set)
    count: int = 0
    first_ns: int = 0
    programs: set[str] = field(default_factory=set)


@dataclass
class Learned:
    agents: str  # the glob
    events: int = 0  # of the agents, in the time asked
    destinations: dict[tuple[str, str], Seen] = field(default_factory=lambda: defaultdict(Seen))
    # names the proxy answered, with what was reached at their addresses (by protocol)
    names: dict[tuple[str, str], Seen] = field(default_factory=lambda: defaultdict(Seen))
    looked_up: set[str] = field(default_factory=set)  # names asked that no answer explains a destination of
    first_ns: int = 0
    last_ns: int = 0


def destination(event: ev.Event) -> tuple[str, str, int] | None:
    """(address, protocol, port) of what the event shows reached, or None."""
    if event.kind == "connect" and event.retval in REACHED:
        protocol = event.protocol or "tcp"
    elif event.kind == "udp_send" and event.retval >= 0:
        protocol = "udp"
    else:
        return None
    if event.family not in ("inet", "inet6") or not event.address or protocol not in ("tcp", "udp"):
        return None
    return str(judged_address(ipaddress.ip_address(event.address))), protocol, event.port or 0


def learn(events: Iterable[ev.Event], agents: str, layout: AgentLayout, since_ns: int = 0) -> Learned:
    learned = Learned(agents)
    answered: dict[str, set[str]] = defaultdict(set)  # address -> the names that gave it
    for event in events:
        if event.time_ns < since_ns:
            continue
        agent = layout.agent_of(event.cgroup) or event.cgroup or ""
        if not fnmatch.fnmatchcase(agent, agents):
            continue
        learned.events += 1
        learned.first_ns = learned.first_ns or event.time_ns
        learned.last_ns = event.time_ns
        if getattr(event, "dns_query", None):
            learned.looked_up.add(event.dns_query)
        if event.kind == "dns" and event.verdict in ("answered", "would-refuse"):
            for address in event.answers:
                answered[str(judged_address(ipaddress.ip_address(address)))].add(event.dns_query)
        found = destination(event)
        if found is None or found[2] == 53:
            continue
        address, protocol, port = found
        seen = learned.destinations[(address, protocol)]
        seen.ports.add(port)
        seen.count += 1
        seen.first_ns = seen.first_ns or event.time_ns
        seen.programs.add(event.proc.comm)
    # the proxy's answer may come after the connect it explains in the log (it is judged after
    # the batch it came with), so names are matched to addresses once all is read
    for (address, protocol), seen in list(learned.destinations.items()):
        for name in answered.get(address, ()):
            named = learned.names[(name, protocol)]
            named.ports |= seen.ports
            named.count += seen.count
            named.first_ns = min(named.first_ns or seen.first_ns, seen.first_ns)
            named.programs |= seen.programs
        if address in answered:
            del learned.destinations[(address, protocol)]
    learned.looked_up -= {name for name, _ in learned.names}
    return learned


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ns else "-"


def _flow(value) -> str:
    """A value as YAML on one line, quoted where YAML needs it."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def _entry(where: dict, protocol: str, seen: Seen) -> tuple[dict, str]:
    """An allow entry for where ({"name": ...} or {"cidr": ...}) and what reached it, and its note."""
    ranges = merged(PortRange(p, p) for p in seen.ports if p)
    ports: list = [r.lo if r.lo == r.hi else f"{r.lo}-{r.hi}" for r in ranges]
    note = f"{seen.count} by {', '.join(sorted(seen.programs))}, first {_when(seen.first_ns)}"
    if len(ranges) > EGRESS_RANGES:
        ports = [f"{ranges[0].lo}-{ranges[-1].hi}"]
        note += f"; {len(ranges)} port ranges, widened to one (a profile holds {EGRESS_RANGES})"
    return ({**where, "ports": ports, "proto": protocol} if ports else {**where, "proto": protocol}), note


def profile_yaml(learned: Learned, name: str, mode: str) -> str:
    """The egress section, as YAML with a comment per entry saying what reached it."""
    entries, notes = [], []
    for (host, protocol), seen in sorted(learned.names.items()):
        entry, note = _entry({"name": host}, protocol, seen)
        entries.append(entry)
        notes.append(note)
    for (address, protocol), seen in sorted(learned.destinations.items(),
                                            key=lambda item: (ipaddress.ip_address(item[0][0]).version,
                                                              ipaddress.ip_address(item[0][0]), item[0][1])):
        cidr = f"{address}/{ipaddress.ip_address(address).max_prefixlen}"
        entry, note = _entry({"cidr": cidr}, protocol, seen)
        entries.append(entry)
        notes.append(note)
    head = [
        f"# Learned by ebpfmon policy learn from {learned.events} events of the agents matching "
        f"{learned.agents}, {_when(learned.first_ns)} to {_when(learned.last_ns)}.",
        "# Review it before use: every destination below was reached by those agents, the wanted",
        "# and the unwanted alike. Try it in audit mode first if in doubt (mode: audit).",
    ]
    if learned.looked_up:
        head.append("# DNS names looked up whose addresses nothing reached (add them as names to let them "
                    "resolve): " + ", ".join(sorted(learned.looked_up)))
    lines = ["egress:", "  profiles:", f"    - name: {_flow(name)}", f"      agents: {_flow([learned.agents])}",
             f"      mode: {mode}", "      allow:" if entries else "      allow: []"]
    body = [f"        - {_flow(entry)}  # {note}" for entry, note in zip(entries, notes)]
    return "\n".join(head + lines + body) + "\n"
