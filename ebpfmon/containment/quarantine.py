"""Quarantine records: every containment, persisted atomically under the state directory.

One record per agent while it is contained: the rule and event that started it,
each action and its result, the connections the agent held, later triggers,
and who released it, when and why. Written before an action is reported done;
on start, reconciled against the kernel (containment.Containment.reconcile).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_CLOSED = 1000  # released and closed records kept; active ones always are
MAX_TRIGGERS = 100  # later verdicts noted on an active record


@dataclass
class ActionResult:
    action: str
    result: str  # applied, dry run, refused: ..., failed: ..., released
    time_ns: int
    detail: str = ""


@dataclass
class Record:
    agent: str  # the agent's cgroup path
    agent_id: int
    rule: str
    priority: str
    opened_ns: int
    event: dict[str, Any] | None = None
    actions: list[ActionResult] = field(default_factory=list)
    connections: list[dict[str, Any]] = field(default_factory=list)
    denied_networks: list[str] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    status: str = "active"  # active, released, closed
    released_ns: int | None = None
    released_by: str | None = None
    release_reason: str | None = None
    container: dict[str, Any] | None = None  # the container the agent is: id, runtime, name, image, labels
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def cut(self) -> bool:
        return any(a.action == "cut_network" and a.result == "applied" for a in self.actions)

    @property
    def frozen(self) -> bool:
        return any(a.action == "freeze" and a.result == "applied" for a in self.actions)

    @property
    def gpu_denied(self) -> bool:
        return any(a.action == "deny_gpu" and a.result == "applied" for a in self.actions)

    def to_dict(self) -> dict[str, Any]:
        """For the file: a shallow copy (asdict's deep copy was most of a write), to be
        encoded at once, under the lock that guards the record."""
        return {**vars(self), "actions": [vars(a) for a in self.actions]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        data = dict(data)
        data["actions"] = [ActionResult(**a) for a in data.get("actions", [])]
        return cls(**data)


class QuarantineStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / "quarantine.json"
        self.lock = threading.RLock()
        self.records: list[Record] = []
        self.writes = 0  # saves since start (each a write and two fsyncs)
        self._closed_text: dict[str, str] = {}  # id -> JSON of a record no longer active: it does not change
        self.load()

    def load(self) -> None:
        """The records in the file; an unreadable one (garbage, another schema) is set aside for a
        human, loudly, and the store starts empty: reconciliation then records again what the
        kernel still has cut."""
        with self.lock:
            try:
                data = json.loads(self.path.read_text())
                self.records = [Record.from_dict(r) for r in data["records"]]
            except FileNotFoundError:
                self.records = []
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                broken = self.path.with_suffix(f".broken-{uuid.uuid4().hex[:6]}")
                try:
                    self.path.rename(broken)
                except OSError:
                    pass
                log.error("quarantine records in %s unreadable (%s: %s): set aside as %s; starting with none "
                          "(agents the kernel still has cut are recorded again)", self.path, type(e).__name__, e,
                          broken.name)
                self.records = []

    def save(self) -> None:
        """Atomically: a temporary file, fsync, rename over, fsync the directory."""
        with self.lock:
            self.writes += 1
            closed = [r for r in self.records if r.status != "active"]
            if len(closed) > MAX_CLOSED:
                drop = {r.id for r in closed[:len(closed) - MAX_CLOSED]}
                self.records = [r for r in self.records if r.id not in drop]
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lines, closed_text = [], {}
            for r in self.records:
                text = self._closed_text.get(r.id) if r.status != "active" else None
                if text is None:
                    text = json.dumps(r.to_dict())  # without indent: the C encoder
                if r.status != "active":
                    closed_text[r.id] = text
                lines.append(text)
            self._closed_text = closed_text
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                f.write('{"records": [\n' + ",\n".join(lines) + "\n]}\n")  # a record a line
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def active(self) -> list[Record]:
        with self.lock:
            return [r for r in self.records if r.status == "active"]

    def active_for(self, agent: str) -> Record | None:
        with self.lock:
            return next((r for r in self.records if r.status == "active" and r.agent == agent), None)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)
