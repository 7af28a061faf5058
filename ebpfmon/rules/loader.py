"""Loading rule files: YAML with positions, Falco's list/macro/rule items,
overrides from later files, and compilation into a RuleSet.

Every problem is collected with its file, line and column; a rule set with
any problem is refused as a whole (RuleLoadError), so a daemon keeps its last
good set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ebpfmon.config import RuleSettings
from ebpfmon.errors import ConditionError, RuleLoadError
from ebpfmon.paths import RULES_DIR
from ebpfmon.rules.vocabulary import ACTIONS, PRIORITIES
from ebpfmon.rules.condition import Macros, compile_condition, fields_in, resolve_field, Token
from ebpfmon.rules.ruleset import (DEFAULT_MAX_KEYS, CompiledRule, Output, RuleSet, SequenceSpec,
                                   WindowSpec)


RULE_KEYS = {"rule", "desc", "condition", "output", "priority", "tags", "enabled", "actions", "enforce",
             "never_suspend", "exceptions", "window", "sequence", "source", "override", "append"}
MACRO_KEYS = {"macro", "condition", "override", "append"}
LIST_KEYS = {"list", "items", "override", "append"}
IGNORED_ITEMS = {"required_engine_version", "required_plugin_versions"}
APPENDABLE = {"rule": {"condition", "exceptions", "tags", "actions", "desc", "output"},
              "macro": {"condition"}, "list": {"items"}}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


@dataclass
class Located:
    """A value from YAML and where its node is in the file."""

    value: Any
    node: yaml.Node
    source: "SourceFile"

    def problem(self, message: str) -> Problem:
        mark = self.node.start_mark
        return Problem(self.source.name, mark.line + 1, mark.column + 1, message)

    def token_problem(self, error: ConditionError) -> Problem:
        """The position of a condition token inside this (string) node."""
        text = self.value if isinstance(self.value, str) else ""
        start, end = self.node.start_mark.index, self.node.end_mark.index
        index = None
        if error.text:
            nth = text[:error.pos].count(error.text)
            found = -1
            for _ in range(nth + 1):
                found = self.source.text.find(error.text, found + 1, end)
                if found < start:
                    found = -1
                    break
            index = found if found >= 0 else None
        if index is None:
            return self.problem(error.message)
        line = self.source.text.count("\n", 0, index) + 1
        col = index - (self.source.text.rfind("\n", 0, index) + 1) + 1
        return Problem(self.source.name, line, col, error.message)


@dataclass
class SourceFile:
    name: str
    text: str


@dataclass
class Item:
    kind: str  # rule, macro, list
    name: str
    fields: dict[str, Located]
    where: Located  # the item itself

    def get(self, key: str, default=None):
        return self.fields[key].value if key in self.fields else default


class RuleYamlLoader(yaml.SafeLoader):
    """SafeLoader, except that a bare = is the string "=" (Falco's exceptions write
    `comps: [=, in]`; PyYAML would read = as its obscure "value" tag)."""


RuleYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _max_keys(spec: dict) -> int:
    """How many keys a window or sequence keeps: a whole number from 1."""
    value = spec.get("max_keys", DEFAULT_MAX_KEYS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_keys is a whole number from 1, got {value!r}")
    return value


def read_items(path: Path, problems: list[Problem]) -> list[Item]:
    name = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        problems.append(Problem(name, 0, 0, f"cannot read: {e.strerror}"))
        return []
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        problems.append(Problem(name, line, 0, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"))
        return []
    source = SourceFile(name, text)
    loader = RuleYamlLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problems.append(Problem(name, line, col, f"YAML syntax: {getattr(e, 'problem', e)}"))
        return []
    finally:
        loader.dispose()
    if data is None:
        return []
    if not isinstance(data, list):
        problems.append(Located(data, root, source).problem("a rule file is a list of list/macro/rule items"))
        return []
    items = []
    for node, value in zip(root.value, data):
        where = Located(value, node, source)
        if not isinstance(value, dict):
            problems.append(where.problem("each item must be a mapping with a list, macro or rule key"))
            continue
        fields = {k.value: Located(v, vn, source) for (k, vn), v in zip(node.value, value.values())}
        kinds = [k for k in ("rule", "macro", "list") if k in value]
        if not kinds:
            if not set(value) & IGNORED_ITEMS:
                problems.append(where.problem(f"item has none of list, macro, rule (keys: {', '.join(value)})"))
            continue
        kind = kinds[0]
        known = {"rule": RULE_KEYS, "macro": MACRO_KEYS, "list": LIST_KEYS}[kind]
        for key, loc in fields.items():
            if key not in known:
                problems.append(Located(key, next(k for k, _ in node.value if k.value == key), source).problem(
                    f"unknown key {key!r} in {kind} {value[kind]!r} (known: {', '.join(sorted(known))})"))
        items.append(Item(kind, str(value[kind]), fields, where))
    return items


def rule_files(paths: list[Path]) -> list[Path]:
    """Files in the order given; a directory's *.yaml files in name order."""
    files = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    return files


def _override_mode(item: Item, key: str) -> str | None:
    """append, replace or None (a plain definition) for one key of an item."""
    if item.get("append") is True:
        return "append"
    override = item.get("override") or {}
    return override.get(key) if isinstance(override, dict) else None


def merge(items: list[Item], problems: list[Problem]) -> dict[str, dict[str, Item]]:
    """Definitions by kind and name, with later overrides applied in order."""
    defs: dict[str, dict[str, Item]] = {"list": {}, "macro": {}, "rule": {}}
    for item in items:
        table = defs[item.kind]
        override = item.get("override")
        if item.get("append") is not True and override is None:
            table[item.name] = item
            continue
        if override is not None and not isinstance(override, dict):
            problems.append(item.fields["override"].problem("override maps keys to append or replace"))
            continue
        base = table.get(item.name)
        if base is None:
            problems.append(item.where.problem(f"{item.kind} {item.name!r} overrides nothing: no earlier "
                                               f"{item.kind} of that name"))
            continue
        merged = Item(base.kind, base.name, dict(base.fields), base.where)
        for key, loc in item.fields.items():
            if key in (item.kind, "override", "append"):
                continue
            mode = _override_mode(item, key)
            if mode not in ("append", "replace"):
                problems.append(loc.problem(f"key {key!r} of {item.kind} {item.name!r} needs 'override: "
                                            f"{{{key}: append}}' or '{{{key}: replace}}'"))
                continue
            if mode == "append" and key not in APPENDABLE[item.kind]:
                problems.append(loc.problem(f"{key} of a {item.kind} can be replaced, not appended"))
                continue
            if mode == "append" and key in merged.fields:
                old = merged.fields[key].value
                value = (f"{old} {loc.value}" if isinstance(old, str) else list(old) + list(loc.value))
                merged.fields[key] = Located(value, loc.node, loc.source)
            else:
                merged.fields[key] = loc
        table[item.name] = merged
    return defs


def _resolve_lists(defs: dict[str, Item], problems: list[Problem]) -> dict[str, list[str]]:
    """List items, with items that name other lists expanded."""
    resolved: dict[str, list[str]] = {}

    def resolve(name: str, stack: tuple[str, ...]) -> list[str]:
        if name in resolved:
            return resolved[name]
        item = defs[name]
        raw = item.get("items", [])
        if not isinstance(raw, list):
            problems.append(item.fields.get("items", item.where).problem(f"items of list {name!r} must be a list"))
            raw = []
        out: list[str] = []
        for value in raw:
            value = str(value)
            if value in defs and value not in stack:
                out.extend(resolve(value, stack + (value,)))
            else:
                out.append(value)
        resolved[name] = out
        return out

    for name in defs:
        resolve(name, (name,))
    return resolved


def _quote(value: Any) -> str:
    return '"' + str(value).replace('"', '\\"') + '"'


def exception_condition(exc: Any) -> str:
    """Falco's exceptions: rows of values for fields, each row a case to leave alone."""
    if not isinstance(exc, dict) or "name" not in exc:
        raise ValueError("an exception is a mapping with name, fields, comps (optional) and values")
    fields = exc.get("fields", [])
    single = isinstance(fields, str)
    fields = [fields] if single else list(fields)
    comps = exc.get("comps", "=" if single else ["="] * len(fields))
    comps = [comps] if isinstance(comps, str) else list(comps)
    if len(comps) != len(fields):
        raise ValueError(f"exception {exc['name']!r}: {len(fields)} fields but {len(comps)} comps")
    rows = []
    for row in exc.get("values", []) or []:
        row = [row] if single or not isinstance(row, list) else row
        if len(row) != len(fields):
            raise ValueError(f"exception {exc['name']!r}: a row of values has {len(row)} items for "
                             f"{len(fields)} fields")
        parts = []
        for f, c, v in zip(fields, comps, row):
            if c in ("in", "intersects", "pmatch"):
                items = v if isinstance(v, list) else [v]
                parts.append(f"{f} {c} ({', '.join(_quote(i) for i in items)})")
            else:
                parts.append(f"{f} {c} {_quote(v)}")
        rows.append("(" + " and ".join(parts) + ")")
    return " or ".join(rows)


def _duration(value: Any) -> float:
    """Seconds from 30, 30s, 5m or 1h."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (30, 30s, 5m, 1h)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def _field_list(value: Any, what: str) -> list[tuple[Any, int | None, str]]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not names:
        raise ValueError(f"{what} names at least one field")
    out = []
    for name in names:
        try:
            f, index = resolve_field(Token("word", str(name), 0))
        except ConditionError as e:
            raise ValueError(f"{what}: {e.message}") from None
        out.append((f, index, str(name)))
    return out


class Compiler:
    def __init__(self, defs: dict[str, dict[str, Item]], problems: list[Problem]):
        self.defs = defs
        self.problems = problems
        self.lists = _resolve_lists(defs["list"], problems)
        self.macros = Macros({n: str(i.get("condition", "")) for n, i in defs["macro"].items()}, self.lists)

    def condition_problem(self, loc: Located, error: ConditionError) -> Problem:
        if error.where:  # inside a macro: point at the macro's own condition
            macro = self.defs["macro"][error.where]
            p = macro.fields.get("condition", macro.where).token_problem(error)
            return Problem(p.file, p.line, p.col, f"in macro {error.where!r}: {error.message}")
        return loc.token_problem(error)

    def condition(self, loc: Located, text: str):
        try:
            return compile_condition(text, self.macros)
        except ConditionError as e:
            self.problems.append(self.condition_problem(loc, e))
            return None

    def rule(self, item: Item) -> CompiledRule | None:
        before = len(self.problems)
        name = item.name

        def need(key: str, kind: type | tuple = str):
            if key not in item.fields:
                self.problems.append(item.where.problem(f"rule {name!r} has no {key}"))
                return None
            value = item.fields[key].value
            if not isinstance(value, kind):
                self.problems.append(item.fields[key].problem(f"{key} of rule {name!r} has the wrong type"))
                return None
            return value

        priority = str(need("priority") or "").upper()
        priority = {"INFO": "INFORMATIONAL"}.get(priority, priority)
        if "priority" in item.fields and priority not in PRIORITIES:
            self.problems.append(item.fields["priority"].problem(
                f"priority {item.get('priority')!r} is not one of {', '.join(PRIORITIES)}"))
        output_text = need("output") or ""
        need("desc")
        actions = item.get("actions", []) or []
        if not isinstance(actions, list) or any(a not in ACTIONS for a in actions):
            self.problems.append(item.fields["actions"].problem(
                f"actions must be a list of {', '.join(ACTIONS)}; got {actions!r}"))
        tags = item.get("tags", []) or []
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tags):
            self.problems.append(item.fields["tags"].problem(
                f"tags is a list of words, such as [T1572, tunnel]; got {tags!r}"))
            tags = []
        tags = [str(t) for t in tags]
        for key in ("enabled", "enforce", "never_suspend"):
            if key in item.fields and not isinstance(item.get(key), bool):
                self.problems.append(item.fields[key].problem(f"{key} is true or false"))

        window = sequence = None
        if "sequence" in item.fields:
            sequence = self.sequence(item)
            if "condition" in item.fields:
                self.problems.append(item.fields["condition"].problem(
                    f"rule {name!r} has a sequence: its steps are its conditions, drop 'condition'"))
            cond = None
        else:
            text = need("condition")
            cond = self.condition(item.fields["condition"], text) if text else None
            if "window" in item.fields:
                window = self.window(item)
        exceptions = None
        if "exceptions" in item.fields:
            exceptions = self.exceptions(item)
        for ref in fields_in(output_text):
            try:
                resolve_field(Token("word", ref, 0))
            except ConditionError as e:
                if ref not in ("window.count", "window.values"):
                    self.problems.append(item.fields["output"].problem(f"output of rule {name!r}: {e.message}"))
        if len(self.problems) > before:
            return None
        return CompiledRule(
            name=name, desc=str(item.get("desc", "")), priority=priority, tags=tags, actions=list(actions),
            enabled=item.get("enabled", True),
            enforce=item.get("enforce", True), never_suspend=item.get("never_suspend", False), condition=cond,
            exceptions=exceptions, window=window, sequence=sequence, output=Output(output_text),
            source=f"{item.where.source.name}:{item.where.node.start_mark.line + 1}")

    def exceptions(self, item: Item):
        loc = item.fields["exceptions"]
        texts = []
        for exc in loc.value if isinstance(loc.value, list) else [loc.value]:
            try:
                text = exception_condition(exc)
            except ValueError as e:
                self.problems.append(loc.problem(f"rule {item.name!r}: {e}"))
                return None
            if text:
                texts.append(f"({text})")
        if not texts:
            return None
        try:
            return compile_condition(" or ".join(texts), self.macros)
        except ConditionError as e:
            self.problems.append(loc.problem(f"exceptions of rule {item.name!r}: {e.message}"))
            return None

    def window(self, item: Item) -> WindowSpec | None:
        loc = item.fields["window"]
        spec = loc.value
        try:
            if not isinstance(spec, dict):
                raise ValueError("window is a mapping: by, count, within, and optionally distinct, max_keys")
            unknown = set(spec) - {"by", "count", "within", "distinct", "max_keys"}
            if unknown:
                raise ValueError(f"unknown window key(s) {sorted(unknown)}")
            count = int(spec["count"])
            if count < 1:
                raise ValueError("count must be at least 1")
            return WindowSpec(by=_field_list(spec.get("by"), "window.by"), count=count,
                              within=_duration(spec["within"]),
                              distinct=_field_list(spec["distinct"], "window.distinct") if "distinct" in spec
                              else None,
                              max_keys=_max_keys(spec))
        except (ValueError, KeyError, TypeError) as e:
            self.problems.append(loc.problem(f"window of rule {item.name!r}: {e}"))
            return None

    def sequence(self, item: Item) -> SequenceSpec | None:
        loc = item.fields["sequence"]
        spec = loc.value
        try:
            if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list) or len(spec["steps"]) < 2:
                raise ValueError("sequence is a mapping: by, within, and at least two steps (conditions)")
            unknown = set(spec) - {"by", "within", "steps", "max_keys"}
            if unknown:
                raise ValueError(f"unknown sequence key(s) {sorted(unknown)}")
            by = _field_list(spec.get("by"), "sequence.by")
            within = _duration(spec["within"])
            max_keys = _max_keys(spec)
        except (ValueError, KeyError, TypeError) as e:
            self.problems.append(loc.problem(f"sequence of rule {item.name!r}: {e}"))
            return None
        steps = []
        for step in spec["steps"]:
            text = step.get("condition") if isinstance(step, dict) else step
            compiled = self.condition(loc, str(text))
            if compiled is None:
                return None
            steps.append(compiled)
        return SequenceSpec(by=by, within=within, steps=steps, max_keys=max_keys)

    def macros_check(self) -> None:
        """Every macro parses and compiles, even one no rule uses yet."""
        for name, item in self.defs["macro"].items():
            try:
                compile_condition(name, self.macros)
            except ConditionError as e:
                self.problems.append(self.condition_problem(item.fields.get("condition", item.where), e))


def rule_paths(settings: RuleSettings) -> list[Path]:
    """The rule files and directories to load, in order: the shipped packs (unless left out),
    then the operator's, which override them."""
    return ([RULES_DIR] if settings.defaults else []) + [Path(f) for f in settings.files]


def load_rules(paths: list[Path] | None = None) -> RuleSet:
    """Loads, merges and compiles rule files; RuleLoadError lists every problem."""
    files = rule_files(paths if paths is not None else [RULES_DIR])
    problems: list[Problem] = []
    if not files:
        raise RuleLoadError([Problem(", ".join(map(str, paths or [])), 0, 0, "no rule files found")])
    items = [item for f in files for item in read_items(f, problems)]
    defs = merge(items, problems)
    compiler = Compiler(defs, problems)
    compiler.macros_check()
    rules = []
    for item in defs["rule"].values():
        compiled = compiler.rule(item)
        if compiled is not None:
            rules.append(compiled)
    unique = sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.line, p.col))
    if unique:
        raise RuleLoadError(unique)
    return RuleSet(rules, files=[str(f) for f in files], lists=compiler.lists)
