"""Conditions compiled to Python functions.

The rules of one event kind become one generated function: each field is read
at most once per event, into a local variable, only when a check needs it
(fields that are plain attributes of the event are read in place); a
check several rules share (evt.res = SUCCESS) is made once; each check calls
its value test (condition.check_test, the one place operator
semantics live); `and`/`or`/`not` are Python's own. The generated text is kept
(RuleSet.judges) for debugging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ebpfmon.rules.condition import BoolOp, Check, Not, check_test
from ebpfmon.rules.fields import INLINE_NAMES

MISSING = object()


class _Generator:
    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.names: dict[str, Any] = {"_M": MISSING}
        self.fields: dict[str, str] = {}  # field key -> local variable
        self.checks: dict[tuple, str] = {}  # identical checks of several rules -> one local result
        self.check_exprs: dict[str, str] = {}

    def const(self, value: Any, prefix: str) -> str:
        name = f"{prefix}{len(self.names)}"
        self.names[name] = value
        return name

    def field(self, check: Check) -> str:
        if check.field.attribute and self.kind in check.field.kinds and check.index is None:
            return f"e.{check.field.attribute}"  # in place: a call per field costs more than the test
        key = check.field.name if check.index is None else f"{check.field.name}[{check.index}]"
        var = self.fields.get(key)
        extract = check.field.extractor_for(self.kind)
        inline = getattr(extract, "inline", None)  # an expression, evaluated in place (fields._inline)
        if inline is not None and check.index is None and not check.field.indexed:
            var = self.fields[key] = var or f"_f{len(self.fields)}"
            self.names.update(INLINE_NAMES)
            return f"({var} if {var} is not _M else ({var} := ({inline})))"
        if var is None:
            var = self.fields[key] = f"_f{len(self.fields)}"
            if check.index is not None or check.field.indexed:
                index = check.index
                reader = lambda e, c, extract=extract, index=index: extract(e, c, index)  # noqa: E731
            else:
                reader = extract
            self.names[f"_x{var}"] = reader
        return f"({var} if {var} is not _M else ({var} := _x{var}(e, c)))"

    def check(self, check: Check) -> str:
        key = (check.field.name, check.index, check.op, tuple(t.value for t in check.values))
        var = self.checks.get(key)
        if var is None:
            var = self.checks[key] = f"_c{len(self.checks)}"
            self.check_exprs[var] = self.check_expr(check)
        return f"({var} if {var} is not _M else ({var} := {self.check_exprs[var]}))"

    def check_expr(self, check: Check) -> str:
        value = self.field(check)
        many = check.field.is_list and check.index is None
        if check.op == "exists":
            return f"bool({value})" if many else f"({value} is not None)"
        test_fn = check_test(check)
        members = getattr(test_fn, "members", None)
        negate = "not " if check.op == "!=" else ""
        if members is not None:  # = and in: set operations instead of a call per value
            s = self.const(members, "_s")
            if many:
                return f"((_l := {value}) is not None and {negate}(not {s}.isdisjoint(_l)))"
            return f"((_v := {value}) is not None and {negate}(_v in {s}))"
        test = self.const(test_fn, "_t")
        if many:
            found = f"any({test}(_i) for _i in _l)"
            return f"((_l := {value}) is not None and {'not ' if check.op == '!=' else ''}{found})"
        return f"((_v := {value}) is not None and {'not ' if check.op == '!=' else ''}{test}(_v))"

    def node(self, node) -> str:
        if isinstance(node, bool):
            return repr(node)
        if isinstance(node, Check):
            return self.check(node)
        if isinstance(node, Not):
            return f"(not {self.node(node.child)})"
        joiner = f" {node.op} "
        return "(" + joiner.join(self.node(c) for c in node.children) + ")"


def _conjuncts(tree) -> list:
    if isinstance(tree, BoolOp) and tree.op == "and":
        return [c for child in tree.children for c in _conjuncts(child)]
    return [tree]


def compile_judge(trees: list[Any], kind: str | None = None) -> tuple[Callable[[Any, Any], list[int]], str]:
    """One function judging an event (of kind, when given) against several conditions:
    (event, context) -> positions of the conditions that hold, ascending. Also returns its source.

    Conditions that start with the same check (most start with spawned_process)
    are grouped under one `if` on it, so an event that fails it costs one test."""
    gen = _Generator(kind)
    groups: dict[str, list[tuple[int, list[str]]]] = {}
    for i, tree in enumerate(trees):
        parts = [gen.node(c) for c in _conjuncts(tree)]
        groups.setdefault(parts[0], []).append((i, parts[1:]))
    lines = ["def judge(e, c):"]
    local = list(gen.fields.values()) + list(gen.checks.values())
    if local:
        lines.append("    " + " = ".join(local) + " = _M")
    lines.append("    held = []")
    for first, members in groups.items():
        lines.append(f"    if {first}:")
        for i, rest in members:
            if rest:
                lines.append(f"        if {' and '.join(rest)}:")
                lines.append(f"            held.append({i})")
            else:
                lines.append(f"        held.append({i})")
    if len(groups) < len(trees):
        lines.append("    held.sort()")
    lines.append("    return held")
    source = "\n".join(lines)
    namespace = dict(gen.names)
    exec(compile(source, "<ebpfmon rules>", "exec"), namespace)  # noqa: S102 - our own generated text
    return namespace["judge"], source
