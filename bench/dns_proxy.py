"""What the DNS proxy adds to a lookup. Run by hand, as root:

    .venv/bin/python bench/dns_proxy.py [--queries 2000] [--clients 4] [--rounds 3]   # writes bench/RESULTS-dns-proxy.md

The enforcement programs and the daemon's DNS proxy are started as the daemon starts them, at an
agent root of the bench's own, with a profile that allows the name asked and the upstream
server's port; the upstream is tests/servers/dns_server.py on loopback (a Python server: its
own speed bounds both paths). From one agent cgroup, dnspython asks, one query after another:

- direct: the upstream itself (not port 53: the kernel does not redirect it);
- proxied: a server at a documentation address on port 53, which the kernel sends to the proxy,
  which asks the upstream, allows the answer's address in the kernel, and answers.

Measured side by side in one run: each lookup's time in the client, p50 and p99, both paths;
then lookups per second with --clients processes asking at once, the proxy (this process)
pinned to one core and the clients and upstream on the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ebpfmon.config import Config, EgressAllow, EgressProfile, EgressSettings  # noqa: E402
from ebpfmon.host.cgroups import Hierarchy  # noqa: E402
from ebpfmon.kernel.enforcer import pin_dir, remove_pins  # noqa: E402
from ebpfmon.kernel.probeset import ProbeSet  # noqa: E402
from ebpfmon.policy.dnsproxy import DnsProxy  # noqa: E402
from ebpfmon.service import assemble  # noqa: E402

NAME = "bench.mirror.test"
REDIRECTED = "192.0.2.53"  # nothing there: the kernel sends port 53 to the proxy
ANSWERS = ",".join(f"198.51.100.{i}" for i in range(10, 20))

CLIENT = """
import json, sys, time
import dns.message, dns.query
server, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(n):
    q = dns.message.make_query(sys.argv[4], "A")
    t = time.perf_counter()
    r = dns.query.udp(q, server, port=port, timeout=5)
    times.append(time.perf_counter() - t)
    assert r.answer, r
print(json.dumps(times))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clients(agent: Path, server: str, port: int, queries: int, count: int, cpus: set[int]) -> tuple[float, list]:
    """count client processes in the agent, queries each at once; (wall seconds, every lookup's time)."""
    def enter():
        os.sched_setaffinity(0, cpus)
        (agent / "cgroup.procs").write_text(str(os.getpid()))

    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, server, str(port), str(queries), NAME],
                              stdout=subprocess.PIPE, text=True, preexec_fn=enter) for _ in range(count)]
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError("a client failed")
        times += json.loads(out)
    return time.monotonic() - started, times


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000, help="lookups per client per round")
    parser.add_argument("--clients", type=int, default=4, help="clients at once for the throughput rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, other_cpus = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    os.sched_setaffinity(0, proxy_cpu)  # the proxy's threads are this process's
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(REPO / "tests/servers/dns_server.py"), "127.0.0.1",
                                 str(upstream_port), ANSWERS, "--ttl", "60"], stdout=subprocess.DEVNULL,
                                preexec_fn=lambda: os.sched_setaffinity(0, other_cpus))
    hierarchy = Hierarchy()
    root = f"/ebpfmon-bench-dns-{os.getpid()}"
    agent = hierarchy.ensure(f"{root}/agent")
    settings = EgressSettings(dns_upstream=(f"127.0.0.1:{upstream_port}",), profiles=(EgressProfile(
        "bench", (f"{root}/*",), "enforce", (EgressAllow(name="*.mirror.test", ports=(443,), proto="tcp"),
                                             EgressAllow(cidr="127.0.0.1", ports=(upstream_port,), proto="udp"))),))
    probes = ProbeSet(["connect", "enforce"], pin_dir=pin_dir(hierarchy, root)).load()
    questions = []
    try:
        probes.add_scope(hierarchy.cgroup_id(root))
        probes.set_all_cgroups(False)
        enforcer = assemble.enforcement(probes, hierarchy, Config(agent_root=root, egress=settings), {})
        proxy = DnsProxy(enforcer, settings, questions.append).start()
        time.sleep(0.5)  # the upstream is listening
        latency = {"direct": [], "proxied": []}
        throughput = {"direct": [], "proxied": []}
        for _ in range(args.rounds):
            for path, (server, port) in (("direct", ("127.0.0.1", upstream_port)), ("proxied", (REDIRECTED, 53))):
                _, times = clients(agent, server, port, args.queries, 1, other_cpus)
                latency[path] += times
                wall, times = clients(agent, server, port, args.queries, args.clients, other_cpus)
                throughput[path].append(len(times) / wall)
                print(f"{path}: p50 {quantile(latency[path], 0.5) * 1e6:.0f} us, "
                      f"{throughput[path][-1]:.0f} lookups/s with {args.clients} clients", flush=True)
        proxy.close()
        enforcer.detach()
    finally:
        upstream.kill()
        probes.close()
        remove_pins(hierarchy, root)
        for d in (agent, hierarchy.path(root)):
            d.rmdir()
    write_results(args, latency, throughput, len(questions))
    return 0


def write_results(args, latency: dict, throughput: dict, events: int) -> None:
    def us(values, q):
        return quantile(values, q) * 1e6

    lines = [
        "# The DNS proxy: what it adds to a lookup",
        "",
        f"bench/dns_proxy.py, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, on {platform.node()} "
        f"({os.cpu_count()} CPUs, Linux {platform.release()}). dnspython in an agent cgroup with a profile, "
        f"{args.queries} A lookups per round one after another, {args.rounds} rounds; then {args.clients} such "
        "clients at once. Upstream: tests/servers/dns_server.py on loopback (one Python thread). The proxy is "
        "pinned to one core, the clients and the upstream to the other(s).",
        "",
        "| path | p50 | p99 | lookups/s, clients at once (median, min-max) |",
        "|---|---|---|---|",
    ]
    for path in ("direct", "proxied"):
        rates = throughput[path]
        lines.append(f"| {path} | {us(latency[path], 0.5):.0f} us | {us(latency[path], 0.99):.0f} us | "
                     f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) |")
    lines += ["", f"Added by the proxy: p50 {us(latency['proxied'], 0.5) - us(latency['direct'], 0.5):+.0f} us, "
              f"p99 {us(latency['proxied'], 0.99) - us(latency['direct'], 0.99):+.0f} us. Every proxied lookup "
              f"was an event ({events} events)."]
    (HERE / "RESULTS-dns-proxy.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS-dns-proxy.md'}")


if __name__ == "__main__":
    sys.exit(main())
