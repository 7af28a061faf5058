"""The shipped rule packs against their cases (tests/rules/*.yaml), with a local override file."""

import dataclasses
from pathlib import Path

import pytest

from ebpfmon.rules.cases import load_cases
from ebpfmon.rules.loader import RULES_DIR, load_rules
from helpers import REPO

CASES_DIR = REPO / "tests/rules"
CASE_FILES = sorted(p for p in CASES_DIR.glob("*.yaml") if p.name != "local.yaml")


@pytest.fixture(scope="module")
def ruleset():
    return load_rules([RULES_DIR, CASES_DIR / "local.yaml"])


ALL_CASES = [case for f in CASE_FILES for case in load_cases(f)]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: f"{Path(c.source.split(':')[0]).stem}: {c.name}")
def test_case(ruleset, case):
    _, failures = case.check(ruleset)
    assert not failures, "; ".join(failures)


def test_every_rule_has_a_positive_and_a_negative_case(ruleset):
    positive = {r for c in ALL_CASES for r in (c.fires or [])}
    negative = {r for c in ALL_CASES for r in c.silent}
    for rule in ruleset.rules:
        assert rule.name in positive, f"no case makes {rule.name!r} fire"
        assert rule.name in negative, f"no case keeps {rule.name!r} silent"


def test_every_shipped_rule_has_its_priority_and_actions_checked():
    shipped = {r.name for r in load_rules([RULES_DIR]).rules}
    checked = {name for c in ALL_CASES for name, want in c.expected.items() if {"priority", "actions"} <= set(want)}
    assert shipped - checked == set()


def test_a_case_that_expects_other_actions_or_priority_fails(ruleset):
    [case] = [c for c in ALL_CASES if c.name == "connect to a pool port outside"]
    wrong = dataclasses.replace(case, expected={"Connection to a mining pool port": {"priority": "CRITICAL",
                                                                                     "actions": ["kill"]}})
    _, failures = wrong.check(ruleset)
    assert failures == ["'Connection to a mining pool port' fired at WARNING, expected CRITICAL",
                        "'Connection to a mining pool port' asked for ['deny_connect'], expected ['kill']"]


def test_every_pack_has_its_case_file():
    packs = {p.stem for p in RULES_DIR.glob("*.yaml") if not p.stem.startswith("00-")}
    assert packs == {p.stem for p in CASE_FILES}


def test_every_rule_explains_itself(ruleset):
    for rule in ruleset.rules:
        assert len(rule.desc) > 30, rule.name
        assert rule.tags, rule.name
        assert any(t.startswith("T1") for t in rule.tags), f"{rule.name}: no MITRE ATT&CK id"
