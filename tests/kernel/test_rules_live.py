"""Rules on live events: real processes in agent cgroups against real servers in a
network namespace (OpenSSH, a fake stratum pool), judged as the daemon judges."""

from __future__ import annotations

import sys

from ebpfmon import events as ev
from ebpfmon.rules.engine import Engine

from helpers import REPO, free_port

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "ExitOnForwardFailure=yes"]


def test_reverse_ssh_tunnel_through_a_real_sshd(monitor, agent_cgroup, sshd, netns_host):
    # -f: ssh authenticates, sets the forward up, then goes to the background
    out = agent_cgroup.run(["ssh", "-i", str(sshd), *SSH_OPTS, "-fN", "-R", "0:localhost:80",
                            f"root@{netns_host.address}"], text=True)
    assert out.returncode == 0, out.stderr
    assert "Allocated port" in out.stderr  # sshd really opened the remote end
    alert = monitor.wait_for_verdict("Reverse SSH tunnel", agent_cgroup.name)
    assert alert.priority == "CRITICAL" and alert.actions == ["cut_network"]
    assert f"host=root@{netns_host.address}" in alert.output
    established = monitor.wait_for_verdict("SSH tunnel established", agent_cgroup.name)
    assert f"to={netns_host.address}:22" in established.output


def test_ssh_local_forward_is_not_an_alert(monitor, agent_cgroup, sshd, netns_host):
    out = agent_cgroup.run(["ssh", "-i", str(sshd), *SSH_OPTS, "-L", f"127.0.0.1:{free_port()}:localhost:80",
                            f"root@{netns_host.address}", "true"], text=True)
    assert out.returncode == 0, out.stderr
    # the connect to sshd is seen, and judged, and nothing fires
    monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == 22)
    monitor.wait_for(lambda e: e.kind == "exec" and e.cgroup_id == agent_cgroup.id and e.argv[0] == "ssh")
    assert monitor.verdicts_for(agent_cgroup.name) == []


def test_stratum_client_reaching_a_pool(monitor, agent_cgroup, stratum_pool, fake_gpu_dir):
    host, port = stratum_pool.host, stratum_pool.port
    client = str(REPO / "tests/servers/stratum_client.py")
    out = agent_cgroup.run([sys.executable, client, host, str(port), str(fake_gpu_dir / "nvidia0")], text=True)
    assert out.stdout.strip() == "00000000", out.stderr  # the pool answered mining.subscribe
    pool = monitor.wait_for_verdict("Connection to a mining pool port", agent_cgroup.name)
    assert f"to={host}:{port}" in pool.output
    # the same process opened a GPU first: the sequence rule sees the whole story
    seq = monitor.wait_for_verdict("GPU process connects to a mining pool port", agent_cgroup.name)
    assert seq.actions == ["kill", "cut_network"]


SCAN = """
import socket, sys
host = sys.argv[1]
for port in range(40000, 40025):
    s = socket.socket()
    s.settimeout(2)
    s.connect_ex((host, port))
    s.close()
"""


def test_internal_scan_of_the_netns_host(monitor, agent_cgroup, netns_host):
    # 198.51.100.0/24 is reached over the veth, not the default route: internal
    agent_cgroup.run([sys.executable, "-c", SCAN, netns_host.address], check=True)
    scan = monitor.wait_for_verdict("Internal network scan", agent_cgroup.name)
    assert scan.count == 20
    assert "targets=20" in scan.output


def test_recorded_trace_replays_to_the_same_verdicts(monitor, agent_cgroup, netns_host, tmp_path):
    # principle 5: live and replay agree, windows included (they run on event time)
    agent_cgroup.run([sys.executable, "-c", SCAN, netns_host.address], check=True)
    agent_cgroup.run(["/bin/sh", "-c", "exec ssh -V -R 1:localhost:2 nowhere 2>/dev/null; true"])
    monitor.wait_for_verdict("Internal network scan", agent_cgroup.name)
    monitor.wait_for_verdict("Reverse SSH tunnel", agent_cgroup.name)
    events = monitor.in_cgroup(agent_cgroup.id)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(e.to_json() + "\n" for e in events if e.kind in ev.KIND_GROUPS["all"]))
    engine = Engine(monitor.engine.ruleset, monitor.engine.context)
    replayed = [v for _, e in ev.read_jsonl(trace) for v in engine.evaluate(e)]
    live = monitor.verdicts_for(agent_cgroup.name)
    assert [(v.rule, v.event.time_ns, v.output) for v in replayed] == \
        [(v.rule, v.event.time_ns, v.output) for v in live]
