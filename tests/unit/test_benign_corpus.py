"""The benign corpus: the red team's benign session scenarios (git over ssh, builds, a pytest run,
dev servers, a loopback rendezvous, an entitled GPU job...), recorded live from the daemon's audit
log (tests/redteam/conftest.py, EBPFMON_REDTEAM_RECORD), replayed through the shipped packs:
not one alert. Record it again when the scenarios change."""

from collections import Counter
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.host.network import NetworkClassifier
from ebpfmon.rules.engine import Engine
from ebpfmon.rules.fields import Context
from ebpfmon.rules.loader import load_rules

CORPUS = Path(__file__).parent.parent / "redteam" / "benign-session.jsonl.gz"


def test_the_recorded_benign_session_raises_no_alert():
    # as the red team's daemon saw it: GPUs for gpu-* agents, 198.51.100.128/25 the internal network
    context = Context(gpu_entitled=("/ebpfmon-agents/gpu-*",),
                      networks=NetworkClassifier(["198.51.100.128/25"], use_routes=False))
    engine = Engine(load_rules(), context)
    kinds, verdicts = Counter(), []
    for number, item in ev.read_jsonl(CORPUS):
        assert not isinstance(item, Exception), item
        kinds[item.kind] += 1
        verdicts += [(number, v.rule, v.output) for v in engine.evaluate(item)]
    assert verdicts == []
    # what a session holds, so an empty or shrunken corpus cannot pass
    assert kinds["exec"] > 300 and kinds["connect"] > 50 and kinds["gpu_open"] >= 1
    assert len({e.cgroup for _, e in ev.read_jsonl(CORPUS)}) >= 30  # one agent per scenario
