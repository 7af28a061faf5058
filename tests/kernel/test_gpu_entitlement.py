"""GPU entitlement on the real kernel, with the device nodes of a recorded NVIDIA node made by
mknod (tests/data/gpu-hosts/dgx-h100): an agent gets its own GPUs and the control nodes CUDA
opens, not another's GPU, not the driver's administration; MIG instances; grants and revokes
from the scheduler's side (the CLI through the control socket); a reload re-grants.

A node with no driver behind it opens with ENXIO: the kernel's device program let it through.
EPERM is the program's refusal."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import REPO, AgentCgroup, ebpfmon, gpu_policy_of, line_of, materialize_gpu_host, remove_cgroup_tree

from ebpfmon.host.gpus import DeviceModel, Node
from ebpfmon.kernel.abi import GpuMajor, GpuNodeClass
from ebpfmon.service.metrics import snapshot

ENXIO, EPERM = str(errno.ENXIO), str(errno.EPERM)
CONTROL = ["nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools"]
ADMIN = ["nvidia-nvswitchctl", "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2",
         "nvidia-caps-imex-channels/channel0"]
OPEN_ALL = """
import os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        print(path, "ok")
    except OSError as e:
        print(path, e.errno)
"""


def use_model(daemon, model: DeviceModel) -> None:
    daemon.enforcer.set_devices(model)
    daemon.containment.gpus.set_devices(model)


@pytest.fixture
def dgx_dev(containment_daemon, tmp_path):
    """The daemon judging devices by the DGX layout (DRM nodes by number: no sysfs here); its
    /dev under a temporary directory. The host's model is back afterwards."""
    proc, dev, _ = materialize_gpu_host("dgx-h100", tmp_path)
    daemon = containment_daemon.daemon
    real = daemon.containment.gpus.devices
    use_model(daemon, DeviceModel.read(proc=str(proc), dev=str(dev), sys=str(tmp_path / "no-sysfs")))
    yield dev
    use_model(daemon, real)


@pytest.fixture
def new_agent(containment_daemon, hierarchy):
    made = []

    def make(prefix: str) -> AgentCgroup:
        name = f"{containment_daemon.root}/{prefix}-{uuid.uuid4().hex[:6]}"
        agent = AgentCgroup(name, hierarchy.ensure(name), hierarchy.cgroup_id(name))
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if containment_daemon.containment.store.active_for(agent.name):
            containment_daemon.containment.release(agent.name, "test", "done")
        remove_cgroup_tree(agent.path)


def opens(agent, dev: Path, names: list[str]) -> dict[str, str]:
    out = agent.run([sys.executable, "-c", OPEN_ALL, *[str(dev / n) for n in names]], text=True, check=True,
                    input="")  # stdin a pipe, not the runner's /dev/null (see openable_gpu)
    return {Path(line.split()[0]).relative_to(dev).as_posix(): line.split()[1] for line in out.stdout.splitlines()}


def gpu_cli(containment_daemon, *args) -> subprocess.CompletedProcess:
    return ebpfmon("gpu", *args, "--state-dir", containment_daemon.daemon.config.state_dir)


def test_an_agent_limited_to_gpu_1_gets_its_gpu_and_the_control_nodes(containment_daemon, new_agent, dgx_dev):
    agent = new_agent("gpu-limited")  # gpu_devices: gpu-limited-* -> [1]
    assert gpu_policy_of(containment_daemon, agent) == (True, frozenset({1}))
    reach = CONTROL + ["nvidia1", "dri/card1", "dri/renderD129"]
    refused = ["nvidia0", "nvidia2", "dri/card0", "dri/renderD128"] + ADMIN
    assert opens(agent, dgx_dev, reach + refused) == {**{n: ENXIO for n in reach}, **{n: EPERM for n in refused}}
    line = containment_daemon.wait_line("GPU refused by policy", agent.name.split("/")[-1], "device=195:0")
    assert "vendor=nvidia" in line


def test_an_agent_without_a_grant_is_refused_every_gpu_node(containment_daemon, new_agent, dgx_dev):
    agent = new_agent("coder")  # not gpu-*: no GPUs
    assert gpu_policy_of(containment_daemon, agent, timeout=0.5) is None  # the default: refused
    names = CONTROL + ["nvidia0", "nvidia1", "dri/card1", "dri/renderD128"] + ADMIN
    assert opens(agent, dgx_dev, names) == {n: EPERM for n in names}


def test_an_agent_granted_every_gpu_opens_the_administration_too(containment_daemon, new_agent, dgx_dev):
    agent = new_agent("gpu")  # gpu-*: every GPU
    assert gpu_policy_of(containment_daemon, agent) == (True, None)
    names = CONTROL + ["nvidia0", "nvidia7", "dri/card0", "dri/renderD135"] + ADMIN
    assert opens(agent, dgx_dev, names) == {n: ENXIO for n in names}


def test_a_mig_grant_opens_its_instance_and_not_another(containment_daemon, new_agent, dgx_dev):
    agent = new_agent("coder")
    out = gpu_cli(containment_daemon, "grant", agent.name, "--gpus", "gpu0/gi1/ci0")
    assert out.returncode == 0, out.stderr
    assert f"{agent.name}: gpus gpu0/gi1/ci0" in out.stdout
    own = ["nvidia-caps/nvidia-cap12", "nvidia-caps/nvidia-cap13"]  # gpu0/gi1/access, gpu0/gi1/ci0/access
    other = ["nvidia-caps/nvidia-cap21", "nvidia-caps/nvidia-cap22"]  # gpu0/gi2's
    names = own + CONTROL + ["nvidia0"] + other + ["nvidia1", "nvidia-caps/nvidia-cap1"]
    expected = {n: ENXIO for n in own + CONTROL + ["nvidia0"]}  # nvidia0: the instance's parent GPU
    expected.update({n: EPERM for n in other + ["nvidia1", "nvidia-caps/nvidia-cap1"]})
    assert opens(agent, dgx_dev, names) == expected
    # the whole GPU instance: every compute instance's node
    assert gpu_cli(containment_daemon, "grant", agent.name, "--gpus", "gpu0/gi2").returncode == 0
    assert opens(agent, dgx_dev, other + own) == {**{n: ENXIO for n in other}, **{n: EPERM for n in own}}


def test_a_grant_by_uuid_or_bus_id_and_a_bad_name(containment_daemon, new_agent, dgx_dev):
    agent = new_agent("coder")
    out = gpu_cli(containment_daemon, "grant", agent.name.split("/")[-1], "--gpus",
                  "GPU-4ea13f85-c072-6d94-b153-8fc2ad604134,0000:9a:00.0")
    assert out.returncode == 0, out.stderr
    assert "gpus 3,4" in out.stdout  # a name below the agent root names the agent
    assert opens(agent, dgx_dev, ["nvidia3", "nvidia4", "nvidia5"]) == {"nvidia3": ENXIO, "nvidia4": ENXIO,
                                                                       "nvidia5": EPERM}
    out = gpu_cli(containment_daemon, "grant", agent.name, "--gpus", "GPU-00000000-dead-beef-0000-000000000000")
    assert out.returncode == 2 and "no such GPU on this node" in out.stderr
    assert opens(agent, dgx_dev, ["nvidia3"]) == {"nvidia3": ENXIO}  # the grant it had stays


STAND_IN = "nvidia-stand-in"  # under the traced GPU prefix, 1:7 (/dev/full): a GPU node that opens
HOLD = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print(fd, flush=True)
time.sleep(120)
"""


@pytest.fixture
def openable_gpu(containment_daemon, fake_gpu_dir, tmp_path):
    """GPU 3's node stand-in that a process can hold open: a node 1:7 (the kernel's /dev/full)
    that the model calls GPU 3's. Major 1's other minors count as control nodes meanwhile: an
    agent's /dev/null would be a GPU descriptor too, so the agents here get pipes."""
    path = fake_gpu_dir / f"{STAND_IN}-{uuid.uuid4().hex[:6]}"
    os.mknod(path, 0o666 | 0o020000, os.makedev(1, 7))
    daemon = containment_daemon.daemon
    real = daemon.containment.gpus.devices
    model = DeviceModel(majors={**real.majors, 1: GpuMajor.SHARED}, gpus=dict(real.gpus),
                        nodes={**real.nodes, (1, 7): Node(1, 7, GpuNodeClass.GPU, 3, path=str(path))})
    use_model(daemon, model)
    yield path
    use_model(daemon, real)
    path.unlink()


@pytest.fixture
def holder_in(containment_daemon, openable_gpu):
    """A process in the agent holding the openable GPU node, granted it first; killed after."""
    started = []

    def start(agent) -> tuple[subprocess.Popen, int]:
        out = gpu_cli(containment_daemon, "grant", agent.name, "--gpus", "3")
        assert out.returncode == 0, out.stderr
        holder = agent.popen([sys.executable, "-c", HOLD, str(openable_gpu)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(holder)
        ready, _, _ = select.select([holder.stdout], [], [], 20)
        assert ready, "the holder printed nothing"
        return holder, int(line_of(holder.stdout))  # opened: the grant took effect for the running agent

    yield start
    for holder in started:
        holder.kill()
        holder.wait()


def test_a_revoke_refuses_the_next_open_and_reports_the_descriptor_kept(containment_daemon, new_agent,
                                                                       openable_gpu, holder_in):
    containment = containment_daemon.containment
    keep = containment.settings
    containment.settings = dataclasses.replace(keep, gpu_holders="keep")  # report, freeze nothing
    try:
        agent = new_agent("job")  # entitled by no glob: only the grant gives it GPU 3
        short = agent.name.split("/")[-1]
        holder, fd = holder_in(agent)
        containment_daemon.wait_line(short, f"open {openable_gpu}")
        listed = json.loads(gpu_cli(containment_daemon, "--json").stdout)
        assert [g["gpus"] for g in listed["grants"] if g["agent"] == agent.name] == ["3"]
        assert any(h["pid"] == holder.pid and h["fd"] == fd and h["node"] == "gpu 3" and h["access"] == "rw"
                   for h in listed["holders"])
        assert snapshot(containment_daemon.daemon)["ebpfmon_gpu_holders"][3] == {("3",): 1}
        out = gpu_cli(containment_daemon, "revoke", agent.name)
        assert out.returncode == 0, out.stderr
        assert f"{agent.name}: gpus none" in out.stdout
        assert f"pid {holder.pid}" in out.stdout and f"fd {fd}" in out.stdout  # still held, and said so
        assert opens(agent, openable_gpu.parent, [openable_gpu.name]) == {openable_gpu.name: EPERM}
        line = containment_daemon.wait_line("GPU held beyond the agent's grant (agent=", short)
        assert "node=gpu 3" in line and f"pid={holder.pid}" in line
        record = containment.store.active_for(agent.name)
        assert record.gpu_denied and not record.frozen and holder.poll() is None
    finally:
        containment.settings = keep


def test_deny_gpu_freezes_an_agent_that_holds_a_gpu_beyond_its_grant(containment_daemon, new_agent, holder_in):
    agent = new_agent("job")
    holder, fd = holder_in(agent)
    out = gpu_cli(containment_daemon, "revoke", agent.name, "--gpus", "3")
    assert out.returncode == 0 and f"fd {fd}" in out.stdout, out.stdout + out.stderr
    containment_daemon.wait_line("GPU held beyond the agent's grant (agent=", agent.name.split("/")[-1])
    deadline = time.monotonic() + 10
    while (agent.path / "cgroup.events").read_text().count("frozen 1") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "frozen 1" in (agent.path / "cgroup.events").read_text()  # the holder stops using the GPU
    record = containment_daemon.containment.store.active_for(agent.name)
    assert record.frozen and any(a.action == "freeze" and "held GPU nodes open" in a.detail for a in record.actions)
    # released: thawed, and its GPUs are what the grants say now (none)
    containment_daemon.containment.release(agent.name, "test", "done")
    assert "frozen 0" in (agent.path / "cgroup.events").read_text()
    assert gpu_policy_of(containment_daemon, agent, timeout=0.5) is None  # the default: refused


def test_a_reload_that_changes_gpu_entitled_regrants_running_agents(containment_daemon, new_agent, dgx_dev,
                                                                    tmp_path):
    daemon = containment_daemon.daemon
    agent = new_agent("later")  # entitled by no glob yet
    assert opens(agent, dgx_dev, ["nvidia2", "nvidiactl"]) == {"nvidia2": EPERM, "nvidiactl": EPERM}
    before = daemon.config
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "agent_root": before.agent_root, "state_dir": before.state_dir, "gpu_prefixes": list(before.gpu_prefixes),
        "gpu_entitled": [*before.gpu_entitled, f"{containment_daemon.root}/later-*"],
        "gpu_devices": {**{g: list(m) for g, m in before.gpu_devices}, f"{containment_daemon.root}/later-*": [2]},
        "metrics": {"enabled": False}, "alerts": {"sinks": []}, "enforce": {"breaker_agents": 100}}))
    daemon.config_path = config
    try:
        out = ebpfmon("reload", "--state-dir", before.state_dir)
        assert out.returncode == 0, out.stdout + out.stderr
        assert opens(agent, dgx_dev, ["nvidia2", "nvidiactl", "nvidia1"]) == {
            "nvidia2": ENXIO, "nvidiactl": ENXIO, "nvidia1": EPERM}
    finally:
        daemon.config_path = None
        daemon.config = before
        assert daemon.reload()[0]
    assert opens(agent, dgx_dev, ["nvidia2"]) == {"nvidia2": EPERM}  # and back


def test_the_slurm_prolog_grants_the_jobs_gpus_and_the_epilog_takes_them_back(containment_daemon, hierarchy,
                                                                               dgx_dev):
    job = f"9{uuid.uuid4().int % 10**6}"
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_GPUS": "0,2", "EBPFMON": f"{sys.executable} -m ebpfmon",
           "EBPFMON_STATE_DIR": containment_daemon.daemon.config.state_dir, "PYTHONPATH": str(REPO)}
    out = subprocess.run([str(REPO / "deploy/slurm/prolog.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "gpus 0,2" in out.stdout
    # the prolog ran before the job's cgroup exists: the grant waits for it
    name = f"{containment_daemon.root}/job_{job}"
    agent = AgentCgroup(name, hierarchy.ensure(name), hierarchy.cgroup_id(name))
    try:
        assert gpu_policy_of(containment_daemon, agent) == (True, frozenset({0, 2}))
        assert opens(agent, dgx_dev, ["nvidia0", "nvidia2", "nvidia1", "nvidiactl"]) == {
            "nvidia0": ENXIO, "nvidia2": ENXIO, "nvidia1": EPERM, "nvidiactl": ENXIO}
        out = subprocess.run([str(REPO / "deploy/slurm/epilog.sh")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "gpus none" in out.stdout, out.stderr
        assert opens(agent, dgx_dev, ["nvidia0", "nvidiactl"]) == {"nvidia0": EPERM, "nvidiactl": EPERM}
    finally:
        remove_cgroup_tree(agent.path)
    # the grant ended with the job's cgroup
    deadline = time.monotonic() + 5
    while name in containment_daemon.containment.gpus.scheduled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in containment_daemon.containment.gpus.scheduled


def test_ebpfmon_exec_with_gpus_runs_the_command_with_only_those(containment_daemon, hierarchy, dgx_dev):
    cgroup = f"run-{uuid.uuid4().hex[:6]}"
    name = f"{containment_daemon.root}/{cgroup}"
    out = ebpfmon("exec", "--agent-root", containment_daemon.root, "--state-dir",
                  containment_daemon.daemon.config.state_dir, "--cgroup", cgroup, "--gpus", "1", "--",
                  sys.executable, "-c", OPEN_ALL, str(dgx_dev / "nvidia1"), str(dgx_dev / "nvidia0"), input="")
    try:
        assert out.returncode == 0, out.stderr
        assert f"ebpfmon: {name} may use gpus 1" in out.stderr
        assert out.stdout.split() == [str(dgx_dev / "nvidia1"), ENXIO, str(dgx_dev / "nvidia0"), EPERM]
    finally:
        remove_cgroup_tree(hierarchy.path(name))


def test_a_descriptor_brought_into_an_agent_is_found_on_reload(containment_daemon, new_agent, openable_gpu):
    # opened outside any agent (nothing refuses it there), then the process joins an agent that
    # may use no GPU: the kernel never saw an open to refuse; the scan finds the descriptor
    agent = new_agent("coder")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(openable_gpu)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 20)
        assert ready, "the holder printed nothing"
        fd = int(line_of(holder.stdout))
        (agent.path / "cgroup.procs").write_text(str(holder.pid))
        assert (openable_gpu.parent / f"/proc/{holder.pid}/fd/{fd}").resolve() == openable_gpu
        out = ebpfmon("reload", "--state-dir", containment_daemon.daemon.config.state_dir)
        assert out.returncode == 0, out.stderr
        line = containment_daemon.wait_line("GPU held beyond the agent's grant (agent=", agent.name.split("/")[-1])
        assert f"pid={holder.pid}" in line and "node=gpu 3" in line
        record = containment_daemon.containment.store.active_for(agent.name)
        assert any(a.action == "freeze" and str(holder.pid) in a.detail for a in record.actions)
        assert any(a.action == "deny_gpu" and f"held by pids [{holder.pid}]: freeze" in a.detail
                   for a in record.actions)
    finally:
        holder.kill()
        holder.wait()
