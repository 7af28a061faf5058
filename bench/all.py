"""Every benchmark, one after the other, then bench/RESULTS.md. `make bench` runs this, as root:

    .venv/bin/python bench/all.py           # about 15 minutes on a 2-core VM
    .venv/bin/python bench/all.py --only compare,service

Each script writes its own RESULTS-<name>.md (workload, median of several runs
with min and max, machine, date); RESULTS.md puts them together under one
header. A script that fails is named in RESULTS.md with its exit code and the
others still run: one broken benchmark does not hide the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script -> the results file it writes, in the order they run (the slow ones last)
BENCHMARKS = {
    "run": "RESULTS-foundation.md",
    "rules": "RESULTS-rules.md",
    "service": "RESULTS-service.md",
    "instructions": "RESULTS-instructions.md",
    "containment": "RESULTS-containment.md",
    "egress": "RESULTS-egress.md",
    "dns_proxy": "RESULTS-dns-proxy.md",
    "redteam": "RESULTS-redteam.md",
    "faults": "RESULTS-faults.md",
    "audit_chain": "RESULTS-audit-chain.md",
    "nats_export": "RESULTS-nats-export.md",
    "agents": "RESULTS-agents.md",
    "compare": "RESULTS-compare.md",
    "workload": "RESULTS-workload.md",
}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine())
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    try:
        distro = platform.freedesktop_os_release()["PRETTY_NAME"]
    except OSError:
        distro = "unknown distribution"
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {mem_kib / 2**20:.1f} GiB, "
            f"Linux {platform.release()}, {distro}, Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    failed: dict[str, int] = {}
    for n, name in enumerate(chosen, 1):
        started = time.monotonic()
        print(f"[{n}/{len(chosen)}] bench/{name}.py ...", flush=True)
        code = subprocess.run([sys.executable, str(HERE / f"{name}.py")]).returncode
        print(f"[{n}/{len(chosen)}] bench/{name}.py: {'done' if code == 0 else f'FAILED (exit code {code})'} "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        if code:
            failed[name] = code
    write_summary(failed)
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


def write_summary(failed: dict[str, int]) -> None:
    parts = [
        "# ebpfmon benchmarks",
        "",
        f"Written by `make bench` (bench/all.py) on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {machine()}.",
        "Each section comes from its script's own results file, with that run's date; "
        "bench/README.md says what each measures and discusses the figures against the targets.",
        "",
    ]
    for name, results in BENCHMARKS.items():
        if name in failed:
            parts += [f"## bench/{name}.py", "", f"**Failed** (exit code {failed[name]}) in the last run; "
                      f"the figures below, if any, are from an earlier run.", ""]
        path = HERE / results
        if path.exists():
            # one level down, so each file's title is a section of this one
            parts += [("#" + line if line.startswith("#") else line) for line in path.read_text().splitlines()]
            parts.append("")
        else:
            parts += [f"## bench/{name}.py", "", "No results yet.", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
