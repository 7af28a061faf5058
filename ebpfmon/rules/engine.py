"""The engine: events in, verdicts out.

Stateless rules are judged on each event alone. Window and sequence rules keep
state per key (agent, process...), timed by the events' own clocks so that a
recorded trace replays to the same verdicts as live. State is bounded: keys
expire with their window and the oldest keys are dropped (and counted) past
max_keys, so an agent spawning millions of processes cannot exhaust memory.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from ebpfmon import events as ev
from ebpfmon.rules.condition import Evaluation
from ebpfmon.rules.fields import Context
from ebpfmon.rules.ruleset import CompiledRule, FieldRef, RuleSet, SequenceSpec, WindowSpec

NS = 1_000_000_000


@dataclass
class Verdict:
    """A rule fired on an event: the alert, and the actions it asks for."""

    rule: str
    priority: str
    output: str
    tags: list[str]
    actions: list[str]
    enforce: bool
    agent: str | None  # the agent's cgroup
    event: ev.Event
    count: int = 1  # events (or distinct values) that made a window rule fire
    never_suspend: bool = False  # the containment breaker never suspends the rule
    output_fields: dict[str, Any] = field(default_factory=dict)  # the fields the output names, by name

    @property
    def time_ns(self) -> int:
        return self.event.time_ns

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "priority": self.priority, "output": self.output, "tags": self.tags,
                "actions": self.actions, "enforce": self.enforce, "agent": self.agent, "count": self.count,
                "time_ns": self.time_ns, "event": self.event.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _key(x: Evaluation, by: list[FieldRef]) -> tuple:
    return tuple(x.get(name, f, index) for f, index, name in by)


class BoundedKeys(OrderedDict):
    """Per-key state, least recently used dropped first past max_keys."""

    def __init__(self, max_keys: int):
        super().__init__()
        self.max_keys = max_keys
        self.evicted = 0

    def touch(self, key, make):
        state = self.get(key)
        if state is None:
            state = self[key] = make()
            if len(self) > self.max_keys:
                self.popitem(last=False)
                self.evicted += 1
        else:
            self.move_to_end(key)
        return state


class WindowState:
    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self.keys = BoundedKeys(spec.max_keys)

    def observe(self, x: Evaluation, now: int) -> int | None:
        """Records the event; the count when it reaches the threshold (and resets), else None."""
        spec = self.spec
        horizon = now - int(spec.within * NS)
        if spec.distinct:
            # value -> last seen; at most count values, since reaching count resets
            seen: dict = self.keys.touch(_key(x, spec.by), dict)
            seen[_key(x, spec.distinct)] = now
            for value in [v for v, t in seen.items() if t < horizon]:
                del seen[value]
            count = len(seen)
        else:
            times: deque = self.keys.touch(_key(x, spec.by), lambda: deque(maxlen=spec.count))
            times.append(now)
            while times and times[0] < horizon:
                times.popleft()
            count = len(times)
        if count >= spec.count:
            del self.keys[_key(x, spec.by)]
            return count
        return None


class SequenceState:
    def __init__(self, spec: SequenceSpec):
        self.spec = spec
        self.keys = BoundedKeys(spec.max_keys)  # key -> [next step, time of the first step]

    def observe(self, x: Evaluation, now: int, held: list[bool]) -> bool:
        """Advances this key's sequence given which steps the event satisfies;
        True when its last step matched."""
        spec = self.spec
        key = _key(x, spec.by)
        state = self.keys.get(key)
        if state is not None and now - state[1] > spec.within * NS:
            del self.keys[key]
            state = None
        if state is not None and held[state[0]]:
            state[0] += 1
            if state[0] == len(spec.steps):
                del self.keys[key]
                return True
            return False
        if held[0]:
            state = self.keys.touch(key, lambda: [1, now])
            state[0], state[1] = 1, now
        return False


class Engine:
    def __init__(self, ruleset: RuleSet, context: Context | None = None):
        self.context = context or Context()
        self.load(ruleset)

    def load(self, ruleset: RuleSet) -> None:
        """Switches to a new rule set; state of stateful rules starts afresh."""
        self.ruleset = ruleset
        self.windows = {r.name: WindowState(r.window) for r in ruleset.rules if r.window}
        self.sequences = {r.name: SequenceState(r.sequence) for r in ruleset.rules if r.sequence}

    def evaluate(self, event: ev.Event) -> list[Verdict]:
        kind = self.ruleset.judges.get(event.kind)
        if kind is None:
            return []
        held = kind.judge(event, self.context)
        if not held:
            return []
        x = Evaluation(event, self.context)
        verdicts = []
        plain = len(kind.plain)
        for position in held:
            if position >= plain:
                break
            rule = kind.plain[position]
            count = self.windows[rule.name].observe(x, event.time_ns) if rule.window else 1
            if count:
                verdicts.append(self._verdict(rule, x, count))
        if held[-1] >= plain:
            held_set = set(held)
            for rule, steps in kind.sequences:
                step_held = [p is not None and p in held_set for p in steps]
                if any(step_held) and self.sequences[rule.name].observe(x, event.time_ns, step_held):
                    verdicts.append(self._verdict(rule, x, 1))
        return verdicts

    def _verdict(self, rule: CompiledRule, x: Evaluation, count: int) -> Verdict:
        extra = {"window.count": count}
        return Verdict(rule=rule.name, priority=rule.priority, output=rule.output.render(x, extra),
                       tags=rule.tags, actions=rule.actions, enforce=rule.enforce,
                       agent=self.context.agent_cgroup(x.event.cgroup), event=x.event, count=count,
                       never_suspend=rule.never_suspend, output_fields=rule.output.values(x, extra))

    def state_size(self) -> dict[str, int]:
        """Keys held per stateful rule (for metrics and tests)."""
        return {name: len(s.keys) for name, s in {**self.windows, **self.sequences}.items()}
