"""The process tree: events, /proc, bounded memory."""

import os
import subprocess
import time

from ebpfmon.stream.proctree import ProcessTree, read_proc


def test_read_proc_of_a_real_process():
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        # Popen returns once exec is past its point of no return, a moment
        # before the kernel has set up the new argv that /proc shows
        for _ in range(100):
            node = read_proc(child.pid)
            if node.argv:
                break
            time.sleep(0.01)
        assert node.ppid == os.getpid()
        assert node.comm == "sleep"
        assert node.exe == "/usr/bin/sleep"
        assert node.argv == ["/bin/sleep", "30"]
    finally:
        child.kill()
        child.wait()
    assert read_proc(child.pid) is None  # gone


def test_bootstrap_sees_this_process():
    tree = ProcessTree()
    assert tree.bootstrap() > 1
    me = tree.get(os.getpid())
    assert me.ppid == os.getppid()


def test_fork_exec_exit_and_ancestry():
    tree = ProcessTree(proc="/nonexistent")  # events only, no /proc fallback
    tree.executed(100, 1, "bash", "/bin/bash", ["bash"])
    tree.forked(100, 200, "bash")
    assert tree.get(200).exe == "/bin/bash"  # runs the parent's program until it execs
    tree.executed(200, 0, "ssh", "/usr/bin/ssh", ["ssh", "-R", "x"])
    tree.forked(200, 300, "ssh")
    chain = tree.ancestry(300, depth=8)
    assert [a.pid for a in chain] == [200, 100, 1]
    assert chain[0].argv == ["ssh", "-R", "x"]
    assert chain[2].comm is None  # pid 1 never seen: named by pid only
    tree.exited(200)
    # an exited parent is still known to its children's later events
    assert [a.pid for a in tree.ancestry(300, depth=8)][:2] == [200, 100]
    assert [a.pid for a in tree.ancestry(300, depth=1)] == [200]


def test_kernel_ppid_wins_over_unknown():
    tree = ProcessTree(proc="/nonexistent")
    node = tree.seen(500, 0, "x")
    assert node.ppid == 0
    assert tree.seen(500, 42, "x").ppid == 42


def test_memory_is_bounded():
    tree = ProcessTree(max_live=100, max_exited=10, proc="/nonexistent")
    for pid in range(1, 1001):
        tree.forked(0, pid, "spawn")
    assert len(tree._live) == 100 and tree.evicted == 900
    for pid in range(901, 1001):
        tree.exited(pid)
    assert len(tree._exited) == 10 and len(tree._live) == 0


def test_cycles_do_not_hang():
    tree = ProcessTree(proc="/nonexistent")
    tree.seen(1, 2, "a")
    tree.seen(2, 1, "b")
    assert [a.pid for a in tree.ancestry(1, depth=50)] == [2]


def test_cached_ancestry_follows_changes_to_the_processes_it_names():
    tree = ProcessTree(proc="/nonexistent")
    tree.executed(100, 1, "bash", "/bin/bash", ["bash"])
    tree.forked(100, 200, "bash")
    first = tree.ancestry(200, depth=8)
    assert tree.ancestry(200, depth=8) is first  # shared while nothing it names changes
    tree.forked(100, 201, "bash")  # a sibling runs and goes: no chain names it
    tree.executed(201, 100, "ls", "/bin/ls", ["ls"])
    tree.exited(201)
    assert tree.ancestry(200, depth=8) is first
    tree.executed(100, 1, "python3", "/usr/bin/python3", ["python3", "agent.py"])  # the parent execs
    assert tree.ancestry(200, depth=8)[0].argv == ["python3", "agent.py"]
    tree.seen(200, 300, "bash")  # a new parent (the kernel's word)
    assert [a.pid for a in tree.ancestry(200, depth=8)] == [300]
    tree.forked(1, 300, "sshd")  # that parent becomes known
    assert tree.ancestry(200, depth=8)[0].comm == "sshd"
    tree.exited(200)
    tree.forked(100, 200, "bash")  # the pid is used again, by a new child of 100
    assert [a.pid for a in tree.ancestry(200, depth=8)] == [100, 1]


def test_an_exec_storm_walks_the_parents_line_once():
    # fork, exec and exit of a child per iteration: every child's chain is the parent's line,
    # walked once and shared (one Ancestry: its JSON and id are made once)
    tree = ProcessTree(proc="/nonexistent")
    tree.executed(100, 1, "storm", "/usr/bin/storm", ["storm"])
    walks = []
    walk = tree._walk
    tree._walk = lambda pid, depth, seen: walks.append(pid) or walk(pid, depth, seen)
    chains = set()
    for child in range(1000, 1100):
        tree.forked(100, child, "storm")
        tree.ancestry(100, 8)  # the fork event comes from the parent
        tree.executed(child, 100, "true", "/bin/true", ["/bin/true"])
        chains.add(id(tree.ancestry(child, 8)))  # the exec event, from the child
        tree.exited(child)
    assert walks == [1, 100]  # the parent's own chain (pid 1's line), then its children's
    assert len(chains) == 1
    assert [a.pid for a in tree.ancestry(1099, 8)] == [100, 1]


def test_a_loop_of_reused_pids_is_cut_per_process():
    # what /proc said at two times can make a loop: each process's chain stops before itself
    tree = ProcessTree(proc="/nonexistent")
    tree.seen(1, 3, "a")
    tree.seen(2, 1, "b")
    tree.seen(3, 2, "c")
    assert [a.pid for a in tree.ancestry(1, depth=50)] == [3, 2]
    assert [a.pid for a in tree.ancestry(2, depth=50)] == [1, 3]
    assert [a.pid for a in tree.ancestry(3, depth=50)] == [2, 1]
