"""The SLA parameters file (``mappings/sla.toml``): load, validate, report problems.

Every number and term the rules in :mod:`syncd.rules` use lives here, typed and
frozen. :func:`load_sla` fails closed with ``MappingError("file:line:col: …")``;
:func:`sla_problems` reports every problem at once (for ``syncd mappings check``).

The mapping folder is complete or refused: a folder without ``sla.toml`` is an
error, unless the config asks for the built-in SLA (``[mappings] sla = "defaults"``,
passed here as ``defaults=True``).
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from syncd._toml import Locator, Problem, parse_file, problems_for
from syncd.errors import MappingError
from syncd.model import SYSTEMS

SLA_FILE = "sla.toml"
TERMS_FILE = "terms.toml"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlaTerms(_Frozen):
    """The glossary terms the rules target."""

    returned_status: str = "returned_not_ready"
    returned_stage: str = "lead"
    score_stage: str = "mql"
    open_deal_stage: str = "opportunity"
    won_deal_stage: str = "customer"
    connected_statuses: tuple[str, ...] = ("connected",)


class ScoreRules(_Frozen):
    threshold: int = Field(default=50, ge=0)
    rehandoff_margin: int = Field(default=10, ge=0)
    bofu_conversion_rehandoff: bool = True
    bofu_conversion_is_mql: bool = True


class AttemptRules(_Frozen):
    count: int = Field(default=3, ge=1)
    window_days: float = Field(default=14, gt=0)
    task_types: tuple[str, ...] = ("call", "email", "video")


class FollowupRules(_Frozen):
    window_hours: float = Field(default=24, gt=0)


class Handoff(_Frozen):
    enabled: bool = True
    object: str = "Lead"
    status: str = "new"
    fields: tuple[str, ...] = ("first_name", "last_name", "email", "company", "lead_source",
                               "score", "lead_type", "qualification_reason")
    placeholders: dict[str, str] = Field(
        default_factory=lambda: {"company": "[not provided]", "last_name": "[not provided]"})


class ReverseHandoff(_Frozen):
    enabled: bool = True
    object: str = "contacts"
    fields: tuple[str, ...] = ("first_name", "last_name", "email", "company", "lead_source",
                               "lead_type", "return_reason")


def _default_ownership() -> dict[str, tuple[str, ...]]:
    return {"hubspot": ("subscriber", "lead", "score"),
            "salesforce": ("lead_status", "mql", "sal", "sql", "opportunity", "customer",
                           "deal_stage")}


class SyncFields(_Frozen):
    fields: tuple[str, ...] = ("lead_status",)


class WriteBack(_Frozen):
    max_tries: int = Field(default=5, ge=1)


class Deletions(_Frozen):
    """What a record deleted (or merged away) in one CRM does to its twin in the other."""

    # mark: record the tombstone, unlink, report; write nothing to the other side and never
    # re-create the person because of the deletion. propagate: archive/delete the twin too.
    other_side: Literal["mark", "propagate"] = "mark"


class SLA(_Frozen):
    """The whole SLA file. Every section is optional; missing ones take the defaults."""

    terms: SlaTerms = Field(default_factory=SlaTerms)
    score: ScoreRules = Field(default_factory=ScoreRules)
    attempts: AttemptRules = Field(default_factory=AttemptRules)
    followup: FollowupRules = Field(default_factory=FollowupRules)
    handoff: Handoff = Field(default_factory=Handoff)
    reverse_handoff: ReverseHandoff = Field(default_factory=ReverseHandoff)
    ownership: dict[str, tuple[str, ...]] = Field(default_factory=_default_ownership)
    sync: SyncFields = Field(default_factory=SyncFields)
    writeback: WriteBack = Field(default_factory=WriteBack)
    deletions: Deletions = Field(default_factory=Deletions)

    def owner_of(self, name: str) -> str | None:
        """The system owning a canonical field or lifecycle stage term, or None."""
        for system, names in self.ownership.items():
            if name in names:
                return system
        return None


# --------------------------------------------------------------------------- checks

#: canonical person fields the rules know (ownership / sync / hand-off lists)
PERSON_FIELDS = frozenset({
    "lifecycle", "lead_status", "lead_type", "deal_stage", "email", "first_name", "last_name",
    "company", "lead_source", "score", "return_reason", "qualification_reason",
})


def _glossary(directory: Path) -> dict[str, set[str]] | None:
    """{kind: terms} from terms.toml, read directly; None when absent or unreadable."""
    try:
        doc = tomllib.loads((directory / TERMS_FILE).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    out: dict[str, set[str]] = {}
    for kind in ("lifecycle", "lead_status", "deal_stage", "lead_type"):
        items = doc.get(kind)
        if isinstance(items, list):
            out[kind] = {str(i["term"]) for i in items if isinstance(i, dict) and "term" in i}
    return out


def _semantic_problems(path: Path, sla: SLA, loc: Locator, directory: Path) -> list[Problem]:
    out: list[Problem] = []

    def add(where: tuple[str | int, ...], msg: str, severity: str = "error") -> None:
        line, col = loc.find(where)
        out.append(Problem(str(path), line, col, msg,
                           "warning" if severity == "warning" else "error", code="sla"))

    # ownership: known systems only, nothing owned twice
    owners: dict[str, str] = {}
    for system, names in sla.ownership.items():
        if system not in SYSTEMS:
            add(("ownership", system), f"ownership.{system}: unknown system "
                f"(expected one of: {', '.join(SYSTEMS)})")
            continue
        for i, name in enumerate(names):
            if name in owners and owners[name] != system:
                add(("ownership", system, i),
                    f"ownership: {name!r} is owned by both {owners[name]} and {system}")
            owners.setdefault(name, system)

    for section, fields in (("handoff", sla.handoff.fields),
                            ("reverse_handoff", sla.reverse_handoff.fields)):
        for i, name in enumerate(fields):
            if name not in PERSON_FIELDS:
                add((section, "fields", i), f"{section}.fields: unknown field {name!r}")
    for name in sla.handoff.placeholders:
        if name not in PERSON_FIELDS:
            add(("handoff", "placeholders", name),
                f"handoff.placeholders: unknown field {name!r}")

    glossary = _glossary(directory)
    if glossary is None:
        return out
    stages = glossary.get("lifecycle", set())
    statuses = glossary.get("lead_status", set())
    t = sla.terms

    def term(where: tuple[str | int, ...], value: str, known: set[str], kind: str) -> None:
        if value not in known:
            add(where, f"{'.'.join(str(p) for p in where)}: unknown {kind} term {value!r} "
                f"(not in {TERMS_FILE})")

    for key in ("returned_stage", "score_stage", "open_deal_stage", "won_deal_stage"):
        term(("terms", key), getattr(t, key), stages, "lifecycle")
    term(("terms", "returned_status"), t.returned_status, statuses, "lead_status")
    for i, s in enumerate(t.connected_statuses):
        term(("terms", "connected_statuses", i), s, statuses, "lead_status")
    term(("handoff", "status"), sla.handoff.status, statuses, "lead_status")
    known_names = stages | PERSON_FIELDS
    for system, names in sla.ownership.items():
        for i, name in enumerate(names):
            if name not in known_names:
                add(("ownership", system, i),
                    f"ownership.{system}: {name!r} is neither a lifecycle stage nor a field")
    for i, name in enumerate(sla.sync.fields):
        if name not in PERSON_FIELDS or name == "lifecycle":
            add(("sync", "fields", i), f"sync.fields: {name!r} is not a syncable person field")
    return out


#: :attr:`Problem.code` of a folder without sla.toml (``syncd mappings check`` drops it when the
#: config says ``[mappings] sla = "defaults"``)
SLA_MISSING = "sla-missing"


def _missing(path: Path) -> Problem:
    return Problem(str(path), 1, 1,
                   f"missing: the mapping folder has no {SLA_FILE} (add one, e.g. a copy of the shipped "
                   f"mappings/{SLA_FILE}, or set [mappings] sla = \"defaults\" in the config to use "
                   "the built-in SLA)", code=SLA_MISSING)


def _flat(text: str) -> str:
    """A key or value quoted in a message may hold line breaks: a problem is one line."""
    return text if text.isprintable() else " ".join(text.split())  # every line break is whitespace


def _one_line(p: Problem) -> Problem:
    return p if p.message.isprintable() else replace(p, message=_flat(p.message))


def sla_problems(directory: Path, *, defaults: bool = False) -> list[Problem]:
    """Every problem in ``directory/sla.toml``: schema, ranges, ownership, unknown terms.

    A missing file is a problem unless ``defaults`` (then the built-in SLA applies).
    """
    path = Path(directory) / SLA_FILE
    if not path.exists():
        return [] if defaults else [_missing(path)]
    problems = problems_for(path, SLA)
    if not problems:
        sla, loc = parse_file(path, SLA)
        problems = _semantic_problems(path, sla, loc, Path(directory))
    return [_one_line(p) for p in problems]


def load_sla(directory: Path, *, defaults: bool = False) -> SLA:
    """The SLA in ``directory/sla.toml``; the built-in SLA when the file is absent and ``defaults``.

    Raises MappingError("file:line:col: message") on the first error, and for a missing file
    unless ``defaults`` (the config's ``[mappings] sla = "defaults"``).
    """
    path = Path(directory) / SLA_FILE
    if not path.exists():
        if defaults:
            return SLA()
        raise MappingError(str(_missing(path)))
    try:
        sla, loc = parse_file(path, SLA)
    except MappingError as exc:
        raise MappingError(_flat(str(exc))) from None
    errors = [p for p in _semantic_problems(path, sla, loc, Path(directory))
              if p.severity == "error"]
    if errors:
        raise MappingError(str(_one_line(errors[0])))
    return sla
