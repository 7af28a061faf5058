"""The cost of egress profiles per connect, by profile size. Run by hand, as root:

    .venv/bin/python bench/egress.py [--connects 100000] [--rounds 3]   # writes bench/RESULTS-egress.md

The connect probe and the enforcement programs are loaded as the daemon loads them, scoped
and attached at an agent root of the bench's own (nobody reads the ring buffer: events past its
size are counted lost, as the kernel does for a reader that falls behind); a connect storm
(bench/storm.c: TCP connects to a closed port on 127.0.0.1) runs in an agent cgroup under it,
with no profile, then with a profile of 1, 10, 1,000 and 100,000 prefixes (the loopback entry
that lets the storm through, and networks in 10.0.0.0/8 around it). Measured, side by side in
one run: the connect4 program's own time per run, from the kernel's BPF statistics
(kernel.bpf_stats_enabled), the storm's wall time against the same storm with no programs
attached, and the time to write each policy into the kernel.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ebpfmon.config import Config, EgressAllow, EgressProfile, EgressSettings  # noqa: E402
from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import pin_dir, remove_pins  # noqa: E402
from ebpfmon.kernel.probeset import ProbeSet  # noqa: E402
from ebpfmon.service import assemble  # noqa: E402

SIZES = (None, 1, 10, 1_000, 100_000)  # prefixes in the profile; None: no profile
PORT = 9  # closed on loopback: each connect is refused by the stack, after the hook


def profile(root: str, prefixes: int | None) -> EgressSettings:
    if prefixes is None:
        return EgressSettings()
    others = [EgressAllow(cidr=f"{ipaddress.ip_address('10.0.0.0') + 256 * i}/24", ports=(443,))
              for i in range(prefixes - 1)]
    allow = (EgressAllow(cidr="127.0.0.1", ports=(PORT,), proto="tcp"), *others)
    return EgressSettings(profiles=(EgressProfile("bench", (f"{root}/*",), "enforce", allow),))


def bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


def connect4_stats(cgroup_dir: Path) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the connect4 program attached at the cgroup."""
    prog = next(p for p in bpftool("cgroup", "show", str(cgroup_dir)) if p["attach_type"] == "cgroup_inet4_connect")
    info = bpftool("prog", "show", "id", str(prog["id"]))
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def storm(exe: Path, agent: Path, connects: int) -> float:
    def join():
        (agent / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run([str(exe), "connect", str(connects), "0", str(PORT)], capture_output=True, text=True,
                         check=True, preexec_fn=join)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebpfmon-bench-egress-"))
    exe = work / "storm"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "storm.c")], check=True)
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-egress-{os.getpid()}"
    agent = hierarchy.ensure(f"{root}/agent")
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    rows = []
    try:
        unwatched = [storm(exe, agent, args.connects) for _ in range(args.rounds)]
        probes = ProbeSet(["connect", "enforce"], pin_dir=pin_dir(hierarchy, root)).load()
        probes.add_scope(hierarchy.cgroup_id(root))
        probes.set_all_cgroups(False)
        config = Config(agent_root=root)
        enforcer = assemble.enforcement(probes, hierarchy, config, {})
        for size in SIZES:
            started = time.monotonic()
            assemble.configure_enforcer(enforcer, Config(agent_root=root, egress=profile(root, size)), {})
            write_s = time.monotonic() - started
            per_run, walls = [], []
            for _ in range(args.rounds):
                ns0, runs0 = connect4_stats(hierarchy.path(root))
                walls.append(storm(exe, agent, args.connects))
                ns1, runs1 = connect4_stats(hierarchy.path(root))
                per_run.append((ns1 - ns0) / max(1, runs1 - runs0))
            rows.append({"size": size, "ns": per_run, "wall": walls, "write_s": write_s})
            print(f"{'no profile' if size is None else f'{size:,} prefixes'}: "
                  f"{statistics.median(per_run):.0f} ns per connect4 run, storm "
                  f"{statistics.median(walls) / statistics.median(unwatched):.2f}x unwatched, "
                  f"policy written in {write_s:.2f} s", flush=True)
        largest = Config(agent_root=root, egress=profile(root, SIZES[-1]))
        reloads = []
        for _ in range(2):  # the second drops the first's 100,000 entries from the other generation
            started = time.monotonic()
            assemble.configure_enforcer(enforcer, largest, {})
            reloads.append(time.monotonic() - started)
        print(f"reloads of the largest policy: {', '.join(f'{s:.2f} s' for s in reloads)}", flush=True)
        enforcer.detach()
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_before)
        remove_pins(hierarchy, root)
        for d in (agent, hierarchy.path(root)):
            d.rmdir()
    write_results(args, unwatched, rows, reloads)
    return 0


def write_results(args, unwatched: list[float], rows: list[dict], reloads: list[float]) -> None:
    base_ns = statistics.median(rows[0]["ns"])
    base_wall = statistics.median(unwatched)
    lines = [
        "# Egress profiles: cost per connect",
        "",
        f"bench/egress.py, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, on {platform.node()} "
        f"({os.cpu_count()} CPUs, Linux {platform.release()}). {args.connects:,} TCP connects to a closed "
        f"loopback port per storm, {args.rounds} rounds each, medians with min-max. The connect4 program's "
        "time per run is the kernel's own count (kernel.bpf_stats_enabled); the storm ratio is its wall "
        "time against the same storm with no programs attached.",
        "",
        "| profile | connect4 ns per run | added by the profile | storm / unwatched | policy written in |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ns = statistics.median(row["ns"])
        wall = statistics.median(row["wall"])
        name = "none (deny lists only)" if row["size"] is None else f"{row['size']:,} prefixes"
        lines.append(f"| {name} | {ns:.0f} ({min(row['ns']):.0f}-{max(row['ns']):.0f}) | "
                     f"{ns - base_ns:+.0f} ns | {wall / base_wall:.2f} ({min(row['wall']) / base_wall:.2f}-"
                     f"{max(row['wall']) / base_wall:.2f}) | {row['write_s']:.2f} s |")
    lines += ["", f"Unwatched storm: {base_wall:.2f} s ({min(unwatched):.2f}-{max(unwatched):.2f}). Reloads of "
              f"the {SIZES[-1]:,}-prefix policy, unchanged (compiled already): "
              f"{', '.join(f'{s:.2f} s' for s in reloads)}."]
    (HERE / "RESULTS-egress.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS-egress.md'}")


if __name__ == "__main__":
    sys.exit(main())
