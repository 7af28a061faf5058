"""ebpfmon run with containment, and ebpfmon quarantine, as an operator uses them:
real daemon processes, kill -9, restart, release."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

from helpers import DaemonProcess, attached_maps, connect_from, ebpfmon, line_of, make_agent_cgroup

from ebpfmon.host.users import user_name


def test_cut_survives_kill_9_and_restart_reconciles(bpf, hierarchy, own_root, tmp_path, sshd, stratum_pool,
                                                    netns_host):
    state = str(tmp_path / "state")
    holder = make_agent_cgroup(hierarchy, own_root)
    victim = make_agent_cgroup(hierarchy, own_root)
    # a connection to the pool, opened before any daemon ran
    held = holder.popen([sys.executable, "-c", (
        f"import socket, time\nc = socket.create_connection(('{stratum_pool.host}', {stratum_pool.port}))\n"
        "print('connected', flush=True)\ntime.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert line_of(held.stdout).strip() == "connected"
    daemon = DaemonProcess(own_root, state)
    try:
        # judged at start like a new connection: the alert, and its deny_connect applied
        daemon.wait("Connection to a mining pool port", holder.name.split("/")[-1])
        daemon.wait("deny_connect applied", holder.name)
        # a manual cut through the control socket
        out = ebpfmon("quarantine", "cut", victim.name, "--reason", "test cut", "--agent-root", own_root,
                      "--state-dir", state)
        assert out.returncode == 0, out.stderr
        assert "cut_network:applied" in out.stdout
        assert connect_from(victim, netns_host.address, 22) == errno.EPERM
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        # the daemon is gone, the cut is not
        assert connect_from(victim, netns_host.address, 22) == errno.EPERM
        daemon = DaemonProcess(own_root, state)
        out = ebpfmon("quarantine", "list", "--state-dir", state)
        assert "from the running daemon" in out.stdout
        assert victim.name in out.stdout and holder.name in out.stdout
        assert "held: tcp" in out.stdout and f"-> {stratum_pool.host}:{stratum_pool.port} established" in out.stdout
        out = ebpfmon("quarantine", "release", victim.name, "--reason", "test done", "--state-dir", state)
        assert out.returncode == 0 and "released" in out.stdout
        # the pool's address was denied for every agent by the holder's deny_connect: still refused
        assert connect_from(victim, netns_host.address, 22) == errno.EPERM
        out = ebpfmon("quarantine", "release", holder.name, "--reason", "pool was a test", "--state-dir", state)
        assert out.returncode == 0, out.stderr
        assert connect_from(victim, netns_host.address, 22) == 0
    finally:
        held.kill()
        daemon.stop()


def test_quarantine_without_a_daemon(bpf, hierarchy, own_root, tmp_path, sshd, netns_host):
    state = str(tmp_path / "state")
    agent = make_agent_cgroup(hierarchy, own_root)
    args = ["--agent-root", own_root, "--state-dir", state]
    out = ebpfmon("quarantine", "cut", agent.name, "--reason", "by hand", *args)
    assert out.returncode == 0, out.stderr
    assert connect_from(agent, netns_host.address, 22) == errno.EPERM
    out = ebpfmon("quarantine", "list", "--state-dir", state)
    assert "no daemon running" in out.stdout and agent.name in out.stdout and "by hand" in out.stdout
    [record] = json.loads(ebpfmon("quarantine", "list", "--json", "--state-dir", state).stdout)
    assert record["agent"] == agent.name and record["status"] == "active" and "by hand" in json.dumps(record)
    assert [(a["action"], a["result"]) for a in record["actions"]] == [("cut_network", "applied")]
    out = ebpfmon("quarantine", "release", agent.name, "--reason", "ok", *args)
    assert out.returncode == 0, out.stderr
    assert connect_from(agent, netns_host.address, 22) == 0
    out = ebpfmon("quarantine", "list", "--all", "--state-dir", state)
    assert "released" in out.stdout and "(cli): ok" in out.stdout


def test_quarantine_refuses_root_and_outsiders(bpf, own_root, tmp_path):
    args = ["--agent-root", own_root, "--state-dir", str(tmp_path)]
    for target in ("/", "/somewhere-else", own_root):
        out = ebpfmon("quarantine", "cut", target, "--reason", "no", *args)
        assert out.returncode == 2
        assert "refused:" in out.stderr and "Traceback" not in out.stderr
    out = ebpfmon("quarantine", "cut", f"{own_root}/x", *args)
    assert out.returncode == 2 and "--reason" in out.stderr  # a manual cut needs a reason


def test_dry_run_reports_and_lets_through(bpf, hierarchy, own_root, tmp_path, stratum_pool):
    daemon = DaemonProcess(own_root, str(tmp_path), "--dry-run")
    agent = make_agent_cgroup(hierarchy, own_root)
    try:
        assert "containment in dry run" in daemon.wait("ready:")
        assert connect_from(agent, stratum_pool.host, stratum_pool.port) == 0  # let through
        line = daemon.wait("Connection refused by policy", agent.name.split("/")[-1])
        assert "dry_run=true" in line and "reason=port" in line
    finally:
        daemon.stop()


def test_quarantine_without_a_daemon_applies_the_configuration(bpf, hierarchy, own_root, tmp_path, sshd,
                                                               netns_host):
    """A cut with no daemon loads the enforcement programs from the operator's configuration
    (agent level, dry run, keep_open, deny ports, GPU entitlement), not from the defaults."""
    team = f"{own_root}/team"
    hierarchy.ensure(team)
    agent, entitled = make_agent_cgroup(hierarchy, team), make_agent_cgroup(hierarchy, team)
    config = tmp_path / "config.yaml"
    config.write_text(f"agent_root: {own_root}\nagent_level: 2\nstate_dir: {tmp_path / 'state'}\n"
                      f"gpu_entitled: ['{entitled.name}']\nmetrics: {{enabled: false}}\n"
                      "enforce: {dry_run: true, keep_open: ['127.0.0.0/8', '192.0.2.0/24'], deny_ports: [3333, 4444]}\n")
    out = ebpfmon("quarantine", "cut", agent.name, "--reason", "offline", "--config", str(config))
    assert out.returncode == 0, out.stderr
    maps = attached_maps(hierarchy.path(own_root), "enforce_config", "deny_ports", "cut_allow4", "cut_cgroups",
                         "gpu_grants")
    depth = len([p for p in own_root.split("/") if p])
    [settings] = maps["enforce_config"]
    assert settings["value"] == {"agent_level": depth + 2, "dry_run": 1, "gpu_default_deny": 1, "dns_proxy_port": 0}
    assert sorted(e["key"] for e in maps["deny_ports"]) == [3333, 4444]
    assert sorted((e["key"]["addr"], e["key"]["prefixlen"]) for e in maps["cut_allow4"]) == [
        ([127, 0, 0, 0], 8), ([192, 0, 2, 0], 24)]
    assert [e["key"] for e in maps["cut_cgroups"]] == [agent.id]  # the agent at level 2
    assert [(e["key"], e["value"]["allow"]) for e in maps["gpu_grants"]] == [(entitled.id, 1)]
    # dry run: the cut agent is reported, not refused
    assert connect_from(agent, netns_host.address, 22) == 0
    out = ebpfmon("quarantine", "list", "--config", str(config))
    assert "no daemon running" in out.stdout and agent.name in out.stdout


def test_gpu_grants_without_a_daemon_go_to_the_kernel_and_the_state_dir(bpf, hierarchy, own_root, tmp_path):
    agent = make_agent_cgroup(hierarchy, own_root)
    config = tmp_path / "config.yaml"
    config.write_text(f"agent_root: {own_root}\nstate_dir: {tmp_path / 'state'}\ngpu_entitled: []\n"
                      "metrics: {enabled: false}\n")
    out = ebpfmon("gpu", "grant", agent.name, "--gpus", "1,3", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert f"{agent.name}: gpus 1,3" in out.stdout
    [entry] = attached_maps(hierarchy.path(own_root), "gpu_grants")["gpu_grants"]
    assert entry["key"] == agent.id and entry["value"]["gpu_mask"] == 0b1010 and entry["value"]["every_gpu"] == 0
    listed = ebpfmon("gpu", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert [g for g in json.loads(listed.stdout)["grants"] if g["agent"] == agent.name] == [
        {"agent": agent.name, "gpus": "1,3", "from": f"grant by {user_name(os.getuid())} (cli)", "exists": True}]
    # kept in the state dir: a daemon started later gives the agent the same GPUs
    saved = json.loads((tmp_path / "state/gpu-grants.json").read_text())["grants"]
    assert [(g["agent"], g["gpus"], g["cgroup_id"]) for g in saved] == [(agent.name, ["1", "3"], agent.id)]
    out = ebpfmon("gpu", "grant", agent.name, "--gpus", "nvidia0", "--config", str(config))
    assert out.returncode == 2 and "'nvidia0' is not a GPU" in out.stderr
    out = ebpfmon("gpu", "revoke", agent.name, "--gpus", "3", "--config", str(config))
    assert out.returncode == 0 and f"{agent.name}: gpus 1" in out.stdout, out.stderr
