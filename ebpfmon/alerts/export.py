"""Events to the fleet: the audit log's records of the kinds and agents a NATS sink asks for,
published to JetStream on SUBJECT.NODE.event.KIND by that sink's exporter thread.

The audit log is the queue, on disk already: the exporter reads it behind the daemon from a
cursor (the file's inode, the offset, the hash of the last line read) kept in the state
directory and moved on only past what JetStream acknowledged. A server that is down, or a
daemon stopped and started again, loses nothing: reading goes on from the cursor. A message's
Nats-Msg-Id is its line's hash (each line carries the hash of the one before, so no two are
alike): what is published again after a lost acknowledgement is stored once (within the
stream's duplicate window). A log rotated past the cursor (the server down for longer than
the backups last), or a chain that does not go on where the cursor was, is a gap: counted
and logged, and reading goes on.

Each message is the event as its own line would have it: the ancestry listed (from the
ancestry line the log wrote before it), "prev" left out, and the node.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import orjson

from ebpfmon.alerts.audit import CHAIN_HEX, MAX_ANCESTRIES_REMEMBERED, audit_files, last_line_hash, line_hash
from ebpfmon.alerts.sinks import NatsSink
from ebpfmon.config import SinkSettings
from ebpfmon.events import EVENT_TYPES
from ebpfmon.host.cgroups import AgentLayout

log = logging.getLogger(__name__)

IN_FLIGHT = 512  # messages published before their acknowledgements are waited for
READ_BYTES = 1 << 20  # read of the log at a time
POLL_S = 0.25  # how often the log is looked at for lines written since
MAX_BACKOFF_S = 30.0
KIND_START = b'{"kind":"'  # every line starts with its kind
PREV_MARK = b',"prev":"'  # ... and ends with the hash of the line before (audit.chained)
PREV_END = len(PREV_MARK) + CHAIN_HEX + 2  # the mark, the hash, '"}'
MAX_AGENTS_REMEMBERED = 65536
MAX_LINE_BYTES = 16 << 20  # the longest line looked back over to check the cursor's place


@dataclass
class Cursor:
    """Where reading goes on: in the file with this inode, at this offset, after the line whose
    hash this is (what the next line must name as its prev)."""

    inode: int = 0
    offset: int = 0
    hash: str = ""


class EventExport:
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
        self.ancestries: dict[str, list] = {}
        self.prescanned = False
        self.agent_wanted: dict[str | None, bool] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"export-{self.name}", daemon=True)
        self.exported = 0
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
        """The lines of data (whole lines from the cursor on): the wanted ones published; the
        cursor moved past the last line before the first that was not acknowledged."""
        positions: list[tuple[int, str]] = []  # (offset after the line, its hash), for each line
        messages: list[tuple[int, tuple[str, bytes, str]]] = []  # (its line's index, message)
        offset = self.cursor.offset
        prev = self.cursor.hash
        for line in data.split(b"\n")[:-1]:
            offset += len(line) + 1
            tail = line[-PREV_END:]
            if prev and (not tail.startswith(PREV_MARK) or tail[len(PREV_MARK):-2] != prev.encode()):
                self._gap(f"{self.directory}: the chain does not go on from the cursor (lines lost or changed "
                          "before they were exported; ebpfmon audit verify says where)")
            prev = line_hash(line)
            positions.append((offset, prev))
            kind = line[len(KIND_START):line.find(b'"', len(KIND_START))] if line.startswith(KIND_START) else b""
            if kind == b"ancestry":
                self._remember_ancestry(line)
            elif kind in self.kinds:
                message = self._message(line, kind, prev)
                if message is not None:
                    messages.append((len(positions) - 1, message))
        acked_through = len(positions) - 1
        for start in range(0, len(messages), IN_FLIGHT):
            chunk = messages[start:start + IN_FLIGHT]
            failures = self.sink.publish_all([m for _, m in chunk])
            failed = next((i for i, f in enumerate(failures) if f is not None), None)
            if failed is not None:
                self.exported += failed
                self._advance(positions, chunk[failed][0] - 1)
                raise failures[failed]
            self.exported += len(chunk)
        self._advance(positions, acked_through)

    def _advance(self, positions: list[tuple[int, str]], through: int) -> None:
        if through >= 0:
            self.cursor = Cursor(self.cursor.inode, *positions[through])
            self._save_cursor()

    def _message(self, line: bytes, kind: bytes, line_id: str) -> tuple[str, bytes, str] | None:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None  # not a record: audit verify names it
        if self.globs and not self._agent_wanted(event.get("cgroup")):
            return None
        event.pop("prev", None)
        if isinstance(event.get("ancestry"), str):
            event["ancestry"] = self.ancestries.get(event["ancestry"], event["ancestry"])
        event["node"] = self.node
        return self.prefix + kind.decode(), orjson.dumps(event), line_id

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
        self.ancestries[record.get("id")] = record.get("ancestry")

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
