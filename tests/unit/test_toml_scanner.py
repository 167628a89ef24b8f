"""The TOML position scanner (syncd/_toml.py ``locate``) checked against ``tomllib``.

tomllib gives no positions, so mapping-file errors get their ``file:line:col`` from this
scanner. A wrong position sends an operator to the wrong line of a mapping file, so:

- every key path the scanner reports exists in tomllib's parse of the same text, and every
  path of the parse is reported (nothing made up, nothing missed);
- a reported key position holds that key in the source (a header position, its header);
- on generated documents, every position is exactly where the generator wrote the key,
  header or array element.

Documents are generated with hypothesis: bare/quoted/dotted keys, tables, arrays of tables
with sub-tables, nested and multi-line arrays with comments, inline tables, every string
kind (with quotes, backslashes and TOML punctuation inside), numbers in every notation,
dates and times (with a space between date and time), tabs, CRLF and comments everywhere.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, time, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd._toml import KeyPath, Position, locate

# ------------------------------------------------------------------ checks on any valid TOML


def parse_paths(doc: Any, prefix: KeyPath = ()) -> set[KeyPath]:
    """Every key path of a tomllib parse: table keys and array indexes, at any depth."""
    out: set[KeyPath] = set()
    items: list[tuple[str | int, Any]]
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return out
    for k, v in items:
        out.add((*prefix, k))
        out |= parse_paths(v, (*prefix, k))
    return out


def at(doc: Any, path: KeyPath) -> Any:
    for k in path:
        doc = doc[k]  # a KeyError / IndexError / TypeError here: the path is not in the parse
    return doc


_KEY_PART = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\'\n]*\'|[A-Za-z0-9_-]+')


def offset_of(text: str, pos: Position) -> int:
    line, col = pos
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    return starts[line - 1] + col - 1


def header_keys(text: str, i: int) -> list[str]:
    """The key parts of the ``[a."b".c]`` / ``[[a.b]]`` header starting at ``text[i]``."""
    j = i + (2 if text.startswith("[[", i) else 1)
    parts: list[str] = []
    while True:
        while text[j] in " \t":
            j += 1
        m = _KEY_PART.match(text, j)
        assert m, f"no key in the header at offset {i}: {text[i:i + 40]!r}"
        parts.append(next(iter(tomllib.loads(f"{m.group()} = 0"))))
        j = m.end()
        while text[j] in " \t":
            j += 1
        if text[j] != ".":
            return parts
        j += 1


def check_against_tomllib(text: str) -> dict[KeyPath, Position]:
    """The source-level checks, for any valid TOML ``text``; returns the positions."""
    doc = tomllib.loads(text)
    positions = locate(text).positions
    assert positions[()] == (1, 1)
    reported = set(positions) - {()}
    expected = parse_paths(doc)
    assert reported - expected == set(), "reported paths that tomllib does not have"
    assert expected - reported == set(), "paths of the parse the scanner did not report"
    lines = text.split("\n")
    for path, (line, col) in positions.items():
        if not path:
            continue
        assert 1 <= line <= len(lines) and 1 <= col <= len(lines[line - 1]), (path, line, col)
        i = offset_of(text, (line, col))
        strs = [p for p in path if isinstance(p, str)]
        # keys never start with "[", nor do inline tables: a "[" there is a table's header
        is_header = text[i] == "[" and (isinstance(path[-1], str) or isinstance(at(doc, path), dict))
        if is_header:
            # a table header: it names this table, or one below it (an implicit parent)
            names = header_keys(text, i)
            assert names[:len(strs)] == strs, (path, names)
        elif isinstance(path[-1], str):
            m = _KEY_PART.match(text, i)
            assert m, (path, text[i:i + 20])
            assert next(iter(tomllib.loads(f"{m.group()} = 0"))) == path[-1], (path, m.group())
        else:  # an element of an inline array: its value starts here
            value = at(doc, path)
            first = text[i]
            if isinstance(value, str):
                assert first in "\"'", (path, text[i:i + 20])
            elif isinstance(value, list):
                assert first == "[", (path, text[i:i + 20])
            elif isinstance(value, dict):
                assert first == "{", (path, text[i:i + 20])
            elif isinstance(value, bool):
                assert text.startswith(str(value).lower(), i), (path, text[i:i + 20])
            else:
                assert re.match(r"[-+0-9in]", first), (path, text[i:i + 20])
    return positions


# ------------------------------------------------------------------ a generator that knows its positions


@dataclass
class Writer:
    """Writes a TOML document and remembers where it put each key, header and array element,
    as the scanner defines it: a key path is where it is first written; a table is where its
    own header is (else where a header or a dotted key first named it)."""

    nl: str = "\n"
    out: list[str] = field(default_factory=list)
    line: int = 1
    col: int = 1
    pos: dict[KeyPath, Position] = field(default_factory=dict)

    def w(self, s: str) -> None:
        self.out.append(s)
        nls = s.count("\n")
        if nls:
            self.line += nls
            self.col = len(s) - s.rindex("\n")
        else:
            self.col += len(s)

    def here(self) -> Position:
        return (self.line, self.col)

    def text(self) -> str:
        return "".join(self.out)


@dataclass(frozen=True)
class Key:
    names: tuple[str, ...]
    texts: tuple[str, ...]  # each part as written (bare, "basic" or 'literal')
    dots: tuple[str, ...]  # the separators between parts, e.g. "." or " . "


@dataclass(frozen=True)
class Scalar:
    text: str


@dataclass(frozen=True)
class Array:
    items: tuple[Any, ...]
    multiline: bool
    trailing_comma: bool
    comments: tuple[str, ...]


@dataclass(frozen=True)
class Inline:
    pairs: tuple[tuple[Key, Any], ...]


@dataclass(frozen=True)
class Pair:
    key: Key
    value: Any
    indent: str
    eq: str  # "=" with the spaces around it
    comment: str  # trailing comment ("" for none)


@dataclass(frozen=True)
class Section:
    """``[header]`` (aot=False) or ``[[header]]`` (aot=True), then its pairs."""

    key: Key
    aot: bool
    pad: tuple[str, str]  # spaces inside the brackets
    comment: str
    pairs: tuple[Pair, ...]


WS = st.sampled_from(["", " ", "  ", "\t"])
COMMENT_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t#\"'[]{}=,."),
                       max_size=12)
TRICKY = st.sampled_from(list("\"'\\#[]{}=,. \t") + ['"""', "'''", "\\\"", "é", "☃", "\U0001f600"])
TEXT = st.lists(st.characters(blacklist_categories=("Cs",)) | TRICKY, max_size=8).map("".join)
NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True),
    st.sampled_from(["a", "b", "key", "1", "-", "_", "true", "inf", "3"]),
    TEXT,
)


def basic(s: str, *, multiline: bool = False) -> str:
    """``s`` as a TOML basic string body (escapes as needed; quotes raw where allowed)."""
    out: list[str] = []
    run = 0  # raw quotes in a row (multi-line only: at most two)
    for ch in s:
        if ch == '"':
            if multiline and run < 2:
                out.append('"')
                run += 1
                continue
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n" and multiline:
            out.append("\n")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
        run = 0
    return "".join(out)


def literal_ok(s: str, *, multiline: bool = False) -> bool:
    if any((ord(c) < 0x20 and c != "\t" and not (multiline and c == "\n")) or c == "\x7f" for c in s):
        return False
    return "'''" not in s if multiline else "'" not in s


KIND = st.integers(0, 2)
DOT = st.sampled_from([".", " .", ". ", " . ", "\t.\t"])


def key_part(name: str, kind: int) -> str:
    """``name`` written bare, "basic" or 'literal' (``kind`` picks among those that can hold it)."""
    kinds = ["basic"]
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        kinds.append("bare")
    if literal_ok(name):
        kinds.append("literal")
    chosen = kinds[kind % len(kinds)]
    if chosen == "bare":
        return name
    if chosen == "literal":
        return f"'{name}'"
    return f'"{basic(name)}"'


# Plain functions taking ``draw`` (not strategies built per call): building and validating a
# new strategy object for every key was most of the cost of a generated document.
def key_of(draw: st.DrawFn, names: tuple[str, ...]) -> Key:
    texts = tuple(key_part(n, draw(KIND)) for n in names)
    dots = tuple(draw(DOT) for _ in names[1:])
    return Key(names, texts, dots)


def _key_sets(max_parts: int) -> st.SearchStrategy[list[tuple[str, ...]]]:
    """Key paths of one table: distinct, and none a prefix of another (TOML forbids it)."""
    paths = st.lists(st.lists(NAMES, min_size=1, max_size=max_parts).map(tuple), max_size=5)

    def prefix_free(ps: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for p in ps:
            if all(p[:len(q)] != q and q[:len(p)] != p for q in out):
                out.append(p)
        return out

    return paths.map(prefix_free)


INLINE_KEY_SETS, KEY_SETS = _key_sets(2), _key_sets(3)


def _int_text(n: int, style: str) -> str:
    if style == "hex" and n >= 0:
        return hex(n)
    if style == "oct" and n >= 0:
        return "0o" + format(n, "o")
    if style == "bin" and n >= 0:
        return bin(n)
    if style == "underscores" and abs(n) >= 1000:
        return f"{n:_}"
    if style == "plus" and n >= 0:
        return f"+{n}"
    return str(n)


INTS = st.builds(_int_text, st.integers(-10**9, 10**9),
                 st.sampled_from(["dec", "hex", "oct", "bin", "underscores", "plus"]))
FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["inf", "+inf", "-inf", "nan", "-nan", "1e3", "6.626e-34", "-0.0", "1_000.5", "3.14E+2"]),
)
OFFSETS = st.builds(lambda h, m: timezone(timedelta(hours=h, minutes=m)),
                    st.integers(-12, 12), st.sampled_from([0, 30]))
DATETIMES = st.one_of(
    st.builds(lambda d, sep, tz, z: (d.replace(tzinfo=tz).isoformat(sep) if not z
                                     else d.replace(tzinfo=None).isoformat(sep) + "Z"),
              st.datetimes(), st.sampled_from(["T", " ", "t"]), OFFSETS, st.booleans()),
    st.builds(lambda d, sep: d.isoformat(sep), st.datetimes(), st.sampled_from(["T", " "])),
    st.builds(date.isoformat, st.dates()),
    st.builds(time.isoformat, st.times()),
)


@st.composite
def strings(draw: st.DrawFn) -> str:
    s = draw(TEXT | st.lists(TEXT, max_size=3).map("\n".join))
    kinds = ["basic", "ml_basic"]
    if literal_ok(s):
        kinds.append("literal")
    if literal_ok(s, multiline=True):
        kinds.append("ml_literal")
    kind = draw(st.sampled_from(kinds))
    if kind == "basic":
        return f'"{basic(s)}"'
    if kind == "literal":
        return f"'{s}'"
    # a newline right after the opening quotes is trimmed by TOML: start with one so the
    # content's own first character (maybe a newline) is kept
    if kind == "ml_literal":
        return f"'''\n{s}'''"
    body = basic(s, multiline=True)
    if body.endswith('""'):  # two raw quotes + the closing three is the most TOML allows
        body = body[:-1] + '\\"'
    return f'"""\n{body}"""'


SCALARS = st.one_of(INTS, FLOATS, DATETIMES, st.sampled_from(["true", "false"]), strings()).map(Scalar)


def _values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return SCALARS
    inner = _values(depth - 1)
    arrays = st.builds(Array, st.lists(inner, max_size=4).map(tuple), st.booleans(), st.booleans(),
                       st.lists(COMMENT_TEXT, max_size=2).map(tuple))

    @st.composite
    def inlines(draw: st.DrawFn) -> Inline:
        return Inline(tuple((key_of(draw, p), draw(inner)) for p in draw(INLINE_KEY_SETS)))

    return st.one_of(SCALARS, SCALARS, arrays, inlines())


VALUES = _values(2)  # built once: building strategies is most of the cost of a draw


def pairs_of(draw: st.DrawFn, reserved: frozenset[str] = frozenset()) -> tuple[Pair, ...]:
    """The key/value lines of one table; no first key part in ``reserved`` (sub-table names)."""
    out = []
    for p in draw(KEY_SETS):
        if p[0] in reserved:
            continue
        comment = draw(WS) + " #" + draw(COMMENT_TEXT) if draw(st.booleans()) else ""
        out.append(Pair(key_of(draw, p), draw(VALUES), draw(WS), draw(WS) + "=" + draw(WS), comment))
    return tuple(out)


@st.composite
def documents(draw: st.DrawFn) -> tuple[tuple[Pair, ...], tuple[Section, ...], str]:
    """Root pairs, then sections: tables (some dotted, some defined after a child), arrays of
    tables (with a sub-table under some elements)."""
    names = draw(st.lists(NAMES, min_size=6, max_size=10, unique=True))
    tables, arrays, subs = names[:2], names[2:4], names[4:]
    root = pairs_of(draw, frozenset(tables + arrays))
    sections: list[Section] = []

    def section(path: tuple[str, ...], aot: bool, reserved: frozenset[str] = frozenset()) -> Section:
        comment = " #" + draw(COMMENT_TEXT) if draw(st.booleans()) else ""
        return Section(key_of(draw, path), aot, (draw(WS), draw(WS)), comment, pairs_of(draw, reserved))

    for t in tables:
        shape = draw(st.sampled_from(["plain", "with_child", "child_first"]))
        child = draw(st.sampled_from(subs))
        if shape == "plain":
            sections.append(section((t,), False))
        elif shape == "with_child":
            sections.append(section((t,), False, frozenset(subs)))
            sections.append(section((t, child), False))
        else:  # [t.child] first: t exists implicitly until its own header comes
            sections.append(section((t, child), False))
            sections.append(section((t,), False, frozenset(subs)))
    for a in arrays:
        for _ in range(draw(st.integers(1, 3))):
            with_sub = draw(st.booleans())
            sections.append(section((a,), True, frozenset(subs) if with_sub else frozenset()))
            if with_sub:
                sections.append(section((a, draw(st.sampled_from(subs))), False))
    order = draw(st.permutations(range(len(tables))))  # tables in any order; arrays keep theirs
    table_secs = [s for s in sections if not s.aot and s.key.names[0] in tables]
    grouped = [[s for s in table_secs if s.key.names[0] == tables[i]] for i in order]
    rest = [s for s in sections if s not in table_secs]
    sections = [s for g in grouped for s in g] + rest
    return root, tuple(sections), draw(st.sampled_from(["\n", "\r\n"]))


def key_text(key: Key) -> str:
    """A header's key as written (the header, not its parts, is the table's position)."""
    return "".join(d + t for d, t in zip(("", *key.dots), key.texts, strict=True))


def write_key(w: Writer, key: Key, base: KeyPath) -> KeyPath:
    path = base
    for i, (name, text) in enumerate(zip(key.names, key.texts, strict=True)):
        if i:
            w.w(key.dots[i - 1])
        path = (*path, name)
        w.pos.setdefault(path, w.here())
        w.w(text)
    return path


def write_value(w: Writer, v: Any, path: KeyPath, indent: str) -> None:
    if isinstance(v, Scalar):
        w.w(v.text)
    elif isinstance(v, Array):
        write_array(w, v, path, indent)
    else:
        w.w("{")
        for i, (k, item) in enumerate(v.pairs):
            w.w(", " if i else " ")
            write_key(w, k, path)
            w.w(" = ")
            write_value(w, item, (*path, *k.names), indent)
        w.w(" }" if v.pairs else "}")


def write_array(w: Writer, v: Array, path: KeyPath, indent: str) -> None:
    """``[a, b]``, or one element a line with a comment before the first and after the last."""
    w.w("[")
    last = len(v.items) - 1
    for i, item in enumerate(v.items):
        if v.multiline:
            if i == 0 and v.comments:
                w.w(f"{w.nl}{indent}  #{v.comments[0]}")
            w.w(f"{w.nl}{indent}  ")
        elif i:
            w.w(" ")
        w.pos[(*path, i)] = w.here()
        write_value(w, item, (*path, i), indent + "  ")
        if i < last or v.trailing_comma:
            w.w(",")
        if v.multiline and i == last and len(v.comments) > 1:
            w.w(f"  #{v.comments[1]}")
    if v.multiline:
        w.w(f"{w.nl}{indent}")
    w.w("]")


def write_pairs(w: Writer, ps: tuple[Pair, ...], table: KeyPath) -> None:
    for p in ps:
        w.w(p.indent)
        path = write_key(w, p.key, table)
        w.w(p.eq)
        write_value(w, p.value, path, p.indent)
        w.w(p.comment + w.nl)


def render(doc: tuple[tuple[Pair, ...], tuple[Section, ...], str]) -> tuple[str, dict[KeyPath, Position]]:
    root, sections, nl = doc
    w = Writer(nl=nl)
    w.pos[()] = (1, 1)
    w.w(f"# generated{nl}")
    write_pairs(w, root, ())
    aot_counts: dict[KeyPath, int] = {}
    for s in sections:
        w.w(nl)
        start = w.here()
        names = s.key.names
        if s.aot:
            n = aot_counts.get(names, 0)
            aot_counts[names] = n + 1
            w.w("[[" + s.pad[0])
            w.w(key_text(s.key))
            w.w(s.pad[1] + "]]")
            w.pos.setdefault(names, start)
            table: KeyPath = (*names, n)
            w.pos[table] = start
        else:
            # a header under an array of tables names its latest element
            table = (names[0], aot_counts[(names[0],)] - 1, *names[1:]) if (names[0],) in aot_counts else names
            w.w("[" + s.pad[0] + key_text(s.key) + s.pad[1] + "]")
            for k in range(1, len(table) + 1):
                w.pos.setdefault(table[:k], start)
            w.pos[table] = start
        w.w(s.comment + nl)
        write_pairs(w, s.pairs, table)
    return w.text(), w.pos


# ------------------------------------------------------------------ the properties


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_positions_of_generated_documents_are_where_they_were_written(
        doc: tuple[tuple[Pair, ...], tuple[Section, ...], str]) -> None:
    text, written = render(doc)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a generator bug, not a scanner one: show the text
        raise AssertionError(f"the generator wrote invalid TOML ({e}):\n{text}") from None
    positions = check_against_tomllib(text)
    assert positions == written


@pytest.mark.parametrize("text", [
    # dates with a space before the time, in arrays and inline tables, then a comment
    'd = [1979-05-27 07:32:00, 1979-05-27, 07:32:00.5]  # c\nt = { at = 1979-05-27 07:32:00Z, n = 1 }\n',
    # quotes that end multi-line strings late, backslashes before a closing quote
    "a = '''it''s'''''\nb = \"\"\"x\\\\\"\"\"\nc = \"\"\"\"\"q\"\"\"\"\"\nd = 'C:\\path\\'\n",
    # punctuation inside quoted keys and headers
    '"a.b" = 1\n\'x]y\' = 2\n["t]" . "u.v"]\n"=" = 3\n[[ "arr]]" ]]\nk = 4\n[[ "arr]]" ]]\nk = 5\n',
    # sub-tables of array-of-tables elements, a dotted key inside one
    "[[a]]\nx = 1\n[a.s]\ny = 2\n[[a]]\n[a.s]\nz.w = 3\n",
    # a table defined after its child, CRLF line ends, tabs
    "[p.q]\r\n\tk\t=\t1\r\n[p]\r\nr = 2\r\n",
    # multi-line arrays with comments and trailing commas, nested
    "m = [\n  # first\n  [1, 2,],\n  { k = [\n    'x', # x\n  ] },\n  \"\"\"\n]\"\"\",\n]\n",
    # empty inline table and array; keys that look like other things
    "e = {}\nf = []\ntrue = false\ninf = inf\n1.2 = 3\n-_ = 'dash'\n",
])
def test_tricky_documents_agree_with_tomllib(text: str) -> None:
    check_against_tomllib(text)


def test_a_path_not_recorded_falls_back_to_its_nearest_parent() -> None:
    loc = locate('[t]\nk = { a = 1 }\n')
    assert loc.find(("t", "k", "a")) == (2, 7)
    assert loc.find(("t", "k", "missing", 3)) == (2, 1)
    assert loc.find(("nope",)) == (1, 1)
    assert loc.exact(("t", "k", "missing")) is None


def test_text_that_is_not_toml_keeps_what_was_found_before_the_surprise() -> None:
    """The scanner runs on text tomllib accepted; should they ever disagree it must not raise."""
    loc = locate('a = 1\nb = "unterminated\nc = 3\n')
    assert (loc.exact(("a",)), loc.exact(("b",)), loc.exact(("c",))) == ((1, 1), (2, 1), None)
    assert loc.find(("c",)) == (1, 1)
