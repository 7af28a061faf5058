"""Sinks that misbehave, served for real on loopback: a 4xx is a permanent failure for that
alert (counted, logged, and the queue moves on), a malformed response or a reset does not end
the sink's worker, and no alert is lost or sent twice."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time

import pytest

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Verdict

OK = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REFUSED = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 7\r\nConnection: close\r\n\r\ninvalid"


class Misbehaving:
    """An HTTP endpoint that answers each request as told by its body: 'poison' in it gets a
    400; while `faults` holds entries, the next request gets the first of them (garbage: a
    status line that is none; reset: the connection closed with a RST, nothing answered)."""

    def __init__(self):
        self.requests: list[bytes] = []  # bodies, in arrival order
        self.faults: list[str] = []
        self.cond = threading.Condition()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    chunk = self.rfile.read(1)
                    if not chunk:
                        return
                    head += chunk
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = self.rfile.read(length)
                with owner.cond:
                    owner.requests.append(body)
                    fault = owner.faults.pop(0) if owner.faults else None
                    owner.cond.notify_all()
                if fault == "garbage":
                    self.wfile.write(b"\x00\x01 not HTTP at all\r\n\r\n")
                elif fault == "reset":
                    self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.request.close()
                else:
                    self.wfile.write(REFUSED if b"poison" in body else OK)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: bytes, count: int = 1, timeout: float = 20.0) -> int:
        """Waits until count requests held text; how many did."""
        with self.cond:
            self.cond.wait_for(lambda: sum(text in r for r in self.requests) >= count, timeout)
            return sum(text in r for r in self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = Misbehaving()
    yield server
    server.close()


def verdict(agent: str) -> Verdict:
    event = make_event({"exec": {"argv": ["ssh", "-R", "1:h:2", "x"], "cgroup": agent}}, 0)
    return Verdict("Reverse SSH tunnel", "CRITICAL", f"tunnel by {agent}", ["T1572"], [], False, agent, event)


def alerting(tmp_path, endpoint) -> tuple[Alerting, list]:
    outcomes = []
    settings = AlertSettings(sinks=(SinkSettings(type="webhook", url=endpoint.url, timeout=5),))
    a = Alerting(settings, tmp_path / "state", node="n1", on_delivery=lambda sink, ok: outcomes.append(ok))
    return a.start(), outcomes


def settled(outcomes: list, count: int, timeout: float = 20.0) -> list:
    """The delivery outcomes once count of them are in (the worker records after the answer)."""
    deadline = time.monotonic() + timeout
    while len(outcomes) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(outcomes)


def delivery_states(a: Alerting) -> dict[int, tuple[str, str | None]]:
    with a.spool.lock:
        rows = a.spool.db.execute("SELECT alert_id, state, last_error FROM deliveries").fetchall()
    return {alert_id: (state, error) for alert_id, state, error in rows}


def test_a_4xx_is_not_retried_and_the_queue_moves_on(tmp_path, endpoint):
    a, outcomes = alerting(tmp_path, endpoint)
    try:
        a.verdict(verdict("/ebpfmon-agents/poison-1"))
        a.verdict(verdict("/ebpfmon-agents/fine-1"))
        assert endpoint.wait_for(b"fine-1") == 1  # behind the refused one, delivered
        assert settled(outcomes, 2) == [False, True]
        states = delivery_states(a)
        assert [s for s, _ in states.values()] == ["dropped"]  # the refused one, kept with why; fine-1 done
        assert "HTTP 400" in next(iter(states.values()))[1]
        a.verdict(verdict("/ebpfmon-agents/fine-2"))
        assert endpoint.wait_for(b"fine-2") == 1
        assert settled(outcomes, 3) == [False, True, True]
        assert sum(b"poison-1" in r for r in endpoint.requests) == 1  # tried once: refused for good
    finally:
        a.close()


@pytest.mark.parametrize("fault", ["garbage", "reset"])
def test_a_malformed_answer_or_a_reset_does_not_end_the_worker(tmp_path, endpoint, fault):
    endpoint.faults = [fault, fault]
    a, outcomes = alerting(tmp_path, endpoint)
    try:
        a.verdict(verdict("/ebpfmon-agents/first"))
        assert endpoint.wait_for(b"first", count=3) == 3  # two faults, then taken: retried, not lost
        a.verdict(verdict("/ebpfmon-agents/second"))
        assert endpoint.wait_for(b"second") == 1  # the worker lives on
        assert [t.name for t in threading.enumerate() if t.name.startswith("sink-")] == ["sink-webhook"]
        assert settled(outcomes, 4) == [False, False, True, True]
        assert a.spool.depth() == 0  # nothing left undelivered, nothing sent twice
        assert [json.loads(r)["agent"] for r in endpoint.requests].count("/ebpfmon-agents/second") == 1
    finally:
        a.close()


def test_payloads_stay_under_each_services_limit(tmp_path):
    from ebpfmon.alerts.sinks import PAGERDUTY_DETAILS_MAX, SLACK_TEXT_MAX, PagerDutySink, SlackSink

    # an agent's exec with a huge command line and a record holding thousands of connections
    argv = ["python3", "-c", "x" * 200_000, *[f"arg{i}" * 50 for i in range(2000)]]
    event = make_event({"exec": {"argv": argv, "cgroup": "/ebpfmon-agents/a1"}}, 0)
    alert = {"action": "trigger", "incident": "ebpfmon-k", "rule": "Reverse SSH tunnel", "priority": "CRITICAL",
             "output": "tunnel " + "y" * 100_000, "agent": "/ebpfmon-agents/a1", "count": 1, "actions": [],
             "time_ns": 1, "event": event.to_dict(),
             "quarantine": {"agent": "/ebpfmon-agents/a1",
                            "connections": [{"remote": f"192.0.2.{i % 250}:22", "comm": "ssh"} for i in range(5000)]}}
    pd = PagerDutySink(SinkSettings(type="pagerduty", url="http://127.0.0.1:9/", routing_key="k"), "n1")
    body = pd.body(alert)
    assert len(json.dumps(body)) < 512 * 1024  # PagerDuty refuses events over 512 KB
    details = body["payload"]["custom_details"]
    assert len(json.dumps(details)) <= PAGERDUTY_DETAILS_MAX
    assert "quarantine list" in details["trimmed"] and "ebpfmon-k" in details["trimmed"]  # where the rest is
    assert details["rule"] == "Reverse SSH tunnel" and details["agent"] == "/ebpfmon-agents/a1"
    small = {**alert, "output": "short", "event": make_event({"exec": {"argv": ["ssh"]}}, 0).to_dict(),
             "quarantine": None}
    assert "trimmed" not in pd.body(small)["payload"]["custom_details"]  # nothing cut that fits

    sent = []
    slack = SlackSink(SinkSettings(type="slack", url="http://127.0.0.1:9/"), "n1")
    slack.post = lambda url, body, headers=None: sent.append(body)
    slack.deliver(alert)
    assert len(sent[0]["text"]) <= SLACK_TEXT_MAX + 200 and "trimmed" in sent[0]["text"]


def test_alertmanager_hears_an_open_incident_again_before_it_would_resolve_it(tmp_path, endpoint):
    from ebpfmon.alerts.sinks import AlertmanagerSink

    mono = [1_000 * 10**9]
    settings = AlertSettings(sinks=(SinkSettings(type="alertmanager", url=endpoint.url, timeout=5),))
    a = Alerting(settings, tmp_path / "state", node="n1", monotonic=lambda: mono[0]).start()
    try:
        a.verdict(verdict("/ebpfmon-agents/a1"))
        assert endpoint.wait_for(b"a1") == 1
        [first] = json.loads(endpoint.requests[0])
        assert first["endsAt"] > first["startsAt"]  # not open-ended: Alertmanager would end it at resolve_timeout
        a.tick()
        assert sum(b"a1" in r for r in endpoint.requests) == 1  # not yet
        mono[0] += int(AlertmanagerSink.refresh_seconds * 1e9) + 1
        a.tick()
        assert endpoint.wait_for(b"a1", count=2) == 2  # sent again while open, well before its endsAt
        [again] = json.loads(endpoint.requests[1])
        assert again["labels"]["incident"] == first["labels"]["incident"] and again["endsAt"] >= first["endsAt"]
        a.resolve_agent("/ebpfmon-agents/a1", "done")
        assert endpoint.wait_for(b"a1", count=3) == 3
        [resolve] = json.loads(endpoint.requests[2])
        assert resolve["endsAt"] < first["endsAt"]  # ended now, not held
        assert a.open == {} and a.refreshed == {}  # nothing left to send again
    finally:
        a.close()
