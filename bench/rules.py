"""Rule evaluation speed. Run by hand, as root (the latency part loads probes):

    .venv/bin/python bench/rules.py             # writes bench/RESULTS-rules.md

1. Throughput: the shipped packs on a recorded mix of agent events
   (bench/traces/agent-mix.jsonl.gz: execs, connects, DNS, GPU opens, recorded
   with `ebpfmon trace --json`), replayed on one core. Target: 100k events/s.
2. Latency: the live path (probes -> ring buffer -> decode -> enrich -> rules)
   under a paced storm of 10k connects/s inside an agent cgroup; time from the
   reader taking a record off the ring buffer to its verdict, and from the
   kernel's timestamp to the verdict. Target: p99 under 1 ms at 10k events/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ebpfmon import events as ev  # noqa: E402
from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.service.assemble import rule_context  # noqa: E402
from ebpfmon.config import Config  # noqa: E402
from ebpfmon.rules.engine import Engine  # noqa: E402
from ebpfmon.rules.loader import load_rules  # noqa: E402
from run import build_storm, run_storm  # noqa: E402  (bench/run.py)

TRACE = HERE / "traces/agent-mix.jsonl.gz"


def throughput(seconds: float) -> dict:
    events = [ev.from_json(line) for line in gzip.open(TRACE, "rt")]
    ruleset = load_rules()
    engine = Engine(ruleset, rule_context(Config()))
    rounds, verdicts, start = 0, 0, time.perf_counter()
    cpu = time.process_time()
    while time.perf_counter() - start < seconds:
        for e in events:
            verdicts += len(engine.evaluate(e))
        rounds += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = rounds * len(events)
    kinds = {k: sum(e.kind == k for e in events) for k in ev.KIND_GROUPS["all"]}
    return {"events": len(events), "kinds": kinds, "rules": len(ruleset.rules), "evaluated": n,
            "per_s_wall": n / wall, "per_s_cpu": n / cpu, "verdicts_per_round": verdicts // max(rounds, 1)}


def latency(rate: int, seconds: int) -> dict:
    from ebpfmon.stream.stream import EventStream

    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-{os.getpid()}"
    agent = hierarchy.ensure(f"{root}/agent")
    config = Config(agent_root=root)
    engine = Engine(load_rules(), rule_context(config))
    stream = EventStream(config)
    from_reader, from_kernel = [], []
    clock = time.time_ns

    def judge(event) -> None:
        engine.evaluate(event)
        done = clock()
        from_kernel.append(done - event.time_ns)
        from_reader.append(done - taken[0])

    taken = [0]
    original = stream._on_record

    def on_record(record: bytes) -> None:
        taken[0] = clock()
        original(record)

    stream._on_record = on_record
    stream.start(judge)
    stop = threading.Event()
    thread = threading.Thread(target=stream.run, args=(stop,), daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        took = run_storm(build_storm(Path(tmp)), "connect", rate * seconds, rate, agent)
    time.sleep(1)
    stop.set()
    thread.join()
    stream.refresh_counters()
    lost = sum(stream.stats.lost.values())
    stream.close()
    agent.rmdir()
    hierarchy.path(root).rmdir()

    def pct(values, p):
        values = sorted(values)
        return values[min(len(values) - 1, int(len(values) * p))] / 1e6

    return {"rate": rate, "achieved": rate * seconds / took, "events": len(from_reader), "lost": lost,
            "reader_p50": pct(from_reader, 0.5), "reader_p99": pct(from_reader, 0.99),
            "reader_max": max(from_reader) / 1e6,
            "kernel_p50": pct(from_kernel, 0.5), "kernel_p99": pct(from_kernel, 0.99),
            "kernel_max": max(from_kernel) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-rules.md")
    args = parser.parse_args()
    runs = [throughput(args.seconds / 3) for _ in range(3)]
    lat = latency(10_000, 5)
    t = runs[0]
    rates = [r["per_s_cpu"] for r in runs]
    text = f"""# Rules benchmark

- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC
- machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs (VM), Python {platform.python_version()}

## Throughput, shipped packs, one core

{t['rules']} rules; the recorded mix has {t['events']} events ({', '.join(f'{k} {v}' for k, v in t['kinds'].items())}),
replayed {len(runs)} times for {args.seconds / 3:.1f} s each.

| | median | min | max |
|---|---|---|---|
| events/s per CPU second | {statistics.median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} |

Target: 100,000 events/s.

## Latency at {lat['rate']:,} events/s (live probes, paced connect storm; achieved {lat['achieved']:,.0f}/s)

| from | p50 (ms) | p99 (ms) | max (ms) |
|---|---|---|---|
| record taken off the ring buffer -> verdict | {lat['reader_p50']:.3f} | {lat['reader_p99']:.3f} | {lat['reader_max']:.3f} |
| kernel timestamp -> verdict | {lat['kernel_p50']:.3f} | {lat['kernel_p99']:.3f} | {lat['kernel_max']:.3f} |

{lat['events']:,} events judged, {lat['lost']} lost. Target: p99 under 1 ms.
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
