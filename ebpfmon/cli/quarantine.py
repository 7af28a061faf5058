"""ebpfmon quarantine: list, release and cut agents, through the running daemon or
directly on the kernel state when none runs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.alerts.spool import Spool
from ebpfmon.cli.common import AgentRootOption, ConfigOption, StateDirOption, effective_config
from ebpfmon.containment.quarantine import QuarantineStore, Record
from ebpfmon.errors import EbpfmonError
from ebpfmon.host.users import user_name
from ebpfmon.output import safe
from ebpfmon.service import control
from ebpfmon.service.assemble import offline_containment

app = typer.Typer(help="Contained agents: list them, release them, cut one by hand.", no_args_is_help=True,
                  epilog="Examples:\n\n  sudo ebpfmon quarantine list\n\n"
                         "  sudo ebpfmon quarantine release /agents/agent-7 --reason 'false positive, ticket 123'")

EPILOG = """\
Examples:\n\n
  ebpfmon quarantine list\n\n
  ebpfmon quarantine release /ebpfmon-agents/agent-7 --reason "tunnel was a test"\n\n
  ebpfmon quarantine cut /ebpfmon-agents/agent-7 --reason "acting strangely"\n\n
With a daemon running these go through its control socket; without one they
load the enforcement programs themselves and work on the pinned kernel state
and the records in the state directory.
"""


def _who() -> str:
    return f"{user_name(os.getuid())} (cli)"


def _offline(config):
    """Containment straight on the kernel state (no daemon), from the same configuration."""
    spool = Spool(Path(config.state_dir) / "alerts.db")

    def released(record: Record) -> None:
        # no daemon to page: the resolves wait in the spool for the next one to deliver
        pending = Alerting.resolves_for(spool, record.agent, record.release_reason or "")
        if pending:
            print(f"ebpfmon: {pending} incident resolve(s) spooled for the daemon to deliver")

    return offline_containment(config, on_release=released)


def _when(ns: int | None) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S") if ns else "-"


def _show(record: dict) -> None:
    """A record as a person reads it: every text an agent could have chosen (its cgroup name, a
    process name, a reason quoted from a command line) escaped."""
    actions = ", ".join(f"{a['action']}:{a['result']}" for a in record["actions"])
    print(f"{safe(record['agent'])}  {record['status']}  since {_when(record['opened_ns'])}  "
          f"rule: {safe(record['rule'])}")
    container = record.get("container")
    if container:
        print(f"    container: {safe(container.get('name') or '?')}  image: {safe(container.get('image') or '-')}  "
              f"{container['runtime']} {container['id'][:12]}")
    print(f"    actions: {safe(actions) or '-'}")
    for conn in record["connections"][:10]:
        print(f"    held: {conn['protocol']} {conn['local']} -> {conn['remote']} {conn['state']} "
              f"pid={conn['pid']} {safe(conn['comm'] or '')}")
    if record["status"] != "active":
        print(f"    {record['status']} {_when(record['released_ns'])} by {safe(record['released_by'] or '')}: "
              f"{safe(record['release_reason'] or '')}")


def _answer(answer: dict) -> dict:
    if not answer.get("ok"):
        raise EbpfmonError(answer.get("error", "the daemon refused"), "")
    return answer


@app.command("list", epilog=EPILOG)
def list_records(
    all_records: Annotated[bool, typer.Option("--all", help="Released and closed records too.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Records as JSON.")] = False,
    config_file: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Show contained agents: the rule, the actions, the connections they held."""
    config, _ = effective_config(config_file, state_dir=state_dir)
    state_dir = config.state_dir
    answer = control.request(state_dir, {"cmd": "list"})
    if answer is None:
        records = [dataclasses.asdict(r) for r in QuarantineStore(state_dir).records]
        source = "records in " + state_dir + " (no daemon running)"
    else:
        records = _answer(answer)["records"]
        source = "the running daemon"
    shown = [r for r in records if all_records or r["status"] == "active"]
    if json_out:
        print(json.dumps(shown, indent=1))
        return
    print(f"{len(shown)} {'record(s)' if all_records else 'agent(s) in quarantine'}, from {source}")
    for record in shown:
        _show(record)


def _change(cmd: str, agent: str, reason: str, config_file: Path | None, agent_root: str | None,
            state_dir: str | None) -> None:
    config, _ = effective_config(config_file, agent_root, state_dir)
    answer = control.request(config.state_dir, {"cmd": cmd, "agent": agent, "reason": reason})
    if answer is not None:
        record = _answer(answer)["record"]
    else:
        containment = _offline(config)
        done: Record = (containment.release(agent, _who(), reason) if cmd == "release"
                        else containment.cut(agent, _who(), reason))
        record = dataclasses.asdict(done)
    _show(record)


@app.command("release", epilog=EPILOG)
def release(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, as listed.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; kept in the record.")] = "",
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Give an agent its network and GPUs back, thaw it, and close its record."""
    _change("release", agent, reason, config_file, agent_root, state_dir)


@app.command("cut", epilog=EPILOG)
def cut(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, below the agent root.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; required, kept in the record.")] = ...,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Cut an agent's network by hand (loopback too, unless enforce.keep_open lists it)."""
    _change("cut", agent, reason, config_file, agent_root, state_dir)
