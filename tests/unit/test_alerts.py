"""Alerts: incidents, dedup, the spool, and delivery to a PagerDuty-contract server
and a real Alertmanager, on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Verdict
from helpers import free_port, wait_for
from servers.pagerduty import FakePagerDuty


@pytest.fixture
def pagerduty():
    server = FakePagerDuty()
    yield server
    server.close()


def verdict(agent="/ebpfmon-agents/a1", rule="Reverse SSH tunnel", argv=("ssh", "-R", "1:h:2", "x")):
    event = make_event({"exec": {"argv": list(argv), "cgroup": agent}}, 0)
    return Verdict(rule, "CRITICAL", f"tunnel by {agent}", ["T1572"], ["cut_network"], True, agent, event)


def alerting(tmp_path, pagerduty, dedup=60.0, spool_max=1000, extra=(), **clocks) -> Alerting:
    settings = AlertSettings(dedup_seconds=dedup, spool_max=spool_max, sinks=(
        SinkSettings(type="pagerduty", url=pagerduty.url, routing_key="R0UTINGKEY"),
        SinkSettings(type="jsonl", path=str(tmp_path / "alerts.jsonl")), *extra))
    return Alerting(settings, tmp_path / "state", node="gpu-node-7", **clocks).start()


def test_trigger_then_resolve_with_one_dedup_key(tmp_path, pagerduty):
    a = alerting(tmp_path, pagerduty)
    try:
        a.verdict(verdict(), quarantine={"agent": "/ebpfmon-agents/a1", "status": "active"})
        trigger = pagerduty.wait(1)[0]
        assert trigger["event_action"] == "trigger" and trigger["routing_key"] == "R0UTINGKEY"
        assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["source"] == "gpu-node-7"
        details = trigger["payload"]["custom_details"]
        assert details["rule"] == "Reverse SSH tunnel" and details["event"]["argv"][1] == "-R"
        assert details["event"]["ancestry"][0]["comm"] == "bash" and details["quarantine"]["status"] == "active"
        assert a.resolve_agent("/ebpfmon-agents/a1", "was a test") == 1
        resolve = pagerduty.wait(2)[1]
        assert resolve["event_action"] == "resolve" and resolve["dedup_key"] == trigger["dedup_key"]
        assert pagerduty.rejected == []
        lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
        assert [json.loads(l)["action"] for l in lines] == ["trigger", "resolve"]
    finally:
        a.close()


def test_a_thousand_identical_verdicts_page_once_with_a_count(tmp_path, pagerduty):
    now = [0]  # the monotonic clock dedup windows are measured by, moved by the test
    a = alerting(tmp_path, pagerduty, monotonic=lambda: now[0])
    try:
        for _ in range(1000):
            a.verdict(verdict())
        assert len(pagerduty.wait(1)) == 1
        a.tick()  # within the window: the count waits
        now[0] += 61 * 10**9
        a.tick()  # the window passed: one update carries the count
        update = pagerduty.wait(2)[1]
        assert update["dedup_key"] == pagerduty.accepted[0]["dedup_key"]
        assert update["payload"]["custom_details"]["count"] == 1000
        a.tick()  # nothing new: nothing to send
        # another agent is another incident; delivered in order, it comes right after the update
        a.verdict(verdict(agent="/ebpfmon-agents/a2"))
        got = pagerduty.wait(3)
        assert got[2]["payload"]["component"] == "/ebpfmon-agents/a2" and got[2]["dedup_key"] != update["dedup_key"]
        assert len(got) == 3
    finally:
        a.close()


def test_outage_spools_then_delivers_everything_once_in_order_across_restart(tmp_path, pagerduty):
    pagerduty.failing = True
    a = alerting(tmp_path, pagerduty, dedup=0)
    agents = [f"/ebpfmon-agents/a{i}" for i in range(5)]
    for agent in agents[:3]:
        a.verdict(verdict(agent=agent))
    assert pagerduty.wait_refused(1) >= 1  # tried, refused
    assert a.spool.depth() == 3  # on disk, waiting
    a.close()  # the daemon stops while the pager is down
    a = alerting(tmp_path, pagerduty, dedup=0)
    try:
        for agent in agents[3:]:
            a.verdict(verdict(agent=agent))
        pagerduty.failing = False
        pagerduty.wait(5, timeout=30)
        a.verdict(verdict(agent="/ebpfmon-agents/last"))  # delivered in order: after anything sent twice
        got = pagerduty.wait(6, timeout=30)
        assert [b["payload"]["component"] for b in got] == [*agents, "/ebpfmon-agents/last"]  # once each, in order
        wait_for(lambda: a.spool.depth() == 0, "the spool marked delivered")
    finally:
        a.close()


def test_the_spool_is_bounded_and_counts_what_it_drops(tmp_path, pagerduty):
    pagerduty.failing = True
    a = alerting(tmp_path, pagerduty, dedup=0, spool_max=3)
    try:
        for i in range(5):
            a.verdict(verdict(agent=f"/ebpfmon-agents/b{i}"))
        assert a.spool.depth() == 3 and a.spool.dropped == 2
    finally:
        a.close()


def test_sinks_skip_alerts_below_their_priority(tmp_path, pagerduty):
    settings = AlertSettings(sinks=(SinkSettings(type="pagerduty", url=pagerduty.url, routing_key="k",
                                                 min_priority="CRITICAL"),))
    a = Alerting(settings, tmp_path / "state").start()
    try:
        low = verdict()
        low.priority = "WARNING"
        a.verdict(low)
        a.verdict(verdict(agent="/ebpfmon-agents/loud"))
        # delivered in order: the low one, were it sent, would be first
        assert [b["payload"]["component"] for b in pagerduty.wait(1)] == ["/ebpfmon-agents/loud"]
    finally:
        a.close()


def test_secrets_from_files_and_environment(tmp_path, pagerduty, monkeypatch):
    key_file = tmp_path / "pd.key"
    key_file.write_text("FROMFILE\n")
    monkeypatch.setenv("EBPFMON_TEST_PD_URL", pagerduty.url)
    settings = AlertSettings(sinks=(SinkSettings(type="pagerduty", url_env="EBPFMON_TEST_PD_URL",
                                                 routing_key_file=str(key_file)),))
    a = Alerting(settings, tmp_path / "state").start()
    try:
        a.verdict(verdict())
        assert pagerduty.wait(1)[0]["routing_key"] == "FROMFILE"
    finally:
        a.close()


@pytest.fixture
def alertmanager(tmp_path):
    """Debian's prometheus-alertmanager on loopback."""
    binary = shutil.which("prometheus-alertmanager")
    assert binary, "prometheus-alertmanager is not installed: 'make test' installs it"
    (tmp_path / "am.yml").write_text("route:\n  receiver: devnull\nreceivers:\n  - name: devnull\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def am_alerts(url: str, active: bool = True) -> list[dict]:
    flag = "true" if active else "false"
    with urllib.request.urlopen(f"{url}/api/v2/alerts?active={flag}&silenced=false&inhibited=false") as r:
        return json.loads(r.read())


def test_real_alertmanager_shows_and_ends_the_alert(tmp_path, alertmanager):
    settings = AlertSettings(sinks=(SinkSettings(type="alertmanager", url=alertmanager),))
    a = Alerting(settings, tmp_path / "state", node="gpu-node-7").start()
    try:
        a.verdict(verdict())
        deadline = time.monotonic() + 15
        alerts = []
        while time.monotonic() < deadline and not alerts:
            alerts = am_alerts(alertmanager)
            time.sleep(0.2)
        labels = alerts[0]["labels"]
        assert labels["alertname"] == "ebpfmon" and labels["rule"] == "Reverse SSH tunnel"
        assert labels["severity"] == "critical" and labels["node"] == "gpu-node-7"
        assert labels["agent_cgroup"] == "/ebpfmon-agents/a1"
        assert "tunnel by" in alerts[0]["annotations"]["summary"]
        a.resolve_agent("/ebpfmon-agents/a1", "done")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and am_alerts(alertmanager):
            time.sleep(0.2)
        assert am_alerts(alertmanager) == []  # endsAt reached: no longer active
    finally:
        a.close()
