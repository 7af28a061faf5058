"""ebpfmon exec: run a command inside an agent cgroup."""

from __future__ import annotations

import os
import pwd
import sys
from typing import Annotated

import typer

from ebpfmon.cli.common import AgentRootOption, ConfigOption, StateDirOption, effective_config
from ebpfmon.cli.gpu import ask, gpu_names
from ebpfmon.errors import EbpfmonError
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.kernel.probeset import require_root

EPILOG = """\
Examples:\n\n
  ebpfmon exec -- /bin/echo hello\n\n
  ebpfmon exec --cgroup agent-7 -- python3 train.py\n\n
  ebpfmon exec --cgroup job-42 --gpus 0,1 --user agent -- python3 train.py\n\n
The cgroup is created when missing. --gpus grants the agent those GPUs first (as
'ebpfmon gpu grant' does: through the daemon, or on the kernel state without one). The command replaces ebpfmon (same pid),
so its exit status, signals and terminal are its own.
"""

app = typer.Typer()


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise EbpfmonError(f"no user {user!r} on this machine", "Give a name or uid from /etc/passwd "
                           "(useradd creates one for agents).") from None


@app.command("exec", epilog=EPILOG)
def exec_command(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments, after --.")],
    cgroup: Annotated[str, typer.Option("--cgroup", "-c", metavar="NAME",
                                        help="Agent cgroup, below the agent root.")] = "adhoc",
    user: Annotated[str | None, typer.Option("--user", "-u", metavar="USER",
                                             help="Run the command as this user (name or uid), with its groups; "
                                                  "an agent should not have root.")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", help="Grant the agent these GPUs first: 0,1 | GPU-<uuid> | "
                                                             "0000:18:00.0 | gpu0/gi1/ci0 | all.")] = None,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Run a command inside an agent cgroup, so the monitor watches it."""
    require_root()
    config, _ = effective_config(config_file, agent_root, state_dir)
    hierarchy = Hierarchy()
    name = hierarchy.child(config.agent_root, cgroup)
    hierarchy.ensure(name)
    if gpus is not None:
        answer = ask(config, {"cmd": "gpu_grant", "agent": name, "gpus": gpu_names(gpus)})
        print(f"ebpfmon: {name} may use gpus {answer['gpus']}", file=sys.stderr)
    account = _account(user) if user is not None else None
    hierarchy.join(name)
    if account is None:
        print("ebpfmon: warning: the agent runs as root; give it a user of its own with --user "
              "(with root it can undo what contains it)", file=sys.stderr)
    else:
        os.initgroups(account.pw_name, account.pw_gid)
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
        os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    print(f"ebpfmon: running {command[0]} in cgroup {name}"
          + (f" as {account.pw_name}" if account else ""), file=sys.stderr)
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"ebpfmon: error: cannot run {command[0]!r}: {e.strerror}.", file=sys.stderr)
        raise typer.Exit(127 if isinstance(e, FileNotFoundError) else 126)
