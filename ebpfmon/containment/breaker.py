"""The containment breaker, per rule: a misfiring rule must not cut every agent on the node, and
a rule that is right must keep containing however many agents misbehave at once (an RL run
executes one policy in many rollouts side by side).

A rule whose automatic disruptive actions (cut, freeze, kill, deny a GPU) reach more distinct
agents within the window than the threshold, max(breaker_agents, breaker_fraction x the agents on
the node), is suspended: it still alerts, it contains no one, until `ebpfmon rules resume RULE`
or breaker_resume_seconds. Every other rule keeps containing. Rules marked never_suspend, and
the kernel's own policy (deny lists, GPU refusals, egress profiles), are never under it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ebpfmon.config import EnforceSettings

AGENT_COUNT_TTL_NS = 5_000_000_000  # how long a count of the node's agents is reused


@dataclass
class Suspension:
    """Times are monotonic ns, like every time the breaker is given (containment.actions.wall_of
    shows them to people)."""

    since_ns: int
    until_ns: int
    agents: list[str] = field(default_factory=list)  # those it contained in the window that tripped it


class Breaker:
    def __init__(self, settings: EnforceSettings, agents_on_node: Callable[[], int]):
        self.settings = settings
        self.agents_on_node = agents_on_node
        self.recent: dict[str, deque[tuple[int, str]]] = {}  # rule -> (time, agent) of its actions
        self.suspended: dict[str, Suspension] = {}
        self._count: tuple[int, int] | None = None  # (when counted, agents)

    def threshold(self, now: int) -> int:
        if self._count is None or now - self._count[0] > AGENT_COUNT_TTL_NS:
            self._count = (now, self.agents_on_node())
        return max(self.settings.breaker_agents, math.ceil(self.settings.breaker_fraction * self._count[1]))

    def admit(self, rule: str, agent: str, now: int) -> Suspension | None:
        """None when the rule may act on the agent (counted); else the rule's suspension (new
        when this action tripped it: its since_ns is now)."""
        suspension = self.suspended.get(rule)
        if suspension is not None:
            if suspension.until_ns > now:
                return suspension
            del self.suspended[rule]
        recent = self.recent.setdefault(rule, deque())
        horizon = now - int(self.settings.breaker_seconds * 1e9)
        while recent and recent[0][0] < horizon:
            recent.popleft()
        agents = list(dict.fromkeys(a for _, a in recent))
        if agent in agents:
            return None
        if len(agents) >= self.threshold(now):
            suspension = Suspension(now, now + int(self.settings.breaker_resume_seconds * 1e9), agents)
            self.suspended[rule] = suspension
            recent.clear()
            return suspension
        recent.append((now, agent))
        return None

    def resume(self, rule: str) -> bool:
        """Lifts a suspension; False when the rule was not suspended."""
        self.recent.pop(rule, None)
        return self.suspended.pop(rule, None) is not None

    def active(self, now: int | None = None) -> dict[str, Suspension]:
        """The rules suspended now."""
        now = now if now is not None else time.monotonic_ns()
        return {rule: s for rule, s in self.suspended.items() if s.until_ns > now}
