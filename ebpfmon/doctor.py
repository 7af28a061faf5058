"""Doctor: checks everything the monitor needs, each with a fix when it fails."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ebpfmon.host.cgroups import cgroup2_mount
from ebpfmon.errors import EbpfmonError
from ebpfmon.kernel import enforcer, features
from ebpfmon.kernel.probeset import PROBES, ProbeSet, import_bcc, tracefs_dir

# capability bits (linux/capability.h)
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    warning: bool = False  # passed, but with something to know

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAIL" if self.required else "n/a"
        return "WARN" if self.warning else "ok"


def effective_caps(status: str = "/proc/self/status") -> int:
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = effective_caps()
    missing = [name for name, bit in CAPS.items() if not caps & (1 << bit)]
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    if missing:
        return Check("privileges", False, f"{who}, missing {', '.join(missing)}",
                     "Run as root (sudo ebpfmon ...), or grant these capabilities to the service.")
    return Check("privileges", True, f"{who}, CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_NET_ADMIN")


def check_bcc() -> Check:
    try:
        bcc = import_bcc()
    except EbpfmonError as e:
        return Check("bcc", False, e.message, e.fix)
    version = getattr(bcc, "__version__", "unknown version")
    return Check("bcc", True, f"bcc {version} ({Path(bcc.__file__).parent})")


def check_headers() -> Check:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    fix = ("Install linux-headers-$(uname -r); where the distribution has none for this kernel, "
           "'make setup' links the installed headers of another version (probes read no kernel "
           "structs, so that is safe).")
    if not (build / "include").is_dir():
        return Check("kernel headers", False, f"{build} is missing", fix)
    target = build.resolve()
    if release not in target.name:
        return Check("kernel headers", True, f"fallback in use: {build} -> {target} (not {release}); "
                     "fine for ebpfmon's probes", warning=True)
    return Check("kernel headers", True, f"{build} -> {target}")


def check_btf() -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    if path.exists():
        return Check("BTF", True, str(path), required=False)
    return Check("BTF", False, f"{path} missing (not needed by ebpfmon's probes)",
                 "Optional: a kernel built with CONFIG_DEBUG_INFO_BTF=y.", required=False)


def check_tracefs() -> Check:
    try:
        return Check("tracefs", True, tracefs_dir())
    except EbpfmonError as e:
        return Check("tracefs", False, e.message, e.fix)


def check_cgroup2() -> Check:
    try:
        mount = cgroup2_mount()
    except EbpfmonError as e:
        return Check("cgroup v2", False, e.message, e.fix)
    hybrid = " (hybrid host: v1 controllers mounted too)" if str(mount) != "/sys/fs/cgroup" else ""
    return Check("cgroup v2", True, f"mounted at {mount}{hybrid}")


def _kernel_check(name: str, detail: str, fix: str, load: Callable[[], object],
                  required: bool = True) -> Check:
    try:
        load()
    except Exception as e:
        message = e.message if isinstance(e, EbpfmonError) else str(e)
        return Check(name, False, message.splitlines()[0][:200], fix, required=required)
    return Check(name, True, detail, required=required)


def run_checks() -> list[Check]:
    checks = [check_privileges(), check_bcc(), check_headers(), check_btf(), check_tracefs(), check_cgroup2()]
    basics_ok = all(c.ok for c in checks if c.required)
    kernel: list[tuple[str, str, str, Callable[[], object], bool]] = [
        ("ring buffer", "BPF_MAP_TYPE_RINGBUF loads and maps for the reader", "Needs Linux 5.8 or newer.",
         features.ring_buffer, True),
    ]
    for probe in sorted(set(PROBES) - {"enforce"}):
        kernel.append((f"probe {probe}", f"probes/{PROBES[probe]} compiles, loads and attaches",
                       "See the compiler or verifier message; 'make setup' installs headers.",
                       lambda p=probe: ProbeSet([p]).load().close(), True))
    kernel.append(("probe enforce", "probes/enforce.bpf.c compiles; its 7 cgroup programs pass the verifier",
                   "See the verifier message; needs CONFIG_CGROUP_BPF and the BPF filesystem.",
                   enforcer.check_loads, True))
    for hook in features.CGROUP_HOOKS:
        kernel.append((f"cgroup hook {hook}", "loads", "Needs CONFIG_CGROUP_BPF.",
                       lambda h=hook: features.cgroup_hook(h), True))
    for name, fix in features.OPTIONAL_PROGRAMS.items():
        kernel.append((name, "available (not used)", fix, lambda n=name: features.optional(n), False))
    for name, detail, fix, load, required in kernel:
        if basics_ok:
            checks.append(_kernel_check(name, detail, fix, load, required))
        else:
            checks.append(Check(name, False, "not tried: fix the failures above first", "", required))
    return checks
