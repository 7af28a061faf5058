"""The device model on a recorded NVIDIA node layout (tests/data/gpu-hosts): which device
numbers are which GPU's, which are control nodes, which are MIG instances; GPU names."""

import pytest

from helpers import materialize_gpu_host

from ebpfmon.host.gpus import DeviceModel, GpuNameError, Selection, parse_gpu_name
from ebpfmon.kernel.abi import GpuMajor, GpuNodeClass


@pytest.fixture
def dgx(tmp_path) -> DeviceModel:
    proc, dev, sys_ = materialize_gpu_host("dgx-h100", tmp_path)
    return DeviceModel.read(proc=str(proc), dev=str(dev), sys=str(sys_))


def node(model, major, minor):
    n = model.classify(major, minor)
    return n.node_class, n.gpu


def test_majors_by_driver_name(dgx):
    assert dgx.majors == {195: GpuMajor.NVIDIA, 226: GpuMajor.DRM, 234: GpuMajor.ADMIN, 235: GpuMajor.ADMIN,
                          236: GpuMajor.ADMIN, 237: GpuMajor.ADMIN, 508: GpuMajor.SHARED}


def test_gpus_from_the_drivers_information_files(dgx):
    assert sorted(dgx.gpus) == list(range(8))
    assert dgx.gpus[0].uuid == "GPU-1b7e0c52-9d4f-3a61-8e20-5c9f7a3d1e01"
    assert dgx.gpus[3].bus_id == "0000:5d:00.0"
    assert dgx.gpus[7].model == "NVIDIA H100 80GB HBM3"


def test_per_gpu_nodes_against_control_nodes(dgx):
    for minor in range(8):
        assert node(dgx, 195, minor) == (GpuNodeClass.GPU, minor)  # nvidiaN
    assert node(dgx, 195, 255)[0] == GpuNodeClass.SHARED  # nvidiactl
    assert node(dgx, 195, 254)[0] == GpuNodeClass.SHARED  # nvidia-modeset
    assert node(dgx, 508, 0)[0] == node(dgx, 508, 1)[0] == GpuNodeClass.SHARED  # nvidia-uvm, -tools
    assert node(dgx, 234, 255)[0] == GpuNodeClass.ADMIN  # nvswitch: the fabric manager's
    assert node(dgx, 235, 0)[0] == GpuNodeClass.ADMIN  # IMEX channel
    assert node(dgx, 236, 1)[0] == node(dgx, 236, 2)[0] == GpuNodeClass.ADMIN  # MIG config, monitor
    assert dgx.classify(1, 3) is None  # /dev/null is no GPU's
    assert dgx.nodes[(195, 255)].path.endswith("/nvidiactl")


def test_drm_nodes_follow_their_pci_device_not_their_number(dgx):
    # card0 is the BMC's display: no GPU's, so nobody gets it by a GPU index
    assert node(dgx, 226, 0)[0] == GpuNodeClass.ADMIN
    # card1 and renderD128 are both GPU 0 (0000:18:00.0)
    assert node(dgx, 226, 1) == (GpuNodeClass.GPU, 0)
    assert node(dgx, 226, 128) == (GpuNodeClass.GPU, 0)
    assert node(dgx, 226, 8) == node(dgx, 226, 135) == (GpuNodeClass.GPU, 7)


def test_without_sysfs_drm_numbers_decide(tmp_path):
    proc, dev, _ = materialize_gpu_host("dgx-h100", tmp_path)
    model = DeviceModel.read(proc=str(proc), dev=str(dev), sys=str(tmp_path / "nosys"))
    assert node(model, 226, 1) == node(model, 226, 129) == (GpuNodeClass.GPU, 1)


def test_mig_capability_nodes(dgx):
    assert dgx.mig_minors[(0, 1, None)] == 12 and dgx.mig_minors[(0, 1, 0)] == 13
    assert node(dgx, 236, 12) == (GpuNodeClass.MIG, 0)
    assert dgx.classify(236, 13).mig == (0, 1, 0)
    selection = dgx.select(["gpu0/gi1/ci0"])
    assert selection == Selection(frozenset(), frozenset({(0, 1, 0)}))
    assert dgx.mig_nodes(selection) == {(236, 12), (236, 13)}  # the GPU instance's and the compute instance's
    whole_gi = dgx.mig_nodes(dgx.select(["gpu0/gi2"]))
    assert (236, dgx.mig_minors[(0, 2, None)]) in whole_gi and len(whole_gi) == 9  # gi2 and its 8 CIs
    with pytest.raises(GpuNameError, match="no such MIG instance"):
        dgx.select(["gpu0/gi15"])


def test_gpus_by_index_uuid_and_bus_id(dgx):
    assert dgx.select([0, "1", "GPU-3D902E74-BF61-5C83-A042-7EB19C5F3023", "5d:00.0"]).gpus == {0, 1, 2, 3}
    assert dgx.select(["all"]).every
    assert dgx.select([]).empty
    with pytest.raises(GpuNameError, match="no such GPU on this node"):
        dgx.select(["GPU-00000000-0000-0000-0000-000000000000"])
    with pytest.raises(GpuNameError, match="0000:99:00.0: no such GPU"):
        dgx.select(["99:00.0"])


@pytest.mark.parametrize("name, canonical", [
    (3, "3"), ("ALL", "all"), ("*", "*"), ("GPU-ABC", "GPU-abc"), ("3B:00.0", "0000:3b:00.0"),
    ("0001:3b:00.1", "0001:3b:00.1"), ("gpu1/gi2/ci0", "gpu1/gi2/ci0"), ("gpu1/gi2", "gpu1/gi2")])
def test_names(name, canonical):
    assert parse_gpu_name(name) == canonical


@pytest.mark.parametrize("name, says", [("MIG-1234", "MIG UUIDs need NVML"), ("nvidia0", "is not a GPU"),
                                        ("", "is not a GPU"), ("gpu0/ci1", "is not a GPU")])
def test_bad_names(name, says):
    with pytest.raises(GpuNameError, match=says):
        parse_gpu_name(name)


def test_selection_names_round_trip(dgx):
    selection = dgx.select(["2", "0", "gpu0/gi1/ci0", "gpu0/gi2"])
    assert selection.names() == ["0", "2", "gpu0/gi1/ci0", "gpu0/gi2"]
    assert dgx.select(selection.names()) == selection
    assert selection.without(dgx.select(["0", "gpu0/gi2"])).describe() == "2,gpu0/gi1/ci0"


def test_a_host_without_gpus(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/devices").write_text("Character devices:\n  1 mem\n\nBlock devices:\n  8 sd\n")
    model = DeviceModel.read(proc=str(tmp_path / "proc"), dev=str(tmp_path / "dev"), sys=str(tmp_path / "sys"))
    # NVIDIA and DRM majors are fixed: a node made before the driver loads is still judged
    assert model.majors == {195: GpuMajor.NVIDIA, 226: GpuMajor.DRM}
    assert model.gpus == {} and model.mig_minors == {}
