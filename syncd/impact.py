"""`syncd mappings impact`: what a mapping change would do to the records we hold.

The mapping folder is read at two git revisions (``--to`` None = the working
tree), both are validated with :func:`syncd.mapping.load_mappings` (a bad one
raises MappingError, exit 2), and every record in the state store is re-mapped
under both. Nothing is written and no CRM is called: the store is read in one
read-only transaction.

The result counts, per transition, the records whose glossary term changes
(system, object, raw field, raw value, term field, old → new term), with a few
samples (record ids, masked emails), and the rules that would then fire: the
people whose records changed are decided again with :func:`syncd.rules.decide_person`
under the new mappings and SLA (stored records + memory, as the engine builds
its view), next to the same people decided under the old ones (the baseline).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import structlog

from syncd import catalogue, rules
from syncd.errors import MappingError, RecordError
from syncd.linking import person_objects, references
from syncd.logs import mask_email
from syncd.mapping import Mappings, load_mappings
from syncd.model import CanonicalRecord, RawRecord, utcnow
from syncd.sla import SLA, load_sla
from syncd.store import OutboxRow, RecordRow, Store, Tx
from syncd.views import (  # what the rules see, built exactly as the engine builds it
    conflicted_emails,
    deal_view,
    pending_overlay,
    person_view,
    rule_context,
)

log = structlog.get_logger()

UNITS = {k: spec.unit for k, spec in catalogue.KINDS.items()}
SYSTEM_LABEL = {"hubspot": "HubSpot", "salesforce": "Salesforce"}
WORKING_TREE = "working tree"
UNMAPPED = "(unmapped)"
EMPTY = "(empty)"


# --------------------------------------------------------------------------- git


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MappingError(f"{cwd}:1:1: cannot run git: {exc}") from None


def _git_out(cwd: Path, *args: str, what: str) -> str:
    r = _git(cwd, *args)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise MappingError(f"{cwd}:1:1: {what}: {err[-1] if err else 'git failed'}")
    return r.stdout.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class Side:
    """One side of the comparison: what the user asked for and what it resolved to."""

    rev: str        # as given ("HEAD", a branch, a sha) or "working tree"
    revision: str   # the commit, or the working tree's Mappings.revision
    mappings: Mappings
    sla: SLA


def _load(directory: Path, label: str, *, sla_defaults: bool = False) -> tuple[Mappings, SLA]:
    """``sla_defaults``: the config's ``[mappings] sla = "defaults"`` (no sla.toml: the built-in SLA)."""
    try:
        return load_mappings(directory), load_sla(directory, defaults=sla_defaults)
    except MappingError as exc:
        # Point at the revision, not at our temporary checkout.
        raise MappingError(str(exc).replace(str(directory), label)) from None


@contextmanager
def checkout(mappings_dir: Path, rev: str | None, *, sla_defaults: bool = False) -> Iterator[Side]:
    """The mapping folder at ``rev`` (None: the working tree), loaded and validated."""
    d = Path(mappings_dir).resolve()
    if not d.is_dir():
        raise MappingError(f"{d}:1:1: mappings directory not found")
    if rev is None:
        m, sla = _load(d, str(d), sla_defaults=sla_defaults)
        yield Side(WORKING_TREE, m.revision, m, sla)
        return
    if not rev or rev.startswith("-"):
        raise MappingError(f"{d}:1:1: {rev!r} is not a git revision")
    if _git(d, "rev-parse", "--is-inside-work-tree").returncode != 0:
        raise MappingError(f"{d}:1:1: not inside a git repository; --from/--to need git "
                           "(compare two folders by committing them)")
    commit = _git_out(d, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
                      what=f"unknown git revision {rev!r}")
    prefix = _git_out(d, "rev-parse", "--show-prefix", what="cannot locate the mappings folder")
    # Paths are relative to the folder (git -C): works wherever the folder sits in the repo.
    names = _git_out(d, "ls-tree", "--name-only", commit, "--", ".",
                     what=f"cannot list the mappings folder at {rev}")
    listed = [n for n in names.splitlines() if n]
    if not listed:
        raise MappingError(f"{rev}:{prefix or '.'}:1:1: the mappings folder does not exist at "
                           f"this revision")
    with tempfile.TemporaryDirectory(prefix="syncd-impact-") as tmp:
        out = Path(tmp)
        for name in listed:
            base = Path(name).name
            if not base.endswith(".toml"):
                continue
            r = _git(d, "show", f"{commit}:./{base}")
            if r.returncode != 0:
                continue  # a sub-folder (ls-tree is not recursive): not a mapping file
            (out / base).write_bytes(r.stdout)
        m, sla = _load(out, f"{rev}:{prefix}".rstrip("/"), sla_defaults=sla_defaults)
        yield Side(rev, commit, m, sla)


# --------------------------------------------------------------------------- comparison


@dataclass
class _Bucket:
    info: dict[str, Any]
    count: int = 0
    samples: list[dict[str, str | None]] = field(default_factory=list)

    def add(self, sample: dict[str, str | None], limit: int) -> None:
        self.count += 1
        if len(self.samples) < limit:
            self.samples.append(sample)


def _map(m: Mappings, raw: RawRecord) -> CanonicalRecord | str:
    try:
        return m.to_canonical(raw)
    except RecordError as exc:
        return str(exc)


def _raw_of(row: RecordRow) -> RawRecord:
    return RawRecord(row.system, row.object, row.id, row.modified_at, row.raw)


def _sample(row: RecordRow) -> dict[str, str | None]:
    return {"record_id": row.id, "email": mask_email(row.email_norm) if row.email_norm else None}


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _raw_value(v: Any) -> str:
    if v is None or (isinstance(v, str) and not v.strip()):
        return EMPTY
    return v if isinstance(v, str) else str(v)


class _Diff:
    def __init__(self, old: Mappings, new: Mappings, samples: int) -> None:
        self.old, self.new, self.limit = old, new, samples
        self.terms: dict[tuple[str, ...], _Bucket] = {}
        self.values: dict[tuple[str, ...], _Bucket] = {}
        self.errors: dict[tuple[str, ...], _Bucket] = {}
        self.scanned = 0
        self.changed: set[tuple[str, str, str]] = set()
        self.entities: set[str] = set()
        # what the rules need afterwards (not the rows: a change may touch every record)
        self.people: set[str] = set()
        self.deals: set[str] = set()
        self.person_keys: set[tuple[str, str, str]] = set()  # people deals/tasks point at

    def record(self, row: RecordRow) -> None:
        self.scanned += 1
        raw = _raw_of(row)
        a, b = _map(self.old, raw), _map(self.new, raw)
        changed = False
        if isinstance(a, str) or isinstance(b, str):
            if isinstance(a, str) and isinstance(b, str):
                return  # unreadable under both: nothing changes
            side, reason = ("new", b) if isinstance(b, str) else ("old", str(a))
            key: tuple[str, ...] = (row.system, row.object, side, reason.split(": ", 1)[-1])
            self.errors.setdefault(key, _Bucket({
                "system": row.system, "object": row.object, "kind": row.kind,
                "unmappable_under": side, "reason": key[3]})).add(_sample(row), self.limit)
            changed = True
        else:
            for tf in sorted(set(a.terms) | set(b.terms)):
                ta, tb = a.terms.get(tf), b.terms.get(tf)
                if ta == tb:
                    continue
                rf = self.new.raw_field(row.system, row.object, tf) \
                    or self.old.raw_field(row.system, row.object, tf) or "?"
                rv = _raw_value(row.raw.get(rf))
                old_t = ta or (UNMAPPED if rv != EMPTY else EMPTY)
                new_t = tb or (UNMAPPED if rv != EMPTY else EMPTY)
                key = (row.system, row.object, rf, rv, tf, old_t, new_t)
                self.terms.setdefault(key, _Bucket({
                    "system": row.system, "object": row.object, "kind": row.kind,
                    "raw_field": rf, "raw_value": rv, "term_field": tf,
                    "old": old_t, "new": new_t})).add(_sample(row), self.limit)
                changed = True
            va, vb = _norm(dict(a.values)), _norm(dict(b.values))
            for vf in sorted(set(va) | set(vb)):
                if va.get(vf) == vb.get(vf):
                    continue
                key = (row.system, row.object, vf)
                self.values.setdefault(key, _Bucket({
                    "system": row.system, "object": row.object, "kind": row.kind,
                    "field": vf,
                    "old_raw_field": self.old.raw_field(row.system, row.object, vf),
                    "new_raw_field": self.new.raw_field(row.system, row.object, vf)}),
                ).add(_sample(row), self.limit)
                changed = True
        if changed:
            self.changed.add(row.key)
            self._touch(row)

    def _touch(self, row: RecordRow) -> None:
        if row.kind == "person":
            if row.entity_id:
                self.people.add(row.entity_id)
            return
        if row.kind == "deal" and row.entity_id:
            self.deals.add(row.entity_id)
        # the links as the engine made them
        self.person_keys.update((row.system, obj, x) for x in (references(row) or []) if x
                                for obj in person_objects(row.system))


def _buckets(d: Mapping[tuple[str, ...], _Bucket]) -> list[dict[str, Any]]:
    out = [{**b.info, "count": b.count, "unit": UNITS.get(b.info["kind"], "records"),
            "samples": b.samples} for b in d.values()]
    out.sort(key=lambda x: (-x["count"], x["system"], x["object"], json.dumps(x, default=str)))
    return out


# --------------------------------------------------------------------------- rules


def _people_touched(tx: Tx, diff: _Diff) -> set[str]:
    """Entities of the people whose records, deals or connection attempts changed."""
    found = tx.get_records(diff.person_keys) if diff.person_keys else {}
    return diff.people | {r.entity_id for r in found.values() if r.entity_id}


def _remap(m: Mappings, pending: Sequence[OutboxRow]) -> Callable[[RecordRow], CanonicalRecord | None]:
    """A record mapped afresh under ``m`` (None: unmappable), with syncd's own pending writes
    overlaid as the engine overlays them (a value an outbox row is about to change is not news)."""
    def remap(row: RecordRow) -> CanonicalRecord | None:
        c = _map(m, _raw_of(row))
        return None if isinstance(c, str) else pending_overlay(c, pending)

    return remap


def _view(tx: Tx, m: Mappings, entity: str, rows: list[RecordRow], memory: Mapping[str, Any] | None,
          conflicts: frozenset[str] = frozenset(),
          pending: Sequence[OutboxRow] = ()) -> rules.PersonView | None:
    """The engine's person view, with every record re-mapped under ``m`` (None: unmappable)."""
    return person_view(entity, rows, memory, tx.referrers, _remap(m, pending), conflicts)


def _deal_view(m: Mappings, entity: str, rows: list[RecordRow], memory: Mapping[str, Any] | None,
               pending: Sequence[OutboxRow] = ()) -> rules.DealView | None:
    """The engine's deal view, re-mapped under ``m`` (None: no deal or unmappable)."""
    return deal_view(entity, rows, memory, _remap(m, pending))


@dataclass
class _Tally:
    """Decisions by (rule, action) under one side's files, with samples; and how many writes
    that side's mappings could not express."""

    side: Side
    limit: int
    out: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    unwritable: int = 0

    def count(self, entity: str, decisions: Sequence[rules.Decision], email: str | None) -> None:
        for d in decisions:
            if d.action != "event" and d.system and d.object:
                try:
                    self.side.mappings.to_raw(d.system, d.object, d.changes)
                except RecordError:
                    self.unwritable += 1
            b = self.out.setdefault((d.rule, d.event or d.action), _Bucket({
                "rule": d.rule, "action": d.event or d.action, "example": d.reason}))
            b.add({"entity_id": entity, "record_id": d.record_id,
                   "email": mask_email(email) if email else None}, self.limit)


def _decide(tx: Tx, side: Side, people: Sequence[str], deals: Sequence[str], now: datetime,
            limit: int) -> tuple[dict[tuple[str, str], _Bucket], int]:
    """Decisions by (rule, action) for these people and deals under one side's files; and
    how many writes that side's mappings could not express. The views are the engine's."""
    ctx = rule_context(side.mappings, side.sla)
    tally = _Tally(side, limit)
    conflicts = conflicted_emails(tx)
    for kind, entities in (("person", people), ("deal", deals)):
        for i in range(0, len(entities), 500):
            chunk = list(entities[i:i + 500])
            by_entity = tx.records_by_entity(chunk)
            memories = tx.get_memory(chunk)
            pending = tx.open_writes(chunk)
            for entity in chunk:
                rows = by_entity.get(entity, [])
                if kind == "person":
                    view = _view(tx, side.mappings, entity, rows, memories.get(entity), conflicts,
                                 pending.get(entity, ()))
                    if view is not None:
                        email = next((r.email_norm for r in rows if r.email_norm), None)
                        tally.count(entity, rules.decide_person(view, ctx, now).decisions, email)
                    continue
                dview = _deal_view(side.mappings, entity, rows, memories.get(entity), pending.get(entity, ()))
                if dview is not None:
                    tally.count(entity, rules.decide_deal(dview, ctx, now).decisions, None)
    return tally.out, tally.unwritable


# --------------------------------------------------------------------------- entry points


def impact(store: Store, mappings_dir: Path | str, rev_from: str = "HEAD",
           rev_to: str | None = None, *, samples: int = 3,
           now: datetime | None = None, sla_defaults: bool = False) -> dict[str, Any]:
    """Re-map every stored record under the mappings at ``rev_from`` and ``rev_to``.

    ``rev_to`` None compares with the working tree. Pure: no writes, no API calls.
    ``sla_defaults``: a side without sla.toml uses the built-in SLA (``[mappings] sla = "defaults"``).
    Raises MappingError (exit 2) for a bad revision or an invalid mapping folder.
    Returns a JSON-ready dict (see :func:`print_impact` and the README for its shape).
    """
    now = now or utcnow()
    samples = max(0, samples)
    with (checkout(Path(mappings_dir), rev_from, sla_defaults=sla_defaults) as old,
          checkout(Path(mappings_dir), rev_to, sla_defaults=sla_defaults) as new):
        diff = _Diff(old.mappings, new.mappings, samples)
        # An SLA change (thresholds, timers, ownership) can move anyone: decide everyone.
        sla_changed = old.sla != new.sla
        with store.tx(readonly=True) as tx:
            for row in tx.iter_records():
                diff.record(row)
                if sla_changed and row.entity_id and row.kind in catalogue.ENTITY_KINDS:
                    (diff.people if row.kind == "person" else diff.deals).add(row.entity_id)
            people = sorted(_people_touched(tx, diff))
            deals = sorted(diff.deals)
            fired, unwritable = _decide(tx, new, people, deals, now, samples)
            baseline, _ = _decide(tx, old, people, deals, now, 0)
        rule_keys = sorted(set(fired) | set(baseline))
        rules_out: list[dict[str, Any]] = []
        for k in rule_keys:
            b, base = fired.get(k), baseline.get(k)
            example = (b or base).info["example"] if (b or base) is not None else ""  # type: ignore[union-attr]
            rules_out.append({"rule": k[0], "action": k[1], "count": b.count if b else 0,
                              "baseline": base.count if base else 0, "example": example,
                              "samples": b.samples if b else []})
        rules_out.sort(key=lambda r: (-(r["count"] - r["baseline"]), r["rule"], r["action"]))
        result: dict[str, Any] = {
            "from": {"rev": old.rev, "revision": old.revision},
            "to": {"rev": new.rev, "revision": new.revision},
            "records_scanned": diff.scanned,
            "records_changed": len(diff.changed),
            "people_affected": len(people),
            "deals_affected": len(deals),
            "sla_changed": sla_changed,
            "transitions": _buckets(diff.terms),
            "value_changes": _buckets(diff.values),
            "unmappable": _buckets(diff.errors),
            "rules": rules_out,
            "unwritable_writes": unwritable,
            "now": now.isoformat(),
        }
    log.info("mappings_impact", rev_from=old.revision, rev_to=new.revision,
             scanned=diff.scanned, changed=len(diff.changed), people=len(people), deals=len(deals))
    return result


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _samples(items: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{s.get('record_id') or s.get('entity_id')}"
                     + (f" ({s['email']})" if s.get("email") else "") for s in items)


def transition_line(t: Mapping[str, Any]) -> str:
    """``Salesforce Lead Status 'Working - Contacted' : connected → attempting  142 people``."""
    return (f"{SYSTEM_LABEL.get(t['system'], t['system'])} {t['object']} {t['raw_field']} "
            f"'{t['raw_value']}' : {t['old']} → {t['new']}  {t['count']} {t['unit']}")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _short(revision: str) -> str:
    """A commit's first 12 hex digits; a content hash (``sha256:…[+dirty]``) as is."""
    return revision if ":" in revision else revision[:12]


def _sys(x: Mapping[str, Any]) -> str:
    return SYSTEM_LABEL.get(x["system"], x["system"])


def format_impact(result: Mapping[str, Any]) -> str:
    """Markdown a reviewer pastes into the pull request."""
    f, t = result["from"], result["to"]
    out = [f"## Mapping impact: {f['rev']} ({_short(f['revision'])}) → "
           f"{t['rev']} ({_short(t['revision'])})",
           "",
           f"Re-mapped {result['records_scanned']} stored records (no writes, no API calls): "
           f"{result['records_changed']} change, touching {result['people_affected']} people "
           f"and {result['deals_affected']} deals.",
           ""]
    if result.get("sla_changed"):
        out += ["sla.toml changed: every person and deal in the store is decided again.", ""]
    if result["transitions"]:
        out += ["### Term changes", ""]
        out += [f"- {transition_line(x)}" for x in result["transitions"]] + [""]
        out += _table(
            ("system", "object", "raw field", "raw value", "term", "old → new", "count", "samples"),
            [(_sys(x), x["object"], x["raw_field"], f"'{x['raw_value']}'", x["term_field"],
              f"{x['old']} → {x['new']}", f"{x['count']} {x['unit']}", _samples(x["samples"]))
             for x in result["transitions"]])
    else:
        out += ["No stored record changes term.", ""]
    if result["value_changes"]:
        out += ["### Value changes", ""]
        out += _table(
            ("system", "object", "field", "raw field (old → new)", "count", "samples"),
            [(_sys(x), x["object"], x["field"], f"{x['old_raw_field']} → {x['new_raw_field']}",
              f"{x['count']} {x['unit']}", _samples(x["samples"]))
             for x in result["value_changes"]])
    if result["unmappable"]:
        out += ["### Records one side cannot map (the engine quarantines them)", ""]
        out += _table(
            ("system", "object", "unmappable under", "reason", "count", "samples"),
            [(_sys(x), x["object"], x["unmappable_under"], x["reason"], f"{x['count']} {x['unit']}",
              _samples(x["samples"])) for x in result["unmappable"]])
    if result["rules"]:
        out += ["### Rules that would then fire (new files; baseline: the same people, old files)",
                ""]
        out += _table(
            ("rule", "action", "decisions", "baseline", "example reason", "samples"),
            [(r["rule"], r["action"], r["count"], r["baseline"], mask_email(r["example"]),
              _samples(r["samples"])) for r in result["rules"]])
    if result["unwritable_writes"]:
        out += [f"**{result['unwritable_writes']} intended writes cannot be expressed by the new "
                "mappings** (they would be quarantined).", ""]
    return "\n".join(out)


def print_impact(result: Mapping[str, Any], file: IO[str] | None = None) -> None:
    (file or sys.stdout).write(format_impact(result) + "\n")
