"""The wall clock jumps (an NTP step, a VM resumed, an operator's date -s): dedup windows and
retry backoff are measured by the monotonic clock, so a jump back does not stall alerts and a
jump forward does not send them early or reopen incidents. The clocks are injected here: a test
must not move the machine's own."""

from __future__ import annotations

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings

from faults.test_sinks import Misbehaving, verdict

HOUR = 3600 * 10**9
SECOND = 10**9


class Clocks:
    def __init__(self):
        self.wall = 1_800_000_000 * SECOND
        self.mono = 1_000 * SECOND

    def advance(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns


def alerting(tmp_path, clocks: Clocks, url: str, state: str = "state") -> Alerting:
    settings = AlertSettings(dedup_seconds=60, sinks=(SinkSettings(type="jsonl", path=str(tmp_path / "a.jsonl")),
                                                      SinkSettings(type="webhook", url=url, timeout=5)))
    return Alerting(settings, tmp_path / state, node="n1", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def sent(tmp_path) -> list[str]:
    import json
    return [json.loads(line)["action"] + ":" + str(json.loads(line)["count"])
            for line in (tmp_path / "a.jsonl").read_text().splitlines()]


def test_a_jump_back_does_not_stall_the_dedup_window(tmp_path):
    endpoint = Misbehaving()
    clocks = Clocks()
    a = alerting(tmp_path, clocks, endpoint.url)
    try:
        a.verdict(verdict("/ebpfmon-agents/a1"))
        clocks.wall -= 2 * HOUR  # the wall clock steps back two hours
        clocks.advance(61 * SECOND)
        a.verdict(verdict("/ebpfmon-agents/a1"))  # the window passed by the monotonic clock
        assert sent(tmp_path) == ["trigger:1", "trigger:2"]
    finally:
        a.close()
        endpoint.close()


def test_a_jump_forward_neither_sends_early_nor_opens_a_new_incident(tmp_path):
    endpoint = Misbehaving()
    clocks = Clocks()
    a = alerting(tmp_path, clocks, endpoint.url)
    try:
        a.verdict(verdict("/ebpfmon-agents/a1"))
        clocks.wall += 5 * HOUR  # forward: the window has not passed for the monotonic clock
        a.verdict(verdict("/ebpfmon-agents/a1"))
        a.tick()
        assert sent(tmp_path) == ["trigger:1"]  # counted, not sent: one incident
        assert len(a.open) == 1
        clocks.advance(61 * SECOND)
        a.tick()
        assert sent(tmp_path) == ["trigger:1", "trigger:2"]  # the count, on the same incident
        assert {r.split(":")[0] for r in sent(tmp_path)} == {"trigger"} and len(a.open) == 1
    finally:
        a.close()
        endpoint.close()


def test_retry_backoff_follows_the_monotonic_clock(tmp_path):
    endpoint = Misbehaving()
    endpoint.faults = ["reset"]
    clocks = Clocks()
    a = alerting(tmp_path, clocks, endpoint.url).start()
    try:
        a.verdict(verdict("/ebpfmon-agents/a1"))
        assert endpoint.wait_for(b"a1") == 1  # failed once: a retry is due in under a second
        clocks.wall -= 2 * HOUR  # a jump back would have put the retry two hours away
        clocks.advance(2 * SECOND)
        assert endpoint.wait_for(b"a1", count=2) == 2  # retried on time
    finally:
        a.close()
        endpoint.close()


def test_an_earlier_runs_retry_times_do_not_hold_the_next_one(tmp_path):
    endpoint = Misbehaving()
    clocks = Clocks()
    first = alerting(tmp_path, clocks, "http://127.0.0.1:9/unreachable")
    first.verdict(verdict("/ebpfmon-agents/a1"))
    with first.spool.lock:  # a retry far in the future of that run's monotonic clock
        first.spool.db.execute("UPDATE deliveries SET next_try_ns = ?", (clocks.mono + 10 * HOUR,))
    first.close()
    clocks.mono = 5 * SECOND  # a reboot: the monotonic clock starts again
    settings = AlertSettings(sinks=(SinkSettings(type="webhook", url=endpoint.url, timeout=5),))
    second = Alerting(settings, tmp_path / "state", node="n1", clock=lambda: clocks.wall,
                      monotonic=lambda: clocks.mono).start()
    try:
        assert endpoint.wait_for(b"a1") == 1  # delivered at once by the next run
    finally:
        second.close()
        endpoint.close()
