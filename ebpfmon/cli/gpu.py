"""ebpfmon gpu: which agent may use which GPU, grants from the scheduler, and who holds what."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from ebpfmon.cli.common import AgentRootOption, ConfigOption, StateDirOption, effective_config
from ebpfmon.errors import EbpfmonError
from ebpfmon.host.users import user_name
from ebpfmon.output import safe
from ebpfmon.service import control
from ebpfmon.service.assemble import offline_containment

EPILOG = """\
Examples:\n\n
  ebpfmon gpu                                        # GPUs, grants, and the descriptors agents hold\n\n
  ebpfmon gpu grant /ebpfmon-agents/job-42 --gpus 0,1\n\n
  ebpfmon gpu grant job-42 --gpus GPU-1b7e0c52-9d4f-3a61-8e20-5c9f7a3d1e01\n\n
  ebpfmon gpu grant job-43 --gpus gpu0/gi1/ci0        # one MIG instance\n\n
  ebpfmon gpu revoke job-42                          # every GPU; --gpus 1 for one\n\n
A GPU is an index, a UUID (GPU-...), a PCI bus id (0000:18:00.0), a MIG instance
(gpuN/giM/ciK, or gpuN/giM for all its compute instances) or all. A grant replaces
what the agent had and comes before the configuration's gpu_entitled and gpu_devices;
one made before the agent's cgroup exists applies when it is made, and ends when the
cgroup is removed. Grants are kept in the state directory. An entitled agent also gets
the control nodes (nvidiactl, nvidia-uvm...). A revoke refuses the next open; a
descriptor the agent holds stays open (the kernel cannot take it back) and is listed,
and reported as an alert. For a Slurm prolog see deploy/slurm/.
"""

app = typer.Typer(help="GPU entitlement: list it, grant GPUs to an agent, revoke them.", invoke_without_command=True,
                  epilog=EPILOG)


def ask(config, request: dict) -> dict:
    """Through the running daemon, else straight on the kernel's pinned state."""
    answer = control.request(config.state_dir, request)
    if answer is None:
        by = f"{user_name(os.getuid())} (cli)"
        answer = control.handle(offline_containment(config), {**request, "scan": True}, by)
    if not answer.get("ok"):
        raise EbpfmonError(answer.get("error", "the daemon refused"), "See 'ebpfmon gpu --help'.")
    return answer


def gpu_names(gpus: str) -> list[str]:
    names = [n.strip() for n in gpus.split(",") if n.strip()]
    if not names:
        raise EbpfmonError("--gpus names no GPU", "Give a comma-separated list, such as --gpus 0,1.")
    return names


def _show_grant(answer: dict) -> None:
    held = "  (quarantined: applies when released)" if answer["quarantined"] else ""
    print(f"{answer['agent']}: gpus {answer['gpus']}{held}")


def _show_held(holders: list[dict], heading: str) -> None:
    if holders:
        print(heading)
    for h in holders:
        print(f"    {safe(h['agent'])}  pid {h['pid']} ({safe(h['comm'])})  fd {h['fd']}  {safe(h['path'])}  "
              f"{h['device']} {h['node']} {h['access']}")


@app.callback(epilog=EPILOG)
def listing(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="The listing as JSON.")] = False,
    config_file: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """The node's GPUs, each agent's grant, and the GPU nodes agents hold open."""
    if ctx.invoked_subcommand is not None:
        return
    config, _ = effective_config(config_file, state_dir=state_dir)
    answer = ask(config, {"cmd": "gpu"})
    if json_out:
        print(json.dumps({k: answer[k] for k in ("gpus", "grants", "holders")}, indent=1))
        return
    print(f"{len(answer['gpus'])} NVIDIA GPU(s) known to the driver")
    for g in answer["gpus"]:
        print(f"    {g['index']}  {g['uuid'] or '-'}  {g['bus_id'] or '-'}  {g['model'] or ''}")
    print(f"{len(answer['grants'])} agent(s)")
    for grant in answer["grants"]:
        waiting = "" if grant["exists"] else "  (no cgroup yet)"
        print(f"    {safe(grant['agent'])}  gpus: {grant['gpus']}  from {safe(grant['from'])}{waiting}")
    print(f"{len(answer['holders'])} GPU descriptor(s) held by agents")
    _show_held(answer["holders"], "")


@app.command("grant", epilog=EPILOG)
def grant(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, or its name below the agent root.")],
    gpus: Annotated[str, typer.Option("--gpus", help="GPUs, comma-separated: 0,1 | GPU-<uuid> | "
                                                      "0000:18:00.0 | gpu0/gi1/ci0 | all.")] = ...,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Give an agent these GPUs (and only these), from now on."""
    config, _ = effective_config(config_file, agent_root, state_dir)
    answer = ask(config, {"cmd": "gpu_grant", "agent": agent, "gpus": gpu_names(gpus)})
    _show_grant(answer)
    _show_held(answer["held_beyond"], "still open beyond the grant:")


@app.command("revoke", epilog=EPILOG)
def revoke(
    agent: Annotated[str, typer.Argument(help="The agent's cgroup, or its name below the agent root.")],
    gpus: Annotated[str | None, typer.Option("--gpus", help="Only these GPUs (default: all of them).")] = None,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Take GPUs away from an agent: its next open of them is refused."""
    config, _ = effective_config(config_file, agent_root, state_dir)
    answer = ask(config, {"cmd": "gpu_revoke", "agent": agent, "gpus": None if gpus is None else gpu_names(gpus)})
    _show_grant(answer)
    _show_held(answer["held_beyond"], "still open (the kernel cannot take a descriptor back; see enforce.gpu_holders):")
