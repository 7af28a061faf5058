"""GPU device resolution from device nodes, /proc/devices and sysfs."""

import os

from ebpfmon.host.devices import DeviceResolver, char_drivers

PROC_DEVICES = """Character devices:
  1 mem
195 nvidia-frontend
226 drm
508 nvidia-uvm
510 kfd

Block devices:
  8 sd
"""


def test_char_drivers(tmp_path):
    f = tmp_path / "devices"
    f.write_text(PROC_DEVICES)
    assert char_drivers(str(f)) == {1: "mem", 195: "nvidia-frontend", 226: "drm", 508: "nvidia-uvm",
                                    510: "kfd"}


def test_resolves_nodes(tmp_path):
    f = tmp_path / "devices"
    f.write_text(PROC_DEVICES)
    sysdev = tmp_path / "sys"
    (sysdev / "char/226:128/device").mkdir(parents=True)
    (sysdev / "char/226:128/device/vendor").write_text("0x1002\n")
    for name, major, minor in [("nvidia0", 195, 0), ("uvm", 508, 0), ("renderD128", 226, 128),
                               ("kfd", 510, 0), ("other", 1, 3)]:
        os.mknod(tmp_path / name, 0o600 | 0o020000, os.makedev(major, minor))
    r = DeviceResolver(str(f), str(sysdev))
    assert (r.resolve(str(tmp_path / "nvidia0")).number, r.resolve(str(tmp_path / "nvidia0")).vendor) == \
        ("195:0", "nvidia")
    assert r.resolve(str(tmp_path / "uvm")).vendor == "nvidia"
    assert r.resolve(str(tmp_path / "renderD128")).vendor == "amd"
    assert r.resolve(str(tmp_path / "kfd")).vendor == "amd"
    assert r.resolve(str(tmp_path / "other")).vendor is None
    assert r.resolve(str(tmp_path / "missing")) is None
    assert r.resolve("relative/nvidia0") is None
    (tmp_path / "plain").write_text("")
    assert r.resolve(str(tmp_path / "plain")) is None  # not a character device
