"""An agent's day of work, inside an agent cgroup, with and without a monitor. Run by hand, as root:

    .venv/bin/python bench/workload.py [--rounds 3]    # writes bench/RESULTS-workload.md

What a coding agent does between thoughts, made here from nothing the network
holds: a C build (`make -j` over a few hundred generated translation units),
a pytest run of a few hundred tests, git work on a local repository (commits,
status, diffs, log, branches), and pip installs from a local wheel directory.
Each step runs inside an agent cgroup under the bench's agent root. The
monitors are bench/compare.py's: none, ebpfmon (`ebpfmon run`: shipped rules,
enforcement armed, audit log on), bpftrace on the same syscalls, auditd with
execve and connect rules. Rounds alternate the monitors (none, each monitor,
none, ... in every round), so a drift of the VM's speed lands on all of them;
a ratio is a step's wall time over the median of the no-monitor runs of the
same round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from compare import agent_cgroup, alternate, monitors  # noqa: E402  (bench/compare.py)
from service import cpu_seconds  # noqa: E402  (bench/service.py)

UNITS = 300  # C translation units
TESTS = 300  # pytest tests
COMMITS = 100  # git: commits, each with a status, a diff and a log
PACKAGES = 6  # pip: packages in the wheel directory, installed twice a run
PYTHON = str(REPO / ".venv/bin/python")


def make_c_project(root: Path) -> None:
    root.mkdir()
    for i in range(UNITS):
        body = "\n".join(f"int f{i}_{j}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += (k * {j + 1}) ^ x; "
                         f"return s + {i}; }}" for j in range(12))
        (root / f"unit{i}.c").write_text(f"#include <stdio.h>\n#include <string.h>\n{body}\n")
    (root / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "Makefile").write_text(
        "SRC := $(wildcard *.c)\nOBJ := $(SRC:.c=.o)\nprog: $(OBJ)\n\t$(CC) -o $@ $^\n"
        "%.o: %.c\n\t$(CC) -O1 -c -o $@ $<\nclean:\n\trm -f *.o prog\n")


def make_tests(root: Path) -> None:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    per_file = TESTS // 10
    for f in range(10):
        tests = "\n\n".join(
            f"def test_{f}_{t}(tmp_path):\n    p = tmp_path / 'x'\n    p.write_text('{t}' * {t + 1})\n"
            f"    assert len(p.read_text()) == {len(str(t)) * (t + 1)}" for t in range(per_file))
        (root / f"test_part{f}.py").write_text(tests + "\n")


def make_wheels(work: Path) -> Path:
    """PACKAGES pure-Python wheels, built once (outside the timing) with pip itself."""
    wheels = work / "wheels"
    for n in range(PACKAGES):
        src = work / f"src{n}"
        (src / f"benchpkg{n}").mkdir(parents=True)
        (src / f"benchpkg{n}" / "__init__.py").write_text(f"VALUE = {n}\n" + "def f(x):\n    return x\n" * 20)
        (src / "pyproject.toml").write_text(
            f'[project]\nname = "benchpkg{n}"\nversion = "1.0"\n'
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
        subprocess.run([PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                        str(src)], check=True, capture_output=True)
    return wheels


GIT = ("set -e\n"
       "export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@example.com GIT_COMMITTER_NAME=bench "
       "GIT_COMMITTER_EMAIL=bench@example.com HOME=\"$PWD\"\n"
       "rm -rf repo && mkdir repo && cd repo && git init -q -b main && cp ../c/*.c . && git add -A "
       "&& git commit -qm initial\n"
       f"for i in $(seq {COMMITS}); do echo \"int change$i;\" >> unit$i.c; git status --short > /dev/null; "
       "git diff --stat > /dev/null; git add -A; git commit -qm \"change $i\"; git log --oneline -5 > /dev/null; done\n"
       "git checkout -qb topic HEAD~5 && git checkout -q main && git log --oneline | wc -l > /dev/null\n")


def steps(work: Path, wheels: Path) -> dict[str, list[str]]:
    packages = [f"benchpkg{n}" for n in range(PACKAGES)]
    pip = (f"rm -rf site && for r in 1 2; do {PYTHON} -m pip install -q --no-index --find-links {wheels} "
           f"--target site --upgrade {' '.join(packages)}; done")
    return {
        f"C build (make -j{os.cpu_count()}, {UNITS} units)":
            ["sh", "-c", f"cd c && make -s clean && make -s -j{os.cpu_count()}"],
        f"pytest ({TESTS} tests)": [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work / "tests")],
        f"git ({COMMITS} commits, status, diff, log)": ["sh", "-c", GIT],
        f"pip install ({PACKAGES} wheels, twice)": ["sh", "-c", pip],
    }


def run_step(argv: list[str], work: Path, cgroup: Path, monitor_pid: int | None = None) -> tuple[float, float]:
    """Runs a step in the agent cgroup: its wall time, and the monitor's CPU time during it as a
    share of the step's own CPU time (0 without a monitor)."""
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    monitor_before = cpu_seconds(monitor_pid) if monitor_pid else 0.0
    started = time.monotonic()
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, preexec_fn=join)
    took = time.monotonic() - started
    monitor = cpu_seconds(monitor_pid) - monitor_before if monitor_pid else 0.0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"step {argv} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, monitor / used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebpfmon-workload-"))
    print(f"making the workload in {work} ...", flush=True)
    make_c_project(work / "c")
    make_tests(work / "tests")
    todo = steps(work, make_wheels(work))
    # per tool and step: [(seconds, round)], and [the monitor's CPU over the step's]
    times: dict[str, dict[str, list[tuple[float, int]]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}

    def work_through(tool, r: int) -> None:
        for name, argv in todo.items():
            took, share = run_step(argv, work, agent, tool.proc.pid if tool.proc else None)
            times.setdefault(tool.name, {}).setdefault(name, []).append((took, r))
            cpu.setdefault(tool.name, {}).setdefault(name, []).append(share)
        print(f"round {r + 1}: {tool.name}:",
              ", ".join(f"{s.split(' (')[0]} {v[-1][0]:.2f}s" for s, v in times[tool.name].items()), flush=True)

    try:
        with agent_cgroup("agent") as (root, agent):
            problems = alternate(monitors(work, root), args.rounds, work_through)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(times, cpu, problems, args.rounds)


def write(times: dict, cpu: dict, problems: dict[str, str], rounds: int) -> None:
    base = times["no monitoring"]
    # the no-monitor figure of each round: the median of its runs in that round (first and last)
    base_of = {s: {r: statistics.median([t for t, rr in base[s] if rr == r]) for r in range(rounds)} for s in base}
    lines = [
        "# An agent's work with and without a monitor (bench/workload.py)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        f"- {rounds} rounds, each running every monitor in turn, no monitor first and last; every step inside an "
        "agent cgroup; ratio = wall time / the same round's no-monitor time (median of rounds, min–max)",
        "",
        "| monitor | " + " | ".join(base) + " | whole workload |",
        "|---|" + "---|" * (len(base) + 1),
    ]
    for tool, problem in problems.items():
        lines.append(f"| {tool} | unavailable: {problem} |")
    for tool, data in times.items():
        if tool == "no monitoring":
            cells = [f"{statistics.median([t for t, _ in data[s]]):.2f} s" for s in data]
            total = statistics.median([sum(base_of[s][r] for s in data) for r in range(rounds)])
            lines.append(f"| {tool} (seconds) | " + " | ".join(cells) + f" | {total:.2f} s |")
            continue
        cells = []
        for s, runs in data.items():
            ratios = [t / base_of[s][r] for t, r in runs]
            cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f})")
        whole = [sum(t for s in data for t, rr in data[s] if rr == r) / sum(base_of[s][r] for s in data)
                 for r in range(rounds)]
        lines.append(f"| {tool} | " + " | ".join(cells) + f" | **{statistics.median(whole):.3f}** "
                     f"({min(whole):.3f}–{max(whole):.3f}) |")
    lines += [
        "",
        "The monitor's own CPU time (its process, every thread) while a step ran, as a share of the "
        "CPU time the step's processes used (median of rounds): less noisy than the wall times, and "
        "what the monitor takes from a machine whose cores the agent keeps busy. Work a monitor "
        "makes in the kernel on the agent's behalf (probes, audit records) is in the step's share.",
        "",
        "| monitor | " + " | ".join(base) + " |",
        "|---|" + "---|" * len(base),
    ]
    for tool, shares in cpu.items():
        if tool == "no monitoring":
            continue
        lines.append(f"| {tool} | " + " | ".join(f"{100 * statistics.median(v):.1f}%" for v in shares.values()) + " |")
    (HERE / "RESULTS-workload.md").write_text("\n".join(lines) + "\n")
    print((HERE / "RESULTS-workload.md").read_text())


if __name__ == "__main__":
    main()
