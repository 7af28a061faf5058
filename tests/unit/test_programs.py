"""Programs known by their file: links, copies, memfds and the dynamic loader."""

import os

from ebpfmon import events as ev
from ebpfmon.host.cgroups import CgroupNames, Hierarchy
from ebpfmon.host.devices import DeviceResolver
from ebpfmon.host.programs import LOADER, ProgramIdentifier, loaded_program
from ebpfmon.stream.enrich import Enricher
from ebpfmon.stream.proctree import ProcessTree


def installed(tmp_path, files: dict[str, bytes]):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, content in files.items():
        (bin_dir / name).write_bytes(content)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ld-linux-x86-64.so.2").write_bytes(b"\x7fELF the loader")
    identifier = ProgramIdentifier(bin_dirs=(str(bin_dir),), loader_globs=(f"{tmp_path}/lib/ld-linux*.so*",))
    return identifier, bin_dir


def test_a_link_a_copy_and_a_memfd_are_the_program_a_lookalike_is_not(tmp_path):
    ident, bin_dir = installed(tmp_path, {"socat": b"socat program " * 100, "ssh": b"ssh program " * 50})
    (bin_dir / "slogin").symlink_to("ssh")
    assert ident.look_for(["socat", "ssh", "slogin", "not-installed"]) == 3  # two programs and the loader
    assert ident.identify(str(bin_dir / "slogin")) == ("slogin", "ssh")  # one file, both its names
    (tmp_path / "updater").write_bytes((bin_dir / "socat").read_bytes())  # a copy under another name
    assert ident.identify(str(tmp_path / "updater")) == ("socat",)
    os.link(tmp_path / "updater", tmp_path / "hardlink")
    assert ident.identify(str(tmp_path / "hardlink")) == ("socat",)
    same_size = b"SOCAT PROGRAM " * 100  # as long, other bytes: hashed, and not the program
    (tmp_path / "lookalike").write_bytes(same_size)
    assert ident.identify(str(tmp_path / "lookalike")) == ()
    fd = os.memfd_create("x")
    try:
        os.write(fd, (bin_dir / "socat").read_bytes())
        assert ident.identify(f"/proc/self/fd/{fd}") == ("socat",)
    finally:
        os.close(fd)
    assert ident.identify(str(tmp_path / "missing")) == ()
    assert ident.identify(str(tmp_path / "lib" / "ld-linux-x86-64.so.2")) == (LOADER,)


def test_a_changed_file_is_judged_again_and_a_reload_looks_for_other_names(tmp_path):
    ident, bin_dir = installed(tmp_path, {"nc": b"netcat " * 64})
    ident.look_for(["nc"])
    copy = tmp_path / "copy"
    copy.write_bytes(b"netcat " * 64)
    assert ident.identify(str(copy)) == ("nc",)
    copy.write_bytes(b"NETCAT " * 64)  # rewritten in place: same inode and size, new mtime
    os.utime(copy, ns=(1, 1))
    assert ident.identify(str(copy)) == ()
    ident.look_for([])  # nc no longer in the list
    assert ident.identify(str(bin_dir / "nc")) == ()


def test_the_loaders_command_line_names_the_program_it_runs():
    loader = "/lib64/ld-linux-x86-64.so.2"
    assert loaded_program([loader, "/usr/bin/ssh", "-R", "1:h:2", "h"]) == \
        ("/usr/bin/ssh", ["/usr/bin/ssh", "-R", "1:h:2", "h"])
    assert loaded_program([loader, "--library-path", "/opt/lib", "--argv0", "sshd", "--inhibit-cache", "./x", "-v"]) \
        == ("./x", ["sshd", "-v"])
    assert loaded_program([loader, "--preload=/tmp/l.so", "bin/socat", "-"]) == ("bin/socat", ["bin/socat", "-"])
    assert loaded_program([loader, "--list", "/usr/bin/ssh"]) is None
    assert loaded_program([loader]) is None


def test_an_exec_through_the_loader_is_the_programs_exec(tmp_path):
    ident, bin_dir = installed(tmp_path, {"ssh": b"ssh program " * 50})
    proc = tmp_path / "proc"
    (proc / "700").mkdir(parents=True)
    (proc / "700" / "exe").symlink_to(tmp_path / "lib" / "ld-linux-x86-64.so.2")
    (proc / "700" / "cwd").symlink_to(bin_dir)
    (proc / "700" / "comm").write_text("ld-linux-x86-64\n")
    enricher = Enricher(CgroupNames(Hierarchy()), ProcessTree(proc=str(proc)), DeviceResolver())
    enricher.programs = ident
    ident.look_for(["ssh"])
    argv = ["/lib64/ld-linux-x86-64.so.2", "--argv0", "updater", "./ssh", "-fNR", "2222:127.0.0.1:22", "203.0.113.5"]
    event = ev.ExecEvent(time_ns=1, cgroup_id=0, cgroup=None, filename="/lib64/ld-linux-x86-64.so.2", argv=argv,
                         proc=ev.Process(pid=700, tid=700, ppid=1, uid=0, gid=0, comm="ld-linux-x86-64"))
    event = enricher.apply(event)
    assert (event.proc.exe, event.argv, event.exe_is, event.loader) == (
        str(bin_dir / "ssh"), ["updater", "-fNR", "2222:127.0.0.1:22", "203.0.113.5"], ["ssh"],
        "/lib64/ld-linux-x86-64.so.2")


def test_a_renamed_copy_of_ssh_is_parsed_as_ssh():
    from ebpfmon.rules.argv import parse_ssh

    assert parse_ssh(("updater", "-fNR", "2222:h:22", "host"), "/tmp/updater") is None
    cmd = parse_ssh(("updater", "-fNR", "2222:h:22", "host"), "/tmp/updater", ("ssh",))
    assert cmd.remote_forward and cmd.host == "host"


def test_a_process_that_exec_d_again_is_not_taken_for_its_later_program(tmp_path):
    ident, bin_dir = installed(tmp_path, {"ssh": b"ssh program " * 50, "dash": b"a shell " * 40})
    ident.look_for(["ssh", "dash"])
    proc = tmp_path / "proc"
    (proc / "800").mkdir(parents=True)
    (proc / "800" / "exe").symlink_to(bin_dir / "ssh")  # `sh -c 'exec ssh ...'`: ssh by now
    (proc / "800" / "comm").write_text("ssh\n")
    enricher = Enricher(CgroupNames(Hierarchy()), ProcessTree(proc=str(proc)), DeviceResolver())
    enricher.programs = ident

    def exec_of(filename, comm):
        return ev.ExecEvent(time_ns=1, cgroup_id=0, cgroup=None, filename=filename, argv=[comm],
                            proc=ev.Process(pid=800, tid=800, ppid=1, uid=0, gid=0, comm=comm))

    assert enricher.apply(exec_of(str(bin_dir / "dash"), "sh")).exe_is == ["dash"]  # the path it was given
    assert enricher.apply(exec_of(str(bin_dir / "ssh"), "ssh")).exe_is == ["ssh"]
    assert enricher.apply(exec_of("/dev/fd/3", "sh")).exe_is == []  # no path to fall back on
