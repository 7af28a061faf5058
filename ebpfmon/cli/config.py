"""ebpfmon config: check a configuration file, show the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from ebpfmon.cli.common import ConfigOption, effective_config
from ebpfmon.config import effective, load_config

app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True,
                  epilog="Examples:\n\n  ebpfmon config check /etc/ebpfmon/config.yaml\n\n"
                         "  ebpfmon config show --config /etc/ebpfmon/config.yaml")

EPILOG = """\
Examples:\n\n
  ebpfmon config check /etc/ebpfmon/config.yaml\n\n
  ebpfmon config show                 the defaults, or /etc/ebpfmon/config.yaml over them\n\n
Errors name the file, line and key, and what was expected; unknown keys are errors.
"""


@app.command("check", epilog=EPILOG)
def check(file: Annotated[Path, typer.Argument(help="The YAML file to check.")]) -> None:
    """Validate a configuration file: every key known, every value of the right kind."""
    config = load_config(file)
    sinks = ", ".join(s.name or s.type for s in config.alerts.sinks) or "none"
    print(f"ok: {file} (agent root {config.agent_root}, sinks: {sinks})")


@app.command("show", epilog=EPILOG)
def show(config_file: ConfigOption = None) -> None:
    """Print the effective configuration as YAML, secrets masked."""
    config, path = effective_config(config_file)
    print(f"# effective configuration: {path or 'built-in defaults'}")
    print(yaml.safe_dump(effective(config), sort_keys=False), end="")
