"""A probe set: probes that compile, attach, scope and detach together.

The daemon, `ebpfmon trace`, the doctor and the tests all start probes through
this class (the way Tetragon's sensors are loaded as one unit). It is the only
module that imports bcc.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ebpfmon.errors import (BccMissingError, NotRootError, ProbeCompileError,
                            ProbeLoadError, TracefsError)
from ebpfmon.kernel import abi
from ebpfmon.kernel.ringbuf import RingBufferReader
from ebpfmon.paths import PROBES_DIR


# probe name -> source; "proc" (fork, exit, cgroups) keeps user-space state
# current and is loaded with every set
PROBES = {
    "exec": "exec.bpf.c",
    "connect": "connect.bpf.c",
    "gpu": "gpu.bpf.c",
    "proc": "proc.bpf.c",
    "enforce": "enforce.bpf.c",  # cgroup programs; uses the connect and gpu probes' state
}
REQUIRES = {"enforce": {"connect", "gpu"}}
# an exec, or an event of the other classes that can lead to containment, wakes the reader
# unless one of its class did less than this ago (probes/common.h, windowed_wake)
WAKE_WINDOW_MS = 5

# how records leave the ring buffer: its shared memory read directly (ebpfmon/kernel/ringbuf.py,
# with libbpf's acquire loads, in C), or bcc's consumer, one ctypes callback per record
RING_READER = "mmap"

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def import_bcc():
    """The bcc module, or a BccMissingError that says how to get it."""
    first = "bcc" not in sys.modules
    try:
        import bcc
    except ImportError as e:
        raise BccMissingError(
            f"the bcc Python module cannot be imported ({e}).",
            "Install Debian's python3-bpfcc (apt-get install python3-bpfcc) and run ebpfmon "
            "with /usr/bin/python3 or a venv made with --system-site-packages. The PyPI "
            "package named 'bcc' is an unrelated project: do not install it.",
        ) from e
    if first:
        # loading libbcc runs LLVM's static constructors, which touch many of its pages
        # once: given back before the compile, they do not add to a start's peak RSS
        release_compiler_memory()
    return bcc


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "ebpfmon must run as root: loading BPF programs needs CAP_BPF, CAP_PERFMON and "
            "CAP_SYS_ADMIN, and watching agents means moving processes between cgroups.",
            "Run it with sudo, or as a service with those capabilities.",
        )


def tracefs_dir() -> str:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    # not mounted (after a reboot, say): mount it, as setup does, when we can
    if os.geteuid() == 0 and os.path.isdir(TRACEFS_DIRS[0]) and \
            os.system(f"mount -t tracefs tracefs {TRACEFS_DIRS[0]} 2>/dev/null") == 0:
        return TRACEFS_DIRS[0]
    raise TracefsError(
        "tracefs is not mounted, so the kernel's tracepoints cannot be found.",
        "Mount it: 'mount -t tracefs tracefs /sys/kernel/tracing'.",
    )


BPFFS = Path("/sys/fs/bpf")


def bpffs_dir(pin_dir: Path) -> None:
    """Makes the pin directory, mounting the BPF filesystem first if needed."""
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[2] == "bpf" and line.split()[1] == str(BPFFS) for line in f)
    if not mounted:
        BPFFS.mkdir(parents=True, exist_ok=True)
        if os.system(f"mount -t bpf bpf {BPFFS}") != 0:
            raise ProbeLoadError(f"cannot mount the BPF filesystem at {BPFFS}, where enforcement keeps its state.",
                                 "Mount it: 'mount -t bpf bpf /sys/fs/bpf'.")
    Path(pin_dir).mkdir(parents=True, exist_ok=True)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean ones are dropped, never lost)
COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_memory() -> None:
    """Gives back what loading bcc and compiling the probes left resident and never
    touches again: the heap clang and LLVM used (glibc keeps freed memory otherwise), and
    the pages of the LLVM and clang libraries themselves (about 80 MiB of resident memory
    after a compile here; file pages the kernel would reclaim under pressure anyway). A
    later compile reads them back from the page cache."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and any(name in fields[5] for name in COMPILER_LIBRARIES):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                # PAGEOUT, not DONTNEED: relocated (dirty, copy-on-write) pages must stay
                libc.madvise(start, end - start, MADV_PAGEOUT)  # EINVAL before 5.4: harmless


def probe_source(probes: Iterable[str], probes_dir: Path = PROBES_DIR) -> str:
    """The C text bcc compiles: common.h, then each probe, inlined.

    Inlined rather than #included because bcc rewrites map calls
    (events.ringbuf_output...) and finds TRACEPOINT_PROBEs only in the main file.
    """
    wanted = set(probes)
    for name in list(wanted):
        wanted |= REQUIRES.get(name, set())
    # dependencies first: enforce uses maps of connect and gpu
    names = ["proc"] + sorted(wanted - {"proc", "enforce"}) + (["enforce"] if "enforce" in wanted else [])
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; known: {sorted(PROBES)}")
    parts = [(probes_dir / "common.h").read_text()]
    parts += [f"/* ---- {PROBES[n]} ---- */\n" + (probes_dir / PROBES[n]).read_text() for n in names]
    return "\n".join(parts)


class ProbeSet:
    """Compiles and attaches probes; owns their maps and the ring buffer."""

    def __init__(self, probes: Iterable[str] = ("exec", "connect", "gpu"), ringbuf_pages: int = 1024,
                 probes_dir: Path = PROBES_DIR, pin_dir: Path | None = None, ring_reader: str = RING_READER):
        wanted = set(probes) | {"proc"}
        for name in list(wanted):
            wanted |= REQUIRES.get(name, set())
        self.probes = sorted(wanted)
        self.ringbuf_pages = ringbuf_pages
        self.probes_dir = probes_dir
        if "enforce" in self.probes and pin_dir is None:
            raise ValueError("the enforce probe keeps its state in pinned maps: give pin_dir")
        self.pin_dir = pin_dir
        if ring_reader not in ("mmap", "bcc"):
            raise ValueError(f"ring_reader is mmap or bcc, not {ring_reader!r}")
        self.ring_reader = ring_reader
        self._reader: RingBufferReader | None = None
        self._bpf = None
        self._all_cgroups = False
        self._scope_generation = 0

    def source(self) -> str:
        return probe_source(self.probes, self.probes_dir)

    def cflags(self) -> list[str]:
        if self.ringbuf_pages <= 0 or self.ringbuf_pages & (self.ringbuf_pages - 1):
            raise ValueError(f"ring buffer pages must be a power of two, not {self.ringbuf_pages}")
        # -fno-unroll-loops: the kernel's verifier takes bounded loops (5.3+; the ring
        # buffer needs 5.8), and clang unrolling the argv and GPU-prefix loops is a large
        # part of the start; the programs' run time is the same either way.
        # -O1: the same programs (everything is always_inline) for much less of the
        # compile's CPU, the largest part of the start (bench/README.md has the numbers)
        flags = [f"-I{self.probes_dir}", f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                 f"-DWAKE_WINDOW_NS={WAKE_WINDOW_MS * 1_000_000}", "-fno-unroll-loops", "-O1"]
        if self.pin_dir is not None:
            flags.append(f'-DPIN_DIR="{self.pin_dir}"')
        return flags

    @staticmethod
    def preflight():
        """Root, bcc and tracefs, checked before anything else is touched; the bcc module."""
        require_root()
        bcc = import_bcc()
        tracefs_dir()
        return bcc

    def load(self) -> "ProbeSet":
        """Compiles, loads and attaches every tracepoint; scope starts empty."""
        bcc = self.preflight()
        if self.pin_dir is not None:
            bpffs_dir(self.pin_dir)
        try:
            self._bpf = bcc.BPF(text=self.source().encode(), cflags=self.cflags())
        except Exception as e:  # bcc raises bare Exception
            text = str(e)
            if "compile" in text.lower():
                raise ProbeCompileError(
                    f"bcc could not compile the probes {self.probes} (the compiler's messages are above).",
                    "Kernel headers are the usual cause: check /lib/modules/$(uname -r)/build and run "
                    "'ebpfmon doctor'.") from e
            raise ProbeLoadError(f"the kernel refused the probes {self.probes}: {text}.",
                                 "Run 'ebpfmon doctor' to see which kernel feature is missing.") from e
        self._write_config(all_cgroups=False)
        release_compiler_memory()
        return self

    @property
    def bpf(self):
        if self._bpf is None:
            raise RuntimeError("probe set is not loaded")
        return self._bpf

    def _write_config(self, all_cgroups: bool) -> None:
        """Writes the probes' settings with a new scope generation: verdicts the probes cached
        (common.h, in_scope) under the old scope no longer count. Called after every change
        of scope_cgroups, so a probe that reads the new generation also sees the new scope."""
        self._all_cgroups = all_cgroups
        self._scope_generation += 1
        table = self.bpf[b"config"]
        table[ctypes.c_int(0)] = abi.ProbeConfig(all_cgroups=int(all_cgroups), ignore_tgid=os.getpid(),
                                                 scope_generation=self._scope_generation)

    def set_all_cgroups(self, enabled: bool) -> None:
        """Trace every cgroup (ad-hoc tracing), except this process itself."""
        self._write_config(all_cgroups=enabled)

    def add_scope(self, cgroup_id: int) -> None:
        """Watches a cgroup and everything created below it."""
        self.bpf[b"scope_cgroups"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint8(1)
        self._write_config(self._all_cgroups)

    def set_gpu_prefixes(self, prefixes: Iterable[str]) -> None:
        prefixes = list(prefixes)
        if len(prefixes) > abi.GPU_PREFIXES_MAX:
            raise ValueError(f"at most {abi.GPU_PREFIXES_MAX} GPU path prefixes, got {len(prefixes)}")
        if "gpu" not in self.probes:
            return
        table = self.bpf[b"gpu_prefixes"]
        for i in range(abi.GPU_PREFIXES_MAX):
            entry = abi.GpuPrefix()
            if i < len(prefixes):
                raw = os.fsencode(prefixes[i])
                if not raw or len(raw) >= abi.GPU_PREFIX_MAX:
                    raise ValueError(f"GPU path prefix {prefixes[i]!r} must be 1 to "
                                     f"{abi.GPU_PREFIX_MAX - 1} bytes")
                entry.len, entry.prefix = len(raw), raw
            table[ctypes.c_int(i)] = entry

    def open_ring_buffer(self, callback: Callable[[bytes], None]) -> None:
        """Calls callback with each record's bytes, from poll()."""
        if self.ring_reader == "mmap":
            self._reader = RingBufferReader(self.bpf[b"events"].map_fd, self.ringbuf_pages * mmap.PAGESIZE,
                                            callback)
            return

        def on_record(_ctx, data, size):
            callback(ctypes.string_at(data, size))
            return 0  # bcc turns the result into an int: None would cost a caught TypeError per record

        self._callback = on_record  # bcc keeps no reference of its own
        self.bpf[b"events"].open_ring_buffer(on_record)

    def poll(self, timeout_ms: int) -> bool:
        """Waits up to timeout_ms for a wakeup, then drains everything, woken or not; whether
        records were left behind one being written (see RingBufferReader.behind)."""
        if self._reader is not None:
            self._reader.poll(timeout_ms)
            return self._reader.behind()
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        return False  # bcc's reader does not say

    def counters(self) -> dict[abi.EventKind, dict[abi.Counter, int]]:
        """Per-kind kernel counters (lost, truncated, throttled), summed over CPUs."""
        table = self.bpf[b"counters"]
        result = {}
        for kind in abi.EventKind:
            result[kind] = {}
            for counter in abi.Counter:
                values = table[ctypes.c_int(kind * abi.COUNTER_MAX + counter)]
                result[kind][counter] = sum(values)
        return result

    def lost_by_cgroup(self) -> dict[int, int]:
        """Events lost since the probes were loaded, by the cgroup id whose events they were."""
        return {k.value: sum(v) for k, v in self.bpf[b"lost_by_cgroup"].items()}

    def close(self) -> None:
        """Detaches every probe and frees the maps."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> "ProbeSet":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()
