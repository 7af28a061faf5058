"""The fault suite's figures. Run by hand (or by `make bench`), as root:

    .venv/bin/python bench/faults.py             # writes bench/RESULTS-faults.md

Runs tests/faults (each fault injected as a real process meets it: bad files at reload, a full
disk under the state directory and the audit log, a garbage spool and quarantine file, a second
daemon, a taken metrics port, a flood past the ring buffer, misbehaving HTTP servers, wall-clock
jumps) and writes each fault and its outcome. A fault survived is a test passed: each test
asserts the daemon still runs, still judges and enforces, and that its alerts all arrived.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-faults.md")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".xml") as report:
        env = {**os.environ, "EBPFMON_REQUIRE_BPF": "1"}
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults",
                               f"--junitxml={report.name}"], cwd=HERE.parent, env=env).returncode
        cases = ET.parse(report.name).getroot().iter("testcase")
        outcomes = [(c.get("classname", "").rsplit(".", 1)[-1], c.get("name", ""),
                     "failed" if c.find("failure") is not None or c.find("error") is not None
                     else "skipped" if c.find("skipped") is not None else "survived",
                     float(c.get("time", 0))) for c in cases]
    args.out.write_text(render(outcomes))
    print(f"wrote {args.out}")
    return code


def render(outcomes: list[tuple[str, str, str, float]]) -> str:
    survived = sum(o == "survived" for _, _, o, _ in outcomes)
    lines = [
        "# Faults: injected, survived",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        "- suite: tests/faults, against `ebpfmon run` on an agent root of its own (test_daemon), the alerting "
        "stage with real HTTP servers on loopback (test_sinks) and with injected clocks (test_clock)",
        "",
        f"- faults injected: **{len(outcomes)}**, survived: **{survived}**, alerts lost: **0** in the survived ones "
        "(each asserts its alerts arrived; a fault not survived is a failed test, listed below)",
        "",
        "| file | fault | outcome | seconds |",
        "|---|---|---|---|",
    ]
    for module, name, outcome, seconds in outcomes:
        fault = name.removeprefix("test_").replace("_", " ")
        lines.append(f"| {module} | {fault} | {outcome} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
