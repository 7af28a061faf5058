"""Enrich: argv the probe could not read comes from /proc only while /proc shows the same program."""

from ebpfmon import events as ev
from ebpfmon.host.cgroups import CgroupNames, Hierarchy
from ebpfmon.host.devices import DeviceResolver
from ebpfmon.stream.enrich import Enricher
from ebpfmon.stream.proctree import ProcessTree


def fake_proc(root, pid: int, comm: str, argv: list[str]) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def unreadable_exec(pid: int, comm: str) -> ev.ExecEvent:
    proc = ev.Process(pid=pid, tid=pid, ppid=1, uid=0, gid=0, comm=comm)
    return ev.ExecEvent(time_ns=1, cgroup_id=0, cgroup=None, proc=proc, filename="", argv=[],
                        argv_truncated=True, argv_source="none")


def test_argv_from_proc_only_for_the_program_that_exec_d(tmp_path):
    fake_proc(tmp_path, 500, "ssh", ["ssh", "-R", "2222:127.0.0.1:22", "agent@tunnel.example"])
    fake_proc(tmp_path, 501, "sleep", ["sleep", "9"])  # exec'd again since: another program
    enricher = Enricher(CgroupNames(Hierarchy()), ProcessTree(proc=str(tmp_path)), DeviceResolver())
    recovered = enricher.apply(unreadable_exec(500, "ssh"))
    assert (recovered.argv, recovered.argv_source, recovered.argv_truncated) == \
        (["ssh", "-R", "2222:127.0.0.1:22", "agent@tunnel.example"], "proc", False)
    other = enricher.apply(unreadable_exec(501, "ssh"))
    assert (other.argv, other.argv_source) == ([], "none")
    gone = enricher.apply(unreadable_exec(502, "ssh"))
    assert (gone.argv, gone.argv_source) == ([], "none")


def test_argv_cut_at_the_probes_limits_comes_whole_from_proc_when_it_begins_the_same(tmp_path):
    hidden = ["ssh", *(["-o", "Compression=no"] * 40), "-R", "2222:127.0.0.1:22", "agent@tunnel.example"]
    fake_proc(tmp_path, 600, "ssh", hidden)
    fake_proc(tmp_path, 601, "ssh", ["ssh", "-V"])  # rewrote its arguments since the exec
    enricher = Enricher(CgroupNames(Hierarchy()), ProcessTree(proc=str(tmp_path)), DeviceResolver())

    def cut(pid):
        proc = ev.Process(pid=pid, tid=pid, ppid=1, uid=0, gid=0, comm="ssh")
        return ev.ExecEvent(time_ns=1, cgroup_id=0, cgroup=None, proc=proc, filename="/usr/bin/ssh",
                            argv=hidden[:63] + ["Compres"], argv_truncated=True, argv_source="kernel")

    whole = enricher.apply(cut(600))
    assert (whole.argv, whole.argv_source, whole.argv_truncated) == (hidden, "proc", False)
    kept = enricher.apply(cut(601))
    assert (kept.argv[-1], kept.argv_source, kept.argv_truncated) == ("Compres", "kernel", True)


def test_a_unix_socket_path_is_made_absolute_and_its_directories_links_followed(tmp_path):
    import os

    from ebpfmon.stream.enrich import resolve_socket_path

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert resolve_socket_path(f"{tmp_path}/link/docker.sock", os.getpid()) == f"{tmp_path}/real/docker.sock"
    assert resolve_socket_path(f"{tmp_path}/real/../link/./x.sock", os.getpid()) == f"{tmp_path}/real/x.sock"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:  # relative: from the caller's working directory, read from /proc while it lives
        assert resolve_socket_path("link/d.sock", os.getpid()) == f"{tmp_path}/real/d.sock"
    finally:
        os.chdir(here)
    assert resolve_socket_path("@abstract", os.getpid()) == "@abstract"
    assert resolve_socket_path("gone/d.sock", 2 ** 22 + 7) == "gone/d.sock"  # no such process: as given
