"""ssh's configuration files read as the client reads them, in the process's view (a fake /proc)."""

import os

from ebpfmon.host.sshconfig import SshConfigReader

PID, UID = 4242, 1000


def fake_process(tmp_path, files: dict[str, str], cwd: str = "/work"):
    """/proc/PID/root -> a root file system with files; /proc/PID/cwd -> cwd inside it."""
    rootfs = tmp_path / "rootfs"
    for path, text in {"/etc/passwd": f"root:x:0:0::/root:/bin/sh\nagent:x:{UID}:{UID}::/home/agent:/bin/sh\n",
                       **files}.items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (rootfs / cwd.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc" / str(PID)
    proc.mkdir(parents=True)
    (proc / "root").symlink_to(rootfs)
    (proc / "cwd").symlink_to(cwd)  # what readlink shows: the path in the process's view
    return SshConfigReader(str(tmp_path / "proc")), rootfs


def test_the_users_file_by_uid_and_the_systems_for_the_destination(tmp_path):
    reader, _ = fake_process(tmp_path, {
        "/home/agent/.ssh/config": "Host other\n  RemoteForward 9000 localhost:22\n"
                                   "Host tunnel.example *.tunnels.example\n  RemoteForward 8080 localhost:22\n",
        "/etc/ssh/ssh_config": "Host *\n  Tunnel=point-to-point\n"})
    found = [str(f) for f in reader.findings(PID, UID, None, "root@tunnel.example", [])]
    assert found == ["/home/agent/.ssh/config:4: remoteforward 8080 localhost:22",
                     "/etc/ssh/ssh_config:2: tunnel point-to-point"]
    assert [f.what for f in reader.findings(PID, UID, None, "a.tunnels.example", [])] == ["remote_forward", "tun"]
    assert [f.what for f in reader.findings(PID, UID, None, "git.example", [])] == ["tun"]
    assert [f.what for f in reader.findings(PID, 0, None, "tunnel.example", [])] == ["tun"]  # root has none


def test_include_globs_relative_paths_negation_and_match(tmp_path):
    reader, _ = fake_process(tmp_path, {
        "/home/agent/.ssh/config": "Include conf.d/*.conf\nHost * !bastion\n  Include ~/extra\n",
        "/home/agent/.ssh/conf.d/a.conf": "Match exec \"true\"\n  RemoteForward 7000 localhost:22\n",
        "/home/agent/.ssh/conf.d/b.txt": "RemoteForward 1 localhost:22\n",  # not *.conf
        "/home/agent/extra": "TunnelDevice any:any\nTunnel no\n"})
    found = [str(f) for f in reader.findings(PID, UID, None, "host.example", [])]
    assert found == ["/home/agent/.ssh/conf.d/a.conf:2: remoteforward 7000 localhost:22",
                     "/home/agent/extra:1: tunneldevice any:any"]
    assert [f.what for f in reader.findings(PID, UID, None, "bastion", [])] == ["remote_forward"]


def test_dash_f_replaces_the_default_files_relative_to_the_working_directory(tmp_path):
    reader, _ = fake_process(tmp_path, {
        "/work/cfg/ssh.conf": "RemoteForward=6000 localhost:22\n",
        "/home/agent/.ssh/config": "RemoteForward 5000 localhost:22\n"})
    assert [str(f) for f in reader.findings(PID, UID, "cfg/ssh.conf", "h", [])] == \
        ["/work/cfg/ssh.conf:1: remoteforward 6000 localhost:22"]
    assert reader.findings(PID, UID, "none", "h", []) == []
    # -o Include comes first, like any -o
    assert [f.where for f in reader.findings(PID, UID, "none", "h", ["Include=/work/cfg/ssh.conf"])] == \
        ["/work/cfg/ssh.conf:1"]


def test_only_regular_files_bounded_and_include_loops_end(tmp_path):
    reader, rootfs = fake_process(tmp_path, {
        "/home/agent/.ssh/config": "Include ~/.ssh/config\nInclude /dev/fifo\nRemoteForward 1 l:2\n"})
    (rootfs / "dev").mkdir()
    os.mkfifo(rootfs / "dev" / "fifo")  # would block a read: never opened for one
    found = reader.findings(PID, UID, None, "h", [])
    assert {f.line for f in found} == {"remoteforward 1 l:2"} and len(found) <= 9
