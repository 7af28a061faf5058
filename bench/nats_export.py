"""Events shipped to NATS: what one node can export, and what exporting adds to the daemon.
Run by hand (or by `make bench`), as root; needs nats-server (a Debian package):

    .venv/bin/python bench/nats_export.py        # writes bench/RESULTS-nats-export.md

A nats-server with JetStream on loopback, its store in a temporary directory. Two parts:

- capacity: an audit log of EVENTS connect events written ahead, then one exporter (the
  daemon's, in this process) started on it: events/s until JetStream acknowledged the last.
- in the daemon: `ebpfmon run` (shipped rules, enforcement armed, audit log on) while a storm
  of 10k connects/s runs for 10 s in an agent cgroup, without an event sink and with a NATS
  sink exporting every connect, in alternated rounds: the daemon's CPU over the storm and the
  seconds after it until the last event was acknowledged, and how many arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import signal
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

from ebpfmon import events as ev  # noqa: E402
from ebpfmon.alerts.audit import AuditLog  # noqa: E402
from ebpfmon.alerts.export import EVENTS_PER_MESSAGE, IN_FLIGHT, EventExport  # noqa: E402
from ebpfmon.config import AuditSettings, SinkSettings  # noqa: E402
from ebpfmon.host.cgroups import AgentLayout, Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import remove_pins  # noqa: E402
from run import build_storm, run_storm  # noqa: E402  (bench/run.py)
from service import cpu_seconds, start, stop  # noqa: E402  (bench/service.py)

EVENTS = 200_000
STORM, RATE = 100_000, 10_000
ROUNDS = 3
STREAM = "EBPFMON"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    def __init__(self, directory: Path):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.counted: dict[int, int] = {}  # message sequence -> events in it
        server = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.proc = subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", self.port)):
            assert time.monotonic() < deadline and self.proc.poll() is None, "nats-server did not start"
            time.sleep(0.05)

    def _call(self, what):
        import nats

        async def call():
            client = await nats.connect(self.url)
            try:
                return await what(client.jetstream())
            finally:
                await client.close()
        return asyncio.run(call())

    def stored(self) -> int:
        """Events in the stream (a message holds several, a line each)."""
        async def count(js):
            try:
                state = (await js.stream_info(STREAM)).state
            except Exception:  # no stream yet: nothing stored
                return 0
            for seq in range(state.first_seq, state.last_seq + 1):
                if seq not in self.counted:
                    self.counted[seq] = (await js.get_msg(STREAM, seq)).data.count(b"\n")
            return sum(self.counted.values())
        return self._call(count)

    def purge(self) -> None:
        self.counted = {}

        async def delete(js):
            try:
                await js.delete_stream(STREAM)
            except Exception:  # none to delete
                pass
        self._call(delete)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def capacity(nats: Nats, work: Path) -> float:
    """Events/s one exporter ships draining a log written ahead."""
    ancestry = ev.Ancestry([ev.Ancestor(pid=100, comm="bash", exe="/usr/bin/bash", argv=["bash", "-c", "x" * 300])])
    proc = ev.Process(pid=200, tid=200, ppid=100, uid=0, gid=0, comm="python3")
    state = work / f"capacity-{time.monotonic_ns()}"
    audit = AuditLog(AuditSettings(max_bytes=1 << 40), state)
    export = EventExport(SinkSettings(type="nats", url=nats.url, events=("connect",)), "bench", audit.directory,
                         state, AgentLayout("/ebpfmon-agents"))
    for n in range(EVENTS):
        audit.write(ev.ConnectEvent(time_ns=n, cgroup_id=7, cgroup="/ebpfmon-agents/a", proc=proc, ancestry=ancestry,
                                    address=f"192.0.2.{n % 200}", port=443, retval=0))
        if n % 64 == 63:
            audit.flush()
    audit.close()
    nats.purge()
    began = time.monotonic()
    export.start()
    while export.exported < EVENTS:
        assert export.thread.is_alive() and time.monotonic() - began < 600, export.failing
        time.sleep(0.01)
    took = time.monotonic() - began
    export.close()
    return EVENTS / took


def exported(port: int) -> float:
    """ebpfmon_events_exported_total, scraped from the daemon."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ebpfmon_events_exported_total"))


def storm_round(nats: Nats | None, root: str, agent: Path, storm: Path, work: Path) -> dict:
    sinks = f'[{{type: nats, url: "{nats.url}", events: [connect]}}]' if nats else "[]"
    port = free_port()
    proc, _, listener = start(root, work, f"metrics: {{listen: '127.0.0.1:{port}'}}\nalerts: {{sinks: {sinks}}}\n")
    try:
        if nats:
            nats.purge()
        cpu, wall = cpu_seconds(proc.pid), time.monotonic()
        run_storm(storm, "connect", STORM, RATE, agent)
        storm_s = time.monotonic() - wall
        arrived, behind_s = 0, 0.0
        if nats:  # until the daemon counts the last connect acknowledged, or nothing more for 5 s
            last, last_change = -1.0, time.monotonic()
            while True:
                done = exported(port)
                if done != last:
                    last, last_change = done, time.monotonic()
                if done >= STORM or time.monotonic() - last_change > 5:
                    break
                time.sleep(0.02)
            behind_s = last_change - wall - storm_s
        cpu_used = cpu_seconds(proc.pid) - cpu
        if nats:
            arrived = nats.stored()
        return {"cpu": cpu_used / storm_s, "arrived": arrived, "behind_s": max(0.0, behind_s)}
    finally:
        stop(proc, listener)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-nats-export.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    os.chmod(work, 0o700)
    nats = Nats(work / "nats")
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-{os.getpid()}"
    hierarchy.ensure(root)
    agent = hierarchy.ensure(f"{root}/storm")
    try:
        capacities = [capacity(nats, work) for _ in range(ROUNDS)]
        storm = build_storm(work)
        rounds: dict[str, list[dict]] = {"off": [], "on": []}
        for n in range(ROUNDS):
            for mode in ("off", "on"):
                round_work = work / f"{mode}-{n}"
                round_work.mkdir()
                rounds[mode].append(storm_round(nats if mode == "on" else None, root, agent, storm, round_work))
    finally:
        nats.stop()
        remove_pins(hierarchy, root)
        os.rmdir(agent)
        os.rmdir(hierarchy.path(root))
        shutil.rmtree(work, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[mode])

    def spread(mode: str, key: str, scale: float = 100) -> str:
        values = [r[key] * scale for r in rounds[mode]]
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    added = median("on", "cpu") - median("off", "cpu")
    text = "\n".join([
        "# Events to NATS JetStream",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        "- nats-server with JetStream (file store) on loopback, on the same 2 cores; a message holds up to "
        f"{EVENTS_PER_MESSAGE} events",
        "",
        "## What one exporter ships",
        "",
        f"{EVENTS:,} connect events in an audit log written ahead, exported by one exporter thread "
        f"({IN_FLIGHT} messages in flight at a time, each acknowledged): median of {ROUNDS} "
        f"**{statistics.median(capacities):,.0f} events/s** ({min(capacities):,.0f}–{max(capacities):,.0f}).",
        "",
        f"## In the daemon at {RATE // 1000}k connects/s",
        "",
        f"`ebpfmon run` (shipped rules, enforcement armed, audit log on, metrics on), a storm of {STORM:,} "
        f"connects at {RATE:,}/s in an agent cgroup, {ROUNDS} alternated rounds, medians (min–max):",
        "",
        "| | daemon CPU over the storm, % of one core | events on NATS | the last acknowledged, after the storm "
        "ended |",
        "|---|---|---|---|",
        f"| no event export | {spread('off', 'cpu')} | – | – |",
        f"| every connect to NATS | {spread('on', 'cpu')} | {median('on', 'arrived'):,.0f} of {STORM:,} | "
        f"{median('on', 'behind_s'):.1f} s |",
        "",
        f"Exporting every connect adds {100 * added:.1f} points of one core at {RATE // 1000}k events/s (the "
        "exporter's reading, JSON and publishing, on the daemon's own process; the CPU after the storm, "
        "while the exporter catches up, is counted in it too).",
        "",
    ])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
