"""The SOQL subset syncd uses, as a small recursive-descent parser.

Grammar (keywords case-insensitive)::

    query     := SELECT (COUNT "(" ")" | field {"," field}) FROM name [WHERE expr]
                 [ORDER BY order {"," order}] [LIMIT int]
    order     := field [ASC | DESC]
    expr      := term {OR term}
    term      := factor {AND factor}
    factor    := NOT factor | "(" expr ")" | field op value
               | field [NOT] IN "(" value {"," value} ")"
    op        := = | != | <> | < | <= | > | >= | LIKE
    value     := 'string' | number | datetime | date | TRUE | FALSE | NULL

Datetimes are unquoted (``2024-01-02T03:04:05Z``, ``…+00:00``, ``….123Z``) and
become tz-aware :class:`datetime`; dates (``2024-01-02``) become :class:`date`.
Anything else raises :class:`SoqlError` with code ``MALFORMED_QUERY``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

Value = str | float | int | bool | datetime | date | None


class SoqlError(ValueError):
    """A query outside the subset. ``code`` is the Salesforce errorCode to answer with."""

    def __init__(self, message: str, code: str = "MALFORMED_QUERY") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Cond:
    field: str
    op: str  # = != < <= > >= LIKE IN NOT IN
    value: Any  # Value, or tuple[Value, ...] for IN / NOT IN


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    part: Expr


Expr = Cond | And | Or | Not


@dataclass(frozen=True, slots=True)
class Query:
    fields: tuple[str, ...]
    sobject: str
    where: Expr | None = None
    order_by: tuple[tuple[str, bool], ...] = ()  # (field, descending)
    limit: int | None = None
    count: bool = False  # SELECT COUNT(): the answer is totalSize alone, no records


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\dT]))
  | (?P<number>-?\d+(?:\.\d+)?(?![\w-]))
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<name>[A-Za-z_][\w.]*)
    """,
    re.VERBOSE,
)

_KEYWORDS = {
    "SELECT",
    "FROM",
    "WHERE",
    "ORDER",
    "BY",
    "LIMIT",
    "AND",
    "OR",
    "NOT",
    "IN",
    "LIKE",
    "ASC",
    "DESC",
    "TRUE",
    "FALSE",
    "NULL",
    "NULLS",
    "FIRST",
    "LAST",
}
_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "'": "'",
    '"': '"',
    "\\": "\\",
    "%": "\\%",
    "_": "\\_",
}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(soql: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(soql):
        m = _TOKEN.match(soql, pos)
        if m is None:
            raise SoqlError(f"unexpected character {soql[pos]!r} at position {pos}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    return out


def _unquote(text: str) -> str:
    body = text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise SoqlError(f"invalid escape sequence \\{nxt} in {text}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_datetime(text: str) -> datetime:
    t = text.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", t):
        t = t[:-2] + ":" + t[-2:]
    return datetime.fromisoformat(t).astimezone(UTC)


class _Parser:
    def __init__(self, soql: str) -> None:
        self.toks = _tokenize(soql)
        self.i = 0

    # -- token helpers
    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _kw(self, *words: str) -> bool:
        t = self._peek()
        return t is not None and t.kind == "name" and t.text.upper() in words

    def _expect_kw(self, word: str) -> None:
        if not self._kw(word):
            raise SoqlError(f"expecting {word}, found {self._describe()}")
        self.i += 1

    def _expect_punct(self, ch: str) -> None:
        t = self._peek()
        if t is None or t.kind != "punct" or t.text != ch:
            raise SoqlError(f"expecting '{ch}', found {self._describe()}")
        self.i += 1

    def _describe(self) -> str:
        t = self._peek()
        return "end of query" if t is None else f"'{t.text}' at position {t.pos}"

    def _name(self) -> str:
        t = self._peek()
        if t is None or t.kind != "name" or t.text.upper() in _KEYWORDS:
            raise SoqlError(f"expecting a field or object name, found {self._describe()}")
        self.i += 1
        return t.text

    # -- grammar
    def query(self) -> Query:
        self._expect_kw("SELECT")
        count = self._count()
        fields = [] if count else [self._name()]
        while not count and self._punct(","):
            fields.append(self._name())
        self._expect_kw("FROM")
        sobject = self._name()
        if "." in sobject:
            raise SoqlError(f"invalid object name {sobject!r}")
        where = None
        if self._kw("WHERE"):
            self.i += 1
            where = self.expr()
        order: list[tuple[str, bool]] = []
        if self._kw("ORDER"):
            self.i += 1
            self._expect_kw("BY")
            order.append(self._order())
            while self._punct(","):
                order.append(self._order())
        limit = None
        if self._kw("LIMIT"):
            self.i += 1
            t = self._peek()
            if t is None or t.kind != "number" or not t.text.isdigit():
                raise SoqlError(f"LIMIT needs a non-negative integer, found {self._describe()}")
            self.i += 1
            limit = int(t.text)
        if self._peek() is not None:
            raise SoqlError(f"unexpected token {self._describe()}")
        return Query(tuple(fields), sobject, where, tuple(order), limit, count)

    def _count(self) -> bool:
        """``COUNT()`` (no field: count the rows) as the whole select list."""
        nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
        if not (self._kw("COUNT") and nxt is not None and nxt.text == "("):
            return False
        self.i += 2
        self._expect_punct(")")
        return True

    def _punct(self, ch: str) -> bool:
        t = self._peek()
        if t is not None and t.kind == "punct" and t.text == ch:
            self.i += 1
            return True
        return False

    def _order(self) -> tuple[str, bool]:
        name = self._name()
        desc = False
        if self._kw("ASC", "DESC"):
            desc = self.toks[self.i].text.upper() == "DESC"
            self.i += 1
        return name, desc

    def expr(self) -> Expr:
        parts = [self.term()]
        while self._kw("OR"):
            self.i += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def term(self) -> Expr:
        parts = [self.factor()]
        while self._kw("AND"):
            self.i += 1
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def factor(self) -> Expr:
        if self._kw("NOT"):
            self.i += 1
            return Not(self.factor())
        if self._punct("("):
            e = self.expr()
            self._expect_punct(")")
            return e
        field = self._name()
        if self._kw("NOT"):
            self.i += 1
            self._expect_kw("IN")
            return Cond(field, "NOT IN", self._value_list())
        if self._kw("IN"):
            self.i += 1
            return Cond(field, "IN", self._value_list())
        if self._kw("LIKE"):
            self.i += 1
            v = self.value()
            if not isinstance(v, str):
                raise SoqlError("LIKE needs a quoted string")
            return Cond(field, "LIKE", v)
        t = self._peek()
        if t is None or t.kind != "op":
            raise SoqlError(f"expecting an operator after {field}, found {self._describe()}")
        self.i += 1
        op = "!=" if t.text == "<>" else t.text
        return Cond(field, op, self.value())

    def _value_list(self) -> tuple[Value, ...]:
        self._expect_punct("(")
        vals = [self.value()]
        while self._punct(","):
            vals.append(self.value())
        self._expect_punct(")")
        return tuple(vals)

    def value(self) -> Value:
        t = self._peek()
        if t is None:
            raise SoqlError("expecting a value, found end of query")
        self.i += 1
        if t.kind == "string":
            return _unquote(t.text)
        if t.kind == "number":
            return int(t.text) if re.fullmatch(r"-?\d+", t.text) else float(t.text)
        if t.kind == "datetime":
            return _parse_datetime(t.text)
        if t.kind == "date":
            return date.fromisoformat(t.text)
        if t.kind == "name" and t.text.upper() in ("TRUE", "FALSE"):
            return t.text.upper() == "TRUE"
        if t.kind == "name" and t.text.upper() == "NULL":
            return None
        self.i -= 1
        raise SoqlError(f"expecting a value, found {self._describe()}")


def parse(soql: str) -> Query:
    """Parse one SOQL statement of the supported subset (raises :class:`SoqlError`)."""
    return _Parser(soql).query()


def fields_of(expr: Expr | None) -> set[str]:
    """Every field an expression reads."""
    if expr is None:
        return set()
    if isinstance(expr, Cond):
        return {expr.field}
    if isinstance(expr, Not):
        return fields_of(expr.part)
    out: set[str] = set()
    for p in expr.parts:
        out |= fields_of(p)
    return out


def like_to_regex(pattern: str) -> re.Pattern[str]:
    """SOQL LIKE (``%`` any run, ``_`` one char, backslash escapes them), case-insensitive."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)
