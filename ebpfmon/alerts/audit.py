"""The audit log: every agent event and refusal as a JSON line, in rotated files
under the state directory (audit/events.jsonl, .1, .2...): the trail a
responder reads after an incident, replayable with `ebpfmon rules test --events`.

Lines are buffered and written out by flush(), which the daemon calls once
per poll of the ring buffer (at most every drain interval): one write, not
one per event. Rotation counts bytes itself instead of asking the filesystem
each time.

An event names its ancestry by id ("ancestry": "<id>"); the list itself is in
an ancestry line written once per file, before the first event that names it
(so each file reads alone). Ancestor command lines were most of each line:
writing them once keeps more history in the same files, and costs less per
event.

A connect's line is made by orjson once per distinct connect; the next ones
that differ only in their time reuse it with the time put in (ConnectLines).
An agent's connects repeat (a retry loop, a connection pool, a flood), and
making each line is a large part of the daemon's work per connect.
"""

from __future__ import annotations

import os
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.config import AuditSettings

MAX_ANCESTRIES_REMEMBERED = 65536
# what waits in memory while the disk refuses writes (full, read-only); beyond it, lines are
# dropped and counted
MAX_PENDING_BYTES = 64 << 20
# distinct connects whose line is kept; all are forgotten when there are more (bounded memory)
MAX_CONNECT_LINES = 4096
TIME_PREFIX = b'{"kind":"connect","time_ns":'  # every connect's line starts so (kind, then time)


class ConnectLines:
    """Audit lines of connects, by everything in them but the time. A key holds every field
    of the event and of its process but time_ns (tests/test_audit.py changes each field of the
    dataclasses in turn: a field missing here fails it)."""

    def __init__(self) -> None:
        self.lines: dict[tuple, bytes] = {}  # key -> the line after its time

    def line(self, e: ev.ConnectEvent) -> bytes:
        p = e.proc
        key = (e.cgroup_id, e.cgroup, e.ancestry.id, e.family, e.address, e.port, e.sock_type, e.protocol,
               e.retval, e.fd, e.source, p.pid, p.tid, p.ppid, p.uid, p.gid, p.comm, p.exe,
               None if p.argv is None else tuple(p.argv))
        after = self.lines.get(key)
        if after is not None:
            return TIME_PREFIX + b"%d" % e.time_ns + after
        line = e.json_bytes(ancestry_by_id=True)
        time_text = b"%d" % e.time_ns
        if line.startswith(TIME_PREFIX + time_text + b","):  # where the time is, checked, not assumed
            if len(self.lines) >= MAX_CONNECT_LINES:
                self.lines.clear()
            self.lines[key] = line[len(TIME_PREFIX) + len(time_text):]
        return line


class AuditLog:
    def __init__(self, settings: AuditSettings, state_dir: str | Path):
        self.directory = Path(state_dir) / "audit"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / "events.jsonl"
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.buffer: list[tuple[str, object, bytes]] = []  # (ancestry id, its JSON, event line)
        # unbuffered: after a failed write, what the disk did not take is known (pending)
        self.file = open(self.path, "ab", buffering=0)
        self.size = self.file.tell()
        self.ancestries_written: set[str] = set()  # ids with a line in the current file
        self.connect_lines = ConnectLines()
        self.pending = bytearray()  # lines not on disk yet
        self.failing: str | None = None  # why the last write failed; None while writes succeed
        self.write_failures = 0
        self.lines_dropped = 0

    def write(self, event: ev.Event) -> None:
        if type(event) is ev.ConnectEvent and type(event.ancestry) is ev.Ancestry:
            line = self.connect_lines.line(event)
        else:
            line = event.json_bytes(ancestry_by_id=True)
        ancestry = event.ancestry  # an Ancestry now
        self.buffer.append((ancestry.id, ancestry.json, line))

    def flush(self) -> None:
        """Writes the buffered lines. A disk that refuses (full, read-only) fails no caller: the
        lines wait in memory (up to MAX_PENDING_BYTES, then they are dropped and counted) and go
        out with a later flush once it takes them again."""
        if self.buffer:
            try:
                text = self._text()
                if self.size and self.size + len(self.pending) + len(text) > self.max_bytes:
                    self._write_pending()  # what waits belongs to the file being closed
                    self.rotate()
                    text = self._text()  # the new file gets its own ancestry lines
            except OSError as e:
                self._failed(e)
            self.buffer.clear()
            self.pending += text
        try:
            self._write_pending()
        except OSError as e:
            self._failed(e)
            if len(self.pending) > MAX_PENDING_BYTES:
                self.lines_dropped += self.pending.count(b"\n")
                self.pending.clear()
                self.ancestries_written.clear()  # their lines may have been among those dropped
        else:
            self.failing = None

    def _write_pending(self) -> None:
        if self.file.closed:  # a rotation that failed half way
            self.file = open(self.path, "ab", buffering=0)
            self.size = self.file.tell()
        while self.pending:
            written = self.file.write(self.pending)
            del self.pending[:written]
            self.size += written

    def _failed(self, error: OSError) -> None:
        self.write_failures += 1
        self.failing = f"{self.path}: {error.strerror or error}"

    def _text(self) -> bytes:
        if len(self.ancestries_written) > MAX_ANCESTRIES_REMEMBERED:
            self.ancestries_written.clear()  # written again when named again: bounded memory
        lines = []
        for ancestry_id, fragment, line in self.buffer:
            if ancestry_id not in self.ancestries_written:
                self.ancestries_written.add(ancestry_id)
                lines.append(ev.ancestry_line(ancestry_id, fragment))
            lines.append(line)
        lines.append(b"")
        return b"\n".join(lines)

    def rotate(self) -> None:
        """events.jsonl -> .1 -> .2 ... up to backups; the oldest goes."""
        self.file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self.file = open(self.path, "ab", buffering=0)
        self.size = 0
        self.ancestries_written.clear()

    def close(self) -> None:
        self.flush()
        self.file.close()
