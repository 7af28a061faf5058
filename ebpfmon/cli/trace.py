"""ebpfmon trace: live events, as a table or JSON lines."""

from __future__ import annotations

import dataclasses
import enum
import sys
from typing import Annotated, Optional

import typer

from ebpfmon import output
from ebpfmon.cli.common import AgentRootOption, ConfigOption, effective_config, setup_logging, stop_on_signals
from ebpfmon.config import DEFAULT_GPU_PREFIXES
from ebpfmon.events import KIND_GROUPS
from ebpfmon.service.assemble import trace_stream
from ebpfmon.stream.stream import PROBE_OF_KIND
from ebpfmon.kernel.probeset import probe_source


class TraceKind(str, enum.Enum):
    exec = "exec"
    connect = "connect"
    gpu = "gpu"
    all = "all"


EPILOG = """\
Examples:\n\n
  ebpfmon trace                          everything agents under the agent root do\n\n
  ebpfmon trace exec --cgroup /ebpfmon-agents/agent-1\n\n
  ebpfmon trace connect --all-cgroups    every connect on the host (ad hoc)\n\n
  ebpfmon trace --json --duration 60 > trace.jsonl   record a minute for replay\n\n
Columns: TIME, CGROUP (relative to the cgroup2 mount), PID, PPID, COMM, WHAT
(the call, its arguments and its result: ok or the errno name).
"""

GpuPrefixOption = Annotated[Optional[list[str]], typer.Option(
    "--gpu-prefix", metavar="PATH",
    help="Device path prefix counted as a GPU (repeat it; replaces the configured ones, by default "
         + ", ".join(f"{p}*" for p in DEFAULT_GPU_PREFIXES) + ").")]

app = typer.Typer()


@app.command("trace", epilog=EPILOG)
def trace(
    kind: Annotated[TraceKind, typer.Argument(help="What to trace: exec (with argv), connect "
                                              "(connects and addressed UDP sends), gpu (GPU "
                                              "device opens), or all.")] = TraceKind.all,
    cgroup: Annotated[Optional[list[str]], typer.Option(
        "--cgroup", "-c", metavar="PATH",
        help="Trace this cgroup and every cgroup below it (repeat for more); path relative to "
             "the cgroup2 mount, or absolute. Default: the agent root.")] = None,
    all_cgroups: Annotated[bool, typer.Option(
        "--all-cgroups", help="Trace every process on the host, not only agents.")] = False,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line: the recorded "
                                       "form that rules replay.")] = False,
    duration: Annotated[Optional[float], typer.Option(
        "--duration", "-d", metavar="SECONDS", min=0.1, help="Stop after this long. "
        "Default: until Ctrl-C.")] = None,
    config_file: ConfigOption = None,
    agent_root: AgentRootOption = None,
    gpu_prefix: GpuPrefixOption = None,
    print_c: Annotated[bool, typer.Option("--print-c", help="Print the C the probes are "
                                          "compiled from, and exit.")] = False,
) -> None:
    """Trace what agents do, live: exec, connect, GPU opens.

    Ends on Ctrl-C (or after --duration) with a summary on stderr: events by
    kind, and events the kernel lost or truncated.
    """
    setup_logging()
    kinds = KIND_GROUPS[kind.value]
    if print_c:
        print(probe_source({PROBE_OF_KIND[k] for k in kinds if k in PROBE_OF_KIND}))
        return
    config, _ = effective_config(config_file, agent_root)
    if gpu_prefix:
        config = dataclasses.replace(config, gpu_prefixes=tuple(gpu_prefix))
    stream = trace_stream(config, kinds, cgroups=cgroup or (), all_cgroups=all_cgroups)
    format_line = output.json_line if json else output.table_line
    stop = stop_on_signals()

    def show(event) -> None:
        sys.stdout.write(format_line(event) + "\n")

    stream.start(show)
    scope = "all cgroups" if all_cgroups else ", ".join(stream.scope_names)
    print(f"ebpfmon: tracing {kind.value} in {scope}; Ctrl-C to stop", file=sys.stderr)
    if not json:
        print(output.header())
    try:
        stream.run(stop, duration, every=sys.stdout.flush)
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # reader went away (| head): not an error
    finally:
        stream.close()
    print(f"ebpfmon: {stream.stats.summary()}", file=sys.stderr)
