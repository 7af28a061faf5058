"""The red team's daemon: the shipped packs, enforcement armed, agents under a root of its own;
the test internet's 198.51.100.0/25 is outside, 198.51.100.128/25 the internal network."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from ebpfmon.config import DEFAULT_GPU_PREFIXES, Config
from helpers import RunningDaemon, make_agent_cgroup, remove_cgroup_tree

INTERNAL = "198.51.100.128/25"
OUTCOMES: list[dict] = []  # one per scenario run, for the summary
REPORT = "EBPFMON_REDTEAM_REPORT"  # a path: the outcomes as JSON (bench/redteam.py reads it)
# a path: the benign session scenarios' events from the audit log, agents under /ebpfmon-agents
# (tests/unit/test_benign_corpus.py replays tests/redteam/benign-session.jsonl.gz, made so)
RECORD = "EBPFMON_REDTEAM_RECORD"


@pytest.fixture(scope="session")
def redteam_root(hierarchy):
    from ebpfmon.kernel.enforcer import remove_pins

    name = f"/ebpfmon-test-{os.getpid()}-redteam"
    path = hierarchy.ensure(name)
    yield name
    remove_pins(hierarchy, name)
    remove_cgroup_tree(path)


@pytest.fixture(scope="session")
def redteam_daemon(bpf, hierarchy, redteam_root, fake_gpu_dir, tmp_path_factory):
    from ebpfmon.config import AlertSettings, EnforceSettings, MetricsSettings
    from ebpfmon.service.daemon import Daemon

    config = Config(agent_root=redteam_root, gpu_prefixes=DEFAULT_GPU_PREFIXES + (f"{fake_gpu_dir}/nvidia",),
                    gpu_entitled=(f"{redteam_root}/gpu-*",), internal_networks=(INTERNAL,),
                    internal_from_routes=False, state_dir=str(tmp_path_factory.mktemp("redteam-state")),
                    enforce=EnforceSettings(breaker_agents=1000), alerts=AlertSettings(sinks=()),
                    metrics=MetricsSettings(enabled=False))
    running = RunningDaemon(None, redteam_root, threading.Event())
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
    if os.environ.get(RECORD):
        record_benign_session(Path(config.state_dir) / "audit", redteam_root, os.environ[RECORD])


def record_benign_session(audit_dir: Path, root: str, out: str) -> None:
    """The audit log's lines of the benign session scenarios (and the ancestry lines they name),
    in the order written, under the default agent root."""
    benign = {o["agent"] for o in OUTCOMES if not o["attack"] and o["class"] == "session"}
    files = sorted(audit_dir.glob("events.jsonl*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for path in files:
            for line in path.read_text(encoding="utf-8").splitlines():
                data = json.loads(line)
                if data.get("kind") == "ancestry" or data.get("cgroup") in benign:
                    f.write(line.replace(root + "/", "/ebpfmon-agents/") + "\n")


@pytest.fixture(scope="session")
def marker_agent(hierarchy, redteam_daemon):
    """An agent that only runs markers: its exec, judged, says the daemon has judged all before it."""
    agent = make_agent_cgroup(hierarchy, redteam_daemon.root, prefix="marker")
    yield agent
    remove_cgroup_tree(agent.path)


@pytest.fixture(scope="session")
def workspace():
    """Where scenarios work: outside the temp directories (a build there is ordinary work)."""
    path = tempfile.mkdtemp(prefix="ebpfmon-redteam-", dir="/var/lib")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    if not OUTCOMES:
        return
    if os.environ.get(REPORT):
        with open(os.environ[REPORT], "w") as f:
            json.dump(OUTCOMES, f, indent=1)
    attacks = [o for o in OUTCOMES if o["attack"]]
    benign = [o for o in OUTCOMES if not o["attack"]]
    checked = [o for o in attacks if o["containment_checked"]]
    write = terminalreporter.write_line
    write("")
    write("red team: %d attacks, %d benign" % (len(attacks), len(benign)))
    write("  attacks alerted:   %d/%d" % (sum(o["alerted"] for o in attacks), len(attacks)))
    write("  attacks contained: %d/%d (no reverse port open, no connection at the pool, agent cut)"
          % (sum(o["contained"] for o in checked), len(checked)))
    write("  benign alerted:    %d/%d (text mentions with only a NOTICE: %d)"
          % (sum(o["alerted"] for o in benign), len(benign), sum(o["noticed"] for o in benign)))
    for o in OUTCOMES:
        if not o["passed"]:
            write(f"  FAILED {o['kind']} {o['name']!r}: {o['why']}")
