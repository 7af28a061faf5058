"""Built-in defaults: what ebpfmon does when nobody configured anything."""

from __future__ import annotations

from dataclasses import dataclass, field

from ebpfmon.network import DEFAULT_INTERNAL_NETWORKS

# Device paths of GPUs and accelerators. Matched as prefixes in the kernel, so
# "/dev/nvidia" covers /dev/nvidia0..N, /dev/nvidiactl and /dev/nvidia-uvm*.
DEFAULT_GPU_PREFIXES = (
    "/dev/nvidia",
    "/dev/dri/renderD",
    "/dev/dri/card",
    "/dev/kfd",
    "/dev/accel/",
)

# cgroup (relative to the cgroup2 mount) under which every agent runs, one
# child cgroup per agent. Not a .slice: systemd owns those names.
DEFAULT_AGENT_ROOT = "/ebpfmon-agents"


@dataclass(frozen=True)
class EnforceSettings:
    """What containment may do, and what it leaves alone."""

    # report what would be refused or cut, enforce nothing
    dry_run: bool = False
    # destinations a cut agent may still reach
    keep_open: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # ports no agent may connect or send to; None: the rules' mining_pool_ports list
    deny_ports: tuple[int, ...] | None = None
    deny_networks: tuple[str, ...] = ()
    # automatic cuts, freezes and kills of distinct agents allowed within rate_seconds;
    # past that, containment stops and says so (a misfiring rule must not cut the fleet)
    rate_limit: int = 5
    rate_seconds: float = 60.0
    state_dir: str = "/var/lib/ebpfmon"


@dataclass(frozen=True)
class Config:
    agent_root: str = DEFAULT_AGENT_ROOT
    gpu_prefixes: tuple[str, ...] = field(default=DEFAULT_GPU_PREFIXES)
    # 4 MiB: a Python reader keeps up with ~500k events/s; a 900k/s producer
    # was seen to overflow a ring of this size (DESIGN.md)
    ringbuf_pages: int = 1024
    # longest a no-wakeup event waits in the ring before the reader drains it
    drain_interval_ms: int = 50
    # ancestors (parent, grandparent...) attached to every event
    ancestry_depth: int = 8
    # the agent is the cgroup this many levels below the agent root
    agent_level: int = 1
    # cgroup globs of agents allowed to use GPUs; every agent by default
    gpu_entitled: tuple[str, ...] = ("*",)
    # entitled agents limited to some GPUs: (cgroup glob, device minors), first match wins
    gpu_minors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # destinations counted as internal (fd.is_internal), besides what the
    # node's own routes reach other than by the default route
    internal_networks: tuple[str, ...] = DEFAULT_INTERNAL_NETWORKS
    enforce: EnforceSettings = field(default_factory=EnforceSettings)
