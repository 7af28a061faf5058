"""The probes, end to end: real processes in real cgroups, events checked field by field."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from helpers import REPO, line_of, make_agent_cgroup, remove_cgroup_tree, wait_for
from ebpfmon.config import Config
from ebpfmon.events import ExecEvent, raw_bytes, text

PY = sys.executable


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def exec_of(monitor, cgroup, predicate=lambda e: True, timeout=10.0):
    return monitor.wait_for(lambda e: e.kind == "exec" and e.cgroup_id == cgroup.id and predicate(e),
                            timeout)


def test_exec_reports_every_field(monitor, agent_cgroup):
    odd = b"caf\xe9-\xff\x01"  # not UTF-8, with a control byte
    long_arg = "x" * 300
    argv = [b"/bin/echo", b"plain", odd, long_arg.encode(), b"last"]
    proc = agent_cgroup.popen(argv, stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=30) == 0

    e = exec_of(monitor, agent_cgroup, lambda e: e.proc.pid == proc.pid)
    assert isinstance(e, ExecEvent)
    assert e.retval == 0 and e.error is None
    assert e.syscall == "execve"
    assert e.filename == "/bin/echo"
    assert e.argv[:3] == ["/bin/echo", "plain", text(odd)]
    assert raw_bytes(e.argv[2]) == odd  # every byte kept
    assert e.argv[3] == "x" * 256  # cut at 256 bytes
    assert e.argv[4] == "last"
    assert e.argv_truncated is True
    assert e.proc.ppid == os.getpid()  # forked by this test process
    assert e.proc.uid == os.getuid() and e.proc.gid == os.getgid()
    assert e.proc.comm == "echo"
    assert e.proc.exe == "/bin/echo"
    assert e.cgroup == agent_cgroup.name
    assert e.ancestry[0].pid == os.getpid()
    assert e.ancestry[0].exe == os.path.realpath(f"/proc/{os.getpid()}/exe")


def test_exec_limits_are_what_events_h_says(monitor, agent_cgroup):
    # an argument of exactly 256 bytes is whole, not truncated
    exact = "y" * 256
    agent_cgroup.run(["/bin/true", exact])
    e = exec_of(monitor, agent_cgroup, lambda e: e.filename == "/bin/true")
    assert e.argv == ["/bin/true", exact]
    assert e.argv_truncated is False

    # more arguments than EXEC_MAX_ARGS (64): the first 64 kept, marked truncated; read back
    # whole from /proc when the process still lives (echo may be gone by then)
    many = [str(i) for i in range(100)]
    agent_cgroup.run(["/bin/echo", *many])
    e = exec_of(monitor, agent_cgroup, lambda e: e.filename == "/bin/echo")
    assert (e.argv, e.argv_truncated, e.argv_source) in (
        (["/bin/echo", *many[:63]], True, "kernel"), (["/bin/echo", *many], False, "proc"))


def test_argv_the_probe_cannot_read_comes_from_proc_and_the_rules_see_it(monitor, agent_cgroup, tmp_path):
    launcher = tmp_path / "literal_exec"
    subprocess.run(["gcc", "-O2", "-o", str(launcher), str(REPO / "tests/servers/literal_exec.c")], check=True)
    proc = agent_cgroup.popen([str(launcher)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        child = int(line_of(proc.stdout))
        e = exec_of(monitor, agent_cgroup, lambda e: e.proc.pid == child)
        assert e.filename == "/usr/bin/ssh"  # the kernel's own copy: the caller's was unreadable
        assert e.argv_source == "proc" and e.argv_truncated is False
        assert e.argv == ["ssh", "-o", "ProxyCommand=sleep 3", "-o", "BatchMode=yes", "-N", "-R",
                          "2222:127.0.0.1:22", "agent@tunnel.example"]
        assert e.proc.exe == "/usr/bin/ssh"
        monitor.wait_for_verdict("Reverse SSH tunnel", agent_cgroup.name)
    finally:
        proc.kill()  # ssh and its proxy: killed with the agent cgroup
        proc.wait()


def test_a_program_gone_before_proc_is_read_keeps_the_path_the_kernel_was_given(monitor, agent_cgroup, tmp_path):
    # argv and filename unreadable at the probe, the process gone (or a zombie) when /proc would
    # be read: the event names the program from the kernel's copy of the path, argv stays
    # unknown and says so
    launcher = tmp_path / "literal_exec"
    subprocess.run(["gcc", "-O2", "-o", str(launcher), str(REPO / "tests/servers/literal_exec.c")], check=True)
    child = int(agent_cgroup.run([str(launcher), "short"], capture_output=True, text=True).stdout)
    e = exec_of(monitor, agent_cgroup, lambda e: e.proc.pid == child)
    assert e.filename == "/bin/true"
    assert e.proc.exe in ("/bin/true", "/usr/bin/true")  # the path, or /proc's when still there
    assert (e.argv_source, e.argv) in (("none", []), ("proc", ["true", "literal"]))
    assert e.retval == 0 and e.syscall == "execve"


def test_failed_exec_shows_its_errno(monitor, agent_cgroup):
    missing = f"/nonexistent/{marker()}"
    with pytest.raises(FileNotFoundError):
        agent_cgroup.run([missing, "arg1"])
    e = exec_of(monitor, agent_cgroup, lambda e: e.filename == missing)
    assert e.retval == -errno.ENOENT
    assert e.error == "ENOENT"
    assert e.argv == [missing, "arg1"]


def test_execveat_is_traced(monitor, agent_cgroup):
    # os.execve with a directory fd is execveat (fexecve) underneath
    code = ("import os; fd = os.open('/bin/true', os.O_PATH); "
            "os.execve(fd, ['true-via-fd'], {})")
    agent_cgroup.run([PY, "-c", code])
    e = exec_of(monitor, agent_cgroup, lambda e: e.syscall == "execveat")
    assert e.argv == ["true-via-fd"]
    assert e.retval == 0


def test_an_exec_from_a_thread_other_than_the_leader_is_an_event(monitor, agent_cgroup):
    # the exec'ing thread takes the leader's id before the exit probe runs (Go programs,
    # runc among them, exec from any thread)
    code = ("import os, threading; t = threading.Thread(target=os.execv, args=('/bin/true', "
            "['true', 'from-a-thread'])); t.start(); t.join()")
    proc = agent_cgroup.popen([PY, "-c", code])
    assert proc.wait(timeout=30) == 0
    e = exec_of(monitor, agent_cgroup, lambda e: e.argv == ["true", "from-a-thread"])
    assert (e.retval, e.proc.pid, e.proc.tid) == (0, proc.pid, proc.pid)


CONNECT = """
import socket, sys
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if sys.argv[3] == 'nonblocking':
    s.setblocking(False)
print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))
"""


@pytest.fixture
def listener():
    servers = {}

    def make(family, host):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen(8)
        servers[host] = s
        return s.getsockname()[1]

    yield make
    for s in servers.values():
        s.close()


def closed_port(host: str, family) -> int:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()  # bound once, now nobody listens there
    return port


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connect_to_listener_and_closed_port(monitor, agent_cgroup, listener, family, host):
    port = listener(family, host)
    out = agent_cgroup.run([PY, "-c", CONNECT, host, str(port), "blocking"], text=True)
    assert out.stdout.strip() == "0"
    e = monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == port)
    assert e.address == host
    assert e.family == ("inet" if family == socket.AF_INET else "inet6")
    assert e.retval == 0
    # socket() is not traced (its tracepoint would tax every process): without the
    # daemon's cgroup hooks the type is unknown (test_containment checks it with them)
    assert e.sock_type is None and e.protocol is None
    assert e.proc.comm.startswith("python")

    dead = closed_port(host, family)
    agent_cgroup.run([PY, "-c", CONNECT, host, str(dead), "blocking"])
    e = monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == dead)
    assert e.retval == -errno.ECONNREFUSED and e.error == "ECONNREFUSED"


def test_ipv4_mapped_address_shown_as_ipv4(monitor, agent_cgroup, listener):
    port = listener(socket.AF_INET6, "::")
    agent_cgroup.run([PY, "-c", CONNECT, "::ffff:127.0.0.1", str(port), "blocking"])
    e = monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == port)
    assert e.family == "inet6"
    assert e.address == "127.0.0.1"
    assert e.retval == 0


def test_nonblocking_connect_reports_einprogress(monitor, agent_cgroup, listener):
    port = listener(socket.AF_INET, "127.0.0.1")
    out = agent_cgroup.run([PY, "-c", CONNECT, "127.0.0.1", str(port), "nonblocking"], text=True)
    returned = int(out.stdout)
    e = monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == port)
    # the event carries exactly what connect() returned to the program
    assert e.retval == -returned if returned else e.retval == 0
    assert returned == errno.EINPROGRESS
    assert e.error == "EINPROGRESS"


UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
port = int(sys.argv[1])
s.sendto(b"hello stratum", ("127.0.0.1", port))
# a DNS query for pool.example.com, to loopback only
query = bytes.fromhex("abcd01000001000000000000") + b"\\x04pool\\x07example\\x03com\\x00" + b"\\x00\\x01\\x00\\x01"
s.sendto(query, ("127.0.0.1", 53))
# glibc's way: connect to port 53, then send without an address
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", 53))
c.send(query.replace(b"pool", b"mine"))
"""


def test_udp_datagrams_and_dns_names(monitor, agent_cgroup):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    try:
        agent_cgroup.run([PY, "-c", UDP, str(port)], check=True)
        assert receiver.recv(100) == b"hello stratum"
    finally:
        receiver.close()
    mine = lambda e: e.kind == "udp_send" and e.cgroup_id == agent_cgroup.id  # noqa: E731
    e = monitor.wait_for(lambda e: mine(e) and e.port == port)
    assert e.address == "127.0.0.1" and e.length == 13 and e.retval == 13
    assert e.dns_query is None
    e = monitor.wait_for(lambda e: mine(e) and e.dns_query == "pool.example.com")
    assert e.port == 53
    e = monitor.wait_for(lambda e: mine(e) and e.dns_query == "mine.example.com")
    assert e.port == 53 and e.address == "127.0.0.1"
    # the connect of the UDP socket is an event of its own
    c = monitor.wait_for(lambda e: e.kind == "connect" and e.cgroup_id == agent_cgroup.id and e.port == 53)
    assert c.retval == 0


PIECES = """
import ctypes, socket, struct
def query(name):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\x00"
    return bytes.fromhex("abcd01000001000000000000") + labels + b"\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
q = query("split.example.com")
# the header, the name and the type in three iovecs of one sendmsg
s.sendmsg([q[:12], q[12:-4], q[-4:]], [], 0, ("127.0.0.1", 53))
# sendmmsg: an innocent first message, then two questions
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
keep = []
def message(payload, port):
    addr = ctypes.create_string_buffer(struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1")))
    addr.raw  # little-endian family on x86: sockaddr_in's family is host order
    ctypes.memmove(addr, struct.pack("=H", socket.AF_INET), 2)
    data = ctypes.create_string_buffer(payload, len(payload))
    iov = (iovec * 1)(iovec(ctypes.cast(data, ctypes.c_void_p), len(payload)))
    keep.extend([addr, data, iov])
    return mmsghdr(msghdr(ctypes.cast(addr, ctypes.c_void_p), 16, iov, 1, None, 0, 0), 0)
msgs = (mmsghdr * 3)(message(b"hello", 9), message(query("second.example.com"), 53),
                     message(query("third.example.com"), 53))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.sendmmsg(s.fileno(), msgs, 3, 0) == 3, ctypes.get_errno()
"""


def test_dns_questions_in_pieces_and_after_sendmmsgs_first_message_are_read(monitor, agent_cgroup):
    out = agent_cgroup.run([PY, "-c", PIECES], text=True)
    assert out.returncode == 0, out.stderr
    mine = lambda e: e.kind == "udp_send" and e.cgroup_id == agent_cgroup.id  # noqa: E731
    for name in ("split.example.com", "second.example.com", "third.example.com"):
        e = monitor.wait_for(lambda e: mine(e) and e.dns_query == name)
        assert e.port == 53 and e.address == "127.0.0.1"
    split = monitor.wait_for(lambda e: mine(e) and e.dns_query == "split.example.com")
    assert split.length == len("split.example.com") + 2 + 12 + 4


def test_gpu_open_of_fake_nvidia_node(monitor, agent_cgroup, fake_gpu_dir):
    node = fake_gpu_dir / "nvidia0"
    code = f"""
import os
for path in ({str(node)!r}, '/dev/null'):
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as e:
        print(path, e.errno)
"""
    out = agent_cgroup.run([PY, "-c", code], text=True)
    assert f"{node} {errno.ENXIO}" in out.stdout  # no driver behind major 195
    e = monitor.wait_for(lambda e: e.kind == "gpu_open" and e.cgroup_id == agent_cgroup.id)
    assert e.path == str(node)
    assert e.retval == -errno.ENXIO and e.error == "ENXIO"
    assert e.device == "195:0" and e.vendor == "nvidia"
    assert e.access == "rw" and e.flags & os.O_ACCMODE == os.O_RDWR
    assert e.syscall == "openat"
    # /dev/null was opened too, and is no GPU
    gpu_paths = {e.path for e in monitor.in_cgroup(agent_cgroup.id, "gpu_open")}
    assert gpu_paths == {str(node)}


def test_process_outside_agent_cgroups_is_not_reported(monitor, agent_cgroup):
    outside, inside = marker(), marker()
    subprocess.run(["/bin/echo", outside], check=True, capture_output=True)
    agent_cgroup.run(["/bin/echo", inside])
    # ring order: once the later inside event is here, the outside one would be too
    monitor.wait_for(lambda e: e.kind == "exec" and inside in e.argv)
    assert not [e for e in monitor.events if e.kind == "exec" and outside in e.argv]


def test_cgroup_created_after_start_is_covered(monitor, hierarchy, agent_cgroup):
    nested = f"{agent_cgroup.name}/later-{uuid.uuid4().hex[:6]}"
    hierarchy.ensure(nested)
    nested_id = hierarchy.cgroup_id(nested)
    procs = hierarchy.path(nested) / "cgroup.procs"
    tag = marker()
    subprocess.run(["/bin/echo", tag], check=True, capture_output=True,
                   preexec_fn=lambda: procs.write_text(str(os.getpid())))
    e = monitor.wait_for(lambda e: e.kind == "exec" and tag in e.argv)
    assert e.cgroup_id == nested_id
    assert e.cgroup == nested  # named from the kernel's cgroup_mkdir event


def test_process_tree_gives_the_ppid_chain(monitor, agent_cgroup):
    out = agent_cgroup.run(["sh", "-c", 'sh -c "exec /bin/true"; echo $$'], text=True)
    outer_pid = int(out.stdout)
    true = exec_of(monitor, agent_cgroup, lambda e: e.filename == "/bin/true")
    inner_sh = exec_of(monitor, agent_cgroup, lambda e: e.proc.pid == true.proc.pid and e.argv[0] == "sh")
    # /bin/true replaced the inner sh (same pid), forked by the outer sh, forked by us
    assert inner_sh.argv == ["sh", "-c", "exec /bin/true"]
    assert true.proc.ppid == outer_pid
    chain = [a.pid for a in true.ancestry]
    assert chain[:2] == [outer_pid, os.getpid()]
    assert true.ancestry[0].argv[:2] == ["sh", "-c"]
    assert true.proc.exe == "/bin/true"


# three of a class in a row: the first wakes the reader, the others come within the window
THREE_EXECS = ["/bin/sh", "-c", "/bin/true; /bin/true; /bin/true"]
THREE_CONNECTS = [sys.executable, "-c", "import socket\nfor _ in range(3):\n    s = socket.socket()\n"
                  "    s.connect_ex(('127.0.0.1', 9))\n    s.close()"]


@pytest.mark.parametrize("kinds, command, key", [
    (["exec"], THREE_EXECS, lambda e: e.filename == "/bin/true"),
    (["connect"], THREE_CONNECTS, lambda e: e.port == 9),
], ids=["exec", "connect"])
def test_events_that_do_not_wake_the_reader_still_arrive_within_the_window(agent_cgroup, kinds, command, key):
    # Events of one class less than WAKE_WINDOW_MS apart wake the reader once; the others must
    # not wait for the drain timer (60 s here): containment would be late by that much.
    from ebpfmon.kernel.probeset import WAKE_WINDOW_MS
    from ebpfmon.stream.stream import EventStream

    stream = EventStream(Config(drain_interval_ms=60_000), kinds=kinds, cgroups=[agent_cgroup.name])
    delays_ms = []  # ms from the kernel's timestamp to the handler, per matching event
    stop = threading.Event()
    stream.start(lambda e: not stop.is_set() and key(e) and delays_ms.append((time.time_ns() - e.time_ns) / 1e6))
    reader = threading.Thread(target=stream.run, args=(stop,))
    reader.start()
    try:
        time.sleep(0.5)  # past the window of any event before
        agent_cgroup.run(command, check=True)
        deadline = time.monotonic() + 30
        while len(delays_ms) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        time.sleep(WAKE_WINDOW_MS / 1000)
        agent_cgroup.run(command)  # their first wakes the reader to see stop (the drain timer is long)
        reader.join(timeout=90)
        stream.close()
    assert len(delays_ms) == 3, delays_ms
    # a wait for the drain timer would be up to 60 s; what is left is scheduling on a loaded
    # machine (how fast they arrive is bench/rules.py's latency figure)
    assert max(delays_ms) < 20_000, delays_ms


def test_nothing_was_lost(monitor, agent_cgroup):
    # a burst of its own (500 execs, 2,000 connects), whatever ran before: each one arrives,
    # and the kernel dropped nothing, of this burst or of any test before it
    burst = ("import os, socket\nfor _ in range(2000):\n    s = socket.socket()\n"
             "    s.connect_ex(('127.0.0.1', 9))\n    s.close()\n"
             "for _ in range(500):\n    os.waitpid(os.spawnv(os.P_NOWAIT, '/bin/true', ['/bin/true', 'burst']), 0)")
    assert agent_cgroup.run([sys.executable, "-c", burst], timeout=120).returncode == 0

    def counted() -> tuple[int, int]:
        mine = monitor.in_cgroup(agent_cgroup.id)
        return (sum(e.kind == "exec" and e.argv == ["/bin/true", "burst"] for e in mine),
                sum(e.kind == "connect" and e.port == 9 for e in mine))
    wait_for(lambda: counted() == (500, 2000), "every event of the burst", 60)
    monitor.stream.refresh_counters()
    assert sum(monitor.stream.stats.lost.values()) == 0
    assert monitor.stream.stats.malformed == 0


def private_clean_kib(library_names) -> int:
    """Clean pages of these libraries resident and mapped by this process alone (those a
    page-out can give back; pages other processes map too stay, and are not ours)."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:
                counting = any(name in line for name in library_names)
            elif counting and line.startswith("Private_Clean:"):
                total += int(line.split()[1])
    return total


def test_compiling_the_probes_leaves_the_compiler_paged_out(bpf):
    # LLVM and clang are needed for the seconds of compiling, then never again: a daemon that
    # runs for months must not keep their pages resident. Against a compile of our own, which
    # leaves them in: the probes' load gives back most of what it paged in (the figure, the
    # daemon's RSS, is bench/service.py's)
    from ebpfmon.kernel.probeset import COMPILER_LIBRARIES, ProbeSet, import_bcc

    import_bcc().BPF(text=b"int nothing(void *ctx) { return 0; }").cleanup()
    paged_in = private_clean_kib(COMPILER_LIBRARIES)
    probes = ProbeSet({"exec"}).load()
    try:
        left = private_clean_kib(COMPILER_LIBRARIES)
    finally:
        probes.close()
    assert left <= paged_in // 4 + 1024, (paged_in, left)


def test_a_new_scope_takes_effect_at_once_despite_cached_verdicts(agent_cgroup, hierarchy, test_root):
    # the probes cache their last scope verdict per CPU: a change of scope must void it
    from ebpfmon.stream.stream import EventStream

    sibling = make_agent_cgroup(hierarchy, test_root)
    stream = EventStream(Config(), kinds=["exec"], cgroups=[sibling.name])
    seen = []
    stream.start(lambda e: seen.append(e.argv[-1]) if e.cgroup_id == agent_cgroup.id else None)

    def run(tag: str) -> None:
        for _ in range(3):  # a warm cache on every CPU it may run on
            agent_cgroup.run(["/bin/true", tag], check=True)
        stream.poll()

    try:
        run("unwatched")
        stream.probes.add_scope(agent_cgroup.id)
        run("watched")
    finally:
        stream.close()
        remove_cgroup_tree(sibling.path)
    assert seen == ["watched"] * 3
