"""The daemon: probes, rules, containment, alerts, metrics, audit and the control
socket, started and stopped as one. `ebpfmon run` is a thin wrapper; the tests
and benchmarks start it the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon import output
from ebpfmon.alerts.incidents import Alerting
from ebpfmon.alerts.audit import AuditLog
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.config import Config, load_config
from ebpfmon.host import sockets
from ebpfmon.containment.actions import Containment, Notice
from ebpfmon.service import sdnotify
from ebpfmon.service.control import ControlServer
from ebpfmon.containment.quarantine import QuarantineStore
from ebpfmon.stream.decode import CgroupChange
from ebpfmon.errors import EbpfmonError
from ebpfmon.kernel.enforcer import Enforcer, pin_dir
from ebpfmon.kernel.probeset import ProbeSet
from ebpfmon.service.metrics import Metrics
from ebpfmon.stream.stream import EventStream
from ebpfmon.host.network import NetworkClassifier
from ebpfmon.rules.engine import Engine, Verdict
from ebpfmon.rules.fields import Context
from ebpfmon.rules.loader import RULES_DIR, RuleLoadError, load_rules

log = logging.getLogger("ebpfmon")

Printer = Callable[[str], None]
# what cannot change without a restart (probes and pins depend on them)
EVALUATION_SAMPLE = 16  # events per timed rule evaluation (ebpfmon_rule_evaluation_seconds)
# How long another Python thread (alert delivery, the exporter, the control socket) may keep
# the GIL while the reader waits with an exec that may need a cut: CPython's default is 5 ms,
# which was most of the slowest exec-to-cut times measured.
GIL_SWITCH_INTERVAL = 0.0005  # seconds
RESTART_KEYS = ("agent_root", "agent_level", "state_dir", "ringbuf_pages", "gpu_prefixes", "metrics")


def rule_context(config: Config) -> Context:
    """What rule fields need from the configuration and the node."""
    return Context(agent_root=config.agent_root, agent_level=config.agent_level,
                   gpu_entitled=config.gpu_entitled, networks=NetworkClassifier(config.internal_networks))


def rule_paths(config: Config) -> list[Path]:
    return ([RULES_DIR] if config.rules.defaults else []) + [Path(f) for f in config.rules.files]


def deny_ports(config: Config, lists: dict[str, list[str]]) -> tuple[int, ...]:
    """The ports no agent may reach: configured, or the rules' mining_pool_ports list."""
    if config.enforce.deny_ports is not None:
        return config.enforce.deny_ports
    return tuple(int(p) for p in lists.get("mining_pool_ports", []) if str(p).isdigit())


def deny_networks(config: Config, lists: dict[str, list[str]]) -> tuple[str, ...]:
    """The networks no agent may reach from the start: configured, and the rules'
    mining_pool_networks list. A list item that is not a network is an error that names it."""
    networks = tuple(config.enforce.deny_networks) + tuple(str(n) for n in lists.get("mining_pool_networks", []))
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise EbpfmonError(f"{network!r} in enforce.deny_networks or the rules' mining_pool_networks list "
                               "is not an IP network", "Write it as an address or a CIDR, such as "
                               "192.0.2.0/24.") from None
    return networks


def configure_enforcer(enforcer: Enforcer, config: Config, lists: dict[str, list[str]]) -> None:
    """The enforcement policy from the configuration and the rules' lists."""
    enforcer.configure(dry_run=config.enforce.dry_run, gpu_default_deny="*" not in config.gpu_entitled,
                       keep_open=config.enforce.keep_open, deny_ports=deny_ports(config, lists),
                       deny_networks=deny_networks(config, lists))


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None, show_events: Printer | None = None,
                 echo: Printer | None = None):
        """show_events prints every event; echo gets a copy of every alert and containment line
        (for embedding: the sinks are where alerts go)."""
        self.config = config
        self.config_path = config_path
        self.show_events = show_events
        self.echo = echo or (lambda line: None)
        self.hierarchy = Hierarchy()
        self.engine = Engine(load_rules(rule_paths(config)), rule_context(config))
        ProbeSet.preflight()
        self.hierarchy.ensure(config.agent_root)
        self.pins = pin_dir(self.hierarchy, config.agent_root)
        self.stream = EventStream(config, hierarchy=self.hierarchy, enforce_pins=self.pins,
                                  on_cgroup=self.cgroup_changed)
        self.metrics = Metrics()
        self.metrics.rules_loaded.set(len(self.engine.ruleset.rules))
        self.alerting = Alerting(config.alerts, config.state_dir, on_delivery=self.delivered)
        self.audit = AuditLog(config.audit, config.state_dir) if config.audit.enabled else None
        self.enforcer: Enforcer | None = None
        self.containment: Containment | None = None
        self.control: ControlServer | None = None
        self.reload_requested = threading.Event()
        self.judged = 0
        self.watchdog = sdnotify.watchdog_interval()
        self.started_ns = time.monotonic_ns()
        self.ready_ns = 0

    # ---- start and stop ----

    def start(self) -> "Daemon":
        """Probes, enforcement, reconciliation, alerts, metrics, control socket; then READY."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.stream.start(self.judge)
        self.enforcer = Enforcer(self.stream.probes, self.hierarchy, self.config.agent_root, self.config.agent_level)
        self.configure_enforcement()
        self.enforcer.attach()
        self.containment = Containment(self.enforcer, self.hierarchy, self.config,
                                       QuarantineStore(self.config.state_dir), on_release=self.released,
                                       on_action=lambda a, r: self.metrics.actions.labels(a, r).inc())
        self.alerting.start()
        self.grant_gpus()
        for notice in self.containment.reconcile():
            self.notify(notice)
        self.metrics.watch(self.snapshot)
        if self.config.metrics.enabled:
            try:
                self.metrics.serve(self.config.metrics.listen)
            except OSError as e:  # watching matters more than the exporter: go on, loudly
                log.error("metrics not served: cannot listen on %s: %s", self.config.metrics.listen, e.strerror)
        self.control = ControlServer(self.containment, self.config.state_dir, reload=self.reload).start()
        self.judge_existing_connections()
        self.ready_ns = time.monotonic_ns()
        sdnotify.notify("READY=1")
        return self

    def configure_enforcement(self) -> None:
        configure_enforcer(self.enforcer, self.config, self.engine.ruleset.lists)

    def run(self, stop: threading.Event, every: Callable[[], None] | None = None) -> None:
        def each_second() -> None:
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            self.alerting.tick()
            if self.watchdog:
                sdnotify.notify("WATCHDOG=1")  # from the event loop: a stuck loop gets restarted
            if every:
                every()

        self.raise_reader_priority()
        self.stream.run(stop, every=each_second, after_poll=self.audit.flush if self.audit else None)

    def raise_reader_priority(self) -> None:
        """Nice applies per thread on Linux: this one reads events and contains. Measured with
        100 reverse tunnels on a busy 2-core VM: at nice 0 one cut in ten waited 4-6 ms for a
        CPU after its exec; at -10 the slowest but one came within 3 ms."""
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
        self.stream.close()
        self.alerting.close()
        self.metrics.close()
        if self.audit:
            self.audit.close()

    # ---- events ----

    def judge(self, event: ev.Event) -> None:
        if self.audit:
            self.audit.write(event)
        if self.show_events:
            self.show_events(output.table_line(event))
        self.judged += 1
        if (self.judged - 1) % EVALUATION_SAMPLE:
            verdicts = self.engine.evaluate(event)
        else:  # timing every event would cost as much as judging it: one in EVALUATION_SAMPLE
            started = time.perf_counter()
            verdicts = self.engine.evaluate(event)
            self.metrics.rule_evaluation.observe(time.perf_counter() - started)
        for verdict in verdicts:
            self.metrics.rule_matches.labels(verdict.rule, verdict.priority).inc()
            self.contain(verdict)  # before anything is written: containment is a race
            self.metrics.event_to_verdict.observe(max(0, time.time_ns() - event.time_ns) / 1e9)
            self.echo(output.alert_line(verdict))
            record = self.containment.store.active_for(verdict.agent or "") if self.containment else None
            self.alerting.verdict(verdict, dataclasses.asdict(record) if record else None)

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
            synthetic = Verdict("ebpfmon containment", "CRITICAL", notice.message, ["ebpfmon"], [], False, None,
                                ev.ExitEvent(time_ns=time.time_ns(), cgroup_id=0, cgroup=None,
                                             proc=ev.Process(0, 0, 0, 0, 0, "ebpfmon")))
            self.alerting.verdict(synthetic)

    def released(self, record) -> None:
        resolved = self.alerting.resolve_agent(record.agent, record.release_reason or "")
        log.info("released %s by %s; %d incident(s) resolved", record.agent, record.released_by, resolved)

    def delivered(self, sink: str, ok: bool) -> None:
        (self.metrics.alerts_delivered if ok else self.metrics.alerts_failed).labels(sink).inc()

    def cgroup_changed(self, change: CgroupChange) -> None:
        if change.created:
            self.grant_gpus([change.path])

    def grant_gpus(self, paths: list[str] | None = None) -> None:
        """Entitled agents get an allow entry when GPUs are denied by default (gpu_entitled),
        or one limited to their minors (gpu_minors)."""
        if self.enforcer is None or ("*" in self.config.gpu_entitled and not self.config.gpu_minors):
            return
        context = self.engine.context
        for path in paths if paths is not None else self.agent_paths():
            agent = context.agent_cgroup(path)
            if agent != path or not any(fnmatch.fnmatchcase(agent, g) for g in self.config.gpu_entitled):
                continue
            agent_id = self.hierarchy.cgroup_id_or_none(agent)
            if agent_id is None or (self.containment and self.containment.store.active_for(agent)):
                continue  # gone, or contained: a deny_gpu stays
            minors = next((list(m) for glob, m in self.config.gpu_minors if fnmatch.fnmatchcase(agent, glob)), None)
            self.enforcer.set_gpu(agent_id, allow=True, minors=minors)

    def agent_paths(self) -> list[str]:
        return self.containment._agent_paths() if self.containment else []

    def judge_existing_connections(self) -> None:
        """Connections agents held before we started are judged like new ones."""
        for agent in self.agent_paths():
            for conn in sockets.connections(self.hierarchy.path(agent)):
                if conn["protocol"] != "tcp" or conn["state"] not in ("established", "syn-sent"):
                    continue
                self.judge(self.connection_event(agent, conn))

    def connection_event(self, agent: str, conn: dict) -> ev.ConnectEvent:
        host, _, port = conn["remote"].rpartition(":")
        pid = conn["pid"] or 0
        node = self.stream.tree.get(pid) if pid else None
        proc = ev.Process(pid=pid, tid=pid, ppid=node.ppid if node else 0, uid=0, gid=0,
                          comm=conn["comm"] or "?", exe=node.exe if node else None,
                          argv=node.argv if node else None)
        return ev.ConnectEvent(time_ns=time.time_ns(), cgroup_id=self.hierarchy.cgroup_id(agent),
                               cgroup=agent, proc=proc, ancestry=self.stream.tree.ancestry(pid, 8) if pid else [],
                               family="inet6" if ":" in host else "inet", address=host.strip("[]"),
                               port=int(port), sock_type="stream", protocol="tcp", retval=0,
                               source="existing")

    def snapshot(self) -> dict:
        """Metrics read at scrape time from the kernel counters and the daemon's state."""
        self.stream.refresh_counters()
        stats = self.stream.stats
        kinds = sorted(set(stats.events) | set(stats.lost))
        refusals = self.enforcer.counters() if self.enforcer else {}
        return {
            "ebpfmon_events": ("counter", "Events delivered, by kind.", ["kind"],
                               {(k,): stats.events.get(k, 0) for k in kinds}),
            "ebpfmon_events_lost": ("counter", "Events the kernel could not deliver (ring full), by kind.",
                                    ["kind"], {(k,): stats.lost.get(k, 0) for k in kinds}),
            "ebpfmon_events_truncated": ("counter", "Events delivered with a field cut, by kind.", ["kind"],
                                         {(k,): stats.truncated.get(k, 0) for k in kinds}),
            "ebpfmon_events_malformed": ("counter", "Records that did not decode.", [], {(): stats.malformed}),
            "ebpfmon_refusals": ("counter", "Refusals by the kernel enforcement programs, by reason.", ["reason"],
                                 {(k,): v for k, v in refusals.items() if k != "skb_dropped"}),
            "ebpfmon_cut_packets_dropped": ("counter", "Packets of cut agents dropped.", [],
                                            {(): refusals.get("skb_dropped", 0)}),
            "ebpfmon_quarantined_agents": ("gauge", "Agents in quarantine.", [],
                                           {(): len(self.containment.store.active()) if self.containment else 0}),
            "ebpfmon_alert_spool_depth": ("gauge", "Alerts waiting for a sink.", [], {(): self.alerting.spool.depth()}),
            "ebpfmon_alert_spool_dropped": ("counter", "Alerts dropped because the spool was full.", [],
                                            {(): self.alerting.spool.dropped}),
            "ebpfmon_probes_attached": ("gauge", "Probes attached.", [], {(): len(self.stream.probes.probes)}),
        }

    # ---- reload ----

    def reload(self) -> tuple[bool, str]:
        """Configuration (when a file is in use) and rules, atomically: on any problem the running
        set stays, and says why."""
        try:
            config = load_config(self.config_path) if self.config_path else self.config
            changed = [k for k in RESTART_KEYS if getattr(config, k) != getattr(self.config, k)]
            if changed:
                raise EbpfmonError(f"{', '.join(changed)} changed: that needs a restart", "")
            ruleset = load_rules(rule_paths(config))
            deny_networks(config, ruleset.lists)  # a bad network is refused here, not half applied
        except (RuleLoadError, EbpfmonError) as e:
            self.metrics.reload_failures.inc()
            message = f"not reloaded, the running set stays: {e.message.replace(chr(10), ' |')}"
            log.error("%s", message)
            return False, message
        if config.alerts != self.config.alerts:
            self.alerting.close()
            self.alerting = Alerting(config.alerts, config.state_dir, on_delivery=self.delivered).start()
        self.config = config
        self.engine.context = rule_context(config)
        self.engine.load(ruleset)
        if self.enforcer:
            self.configure_enforcement()
        self.metrics.reloads.inc()
        self.metrics.rules_loaded.set(len(ruleset.rules))
        message = f"reloaded: {len(ruleset.rules)} rules"
        log.info("%s", message)
        return True, message


def stdout_printer(line: str) -> None:
    sys.stdout.write(line + "\n")
