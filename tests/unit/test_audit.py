"""The audit log: every event comes back from it exactly, ancestries written once per file,
each rotated file readable alone."""

import json
import shutil

from ebpfmon import events as ev
from ebpfmon.alerts.audit import AuditLog
from ebpfmon.config import AuditSettings


def agent_events(count: int, shell_pid: int = 100):
    """count connects from one process under a shell whose command line is long, as
    container shims' are; the ancestry list is shared, as the process tree shares it."""
    ancestry = ev.Ancestry([ev.Ancestor(pid=shell_pid, comm="bash", exe="/usr/bin/bash", argv=["bash", "-c", "x" * 1500]),
                            ev.Ancestor(pid=1, comm="init", exe="/sbin/init", argv=["/sbin/init", "caf\udce9"])])
    proc = ev.Process(pid=shell_pid + 1, tid=shell_pid + 1, ppid=shell_pid, uid=0, gid=0, comm="agent")
    return [ev.ConnectEvent(time_ns=n, cgroup_id=7, cgroup="/agents/a", proc=proc, ancestry=ancestry,
                            address="192.0.2.1", port=3333, retval=-111) for n in range(count)]


def read_back(path):
    out = []
    for number, item in ev.read_jsonl(path):
        assert not isinstance(item, Exception), item
        out.append(item)
    return out


def test_events_come_back_exactly_and_the_ancestry_is_written_once(tmp_path):
    log = AuditLog(AuditSettings(), tmp_path)
    events = agent_events(50) + agent_events(3, shell_pid=200)
    for event in events:
        log.write(event)
    log.flush()
    for event in events[:10]:  # a later batch: the ancestry is in the file already
        log.write(event)
    log.close()
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [line["kind"] for line in lines].count("ancestry") == 2
    assert all(line.isascii() for line in log.path.read_text().splitlines())
    assert read_back(log.path) == events + events[:10]
    # the form without the list is much shorter than a trace line
    assert len(events[0].to_json(ancestry_by_id=True)) * 5 < len(events[0].to_json())


def test_each_rotated_file_has_the_ancestries_its_events_name(tmp_path):
    line_size = len(agent_events(1)[0].to_json(ancestry_by_id=True)) + 1
    log = AuditLog(AuditSettings(max_bytes=line_size * 40, backups=3), tmp_path)
    events = agent_events(100)
    for start in range(0, 100, 10):  # ten batches: the file fills and rotates
        for event in events[start:start + 10]:
            log.write(event)
        log.flush()
    log.close()
    files = [log.path.with_name(f"events.jsonl.{n}") for n in (3, 2, 1)] + [log.path]
    assert all(f.exists() for f in files)
    back = [event for f in files for event in read_back(f)]
    assert back == events[-len(back):] and len(back) >= 60


def test_an_event_naming_an_unknown_ancestry_is_reported_with_its_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(agent_events(1)[0].to_json(ancestry_by_id=True) + "\n")
    [(number, error)] = list(ev.read_jsonl(path))
    assert number == 1 and f"{path}:1:" in str(error) and "no ancestry line before it" in str(error)


def test_a_connect_line_made_once_is_right_for_every_connect_after_it():
    """AuditLog keeps a connect's line by every field but the time: each field of the event and
    of its process changed in turn gives the line orjson makes for it (a field the key lacks
    would give the first event's line)."""
    from dataclasses import fields, replace

    from ebpfmon.alerts.audit import ConnectLines

    base = agent_events(1)[0]
    base.proc = replace(base.proc, exe="/usr/bin/agent", argv=["agent", "--go"])
    other_values = {
        "cgroup_id": 8, "cgroup": "/agents/b", "ancestry": ev.Ancestry([ev.Ancestor(pid=5)]), "family": "inet6",
        "address": "2001:db8::1", "port": 443, "sock_type": "dgram", "protocol": "udp", "retval": 0, "fd": 9,
        "source": "cgroup_hook",
        "container": ev.Container("c0ffee" * 10 + "c0ff", "podman", "agent-demo", "localhost/agent:1",
                                  {"ebpfmon.agent": "demo"}, True),
    }
    other_process = {"pid": 5, "tid": 6, "ppid": 7, "uid": 1000, "gid": 1000, "comm": "other", "exe": None,
                     "argv": ["agent", "--stop"]}
    assert set(other_values) == {f.name for f in fields(ev.ConnectEvent)} - {"kind", "time_ns", "proc"}
    assert set(other_process) == {f.name for f in fields(ev.Process)}
    lines = ConnectLines()
    variants = [replace(base, **{name: value}) for name, value in other_values.items()]
    variants += [replace(base, proc=replace(base.proc, **{name: value})) for name, value in other_process.items()]
    variants.append(replace(base, proc=replace(base.proc, argv=None)))
    for time_ns in (1_000, 2_000_000_000_000_000_000):  # made, then reused with another time
        for event in [base] + variants:
            event = replace(event, time_ns=time_ns)
            assert lines.line(event) == event.json_bytes(ancestry_by_id=True), event
    assert len(lines.lines) == len(variants) + 1


def test_a_connect_with_text_json_must_escape_is_written_right_each_time(tmp_path):
    """Lines json.dumps makes (lone surrogates, non-ASCII: escaped) are made each time, not reused."""
    log = AuditLog(AuditSettings(), tmp_path)
    events = agent_events(3)
    for n, event in enumerate(events):
        event.proc = ev.Process(pid=1, tid=1, ppid=0, uid=0, gid=0, comm="caf\udce9\u202e", argv=["x"])
        event.time_ns = n
        log.write(event)
    log.close()
    assert [e.time_ns for e in read_back(log.path)] == [0, 1, 2]
    assert all(e.proc.comm == "caf\udce9\u202e" for e in read_back(log.path))
    assert log.path.read_text().isascii()


# ---- the hash chain ----

def chained_log(tmp_path, count: int, batches: int = 10, **settings) -> AuditLog:
    log = AuditLog(AuditSettings(**settings), tmp_path)
    events = agent_events(count) + agent_events(count // 10 or 1, shell_pid=200)
    step = max(1, len(events) // batches)
    for start in range(0, len(events), step):
        for event in events[start:start + step]:
            log.write(event)
        log.flush()
    log.close()
    return log


def lines_of(path):
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_an_untouched_log_of_100k_records_verifies(tmp_path):
    from ebpfmon.alerts.audit import verify

    line_size = len(agent_events(1)[0].to_json(ancestry_by_id=True)) + 50
    log = chained_log(tmp_path, 100_000, batches=200, max_bytes=line_size * 30_000, backups=5)
    assert len(list(log.directory.glob("events.jsonl*"))) == 4  # rotated: the chain runs across files
    found = verify(log.directory)
    assert found.problem is None and found.records == log.lines_chained and found.records > 100_000
    # the events read back as before: the chain's field is the log's
    assert len(read_back(log.path)) > 0


def test_a_restarted_writer_goes_on_with_the_chain(tmp_path):
    from ebpfmon.alerts.audit import verify

    chained_log(tmp_path, 50)
    chained_log(tmp_path, 50)  # a second daemon on the same log
    assert verify(tmp_path / "audit").problem is None


def test_the_chain_head_is_written_when_the_chain_moved_and_only_then(tmp_path, monkeypatch):
    # at most once a second, and not at all while no line is written (an idle daemon)
    from ebpfmon.alerts import audit

    now = [1000.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    replaced = []
    real_replace = audit.os.replace
    monkeypatch.setattr(audit.os, "replace", lambda a, b: (replaced.append(b), real_replace(a, b)))
    log = AuditLog(AuditSettings(), tmp_path)
    head = tmp_path / "audit" / audit.HEAD_NAME
    log.write(agent_events(1)[0])
    log.flush()
    first = json.loads(head.read_text())
    assert first == {"file": "events.jsonl", "size": log.path.stat().st_size, "hash": log.prev}
    assert replaced == [head]
    now[0] += 5
    log.flush()  # nothing new: the head on disk is still right, and is not written again
    assert replaced == [head] and json.loads(head.read_text()) == first
    log.write(agent_events(1)[0])
    log.flush()  # the chain moved, but within the second: written with a later flush
    assert replaced == [head]
    now[0] += 1
    log.flush()
    assert replaced == [head, head] and json.loads(head.read_text())["hash"] == log.prev != first["hash"]
    log.close()


def test_verify_names_each_kind_of_tampering(tmp_path):
    from ebpfmon.alerts.audit import verify

    line_size = len(agent_events(1)[0].to_json(ancestry_by_id=True)) + 50
    pristine = chained_log(tmp_path / "pristine", 300, max_bytes=line_size * 100, backups=3).directory

    def tampered(name, change):
        directory = tmp_path / name / "audit"
        shutil.copytree(pristine, directory)
        change(directory)
        return verify(directory).problem

    def edit(directory, number, how, file="events.jsonl.1"):
        path = directory / file
        lines = lines_of(path)
        how(lines, number)
        write_lines(path, lines)

    def flip_byte(lines, n):
        lines[n] = lines[n].replace(b'"port":3333', b'"port":3334')

    problem = tampered("byte", lambda d: edit(d, 5, flip_byte))
    assert problem and "events.jsonl.1:7: does not follow" in problem and "changed" in problem
    problem = tampered("delete", lambda d: edit(d, 5, lambda lines, n: lines.pop(n)))
    assert problem and "events.jsonl.1:6: does not follow" in problem
    problem = tampered("insert", lambda d: edit(d, 5, lambda lines, n: lines.insert(n, lines[n])))
    assert problem and "events.jsonl.1:7: does not follow" in problem
    problem = tampered("insert-unchained", lambda d: edit(d, 5, lambda lines, n: lines.insert(n, b'{"kind":"exec"}')))
    assert problem and "events.jsonl.1:6: a line without the chain's mark" in problem

    def cut_at_line_end(directory):
        path = directory / "events.jsonl"
        write_lines(path, lines_of(path)[:-3])
    problem = tampered("cut", cut_at_line_end)
    assert problem and "records were cut off at the end" in problem

    def cut_mid_line(directory):
        path = directory / "events.jsonl"
        path.write_bytes(path.read_bytes()[:-40])
    problem = tampered("cut-mid", cut_mid_line)
    assert problem and "the last line is cut off" in problem

    def swap(directory):
        one, two = directory / "events.jsonl.1", directory / "events.jsonl.2"
        tmp = directory / "swap"
        one.rename(tmp)
        two.rename(one)
        tmp.rename(two)
    problem = tampered("swap", swap)
    assert problem and ":1: does not follow" in problem and "swapped" in problem
    assert verify(pristine).problem is None  # and the original is whole


def test_audit_verify_command(tmp_path):
    from helpers import ebpfmon

    log = chained_log(tmp_path, 30)
    out = ebpfmon("audit", "verify", str(log.directory))
    assert out.returncode == 0 and "the chain is whole" in out.stdout, out.stdout + out.stderr
    lines = lines_of(log.path)
    lines[3] = lines[3].replace(b"192.0.2.1", b"192.0.2.9")
    write_lines(log.path, lines)
    out = ebpfmon("audit", "verify", str(log.directory))
    assert out.returncode == 1 and "BROKEN" in out.stdout and "events.jsonl:5" in out.stdout


def test_a_world_readable_audit_directory_is_refused(tmp_path):
    import pytest

    from ebpfmon.errors import ConfigError

    (tmp_path / "audit").mkdir(mode=0o755)
    (tmp_path / "audit").chmod(0o755)
    with pytest.raises(ConfigError, match="can be read by anyone .mode 0755.*chmod 700"):
        AuditLog(AuditSettings(), tmp_path)
    (tmp_path / "audit").chmod(0o700)
    AuditLog(AuditSettings(), tmp_path).close()


def test_audit_search_by_agent_kind_time_and_rule(tmp_path):
    from helpers import ebpfmon

    log = AuditLog(AuditSettings(), tmp_path)
    proc = ev.Process(pid=9, tid=9, ppid=1, uid=0, gid=0, comm="ssh")
    tunnel = ev.ExecEvent(time_ns=2_000_000_000_000_000_000, cgroup_id=7, cgroup="/ebpfmon-agents/job-42/shell",
                          proc=proc, filename="/usr/bin/ssh", argv=["ssh", "-N", "-R", "8022:localhost:22", "x@h"])
    other = ev.ExecEvent(time_ns=1_000_000_000_000_000_000, cgroup_id=8, cgroup="/ebpfmon-agents/job-7", proc=proc,
                         filename="/usr/bin/git", argv=["git", "status"])
    for event in [other, *agent_events(5), tunnel]:
        log.write(event)
    log.close()
    directory = str(log.directory)

    def search(*args):
        out = ebpfmon("audit", "search", directory, *args)
        assert out.returncode == 0, out.stderr
        return out

    assert [json.loads(l)["argv"] for l in search("--agent", "*/job-42", "--json").stdout.splitlines()] == [
        tunnel.argv]
    assert len(search("--kind", "connect", "--json").stdout.splitlines()) == 5
    assert "git status" in search("--kind", "exec", "--until", "2002-01-01T00:00").stdout  # other: 2001, the tunnel: 2033
    assert "job-42" not in search("--kind", "exec", "--until", "2002-01-01T00:00").stdout
    found = search("--rule", "Reverse SSH tunnel")
    assert "ssh -N -R 8022:localhost:22" in found.stdout and "git" not in found.stdout
    assert "1 event(s) from 1 file(s)" in found.stderr
    assert len(search("--limit", "2", "--json").stdout.splitlines()) == 2
    out = ebpfmon("audit", "search", directory, "--rule", "No such rule")
    assert out.returncode == 2 and "no rule 'No such rule' is loaded" in out.stderr
