"""Verdicts become incidents, incidents become alerts, alerts go to the sinks.

One incident per (rule, agent): the first verdict triggers it; more verdicts
within dedup_seconds are counted on it, and the count goes out at most once
per window as an update of the same incident (same dedup key), so a thousand
identical events in a second page once. Releasing an agent's quarantine
resolves its incidents. Every alert is in the spool (SQLite, on disk) before
any sink is tried; each remote sink has a worker that delivers in order,
retrying with exponential backoff and jitter, across restarts.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from ebpfmon.alerts.sinks import CHAIN_HEAD, Sink, make_sink
from ebpfmon.alerts.spool import Spool
from ebpfmon.config import AlertSettings
from ebpfmon.errors import DeliveryError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
MAX_UNSPOOLED = 10_000


def incident_key(node: str, rule: str, agent: str | None) -> str:
    digest = hashlib.sha256(f"{node}\0{rule}\0{agent or ''}".encode()).hexdigest()[:24]
    return f"ebpfmon-{digest}"


class Alerting:
    def __init__(self, settings: AlertSettings, state_dir: str | Path, node: str | None = None,
                 clock=time.time_ns, on_delivery=None, monotonic=time.monotonic_ns):
        """clock: the wall clock alerts carry; monotonic: what dedup windows and retry backoff
        are measured by, so a wall-clock jump neither stalls alerts nor sends them early."""
        self.settings = settings
        self.node = node or socket.gethostname()
        self.clock = clock
        self.monotonic = monotonic
        self.sinks: list[Sink] = [make_sink(s, self.node) for s in settings.sinks]
        self.spool = Spool(Path(state_dir) / "alerts.db", settings.spool_max)
        self.on_delivery = on_delivery or (lambda sink, ok: None)
        self.wake = threading.Condition()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        # alerts the spool could not take (a full disk), oldest first; beyond the bound the oldest go
        self.unspooled: deque[tuple[dict[str, Any], list[str]]] = deque(maxlen=MAX_UNSPOOLED)
        self.workers = [threading.Thread(target=self._work, args=(s,), name=f"sink-{s.name}", daemon=True)
                        for s in self.sinks if s.remote]
        # open incidents; counts live here, the spool has them as of their last send
        self.open: dict[str, dict[str, Any]] = {inc["key"]: inc for inc in self.spool.incidents()}
        # when each was last sent, by the monotonic clock; for those of an earlier run, from the
        # wall clock's age (a clock that went back since: due now)
        wall, mono, window = self.clock(), self.monotonic(), int(settings.dedup_seconds * 1e9)
        self.sent_mono: dict[str, int] = {
            key: mono - (wall - inc["last_sent_ns"] if wall >= inc["last_sent_ns"] else window)
            for key, inc in self.open.items()}
        self.refreshed: dict[tuple[str, str], int] = {}  # (incident, sink) -> last re-sent, monotonic
        self.spool.retry_now()  # retry times of an earlier run are another boot's monotonic clock

    def start(self) -> "Alerting":
        for worker in self.workers:
            worker.start()
        return self

    def close(self) -> None:
        """Stops the workers; what is undelivered stays in the spool for next time."""
        with self.lock:
            for inc in self.open.values():
                self.spool.save_incident(inc)
        self.stopping.set()
        with self.wake:
            self.wake.notify_all()
        for worker in self.workers:
            if worker.ident is not None:  # started
                worker.join(timeout=5)
        for sink in self.sinks:
            sink.close()
        self.spool.close()

    # ---- from the daemon ----

    def verdict(self, verdict, quarantine: dict[str, Any] | None = None) -> None:
        """Counts the verdict on its incident; sends the incident when it is new or its window passed.
        Counting stays in memory (a flood costs no disk writes); what is sent is written first."""
        now = self.clock()
        key = incident_key(self.node, verdict.rule, verdict.agent)
        with self.lock:
            inc = self.open.get(key)
            alert = {"action": "trigger", "incident": key, "rule": verdict.rule, "priority": verdict.priority,
                     "output": verdict.output, "tags": verdict.tags, "actions": verdict.actions,
                     "agent": verdict.agent, "node": self.node, "time_ns": now,
                     "opened_ns": inc["opened_ns"] if inc else now, "count": (inc["count"] if inc else 0) + 1,
                     "event": verdict.event.to_dict(), "quarantine": quarantine,
                     "output_fields": verdict.output_fields}
            if inc is None:
                inc = self.open[key] = {
                    "key": key, "rule": verdict.rule, "priority": verdict.priority, "agent": verdict.agent,
                    "opened_ns": now, "last_sent_ns": 0, "count": 0, "sent_count": 0, "last_alert": alert,
                    "sinks": [s.name for s in self.sinks if s.remote and s.wants(alert)]}
            inc["count"] += 1
            inc["last_alert"] = alert
            mono = self.monotonic()
            due = key not in self.sent_mono or mono - self.sent_mono[key] >= self.settings.dedup_seconds * 1e9
            if due:
                inc["last_sent_ns"], inc["sent_count"] = now, inc["count"]
                self.sent_mono[key] = mono
                self.spool.save_incident(inc)
        if due:
            self.send(alert)

    def tick(self) -> None:
        """Sends the counts that grew on open incidents once their window passed."""
        self.respool()
        now, mono = self.clock(), self.monotonic()
        due = []
        with self.lock:
            for key, inc in self.open.items():
                if inc["count"] > inc["sent_count"] and \
                        mono - self.sent_mono.get(key, 0) >= self.settings.dedup_seconds * 1e9:
                    inc["last_sent_ns"], inc["sent_count"] = now, inc["count"]
                    self.sent_mono[key] = mono
                    self.spool.save_incident(inc)
                    due.append({**inc["last_alert"], "count": inc["count"], "time_ns": now})
        for alert in due:
            self.send(alert)
        self._refresh(now, mono)

    def _refresh(self, now: int, mono: int) -> None:
        """Open incidents sent again to the sinks that forget what is not re-sent."""
        refreshing = [s for s in self.sinks if s.remote and s.refresh_seconds]
        if not refreshing:
            return
        again = []
        with self.lock:
            for key, inc in self.open.items():
                for sink in refreshing:
                    last = self.refreshed.get((key, sink.name), self.sent_mono.get(key, mono))
                    if sink.name in inc["sinks"] and mono - last >= sink.refresh_seconds * 1e9:
                        self.refreshed[(key, sink.name)] = mono
                        again.append(({**inc["last_alert"], "count": inc["count"], "time_ns": now}, sink.name))
        for alert, sink in again:
            self._spool(alert, [sink])
        if again:
            with self.wake:
                self.wake.notify_all()

    def chain_head(self, head: str, records: int, file: str) -> None:
        """The audit log's chain head to the sinks that take it (syslog, NATS), through the spool."""
        self.send({"action": CHAIN_HEAD, "priority": "INFORMATIONAL", "node": self.node, "time_ns": self.clock(),
                   "hash": head, "records": records, "file": file, "incident": f"audit-head-{head}", "count": 1})

    def resolve_agent(self, agent: str, reason: str = "") -> int:
        """Resolves every open incident of an agent (its quarantine was released); how many."""
        with self.lock:
            for key in [k for k, inc in self.open.items() if inc["agent"] == agent]:
                self.spool.save_incident(self.open.pop(key))
                self.sent_mono.pop(key, None)
                for refreshed in [k for k in self.refreshed if k[0] == key]:
                    del self.refreshed[refreshed]
        alerts = self.resolves_for(self.spool, agent, reason)
        for alert in alerts:
            self.deliver_local(alert)
        with self.wake:
            self.wake.notify_all()
        return len(alerts)

    @staticmethod
    def resolves_for(spool: Spool, agent: str, reason: str) -> list[dict[str, Any]]:
        """Spools a resolve of every open incident of the agent, for the sinks its trigger went to;
        also without a running daemon (the next one delivers them). The resolves."""
        now = time.time_ns()
        alerts = []
        for inc in spool.incidents(agent):
            alert = {**inc["last_alert"], "action": "resolve", "time_ns": now,
                     "output": f"released: {reason}" if reason else "released"}
            if inc["sinks"]:
                spool.put(alert, inc["sinks"], now)
            spool.close_incident(inc["key"])
            alerts.append(alert)
        return alerts

    def send(self, alert: dict[str, Any]) -> None:
        """To the spool first (committed), then local sinks at once; remote workers are woken.
        A spool that cannot be written (a full disk) keeps the alert in memory until it can."""
        remote = [s.name for s in self.sinks if s.remote and s.wants(alert)]
        if remote:
            self._spool(alert, remote)
            with self.wake:
                self.wake.notify_all()
        self.deliver_local(alert)

    def _spool(self, alert: dict[str, Any], remote: list[str]) -> None:
        with self.lock:
            if self.unspooled:  # keep the order: what waits goes first
                self.unspooled.append((alert, remote))
                return
        try:
            self.spool.put(alert, remote, self.clock())
        except sqlite3.Error as e:
            with self.lock:
                self.unspooled.append((alert, remote))
            log.error("alert spool not written (%s): %d alert(s) wait in memory", e, len(self.unspooled))

    def respool(self) -> None:
        """Alerts that waited in memory for the spool, into it (once a second, from tick)."""
        while True:
            with self.lock:
                if not self.unspooled:
                    return
                alert, remote = self.unspooled[0]
            try:
                self.spool.put(alert, remote, self.clock())
            except sqlite3.Error:
                return
            with self.lock:
                self.unspooled.popleft()
                if not self.unspooled:
                    log.warning("alert spool written again: the alerts that waited are spooled")

    def deliver_local(self, alert: dict[str, Any]) -> None:
        for sink in self.sinks:
            if not sink.remote and sink.wants(alert):
                try:
                    sink.deliver(alert)
                    self.on_delivery(sink.name, True)
                except OSError as e:
                    self.on_delivery(sink.name, False)
                    log.error("alert sink %s failed: %s", sink.name, e)

    # ---- delivery ----

    def _work(self, sink: Sink) -> None:
        """One sink's deliveries, until close(). Nothing ends it but close: an error of ours is
        logged and the worker goes on after a pause."""
        while not self.stopping.is_set():
            try:
                self._deliver_next(sink)
            except Exception:
                log.exception("sink %s: delivery failed unexpectedly; going on", sink.name)
                self.stopping.wait(1.0)

    def _deliver_next(self, sink: Sink) -> None:
        item = self.spool.next_for(sink.name)
        now = self.monotonic()  # retry times are monotonic: a wall-clock jump neither stalls nor rushes them
        if item is None or item[3] > now:
            wait = 1.0 if item is None else min(1.0, (item[3] - now) / 1e9)
            with self.wake:
                self.wake.wait(wait)
            return
        alert_id, alert, attempts, _ = item
        try:
            sink.deliver(alert)
        except DeliveryError as e:
            self.on_delivery(sink.name, False)
            if e.permanent:  # tried again it would be refused again: the queue moves on
                self.spool.refused(alert_id, sink.name, str(e))
                log.error("alert %d refused by %s for good, not retried: %s", alert_id, sink.name, e)
                return
            backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** attempts) * random.uniform(0.5, 1.0)
            self.spool.failed(alert_id, sink.name, str(e), now + int(backoff * 1e9))
            if attempts in (0, 5, 10) or attempts % 50 == 0:
                log.warning("alert %d to %s failed (attempt %d), retrying in %.1fs: %s", alert_id, sink.name,
                            attempts + 1, backoff, e)
            return
        self.spool.delivered(alert_id, sink.name)
        self.on_delivery(sink.name, True)
