"""GPU grants: when GPUs are denied by default (gpu_entitled does not hold "*") or limited to
some devices (gpu_minors), each entitled agent gets its own entry in the kernel's device policy."""

from __future__ import annotations

import fnmatch

from ebpfmon.config import Config
from ebpfmon.containment.quarantine import QuarantineStore
from ebpfmon.host.cgroups import Hierarchy
from ebpfmon.kernel.enforcer import Enforcer


def grant_gpus(enforcer: Enforcer, config: Config, hierarchy: Hierarchy, store: QuarantineStore,
               paths: list[str]) -> None:
    """Allow entries for the entitled agents among paths; contained agents keep their denial."""
    if "*" in config.gpu_entitled and not config.gpu_minors:
        return  # every agent may use every GPU: no entry needed
    for path in paths:
        if not config.agents.is_agent(path) or not any(fnmatch.fnmatchcase(path, g) for g in config.gpu_entitled):
            continue
        agent_id = hierarchy.cgroup_id_or_none(path)
        if agent_id is None or store.active_for(path):
            continue  # gone, or contained: a deny_gpu stays
        minors = next((list(m) for glob, m in config.gpu_minors if fnmatch.fnmatchcase(path, glob)), None)
        enforcer.set_gpu(agent_id, allow=True, minors=minors)
