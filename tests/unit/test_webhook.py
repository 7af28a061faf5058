"""The webhook and Slack sinks against a real HTTP server on loopback, and the console sink:
what each one sends for a trigger and a resolve."""

from __future__ import annotations

import pytest

from helpers import wait_for
from servers.webhook import Endpoint

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Verdict

AGENT = "/ebpfmon-agents/a1"


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.close()


def verdict(argv=("ssh", "-R", "1:h:2", "x"), output="tunnel by /ebpfmon-agents/a1") -> Verdict:
    event = make_event({"exec": {"argv": list(argv), "cgroup": AGENT}}, 0)
    return Verdict("Reverse SSH tunnel", "CRITICAL", output, ["T1572"], ["cut_network"], True, AGENT, event)


def run(tmp_path, *sinks: SinkSettings, verdicts=(verdict(),)) -> None:
    a = Alerting(AlertSettings(sinks=sinks), tmp_path / "state", node="gpu-node-7").start()
    try:
        for v in verdicts:
            a.verdict(v)
        a.resolve_agent(AGENT, "done with it")
        wait_for(lambda: a.spool.depth() == 0, "every alert delivered")
    finally:
        a.close()


def test_a_webhook_gets_the_alert_and_its_resolve(tmp_path, endpoint):
    run(tmp_path, SinkSettings(type="webhook", url=endpoint.url + "/hook", timeout=5))
    (path, kind, trigger), (_, _, resolve) = endpoint.wait(2)
    assert (path, kind) == ("/hook", "application/json")
    assert trigger["action"] == "trigger" and trigger["rule"] == "Reverse SSH tunnel"
    assert trigger["agent"] == AGENT and trigger["node"] == "gpu-node-7" and trigger["actions"] == ["cut_network"]
    assert trigger["event"]["argv"] == ["ssh", "-R", "1:h:2", "x"]
    assert resolve["action"] == "resolve" and resolve["incident"] == trigger["incident"]


def test_a_falco_webhook_gets_falcos_json_and_no_resolve(tmp_path, endpoint):
    run(tmp_path, SinkSettings(type="webhook", url=endpoint.url, format="falco", timeout=5),
        SinkSettings(type="webhook", name="marker", url=endpoint.url + "/marker", timeout=5))
    got = endpoint.wait(3)  # the marker sink's trigger and resolve, and the falco trigger
    falco = [body for path, _, body in got if path == "/"]
    assert len(falco) == 1 and falco[0]["rule"] == "Reverse SSH tunnel" and falco[0]["priority"] == "Critical"
    assert falco[0]["hostname"] == "gpu-node-7" and falco[0]["output_fields"]["ebpfmon.agent"] == AGENT


def test_slack_gets_the_summary_with_its_control_sequences_escaped(tmp_path, endpoint):
    loud = verdict(output="tunnel <!channel> <https://x.example|click> & more")
    run(tmp_path, SinkSettings(type="slack", url=endpoint.url + "/services/T/B/X", timeout=5), verdicts=(loud,))
    (path, _, trigger), (_, _, resolve) = endpoint.wait(2)
    assert path == "/services/T/B/X" and set(trigger) == {"text"}
    assert trigger["text"] == ("ebpfmon on gpu-node-7: [CRITICAL] Reverse SSH tunnel: tunnel &lt;!channel&gt; "
                               "&lt;https://x.example|click&gt; &amp; more")
    assert resolve["text"] == "ebpfmon on gpu-node-7: [resolved] Reverse SSH tunnel: released: done with it"


def test_the_console_prints_one_line_per_alert(tmp_path, capsys):
    run(tmp_path, SinkSettings(type="console"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("[CRITICAL] Reverse SSH tunnel: tunnel by /ebpfmon-agents/a1")
    assert "\x1b[" not in lines[0]  # not a terminal: no colours
    assert lines[1].endswith("[resolved] Reverse SSH tunnel: released: done with it")
