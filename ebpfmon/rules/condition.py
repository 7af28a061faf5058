"""Conditions: Falco's filter language, parsed once and compiled to Python closures.

    cond   := or
    or     := and ('or' and)*
    and    := not ('and' not)*
    not    := 'not' not | '(' cond ')' | check | MACRO
    check  := FIELD OP VALUE | FIELD ('in'|'intersects'|'pmatch') LIST | FIELD 'exists'
    LIST   := '(' item (',' item)* ')'   items: quoted strings, bare words, or list names

Bare words in a list are literal values, as in Falco, except the name of a
defined list, and words made of lower-case letters, digits and underscores with
at least one underscore (ssh_binaries): those name lists and must be defined.
Quote such a word to mean the literal string.
"""

from __future__ import annotations

import difflib
import functools
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ebpfmon.errors import ConditionError
from ebpfmon.rules.fields import ALL_KINDS, BOOL, FIELDS, INT, IP, STR, Field

KEYWORDS = {"and", "or", "not"}
COMPARISONS = {"=", "==", "!=", "<", "<=", ">", ">="}
STRING_OPS = {"contains", "icontains", "startswith", "endswith", "glob", "regex"}
LIST_OPS = {"in", "intersects", "pmatch"}
ALL_OPS = COMPARISONS | STRING_OPS | LIST_OPS | {"exists"}
LIST_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")
# a %field reference in an output template
FIELD_REFERENCE = re.compile(r"%([a-z0-9_.]+(?:\[[A-Za-z0-9_./-]+\])?)")
# a field's name, and what is in its [ ]: a position, or a key (container.label[ebpfmon.agent])
FIELD_NAME = re.compile(r"([a-z0-9_.]+)(?:\[([A-Za-z0-9_./-]+)\])?")

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<op>==|!=|<=|>=|=|<|>)
  | (?P<word>[^\s(),=<>!'"]+)
""", re.VERBOSE)

@dataclass
class Token:
    kind: str
    text: str
    pos: int

    @property
    def value(self) -> str:
        if self.kind == "string":
            # only the quote itself is escaped: backslashes stay, for regexes
            quote = self.text[0]
            return self.text[1:-1].replace("\\" + quote, quote)
        return self.text


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m:
            raise ConditionError(f"unexpected character {text[pos]!r}", pos, text[pos])
        if m.lastgroup != "ws":
            tokens.append(Token(m.lastgroup, m.group(), pos))
        pos = m.end()
    return tokens


# ---- syntax tree ----

@dataclass
class Check:
    field: Field
    index: int | str | None
    op: str
    values: list[Token]  # one for comparisons, several for lists, none for exists
    pos: int
    text: str
    origin: str = ""  # the macro it came from; "" for the condition itself


@dataclass
class MacroRef:
    name: str
    pos: int
    origin: str = ""


@dataclass
class Not:
    child: Any


@dataclass
class BoolOp:
    op: str  # and, or
    children: list


class Parser:
    def __init__(self, text: str, lists: dict[str, list[str]], origin: str = ""):
        self.text = text
        self.origin = origin
        self.lists = lists
        self.i = 0
        try:
            self.tokens = tokenize(text)
        except ConditionError as e:
            e.where = origin
            raise

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise ConditionError("the condition ends too early", len(self.text))
        self.i += 1
        return tok

    def expect(self, kind: str, what: str) -> Token:
        tok = self.take()
        if tok.kind != kind:
            raise ConditionError(f"expected {what}, found {tok.text!r}", tok.pos, tok.text)
        return tok

    def parse(self):
        try:
            return self._parse()
        except ConditionError as e:
            e.where = e.where or self.origin
            raise

    def _parse(self):
        if not self.tokens:
            raise ConditionError("the condition is empty", 0)
        node = self.parse_or()
        if self.peek() is not None:
            tok = self.peek()
            raise ConditionError(f"unexpected {tok.text!r}: expected 'and', 'or' or the end", tok.pos, tok.text)
        return node

    def _word(self, text: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "word" and tok.text == text

    def parse_or(self):
        return self._chain("or", self.parse_and)

    def parse_and(self):
        return self._chain("and", self.parse_not)

    def _chain(self, op: str, operand):
        children = [operand()]
        while self._word(op):
            self.take()
            children.append(operand())
        return children[0] if len(children) == 1 else BoolOp(op, children)

    def parse_not(self):
        if self._word("not"):
            self.take()
            return Not(self.parse_not())
        tok = self.take()
        if tok.kind == "lparen":
            node = self.parse_or()
            self.expect("rparen", "')'")
            return node
        if tok.kind != "word" or tok.text in KEYWORDS:
            raise ConditionError(f"expected a field, a macro or '(', found {tok.text!r}", tok.pos, tok.text)
        nxt = self.peek()
        is_check = nxt is not None and (nxt.kind == "op" or (nxt.kind == "word" and nxt.text in ALL_OPS))
        if not is_check:
            return MacroRef(tok.text, tok.pos, self.origin)
        return self.parse_check(tok)

    def parse_check(self, name_tok: Token) -> Check:
        field, index = resolve_field(name_tok)
        op_tok = self.take()
        op = "=" if op_tok.text == "==" else op_tok.text
        if op == "exists":
            return Check(field, index, op, [], name_tok.pos, name_tok.text, self.origin)
        if op in LIST_OPS:
            return Check(field, index, op, self.parse_list(), name_tok.pos, name_tok.text, self.origin)
        value = self.take()
        if value.kind == "op" and value.text in ("<", ">"):  # evt.dir = < (Falco)
            value = Token("word", value.text, value.pos)
        if value.kind not in ("word", "string"):
            raise ConditionError(f"expected a value after {op!r}, found {value.text!r}", value.pos, value.text)
        return Check(field, index, op, [value], name_tok.pos, name_tok.text, self.origin)

    def parse_list(self) -> list[Token]:
        self.expect("lparen", "'(' to open a list")
        items: list[Token] = []
        if self.peek() is not None and self.peek().kind == "rparen":
            self.take()
            return items
        while True:
            tok = self.take()
            if tok.kind not in ("word", "string"):
                raise ConditionError(f"expected a list item, found {tok.text!r}", tok.pos, tok.text)
            items.extend(self.expand(tok))
            sep = self.take()
            if sep.kind == "rparen":
                return items
            if sep.kind != "comma":
                raise ConditionError(f"expected ',' or ')' in a list, found {sep.text!r}", sep.pos, sep.text)

    def expand(self, tok: Token) -> list[Token]:
        if tok.kind == "word" and (tok.text in self.lists or LIST_NAME.match(tok.text)):
            if tok.text not in self.lists:
                raise ConditionError(f"undefined list {tok.text!r} (quote it to mean the literal string)",
                                     tok.pos, tok.text)
            return [Token("string", '"' + item.replace('"', '\\"') + '"', tok.pos) for item in self.lists[tok.text]]
        return [tok]


def resolve_field(tok: Token) -> tuple[Field, int | None]:
    m = FIELD_NAME.fullmatch(tok.text)
    name, index = (m.group(1), m.group(2)) if m else (tok.text, None)
    field = FIELDS.get(name)
    if field is None:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConditionError(f"unknown field {name!r}{hint}", tok.pos, tok.text)
    if index is not None and not field.indexed:
        raise ConditionError(f"field {name} takes no [index]", tok.pos, tok.text)
    if index is not None and not field.keyed:
        if not index.isdigit():
            raise ConditionError(f"field {name} takes a position in [ ] (such as [1]), not {index!r}",
                                 tok.pos, tok.text)
        index = int(index)
    return field, index


# ---- compiling ----

MISSING = object()


class Evaluation:
    """One event under evaluation: fields are read once and cached."""

    __slots__ = ("event", "context", "cache")

    def __init__(self, event, context):
        self.event = event
        self.context = context
        self.cache: dict[str, Any] = {}

    def get(self, key: str, field: Field, index: int | None) -> Any:
        value = self.cache.get(key, MISSING)
        if value is MISSING:
            if self.event.kind not in field.kinds:
                value = None
            elif index is not None or field.indexed:
                value = field.extract(self.event, self.context, index)
            else:
                value = field.extract(self.event, self.context)
            self.cache[key] = value
        return value


def _typed(field: Field, tok: Token) -> Any:
    text = tok.value
    if field.type == INT:
        try:
            return int(text)
        except ValueError:
            raise ConditionError(f"{field.name} is a number; {text!r} is not", tok.pos, tok.text) from None
    if field.type == BOOL:
        if text.lower() not in ("true", "false"):
            raise ConditionError(f"{field.name} is true or false, not {text!r}", tok.pos, tok.text)
        return text.lower() == "true"
    if field.type == IP:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConditionError(f"{field.name} is an address; {text!r} is not an address or CIDR",
                                 tok.pos, tok.text) from None
    return text


@functools.lru_cache(maxsize=65536)
def _ip(value: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _ip_in(value: str, networks: list) -> bool:
    ip = _ip(value)
    return ip is not None and any(ip in n for n in networks)


def _pmatcher(prefixes: list[str]) -> Callable[[str], bool]:
    """The path is one of the prefixes or below one (/tmp matches /tmp/x, not /tmpx)."""
    exact = frozenset(p.rstrip("/") or "/" for p in prefixes)
    below = tuple(p.rstrip("/") + "/" for p in prefixes)
    return lambda v: v in exact or v.startswith(below)


def check_test(check: Check) -> Callable[[Any], bool]:
    """The test of one (scalar) field value for this check: the semantics of every
    operator, in one place. Raises ConditionError for values or operators that
    do not fit the field."""
    try:
        return _value_test(check)
    except ConditionError as e:
        e.where = check.origin
        raise


def _value_test(check: Check) -> Callable[[Any], bool]:
    field, op = check.field, check.op
    if op == "exists":
        return lambda v: True
    values = [_typed(field, t) for t in check.values]
    if field.type == IP and op in ("=", "!=", "in"):
        networks = values
        # cached: an agent talks to few addresses, and ipaddress membership is the slowest
        # test there is (a connect storm to one address judged each in a few microseconds)
        return functools.lru_cache(maxsize=4096)(lambda v: _ip_in(v, networks))
    if op in ("<", "<=", ">", ">="):
        if field.type != INT:
            raise ConditionError(f"{op} compares numbers; {field.name} is a {field.type}", check.pos, check.text)
        target = values[0]
        return {"<": lambda v: v < target, "<=": lambda v: v <= target,
                ">": lambda v: v > target, ">=": lambda v: v >= target}[op]
    if op in STRING_OPS | {"pmatch"} and field.type != STR:
        raise ConditionError(f"{op} works on text; {field.name} is a {field.type}", check.pos, check.text)
    if op in ("=", "!="):
        target = values[0]
        test = lambda v: v == target  # noqa: E731
        test.members = frozenset(values)
        return test
    if op in ("in", "intersects"):
        members = frozenset(values)
        test = lambda v: v in members  # noqa: E731
        test.members = members  # lets compiled code test a whole list at once
        return test
    if op == "pmatch":
        return _pmatcher(values)
    target = values[0]
    if op == "contains":
        return lambda v: target in v
    if op == "icontains":
        low = target.lower()
        return lambda v: low in v.lower()
    if op == "startswith":
        return lambda v: v.startswith(target)
    if op == "endswith":
        return lambda v: v.endswith(target)
    if op == "glob":
        pattern = re.compile(fnmatch.translate(target))
        test = lambda v: pattern.match(v) is not None  # noqa: E731
        test.truthy = pattern.match  # lets compiled code test a whole list without a call per item
        return test
    if op == "regex":
        try:
            pattern = re.compile(target)
        except re.error as e:
            tok = check.values[0]
            raise ConditionError(f"regular expression {target!r} does not compile: {e}", tok.pos, tok.text) from None
        test = lambda v: pattern.search(v) is not None  # noqa: E731
        test.truthy = pattern.search
        return test
    raise ConditionError(f"unknown operator {op!r}; known: {', '.join(sorted(ALL_OPS))}", check.pos, check.text)


# what an event of each kind says for evt.type
KIND_TYPES = {"exec": ("execve", "execveat"), "connect": ("connect",), "udp_send": ("sendto",),
              "gpu_open": ("open", "openat", "openat2"), "refused": ("refused",), "device": ("device",),
              "dns": ("dns",), "unix_connect": ("connect",), "gpu_held": ("held",)}
STATIC_FIELDS = {"evt.kind": lambda kind: (kind,), "evt.dir": lambda kind: ("<",),
                 "evt.type": lambda kind: KIND_TYPES[kind],
                 # a refused device has no destination
                 "fd.sockfamily": lambda kind: ("ip", None) if kind == "refused" else
                 ("unix",) if kind == "unix_connect" else ("ip",)}


def specialize(node, kind: str):
    """The node simplified for events of one kind: True, False, or what is left to test.

    Checks on fields the kind does not have are false; checks on evt.kind,
    evt.dir, fd.sockfamily and (where the kind decides it) evt.type are decided now. So
    `spawned_process` costs one check on an exec event, and a rule is indexed
    only under the kinds it can match.
    """
    if isinstance(node, Check):
        if kind not in node.field.kinds:
            return False
        possible = STATIC_FIELDS.get(node.field.name)
        if possible is None:
            return node
        test = check_test(node)
        outcomes = {(not test(v)) if node.op == "!=" else test(v) for v in possible(kind)}
        return outcomes.pop() if len(outcomes) == 1 else node
    if isinstance(node, Not):
        child = specialize(node.child, kind)
        return (not child) if isinstance(child, bool) else Not(child)
    children = [specialize(c, kind) for c in node.children]
    decisive = node.op == "or"  # True decides an or, False an and
    if decisive in children:
        return decisive
    rest = [c for c in children if not isinstance(c, bool)]
    if not rest:
        return not decisive
    return rest[0] if len(rest) == 1 else BoolOp(node.op, rest)


def validate(node) -> None:
    """Raises the first ConditionError of any check, whatever kinds it applies to."""
    if isinstance(node, Check):
        if node.op not in ALL_OPS:
            raise ConditionError(f"unknown operator {node.op!r}; known: {', '.join(sorted(ALL_OPS))}",
                                 node.pos, node.text, node.origin)
        if node.op != "exists":
            check_test(node)
    elif isinstance(node, Not):
        validate(node.child)
    elif isinstance(node, BoolOp):
        for child in node.children:
            validate(child)


class Macros:
    """Macro conditions, parsed on first use and inlined where named."""

    def __init__(self, conditions: dict[str, str], lists: dict[str, list[str]]):
        self.conditions = conditions
        self.lists = lists
        self._parsed: dict[str, Any] = {}

    def expand(self, node, stack: tuple[str, ...] = ()):
        if isinstance(node, MacroRef):
            if node.name not in self.conditions:
                close = difflib.get_close_matches(node.name, list(self.conditions) + list(FIELDS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConditionError(f"undefined macro {node.name!r}{hint}", node.pos, node.name, node.origin)
            if node.name in stack:
                raise ConditionError(f"macro {node.name!r} refers to itself through "
                                     f"{' -> '.join(stack + (node.name,))}", node.pos, node.name, node.origin)
            return self.expand(self.parse_macro(node.name), stack + (node.name,))
        if isinstance(node, Not):
            return Not(self.expand(node.child, stack))
        if isinstance(node, BoolOp):
            return BoolOp(node.op, [self.expand(c, stack) for c in node.children])
        return node

    def parse_macro(self, name: str):
        if name not in self._parsed:
            self._parsed[name] = Parser(self.conditions[name], self.lists, origin=name).parse()
        return self._parsed[name]


@dataclass
class Condition:
    text: str
    tree: Any
    trees: dict[str, Any]  # simplified for each event kind; kinds it can never match are absent

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.trees)


def compile_condition(text: str, macros: Macros) -> Condition:
    tree = macros.expand(Parser(text, macros.lists).parse())
    validate(tree)
    trees = {}
    for kind in sorted(ALL_KINDS):
        simplified = specialize(tree, kind)
        if simplified is not False:
            trees[kind] = simplified
    return Condition(text, tree, trees)


def fields_in(text: str) -> Iterable[str]:
    """%field references of an output string."""
    return FIELD_REFERENCE.findall(text)
