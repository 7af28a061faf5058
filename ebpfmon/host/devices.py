"""GPU device paths -> device number and vendor, resolved in user space.

The kernel matches paths by prefix only; what the path is (which device,
whose GPU) is found here from the device node, /proc/devices and sysfs.
Lookups are cached and degrade to None, never raise.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# Well-known character majors, for nodes whose driver is not loaded (then
# /proc/devices does not list them): NVIDIA registers 195 statically.
STATIC_MAJORS = {195: "nvidia", 226: "drm"}

# /proc/devices driver name -> vendor; drm and accel need sysfs for the vendor
DRIVER_VENDORS = {
    "nvidia": "nvidia",
    "nvidia-frontend": "nvidia",
    "nvidia-uvm": "nvidia",
    "nvidia-caps": "nvidia",
    "nvidia-nvlink": "nvidia",
    "nvidia-nvswitch": "nvidia",
    "nvidia-caps-imex-channels": "nvidia",
    "nvidiactl": "nvidia",
    "kfd": "amd",
}

PCI_VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x1DB7: "habana"}


@dataclass(frozen=True)
class Device:
    major: int
    minor: int
    vendor: str | None

    @property
    def number(self) -> str:
        return f"{self.major}:{self.minor}"


def char_drivers(proc_devices: str = "/proc/devices") -> dict[int, str]:
    """Character device majors -> driver names, from /proc/devices."""
    drivers: dict[int, str] = {}
    try:
        with open(proc_devices) as f:
            in_char = False
            for line in f:
                line = line.strip()
                if line.endswith(":"):
                    in_char = line == "Character devices:"
                elif in_char and line:
                    major, _, name = line.partition(" ")
                    drivers[int(major)] = name
    except OSError:
        pass
    return drivers


def _pci_vendor(major: int, minor: int, sys_dev: str) -> str | None:
    try:
        with open(f"{sys_dev}/char/{major}:{minor}/device/vendor") as f:
            return PCI_VENDORS.get(int(f.read().strip(), 16))
    except (OSError, ValueError):
        return None


class DeviceResolver:
    def __init__(self, proc_devices: str = "/proc/devices", sys_dev: str = "/sys/dev"):
        self.drivers = {**STATIC_MAJORS, **char_drivers(proc_devices)}
        self.sys_dev = sys_dev
        self._cache: dict[str, Device | None] = {}

    def vendor_of(self, number: str) -> str | None:
        """The vendor of a device given as major:minor (cgroup device hook events)."""
        major, _, minor = number.partition(":")
        driver = self.drivers.get(int(major))
        vendor = DRIVER_VENDORS.get(driver) if driver else None
        if vendor is None and driver in ("drm", "accel"):
            vendor = _pci_vendor(int(major), int(minor), self.sys_dev)
        return vendor

    def resolve(self, path: str, pid: int = 0) -> Device | None:
        """The device at an absolute path, as the process pid sees it when it still runs
        (its mount namespace may differ from ours), else as we see it."""
        if not path.startswith("/"):
            return None  # relative to a dirfd we cannot know any more
        if path in self._cache:
            return self._cache[path]
        device = st = None
        for candidate in ((f"/proc/{pid}/root{path}",) if pid else ()) + (path,):
            try:
                st = os.stat(candidate)
                break
            except (OSError, ValueError):
                continue
        if st is not None and stat.S_ISCHR(st.st_mode):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            device = Device(major, minor, self.vendor_of(f"{major}:{minor}"))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[path] = device
        return device
