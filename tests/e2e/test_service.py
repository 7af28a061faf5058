"""The daemon as a service: end to end through the CLI, with a pager, metrics,
the audit log, systemd's notify protocol and the unit file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path


from helpers import EBPFMON, REPO, DaemonProcess, ebpfmon, free_port, make_agent_cgroup, scrape, value
from servers.pagerduty import FakePagerDuty

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3"]


def test_rogue_agent_end_to_end(bpf, hierarchy, own_root, tmp_path, sshd, netns_host, stratum_pool):
    pagerduty = FakePagerDuty()
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.yaml").write_text(f"""
metrics: {{listen: "127.0.0.1:{port}"}}
alerts:
  dedup_seconds: 60
  sinks:
    - {{type: console}}
    - {{type: pagerduty, url: "{pagerduty.url}", routing_key: TESTKEY, min_priority: WARNING}}
""")
    daemon = DaemonProcess(own_root, str(state))
    agent = make_agent_cgroup(hierarchy, own_root)
    try:
        # the rogue agent: a reverse tunnel, then a pool
        agent.run(["ssh", "-i", str(sshd), *SSH_OPTS, "-N", "-R", "2222:127.0.0.1:22", f"root@{netns_host.address}"],
                  timeout=30)
        agent.run([sys.executable, str(REPO / "tests/servers/stratum_client.py"), stratum_pool.host,
                   str(stratum_pool.port)])
        triggers = pagerduty.wait(2)
        tunnel = next(b for b in triggers if "Reverse SSH tunnel" in b["payload"]["summary"])
        assert tunnel["payload"]["custom_details"]["quarantine"]["agent"] == agent.name
        assert tunnel["payload"]["severity"] == "critical"
        daemon.wait("cut_network applied on", agent.name)
        out = ebpfmon("quarantine", "list", "--state-dir", str(state))
        assert agent.name in out.stdout and "cut_network:applied" in out.stdout
        # metrics: present and moving
        metrics = scrape(port)
        assert value(metrics, "ebpfmon_events_total", kind="exec") > 0
        assert value(metrics, "ebpfmon_rule_matches_total", rule="Reverse SSH tunnel", priority="CRITICAL") == 1
        assert value(metrics, "ebpfmon_actions_total", action="cut_network", result="applied") == 1
        assert value(metrics, "ebpfmon_containments_total", rule="Reverse SSH tunnel") == 1
        assert value(metrics, "ebpfmon_event_to_action_seconds_count") >= 1
        assert value(metrics, "ebpfmon_quarantined_agents") == 1
        assert value(metrics, "ebpfmon_alerts_delivered_total", sink="pagerduty") >= 2
        assert value(metrics, "ebpfmon_events_lost_total", kind="exec") == 0
        assert value(metrics, "ebpfmon_build_info", version=__import__("ebpfmon").__version__) == 1
        assert value(metrics, "ebpfmon_rule_evaluation_seconds_count") > 0
        assert value(metrics, "ebpfmon_event_to_verdict_seconds_count") > 0
        # the pool's connect, refused: by its port, or by the cut if the tunnel's came first
        assert value(metrics, "ebpfmon_refusals_total", reason="port") + value(
            metrics, "ebpfmon_refusals_total", reason="cut") >= 1
        assert value(metrics, "ebpfmon_rules_loaded") > 0 and value(metrics, "ebpfmon_probes_attached") > 0
        assert value(metrics, "ebpfmon_quarantine_writes_total") >= 1
        for name in ("ebpfmon_loop_errors_total", "ebpfmon_events_malformed_total", "ebpfmon_alerts_unspooled",
                     "ebpfmon_alert_spool_dropped_total", "ebpfmon_audit_write_failures_total",
                     "ebpfmon_audit_lines_dropped_total", "ebpfmon_quarantine_write_failures",
                     "ebpfmon_rules_reload_failures_total"):
            assert value(metrics, name) == 0, name  # nothing went wrong
        # every metric of the schema is served (service/metrics.py holds it all)
        schema = set(re.findall(r'"(ebpfmon_[a-z_]+)"', (REPO / "ebpfmon/service/metrics.py").read_text()))
        served = {name for name, _ in metrics}
        unserved = {m for m in schema if not any(s == m or s.startswith(m + "_") for s in served)}
        assert unserved <= LABELLED_WHEN_SEEN, unserved
        # release: the network comes back, the incident is resolved
        out = ebpfmon("quarantine", "release", agent.name, "--reason", "e2e done", "--state-dir", str(state))
        assert out.returncode == 0, out.stderr
        resolves = [b for b in pagerduty.wait(len(triggers) + 1) if b["event_action"] == "resolve"]
        assert tunnel["dedup_key"] in {r["dedup_key"] for r in resolves}
        assert pagerduty.rejected == []
        # the audit log: every agent event, replayable
        audit = state / "audit" / "events.jsonl"
        kinds = {json.loads(line)["kind"] for line in audit.read_text().splitlines()}
        assert {"exec", "connect", "refused"} <= kinds
        out = ebpfmon("rules", "test", "--events", str(audit))
        assert out.returncode == 0 and "Reverse SSH tunnel" in out.stdout
        # reload through the control socket
        out = ebpfmon("reload", "--state-dir", str(state))
        assert out.returncode == 0 and out.stdout.startswith("reloaded:")
        after = scrape(port)
        assert value(after, "ebpfmon_rules_reloads_total") == 1 and value(after, "ebpfmon_alert_spool_depth") == 0
        assert value(after, "ebpfmon_alerts_delivered_total", sink="pagerduty") >= len(resolves) + len(triggers)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.stop()
        pagerduty.close()


# metrics with labels that have no sample until their first one (a sink's failure, a profile's
# refusal, a DNS question, a suspended rule, an exporter...): their families are empty till then
LABELLED_WHEN_SEEN = {"ebpfmon_alerts_failed", "ebpfmon_egress_refusals", "ebpfmon_dns_questions",
                      "ebpfmon_rules_suspended", "ebpfmon_events_exported", "ebpfmon_event_export_failures",
                      "ebpfmon_event_export_gaps", "ebpfmon_event_export_too_large",
                      "ebpfmon_event_export_behind_bytes", "ebpfmon_gpu_holders"}


def thread_nice(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_systemd_notify_ready_watchdog_stopping_and_reader_priority(bpf, own_root, tmp_path):
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(60)
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.yaml").write_text("metrics: {enabled: false}\nreader_nice: -7\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    # as systemd does: WATCHDOG_PID names the service's main process, set before it starts
    # (the shell's pid, which exec keeps)
    run = [*EBPFMON, "run", "--config", str(state / "config.yaml"), "--agent-root", own_root, "--state-dir", str(state)]
    proc = subprocess.Popen(["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *run], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "w"))
    try:
        try:
            got = [listener.recv(100).decode() for _ in range(2)]
        except TimeoutError:
            raise AssertionError((tmp_path / "stderr").read_text()[-2000:]) from None
        assert got == ["READY=1", "WATCHDOG=1"]
        # the event loop (the main thread) runs ahead of the agents, and so does every other
        # thread of the daemon: one holding Python's lock while it waits for a CPU stalls the loop
        assert thread_nice(proc.pid, proc.pid) == -7
        threads = os.listdir(f"/proc/{proc.pid}/task")
        assert len(threads) > 1 and {thread_nice(proc.pid, int(t)) for t in threads} == {-7}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = []
        while "STOPPING=1" not in rest:  # after any last watchdog pings
            rest.append(listener.recv(100).decode())
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_systemd_unit_verifies(tmp_path):
    unit = (REPO / "deploy/ebpfmon.service").read_text()
    unit = unit.replace("/opt/ebpfmon/venv", str(REPO / ".venv"))  # verify checks ExecStart exists
    (tmp_path / "ebpfmon.service").write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "ebpfmon.service")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "StartLimitBurst" in unit
