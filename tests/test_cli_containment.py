"""ebpfmon run with containment, and ebpfmon quarantine, as an operator uses them:
real daemon processes, kill -9, restart, release."""

from __future__ import annotations

import errno
from pathlib import Path
import signal
import subprocess
import sys
import threading

from conftest import EBPFMON, REPO, Lines, make_agent_cgroup
from test_cli import ebpfmon

CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(3)
print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))
"""


def connect_from(cgroup, host: str, port: int) -> int:
    return int(cgroup.run([sys.executable, "-c", CONNECT, host, str(port)], text=True).stdout)


class DaemonProcess(Lines):
    """`ebpfmon run` on its own agent root and state directory, metrics off (tests run many)."""

    def __init__(self, root: str, state: str, *extra: str):
        config = Path(state) / "config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        if not config.exists():
            config.write_text("metrics: {enabled: false}\n")
        self.proc = subprocess.Popen([*EBPFMON, "run", "--config", str(config), "--agent-root", root,
                                      "--state-dir", state, *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        Lines.__init__(self)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.wait("ready:", timeout=90)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.emit(line)

    def wait(self, *parts: str, timeout: float = 15) -> str:
        return self.wait_line(*parts, timeout=timeout, alive=lambda: self.proc.poll() is None)

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def test_cut_survives_kill_9_and_restart_reconciles(bpf, hierarchy, own_root, tmp_path, sshd, stratum_pool,
                                                    netns_host):
    state = str(tmp_path / "state")
    holder = make_agent_cgroup(hierarchy, own_root)
    victim = make_agent_cgroup(hierarchy, own_root)
    # a connection to the pool, opened before any daemon ran
    held = holder.popen([sys.executable, "-c", (
        f"import socket, time\nc = socket.create_connection(('{stratum_pool.host}', {stratum_pool.port}))\n"
        "print('connected', flush=True)\ntime.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert held.stdout.readline().strip() == "connected"
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
