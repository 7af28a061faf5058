"""Faults the daemon meets as a real process (`ebpfmon run`, on its own agent root): bad files
at reload, a second daemon, corrupt state at start, a full disk under the audit log. After each
the daemon is still running, still judges (a canary rule fires on a canary program in an agent)
and its alerts still arrive."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import EBPFMON, REPO, DaemonProcess, connect_from, ebpfmon, make_agent_cgroup, remove_cgroup_tree
from servers.pagerduty import FakePagerDuty

CANARY_RULE = """
- rule: Fault canary
  desc: the fault tests' proof that the daemon still judges
  condition: evt.kind = exec and proc.name = canary-probe
  output: canary ran (cmdline=%proc.cmdline)
  priority: WARNING
"""


class Watched:
    """A daemon from a configuration file in its state directory, with a canary rule, a jsonl
    sink and the console; an agent to run the canary in."""

    def __init__(self, root: str, state: Path, hierarchy, remote_sinks: tuple = (), **settings):
        self.state, self.root = state, root
        state.mkdir(parents=True, exist_ok=True)
        self.rules = state / "canary.yaml"
        self.rules.write_text(CANARY_RULE)
        self.alerts = state.parent / "alerts.jsonl"  # outside the state dir: a full one does not lose it
        self.settings = {"agent_root": root, "state_dir": str(state), "metrics": {"enabled": False},
                         "rules": {"files": [str(self.rules)]},
                         "alerts": {"sinks": [{"type": "console"}, {"type": "jsonl", "path": str(self.alerts)},
                                              *remote_sinks]},
                         **settings}
        self.config = state / "config.yaml"
        self.write_config()
        self.canary_program = state / "canary-probe"
        shutil.copy("/bin/true", self.canary_program)
        self.hierarchy = hierarchy
        self.agent = make_agent_cgroup(hierarchy, root)
        self.daemon: DaemonProcess | None = None

    def write_config(self, **changes) -> None:
        self.config.write_text(yaml.safe_dump({**self.settings, **changes}, sort_keys=False))

    def start(self) -> DaemonProcess:
        self.daemon = DaemonProcess(self.root, str(self.state), from_file=True)
        return self.daemon

    def still_judging(self) -> None:
        """The daemon runs, judges an agent's exec with the running rules, and the alert reaches
        the jsonl sink (a new agent each time: one agent's repeats are one incident)."""
        assert self.daemon.proc.poll() is None, "the daemon died"
        token = uuid.uuid4().hex[:8]
        agent = make_agent_cgroup(self.hierarchy, self.root, prefix="canary")
        try:
            agent.run([str(self.canary_program), token], check=True)
            self.daemon.wait("Fault canary", token)
        finally:
            remove_cgroup_tree(agent.path)
        deadline = time.monotonic() + 15
        while token not in (self.alerts.read_text() if self.alerts.exists() else ""):
            assert time.monotonic() < deadline, "the canary's alert never reached the jsonl sink"
            time.sleep(0.05)

    def reload_refused(self, *says: str) -> str:
        self.daemon.proc.send_signal(signal.SIGHUP)
        return self.daemon.wait("not reloaded", *says, timeout=20)


@pytest.fixture
def watched(bpf, hierarchy, own_root, tmp_path):
    w = Watched(own_root, tmp_path / "state", hierarchy)
    yield w
    if w.daemon:
        w.daemon.stop()

BAD_CONFIGS = [
    ("an invalid CIDR in internal_networks", {"internal_networks": ["10.0.0.0/33"]}, "internal_networks[0]"),
    ("an invalid CIDR in keep_open", {"enforce": {"keep_open": ["not-a-network"]}}, "enforce.keep_open[0]"),
    ("a missing routing_key_file", {"alerts": {"sinks": [{"type": "pagerduty", "url": "http://127.0.0.1:9/",
                                                          "routing_key_file": "/nonexistent/key"}]}},
     "cannot read the routing key"),
    ("a GPU that is no GPU", {"gpu_devices": {"/x/*": ["nvidia0"]}}, "gpu_devices./x/*[0]"),
]
BAD_RULES = [
    ("a rules file that is not UTF-8", b"\xff\xfe- rule: broken\n", "canary.yaml"),
    ("tags that are no list", (CANARY_RULE.replace("priority: WARNING", "priority: WARNING\n  tags: 5")).encode(),
     "tags is a list of words"),
    ("a max_keys that is no number", (CANARY_RULE + """
- rule: Fault sequence
  desc: a sequence with a bad max_keys
  sequence: {by: [proc.pid], within: 10s, max_keys: lots, steps: [evt.kind = exec, evt.kind = connect]}
  output: x
  priority: NOTICE
""").encode(), "max_keys is a whole number"),
]


def test_bad_reloads_keep_the_running_set(watched):
    daemon = watched.start()
    watched.still_judging()
    for what, change, says in BAD_CONFIGS:
        watched.write_config(**change)
        checked = ebpfmon("config", "check", str(watched.config))
        assert checked.returncode != 0 and says in checked.stdout + checked.stderr, what  # config check agrees
        line = watched.reload_refused(says)
        assert f"{watched.config}:" in line, what  # file:line:key
        watched.still_judging()
    watched.write_config()
    good = watched.rules.read_bytes()
    for what, text, says in BAD_RULES:
        watched.rules.write_bytes(text)
        checked = ebpfmon("config", "check", str(watched.config))
        assert checked.returncode != 0 and says in checked.stdout + checked.stderr, what
        watched.reload_refused(says)
        watched.still_judging()  # the canary rule of the running set still fires
    watched.rules.write_bytes(good)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait("reloaded:")
    watched.still_judging()
    assert daemon.stop(signal.SIGTERM) == 0


def test_a_second_daemon_on_the_same_state_is_refused(watched):
    daemon = watched.start()
    second = subprocess.run([*EBPFMON, "run", "--config", str(watched.config)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 2
    assert f"another ebpfmon daemon (pid {daemon.proc.pid}) runs on the state directory" in second.stderr
    watched.still_judging()  # the first one is untouched
    assert daemon.stop(signal.SIGTERM) == 0
    # a lock left by a daemon that is gone (its pid in the file) does not block the next one
    (watched.state / "daemon.lock").write_text("999999\n")
    watched.start()
    watched.still_judging()


def test_corrupt_state_is_set_aside_and_the_daemon_starts(watched):
    (watched.state / "alerts.db").write_bytes(os.urandom(4096))
    (watched.state / "quarantine.json").write_text(json.dumps({"records": [{"agent": "/x", "bogus": 1}]}))
    daemon = watched.start()
    assert daemon.wait("alert spool", "unreadable", "set aside")
    assert daemon.wait("quarantine records", "unreadable", "set aside")
    names = sorted(p.name for p in watched.state.iterdir())
    assert any(n.startswith("alerts.db.broken-") for n in names) and any(".broken-" in n and
                                                                       n.startswith("quarantine") for n in names)
    watched.still_judging()  # a fresh spool delivers; a fresh quarantine file records
    out = ebpfmon("quarantine", "cut", watched.agent.name, "--reason", "after corruption", "--state-dir",
                  str(watched.state))
    assert out.returncode == 0, out.stderr
    assert json.loads((watched.state / "quarantine.json").read_text())["records"][0]["agent"] == watched.agent.name
    ebpfmon("quarantine", "release", watched.agent.name, "--reason", "done", "--state-dir", str(watched.state))


def fill(directory: Path) -> Path:
    """Writes a file until the filesystem refuses: every write there fails from now on."""
    filler = directory / "filler"
    try:
        f = open(filler, "wb")
    except OSError as e:  # full before the test filled it: say with what
        taken = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
        raise AssertionError(f"{directory} was full before the test filled it ({e}): {taken}") from e
    with f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_state_disk(bpf, hierarchy, own_root, tmp_path):
    """The whole state directory on a 16 MiB tmpfs (room for what the daemon writes before the test
    fills it), mounted by this test and unmounted after."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "ebpfmon-test-state", str(state)], check=True)
    pagerduty = FakePagerDuty()
    w = Watched(own_root, state, hierarchy, remote_sinks=(
        {"type": "pagerduty", "url": pagerduty.url, "routing_key": "K", "min_priority": "WARNING"},))
    w.pagerduty = pagerduty
    yield w
    if w.daemon:
        w.daemon.stop()
    pagerduty.close()
    subprocess.run(["umount", "-l", str(state)], check=False)


def paged_canaries(watched, count: int, timeout: float = 20.0) -> int:
    """How many canary alerts the pager took, once count of them are there (or the time is up)."""
    def canaries() -> int:
        return sum("Fault canary" in b["payload"]["summary"] for b in list(watched.pagerduty.accepted))
    deadline = time.monotonic() + timeout
    while canaries() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return canaries()


def test_a_full_state_disk_keeps_judging_enforcing_and_every_alert(small_state_disk, stratum_pool):
    watched = small_state_disk
    daemon = watched.start()
    watched.still_judging()
    assert paged_canaries(watched, 1) == 1
    filler = fill(watched.state)
    for _ in range(3):
        watched.still_judging()  # the spool cannot take them: the local sinks still get them
    daemon.wait("alert spool not written")
    # containment goes on: the kernel cuts, the record waits in memory
    out = ebpfmon("quarantine", "cut", watched.agent.name, "--reason", "disk full", "--state-dir",
                  str(watched.state))
    assert out.returncode == 0, out.stderr
    assert connect_from(watched.agent, stratum_pool.host, stratum_pool.port) == errno.EPERM
    daemon.wait("quarantine file not written")
    filler.unlink()  # space again: the record and the alerts that waited are written
    daemon.wait("alert spool written again")
    daemon.wait("quarantine file written again")
    assert paged_canaries(watched, 4) == 4  # every alert of the full disk paged once space returned
    records = json.loads((watched.state / "quarantine.json").read_text())["records"]
    assert [r["agent"] for r in records if r["status"] == "active"] == [watched.agent.name]
    watched.still_judging()
    out = ebpfmon("quarantine", "release", watched.agent.name, "--reason", "done", "--state-dir", str(watched.state))
    assert out.returncode == 0, out.stderr
    assert daemon.stop(signal.SIGTERM) == 0


@pytest.fixture
def small_audit_disk(watched):
    """A 1 MiB tmpfs under the audit log, mounted by this test and unmounted after."""
    audit = watched.state / "audit"
    audit.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "ebpfmon-test-audit", str(audit)], check=True)
    yield audit
    subprocess.run(["umount", "-l", str(audit)], check=False)


def test_a_full_disk_under_the_audit_log_does_not_stop_judging(watched, small_audit_disk):
    daemon = watched.start()
    filler = fill(small_audit_disk)  # every write of the audit log fails from now on
    for _ in range(3):
        watched.still_judging()  # judged and alerted while nothing can be written
    daemon.wait("audit log not written", "No space left on device")
    alerts = [json.loads(line) for line in watched.alerts.read_text().splitlines()]
    assert any(a["rule"] == "ebpfmon audit log" and a["priority"] == "CRITICAL" for a in alerts)  # paged
    token = uuid.uuid4().hex[:8]
    watched.agent.run([str(watched.canary_program), token], check=True)  # its first canary: alerted
    daemon.wait("Fault canary", token)
    filler.unlink()  # space again: what waited is written
    daemon.wait("audit log written again")
    audit = (small_audit_disk / "events.jsonl").read_text()
    assert token in audit  # an exec judged while the disk was full is in the log now
    watched.still_judging()
    assert daemon.stop(signal.SIGTERM) == 0


def test_what_agents_run_before_the_start_is_judged(watched):
    # started while no daemon watched: no exec was seen, the process is there at the start
    sleeper = watched.state / "canary-probe"
    shutil.copy("/bin/sleep", sleeper)
    token = f"{uuid.uuid4().int % 10**6 + 600}"  # a sleep that is also a token
    running = watched.agent.popen([str(sleeper), token])
    try:
        daemon = watched.start()
        line = daemon.wait("Fault canary", f"canary-probe {token}")
        assert "WARNING" in line
        audit = watched.state / "audit" / "events.jsonl"
        deadline = time.monotonic() + 15
        while token not in (audit.read_text() if audit.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        [event] = [json.loads(l) for l in audit.read_text().splitlines() if token in l and '"exec"' in l]
        assert event["found_at_start"] and event["proc"]["pid"] == running.pid and event["argv_source"] == "proc"
    finally:
        running.kill()
        running.wait()


def test_a_taken_metrics_port_is_said_loudly(bpf, hierarchy, own_root, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    watched = Watched(own_root, tmp_path / "state", hierarchy, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    try:
        daemon = watched.start()
        ready = daemon.wait("ready:")
        assert f"metrics NOT SERVED: cannot listen on 127.0.0.1:{port}" in ready  # the ready line does not claim them
        watched.still_judging()
        alerts = [json.loads(line) for line in watched.alerts.read_text().splitlines()]
        assert any(a["rule"] == "ebpfmon metrics" and str(port) in a["output"] for a in alerts)
    finally:
        if watched.daemon:
            watched.daemon.stop()
        taken.close()


def test_a_reload_that_changes_dry_run_changes_the_kernel_and_the_rules_together(watched, stratum_pool):
    daemon = watched.start()
    agent = watched.agent
    assert connect_from(agent, stratum_pool.host, stratum_pool.port) == errno.EPERM  # the pool port: refused
    watched.write_config(enforce={"dry_run": True})
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait("reloaded:")
    assert connect_from(agent, stratum_pool.host, stratum_pool.port) == 0  # reported, let through
    daemon.wait("deny_connect dry run on", agent.name)  # and user space acts in dry run too
    listed = json.loads(ebpfmon("quarantine", "list", "--all", "--json", "--state-dir", str(watched.state)).stdout)
    applied = [a for r in listed if r["agent"] == agent.name for a in r["actions"] if a["result"] == "applied"]
    assert applied == []
    watched.write_config()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait("reloaded: ", timeout=20)
    deadline = time.monotonic() + 10  # the second reload's line may be the first's: wait for the kernel
    while connect_from(agent, stratum_pool.host, stratum_pool.port) != errno.EPERM:
        assert time.monotonic() < deadline, "dry run still in force after the reload back"
        time.sleep(0.2)


def alerts_of(watched) -> list[dict]:
    return [json.loads(line) for line in watched.alerts.read_text().splitlines()] if watched.alerts.exists() else []


def test_a_flood_that_fills_the_ring_buffer_is_paged_with_its_maker(bpf, hierarchy, own_root, tmp_path):
    # a one-page ring buffer: an agent's exec storm overflows it
    watched = Watched(own_root, tmp_path / "state", hierarchy, ringbuf_pages=1)
    try:
        daemon = watched.start()
        storm = make_agent_cgroup(hierarchy, own_root, prefix="storm")
        try:
            # long command lines: each exec's record is large, the ring holds few
            long_args = " ".join(["x" * 200] * 30)
            storm.run(["sh", "-c", f"for i in $(seq 400); do /bin/true {long_args}; done"], timeout=120)
            line = daemon.wait("event(s) lost: the ring buffer was full", timeout=20)
            assert storm.name in line  # named as the maker
        finally:
            remove_cgroup_tree(storm.path)
        deadline = time.monotonic() + 15  # the line is echoed just before the sinks get the alert
        while not any(a["rule"] == "ebpfmon events lost" and storm.name in a["output"] for a in alerts_of(watched)):
            assert time.monotonic() < deadline, "the flood's alert never reached the jsonl sink"
            time.sleep(0.05)
        watched.still_judging()
    finally:
        if watched.daemon:
            watched.daemon.stop()
