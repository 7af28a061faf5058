"""ebpfmon audit: check that the audit log is whole, and search it."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import Annotated

import typer

from ebpfmon.alerts.audit import audit_files, read_events, verify
from ebpfmon.cli.common import ConfigOption, StateDirOption, effective_config, time_arg
from ebpfmon.events import KIND_GROUPS
from ebpfmon.output import table_line
from ebpfmon.rules.engine import Engine
from ebpfmon.service.assemble import load_ruleset, rule_context

app = typer.Typer(help="The audit log: check that nobody rewrote it, and search it.", no_args_is_help=True,
                  epilog="Examples:\n\n  sudo ebpfmon audit verify\n\n"
                         "  sudo ebpfmon audit search --agent '*/job-42' --kind exec --since 2h")

SEARCH_EPILOG = """\
Examples:\n\n
  ebpfmon audit search --agent '/ebpfmon-agents/job-42' --since 2h\n\n
  ebpfmon audit search --kind connect --since 2026-12-03T10:00 --until 2026-12-03T11:00\n\n
  ebpfmon audit search --rule 'Reverse SSH tunnel' --json\n\n
--agent is a glob on the agent's cgroup (or a part of it); --kind takes event kinds (exec,
connect, udp_send, gpu_open, refused, dns...) or the groups exec, connect, gpu; --rule replays
each event through the configured rules and keeps those that make that rule fire, as the
daemon judged them. Oldest first; --limit stops early.
"""


def _audit_dir(directory: Path | None, config_file, state_dir) -> Path:
    if directory is None:
        config, _ = effective_config(config_file, state_dir=state_dir)
        directory = Path(config.state_dir) / "audit"
    if not directory.is_dir():
        print(f"ebpfmon: error: no audit log at {directory}.")
        raise typer.Exit(2)
    return directory

EPILOG = """\
Examples:\n\n
  ebpfmon audit verify                       the daemon's log (/var/lib/ebpfmon/audit)\n\n
  ebpfmon audit verify /mnt/copy/audit       a copy taken off the node\n\n
Every line of the log carries the hash of the line before it, across rotated files, and
audit/chain-head the last one's; the daemon also logs the head to the journal once a minute.
verify walks the chain: exit 0 when it is whole, 1 naming the first line that was changed,
removed, inserted or cut off.
"""


@app.command("verify", epilog=EPILOG)
def verify_command(
    directory: Annotated[Path | None, typer.Argument(help="The audit directory (default: the state "
                                                          "directory's audit/).")] = None,
    config_file: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Check the audit log's hash chain, oldest file to newest."""
    found = verify(_audit_dir(directory, config_file, state_dir))
    if found.problem:
        print(f"BROKEN: {found.problem} (after {found.records} whole record(s))")
        raise typer.Exit(1)
    before = f"; {found.unchained} line(s) from before the chain, not checked" if found.unchained else ""
    print(f"ok: {found.records} record(s) in {found.files} file(s), the chain is whole{before}")


@app.command("search", epilog=SEARCH_EPILOG)
def search(
    directory: Annotated[Path | None, typer.Argument(help="The audit directory (default: the state "
                                                          "directory's audit/).")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="The agent's cgroup: a glob, or a part of it.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Event kinds or groups, comma-separated.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="From: 30m, 2h, 1d back, or a time.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="To: 30m, 2h, 1d back, or a time.")] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only events that make this rule fire.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines, as the audit log has them.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="Stop after this many (0: no limit).")] = 0,
    config_file: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Find events in the audit log by agent, kind, time and rule, without jq."""
    config, _ = effective_config(config_file, state_dir=state_dir)
    files = audit_files(_audit_dir(directory, config_file, state_dir))
    kinds = None
    if kind:
        kinds = set()
        for name in (k.strip() for k in kind.split(",") if k.strip()):
            kinds.update(KIND_GROUPS.get(name, (name,)))
    start, end = time_arg(since), time_arg(until) or None
    engine = None
    if rule:
        ruleset = load_ruleset(config)
        if ruleset.get(rule) is None:
            raise typer.BadParameter(f"no rule {rule!r} is loaded; 'ebpfmon rules list' names them", param_hint="--rule")
        engine = Engine(ruleset, rule_context(config))
    bad: list[str] = []
    shown = 0
    for event in read_events(files, bad):
        if kinds is not None and event.kind not in kinds:
            continue
        if event.time_ns < start or (end is not None and event.time_ns > end):
            continue
        if agent is not None:
            owner = config.agents.agent_of(event.cgroup) or event.cgroup or ""
            if not (fnmatch.fnmatchcase(owner, agent) or agent in owner):
                continue
        if engine is not None and rule not in {v.rule for v in engine.evaluate(event)}:
            continue
        print(event.to_json() if json_out else table_line(event))
        shown += 1
        if limit and shown >= limit:
            break
    if bad:
        print(f"ebpfmon: {len(bad)} line(s) did not read as events; the first: {bad[0]}", file=sys.stderr)
    if not json_out:
        print(f"{shown} event(s) from {len(files)} file(s)", file=sys.stderr)
