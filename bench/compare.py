"""ebpfmon side by side with what people run today, on the same storms. Run by hand, as root:

    .venv/bin/python bench/compare.py [--rounds 5]    # writes bench/RESULTS-compare.md and compare.png

Tools, each started alone, then the same exec / connect / open storms run
inside an agent cgroup: no monitoring; ebpfmon (`ebpfmon run`: shipped rules
evaluated, enforcement armed, audit log on); a bpftrace script tracing the same
syscalls with tracepoints (execve with argv, connect, openat), output to
/dev/null; auditd with rules for execve and connect; bcc's execsnoop and
tcpconnect (kprobes: where the kernel has none, the row says so). Rounds
alternate the tools: each round starts and stops every tool in turn, no
monitoring first and last, so a drift of the VM's speed lands on all of them.
Figures are wall-time ratios to the same round's no-monitor time (median of
rounds, with min and max) and the operations per second each storm reached.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import remove_pins  # noqa: E402
from run import build_storm, run_storm  # noqa: E402  (bench/run.py)

WORKLOADS = {"exec": 2000, "connect": 50_000, "open": 200_000}

BPFTRACE = r"""
tracepoint:syscalls:sys_enter_execve { printf("%d %s %s\n", pid, comm, str(args->filename)); join(args->argv); }
tracepoint:syscalls:sys_exit_execve { printf("%d exec %d\n", pid, args->ret); }
tracepoint:syscalls:sys_enter_connect { printf("%d connect %d\n", pid, args->fd); }
tracepoint:syscalls:sys_exit_connect { printf("%d connect = %d\n", pid, args->ret); }
tracepoint:syscalls:sys_enter_openat { @path[tid] = args->filename; }
tracepoint:syscalls:sys_exit_openat /@path[tid]/ { printf("%d open %s = %d\n", pid, str(@path[tid]), args->ret); delete(@path[tid]); }
"""


class Tool:
    """A monitor started before the storms and stopped after."""

    def __init__(self, name: str, argv: list[str] | None, ready: str | None = None, ready_check=None, teardown=None,
                 then: list[str] | None = None):
        # ready: a line the tool prints once attached; ready_check: polled when it prints nothing useful;
        # then: a command that configures it once started (auditd's rules)
        self.name, self.argv, self.ready, self.ready_check, self.teardown = name, argv, ready, ready_check, teardown
        self.then = then
        self.proc = None
        self.problem = ""

    def start(self) -> bool:
        if self.argv is None:
            return True
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        last = ""
        while self.ready and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                self.problem = (last or f"exited with {self.proc.returncode}")[:200]
                return False
            if self.ready in line:
                break
            last = line.strip() or last
        # the tool's own output goes on being read (as a terminal or a log shipper would) and dropped
        subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)
        while self.ready_check and not self.ready_check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.problem = f"not ready (exit code {self.proc.poll()})"
                return False
            time.sleep(0.2)
        if self.then:
            subprocess.run(self.then, check=True, capture_output=True)
        time.sleep(1)
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.teardown:
            self.teardown()


def auditd_ready() -> bool:
    """auditd has registered with the kernel: `auditctl -s` shows its pid."""
    status = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
    return any(line.split() not in (["pid", "0"], ["pid"]) for line in status.splitlines() if line.startswith("pid"))


def monitors(work: Path, root: str) -> list[Tool]:
    """No monitoring, ebpfmon and the peers, watching the agent root root (work: a directory of
    the bench's own); no monitoring comes first and again last, bracketing the others."""
    (work / "config.yaml").write_text("metrics: {enabled: false}\nalerts: {sinks: []}\n")
    (work / "trace.bt").write_text(BPFTRACE)
    none = Tool("no monitoring", None)
    return [
        none,
        Tool("ebpfmon", [str(REPO / ".venv/bin/ebpfmon"), "run", "--config", str(work / "config.yaml"),
                         "--agent-root", root, "--state-dir", str(work / "state")], ready="ready:"),
        Tool("bpftrace (tracepoints)", ["bpftrace", str(work / "trace.bt")], ready="Attaching"),
        # auditd writes its log (/var/log/audit/audit.log) as in production; -n: stay in the foreground
        Tool("auditd (execve, connect)", ["auditd", "-n"], ready_check=auditd_ready,
             teardown=lambda: subprocess.run(["auditctl", "-D"], capture_output=True),
             then=["auditctl", "-a", "always,exit", "-F", "arch=b64", "-S", "execve", "-S", "connect",
                   "-k", "ebpfmonbench"]),
        none,
    ]


@contextlib.contextmanager
def agent_cgroup(leaf: str):
    """An agent root of the bench's own holding one agent cgroup: (the root's name, the agent's
    path); removed afterwards, with what ebpfmon pinned for it."""
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-{os.getpid()}"
    hierarchy.ensure(root)
    agent = hierarchy.ensure(f"{root}/{leaf}")
    try:
        yield root, agent
    finally:
        remove_pins(hierarchy, root)
        os.rmdir(agent)
        os.rmdir(hierarchy.path(root))


def alternate(tools: list[Tool], rounds: int, measure) -> dict[str, str]:
    """measure(tool, round) with every tool started in turn, round after round: a drift of the
    VM's speed lands on all of them. Returns the tools that could not run, with why."""
    problems: dict[str, str] = {}
    try:
        for r in range(rounds):
            for tool in tools:
                if tool.name in problems:
                    continue
                if tool.name.startswith("auditd") and auditd_ready():
                    problems[tool.name] = ("auditd already runs on this host: stop it (systemctl stop auditd) so "
                                           "its rules and log are the bench's alone")
                    continue
                if not tool.start():
                    problems[tool.name] = tool.problem
                    print(tool.name, "unavailable:", tool.problem, flush=True)
                    tool.stop()
                    continue
                measure(tool, r)
                tool.stop()
    finally:
        for tool in tools:
            tool.stop()
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    exe = build_storm(work)
    # a ratio is against the no-monitor runs of the same round
    results: dict[str, dict] = {}

    def storms(tool: Tool, r: int) -> None:
        rounds = results.setdefault(tool.name, {mode: [] for mode in WORKLOADS})
        for mode, n in WORKLOADS.items():
            rounds[mode].append((run_storm(exe, mode, n, cgroup=agent), r))
        print(f"round {r + 1}:", tool.name, {m: f"{v[-1][0]:.3f}s" for m, v in rounds.items()}, flush=True)

    try:
        with agent_cgroup("storm") as (root, agent):
            tools = monitors(work, root)
            tools[-1:-1] = [Tool("bcc execsnoop", ["execsnoop-bpfcc"], ready="PCOMM"),
                            Tool("bcc tcpconnect", ["tcpconnect-bpfcc"], ready="PID")]
            problems = alternate(tools, args.rounds, storms)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(results, problems, args.rounds)


def write(results: dict[str, dict], problems: dict[str, str], rounds: int) -> None:
    none = results["no monitoring"]
    # each round's no-monitor time: the median of its runs in that round (first and last)
    base = {m: {r: statistics.median([t for t, rr in none[m] if rr == r]) for r in range(rounds)} for m in WORKLOADS}
    lines = [
        "# Side by side: ebpfmon and the tools people run today",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        f"- {rounds} rounds, each running every tool in turn (no monitoring first and last), inside an agent "
        "cgroup; ratio = wall time / the same round's no-monitor time (median of rounds, min–max); "
        "ops/s = storm operations per second reached (median)",
        "- storms: " + ", ".join(f"{m} ×{n}" for m, n in WORKLOADS.items()),
        "",
        "| tool | " + " | ".join(f"{m} ratio | {m} ops/s" for m in WORKLOADS) + " |",
        "|---|" + "---|---|" * len(WORKLOADS),
    ]
    for tool, problem in problems.items():
        lines.append(f"| {tool} | " + " | ".join(["unavailable", "—"] * len(WORKLOADS)) + f" |\n|  | {problem} |")
    for tool, data in results.items():
        cells = []
        for m, n in WORKLOADS.items():
            ratios = ratios_of(data[m], base[m])
            cells += [f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
                      f"{n / statistics.median([t for t, _ in data[m]]):,.0f}"]
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    (HERE / "RESULTS-compare.md").write_text("\n".join(lines) + "\n\n![overhead](compare.png)\n")
    plot(results, problems, base)
    print((HERE / "RESULTS-compare.md").read_text())


def ratios_of(runs: list[tuple[float, int]], base: dict[int, float]) -> list[float]:
    """Each run's time over its round's no-monitor time."""
    return [t / base[r] for t, r in runs]


def plot(results: dict[str, dict], problems: dict[str, str], base: dict[str, dict[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(WORKLOADS)
    for i, mode in enumerate(WORKLOADS):
        xs = [j + i * width for j in range(len(tools))]
        axes[0].bar(xs, [statistics.median(ratios_of(results[t][mode], base[mode])) for t in tools], width,
                    label=mode)
        axes[1].bar(xs, [WORKLOADS[mode] / statistics.median([s for s, _ in results[t][mode]]) for t in tools], width,
                    label=mode)
    for ax, title in zip(axes, ("wall time / no monitoring (lower is better)", "operations per second")):
        ax.set_xticks([j + width * (len(WORKLOADS) - 1) / 2 for j in range(len(tools))])
        ax.set_xticklabels(tools, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(ncol=len(WORKLOADS), loc="upper left")
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_yscale("log")
    missing = list(problems)
    if missing:  # said, not dropped: the row is in the table with the reason
        fig.text(0.5, 0.01, "not run: " + ", ".join(missing) + " (see the table for why)", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(HERE / "compare.png", dpi=110)


if __name__ == "__main__":
    main()
