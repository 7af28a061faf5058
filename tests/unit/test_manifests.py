"""The Kubernetes DaemonSet (deploy/kubernetes/daemonset.yaml) cannot run here: what can be
checked is that its configuration loads as the daemon would load it, and that it mounts and
grants what the daemon needs on a node."""

from __future__ import annotations

import yaml

from ebpfmon.config import load_config
from helpers import REPO

MANIFEST = REPO / "deploy/kubernetes/daemonset.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_the_daemonsets_configuration_loads(tmp_path):
    config_map = documents()["ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    config = load_config(path)
    assert config.agent_root == "/kubepods.slice/kubepods-burstable.slice" and config.agent_level == 1
    assert config.agents.agent_of("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab12.slice/"
                                  "cri-containerd-0123.scope") == \
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab12.slice"  # the pod is the agent
    assert config.gpu_entitled == () and config.containers.enabled


def test_the_daemonset_mounts_and_grants_what_the_daemon_needs():
    docs = documents()
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostPID"] and spec["hostNetwork"]
    [container] = spec["containers"]
    assert container["command"][:2] == ["ebpfmon", "run"]
    assert set(container["securityContext"]["capabilities"]["add"]) >= {"BPF", "PERFMON", "SYS_ADMIN", "NET_ADMIN",
                                                                        "SYS_RESOURCE", "SYS_PTRACE", "KILL"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts) == set(volumes)
    host_paths = {mounts[name]["mountPath"]: volumes[name].get("hostPath", {}).get("path") for name in mounts}
    for needed in ("/sys/fs/cgroup", "/sys/fs/bpf", "/sys/kernel/tracing", "/lib/modules", "/var/lib/ebpfmon"):
        assert host_paths[needed] == needed, needed  # the node's own, where the daemon looks for it
    assert mounts["bpffs"]["mountPropagation"] == "Bidirectional"  # pins made in the pod reach the node
    config_map = docs["ConfigMap"]["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == config_map
    assert mounts["config"]["mountPath"] == "/etc/ebpfmon" and container["command"][-1] == "/etc/ebpfmon/config.yaml"
