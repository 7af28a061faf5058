"""The red team's figures. Run by hand (or by `make bench`), as root:

    .venv/bin/python bench/redteam.py            # writes bench/RESULTS-redteam.md

Runs the red-team suite (tests/redteam: each attack and benign scenario live, in an agent
cgroup of its own, against one daemon with the shipped packs and enforcement, in a netns
test internet) and writes what it counted: attacks alerted, attacks contained (no reverse
port open at the outside host, no connection at the pool, the agent cut), benign work
alerted, by class, with every scenario's rules.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-redteam.md")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        env = {**os.environ, "EBPFMON_REDTEAM_REPORT": report.name, "EBPFMON_REQUIRE_BPF": "1"}
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/redteam"],
                              cwd=HERE.parent, env=env).returncode
        try:
            outcomes = json.loads(Path(report.name).read_text())
        except ValueError:
            print("bench/redteam.py: the suite wrote no outcomes", file=sys.stderr)
            return 1
    args.out.write_text(render(outcomes))
    print(f"wrote {args.out}")
    return code


def render(outcomes: list[dict]) -> str:
    attacks = [o for o in outcomes if o["attack"]]
    benign = [o for o in outcomes if not o["attack"]]
    checked = [o for o in attacks if o["containment_checked"]]
    lines = [
        "# Red team: attacks and benign agent work, live",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        "- suite: tests/redteam (scenarios.py), one daemon with the shipped packs and enforcement, every scenario "
        "in an agent cgroup of its own, the netns test internet (198.51.100.0/25 outside, 198.51.100.128/25 internal)",
        "",
        f"- attacks alerted: **{sum(o['alerted'] for o in attacks)}/{len(attacks)}**",
        f"- attacks contained: **{sum(o['contained'] for o in checked)}/{len(checked)}** (of those with a "
        "containment check: no reverse port open at the outside host, no connection at the pool, the agent cut)",
        f"- benign alerted: **{sum(o['alerted'] for o in benign)}/{len(benign)}** (text that mentions an attack, "
        f"allowed a NOTICE: {sum(o['noticed'] for o in benign)})",
        f"- scenarios failed: {sum(not o['passed'] for o in outcomes)}",
        "",
        "| class | scenarios | alerted | contained / checked |",
        "|---|---|---|---|",
    ]
    by_class = collections.defaultdict(list)
    for o in outcomes:
        by_class[(o["kind"], o["class"])].append(o)
    for (kind, klass), group in sorted(by_class.items()):
        with_check = [o for o in group if o["containment_checked"]]
        lines.append(f"| {kind}: {klass} | {len(group)} | {sum(o['alerted'] for o in group)} | "
                     f"{sum(o['contained'] for o in with_check)} / {len(with_check)} |")
    lines += ["", "| scenario | rules that fired | passed |", "|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o['kind']}: {o['name']} | {', '.join(o['fired']) or '-'} | "
                     f"{'yes' if o['passed'] else 'NO: ' + o['why']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
