"""Helpers the tests share: the repository, running ebpfmon as a user does, agent cgroups
made and removed, lines waited for by content, the containment daemon's handle, the maps
attached at a cgroup. Fixtures are in conftest.py; the servers tests talk to in servers/."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebpfmon.errors import EbpfmonError
from ebpfmon.host.cgroups import Hierarchy, cgroup2_mount
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


def make_agent_cgroup(hierarchy: Hierarchy, parent: str, prefix: str = "agent") -> AgentCgroup:
    name = f"{parent}/{prefix}-{uuid.uuid4().hex[:8]}"
    path = hierarchy.ensure(name)
    return AgentCgroup(name, path, hierarchy.cgroup_id(name))


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


@contextlib.contextmanager
def stopped_after(proc: subprocess.Popen):
    """The process terminated (killed if it lingers) when the block ends, however it ends."""
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Pool:
    host: str
    port: int
    accepted: list  # "accepted ip:port" lines, as the pool prints them

    def accepted_since(self, before: int) -> list[str]:
        """What the pool accepted after its first `before` connections, up to a connection made
        now from here: the pool accepts in order, so what reached it earlier is in by then."""
        with socket.create_connection((self.host, self.port), timeout=10) as marker:
            line = "accepted %s:%d" % marker.getsockname()[:2]
            wait_for(lambda: line in self.accepted, f"the pool's {line}")
        return self.accepted[before:self.accepted.index(line)]


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


def ebpfmon(*args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run([*EBPFMON, *args], cwd=REPO, **kwargs)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.settimeout(3)
print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))
"""

# which of the given ports on 127.0.0.1 accept a connection (run where the reverse end would open)
OPEN_PORTS = """
import socket, sys
found = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.settimeout(1)
    if s.connect_ex(("127.0.0.1", port)) == 0:
        found.append(port)
    s.close()
print(found)
"""

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3", "-o", "ExitOnForwardFailure=yes"]


def connect_from(cgroup, host: str, port: int) -> int:
    out = cgroup.run([sys.executable, "-c", CONNECT, host, str(port)], text=True)
    return int(out.stdout)


# a datagram from inside a cgroup: 0, or the errno sendto failed with
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b'hello', (sys.argv[1], int(sys.argv[2])))
    print(0)
except OSError as e:
    print(e.errno)
"""


def sent_from(cgroup, host: str, port: int) -> int:
    return int(cgroup.run([sys.executable, "-c", SEND, host, str(port)], text=True).stdout)


# the test mirror (the mirror fixture): a DNS server in the namespace, and what it answers
DNS_SERVER = "198.51.100.53"
MIRRORS = [f"198.51.100.{i}" for i in range(10, 20)]  # mirror.test's addresses, in turn (round robin)
MIRROR6 = "2001:db8:100::10"  # its AAAA
MIRROR_PORT = 8443  # a listener on every address of the namespace
UNLISTED = "198.51.100.20"  # a host there no name gives
NOBODY = "192.0.2.53"  # the resolver agents name: nothing there; the daemon's DNS proxy answers for it

# resolves a name (A or AAAA) asking `server` (UDP, or TCP with "tcp"), then connects to the first
# address at once, N times; prints [[rcode, address or null, connect errno or null], ...]
RESOLVE_CONNECT = """
import json, socket, sys
import dns.message, dns.query, dns.rcode
name, rdtype, server, transport, port, times = sys.argv[1:7]
out = []
for _ in range(int(times)):
    query = dns.message.make_query(name, rdtype)
    ask = dns.query.tcp if transport == "tcp" else dns.query.udp
    try:
        reply = ask(query, server, timeout=3)
    except Exception as e:
        out.append([type(e).__name__, None, None])
        continue
    addresses = [r.address for rrset in reply.answer for r in rrset if hasattr(r, "address")]
    result = None
    if addresses:
        s = socket.socket(socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET)
        s.settimeout(3)
        result = s.connect_ex((addresses[0], int(port)))
        s.close()
    out.append([dns.rcode.to_text(reply.rcode()), addresses[0] if addresses else None, result])
print(json.dumps(out))
"""


def resolve_connect(agent, name: str, times: int = 1, rdtype: str = "A", server: str = NOBODY,
                    transport: str = "udp") -> list[list]:
    """From inside the agent: [[rcode or the exception's name, address, connect errno], ...]."""
    out = agent.run([sys.executable, "-c", RESOLVE_CONNECT, name, rdtype, server, transport, str(MIRROR_PORT),
                     str(times)], text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Served:
    """A server that prints "listening", then a line per thing it did: kept in lines."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        assert line_of(proc.stdout).strip() == "listening"
        threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True).start()


class DaemonProcess(Lines):
    """`ebpfmon run` on its own agent root and state directory, metrics off (tests run many).
    With from_file, the configuration file in the state directory names both (and a reload
    re-reads it), else the command line does."""

    def __init__(self, root: str, state: str, *extra: str, from_file: bool = False):
        config = Path(state) / "config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        if not config.exists():
            config.write_text("metrics: {enabled: false}\n")
        where = [] if from_file else ["--agent-root", root, "--state-dir", state]
        self.proc = subprocess.Popen([*EBPFMON, "run", "--config", str(config), *where, *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        Lines.__init__(self)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.wait("ready:", timeout=90)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.emit(line)

    def wait(self, *parts: str, timeout: float = 15) -> str:
        return self.wait_line(*parts, timeout=timeout, alive=lambda: self.proc.poll() is None)

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def attached_maps(cgroup_dir: Path, *names: str) -> dict[str, list[dict]]:
    """Maps of the programs attached at a cgroup, by name, dumped as bpftool formats them."""
    def bpftool(*args: str):
        out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30, check=True)
        return json.loads(out.stdout)

    map_ids = {m for prog in bpftool("cgroup", "show", str(cgroup_dir))
               for m in bpftool("prog", "show", "id", str(prog["id"]))["map_ids"]}
    by_name = {bpftool("map", "show", "id", str(m))["name"]: m for m in map_ids}
    return {name: [entry["formatted"] for entry in bpftool("map", "dump", "id", str(by_name[name]))]
            for name in names}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_policy_of(containment_daemon, agent, timeout: float = 5.0):
    """The GPU entry the daemon wrote for an agent, (allowed, GPUs or None for every one), once
    there (it reacts to the kernel's cgroup_mkdir); None when none came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        policies = containment_daemon.daemon.enforcer.gpu_policies()
        if agent.id in policies:
            return policies[agent.id]
        time.sleep(0.05)
    return None


GPU_HOSTS = REPO / "tests/data/gpu-hosts"


def materialize_gpu_host(name: str, into: Path) -> tuple[Path, Path, Path]:
    """A recorded GPU host (tests/data/gpu-hosts/NAME) made real under into: its /proc files,
    its /dev nodes made with mknod (opening one reaches no driver here: ENXIO), and its sysfs
    links from DRM nodes to their PCI devices. Returns (proc, dev, sys)."""
    import shutil

    layout = GPU_HOSTS / name
    proc, dev, sys_ = into / "proc", into / "dev", into / "sys"
    shutil.copytree(layout / "proc", proc)
    for line in (layout / "dev.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        path, major, minor = line.split()
        (dev / path).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(dev / path, 0o666 | 0o020000, os.makedev(int(major), int(minor)))
    for line in (layout / "sys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        number, bus_id = line.split()
        device = sys_ / "devices/pci0000:00" / bus_id
        device.mkdir(parents=True, exist_ok=True)
        (sys_ / "dev/char" / number).mkdir(parents=True)
        (sys_ / "dev/char" / number / "device").symlink_to(device)
    return proc, dev, sys_


def wait_for(predicate, what: str, seconds: float = 30):
    """predicate's first true value; polled, the bound is for a hang, not a speed check."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds}s: {what}")


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def line_of(stream, what: str = "a line", seconds: float = 60) -> str:
    """The next line of a child's pipe, or a failure naming what was awaited once seconds
    pass (a child that hangs, or never says it, must not hang the suite). What the line
    had so far is in the failure."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    if not got:
        raise AssertionError(f"not within {seconds}s: {what} (a line on {stream.name!r}; none came)")
    return got[0]
