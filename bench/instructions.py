"""The daemon's user-space cost per event, in instructions. Run by hand:

    .venv/bin/python bench/instructions.py  # writes bench/RESULTS-instructions.md

Why instructions: this VM's speed moves by 1.6-2.3 times within hours with the
code unchanged, so CPU seconds (bench/service.py) cannot tell a 5% change
from the weather. valgrind counts the instructions a process executes,
the same from run to run within about 1%.

What runs: the daemon's hot loop without the kernel. Connect records (or, for
execs, each process's fork, exec and exit records, in an agent), laid out
as in the BPF ring buffer (8-byte headers, 8-byte aligned), are read by the
daemon's ring buffer reader and go through the same calls as in the daemon
(EventStream._on_record: decode, enrich; Daemon.judge: audit line, rules of the
default packs), with the audit log flushed once per batch, as the daemon does
after each poll. Per event = (run with N events - run with none) / N. Not
counted: the kernel (probes, the ring buffer's wakeups, the audit file's
writes), which bench/service.py's CPU figure includes.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

EVENTS = 20_000
BATCH = 500  # connects (or exec'ing processes) per poll: 10k/s drained every 50 ms
KINDS = {"connect": "connect (refused, to 127.0.0.1:9)",
         "exec": "exec in an agent (with its process's fork and exit)"}


def connect_record() -> bytes:
    """A refused connect to 127.0.0.1:9 by this process, from the root cgroup (so the process
    tree and the cgroup names know it), as the connect probe writes it."""
    import time

    from ebpfmon.kernel import abi

    e = abi.SockaddrEvent()
    e.hdr.kind, e.hdr.size = abi.EventKind.CONNECT, abi.SockaddrEvent.payload.offset
    e.hdr.time_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    e.hdr.cgroup_id = os.stat("/sys/fs/cgroup").st_ino
    e.hdr.pid = e.hdr.tid = os.getpid()
    e.hdr.ppid, e.hdr.comm = os.getppid(), b"storm"
    e.retval, e.fd, e.family, e.dport, e.sock_type, e.protocol = -111, 3, socket.AF_INET, 9, 1, 6
    e.addr[:4] = list(socket.inet_aton("127.0.0.1"))
    return bytes(e)[:e.hdr.size]


AGENT_CGROUP_ID = 4242  # the exec storm's agent: named for the cgroup names, no cgroup needed
AGENT = "/ebpfmon-agents/bench-1"
FIRST_PID = 10_000_000  # past pid_max: /proc has none of them, as for a storm's short-lived processes


def exec_records(n: int) -> list[bytes]:
    """What one process of an exec storm in an agent makes, n times over: the fork (of this
    process), the exec of /usr/bin/true, the exit, as the probes write them."""
    import time

    from ebpfmon.kernel import abi

    def header(h, kind, size, pid, comm):
        h.kind, h.size, h.time_ns = kind, size, time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        h.cgroup_id, h.pid, h.tid, h.ppid, h.comm = AGENT_CGROUP_ID, pid, pid, os.getpid(), comm

    records = []
    for i in range(n):
        pid = FIRST_PID + i
        fork = abi.ForkEvent(child_pid=pid, parent_pid=os.getpid())
        header(fork.hdr, abi.EventKind.FORK, ctypes.sizeof(fork), os.getpid(), b"storm")
        execve = abi.ExecEvent(retval=0, argc=1, args_size=5, filename=b"/usr/bin/true", args=b"true\0")
        size = abi.ExecEvent.args.offset + 5
        header(execve.hdr, abi.EventKind.EXEC, size, pid, b"true")
        exit_ = abi.ExitEvent()
        header(exit_.hdr, abi.EventKind.EXIT, ctypes.sizeof(exit_), pid, b"true")
        records += [bytes(fork), bytes(execve)[:size], bytes(exit_)]
    return records


def hot_loop(events: int, kind: str = "connect") -> None:
    """Runs the daemon's hot loop over events connect records, or the records of events execs
    (in the process valgrind counts)."""
    from ebpfmon.alerts.audit import AuditLog
    from ebpfmon.config import Config
    from ebpfmon.service.assemble import rule_context
    from ebpfmon.service.daemon import Daemon
    from ebpfmon.kernel._ringbuf import Consumer
    from ebpfmon.kernel.ringbuf import HEADER_SIZE, RingBufferReader
    from ebpfmon.service.metrics import Metrics
    from ebpfmon.stream.stream import EventStream
    from ebpfmon.rules.engine import Engine
    from ebpfmon.rules.loader import load_rules, rule_paths

    config = Config()
    stream = EventStream(config)  # probes are not loaded: records come from memory below
    stream.tree.bootstrap()
    daemon = Daemon.__new__(Daemon)  # the parts judge() uses, without probes or cgroups
    daemon.config, daemon.show_events, daemon.judged, daemon.containment = config, None, 0, None
    daemon.engine = Engine(load_rules(rule_paths(config.rules)), rule_context(config))
    daemon.metrics = Metrics()
    daemon.audit = AuditLog(config.audit, tempfile.mkdtemp(prefix="ebpfmon-bench-"))
    stream._handler = daemon.judge

    stream.enricher.cgroups.added(AGENT_CGROUP_ID, AGENT)
    records = [connect_record()] * BATCH if kind == "connect" else exec_records(BATCH)
    page, size = 4096, 1024 * 1024
    ring = bytearray(page + 2 * size)  # producer page, then the data (only the first copy used)
    position = 0
    for record in records:
        struct.pack_into("I", ring, page + position, len(record))
        ring[page + position + HEADER_SIZE:page + position + HEADER_SIZE + len(record)] = record
        position += (len(record) + HEADER_SIZE + 7) & ~7
    struct.pack_into("Q", ring, 0, position)  # the producer position
    consumer = bytearray(8)  # the consumer position
    reader = RingBufferReader.__new__(RingBufferReader)  # no map: the same reading code on our memory
    reader.records = Consumer(consumer, bytes(ring), page, size, stream._on_record)

    def batch() -> None:
        consumer[:] = bytes(8)
        if reader.consume() != len(records):
            raise SystemExit("the reader did not take every record")
        daemon.audit.flush()

    batch()  # first use: caches, route lookup, imports
    for _ in range(events // BATCH):
        batch()
    if stream.stats.events[kind] != BATCH * (1 + events // BATCH):
        raise SystemExit(f"events judged: {stream.stats.events}")
    shutil.rmtree(daemon.audit.directory.parent)


def instructions(events: int, kind: str) -> int:
    result = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                             sys.executable, __file__, "--child", str(events), "--kind", kind],
                            capture_output=True, text=True, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"valgrind run with {events} events failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=EVENTS, help=f"events counted (default {EVENTS:,})")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help="count one kind only (default: both)")
    args = parser.parse_args()
    if args.child is not None:
        hot_loop(args.child, args.kind)
        return
    if args.events <= 0 or args.events % BATCH:
        parser.error(f"--events must be a positive multiple of {BATCH} (records per batch), not {args.events}")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind (make bench installs it)")
    rows = []
    for kind in [args.kind] if args.kind else KINDS:
        print(f"counting instructions under valgrind, {kind}: without events, then with {args.events:,} "
              "(about a minute)...", flush=True)
        base = instructions(0, kind)
        loaded = instructions(args.events, kind)
        rows.append(f"| {KINDS[kind]} | {base:,} | {loaded:,} | **{(loaded - base) / args.events:,.0f}** |")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    text = "\n".join([
        "# Instructions per event (bench/instructions.py)",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, {platform.node()}, Python "
        f"{platform.python_version()}",
        "",
        "The daemon's hot loop in user space (ring buffer reader, decode, enrich, process tree and",
        "ancestry, audit line, rules of the default packs), counted by valgrind, per event:",
        f"instructions with {args.events:,} events less those with none, over {args.events:,}.",
        "",
        "| events | instructions, no events | with them | per event |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    (HERE / "RESULTS-instructions.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
