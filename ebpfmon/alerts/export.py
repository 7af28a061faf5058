"""Events to the fleet: the audit log's records of the kinds and agents a NATS sink asks for,
published to JetStream on SUBJECT.NODE.event.KIND by that sink's exporter thread.

The audit log is the queue, on disk already: the exporter reads it behind the daemon from a
cursor (the file's inode, the offset, the hash of the last line read) kept in the state
directory and moved on only past what JetStream acknowledged. A server that is down, or a
daemon stopped and started again, loses nothing: reading goes on from the cursor.

A message holds the events of one kind read together (up to EVENTS_PER_MESSAGE), one JSON
object per line: each event as its own line would have it, the ancestry listed (from the
ancestry line the log wrote before it), "prev" left out, the node added. The lines of a chunk
always make the same messages, and a message's Nats-Msg-Id comes from its first and last
line's marks (the hash each carries of the line before it: no two lines carry the same): a chunk
published again (a lost acknowledgement, a restart between the publish and the cursor's save)
is stored once, within the stream's duplicate window; the chunk's end and the messages of it
already acknowledged are in the cursor, so a long outage sends only the rest.

A log rotated past the cursor (the server down for longer than the backups last), or a chain
that does not go on where the cursor was, is a gap: counted and logged, and reading goes on.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ebpfmon.alerts.audit import CHAIN_HEX, MAX_ANCESTRIES_REMEMBERED, audit_files, last_line_hash, line_hash
from ebpfmon.alerts.sinks import NatsSink
from ebpfmon.config import SinkSettings
from ebpfmon.events import EVENT_TYPES
from ebpfmon.host.cgroups import AgentLayout

log = logging.getLogger(__name__)

IN_FLIGHT = 512  # messages published before their acknowledgements are waited for
# events to a message: one per message cost the daemon most of a core at 10k events/s (nats-py's
# work per message; bench/RESULTS-nats-export.md); under the server's default max_payload (1 MiB)
EVENTS_PER_MESSAGE = 256
MESSAGE_BYTES = 768 << 10
READ_BYTES = 1 << 20  # read of the log at a time
POLL_S = 0.25  # how often the log is looked at for lines written since
MAX_BACKOFF_S = 30.0
KIND_START = b'{"kind":"'  # every line starts with its kind
PREV_MARK = b',"prev":"'  # ... and ends with the hash of the line before (audit.chained)
PREV_END = len(PREV_MARK) + CHAIN_HEX + 2  # the mark, the hash, '"}'
ANCESTRY_BY_ID = b',"ancestry":"'  # an event's ancestry named by its id
MAX_AGENTS_REMEMBERED = 65536
MAX_LINE_BYTES = 16 << 20  # the longest line looked back over to check the cursor's place


@dataclass
class Cursor:
    """Where reading goes on: in the file with this inode, at this offset, after the line whose
    hash this is (what the next line must name as its prev). While a chunk of lines is being
    published: where it ends, and the messages of it JetStream acknowledged, so that it is
    published again as the same messages (the same ids), less those."""

    inode: int = 0
    offset: int = 0
    hash: str = ""
    chunk_end: int = 0
    acked: list[str] = field(default_factory=list)


@dataclass
class _Filling:
    """A message being filled: its events' lines, the first and last one's marks, its size."""

    first: bytes
    last: bytes = b""
    events: list[bytes] = field(default_factory=list)
    size: int = 0


class EventExport:
    """One NATS sink's exporter: a thread that reads the audit log from the cursor and publishes."""

    def __init__(self, settings: SinkSettings, node: str, audit_dir: Path, state_dir: str | Path,
                 agents: AgentLayout):
        self.sink = NatsSink(settings, node)
        self.name = self.sink.name
        self.node = node
        self.prefix = f"{settings.subject}.{self.sink.node_token}.event."
        self.kinds = {k.encode() for k in (EVENT_TYPES if "all" in settings.events else settings.events)}
        self.globs = settings.event_agents
        self.layout = agents
        self.directory = Path(audit_dir)
        self.cursor_path = Path(state_dir) / f"export-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}.json"
        self.cursor = self._load_cursor()
        self.placed = False  # whether the cursor's file was found (a saved inode may be another file's now)
        self.ancestries: dict[bytes, bytes] = {}  # id -> the list's JSON
        self.node_field = b',"node":' + orjson.dumps(node) + b"}"
        self.prescanned = False
        self.agent_wanted: dict[str | None, bool] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"export-{self.name}", daemon=True)
        self.formed = None  # the chunk at the cursor, as messages (kept while it is tried again)
        self.exported = 0  # events
        self.too_large = 0
        self.failures = 0
        self.gaps = 0
        self.behind_bytes = 0
        self.failing: str | None = None

    # ---- the cursor ----

    def _load_cursor(self) -> Cursor:
        """The saved cursor; none (a first start): the log's end, so that what comes is what
        happens from now on, not the node's history."""
        try:
            return Cursor(**json.loads(self.cursor_path.read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as e:
            log.error("event export %s: cursor %s unreadable (%s): exporting from the log's end", self.name,
                      self.cursor_path, e)
        files = audit_files(self.directory)
        if not files:
            return Cursor()
        st = os.stat(files[-1])
        return Cursor(st.st_ino, st.st_size, last_line_hash(self.directory))

    def _save_cursor(self) -> None:
        tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(vars(self.cursor)) + "\n")
            os.replace(tmp, self.cursor_path)
        except OSError as e:  # kept in memory; saved with the next batch the disk takes
            log.warning("event export %s: cursor not saved: %s", self.name, e)

    def _place(self, files: list[Path]) -> int:
        """The index of the cursor's file in files, the cursor moved to the oldest file's start
        when its file is no longer there (a gap)."""
        for i, path in enumerate(files):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino == self.cursor.inode:
                if not self.placed and not self._line_ends_at(path, st.st_size):
                    break  # an inode used again by a newer file: the cursor's file went
                self.placed = True
                return i
        if self.cursor.inode:
            self._gap(f"the log was rotated (or cut) past the cursor; going on at {files[0]}")
        self.cursor = Cursor(os.stat(files[0]).st_ino, 0, "")
        self.placed = True
        return 0

    def _line_ends_at(self, path: Path, size: int) -> bool:
        """Whether the cursor's line (by its hash) ends at its offset in path."""
        offset = self.cursor.offset
        if offset == 0 or not self.cursor.hash:
            return offset <= size
        if offset > size:
            return False
        back = 1 << 16
        with open(path, "rb") as f:
            while True:
                start = max(0, offset - back)
                f.seek(start)
                chunk = f.read(offset - start)
                body = chunk[:-1]
                cut = body.rfind(b"\n")
                if cut >= 0 or start == 0:
                    return chunk.endswith(b"\n") and line_hash(body[cut + 1:]) == self.cursor.hash
                if back >= MAX_LINE_BYTES:
                    return False
                back *= 4

    def _gap(self, why: str) -> None:
        self.gaps += 1
        log.error("event export %s: events not exported: %s", self.name, why)

    # ---- the thread ----

    def start(self) -> "EventExport":
        self.thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=self.sink.settings.timeout * 2 + 5)
        if not self.thread.is_alive():
            self.sink.close()
            self._save_cursor()

    def _run(self) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            self.wake.wait(backoff or POLL_S)
            self.wake.clear()
            try:
                self._ship()
            except Exception as e:  # a server that is down, a log that cannot be read: tried again
                self.failures += 1
                if self.failing is None:
                    log.warning("event export %s: %s (tried again, the cursor waits)", self.name, e)
                self.failing = str(e)
                backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2))
            else:
                if self.failing is not None:
                    log.info("event export %s: exporting again", self.name)
                self.failing = None
                backoff = 0.0

    def _ship(self) -> None:
        """Publishes what the log holds past the cursor, file by file, READ_BYTES at a time."""
        while not self.stopping.is_set():
            files = audit_files(self.directory)
            if not files:
                return
            index = self._place(files)
            if not self.prescanned:  # a restart mid-file: the ancestries written before the cursor
                self._read_ancestries(files[index], self.cursor.offset)
                self.prescanned = True
            try:
                with open(files[index], "rb") as f:
                    if os.fstat(f.fileno()).st_ino != self.cursor.inode:
                        continue  # rotated between the listing and the open
                    f.seek(self.cursor.offset)
                    if self.cursor.chunk_end > self.cursor.offset:  # a chunk tried before: the same lines
                        data = f.read(self.cursor.chunk_end - self.cursor.offset)
                    else:
                        data = f.read(READ_BYTES)
                        if data and not data.endswith(b"\n"):
                            data += f.readline()  # the rest of a line cut by the read's size
                    end = f.seek(0, os.SEEK_END)
            except FileNotFoundError:
                continue
            whole = data.rfind(b"\n") + 1  # a line being written is read once it is whole
            self.behind_bytes = end - self.cursor.offset + sum(_size(p) for p in files[index + 1:])
            if whole:
                self._publish(data[:whole])
                continue
            if index + 1 >= len(files):
                return  # caught up
            if self.cursor.offset < end:  # a rotated file ending in a cut line (a crash mid-write)
                self._gap(f"{files[index]} ends in a line cut off")
            self.cursor = Cursor(os.stat(files[index + 1]).st_ino, 0, self.cursor.hash)

    def _publish(self, data: bytes) -> None:
        """A chunk (whole lines from the cursor on): its messages published, save those of it
        acknowledged before; the cursor past it once all are."""
        where = (self.cursor.inode, self.cursor.offset, len(data))
        if self.formed is None or self.formed[0] != where:  # made again only after a restart
            self.formed = (where, *self._messages(data))
        _, messages, last_hash = self.formed
        end = self.cursor.offset + len(data)
        todo = [m for m in messages if m[2] not in self.cursor.acked]
        if todo:
            if self.cursor.chunk_end != end:  # on disk before a message goes: a restart makes the same ones
                self.cursor.chunk_end, self.cursor.acked = end, []
                self._save_cursor()
            for start in range(0, len(todo), IN_FLIGHT):
                part = todo[start:start + IN_FLIGHT]
                failures = self.sink.publish_all([m[:3] for m in part])
                for message, failure in zip(part, failures):
                    if failure is None:
                        self.cursor.acked.append(message[2])
                        self.exported += message[3]
                failure = next((f for f in failures if f is not None), None)
                if failure is not None:
                    self._save_cursor()
                    raise failure
        self.cursor = Cursor(self.cursor.inode, end, last_hash)
        self.formed = None
        self._save_cursor()

    def _messages(self, data: bytes) -> tuple[list[tuple[str, bytes, str, int]], str]:
        """The chunk's messages, (subject, payload, id, events in it), and its last line's hash:
        the wanted events of each kind, in order, EVENTS_PER_MESSAGE or MESSAGE_BYTES at most
        to a message, one JSON object per line. The same lines make the same messages."""
        messages: list[tuple[str, bytes, str, int]] = []
        filling: dict[bytes, _Filling] = {}  # by kind

        def close(kind: bytes) -> None:
            m = filling.pop(kind)
            messages.append((self.prefix + kind.decode(), b"\n".join(m.events) + b"\n",
                             line_hash(m.first + m.last), len(m.events)))

        lines = data.split(b"\n")[:-1]
        if self.cursor.hash and self._named(lines[0]) != self.cursor.hash.encode():
            self._gap(f"{self.directory}: the chain does not go on from the cursor (lines lost or changed "
                      "before they were exported; ebpfmon audit verify says where)")
        for line in lines:
            # a line's mark (the hash of the one before) stands for it: the line after a line is one
            mark = self._named(line) or line_hash(line).encode()
            kind = line[len(KIND_START):line.find(b'"', len(KIND_START))] if line.startswith(KIND_START) else b""
            if kind == b"ancestry":
                self._remember_ancestry(line)
                continue
            event = self._event(line) if kind in self.kinds else None
            if event is None:
                continue
            if len(event) > MESSAGE_BYTES:
                self.too_large += 1
                log.error("event export %s: an event of %d bytes not exported (more than a message takes): %s",
                          self.name, len(event), event[:200])
                continue
            if kind in filling and filling[kind].size + len(event) > MESSAGE_BYTES:
                close(kind)
            m = filling.setdefault(kind, _Filling(first=mark))
            m.events.append(event)
            m.last, m.size = mark, m.size + len(event) + 1
            if len(m.events) >= EVENTS_PER_MESSAGE:
                close(kind)
        for kind in list(filling):
            close(kind)
        return messages, line_hash(lines[-1])

    @staticmethod
    def _named(line: bytes) -> bytes | None:
        """The hash of the line before, as this line names it (None: a line of no chain)."""
        tail = line[-PREV_END:]
        return tail[len(PREV_MARK):-2] if tail.startswith(PREV_MARK) else None

    def _event(self, line: bytes) -> bytes | None:
        """The message line of an event wanted (None: another agent's, or not a record): spliced
        from the audit line's bytes (the ancestry's list for its id, the node for prev), not
        parsed and written again, unless its agent must be known."""
        if self.globs:
            try:
                cgroup = orjson.loads(line).get("cgroup")
            except orjson.JSONDecodeError:
                return None  # not a record: audit verify names it
            if not self._agent_wanted(cgroup):
                return None
        body = line[:-PREV_END] if line[-PREV_END:].startswith(PREV_MARK) else line[:-1]
        # the first '"ancestry":"' is the key: a string's own quotes are escaped
        start = body.find(ANCESTRY_BY_ID)
        if start >= 0:
            id_start = start + len(ANCESTRY_BY_ID)
            id_end = body.find(b'"', id_start)
            listed = self.ancestries.get(body[id_start:id_end])
            if listed is not None:
                body = body[:id_start - 1] + listed + body[id_end + 1:]
        return body + self.node_field

    def _agent_wanted(self, cgroup: str | None) -> bool:
        wanted = self.agent_wanted.get(cgroup)
        if wanted is None:
            if len(self.agent_wanted) >= MAX_AGENTS_REMEMBERED:
                self.agent_wanted.clear()
            agent = self.layout.agent_of(cgroup) or cgroup or ""
            wanted = self.agent_wanted[cgroup] = any(fnmatch.fnmatchcase(agent, g) for g in self.globs)
        return wanted

    def _remember_ancestry(self, line: bytes) -> None:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if len(self.ancestries) >= MAX_ANCESTRIES_REMEMBERED:
            self.ancestries.clear()
        self.ancestries[str(record.get("id")).encode()] = orjson.dumps(record.get("ancestry"))

    def _read_ancestries(self, path: Path, until: int) -> None:
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                offset += len(line)
                if offset > until:
                    break
                if line.startswith(KIND_START + b'ancestry"'):
                    self._remember_ancestry(line.rstrip(b"\n"))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
