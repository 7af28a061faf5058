"""Shared fixtures: a test cgroup root, fresh agent cgroups, a running monitor.

Kernel tests skip, with the reason, only where this machine cannot load BPF;
with EBPFMON_REQUIRE_BPF=1 (CI) that skip is a failure instead. Every cgroup a
test makes lives under its own root (/ebpfmon-test-PID) and is removed after,
with any process left in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ebpfmon.host.cgroups import Hierarchy, cgroup2_mount
from ebpfmon.config import DEFAULT_GPU_PREFIXES, Config
from ebpfmon.errors import EbpfmonError
from ebpfmon.kernel.probeset import import_bcc, tracefs_dir

REQUIRE_BPF = os.environ.get("EBPFMON_REQUIRE_BPF") == "1"
REPO = Path(__file__).resolve().parent.parent
EBPFMON = [sys.executable, "-m", "ebpfmon"]


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not running as root (loading BPF programs needs root)"
    try:
        import_bcc()
        tracefs_dir()
        cgroup2_mount()
    except EbpfmonError as e:
        return e.message
    return None


@pytest.fixture(scope="session")
def bpf() -> None:
    """Depend on this in every test that needs the kernel."""
    reason = bpf_unavailable_reason()
    if reason:
        if REQUIRE_BPF:
            pytest.fail(f"EBPFMON_REQUIRE_BPF=1, but this machine cannot load BPF: {reason}")
        pytest.skip(f"this machine cannot load BPF: {reason}")


def remove_cgroup_tree(path: Path) -> None:
    """Kills what runs in a test cgroup tree, then removes it bottom-up."""
    if not path.exists():
        return
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in dirs + [path]:
        for _ in range(50):
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        d.rmdir()


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


@dataclass
class AgentCgroup:
    name: str  # relative to the cgroup2 mount
    path: Path
    id: int

    def preexec(self):
        """For subprocess: moves the child into this cgroup before it execs."""
        procs = str(self.path / "cgroup.procs")

        def join():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def run(self, argv, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 30)
        return subprocess.run(argv, preexec_fn=self.preexec(), **kwargs)

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=self.preexec(), **kwargs)


def make_agent_cgroup(hierarchy: Hierarchy, parent: str) -> AgentCgroup:
    name = f"{parent}/agent-{uuid.uuid4().hex[:8]}"
    path = hierarchy.ensure(name)
    return AgentCgroup(name, path, hierarchy.cgroup_id(name))


@pytest.fixture
def agent_cgroup(hierarchy, test_root):
    """A fresh agent cgroup under the test root, removed after the test."""
    cgroup = make_agent_cgroup(hierarchy, test_root)
    yield cgroup
    remove_cgroup_tree(cgroup.path)


@pytest.fixture(scope="session")
def fake_gpu_dir(tmp_path_factory, bpf) -> Path:
    """A directory holding a fake NVIDIA node: c 195 0 opens with ENXIO (no driver)."""
    d = tmp_path_factory.mktemp("fakegpu")
    os.mknod(d / "nvidia0", 0o666 | 0o020000, os.makedev(195, 0))
    return d


@dataclass
class Collector:
    """Runs an EventStream in a thread, judges each event with the rules, keeps both."""

    stream: object
    engine: object
    events: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, event) -> None:
        verdicts = self.engine.evaluate(event)
        with self.cond:
            self.events.append(event)
            self.verdicts.extend(verdicts)
            self.cond.notify_all()

    def wait_for_verdict(self, rule: str, agent: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for v in self.verdicts:
                    if v.rule == rule and v.agent == agent:
                        return v
                left = deadline - time.monotonic()
                if left <= 0:
                    fired = sorted({(v.rule, v.agent) for v in self.verdicts if v.agent == agent})
                    pytest.fail(f"rule {rule!r} did not fire for {agent} within {timeout}s; fired: {fired}")
                self.cond.wait(left)

    def verdicts_for(self, agent: str) -> list:
        with self.cond:
            return [v for v in self.verdicts if v.agent == agent]

    def wait_for(self, predicate, timeout: float = 10.0):
        """The first event matching predicate; fails the test after timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no matching event within {timeout}s; have {len(self.events)} events")
                self.cond.wait(left)

    def in_cgroup(self, cgroup_id: int, kind: str | None = None) -> list:
        with self.cond:
            return [e for e in self.events if e.cgroup_id == cgroup_id and (kind is None or e.kind == kind)]


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

def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    try:
        yield key
    finally:
        stop_process(server)


@dataclass
class Pool:
    host: str
    port: int
    accepted: list  # "accepted ip:port" lines, as the pool prints them


@pytest.fixture(scope="session")
def stratum_pool(netns_host):
    """The fake stratum pool (tests/servers/stratum_pool.py) at 198.51.100.2:3333."""
    server = netns_host.popen([sys.executable, str(REPO / "tests/servers/stratum_pool.py"), netns_host.address,
                               "3333"], stdout=subprocess.PIPE, text=True)
    pool = Pool(netns_host.address, 3333, [])
    assert server.stdout.readline().strip() == "listening"

    def read() -> None:
        for line in server.stdout:
            pool.accepted.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    try:
        yield pool
    finally:
        stop_process(server)


# ---- a daemon with containment armed, on an agent root of its own ----

class Lines:
    """Lines something prints, gathered from another thread, waited for by content."""

    def __init__(self):
        self.lines: list[str] = []
        self.cond = threading.Condition()

    def emit(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def wait_line(self, *parts: str, timeout: float = 10.0, alive=lambda: True) -> str:
        """The first line holding every part; fails the test after timeout or once alive() is false."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if all(p in line for p in parts):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    pytest.fail(f"no line with {parts} (after {timeout}s or exit); last: {self.lines[-8:]}")
                self.cond.wait(min(left, 0.2))


@dataclass
class RunningDaemon(Lines):
    daemon: object
    root: str
    stop: threading.Event

    def __post_init__(self):
        Lines.__init__(self)

    @property
    def containment(self):
        return self.daemon.containment


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
                    gpu_minors=((f"{contained_root}/gpu-limited-*", (1,)),),
                    state_dir=str(tmp_path_factory.mktemp("state")), enforce=EnforceSettings(rate_limit=50),
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
