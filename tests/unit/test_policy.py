"""Egress profiles compiled from the configuration: what the kernel's trie gets, and the same
verdicts judged in Python (ebpfmon policy check)."""

import ipaddress
import re

import pytest

from ebpfmon.config import EgressAllow, EgressProfile, EgressSettings
from ebpfmon.errors import ConfigError
from ebpfmon.kernel.abi import EGRESS_RANGES, EGRESS_UNCLASSIFIED
from ebpfmon.policy.profiles import PortRange, compile_policy, merged, parse_upstream


def policy(*allows: EgressAllow, agents=("/agents/web-*",), default=None, mode="enforce", more=()):
    return compile_policy(EgressSettings(default_profile=default, profiles=(
        EgressProfile("web", agents, mode, allows), *more)))


def test_a_longer_prefix_carries_the_ports_of_every_entry_containing_it():
    web = policy(EgressAllow(cidr="198.51.100.0/24", ports=(443,)),
                 EgressAllow(cidr="198.51.100.0/28", ports=("8000-8999",), proto="tcp"),
                 EgressAllow(cidr="198.51.100.7", ports=(22,), proto="tcp")).profiles[0]
    prefixes = {str(k): v for k, v in web.prefixes.items()}
    assert prefixes["198.51.100.7/32"] == (PortRange(443, 443), PortRange(22, 22, 6), PortRange(8000, 8999, 6))
    assert prefixes["198.51.100.0/28"] == (PortRange(443, 443), PortRange(8000, 8999, 6))
    assert prefixes["198.51.100.0/24"] == (PortRange(443, 443),)
    # the verdicts the kernel reaches through the trie, with the entry that decided
    assert web.decide("198.51.100.7", 22).where == "egress.profiles[0].allow[2]"
    assert web.decide("198.51.100.7", 443).where == "egress.profiles[0].allow[0]"
    assert web.decide("198.51.100.7", 8080).where == "egress.profiles[0].allow[1]"
    assert web.decide("198.51.100.7", 22, "udp") is None
    assert web.decide("198.51.100.200", 8080) is None


def test_ranges_merge_and_a_range_for_both_protocols_covers_one_for_either():
    assert merged([PortRange(80, 90), PortRange(91, 95), PortRange(85, 86, 6), PortRange(100, 100, 17)]) == (
        PortRange(80, 95), PortRange(100, 100, 17))


def test_ipv4_mapped_ipv6_is_judged_as_ipv4_both_ways():
    web = policy(EgressAllow(cidr="::ffff:203.0.113.0/120", ports=(443,))).profiles[0]
    assert [str(n) for n in web.prefixes] == ["203.0.113.0/24"]
    assert web.decide("203.0.113.9", 443) and web.decide("::ffff:203.0.113.9", 443)
    assert web.decide("2001:db8::1", 443) is None


def test_which_profile_an_agent_gets():
    closed = EgressProfile("closed")
    p = policy(EgressAllow(cidr="192.0.2.0/24"), default="closed", more=(closed,))
    assert p.profile_for("/agents/web-1").name == "web"
    assert p.profile_for("/agents/batch-1").name == "closed"
    assert p.classified_only  # a glob names agents: unclassified ones wait, refused
    assert p.names == {EGRESS_UNCLASSIFIED: "unclassified", 1: "web", 2: "closed"}
    only_default = compile_policy(EgressSettings(default_profile="closed", profiles=(closed,)))
    assert not only_default.classified_only and only_default.profile_for("/agents/x").name == "closed"
    assert compile_policy(EgressSettings()).profile_for("/agents/x") is None  # no policy: as before


@pytest.mark.parametrize("allow, message", [
    (EgressAllow(cidr="198.51.100.9/24"), "allow[0].cidr: '198.51.100.9/24' has host bits set: write 198.51.100.0/24"),
    (EgressAllow(cidr="example.org"), "allow[0].cidr: 'example.org' is not an IP address or network"),
    (EgressAllow(cidr="192.0.2.1", ports=(0,)), "allow[0].ports[0]: 0: ports are 1 to 65535"),
    (EgressAllow(cidr="192.0.2.1", ports=("http",)), "allow[0].ports[0]: 'http' is not a port"),
    (EgressAllow(cidr="192.0.2.1", proto="icmp"), "allow[0].proto: 'icmp' is not tcp or udp"),
    (EgressAllow(), "allow[0]: an allow entry needs a cidr or a name"),
    (EgressAllow(cidr="192.0.2.1", name="mirror.test"), "allow[0]: an allow entry needs a cidr or a name (one"),
    (EgressAllow(name="*"), "allow[0].name: '*' is not a DNS name"),
    (EgressAllow(name="mirror..test"), "allow[0].name: 'mirror..test' is not a DNS name"),
    (EgressAllow(name="a.*.test"), "allow[0].name: 'a.*.test' is not a DNS name"),
])
def test_a_bad_entry_says_where_and_what(allow, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        policy(allow)


def test_names_match_exactly_or_below_a_wildcard_and_give_their_ports():
    web = policy(EgressAllow(name="Mirror.Test.", ports=(443,)), EgressAllow(name="*.pkg.test", ports=(80, 443)),
                 EgressAllow(name="*.test", ports=(22,), proto="tcp"), EgressAllow(cidr="198.51.100.0/24",
                                                                                  ports=(8080,))).profiles[0]
    assert web.name_entry("mirror.test.").pattern == "mirror.test"
    assert web.name_entry("MIRROR.test").where == "egress.profiles[0].allow[0]"
    assert web.name_entry("deb.pkg.test").pattern == "*.pkg.test"
    assert web.name_entry("a.b.pkg.test").pattern == "*.pkg.test"
    assert web.name_entry("pkg.test").pattern == "*.test"  # a wildcard is below its domain, not the domain
    assert web.name_entry("mirror.example") is None and web.name_entry("test") is None
    # every matching entry gives its ports; the trie's own prefixes keep theirs
    assert web.name_ranges("deb.pkg.test") == (PortRange(80, 80), PortRange(443, 443), PortRange(22, 22, 6))
    assert web.static_ranges(ipaddress.ip_address("198.51.100.9")) == (PortRange(8080, 8080),)
    assert web.static_ranges(ipaddress.ip_address("203.0.113.9")) == ()
    assert policy().resolves_names and not policy(mode="off").resolves_names


@pytest.mark.parametrize("server, expected", [
    ("198.51.100.53", ("198.51.100.53", 53)), ("198.51.100.53:5353", ("198.51.100.53", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)), ("[2001:db8::53]:5353", ("2001:db8::53", 5353))])
def test_upstream_servers_are_addresses_with_an_optional_port(server, expected):
    assert parse_upstream(server) == expected


@pytest.mark.parametrize("settings, message", [
    (EgressSettings(dns_upstream=("dns.example",)), r"egress.dns_upstream\[0\]: 'dns.example' is not a server"),
    (EgressSettings(dns_upstream=("192.0.2.1:0",)), r"egress.dns_upstream\[0\]: '192.0.2.1:0': the port"),
    (EgressSettings(dns_refuse_with="drop"), "egress.dns_refuse_with: 'drop' is not one of refused, nxdomain"),
    (EgressSettings(dns_ttl_floor=-1), "egress.dns_ttl_floor: seconds"),
    (EgressSettings(dns_proxy_port=70000), "egress.dns_proxy_port: a port")])
def test_dns_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        compile_policy(settings)


def test_more_port_ranges_than_the_kernel_holds_for_one_prefix_is_an_error():
    apart = tuple(range(1000, 1000 + 2 * (EGRESS_RANGES + 1), 2))  # no two adjacent: none merge
    with pytest.raises(ConfigError, match=fr"allow\[0\]: {EGRESS_RANGES + 1} port ranges apply to 192\.0\.2\.0/24"):
        policy(EgressAllow(cidr="192.0.2.0/24", ports=apart))
    assert policy(EgressAllow(cidr="192.0.2.0/24", ports=tuple(range(1000, 1000 + EGRESS_RANGES))))  # merged: one


def test_names_and_modes_are_checked():
    with pytest.raises(ConfigError, match=r"profiles\[1\]\.name: a second profile named 'web'"):
        policy(more=(EgressProfile("web"),))
    with pytest.raises(ConfigError, match=r"profiles\[0\]\.mode: 'block' is not one of off, audit, enforce"):
        policy(mode="block")
    with pytest.raises(ConfigError, match="egress.default_profile: no profile is named 'nope'"):
        policy(default="nope")


def test_a_hundred_thousand_prefixes_compile():
    allows = [EgressAllow(cidr=str(ipaddress.ip_address("10.0.0.0") + 256 * i) + "/24", ports=(443,))
              for i in range(100_000)]
    web = policy(EgressAllow(cidr="10.0.0.0/8", ports=(22,)), *allows).profiles[0]
    prefixes = web.prefixes
    assert len(prefixes) == 100_001
    assert prefixes[ipaddress.ip_network("10.1.134.0/24")] == (PortRange(22, 22), PortRange(443, 443))


def test_learning_takes_what_was_reached_and_writes_a_profile_that_compiles(tmp_path):
    import yaml

    from ebpfmon import events as ev
    from ebpfmon.config import load_config
    from ebpfmon.host.cgroups import AgentLayout
    from ebpfmon.alerts.audit import audit_files
    from ebpfmon.policy.learn import learn, profile_yaml

    def proc():
        return ev.Process(pid=7, tid=7, ppid=1, uid=0, gid=0, comm="curl")

    def connect(address, port, retval=0, at=1):
        return ev.ConnectEvent(time_ns=at, cgroup_id=1, cgroup="/agents/web-1/task", proc=proc(),
                               address=address, port=port, protocol="tcp", retval=retval)

    events = [
        connect("198.51.100.7", 443), connect("198.51.100.7", 443, -115), connect("::ffff:198.51.100.8", 80),
        connect("198.51.100.9", 22, -111),  # refused by the host: not reached, not learned
        ev.UdpSendEvent(time_ns=2, cgroup_id=1, cgroup="/agents/web-1", proc=proc(), address="192.0.2.53", port=53,
                        protocol="udp", retval=30, dns_query="mirror.example"),
        ev.RefusedEvent(time_ns=3, cgroup_id=1, cgroup="/agents/web-1", proc=proc(), reason="egress", op="connect",
                        dry_run=True, family="inet", address="203.0.113.4", port=8443, protocol="tcp"),
        ev.RefusedEvent(time_ns=3, cgroup_id=1, cgroup="/agents/web-1", proc=proc(), reason="egress", op="connect",
                        dry_run=False, family="inet", address="203.0.113.5", port=22, protocol="tcp"),
        *[connect("192.0.2.80", port) for port in range(1000, 1020, 2)],  # 10 ports apart: widened
        # the proxy's answer, logged after the connects to its address: learned as the name
        connect("198.51.100.30", 443), connect("198.51.100.31", 8443),
        ev.DnsEvent(time_ns=4, cgroup_id=1, cgroup="/agents/web-1", proc=proc(), dns_query="deb.mirror.test",
                    qtype="A", verdict="answered", answers=["198.51.100.30", "198.51.100.31"], ttl=60),
        ev.DnsEvent(time_ns=4, cgroup_id=1, cgroup="/agents/web-1", proc=proc(), dns_query="evil.test",
                    qtype="A", verdict="refused"),
        connect("198.51.100.66", 443, at=0),  # before --since
        ev.ConnectEvent(time_ns=5, cgroup_id=2, cgroup="/agents/batch-1", proc=proc(), address="198.51.100.99",
                        port=443, retval=0),  # another agent
    ]
    learned = learn(events, "/agents/web-*", AgentLayout("/agents"), since_ns=1)
    text = profile_yaml(learned, "web", "audit")
    allows = yaml.safe_load(text)["egress"]["profiles"][0]["allow"]
    assert {(a.get("cidr") or a["name"], tuple(a.get("ports", ())), a["proto"]) for a in allows} == {
        ("192.0.2.80/32", ("1000-1018",), "tcp"), ("198.51.100.7/32", (443,), "tcp"),
        ("198.51.100.8/32", (80,), "tcp"),  # audit mode's would-refuse: the connect beside it decides
        ("deb.mirror.test", (443, 8443), "tcp")}  # DNS itself (192.0.2.53:53) goes to the proxy: left out
    assert "whose addresses nothing reached" in text and "mirror.example, evil.test" not in text
    assert "evil.test, mirror.example" in text and "widened to one" in text and "2 by curl" in text
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert compile_policy(load_config(config).egress).profiles[0].decide("198.51.100.7", 443)
    for name in ("events.jsonl", "events.jsonl.2", "events.jsonl.1", "events.jsonl.old"):
        (tmp_path / name).write_text("")
    assert [p.name for p in audit_files(tmp_path)] == ["events.jsonl.2", "events.jsonl.1", "events.jsonl"]
