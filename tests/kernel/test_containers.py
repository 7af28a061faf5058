"""Agents in real podman containers (runc, the cgroupfs manager: this VM's hybrid cgroups), under
a daemon of the test's own: named by their runtime in events, alerts and quarantine records.

The image is the host's userland: a tar of the merged-/usr links, imported with podman, and
/usr and /etc mounted read-only at run (no registry is reachable)."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import SSH_OPTS, RunningDaemon, line_of, wait_for

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
IMAGE = f"localhost/ebpfmon-test-agent:{os.getpid()}"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=check)


def userland_tar(tar: Path) -> Path:
    """A root file system of directories and the merged-/usr links: the host's userland once
    /usr and /etc are mounted in it."""
    with tarfile.open(tar, "w") as out:
        for name in ("usr", "etc", "tmp", "proc", "sys", "dev", "root", "run", "var"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            out.addfile(info)
        for name in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink(f"/{name}"):
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(f"/{name}")
                out.addfile(info, io.BytesIO())
    return tar


@pytest.fixture(scope="module")
def image(bpf, tmp_path_factory):
    """A local image whose userland is the host's (/usr and /etc mounted at run)."""
    podman("import", str(userland_tar(tmp_path_factory.mktemp("image") / "rootfs.tar")), IMAGE)
    yield IMAGE
    podman("rmi", "-f", IMAGE, check=False)


def run_args(root: str, name: str, image: str, labels: dict[str, str], mounts: tuple[str, ...] = (),
             devices: tuple[str, ...] = ()) -> list[str]:
    """`podman run` of an agent under the agent root: its cgroup is the agent's."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # the runtime sets the limits it is given: no higher than this process's own (no CAP_SYS_RESOURCE here)
    limits = ["--ulimit", f"nofile={min(1024, nofile)}:{nofile}", "--ulimit", "nproc=4096:4096"]
    volumes = [f"--volume={path}:{path}:ro" for path in ("/usr", "/etc", *mounts)]
    return [*PODMAN, "run", "--rm", "--name", name, "--cgroup-parent", root, "--network", "host", *limits,
            *volumes, *(f"--device-cgroup-rule={d}" for d in devices),
            *(f"--label={k}={v}" for k, v in labels.items()), image]


class ContainerDaemon(RunningDaemon):
    """The daemon, in this process, on the test's own root; every event it judged kept."""

    def start(self, state_dir: str, **settings) -> "ContainerDaemon":
        from ebpfmon.config import AlertSettings, Config, MetricsSettings, SinkSettings
        from ebpfmon.service.daemon import Daemon

        self.events: list = []
        self.alerts_file = Path(state_dir) / "alerts.jsonl"
        config = Config(agent_root=self.root, state_dir=state_dir, metrics=MetricsSettings(enabled=False),
                        alerts=AlertSettings(sinks=(SinkSettings(type="jsonl", path=str(self.alerts_file)),)),
                        **settings)
        self.daemon = Daemon(config, echo=self.emit)
        judge = self.daemon.judge

        def kept(event) -> None:
            self.events.append(event)
            judge(event)

        self.daemon.judge = kept  # before start: the stream takes it then
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)
        self.thread.start()
        return self

    def alerts(self) -> list[dict]:
        if not self.alerts_file.exists():
            return []
        return [json.loads(line) for line in self.alerts_file.read_text().splitlines() if line.endswith("}")]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.daemon.enforcer.detach()
        self.daemon.close()


@pytest.fixture(scope="module")
def container_daemon(hierarchy, tmp_path_factory):
    from ebpfmon.kernel.enforcer import remove_pins
    from helpers import remove_cgroup_tree

    root = f"/ebpfmon-test-{os.getpid()}-containers"
    path = hierarchy.ensure(root)
    running = ContainerDaemon(None, root, threading.Event()).start(str(tmp_path_factory.mktemp("state")))
    yield running
    running.close()
    remove_pins(hierarchy, root)
    remove_cgroup_tree(path)


def agent_of(container_daemon, name: str) -> str:
    """The agent cgroup of a running container, from podman."""
    container_id = podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
    return f"{container_daemon.root}/libpod-{container_id}"


def test_a_labelled_container_that_tunnels_is_named_in_the_alert_and_its_record(container_daemon, image, sshd,
                                                                                netns_host):
    name = f"agent-demo-{uuid.uuid4().hex[:6]}"
    argv = ["ssh", "-i", str(sshd), *SSH_OPTS, "-N", "-R", "2397:127.0.0.1:22", f"root@{netns_host.address}"]
    args = run_args(container_daemon.root, name, image, {"ebpfmon.agent": "demo", "team": "rl"},
                    mounts=(str(sshd.parent),))
    # the container outlives its tunnel a while: its runtime is asked about it while it is there
    tunnel = subprocess.Popen([*args, "sh", "-c", '"$@"; echo "ssh: $?"; exec sleep 120', "sh", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the alert: sent once the runtime named the container (its entrypoint is the tunnel)
        alert = wait_for(lambda: next((a for a in container_daemon.alerts() if a["rule"] == "Reverse SSH tunnel"
                                       and (a["event"]["container"] or {}).get("name") == name), None),
                         "the tunnel's alert, naming the container", seconds=60)
        assert alert["event"]["container"]["image"] == image
        assert alert["event"]["container"]["labels"] == {"ebpfmon.agent": "demo", "team": "rl"}
        assert "cut_network" in alert["actions"]
        status = line_of(tunnel.stdout, "ssh's exit status", seconds=60)
        while not status.startswith("ssh: "):
            status = line_of(tunnel.stdout, "ssh's exit status", seconds=60)
        assert status.strip() != "ssh: 0"  # cut before ssh reached its server
        records = [r for r in container_daemon.containment.store.records if r.rule == "Reverse SSH tunnel"
                   and (r.container or {}).get("name") == name]
        assert len(records) == 1
        record = records[0]
        assert record.container["image"] == image and record.container["labels"]["ebpfmon.agent"] == "demo"
        assert record.agent.startswith(f"{container_daemon.root}/libpod-")
        assert record.agent.endswith(record.container["id"])
        assert alert["quarantine"] is None or alert["quarantine"]["agent"] == record.agent
        # the container ended (--rm removes its cgroup): the record says so, and the cut is gone
        podman("stop", "-t", "0", name)
        wait_for(lambda: record.status == "closed", "the record closed when the container's cgroup went")
        assert record.release_reason == "the agent's cgroup was removed"
        assert record.agent_id not in container_daemon.daemon.enforcer.cut_agents()
        listed = subprocess.run([".venv/bin/ebpfmon", "quarantine", "list", "--all", "--state-dir",
                                 container_daemon.daemon.config.state_dir], capture_output=True, text=True,
                                timeout=60)
        assert f"container: {name}  image: {image}  podman {record.container['id'][:12]}" in listed.stdout
    finally:
        tunnel.kill()
        tunnel.wait()
        podman("rm", "-f", name, check=False)


RUSH = 20


def test_twenty_containers_started_at_once_each_entrypoint_seen_and_named(container_daemon, image):
    names = [f"rush-{uuid.uuid4().hex[:6]}-{i}" for i in range(RUSH)]
    lost = container_daemon.daemon.stream.stats.lost["exec"]
    started = [subprocess.Popen([*run_args(container_daemon.root, name, image, {"ebpfmon.agent": name}),
                                 "sleep", "61"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for name in names]
    try:
        agents = {}
        for name in names:
            deadline = time.monotonic() + 120
            while name not in agents:
                assert time.monotonic() < deadline, f"{name} did not start"
                found = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
                if found.stdout.strip() == "true":
                    agents[name] = agent_of(container_daemon, name)
                else:
                    time.sleep(0.2)

        def entrypoints() -> set[str]:
            """Agents whose entrypoint's exec was an event (carrying the container's id: it came
            before the runtime could be asked)."""
            return {e.cgroup for e in list(container_daemon.events) if e.kind == "exec" and e.argv == ["sleep", "61"]
                    and e.container and e.container.id == e.cgroup.rpartition("-")[2]}

        wait_for(lambda: set(agents.values()) <= entrypoints(), "every entrypoint's exec", seconds=180)
        identity = container_daemon.daemon.stream.enricher.containers
        wait_for(lambda: {(identity.of_agent(agent).name, identity.of_agent(agent).labels["ebpfmon.agent"])
                          for agent in agents.values() if identity.of_agent(agent).known}
                 == {(name, name) for name in names}, "every container named by podman", seconds=180)
        container_daemon.daemon.stream.refresh_counters()
        assert container_daemon.daemon.stream.stats.lost["exec"] == lost
    finally:
        podman("rm", "-f", "-t", "0", *names, check=False, timeout=300)
        for proc in started:
            proc.kill()
            proc.wait()


def test_freeze_and_kill_act_on_a_container(container_daemon, image):
    from ebpfmon.rules.cases import make_event
    from ebpfmon.rules.engine import Verdict

    name = f"frozen-{uuid.uuid4().hex[:6]}"
    run = subprocess.Popen([*run_args(container_daemon.root, name, image, {}), "sleep", "300"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
                 == "true", f"{name} running", seconds=120)
        agent = agent_of(container_daemon, name)
        containment = container_daemon.containment

        cgroup = container_daemon.daemon.hierarchy.path(agent)
        entrypoint = int((cgroup / "cgroup.procs").read_text().split()[0])

        def contain(actions: list[str]) -> None:
            event = make_event({"exec": {"argv": ["sleep", "300"], "cgroup": agent, "pid": entrypoint}}, 0)
            containment.apply(Verdict("test", "CRITICAL", "test", [], actions, True, agent, event))

        contain(["freeze"])
        wait_for(lambda: "frozen 1" in (cgroup / "cgroup.events").read_text(), "the container frozen")
        assert containment.store.active_for(agent).container["name"] == name
        containment.release(agent, "test", "thawed to be killed")
        contain(["kill"])
        run.wait(timeout=60)  # its process killed, the container ended
        record = wait_for(lambda: next((r for r in containment.store.records if r.agent == agent
                                        and r.status == "closed"), None), "the record closed as the container went")
        assert [a.action for a in record.actions][:2] == ["kill", "close"]
    finally:
        run.kill()
        run.wait()
        podman("rm", "-f", "-t", "0", name, check=False)


PROFILES = """
egress:
  profiles:
    - name: web-only
      allow: [{{cidr: 127.0.0.1/32, ports: [{port}]}}]
    - name: closed
"""


def test_trusted_labels_choose_a_containers_profile_and_gpus(hierarchy, image, tmp_path, fake_gpu_dir):
    """With profile_label and gpus_label set, a container's labels choose its egress profile and
    its GPUs (no profile names it by glob)."""
    import socket

    from ebpfmon.config import ContainerSettings, load_config
    from ebpfmon.kernel.enforcer import remove_pins
    from helpers import remove_cgroup_tree

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    (tmp_path / "egress.yaml").write_text(PROFILES.format(port=port))
    root = f"/ebpfmon-test-{os.getpid()}-labels"
    path = hierarchy.ensure(root)
    running = ContainerDaemon(None, root, threading.Event()).start(
        str(tmp_path / "state"), egress=load_config(tmp_path / "egress.yaml").egress, gpu_entitled=("*",),
        gpu_prefixes=(f"{fake_gpu_dir}/nvidia",), containers=ContainerSettings(profile_label="ebpfmon.profile",
                                                                    gpus_label="ebpfmon.gpus"))
    probe = ("import errno, os, socket, sys\n"
             "for port in sys.argv[1:]:\n"
             "    print(socket.socket().connect_ex(('127.0.0.1', int(port))))\n"
             "try:\n"
             f"    os.close(os.open('{fake_gpu_dir}/nvidia0', os.O_RDWR))\n"
             "    print(0)\n"
             "except OSError as e:\n"
             "    print(e.errno)\n")
    results = {}
    try:
        for profile, gpus in (("web-only", "all"), ("closed", "none")):
            name = f"{profile}-{uuid.uuid4().hex[:6]}"
            # the node through a mount (runc would bind a --device here), let through by the
            # runtime's own device rules: what is refused is ebpfmon's doing
            args = run_args(root, name, image, {"ebpfmon.profile": profile, "ebpfmon.gpus": gpus},
                            mounts=(str(fake_gpu_dir),), devices=("c 195:* rwm",))
            out = subprocess.run([*args, "sh", "-c", f'sleep 1; exec python3 -c "$0" {port} {port + 1}', probe],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            results[profile] = [int(n) for n in out.stdout.split()]
    finally:
        listener.close()
        running.close()
        remove_pins(hierarchy, root)
        remove_cgroup_tree(path)
    # web-only: its port, not the next; every GPU (ENXIO: through to the absent driver)
    assert results["web-only"] == [0, errno.EPERM, errno.ENXIO]
    assert results["closed"] == [errno.EPERM, errno.EPERM, errno.EPERM]


class Dockerd:
    """A docker daemon of the test's own: its socket, state and runtime directories under the
    test's temporary directory; no iptables rules and no bridge (containers get --network none),
    so the host's network is not touched."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.socket = directory / "docker.sock"
        self.log = open(directory / "dockerd.log", "w")
        # the cgroupfs driver: containers under --cgroup-parent, in the v2 hierarchy too on this
        # hybrid host (runc joins the unified hierarchy at the same path)
        self.proc = subprocess.Popen(["dockerd", "--host", f"unix://{self.socket}", "--data-root",
                                      str(directory / "root"), "--exec-root", str(directory / "exec"), "--pidfile",
                                      str(directory / "dockerd.pid"), "--iptables=false", "--ip6tables=false",
                                      "--bridge=none", "--exec-opt", "native.cgroupdriver=cgroupfs"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self.run("version", check=False).returncode == 0,
                 "dockerd answering on its socket", seconds=60)
        assert self.proc.poll() is None, (directory / "dockerd.log").read_text()[-2000:]

    @property
    def cli(self) -> list[str]:
        return ["docker", "--host", f"unix://{self.socket}"]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.cli, *args], capture_output=True, text=True, timeout=timeout, check=check)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def docker_image(bpf, tmp_path_factory):
    """dockerd, and the host's userland imported as an image into it."""
    directory = tmp_path_factory.mktemp("docker")
    dockerd = Dockerd(directory)
    try:
        dockerd.run("import", str(userland_tar(directory / "rootfs.tar")), "ebpfmon-test/agent:1")
        yield dockerd, "ebpfmon-test/agent:1"
    finally:
        dockerd.run("rm", "-f", *dockerd.run("ps", "-aq", check=False).stdout.split(), check=False)
        dockerd.close()


@pytest.fixture
def docker_daemon(hierarchy, docker_image, tmp_path):
    """ebpfmon on a root of the test's own, asking the test's dockerd about containers."""
    from ebpfmon.config import ContainerSettings
    from ebpfmon.kernel.enforcer import remove_pins
    from helpers import remove_cgroup_tree

    dockerd, _ = docker_image
    root = f"/ebpfmon-test-{os.getpid()}-docker"
    path = hierarchy.ensure(root)
    running = ContainerDaemon(None, root, threading.Event()).start(
        str(tmp_path / "state"), containers=ContainerSettings(docker=(*dockerd.cli, "inspect", "--type", "container")))
    yield running
    running.close()
    remove_pins(hierarchy, root)
    remove_cgroup_tree(path)


def test_a_docker_container_that_starts_a_miner_is_named_and_killed(docker_daemon, docker_image):
    dockerd, image = docker_image
    name = f"agent-docker-{uuid.uuid4().hex[:6]}"
    # a miner's name on a harmless program (sleep): the rule judges the name, nothing is mined
    started = dockerd.run("run", "-d", "--name", name, "--cgroup-parent", docker_daemon.root, "--network", "none",
                          "--label", "ebpfmon.agent=rollout-7", "--volume", "/usr:/usr:ro", "--volume", "/etc:/etc:ro",
                          image, "sh", "-c", "cp /usr/bin/sleep /tmp/xmrig && exec /tmp/xmrig 120")
    container_id = started.stdout.strip()
    alert = wait_for(lambda: next((a for a in docker_daemon.alerts() if a["rule"] == "Miner program started"
                                   and (a["event"]["container"] or {}).get("name") == name), None),
                     "the miner's alert, naming the container", seconds=60)
    container = alert["event"]["container"]
    assert (container["id"], container["runtime"], container["image"]) == (container_id, "docker", image)
    assert container["labels"] == {"ebpfmon.agent": "rollout-7"}
    assert alert["event"]["cgroup"] == f"{docker_daemon.root}/{container_id}"  # docker's cgroupfs name: the id
    assert "kill" in alert["actions"]
    # killed: the container's one process was the miner, so the container is over
    wait_for(lambda: dockerd.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "false",
             "the container stopped by the kill", seconds=60)
    records = [r for r in docker_daemon.containment.store.records if (r.container or {}).get("name") == name]
    assert len(records) == 1 and records[0].container["runtime"] == "docker"
