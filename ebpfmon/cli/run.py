"""ebpfmon run: the monitor on built-in defaults."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ebpfmon import output
from ebpfmon.cgroups import Hierarchy
from ebpfmon.cli.common import (AgentRootOption, GpuPrefixOption, make_config, rule_context, setup_logging,
                                stop_on_signals)
from ebpfmon.cli.rules import NoDefaultsOption, RulesOption, rule_paths
from ebpfmon.config import DEFAULT_AGENT_ROOT
from ebpfmon.kernel.probeset import require_root
from ebpfmon.monitor import EventStream
from ebpfmon.rules.engine import Engine
from ebpfmon.rules.loader import RuleLoadError, load_rules

log = logging.getLogger("ebpfmon")

EPILOG = """\
Example:\n\n
  sudo ebpfmon run       then, elsewhere: sudo ebpfmon exec -- ssh -R 2222:localhost:22 host\n\n
Watches every cgroup below the agent root (created when missing), judges each
exec, connect and GPU open of the agents with the rules, and prints alerts.
SIGHUP reloads the rules; a rule set with problems is refused and the running
one stays. Actions rules ask for are printed, not yet carried out.
"""


def run(
    agent_root: AgentRootOption = DEFAULT_AGENT_ROOT,
    gpu_prefix: GpuPrefixOption = None,
    rules: RulesOption = None,
    no_defaults: NoDefaultsOption = False,
    show_events: Annotated[bool, typer.Option("--show-events", help="Print every event too, not only "
                                              "alerts.")] = False,
    alerts_json: Annotated[bool, typer.Option("--json", help="Alerts as JSON lines.")] = False,
) -> None:
    """Run the monitor: watch every agent under the agent root and judge what they do."""
    setup_logging()
    require_root()
    config = make_config(agent_root, gpu_prefix)
    paths = rule_paths(rules, no_defaults)
    engine = Engine(load_rules(paths), rule_context(config))
    Hierarchy().ensure(config.agent_root)
    stream = EventStream(config)
    stop = stop_on_signals()
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())

    def judge(event) -> None:
        if show_events:
            print(output.table_line(event))
        for verdict in engine.evaluate(event):
            print(verdict.to_json() if alerts_json else output.alert_line(verdict))

    def every_second() -> None:
        sys.stdout.flush()
        if reload_requested.is_set():
            reload_requested.clear()
            reload(engine, paths)

    stream.start(judge)
    log.info("ready: watching %s and every cgroup below it (probes: %s; %d rules)", config.agent_root,
             ", ".join(stream.probes.probes), len(engine.ruleset.rules))
    try:
        stream.run(stop, every=every_second)
    finally:
        stream.close()
        log.info("stopped; %s", stream.stats.summary())


def reload(engine: Engine, paths: list[Path]) -> bool:
    """Loads the rules again; on any problem keeps the running set and says why."""
    try:
        ruleset = load_rules(paths)
    except RuleLoadError as e:
        log.error("rules not reloaded, the running set stays: %s", e.message.replace("\n", " |"))
        return False
    engine.load(ruleset)
    log.info("rules reloaded: %d rules", len(ruleset.rules))
    return True
