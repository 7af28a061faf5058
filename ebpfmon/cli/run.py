"""ebpfmon run: the monitor on built-in defaults."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from typing import Annotated

import typer

from ebpfmon.cli.common import AgentRootOption, GpuPrefixOption, make_config, setup_logging, stop_on_signals
from ebpfmon.cli.rules import NoDefaultsOption, RulesOption, rule_paths
from ebpfmon.config import DEFAULT_AGENT_ROOT, EnforceSettings
from ebpfmon.daemon import Daemon, stdout_printer
from ebpfmon.kernel.probeset import require_root

log = logging.getLogger("ebpfmon")

EPILOG = """\
Example:\n\n
  sudo ebpfmon run       then, elsewhere: sudo ebpfmon exec -- ssh -R 2222:localhost:22 host\n\n
Watches every cgroup below the agent root (created when missing), judges each
exec, connect and GPU open of the agents with the rules, prints alerts, and
contains agents as the rules ask: their network cut, destinations and GPUs
refused, processes killed or frozen. Containment outlives the daemon; see
'ebpfmon quarantine'. SIGHUP reloads the rules; a rule set with problems is
refused and the running one stays.
"""

StateDirOption = Annotated[str, typer.Option(
    "--state-dir", metavar="DIR", envvar="EBPFMON_STATE_DIR", show_envvar=True,
    help="Where quarantine records and the control socket live.")]


def run(
    agent_root: AgentRootOption = DEFAULT_AGENT_ROOT,
    gpu_prefix: GpuPrefixOption = None,
    rules: RulesOption = None,
    no_defaults: NoDefaultsOption = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Contain nothing: report what would be cut, "
                                          "refused, killed or frozen.")] = False,
    state_dir: StateDirOption = EnforceSettings.state_dir,
    show_events: Annotated[bool, typer.Option("--show-events", help="Print every event too, not only "
                                              "alerts.")] = False,
    alerts_json: Annotated[bool, typer.Option("--json", help="Alerts as JSON lines.")] = False,
) -> None:
    """Run the monitor: watch every agent under the agent root, judge what they do, contain them."""
    setup_logging()
    require_root()
    config = make_config(agent_root, gpu_prefix)
    config = dataclasses.replace(config, enforce=dataclasses.replace(config.enforce, dry_run=dry_run,
                                                                     state_dir=state_dir))
    daemon = Daemon(config, rule_paths(rules, no_defaults), show_events, alerts_json, emit=stdout_printer)
    stop = stop_on_signals()
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    daemon.start()
    log.info("ready: watching %s and every cgroup below it (probes: %s; %d rules; containment %s)",
             config.agent_root, ", ".join(daemon.stream.probes.probes), len(daemon.engine.ruleset.rules),
             "in dry run" if dry_run else "armed")
    try:
        daemon.run(stop, every=sys.stdout.flush)
    finally:
        daemon.close()
        log.info("stopped; %s; containment stays in force", daemon.stream.stats.summary())
