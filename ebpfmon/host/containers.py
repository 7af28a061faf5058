"""Containers as agents: which container an agent cgroup is, and its name, image and labels.

A container runtime names the cgroup it makes after the container's id: podman's
`libpod-ID` (`libpod-ID.scope` under systemd), docker's `docker-ID.scope` or a bare `ID`
(cgroupfs), CRI-O's `crio-ID.scope`, containerd's `cri-containerd-ID.scope`. The id is in
the path at once; the rest is asked of the runtime (`podman inspect`, `docker inspect`) by a
worker thread, never by the reader: events of a container's first milliseconds carry its id
and runtime, the later ones its name, image and labels too.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import threading
from collections.abc import Callable

from ebpfmon.events import Container
from ebpfmon.host.cgroups import AgentLayout

log = logging.getLogger(__name__)

# the last part of an agent cgroup's path -> (runtime, container id)
CONTAINER_CGROUP = re.compile(r"^(?:(libpod|docker|crio|cri-containerd)-)?([0-9a-f]{64})(?:\.scope)?$")
RUNTIME_OF_PREFIX = {"libpod": "podman", "docker": "docker", "crio": "cri-o", "cri-containerd": "containerd",
                     None: "docker"}
INSPECT_TIMEOUT = 10.0  # seconds a runtime may take to answer
MAX_REMEMBERED = 65536  # cgroups whose agent is cached


def container_of_cgroup(agent: str) -> tuple[str, str] | None:
    """(runtime, id) of the container an agent cgroup is, from its name; None: no container."""
    m = CONTAINER_CGROUP.match(agent.rpartition("/")[2])
    return (RUNTIME_OF_PREFIX[m.group(1)], m.group(2)) if m else None


def from_inspect(runtime: str, container_id: str, answer: dict) -> Container:
    """A container from what `podman inspect` or `docker inspect` (or their API) says of it."""
    config = answer.get("Config") or {}
    image = answer.get("ImageName") or config.get("Image") or None
    return Container(id=container_id, runtime=runtime, name=(answer.get("Name") or "").lstrip("/") or None,
                     image=image, labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
                     known=True)


class ContainerIdentity:
    """agent cgroup -> Container, for the enricher: answers from a cache at once; a cgroup not
    asked about yet starts a lookup. on_identified(agent, container) is called from the worker
    when the runtime answered (or failed to: then the container is not known)."""

    def __init__(self, layout: AgentLayout, inspect: dict[str, tuple[str, ...]],
                 on_identified: Callable[[str, Container], None] | None = None):
        self.layout = layout
        self.inspect = inspect  # runtime -> the command that inspects one container (its id appended)
        self.on_identified = on_identified
        self._agent_of: dict[str | None, str | None] = {}  # an event's cgroup -> its agent (never stale)
        self._by_agent: dict[str, Container | None] = {}  # replaced whole when the runtime answers
        self._asked: queue.SimpleQueue[tuple[str, str, str] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self.lookups = 0
        self.failures = 0

    def of(self, cgroup: str | None) -> Container | None:
        """The container an event's cgroup belongs to (through its agent); None for none."""
        try:
            agent = self._agent_of[cgroup]
        except KeyError:
            if len(self._agent_of) >= MAX_REMEMBERED:
                self._agent_of.clear()
            agent = self._agent_of[cgroup] = self.layout.agent_of(cgroup)
        if agent is None:
            return None
        try:
            return self._by_agent[agent]
        except KeyError:
            return self.of_agent(agent)

    def of_agent(self, agent: str) -> Container | None:
        try:
            return self._by_agent[agent]
        except KeyError:
            pass
        parsed = container_of_cgroup(agent)
        container = Container(id=parsed[1], runtime=parsed[0]) if parsed else None
        self._by_agent[agent] = container
        if container is not None and container.runtime in self.inspect:
            self._ask(agent, container)
        return container

    def created(self, cgroup: str) -> None:
        """A cgroup was made: an agent's that is a container is looked up now."""
        if self.layout.is_agent(cgroup):
            self._by_agent.pop(cgroup, None)  # a cgroup of that name before it was another container
            self.of_agent(cgroup)

    def forget(self, cgroup: str | None) -> None:
        """The cgroup was removed."""
        self._agent_of.pop(cgroup, None)
        self._by_agent.pop(cgroup, None)

    def _ask(self, agent: str, container: Container) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="containers", daemon=True)
            self._worker.start()
        self._asked.put((agent, container.runtime, container.id))

    def close(self) -> None:
        if self._worker is not None:
            self._asked.put(None)
            self._worker.join(timeout=INSPECT_TIMEOUT + 1)
            self._worker = None

    def _work(self) -> None:
        while (asked := self._asked.get()) is not None:
            agent, runtime, container_id = asked
            container = self.look_up(runtime, container_id)
            entry = self._by_agent.get(agent)
            if entry is None or entry.id != container_id:
                continue  # the cgroup went meanwhile
            if container is not None:
                self._by_agent[agent] = container
            if self.on_identified:  # not answered: what waited for the labels goes on without them
                try:
                    self.on_identified(agent, container or entry)
                except Exception:
                    log.exception("handling %s failed", (container or entry).describe())

    def look_up(self, runtime: str, container_id: str) -> Container | None:
        """The runtime's answer about one container; None (logged) when it gives none."""
        self.lookups += 1
        command = [*self.inspect[runtime], container_id]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=INSPECT_TIMEOUT)
            answers = json.loads(done.stdout) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            done, answers = None, None
            why = str(e)
        else:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], dict):
            self.failures += 1
            log.warning("container %s (%s): no answer from %r: %s; its events carry the id only",
                        container_id[:12], runtime, " ".join(command[:2]), why if answers is None else "no record")
            return None
        return from_inspect(runtime, container_id, answers[0])
