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

from ebpfmon.cgroups import Hierarchy, cgroup2_mount
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
def hierarchy(bpf) -> Hierarchy:
    return Hierarchy()


@pytest.fixture(scope="session")
def test_root(hierarchy):
    """This test session's own cgroup root; the agent root of its monitor."""
    name = f"/ebpfmon-test-{os.getpid()}"
    path = hierarchy.ensure(name)
    yield name
    remove_cgroup_tree(path)


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
    """Runs an EventStream in a thread and keeps what it delivers."""

    stream: object
    events: list = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

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
    from ebpfmon.monitor import EventStream

    config = Config(agent_root=test_root,
                    gpu_prefixes=DEFAULT_GPU_PREFIXES + (f"{fake_gpu_dir}/nvidia",))
    stream = EventStream(config)
    collector = Collector(stream)
    stream.start(collector.add)
    thread = threading.Thread(target=stream.run, args=(collector.stop,), daemon=True)
    thread.start()
    yield collector
    collector.stop.set()
    thread.join(timeout=10)
    stream.close()
