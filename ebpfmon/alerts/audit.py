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

The log is a hash chain, so nobody can quietly rewrite it: each line ends with "prev", the
first CHAIN_HEX hex digits of the SHA-256 of the line before it (across files: a new file's
first line names the last line of the file before), and audit/chain-head holds the last
line's. `ebpfmon audit verify` walks the chain and names the first line that was changed,
removed, inserted or cut off; the daemon also logs the head once a minute (the journal), so a
log rewritten whole with its head still disagrees with what was logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.config import AuditSettings
from ebpfmon.errors import ConfigError

MAX_ANCESTRIES_REMEMBERED = 65536
# what waits in memory while the disk refuses writes (full, read-only); beyond it, lines are
# dropped and counted
MAX_PENDING_BYTES = 64 << 20
# distinct connects whose line is kept; all are forgotten when there are more (bounded memory)
MAX_CONNECT_LINES = 4096
TIME_PREFIX = b'{"kind":"connect","time_ns":'  # every connect's line starts so (kind, then time)
CHAIN_HEX = 32  # hex digits of a line's SHA-256 the next line carries: 128 bits
HEAD_NAME = "chain-head"
HEAD_INTERVAL_S = 1.0
NEWLINE = b"\n"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:CHAIN_HEX]


def chained(line: bytes, prev: str) -> bytes:
    """A JSON object's line with "prev" added as its last field."""
    return line[:-1] + b',"prev":"' + prev.encode() + b'"}'


def audit_files(directory: Path) -> list[Path]:
    """The audit log, oldest file first (events.jsonl.N ... events.jsonl.1, events.jsonl)."""
    rotated = sorted((p for p in directory.glob("events.jsonl.*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    current = directory / "events.jsonl"
    return rotated + ([current] if current.exists() else [])


class ConnectLines:
    """Audit lines of connects, by everything in them but the time. A key holds every field
    of the event and of its process but time_ns (tests/test_audit.py changes each field of the
    dataclasses in turn: a field missing here fails it)."""

    def __init__(self) -> None:
        self.lines: dict[tuple, bytes] = {}  # key -> the line after its time

    def line(self, e: ev.ConnectEvent) -> bytes:
        p = e.proc
        key = (e.cgroup_id, e.cgroup, e.ancestry.id, e.container, e.family, e.address, e.port, e.sock_type, e.protocol,
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


def read_events(files: list[Path], bad: list[str]):
    """The events of audit files, in order; what does not read as an event goes to bad."""
    for path in files:
        for _, item in ev.read_jsonl(path):
            if isinstance(item, Exception):
                bad.append(str(item))
            else:
                yield item


def last_line_hash(directory: Path) -> str:
    """The hash of the last line the log holds (where a restarted daemon's chain goes on), or
    the empty chain's start."""
    for path in reversed(audit_files(directory)):
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(0, end - (1 << 20)))
                lines = f.read().rstrip(b"\n").rsplit(b"\n", 1)
        except OSError:
            continue
        if lines and lines[-1]:
            return line_hash(lines[-1])
    return ""


class AuditLog:
    def __init__(self, settings: AuditSettings, state_dir: str | Path):
        self.directory = Path(state_dir) / "audit"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o007:  # what agents did is for root: command lines hold secrets too
            raise ConfigError(f"the audit directory {self.directory} can be read by anyone (mode {mode:04o}).",
                              f"Make it root's alone: chmod 700 {self.directory}")
        self.path = self.directory / "events.jsonl"
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.buffer: list[tuple[str, object, bytes]] = []  # (ancestry id, its JSON, event line)
        self._open()
        self.ancestries_written: set[str] = set()  # ids with a line in the current file
        self.connect_lines = ConnectLines()
        self.pending = bytearray()  # lines not on disk yet
        self.prev = last_line_hash(self.directory)  # the chain goes on from the last line written
        self.lines_chained = 0
        self.head_written = float("-inf")
        self.head_on_disk: dict | None = None  # the head as this writer last wrote it
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
                text, prev, count = self._text()
                if self.size and self.size + len(self.pending) + len(text) > self.max_bytes:
                    self._write_pending()  # what waits belongs to the file being closed
                    self.rotate()
                    text, prev, count = self._text()  # the new file gets its own ancestry lines
            except OSError as e:
                self._failed(e)
            self.buffer.clear()
            self.pending += text
            self.prev = prev  # the chain moves on with the text that is kept
            self.lines_chained += count
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
            if time.monotonic() - self.head_written >= HEAD_INTERVAL_S:
                self.write_head()

    def write_head(self) -> None:
        """audit/chain-head: the last line's hash, for verify to find a log cut at a line's end
        (at most once a second, and at close: a cut within the last second is found by the head
        the journal has)."""
        self.head_written = time.monotonic()
        head = {"file": self.path.name, "size": self.size, "hash": self.prev}
        if head == self.head_on_disk:
            return  # an idle daemon writes nothing: a file and a rename each second otherwise
        try:
            tmp = self.directory / (HEAD_NAME + ".tmp")
            tmp.write_text(json.dumps(head) + "\n")
            os.replace(tmp, self.directory / HEAD_NAME)
        except OSError:
            return  # the disk refuses: the head is written with the next flush that it takes
        self.head_on_disk = head

    def _write_pending(self) -> None:
        if self.file.closed:  # a rotation that failed half way
            self._open()
        while self.pending:
            written = self.file.write(self.pending)
            del self.pending[:written]
            self.size += written

    def _failed(self, error: OSError) -> None:
        self.write_failures += 1
        self.failing = f"{self.path}: {error.strerror or error}"

    def _open(self) -> None:
        # unbuffered: after a failed write, what the disk did not take is known (pending)
        self.file = open(self.path, "ab", buffering=0)
        self.size = self.file.tell()

    def _text(self) -> tuple[bytes, str, int]:
        """The buffer's lines, chained on from self.prev: the text, the last line's hash, how many."""
        if len(self.ancestries_written) > MAX_ANCESTRIES_REMEMBERED:
            self.ancestries_written.clear()  # written again when named again: bounded memory
        lines = []
        prev = self.prev
        for ancestry_id, fragment, line in self.buffer:
            if ancestry_id not in self.ancestries_written:
                self.ancestries_written.add(ancestry_id)
                lines.append(chained(ev.ancestry_line(ancestry_id, fragment), prev))
                prev = line_hash(lines[-1])
            lines.append(chained(line, prev))
            prev = line_hash(lines[-1])
        count = len(lines)
        lines.append(b"")
        return b"\n".join(lines), prev, count

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
        self._open()
        self.ancestries_written.clear()

    def close(self) -> None:
        self.flush()
        if not self.failing:
            self.write_head()
        self.file.close()


@dataclass
class Verdict:
    """What `ebpfmon audit verify` found: the chain whole (problem None), or its first break."""

    records: int = 0
    files: int = 0
    unchained: int = 0  # lines written before the log was a chain (an older ebpfmon)
    problem: str | None = None


def verify(directory: Path) -> Verdict:
    """Walks the chain from the oldest file to the newest and then to the head; the first line
    that was changed, removed, inserted or cut off is the problem."""
    found = Verdict()
    files = audit_files(directory)
    found.files = len(files)
    expected: str | None = None  # the hash the next line must carry; None before the first chained line
    last_place = None
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            found.problem = f"{path}:{data.count(NEWLINE) + 1}: the last line is cut off (not a whole record)"
            return found
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                prev = record.get("prev") if isinstance(record, dict) else None
            except ValueError:
                found.problem = f"{where}: not a record: changed"
                return found
            if prev is None:
                if expected is not None:
                    found.problem = f"{where}: a line without the chain's mark: inserted, or changed"
                    return found
                found.unchained += 1
                continue
            if expected is not None and prev != expected:
                at_start = number == 1 and last_place is not None
                found.problem = (f"{where}: does not follow {last_place}: " +
                                 ("the files were swapped, or records at the end of the one before or the start "
                                  "of this one were removed" if at_start else
                                  "the line before it was changed, or lines were removed or inserted between them"))
                return found
            expected = line_hash(line)
            last_place = where
            found.records += 1
    try:
        head = json.loads((directory / HEAD_NAME).read_text())
    except (OSError, ValueError):
        head = None
    if head and expected is not None and head.get("hash") != expected:
        found.problem = (f"the log ends at {last_place}, but the last record written was another "
                         f"({HEAD_NAME}: {head.get('hash')}): records were cut off at the end, or the last one changed")
    return found
