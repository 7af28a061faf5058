"""ebpfmon rules: list, validate and test rules."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ebpfmon import events as ev
from ebpfmon.cli.common import (AgentRootOption, ConfigOption, NoDefaultsOption, RulesOption, StateDirOption,
                                effective_config, with_rules)
from ebpfmon.config import Config
from ebpfmon.errors import EbpfmonError
from ebpfmon.output import clock
from ebpfmon.rules.cases import load_cases
from ebpfmon.rules.engine import Engine
from ebpfmon.rules.loader import load_rules, rule_paths
from ebpfmon.service import control
from ebpfmon.service.assemble import rule_context

app = typer.Typer(help="List, validate and test rules; resume those the containment breaker suspended.",
                  no_args_is_help=True,
                  epilog="Examples:\n\n  ebpfmon rules list\n\n  ebpfmon rules validate --rules my-rules.yaml\n\n"
                         "  ebpfmon rules test --events /var/lib/ebpfmon/audit/events.jsonl")



def configured_rules(config_file: Path | None, extra: list[Path] | None, no_defaults: bool,
                     agent_root: str | None = None) -> Config:
    """The configuration, with the rules the daemon would load, and extra after them."""
    config, _ = effective_config(config_file, agent_root)
    return with_rules(config, extra, no_defaults)


@app.command("list", epilog="Example:\n\n  ebpfmon rules list --rules /etc/ebpfmon/rules.d")
def list_rules(rules: RulesOption = None, no_defaults: NoDefaultsOption = False,
               config_file: ConfigOption = None) -> None:
    """Show the loaded rules: priority, event kinds, state, actions, where defined."""
    ruleset = load_rules(rule_paths(configured_rules(config_file, rules, no_defaults).rules))
    rows = [("RULE", "PRIORITY", "KINDS", "STATE", "ACTIONS", "ENABLED", "SOURCE")]
    for r in ruleset.rules:
        rows.append((r.name, r.priority, ",".join(sorted(r.kinds)), r.stateful or "-",
                     ",".join(r.actions) or "-", "yes" if r.enabled else "no",
                     r.source.replace(str(Path.cwd()) + "/", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


@app.command("validate", epilog="Examples:\n\n  ebpfmon rules validate\n\n"
             "  ebpfmon rules validate local.yaml          the packs plus your overrides\n\n"
             "  ebpfmon rules validate --no-defaults mine.yaml\n\n"
             "Exit status 0 when every file loads, 1 with a file:line:col list of problems.")
def validate(files: Annotated[Optional[list[Path]], typer.Argument(
        help="Rule files or directories, loaded after the configured ones (the shipped packs by default).")] = None,
        no_defaults: NoDefaultsOption = False, config_file: ConfigOption = None) -> None:
    """Check rule files: YAML, fields, operators, lists, macros, regexes, outputs."""
    ruleset = load_rules(rule_paths(configured_rules(config_file, files, no_defaults).rules))
    print(f"ok: {len(ruleset.rules)} rules ({sum(r.enabled for r in ruleset.rules)} enabled), "
          f"{len(ruleset.lists)} lists, from {len(ruleset.files)} file(s)")


@app.command("test", epilog="Examples:\n\n"
             "  ebpfmon trace --json --duration 60 > trace.jsonl; ebpfmon rules test --events trace.jsonl\n\n"
             "  ebpfmon rules test --cases tests/rules/tunnels.yaml\n\n"
             "Exit status 1 when a case fails or a trace line is not an event.")
def test(
    events: Annotated[Optional[Path], typer.Option("--events", "-e", metavar="TRACE.jsonl",
                                                   help="Replay a recorded trace (ebpfmon trace --json).")] = None,
    cases: Annotated[Optional[list[Path]], typer.Option("--cases", "-c", metavar="CASES.yaml",
                                                        help="Rule test cases: events and the rules they must "
                                                             "(not) fire.")] = None,
    rules: RulesOption = None,
    no_defaults: NoDefaultsOption = False,
    json: Annotated[bool, typer.Option("--json", help="Verdicts as JSON lines.")] = False,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
) -> None:
    """Replay recorded events, or rule test cases, through the rules."""
    if not events and not cases:
        raise typer.BadParameter("give --events TRACE.jsonl, --cases CASES.yaml, or both")
    config = configured_rules(config_file, rules, no_defaults, agent_root)
    ruleset = load_rules(rule_paths(config.rules))
    failed = False
    if events:
        engine = Engine(ruleset, rule_context(config))
        read = bad = fired = 0
        for number, item in ev.read_jsonl(events):
            if isinstance(item, Exception):
                print(f"ebpfmon: {item}", file=sys.stderr)
                bad += 1
                continue
            read += 1
            for verdict in engine.evaluate(item):
                fired += 1
                print(verdict.to_json() if json else
                      f"{clock(verdict.time_ns)} line {number}: {verdict.priority} {verdict.rule}: {verdict.output}")
        print(f"ebpfmon: {read} events replayed, {fired} verdicts, {bad} bad lines", file=sys.stderr)
        failed |= bad > 0
    for path in cases or []:
        try:
            loaded = load_cases(path)
        except (OSError, ValueError) as e:
            print(f"ebpfmon: error: {e}", file=sys.stderr)
            failed = True
            continue
        for case in loaded:
            _, failures = case.check(ruleset)
            print(f"{'FAIL' if failures else 'ok  '}  {path}: {case.name}")
            for failure in failures:
                print(f"      {failure}")
            failed |= bool(failures)
    if failed:
        raise typer.Exit(1)


def _ask_daemon(config_file: Path | None, state_dir: str | None, message: dict) -> dict:
    config, _ = effective_config(config_file, state_dir=state_dir)
    answer = control.request(config.state_dir, message)
    if answer is None:
        raise EbpfmonError("no daemon is running (no control socket in the state directory "
                           f"{config.state_dir}).", "Start it with 'ebpfmon run', or give its --state-dir.")
    if not answer.get("ok"):
        raise EbpfmonError(answer.get("error", "the daemon refused"), "See 'ebpfmon rules suspended'.")
    return answer


@app.command("suspended", epilog="Example:\n\n  ebpfmon rules suspended")
def suspended(config_file: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Show the rules the containment breaker suspended: they alert, they contain no one."""
    rules = _ask_daemon(config_file, state_dir, {"cmd": "suspended"})["rules"]
    if not rules:
        print("no rule is suspended")
    for rule, s in rules.items():
        print(f"{rule}: suspended at {clock(s['since_ns'])} until {clock(s['until_ns'])}, after containing "
              f"{len(s['agents'])} agents: {', '.join(s['agents'][:10])}")


@app.command("resume", epilog="Example:\n\n  ebpfmon rules resume 'Network scanner started'")
def resume(rule: Annotated[str, typer.Argument(help="The rule's name, as the breaker's page gives it.")],
           config_file: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Let a rule the containment breaker suspended contain again (check the rule first)."""
    print(_ask_daemon(config_file, state_dir, {"cmd": "resume", "rule": rule})["message"])
