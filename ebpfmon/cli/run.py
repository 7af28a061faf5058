"""ebpfmon run: the daemon."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from typing import Annotated

import typer

from ebpfmon.cli.common import (AgentRootOption, ConfigOption, NoDefaultsOption, RulesOption, StateDirOption,
                                effective_config, setup_logging, stop_on_signals, with_rules)
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

app = typer.Typer()


@app.command("run", epilog=EPILOG)
def run(
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    rules: RulesOption = None,
    no_defaults: NoDefaultsOption = False,
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
    config, path = effective_config(config_file, agent_root, state_dir)
    config = with_rules(config, rules, no_defaults)
    if dry_run:
        config = dataclasses.replace(config, enforce=dataclasses.replace(config.enforce, dry_run=True))
    overridden = bool(agent_root or state_dir or rules or no_defaults or dry_run)
    daemon = Daemon(config, path if not overridden else None,
                    show_events=stdout_printer if show_events else None)
    if overridden and path:
        log.info("command-line options override %s: reload re-reads the rule files only", path)
    stop = stop_on_signals()
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    daemon.start()
    log.info("ready: in %.2fs, watching %s and below (probes: %s; %d rules; containment %s; metrics %s); "
             "%d agent(s) there, what they already run judged next, from /proc",
             (daemon.ready_ns - daemon.started_ns) / 1e9, config.agent_root,
             ", ".join(daemon.stream.probes.probes), len(daemon.engine.ruleset.rules),
             "in dry run" if config.enforce.dry_run else "armed",
             daemon.metrics_state(), daemon.agents_at_start)
    try:
        daemon.run(stop, every=sys.stdout.flush)
    finally:
        daemon.close()
        log.info("stopped; %s; containment stays in force", daemon.stream.stats.summary())
