"""Containers as agents, without a runtime: the id from a cgroup's name, the runtime's answer read,
the fields rules and alerts see, and the lookup that never blocks the reader (tests/kernel/
test_containers.py runs real podman containers)."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from ebpfmon import events as ev
from ebpfmon.alerts.sinks import container_fields
from ebpfmon.host.cgroups import AgentLayout
from ebpfmon.host.containers import ContainerIdentity, container_of_cgroup, from_inspect
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Engine
from ebpfmon.rules.fields import Context
from ebpfmon.errors import RuleLoadError
from unit.test_rule_language import RULE, ruleset_from

ID = "7c276d9fba8aa8b54c43e95954d8279722199187186521a6bea39f8120b50b59"


@pytest.mark.parametrize("name, expected", [
    (f"libpod-{ID}", ("podman", ID)),  # podman, cgroupfs manager
    (f"libpod-{ID}.scope", ("podman", ID)),  # podman under systemd
    (f"docker-{ID}.scope", ("docker", ID)),
    (ID, ("docker", ID)),  # docker's cgroupfs driver names it by the id alone
    (f"crio-{ID}.scope", ("cri-o", ID)),
    (f"cri-containerd-{ID}.scope", ("containerd", ID)),
    (f"libpod-conmon-{ID}", None),  # podman's monitor, not the container
    ("agent-1", None),
    (f"libpod-{ID[:12]}", None),
])
def test_the_container_is_named_by_its_cgroup(name, expected):
    assert container_of_cgroup(f"/ebpfmon-agents/{name}") == expected


def test_the_runtimes_answers_read_alike():
    podman = {"Id": ID, "Name": "agent-demo", "ImageName": "localhost/agent:2.1",
              "Config": {"Image": "localhost/agent:2.1", "Labels": {"ebpfmon.agent": "demo"}}}
    docker = {"Id": ID, "Name": "/agent-demo", "Config": {"Image": "registry:5000/team/agent@sha256:ab",
                                                          "Labels": None}}
    rootfs = {"Id": ID, "Name": "agent-demo", "ImageName": "", "Config": {"Image": "", "Labels": {}}}
    assert from_inspect("podman", ID, podman) == ev.Container(ID, "podman", "agent-demo", "localhost/agent:2.1",
                                                              {"ebpfmon.agent": "demo"}, True)
    found = from_inspect("docker", ID, docker)
    assert (found.name, found.image_repository, found.image_tag) == ("agent-demo", "registry:5000/team/agent", None)
    assert from_inspect("podman", ID, rootfs).image is None


def event_in_container(container: dict | None, **values) -> ev.Event:
    spec = {"cgroup": f"/ebpfmon-agents/libpod-{ID}", **values}
    if container is not None:
        spec["container"] = {"id": ID, **container}
    return make_event({"exec": {"argv": ["ssh", "-R", "8080:localhost:80", "example.org"], **spec}}, 0)


@pytest.mark.parametrize("condition, container, expected", [
    ("container.label[ebpfmon.agent] = demo", {"labels": {"ebpfmon.agent": "demo"}}, True),
    ("container.label[ebpfmon.agent] = demo", {"labels": {"ebpfmon.agent": "other"}}, False),
    ("container.label[ebpfmon.agent] exists", {"labels": {}}, False),
    ("container.label contains 'ebpfmon.gpus='", {"labels": {"ebpfmon.gpus": "0"}}, True),
    ("container.image.repository = localhost/agent", {"image": "localhost/agent:2.1"}, True),
    ("container.image.tag = '2.1'", {"image": "localhost/agent:2.1"}, True),
    ("container.name = agent-demo", {"name": "agent-demo"}, True),
    ("container.name = agent-demo", {"name": "agent-demo", "known": False}, False),  # not answered yet
    ("container.runtime = podman", {}, True),
    ("container.id = host", None, True),  # Falco's word for no container
    ("container.name = host", None, True),
    ("agent.name = demo", {"name": "agent-demo", "labels": {"ebpfmon.agent": "demo"}}, True),
    ("agent.name = agent-demo", {"name": "agent-demo", "labels": {}}, True),
])
def test_rules_read_a_containers_fields(tmp_path, condition, container, expected):
    ruleset = ruleset_from(tmp_path, RULE.format(condition=condition))
    event = event_in_container(container)
    if container is None:
        event.container = None
    assert bool(Engine(ruleset, Context()).evaluate(event)) is expected


def test_a_position_where_a_key_is_wanted_and_back_are_errors(tmp_path):
    with pytest.raises(RuleLoadError, match="takes a position"):
        ruleset_from(tmp_path, RULE.format(condition="proc.aname[bash] = x"))
    ruleset = ruleset_from(tmp_path, RULE.format(condition="container.label[1] = x"))  # a label named 1
    assert ruleset.rules


def test_outputs_and_falcos_fields_name_the_container(tmp_path):
    rule = RULE.replace('"fired %proc.name"', '"in %container.name (%container.label[ebpfmon.agent])"')
    ruleset = ruleset_from(tmp_path, rule.format(condition="container.id != host"))
    event = event_in_container({"name": "agent-demo", "image": "localhost/agent:2.1",
                                "labels": {"ebpfmon.agent": "demo"}})
    [verdict] = Engine(ruleset, Context()).evaluate(event)
    assert verdict.output == "in agent-demo (demo)"
    assert container_fields(event.to_dict()["container"]) == {
        "container.id": ID, "container.name": "agent-demo", "container.image.repository": "localhost/agent",
        "container.image.tag": "2.1", "container.label[ebpfmon.agent]": "demo"}
    assert ev.from_json(event.to_json()).container == event.container  # the audit log's round trip


def inspect_command(tmp_path, answers: dict[str, dict], gated: bool = False) -> tuple[str, ...]:
    """A stand-in for `podman inspect` (its id appended): prints the answer for the id; gated,
    only once the file go exists."""
    script = tmp_path / "inspect.py"
    script.write_text(
        "import json, os, sys, time\n"
        f"answers = json.loads({json.dumps(json.dumps(answers))})\n"
        f"while {gated} and not os.path.exists({str(tmp_path / 'go')!r}):\n"
        "    time.sleep(0.01)\n"
        "if sys.argv[-1] not in answers:\n"
        "    sys.exit('Error: no such container ' + sys.argv[-1])\n"
        "print(json.dumps([answers[sys.argv[-1]]]))\n")
    return (sys.executable, str(script))


def test_events_carry_the_id_at_once_and_the_rest_once_the_runtime_answered(tmp_path):
    answer = {"Name": "agent-demo", "ImageName": "localhost/agent:2.1", "Config": {"Labels": {"ebpfmon.agent": "x"}}}
    identified = threading.Event()
    found = []
    identity = ContainerIdentity(AgentLayout("/ebpfmon-agents"), {"podman": inspect_command(tmp_path, {ID: answer}, True)},
                                 on_identified=lambda agent, c: (found.append((agent, c)), identified.set()))
    agent = f"/ebpfmon-agents/libpod-{ID}"
    try:
        identity.created(agent)
        first = identity.of(f"{agent}/inner")  # the runtime has not answered: the reader is not held
        assert (first.id, first.runtime, first.known, first.name) == (ID, "podman", False, None)
        (tmp_path / "go").touch()
        assert identified.wait(10)
        later = identity.of(f"{agent}/inner")
        assert (later.name, later.image, later.labels, later.known) == ("agent-demo", "localhost/agent:2.1",
                                                                        {"ebpfmon.agent": "x"}, True)
        assert found == [(agent, later)]
        assert identity.of("/ebpfmon-agents/agent-1") is None and identity.of("/elsewhere") is None
        identity.forget(agent)
        assert identity.of(agent).known is False  # looked up again: a new container may have the name
    finally:
        identity.close()


def test_a_runtime_that_does_not_know_the_container_leaves_the_id(tmp_path, caplog):
    identity = ContainerIdentity(AgentLayout("/ebpfmon-agents"), {"podman": inspect_command(tmp_path, {})})
    assert identity.look_up("podman", ID) is None
    assert identity.failures == 1
    assert "no such container" in caplog.text and ID[:12] in caplog.text
    missing = ContainerIdentity(AgentLayout("/ebpfmon-agents"), {"podman": ("/nonexistent/podman",)})
    assert missing.look_up("podman", ID) is None and "No such file" in caplog.text
