"""The daemon: probes, rules, containment and the control socket, started and
stopped as one. `ebpfmon run` is a thin wrapper; tests start it the same way.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon import output
from ebpfmon.cgroups import Hierarchy
from ebpfmon.config import Config
from ebpfmon.containment import sockets
from ebpfmon.containment.actions import Containment, Notice
from ebpfmon.containment.control import ControlServer
from ebpfmon.containment.quarantine import QuarantineStore
from ebpfmon.decode import CgroupChange
from ebpfmon.kernel.enforcer import Enforcer, pin_dir
from ebpfmon.kernel.probeset import ProbeSet
from ebpfmon.monitor import EventStream
from ebpfmon.network import NetworkClassifier
from ebpfmon.rules.engine import Engine, Verdict
from ebpfmon.rules.fields import Context
from ebpfmon.rules.loader import RuleLoadError, load_rules

log = logging.getLogger("ebpfmon")

Printer = Callable[[str], None]


def rule_context(config: Config) -> Context:
    """What rule fields need from the configuration and the node."""
    return Context(agent_root=config.agent_root, agent_level=config.agent_level,
                   gpu_entitled=config.gpu_entitled, networks=NetworkClassifier(config.internal_networks))


def deny_ports(config: Config, lists: dict[str, list[str]]) -> tuple[int, ...]:
    """The ports no agent may reach: configured, or the rules' mining_pool_ports list."""
    if config.enforce.deny_ports is not None:
        return config.enforce.deny_ports
    return tuple(int(p) for p in lists.get("mining_pool_ports", []) if str(p).isdigit())


class Daemon:
    def __init__(self, config: Config, rule_paths: list[Path], show_events: bool = False, json_alerts: bool = False,
                 emit: Printer = print):
        self.config = config
        self.rule_paths = rule_paths
        self.show_events = show_events
        self.json_alerts = json_alerts
        self.emit = emit
        self.hierarchy = Hierarchy()
        self.engine = Engine(load_rules(rule_paths), rule_context(config))
        ProbeSet.preflight()
        self.hierarchy.ensure(config.agent_root)
        self.pins = pin_dir(self.hierarchy, config.agent_root)
        self.stream = EventStream(config, hierarchy=self.hierarchy, enforce_pins=self.pins,
                                  on_cgroup=self.cgroup_changed)
        self.enforcer: Enforcer | None = None
        self.containment: Containment | None = None
        self.control: ControlServer | None = None
        self.reload_requested = threading.Event()
        self.verdicts = 0

    # ---- start and stop ----

    def start(self) -> "Daemon":
        """Probes, enforcement, reconciliation, control socket, then what agents already hold."""
        self.stream.start(self.judge)
        self.enforcer = Enforcer(self.stream.probes, self.hierarchy, self.config.agent_root, self.config.agent_level)
        self.configure_enforcement()
        self.enforcer.attach()
        self.containment = Containment(self.enforcer, self.hierarchy, self.config,
                                       QuarantineStore(self.config.enforce.state_dir))
        self.grant_gpus()
        for notice in self.containment.reconcile():
            self.notify(notice)
        self.control = ControlServer(self.containment, self.config.enforce.state_dir).start()
        self.judge_existing_connections()
        return self

    def configure_enforcement(self) -> None:
        settings = self.config.enforce
        self.enforcer.configure(dry_run=settings.dry_run, gpu_default_deny="*" not in self.config.gpu_entitled,
                                keep_open=settings.keep_open, deny_ports=deny_ports(self.config,
                                                                                    self.engine.ruleset.lists),
                                deny_networks=settings.deny_networks)

    def run(self, stop: threading.Event, every: Callable[[], None] | None = None) -> None:
        def each_second() -> None:
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if every:
                every()

        self.stream.run(stop, every=each_second)

    def close(self) -> None:
        """Stops watching. Enforcement stays attached: cuts outlive the daemon."""
        if self.control:
            self.control.stop()
        self.stream.close()

    # ---- events ----

    def judge(self, event: ev.Event) -> None:
        if self.show_events:
            self.emit(output.table_line(event))
        for verdict in self.engine.evaluate(event):
            self.verdicts += 1
            self.contain(verdict)  # before anything is written: containment is a race
            self.emit(verdict.to_json() if self.json_alerts else output.alert_line(verdict))

    def contain(self, verdict: Verdict) -> None:
        if self.containment is None or not verdict.actions:
            return
        for notice in self.containment.apply(verdict):
            self.notify(notice)

    def notify(self, notice: Notice) -> None:
        line = f"{output.clock(self.containment.clock() if self.containment else 0)} {notice.priority:<8} " \
               f"ebpfmon containment: {notice.message}"
        self.emit(line)

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
                event = self.connection_event(agent, conn)
                if event is not None:
                    self.judge(event)

    def connection_event(self, agent: str, conn: dict) -> ev.ConnectEvent | None:
        host, _, port = conn["remote"].rpartition(":")
        pid = conn["pid"] or 0
        node = self.stream.tree.get(pid) if pid else None
        proc = ev.Process(pid=pid, tid=pid, ppid=node.ppid if node else 0, uid=0, gid=0,
                          comm=conn["comm"] or "?", exe=node.exe if node else None,
                          argv=node.argv if node else None)
        return ev.ConnectEvent(time_ns=self.containment.clock(), cgroup_id=self.hierarchy.cgroup_id(agent),
                               cgroup=agent, proc=proc, ancestry=self.stream.tree.ancestry(pid, 8) if pid else [],
                               family="inet6" if ":" in host else "inet", address=host.strip("[]"),
                               port=int(port), sock_type="stream", protocol="tcp", retval=0,
                               source="existing")

    # ---- rules ----

    def reload(self) -> bool:
        """Loads the rules again; on any problem keeps the running set and says why."""
        try:
            ruleset = load_rules(self.rule_paths)
        except RuleLoadError as e:
            log.error("rules not reloaded, the running set stays: %s", e.message.replace("\n", " |"))
            return False
        self.engine.load(ruleset)
        if self.enforcer:
            self.configure_enforcement()
        log.info("rules reloaded: %d rules", len(ruleset.rules))
        return True


def stdout_printer(line: str) -> None:
    sys.stdout.write(line + "\n")
