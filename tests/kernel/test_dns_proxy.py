"""DNS names in egress profiles, through the daemon's DNS proxy: a daemon of the test's own, a
real DNS server in the test's network namespace (tests/servers/dns_server.py, answering
mirror.test round robin from ten addresses with a TTL of one second), agents that resolve with
dnspython or the C library and connect straight after."""

from __future__ import annotations

import errno
import json
import re
import sys
import threading
import time

import pytest

from helpers import (DNS_SERVER, MIRROR6, MIRROR_PORT as PORT, MIRRORS, NOBODY, UNLISTED, RunningDaemon,
                     connect_from, ebpfmon, make_agent_cgroup, resolve_connect, sent_from)

CONFIG = """\
agent_root: {root}
state_dir: {state}
metrics: {{enabled: false}}
alerts: {{sinks: []}}
egress:
  dns_upstream: ["{upstream}"]
  dns_ttl_floor: {floor}
  profiles:
    - name: mirrors
      agents: ["{root}/web-*"]
      allow:
        - {{name: mirror.test, ports: [{port}], proto: tcp}}
        - {{name: "*.pkg.test", ports: [{port}], proto: tcp}}
    - name: watched
      agents: ["{root}/audit-*"]
      mode: audit
"""

# the C library's resolver (the host's /etc/resolv.conf), as any program resolves
GETADDRINFO = """
import socket, sys
try:
    print(socket.getaddrinfo(sys.argv[1], 0, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
except socket.gaierror as e:
    print("error", e.errno)
"""


class ProxyDaemon(RunningDaemon):
    def start(self, path, floor: int) -> "ProxyDaemon":
        from ebpfmon.config import load_config
        from ebpfmon.service.daemon import Daemon

        path.write_text(CONFIG.format(root=self.root, state=path.parent / "state", upstream=DNS_SERVER, floor=floor,
                                      port=PORT))
        self.daemon = Daemon(load_config(path), path, echo=self.emit)
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.daemon.close()

    def audit_events(self, kind: str) -> list[dict]:
        self.daemon.audit.flush()
        lines = (self.daemon.audit.path.read_text().splitlines() if self.daemon.audit.path.exists() else [])
        return [e for e in map(json.loads, lines) if e.get("kind") == kind]


@pytest.fixture
def proxy(own_root, tmp_path, mirror):
    running = ProxyDaemon(None, own_root, threading.Event()).start(tmp_path / "config.yaml", floor=1)
    yield running
    running.close()


def test_a_resolved_name_connects_on_the_first_try_and_nothing_else_does(proxy, hierarchy, mirror):
    web = make_agent_cgroup(hierarchy, proxy.root, "web")
    # before any answer, no mirror is allowed
    assert connect_from(web, MIRRORS[0], PORT) == errno.EPERM
    # 100 lookups, asking a server that does not exist, each answered by the proxy with the next
    # mirror (round robin), each connected to straight after: all on the first try
    trials = resolve_connect(web, "mirror.test", times=100)
    assert all(t[0] == "NOERROR" and t[2] == 0 for t in trials), [t for t in trials if t[2] != 0]
    assert {t[1] for t in trials} == set(MIRRORS)
    # over TCP too, and a wildcard name
    assert resolve_connect(web, "deb.pkg.test", transport="tcp")[0][0::2] == ["NOERROR", 0]
    # a name not allowed: refused, and the upstream never heard of it; an address no answer gave:
    # refused, by connect and by datagram
    assert resolve_connect(web, "pool.example.net") == [["REFUSED", None, None]]
    assert connect_from(web, UNLISTED, PORT) == errno.EPERM
    assert sent_from(web, UNLISTED, 9999) == errno.EPERM
    assert not any("pool.example.net" in line for line in mirror[0].lines)
    line = proxy.wait_line("DNS name outside the egress profile", "name=pool.example.net")
    assert "verdict=refused" in line and "profile=mirrors" in line and f"server={NOBODY}:53" in line
    # every answer is in the audit log: name, addresses, TTL, and who asked
    events = proxy.audit_events("dns")
    answered = [e for e in events if e["dns_query"] == "mirror.test"]
    assert len(answered) == 100 and all(e["verdict"] == "answered" and e["ttl"] == 1 for e in answered)
    assert {a for e in answered for a in e["answers"]} == set(MIRRORS)
    assert answered[0]["agent"] == web.name and answered[0]["proc"]["comm"].startswith("python")


def test_an_address_expires_with_its_answer_until_the_name_is_resolved_again(proxy, hierarchy, mirror):
    web = make_agent_cgroup(hierarchy, proxy.root, "web")
    [[_, address, result]] = resolve_connect(web, "mirror.test")
    assert result == 0
    time.sleep(2.5)  # TTL 1 s, floor 1 s
    assert connect_from(web, address, PORT) == errno.EPERM
    for _ in MIRRORS:  # round robin: the address comes back within ten answers
        [[_, again, result]] = resolve_connect(web, "mirror.test")
        assert result == 0
        if again == address:
            break
    assert connect_from(web, address, PORT) == 0
    time.sleep(2.5)
    assert proxy.daemon.enforcer.name_grant_list() == []  # forgotten by the daemon, too


def test_ipv6_names_and_the_c_library_resolver(proxy, hierarchy, mirror):
    web = make_agent_cgroup(hierarchy, proxy.root, "web")
    assert connect_from(web, MIRROR6, PORT) == errno.EPERM
    # an IPv6 resolver address, an AAAA answer, an IPv6 connect
    assert resolve_connect(web, "mirror.test", rdtype="AAAA", server="2001:db8::53") == [["NOERROR", MIRROR6, 0]]
    # the C library asks whatever /etc/resolv.conf names: the proxy answers all the same
    out = web.run([sys.executable, "-c", GETADDRINFO, "mirror.test"], text=True, check=True)
    assert out.stdout.strip() in MIRRORS
    out = web.run([sys.executable, "-c", GETADDRINFO, "pool.example.net"], text=True, check=True)
    assert out.stdout.startswith("error")


def test_audit_mode_answers_every_name_and_reports_those_it_would_refuse(proxy, hierarchy, mirror):
    watched = make_agent_cgroup(hierarchy, proxy.root, "audit")
    [[rcode, address, result]] = resolve_connect(watched, "pool.example.net")
    assert rcode == "NOERROR" and address in MIRRORS and result == 0
    line = proxy.wait_line("DNS name outside the egress profile", "name=pool.example.net", "verdict=would-refuse")
    assert "profile=watched" in line
    assert proxy.daemon.metrics.dns_questions.labels("watched", "would-refuse")._value.get() == 1


def test_policy_show_lists_what_names_allow_now_and_without_the_daemon_dns_fails_closed(
        own_root, tmp_path, hierarchy, mirror):
    running = ProxyDaemon(None, own_root, threading.Event()).start(tmp_path / "config.yaml", floor=60)
    web = make_agent_cgroup(hierarchy, own_root, "web")
    [[_, address, result]] = resolve_connect(web, "mirror.test")
    assert result == 0
    out = ebpfmon("policy", "show", "--config", str(tmp_path / "config.yaml"), web.name)
    assert out.returncode == 0, out.stderr
    assert "allow name mirror.test port 8443/tcp" in out.stdout
    assert re.search(rf"allowed now {re.escape(address)} \(resolved from mirror.test, (59|60)s left\)", out.stdout)
    running.close()  # the programs stay, the proxy is gone
    [[failure, _, _]] = resolve_connect(web, "mirror.test", transport="tcp")
    assert failure == "ConnectionRefusedError"
    assert connect_from(web, UNLISTED, PORT) == errno.EPERM  # the policy stays in force
