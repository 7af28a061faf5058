"""Containment on real agents: real processes against real servers in a netns,
refused or cut by the kernel, recorded, released."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from helpers import (CONNECT, OPEN_PORTS, REPO, SSH_OPTS, AgentCgroup, connect_from, ebpfmon, free_port,
                     gpu_policy_of, line_of, make_agent_cgroup, remove_cgroup_tree, wait_for)


SEND = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', int(sys.argv[1])))"


def test_the_daemons_hooks_give_connects_and_sends_their_socket_type(containment_daemon, contained_agent):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert connect_from(contained_agent, "127.0.0.1", port) == 0
        contained_agent.run([sys.executable, "-c", SEND, str(port + 1)], check=True)
    finally:
        listener.close()
    containment_daemon.wait_line("connect tcp", f"127.0.0.1:{port} ")
    containment_daemon.wait_line("send udp", f"127.0.0.1:{port + 1} ")


def test_io_uring_connects_are_seen_and_refused_by_the_hooks(containment_daemon, contained_agent, stratum_pool,
                                                            uring_connect):
    # io_uring never enters connect(2): no tracepoint fires, the cgroup hooks still do
    agent = contained_agent.name.split("/")[-1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        out = contained_agent.run([str(uring_connect), "127.0.0.1", str(port)], text=True, check=True)
    finally:
        listener.close()
    assert out.stdout.strip() == "0"
    containment_daemon.wait_line(agent, f"connect tcp 127.0.0.1:{port} ", "(cgroup hook, result unknown)")
    # and it is refused like any connect to a pool port, before any packet
    before = len(stratum_pool.accepted)
    out = contained_agent.run([str(uring_connect), stratum_pool.host, str(stratum_pool.port)], text=True,
                              check=True)
    assert int(out.stdout) == -errno.EPERM
    containment_daemon.wait_line(agent, "REFUSED connect", f"{stratum_pool.host}:{stratum_pool.port}")
    assert stratum_pool.accepted_since(before) == []
    # a refused connect is not also a connection made (rules would act on one)
    made = f"connect tcp {stratum_pool.host}:{stratum_pool.port} "
    assert not [line for line in containment_daemon.lines if agent in line and made in line]


POOL_ADDRESS = "198.51.100.7"  # what the fake DNS server says every name is; nothing listens there
LOOKUP = """
import socket, sys, dns.message
query = dns.message.make_query(sys.argv[1], "A").to_wire()
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(query, (sys.argv[2], 53))
"""


@pytest.fixture(scope="session")
def dns_server(netns_host):
    server = netns_host.popen([sys.executable, str(REPO / "tests/servers/dns_server.py"), netns_host.address, "53",
                               POOL_ADDRESS], stdout=subprocess.PIPE, text=True)
    assert line_of(server.stdout).strip() == "listening"
    yield netns_host.address
    server.kill()
    server.wait()


def test_looking_up_a_pool_denies_its_addresses_to_every_agent(containment_daemon, hierarchy, dns_server):
    looker = make_agent_cgroup(hierarchy, containment_daemon.root)
    other = make_agent_cgroup(hierarchy, containment_daemon.root)
    try:
        # before: nothing refuses the address (nothing answers there either: a timeout)
        assert connect_from(other, POOL_ADDRESS, 443) != errno.EPERM
        looker.run([sys.executable, "-c", LOOKUP, "eu.pool.supportxmr.com", dns_server], check=True)
        containment_daemon.wait_line("DNS lookup of a mining pool", looker.name.split("/")[-1])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the daemon asks the agent's server itself, in the background
            record = containment_daemon.containment.store.active_for(looker.name)
            if record and f"{POOL_ADDRESS}/32" in record.denied_networks:
                break
            time.sleep(0.05)
        assert f"{POOL_ADDRESS}/32" in record.denied_networks, record.actions
        # after: another agent, which looked nothing up, is refused at once
        assert connect_from(other, POOL_ADDRESS, 443) == errno.EPERM
        containment_daemon.wait_line("REFUSED connect", other.name.split("/")[-1], f"{POOL_ADDRESS}:443")
    finally:
        containment_daemon.containment.release(looker.name, "test", "done")
        remove_cgroup_tree(looker.path)
        remove_cgroup_tree(other.path)
    # released: the address is open again
    later = make_agent_cgroup(hierarchy, containment_daemon.root)
    try:
        assert connect_from(later, POOL_ADDRESS, 443) != errno.EPERM
    finally:
        remove_cgroup_tree(later.path)


def test_pool_connect_refused_for_agents_only(containment_daemon, contained_agent, agent_cgroup, stratum_pool):
    client = str(REPO / "tests/servers/stratum_client.py")
    before = len(stratum_pool.accepted)
    out = contained_agent.run([sys.executable, client, stratum_pool.host, str(stratum_pool.port)], text=True)
    assert out.returncode != 0 and "PermissionError" in out.stderr  # EPERM, before any packet
    line = containment_daemon.wait_line("Connection refused by policy", contained_agent.name.split("/")[-1])
    assert "reason=port" in line and f"to={stratum_pool.host}:{stratum_pool.port}" in line
    assert stratum_pool.accepted_since(before) == []  # the pool saw nothing
    before = len(stratum_pool.accepted)
    # the same client from a cgroup outside the contained agent root connects
    out = agent_cgroup.run([sys.executable, client, stratum_pool.host, str(stratum_pool.port)], text=True)
    assert out.stdout.strip() == "00000000", out.stderr
    wait_for(lambda: len(stratum_pool.accepted) == before + 1, "the pool's accept of the outside client")


def test_loopback_pool_port_stays_open(containment_daemon, contained_agent):
    # the deny list is for the outside: a local dev server on 4444 is fine
    with socket.socket() as server:
        server.bind(("127.0.0.1", 4444))
        server.listen()
        assert connect_from(contained_agent, "127.0.0.1", 4444) == 0


def reverse_port_open(netns_host, port: int) -> bool:
    probe = netns_host.popen([sys.executable, "-c", CONNECT, "127.0.0.1", str(port)], stdout=subprocess.PIPE,
                             text=True)
    return probe.communicate(timeout=10)[0].strip() == "0"


def test_reverse_tunnel_is_cut_before_it_carries_anything(containment_daemon, contained_agent, sshd, netns_host):
    agent = contained_agent.name
    out = contained_agent.run(["ssh", "-i", str(sshd), *SSH_OPTS, "-N", "-R", "2222:127.0.0.1:22",
                               f"root@{netns_host.address}"], text=True, timeout=30)
    assert out.returncode != 0  # ssh could not reach sshd: cut first
    assert not reverse_port_open(netns_host, 2222)  # sshd never opened the reverse end: zero bytes crossed
    containment_daemon.wait_line("CRITICAL", "Reverse SSH tunnel", agent.split("/")[-1])
    containment_daemon.wait_line("cut_network applied on", agent)
    record = containment_daemon.containment.store.active_for(agent)
    assert record.rule == "Reverse SSH tunnel" and record.cut
    assert record.event["argv"][:3] == ["ssh", "-i", str(sshd)]
    # cut both ways, for every process of the agent, loopback included: no local service either
    assert connect_from(contained_agent, netns_host.address, 22) == errno.EPERM
    containment_daemon.wait_line("Connection refused by policy", "reason=cut", agent.split("/")[-1])
    with socket.create_server(("127.0.0.1", 0)) as local_service:
        assert connect_from(contained_agent, "127.0.0.1", local_service.getsockname()[1]) == errno.EPERM
        assert connect_from(contained_agent, "::ffff:127.0.0.1", local_service.getsockname()[1]) == errno.EPERM
    # release (as `ebpfmon quarantine release` does through the socket) restores it
    from ebpfmon.service import control

    answer = control.request(containment_daemon.daemon.config.state_dir,
                             {"cmd": "release", "agent": agent, "reason": "test over"})
    assert answer["ok"] and answer["record"]["status"] == "released"
    assert connect_from(contained_agent, netns_host.address, 22) == 0


# many rollouts of one policy misbehave at once: the reverse ports the tunnels ask for
RUSH = 50


def test_fifty_agents_opening_the_same_tunnel_then_the_same_miner_are_all_contained(
        containment_daemon, hierarchy, sshd, netns_host, stratum_pool, tmp_path):
    agents = [make_agent_cgroup(hierarchy, containment_daemon.root) for _ in range(RUSH)]
    store = containment_daemon.containment.store
    try:
        tunnels = [agent.popen(["ssh", "-i", str(sshd), *SSH_OPTS, "-N", "-R", f"{2300 + i}:127.0.0.1:22",
                                f"root@{netns_host.address}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i, agent in enumerate(agents)]
        # each ssh fails (cut before its connect), or hangs (cut after its TCP handshake: every
        # packet since is dropped); none may get as far as the reverse forward
        deadline = time.monotonic() + 30
        while any(t.poll() is None for t in tunnels) and time.monotonic() < deadline:
            time.sleep(0.2)
        cut = containment_daemon.daemon.enforcer.cut_agents()
        assert sum(bool(cut.get(a.id)) for a in agents) == RUSH
        assert all(t.returncode != 0 for t in tunnels if t.returncode is not None)
        probe = netns_host.popen([sys.executable, "-c", OPEN_PORTS, *(str(2300 + i) for i in range(RUSH))],
                                 stdout=subprocess.PIPE, text=True)
        assert probe.communicate(timeout=120)[0].strip() == "[]"  # no reverse end ever listened
        for tunnel in tunnels:
            if tunnel.poll() is None:
                tunnel.kill()
                tunnel.wait()
        deadline = time.monotonic() + 30
        while sum(bool(store.active_for(a.name)) for a in agents) < RUSH and time.monotonic() < deadline:
            time.sleep(0.1)
        cut = containment_daemon.daemon.enforcer.cut_agents()
        assert sum(bool(cut.get(a.id)) for a in agents) == RUSH
        assert not containment_daemon.containment.breaker.active()
        # then the same miner in each (fresh records: released first)
        for agent in agents:
            containment_daemon.containment.release(agent.name, "test", "next wave")
        miner = fake_program(tmp_path, "xmrig")
        pool_before = len(stratum_pool.accepted)
        miners = [agent.popen([str(miner), "30"]) for agent in agents]
        assert [m.wait(timeout=60) for m in miners] == [-9] * RUSH  # each killed
        deadline = time.monotonic() + 30
        while sum(bool(store.active_for(a.name)) for a in agents) < RUSH and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(bool((r := store.active_for(a.name)) and r.cut) for a in agents) == RUSH
        assert all(connect_from(a, stratum_pool.host, stratum_pool.port) == errno.EPERM for a in agents[:5])
        assert len(stratum_pool.accepted) == pool_before
    finally:
        for agent in agents:
            if store.active_for(agent.name):
                containment_daemon.containment.release(agent.name, "test", "done")
            remove_cgroup_tree(agent.path)


def test_a_cut_stops_an_established_connection(containment_daemon, contained_agent, netns_host):
    # an established TCP connection stops carrying data when its agent is cut
    echo = netns_host.popen([sys.executable, "-c", (
        "import socket\ns=socket.create_server(('198.51.100.2', 7000))\nprint('up', flush=True)\n"
        "c,_=s.accept()\nwhile (d := c.recv(100)): c.sendall(d)")], stdout=subprocess.PIPE, text=True)
    assert line_of(echo.stdout).strip() == "up"
    client = contained_agent.popen([sys.executable, "-u", "-c", (
        "import socket, sys\nc=socket.create_connection(('198.51.100.2', 7000))\nc.settimeout(2)\n"
        "for line in sys.stdin:\n"
        "    try:\n        c.sendall(line.encode()); print(c.recv(100).decode().strip(), flush=True)\n"
        "    except OSError as e:\n        print('error', e.errno or 'timeout', flush=True)")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        client.stdin.write("one\n")
        client.stdin.flush()
        assert line_of(client.stdout).strip() == "one"
        containment_daemon.containment.cut(contained_agent.name, "test", "established connection")
        client.stdin.write("two\n")
        client.stdin.flush()
        assert line_of(client.stdout).strip().startswith("error")  # dropped: no echo comes back
        record = containment_daemon.containment.store.active_for(contained_agent.name)
        assert any(c["remote"] == "198.51.100.2:7000" and c["state"] == "established" for c in record.connections)
    finally:
        client.kill()
        echo.kill()
        containment_daemon.containment.release(contained_agent.name, "test", "done")


def gpu_open(cgroup, path) -> str:
    code = ("import os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDWR)); print('ok')\n"
            "except OSError as e:\n    print(e.errno)")
    return cgroup.run([sys.executable, "-c", code, str(path)], text=True).stdout.strip()


def test_gpu_refused_by_number_whatever_the_path(containment_daemon, contained_agent, hierarchy, fake_gpu_dir,
                                                 tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to(fake_gpu_dir / "nvidia0")
    twin = tmp_path / "twin"
    os.mknod(twin, 0o666 | 0o020000, os.makedev(195, 0))
    for path in (fake_gpu_dir / "nvidia0", link, twin):
        assert gpu_open(contained_agent, path) == str(errno.EPERM), path
    line = containment_daemon.wait_line("GPU refused by policy", contained_agent.name.split("/")[-1])
    assert "device=195:0" in line and "vendor=nvidia" in line
    # an entitled agent (gpu-*) reaches the driver: ENXIO, there is none here
    name = f"{containment_daemon.root}/gpu-{uuid.uuid4().hex[:6]}"
    entitled = AgentCgroup(name, hierarchy.ensure(name), hierarchy.cgroup_id(name))
    try:
        # the kernel's cgroup_mkdir event reaches the daemon, which grants the new agent its GPUs
        assert gpu_policy_of(containment_daemon, entitled) == (True, None)
        assert gpu_open(entitled, twin) == str(errno.ENXIO)
        # a relative open (dirfd) escapes the path probes; the device hook still reports it
        code = ("import os, sys\nd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n"
                "    os.open('twin', os.O_RDONLY, dir_fd=d)\nexcept OSError as e:\n    print(e.errno)")
        assert entitled.run([sys.executable, "-c", code, str(tmp_path)], text=True).stdout.strip() == \
            str(errno.ENXIO)
        containment_daemon.wait_line(entitled.name.split("/")[-1], "device 195:0 (nvidia) r (cgroup hook)")
    finally:
        remove_cgroup_tree(entitled.path)


def test_containment_never_touches_root_or_outsiders(containment_daemon, test_root):
    from ebpfmon.errors import ContainmentRefused

    c = containment_daemon.containment
    for target, why in (("/", "root cgroup"), (test_root, "not an agent cgroup"),
                        (containment_daemon.root, "not an agent cgroup"),
                        (f"{containment_daemon.root}/missing", "does not exist")):
        with pytest.raises(ContainmentRefused, match=why):
            c.cut(target, "test", "must be refused")
    assert c.enforcer.cut_agents() == {}


def test_refused_verdicts_become_alerts(containment_daemon, test_root):
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict

    event = make_event({"exec": {"argv": ["ssh", "-R", "1:h:2", "x"], "cgroup": f"{test_root}/elsewhere"}}, 0)
    verdict = Verdict("Reverse SSH tunnel", "CRITICAL", "out", [], ["cut_network"], True, test_root, event)
    notices = containment_daemon.containment.apply(verdict)
    assert notices[0].priority == "CRITICAL" and "not an agent cgroup" in notices[0].message


def test_the_breaker_suspends_a_misfiring_rule_and_the_others_go_on(containment_daemon, hierarchy):
    from ebpfmon.containment.actions import Containment
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict
    import dataclasses

    daemon = containment_daemon.daemon
    config = dataclasses.replace(daemon.config, enforce=dataclasses.replace(
        daemon.config.enforce, breaker_agents=3, breaker_fraction=0.0, breaker_resume_seconds=3600))
    containment = Containment(daemon.enforcer, hierarchy, config, containment_daemon.containment.store)
    agents = [make_agent_cgroup(hierarchy, containment_daemon.root) for _ in range(7)]

    def verdict(rule, agent, never_suspend=False):
        event = make_event({"exec": {"argv": ["nmap", "10.0.0.0/24"], "cgroup": agent.name}}, 0)
        return Verdict(rule, "ERROR", "scan", [], ["cut_network"], True, agent.name, event,
                       never_suspend=never_suspend)

    try:
        results = [containment.apply(verdict("Misfiring", agent)) for agent in agents[:5]]
        cut = daemon.enforcer.cut_agents()
        assert [bool(cut.get(a.id)) for a in agents[:5]] == [True, True, True, False, False]
        page = results[3][0]
        assert page.priority == "CRITICAL" and "rule 'Misfiring' contained 3 agents" in page.message
        assert "ebpfmon rules resume 'Misfiring'" in page.message and "the other rules go on" in page.message
        assert results[4][0].priority == "NOTICE" and "suspended" in results[4][0].message  # paged once
        # another rule still contains, and one marked never_suspend is never counted
        containment.apply(verdict("Reverse SSH tunnel", agents[3]))
        for agent in agents[4:]:
            containment.apply(verdict("Mining pool URL in arguments", agent, never_suspend=True))
        cut = daemon.enforcer.cut_agents()
        assert all(cut.get(a.id) for a in agents[3:])
        assert list(containment.breaker.active()) == ["Misfiring"]
        assert containment.breaker.resume("Misfiring") and not containment.breaker.active()
    finally:
        for agent in agents:
            if containment.store.active_for(agent.name):
                containment.release(agent.name, "test", "done")
            remove_cgroup_tree(agent.path)


def fake_program(tmp_path, name: str):
    """A harmless program under a telling name: a copy of sleep."""
    path = tmp_path / name
    path.write_bytes(open("/bin/sleep", "rb").read())
    path.chmod(0o755)
    return path


def test_kill_and_cut_a_miner(containment_daemon, contained_agent, tmp_path):
    miner = contained_agent.popen([str(fake_program(tmp_path, "xmrig")), "30"])
    assert miner.wait(timeout=10) == -9  # SIGKILL from the Miner program started rule
    containment_daemon.wait_line("kill applied on", contained_agent.name)
    record = containment_daemon.containment.store.active_for(contained_agent.name)
    assert record.rule == "Miner program started" and record.cut
    containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_freeze_and_thaw(containment_daemon, contained_agent, tmp_path):
    tool = contained_agent.popen([str(fake_program(tmp_path, "bpftool")), "30"])
    try:
        containment_daemon.wait_line("freeze applied on", contained_agent.name)
        events = (contained_agent.path / "cgroup.events").read_text()
        deadline = time.monotonic() + 5
        while "frozen 1" not in events and time.monotonic() < deadline:
            time.sleep(0.05)
            events = (contained_agent.path / "cgroup.events").read_text()
        assert "frozen 1" in events
        containment_daemon.containment.release(contained_agent.name, "test", "thaw")
        assert (contained_agent.path / "cgroup.freeze").read_text().strip() == "0"
    finally:
        tool.kill()


def test_enforce_false_only_records(containment_daemon, contained_agent):
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict

    event = make_event({"exec": {"argv": ["nmap", "x"], "cgroup": contained_agent.name}}, 0)
    verdict = Verdict("Network scanner started", "ERROR", "scan", [], ["cut_network"], False, contained_agent.name,
                      event)
    notices = containment_daemon.containment.apply(verdict)
    assert "cut_network dry run" in notices[0].message
    assert contained_agent.id not in containment_daemon.daemon.enforcer.cut_agents()
    containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_reconcile_closes_records_of_removed_agents_and_adopts_unrecorded_cuts(containment_daemon, hierarchy):
    from ebpfmon.containment.quarantine import ActionResult, Record

    c = containment_daemon.containment
    # cut, then removed while no daemon ran (the running one closes the records of agents removed
    # under it: test_removed_agents_leave_nothing_behind)
    gone = make_agent_cgroup(hierarchy, containment_daemon.root)
    remove_cgroup_tree(gone.path)
    names = containment_daemon.daemon.stream.enricher.cgroups
    wait_for(lambda: names.path(gone.id) is None, "the daemon saw the removal")  # or it would close the record
    time.sleep(0.2)  # its handling of the removal, which follows, done
    c.enforcer.cut(gone.id, time.time_ns())
    ghost = make_agent_cgroup(hierarchy, containment_daemon.root)  # no record: only a GPU entry left behind
    remove_cgroup_tree(ghost.path)
    wait_for(lambda: names.path(ghost.id) is None, "the daemon saw the second removal")
    time.sleep(0.2)
    c.enforcer.set_gpu(ghost.id, allow=False)
    c.store.add(Record(agent=gone.name, agent_id=gone.id, rule="manual: will vanish", priority="CRITICAL",
                       opened_ns=time.time_ns(), actions=[ActionResult("cut_network", "applied", time.time_ns())]))
    stray = make_agent_cgroup(hierarchy, containment_daemon.root)
    c.enforcer.cut(stray.id, time.time_ns())  # in the kernel, no record: another ebpfmon, a crash...
    try:
        notices = [n.message for n in c.reconcile()]
        assert any("closed the quarantine of " + gone.name in m for m in notices)
        assert any(stray.name in m and "without a record" in m for m in notices)
        assert gone.id not in c.enforcer.cut_agents()
        assert ghost.id not in c.enforcer.gpu_policies()
        assert any("kernel entries" in m and "removed while no daemon ran" in m for m in notices)
        assert c.store.active_for(stray.name).rule == "found cut in the kernel without a record"
    finally:
        c.release(stray.name, "test", "done")
        remove_cgroup_tree(stray.path)


def test_entitled_agent_limited_to_its_own_gpu(containment_daemon, hierarchy, tmp_path):
    own, other = tmp_path / "nvidia1", tmp_path / "nvidia0"
    os.mknod(own, 0o666 | 0o020000, os.makedev(195, 1))
    os.mknod(other, 0o666 | 0o020000, os.makedev(195, 0))
    name = f"{containment_daemon.root}/gpu-limited-{uuid.uuid4().hex[:6]}"
    agent = AgentCgroup(name, hierarchy.ensure(name), hierarchy.cgroup_id(name))
    try:
        assert gpu_policy_of(containment_daemon, agent) == (True, frozenset({1}))
        assert gpu_open(agent, own) == str(errno.ENXIO)  # its GPU: through to the (absent) driver
        assert gpu_open(agent, other) == str(errno.EPERM)  # another's
    finally:
        remove_cgroup_tree(agent.path)


SEND_TO = """
import errno, socket, sys
try:
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    socket.socket(family, socket.SOCK_DGRAM).sendto(b"x", (sys.argv[1], 9))
    print(0)
except OSError as e:
    print(e.errno)
"""


def send_refused(cgroup, host: str) -> bool:
    """A datagram to host:9 from the cgroup: refused by policy (EPERM) or sent (the test netns)."""
    answer = int(cgroup.run([sys.executable, "-c", SEND_TO, host], text=True, check=True).stdout)
    assert answer in (0, errno.EPERM), answer
    return answer == errno.EPERM


def deny_connect(daemon, agent, address: str) -> None:
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict

    event = make_event({"connect": {"address": address, "port": 80, "cgroup": agent.name}}, 0)
    daemon.containment.apply(Verdict("Pool connect", "ERROR", "pool", [], ["deny_connect"], True, agent.name, event))


POOL_LIST = "- list: mining_pool_networks\n  items: [{}]\n  override:\n    items: append\n"


class OwnDaemon:
    """A daemon of the test's own at an agent root of its own, its rules' pool list in a file."""

    def __init__(self, root: str, tmp_path):
        self.root = root
        self.rules = tmp_path / "pools.yaml"
        self.state_dir = tmp_path / "state"
        self.daemon = None
        self.loop = None  # (stop, thread) when it judges events (start(run=True))
        self.lines: list[str] = []  # what it printed: alerts, refusals, containment

    def pools(self, items: str) -> None:
        self.rules.write_text(POOL_LIST.format(items))

    def start(self, deny_networks: tuple[str, ...], notify=None, run: bool = False, **enforce):
        from ebpfmon.config import AlertSettings, Config, EnforceSettings, MetricsSettings, RuleSettings
        from ebpfmon.service.daemon import Daemon

        config = Config(agent_root=self.root, state_dir=str(self.state_dir),
                        rules=RuleSettings(files=(str(self.rules),)),
                        enforce=EnforceSettings(deny_networks=deny_networks, **enforce),
                        alerts=AlertSettings(sinks=()), metrics=MetricsSettings(enabled=False))
        self.daemon = Daemon(config, show_events=self.lines.append, echo=self.lines.append)
        if notify:
            self.daemon.notify = notify
        self.daemon.start()
        if run:
            stop = threading.Event()
            self.loop = (stop, threading.Thread(target=self.daemon.run, args=(stop,), daemon=True))
            self.loop[1].start()
        return self.daemon

    def stop(self) -> None:
        """As at SIGTERM: enforcement and its pins stay."""
        if self.loop:
            self.loop[0].set()
            self.loop[1].join(timeout=10)
            self.loop = None
        self.daemon.close()
        self.daemon = None


@pytest.fixture
def own_daemon(own_root, tmp_path):
    own = OwnDaemon(own_root, tmp_path)
    yield own
    if own.daemon is not None:
        own.stop()  # own_root's removal takes the programs and pins


def test_a_denied_network_opens_only_when_neither_configuration_nor_a_quarantine_holds_it(
        own_daemon, hierarchy, netns_host):
    own_daemon.pools("198.51.100.9")
    daemon = own_daemon.start(deny_networks=("198.51.100.10/32", "198.51.100.13"))
    a, b, c, probe = (make_agent_cgroup(hierarchy, own_daemon.root) for _ in range(4))
    deny_connect(daemon, a, "198.51.100.10")  # configured as well
    deny_connect(daemon, b, "198.51.100.12")
    deny_connect(daemon, c, "198.51.100.12")  # two quarantines hold it
    assert [send_refused(probe, h) for h in ("198.51.100.10", "198.51.100.12", "198.51.100.2")] == \
        [True, True, False]
    daemon.containment.release(a.name, "test", "done")
    daemon.containment.release(b.name, "test", "done")
    assert send_refused(probe, "198.51.100.10")  # the configuration still holds it
    assert send_refused(probe, "198.51.100.12")  # c still holds it
    daemon.containment.release(c.name, "test", "done")
    assert not send_refused(probe, "198.51.100.12")  # no one does
    # a reload that changes the lists opens what left them, denies what came in
    own_daemon.pools("198.51.100.11")
    assert daemon.reload()[0]
    assert [send_refused(probe, h) for h in ("198.51.100.9", "198.51.100.11", "198.51.100.10")] == \
        [False, True, True]
    # a restart with a configuration that no longer names .13: the pinned entry goes, and it is said
    own_daemon.stop()
    said = []
    own_daemon.start(deny_networks=("198.51.100.10/32",), notify=lambda notice: said.append(notice.message))
    assert any("opened 198.51.100.13/32" in line for line in said), said
    assert [send_refused(probe, h) for h in ("198.51.100.13", "198.51.100.10")] == [False, True]


def test_pool_networks_are_refused_from_the_start_and_a_bad_one_is_refused_on_reload(own_daemon, hierarchy,
                                                                                     netns_host):
    own_daemon.pools("198.51.100.9")
    daemon = own_daemon.start(deny_networks=("198.51.100.10/32",))
    agent = make_agent_cgroup(hierarchy, own_daemon.root)
    assert connect_from(agent, "198.51.100.9", 80) == errno.EPERM  # the rules' list
    assert connect_from(agent, "198.51.100.10", 80) == errno.EPERM  # the configuration
    assert connect_from(agent, netns_host.address, 22) != errno.EPERM  # the rest is open (reached the host)
    own_daemon.pools("not-a-network")
    ok, message = daemon.reload()
    assert not ok and "'not-a-network'" in message and "mining_pool_networks" in message
    assert connect_from(agent, "198.51.100.9", 80) == errno.EPERM  # the running set stays


METADATA_LIST = """
- list: metadata_service_addresses
  items: [198.51.100.254, "2001:db8:100::254"]
  override:
    items: replace
"""


def test_deny_connect_on_one_address_of_the_metadata_service_denies_all_of_them(own_daemon, hierarchy,
                                                                               netns_host):
    # the service at documentation addresses in the test's namespace (the rule list, as an
    # operator's rules file would change it), IPv4 and IPv6
    own_daemon.rules.write_text(METADATA_LIST)
    daemon = own_daemon.start(deny_networks=(), run=True)
    agent, other = (make_agent_cgroup(hierarchy, own_daemon.root) for _ in range(2))
    assert not send_refused(agent, "198.51.100.254")  # the first datagram goes: the rule acts on it
    record = wait_for(lambda: daemon.containment.store.active_for(agent.name), "a record for the agent")
    assert record.rule == "Cloud metadata service contacted"
    assert record.denied_networks == ["198.51.100.254/32", "2001:db8:100::254/128"]
    # switching address families does not help: not this agent, not another, not IPv4-mapped
    assert send_refused(agent, "2001:db8:100::254")
    assert send_refused(other, "2001:db8:100::254")
    assert send_refused(other, "::ffff:198.51.100.254")
    assert send_refused(other, "198.51.100.254")
    assert not send_refused(other, "198.51.100.2")  # the rest of the network is not
    # the other agent's attempts were the rule's too: it holds the same networks; released, both open
    wait_for(lambda: daemon.containment.store.active_for(other.name), "a record for the other agent")
    daemon.containment.release(agent.name, "test", "done")
    assert "2001:db8:100::254/128" in daemon.enforcer.denied_networks()
    daemon.containment.release(other.name, "test", "done")
    assert not {"198.51.100.254/32", "2001:db8:100::254/128"} & set(daemon.enforcer.denied_networks())


def test_a_lookup_never_puts_an_internal_address_on_the_shared_deny_list(own_daemon, hierarchy, netns_host):
    # the agent's own DNS server answers a pool name with an internal address (the node's
    # storage, say) and an outside one: only the outside one is denied to every agent
    resolver = "198.51.100.54"
    netns_host.add_address(resolver)
    server = netns_host.popen([sys.executable, str(REPO / "tests/servers/dns_server.py"), resolver, "53",
                               "10.0.0.7", "--aaaa", "2001:db8:100::77"], stdout=subprocess.PIPE, text=True)
    said = []
    try:
        assert line_of(server.stdout).strip() == "listening"
        own_daemon.rules.write_text("")
        daemon = own_daemon.start(deny_networks=(), notify=said.append, run=True)
        looker = make_agent_cgroup(hierarchy, own_daemon.root)
        looker.run([sys.executable, "-c", LOOKUP, "eu.pool.supportxmr.com", resolver], check=True)
        record = wait_for(lambda: (r := daemon.containment.store.active_for(looker.name)) and r.denied_networks
                          and r, "the daemon's own lookup of the pool name, and its deny")
        assert record.rule == "DNS lookup of a mining pool"
        assert record.denied_networks == ["2001:db8:100::77/128"]
        denied = daemon.enforcer.denied_networks()
        assert "2001:db8:100::77/128" in denied and not any(n.startswith("10.0.0.7") for n in denied)
        refused = [a for a in record.actions if a.action == "deny_connect" and a.result == "refused"]
        assert len(refused) == 1 and "10.0.0.7" in refused[0].detail, record.actions
        wait_for(lambda: [n for n in said if n.priority == "CRITICAL" and "10.0.0.7" in n.message],
                 "a CRITICAL notice that names the internal address")
        assert record.cut  # the agent that looked it up is cut all the same
        daemon.containment.release(looker.name, "test", "done")
    finally:
        server.kill()
        server.wait()


MISFIRING = """
- rule: Misfiring test rule
  desc: A rule gone wrong, as a bad edit would make it - every exec of every agent.
  condition: spawned_process
  output: every exec (agent=%agent.name proc=%proc.name)
  priority: WARNING
  actions: [cut_network]
"""


def test_a_misfiring_rule_on_a_live_daemon_is_suspended_and_the_tunnel_rule_still_cuts(
        own_daemon, hierarchy, sshd, netns_host):
    own_daemon.rules.write_text(MISFIRING)
    said = []
    daemon = own_daemon.start(deny_networks=(), notify=said.append, run=True, breaker_agents=10,
                              breaker_fraction=0.0)
    state = ["--state-dir", str(own_daemon.state_dir)]
    agents = [make_agent_cgroup(hierarchy, own_daemon.root) for _ in range(RUSH)]
    for agent in agents:
        agent.run(["true"], check=True)
    store = daemon.containment.store
    page = wait_for(lambda: [n for n in said if n.priority == "CRITICAL" and "containment breaker" in n.message],
                    "the breaker's page")
    assert len(page) == 1 and "'Misfiring test rule' contained 10 agents" in page[0].message
    assert "ebpfmon rules resume 'Misfiring test rule'" in page[0].message
    wait_for(lambda: sum("not acting on" in n.message for n in said) == RUSH - 11, "the rule's later verdicts")
    cut = daemon.enforcer.cut_agents()
    assert sum(bool(cut.get(a.id)) for a in agents) == 10  # the first ten; the eleventh tripped it
    out = ebpfmon("rules", "suspended", *state)
    assert out.returncode == 0 and "Misfiring test rule: suspended" in out.stdout, out.stderr
    # a tunnel afterwards is cut all the same: that rule is not under this rule's breaker
    tunneller = make_agent_cgroup(hierarchy, own_daemon.root)
    tunnel = tunneller.popen(["ssh", "-i", str(sshd), *SSH_OPTS, "-N", "-R", "2399:127.0.0.1:22",
                              f"root@{netns_host.address}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = wait_for(lambda: (r := store.active_for(tunneller.name)) and r.cut and r, "the tunnel's cut")
        assert record.rule == "Reverse SSH tunnel"
        out = ebpfmon("rules", "resume", "Misfiring test rule", *state)
        assert out.returncode == 0 and "contains again" in out.stdout, out.stderr
        assert "no rule is suspended" in ebpfmon("rules", "suspended", *state).stdout
        out = ebpfmon("rules", "resume", "Misfiring test rule", *state)
        assert out.returncode != 0 and "is not suspended" in out.stderr
    finally:
        tunnel.kill()
        tunnel.wait()
        for agent in [*agents, tunneller]:
            if store.active_for(agent.name):
                daemon.containment.release(agent.name, "test", "done")


def test_a_session_on_the_nodes_sshd_leaves_the_agent_and_a_cut_agent_cannot_open_one(
        own_daemon, hierarchy, tmp_path):
    from servers import internet

    port = free_port()
    server, key = internet.start_sshd(internet.Loopback(), tmp_path, port)
    own_daemon.rules.write_text(f"- list: node_ssh_ports\n  items: [{port}]\n  override:\n    items: append\n")
    daemon = own_daemon.start(deny_networks=(), run=True)
    agent, neighbour = (make_agent_cgroup(hierarchy, own_daemon.root) for _ in range(2))
    ssh = ["ssh", "-i", str(key), *SSH_OPTS, "-p", str(port), "root@127.0.0.1", "cat", "/proc/self/cgroup"]
    listener = None
    try:
        # not cut: the session runs, in sshd's cgroup, not the agent's; and it is an alert
        out = agent.run(ssh, text=True)
        assert out.returncode == 0, out.stderr
        assert own_daemon.root not in out.stdout
        wait_for(lambda: [l for l in own_daemon.lines if "Agent connected to the node's SSH server" in l
                          and agent.name.split("/")[-1] in l], "the alert")
        # cut: refused before any packet, and the attempt is an event and an alert
        daemon.containment.cut(agent.name, "test", "a cut agent")
        before = len(own_daemon.lines)
        out = agent.run(ssh, text=True)
        assert out.returncode != 0 and "Operation not permitted" in out.stderr, out.stderr
        wait_for(lambda: [l for l in own_daemon.lines[before:] if "REFUSED connect" in l and f"127.0.0.1:{port}" in l],
                 "the refusal")
        wait_for(lambda: [l for l in own_daemon.lines[before:] if "Agent connected to the node's SSH server" in l
                          and "EPERM" in l], "the alert of the refused attempt")
        # nor can another agent reach what the cut agent listens on, on loopback
        listener = agent.popen([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
        agent_port = int(line_of(listener.stdout))
        assert connect_from(neighbour, "127.0.0.1", agent_port) != 0
        daemon.containment.release(agent.name, "test", "done")
        assert connect_from(neighbour, "127.0.0.1", agent_port) == 0  # released: it is reachable again
    finally:
        if listener:
            listener.kill()
            listener.wait()
        server.kill()
        server.wait()
        if daemon.containment.store.active_for(agent.name):
            daemon.containment.release(agent.name, "test", "done")


LISTEN = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    s.accept()[0].close()
"""


REFUSED_LOOP = """
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.connect_ex((sys.argv[1], 9))
    s.close()
"""


def test_refusals_past_a_cgroups_budget_are_counted_not_sent(containment_daemon, contained_agent, netns_host):
    # a cut agent looping on refused connects must not fill the ring buffer that every other
    # agent's events (and their containment) go through: bench/containment.py measures that
    daemon = containment_daemon.daemon
    daemon.containment.cut(contained_agent.name, "test", "a looping agent")
    stats = daemon.stream.stats
    try:
        daemon.stream.refresh_counters()
        before = (daemon.enforcer.counters()["cut"], stats.throttled["connect"], stats.throttled["refused"])
        contained_agent.run([sys.executable, "-c", REFUSED_LOOP, netns_host.address, "2000"], check=True)
        containment_daemon.wait_line("REFUSED connect", contained_agent.name.split("/")[-1])  # the first ones are
        daemon.stream.refresh_counters()
        after = (daemon.enforcer.counters()["cut"], stats.throttled["connect"], stats.throttled["refused"])
        refused, throttled_connects, throttled_refusals = (a - b for a, b in zip(after, before))
        assert refused == 2000  # every refusal is counted
        # the loop (about a tenth of a second) may cross into a second one-second window, a slow
        # machine into a third: 64 reports each
        assert throttled_connects >= 2000 - 64 * 3 and throttled_refusals >= 2000 - 64 * 3
    finally:
        daemon.containment.release(contained_agent.name, "test", "done")


UNIX_CONNECT = """
import os, socket, sys
os.chdir(sys.argv[1])
s = socket.socket(socket.AF_UNIX)
print(s.connect_ex(sys.argv[2]))
"""


def test_a_container_runtime_socket_is_an_alert_however_its_path_is_spelled(own_daemon, hierarchy, tmp_path):
    # a runtime's API socket (the rules' list, as an operator's file would extend it) reached
    # through a linked directory and a relative path, by a plain script: no runtime CLI
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "var-run").symlink_to(run)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(run / "docker.sock"))
    server.listen(4)
    own_daemon.rules.write_text(f"- list: container_runtime_sockets\n  items: [{run}/docker.sock]\n"
                                "  override:\n    items: append\n")
    own_daemon.start(deny_networks=(), run=True)
    agent = make_agent_cgroup(hierarchy, own_daemon.root)
    try:
        out = agent.run([sys.executable, "-c", UNIX_CONNECT, str(tmp_path), "var-run/docker.sock"], text=True,
                        check=True)
        assert out.stdout.strip() == "0"
        line = wait_for(lambda: [l for l in own_daemon.lines if "Container runtime socket contacted" in l],
                        "the alert")[0]
        assert f"socket={run}/docker.sock" in line and "result=SUCCESS" in line
        wait_for(lambda: [l for l in own_daemon.lines if f"connect unix {run}/docker.sock (given var-run/docker.sock)"
                          in l], "the event, with the path as given")
        # another socket is an event, not this alert
        before = len(own_daemon.lines)
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(run / "other.sock"))
        other.listen(4)
        agent.run([sys.executable, "-c", UNIX_CONNECT, str(run), "other.sock"], check=True)
        agent.run([sys.executable, "-c", UNIX_CONNECT, str(run), "docker.sock"], check=True)  # judged after it
        alerts = wait_for(lambda: [l for l in own_daemon.lines[before:] if "Container runtime socket contacted" in l],
                          "the second alert")
        assert [l for l in own_daemon.lines[before:] if f"connect unix {run}/other.sock" in l]
        assert len(alerts) == 1 and f"socket={run}/docker.sock" in alerts[0]
    finally:
        server.close()


def test_mentioning_a_pool_url_is_not_mining_and_passing_one_is(containment_daemon, contained_agent, tmp_path):
    agent = contained_agent.name.split("/")[-1]
    notes = tmp_path / "notes.txt"
    notes.write_text("the pool was stratum+tcp://pool.example.com:3333\n")
    # the benign twins, real programs: search for it, print it, carry it in a shell's and an
    # interpreter's code; each runs to its end, and is at most a notice
    assert contained_agent.run(["grep", "-c", "stratum+tcp://", str(notes)], text=True).stdout.strip() == "1"
    contained_agent.run(["bash", "-c", "echo stratum+tcp://pool.example.com:3333 >/dev/null"], check=True)
    contained_agent.run([sys.executable, "-c", "print('stratum+tcp://pool.example.com:3333')"], check=True)
    containment_daemon.wait_line("Mining pool URL or miner options mentioned", agent, "print(")  # the last, judged
    assert containment_daemon.containment.store.active_for(contained_agent.name) is None
    # the act: a program (a script, under a harmless name) given the URL as its argument
    script = tmp_path / "trainer"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    miner = contained_agent.popen([str(script), "-o", "stratum+tcp://pool.example.com:3333"])
    assert miner.wait(timeout=10) == -9
    containment_daemon.wait_line("kill applied on", contained_agent.name)
    record = containment_daemon.containment.store.active_for(contained_agent.name)
    assert record.rule == "Mining pool URL in arguments" and record.cut
    containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_a_reverse_forward_hidden_past_the_probes_argument_limit_is_cut(containment_daemon, contained_agent,
                                                                         sshd, netns_host):
    # 70 harmless options first: the kernel's copy stops at 64 arguments, /proc has them all
    padding = ["-o", "Compression=no"] * 35
    tunnel = contained_agent.popen(["ssh", "-i", str(sshd), *SSH_OPTS, *padding, "-N", "-R", "2398:127.0.0.1:22",
                                    f"root@{netns_host.address}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    try:
        containment_daemon.wait_line("Reverse SSH tunnel", contained_agent.name.split("/")[-1])
        record = containment_daemon.containment.store.active_for(contained_agent.name)
        assert record.rule == "Reverse SSH tunnel" and record.cut
        assert record.event["argv_source"] == "proc" and record.event["argv"][-2] == "2398:127.0.0.1:22"
    finally:
        tunnel.kill()
        tunnel.wait()
        if containment_daemon.containment.store.active_for(contained_agent.name):
            containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_a_reverse_forward_written_in_an_ssh_configuration_file_is_cut(containment_daemon, hierarchy, sshd,
                                                                        netns_host, tmp_path):
    common = (f"Host *\n  IdentityFile {sshd}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
              "  BatchMode yes\n  ConnectTimeout 3\n  ExitOnForwardFailure yes\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "fwd.conf").write_text(f"Host {netns_host.address}\n  RemoteForward 2397 127.0.0.1:22\n")
    (tmp_path / "ssh.conf").write_text(f"Include {tmp_path}/extra/*.conf\n" + common)
    (tmp_path / "plain.conf").write_text(common)
    agent, twin = (make_agent_cgroup(hierarchy, containment_daemon.root) for _ in range(2))
    store = containment_daemon.containment.store
    # the benign twin: the same client and server, a configuration without forwards: runs to its end
    out = twin.run(["ssh", "-F", str(tmp_path / "plain.conf"), f"root@{netns_host.address}", "echo", "hi"],
                   text=True)
    assert out.stdout.strip() == "hi", out.stderr
    # the forward only in a file the -F file (relative, from the working directory) includes
    tunnel = agent.popen(["ssh", "-F", "ssh.conf", "-N", f"root@{netns_host.address}"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        containment_daemon.wait_line("Reverse SSH tunnel opened", agent.name.split("/")[-1],
                                     f"config={tmp_path}/extra/fwd.conf:2: remoteforward 2397 127.0.0.1:22")
        record = store.active_for(agent.name)
        assert record and record.cut
        probe = netns_host.popen([sys.executable, "-c", OPEN_PORTS, "2397"], stdout=subprocess.PIPE, text=True)
        assert probe.communicate(timeout=30)[0].strip() == "[]"
        assert store.active_for(twin.name) is None
    finally:
        tunnel.kill()
        tunnel.wait()
        if store.active_for(agent.name):
            containment_daemon.containment.release(agent.name, "test", "done")
        remove_cgroup_tree(agent.path)
        remove_cgroup_tree(twin.path)


def edge_verdict(agent, actions: list[str], event: dict):
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict

    kind, fields = next(iter(event.items()))
    return Verdict("Edge case", "ERROR", "edge", [], actions, True, agent.name,
                   make_event({kind: {**fields, "cgroup": agent.name}}, 0))


def results_of(containment_daemon, agent) -> list[tuple[str, str, str]]:
    record = containment_daemon.containment.store.active_for(agent.name)
    return [(a.action, a.result, a.detail) for a in record.actions]


def test_kill_with_no_process_left_is_a_failure_that_says_so(containment_daemon, contained_agent):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()  # a pid nobody has any more
    try:
        notices = containment_daemon.containment.apply(
            edge_verdict(contained_agent, ["kill"], {"exec": {"argv": ["/bin/true"], "pid": gone.pid}}))
        assert results_of(containment_daemon, contained_agent) == [("kill", "failed", "no process left")]
        assert any(n.priority == "CRITICAL" and "kill failed" in n.message for n in notices)
    finally:
        containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_deny_connect_with_nothing_to_deny_fails_and_denies_nothing(containment_daemon, contained_agent):
    try:
        containment_daemon.containment.apply(
            edge_verdict(contained_agent, ["deny_connect"], {"exec": {"argv": ["curl", "http://x"]}}))
        assert results_of(containment_daemon, contained_agent) == [
            ("deny_connect", "failed", "the event has no destination address")]
        assert containment_daemon.containment.store.active_for(contained_agent.name).denied_networks == []
    finally:
        containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_deny_connect_on_a_pool_name_that_does_not_resolve_says_so(containment_daemon, contained_agent):
    # a name of the .invalid top level domain (RFC 6761), asked of a loopback port where no
    # server listens: no answer, nothing to deny
    lookup = {"udp_send": {"address": "127.0.0.1", "port": 9, "dns_query": "pool.nowhere.invalid", "length": 40}}
    try:
        containment_daemon.containment.apply(edge_verdict(contained_agent, ["deny_connect"], lookup))
        found = wait_for(lambda: [r for r in results_of(containment_daemon, contained_agent) if r[1] == "failed"],
                         "the lookup's outcome")
        assert found == [("deny_connect", "failed", "pool.nowhere.invalid did not resolve at 127.0.0.1:9")]
        assert containment_daemon.containment.store.active_for(contained_agent.name).denied_networks == []
    finally:
        containment_daemon.containment.release(contained_agent.name, "test", "done")


def test_removed_agents_leave_nothing_behind(containment_daemon, hierarchy):
    # rollouts come and go by the thousand: a removed agent's GPU entries, its cut, its names go
    # with its cgroup, and its quarantine record is closed saying why
    daemon = containment_daemon.daemon
    agents = [make_agent_cgroup(hierarchy, containment_daemon.root, prefix="gpu-limited") for _ in range(40)]
    cut = agents[0]
    try:
        for agent in agents:
            assert gpu_policy_of(containment_daemon, agent) == (True, frozenset({1}))
            agent.run(["true"], check=True)
        containment_daemon.containment.cut(cut.name, "test", "to be removed")
        assert cut.id in daemon.enforcer.cut_agents()
    finally:
        for agent in agents:
            remove_cgroup_tree(agent.path)
    ids = {a.id for a in agents}
    wait_for(lambda: not ids & set(daemon.enforcer.gpu_policies()), "the removed agents' GPU entries gone")
    containment_daemon.wait_line("closed the quarantine of", cut.name, "cgroup removed")
    assert cut.id not in daemon.enforcer.cut_agents()
    record = next(r for r in containment_daemon.containment.store.records if r.agent == cut.name)
    assert (record.status, record.released_by, record.release_reason) == (
        "closed", "ebpfmon", "the agent's cgroup was removed")
    assert [a for a in agents if daemon.stream.enricher.cgroups.path(a.id)] == []
    assert [a for a in agents if a.name in daemon.engine.context._agents] == []  # its agent-of-path cache


def test_deny_gpu_refuses_the_agents_next_open_in_the_kernel(containment_daemon, hierarchy, fake_gpu_dir):
    # an agent entitled to GPUs (gpu-*) opens the node; deny_gpu takes that away at once
    agent = make_agent_cgroup(hierarchy, containment_daemon.root, prefix="gpu")
    node = fake_gpu_dir / "nvidia0"
    opener = (f"import errno, os\ntry:\n    os.close(os.open({str(node)!r}, os.O_RDWR))\n    print(0)\n"
              "except OSError as e:\n    print(e.errno)")
    try:
        assert gpu_policy_of(containment_daemon, agent) is not None
        before = int(agent.run([sys.executable, "-c", opener], text=True).stdout)
        assert before != errno.EPERM  # ENXIO: no driver behind the fake node, but the open was let through
        containment_daemon.containment.apply(edge_verdict(agent, ["deny_gpu"], {"exec": {"argv": ["xmrig"]}}))
        assert [r[:2] for r in results_of(containment_daemon, agent)] == [("deny_gpu", "applied")]
        assert int(agent.run([sys.executable, "-c", opener], text=True).stdout) == errno.EPERM
        assert containment_daemon.daemon.enforcer.gpu_policies()[agent.id][0] is False
    finally:
        containment_daemon.containment.release(agent.name, "test", "done")
        remove_cgroup_tree(agent.path)
