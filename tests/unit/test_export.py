"""Event export to NATS, from a real audit log to a real nats-server with JetStream on
loopback: the kinds and agents asked for arrive on their subjects, whole (ancestry listed);
the server stopped meanwhile, or the exporter (the daemon) stopped and started again: nothing
lost, nothing stored twice; a log rotated behind the exporter is read across its files, and
one rotated past it is a gap that is counted."""

from __future__ import annotations

import json

import pytest

from helpers import free_port, wait_for
from servers.nats import NatsServer

from ebpfmon.alerts.audit import AuditLog
from ebpfmon.alerts.export import EventExport
from ebpfmon.config import AuditSettings, SinkSettings
from ebpfmon.host.cgroups import AgentLayout
from ebpfmon.rules.cases import make_event

LAYOUT = AgentLayout("/ebpfmon-agents", 1)


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path / "nats", free_port()).start()
    yield s
    s.stop()


def export(tmp_path, url: str, events=("exec",), agents=(), audit: AuditLog | None = None) -> EventExport:
    settings = SinkSettings(type="nats", url=url, timeout=3, events=tuple(events), event_agents=tuple(agents))
    return EventExport(settings, "gpu-node-7.example", tmp_path / "state" / "audit", tmp_path / "state", LAYOUT)


def audit_log(tmp_path, max_bytes: int = 100 << 20, backups: int = 5) -> AuditLog:
    return AuditLog(AuditSettings(max_bytes=max_bytes, backups=backups), tmp_path / "state")


def write(audit: AuditLog, n: int, first: int = 0, agent: str = "a1", kind: str = "exec") -> None:
    for i in range(first, first + n):
        spec = {"argv": ["make", f"-j{i}"]} if kind == "exec" else {"address": "192.0.2.7", "port": 1000 + i}
        audit.write(make_event({kind: {**spec, "cgroup": f"/ebpfmon-agents/{agent}/job", "pid": 5000 + i}}, i))
        if i % 10 == 9:
            audit.flush()  # as the daemon does once per poll of the ring buffer: rotations happen here
    audit.flush()


def caught_up(e: EventExport) -> bool:
    """The cursor at the end of the newest file, past every chunk."""
    newest = e.directory / "events.jsonl"
    return (e.cursor.inode, e.cursor.offset, e.cursor.chunk_end) == (newest.stat().st_ino, newest.stat().st_size, 0)


def jobs(stored) -> list[int]:
    return sorted(p["proc"]["pid"] - 5000 for _, _, p in stored)


def test_the_kinds_and_agents_asked_for_arrive_whole_on_their_subjects(tmp_path, server):
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url, events=("exec",), agents=("/ebpfmon-agents/a*",)).start()
    try:
        write(audit, 3, agent="a1")
        write(audit, 2, first=3, agent="b1")  # another agent: not asked for
        write(audit, 2, first=5, agent="a2", kind="connect")  # another kind: not asked for
        write(audit, 1, first=7, agent="a2")
        stored = server.stored(count=4)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
        audit.close()
    assert jobs(stored) == [0, 1, 2, 7]
    subject, headers, event = stored[0]
    assert subject == "ebpfmon.gpu-node-7_example.event.exec"
    assert event["argv"] == ["make", "-j0"] and event["cgroup"] == "/ebpfmon-agents/a1/job"
    assert event["ancestry"] == [{"pid": 999, "comm": "bash", "exe": "/usr/bin/bash", "argv": ["bash"]}]
    assert event["node"] == "gpu-node-7.example" and "prev" not in event
    assert len(headers["Nats-Msg-Id"]) == 32 and e.exported == 4 and e.gaps == 0 and e.behind_bytes == 0


def test_all_kinds_of_every_agent(tmp_path, server):
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url, events=("all",)).start()
    try:
        write(audit, 2, agent="a1")
        write(audit, 2, first=2, agent="b1", kind="connect")
        stored = server.stored(count=4)
    finally:
        e.close()
        audit.close()
    assert sorted(s.rsplit(".", 1)[1] for s, _, _ in stored) == ["connect", "connect", "exec", "exec"]


def test_a_server_down_meanwhile_loses_nothing_and_stores_nothing_twice(tmp_path, server):
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url).start()
    try:
        write(audit, 5)
        assert len(server.stored(count=5)) == 5
        server.stop()
        write(audit, 200, first=5)
        wait_for(lambda: e.failures > 0, "a failed round")
        server.start()
        stored = server.stored(count=205, timeout=60)
        wait_for(lambda: caught_up(e) and e.failing is None, "the exporter past every line", 60)
    finally:
        e.close()
        audit.close()
    assert jobs(server.stored()) == list(range(205))


def test_a_restart_goes_on_from_the_cursor(tmp_path, server):
    """The daemon stopped (the exporter with it) while agents went on (the audit log taking
    their events: another run's log), started again: what was written meanwhile goes out,
    what went out before does not go again."""
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url).start()
    write(audit, 10)
    server.stored(count=10)
    wait_for(lambda: caught_up(e), "the exporter past every line")
    e.close()
    write(audit, 10, first=10)
    audit.close()
    audit = audit_log(tmp_path)  # a new daemon's log, going on from the file's end
    e = export(tmp_path, server.url).start()
    try:
        write(audit, 10, first=20)
        server.stored(count=30)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
        audit.close()
    stored = server.stored()
    assert jobs(stored) == list(range(30)) and e.exported == 20  # none published again
    # the events of the second log name ancestries written before the restart's cursor
    assert all(isinstance(p["ancestry"], list) for _, _, p in stored)


def test_a_first_start_exports_from_now_on_not_the_history(tmp_path, server):
    audit = audit_log(tmp_path)
    write(audit, 5)
    e = export(tmp_path, server.url).start()
    try:
        write(audit, 2, first=5)
        server.stored(count=2)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
        audit.close()
    assert jobs(server.stored()) == [5, 6] and e.exported == 2


def test_rotations_behind_the_exporter_are_read_across_files(tmp_path, server):
    audit = audit_log(tmp_path, max_bytes=20_000, backups=50)
    e = export(tmp_path, server.url)  # its cursor at the start, its thread not yet
    write(audit, 400)  # many files by now
    assert len(list((tmp_path / "state" / "audit").glob("events.jsonl.*"))) > 3
    e.start()
    try:
        stored = server.stored(count=400, timeout=60)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
        audit.close()
    assert jobs(stored) == list(range(400)) and e.gaps == 0


def test_a_log_rotated_past_the_cursor_is_a_counted_gap(tmp_path, server):
    audit = audit_log(tmp_path, max_bytes=20_000, backups=1)
    write(audit, 1)
    e = export(tmp_path, server.url)  # its cursor at the end of the first file
    write(audit, 400, first=1)  # that file went with the oldest backup
    e.start()
    try:
        wait_for(lambda: e.gaps >= 1, "the gap counted")
        wait_for(lambda: caught_up(e), "the exporter past every line")
        stored = server.stored()
    finally:
        e.close()
        audit.close()
    got = jobs(stored)
    assert got and got == list(range(401 - len(got), 401))  # what the backups held, in order, to the end


def test_a_chunk_published_again_after_a_restart_is_stored_once(tmp_path, server):
    """A restart between the publish and the cursor's save (a crash): the cursor still names the
    chunk, which makes the same messages again, and JetStream keeps one of each."""
    audit = audit_log(tmp_path)
    write(audit, 1)
    e = export(tmp_path, server.url)
    before = e.cursor
    write(audit, 600, first=1)  # one chunk: three messages (256, 256, 88 events)
    e.start()
    try:
        stored = server.stored(count=600)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
    assert len({h["Nats-Msg-Id"] for _, h, _ in stored}) == 3
    e.cursor_path.write_text(json.dumps({**vars(before), "chunk_end": e.cursor.offset, "acked": []}))
    again = export(tmp_path, server.url).start()
    try:
        wait_for(lambda: again.exported == 600, "the chunk published again")
    finally:
        again.close()
        audit.close()
    assert jobs(server.stored()) == list(range(1, 601))


def test_an_event_larger_than_a_message_is_counted_not_a_stop(tmp_path, server):
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url).start()
    try:
        audit.write(make_event({"exec": {"argv": ["x", "y" * (1 << 20)], "cgroup": "/ebpfmon-agents/a1",
                                         "pid": 4999}}, 0))
        write(audit, 2)
        stored = server.stored(count=2)
        wait_for(lambda: caught_up(e), "the exporter past every line")
    finally:
        e.close()
        audit.close()
    assert jobs(stored) == [0, 1] and e.too_large == 1


def test_agent_text_that_looks_like_the_fields_spliced_comes_through_as_written(tmp_path, server):
    argv = ["echo", 'x","ancestry":"0123","prev":"', "\u00fc\u202e", "}"]
    audit = audit_log(tmp_path)
    e = export(tmp_path, server.url).start()
    try:
        audit.write(make_event({"exec": {"argv": argv, "cgroup": "/ebpfmon-agents/a1", "pid": 5000}}, 0))
        audit.flush()
        [(_, _, event)] = server.stored(count=1)
    finally:
        e.close()
        audit.close()
    assert event["argv"] == argv and event["ancestry"][0]["comm"] == "bash" and event["node"] == "gpu-node-7.example"
