"""Overhead and throughput of ebpfmon on syscall storms. Run by hand, as root:

    .venv/bin/python bench/run.py            # all workloads, writes bench/RESULTS-foundation.md
    .venv/bin/python bench/run.py --rounds 3 --quick

For each storm (exec, connect, open) it runs the workload inside an agent
cgroup and outside any, with no monitor and with `ebpfmon run` watching the
agent root, and reports wall time as a ratio (median of rounds, with min and
max), events delivered per second and events lost. A paced storm at 50k
connects/s checks that nothing is lost at that rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
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

AGENT_ROOT = f"/ebpfmon-bench-{os.getpid()}"
WORKLOADS = {"exec": 3000, "connect": 100_000, "open": 300_000}


def build_storm(workdir: Path) -> Path:
    exe = workdir / "storm"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "storm.c")], check=True)
    return exe


def run_storm(storm: Path, mode: str, n: int, rate: float = 0, cgroup: Path | None = None) -> float:
    def join():
        if cgroup:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run([str(storm), mode, str(n), str(rate)], capture_output=True, text=True, check=True,
                         preexec_fn=join)
    return float(out.stdout)


class Monitor:
    """`ebpfmon run` on the bench agent root (shipped rules, enforcement armed, audit log on, no
    alert sinks or exporter), output to /dev/null."""

    work: Path  # state and configuration of the bench's own: not the host's /var/lib/ebpfmon

    def __init__(self):
        config = self.work / "config.yaml"
        config.write_text("metrics: {enabled: false}\nalerts: {sinks: []}\n")
        self.proc = subprocess.Popen([str(REPO / ".venv/bin/ebpfmon"), "run", "--agent-root", AGENT_ROOT,
                                      "--config", str(config), "--state-dir", str(self.work / "state")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        said = []
        while not said or "ready" not in said[-1]:  # log lines before it (options, warnings)
            said.append(self.proc.stderr.readline())
            if not said[-1]:
                raise SystemExit("monitor did not start: " + "".join(said))

    def stop(self) -> dict[str, dict[str, int]]:
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.communicate(timeout=120)[1]
        summary = re.search(r"stopped; (.*)", err).group(1)
        parts = dict(p.split(": ", 1) for p in summary.split("; ") if ": " in p)
        return {name: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", parts.get(name, ""))}
                for name in ("events", "lost", "truncated")}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def measure(storm: Path, rounds: int, hierarchy: Hierarchy) -> list[dict]:
    inside = hierarchy.ensure(f"{AGENT_ROOT}/bench-agent")
    rows = []
    for mode, n in WORKLOADS.items():
        for where, cgroup in (("inside", inside), ("outside", None)):
            base = [run_storm(storm, mode, n, cgroup=cgroup) for _ in range(rounds)]
            monitor = Monitor()
            watched = [run_storm(storm, mode, n, cgroup=cgroup) for _ in range(rounds)]
            time.sleep(1)
            counts = monitor.stop()
            base += [run_storm(storm, mode, n, cgroup=cgroup) for _ in range(rounds)]
            ratio = [w / statistics.median(base) for w in watched]
            rows.append({
                "workload": f"{mode} ×{n}", "where": where, "base": spread(base), "watched": spread(watched),
                "ratio": spread(ratio), "median_ratio": statistics.median(ratio),
                "events": sum(counts["events"].values()),
                "events_per_s": sum(counts["events"].values()) / sum(watched),
                "lost": sum(counts["lost"].values()),
            })
            print(rows[-1], flush=True)
    return rows


def paced(storm: Path, rate: int, seconds: int, hierarchy: Hierarchy) -> dict:
    inside = hierarchy.ensure(f"{AGENT_ROOT}/bench-paced")
    monitor = Monitor()
    n = rate * seconds
    took = run_storm(storm, "connect", n, rate=rate, cgroup=inside)
    time.sleep(1)
    counts = monitor.stop()
    return {"rate": rate, "sent": n, "took": took, "achieved": n / took,
            "delivered": counts["events"].get("connect", 0), "lost": sum(counts["lost"].values())}


def write_results(path: Path, rows: list[dict], pacing: dict, rounds: int) -> None:
    lines = [
        "# Foundation benchmark: probes + `ebpfmon run` on syscall storms",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        f"- rounds: {rounds} watched, {2 * rounds} unwatched (before and after); "
        "figures are median (min–max) seconds",
        "- monitor: `ebpfmon run` (all probes, shipped rules, enforcement armed, audit log on; no alert sinks, "
        "no exporter) watching the bench agent root",
        "",
        "| workload | where | no monitor (s) | monitor (s) | ratio | events/s delivered | lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['where']} | {r['base']} | {r['watched']} | {r['ratio']} | "
                     f"{r['events_per_s']:.0f} | {r['lost']} |")
    lines += [
        "",
        f"Paced: {pacing['sent']} connects inside an agent cgroup at a target of {pacing['rate']}/s "
        f"(achieved {pacing['achieved']:.0f}/s): {pacing['delivered']} connect events delivered, "
        f"{pacing['lost']} lost.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, for a smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-foundation.md")
    args = parser.parse_args()
    if args.quick:
        for k in WORKLOADS:
            WORKLOADS[k] //= 10
    hierarchy = Hierarchy()
    with tempfile.TemporaryDirectory() as tmp:
        storm = build_storm(Path(tmp))
        Monitor.work = Path(tmp)
        try:
            rows = measure(storm, args.rounds, hierarchy)
            pacing = paced(storm, 50_000, 2 if args.quick else 5, hierarchy)
        finally:
            remove_pins(hierarchy, AGENT_ROOT)
            for d in sorted(hierarchy.path(AGENT_ROOT).rglob("*"), reverse=True):
                if d.is_dir():
                    d.rmdir()
            hierarchy.path(AGENT_ROOT).rmdir()
    write_results(args.out, rows, pacing, args.rounds)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
