"""The event stream: probes -> decode -> enrich -> a handler, with its statistics.

`ebpfmon trace`, `ebpfmon run` and the tests start the kernel side through
this one class, so they see the same events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ebpfmon import events as ev
from ebpfmon.host.cgroups import CgroupNames, Hierarchy
from ebpfmon.host.containers import ContainerIdentity
from ebpfmon.config import Config
from ebpfmon.stream.decode import TREE_RECORDS, CgroupChange, Decoder
from ebpfmon.host.devices import DeviceResolver
from ebpfmon.stream.enrich import Enricher
from ebpfmon.errors import CgroupError, DecodeError
from ebpfmon.kernel import abi
from ebpfmon.kernel.probeset import WAKE_WINDOW_MS, ProbeSet
from ebpfmon.stream.proctree import ProcessTree

log = logging.getLogger(__name__)

# kinds whose records may not have woken the reader (probes/common.h, windowed_wake)
WINDOWED_KINDS = frozenset(k.value for k in (abi.EventKind.EXEC, abi.EventKind.CONNECT, abi.EventKind.UDP_SEND,
                                             abi.EventKind.GPU_OPEN, abi.EventKind.REFUSED, abi.EventKind.DEVICE,
                                             abi.EventKind.CGROUP_MKDIR, abi.EventKind.UNIX_CONNECT))

# event kinds -> the probe that produces them
PROBE_OF_KIND = {"exec": "exec", "connect": "connect", "udp_send": "connect", "unix_connect": "connect",
                 "gpu_open": "gpu"}


@dataclass
class Stats:
    events: Counter = field(default_factory=Counter)  # delivered, by kind
    lost: Counter = field(default_factory=Counter)  # counted in the kernel, by kind
    truncated: Counter = field(default_factory=Counter)
    throttled: Counter = field(default_factory=Counter)  # refusals past a cgroup's budget: counted only
    malformed: int = 0  # records that did not decode
    handler_errors: int = 0

    def summary(self) -> str:
        def fmt(counter: Counter) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(counter.items()) if v) or "0"

        return (f"events: {fmt(self.events)}; lost: {fmt(self.lost)}; truncated: {fmt(self.truncated)}"
                + (f"; refusals past their budget, counted only: {fmt(self.throttled)}"
                   if any(self.throttled.values()) else "")
                + (f"; malformed: {self.malformed}" if self.malformed else "")
                + (f"; handler errors: {self.handler_errors}" if self.handler_errors else ""))


class EventStream:
    """Loads probes for the wanted kinds, scopes them, and delivers enriched events."""

    def __init__(self, config: Config, kinds: Iterable[str] = ev.KIND_GROUPS["all"],
                 cgroups: Iterable[str] = (), all_cgroups: bool = False,
                 hierarchy: Hierarchy | None = None, enforce_pins: Path | None = None,
                 on_cgroup: Callable[[CgroupChange], None] | None = None):
        self.config = config
        self.kinds = frozenset(kinds)
        self.hierarchy = hierarchy or Hierarchy()
        self.scope_names = list(cgroups) or [config.agent_root]
        self.all_cgroups = all_cgroups
        probes = {PROBE_OF_KIND[k] for k in self.kinds if k in PROBE_OF_KIND}
        if enforce_pins is not None:
            probes.add("enforce")
        self.probes = ProbeSet(probes, config.ringbuf_pages, pin_dir=enforce_pins)
        self.on_cgroup = on_cgroup
        self.windowed = False  # the last batch had a record of WINDOWED_KINDS
        self.left_behind = False  # ... or stopped at a record being written, which may not wake us
        self.decoder = Decoder()
        self.tree = ProcessTree()
        containers = config.containers
        self.enricher = Enricher(CgroupNames(self.hierarchy), self.tree, DeviceResolver(),
                                 config.ancestry_depth,
                                 ContainerIdentity(config.agents, {"podman": containers.podman,
                                                                   "docker": containers.docker})
                                 if containers.enabled else None)
        self.stats = Stats()
        self._handler: Callable[[ev.Event], None] = lambda e: None

    def scope_ids(self) -> list[int]:
        """Ids of the cgroups to watch. The agent root is ours: created when missing."""
        if self.scope_names == [self.config.agent_root]:
            self.hierarchy.ensure(self.config.agent_root)
        ids = []
        for name in self.scope_names:
            try:
                ids.append(self.hierarchy.cgroup_id(name))
            except CgroupError as e:
                raise CgroupError(e.message, "Name an existing cgroup with --cgroup, create it "
                                  "(ebpfmon exec creates agent cgroups), or use --all-cgroups.") from e
        return ids

    def start(self, handler: Callable[[ev.Event], None]) -> "EventStream":
        """Loads and attaches the probes; events go to handler from poll()."""
        self.probes.preflight()  # a user without root or bcc hears that, not a cgroup error
        ids = self.scope_ids() if not self.all_cgroups else []
        self._handler = handler
        self.tree.bootstrap()
        self.probes.load()
        self.probes.set_gpu_prefixes(self.config.gpu_prefixes)
        for cgroup_id in ids:
            self.probes.add_scope(cgroup_id)
        self.probes.set_all_cgroups(self.all_cgroups)
        self.probes.open_ring_buffer(self._on_record)
        return self

    def _on_record(self, record: bytes) -> None:
        # called from the ring buffer reader (through ctypes for bcc's, which would print and
        # swallow an exception): every error is counted and logged here instead
        if record[0] in WINDOWED_KINDS:
            self.windowed = True
        elif record[0] in TREE_RECORDS:
            try:
                self.enricher.tree_change(*self.decoder.tree_change(record))
            except DecodeError as e:
                self._malformed(e)
            return
        try:
            item = self.decoder.decode(record)
        except DecodeError as e:
            self._malformed(e)
            return
        event = self.enricher.apply(item)
        if event is None:  # a cgroup change
            handler, arg = self.on_cgroup, item
        elif (kind := event.kind) in self.kinds:
            self.stats.events[kind] += 1
            handler, arg = self._handler, event
        else:
            return
        if handler is None:
            return
        try:
            handler(arg)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler failed on %r", arg)

    def _malformed(self, error: DecodeError) -> None:
        self.stats.malformed += 1
        log.warning("malformed record: %s", error)

    def poll(self) -> None:
        """From one thread at a time (the reader's: the daemon's loop, or a test's).
        Delivers what is in the ring buffer, waiting at most one drain interval, or, right
        after a batch with an exec or another event that can lead to containment, or one that
        stopped at a record still being written, at most the kernel's wakeup window (plus a
        millisecond of margin): such events that came within the window did not wake us."""
        short = self.windowed or self.left_behind
        self.windowed = False
        self.left_behind = self.probes.poll(WAKE_WINDOW_MS + 1 if short else self.config.drain_interval_ms)

    def refresh_counters(self) -> None:
        """Copies the kernel's lost/truncated/throttled counters into stats."""
        for kind, counters in self.probes.counters().items():
            name = kind.name.lower()
            self.stats.lost[name] = counters[abi.Counter.LOST]
            self.stats.truncated[name] = counters[abi.Counter.TRUNCATED]
            self.stats.throttled[name] = counters[abi.Counter.THROTTLED]

    def run(self, stop: threading.Event, duration: float | None = None,
            every: Callable[[], None] | None = None, after_poll: Callable[[], None] | None = None) -> None:
        """Polls until stop is set or duration seconds passed; calls after_poll() after each
        batch and every() once a second."""
        deadline = time.monotonic() + duration if duration else None
        next_tick = time.monotonic() + 1.0
        while not stop.is_set():
            self.poll()
            if after_poll:
                after_poll()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                self.decoder.resync_clock()
                self.refresh_counters()
                if every:
                    every()
            if deadline and now >= deadline:
                break
        self.poll()  # what arrived while we stopped
        self.refresh_counters()

    def close(self) -> None:
        self.probes.close()
        if self.enricher.containers:
            self.enricher.containers.close()
