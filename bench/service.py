"""The daemon's footprint. Run by hand, as root:

    .venv/bin/python bench/service.py       # writes bench/RESULTS-service.md

Start-up: `ebpfmon run` (default packs) from exec to READY=1 (systemd's notify
protocol, read here), 5 times. Memory: peak RSS (VmHWM) after start and after
load. CPU: the daemon's CPU time while a paced storm of 10k connects/s runs
in an agent cgroup for 10 s, three times. Targets: ready under 3 s, under
150 MB RSS, under 10% of one core at 10k events/s. Then the daemon's CPU when
idle, and per exec at paced rates and in a storm: what a wakeup costs beside
what a record costs.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import signal
import socket
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

CPU_ROUNDS = 3
IDLE_S = 10
EXEC_RATES = {50: 300, 400: 2000, 0: 4000}  # execs per second (0: as fast as they go) -> execs


def start(root: str, work: Path, config: str = "metrics: {enabled: true, listen: '127.0.0.1:0'}\nalerts: {sinks: []}\n"
          ) -> tuple[subprocess.Popen, float, socket.socket]:
    """`ebpfmon run` as systemd starts it, on config (YAML text); returns once it said READY=1."""
    sock_path = work / f"notify-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(60)
    (work / "config.yaml").write_text(config)
    began = time.monotonic()
    proc = subprocess.Popen([str(REPO / ".venv/bin/ebpfmon"), "run", "--config", str(work / "config.yaml"),
                             "--agent-root", root, "--state-dir", str(work / "state")],
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while listener.recv(100) != b"READY=1":
        pass
    return proc, time.monotonic() - began, listener


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen, listener: socket.socket) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    listener.close()


def main() -> None:
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-{os.getpid()}"
    hierarchy.ensure(root)
    agent = hierarchy.ensure(f"{root}/storm")
    work = Path(tempfile.mkdtemp())
    try:
        startups = []
        for _ in range(5):
            proc, took, listener = start(root, work)
            startups.append(took)
            stop(proc, listener)
        proc, _, listener = start(root, work)
        rss_ready = status(proc.pid, "VmRSS")
        storm = build_storm(work)
        loads = []  # share of one core, per storm: this VM's speed drifts, one run says little
        for _ in range(CPU_ROUNDS):
            cpu_before, wall_before = cpu_seconds(proc.pid), time.monotonic()
            run_storm(storm, "connect", 100_000, 10_000, agent)
            loads.append((cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - wall_before))
        peak = status(proc.pid, "VmHWM")
        cpu_before = cpu_seconds(proc.pid)
        time.sleep(IDLE_S)
        idle = (cpu_seconds(proc.pid) - cpu_before) / IDLE_S
        per_exec = {}
        for rate, execs in EXEC_RATES.items():
            cpu_before = cpu_seconds(proc.pid)
            run_storm(storm, "exec", execs, rate, agent)
            time.sleep(0.5)  # the last batch judged
            per_exec[rate] = (cpu_seconds(proc.pid) - cpu_before) / execs
        stop(proc, listener)
    finally:
        remove_pins(hierarchy, root)
        os.rmdir(agent)
        os.rmdir(hierarchy.path(root))
    rows = "\n".join(f"| CPU per exec in an agent, {execs:,} execs {f'at {rate}/s' if rate else 'as fast as they go'} "
                      f"| {1e6 * cpu:.0f} us | |" for (rate, execs), cpu in zip(EXEC_RATES.items(), per_exec.values()))
    text = f"""# Service benchmark

- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC
- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)
- daemon: `ebpfmon run`, shipped rules, containment armed, metrics on, audit log on, no remote sinks

| measure | figure | target |
|---|---|---|
| exec to READY=1, median of 5 (min–max) | {statistics.median(startups):.2f} s ({min(startups):.2f}–{max(startups):.2f}) | < 3 s |
| RSS when ready | {rss_ready / 2**20:.0f} MiB | |
| peak RSS (VmHWM) after {CPU_ROUNDS * 100}k events | {peak / 2**20:.0f} MiB | < 150 MB |
| CPU at 10k connects/s, {CPU_ROUNDS} storms of 10 s, median (min–max) | {100 * statistics.median(loads):.1f}% ({100 * min(loads):.1f}–{100 * max(loads):.1f}) of one core | < 10% |
| CPU idle, {IDLE_S} s | {100 * idle:.2f}% of one core | |
{rows}

Start-up is mostly bcc compiling the probes with clang. An exec's CPU is a record's work (the
process tree, the rules, the audit line) plus, when execs come one at a time, a wakeup of the
reader's loop (the poll, a batch of one, the follow-up poll within the wakeup window).
"""
    (HERE / "RESULTS-service.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
