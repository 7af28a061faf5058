"""What several commands share: the options, the effective configuration, error reports,
logging, stop signals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ebpfmon.config import DEFAULT_AGENT_ROOT, DEFAULT_CONFIG, Config, load_config, validate
from ebpfmon.errors import EbpfmonError
from ebpfmon.paths import RULES_DIR

ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-f", metavar="FILE", envvar="EBPFMON_CONFIG", show_envvar=True,
    help=f"Configuration file (YAML). Default: {DEFAULT_CONFIG} when it exists, else built-in defaults.")]
AgentRootOption = Annotated[Optional[str], typer.Option(
    "--agent-root", metavar="CGROUP", envvar="EBPFMON_AGENT_ROOT", show_envvar=True,
    help=f"cgroup under which agents run, relative to the cgroup2 mount (overrides the configuration; "
         f"default {DEFAULT_AGENT_ROOT}).")]
StateDirOption = Annotated[Optional[str], typer.Option(
    "--state-dir", metavar="DIR", envvar="EBPFMON_STATE_DIR", show_envvar=True,
    help=f"Where quarantine records, the alert spool, the audit log and the control socket live "
         f"(overrides the configuration; default {Config.state_dir}).")]
RulesOption = Annotated[Optional[list[Path]], typer.Option(
    "--rules", "-r", metavar="PATH", help="A rule file or directory loaded after the configured ones "
    "(repeat for more); later files override earlier ones.")]
NoDefaultsOption = Annotated[bool, typer.Option(
    "--no-defaults", help=f"Leave out the shipped packs ({RULES_DIR}).")]


def effective_config(config_file: Path | None, agent_root: str | None = None,
                     state_dir: str | None = None) -> tuple[Config, Path | None]:
    """The configuration file given, or the default one when present, or the built-in
    defaults; then --agent-root and --state-dir over it, when given."""
    if config_file is None and os.path.exists(DEFAULT_CONFIG):
        config_file = Path(DEFAULT_CONFIG)
    config = load_config(config_file) if config_file else Config()
    overrides = {key: value for key, value in (("agent_root", agent_root), ("state_dir", state_dir)) if value}
    if overrides:
        config = dataclasses.replace(config, **overrides)
        validate(config)
    return config, config_file


def with_rules(config: Config, rules: list[Path] | None, no_defaults: bool) -> Config:
    """The configured rules, with --rules loaded after them and --no-defaults leaving out the packs."""
    if not rules and not no_defaults:
        return config
    settings = dataclasses.replace(config.rules, defaults=config.rules.defaults and not no_defaults,
                                   files=config.rules.files + tuple(str(r) for r in rules or ()))
    if not settings.defaults and not settings.files:
        raise typer.BadParameter("no rules: give --rules, or drop --no-defaults")
    return dataclasses.replace(config, rules=settings)


def report_error(error: EbpfmonError) -> None:
    """One paragraph to stderr: what is wrong, then how to fix it. A message that is
    already a list (rule problems) keeps its lines."""
    if "\n" in error.message:
        print(f"ebpfmon: error: {error.message}\n{error.fix}".rstrip(), file=sys.stderr)
        return
    paragraph = textwrap.fill(f"ebpfmon: error: {error}", width=100, subsequent_indent="  ",
                              break_on_hyphens=False, break_long_words=False)
    print(paragraph, file=sys.stderr)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: agent text inside stays one escaped string."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()})


class SafeFormatter(logging.Formatter):
    """Text lines with control characters escaped, so an agent's argv cannot forge log lines."""

    def format(self, record: logging.LogRecord) -> str:
        from ebpfmon.output import safe

        return safe(super().format(record))


def setup_logging(verbose: bool = False, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else SafeFormatter("ebpfmon: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so loops end cleanly with a summary. Python runs a
    handler between two bytecodes of the main thread, so a second signal can come inside the
    first one's stop.set(), which holds the event's lock: that handler must not take it again
    (a double SIGTERM, or Ctrl-C twice, hung `ebpfmon run` in its shutdown)."""
    stop = threading.Event()
    signalled = []

    def handler(signum, _frame):
        if signalled:
            return
        signalled.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def time_arg(text: str | None) -> int:
    """'30m', '2h', '1d' back from now, or a time ('2026-12-02T10:00', local unless it says), as
    wall-clock ns; 0 for none."""
    if not text:
        return 0
    duration = DURATION.match(text.strip())
    if duration:
        return time.time_ns() - int(float(duration.group(1)) * SECONDS[duration.group(2)] * 1e9)
    try:
        return int(dt.datetime.fromisoformat(text.strip()).timestamp() * 1e9)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a duration back from now (90s, 30m, 2h, 1d) or a time "
                                 "(2026-12-02T10:00)") from None
