"""Every scenario of scenarios.py, live: attacks are alerted and contained, benign work raises
nothing. The summary (pytest's end) gives the figures bench/RESULTS.md records."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import uuid

import pytest

from helpers import OPEN_PORTS, SSH_OPTS, make_agent_cgroup, remove_cgroup_tree
from redteam.conftest import INTERNAL, OUTCOMES
from redteam.scenarios import SCENARIOS, Scenario

ALERT = re.compile(r"^\S+ (EMERGENCY|ALERT|CRITICAL|ERROR|WARNING|NOTICE|INFORMATIONAL|DEBUG)\s+(.+?): ")
PREAMBLE = 'tool() { mkdir -p "$W/bin"; cp /usr/bin/true "$W/bin/$1"; }\n'
SCRIPT_SECONDS = 30
# a DNS question as a resolver sends it, built by hand (the system's python3 runs it)
DNS_QUERY = ("import socket; q = lambda n: bytes.fromhex('abcd01000001000000000000') + b''.join(bytes([len(p)]) + "
             "p.encode() for p in n.split('.')) + bytes.fromhex('0000010001'); "
             "(lambda n: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(q(n), ('{host}', 53)))")


SITE_PACKAGES = sysconfig.get_paths()["purelib"]


def ports_open(netns_host, *ports: int) -> list[int]:
    probe = netns_host.popen([sys.executable, "-c", OPEN_PORTS, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    return eval(probe.communicate(timeout=30)[0])


def run_script(agent, scenario: Scenario, env: dict) -> tuple[int | None, str]:
    """The script's exit status (None when it had to be killed) and its output."""
    process = agent.popen(["bash", "-c", PREAMBLE + scenario.script], env=env, cwd=env["W"], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = process.communicate(timeout=SCRIPT_SECONDS)[0]
        return process.returncode, output
    except subprocess.TimeoutExpired:  # a tunnel that stayed up: the checks below say so
        os.killpg(process.pid, signal.SIGKILL)
        return None, process.communicate()[0] + f"\n(still running after {SCRIPT_SECONDS}s: killed)"


def judged_so_far(daemon, marker_agent) -> None:
    """Returns once the daemon has judged every event before now (ring-buffer order)."""
    tag = f"redteam-marker-{uuid.uuid4().hex[:8]}"
    marker_agent.run(["/bin/true", tag], timeout=10)
    daemon.wait_line(tag, timeout=20)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[f"{'attack' if s.attack else 'benign'}: {s.name}"
                                                     for s in SCENARIOS])
def test_scenario(scenario, redteam_daemon, marker_agent, hierarchy, netns_host, sshd, stratum_pool, fake_gpu_dir,
                  workspace):
    agent = make_agent_cgroup(hierarchy, redteam_daemon.root, prefix="gpu" if scenario.gpu_entitled else "agent")
    short = agent.name.rsplit("/", 1)[-1]
    work = os.path.join(workspace, short)
    os.mkdir(work)
    env = {"H": netns_host.address, "SSH": " ".join([*SSH_OPTS, "-i", str(sshd)]), "KEY": str(sshd), "W": work,
           "GPU": str(fake_gpu_dir / "nvidia0"), "INTERNAL": INTERNAL.rsplit(".", 1)[0],
           "DNS_QUERY": DNS_QUERY.format(host=netns_host.address), "SITE_PACKAGES": SITE_PACKAGES,
           "HOME": work, "LANG": "C.UTF-8", "PATH": f"{work}/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    store = redteam_daemon.containment.store
    start = len(redteam_daemon.lines)
    pool_before = len(stratum_pool.accepted)
    try:
        status, output = run_script(agent, scenario, env)
        judged_so_far(redteam_daemon, marker_agent)
        alerts = [(m.group(1), m.group(2)) for line in redteam_daemon.lines[start:]
                  if f"agent={short}" in line and (m := ALERT.match(line))]
        fired = {rule for _, rule in alerts}
        problems = []
        contained = True
        if scenario.attack:
            alerted = bool(fired & set(scenario.expect))
            if not alerted:
                problems.append(f"none of {list(scenario.expect)} fired (fired: {sorted(fired)})")
            if scenario.reverse_port and ports_open(netns_host, scenario.reverse_port):
                contained = False
                problems.append(f"reverse port {scenario.reverse_port} is open at the outside host")
            if scenario.no_pool_bytes and len(stratum_pool.accepted) != pool_before:
                contained = False
                problems.append(f"the pool saw a connection: {stratum_pool.accepted[pool_before:]}")
            if scenario.cut and not ((record := store.active_for(agent.name)) and record.cut):
                contained = False
                problems.append("the agent was not cut")
        else:  # a NOTICE about text is allowed where the scenario is text: nobody is paged for it
            if status != 0:  # the work must have been done, or its silence proves nothing
                problems.append(f"the benign work itself failed (status {status})")
            loud = [a for a in alerts if not (scenario.text and a[0] == "NOTICE")]
            alerted = bool(loud)
            if loud:
                problems.append(f"benign work alerted: {loud}")
            if store.active_for(agent.name):
                problems.append(f"benign work contained: {store.active_for(agent.name).rule}")
        OUTCOMES.append({"name": scenario.name, "kind": "attack" if scenario.attack else "benign",
                         "class": scenario.klass, "fired": sorted(fired), "agent": agent.name,
                         "attack": scenario.attack, "alerted": alerted,
                         "noticed": bool(alerts) and all(p == "NOTICE" for p, _ in alerts),
                         "containment_checked": bool(scenario.reverse_port or scenario.no_pool_bytes or scenario.cut),
                         "contained": contained, "passed": not problems, "why": "; ".join(problems)})
        assert not problems, "\n".join(problems + ["script output:", output[-2000:], "daemon:",
                                                    *[x for x in redteam_daemon.lines[start:] if short in x][-12:]])
    finally:
        if store.active_for(agent.name):
            redteam_daemon.containment.release(agent.name, "test", "scenario over")
        remove_cgroup_tree(agent.path)
