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
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ebpfmon.config import Config
from ebpfmon.containment.quarantine import QuarantineStore
from ebpfmon.errors import ContainmentRefused
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.host.gpus import DeviceModel, GpuNameError, Selection
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

    # ---- what an agent may use ----

    def selection(self, agent: str) -> Selection:
        """The GPUs agent may use (empty: none); a grant naming a GPU this node lacks grants
        the rest, loudly."""
        grant = self.scheduled.get(agent)
        if grant is not None:
            names: list[str | int] | None = list(grant.gpus)
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
        reload. An entry is written only where the agent differs from the default."""
        default_deny = "*" not in self.config.gpu_entitled
        with self.lock:
            for path in paths:
                if not self.config.agents.is_agent(path):
                    continue
                agent_id = self.hierarchy.cgroup_id_or_none(path)
                if agent_id is None or self.store.active_for(path):
                    continue  # gone, or contained: a deny_gpu stays
                grant = self.scheduled.get(path)
                if grant is not None and grant.cgroup_id != agent_id:
                    if grant.cgroup_id is not None:  # a grant for a cgroup of that name that is gone
                        del self.scheduled[path]
                        self._save()
                    else:
                        grant.cgroup_id = agent_id
                        self._save()
                self.write(path, agent_id, default_deny)

    def write(self, path: str, agent_id: int, default_deny: bool | None = None) -> None:
        if default_deny is None:
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

    def forget(self, path: str) -> None:
        """The agent's cgroup was removed: its scheduled grant ends with it."""
        with self.lock:
            if self.scheduled.pop(path, None) is not None:
                self._save()

    # ---- grants from the scheduler ----

    def grant(self, agent: str, names: list[str], by: str) -> Selection:
        """Sets the agent's GPUs to names (replacing what it had); for a cgroup that does not
        exist yet, when it is made. ContainmentRefused for a name that is not a GPU here."""
        agent = self._agent(agent)
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
        agent = self._agent(agent)
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

    def _agent(self, agent: str) -> str:
        agent = "/" + agent.strip("/")
        if not self.config.agents.is_agent(agent):
            agent = self.hierarchy.child(self.config.agent_root, agent.strip("/"))
        if not self.config.agents.is_agent(agent):
            raise ContainmentRefused(f"{agent} is not an agent cgroup: agents are {self.config.agent_level} "
                                     f"level(s) below {self.config.agent_root}")
        return agent

    def listing(self) -> list[dict]:
        """Every agent with GPUs other than the default, and every scheduled grant."""
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
