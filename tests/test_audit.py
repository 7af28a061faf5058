"""The audit log: every event comes back from it exactly, ancestries written once per file,
each rotated file readable alone."""

import json

from ebpfmon import events as ev
from ebpfmon.audit import AuditLog
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
