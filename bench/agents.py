"""Many agents on one node. Run by hand (or by `make bench`), as root:

    .venv/bin/python bench/agents.py            # writes bench/RESULTS-agents.md

N agent cgroups under a bench agent root, each holding one sleeping process.
- Start-up: `ebpfmon run` (shipped rules, containment armed, metrics off) from exec to READY=1
  (systemd's notify protocol), and its RSS then; N = 1, 100 and 1,000 in alternated rounds.
- The tools at 1 and 1,000 agents, alternated: `quarantine list` (with a tenth of the agents
  quarantined), `policy show`, a metrics scrape, `trace` from exec to tracing; the daemon then
  has a GPU grant and an egress profile for every agent (kernel entries per agent).
- Churn, with 1,000 agents there: the daemon's CPU while 1,000 more agent cgroups are created,
  run a program and are removed within a minute, against the same time idle; the kernel's
  per-agent entries and the daemon's RSS before and after; the daemon's CPU per exec.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import pin_dir, remove_pins  # noqa: E402
from ebpfmon.service import control  # noqa: E402
from run import build_storm, run_storm  # noqa: E402  (bench/run.py)
from service import REPO, cpu_seconds, start, status, stop  # noqa: E402  (bench/service.py)

SIZES = (1, 100, 1000)
ROUNDS = 3
TOOL_SIZES = (1, 1000)
TOOL_ROUNDS = 2
CHURN = 1000  # agent cgroups created and removed ...
CHURN_SECONDS = 60.0  # ... within this long
EXECS = 2000  # for the daemon's CPU per exec
PER_AGENT_MAPS = ("gpu_grants", "egress_agents", "cut_cgroups")

QUIET = "metrics: {enabled: false}\nalerts: {sinks: []}\n"
ENTRIES = """\
metrics: {{enabled: true, listen: "127.0.0.1:{port}"}}
alerts: {{sinks: []}}
gpu_entitled: ["{root}/agent-*"]
egress:
  profiles:
    - name: bench
      agents: ["{root}/agent-*"]
      allow: [{{cidr: 192.0.2.0/24, ports: [443]}}]
"""


class Agents:
    """Agent cgroups under the bench root, each with a sleeping process; as many as asked."""

    def __init__(self, hierarchy: Hierarchy, root: str):
        self.hierarchy, self.root = hierarchy, root
        self.sleepers: list[subprocess.Popen] = []
        self.made: list[str] = []

    def resize(self, n: int) -> None:
        while len(self.made) < n:
            path = self.hierarchy.ensure(f"{self.root}/agent-{len(self.made)}")
            self.sleepers.append(subprocess.Popen(["sleep", "3600"], preexec_fn=lambda p=path: (
                p / "cgroup.procs").write_text(str(os.getpid()))))
            self.made.append(f"{self.root}/agent-{len(self.made)}")
        while len(self.made) > n:
            sleeper = self.sleepers.pop()
            sleeper.kill()
            sleeper.wait()
            os.rmdir(self.hierarchy.path(self.made.pop()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str]) -> float:
    began = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - began


def trace_start(root: str, config: list[str]) -> float:
    """`ebpfmon trace exec` from exec to its 'tracing' line."""
    began = time.monotonic()
    proc = subprocess.Popen([str(REPO / ".venv/bin/ebpfmon"), "trace", "exec", "--agent-root", root, *config,
                             "--duration", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "tracing" in line:
                return time.monotonic() - began
        raise RuntimeError("ebpfmon trace ended before it traced")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def entries(root: str, hierarchy: Hierarchy) -> dict[str, int]:
    """Entries in the pinned maps that hold one entry per agent."""
    out = {}
    for name in PER_AGENT_MAPS:
        dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin_dir(hierarchy, root) / name)],
                              capture_output=True, text=True, check=True).stdout
        out[name] = len(json.loads(dump))
    return out


def tools(agents: Agents, root: str, work: Path) -> dict[str, float]:
    """The tools' wall times against a daemon with the agents there now."""
    port = free_port()
    proc, _, listener = start(root, work, ENTRIES.format(port=port, root=root))
    ebpfmon = [str(REPO / ".venv/bin/ebpfmon")]
    config, state = ["--config", str(work / "config.yaml")], ["--state-dir", str(work / "state")]
    quarantined = agents.made[::10]  # a tenth: list has records to show
    try:
        for agent in quarantined:
            answer = control.request(work / "state", {"cmd": "cut", "agent": agent, "reason": "bench"})
            assert answer and answer["ok"], answer
        began = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            answer.read()
        scrape = time.monotonic() - began
        return {"quarantine list": timed([*ebpfmon, "quarantine", "list", *config, *state]),
                "policy show": timed([*ebpfmon, "policy", "show", agents.made[-1], *config]),
                "metrics scrape": scrape,
                "trace, exec to tracing": trace_start(root, config)}
    finally:
        for agent in quarantined:  # the cuts outlive the daemon
            control.request(work / "state", {"cmd": "release", "agent": agent, "reason": "bench"})
        stop(proc, listener)


def churn(hierarchy: Hierarchy, root: str, work: Path) -> dict[str, object]:
    """With the agents there: the daemon idle, then CHURN agents made, run and removed, then an
    exec storm in one agent; CPU, RSS and the kernel's per-agent entries."""
    proc, _, listener = start(root, work, ENTRIES.format(port=free_port(), root=root))
    storm = build_storm(work)
    try:
        time.sleep(2)  # the start's /proc reading, after ready
        before = {"entries": entries(root, hierarchy), "rss": status(proc.pid, "VmRSS")}
        used = cpu_seconds(proc.pid)
        time.sleep(CHURN_SECONDS)
        idle = cpu_seconds(proc.pid) - used
        used, began = cpu_seconds(proc.pid), time.monotonic()
        for i in range(CHURN):
            time.sleep(max(0.0, began + i * CHURN_SECONDS / CHURN - time.monotonic()))
            path = hierarchy.ensure(f"{root}/agent-churn-{i}")
            subprocess.run(["true"], check=True, preexec_fn=lambda p=path: (
                p / "cgroup.procs").write_text(str(os.getpid())))
            os.rmdir(path)
        time.sleep(max(0.0, began + CHURN_SECONDS - time.monotonic()))
        churned = cpu_seconds(proc.pid) - used
        time.sleep(2)  # the last removals reach the daemon
        after = {"entries": entries(root, hierarchy), "rss": status(proc.pid, "VmRSS")}
        used = cpu_seconds(proc.pid)
        run_storm(storm, "exec", EXECS, 0, hierarchy.path(f"{root}/agent-0"))
        time.sleep(1)  # the storm's last events judged
        per_exec = (cpu_seconds(proc.pid) - used) / EXECS
    finally:
        stop(proc, listener)
    return {"idle": idle, "churned": churned, "before": before, "after": after, "per_exec": per_exec}


def main() -> int:
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-agents-{os.getpid()}"
    hierarchy.ensure(root)
    work = Path(tempfile.mkdtemp())
    agents = Agents(hierarchy, root)
    ready: dict[int, list[float]] = {n: [] for n in SIZES}
    rss: dict[int, list[int]] = {n: [] for n in SIZES}
    took: dict[int, list[dict[str, float]]] = {n: [] for n in TOOL_SIZES}
    runs = 0

    def fresh() -> Path:
        nonlocal runs
        runs += 1
        (work / str(runs)).mkdir()
        return work / str(runs)

    try:
        for _ in range(ROUNDS):
            for n in SIZES:
                agents.resize(n)  # agents are added as N grows, taken away as it shrinks
                proc, seconds, listener = start(root, fresh(), QUIET)
                ready[n].append(seconds)
                rss[n].append(status(proc.pid, "VmRSS"))
                stop(proc, listener)
        for _ in range(TOOL_ROUNDS):
            for n in TOOL_SIZES:
                agents.resize(n)
                took[n].append(tools(agents, root, fresh()))
        print(f"tools: {took}", file=sys.stderr)
        agents.resize(1000)
        churned = churn(hierarchy, root, fresh())
        print(f"churn: {churned}", file=sys.stderr)
    finally:
        agents.resize(0)
        remove_pins(hierarchy, root)
        os.rmdir(hierarchy.path(root))
        shutil.rmtree(work, ignore_errors=True)
    write(ready, rss, took, churned)
    return 0


def write(ready, rss, took, churned) -> None:
    one = statistics.median(ready[1])
    rows = [f"| {n:,} | {statistics.median(ready[n]):.2f} s ({min(ready[n]):.2f}–{max(ready[n]):.2f}) | "
            f"{statistics.median(ready[n]) - one:+.2f} s | {statistics.median(rss[n]) / 2**20:.0f} MiB |" for n in SIZES]
    tool_rows = []
    for name in took[1][0]:
        few, many = ([statistics.median(t[name] for t in took[n])] for n in TOOL_SIZES)
        tool_rows.append(f"| {name} | {1000 * few[0]:.0f} ms | {1000 * many[0]:.0f} ms | "
                         f"{1000 * (many[0] - few[0]):+.0f} ms |")
    before, after = churned["before"], churned["after"]
    entry_text = ", ".join(f"{name} {before['entries'][name]} → {after['entries'][name]}" for name in PER_AGENT_MAPS)
    text = "\n".join([
        "# Many agents on one node",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        "- N agent cgroups each with one sleeping process",
        "",
        "## Start-up",
        "",
        f"`ebpfmon run` (shipped rules, containment armed, metrics off), exec to READY=1; {ROUNDS} alternated "
        "rounds, medians (min–max)",
        "",
        "| agents | ready | against 1 agent | RSS when ready |",
        "|---|---|---|---|",
        *rows,
        "",
        "## The tools",
        "",
        f"A daemon with a GPU grant and an egress profile for every agent, a tenth of them quarantined; wall "
        f"time of each tool (a Python start included), {TOOL_ROUNDS} alternated rounds, medians",
        "",
        "| tool | 1 agent | 1,000 agents | difference |",
        "|---|---|---|---|",
        *tool_rows,
        "",
        "## Agents coming and going",
        "",
        f"The same daemon with 1,000 agents there: {CHURN:,} more agent cgroups made, each running `true`, and "
        f"removed, paced over {CHURN_SECONDS:.0f} s, against {CHURN_SECONDS:.0f} s idle just before",
        "",
        "| | |",
        "|---|---|",
        f"| daemon CPU idle | {100 * churned['idle'] / CHURN_SECONDS:.1f}% of a core |",
        f"| daemon CPU while agents come and go | {100 * churned['churned'] / CHURN_SECONDS:.1f}% of a core |",
        f"| CPU per agent made, run and removed | {1000 * (churned['churned'] - churned['idle']) / CHURN:.2f} ms |",
        f"| per-agent kernel entries, before → after | {entry_text} |",
        f"| RSS before → after | {before['rss'] / 2**20:.0f} → {after['rss'] / 2**20:.0f} MiB |",
        f"| daemon CPU per exec in an agent ({EXECS:,} execs of `true`) | {1e6 * churned['per_exec']:.0f} µs |",
        "",
    ])
    (HERE / "RESULTS-agents.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
