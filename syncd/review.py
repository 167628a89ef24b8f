"""The review loop: what syncd will not decide alone, listed for a person, shown, and resolved.

    syncd conflicts [show ID | resolve ID --pick SYSTEM:ID | --dismiss]
    syncd quarantine [show ID | retry ID | dismiss ID]
    syncd unmapped [show KEY [--term T] | dismiss KEY]
    syncd blocked [show ID | release ID]

Nothing here bypasses the rules: a resolution changes the inputs (a stored link, a requeued
write, a release the re-hand-off guard reads as evidence) and marks the people concerned due,
so the next cycle decides them. Every resolution is an audit row (rule ``operator``, the
operator's name in ``after.by``: ``--by`` or ``$USER``). Every command has ``--json``
(docs/json.md).
"""

from __future__ import annotations

import getpass
import json
import os
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from syncd._json import dumps, iso
from syncd.errors import ConfigError
from syncd.exits import guarded
from syncd.model import utcnow

if TYPE_CHECKING:
    from syncd.store import LinkConflictRow, QuarantineRow, RecordRow, Tx, UnmappedRow

__all__ = ["commands"]

Key = tuple[str, str, str]
NEXT = "the next cycle decides"
_Held = TypeVar("_Held", "LinkConflictRow", "QuarantineRow")


class UsageProblem(ConfigError):
    """A resolution that cannot be made as asked (an unknown id, a pick that is no candidate): exit 2."""


def operator(by: str | None) -> str:
    """Who resolves: ``--by``, else ``$USER``, else the login name."""
    if by and by.strip():
        return by.strip()
    try:
        return os.environ.get("USER") or getpass.getuser() or "unknown"
    except (OSError, KeyError):
        return "unknown"


def key_str(k: Key) -> str:
    return ":".join(k)


def _resolution(item: str, id_: int | str, action: str, by: str, audit_id: int, changed: dict[str, Any],
                next_: str) -> dict[str, Any]:
    return {"item": item, "id": id_, "action": action, "by": by, "at": iso(utcnow()), "audit_id": audit_id,
            "changed": changed, "next": next_}


# ---- link conflicts ----------------------------------------------------------------------------

def _name(r: RecordRow) -> str | None:
    v = r.canonical.get("values") or {}
    name = " ".join(str(x) for x in (v.get("first_name"), v.get("last_name")) if x)
    return name or None


def candidate_data(k: Key, r: RecordRow | None) -> dict[str, Any]:
    terms = (r.canonical.get("terms") or {}) if r is not None else {}
    values = (r.canonical.get("values") or {}) if r is not None else {}
    return {"key": key_str(k), "system": k[0], "object": k[1], "id": k[2], "in_store": r is not None,
            "entity_id": r.entity_id if r is not None else None, "name": _name(r) if r is not None else None,
            "company": values.get("company"), "lifecycle": terms.get("lifecycle"),
            "lead_status": terms.get("lead_status"), "converted": bool(values.get("is_converted")),
            "modified_at": iso(r.modified_at) if r is not None else None}


def conflict_data(tx: Tx, c: LinkConflictRow) -> dict[str, Any]:
    from syncd.conflicts import candidate_keys

    keys = candidate_keys(c)
    rows = tx.get_records(keys, with_raw=False)
    return {"id": c.id, "email": c.email_norm, "detected_at": iso(c.detected_at), "resolved_at": iso(c.resolved_at),
            "candidates": [candidate_data(k, rows.get(k)) for k in keys]}


def _unresolved(row: _Held | None, what: str, id_: int, command: str) -> _Held:
    """``row`` if it exists and is still open; else one line saying why not (exit 2)."""
    if row is None:
        raise UsageProblem(f"no {what} #{id_} (see 'syncd {command}')")
    if row.resolved_at is not None:
        raise UsageProblem(f"{what} #{id_} was already resolved at {iso(row.resolved_at)}")
    return row


def _conflict(tx: Tx, id_: int) -> LinkConflictRow:
    return _unresolved(tx.link_conflict(id_), "link conflict", id_, "conflicts")


def _picked(keys: Sequence[Key], pick: str) -> Key:
    """``SYSTEM:ID`` or ``SYSTEM:OBJECT:ID`` → the one candidate it names."""
    parts = pick.strip().split(":")
    found = [k for k in keys if (len(parts) == 2 and (k[0], k[2]) == (parts[0], parts[1]))
             or (len(parts) == 3 and k == tuple(parts))]
    if len(found) != 1:
        raise UsageProblem(f"--pick {pick}: not one of this conflict's candidates "
                           f"({', '.join(key_str(k) for k in keys)})")
    return found[0]


def _person_groups(rows: Sequence[RecordRow]) -> list[list[RecordRow]]:
    """The candidates of one system grouped into people (one entity, or a Lead and the Contact it became)."""
    from syncd.linking import _converted_pair

    groups: list[list[RecordRow]] = []
    for r in sorted(rows, key=lambda r: r.key):
        home = next((g for g in groups if any((r.entity_id and r.entity_id == o.entity_id) or _converted_pair(r, o)
                                              for o in g)), None)
        if home is None:
            groups.append([r])
        else:
            home.append(r)
    return groups


def _link_set(keys: Sequence[Key], rows: dict[Key, RecordRow], picks: Sequence[Key]) -> list[RecordRow]:
    """The records the picks say are one person: each pick, plus the one person of every
    system nothing was picked in."""
    systems = {k[0] for k in picks}
    if len(systems) != len(picks):
        raise UsageProblem("--pick: one candidate per system")
    missing = [key_str(k) for k in picks if k not in rows]
    if missing:
        raise UsageProblem(f"--pick {missing[0]}: that record is no longer in the store (a resync brings it back)")
    chosen = [rows[k] for k in picks]
    for system in sorted({k[0] for k in keys} - systems):
        groups = _person_groups([rows[k] for k in keys if k[0] == system and k in rows])
        if len(groups) > 1:
            raise UsageProblem(f"--pick: {system} has {len(groups)} candidates here too; "
                               f"pick one of them as well (--pick {system}:ID)")
        chosen += groups[0] if groups else []
    if len({r.system for r in chosen}) < 2:
        raise UsageProblem("--pick: the picked record has no candidate in the other system to link with")
    return chosen


def resolve_conflict(tx: Tx, id_: int, picks: Sequence[str], dismiss: bool, by: str) -> dict[str, Any]:
    """Pick: the chosen records become one person (a stored link, which linking keeps), due now.
    Dismiss: the candidates are different people; each is decided on its own, due now."""
    from syncd.conflicts import candidate_keys

    c = _conflict(tx, id_)
    keys = candidate_keys(c)
    rows = tx.get_records(keys, with_raw=False)
    now = utcnow()
    before = {"candidates": [key_str(k) for k in keys]}
    if dismiss:
        entities = sorted({r.entity_id for r in rows.values() if r.entity_id})
        tx.set_due_many(entities, now)
        tx.resolve_link_conflicts([c.id], now)
        after = {"action": "dismiss", "by": by, "separate": before["candidates"]}
        reason = f"link conflict #{c.id} dismissed by {by}: the candidates are different people"
        first = keys[0] if keys else ("-", "-", "")
        aid = tx.audit_resolution(system=first[0], object=first[1], record_id=first[2] or None, field="link",
                                  before=before, after=after, reason=reason, email_norm=c.email_norm, now=now)
        return _resolution("conflict", c.id, "dismiss", by, aid, {"due": entities}, f"{NEXT} each person alone")
    chosen = _link_set(keys, rows, [_picked(keys, p) for p in picks])
    entities = sorted({r.entity_id for r in chosen if r.entity_id},
                      key=lambda e: min(r.key for r in chosen if r.entity_id == e))
    keep = next((r.entity_id for r in chosen if r.entity_id and r.system != chosen[0].system), None) \
        or (entities[0] if entities else tx.new_entity("person", now=now))
    merged = [k for ks in tx.record_keys_by_entity(entities).values() for k in ks] if entities else []
    tx.set_entities({k: keep for k in {*merged, *(r.key for r in chosen)}})
    tx.set_due_many([keep], now)
    tx.resolve_link_conflicts([c.id], now)
    linked = sorted(key_str(r.key) for r in chosen)
    pick = chosen[0]
    after = {"action": "pick", "by": by, "linked": linked, "entity_id": keep}
    reason = f"link conflict #{c.id} resolved by {by}: {', '.join(linked)} are one person"
    aid = tx.audit_resolution(system=pick.system, object=pick.object, record_id=pick.id, field="link",
                              before=before, after=after, reason=reason, entity_id=keep,
                              email_norm=c.email_norm, now=now)
    return _resolution("conflict", c.id, "pick", by, aid, {"linked": linked, "entity_id": keep},
                       f"{NEXT} the linked person")


# ---- quarantine --------------------------------------------------------------------------------

def quarantine_data(tx: Tx, q: QuarantineRow) -> dict[str, Any]:
    write = None
    if q.outbox_id is not None:
        o = tx.get_outbox([q.outbox_id]).get(q.outbox_id)
        if o is not None:
            write = {"op": o.op, "rule": o.rule, "reason": o.reason, "state": o.state, "fields": o.fields,
                     "email": o.email_norm}
    return {"id": q.id, "system": q.system, "object": q.object, "record_id": q.record_id, "kind": q.kind,
            "reason": q.reason, "attempts": q.attempts, "at": iso(q.at), "resolved_at": iso(q.resolved_at),
            "outbox_id": q.outbox_id, "write": write, "raw": q.raw}


def _entry(tx: Tx, id_: int) -> QuarantineRow:
    return _unresolved(tx.quarantine_entry(id_), "quarantine entry", id_, "quarantine")


def _audit_quarantine(tx: Tx, q: QuarantineRow, action: str, by: str, reason: str) -> int:
    return tx.audit_resolution(system=q.system, object=q.object, record_id=q.record_id, field="quarantine",
                               before={"id": q.id, "kind": q.kind, "reason": q.reason},
                               after={"action": action, "by": by}, reason=reason)


def retry_write(tx: Tx, id_: int, by: str) -> tuple[dict[str, Any], str | None]:
    """A quarantined write goes back to the outbox (pending now): the next cycle sends it. A bad
    record is fetched again by a resync of that record; returns the ``SYSTEM:ID`` to resync."""
    q = _entry(tx, id_)
    if q.kind == "write" and q.outbox_id is not None:
        tx.requeue_quarantined([q.outbox_id])
        tx.resolve_quarantine([q.id])
        aid = _audit_quarantine(tx, q, "retry", by, f"quarantined write #{q.outbox_id} requeued by {by}")
        return _resolution("quarantine", q.id, "retry", by, aid, {"requeued_write": q.outbox_id},
                           "the next cycle sends the write"), None
    if not q.record_id:
        raise UsageProblem(f"quarantine entry #{q.id} names no record to fetch again: dismiss it")
    aid = _audit_quarantine(tx, q, "retry", by, f"quarantined record {q.system}:{q.record_id} retried by {by}")
    target = f"{q.system}:{q.record_id}"
    return _resolution("quarantine", q.id, "retry", by, aid, {"resync": target},
                       "the record is fetched again and mapped; it leaves quarantine once it maps"), target


def dismiss_entry(tx: Tx, id_: int, by: str) -> dict[str, Any]:
    q = _entry(tx, id_)
    changed: dict[str, Any] = {}
    if q.outbox_id is not None and tx.dismiss_write(q.outbox_id, f"dismissed by {by}"):
        changed["dismissed_write"] = q.outbox_id
    tx.resolve_quarantine([q.id])
    aid = _audit_quarantine(tx, q, "dismiss", by, f"quarantine entry #{q.id} dismissed by {by}")
    return _resolution("quarantine", q.id, "dismiss", by, aid, changed, "nothing is sent for it")


# ---- unmapped values ---------------------------------------------------------------------------

def unmapped_key(u: UnmappedRow) -> str:
    return f"{u.system}:{u.object}:{u.field}={u.value}"


def parse_unmapped_key(key: str) -> tuple[str, str, str, str]:
    head, eq, value = key.partition("=")
    parts = head.split(":")
    if not eq or len(parts) != 3 or not all(parts):
        raise UsageProblem(f"{key!r}: not SYSTEM:OBJECT:FIELD=VALUE (see 'syncd unmapped')")
    return parts[0], parts[1], parts[2], value


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


class _Fixes:
    """Where an unmapped value goes in the mapping files, and the exact line that maps it."""

    def __init__(self, mappings: Any) -> None:
        self.m = mappings
        self._lines: dict[str, list[str]] = {}

    def _file_lines(self, path: str) -> list[str]:
        if path not in self._lines:
            self._lines[path] = Path(path).read_text(encoding="utf-8").splitlines()
        return self._lines[path]

    def table(self, u: UnmappedRow) -> tuple[str, dict[str, Any], str, int] | None:
        """(term field, the value table as the file has it, file, line of its header)."""
        if (u.system, u.object) not in self.m.objects():
            return None
        tf = self.m.term_fields(u.system, u.object).get(u.field)
        if tf is None:
            return None
        path, line, _ = self.m.position(u.system, (u.object, "terms", tf, "values"))
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        tm = doc.get(u.object, {}).get("terms", {}).get(tf, {})
        return tf, tm, path, line

    def choices(self, u: UnmappedRow) -> list[dict[str, Any]]:
        found = self.table(u)
        if found is None:
            return []
        tf, tm, path, header = found
        values: dict[str, list[str]] = tm.get("values", {})
        out = []
        for term in (t.term for t in getattr(self.m.terms, tf, ())):
            if term in values:
                _, line, _ = self.m.position(u.system, (u.object, "terms", tf, "values", term))
                text = self._file_lines(path)[line - 1] if 0 < line <= len(self._file_lines(path)) else ""
                close = text.rfind("]")
                tail = text[close + 1:] if close >= 0 else ""
                toml = f"{term} = {_toml_list([*values[term], u.value])}{tail}"
                out.append({"term": term, "file": path, "line": line, "replaces": True, "toml": toml})
            else:
                out.append({"term": term, "file": path, "line": header + 1, "replaces": False,
                            "toml": f"{term} = {_toml_list([u.value])}"})
        return out

    def data(self, tx: Tx, u: UnmappedRow) -> dict[str, Any]:
        found = self.table(u)
        tf, tm, path, header = found if found is not None else (None, {}, None, None)
        section = f"{u.object}.terms.{tf}.values" if tf else None
        return {"key": unmapped_key(u), "system": u.system, "object": u.object, "field": u.field,
                "value": u.value, "count": u.count, "last_seen": iso(u.last_seen),
                "deliberate": u.value in tm.get("unmapped", []), "term_field": tf, "file": path,
                "section": section, "line": header, "samples": tx.sample_records(u.system, u.object, u.field, u.value),
                "choices": self.choices(u)}


def _unmapped(tx: Tx, key: str) -> UnmappedRow:
    u = tx.unmapped_value(*parse_unmapped_key(key))
    if u is None:
        raise UsageProblem(f"no unmapped value {key} (see 'syncd unmapped')")
    return u


def dismiss_unmapped(tx: Tx, key: str, by: str) -> dict[str, Any]:
    u = _unmapped(tx, key)
    tx.forget_unmapped(u.system, u.object, u.field, u.value)
    aid = tx.audit_resolution(system=u.system, object=u.object, record_id=None, field=u.field,
                              before={"value": u.value, "count": u.count}, after={"action": "dismiss", "by": by},
                              reason=f"unmapped {u.field} value {u.value!r} dismissed by {by}")
    return _resolution("unmapped", key, "dismiss", by, aid, {"forgotten": u.count},
                       "counted again from zero if it is seen again")


# ---- blocked re-hand-offs ----------------------------------------------------------------------

def blocked_data(tx: Tx, e: Any) -> dict[str, Any]:
    from syncd.rules import Memory

    mem = Memory.from_dict(tx.get_memory([e.entity_id]).get(e.entity_id) if e.entity_id else None)
    keys = tx.record_keys_by_entity([e.entity_id]).get(e.entity_id, []) if e.entity_id else []
    rows = tx.get_records(keys, with_raw=False)
    email = next((r.email_norm for r in rows.values() if r.email_norm), None)
    return {"id": e.id, "entity_id": e.entity_id, "email": email, "records": [key_str(k) for k in sorted(keys)],
            "blocked_at": iso(e.at), "why": mem.blocked_promotion_why or str(e.details.get("reason") or ""),
            "returned_at": iso(mem.returned_at), "return_reason": mem.return_reason,
            "release_requested_at": iso(mem.release_requested_at), "release_requested_by": mem.release_requested_by}


def _blocked(tx: Tx, id_: int) -> Any:
    e = tx.event(id_)
    if e is None or e.kind != "promotion_blocked" or e.entity_id is None:
        raise UsageProblem(f"no blocked re-hand-off #{id_} (see 'syncd blocked')")
    if not e.open:
        raise UsageProblem(f"blocked re-hand-off #{id_} is no longer blocked")
    return e


def release(tx: Tx, id_: int, by: str) -> dict[str, Any]:
    """The operator's release is new evidence for the re-hand-off guard (rule 3); due now."""
    from syncd.rules import Memory

    e = _blocked(tx, id_)
    now = utcnow()
    mem = Memory.from_dict(tx.get_memory([e.entity_id]).get(e.entity_id))
    tx.set_memory(e.entity_id, replace(mem, release_requested_at=now, release_requested_by=by).to_dict(), now=now)
    tx.set_due(e.entity_id, now)
    data = blocked_data(tx, e)
    first = data["records"][0].split(":", 2) if data["records"] else ["-", "-", ""]
    aid = tx.audit_resolution(system=first[0], object=first[1], record_id=first[2] or None, field="guard",
                              before={"blocked": data["why"], "returned_at": data["returned_at"]},
                              after={"action": "release", "by": by}, entity_id=e.entity_id,
                              email_norm=data["email"], now=now,
                              reason=f"re-hand-off released by {by} (blocked: {data['why']})")
    return _resolution("blocked", e.id, "release", by, aid, {"entity_id": e.entity_id},
                       f"{NEXT}: the release counts as new evidence for rule 3")


# ---- the commands ------------------------------------------------------------------------------

@contextmanager
def _store(obj: Any, *, readonly: bool) -> Iterator[Tx]:
    """The store in one transaction. Listing and showing never write (nor migrate: the store is
    opened read-only); resolving opens it as the service does."""
    from syncd.store import Store, open_store_readonly

    url = obj.config(credentials=False).state_url()
    store = open_store_readonly(url) if readonly else Store.open(url)
    try:
        with store.tx(readonly=readonly) as tx:
            yield tx
    finally:
        store.close()


def _run(fn: Callable[[], None]) -> None:
    guarded(fn)


def _emit(data: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        click.echo(dumps(data))
    else:
        text(data)


def _say_resolution(r: dict[str, Any]) -> None:
    click.echo(f"{r['item']} {r['id']}: {r['action']} by {r['by']} (audit #{r['audit_id']}); {r['next']}")


JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
BY = click.option("--by", default=None, help="Who resolves (default: $USER); written to the audit.")


def _listing(name: str, help_: str, lister: Callable[[Any, Tx], dict[str, Any]],
             text: Callable[[dict[str, Any]], None]) -> click.Group:
    @click.group(name=name, invoke_without_command=True, help=help_)
    @JSON
    @click.pass_context
    def group(ctx: click.Context, as_json: bool) -> None:
        if ctx.invoked_subcommand is not None:
            return

        def go() -> None:
            with _store(ctx.obj, readonly=True) as tx:
                data = {"now": iso(utcnow()), **lister(ctx.obj, tx)}
            _emit(data, as_json, text)

        _run(go)

    return group


def _show(group: click.Group, arg: click.Argument, shower: Callable[..., dict[str, Any]],
          text: Callable[[dict[str, Any]], None]) -> None:
    @group.command("show")
    @JSON
    @click.pass_obj
    def show(obj: Any, as_json: bool, **kw: Any) -> None:
        """Show one item in full."""

        def go() -> None:
            with _store(obj, readonly=True) as tx:
                data = {"now": iso(utcnow()), **shower(obj, tx, **kw)}
            _emit(data, as_json, text)

        _run(go)

    show.params.insert(0, arg)


def _resolver(group: click.Group, name: str, help_: str, arg: click.Argument,
              act: Callable[..., dict[str, Any]], extra: Sequence[click.Option] = ()) -> click.Command:
    @group.command(name, help=help_)
    @JSON
    @BY
    @click.pass_obj
    def resolve(obj: Any, as_json: bool, by: str | None, **kw: Any) -> None:
        def go() -> None:
            with _store(obj, readonly=False) as tx:
                r = act(tx, operator(by), **kw)
            _emit({"resolution": r}, as_json, _say_resolution)

        _run(go)

    resolve.params[:0] = [arg, *extra]
    return resolve


def _text_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                prose_columns: Sequence[str] = ()) -> None:
    """A :class:`~syncd.sheet.Sheet` on stdout: ids and values never split; ``prose_columns``
    (reasons) wrap between words; a narrow terminal gets one card per row."""
    from syncd.sheet import Sheet, prose, stdout_console, token

    t = Sheet(title)
    for h in headers:
        (prose if h in prose_columns else token)(t, h)
    for row in rows:
        t.add_row(*map(_cell, row))
    t.print(stdout_console())


def _cell(v: Any) -> str:
    return "—" if v is None else str(v)


def _items(data: dict[str, Any], many: str, one: str, none: str) -> list[dict[str, Any]]:
    """The listed items (``data[many]``), or the one shown (``data[one]``); says ``none`` if there are none."""
    items: list[dict[str, Any]] = data.get(many) or ([data[one]] if one in data else [])
    if not items:
        click.echo(none)
    return items


CANDIDATE_FIELDS = ("key", "name", "company", "lifecycle", "lead_status", "converted", "entity_id",
                    "modified_at", "in_store")


def _conflicts_text(data: dict[str, Any]) -> None:
    """Each conflict's candidates side by side (a column each); on a console too narrow for
    that, one card per candidate (its key and name, then its fields)."""
    from syncd.sheet import Sheet, stdout_console, token

    console = stdout_console()
    items = _items(data, "conflicts", "conflict", "no open link conflicts")
    for c in items:
        title = f"link conflict #{c['id']}: {c['email']} (since {c['detected_at'][:19]})"
        cands = c["candidates"]
        side = Sheet(title)
        for h in ["", *(f"candidate {i + 1}" for i in range(len(cands)))]:
            token(side, h)
        for f in CANDIDATE_FIELDS:
            side.add_row(f, *(_cell(cand[f]) for cand in cands))
        if side.needs() <= console.width:
            side.print(console)
            continue
        cards = Sheet(title)
        for f in CANDIDATE_FIELDS:
            token(cards, f)
        for cand in cands:
            cards.add_row(*(_cell(cand[f]) for f in CANDIDATE_FIELDS))
        cards.print(console)
    if items:
        click.echo("resolve: syncd conflicts resolve ID --pick SYSTEM:ID   (or --dismiss: different people)")


def _quarantine_text(data: dict[str, Any]) -> None:
    items = _items(data, "quarantine", "entry", "quarantine is empty")
    if not items:
        return
    _text_table("quarantine (bad records and refused writes)", ["id", "system", "object", "record", "kind",
                                                               "tries", "at", "reason"],
                [[q["id"], q["system"], q["object"], q["record_id"], q["kind"], q["attempts"], q["at"][:19],
                  q["reason"]] for q in items], prose_columns=["reason"])
    if "entry" in data:
        click.echo("raw: " + json.dumps(data["entry"]["raw"], default=str))
        if data["entry"]["write"]:
            click.echo("write: " + json.dumps(data["entry"]["write"], default=str))
    click.echo("resolve: syncd quarantine retry ID   (or dismiss ID)")


def _unmapped_text(data: dict[str, Any]) -> None:
    items = _items(data, "unmapped", "value", "no unmapped CRM values")
    if not items:
        return
    _text_table("unmapped CRM values (read as unknown, never guessed)",
                ["key", "seen", "last seen", "samples", "where to map it"],
                [[u["key"], u["count"], (u["last_seen"] or "")[:19], ", ".join(u["samples"]) or None,
                  "deliberately unmapped" if u["deliberate"] else
                  (f"{u['file']}:{u['line']} [{u['section']}]" if u["file"] else "no mapping table")]
                 for u in items], prose_columns=["samples"])
    for u in items:
        if u["deliberate"] and "value" in data:
            click.echo(f"{u['key']}: listed in `unmapped` in {u['file']} on purpose (read as unknown); "
                       "to map it, take it out of that list and add it to a term's values")
        if u["deliberate"] or not u["choices"]:
            continue
        fix = data.get("fix")
        picks = [fix] if fix else u["choices"]
        click.echo(f"{u['key']}: {'the line' if fix else 'one of these lines'} for {u['file']}:")
        for ch in picks:
            where = f"replace line {ch['line']}" if ch["replaces"] else f"add after line {ch['line'] - 1}"
            click.echo(f"  {where}:  {ch['toml']}")


def _blocked_text(data: dict[str, Any]) -> None:
    items = _items(data, "blocked", "person", "no blocked re-hand-offs")
    if not items:
        return
    _text_table("blocked re-hand-offs (returned to marketing, promotion held until new evidence)",
                ["id", "person", "records", "returned", "blocked since", "why", "release"],
                [[b["id"], b["email"], ", ".join(b["records"]), f"{(b['returned_at'] or '')[:19]} "
                  f"({b['return_reason']})", b["blocked_at"][:19], b["why"],
                  f"requested by {b['release_requested_by']}" if b["release_requested_at"] else None]
                 for b in items], prose_columns=["returned", "why", "release"])
    click.echo("resolve: syncd blocked release ID")


def _conflicts_group() -> click.Group:
    g = _listing("conflicts", "Link conflicts: one email, more than one possible match; candidates side by side.",
                 lambda _obj, tx: {"conflicts": [conflict_data(tx, c) for c in tx.open_link_conflicts()]},
                 _conflicts_text)
    _show(g, click.Argument(["conflict_id"], type=int),
          lambda _obj, tx, conflict_id: {"conflict": conflict_data(tx, _conflict(tx, conflict_id))},
          _conflicts_text)

    def act(tx: Tx, by: str, conflict_id: int, pick: tuple[str, ...], dismiss: bool) -> dict[str, Any]:
        if bool(pick) == dismiss:
            raise UsageProblem("resolve: give --pick SYSTEM:ID or --dismiss (one of them)")
        return resolve_conflict(tx, conflict_id, pick, dismiss, by)

    _resolver(g, "resolve", "Link the picked candidate (--pick SYSTEM:ID), or --dismiss: different people.",
              click.Argument(["conflict_id"], type=int), act,
              [click.Option(["--pick"], multiple=True, metavar="SYSTEM:ID", help="The record that is this person."),
               click.Option(["--dismiss"], is_flag=True, help="The candidates are different people.")])
    return g


def _quarantine_group() -> click.Group:
    g = _listing("quarantine", "Bad records and refused writes, with the CRM's or the mapping's reason.",
                 lambda _obj, tx: {"quarantine": [quarantine_data(tx, q) for q in tx.open_quarantine()]},
                 _quarantine_text)
    arg = click.Argument(["entry_id"], type=int)
    _show(g, arg, lambda _obj, tx, entry_id: {"entry": quarantine_data(tx, _entry(tx, entry_id))},
          _quarantine_text)
    _resolver(g, "dismiss", "Drop it: the write is never sent; the record stays out.", arg,
              lambda tx, by, entry_id: dismiss_entry(tx, entry_id, by))
    @g.command("retry")
    @click.argument("entry_id", type=int)
    @JSON
    @BY
    @click.pass_obj
    def retry_cmd(obj: Any, entry_id: int, as_json: bool, by: str | None) -> None:
        """A refused write goes back to the outbox (the next cycle sends it); a bad record is
        fetched again (a resync of that record: queued for a running service, else run here)."""

        def go() -> None:
            with _store(obj, readonly=False) as tx:
                r, target = retry_write(tx, entry_id, operator(by))
            if target is not None:
                from syncd.resync import ResyncRequest, resync_outcome

                r["changed"]["resync_outcome"] = resync_outcome(obj.config(), ResyncRequest(record=target),
                                                                inline=False)
            _emit({"resolution": r}, as_json, _say_resolution)

        _run(go)

    return g


def _unmapped_group() -> click.Group:
    def lister(obj: Any, tx: Tx) -> dict[str, Any]:
        fixes = _fixes(obj)
        return {"unmapped": [fixes.data(tx, u) for u in tx.unmapped_values()]}

    g = _listing("unmapped", "CRM values no mapping names: counts, sample records, and the TOML line that maps each.",
                 lister, _unmapped_text)
    key = click.Argument(["key"], metavar="SYSTEM:OBJECT:FIELD=VALUE")

    def shower(obj: Any, tx: Tx, key: str, term: str | None) -> dict[str, Any]:
        v = _fixes(obj).data(tx, _unmapped(tx, key))
        fix = None
        if term is not None:
            fix = next((c for c in v["choices"] if c["term"] == term), None)
            if fix is None:
                known = ", ".join(c["term"] for c in v["choices"]) or "none"
                raise UsageProblem(f"--term {term}: not a glossary term of {v['term_field']} (known: {known})")
        return {"value": v, "fix": fix}

    _show(g, key, shower, _unmapped_text)
    show = g.commands["show"]
    show.params.insert(1, click.Option(["--term"], default=None, help="The glossary term the value means."))
    _resolver(g, "dismiss", "Forget the value's sightings (counted again from zero when seen again).", key,
              lambda tx, by, key: dismiss_unmapped(tx, key, by))
    return g


def _fixes(obj: Any) -> _Fixes:
    """Where values go: the mapping files of the config's folder."""
    from syncd.mapping import load_mappings
    from syncd.runtime import mappings_dir

    return _Fixes(load_mappings(mappings_dir(obj.config(credentials=False))))


def _blocked_group() -> click.Group:
    g = _listing("blocked", "People returned to marketing whose re-hand-off is held until new evidence (rule 3).",
                 lambda _obj, tx: {"blocked": [blocked_data(tx, e) for e in tx.open_events("promotion_blocked")
                                               if e.entity_id]}, _blocked_text)
    arg = click.Argument(["blocked_id"], type=int)
    _show(g, arg, lambda _obj, tx, blocked_id: {"person": blocked_data(tx, _blocked(tx, blocked_id))},
          _blocked_text)
    _resolver(g, "release", "Release the guard: the next cycle takes it as new evidence and re-hands off.", arg,
              lambda tx, by, blocked_id: release(tx, blocked_id, by))
    return g


def commands() -> list[click.Command]:
    """The review commands, for syncd.cli to register."""
    return [_conflicts_group(), _quarantine_group(), _unmapped_group(), _blocked_group()]

