"""cgroup v2 discovery and naming."""

import pytest

from ebpfmon.host.cgroups import AgentLayout, Hierarchy, cgroup2_mount
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


@pytest.mark.parametrize("level, cgroup, agent", [
    (1, "/agents/a1", "/agents/a1"),
    (1, "/agents/a1/worker/x", "/agents/a1"),
    (2, "/agents/team/a1/worker", "/agents/team/a1"),
    (2, "/agents/team", None),  # above the agent level: nobody's
    (1, "/agents", None),
    (1, "/agentsx/a1", None),  # a sibling that shares the prefix
    (1, "/other/a1", None),
    (1, None, None),
])
def test_the_agent_a_cgroup_belongs_to(level, cgroup, agent):
    assert AgentLayout("/agents", level).agent_of(cgroup) == agent


def test_agent_level_counted_from_the_root_and_from_the_mount(tmp_path):
    layout = AgentLayout("/nodes/agents/", 2)
    assert layout.levels_below_root("/nodes/agents/team/a1") == 2
    assert layout.levels_below_root("/nodes/agents") is None
    assert layout.is_agent("/nodes/agents/team/a1") and not layout.is_agent("/nodes/agents/team")
    assert layout.absolute_level == 4  # what the kernel compares ancestor levels with


def test_agents_found_at_their_level_only(tmp_path):
    for d in ("agents/team/a1/worker", "agents/team/a2", "agents/lonely"):
        (tmp_path / d).mkdir(parents=True)
    assert sorted(AgentLayout("/agents", 2).agents(Hierarchy(tmp_path))) == ["/agents/team/a1", "/agents/team/a2"]
    assert sorted(AgentLayout("/agents", 1).agents(Hierarchy(tmp_path))) == ["/agents/lonely", "/agents/team"]
