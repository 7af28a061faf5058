"""Falco-compatible JSON (format: falco on webhook and jsonl sinks): every shipped rule's alert,
as the sink writes it, against the schema of Falco's JSON output as falcosidekick reads it
(output, priority, rule, time in RFC 3339 with nanoseconds, output_fields, source, tags,
hostname)."""

import json
import re

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.loader import RULES_DIR, load_rules

from unit.test_rule_packs import ALL_CASES, CASES_DIR

FALCO_PRIORITIES = {"Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug"}
RFC3339_NANO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
FALCO_OUTPUT = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{9}: (\w+) ")


def problems(payload: dict) -> list[str]:
    found = []
    types = {"output": str, "priority": str, "rule": str, "time": str, "output_fields": dict, "source": str,
             "tags": list, "hostname": str}
    for key, kind in types.items():
        if not isinstance(payload.get(key), kind):
            found.append(f"{key}: expected {kind.__name__}, got {payload.get(key)!r}")
    if found:
        return found
    if payload["priority"] not in FALCO_PRIORITIES:
        found.append(f"priority {payload['priority']!r} is not one of Falco's")
    if not RFC3339_NANO.match(payload["time"]):
        found.append(f"time {payload['time']!r} is not RFC 3339 with nanoseconds")
    match = FALCO_OUTPUT.match(payload["output"])
    if not match or match.group(1) != payload["priority"]:
        found.append(f"output {payload['output'][:60]!r} does not start as Falco's (time: Priority ...)")
    for name, value in payload["output_fields"].items():
        if not re.match(r"^[a-z_]+(\.[a-z_]+)*(\[[^\]]+\])?$", name):
            found.append(f"output_fields key {name!r} is not a field name")
        if not (value is None or isinstance(value, (str, int, float, bool)) or
                (isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value))):
            found.append(f"output_fields[{name!r}] is {type(value).__name__}")
    if not isinstance(payload["output_fields"].get("evt.time"), int):
        found.append("output_fields has no evt.time in ns")
    if not all(isinstance(t, str) for t in payload["tags"]):
        found.append("tags are not strings")
    return found


def test_every_shipped_rules_alert_is_falco_json(tmp_path):
    ruleset = load_rules([RULES_DIR, CASES_DIR / "local.yaml"])
    path = tmp_path / "falco.jsonl"
    settings = AlertSettings(dedup_seconds=0, sinks=(SinkSettings(type="jsonl", path=str(path), format="falco"),))
    alerting = Alerting(settings, tmp_path / "state", node="gpu-node-7")
    rules_seen = set()
    try:
        for case in ALL_CASES:
            verdicts, _ = case.check(ruleset)
            for verdict in verdicts:
                alerting.verdict(verdict)
                rules_seen.add(verdict.rule)
        alerting.resolve_agent("/ebpfmon-agents/coder-3", "done")  # Falco has no resolves: none written
    finally:
        alerting.close()
    shipped = {r.name for r in ruleset.rules if r.source.startswith(str(RULES_DIR))}
    assert shipped <= rules_seen  # every shipped rule's alert is checked
    payloads = [json.loads(line) for line in path.read_text().splitlines()]
    assert {p["rule"] for p in payloads} == rules_seen
    for payload in payloads:
        assert problems(payload) == [], payload["rule"]
        assert payload["hostname"] == "gpu-node-7" and payload["source"] == "syscall"
    tunnel = next(p for p in payloads if p["rule"] == "Reverse SSH tunnel")
    assert tunnel["priority"] == "Critical" and "T1572" in tunnel["tags"]
    assert "proc.cmdline" in tunnel["output_fields"] and "-R" in tunnel["output_fields"]["proc.cmdline"]


def test_the_schema_check_can_fail():
    good = {"output": "16:38:15.123456789: Warning x", "priority": "Warning", "rule": "r",
            "time": "2026-12-03T16:38:15.123456789Z", "output_fields": {"evt.time": 1, "proc.name": "sh"},
            "source": "syscall", "tags": ["a"], "hostname": "h"}
    assert problems(good) == []
    assert problems({**good, "priority": "WARNING"})
    assert problems({**good, "time": "2026-12-03 16:38:15"})
    assert problems({**good, "output_fields": {"evt.time": 1, "x": {"nested": 1}}})
    assert problems({k: v for k, v in good.items() if k != "rule"})
