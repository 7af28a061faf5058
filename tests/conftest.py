"""Shared fixtures: a test cgroup root, fresh agent cgroups, a running monitor.

Kernel tests skip, with the reason, only where this machine cannot load BPF;
with EBPFMON_REQUIRE_BPF=1 (CI) that skip is a failure instead. Every cgroup a
test makes lives under its own root (/ebpfmon-test-PID) and is removed after,
with any process left in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from ebpfmon.config import DEFAULT_GPU_PREFIXES, Config
from ebpfmon.host.cgroups import Hierarchy
from helpers import (DNS_SERVER, MIRROR6, MIRROR_PORT, MIRRORS, REPO, REQUIRE_BPF, UNLISTED, Collector, Pool,
                     RunningDaemon, Served, bpf_unavailable_reason, make_agent_cgroup, remove_cgroup_tree,
                     line_of, stopped_after)

TIERS = ("unit", "kernel", "e2e", "redteam", "faults")


def pytest_collection_modifyitems(items) -> None:
    """Each test is marked with its tier, the folder it is in (pytest -m unit: the fast tier)."""
    for item in items:
        tier = Path(item.fspath).relative_to(Path(__file__).parent).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def bpf() -> None:
    """Depend on this in every test that needs the kernel."""
    reason = bpf_unavailable_reason()
    if reason:
        if REQUIRE_BPF:
            pytest.fail(f"EBPFMON_REQUIRE_BPF=1, but this machine cannot load BPF: {reason}")
        pytest.skip(f"this machine cannot load BPF: {reason}")


@pytest.fixture(scope="session")
def hierarchy(bpf):
    """The cgroup2 hierarchy; at the end, enforcement state pinned during this session for
    cgroups that are gone is removed (a concurrent session's live state stays)."""
    import shutil

    pins = Path("/sys/fs/bpf/ebpfmon")
    before = set(pins.iterdir()) if pins.is_dir() else set()
    hierarchy = Hierarchy()
    yield hierarchy
    alive = {os.stat(d).st_ino for d, _, _ in os.walk(hierarchy.path("/"))}  # cgroup ids are inode numbers
    for leftover in (set(pins.iterdir()) if pins.is_dir() else set()) - before:
        if not leftover.name.isdigit() or int(leftover.name) not in alive:
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture(scope="session")
def test_root(hierarchy):
    """This test session's own cgroup root; the agent root of its monitor."""
    name = f"/ebpfmon-test-{os.getpid()}"
    path = hierarchy.ensure(name)
    yield name
    remove_cgroup_tree(path)


@pytest.fixture
def own_root(hierarchy):
    """An agent root for one test (a daemon of its own): removed after, with what
    enforcement pinned and attached there."""
    from ebpfmon.kernel.enforcer import remove_pins

    name = f"/ebpfmon-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path = hierarchy.ensure(name)
    yield name
    remove_pins(hierarchy, name)
    remove_cgroup_tree(path)  # removing the cgroup detaches what was attached to it


@pytest.fixture
def agent_cgroup(hierarchy, test_root):
    """A fresh agent cgroup under the test root, removed after the test."""
    cgroup = make_agent_cgroup(hierarchy, test_root)
    yield cgroup
    remove_cgroup_tree(cgroup.path)


@pytest.fixture(scope="session")
def uring_connect(tmp_path_factory) -> Path:
    """A connect through io_uring (tests/servers/uring_connect.c): no connect(2), so no tracepoint."""
    exe = tmp_path_factory.mktemp("uring") / "uring_connect"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(REPO / "tests/servers/uring_connect.c"), "-luring"],
                   check=True)
    return exe


@pytest.fixture(scope="session")
def fake_gpu_dir(tmp_path_factory, bpf) -> Path:
    """A directory holding a fake NVIDIA node: c 195 0 opens with ENXIO (no driver)."""
    d = tmp_path_factory.mktemp("fakegpu")
    os.mknod(d / "nvidia0", 0o666 | 0o020000, os.makedev(195, 0))
    return d


@pytest.fixture(scope="session")
def monitor(bpf, test_root, fake_gpu_dir):
    """All probes loaded once, scoped to the test root, events collected."""
    from ebpfmon.stream.stream import EventStream

    from ebpfmon.service.assemble import rule_context
    from ebpfmon.rules.engine import Engine
    from ebpfmon.rules.loader import load_rules

    config = Config(agent_root=test_root,
                    gpu_prefixes=DEFAULT_GPU_PREFIXES + (f"{fake_gpu_dir}/nvidia",))
    stream = EventStream(config)
    collector = Collector(stream, Engine(load_rules(), rule_context(config)))
    stream.start(collector.add)
    thread = threading.Thread(target=stream.run, args=(collector.stop,), daemon=True)
    thread.start()
    yield collector
    collector.stop.set()
    thread.join(timeout=10)
    stream.close()


# ---- a small "internet" (tests/servers/internet.py) ----


@pytest.fixture(scope="session")
def netns_host(bpf):
    """A host at 198.51.100.2 in a network namespace of its own, reached over a veth pair."""
    from servers import internet

    host = internet.create(f"ebpfmon-test-{os.getpid()}")
    try:
        yield host
    finally:
        internet.remove(host)


@pytest.fixture(scope="session")
def sshd(netns_host, tmp_path_factory):
    """A real OpenSSH server in the netns host, with a key for root; yields the client key path."""
    from servers import internet

    server, key = internet.start_sshd(netns_host, tmp_path_factory.mktemp("sshd"))
    with stopped_after(server):
        yield key


@pytest.fixture(scope="session")
def stratum_pool(netns_host):
    """The fake stratum pool (tests/servers/stratum_pool.py) at 198.51.100.2:3333."""
    server = netns_host.popen([sys.executable, str(REPO / "tests/servers/stratum_pool.py"), netns_host.address,
                               "3333"], stdout=subprocess.PIPE, text=True)
    pool = Pool(netns_host.address, 3333, [])
    assert line_of(server.stdout).strip() == "listening"

    def read() -> None:
        for line in server.stdout:
            pool.accepted.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    with stopped_after(server):
        yield pool


@pytest.fixture(scope="session")
def mirror(netns_host):
    """The test mirror: a DNS server in the namespace answering mirror.test (and anything else)
    round robin from MIRRORS with a TTL of one second, and a listener on MIRROR_PORT of every
    address there. Yields both servers (what they did is in their lines)."""
    for address in [DNS_SERVER, *MIRRORS, UNLISTED, MIRROR6]:
        netns_host.add_address(address)
    dns_server = netns_host.popen([sys.executable, str(REPO / "tests/servers/dns_server.py"), DNS_SERVER, "53",
                                   ",".join(MIRRORS), "--ttl", "1", "--aaaa", MIRROR6],
                                  stdout=subprocess.PIPE, text=True)
    listener = netns_host.popen([sys.executable, str(REPO / "tests/servers/listener.py"), "::", str(MIRROR_PORT)],
                                stdout=subprocess.PIPE, text=True)
    with stopped_after(dns_server), stopped_after(listener):
        yield Served(dns_server), Served(listener)


# ---- a daemon with containment armed, on an agent root of its own ----

@pytest.fixture(scope="session")
def contained_root(hierarchy):
    """The agent root of the containment daemon; removed (with its pinned state) after."""
    from ebpfmon.kernel.enforcer import remove_pins

    name = f"/ebpfmon-test-{os.getpid()}-contained"
    path = hierarchy.ensure(name)
    yield name
    remove_pins(hierarchy, name)
    remove_cgroup_tree(path)


@pytest.fixture(scope="session")
def containment_daemon(bpf, hierarchy, contained_root, fake_gpu_dir, tmp_path_factory):
    """ebpfmon's daemon with containment armed: agents under contained_root; GPUs for gpu-* agents only."""
    from ebpfmon.config import AlertSettings, EnforceSettings, MetricsSettings
    from ebpfmon.service.daemon import Daemon

    config = Config(agent_root=contained_root, gpu_prefixes=DEFAULT_GPU_PREFIXES + (f"{fake_gpu_dir}/nvidia",),
                    gpu_entitled=(f"{contained_root}/gpu-*",),
                    gpu_devices=((f"{contained_root}/gpu-limited-*", (1,)),),
                    state_dir=str(tmp_path_factory.mktemp("state")), enforce=EnforceSettings(breaker_agents=100),
                    alerts=AlertSettings(sinks=()), metrics=MetricsSettings(enabled=False))
    running = RunningDaemon(None, contained_root, threading.Event())
    daemon = Daemon(config, show_events=running.emit, echo=running.emit)
    running.daemon = daemon
    daemon.start()
    thread = threading.Thread(target=daemon.run, args=(running.stop,), daemon=True)
    thread.start()
    yield running
    running.stop.set()
    thread.join(timeout=10)
    daemon.enforcer.detach()
    daemon.close()


@pytest.fixture
def contained_agent(hierarchy, containment_daemon):
    """A fresh agent cgroup under the containment daemon's root."""
    cgroup = make_agent_cgroup(hierarchy, containment_daemon.root)
    yield cgroup
    remove_cgroup_tree(cgroup.path)
