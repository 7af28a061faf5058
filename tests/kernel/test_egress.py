"""Egress profiles in the kernel: a daemon of the test's own with profiles in its configuration
file, agents in cgroups under its root, servers on loopback and in the test's network namespace
(198.51.100.2) that count what reached them."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
import time

import pytest

from helpers import (REPO, RunningDaemon, connect_from, free_port, line_of, make_agent_cgroup, remove_cgroup_tree,
                     sent_from, wait_for)

NOWHERE = "198.51.100.3"  # no host there: a connect let through would time out, a refused one fails at once

# connects to 443 and 8022 until stdin has a line, then prints {"PORT ERRNO": count}; paced, so
# the listener keeps up and no connect waits for a full backlog
CONNECT_LOOP = """
import json, select, socket, sys
results = {}
while not select.select([sys.stdin], [], [], 0.002)[0]:
    for port in (443, 8022):
        s = socket.socket()
        s.settimeout(3)
        key = f"{port} {s.connect_ex((sys.argv[1], port))}"
        s.close()
        results[key] = results.get(key, 0) + 1
print(json.dumps(results), flush=True)
"""

PROFILES = """\
agent_root: {root}
state_dir: {state}
metrics: {{enabled: false}}
alerts: {{sinks: []}}
egress:
  default_profile: {default}
  profiles:
    - name: web-only
      agents: ["{root}/web-*"]
      allow:
        - {{cidr: {remote}/32, ports: [443], proto: tcp}}
        - {{cidr: 127.0.0.1, ports: [{local_port}]}}
        - {{cidr: "::1", ports: [{local_port}]}}
{web_extra}
    - name: watched
      agents: ["{root}/audit-*"]
      mode: audit
    - name: closed
"""


class Listener:
    """tests/servers/listener.py on some ports of a host: what reached them."""

    def __init__(self, popen, host: str, ports: list[int]):
        self.host, self.ports = host, ports
        self.proc = popen([sys.executable, str(REPO / "tests/servers/listener.py"), host, *map(str, ports)],
                          stdout=subprocess.PIPE, text=True)
        assert line_of(self.proc.stdout).strip() == "listening"
        self.accepted: list[int] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("accepted ") and line.endswith("\n"):  # not the cut line of a kill
                self.accepted.append(int(line.split()[1]))

    def count(self, port: int, settle: float = 0.3) -> int:
        time.sleep(settle)  # the listener prints its accept after the connect returned
        return self.accepted.count(port)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def remote(netns_host):
    listener = Listener(netns_host.popen, netns_host.address, [443, 8022])
    yield listener
    listener.stop()


@pytest.fixture
def local():
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)
    listener = Listener(subprocess.Popen, "127.0.0.1", ports)
    yield listener
    listener.stop()


def eventually_connects(cgroup, host: str, port: int, timeout: float = 10.0) -> None:
    """Once the daemon has classified the agent (the cgroup's creation reached it)."""
    deadline = time.monotonic() + timeout
    while connect_from(cgroup, host, port) != 0:
        assert time.monotonic() < deadline, f"{cgroup.name} never reached {host}:{port}"
        time.sleep(0.1)


class EgressDaemon(RunningDaemon):
    """The daemon, in this process, on its own root, from a configuration file it reloads."""

    def write(self, **changes) -> None:
        self.path.write_text(PROFILES.format(**{**self.values, **changes}))

    def start(self, path, values, read: bool = True) -> "EgressDaemon":
        from ebpfmon.config import load_config
        from ebpfmon.service.daemon import Daemon

        self.path, self.values = path, values
        self.write()
        self.daemon = Daemon(load_config(path), path, echo=self.emit)
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)
        if read:
            self.thread.start()
        return self

    def read(self) -> None:
        """Starts reading events (a daemon started with read=False has seen none since)."""
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.daemon.close()


def start_egress(own_root, tmp_path, netns_host, local, default: str = "null", read: bool = True) -> EgressDaemon:
    values = {"root": own_root, "state": tmp_path / "state", "remote": netns_host.address,
              "local_port": local.ports[0], "default": default, "web_extra": ""}
    return EgressDaemon(None, own_root, threading.Event()).start(tmp_path / "config.yaml", values, read)


@pytest.fixture
def egress(own_root, tmp_path, netns_host, local):
    running = start_egress(own_root, tmp_path, netns_host, local)
    yield running
    running.close()


def test_a_profile_allows_what_it_lists_and_nothing_else(egress, hierarchy, remote, local):
    web = make_agent_cgroup(hierarchy, egress.root, "web")
    allowed, other = local.ports
    # listed: reached
    before = remote.count(443, settle=0)
    assert connect_from(web, remote.host, 443) == 0 and remote.count(443) == before + 1
    assert connect_from(web, "127.0.0.1", allowed) == 0
    assert connect_from(web, "::1", allowed) == errno.ECONNREFUSED  # let through; the listener is IPv4
    assert connect_from(web, "::ffff:127.0.0.1", allowed) == 0  # IPv4-mapped: judged as IPv4
    # not listed: refused before anything left, loopback included
    before = remote.count(8022, settle=0)
    assert connect_from(web, remote.host, 8022) == errno.EPERM
    assert connect_from(web, NOWHERE, 443) == errno.EPERM
    assert connect_from(web, "127.0.0.1", other) == errno.EPERM
    assert connect_from(web, "::1", other) == errno.EPERM
    assert connect_from(web, "::ffff:127.0.0.1", other) == errno.EPERM
    assert sent_from(web, remote.host, 443) == errno.EPERM  # the 443 entry is tcp only
    assert remote.count(8022) == before and local.count(other) == 0
    # an agent no profile names, with no default profile: no policy
    stranger = make_agent_cgroup(hierarchy, egress.root)
    assert connect_from(stranger, remote.host, 8022) == 0
    line = egress.wait_line("Connection refused by policy", web.name.split("/")[-1], f"{remote.host}:8022")
    assert "reason=egress" in line and "profile=web-only" in line and "dry_run=false" in line
    assert egress.daemon.metrics.egress_refusals.labels("web-only", "refused")._value.get() >= 6


def test_io_uring_connects_meet_the_profile(egress, hierarchy, remote, uring_connect):
    web = make_agent_cgroup(hierarchy, egress.root, "web")
    before = remote.count(8022, settle=0)
    out = web.run([str(uring_connect), remote.host, "8022"], text=True, check=True)
    assert int(out.stdout) == -errno.EPERM and remote.count(8022) == before
    out = web.run([str(uring_connect), remote.host, "443"], text=True, check=True)
    assert int(out.stdout) == 0


def test_audit_mode_lets_through_and_reports(egress, hierarchy, remote):
    watched = make_agent_cgroup(hierarchy, egress.root, "audit")
    before = remote.count(8022, settle=0)
    assert connect_from(watched, remote.host, 8022) == 0
    assert remote.count(8022) == before + 1
    line = egress.wait_line("Connection refused by policy", watched.name.split("/")[-1], f"{remote.host}:8022")
    assert "reason=egress" in line and "profile=watched" in line and "dry_run=true" in line


def test_the_default_profile_takes_every_agent_no_profile_names(own_root, tmp_path, hierarchy, netns_host,
                                                                local, remote):
    running = start_egress(own_root, tmp_path, netns_host, local, default="closed")
    try:
        stranger = make_agent_cgroup(hierarchy, own_root)  # made after the start: the default at once
        assert connect_from(stranger, remote.host, 443) == errno.EPERM
        assert connect_from(stranger, "127.0.0.1", local.ports[0]) == errno.EPERM  # loopback too
        late = make_agent_cgroup(hierarchy, own_root, "web")  # its own profile, once the daemon saw it
        eventually_connects(late, remote.host, 443)
    finally:
        running.close()


def test_reloads_swap_the_whole_policy_and_no_connect_sees_neither(egress, hierarchy, remote):
    """A connect loop runs while the policy flips 100 times between two versions of a profile
    that both allow 443, one of them 8022 too: 443 never fails, 8022 is refused or reached."""
    web = make_agent_cgroup(hierarchy, egress.root, "web")
    loop = web.popen([sys.executable, "-c", CONNECT_LOOP, remote.host], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    widened = f"        - {{cidr: {remote.host}/32, ports: [8022]}}"
    try:
        for i in range(100):
            egress.write(web_extra=widened if i % 2 == 0 else "")
            ok, message = egress.daemon.reload()
            assert ok, message
    finally:
        out, _ = loop.communicate("stop\n", timeout=60)
    results = {tuple(map(int, key.split())): n for key, n in json.loads(out).items()}
    assert set(results) <= {(443, 0), (8022, 0), (8022, errno.EPERM)}, results
    assert results.get((443, 0)) and results.get((8022, 0)) and results.get((8022, errno.EPERM)), results
    assert connect_from(web, remote.host, 8022) == errno.EPERM  # the last reload put the first one back


def test_a_new_agent_is_refused_until_the_daemon_has_classified_it(own_root, tmp_path, hierarchy, netns_host,
                                                                   local, remote):
    """A glob may give a new agent a profile that allows less than the others: until the daemon
    has read its cgroup's creation, it reaches nothing (fail closed)."""
    running = start_egress(own_root, tmp_path, netns_host, local, read=False)
    try:
        stranger = make_agent_cgroup(hierarchy, own_root)  # no glob names it: no policy, once classified
        assert connect_from(stranger, remote.host, 8022) == errno.EPERM
        running.read()
        running.wait_line("Connection refused by policy", "profile=unclassified", f"{remote.host}:8022")
        eventually_connects(stranger, remote.host, 8022)
    finally:
        running.close()


def test_a_removed_agents_classification_goes_with_its_cgroup(egress, hierarchy):
    # agents come and go by the thousand on a node of rollouts: nothing of them may stay
    agents = [make_agent_cgroup(hierarchy, egress.root, prefix="web") for _ in range(20)]
    table = egress.daemon.enforcer.bpf[b"egress_agents"]
    ids = {a.id for a in agents}
    try:
        wait_for(lambda: ids <= {k.agent for k in table.keys()}, "every agent classified")
    finally:
        for agent in agents:
            remove_cgroup_tree(agent.path)
    wait_for(lambda: not ids & {k.agent for k in table.keys()}, "the removed agents' classifications gone")


def test_a_reload_with_a_bad_profile_keeps_the_policy_in_force(egress, hierarchy, remote):
    web = make_agent_cgroup(hierarchy, egress.root, "web")
    eventually_connects(web, remote.host, 443)
    egress.write(web_extra="        - {cidr: 198.51.100.9/24, ports: [8022]}")  # host bits set: refused
    ok, message = egress.daemon.reload()
    assert not ok and "egress.profiles[0].allow[3].cidr" in message and "host bits set" in message
    assert connect_from(web, remote.host, 443) == 0  # the old policy, whole
    assert connect_from(web, remote.host, 8022) == errno.EPERM
    assert egress.daemon.metrics.reload_failures._value.get() == 1
