"""Egress profiles as an operator meets them: ebpfmon policy, and a daemon process whose policy
outlives kill -9 and is taken over by the next one."""

from __future__ import annotations

import errno
import socket
import sys
import signal
import time

from helpers import (DNS_SERVER, MIRROR_PORT, MIRRORS, REPO, UNLISTED, DaemonProcess, connect_from, ebpfmon,
                     make_agent_cgroup, resolve_connect, sent_from)

POLICY = """\
egress:
  default_profile: closed
  profiles:
    - name: web-only
      agents: ["/ebpfmon-agents/web-*"]
      allow:
        - {cidr: 198.51.100.0/24, ports: [443]}
        - {cidr: 198.51.100.7, ports: ["22-23"], proto: tcp}
        - {cidr: "2001:db8::/32"}
    - name: watched
      agents: ["/ebpfmon-agents/audit-*"]
      mode: audit
    - name: closed
"""


def test_policy_check_names_the_deciding_entry_and_exits_by_verdict(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(POLICY)
    check = ("policy", "check", "--config", str(config), "--agent")
    out = ebpfmon(*check, "/ebpfmon-agents/web-1", "198.51.100.7:22")
    assert out.returncode == 0 and out.stdout.startswith("allow:"), out.stdout + out.stderr
    assert "198.51.100.7/32 ports 22-23/tcp (egress.profiles[0].allow[1])" in out.stdout
    out = ebpfmon(*check, "/ebpfmon-agents/web-1", "--udp", "198.51.100.7:22")
    assert out.returncode == 1 and out.stdout.startswith("refuse:")
    out = ebpfmon(*check, "/ebpfmon-agents/web-1", "[2001:db8::5]:8080")
    assert out.returncode == 0 and "2001:db8::/32 any port" in out.stdout
    out = ebpfmon(*check, "/ebpfmon-agents/other", "198.51.100.7:443")  # the default: allows nothing
    assert out.returncode == 1 and "profile closed" in out.stdout
    out = ebpfmon(*check, "/ebpfmon-agents/audit-3", "203.0.113.1:25")
    assert out.returncode == 0 and "audit" in out.stdout
    out = ebpfmon("policy", "show", "/ebpfmon-agents/web-9", "--config", str(config))
    assert "web-only  mode: enforce" in out.stdout and "allow 198.51.100.0/24 port 443" in out.stdout
    out = ebpfmon("policy", "show", "--config", str(config))  # no agent: every profile
    assert out.returncode == 0 and "watched  mode: audit" in out.stdout and "(default profile)" in out.stdout
    out = ebpfmon("policy", "validate", str(config))
    assert out.returncode == 0 and "3 profile(s), 3 prefix(es), 0 name(s), default profile: closed" in out.stdout


def test_bad_profiles_are_refused_with_file_line_and_key(tmp_path):
    config = tmp_path / "config.yaml"
    for text, expected in [
        (POLICY.replace("198.51.100.0/24", "198.51.100.9/24"), ":7: egress.profiles[0].allow[0].cidr: "
                                                               "'198.51.100.9/24' has host bits set"),
        (POLICY.replace('"22-23"', '"23-22"'), ":8: egress.profiles[0].allow[1].ports[0]: '23-22'"),
        (POLICY.replace("mode: audit", "mode: watch"), ":12: egress.profiles[1].mode: 'watch' is not one of"),
        (POLICY.replace("default_profile: closed", "default_profile: nope"), ":2: egress.default_profile: no "
                                                                             "profile is named 'nope'"),
        (POLICY.replace("{cidr: \"2001:db8::/32\"}", "{name: \"mirror..test\"}"), ":9: egress.profiles[0].allow[2].name:"),
    ]:
        config.write_text(text)
        for command in (("policy", "validate", str(config)), ("config", "check", str(config))):
            out = ebpfmon(*command)
            assert out.returncode == 2, out.stdout
            assert f"{config}{expected}" in " ".join(out.stderr.split()), out.stderr


def test_the_policy_outlives_kill_9_and_the_next_daemon_takes_it_over(bpf, hierarchy, own_root, tmp_path,
                                                                     sshd, netns_host):
    state = tmp_path / "state"
    state.mkdir()
    config = state / "config.yaml"
    text = (f"agent_root: {own_root}\nstate_dir: {state}\nmetrics: {{enabled: false}}\n"
            + POLICY.replace("/ebpfmon-agents", own_root).replace("198.51.100.0/24, ports: [443]",
                                                                   f"{netns_host.address}, ports: [443]"))
    config.write_text(text)
    daemon = DaemonProcess(own_root, str(state), from_file=True)
    web = make_agent_cgroup(hierarchy, own_root, "web")
    try:
        time.sleep(0.5)  # classified (the cgroup's creation wakes the daemon)
        assert connect_from(web, netns_host.address, 22) == errno.EPERM  # sshd is there: refused anyway
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        assert connect_from(web, netns_host.address, 22) == errno.EPERM
        orphan = make_agent_cgroup(hierarchy, own_root, "web")  # nobody classifies it: fail closed
        assert connect_from(orphan, netns_host.address, 22) == errno.EPERM
        daemon = DaemonProcess(own_root, str(state), from_file=True)
        assert connect_from(web, netns_host.address, 22) == errno.EPERM
        config.write_text(text.replace(f"{netns_host.address}, ports: [443]", f"{netns_host.address}, ports: [22]"))
        out = ebpfmon("reload", "--config", str(config))
        assert out.returncode == 0, out.stderr
        assert connect_from(web, netns_host.address, 22) == 0 and connect_from(orphan, netns_host.address, 22) == 0
    finally:
        daemon.stop()


def test_the_shipped_example_policy_is_valid_and_does_what_it_says():
    example = REPO / "deploy/egress/offline.yaml"
    out = ebpfmon("policy", "validate", str(example))
    assert out.returncode == 0 and "3 profile(s)" in out.stdout and "default profile: offline" in out.stdout
    check = ("policy", "check", "--config", str(example), "--agent")
    assert ebpfmon(*check, "/ebpfmon-agents/build-1", "192.0.2.10:443").returncode == 0
    assert ebpfmon(*check, "/ebpfmon-agents/build-1", "192.0.2.11:443").returncode == 1
    assert ebpfmon(*check, "/ebpfmon-agents/anyone", "127.0.0.1:22").returncode == 1
    assert ebpfmon(*check, "/ebpfmon-agents/trial-1", "203.0.113.5:22").returncode == 0  # audit: reported


def test_the_shipped_package_mirrors_policy_allows_the_mirrors_by_name_on_443_only():
    example = REPO / "deploy/egress/package-mirrors.yaml"
    out = ebpfmon("policy", "validate", str(example))
    assert out.returncode == 0 and "2 profile(s)" in out.stdout and "default profile: package-mirrors" in out.stdout
    check = ("policy", "check", "--config", str(example), "--agent")
    out = ebpfmon(*check, "/ebpfmon-agents/any-1", "files.pythonhosted.org:443")
    assert out.returncode == 0 and "name files.pythonhosted.org port 443/tcp" in out.stdout
    assert ebpfmon(*check, "/ebpfmon-agents/any-1", "cdn-lfs.huggingface.co:443").returncode == 0  # a wildcard
    assert ebpfmon(*check, "/ebpfmon-agents/any-1", "pypi.org:80").returncode == 1
    assert ebpfmon(*check, "/ebpfmon-agents/any-1", "--udp", "pypi.org:443").returncode == 1
    assert ebpfmon(*check, "/ebpfmon-agents/any-1", "pool.example.net:443").returncode == 1
    assert ebpfmon(*check, "/ebpfmon-agents/build-1", "192.0.2.10:443").returncode == 0  # combined
    assert ebpfmon(*check, "/ebpfmon-agents/build-1", "github.com:443").returncode == 1  # not in builds
    out = ebpfmon("policy", "show", "--config", str(example), "/ebpfmon-agents/build-1")
    assert "allow name pypi.org port 443/tcp" in out.stdout and "no daemon running" in out.stdout


BLOCKING_CONNECT = """
import socket, sys
print(socket.socket().connect_ex((sys.argv[1], int(sys.argv[2]))))
"""

def test_a_profile_learned_from_a_session_lets_the_session_through_and_nothing_else(
        bpf, hierarchy, own_root, tmp_path, sshd, netns_host, mirror, stratum_pool):
    state = tmp_path / "state"
    state.mkdir()
    config = state / "config.yaml"
    base = (f"agent_root: {own_root}\nstate_dir: {state}\nmetrics: {{enabled: false}}\nalerts: {{sinks: []}}\n"
            f"egress:\n  dns_upstream: [{DNS_SERVER}]\n")
    # recorded under a profile in audit mode: everything goes through, the DNS proxy sees the names
    config.write_text(base + f"  profiles:\n    - {{name: recording, agents: ['{own_root}/web-*'], mode: audit}}\n")
    web = make_agent_cgroup(hierarchy, own_root, "web")
    with socket.create_server(("127.0.0.1", 0)) as local_service:
        local_port = local_service.getsockname()[1]
        daemon = DaemonProcess(own_root, str(state), from_file=True)
        try:  # the session: names looked up and a download from the mirror, ssh's port on the test
            # host, a local service, a datagram; and a failed try
            assert [t[0::2] for t in resolve_connect(web, "mirror.test", times=3)] == [["NOERROR", 0]] * 3
            assert connect_from(web, netns_host.address, 22) == 0
            assert connect_from(web, "127.0.0.1", local_port) == 0
            assert sent_from(web, netns_host.address, 5353) == 0
            # nothing there: refused by the host, and a blocking connect says so at once: not learned (a
            # non-blocking one returns EINPROGRESS, and its outcome is not seen: learned as reached)
            assert int(web.run([sys.executable, "-c", BLOCKING_CONNECT, netns_host.address, "8022"],
                               text=True).stdout) == errno.ECONNREFUSED
        finally:  # at its stop the daemon reads what is left in the ring and flushes the audit log
            daemon.stop()
        out = ebpfmon("policy", "learn", "--agent", f"{own_root}/web-*", "--since", "1h", "--name", "session",
                      "--config", str(config))
        assert out.returncode == 0, out.stderr
        learned = out.stdout
        assert f"name: mirror.test, ports: [{MIRROR_PORT}], proto: tcp" in learned
        assert f"{netns_host.address}/32, ports: [22], proto: tcp" in learned, learned
        assert f"127.0.0.1/32, ports: [{local_port}], proto: tcp" in learned
        assert f"{netns_host.address}/32, ports: [5353], proto: udp" in learned
        assert not any(m in learned for m in MIRRORS)  # the mirror is learned by name, not by address
        assert "8022" not in learned and "# Review it before use" in learned
        config.write_text(base + learned.split("egress:\n", 1)[1])
        assert ebpfmon("policy", "validate", str(config)).returncode == 0
        daemon = DaemonProcess(own_root, str(state), from_file=True)
        try:  # the session again, under the learned profile: all of it works (the mirror answers with
            # other addresses this time: the name allows them); nothing else does, with nothing sent
            assert [t[0::2] for t in resolve_connect(web, "mirror.test", times=3)] == [["NOERROR", 0]] * 3
            assert connect_from(web, netns_host.address, 22) == 0
            assert connect_from(web, "127.0.0.1", local_port) == 0
            assert sent_from(web, netns_host.address, 5353) == 0
            assert resolve_connect(web, "pool.example.net") == [["REFUSED", None, None]]
            assert connect_from(web, netns_host.address, 8022) == errno.EPERM
            reverse_tunnel = web.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-N",
                                      "-R", "2222:127.0.0.1:22", f"root@{UNLISTED}"], text=True)
            assert reverse_tunnel.returncode == 255 and "Operation not permitted" in reverse_tunnel.stderr
            pool_before = len(stratum_pool.accepted)
            assert connect_from(web, stratum_pool.host, stratum_pool.port) == errno.EPERM
            assert len(stratum_pool.accepted) == pool_before
            assert sent_from(web, netns_host.address, 5354) == errno.EPERM
        finally:
            daemon.stop()


def test_learn_says_what_is_missing(tmp_path):
    out = ebpfmon("policy", "learn", "--agent", "/ebpfmon-agents/*", "--audit-dir", str(tmp_path))
    assert out.returncode == 2 and "no audit log in" in out.stderr
    (tmp_path / "events.jsonl").write_text("not json\n")
    out = ebpfmon("policy", "learn", "--agent", "/ebpfmon-agents/*", "--audit-dir", str(tmp_path))
    assert out.returncode == 2 and "events.jsonl:1: not an event" in out.stderr
    assert "no events of agents matching /ebpfmon-agents/*" in out.stderr
    out = ebpfmon("policy", "learn", "--agent", "/x/*", "--audit-dir", str(tmp_path), "--since", "yesterday")
    assert out.returncode == 2 and "give a duration back from now" in out.stderr
