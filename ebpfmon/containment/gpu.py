"""GPU grants: which GPUs each agent may open, written into the kernel's device policy.

An agent's GPUs come from whoever schedules its job first (`ebpfmon gpu grant`, `ebpfmon exec
--gpus`, kept in the state directory so they outlive the daemon), else from the configuration
(gpu_entitled globs, limited by gpu_devices). An entitled agent always gets the control nodes
its GPUs need (nvidiactl, nvidia-uvm...); a contained agent keeps its deny_gpu.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from ebpfmon import events as ev
from ebpfmon.config import Config
from ebpfmon.containment.quarantine import QuarantineStore
from ebpfmon.errors import ContainmentRefused
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.host.sockets import subtree
from ebpfmon.host.devices import DeviceResolver
from ebpfmon.host.gpus import DeviceModel, GpuNameError, Node, Selection
from ebpfmon.kernel.enforcer import Enforcer

log = logging.getLogger(__name__)

GRANTS_FILE = "gpu-grants.json"
NOTHING = Selection()


@dataclass
class ScheduledGrant:
    """A scheduler's grant for one agent cgroup path: the GPUs by the names it gave."""

    agent: str
    gpus: list[str]
    by: str
    since_ns: int
    cgroup_id: int | None = None  # bound when the cgroup exists; a grant made before it waits


class GpuGrants:
    def __init__(self, enforcer: Enforcer, config: Config, hierarchy: Hierarchy, store: QuarantineStore,
                 devices: DeviceModel):
        self.enforcer = enforcer
        self.config = config
        self.hierarchy = hierarchy
        self.store = store
        self.devices = devices
        self.path = Path(config.state_dir) / GRANTS_FILE
        self.lock = threading.RLock()
        self.scheduled: dict[str, ScheduledGrant] = self._load()
        # what a container's trusted label says (names; None: every GPU), and the containers whose
        # labels are not read yet (no GPU meanwhile)
        self.labelled: dict[str, list[str] | None] = {}
        self.awaiting_labels: set[str] = set()
        self.holders = GpuHolders(devices, hierarchy)
        self.vendors = DeviceResolver()
        # GPU descriptors held beyond a grant, found by scans: judged by the daemon's rules
        self.held_events: deque[ev.GpuHeldEvent] = deque(maxlen=4096)

    def set_devices(self, devices: DeviceModel) -> None:
        """A new model of the node's devices (the kernel's comes from Enforcer.set_devices)."""
        self.devices = self.holders.devices = devices

    # ---- what an agent may use ----

    def selection(self, agent: str) -> Selection:
        """The GPUs agent may use (empty: none); a grant naming a GPU this node lacks grants
        the rest, loudly."""
        grant = self.scheduled.get(agent)
        if grant is not None:
            names: list[str | int] | None = list(grant.gpus)
        elif agent in self.awaiting_labels:
            return NOTHING
        elif agent in self.labelled:
            names = self.labelled[agent]
            if names == []:
                return NOTHING
        elif any(fnmatch.fnmatchcase(agent, g) for g in self.config.gpu_entitled):
            names = next((list(n) for glob, n in self.config.gpu_devices if fnmatch.fnmatchcase(agent, glob)), None)
        else:
            return NOTHING
        if names is None:
            return Selection(None)
        try:
            return self.devices.select(names)
        except GpuNameError as e:
            log.error("GPU grant of %s: %s; granting what resolves", agent, e)
            return self._resolvable(names)

    def _resolvable(self, names: list[str | int]) -> Selection:
        gpus, mig = set(), set()
        for name in names:
            try:
                one = self.devices.select([name])
            except GpuNameError:
                continue
            if one.every:
                return one
            gpus |= one.gpus
            mig |= one.mig
        return Selection(frozenset(gpus), frozenset(mig))

    def entitled(self, agent: str) -> bool:
        return not self.selection(agent).empty

    # ---- the kernel ----

    def apply(self, paths: list[str]) -> None:
        """Kernel entries for the agents among paths: new cgroups, all of them at start and on a
        reload. An entry is written only where the agent differs from the default; where every
        agent may use every GPU and the kernel holds no entry, there is nothing to do per agent."""
        if self._every_agent_every_gpu() and not self.enforcer.gpu_entries:
            return
        with self.lock:
            for path in paths:
                if not self.config.agents.is_agent(path):
                    continue
                agent_id = self.hierarchy.cgroup_id_or_none(path)
                if agent_id is None or self.store.active_for(path):
                    continue  # gone, or contained: a deny_gpu stays
                grant = self.scheduled.get(path)
                if grant is not None and grant.cgroup_id != agent_id:
                    if grant.cgroup_id is None:  # a grant made before the cgroup: bound now
                        grant.cgroup_id = agent_id
                    else:  # a grant for a cgroup of that name that is gone
                        del self.scheduled[path]
                    self._save()
                self.write(path, agent_id)

    def write(self, path: str, agent_id: int) -> None:
        default_deny = "*" not in self.config.gpu_entitled
        selection = self.selection(path)
        if selection.empty:
            if default_deny:
                self.enforcer.clear_gpu(agent_id)
            else:
                self.enforcer.set_gpu(agent_id, allow=False)
        elif selection.every and not default_deny:
            self.enforcer.clear_gpu(agent_id)
        else:
            self.enforcer.set_gpu(agent_id, allow=True, selection=selection,
                                  mig_nodes=self.devices.mig_nodes(selection))

    def await_labels(self, agent: str) -> None:
        """A new container whose labels choose its GPUs: none until they are read."""
        self.awaiting_labels.add(agent)

    def choose(self, agent: str, label: str | None) -> None:
        """What the container's label says: "all", "none", or GPUs ("0,1", uuids, bus ids);
        without the label, the configuration's globs decide. In force at once."""
        self.awaiting_labels.discard(agent)
        if label is None:
            self.labelled.pop(agent, None)
        else:
            text = label.strip().lower()
            self.labelled[agent] = (None if text == "all" else [] if text in ("none", "")
                                    else [n.strip() for n in label.split(",") if n.strip()])
        self.apply([agent])

    def forget(self, path: str) -> None:
        """The agent's cgroup was removed: its scheduled grant and its holders end with it."""
        self.holders.forget(path)
        self.labelled.pop(path, None)
        self.awaiting_labels.discard(path)
        with self.lock:
            if self.scheduled.pop(path, None) is not None:
                self._save()

    def beyond_grants(self, agents: list[str]) -> list[Holder]:
        """The descriptors the agents hold that their grants do not cover (a revoked grant, an
        inherited descriptor, a deny_gpu), each queued as an event for the rules."""
        if self._every_agent_every_gpu():
            return []
        out = []
        for holder in self.holders.scan(agents):
            record = self.store.active_for(holder.agent)
            if record is not None and record.gpu_denied or not self.selection(holder.agent).allows(holder.node):
                out.append(holder)
        for holder in out:
            self.held_events.append(ev.GpuHeldEvent(
                time_ns=time.time_ns(), cgroup_id=self.hierarchy.cgroup_id_or_none(holder.agent) or 0, cgroup=None,
                proc=ev.Process(holder.pid, holder.pid, 0, 0, 0, holder.comm), path=holder.path, fd=holder.fd,
                device=holder.node.number, vendor=self.vendors.vendor_of(holder.node.number), node=holder.node.describe(),
                access=holder.access, agent=holder.agent))
        return out

    def _every_agent_every_gpu(self) -> bool:
        """Every agent may open every GPU node (the default): no entry is needed, no descriptor
        is held beyond a grant."""
        return ("*" in self.config.gpu_entitled and not self.config.gpu_devices and not self.scheduled
                and not self.labelled and not self.awaiting_labels and not any(r.gpu_denied for r in self.store.active()))

    # ---- grants from the scheduler ----

    def grant(self, agent: str, names: list[str], by: str) -> Selection:
        """Sets the agent's GPUs to names (replacing what it had); for a cgroup that does not
        exist yet, when it is made. ContainmentRefused for a name that is not a GPU here."""
        agent = self.agent_path(agent)
        try:
            selection = self.devices.select(names)
        except GpuNameError as e:
            raise ContainmentRefused(f"not granted: {e}") from None
        with self.lock:
            agent_id = self.hierarchy.cgroup_id_or_none(agent)
            self.scheduled[agent] = ScheduledGrant(agent, [str(n) for n in names], by, time.time_ns(), agent_id)
            self._save()
            if agent_id is not None and not self.store.active_for(agent):
                self.write(agent, agent_id)
        return selection

    def revoke(self, agent: str, names: list[str] | None, by: str) -> Selection:
        """Takes GPUs away (names None: all of them); what the agent keeps is returned. The
        agent's next open is refused; descriptors it holds stay open (a cgroup device program
        cannot revoke them): `ebpfmon gpu` lists them."""
        agent = self.agent_path(agent)
        with self.lock:
            before = self.selection(agent)
            if names is None:
                keep: list[str] = []
            else:
                try:
                    drop = self.devices.select(names)
                except GpuNameError as e:
                    raise ContainmentRefused(f"not revoked: {e}") from None
                if before.every and not drop.every:
                    raise ContainmentRefused(f"{agent} holds every GPU; revoke them all, or grant the ones "
                                             "it keeps with 'ebpfmon gpu grant'")
                keep = before.without(drop).names()
            return self.grant(agent, keep, by)

    def agent_path(self, agent: str) -> str:
        """An agent's cgroup path from a path or a name below the agent root."""
        agent = "/" + agent.strip("/")
        if not self.config.agents.is_agent(agent):
            agent = self.hierarchy.child(self.config.agent_root, agent.strip("/"))
        if not self.config.agents.is_agent(agent):
            raise ContainmentRefused(f"{agent} is not an agent cgroup: agents are {self.config.agent_level} "
                                     f"level(s) below {self.config.agent_root}")
        return agent

    def listing(self) -> list[dict]:
        """Every agent there is, and every scheduled grant: the GPUs each may use, and from where."""
        out = []
        for agent in sorted(set(self.config.agents.agents(self.hierarchy)) | set(self.scheduled)):
            grant = self.scheduled.get(agent)
            out.append({"agent": agent, "gpus": self.selection(agent).describe(),
                        "from": f"grant by {grant.by}" if grant else "configuration",
                        "exists": self.hierarchy.cgroup_id_or_none(agent) is not None})
        return out

    # ---- the file ----

    def _load(self) -> dict[str, ScheduledGrant]:
        try:
            data = json.loads(self.path.read_text())
            return {g["agent"]: ScheduledGrant(**g) for g in data["grants"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("GPU grants in %s unreadable (%s): set aside as %s; agents get the configuration's GPUs",
                      self.path, e, aside.name)
            try:
                self.path.rename(aside)
            except OSError:
                pass
            return {}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps({"grants": [asdict(g) for g in self.scheduled.values()]}, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:  # the kernel has the grant; it is lost only if the daemon restarts
            log.error("GPU grants not saved to %s: %s", self.path, e.strerror)


@dataclass(frozen=True)
class Holder:
    """One descriptor of a GPU device node that an agent's process holds open."""

    agent: str
    pid: int
    comm: str
    fd: int
    path: str
    node: Node
    access: str


class GpuHolders:
    """Which agents hold which GPU nodes open: a scan of the agents' /proc/PID/fd at start, on
    grants and when asked, kept current by open events; a descriptor closed or a process gone
    drops out when the holders are next read."""

    def __init__(self, devices: DeviceModel, hierarchy: Hierarchy):
        self.devices = devices
        self.hierarchy = hierarchy
        self.held: dict[tuple[int, int], Holder] = {}  # (pid, fd) -> holder
        self.lock = threading.Lock()

    def scan(self, agents: list[str]) -> list[Holder]:
        """The descriptors the agents' processes hold now (these agents' entries replaced)."""
        found = [h for agent in agents for pid in sorted(subtree(self.hierarchy.path(agent))[1])
                 for h in self._of_pid(agent, pid)]
        with self.lock:
            names = set(agents)
            self.held = {k: h for k, h in self.held.items() if h.agent not in names}
            self.held.update({(h.pid, h.fd): h for h in found})
        return found

    def forget(self, agent: str) -> None:
        with self.lock:
            self.held = {k: h for k, h in self.held.items() if h.agent != agent}

    def opened(self, agent: str, pid: int, fd: int) -> None:
        """An open that succeeded (a gpu_open event): the descriptor it returned."""
        holder = self._descriptor(agent, pid, fd)
        if holder is not None:
            with self.lock:
                self.held[(pid, fd)] = holder

    def current(self) -> list[Holder]:
        """Every holder still holding: each descriptor checked again (cost: the holders, not the agents)."""
        with self.lock:
            held = list(self.held.items())
        gone = [key for key, h in held if _device_of(h.pid, h.fd) != (h.node.major, h.node.minor)]
        with self.lock:
            for key in gone:
                self.held.pop(key, None)
            return sorted(self.held.values(), key=lambda h: (h.agent, h.pid, h.fd))

    def _of_pid(self, agent: str, pid: int) -> list[Holder]:
        try:
            fds = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]
        except (OSError, ValueError):
            return []
        return [h for fd in fds if (h := self._descriptor(agent, pid, fd)) is not None]

    def _descriptor(self, agent: str, pid: int, fd: int) -> Holder | None:
        number = _device_of(pid, fd)
        node = self.devices.classify(*number) if number else None
        if node is None:
            return None
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, StopIteration, ValueError):
            return None
        access = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}.get(flags & os.O_ACCMODE, "")
        return Holder(agent, pid, comm, fd, path, node, access)


def _device_of(pid: int, fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
