"""The audit log: every agent event and refusal as a JSON line, in rotated files
under the state directory (audit/events.jsonl, .1, .2...): the trail a
responder reads after an incident, replayable with `ebpfmon rules test --events`.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.config import AuditSettings


class AuditLog:
    def __init__(self, settings: AuditSettings, state_dir: str | Path):
        directory = Path(state_dir) / "audit"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "events.jsonl"
        # the standard library's rotation: size-bounded, a fixed number of old files
        self.handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=settings.max_bytes,
                                                            backupCount=settings.backups)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, event: ev.Event) -> None:
        self.handler.emit(logging.makeLogRecord({"msg": event.to_json(), "levelno": logging.INFO,
                                                 "levelname": "INFO"}))

    def close(self) -> None:
        self.handler.close()
