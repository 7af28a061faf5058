"""Conditions compiled to Python functions.

The rules of one event kind become one generated function: each field is read
at most once per event, into a local variable, only when a check needs it
(fields that are plain attributes of the event are read in place); a
check several rules share (evt.res = SUCCESS) is made once, and a field or a check
read in one place only is written in place, without the local that remembers it
(remembering costs more than the test); each check calls
its value test (condition.check_test, the one place operator
semantics live); `and`/`or`/`not` are Python's own. The generated text is kept
(RuleSet.judges) for debugging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ebpfmon.rules.condition import BoolOp, Check, Not, check_test
from ebpfmon.rules.fields import INLINE_NAMES

MISSING = object()


def _check_key(check: Check) -> tuple:
    return check.field.name, check.index, check.op, tuple(t.value for t in check.values)


def _field_key(check: Check) -> str:
    return check.field.name if check.index is None else f"{check.field.name}[{check.index}]"


def _checks_of(node):
    if isinstance(node, Check):
        yield node
    elif isinstance(node, Not):
        yield from _checks_of(node.child)
    elif isinstance(node, BoolOp):
        for child in node.children:
            yield from _checks_of(child)


class _Generator:
    def __init__(self, kind: str | None, trees: list[Any]) -> None:
        self.kind = kind
        # how often each check is written, at most, and each field read (once per distinct check)
        checks = [c for tree in trees for c in _checks_of(tree)]
        self.check_uses = Counter(_check_key(c) for c in checks)
        self.field_uses = Counter(_field_key(c) for c in {_check_key(c): c for c in checks}.values())
        self.names: dict[str, Any] = {"_M": MISSING}
        self.fields: dict[str, str] = {}  # field key -> local variable
        self.readers: dict[str, str] = {}  # field key -> its extractor's name
        self.checks: dict[tuple, str] = {}  # identical checks of several rules -> one local result
        self.check_exprs: dict[str, str] = {}

    def const(self, value: Any, prefix: str) -> str:
        name = f"{prefix}{len(self.names)}"
        self.names[name] = value
        return name

    def field(self, check: Check) -> str:
        if check.field.attribute and self.kind in check.field.kinds and check.index is None:
            return f"e.{check.field.attribute}"  # in place: a call per field costs more than the test
        key = _field_key(check)
        once = self.field_uses[key] == 1
        extract = check.field.extractor_for(self.kind)
        inline = getattr(extract, "inline", None)  # an expression, evaluated in place (fields._inline)
        if inline is not None and check.index is None and not check.field.indexed:
            self.names.update(INLINE_NAMES)
            expression = f"({inline})"
        else:
            reader = self.readers.get(key)
            if reader is None:
                if check.index is not None or check.field.indexed:
                    index = check.index
                    extract = lambda e, c, extract=extract, index=index: extract(e, c, index)  # noqa: E731
                reader = self.readers[key] = self.const(extract, "_x")
            expression = f"{reader}(e, c)"
        if once:
            return expression
        var = self.fields.get(key)
        if var is None:
            var = self.fields[key] = f"_f{len(self.fields)}"
        return f"({var} if {var} is not _M else ({var} := {expression}))"

    def check(self, check: Check) -> str:
        key = _check_key(check)
        if self.check_uses[key] == 1:
            return f"({self.check_expr(check)})"
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
        truthy = getattr(test_fn, "truthy", None)  # a C function true where the test holds: no frame per item
        if many:
            found = (f"any(map({self.const(truthy, '_t')}, _l))" if truthy
                     else f"any({self.const(test_fn, '_t')}(_i) for _i in _l)")
            return f"((_l := {value}) is not None and {negate}{found})"
        return f"((_v := {value}) is not None and {negate}{self.const(test_fn, '_t')}(_v))"

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
    gen = _Generator(kind, trees)
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
