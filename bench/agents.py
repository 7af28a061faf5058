"""Start-up with many agents. Run by hand (or by `make bench`), as root:

    .venv/bin/python bench/agents.py            # writes bench/RESULTS-agents.md

N agent cgroups under a bench agent root, each holding one sleeping process; `ebpfmon run`
(shipped rules, containment armed, metrics off) from exec to READY=1 (systemd's notify
protocol), and its RSS then; N = 1, 100 and 1,000 in alternated rounds, medians.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import remove_pins  # noqa: E402
from service import start, status, stop  # noqa: E402  (bench/service.py)

SIZES = (1, 100, 1000)
ROUNDS = 3


def main() -> int:
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-agents-{os.getpid()}"
    hierarchy.ensure(root)
    work = Path(tempfile.mkdtemp())
    sleepers: list[subprocess.Popen] = []
    made: list[str] = []
    ready: dict[int, list[float]] = {n: [] for n in SIZES}
    rss: dict[int, list[int]] = {n: [] for n in SIZES}
    try:
        for _ in range(ROUNDS):
            for n in SIZES:
                while len(made) < n:  # agents are added as N grows, taken away as it shrinks
                    path = hierarchy.ensure(f"{root}/agent-{len(made)}")
                    sleepers.append(subprocess.Popen(["sleep", "3600"], preexec_fn=lambda p=path: (
                        p / "cgroup.procs").write_text(str(os.getpid()))))
                    made.append(f"{root}/agent-{len(made)}")
                while len(made) > n:
                    sleeper = sleepers.pop()
                    sleeper.kill()
                    sleeper.wait()
                    os.rmdir(hierarchy.path(made.pop()))
                round_work = work / f"{n}-{len(ready[n])}"
                round_work.mkdir()
                proc, took, listener = start(root, round_work, "metrics: {enabled: false}\nalerts: {sinks: []}\n")
                ready[n].append(took)
                rss[n].append(status(proc.pid, "VmRSS"))
                stop(proc, listener)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        for path in reversed(made):
            os.rmdir(hierarchy.path(path))
        remove_pins(hierarchy, root)
        os.rmdir(hierarchy.path(root))
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(ready[1])
    rows = [f"| {n:,} | {statistics.median(ready[n]):.2f} s ({min(ready[n]):.2f}–{max(ready[n]):.2f}) | "
            f"{statistics.median(ready[n]) - one:+.2f} s | {statistics.median(rss[n]) / 2**20:.0f} MiB |" for n in SIZES]
    text = "\n".join([
        "# Start-up with many agents",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        f"- `ebpfmon run` (shipped rules, containment armed, metrics off), exec to READY=1; N agent cgroups each "
        f"with one sleeping process; {ROUNDS} alternated rounds, medians (min–max)",
        "",
        "| agents | ready | against 1 agent | RSS when ready |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    (HERE / "RESULTS-agents.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
