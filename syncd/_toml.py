"""TOML loading with line/column positions, and pydantic validation with file:line:col errors.

``tomllib`` gives no positions, so :class:`Locator` is built by a small scanner
that walks the (already valid) text and records where every table header, key
and array element starts. Errors then point at ``file:line:col``; a key path
the scanner did not record falls back to its nearest recorded parent.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic

from syncd.errors import MappingError

KeyPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based (line, col)
Severity = Literal["error", "warning"]

M = TypeVar("M", bound=pydantic.BaseModel)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or doubtful) in a file, at a position.

    ``code`` names the class of problem ("toml", "schema", "unreadable",
    "unknown-term", ...) so tools and tests can tell them apart.
    """

    file: str
    line: int
    col: int
    message: str
    severity: Severity = "error"
    code: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class Locator:
    """Maps a key path (as tomllib/pydantic spell it) to its (line, col) in the file."""

    def __init__(self, positions: dict[KeyPath, Position] | None = None) -> None:
        self.positions: dict[KeyPath, Position] = dict(positions or {})

    def __call__(self, path: KeyPath) -> Position:
        return self.find(path)

    def find(self, path: KeyPath) -> Position:
        """The position of ``path``, else of its nearest recorded parent, else (1, 1)."""
        p = tuple(path)
        while p:
            pos = self.positions.get(p)
            if pos is not None:
                return pos
            p = p[:-1]
        return self.positions.get((), (1, 1))

    def exact(self, path: KeyPath) -> Position | None:
        return self.positions.get(tuple(path))


# --------------------------------------------------------------------------- scanner

_BARE = re.compile(r"[A-Za-z0-9_-]+")


class _Scanner:
    """Records positions in valid TOML text. Best effort: never raises out of :func:`scan`."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.pos: dict[KeyPath, Position] = {}
        self.array_counts: dict[KeyPath, int] = {}
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    # positions -------------------------------------------------------------
    def here(self, i: int | None = None) -> Position:
        k = self.i if i is None else i
        lo, hi = 0, len(self._line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._line_starts[mid] <= k:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, k - self._line_starts[lo] + 1

    def mark(self, path: KeyPath, i: int | None = None) -> None:
        self.pos.setdefault(path, self.here(i))

    # lexing helpers ----------------------------------------------------------
    def peek(self, n: int = 1) -> str:
        return self.s[self.i : self.i + n]

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def skip_ws_nl_comments(self) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                self.skip_line()
            else:
                break

    def skip_line(self) -> None:
        j = self.s.find("\n", self.i)
        self.i = len(self.s) if j < 0 else j + 1

    def read_string(self) -> str:
        s = self.s
        if s.startswith('"""', self.i) or s.startswith("'''", self.i):
            q = s[self.i : self.i + 3]
            j = self.i + 3
            while True:
                k = s.find(q, j)
                if k < 0:
                    raise ValueError("unterminated string")
                if q == '"""' and _escaped(s, k):
                    j = k + 1
                    continue
                while s.startswith(q[0], k + 3):  # up to two extra quotes belong to the content
                    k += 1
                body = s[self.i + 3 : k]
                self.i = k + 3
                return body
        q = s[self.i]
        j = self.i + 1
        while True:
            k = s.find(q, j)
            if k < 0:
                raise ValueError("unterminated string")
            if q == '"' and _escaped(s, k):
                j = k + 1
                continue
            raw = s[self.i : k + 1]
            self.i = k + 1
            if q == '"':
                return str(tomllib.loads(f"x = {raw}")["x"])
            return raw[1:-1]

    def read_key_part(self) -> str:
        c = self.peek()
        if c in "\"'":
            return self.read_string()
        m = _BARE.match(self.s, self.i)
        if not m:
            raise ValueError(f"bad key at {self.here()}")
        self.i = m.end()
        return m.group()

    def read_key(self) -> list[tuple[str, int]]:
        parts: list[tuple[str, int]] = []
        while True:
            self.skip_ws()
            start = self.i
            parts.append((self.read_key_part(), start))
            self.skip_ws()
            if self.peek() == ".":
                self.i += 1
                continue
            return parts

    # structure -----------------------------------------------------------------
    def scan(self) -> dict[KeyPath, Position]:
        table: KeyPath = ()
        self.pos[()] = (1, 1)
        while True:
            self.skip_ws_nl_comments()
            if self.i >= len(self.s):
                break
            if self.s.startswith("[[", self.i):
                start = self.i
                self.i += 2
                parts = self.read_key()
                self.i = self.s.index("]]", self.i) + 2
                base = self._resolve([p for p, _ in parts])
                n = self.array_counts.get(base, 0)
                self.array_counts[base] = n + 1
                self.mark(base, start)
                table = (*base, n)
                self.mark(table, start)
                self.skip_line()
            elif self.peek() == "[":
                start = self.i
                self.i += 1
                parts = self.read_key()
                self.i = self.s.index("]", self.i) + 1
                table = self._resolve([p for p, _ in parts])
                for k in range(1, len(table) + 1):
                    self.mark(table[:k], start)
                self.pos[table] = self.here(start)  # a header is where its table is
                self.skip_line()
            else:
                self.key_value(table)
                self.skip_ws()
                if self.peek() == "#" or self.peek() in ("\r", "\n"):
                    self.skip_line()
        return self.pos

    def _resolve(self, names: list[str]) -> KeyPath:
        """A header path through arrays of tables refers to their latest element."""
        out: list[str | int] = []
        for name in names:
            out.append(name)
            n = self.array_counts.get(tuple(out))
            if n is not None and len(out) < len(names):
                out.append(n - 1)
        return tuple(out)

    def key_value(self, table: KeyPath) -> None:
        parts = self.read_key()
        path: KeyPath = table
        for name, start in parts:
            path = (*path, name)
            self.mark(path, start)
        self.skip_ws()
        if self.peek() != "=":
            raise ValueError(f"expected '=' at {self.here()}")
        self.i += 1
        self.skip_ws()
        self.value(path)

    def value(self, path: KeyPath) -> None:
        c = self.peek()
        if c in "\"'":
            self.read_string()
        elif c == "[":
            self.i += 1
            n = 0
            while True:
                self.skip_ws_nl_comments()
                if self.peek() == "]":
                    self.i += 1
                    return
                self.mark((*path, n))
                self.value((*path, n))
                n += 1
                self.skip_ws_nl_comments()
                if self.peek() == ",":
                    self.i += 1
        elif c == "{":
            self.i += 1
            while True:
                self.skip_ws()
                if self.peek() == "}":
                    self.i += 1
                    return
                self.key_value(path)
                self.skip_ws()
                if self.peek() == ",":
                    self.i += 1
        else:
            m = re.compile(r"[^,\]\}\s#]+(?: [0-9][^,\]\}\s#]*)?").match(self.s, self.i)
            if not m:
                raise ValueError(f"bad value at {self.here()}")
            self.i = m.end()


def _escaped(s: str, k: int) -> bool:
    """Whether the quote at ``s[k]`` is escaped by an odd run of backslashes."""
    n = 0
    while k - n - 1 >= 0 and s[k - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def locate(text: str) -> Locator:
    """Positions of every key, header and array element in ``text`` (valid TOML)."""
    sc = _Scanner(text)
    # keep what was found on a surprise; lookups fall back to parents
    with contextlib.suppress(ValueError, IndexError, RecursionError, tomllib.TOMLDecodeError):
        sc.scan()
    return Locator(sc.pos)


# --------------------------------------------------------------------------- loading

_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def _decode_problem(path: Path, exc: tomllib.TOMLDecodeError) -> Problem:
    msg = str(exc)
    m = _TOML_POS.search(msg)
    line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
    msg = _TOML_POS.sub("", msg).strip()
    return Problem(str(path), line, col, f"invalid TOML: {msg}", code="toml")


def _read(path: Path) -> tuple[dict[str, Any], Locator] | Problem:
    try:
        data = path.read_bytes()
    except OSError as e:
        return Problem(str(path), 1, 1, f"cannot read file: {e.strerror or e}", code="unreadable")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return Problem(str(path), line, col, "invalid TOML: not UTF-8 text", code="toml")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (some Windows editors add one)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return _decode_problem(path, e)
    except (ValueError, RecursionError) as e:  # tomllib's own edge cases, e.g. huge nesting
        return Problem(str(path), 1, 1, f"invalid TOML: {e}", code="toml")
    return doc, locate(text)


def try_load_toml(path: Path | str) -> tuple[dict[str, Any], Locator] | Problem:
    """Like :func:`load_toml` but return the Problem instead of raising."""
    return _read(Path(path))


def load_toml(path: Path | str) -> tuple[dict[str, Any], Locator]:
    """Parse ``path``; raise MappingError('file:line:col: invalid TOML: ...') if it is not TOML."""
    got = _read(Path(path))
    if isinstance(got, Problem):
        raise MappingError(str(got))
    return got


def _loc_text(loc: KeyPath) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def pydantic_problems(
    path: Path | str, err: pydantic.ValidationError, locator: Locator,
    model: type[pydantic.BaseModel] | None = None,
) -> list[Problem]:
    """One Problem per pydantic error, positioned by its ``loc``. An empty file is one problem
    that says so (not one per missing key). ``model``: the validated class, for suggesting the
    key an unknown one may be a misspelling of."""
    errors = err.errors(include_url=False)
    if errors and all(e["type"] == "missing" and len(e["loc"]) == 1 and e["input"] == {} for e in errors):
        keys = ", ".join(str(e["loc"][0]) for e in errors)
        return [Problem(str(path), 1, 1, f"the file is empty: it must define {keys}", code="schema")]
    out: list[Problem] = []
    for e in errors:
        loc = tuple(p for p in e["loc"] if isinstance(p, str | int))
        # pydantic adds "[key]" for dict-key errors and class names for unions: skip those
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("[")))
        line, col = locator.find(loc)
        where = _loc_text(loc)
        msg = "unknown key" + _did_you_mean(model, loc) if e["type"] == "extra_forbidden" else e["msg"]
        out.append(
            Problem(str(path), line, col, f"{where}: {msg}" if where else msg, code="schema")
        )
    return out


def _did_you_mean(model: type[pydantic.BaseModel] | None, loc: KeyPath) -> str:
    """`` (did you mean 'threshold'?)`` when ``loc``'s last key is close to a known one."""
    import difflib

    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model is not None else None
        sub = field.annotation if field is not None else None
        model = sub if isinstance(sub, type) and issubclass(sub, pydantic.BaseModel) else None
    if model is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def problems_for(path: Path | str, model_cls: type[pydantic.BaseModel]) -> list[Problem]:
    """Every problem validating ``path`` against ``model_cls`` (empty list when it is fine)."""
    got = _read(Path(path))
    if isinstance(got, Problem):
        return [got]
    doc, locator = got
    try:
        model_cls.model_validate(doc)
    except pydantic.ValidationError as e:
        return pydantic_problems(path, e, locator, model_cls)
    return []


def parse_file(path: Path | str, model_cls: type[M]) -> tuple[M, Locator]:
    """Like :func:`validate_file` but also return the Locator (for cross-file checks)."""
    doc, locator = load_toml(path)
    try:
        return model_cls.model_validate(doc), locator
    except pydantic.ValidationError as e:
        raise MappingError(str(pydantic_problems(path, e, locator, model_cls)[0])) from None


def validate_file(path: Path | str, model_cls: type[M]) -> M:
    """Load and validate ``path``; raise MappingError('file:line:col: ...') on the FIRST problem."""
    return parse_file(path, model_cls)[0]
