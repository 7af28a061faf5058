"""Time to containment. Run by hand, as root:

    .venv/bin/python bench/containment.py [--trials 100]     # writes bench/RESULTS-containment.md

Each trial starts a real `ssh -N -R 2222:127.0.0.1:22 root@198.51.100.2` in a
fresh agent cgroup, against a real sshd in a network namespace, with ebpfmon's
daemon running. Measured: from the kernel's timestamp of the ssh exec to the
moment the cut is in the kernel map; whether ssh's connect was refused or got
through before the cut; whether the reverse port ever opened on the far side
(the tunnel carried something). Then 100 pool connects and 100 GPU opens from
an agent not entitled to GPUs: how many got through.

Then containment at scale, as an RL run's rollouts misbehave together: N agents
(N = 1, 10, 50, 200) start the same reverse tunnel at once; per agent, exec ->
cut in force (p50/p99/max), from the first exec to the last cut, quarantine
file writes per containment, reverse ports that ever listened. And whether a
cut agent looping on refused connects slows containing a second one: the
second agent's exec -> cut with and without the loop, in alternated rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.config import AlertSettings, Config, EnforceSettings, MetricsSettings  # noqa: E402
from ebpfmon.service.daemon import Daemon  # noqa: E402
from ebpfmon.kernel.enforcer import remove_pins  # noqa: E402
from ebpfmon.service import control  # noqa: E402
from helpers import free_port  # noqa: E402
from servers import internet  # noqa: E402
from service import start, stop as stop_daemon  # noqa: E402  (bench/service.py)

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3", "-o", "ExitOnForwardFailure=yes"]
PROBE = "import socket,sys\ns=socket.socket()\ns.settimeout(2)\nprint(s.connect_ex(('127.0.0.1', 2222)))"


def in_cgroup(path: Path):
    return lambda: (path / "cgroup.procs").write_text(str(os.getpid()))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


LOOP = "import socket,sys\nwhile True:\n    s=socket.socket()\n    s.connect_ex((sys.argv[1], 3333))\n    s.close()"


class TunnelRun:
    """Reverse tunnels from fresh agent cgroups against `ebpfmon run` in a process of its own
    (as systemd runs it: a daemon in this process would share its GIL with the spawning), and
    how long each took to be cut: from the kernel's time of the exec to the cut's, as the
    daemon's quarantine records say (the map update follows within microseconds)."""

    def __init__(self, hierarchy, root, state_dir, metrics_port, host, key):
        self.hierarchy, self.root, self.state_dir, self.host, self.key = hierarchy, root, state_dir, host, key
        self.metrics_port = metrics_port
        self.serial = 0

    def ask(self, message: dict) -> dict:
        answer = control.request(self.state_dir, message, timeout=60)
        if not answer or not answer.get("ok"):
            raise RuntimeError(f"the daemon answered {answer!r} to {message!r}")
        return answer

    def metric(self, name: str, **labels) -> float:
        """A sum over the daemon's samples of name with those labels (0 when none)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def writes(self) -> float:
        return self.metric("ebpfmon_quarantine_writes_total")

    def agents(self, n: int) -> list[str]:
        self.serial += 1
        names = [f"{self.root}/wave-{self.serial}-{i}" for i in range(n)]
        for name in names:
            self.hierarchy.ensure(name)
        return names

    def spawn(self, names: list[str], argv_of) -> subprocess.Popen:
        """One shell starts every agent's program, each joining its cgroup first: as fast as
        forks go, from a process that holds nothing else up."""
        lines = [f"sh -c {shlex.quote(f'echo $$ > {self.hierarchy.path(name)}/cgroup.procs && exec ' + shlex.join(argv_of(i)))}"
                 " >/dev/null 2>&1 &" for i, name in enumerate(names)]
        return subprocess.Popen(["bash", "-c", "\n".join(lines) + "\nwait"])

    def tunnels(self, names: list[str]) -> subprocess.Popen:
        return self.spawn(names, lambda i: ["ssh", "-i", str(self.key), *SSH_OPTS, "-N", "-R",
                                            f"{2300 + i}:127.0.0.1:22", f"root@{self.host.address}"])

    def cut_times(self, names: list[str], timeout: float = 120) -> list[tuple[int, int]]:
        """(exec time, cut time) of each agent cut, once all are (or timeout passed)."""
        wanted, found = set(names), {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < len(wanted):
            for record in self.ask({"cmd": "list"})["records"]:
                if record["agent"] in wanted and record["status"] == "active" and record["event"]:
                    cut = [a["time_ns"] for a in record["actions"]
                           if a["action"] == "cut_network" and a["result"] == "applied"]
                    if cut:
                        found[record["agent"]] = (record["event"]["time_ns"], cut[0])
            time.sleep(0.5)  # the times are the records'; asking often would only load the daemon
        return list(found.values())

    def finish(self, names: list[str], spawner: subprocess.Popen | None) -> None:
        for name in names:
            path = self.hierarchy.path(name)
            (path / "cgroup.kill").write_text("1")
        if spawner:
            spawner.wait(timeout=60)
        for name in names:
            try:
                self.ask({"cmd": "release", "agent": name, "reason": "bench: next"})
            except RuntimeError:
                pass  # not quarantined (a wave whose agent was never cut)
            path = self.hierarchy.path(name)
            deadline = time.monotonic() + 10
            while (path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.rmdir(path)

    def listened(self, n: int) -> int:
        probe = self.host.popen([sys.executable, "-c", OPEN_PORTS, *(str(2300 + i) for i in range(n))],
                                stdout=subprocess.PIPE, text=True)
        return int(probe.communicate(timeout=300)[0])

    def wave(self, n: int) -> dict:
        names = self.agents(n)
        before = self.writes()
        spawner = self.tunnels(names)
        times = self.cut_times(names)
        writes = self.writes() - before
        listened = self.listened(n)
        self.finish(names, spawner)
        latencies = [(cut - exec_) / 1e6 for exec_, cut in times] or [float("nan")]
        total = (max(c for _, c in times) - min(e for e, _ in times)) / 1e6 if times else float("nan")
        print(f"wave of {n}: {len(times)} cut, p50 {statistics.median(latencies):.2f} ms, total {total:.0f} ms, "
              f"{writes:.0f} quarantine writes, {listened} reverse ports listened", flush=True)
        return {"n": n, "cut": len(times), "p50": statistics.median(latencies), "p99": pct(latencies, 0.99),
                "max": max(latencies), "total": total, "writes": writes / max(1, len(times)), "listened": listened}

    def with_and_without_a_looping_neighbour(self, rounds: int) -> tuple[list[float], list[float], int, int]:
        """The second agent's exec -> cut times without and with the loop, the refusals the loop
        met and how many of them the kernel counted without sending."""
        quiet, looping = [], []
        refused = self.metric("ebpfmon_refusals_total", reason="cut")
        throttled = self.metric("ebpfmon_events_throttled_total")
        (looper,) = self.agents(1)
        self.ask({"cmd": "cut", "agent": looper, "reason": "bench: the looping neighbour"})
        for _ in range(rounds):
            for loop in (False, True):
                neighbour = self.spawn([looper], lambda i: [sys.executable, "-c", LOOP, self.host.address]) \
                    if loop else None
                time.sleep(0.3 if loop else 0)  # looping for a while before the tunnel starts
                names = self.agents(1)
                spawner = self.tunnels(names)
                (looping if loop else quiet).extend((cut - exec_) / 1e6 for exec_, cut in self.cut_times(names))
                self.finish(names, spawner)
                if neighbour:
                    (self.hierarchy.path(looper) / "cgroup.kill").write_text("1")
                    neighbour.wait(timeout=60)
        self.finish([looper], None)
        return (quiet, looping, int(self.metric("ebpfmon_refusals_total", reason="cut") - refused),
                int(self.metric("ebpfmon_events_throttled_total") - throttled))


OPEN_PORTS = """
import socket, sys
found = 0
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.settimeout(1)
    found += s.connect_ex(("127.0.0.1", port)) == 0
    s.close()
print(found)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--waves", default="1,10,50,200", help="agents per wave, comma-separated")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the looping-neighbour comparison")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-containment.md")
    args = parser.parse_args()
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-{os.getpid()}"
    hierarchy.ensure(root)
    work = Path(tempfile.mkdtemp())
    fake = work / "nvidia0"
    os.mknod(fake, 0o666 | 0o020000, os.makedev(195, 0))
    host = internet.create(f"ebpfmon-bench-{os.getpid()}")
    sshd, key = internet.start_sshd(host, work)
    pool = host.popen([sys.executable, str(REPO / "tests/servers/stratum_pool.py"), host.address, "3333"],
                      stdout=subprocess.PIPE, text=True)
    pool.stdout.readline()
    accepted = []
    threading.Thread(target=lambda: [accepted.append(l) for l in pool.stdout], daemon=True).start()
    config = Config(agent_root=root, gpu_entitled=(f"{root}/gpu-*",), state_dir=str(work / "state"),
                    enforce=EnforceSettings(breaker_agents=10 ** 6), alerts=AlertSettings(sinks=()),
                    metrics=MetricsSettings(enabled=False))
    daemon = Daemon(config)
    cut_at: dict[int, int] = {}
    daemon.start()
    original_cut = daemon.enforcer.cut

    def timed_cut(agent_id: int, since_ns: int) -> None:
        original_cut(agent_id, since_ns)
        cut_at[agent_id] = time.time_ns()

    daemon.enforcer.cut = timed_cut
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    thread.start()
    latencies, refused, tunnels = [], 0, 0
    try:
        for trial in range(args.trials):
            agent = hierarchy.ensure(f"{root}/agent-{trial}")
            agent_id = hierarchy.cgroup_id(f"{root}/agent-{trial}")
            ssh = subprocess.run(["ssh", "-i", str(key), *SSH_OPTS, "-N", "-R", "2222:127.0.0.1:22",
                                  f"root@{host.address}"], preexec_fn=in_cgroup(agent), capture_output=True,
                                 text=True, timeout=30)
            if "Operation not permitted" in ssh.stderr:
                refused += 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the record is written right after the cut
                record = daemon.containment.store.active_for(f"{root}/agent-{trial}")
                if agent_id in cut_at and record:
                    break
                time.sleep(0.01)
            if agent_id in cut_at and record and record.event:
                latencies.append((cut_at[agent_id] - record.event["time_ns"]) / 1e6)

            probe = host.popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True)
            if probe.communicate(timeout=10)[0].strip() == "0":
                tunnels += 1
            daemon.containment.release(f"{root}/agent-{trial}", "bench", "next trial")
            subprocess.run(["pkill", "-KILL", "-f", f"root@{host.address}"], capture_output=True)
            os.rmdir(agent)
        # pool connects and GPU opens from an agent not entitled to GPUs
        agent = hierarchy.ensure(f"{root}/blocked")
        before = len(accepted)
        client = ("import socket,os,sys\nok=0\nfor i in range(100):\n    s=socket.socket()\n"
                  "    ok += s.connect_ex((sys.argv[1], 3333)) == 0\n    s.close()\ng=0\nfor i in range(100):\n"
                  "    try:\n        os.close(os.open(sys.argv[2], os.O_RDWR)); g += 1\n    except OSError as e:\n"
                  "        g += e.errno != 1\nprint(ok, g)")
        out = subprocess.run([sys.executable, "-c", client, host.address, str(fake)], preexec_fn=in_cgroup(agent),
                             capture_output=True, text=True).stdout.split()
        time.sleep(0.5)
        pool_ok, gpu_ok, pool_seen = int(out[0]), int(out[1]), len(accepted) - before
        os.rmdir(agent)
        stop.set()
        thread.join(timeout=10)
        daemon.enforcer.detach()
        daemon.close()
        # the rest against `ebpfmon run` in a process of its own, as systemd runs it
        port = free_port()
        own = subprocess_daemon = None
        try:
            subprocess_daemon, _, own = start(root, work, f"metrics: {{enabled: true, listen: '127.0.0.1:{port}'}}\n"
                                                          "alerts: {sinks: []}\nenforce: {breaker_agents: 1000000}\n")
            tunnel = TunnelRun(hierarchy, root, work / "state", port, host, key)
            waves = [tunnel.wave(n) for n in map(int, args.waves.split(","))]
            quiet, looping, loop_refused, loop_throttled = tunnel.with_and_without_a_looping_neighbour(args.rounds)
        finally:
            if subprocess_daemon:
                stop_daemon(subprocess_daemon, own)
    finally:
        if not stop.is_set():
            stop.set()
            thread.join(timeout=10)
            daemon.enforcer.detach()
            daemon.close()
        sshd.kill()
        pool.kill()
        internet.remove(host)
        remove_pins(hierarchy, root)
        os.rmdir(hierarchy.path(root))
        shutil.rmtree(work, ignore_errors=True)
    text = f"""# Containment benchmark

- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC
- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)

## Reverse SSH tunnel, {args.trials} trials

A real `ssh -N -R 2222:127.0.0.1:22` from a fresh agent cgroup to a real sshd
in a network namespace, ebpfmon's daemon running (shipped rules).

| measure | value |
|---|---|
| trials cut | {len(latencies)} of {args.trials} |
| exec -> cut in force, p50 | {statistics.median(latencies):.2f} ms |
| exec -> cut in force, p99 | {pct(latencies, 0.99):.2f} ms |
| exec -> cut in force, max | {max(latencies):.2f} ms |
| ssh's connect refused by the cut (it never reached sshd) | {refused} of {args.trials} |
| tunnels that opened their reverse port (carried anything) | {tunnels} of {args.trials} |

## Refused synchronously

| | got through |
|---|---|
| 100 connects to the pool port 3333 from an agent | {pool_ok} (the pool saw {pool_seen}) |
| 100 opens of a GPU node (c 195 0) by an agent not entitled | {gpu_ok} |

## Many agents at once

N agents start the same `ssh -N -R` as fast as one shell forks them (each
in its own agent cgroup, reverse port 2300+i), against `ebpfmon run` in a
process of its own (breaker_agents raised: this measures the path, not the
breaker). Exec -> cut from the kernel's exec time to the cut in the record.

| agents | cut | exec -> cut p50 | p99 | max | first exec -> last cut | quarantine writes per containment | reverse ports that listened |
|---|---|---|---|---|---|---|---|
""" + "".join(f"| {w['n']} | {w['cut']} | {w['p50']:.2f} ms | {w['p99']:.2f} ms | {w['max']:.2f} ms | "
              f"{w['total']:.0f} ms | {w['writes']:.2f} | {w['listened']} |\n" for w in waves) + f"""
## A cut agent looping on refused connects

A cut agent connects to the pool port in a loop (each refused in the kernel;
without the kernel's budget of reports per cgroup, each would be two events
and their verdicts for the reader) while a second agent starts `ssh -N -R`; {args.rounds} rounds each, alternated. The loop met
{loop_refused} refusals; the kernel sent none past each cgroup's budget
({loop_throttled} events counted, not sent).

| neighbour | second agent's exec -> cut p50 | p99 | max |
|---|---|---|---|
| none | {statistics.median(quiet):.2f} ms | {pct(quiet, 0.99):.2f} ms | {max(quiet):.2f} ms |
| looping on refused connects | {statistics.median(looping):.2f} ms | {pct(looping, 0.99):.2f} ms | {max(looping):.2f} ms |
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
