"""What several commands share: options, error reports, logging, stop signals."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import textwrap
from typing import Annotated, Optional

import typer

from ebpfmon.config import DEFAULT_AGENT_ROOT, DEFAULT_GPU_PREFIXES, Config
from ebpfmon.errors import EbpfmonError

AgentRootOption = Annotated[str, typer.Option(
    "--agent-root", envvar="EBPFMON_AGENT_ROOT", show_envvar=True,
    help="cgroup under which agents run, relative to the cgroup2 mount.")]

GpuPrefixOption = Annotated[Optional[list[str]], typer.Option(
    "--gpu-prefix", metavar="PATH",
    help="Device path prefix counted as a GPU (repeat it; replaces the defaults: "
         + ", ".join(f"{p}*" for p in DEFAULT_GPU_PREFIXES) + ").")]


def make_config(agent_root: str = DEFAULT_AGENT_ROOT, gpu_prefixes: list[str] | None = None) -> Config:
    return Config(agent_root=agent_root,
                  gpu_prefixes=tuple(gpu_prefixes) if gpu_prefixes else DEFAULT_GPU_PREFIXES)


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
