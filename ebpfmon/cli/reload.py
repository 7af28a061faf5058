"""ebpfmon reload: ask the running daemon to reload its rules and configuration."""

from __future__ import annotations

import typer

from ebpfmon.cli.common import ConfigOption, StateDirOption, effective_config
from ebpfmon.errors import EbpfmonError
from ebpfmon.service import control

app = typer.Typer()


@app.command("reload", epilog="Example:\n\n  sudo ebpfmon reload\n\nThe same as SIGHUP to the daemon.")
def reload(config_file: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Ask the running daemon to reload its rules and configuration."""
    config, _ = effective_config(config_file, state_dir=state_dir)
    answer = control.request(config.state_dir, {"cmd": "reload"})
    if answer is None:
        raise EbpfmonError("no daemon is running (no control socket in the state directory "
                           f"{config.state_dir}).", "Start it with 'ebpfmon run', or give its --state-dir.")
    if not answer.get("ok"):
        raise EbpfmonError(answer.get("error", "the daemon refused to reload"), "")
    print(answer["message"])
