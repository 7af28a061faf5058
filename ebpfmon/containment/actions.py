"""Containment: carry out the actions verdicts ask for, safely, and keep the record.

Safety first: only ever an agent cgroup strictly below the agent root, never
the root cgroup, the agent root itself, or the cgroup this daemon runs in;
anything else is refused with a notice. A global dry run and per-rule
`enforce: false` record what would have been done. A breaker per rule
(containment/breaker.py) suspends a rule that starts hitting many agents at
once, and leaves the others containing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ebpfmon.host.cgroups import Hierarchy, cgroup_of
from ebpfmon.config import Config
from ebpfmon.containment import dns
from ebpfmon.containment.breaker import Breaker
from ebpfmon.containment.gpu import GpuGrants
from ebpfmon.host import sockets
from ebpfmon.host.gpus import DeviceModel
from ebpfmon.containment.quarantine import ActionResult, QuarantineStore, Record
from ebpfmon.errors import ContainmentRefused
from ebpfmon.kernel.enforcer import Enforcer
from ebpfmon.rules.vocabulary import DISRUPTIVE_ACTIONS

# rule lists whose addresses are one service: deny_connect on one denies them all
ADDRESS_GROUP_LISTS = ("metadata_service_addresses",)

log = logging.getLogger(__name__)

@dataclass
class Notice:
    """Something containment did or refused, for the alert sinks."""

    priority: str
    message: str


class Containment:
    def __init__(self, enforcer: Enforcer, hierarchy: Hierarchy, config: Config, store: QuarantineStore,
                 clock=time.time_ns, on_release=None, on_action=None, lists: dict[str, list[str]] | None = None,
                 devices: DeviceModel | None = None):
        self.enforcer = enforcer
        self.hierarchy = hierarchy
        self.store = store
        self.clock = clock
        self.agents = enforcer.agents
        self.own_cgroup = cgroup_of(os.getpid()) or "/"
        self.on_release = on_release or (lambda record: None)  # e.g. resolve the pager's incidents
        self.on_action = on_action or (lambda action, result: None)  # e.g. count it
        self.container_of = lambda agent: None  # the container an agent is, as a dict (the daemon's enricher)
        self.breaker = Breaker(config.enforce, lambda: len(self.agent_paths()))
        self.dirty = False  # records changed since the quarantine file was written (flush)
        self.save_failures = 0  # writes of the quarantine file the disk refused in a row
        self.lock = threading.RLock()
        self.address_groups: list[frozenset[str]] = []  # addresses of one service (configure)
        self.shared: list = []  # networks a lookup never puts on the shared deny list (configure)
        self.later: deque[Notice] = deque(maxlen=1024)  # from background work, for take_notices
        self.listing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="connections")
        self.gpus = GpuGrants(enforcer, config, hierarchy, store, devices or DeviceModel.read())
        self.configure(config, lists or {})

    def configure(self, config: Config, lists: dict[str, list[str]]) -> None:
        """Settings and the rules' lists, at start and on reload."""
        with self.lock:
            self.config, self.settings = config, config.enforce
            self.breaker.settings = config.enforce
            self.gpus.config = config
            # one service under several addresses (the metadata service's IPv4 and IPv6 ones):
            # denying one denies them all, or the agent just switches address families
            self.address_groups = [frozenset(_canonical(a) for a in lists.get(name, []) if _canonical(a))
                                   for name in ADDRESS_GROUP_LISTS if lists.get(name)]
            self.shared = [ipaddress.ip_network(n, strict=False)
                           for n in (*config.internal_networks, *config.enforce.keep_open)]

    def take_notices(self) -> list[Notice]:
        """What background work (lookups for deny_connect) has to say since the last call."""
        taken = []
        while self.later:
            taken.append(self.later.popleft())
        return taken

    # ---- safety ----

    def check_target(self, agent: str) -> str:
        """The agent cgroup path, if containment may act on it; else ContainmentRefused."""
        agent = "/" + agent.strip("/") if agent else "/"
        root = self.agents.root_path.rstrip("/")
        if agent == "/":
            raise ContainmentRefused("refused: the root cgroup is never contained (it is the whole host).")
        depth = self.agents.levels_below_root(agent)
        if depth is None:
            raise ContainmentRefused(f"refused: {agent} is not an agent cgroup below the agent root {root}.")
        if depth != self.agents.level:
            raise ContainmentRefused(f"refused: {agent} is not at the agent level ({self.agents.level} "
                                     f"below {root}); name the agent's own cgroup.")
        own = self.own_cgroup.rstrip("/") or "/"
        if own == agent or own.startswith(agent + "/"):
            raise ContainmentRefused(f"refused: {agent} holds ebpfmon itself ({own}).")
        if not self.hierarchy.path(agent).is_dir():
            raise ContainmentRefused(f"refused: cgroup {agent} does not exist (any more).")
        return agent

    # ---- from verdicts ----

    def apply(self, verdict) -> list[Notice]:
        """Carries out a verdict's actions on its agent; notices say what happened."""
        if not verdict.actions:
            return []
        with self.lock:
            try:
                agent = self.check_target(verdict.agent or "")
            except ContainmentRefused as e:
                return [Notice("CRITICAL", f"containment for rule {verdict.rule!r}: {e.message}")]
            now = self.clock()
            dry = self.settings.dry_run or not verdict.enforce
            record = self.store.active_for(agent)
            if record is not None:
                if len(record.triggers) < 100:
                    record.triggers.append({"rule": verdict.rule, "time_ns": now})
                    self.dirty = True
            elif not dry and not verdict.never_suspend and any(a in DISRUPTIVE_ACTIONS for a in verdict.actions):
                mono = time.monotonic_ns()  # the breaker's windows: a wall-clock jump must not move them
                suspension = self.breaker.admit(verdict.rule, agent, mono)
                if suspension is not None:
                    return [self._suspended_notice(verdict.rule, agent, suspension, mono)]
            new = record is None
            if new:
                record = Record(agent=agent, agent_id=self.hierarchy.cgroup_id(agent), rule=verdict.rule,
                                priority=verdict.priority, opened_ns=now, container=self.container_of(agent))
            # act first: a tunnel is being set up while we write things down
            notices = [self._act(record, action, verdict.event, dry, now) for action in verdict.actions]
            if new:
                record.event = verdict.event.to_dict()
                self.store.add(record)
                self.dirty = True
                # listing takes milliseconds of netlink and /proc: not on the reader's thread,
                # where the next agent's cut waits (still listed later: a cut blocks, not closes)
                self.listing.submit(self._list_connections, record)
            return [n for n in notices if n]

    def _list_connections(self, record: Record) -> None:
        connections = self._connections(record.agent)
        with self.lock:
            record.connections = connections
            self.dirty = True

    def close(self) -> None:
        """Finishes the listings under way, then writes the quarantine file."""
        self.listing.shutdown(wait=True)
        self.flush()

    def flush(self) -> None:
        """Writes the quarantine file if records changed: once per batch of verdicts (the
        daemon calls it after each), not per verdict; the kernel state it records is pinned."""
        with self.lock:
            if self.dirty:
                try:
                    self.store.save()
                except OSError as e:  # the kernel has what the records say; written once the disk takes it
                    self.save_failures += 1
                    if self.save_failures == 1 or self.save_failures % 100 == 0:
                        log.error("quarantine file not written (%s): the records wait in memory, %d failure(s)",
                                  e.strerror or e, self.save_failures)
                    return
                if self.save_failures:
                    log.warning("quarantine file written again after %d failure(s)", self.save_failures)
                self.save_failures = 0
                self.dirty = False

    def _suspended_notice(self, rule: str, agent: str, suspension, now: int) -> Notice:
        if suspension.since_ns != now:
            return Notice("NOTICE", f"not acting on {agent} for rule {rule!r}: the rule is suspended by the "
                                    f"containment breaker (alerts go on)")
        until = time.strftime("%H:%M:%S", time.localtime(wall_of(suspension.until_ns) / 1e9))
        shown = ", ".join(suspension.agents[:10]) + (f" and {len(suspension.agents) - 10} more"
                                                     if len(suspension.agents) > 10 else "")
        return Notice("CRITICAL", f"containment breaker: rule {rule!r} contained {len(suspension.agents)} agents "
                                  f"within {self.settings.breaker_seconds:.0f}s ({shown}) and would contain "
                                  f"{agent} too: it is suspended for automatic actions (it still alerts; the other "
                                  f"rules go on containing) until {until}. Check the rule, then resume it: "
                                  f"ebpfmon rules resume {rule!r}")

    def _connections(self, agent: str) -> list[dict]:
        try:
            return sockets.connections(self.hierarchy.path(agent))
        except Exception as e:  # listing is for the responder; containment must go on
            log.warning("cannot list the connections of %s: %s", agent, e)
            return []

    def _act(self, record: Record, action: str, event, dry: bool, now: int) -> Notice | None:
        done = {a.action for a in record.actions if a.result in ("applied", "dry run")}
        if action == "deny_connect":  # once per destination: the next one may be another address
            networks = self._networks_of(getattr(event, "address", None))
            if getattr(event, "dns_query", None) is None and networks and set(networks) <= set(
                    record.denied_networks):
                return None
        elif action in done and (action != "kill" or not _alive(getattr(event.proc, "pid", 0))):
            return None  # a second rule on the same exec: its process is dead already
        detail = ""
        try:
            if dry:
                result = "dry run"
            elif action == "cut_network":
                self.enforcer.cut(record.agent_id, now)
                result = "applied"
            elif action == "deny_gpu":
                self.enforcer.set_gpu(record.agent_id, allow=False)
                result, detail = "applied", self._gpu_holders(record, now)
            elif action == "freeze":
                (self.hierarchy.path(record.agent) / "cgroup.freeze").write_text("1")
                result = "applied"
            elif action == "kill":
                killed = kill_subtree(getattr(event.proc, "pid", 0), self.hierarchy.path(record.agent))
                result, detail = ("applied", f"killed {killed}") if killed else ("failed", "no process left")
            elif action == "deny_connect" and getattr(event, "dns_query", None):
                # a lookup: deny what the name resolves to, not the resolver; asking takes
                # up to seconds, so not here on the reader's thread
                threading.Thread(target=self._deny_resolved, daemon=True,
                                 args=(record.agent, event.dns_query, event.address, event.port)).start()
                result, detail = "applied", f"the addresses of {event.dns_query}, being asked of {event.address}"
            elif action == "deny_connect":
                if not networks:
                    result, detail = "failed", "the event has no destination address"
                else:
                    self._deny(record, networks)
                    result, detail = "applied", ", ".join(networks)
            else:
                result = "failed"
                detail = f"unknown action {action}"
        except OSError as e:
            result, detail = "failed", str(e)
        record.actions.append(ActionResult(action, result, now, detail))
        self.on_action(action, result)
        priority = "CRITICAL" if result == "failed" else "NOTICE"
        return Notice(priority, f"{action} {result} on {record.agent}" + (f" ({detail})" if detail else "")
                      + f" for rule {record.rule!r}")

    def _networks_of(self, address: str | None) -> list[str]:
        """The host networks deny_connect on address denies: it, and the other addresses of
        its service (address_groups)."""
        canonical = _canonical(address)
        if canonical is None:
            return []
        group = next((g for g in self.address_groups if canonical in g), {canonical})
        return [_host_network(a) for a in sorted(group, key=lambda a: (canonical != a, a))]

    def _deny(self, record: Record, networks: list[str]) -> None:
        for network in networks:
            if network not in record.denied_networks:
                self.enforcer.hold_network(network)
                record.denied_networks.append(network)

    def _is_shared(self, address: str) -> bool:
        """Internal, loopback or kept open: never on the shared deny list from a lookup."""
        ip = ipaddress.ip_address(_canonical(address))
        return ip.is_loopback or ip.is_unspecified or any(ip in n for n in self.shared)

    def _deny_resolved(self, agent: str, name: str, server: str, port: int) -> None:
        found = dns.addresses(name, server, port)
        with self.lock:
            record = self.store.active_for(agent)
            if record is None:  # released meanwhile: nothing to deny on its behalf
                return
            now = self.clock()
            for address in found:
                if self._is_shared(address):
                    # the agent's server chose the answer: an internal address on the shared
                    # list would lock every agent out of that service
                    detail = (f"{name} -> {address}: internal or kept open, not denied to every agent")
                    record.actions.append(ActionResult("deny_connect", "refused", now, detail))
                    self.later.append(Notice("CRITICAL", f"deny_connect refused on {agent} for rule "
                                                         f"{record.rule!r}: {detail} (a lookup's answer, which "
                                                         f"the agent's DNS server chose)"))
                    continue
                networks = self._networks_of(address)
                self._deny(record, networks)
                record.actions.append(ActionResult("deny_connect", "applied", now, f"{name} -> {', '.join(networks)}"))
            if not found:
                record.actions.append(ActionResult("deny_connect", "failed", now,
                                                   f"{name} did not resolve at {server}:{port}"))
            self.dirty = True
        self.on_action("deny_connect", "applied" if found else "failed")
        log.info("deny_connect for %s: %s resolves to %s", agent, name, ", ".join(found) or "nothing")

    # ---- by hand ----

    def cut(self, agent: str, by: str, reason: str) -> Record:
        """A manual cut; refused like any other outside the agent cgroups."""
        with self.lock:
            agent = self.check_target(agent)
            now = self.clock()
            record = self.store.active_for(agent)
            if record is None:
                record = Record(agent=agent, agent_id=self.hierarchy.cgroup_id(agent), rule=f"manual: {reason}",
                                priority="CRITICAL", opened_ns=now, connections=self._connections(agent),
                                container=self.container_of(agent))
                self.store.add(record)
            if not record.cut:
                self.enforcer.cut(record.agent_id, now)
                record.actions.append(ActionResult("cut_network", "applied", now, f"by {by}: {reason}"))
            self.dirty = True
            self.flush()
            return record

    def release(self, agent: str, by: str, reason: str = "") -> Record:
        """Undoes what containment did to the agent (a kill cannot be undone) and closes the record."""
        with self.lock:
            agent = "/" + agent.strip("/")
            record = self.store.active_for(agent)
            if record is None:
                raise ContainmentRefused(f"{agent} is not quarantined; see 'ebpfmon quarantine list'.")
            now = self.clock()
            self._hold_denied_networks()  # held with this record's (the CLI without a daemon starts here)
            self.enforcer.uncut(record.agent_id)
            if record.frozen and self.hierarchy.path(agent).is_dir():
                (self.hierarchy.path(agent) / "cgroup.freeze").write_text("0")
            record.actions.append(ActionResult("release", "applied", now, f"by {by}: {reason}"))
            record.status, record.released_ns, record.released_by = "released", now, by
            record.release_reason = reason
            if self.hierarchy.cgroup_id_or_none(agent) == record.agent_id:
                self.gpus.write(agent, record.agent_id)  # its GPUs as before the deny_gpu
            else:
                self.enforcer.clear_gpu(record.agent_id)
            self._hold_denied_networks()  # its networks open unless configured or another holds them
            self.dirty = True
            self.flush()
        self.on_release(record)
        return record

    def _gpu_holders(self, record: Record, now: int) -> str:
        """A device program refuses opens only: what deny_gpu does to the descriptors the
        agent's processes hold already (enforce.gpu_holders)."""
        holders = self.gpus.holders.scan([record.agent])
        if not holders:
            return ""
        pids = sorted({h.pid for h in holders})
        what = self.settings.gpu_holders
        if what == "freeze" and not record.frozen:
            (self.hierarchy.path(record.agent) / "cgroup.freeze").write_text("1")
            record.actions.append(ActionResult("freeze", "applied", now, f"held GPU nodes open: pids {pids}"))
        elif what == "kill":
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return f"{len(holders)} GPU descriptor(s) held by pids {pids}: {what}"

    def _hold_denied_networks(self) -> None:
        self.enforcer.hold_networks({n for r in self.store.active() for n in r.denied_networks})

    # ---- start-up ----

    def reconcile(self) -> list[Notice]:
        """Makes records and kernel state agree; says what it changed."""
        notices = []
        with self.lock:
            kernel_cut = self.enforcer.cut_agents()
            now = self.clock()
            for record in self.store.active():
                path = self.hierarchy.path(record.agent)
                alive = path.is_dir() and self.hierarchy.cgroup_id(record.agent) == record.agent_id
                if not alive:
                    notices.append(self._close_removed(record, now))
                    continue
                if record.cut and record.agent_id not in kernel_cut:
                    self.enforcer.cut(record.agent_id, now)
                    notices.append(Notice("WARNING", f"re-applied the cut of {record.agent} (missing in the kernel)"))
                if record.gpu_denied:
                    self.enforcer.set_gpu(record.agent_id, allow=False)
            self._hold_denied_networks()
            for network in self.enforcer.drop_unowned_networks():
                notices.append(Notice("NOTICE", f"opened {network}: denied in the kernel, but neither configured "
                                                "nor held by a quarantine"))
            recorded = {r.agent_id for r in self.store.active() if r.cut}
            unrecorded = {agent_id: since for agent_id, since in kernel_cut.items() if agent_id not in recorded}
            names = {self.hierarchy.cgroup_id_or_none(p): p for p in self.agent_paths()}  # a stat per agent
            dropped = self.enforcer.drop_entries_of_others(set(names) - {None})
            if dropped:
                notices.append(Notice("NOTICE", f"dropped the kernel entries (GPU grants, egress classes) of "
                                                f"{dropped} agent cgroup(s) removed while no daemon ran"))
            for agent_id, since in unrecorded.items():
                agent = names.get(agent_id)
                if agent is None:
                    self.enforcer.uncut(agent_id)
                    notices.append(Notice("NOTICE", f"dropped a cut of cgroup id {agent_id}: no such agent cgroup"))
                    continue
                record = Record(agent=agent, agent_id=agent_id, rule="found cut in the kernel without a record",
                                priority="WARNING", opened_ns=since, connections=self._connections(agent),
                                actions=[ActionResult("cut_network", "applied", since, "found at start")])
                self.store.add(record)
                notices.append(Notice("WARNING", f"{agent} was cut in the kernel without a record: recorded now"))
            self.dirty = True
            self.flush()
        return notices

    def removed(self, agent: str, agent_id: int) -> Notice | None:
        """The agent's cgroup is gone (its processes with it): its GPU entries go, and its
        quarantine, if any, is closed and its kernel state dropped; the record stays, saying so."""
        with self.lock:
            self.enforcer.clear_gpu(agent_id)
            self.gpus.forget(agent)
            record = self.store.active_for(agent)
            if record is None or record.agent_id != agent_id:
                return None
            notice = self._close_removed(record, self.clock())
            self._hold_denied_networks()  # its networks open unless configured or another holds them
            self.dirty = True
            return notice

    def _close_removed(self, record: Record, now: int) -> Notice:
        self.enforcer.uncut(record.agent_id)
        self.enforcer.clear_gpu(record.agent_id)
        record.actions.append(ActionResult("close", "applied", now, "the agent's cgroup was removed"))
        record.status, record.released_ns, record.released_by = "closed", now, "ebpfmon"
        record.release_reason = "the agent's cgroup was removed"
        return Notice("NOTICE", f"closed the quarantine of {record.agent}: cgroup removed")

    def agent_paths(self) -> list[str]:
        return self.agents.agents(self.hierarchy)

    def grant_gpus(self, paths: list[str]) -> None:
        """GPU entries for the agents among paths (new cgroups, or all at start and on reload)."""
        self.gpus.apply(paths)


def wall_of(monotonic_ns: int) -> int:
    """A monotonic time (the breaker's) as wall-clock ns, for people."""
    return time.time_ns() - (time.monotonic_ns() - monotonic_ns)


def _canonical(address: str | None) -> str | None:
    """An address written one way (IPv4-mapped IPv6 as IPv4: the kernel judges it so)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return None
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


def _host_network(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def kill_subtree(pid: int, cgroup_dir: Path) -> int:
    """SIGKILLs a process and its descendants, only those inside the cgroup; how many."""
    _, members = sockets.subtree(cgroup_dir)
    if pid not in members:
        return 0
    children: dict[int, list[int]] = {}
    for member in members:
        try:
            stat = Path(f"/proc/{member}/stat").read_bytes()
            ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(member)
    victims, todo = [], [pid]
    while todo:
        current = todo.pop()
        victims.append(current)
        todo.extend(children.get(current, []))
    killed = 0
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed
