"""The NATS sink against a real nats-server with JetStream on loopback: alerts on their
subjects with their fields; the server stopped and started again meanwhile: nothing lost,
nothing stored twice (Nats-Msg-Id dedup); a retry after a lost acknowledgement stored once."""

from __future__ import annotations

import pytest

from helpers import free_port
from servers.nats import NatsServer

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.alerts.sinks import NatsSink
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Verdict


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path / "nats", free_port()).start()
    yield s
    s.stop()


def verdict(agent: str, priority: str = "CRITICAL") -> Verdict:
    event = make_event({"exec": {"argv": ["ssh", "-R", "1:h:2", "x"], "cgroup": agent}}, 0)
    return Verdict("Reverse SSH tunnel", priority, f"tunnel by {agent}", ["T1572"], ["cut_network"], True, agent, event)


def alerting(tmp_path, url: str) -> Alerting:
    settings = AlertSettings(sinks=(SinkSettings(type="nats", url=url, timeout=3),))
    return Alerting(settings, tmp_path / "state", node="gpu-node-7.example").start()


def test_alerts_arrive_on_their_subjects(tmp_path, server):
    a = alerting(tmp_path, server.url)
    try:
        a.verdict(verdict("/ebpfmon-agents/a1"))
        a.verdict(verdict("/ebpfmon-agents/a2", priority="WARNING"))
        stored = server.stored(count=2)
    finally:
        a.close()
    assert [s for s, _, _ in stored] == ["ebpfmon.gpu-node-7_example.alert.critical",
                                         "ebpfmon.gpu-node-7_example.alert.warning"]
    _, headers, payload = stored[0]
    assert payload["rule"] == "Reverse SSH tunnel" and payload["agent"] == "/ebpfmon-agents/a1"
    assert payload["event"]["argv"] == ["ssh", "-R", "1:h:2", "x"] and len(headers["Nats-Msg-Id"]) == 32


def test_a_server_restart_loses_nothing_and_stores_nothing_twice(tmp_path, server):
    a = alerting(tmp_path, server.url)
    try:
        a.verdict(verdict("/ebpfmon-agents/before"))
        assert len(server.stored(count=1)) == 1
        server.stop()
        for n in range(3):
            a.verdict(verdict(f"/ebpfmon-agents/during-{n}"))
        server.start()
        stored = server.stored(count=4, timeout=60)
    finally:
        a.close()
    assert sorted(p["agent"] for _, _, p in stored) == ["/ebpfmon-agents/before", "/ebpfmon-agents/during-0",
                                                        "/ebpfmon-agents/during-1", "/ebpfmon-agents/during-2"]


def test_a_retry_of_the_same_alert_is_stored_once(tmp_path, server):
    sink = NatsSink(SinkSettings(type="nats", url=server.url, timeout=3), "n1")
    alert = {"action": "trigger", "incident": "ebpfmon-k", "rule": "r", "priority": "ERROR", "agent": "/a",
             "count": 1, "time_ns": 5, "output": "x"}
    try:
        sink.deliver(alert)
        sink.deliver(alert)  # as after an acknowledgement that never came back
        sink.deliver({**alert, "count": 2})  # the next one is another message
    finally:
        sink.close()
    assert [p["count"] for _, _, p in server.stored(count=2)] == [1, 2]


def test_the_audit_chain_head_is_published_for_the_fleet(tmp_path, server):
    a = alerting(tmp_path, server.url)
    try:
        a.chain_head("0123456789abcdef0123456789abcdef", 1234, "/var/lib/ebpfmon/audit/events.jsonl")
        [(subject, _, payload)] = server.stored(count=1)
    finally:
        a.close()
    assert subject == "ebpfmon.gpu-node-7_example.audit.head"
    assert payload["hash"] == "0123456789abcdef0123456789abcdef" and payload["records"] == 1234
