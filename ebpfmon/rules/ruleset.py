"""Compiled rules and the rule set, indexed by event kind."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ebpfmon.output import safe
from ebpfmon.rules.codegen import compile_judge
from ebpfmon.rules.condition import FIELD_REFERENCE, BoolOp, Condition, Evaluation, Not, Token, resolve_field
from ebpfmon.rules.fields import Field

# keys a window or a sequence keeps state for, least recently used dropped first past it
DEFAULT_MAX_KEYS = 10000

FieldRef = tuple[Field, int | None, str]


@dataclass
class WindowSpec:
    """Fire when `count` matching events (or distinct values) happen within `within` seconds per key."""

    by: list[FieldRef]
    count: int
    within: float
    distinct: list[FieldRef] | None = None
    max_keys: int = DEFAULT_MAX_KEYS


@dataclass
class SequenceSpec:
    """Fire when the steps' conditions match in order, per key, within `within` seconds."""

    by: list[FieldRef]
    within: float
    steps: list[Condition]
    max_keys: int = DEFAULT_MAX_KEYS

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset().union(*(s.kinds for s in self.steps))


class Output:
    """An output template: text with %field references, rendered with escaped values."""

    def __init__(self, template: str):
        self.template = template
        self.parts: list[str | FieldRef] = []
        pos = 0
        for m in FIELD_REFERENCE.finditer(template):
            self.parts.append(template[pos:m.start()])
            name = m.group(1)
            if name.startswith("window."):
                self.parts.append((None, None, name))
            else:
                f, index = resolve_field(Token("word", name, 0))
                self.parts.append((f, index, name))
            pos = m.end()
        self.parts.append(template[pos:])

    def values(self, x: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields the output names, by name, as values (None where a field has none): Falco's
        output_fields."""
        out: dict[str, Any] = {}
        for part in self.parts:
            if isinstance(part, str):
                continue
            f, index, name = part
            value = (extra or {}).get(name) if f is None else x.get(name, f, index)
            if isinstance(value, (list, tuple)):
                value = [v if isinstance(v, (int, float, bool)) else safe(str(v)) for v in value]
            elif value is not None and not isinstance(value, (int, float, bool)):
                value = safe(str(value))
            out[name] = value
        return out

    def render(self, x: Evaluation, extra: dict[str, Any] | None = None) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            f, index, name = part
            value = (extra or {}).get(name) if f is None else x.get(name, f, index)
            if value is None or value == () or value == []:
                out.append("<NA>")
            elif isinstance(value, bool):
                out.append("true" if value else "false")
            elif isinstance(value, (list, tuple)):
                out.append(safe(",".join(str(v) for v in value)))
            else:
                out.append(safe(str(value)))
        return "".join(out)


@dataclass
class CompiledRule:
    name: str
    desc: str
    priority: str
    tags: list[str]
    actions: list[str]
    enforce: bool
    condition: Condition | None
    exceptions: Condition | None
    window: WindowSpec | None
    sequence: SequenceSpec | None
    output: Output
    source: str  # file:line of the definition
    enabled: bool = True
    never_suspend: bool = False  # high confidence: the containment breaker never suspends it

    @property
    def kinds(self) -> frozenset[str]:
        return self.sequence.kinds if self.sequence else self.condition.kinds

    @property
    def stateful(self) -> str:
        return "sequence" if self.sequence else "window" if self.window else ""

    def tree_for(self, kind: str, condition: Condition | None = None):
        """A condition (by default the rule's) and no exception, for events of one kind;
        False when it cannot hold for that kind."""
        tree = (condition or self.condition).trees.get(kind, False)
        exception = self.exceptions.trees.get(kind) if self.exceptions else None
        if tree is False or exception is None:
            return tree
        return BoolOp("and", [tree, Not(exception)])


@dataclass
class KindJudge:
    """Every rule that can match one event kind, judged by one generated function.

    The function returns positions, in ascending order: first those of plain
    and window rules (`plain[i]`), then those of sequence steps (`steps` maps a
    sequence rule to the position of each of its steps; None where a step cannot
    hold for this kind).
    """

    judge: Any
    source: str
    plain: list[CompiledRule]
    sequences: list[tuple[CompiledRule, list[int | None]]]


@dataclass
class RuleSet:
    rules: list[CompiledRule]
    files: list[str] = field(default_factory=list)
    lists: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # kind -> enabled rules that can match it, in file order
        self.by_kind: dict[str, list[CompiledRule]] = defaultdict(list)
        for rule in self.rules:
            if rule.enabled:
                for kind in sorted(rule.kinds):
                    self.by_kind[kind].append(rule)
        self.judges: dict[str, KindJudge] = {}
        for kind, rules in self.by_kind.items():
            plain = [r for r in rules if not r.sequence]
            trees = [r.tree_for(kind) for r in plain]
            sequences = []
            for rule in (r for r in rules if r.sequence):
                positions = []
                for step in rule.sequence.steps:
                    tree = rule.tree_for(kind, step)
                    positions.append(None if tree is False else len(trees))
                    if tree is not False:
                        trees.append(tree)
                sequences.append((rule, positions))
            judge, source = compile_judge(trees, kind)
            self.judges[kind] = KindJudge(judge, source, plain, sequences)

    def get(self, name: str) -> CompiledRule | None:
        return next((r for r in self.rules if r.name == name), None)
