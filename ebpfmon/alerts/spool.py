"""The alert spool: every alert is on disk before any delivery is tried.

SQLite (the standard library's, transactional and crash-safe) holds each
alert once and, per sink, whether it was delivered. Sinks take their pending
alerts in order; a sink that is down keeps its backlog across restarts. The
spool is bounded: past max_alerts the oldest undelivered ones are dropped,
counted, and logged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ns INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id INTEGER NOT NULL REFERENCES alerts(id),
    sink TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending, done, dropped
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_ns INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (alert_id, sink)
);
CREATE INDEX IF NOT EXISTS pending ON deliveries (sink, state, alert_id);
CREATE TABLE IF NOT EXISTS incidents (
    key TEXT PRIMARY KEY,          -- the pager's dedup key: stable across restarts
    rule TEXT NOT NULL,
    priority TEXT NOT NULL,
    agent TEXT,
    opened_ns INTEGER NOT NULL,
    last_sent_ns INTEGER NOT NULL,
    count INTEGER NOT NULL,        -- verdicts counted on it
    sent_count INTEGER NOT NULL,   -- the count the pager last heard
    last_alert TEXT NOT NULL,      -- the latest trigger payload, for updates
    sinks TEXT NOT NULL            -- the remote sinks its alerts go to (JSON list), for the resolve
);
"""
# what the spool reads of each table: a file whose tables lack them is not ours
SCHEMA_COLUMNS = {"alerts": "id, created_ns, payload",
                  "deliveries": "alert_id, sink, state, attempts, next_try_ns, last_error",
                  "incidents": "key, rule, priority, agent, opened_ns, last_sent_ns, count, sent_count, last_alert, sinks"}


class Spool:
    def __init__(self, path: str | Path, max_alerts: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_alerts = max_alerts
        self.lock = threading.Lock()
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:  # not a database, or one of another schema
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                part = self.path.with_name(self.path.name + suffix)
                if part.exists():
                    part.rename(part.with_name(f"{self.path.name}.broken-{stamp}{suffix}"))
            log.error("alert spool %s unreadable (%s): set aside as %s.broken-%s; starting an empty one "
                      "(the alerts it held were not delivered: read them there)", self.path, e, self.path.name,
                      stamp)
            self.db = self._open()
        self.dropped = 0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            for table, columns in SCHEMA_COLUMNS.items():  # the tables are ours, and readable
                db.execute(f"SELECT {columns} FROM {table} LIMIT 1").fetchall()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def put(self, payload: dict[str, Any], sinks: list[str], now_ns: int) -> int:
        """Stores an alert for the given sinks; its id. Committed before it returns."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute("INSERT INTO alerts (created_ns, payload) VALUES (?, ?)",
                                      (now_ns, json.dumps(payload)))
                alert_id = cur.lastrowid
                self.db.executemany("INSERT INTO deliveries (alert_id, sink) VALUES (?, ?)",
                                    [(alert_id, s) for s in sinks])
                self._trim()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return alert_id

    def _trim(self) -> None:
        pending = self.db.execute("SELECT COUNT(DISTINCT alert_id) FROM deliveries WHERE state = 'pending'"
                                  ).fetchone()[0]
        excess = pending - self.max_alerts
        if excess > 0:
            oldest = [r[0] for r in self.db.execute(
                "SELECT DISTINCT alert_id FROM deliveries WHERE state = 'pending' ORDER BY alert_id LIMIT ?",
                (excess,))]
            self.db.executemany("UPDATE deliveries SET state = 'dropped' WHERE alert_id = ? AND state = 'pending'",
                                [(i,) for i in oldest])
            self.dropped += len(oldest)
            log.error("alert spool full (%d undelivered): dropped the %d oldest", self.max_alerts, len(oldest))

    def next_for(self, sink: str) -> tuple[int, dict[str, Any], int, int] | None:
        """The oldest undelivered alert of a sink: (id, payload, attempts, next_try_ns)."""
        with self.lock:
            row = self.db.execute(
                "SELECT d.alert_id, a.payload, d.attempts, d.next_try_ns FROM deliveries d JOIN alerts a "
                "ON a.id = d.alert_id WHERE d.sink = ? AND d.state = 'pending' ORDER BY d.alert_id LIMIT 1",
                (sink,)).fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1]), row[2], row[3]

    def delivered(self, alert_id: int, sink: str) -> None:
        with self.lock:
            self.db.execute("UPDATE deliveries SET state = 'done' WHERE alert_id = ? AND sink = ?", (alert_id, sink))
            # an alert every sink took is no longer needed
            self.db.execute("DELETE FROM alerts WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE "
                            "alert_id = ? AND state = 'pending')", (alert_id, alert_id))
            self.db.execute("DELETE FROM deliveries WHERE alert_id NOT IN (SELECT id FROM alerts)")

    def failed(self, alert_id: int, sink: str, error: str, next_try_ns: int) -> None:
        with self.lock:
            self.db.execute("UPDATE deliveries SET attempts = attempts + 1, next_try_ns = ?, last_error = ? "
                            "WHERE alert_id = ? AND sink = ?", (next_try_ns, error[:500], alert_id, sink))

    def retry_now(self) -> None:
        """Every pending delivery due at once (retry times of an earlier run mean nothing now)."""
        with self.lock:
            try:
                self.db.execute("UPDATE deliveries SET next_try_ns = 0 WHERE state = 'pending' AND next_try_ns != 0")
            except sqlite3.Error as e:
                log.error("alert spool: pending retries not reset: %s", e)

    def refused(self, alert_id: int, sink: str, error: str) -> None:
        """The sink refused this alert for good: no more tries there (kept as 'dropped', with why)."""
        with self.lock:
            self.db.execute("UPDATE deliveries SET state = 'dropped', attempts = attempts + 1, last_error = ? "
                            "WHERE alert_id = ? AND sink = ?", (error[:500], alert_id, sink))

    def depth(self, sink: str | None = None) -> int:
        with self.lock:
            if sink is None:
                return self.db.execute("SELECT COUNT(DISTINCT alert_id) FROM deliveries WHERE state = 'pending'"
                                       ).fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM deliveries WHERE sink = ? AND state = 'pending'",
                                   (sink,)).fetchone()[0]

    # ---- incidents (open ones only; a resolve deletes) ----

    def incident(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT key, rule, priority, agent, opened_ns, last_sent_ns, count, sent_count, "
                                  "last_alert, sinks FROM incidents WHERE key = ?", (key,)).fetchone()
        return _incident(row)

    def incidents(self, agent: str | None = None) -> list[dict[str, Any]]:
        query = ("SELECT key, rule, priority, agent, opened_ns, last_sent_ns, count, sent_count, last_alert, sinks "
                 "FROM incidents" + (" WHERE agent = ?" if agent is not None else "") + " ORDER BY opened_ns")
        with self.lock:
            rows = self.db.execute(query, (agent,) if agent is not None else ()).fetchall()
        return [_incident(r) for r in rows]

    def save_incident(self, inc: dict[str, Any]) -> None:
        """The incident as of now, for a restart; one the disk refuses is saved with its next change
        (the daemon has it in memory)."""
        with self.lock:
            try:
                self.db.execute("INSERT OR REPLACE INTO incidents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (inc["key"], inc["rule"], inc["priority"], inc["agent"], inc["opened_ns"],
                                 inc["last_sent_ns"], inc["count"], inc["sent_count"],
                                 json.dumps(inc["last_alert"]), json.dumps(inc["sinks"])))
            except sqlite3.Error as e:
                log.error("incident %s not saved in the spool: %s", inc["key"], e)

    def close_incident(self, key: str) -> None:
        with self.lock:
            try:
                self.db.execute("DELETE FROM incidents WHERE key = ?", (key,))
            except sqlite3.Error as e:
                log.error("incident %s not closed in the spool: %s", key, e)

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _incident(row) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("key", "rule", "priority", "agent", "opened_ns", "last_sent_ns", "count", "sent_count", "last_alert",
            "sinks")
    inc = dict(zip(keys, row))
    inc["last_alert"] = json.loads(inc["last_alert"])
    inc["sinks"] = json.loads(inc["sinks"])
    return inc
