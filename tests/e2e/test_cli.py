"""The command line, run as a user would: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from helpers import EBPFMON, REPO, ebpfmon


class Tracer:
    """ebpfmon trace in the background; threads read its output line by line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([*EBPFMON, "trace", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.stderr_seen: list[str] = []
        for name in self.lines:
            threading.Thread(target=self._read, args=(name,), daemon=True).start()
        self.wait("stderr", "tracing", timeout=60)

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line)
        self.lines[name].put(None)

    def wait(self, name: str, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines[name].get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if name == "stderr":
                self.stderr_seen.append(line)
            if text in line:
                return line
        pytest.fail(f"ebpfmon trace printed no {name} line with {text!r} (exit {self.proc.poll()}; "
                    f"stderr so far: {self.stderr_seen})")

    def wait_stdout(self, text: str) -> str:
        return self.wait("stdout", text)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        rest = []
        while (line := self.lines["stderr"].get(timeout=10)) is not None:
            rest.append(line)
        return self.proc.returncode, "".join(self.stderr_seen + rest)


def test_trace_json_then_ctrl_c_summary(bpf, agent_cgroup):
    tracer = Tracer("exec", "--json", "--cgroup", agent_cgroup.name)
    tag = uuid.uuid4().hex
    agent_cgroup.run(["/bin/echo", tag])
    event = json.loads(tracer.wait_stdout(tag))
    assert event["kind"] == "exec"
    assert event["argv"] == ["/bin/echo", tag]
    assert event["cgroup"] == agent_cgroup.name
    assert event["proc"]["ppid"] == os.getpid()
    code, err = tracer.interrupt()
    assert code == 0
    assert "Traceback" not in err
    assert "ebpfmon: events: exec=1; lost: 0; truncated: 0" in err


def test_trace_table_shows_connects(bpf, agent_cgroup):
    tracer = Tracer("connect", "--cgroup", agent_cgroup.name, "--duration", "30")
    port = 1  # nothing listens on loopback port 1
    code = f"import socket; socket.socket().connect_ex(('127.0.0.1', {port}))"
    agent_cgroup.run(["python3", "-c", code])
    line = tracer.wait_stdout("connect 127.0.0.1:1 ")  # the type needs the daemon's hooks
    assert line.rstrip().endswith("= ECONNREFUSED")
    assert agent_cgroup.name.split("/")[-1] in line
    tracer.interrupt()


def test_trace_gpu_shows_a_device_open(bpf, agent_cgroup, fake_gpu_dir):
    tracer = Tracer("gpu", "--json", "--cgroup", agent_cgroup.name, "--gpu-prefix", f"{fake_gpu_dir}/nvidia")
    node = fake_gpu_dir / "nvidia0"
    opener = f"import os\ntry:\n    os.close(os.open({str(node)!r}, os.O_RDWR))\nexcept OSError:\n    pass"
    agent_cgroup.run([sys.executable, "-c", opener])
    event = json.loads(tracer.wait_stdout(str(node)))
    assert event["kind"] == "gpu_open" and event["path"] == str(node) and event["device"] == "195:0"
    assert event["access"] == "rw" and event["cgroup"] == agent_cgroup.name
    code, err = tracer.interrupt()
    assert code == 0 and "gpu_open=1" in err, err


def test_trace_ends_after_duration(bpf, agent_cgroup):
    start = time.monotonic()
    out = ebpfmon("trace", "--cgroup", agent_cgroup.name, "--duration", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("TIME")
    assert "events: 0; lost: 0" in out.stderr
    assert time.monotonic() - start < 60


def test_trace_unknown_cgroup_is_a_clear_error(bpf):
    out = ebpfmon("trace", "--cgroup", "/no-such-cgroup-here", "--duration", "1")
    assert out.returncode == 2
    assert "ebpfmon: error: cgroup /no-such-cgroup-here does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_print_c_shows_the_compiled_source():
    out = ebpfmon("trace", "gpu", "--print-c")
    assert out.returncode == 0
    assert "gpu_path_matches" in out.stdout and "sched_process_fork" in out.stdout
    assert "sys_enter_execve" not in out.stdout


def test_exec_runs_the_command_in_an_agent_cgroup(bpf, hierarchy, test_root):
    out = ebpfmon("exec", "--agent-root", test_root, "--cgroup", "cli-a", "--", "cat", "/proc/self/cgroup")
    assert out.returncode == 0, out.stderr
    assert f"0::{test_root}/cli-a" in out.stdout.splitlines()
    assert f"running cat in cgroup {test_root}/cli-a" in out.stderr
    assert "warning: the agent runs as root" in out.stderr
    # the agent's exit status is the command's
    assert ebpfmon("exec", "--agent-root", test_root, "--", "sh", "-c", "exit 7").returncode == 7
    # as a user of its own, with its groups, still in the cgroup
    out = ebpfmon("exec", "--agent-root", test_root, "--cgroup", "cli-a", "--user", "nobody", "--", "sh", "-c",
                  "id -u; id -g; cat /proc/self/cgroup")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["65534", "65534"] and f"0::{test_root}/cli-a" in out.stdout
    assert "as nobody" in out.stderr and "runs as root" not in out.stderr


def test_exec_errors(bpf, test_root):
    out = ebpfmon("exec", "--agent-root", test_root, "--", "/no/such/program")
    assert out.returncode == 127
    assert "cannot run '/no/such/program'" in out.stderr
    out = ebpfmon("exec", "--agent-root", test_root, "--cgroup", "../escape", "--", "true")
    assert out.returncode == 2
    assert "must be a relative path below the agent root" in out.stderr
    out = ebpfmon("exec", "--agent-root", test_root, "--user", "no-such-user-here", "--", "true")
    assert out.returncode == 2 and "no user 'no-such-user-here'" in out.stderr


def test_doctor_passes_here(bpf):
    out = ebpfmon("doctor")
    assert out.returncode == 0, out.stdout
    rows = {line.split("  ")[0].strip(): line for line in out.stdout.splitlines()[1:] if line.strip()}
    for name in ("privileges", "bcc", "kernel headers", "tracefs", "cgroup v2", "ring buffer", "probe exec",
                 "probe connect", "probe gpu", "cgroup hook device", "cgroup hook connect4"):
        assert " ok " in rows[name] or " WARN " in rows[name], rows[name]
    assert "ready: every required check passed" in out.stdout


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def test_not_root_gets_a_paragraph_not_a_traceback(bpf):
    out = subprocess.run([*AS_NOBODY, *EBPFMON, "trace"], cwd="/", capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert out.stderr.startswith("ebpfmon: error: ebpfmon must run as root")
    assert "sudo" in out.stderr and "Traceback" not in out.stderr
    doctor = subprocess.run([*AS_NOBODY, *EBPFMON, "doctor"], cwd="/", capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert doctor.returncode == 1
    assert "privileges" in doctor.stdout and "FAIL" in doctor.stdout


def test_missing_bcc_says_how_to_install_it(tmp_path):
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named bcc (simulated)')\n")
    out = ebpfmon("trace", env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert out.returncode == 2
    assert "the bcc Python module cannot be imported" in out.stderr
    assert "python3-bpfcc" in out.stderr and "Traceback" not in out.stderr


def test_no_cgroup2_is_explained(bpf):
    # a private mount namespace without the cgroup2 mount: the host keeps its own
    script = ("for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do umount -l $m; done; "
              f"exec {' '.join(EBPFMON)} trace")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "no cgroup v2 hierarchy is mounted" in out.stderr
    assert "Traceback" not in out.stderr


def every_command(group, path=()):
    yield path
    if hasattr(group, "commands"):  # a group (typer vendors its own click)
        for name, command in group.commands.items():
            yield from every_command(command, (*path, name))


def test_help_teaches_with_examples():
    out = ebpfmon("trace", "--help")
    assert out.returncode == 0
    assert "--all-cgroups" in out.stdout and "Examples" in out.stdout
    assert "ebpfmon " in ebpfmon("--version").stdout


def test_every_command_and_group_has_an_example_in_its_help():
    import typer.main

    from ebpfmon.cli import app

    paths = list(every_command(typer.main.get_command(app)))
    assert len(paths) > 15  # the walk found the commands
    without = []
    for path in paths:
        out = ebpfmon(*path, "--help")
        assert out.returncode == 0, (path, out.stderr)
        if "Example" not in out.stdout or f"ebpfmon {' '.join(path)}".strip() not in " ".join(out.stdout.split()):
            without.append(" ".join(path) or "(top level)")
    assert not without, f"--help without an example of itself: {without}"


SIGNAL_INSIDE_THE_HANDLER = """
import signal, threading
from ebpfmon.cli.common import stop_on_signals

stop = stop_on_signals()
inner = []

class SignalWhileHeld(type(stop._cond)):
    # a second SIGTERM arriving while the first handler's stop.set() holds the event's lock
    def __enter__(self):
        held = super().__enter__()
        if not inner:
            inner.append(1)
            signal.raise_signal(signal.SIGTERM)  # its handler runs at the next bytecode, lock held
        return held

stop._cond = SignalWhileHeld(threading.Lock())
signal.raise_signal(signal.SIGTERM)
print("stopped" if stop.is_set() and inner else "not stopped", flush=True)
"""


def test_a_second_signal_inside_the_first_ones_handler_does_not_hang():
    out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", SIGNAL_INSIDE_THE_HANDLER], capture_output=True,
                         text=True, timeout=20)
    assert out.stdout.strip() == "stopped", out.stderr


def test_the_environment_names_the_config_and_config_show_masks_inline_secrets(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("agent_root: /from-the-file\nalerts:\n  sinks:\n"
                      "    - {type: slack, url: 'https://hooks.slack.example/services/T/B/SECRET1'}\n"
                      "    - {type: pagerduty, routing_key: SECRET2, url_env: PD_URL}\n"
                      "    - {type: webhook, url_file: /etc/ebpfmon/hook.url}\n")
    out = ebpfmon("config", "show", env={**os.environ, "EBPFMON_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["agent_root"] == "/from-the-file"
    slack, pagerduty, webhook = shown["alerts"]["sinks"]
    assert slack["url"] == "***" and pagerduty["routing_key"] == "***" and "SECRET" not in out.stdout
    assert pagerduty["url_env"] == "PD_URL" and webhook["url_file"] == "/etc/ebpfmon/hook.url"  # where, not what


def test_the_environment_names_the_agent_root_and_state_directory(tmp_path):
    env = {**os.environ, "EBPFMON_AGENT_ROOT": "/env-agents", "EBPFMON_STATE_DIR": str(tmp_path / "state")}
    out = ebpfmon("quarantine", "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []  # the empty state directory's records, as JSON
    out = ebpfmon("run", "--help", env=env)
    assert "[env var: EBPFMON_AGENT_ROOT]" in out.stdout and "[env var: EBPFMON_STATE_DIR]" in out.stdout


@pytest.mark.parametrize("text, says", [
    ("agent_root: relative", "agent_root: must be an absolute cgroup path"),
    ("agent_root: /", "agent_root: must be an absolute cgroup path"),
    ("agent_level: 0", "agent_level: must be 1 or more"),
    ("ringbuf_pages: 100", "ringbuf_pages: must be a power of two"),
    ("reader_nice: 25", "reader_nice: must be a nice value from -20 to 19"),
    ("alerts: {sinks: [{type: carrier-pigeon}]}", "alerts.sinks[0].type: 'carrier-pigeon' is not one of"),
    ("alerts: {sinks: [{type: console, min_priority: LOUD}]}", "alerts.sinks[0].min_priority: 'LOUD' is not one of"),
    ("alerts: {sinks: [{type: jsonl}]}", "alerts.sinks[0].path: a jsonl sink needs a path"),
    ("alerts: {sinks: [{type: webhook}]}", "alerts.sinks[0].url: a webhook sink needs url"),
    ("alerts: {sinks: [{type: pagerduty}]}", "alerts.sinks[0].routing_key: a pagerduty sink needs routing_key"),
    ("agent_level: many", "agent_level"),
    ("no_such_key: 1", "no_such_key"),
])
def test_config_check_names_the_key_and_what_is_wrong(tmp_path, text, says):
    config = tmp_path / "config.yaml"
    config.write_text(text + "\n")
    out = ebpfmon("config", "check", str(config))
    assert out.returncode != 0 and says in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
