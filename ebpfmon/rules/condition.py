"""Conditions: Falco's filter language, parsed once and compiled to Python closures.

    cond   := or
    or     := and ('or' and)*
    and    := not ('and' not)*
    not    := 'not' not | '(' cond ')' | check | MACRO
    check  := FIELD OP VALUE | FIELD ('in'|'intersects'|'pmatch') LIST | FIELD 'exists'
    LIST   := '(' item (',' item)* ')'   items: quoted strings, bare words, or list names

Bare words in a list are literal values, as in Falco, except words made of
lower-case letters, digits and underscores with at least one underscore
(ssh_binaries): those name lists and must be defined. Quote such a word to
mean the literal string.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ebpfmon.rules.fields import ALL_KINDS, BOOL, FIELDS, INT, IP, STR, Field

KEYWORDS = {"and", "or", "not"}
COMPARISONS = {"=", "==", "!=", "<", "<=", ">", ">="}
STRING_OPS = {"contains", "icontains", "startswith", "endswith", "glob", "regex"}
LIST_OPS = {"in", "intersects", "pmatch"}
ALL_OPS = COMPARISONS | STRING_OPS | LIST_OPS | {"exists"}
LIST_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<op>==|!=|<=|>=|=|<|>)
  | (?P<word>[^\s(),=<>!'"]+)
""", re.VERBOSE)

# evt.type values -> the event kind that carries them
KIND_OF_TYPE = {"execve": "exec", "execveat": "exec", "connect": "connect", "sendto": "udp_send",
                "sendmsg": "udp_send", "open": "gpu_open", "openat": "gpu_open", "openat2": "gpu_open"}


class ConditionError(Exception):
    """A problem at a position of a condition; the loader turns pos into file:line:col."""

    def __init__(self, message: str, pos: int, text: str = "", where: str = ""):
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.text = text  # the token at pos, to find it in the YAML source
        self.where = where  # the macro the error is in, when it is not the rule's own condition


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
    index: int | None
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
        children = [self.parse_and()]
        while self._word("or"):
            self.take()
            children.append(self.parse_and())
        return children[0] if len(children) == 1 else BoolOp("or", children)

    def parse_and(self):
        children = [self.parse_not()]
        while self._word("and"):
            self.take()
            children.append(self.parse_not())
        return children[0] if len(children) == 1 else BoolOp("and", children)

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
        if tok.kind == "word" and LIST_NAME.match(tok.text):
            if tok.text not in self.lists:
                raise ConditionError(f"undefined list {tok.text!r} (quote it to mean the literal string)",
                                     tok.pos, tok.text)
            return [Token("string", '"' + item.replace('"', '\\"') + '"', tok.pos) for item in self.lists[tok.text]]
        return [tok]


def resolve_field(tok: Token) -> tuple[Field, int | None]:
    m = re.fullmatch(r"([a-z0-9_.]+)(?:\[(\d+)\])?", tok.text)
    name, index = (m.group(1), int(m.group(2)) if m.group(2) else None) if m else (tok.text, None)
    field = FIELDS.get(name)
    if field is None:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConditionError(f"unknown field {name!r}{hint}", tok.pos, tok.text)
    if index is not None and not field.indexed:
        raise ConditionError(f"field {name} takes no [index]", tok.pos, tok.text)
    return field, index


# ---- compiling ----

Predicate = Callable[["Evaluation"], bool]
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


def _ip_in(value: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def _pmatch(value: str, prefixes: tuple[str, ...]) -> bool:
    return any(value == p or value.startswith(p.rstrip("/") + "/") for p in prefixes)


def _value_test(check: Check) -> Callable[[Any], bool]:
    """A test of one (scalar) field value for this check."""
    field, op = check.field, check.op
    if op == "exists":
        return lambda v: True
    values = [_typed(field, t) for t in check.values]
    if field.type == IP and op in ("=", "!=", "in"):
        networks = values
        return lambda v: _ip_in(v, networks)
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
        return lambda v: v == target
    if op in ("in", "intersects"):
        members = frozenset(values)
        return lambda v: v in members
    if op == "pmatch":
        prefixes = tuple(values)
        return lambda v: _pmatch(v, prefixes)
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
        return lambda v: pattern.match(v) is not None
    if op == "regex":
        try:
            pattern = re.compile(target)
        except re.error as e:
            tok = check.values[0]
            raise ConditionError(f"regular expression {target!r} does not compile: {e}", tok.pos, tok.text) from None
        return lambda v: pattern.search(v) is not None
    raise ConditionError(f"unknown operator {op!r}; known: {', '.join(sorted(ALL_OPS))}", check.pos, check.text)


def compile_check(check: Check) -> Predicate:
    try:
        return _compile_check(check)
    except ConditionError as e:
        e.where = check.origin
        raise


def _compile_check(check: Check) -> Predicate:
    if check.op not in ALL_OPS:
        raise ConditionError(f"unknown operator {check.op!r}; known: {', '.join(sorted(ALL_OPS))}",
                             check.pos, check.text)
    test = _value_test(check)
    field, index = check.field, check.index
    key = field.name if index is None else f"{field.name}[{index}]"
    many = field.is_list and index is None
    if check.op == "exists":
        if many:
            return lambda x: bool(x.get(key, field, index))
        return lambda x: x.get(key, field, index) is not None
    negate = check.op == "!="
    if many:
        if negate:
            return lambda x: (vs := x.get(key, field, index)) is not None and not any(test(v) for v in vs)
        return lambda x: (vs := x.get(key, field, index)) is not None and any(test(v) for v in vs)
    if negate:
        return lambda x: (v := x.get(key, field, index)) is not None and not test(v)
    return lambda x: (v := x.get(key, field, index)) is not None and test(v)


def kinds_of(node) -> frozenset[str]:
    """Event kinds the node can be true for (a sound over-estimate)."""
    if isinstance(node, BoolOp):
        sets = [kinds_of(c) for c in node.children]
        if node.op == "and":
            return frozenset.intersection(*sets)
        return frozenset.union(*sets)
    if isinstance(node, Not):
        return ALL_KINDS
    if isinstance(node, Check):
        if node.field.name in ("evt.type", "evt.kind") and node.op in ("=", "in"):
            names = {t.value for t in node.values}
            return frozenset(KIND_OF_TYPE.get(n, n) for n in names) & ALL_KINDS
        return node.field.kinds
    raise TypeError(node)


def compile_node(node) -> Predicate:
    if isinstance(node, Check):
        return compile_check(node)
    if isinstance(node, Not):
        inner = compile_node(node.child)
        return lambda x: not inner(x)
    parts = [compile_node(c) for c in node.children]
    if node.op == "and":
        if len(parts) == 2:
            a, b = parts
            return lambda x: a(x) and b(x)
        return lambda x: all(p(x) for p in parts)
    if len(parts) == 2:
        a, b = parts
        return lambda x: a(x) or b(x)
    return lambda x: any(p(x) for p in parts)


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
    kinds: frozenset[str]
    predicate: Predicate


def compile_condition(text: str, macros: Macros) -> Condition:
    tree = macros.expand(Parser(text, macros.lists).parse())
    return Condition(text, tree, kinds_of(tree), compile_node(tree))


def fields_in(text: str) -> Iterable[str]:
    """%field references of an output string."""
    return re.findall(r"%([a-z0-9_.]+(?:\[\d+\])?)", text)
