"""What the audit log's hash chain costs per record. Run by hand (or by `make bench`):

    .venv/bin/python bench/audit_chain.py        # writes bench/RESULTS-audit-chain.md

Writes the same connect and exec events through the audit log (AuditLog.write, then flush
once per batch of 64, as the daemon does per poll) into a temporary directory, in alternated
rounds, and times: the whole per record, and the chain's own part (the SHA-256 of each line
and the splice of "prev" into it, timed over the same lines). Then `ebpfmon audit verify`'s
speed over what was written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ebpfmon import events as ev  # noqa: E402
from ebpfmon.alerts.audit import AuditLog, chained, line_hash, verify  # noqa: E402
from ebpfmon.config import AuditSettings  # noqa: E402

RECORDS = 100_000
BATCH = 64
ROUNDS = 5


def workload() -> list[ev.Event]:
    ancestry = ev.Ancestry([ev.Ancestor(pid=100, comm="bash", exe="/usr/bin/bash", argv=["bash", "-c", "x" * 300]),
                            ev.Ancestor(pid=1, comm="init", exe="/sbin/init", argv=["/sbin/init"])])
    events: list[ev.Event] = []
    for n in range(RECORDS):
        proc = ev.Process(pid=200 + n % 50, tid=200 + n % 50, ppid=100, uid=0, gid=0, comm="python3")
        if n % 4:
            events.append(ev.ConnectEvent(time_ns=n, cgroup_id=7, cgroup="/ebpfmon-agents/a", proc=proc,
                                          ancestry=ancestry, address=f"192.0.2.{n % 200}", port=443, retval=0))
        else:
            events.append(ev.ExecEvent(time_ns=n, cgroup_id=7, cgroup="/ebpfmon-agents/a", proc=proc,
                                       ancestry=ancestry, filename="/usr/bin/git",
                                       argv=["git", "status", "--porcelain", f"path{n}"]))
    return events


def one_round(events: list[ev.Event], directory: Path) -> tuple[float, list[bytes]]:
    log = AuditLog(AuditSettings(max_bytes=1 << 40), directory)
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        for event in events[start:start + BATCH]:
            log.write(event)
        log.flush()
    elapsed = time.perf_counter() - started
    log.close()
    return elapsed, log.path.read_bytes().split(b"\n")[:-1]


def chain_part(lines: list[bytes]) -> float:
    """The chain's own work on these lines: each line's hash, and the splice into the next."""
    bare = [line[:line.rindex(b',"prev":')] + b"}" for line in lines]
    started = time.perf_counter()
    prev = ""
    for line in bare:
        prev = line_hash(chained(line, prev))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-audit-chain.md")
    args = parser.parse_args()
    events = workload()
    totals, chains, verifies = [], [], []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o700)
            elapsed, lines = one_round(events, Path(tmp))
            totals.append(elapsed / len(lines))
            chains.append(chain_part(lines) / len(lines))
            started = time.perf_counter()
            found = verify(Path(tmp) / "audit")
            verifies.append(len(lines) / (time.perf_counter() - started))
            assert found.problem is None, found.problem
    total, chain, speed = statistics.median(totals), statistics.median(chains), statistics.median(verifies)
    text = "\n".join([
        "# The audit log's hash chain: cost per record",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM)",
        f"- workload: {RECORDS:,} events (3 connects to 1 exec, one shared ancestry), written in batches of "
        f"{BATCH} then flushed, {ROUNDS} rounds; medians",
        "",
        "| what | per record |",
        "|---|---|",
        f"| audit log write + flush, chain included | {total * 1e9:,.0f} ns |",
        f"| the chain's part of it (SHA-256 of the line, prev spliced in) | {chain * 1e9:,.0f} ns "
        f"({chain / total:.0%}) |",
        f"| `ebpfmon audit verify` | {speed:,.0f} records/s |",
        "",
    ])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
