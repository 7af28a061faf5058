"""ebpfmon run: the daemon."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ebpfmon.cli.common import setup_logging, stop_on_signals
from ebpfmon.config import DEFAULT_CONFIG, Config, load_config
from ebpfmon.service.daemon import Daemon, stdout_printer
from ebpfmon.kernel.probeset import require_root

log = logging.getLogger("ebpfmon")

EPILOG = """\
Examples:\n\n
  sudo ebpfmon run                             built-in defaults (or /etc/ebpfmon/config.yaml)\n\n
  sudo ebpfmon run --config /etc/ebpfmon/config.yaml --dry-run\n\n
  then, elsewhere: sudo ebpfmon exec -- ssh -R 2222:localhost:22 host\n\n
Watches every cgroup below the agent root (created when missing), judges each
exec, connect and GPU open of the agents with the rules, sends alerts to the
configured sinks (console by default) through an on-disk spool, contains
agents as the rules ask, serves Prometheus metrics (127.0.0.1:9464) and
writes the audit log. Containment outlives the daemon; see 'ebpfmon
quarantine'. SIGHUP or 'ebpfmon reload' reloads rules and configuration; a
set with problems is refused and the running one stays.
"""

StateDirOption = Annotated[Optional[str], typer.Option(
    "--state-dir", metavar="DIR", envvar="EBPFMON_STATE_DIR", show_envvar=True,
    help="Where quarantine records, the alert spool, the audit log and the control socket live "
         "(default: the configuration's state_dir, /var/lib/ebpfmon).")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-f", metavar="FILE", envvar="EBPFMON_CONFIG", show_envvar=True,
    help=f"Configuration file (YAML). Default: {DEFAULT_CONFIG} when it exists, else built-in defaults.")]


def effective_config(config_file: Path | None) -> tuple[Config, Path | None]:
    """The configuration file given, or the default one when present, or the built-in defaults."""
    if config_file is None and os.path.exists(DEFAULT_CONFIG):
        config_file = Path(DEFAULT_CONFIG)
    return (load_config(config_file), config_file) if config_file else (Config(), None)


def run(
    config_file: ConfigOption = None,
    agent_root: Annotated[Optional[str], typer.Option(
        "--agent-root", envvar="EBPFMON_AGENT_ROOT", show_envvar=True,
        help="cgroup under which agents run (overrides the configuration).")] = None,
    rules: Annotated[Optional[list[Path]], typer.Option(
        "--rules", "-r", metavar="PATH", help="Rule file or directory loaded after the configured ones.")] = None,
    no_defaults: Annotated[bool, typer.Option("--no-defaults", help="Leave out the shipped packs.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Contain nothing: report what would be cut, "
                                          "refused, killed or frozen.")] = False,
    state_dir: StateDirOption = None,
    show_events: Annotated[bool, typer.Option("--show-events", help="Print every event too.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log records as JSON lines (journald, "
                                           "collectors).")] = False,
) -> None:
    """Run the monitor: watch every agent, judge what they do, alert, contain."""
    setup_logging(json_lines=log_json)
    require_root()
    config, path = effective_config(config_file)
    overrides = {}
    if agent_root:
        overrides["agent_root"] = agent_root
    if state_dir:
        overrides["state_dir"] = state_dir
    if rules or no_defaults:
        overrides["rules"] = dataclasses.replace(config.rules, defaults=config.rules.defaults and not no_defaults,
                                                 files=config.rules.files + tuple(str(r) for r in rules or ()))
    if dry_run:
        overrides["enforce"] = dataclasses.replace(config.enforce, dry_run=True)
    config = dataclasses.replace(config, **overrides)
    daemon = Daemon(config, path if not overrides else None,
                    show_events=stdout_printer if show_events else None)
    if overrides and path:
        log.info("command-line options override %s: reload re-reads the rule files only", path)
    stop = stop_on_signals()
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    daemon.start()
    log.info("ready: in %.2fs, watching %s and below (probes: %s; %d rules; containment %s; metrics %s)",
             (daemon.ready_ns - daemon.started_ns) / 1e9, config.agent_root,
             ", ".join(daemon.stream.probes.probes), len(daemon.engine.ruleset.rules),
             "in dry run" if config.enforce.dry_run else "armed",
             config.metrics.listen if config.metrics.enabled else "off")
    try:
        daemon.run(stop, every=sys.stdout.flush)
    finally:
        daemon.close()
        log.info("stopped; %s; containment stays in force", daemon.stream.stats.summary())
