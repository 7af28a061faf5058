"""Prometheus metrics (prometheus-client), served on metrics.listen (127.0.0.1:9464): the
whole schema is here.

Counters the daemon increments live in Metrics; numbers that are kept elsewhere
(the kernel's lost/truncated/refusal counters, the spool, the quarantine) are
read when Prometheus scrapes, by snapshot().
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ebpfmon import __version__

if TYPE_CHECKING:
    from ebpfmon.service.daemon import Daemon

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rule_matches = Counter("ebpfmon_rule_matches", "Verdicts, by rule and priority.",
                                    ["rule", "priority"], registry=r)
        self.actions = Counter("ebpfmon_actions", "Containment actions, by action and result.",
                               ["action", "result"], registry=r)
        self.alerts_delivered = Counter("ebpfmon_alerts_delivered", "Alerts a sink took.", ["sink"], registry=r)
        self.alerts_failed = Counter("ebpfmon_alerts_failed", "Failed delivery attempts, by sink.", ["sink"],
                                     registry=r)
        self.rule_evaluation = Histogram("ebpfmon_rule_evaluation_seconds", "Time to judge one event.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.event_to_verdict = Histogram("ebpfmon_event_to_verdict_seconds",
                                          "From the kernel's timestamp of an event to its verdict.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.event_to_action = Histogram("ebpfmon_event_to_action_seconds",
                                         "From the kernel's timestamp of an event to containment's actions on "
                                         "it done (cut, kill, freeze, deny in force).",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.reload_failures = Counter("ebpfmon_rules_reload_failures", "Reloads refused (bad rules or config).",
                                       registry=r)
        self.reloads = Counter("ebpfmon_rules_reloads", "Reloads taken.", registry=r)
        self.rules_loaded = Gauge("ebpfmon_rules_loaded", "Rules in force.", registry=r)
        self.egress_refusals = Counter("ebpfmon_egress_refusals", "Destinations egress profiles did not allow, "
                                       "by profile; outcome: refused, or reported (audit mode, dry run).",
                                       ["profile", "outcome"], registry=r)
        self.containments = Counter("ebpfmon_containments", "Verdicts that asked for containment, by rule (what "
                                    "was done: ebpfmon_actions).", ["rule"], registry=r)
        self.dns_questions = Counter("ebpfmon_dns_questions", "Questions agents asked the DNS proxy, by profile and "
                                     "verdict: answered, refused, would-refuse (audit mode), failed (no upstream "
                                     "answered).", ["profile", "verdict"], registry=r)
        Info("ebpfmon_build", "Build of ebpfmon.", registry=r).info({"version": __version__})
        self._server = None

    def watch(self, read: Callable[[], dict]) -> None:
        """Registers a collector reading {name: (type, help, labelnames, {labels: value})} at scrape time."""
        self.registry.register(_Snapshot(read))

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Snapshot:
    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def collect(self):
        for name, (kind, help_text, labels, values) in self.read().items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=labels)
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family


def gpu_holders(daemon: "Daemon") -> dict[tuple[str], int]:
    """Distinct holding processes per GPU, from the holders the daemon keeps (no scan)."""
    if not daemon.containment:
        return {}
    by_gpu: dict[tuple[str], set[int]] = {}
    for holder in daemon.containment.gpus.holders.current():
        node = holder.node
        label = str(node.gpu) if node.gpu is not None else node.node_class.name.lower()
        by_gpu.setdefault((label,), set()).add(holder.pid)
    return {label: len(pids) for label, pids in by_gpu.items()}


def snapshot(daemon: "Daemon") -> dict:
    """What is read at scrape time, from the kernel counters and the daemon's state."""
    daemon.stream.refresh_counters()
    stats = daemon.stream.stats
    kinds = sorted(set(stats.events) | set(stats.lost))
    refusals = daemon.enforcer.counters() if daemon.enforcer else {}
    return {
        "ebpfmon_events": ("counter", "Events delivered, by kind.", ["kind"],
                           {(k,): stats.events.get(k, 0) for k in kinds}),
        "ebpfmon_events_lost": ("counter", "Events the kernel could not deliver (ring full), by kind.",
                                ["kind"], {(k,): stats.lost.get(k, 0) for k in kinds}),
        "ebpfmon_events_truncated": ("counter", "Events delivered with a field cut, by kind.", ["kind"],
                                     {(k,): stats.truncated.get(k, 0) for k in kinds}),
        "ebpfmon_events_throttled": ("counter", "Refusals (and the refused syscalls) not sent as events because "
                                     "their cgroup used its budget for the second; counted in ebpfmon_refusals "
                                     "all the same, by kind.", ["kind"],
                                     {(k,): stats.throttled.get(k, 0) for k in kinds}),
        "ebpfmon_events_malformed": ("counter", "Records that did not decode.", [], {(): stats.malformed}),
        "ebpfmon_refusals": ("counter", "Refusals by the kernel enforcement programs, by reason.", ["reason"],
                             {(k,): v for k, v in refusals.items() if k != "skb_dropped"}),
        "ebpfmon_cut_packets_dropped": ("counter", "Packets of cut agents dropped.", [],
                                        {(): refusals.get("skb_dropped", 0)}),
        "ebpfmon_quarantine_writes": ("counter", "Writes of the quarantine file (each with two fsyncs): once per "
                                      "batch of verdicts that changed records.", [],
                                      {(): daemon.containment.store.writes if daemon.containment else 0}),
        "ebpfmon_quarantined_agents": ("gauge", "Agents in quarantine.", [],
                                       {(): len(daemon.containment.store.active()) if daemon.containment else 0}),
        "ebpfmon_alert_spool_depth": ("gauge", "Alerts waiting for a sink.", [], {(): daemon.alerting.spool.depth()}),
        "ebpfmon_alert_spool_dropped": ("counter", "Alerts dropped because the spool was full.", [],
                                        {(): daemon.alerting.spool.dropped}),
        "ebpfmon_alerts_unspooled": ("gauge", "Alerts waiting in memory because the spool could not be written.",
                                     [], {(): len(daemon.alerting.unspooled)}),
        "ebpfmon_loop_errors": ("counter", "Errors the daemon's loop survived (logged with their traceback).", [],
                                {(): daemon.loop_errors}),
        "ebpfmon_quarantine_write_failures": ("gauge", "Writes of the quarantine file refused in a row (records "
                                              "wait in memory).", [],
                                              {(): daemon.containment.save_failures if daemon.containment else 0}),
        "ebpfmon_audit_write_failures": ("counter", "Writes of the audit log the disk refused (full, read-only); "
                                         "the lines wait in memory.", [],
                                         {(): daemon.audit.write_failures if daemon.audit else 0}),
        "ebpfmon_audit_lines_dropped": ("counter", "Audit lines dropped because the disk refused them for longer "
                                        "than memory could hold them.", [],
                                        {(): daemon.audit.lines_dropped if daemon.audit else 0}),
        "ebpfmon_events_exported": ("counter", "Events a sink's exporter published and JetStream acknowledged, by "
                                    "sink.", ["sink"], {(e.name,): e.exported for e in daemon.exports}),
        "ebpfmon_event_export_failures": ("counter", "Export rounds that failed (the server down, the log "
                                          "unreadable); the cursor waits, by sink.", ["sink"],
                                          {(e.name,): e.failures for e in daemon.exports}),
        "ebpfmon_event_export_gaps": ("counter", "Places where events were not exported: the log rotated past the "
                                      "cursor, or its chain broken there, by sink.", ["sink"],
                                      {(e.name,): e.gaps for e in daemon.exports}),
        "ebpfmon_event_export_too_large": ("counter", "Events larger than a message may be, not exported (whole in "
                                           "the audit log), by sink.", ["sink"],
                                           {(e.name,): e.too_large for e in daemon.exports}),
        "ebpfmon_event_export_behind_bytes": ("gauge", "Audit log bytes not yet read by a sink's exporter.", ["sink"],
                                              {(e.name,): e.behind_bytes for e in daemon.exports}),
        "ebpfmon_gpu_holders": ("gauge", "Processes in agents holding GPU device nodes open, by GPU index (control "
                                "and administration nodes by their class).", ["gpu"], gpu_holders(daemon)),
        "ebpfmon_probes_attached": ("gauge", "Probes attached.", [], {(): len(daemon.stream.probes.probes)}),
        "ebpfmon_rules_suspended": ("gauge", "Rules the containment breaker suspended (they alert, they contain "
                                    "no one), by rule.", ["rule"],
                                    {(rule,): 1 for rule in (daemon.containment.breaker.active()
                                                             if daemon.containment else {})}),
    }
