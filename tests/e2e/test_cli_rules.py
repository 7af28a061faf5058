"""ebpfmon rules ..., and rule reloading in ebpfmon run, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

from helpers import EBPFMON, REPO, ebpfmon, line_of

from ebpfmon.rules.cases import make_event


def test_validate_the_shipped_packs():
    out = ebpfmon("rules", "validate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: ") and " rules " in out.stdout


def test_validate_reports_every_problem_and_exits_1(tmp_path):
    bad = tmp_path / "local.yaml"
    bad.write_text("- rule: r\n  desc: d\n  condition: spawned_process and proc.nmae = x\n  output: o\n"
                   "  priority: WARNING\n")
    out = ebpfmon("rules", "validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}:3:34: unknown field 'proc.nmae' (did you mean proc.name?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_list_shows_kinds_state_and_actions():
    out = ebpfmon("rules", "list")
    assert out.returncode == 0
    line = next(l for l in out.stdout.splitlines() if l.startswith("Internal network scan"))
    assert "CRITICAL" in line and "connect" in line and "window" in line and "cut_network" in line


def test_cases_pass_and_a_wrong_expectation_fails(tmp_path):
    out = ebpfmon("rules", "test", "--cases", str(REPO / "tests/rules/sandbox.yaml"))
    assert out.returncode == 0, out.stdout
    assert out.stdout.count("ok  ") >= 5
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("- case: ls is not a tunnel\n  events:\n    - exec: {argv: [ls]}\n"
                     "  fires: [Reverse SSH tunnel]\n")
    out = ebpfmon("rules", "test", "--cases", str(wrong))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "expected to fire ['Reverse SSH tunnel']" in out.stdout


def test_replay_a_trace_and_report_bad_lines(tmp_path):
    trace = tmp_path / "trace.jsonl"
    tunnel = make_event({"exec": {"argv": ["ssh", "-fNR", "2222:localhost:22", "203.0.113.5"]}}, 0)
    benign = make_event({"exec": {"argv": ["ssh", "-L", "1:h:2", "203.0.113.5"]}}, 1)
    trace.write_text(tunnel.to_json() + "\n" + benign.to_json() + "\n{not json\n")
    out = ebpfmon("rules", "test", "--events", str(trace), "--json")
    assert out.returncode == 1  # the bad line
    verdicts = [json.loads(l) for l in out.stdout.splitlines()]
    assert [v["rule"] for v in verdicts] == ["Reverse SSH tunnel"]
    assert verdicts[0]["event"]["argv"][1] == "-fNR"
    assert f"{trace}:3: not an event" in out.stderr
    assert "2 events replayed, 1 verdicts, 1 bad lines" in out.stderr


def test_run_reloads_rules_on_sighup_and_keeps_the_last_good_set(bpf, own_root, hierarchy, tmp_path):
    rules = tmp_path / "mine.yaml"
    good = ("- rule: Marker ran\n  desc: the test's marker program ran\n  condition: spawned_process and "
            "exec.argv = {tag}\n  output: marker %exec.argv[1]\n  priority: NOTICE\n  tags: [T0000]\n")
    tag1, tag2 = uuid.uuid4().hex, uuid.uuid4().hex
    rules.write_text(good.format(tag=tag1))
    # a fresh agent each time: alerts of one (rule, agent) within a minute are one incident
    agents = [hierarchy.ensure(f"{own_root}/reload-agent-{i}") for i in range(3)]
    config = tmp_path / "config.yaml"
    config.write_text("metrics: {enabled: false}\n")
    proc = subprocess.Popen([*EBPFMON, "run", "--config", str(config), "--agent-root", own_root, "--rules",
                             str(rules), "--state-dir", str(tmp_path / "state")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def wait_line(stream, text, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = line_of(stream, repr(text), max(0.1, deadline - time.monotonic()))
            lines.append(line)
            if text in line:
                return line
            if not line and proc.poll() is not None:
                break
        raise AssertionError(f"never saw {text!r}; got {lines}")

    def run_marker(tag, agent):
        subprocess.run(["/bin/echo", tag], stdout=subprocess.DEVNULL, check=True,
                       preexec_fn=lambda: (agent / "cgroup.procs").write_text(str(__import__("os").getpid())))

    try:
        wait_line(proc.stderr, "ready:")
        run_marker(tag1, agents[0])
        wait_line(proc.stdout, f"marker {tag1}")
        # a broken file: refused, the running set stays
        rules.write_text("- rule: Marker ran\n  condition: (\n")
        proc.send_signal(signal.SIGHUP)
        line = wait_line(proc.stderr, "not reloaded, the running set stays")
        assert str(rules) in line
        run_marker(tag1, agents[1])
        wait_line(proc.stdout, f"marker {tag1}")
        # a good new file: taken
        rules.write_text(good.format(tag=tag2))
        proc.send_signal(signal.SIGHUP)
        wait_line(proc.stderr, "reloaded: ")
        run_marker(tag2, agents[2])
        wait_line(proc.stdout, f"marker {tag2}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_run_with_only_my_rules_printing_events_and_logging_json(bpf, hierarchy, own_root, tmp_path):
    from helpers import DaemonProcess, make_agent_cgroup

    rules = tmp_path / "mine.yaml"
    rules.write_text("- rule: Marker ran\n  desc: the test's own\n  condition: evt.type = execve and "
                     "proc.cmdline contains run-marker\n  output: marker by %proc.name\n  priority: NOTICE\n")
    daemon = DaemonProcess(own_root, str(tmp_path / "state"), "--no-defaults", "--rules", str(rules),
                           "--show-events", "--log-json")
    agent = make_agent_cgroup(hierarchy, own_root)
    try:
        ready = json.loads(next(line for line in daemon.lines if "ready:" in line))
        assert "; 1 rules;" in ready["message"] and ready["level"] == "info"  # the shipped packs left out
        # ssh -V prints its version and exits: with the packs, its -R would be a reverse tunnel
        agent.run(["/bin/sh", "-c", "ssh -V -R 2222:localhost:22 nowhere; /bin/true run-marker"])
        daemon.wait("execve /bin/true", "/bin/true run-marker  = ok")  # --show-events: a line per event
        daemon.wait("[NOTICE] Marker ran: marker by")  # the shell first (its command line names it too)
        assert daemon.stop() == 0
        logged = [json.loads(line) for line in daemon.lines if line.startswith('{"') and '"level"' in line]
        assert logged and all({"level", "message"} <= set(record) for record in logged)
        assert not any("Reverse SSH tunnel" in line for line in daemon.lines)
    finally:
        daemon.stop()
