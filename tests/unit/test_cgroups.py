"""cgroup v2 discovery and naming."""

import pytest

from ebpfmon.host.cgroups import Hierarchy, cgroup2_mount
from ebpfmon.errors import CgroupError, NoCgroup2Error


def test_finds_the_cgroup2_mount_wherever_it_is(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
                      "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
                      "cgroup2 /sys/fs/cgroup/un\\040ified cgroup2 rw 0 0\n")
    assert str(cgroup2_mount(str(mounts))) == "/sys/fs/cgroup/un ified"


def test_no_cgroup2_is_a_clear_error(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(NoCgroup2Error, match="no cgroup v2 hierarchy is mounted") as info:
        cgroup2_mount(str(mounts))
    assert "mount -t cgroup2" in info.value.fix


def test_paths_relative_and_absolute(tmp_path):
    h = Hierarchy(tmp_path)
    assert h.path("/agents/a1") == tmp_path / "agents/a1"
    assert h.path("agents/a1") == tmp_path / "agents/a1"
    assert h.path(str(tmp_path / "agents")) == tmp_path / "agents"
    assert h.relative(tmp_path / "agents/a1") == "/agents/a1"
    assert h.relative(tmp_path) == "/"


@pytest.mark.parametrize("name", ["../escape", "/abs", "", "a/../../b"])
def test_agent_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(CgroupError, match="must be a relative path below the agent root"):
        Hierarchy(tmp_path).child("/agents", name)


def test_agent_child_name(tmp_path):
    assert Hierarchy(tmp_path).child("/agents", "team/a1") == "/agents/team/a1"


def test_missing_cgroup_id_says_which(tmp_path):
    with pytest.raises(CgroupError, match="cgroup /nope does not exist"):
        Hierarchy(tmp_path).cgroup_id("/nope")
