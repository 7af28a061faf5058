"""Egress profiles as an operator meets them: ebpfmon policy, and a daemon process whose policy
outlives kill -9 and is taken over by the next one."""

from __future__ import annotations

import errno
import signal
import time

from helpers import REPO, DaemonProcess, connect_from, ebpfmon, make_agent_cgroup

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
    out = ebpfmon("policy", "validate", str(config))
    assert out.returncode == 0 and "3 profile(s), 3 prefix(es), default profile: closed" in out.stdout


def test_bad_profiles_are_refused_with_file_line_and_key(tmp_path):
    config = tmp_path / "config.yaml"
    for text, expected in [
        (POLICY.replace("198.51.100.0/24", "198.51.100.9/24"), ":7: egress.profiles[0].allow[0].cidr: "
                                                               "'198.51.100.9/24' has host bits set"),
        (POLICY.replace('"22-23"', '"23-22"'), ":8: egress.profiles[0].allow[1].ports[0]: '23-22'"),
        (POLICY.replace("mode: audit", "mode: watch"), ":12: egress.profiles[1].mode: 'watch' is not one of"),
        (POLICY.replace("default_profile: closed", "default_profile: nope"), ":2: egress.default_profile: no "
                                                                             "profile is named 'nope'"),
        (POLICY.replace("{cidr: \"2001:db8::/32\"}", "{name: mirror.test}"), ":9: egress.profiles[0].allow[2].name:"),
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
