"""ebpfmon quarantine: list, release and cut agents, through the running daemon or
directly on the kernel state when none runs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pwd
from pathlib import Path
from typing import Annotated

import typer

from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.cli.common import AgentRootOption, make_config
from ebpfmon.cli.run import StateDirOption
from ebpfmon.config import DEFAULT_AGENT_ROOT, Config
from ebpfmon.service import control
from ebpfmon.alerts.incidents import Alerting
from ebpfmon.alerts.spool import Spool
from ebpfmon.containment.quarantine import QuarantineStore, Record
from ebpfmon.errors import EbpfmonError

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
    return f"{pwd.getpwuid(os.getuid()).pw_name} (cli)"


def _offline(agent_root: str, state_dir: str):
    """A containment working directly on the kernel (no daemon): programs attached, pinned maps."""
    from ebpfmon.containment.actions import Containment
    from ebpfmon.kernel.enforcer import Enforcer, pin_dir
    from ebpfmon.kernel.probeset import ProbeSet, require_root

    require_root()
    config = make_config(agent_root)
    config = dataclasses.replace(config, state_dir=state_dir)
    hierarchy = Hierarchy()
    probes = ProbeSet(["enforce"], pin_dir=pin_dir(hierarchy, config.agent_root)).load()
    enforcer = Enforcer(probes, hierarchy, config.agent_root, config.agent_level)
    from ebpfmon.service.daemon import configure_enforcer
    from ebpfmon.rules.loader import load_rules

    configure_enforcer(enforcer, config, load_rules().lists)
    enforcer.attach()
    spool = Spool(Path(state_dir) / "alerts.db")

    def released(record: Record) -> None:
        # no daemon to page: the resolves wait in the spool for the next one to deliver
        pending = Alerting.resolves_for(spool, record.agent, record.release_reason or "")
        if pending:
            print(f"ebpfmon: {pending} incident resolve(s) spooled for the daemon to deliver")

    return Containment(enforcer, hierarchy, config, QuarantineStore(state_dir), on_release=released)


def _when(ns: int | None) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S") if ns else "-"


def _show(record: dict) -> None:
    actions = ", ".join(f"{a['action']}:{a['result']}" for a in record["actions"])
    print(f"{record['agent']}  {record['status']}  since {_when(record['opened_ns'])}  rule: {record['rule']}")
    print(f"    actions: {actions or '-'}")
    for conn in record["connections"][:10]:
        print(f"    held: {conn['protocol']} {conn['local']} -> {conn['remote']} {conn['state']} "
              f"pid={conn['pid']} {conn['comm'] or ''}")
    if record["status"] != "active":
        print(f"    {record['status']} {_when(record['released_ns'])} by {record['released_by']}: "
              f"{record['release_reason'] or ''}")


def _answer(answer: dict) -> dict:
    if not answer.get("ok"):
        raise EbpfmonError(answer.get("error", "the daemon refused"), "")
    return answer


@app.command("list", epilog=EPILOG)
def list_records(
    all_records: Annotated[bool, typer.Option("--all", help="Released and closed records too.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Records as JSON.")] = False,
    state_dir: StateDirOption = None,
) -> None:
    """Show contained agents: the rule, the actions, the connections they held."""
    state_dir = state_dir or Config.state_dir
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


def _change(cmd: str, agent: str, reason: str, agent_root: str, state_dir: str | None) -> None:
    state_dir = state_dir or Config.state_dir
    answer = control.request(state_dir, {"cmd": cmd, "agent": agent, "reason": reason})
    if answer is not None:
        record = _answer(answer)["record"]
    else:
        containment = _offline(agent_root, state_dir)
        done: Record = (containment.release(agent, _who(), reason) if cmd == "release"
                        else containment.cut(agent, _who(), reason))
        record = dataclasses.asdict(done)
    _show(record)


@app.command("release", epilog=EPILOG)
def release(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, as listed.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; kept in the record.")] = "",
    agent_root: AgentRootOption = DEFAULT_AGENT_ROOT,
    state_dir: StateDirOption = None,
) -> None:
    """Give an agent its network and GPUs back, thaw it, and close its record."""
    _change("release", agent, reason, agent_root, state_dir)


@app.command("cut", epilog=EPILOG)
def cut(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, below the agent root.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; required, kept in the record.")] = ...,
    agent_root: AgentRootOption = DEFAULT_AGENT_ROOT,
    state_dir: StateDirOption = None,
) -> None:
    """Cut an agent's network by hand (loopback stays open)."""
    _change("cut", agent, reason, agent_root, state_dir)
