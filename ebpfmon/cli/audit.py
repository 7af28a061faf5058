"""ebpfmon audit: check that the audit log is whole."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ebpfmon.alerts.audit import verify
from ebpfmon.cli.common import ConfigOption, StateDirOption, effective_config

app = typer.Typer(help="The audit log: check that nobody rewrote it.", no_args_is_help=True,
                  epilog="Examples:\n\n  sudo ebpfmon audit verify\n\n  ebpfmon audit verify /mnt/copy/audit")

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
    if directory is None:
        config, _ = effective_config(config_file, state_dir=state_dir)
        directory = Path(config.state_dir) / "audit"
    if not directory.is_dir():
        print(f"ebpfmon: error: no audit log at {directory}.")
        raise typer.Exit(2)
    found = verify(directory)
    if found.problem:
        print(f"BROKEN: {found.problem} (after {found.records} whole record(s))")
        raise typer.Exit(1)
    before = f"; {found.unchained} line(s) from before the chain, not checked" if found.unchained else ""
    print(f"ok: {found.records} record(s) in {found.files} file(s), the chain is whole{before}")
