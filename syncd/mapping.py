"""The mapping layer: load + validate the mapping files, raw <-> canonical.

Files (see mappings/README.md): ``terms.toml`` (the glossary), ``hubspot.toml``
and ``salesforce.toml`` (which CRM field/value means which term). Everything is
validated up front by :func:`load_mappings`, which fails closed with
``MappingError("file:line:col: message")``. :class:`Mappings` precomputes dict
lookups so the engine can translate tens of thousands of records a second.

Rules the files follow:
- value tables read ``term = ["raw", ...]``; the FIRST raw value is the one written;
- a raw value no table names is never guessed: the term is None and
  ``(field, value)`` goes into ``CanonicalRecord.unmapped``;
- ``cannot_hold`` lists terms a CRM field cannot express; they are never written.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from syncd import catalogue
from syncd._toml import Locator, Problem, Severity, pydantic_problems, try_load_toml
from syncd.errors import MappingError, RecordError
from syncd.model import CanonicalRecord, RawRecord, RecordKind, normalise_email

# the glossary term whose raw field a backwards move clears in an earlier request (HubSpot
# refuses to move ``lifecyclestage`` backwards otherwise): a write found with it empty is
# syncd's own half-done move, not someone's edit
CLEARED_FIRST_TERM = "lifecycle"

# --------------------------------------------------------------------------- schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Term(_Model):
    term: str = Field(min_length=1)
    label: str = Field(min_length=1)
    definition: str = Field(min_length=1)


class Stage(Term):
    section: Literal["TOFU", "MOFU", "BOFU"]


class DealStage(Term):
    closed: bool
    won: bool


class TermsFile(_Model):
    """terms.toml: the glossary. Lifecycle stages are listed in funnel order."""

    lifecycle: tuple[Stage, ...] = Field(min_length=1)
    lead_status: tuple[Term, ...] = Field(min_length=1)
    deal_stage: tuple[DealStage, ...] = Field(min_length=1)
    lead_type: tuple[Term, ...] = ()


class TermMap(_Model):
    """Which raw field carries a glossary term, and its value table (term -> raw values)."""

    field: str = Field(min_length=1)
    values: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    unmapped: tuple[str, ...] = ()
    cannot_hold: tuple[str, ...] = ()


class BofuConversion(_Model):
    event_field: str = Field(min_length=1)
    date_field: str = Field(min_length=1)
    events: tuple[str, ...] = Field(min_length=1)


class Attempts(_Model):
    types: tuple[str, ...] = Field(min_length=1)


class ObjectMap(_Model):
    kind: RecordKind
    fields: dict[str, str] = Field(default_factory=dict)
    terms: dict[str, TermMap] = Field(default_factory=dict)
    bofu_conversion: BofuConversion | None = None
    attempts: Attempts | None = None
    # Salesforce: a unique External ID field syncd owns; creates are upserts on it (idempotent)
    external_id: str | None = Field(default=None, min_length=1)


def _system_file(system: str) -> type[_Model]:
    """The schema of one CRM's mapping file: one required table per catalogue object of that
    system, in catalogue order (hubspot.toml: ``contacts``, ``deals``; salesforce.toml:
    ``Lead``, ``Contact``, ``Opportunity``, ``Task``), each an :class:`ObjectMap`."""
    tables: dict[str, Any] = {name: (ObjectMap, ...) for name in catalogue.names(system)}
    return pydantic.create_model(f"{system.capitalize()}File", __base__=_Model,
                                 __module__=__name__, **tables)


SYSTEM_FILES: dict[str, type[_Model]] = {s: _system_file(s) for s in catalogue.SYSTEMS}
TERMS_FILE = "terms.toml"
# Files in the mappings folder that other modules own (validated there, not here).
OTHER_FILES = ("sla.toml",)
KNOWN_FILES = (TERMS_FILE, *(f"{s}.toml" for s in SYSTEM_FILES), *OTHER_FILES)

EXPECTED_KIND: dict[tuple[str, str], RecordKind] = {(o.system, o.name): o.kind for o in catalogue.OBJECTS}

# Canonical value fields and term fields per kind (see syncd.model.CanonicalRecord).
VALUE_FIELDS: dict[str, frozenset[str]] = {k: spec.values for k, spec in catalogue.KINDS.items()}
TERM_FIELDS: dict[str, frozenset[str]] = {k: spec.terms for k, spec in catalogue.KINDS.items()}
GLOSSARY_KINDS = ("lifecycle", "lead_status", "deal_stage", "lead_type")
_ATTEMPT_OBJECTS = ", ".join(o.name for o in catalogue.objects(kind="attempt"))


# --------------------------------------------------------------------------- files -> problems


@dataclass(frozen=True, slots=True)
class _Parsed:
    path: Path
    model: Any
    locator: Locator


def _parse(path: Path, model_cls: type[_Model]) -> _Parsed | list[Problem]:
    got = try_load_toml(path)
    if isinstance(got, Problem):
        return [got]
    doc, locator = got
    try:
        return _Parsed(path, model_cls.model_validate(doc), locator)
    except pydantic.ValidationError as e:
        return pydantic_problems(path, e, locator)


def _glossary(terms: TermsFile) -> dict[str, tuple[str, ...]]:
    return {k: tuple(t.term for t in getattr(terms, k)) for k in GLOSSARY_KINDS}


def terms_problems(p: _Parsed) -> list[Problem]:
    """Duplicate terms, and deal stages that are won but not closed."""
    out: list[Problem] = []
    f = str(p.path)
    t: TermsFile = p.model
    for kind in GLOSSARY_KINDS:
        seen: set[str] = set()
        for i, item in enumerate(getattr(t, kind)):
            if item.term in seen:
                line, col = p.locator((kind, i, "term"))
                out.append(Problem(f, line, col, f"{kind}: term {item.term!r} is defined twice",
                                   code="duplicate-term"))
            seen.add(item.term)
    for i, ds in enumerate(t.deal_stage):
        if ds.won and not ds.closed:
            line, col = p.locator(("deal_stage", i, "won"))
            out.append(Problem(f, line, col, f"deal_stage {ds.term!r} is won but not closed",
                               code="won-not-closed"))
    return out


def system_problems(
    system: str, p: _Parsed, glossary: dict[str, tuple[str, ...]] | None
) -> list[Problem]:
    """Cross-checks of one CRM file against the glossary (None: glossary unreadable)."""
    out: list[Problem] = []
    f = str(p.path)

    def add(path: tuple[str | int, ...], msg: str, code: str,
            severity: Severity = "error") -> None:
        line, col = p.locator(path)
        out.append(Problem(f, line, col, msg, severity=severity, code=code))

    objects: dict[str, ObjectMap] = dict(p.model)
    for obj, om in objects.items():
        expected = EXPECTED_KIND.get((system, obj))
        if expected is not None and om.kind != expected:
            add((obj, "kind"), f"{obj} is a {expected} record, not {om.kind!r}", "wrong-kind")
            continue
        for name in om.fields:
            if name not in VALUE_FIELDS[om.kind]:
                allowed = ", ".join(sorted(VALUE_FIELDS[om.kind]))
                add((obj, "fields", name),
                    f"unknown canonical field {name!r} for a {om.kind} (known: {allowed})",
                    "unknown-field")
        if om.bofu_conversion is not None and om.kind != "person":
            add((obj, "bofu_conversion"), "bofu_conversion only applies to person records",
                "unknown-field")
        if om.attempts is not None and om.kind != "attempt":
            add((obj, "attempts"), f"attempts only applies to attempt records ({_ATTEMPT_OBJECTS})",
                "unknown-field")
        if om.kind == "attempt" and om.attempts is None:
            add((obj,), f"{obj} needs an [{obj}.attempts] table naming the attempt types",
                "missing")
        for tf, tm in om.terms.items():
            base: tuple[str | int, ...] = (obj, "terms", tf)
            if tf not in TERM_FIELDS[om.kind]:
                known = ", ".join(sorted(TERM_FIELDS[om.kind])) or "none"
                add(base, f"unknown term field {tf!r} for a {om.kind} (known: {known})",
                    "unknown-field")
                continue
            known_terms = set(glossary[tf]) if glossary is not None else None
            owner: dict[str, str] = {}
            for raw in tm.unmapped:
                owner.setdefault(raw, "(unmapped)")
            for term, raws in tm.values.items():
                if known_terms is not None and term not in known_terms:
                    add((*base, "values", term),
                        f"{tf}: {term!r} is not a term in terms.toml", "unknown-term")
                if not raws:
                    add((*base, "values", term),
                        f"{tf}: {term!r} lists no raw value (nothing to write)", "empty-values")
                if term in tm.cannot_hold:
                    add((*base, "values", term),
                        f"{tf}: {term!r} is both mapped and listed in cannot_hold", "contradiction")
                for i, raw in enumerate(raws):
                    prev = owner.get(raw)
                    if prev is not None:
                        where = "unmapped" if prev == "(unmapped)" else f"term {prev!r}"
                        add((*base, "values", term, i),
                            f"{tm.field} value {raw!r} is mapped to {term!r} and already "
                            f"to {where}",
                            "duplicate-value")
                    else:
                        owner[raw] = term
            for i, term in enumerate(tm.cannot_hold):
                if known_terms is not None and term not in known_terms:
                    add((*base, "cannot_hold", i),
                        f"{tf}: {term!r} is not a term in terms.toml", "unknown-term")
            if glossary is not None:
                for term in glossary[tf]:
                    if term not in tm.values and term not in tm.cannot_hold:
                        add(base,
                            f"{tf}: glossary term {term!r} has no {system} value; map it or "
                            "list it in cannot_hold",
                            "unreached-term", "warning")
    return out


@dataclass(frozen=True, slots=True)
class _Loaded:
    terms: _Parsed
    systems: dict[str, _Parsed]


def collect(directory: Path) -> tuple[_Loaded | None, list[Problem]]:
    """Parse and cross-check every mapping file; all problems, and the parsed files if usable."""
    problems: list[Problem] = []
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError as e:
        return None, [Problem(str(directory), 1, 1, f"cannot list directory: {e.strerror or e}",
                              code="unreadable")]
    for name in names:
        if name.endswith(".toml") and name not in KNOWN_FILES:
            problems.append(Problem(str(directory / name), 1, 1,
                                    f"unknown mapping file (known: {', '.join(KNOWN_FILES)})",
                                    code="unknown-file"))
    parsed_terms = _parse(directory / TERMS_FILE, TermsFile)
    glossary: dict[str, tuple[str, ...]] | None = None
    if isinstance(parsed_terms, _Parsed):
        problems += terms_problems(parsed_terms)
        glossary = _glossary(parsed_terms.model)
    else:
        problems += parsed_terms
    systems: dict[str, _Parsed] = {}
    for system, cls in SYSTEM_FILES.items():
        got = _parse(directory / f"{system}.toml", cls)
        if isinstance(got, _Parsed):
            systems[system] = got
            problems += system_problems(system, got, glossary)
        else:
            problems += got
    if isinstance(parsed_terms, _Parsed) and len(systems) == len(SYSTEM_FILES):
        return _Loaded(parsed_terms, systems), problems
    return None, problems


def load_mappings(directory: Path | str) -> Mappings:
    """Load and validate the mapping folder; raise MappingError on the first error."""
    d = Path(directory)
    if not d.is_dir():
        raise MappingError(f"{d}:1:1: mappings directory not found")
    loaded, problems = collect(d)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise MappingError(str(errors[0]))
    assert loaded is not None  # no errors means every file parsed
    return Mappings(d, loaded)


def default_mappings_dir() -> Path:
    """The default mapping + SLA files shipped inside the package (``syncd/mappings``).

    Package data, found with ``importlib.resources`` so a plain ``pip install`` carries them.
    """
    ref = resources.files("syncd").joinpath("mappings")
    if not isinstance(ref, Path):  # a zipped install: not supported, syncd ships as a wheel
        raise MappingError(f"the default mappings are not on the filesystem ({ref}); install syncd unzipped")
    return ref


# --------------------------------------------------------------------------- revision


def _content_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.toml")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _git(directory: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                           timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def mappings_revision(directory: Path) -> str:
    """The git commit of the folder if it is a clean checkout, else ``sha256:<12 hex>[+dirty]``.

    ``+dirty`` marks a folder inside a git work tree with uncommitted (or never
    committed) changes; a folder outside git gets the bare content hash.
    """
    status = _git(directory, "status", "--porcelain", "--", ".")
    digest = f"sha256:{_content_hash(directory)}"
    if status is None:
        return digest  # not in git (or git unavailable)
    commit = _git(directory, "log", "-1", "--format=%H", "--", ".")
    if status == "" and commit:
        return commit
    return f"{digest}+dirty"


# --------------------------------------------------------------------------- value conversion


def _bad(raw: RawRecord, field: str, value: Any, what: str) -> RecordError:
    return RecordError(
        f"{raw.system} {raw.object} {raw.id}: field {field} value {value!r} is not {what}",
        system=raw.system, object=raw.object, record_id=raw.id,
    )


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "")


def _to_str(v: Any) -> str | None:
    if _empty(v):
        return None
    return str(v)


def _to_email(v: Any) -> str | None:
    return normalise_email(str(v)) if v is not None else None


def _to_int(v: Any) -> int | None:
    if _empty(v):
        return None
    if isinstance(v, bool):
        raise ValueError("an integer")
    f = float(v) if isinstance(v, str) else v
    if not isinstance(f, int | float) or not math.isfinite(f):
        raise ValueError("an integer")
    return round(f)


def _to_float(v: Any) -> float | None:
    if _empty(v):
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError("a number")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("a finite number")
    return f


def _to_datetime(v: Any) -> datetime | None:
    if _empty(v):
        return None
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day)
    elif isinstance(v, int | float) and not isinstance(v, bool):
        dt = datetime.fromtimestamp(v / 1000, UTC)
    elif isinstance(v, str):
        s = v.strip()
        dt = (datetime.fromtimestamp(int(s) / 1000, UTC) if s.isdigit()
              else datetime.fromisoformat(s))
    else:
        raise ValueError("a datetime")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _to_date(v: Any) -> date | None:
    if _empty(v):
        return None
    if isinstance(v, date) and not isinstance(v, datetime):
        return v
    if isinstance(v, str) and len(v.strip()) == 10:
        return date.fromisoformat(v.strip())
    dt = _to_datetime(v)
    assert dt is not None
    return dt.astimezone(UTC).date()


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if _empty(v):
        return False
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError("a boolean")


def _to_ids(v: Any) -> list[str]:
    if _empty(v):
        return []
    if isinstance(v, list | tuple):
        return [str(x) for x in v if not _empty(x)]
    if isinstance(v, str):
        return [p.strip() for p in v.replace(";", ",").split(",") if p.strip()]
    return [str(v)]


_READERS: dict[str, Callable[[Any], Any]] = {
    "email": _to_email, "score": _to_int, "amount": _to_float, "close_date": _to_date,
    "at": _to_datetime, "is_converted": _to_bool, "contact_ids": _to_ids,
}
_WHAT: dict[str, str] = {
    "score": "an integer", "amount": "a number", "close_date": "a date",
    "at": "a datetime", "is_converted": "a boolean", "bofu_conversion_at": "a datetime",
}


def _fmt_hubspot(field: str, v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(v, date):
        return f"{v.isoformat()}T00:00:00.000Z"  # HubSpot dates are midnight UTC
    if isinstance(v, list | tuple):
        return [str(x) for x in v]
    return str(v)


def _fmt_salesforce(field: str, v: Any) -> Any:
    if isinstance(v, datetime):
        u = v.astimezone(UTC)
        return u.strftime("%Y-%m-%dT%H:%M:%S.") + f"{u.microsecond // 1000:03d}+0000"
    if isinstance(v, date):
        return v.isoformat()
    if field == "contact_ids" and isinstance(v, list | tuple):
        return str(v[0]) if v else None
    return v


_FORMATTERS: dict[str, Callable[[str, Any], Any]] = {
    "hubspot": _fmt_hubspot, "salesforce": _fmt_salesforce,
}


# --------------------------------------------------------------------------- Mappings


@dataclass(frozen=True, slots=True)
class _TermTable:
    term_field: str
    raw_field: str
    read: dict[str, str]            # raw value -> term
    write: dict[str, str]           # term -> raw value written
    unmapped: frozenset[str]
    cannot_hold: frozenset[str]


@dataclass(frozen=True, slots=True)
class _ObjectPlan:
    system: str
    object: str
    kind: RecordKind
    values: tuple[tuple[str, str, Callable[[Any], Any]], ...]  # (canonical, raw, reader)
    terms: tuple[_TermTable, ...]
    bofu: BofuConversion | None
    attempt_types: frozenset[str]
    raw_of: dict[str, str]          # canonical value field / term field -> raw field
    pull: tuple[str, ...]


class Mappings:
    """The validated mapping files, with precomputed lookups. Build with :func:`load_mappings`."""

    def __init__(self, directory: Path, loaded: _Loaded) -> None:
        self.directory = directory
        self._files = {"terms": loaded.terms, **loaded.systems}
        terms: TermsFile = loaded.terms.model
        self.terms: TermsFile = terms
        self.stages: tuple[str, ...] = tuple(s.term for s in terms.lifecycle)
        self.lead_statuses: tuple[str, ...] = tuple(s.term for s in terms.lead_status)
        self.deal_stages: tuple[str, ...] = tuple(s.term for s in terms.deal_stage)
        self.lead_types: tuple[str, ...] = tuple(s.term for s in terms.lead_type)
        self._stage_index = {t: i for i, t in enumerate(self.stages)}
        self._closed = frozenset(s.term for s in terms.deal_stage if s.closed)
        self._won = frozenset(s.term for s in terms.deal_stage if s.won)
        self._labels = {(k, t.term): t.label for k in GLOSSARY_KINDS for t in getattr(terms, k)}
        self._plans: dict[tuple[str, str], _ObjectPlan] = {}
        for system, parsed in loaded.systems.items():
            for obj, om in dict(parsed.model).items():
                self._plans[(system, obj)] = _plan(system, obj, om)
        self.revision: str = mappings_revision(directory)

    # glossary ------------------------------------------------------------------
    def stage_index(self, term: str) -> int:
        """Position of a lifecycle stage in funnel order; KeyError for an unknown term."""
        return self._stage_index[term]

    def deal_stage_closed(self, term: str) -> bool:
        return term in self._closed

    def deal_stage_won(self, term: str) -> bool:
        return term in self._won

    def label(self, kind: str, term: str) -> str:
        """The human label of a term (kind: lifecycle|lead_status|deal_stage|lead_type)."""
        return self._labels.get((kind, term), term)

    # objects -------------------------------------------------------------------
    def _plan(self, system: str, object: str) -> _ObjectPlan:
        try:
            return self._plans[(system, object)]
        except KeyError:
            raise RecordError(f"no mapping for {system} {object}", system=system,
                              object=object) from None

    def objects(self) -> list[tuple[str, str]]:
        return list(self._plans)

    def kind(self, system: str, object: str) -> RecordKind:
        return self._plan(system, object).kind

    def pull_fields(self, system: str, object: str) -> list[str]:
        """Raw fields the connector must request for this object."""
        return list(self._plan(system, object).pull)

    def raw_field(self, system: str, object: str, canonical: str) -> str | None:
        """The raw field carrying a canonical value or term field (None: not mapped)."""
        return self._plan(system, object).raw_of.get(canonical)

    def can_hold(self, system: str, object: str, term_field: str, term: str) -> bool:
        """Whether syncd can write ``term`` into this object's ``term_field``."""
        for t in self._plan(system, object).terms:
            if t.term_field == term_field:
                return term in t.write
        return False

    def allowed_raw_values(self, system: str, object: str, field: str) -> set[str]:
        """Raw values of ``field`` the mappings name (mapped or deliberately unmapped)."""
        for t in self._plan(system, object).terms:
            if t.raw_field == field:
                return set(t.read) | set(t.unmapped)
        return set()

    def writable_fields(self) -> dict[tuple[str, str], frozenset[str]]:
        """(system, object) -> the canonical fields (values and terms) that object can hold."""
        return {key: frozenset(plan.raw_of) for key, plan in self._plans.items()}

    def term_fields(self, system: str, object: str) -> dict[str, str]:
        """raw field -> canonical term field, for the objects' term-carrying fields."""
        return {t.raw_field: t.term_field for t in self._plan(system, object).terms}

    def external_id(self, system: str, object: str) -> str | None:
        """The External ID field syncd owns on this object (creates upsert on it), if declared."""
        om = self._files[system].model
        return getattr(getattr(om, object, None), "external_id", None)

    def raw_email(self, system: str, object: str, fields: Mapping[str, Any]) -> str | None:
        """The normalised email of a raw record (or of raw fields about to be written)."""
        f = self._plan(system, object).raw_of.get("email")
        v = fields.get(f) if f else None
        return normalise_email(v) if isinstance(v, str) else None

    def clear_first_fields(self, system: str, object: str, changes: Mapping[str, Any]) -> list[str]:
        """Raw fields to clear in an earlier request before a backwards move.

        HubSpot refuses to move ``lifecyclestage`` backwards unless it is cleared first.
        """
        if system != "hubspot" or CLEARED_FIRST_TERM not in changes:
            return []
        f = self._plan(system, object).raw_of.get(CLEARED_FIRST_TERM)
        return [f] if f else []

    def position(self, system: str, path: tuple[str | int, ...]) -> tuple[str, int, int]:
        """(file, line, col) of a key path in a system's file (or "terms")."""
        p = self._files[system]
        line, col = p.locator(path)
        return str(p.path), line, col

    def value_path(self, system: str, object: str, term_field: str,
                   value: str) -> tuple[str | int, ...]:
        """Key path of a raw value in a system file's value table (for positions)."""
        base: tuple[str | int, ...] = (object, "terms", term_field)
        tm = getattr(self._files[system].model, object).terms.get(term_field)
        if tm is None:
            return (object,)
        for term, raws in tm.values.items():
            if value in raws:
                return (*base, "values", term, raws.index(value))
        if value in tm.unmapped:
            return (*base, "unmapped", tm.unmapped.index(value))
        return base

    # translation ---------------------------------------------------------------
    def to_canonical(self, raw: RawRecord) -> CanonicalRecord:
        """Translate one raw record; unmapped values become None and are listed, never guessed."""
        plan = self._plan(raw.system, raw.object)
        f = raw.fields
        values: dict[str, Any] = {}
        for canonical, field, reader in plan.values:
            v = f.get(field)
            try:
                values[canonical] = reader(v)
            except (ValueError, TypeError, OverflowError):
                raise _bad(raw, field, v, _WHAT.get(canonical, "valid")) from None
        terms: dict[str, str | None] = {}
        unmapped: list[tuple[str, str]] = []
        for t in plan.terms:
            v = f.get(t.raw_field)
            if _empty(v):
                terms[t.term_field] = None
                continue
            s = v if isinstance(v, str) else str(v)
            term = t.read.get(s)
            terms[t.term_field] = term
            if term is None:
                unmapped.append((t.raw_field, s))
        if plan.bofu is not None:
            b = plan.bofu
            event = f.get(b.event_field)
            at = None
            if isinstance(event, str) and event.strip() in b.events:
                try:
                    at = _to_datetime(f.get(b.date_field))
                except (ValueError, TypeError, OverflowError):
                    raise _bad(raw, b.date_field, f.get(b.date_field), "a datetime") from None
            values["bofu_conversion_at"] = at
        if plan.kind == "attempt":
            values["counts"] = values.get("type") in plan.attempt_types
        return CanonicalRecord(
            system=raw.system, object=raw.object, id=raw.id, kind=plan.kind,
            modified_at=raw.modified_at, terms=terms, values=values, unmapped=tuple(unmapped),
        )

    def to_raw(self, system: str, object: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical field -> raw field and value, formatted for that CRM.

        Terms go through the write table (the first raw value listed for the term).
        Raises RecordError for a field that is not mapped or a term the CRM cannot hold.
        """
        plan = self._plan(system, object)
        fmt = _FORMATTERS.get(system, _fmt_salesforce)
        out: dict[str, Any] = {}
        tables = {t.term_field: t for t in plan.terms}
        for name, value in changes.items():
            t = tables.get(name)
            if t is not None:
                if value is None:
                    out[t.raw_field] = "" if system == "hubspot" else None
                    continue
                raw_value = t.write.get(value)
                if raw_value is None:
                    raise RecordError(f"{system} {object}.{t.raw_field} cannot hold "
                                      f"{name} {value!r}", system=system, object=object)
                out[t.raw_field] = raw_value
                continue
            field = plan.raw_of.get(name)
            if field is None:
                raise RecordError(f"{system} {object} has no field for {name!r}",
                                  system=system, object=object)
            out[field] = fmt(name, value)
        return out


def _plan(system: str, obj: str, om: ObjectMap) -> _ObjectPlan:
    values = tuple((c, r, _READERS.get(c, _to_str)) for c, r in om.fields.items())
    tables = []
    for tf, tm in om.terms.items():
        read: dict[str, str] = {}
        write: dict[str, str] = {}
        for term, raws in tm.values.items():
            for raw in raws:
                read.setdefault(raw, term)
            if raws:
                write[term] = raws[0]
        tables.append(_TermTable(tf, tm.field, read, write, frozenset(tm.unmapped),
                                 frozenset(tm.cannot_hold)))
    raw_of = {c: r for c, r, _ in values} | {t.term_field: t.raw_field for t in tables}
    pull = list(dict.fromkeys([*om.fields.values(), *(t.raw_field for t in tables)]))
    if om.bofu_conversion is not None:
        pull += [om.bofu_conversion.event_field, om.bofu_conversion.date_field]
    return _ObjectPlan(
        system=system, object=obj, kind=om.kind, values=values, terms=tuple(tables),
        bofu=om.bofu_conversion,
        attempt_types=frozenset(om.attempts.types if om.attempts else ()),
        raw_of=raw_of, pull=tuple(dict.fromkeys(pull)),
    )
