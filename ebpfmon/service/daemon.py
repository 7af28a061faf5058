"""The daemon: probes, rules, containment, alerts, metrics, audit and the control
socket, started and stopped as one. `ebpfmon run` is a thin wrapper; the tests
and benchmarks start it the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ebpfmon import events as ev
from ebpfmon import output
from ebpfmon.alerts.audit import AuditLog
from ebpfmon.alerts.export import EventExport
from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import Config, load_config
from ebpfmon.containment.actions import Notice
from ebpfmon.errors import EbpfmonError, RuleLoadError
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.policy.profiles import compiled
from ebpfmon.rules.engine import Engine, Verdict
from ebpfmon.service import assemble, instance, sdnotify
from ebpfmon.service.control import ControlServer
from ebpfmon.service.metrics import Metrics, snapshot
from ebpfmon.stream.existing import existing_connections, existing_processes

if TYPE_CHECKING:  # built by assemble
    from ebpfmon.containment.actions import Containment
    from ebpfmon.kernel.enforcer import Enforcer
    from ebpfmon.policy.dnsproxy import DnsProxy
    from ebpfmon.stream.decode import CgroupChange

log = logging.getLogger("ebpfmon")

Printer = Callable[[str], None]
EVALUATION_SAMPLE = 16  # events per timed rule evaluation (ebpfmon_rule_evaluation_seconds)
# How long another Python thread (alert delivery, the exporter, the control socket) may keep
# the GIL while the reader waits with an exec that may need a cut: CPython's default, 5 ms,
# is as long as a whole exec-to-cut.
GIL_SWITCH_INTERVAL = 0.0005  # seconds
FLOOD_PAGE_INTERVAL_NS = 60 * 10**9  # one flood's lost events are paged at most this often
FLOOD_QUIET_NS = 10 * 10**9  # no event lost for this long: the next loss is another flood, paged at once
CHAIN_HEAD_INTERVAL_NS = 60 * 10**9  # the audit chain's head goes to the journal this often
# how long an alert about a container may wait for its runtime's answer (name, image, labels):
# a container's first exec (its entrypoint) comes before the runtime can be asked
IDENTITY_WAIT_NS = 10 * 10**9
# what cannot change without a restart (probes and pins depend on them)
RESTART_KEYS = ("agent_root", "agent_level", "state_dir", "ringbuf_pages", "gpu_prefixes", "metrics", "containers")


class Daemon:
    """Coordinates the stages: starts and stops them, judges each event, reloads."""

    def __init__(self, config: Config, config_path: Path | None = None, show_events: Printer | None = None,
                 echo: Printer | None = None):
        """show_events prints every event; echo gets a copy of every alert and containment line
        (for embedding: the sinks are where alerts go)."""
        self.config = config
        self.config_path = config_path
        self.show_events = show_events
        self.echo = echo or (lambda line: None)
        self.started_ns = time.monotonic_ns()
        self.hierarchy = Hierarchy()
        self.engine = Engine(assemble.load_ruleset(config), assemble.rule_context(config))
        self.stream = assemble.event_stream(config, self.hierarchy, on_cgroup=self.cgroup_changed)
        self.stream.enricher.programs.look_for(assemble.identified_programs(self.engine.ruleset.lists))
        if self.stream.enricher.containers:
            self.stream.enricher.containers.on_identified = self.container_identified
        self.metrics = Metrics()
        self.metrics.rules_loaded.set(len(self.engine.ruleset.rules))
        self.alerting = Alerting(config.alerts, config.state_dir, on_delivery=self.delivered)
        self.audit = AuditLog(config.audit, config.state_dir) if config.audit.enabled else None
        self.exports = self._exports(config)
        self.enforcer: Enforcer | None = None
        self.dns_proxy: DnsProxy | None = None
        # the proxy's events, judged on the reader's thread (rules and enrichment are not shared)
        self.dns_events: collections.deque[ev.DnsEvent] = collections.deque(maxlen=65536)
        self.found_at_start: collections.deque[ev.ExecEvent] = collections.deque()  # what agents ran before us
        self.containment: Containment | None = None
        self.pending_alerts: list[Verdict] = []  # judged, for deliver_alerts after the batch
        self.awaiting_identity: list[tuple[Verdict, int]] = []  # (alert, since): its container not known yet
        self.control: ControlServer | None = None
        self.reload_requested = threading.Event()  # SIGHUP
        self.reloads_asked: collections.deque[concurrent.futures.Future] = collections.deque()  # control socket
        self.judged = 0
        self.loop_errors = 0  # exceptions the loop survived (_survive)
        self.lost_paged = 0  # events lost as of the last page about them (_flood_check)
        self.lost_seen, self.lost_seen_ns = 0, -FLOOD_QUIET_NS  # ... as of the last check that found more
        self.lost_by_cgroup_paged: dict[int, int] = {}
        self.flood_paged_ns = -FLOOD_PAGE_INTERVAL_NS
        self.head_logged_ns = 0  # the first head a minute after the start
        self.watchdog = sdnotify.watchdog_interval()
        self.ready_ns = 0
        self.agents_at_start = 0  # agent cgroups there when the daemon started
        self.locks: list = []  # held while running (service/instance.py)
        self.metrics_problem: str | None = None  # why the exporter is not serving, when it is not

    def _exports(self, config: Config) -> list[EventExport]:
        """An exporter for each sink that takes events (config checks the audit log is on)."""
        return [EventExport(sink, self.alerting.node, self.audit.directory, config.state_dir, config.agents)
                for sink in config.alerts.sinks if sink.events and self.audit]

    # ---- start and stop ----

    def start(self) -> "Daemon":
        """Probes, enforcement, reconciliation, alerts, metrics, control socket; then READY.
        Every thread made here gets the reader's priority (see raise_priority); the caller's
        own thread gets its priority back."""
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.raise_priority()
        try:
            return self._start()
        finally:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), own)

    def _start(self) -> "Daemon":
        self.hierarchy.ensure(self.config.agent_root)
        self.locks = instance.hold_instance(self.config.state_dir, self.hierarchy.cgroup_id(self.config.agent_root))
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.stream.start(self.judge)
        devices = assemble.device_model(self.config)
        self.enforcer = assemble.enforcement(self.stream.probes, self.hierarchy, self.config,
                                             self.engine.ruleset.lists, devices)
        self.stream.enricher.egress_profiles = self.enforcer.egress_policy.names
        self._start_dns_proxy()
        self.alerting.start()
        for export in self.exports:
            export.start()
        self.containment = assemble.containment(self.enforcer, self.hierarchy, self.config, self.engine.ruleset.lists,
                                                on_release=self.released,
                                                on_action=lambda a, r: self.metrics.actions.labels(a, r).inc(),
                                                devices=devices)
        self.engine.context.gpu_granted = self.containment.gpus.entitled
        self.containment.container_of = self.container_of
        for notice in self.containment.reconcile():
            self.notify(notice)
        self.metrics.watch(lambda: snapshot(self))
        if self.config.metrics.enabled:
            try:
                self.metrics.serve(self.config.metrics.listen)
            except OSError as e:  # watching matters more than the exporter: go on, loudly
                self.metrics_problem = f"NOT SERVED: cannot listen on {self.config.metrics.listen}: {e.strerror}"
                log.error("metrics %s", self.metrics_problem)
                self.alerting.verdict(self._ebpfmon_verdict("ebpfmon metrics", "ERROR",
                                                            f"metrics {self.metrics_problem}"))
        self.control = ControlServer(self.containment, self.config.state_dir, reload=self.reload_between_batches).start()
        agents = self.containment.agent_paths()  # a walk of the agent root: once
        self.agents_at_start = len(agents)
        if self.stream.enricher.containers and (self.config.containers.profile_label
                                                 or self.config.containers.gpus_label):
            for agent in agents:  # their labels choose: asked now, not at their next event
                self.stream.enricher.containers.of_agent(agent)
        for event in existing_connections(agents, self.hierarchy, self.stream.tree, self.config.ancestry_depth):
            self.judge(event)  # connections agents held before we started are judged like new ones
        self.ready_ns = time.monotonic_ns()
        sdnotify.notify("READY=1")
        threading.Thread(target=self._look_at_what_runs, args=(agents,), name="at-start", daemon=True).start()
        return self

    def _look_at_what_runs(self, agents: list[str]) -> None:
        """After ready, off the start's critical path: the programs the agents run (a tunnel or a
        miner started while the daemon was down) and GPU descriptors held beyond a grant (a
        restart after a revoke), read from /proc; judged by the reader with its next batch."""
        for event in existing_processes(agents, self.hierarchy):
            self.found_at_start.append(event)
        self.containment.gpus.beyond_grants(agents)

    def _flood_check(self) -> None:
        """Events the kernel could not deliver (the ring buffer was full) are paged with the agents
        whose events they were (a flood names its makers): at once for a new flood, then at most
        once a minute while it goes on."""
        lost = sum(self.stream.stats.lost.values())
        if lost <= self.lost_seen:
            return
        now = time.monotonic_ns()
        another = now - self.lost_seen_ns > FLOOD_QUIET_NS  # none lost for a while: another flood
        self.lost_seen, self.lost_seen_ns = lost, now
        if not another and now - self.flood_paged_ns < FLOOD_PAGE_INTERVAL_NS:
            return
        by_cgroup = self.stream.probes.lost_by_cgroup()
        by_agent: collections.Counter[str] = collections.Counter()
        for cgroup_id, count in by_cgroup.items():
            path = self.stream.enricher.cgroups.path(cgroup_id)
            agent = (self.config.agents.agent_of(path) if path else None) or f"cgroup {cgroup_id}"
            by_agent[agent] += count - self.lost_by_cgroup_paged.get(cgroup_id, 0)
        top = ", ".join(f"{agent} ({n})" for agent, n in by_agent.most_common(5) if n > 0)
        message = (f"{lost - self.lost_paged} event(s) lost: the ring buffer was full; most from {top or 'unknown'}. "
                   "Their exec, connect and GPU events were not judged (the kernel's policy still held)")
        log.error("%s", message)
        self.echo(f"CRITICAL ebpfmon: {message}")
        self.alerting.verdict(self._ebpfmon_verdict("ebpfmon events lost", "CRITICAL", message))
        self.lost_paged, self.lost_by_cgroup_paged, self.flood_paged_ns = lost, by_cgroup, now

    def _log_chain_head(self) -> None:
        """The audit log's chain head to the journal, and to the syslog and NATS sinks, once a
        minute: a log rewritten whole, with its chain-head file, still disagrees with the copies."""
        now = time.monotonic_ns()
        if not self.audit or now - self.head_logged_ns < CHAIN_HEAD_INTERVAL_NS:
            return
        self.head_logged_ns = now
        log.info("audit chain head: %s after %d record(s), %s (ebpfmon audit verify)", self.audit.prev or "-",
                 self.audit.lines_chained, self.audit.path)
        if self.audit.prev:
            self.alerting.chain_head(self.audit.prev, self.audit.lines_chained, str(self.audit.path))

    def metrics_state(self) -> str:
        """For the ready line: where metrics are, or why they are not."""
        if not self.config.metrics.enabled:
            return "off"
        return self.metrics_problem or self.config.metrics.listen

    def run(self, stop: threading.Event, every: Callable[[], None] | None = None) -> None:
        def each_second() -> None:
            self._survive("the once-a-second work", second)

        def second() -> None:
            self._flood_check()
            self._log_chain_head()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            while self.reloads_asked:
                asked = self.reloads_asked.popleft()
                asked.set_result(self.reload())
            self.alerting.tick()
            if self.enforcer:
                self.enforcer.expire_grants()
            if self.watchdog:
                sdnotify.notify("WATCHDOG=1")  # from the event loop: a stuck loop gets restarted
            if every:
                every()

        self.raise_priority()
        self.stream.run(stop, every=each_second, after_poll=self.after_poll)

    def _survive(self, what: str, work: Callable[[], None]) -> None:
        """The loop goes on whatever one turn of work raised: a daemon that stops is off."""
        try:
            work()
        except Exception:
            self.loop_errors += 1
            if self.loop_errors <= 10 or self.loop_errors % 1000 == 0:
                log.exception("%s failed (%d time(s)); watching goes on", what, self.loop_errors)

    def after_poll(self) -> None:
        self._survive("the work after a batch", self._after_poll)

    def _after_poll(self) -> None:
        """After each batch from the kernel: the DNS proxy's events, the quarantine file, the
        batch's alerts, then the audit log to disk."""
        self._judge_queued(self.dns_events)
        self._judge_queued(self.found_at_start)
        if self.containment:
            self._judge_queued(self.containment.gpus.held_events)
            for notice in self.containment.take_notices():
                self.notify(notice)
            self.containment.flush()
        self.deliver_alerts()
        if self.audit:
            was = self.audit.failing
            self.audit.flush()
            if self.audit.failing != was and (was is None or self.audit.failing is None):
                self._audit_changed(was)

    def _judge_queued(self, queue: collections.deque) -> None:
        """Events made off the reader's thread (the DNS proxy, the start's /proc reading, GPU
        scans), enriched and judged here: rules and enrichment are the reader's alone."""
        while queue:
            event = self.stream.enricher.apply(queue.popleft())
            self.stream.stats.events[event.kind] += 1
            self.judge(event)

    def _audit_changed(self, was: str | None) -> None:
        """The audit log's disk refused writes, or takes them again: paged, not silent."""
        if self.audit.failing:
            message = (f"audit log not written ({self.audit.failing}): lines wait in memory and are written "
                       "when the disk takes them again")
            log.error("%s", message)
            self.alerting.verdict(self._ebpfmon_verdict("ebpfmon audit log", "CRITICAL", message))
        else:
            log.warning("audit log written again (it had failed: %s); %d line(s) were dropped meanwhile",
                        was, self.audit.lines_dropped)

    def raise_priority(self) -> None:
        """Nice applies per thread on Linux, and threads inherit it from the thread that makes
        them. The reader reads events and contains, and on a busy node a cut must not wait
        for a CPU behind the agents' own work; nor may any other thread of the daemon, since
        with Python's one lock, a thread holding it while it waits for a CPU stalls the reader
        too (bench/README.md, containment at scale)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.reader_nice)
        except OSError as e:  # watching matters more: go on, loudly
            log.warning("reader priority not raised to nice %d: %s (needs CAP_SYS_NICE)",
                        self.config.reader_nice, e.strerror)

    def close(self) -> None:
        """Stops watching; alerts not yet delivered stay in the spool. Enforcement stays attached:
        cuts outlive the daemon."""
        sdnotify.notify("STOPPING=1")
        if self.control:
            self.control.stop()
        if self.dns_proxy:
            self.dns_proxy.close()
        if self.containment:
            self.containment.close()
        self.deliver_alerts(waiting=False)
        self.stream.close()
        self.alerting.close()
        self.metrics.close()
        if self.audit:
            self.audit.close()
        for export in self.exports:
            export.close()
        for lock in self.locks:
            lock.close()
        self.locks = []

    # ---- events ----

    def judge(self, event: ev.Event) -> None:
        if self.audit:
            self.audit.write(event)
        if self.show_events:
            self.show_events(output.table_line(event))
        self.judged += 1
        if event.kind == "gpu_open" and event.retval >= 0 and self.containment:
            agent = self.engine.context.agent_cgroup(event.cgroup)
            if agent:
                self.containment.gpus.holders.opened(agent, event.proc.pid, event.retval)
        elif event.kind == "refused" and event.reason == "egress":
            self.metrics.egress_refusals.labels(event.profile, "reported" if event.dry_run else "refused").inc()
        elif event.kind == "dns":
            self.metrics.dns_questions.labels(event.profile or "", event.verdict).inc()
        if (self.judged - 1) % EVALUATION_SAMPLE:
            verdicts = self.engine.evaluate(event)
        else:  # timing every event would cost as much as judging it: one in EVALUATION_SAMPLE
            started = time.perf_counter()
            verdicts = self.engine.evaluate(event)
            self.metrics.rule_evaluation.observe(time.perf_counter() - started)
        for verdict in verdicts:
            self.metrics.rule_matches.labels(verdict.rule, verdict.priority).inc()
            self.contain(verdict)  # before anything is written: containment is a race
            if verdict.actions and self.containment:
                self.metrics.containments.labels(verdict.rule).inc()
                self.metrics.event_to_action.observe(max(0, time.time_ns() - event.time_ns) / 1e9)
            self.metrics.event_to_verdict.observe(max(0, time.time_ns() - event.time_ns) / 1e9)
            self.echo(output.alert_line(verdict))
            self.pending_alerts.append(verdict)

    def deliver_alerts(self, waiting: bool = True) -> None:
        """The batch's verdicts to the alert sinks (spooled first), after every containment the
        batch asked for: the next agent's cut does not wait behind this one's alert. An alert
        about a container its runtime has not named yet waits for the name a while (waiting)."""
        now = time.monotonic_ns()
        held, self.awaiting_identity = self.awaiting_identity, []
        pending, self.pending_alerts = self.pending_alerts, []
        for verdict, since in held + [(v, now) for v in pending]:
            if not self._identified(verdict) and waiting and now - since < IDENTITY_WAIT_NS:
                self.awaiting_identity.append((verdict, since))
                continue
            record = self.containment.store.active_for(verdict.agent or "") if self.containment else None
            self.alerting.verdict(verdict, dataclasses.asdict(record) if record else None)

    def _identified(self, verdict: Verdict) -> bool:
        """Whether the verdict's container (if any) is named; the runtime's answer is put in the
        event when it came since."""
        container = verdict.event.container
        if container is None or container.known:
            return True
        found = self.stream.enricher.containers.of_agent(verdict.agent) if verdict.agent else None
        if found is None or not found.known or found.id != container.id:
            return False
        verdict.event.container = found
        return True

    def contain(self, verdict: Verdict) -> None:
        if self.containment is None or not verdict.actions:
            return
        for notice in self.containment.apply(verdict):
            self.notify(notice)

    def notify(self, notice: Notice) -> None:
        """Containment notices go to the log; critical ones (refusals, rate limit) are alerts too."""
        level = logging.ERROR if notice.priority == "CRITICAL" else logging.INFO
        log.log(level, "containment: %s", notice.message)
        self.echo(f"{notice.priority} ebpfmon containment: {notice.message}")
        if notice.priority == "CRITICAL":
            self.alerting.verdict(self._ebpfmon_verdict("ebpfmon containment", "CRITICAL", notice.message))

    @staticmethod
    def _ebpfmon_verdict(rule: str, priority: str, message: str) -> Verdict:
        """An alert about ebpfmon itself, for the sinks."""
        return Verdict(rule, priority, message, ["ebpfmon"], [], False, None,
                       ev.ExitEvent(time_ns=time.time_ns(), cgroup_id=0, cgroup=None,
                                    proc=ev.Process(0, 0, 0, 0, 0, "ebpfmon")))

    def released(self, record) -> None:
        resolved = self.alerting.resolve_agent(record.agent, record.release_reason or "")
        log.info("released %s by %s; %d incident(s) resolved", record.agent, record.released_by, resolved)

    def delivered(self, sink: str, ok: bool) -> None:
        (self.metrics.alerts_delivered if ok else self.metrics.alerts_failed).labels(sink).inc()

    def cgroup_changed(self, change: CgroupChange) -> None:
        if self.enforcer is None or self.containment is None:
            return  # still starting: start() applies the policy to every agent there is
        if change.created:
            settings, containers = self.config.containers, self.stream.enricher.containers
            found = containers.of_agent(change.path) if containers and self.config.agents.is_agent(change.path) \
                else None
            waits = found is not None and not found.known  # (the runtime may have answered already)
            if waits and settings.gpus_label:  # no GPU, and no classification: refused until its labels are read
                self.containment.gpus.await_labels(change.path)
            self.containment.grant_gpus([change.path])
            if not (waits and settings.profile_label):
                self.enforcer.assign_egress(change.path)
        else:
            self.enforcer.forget_egress(change.cgroup_id, change.path)
            self.engine.context.forget(change.path)
            if change.path and self.config.agents.is_agent(change.path):
                notice = self.containment.removed(change.path, change.cgroup_id)
                if notice:
                    self.notify(notice)

    def container_of(self, agent: str) -> dict | None:
        """The container an agent is, as records keep it."""
        containers = self.stream.enricher.containers
        found = containers.of_agent(agent) if containers else None
        return dataclasses.asdict(found) if found else None

    def container_identified(self, agent: str, container) -> None:
        """The runtime answered about an agent's container (from the lookup's thread): a record
        made before the answer gets the container's name, image and labels."""
        if self.containment is None:
            return
        with self.containment.lock:
            record = self.containment.store.active_for(agent)
            if record is not None and not (record.container or {}).get("known") and container.known:
                record.container = dataclasses.asdict(container)
                self.containment.dirty = True
        settings = self.config.containers
        if settings.profile_label:
            problem = self.enforcer.choose_profile(agent, container.labels.get(settings.profile_label))
            if problem:
                self.containment.later.append(Notice("WARNING", f"{container.describe()} ({agent}): label "
                                                     f"{settings.profile_label}: {problem}; its globs decide"))
        if settings.gpus_label:
            self.containment.gpus.choose(agent, container.labels.get(settings.gpus_label))

    def _start_dns_proxy(self) -> None:
        """The DNS proxy where a profile is in force; its events wait for the reader. A proxy
        that cannot listen leaves the agents' DNS to the profiles (refused unless allowed)."""
        try:
            self.dns_proxy = assemble.dns_proxy(self.enforcer, self.config, self.dns_events.append)
        except OSError as e:
            log.error("%s: DNS to port 53 is judged by the egress profiles as any destination", e.strerror)

    def _reconfigure_dns_proxy(self) -> None:
        wanted = compiled(self.config.egress).resolves_names
        if self.dns_proxy and (not wanted or self.dns_proxy.wanted_port != self.config.egress.dns_proxy_port):
            self.enforcer.set_dns_proxy(0)
            self.dns_proxy.close()
            self.dns_proxy = None
        if self.dns_proxy:
            self.dns_proxy.configure(self.config.egress)
        elif wanted:
            self._start_dns_proxy()

    # ---- reload ----

    def reload_between_batches(self, timeout: float = 60.0) -> tuple[bool, str]:
        """A reload asked from another thread (the control socket): done by the reader's loop
        between batches, as SIGHUP's is, so no event is judged half by the old set."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.reloads_asked.append(done)
        try:
            return done.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False, f"the daemon's loop did not reload within {timeout:.0f}s: it is busy or stuck"

    def reload(self) -> tuple[bool, str]:
        """Configuration (when a file is in use) and rules, atomically: on any problem the running
        set stays, and says why. Everything new is built before anything running is changed."""
        try:
            config = load_config(self.config_path) if self.config_path else self.config
            changed = [k for k in RESTART_KEYS if getattr(config, k) != getattr(self.config, k)]
            if changed:
                raise EbpfmonError(f"{', '.join(changed)} changed: that needs a restart", "")
            ruleset = assemble.load_ruleset(config)
            assemble.deny_networks(config, ruleset.lists)  # a bad network is refused here, not half applied
            context = assemble.rule_context(config, self.containment.gpus.entitled if self.containment else None)
            if config.alerts != self.config.alerts:  # secrets readable, before the running sinks close
                assemble.check_sinks(config, str(self.config_path or "configuration"))
        except (RuleLoadError, EbpfmonError) as e:
            return self._not_reloaded(e.message)
        except Exception as e:  # a problem no check names yet: still not worth the daemon's life
            log.exception("reload failed while reading the new set")
            return self._not_reloaded(f"{type(e).__name__}: {e}")
        try:
            self._apply(config, ruleset, context)
        except Exception as e:  # the daemon must not die on a reload: say so loudly, keep watching
            log.exception("reload failed while being applied")
            return self._not_reloaded(f"failed while being applied ({type(e).__name__}: {e}); the rules and "
                                      "policy may be partly new: fix the file and reload again")
        self.metrics.reloads.inc()
        self.metrics.rules_loaded.set(len(ruleset.rules))
        message = f"reloaded: {len(ruleset.rules)} rules"
        log.info("%s", message)
        return True, message

    def _not_reloaded(self, why: str) -> tuple[bool, str]:
        self.metrics.reload_failures.inc()
        message = f"not reloaded, the running set stays: {why.replace(chr(10), ' |')}"
        log.error("%s", message)
        return False, message

    def _apply(self, config: Config, ruleset, context) -> None:
        if config.alerts != self.config.alerts:
            self.alerting.close()
            self.alerting = Alerting(config.alerts, config.state_dir, on_delivery=self.delivered).start()
            for export in self.exports:
                export.close()  # its cursor saved: the next one goes on from it
            self.exports = [export.start() for export in self._exports(config)]
        self.config = config
        self.engine.context = context
        self.engine.load(ruleset)
        self.stream.enricher.programs.look_for(assemble.identified_programs(ruleset.lists))
        # the device model read at start, for the kernel and the grants alike (a node made since
        # is judged by its major's rule)
        devices = self.containment.gpus.devices if self.containment else None
        if self.enforcer:
            assemble.configure_enforcer(self.enforcer, config, ruleset.lists, devices)
            self.stream.enricher.egress_profiles = self.enforcer.egress_policy.names
            self._reconfigure_dns_proxy()
        if self.containment:
            self.containment.configure(config, ruleset.lists)
            agents = self.containment.agent_paths()
            self.containment.grant_gpus(agents)  # changed globs reach running agents
            self.containment.gpus.beyond_grants(agents)


def stdout_printer(line: str) -> None:
    sys.stdout.write(line + "\n")
