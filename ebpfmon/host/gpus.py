"""The node's GPUs and their device nodes, read from the host: which device numbers belong to
which GPU, which are control nodes every GPU process opens, which are MIG instances.

The kernel judges device numbers (major:minor), never paths. What a number is comes from
/proc/devices (majors by driver name), the NVIDIA driver's /proc/driver/nvidia/gpus/*/information
(device minor, UUID and PCI bus id, no NVML needed), /proc/driver/nvidia-caps/mig-minors (the
minors of MIG capability nodes) and sysfs (which PCI device a DRM or accel node is). Numbers the
model has not seen are judged by their major's rule (GpuMajor), so a node made later still has a class.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ebpfmon.host.devices import STATIC_MAJORS, char_drivers
from ebpfmon.kernel.abi import GPU_INDEX_MAX, GpuMajor, GpuNodeClass

# /proc/devices driver name -> how the kernel judges its minors
DRIVER_MAJORS = {
    "nvidia": GpuMajor.NVIDIA,
    "nvidia-frontend": GpuMajor.NVIDIA,
    "nvidia-uvm": GpuMajor.SHARED,
    "kfd": GpuMajor.SHARED,
    "drm": GpuMajor.DRM,
    "accel": GpuMajor.INDEXED,
    "nvidia-caps": GpuMajor.ADMIN,
    "nvidia-nvswitch": GpuMajor.ADMIN,
    "nvidia-nvlink": GpuMajor.ADMIN,
    "nvidia-caps-imex-channels": GpuMajor.ADMIN,
}

NVIDIA_MODESET, NVIDIACTL = 254, 255
DRM_CONTROL = 64  # DRM minors: cardN, controlD(64+N), renderD(128+N)

BUS_ID = re.compile(r"^(?:([0-9a-f]{4,8}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$", re.IGNORECASE)
MIG_NAME = re.compile(r"^gpu(\d+)/gi(\d+)(?:/ci(\d+))?$")
INDEX = re.compile(r"^\d+$")
ALL = ("all", "*")


class GpuNameError(ValueError):
    """A GPU name that is not an index, a UUID, a PCI bus id, a MIG instance or all."""


@dataclass(frozen=True)
class Gpu:
    index: int  # the device minor: /dev/nvidiaN
    uuid: str | None = None
    bus_id: str | None = None  # 0000:18:00.0
    model: str | None = None


@dataclass(frozen=True)
class Node:
    """What a device number is: its class, and the GPU (and MIG instance) it belongs to."""

    major: int
    minor: int
    node_class: GpuNodeClass
    gpu: int | None = None
    mig: tuple[int, int, int | None] | None = None  # (gpu, gi, ci); ci None: the GPU instance's own
    path: str | None = None

    @property
    def number(self) -> str:
        return f"{self.major}:{self.minor}"

    def describe(self) -> str:
        what = self.node_class.name.lower()
        if self.mig:
            gpu, gi, ci = self.mig
            what += f" gpu{gpu}/gi{gi}" + (f"/ci{ci}" if ci is not None else "")
        elif self.gpu is not None:
            what += f" {self.gpu}"
        return what


@dataclass(frozen=True)
class Selection:
    """GPUs an agent may use: whole GPUs by index (None: every GPU, administration included)
    and MIG instances (gpu, gi, ci), ci None for every compute instance of the GPU instance."""

    gpus: frozenset[int] | None = frozenset()
    mig: frozenset[tuple[int, int, int | None]] = frozenset()

    @property
    def every(self) -> bool:
        return self.gpus is None

    @property
    def empty(self) -> bool:
        return self.gpus is not None and not self.gpus and not self.mig

    def names(self) -> list[str]:
        """The selection as GPU names a grant takes back (["all"] for every GPU)."""
        if self.every:
            return ["all"]
        names = [str(i) for i in sorted(self.gpus)]
        return names + [f"gpu{g}/gi{i}" + (f"/ci{c}" if c is not None else "") for g, i, c in sorted(
            self.mig, key=lambda m: (m[0], m[1], -1 if m[2] is None else m[2]))]

    def without(self, other: "Selection") -> "Selection":
        """What is left when other is taken away (every GPU taken leaves nothing)."""
        if other.every:
            return Selection()
        return Selection(self.gpus - other.gpus, self.mig - other.mig)

    def describe(self) -> str:
        return ",".join(self.names()) or "none"

    def allows(self, node: "Node") -> bool:
        """Whether the selection opens the node: as the kernel's gpu_allowed judges it."""
        if self.every:
            return True
        if self.empty:
            return False
        if node.node_class == GpuNodeClass.SHARED:
            return True
        if node.node_class == GpuNodeClass.GPU:
            return node.gpu in self.gpus or any(g == node.gpu for g, _, _ in self.mig)
        if node.node_class == GpuNodeClass.MIG:
            gpu, gi, ci = node.mig
            return gpu in self.gpus or any(g == gpu and i == gi and (c is None or ci is None or c == ci)
                                           for g, i, c in self.mig)
        return False


def parse_gpu_name(name: str | int) -> str:
    """The canonical spelling of one GPU name; GpuNameError says what a name may be."""
    text = str(name).strip()
    if text.lower() in ALL or INDEX.match(text) or MIG_NAME.match(text):
        return text.lower() if text.lower() in ALL else text
    if text.upper().startswith("GPU-") and len(text) > 4:
        return "GPU-" + text[4:].lower()
    if text.upper().startswith("MIG-"):
        raise GpuNameError(f"{text!r}: MIG UUIDs need NVML; name the instance as gpuN/giM/ciK "
                           "(nvidia-smi mig -lgi and -lci list them)")
    if BUS_ID.match(text):
        return _bus_id(text)
    raise GpuNameError(f"{text!r} is not a GPU: give an index (0), a UUID (GPU-...), a PCI bus id "
                       "(0000:18:00.0), a MIG instance (gpu0/gi1/ci0) or all")


def _bus_id(text: str) -> str:
    domain, bus, device, function = BUS_ID.match(text).groups()
    return f"{int(domain or '0', 16):04x}:{bus.lower()}:{device.lower()}.{function}"


@dataclass
class DeviceModel:
    """The GPUs and GPU device numbers of one host."""

    majors: dict[int, int] = field(default_factory=dict)  # major -> MAJOR_*
    gpus: dict[int, Gpu] = field(default_factory=dict)  # by index
    nodes: dict[tuple[int, int], Node] = field(default_factory=dict)  # what the majors' rules do not say
    mig_minors: dict[tuple[int, int, int | None], int] = field(default_factory=dict)  # instance -> caps minor

    @classmethod
    def read(cls, proc: str = "/proc", dev: str = "/dev", sys: str = "/sys",
             extra_dirs: tuple[str, ...] = ()) -> "DeviceModel":
        """The model of this host; never raises: what cannot be read is left out."""
        model = cls()
        drivers = {**STATIC_MAJORS, **char_drivers(f"{proc}/devices")}
        model.majors = {major: DRIVER_MAJORS[name] for major, name in drivers.items() if name in DRIVER_MAJORS}
        model.gpus = read_nvidia_gpus(f"{proc}/driver/nvidia/gpus")
        model.mig_minors = read_mig_minors(f"{proc}/driver/nvidia-caps/mig-minors")
        caps_major = next((m for m, name in drivers.items() if name == "nvidia-caps"), None)
        if caps_major is not None:
            for (gpu, gi, ci), minor in model.mig_minors.items():
                model.nodes[(caps_major, minor)] = Node(caps_major, minor, GpuNodeClass.MIG, gpu, (gpu, gi, ci))
        for path, major, minor in device_nodes((dev, f"{dev}/dri", f"{dev}/accel", f"{dev}/nvidia-caps",
                                                 *extra_dirs)):
            node = model.classify(major, minor, sys_pci=_pci_of(sys, major, minor))
            if node is not None:
                model.nodes[(major, minor)] = Node(major, minor, node.node_class, node.gpu, node.mig, path)
        return model

    def classify(self, major: int, minor: int, sys_pci: str | None = None) -> Node | None:
        """What a device number is; None for a major that is no GPU's. sys_pci: the PCI bus id
        sysfs gives a DRM or accel node, matched against the NVIDIA GPUs."""
        known = self.nodes.get((major, minor))
        if known is not None:
            return known
        kind = self.majors.get(major)
        if kind is None:
            return None
        if kind == GpuMajor.NVIDIA:
            if minor in (NVIDIA_MODESET, NVIDIACTL):
                return Node(major, minor, GpuNodeClass.SHARED)
            return Node(major, minor, GpuNodeClass.GPU, minor)
        if kind == GpuMajor.SHARED:
            return Node(major, minor, GpuNodeClass.SHARED)
        if kind in (GpuMajor.DRM, GpuMajor.INDEXED):
            index = minor % DRM_CONTROL if kind == GpuMajor.DRM else minor
            if sys_pci is not None and self.gpus:
                owner = self.by_bus_id(sys_pci)
                # a display that is no GPU of the driver's (a BMC's VGA): not handed out by index
                return Node(major, minor, GpuNodeClass.GPU, owner.index) if owner else Node(major, minor, GpuNodeClass.ADMIN)
            return Node(major, minor, GpuNodeClass.GPU, index)
        return Node(major, minor, GpuNodeClass.ADMIN)

    def by_bus_id(self, bus_id: str) -> Gpu | None:
        return next((g for g in self.gpus.values() if g.bus_id == bus_id), None)

    def select(self, names: list[str | int] | tuple[str | int, ...]) -> Selection:
        """The GPUs names choose; GpuNameError for a name that is malformed or not on this node."""
        gpus: set[int] = set()
        mig: set[tuple[int, int, int | None]] = set()
        for raw in names:
            name = parse_gpu_name(raw)
            if name in ALL:
                return Selection(None, frozenset())
            if INDEX.match(name):
                index = int(name)
                if index >= GPU_INDEX_MAX:
                    raise GpuNameError(f"GPU {index}: indexes above {GPU_INDEX_MAX - 1} are not supported")
                gpus.add(index)  # an index the node lacks today is still that GPU's number
            elif match := MIG_NAME.match(name):
                gpu, gi, ci = int(match[1]), int(match[2]), None if match[3] is None else int(match[3])
                if self.mig_minors and (gpu, gi, ci) not in self.mig_minors:
                    raise GpuNameError(f"{name}: no such MIG instance in the driver's mig-minors")
                mig.add((gpu, gi, ci))
            else:
                gpu = (next((g for g in self.gpus.values() if g.uuid == name), None) if name.startswith("GPU-")
                       else self.by_bus_id(name))
                if gpu is None:
                    known = ", ".join(f"{g.index}={g.uuid or '?'}@{g.bus_id or '?'}" for g in self.gpus.values())
                    raise GpuNameError(f"{name}: no such GPU on this node (GPUs: {known or 'none known'})")
                gpus.add(gpu.index)
        return Selection(frozenset(gpus), frozenset(mig))

    def mig_nodes(self, selection: Selection) -> set[tuple[int, int]]:
        """The caps device numbers a selection's MIG instances open: the GPU instance's and the
        compute instance's (every compute instance's when none is named)."""
        caps_major = next((major for (major, _), node in self.nodes.items() if node.node_class == GpuNodeClass.MIG), None)
        out: set[tuple[int, int]] = set()
        if caps_major is None:
            return out
        for gpu, gi, ci in selection.mig:
            for (g, i, c), minor in self.mig_minors.items():
                if g == gpu and i == gi and (c is None or ci is None or c == ci):
                    out.add((caps_major, minor))
        return out

    def gpu_nodes(self) -> list[Node]:
        """The nodes of GPUs and control nodes present under the scanned directories."""
        return sorted((n for n in self.nodes.values() if n.path), key=lambda n: (n.major, n.minor))


def read_nvidia_gpus(directory: str) -> dict[int, Gpu]:
    """GPUs from the driver's /proc/driver/nvidia/gpus/<bus id>/information files."""
    gpus: dict[int, Gpu] = {}
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return gpus
    for entry in entries:
        try:
            text = Path(directory, entry, "information").read_text()
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        try:
            index = int(fields["Device Minor"])
        except (KeyError, ValueError):
            continue
        uuid = fields.get("GPU UUID")
        bus = fields.get("Bus Location") or entry
        gpus[index] = Gpu(index, "GPU-" + uuid[4:].lower() if uuid and uuid.upper().startswith("GPU-") else uuid,
                          _bus_id(bus) if BUS_ID.match(bus) else bus, fields.get("Model"))
    return gpus


def read_mig_minors(path: str) -> dict[tuple[int, int, int | None], int]:
    """MIG instance -> minor of its capability node, from the driver's mig-minors
    ("gpu0/gi1/access 12", "gpu0/gi1/ci0/access 13"; config and monitor are administration)."""
    out: dict[tuple[int, int, int | None], int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, minor = line.strip().rpartition(" ")
        match = re.match(r"^gpu(\d+)/gi(\d+)(?:/ci(\d+))?/access$", name)
        if match and minor.isdigit():
            ci = None if match[3] is None else int(match[3])
            out[(int(match[1]), int(match[2]), ci)] = int(minor)
    return out


def device_nodes(directories) -> list[tuple[str, int, int]]:
    """(path, major, minor) of the character devices directly in each directory."""
    found = []
    for directory in directories:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode):
                found.append((entry.path, os.major(st.st_rdev), os.minor(st.st_rdev)))
    return found


def _pci_of(sys: str, major: int, minor: int) -> str | None:
    """The PCI bus id of a character device, from sysfs (DRM and accel nodes have one)."""
    try:
        target = os.path.realpath(f"{sys}/dev/char/{major}:{minor}/device")
    except OSError:
        return None
    name = os.path.basename(target)
    return _bus_id(name) if BUS_ID.match(name) and os.path.exists(target) else None
