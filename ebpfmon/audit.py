"""The audit log: every agent event and refusal as a JSON line, in rotated files
under the state directory (audit/events.jsonl, .1, .2...): the trail a
responder reads after an incident, replayable with `ebpfmon rules test --events`.

Lines are buffered and written out by flush(), which the daemon calls once
per poll of the ring buffer (at most every drain interval): one write, not
one per event. Rotation counts bytes itself instead of asking the filesystem
each time.
"""

from __future__ import annotations

import os
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.config import AuditSettings


class AuditLog:
    def __init__(self, settings: AuditSettings, state_dir: str | Path):
        self.directory = Path(state_dir) / "audit"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / "events.jsonl"
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.buffer: list[str] = []
        self.file = open(self.path, "a", encoding="utf-8")
        self.size = self.file.tell()

    def write(self, event: ev.Event) -> None:
        self.buffer.append(event.to_json() + "\n")

    def flush(self) -> None:
        if not self.buffer:
            return
        text = "".join(self.buffer)
        self.buffer.clear()
        if self.size and self.size + len(text) > self.max_bytes:
            self.rotate()
        self.file.write(text)
        self.file.flush()
        self.size += len(text)

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
        self.file = open(self.path, "a", encoding="utf-8")
        self.size = 0

    def close(self) -> None:
        self.flush()
        self.file.close()
