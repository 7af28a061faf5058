"""ebpfmon config: check a configuration file, show the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from ebpfmon.cli.common import ConfigOption, effective_config
from ebpfmon.config import effective, load_config
from ebpfmon.service.assemble import check_sinks, deny_networks, load_ruleset

app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True,
                  epilog="Examples:\n\n  ebpfmon config check /etc/ebpfmon/config.yaml\n\n"
                         "  ebpfmon config show --config /etc/ebpfmon/config.yaml")

EPILOG = """\
Examples:\n\n
  ebpfmon config check /etc/ebpfmon/config.yaml\n\n
  ebpfmon config show                 the defaults, or /etc/ebpfmon/config.yaml over them\n\n
Errors name the file, line and key, and what was expected; unknown keys are errors.
check also reads the sinks' secret files and loads the rules the file names: what it
accepts, a reload (SIGHUP, ebpfmon reload) accepts.
"""


@app.command("check", epilog=EPILOG)
def check(file: Annotated[Path, typer.Argument(help="The YAML file to check.")]) -> None:
    """Validate a configuration file as a reload would: every key known, every value of the
    right kind, the sinks' secrets readable, the rules it names loadable."""
    config = load_config(file)
    check_sinks(config, str(file))
    ruleset = load_ruleset(config)
    deny_networks(config, ruleset.lists)
    sinks = ", ".join(s.name or s.type for s in config.alerts.sinks) or "none"
    print(f"ok: {file} (agent root {config.agent_root}, sinks: {sinks}, {len(ruleset.rules)} rules)")


@app.command("show", epilog=EPILOG)
def show(config_file: ConfigOption = None) -> None:
    """Print the effective configuration as YAML, secrets masked."""
    config, path = effective_config(config_file)
    print(f"# effective configuration: {path or 'built-in defaults'}")
    print(yaml.safe_dump(effective(config), sort_keys=False), end="")
