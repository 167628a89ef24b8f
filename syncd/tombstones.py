"""``syncd tombstones``: the records the CRMs deleted, archived or merged away, as syncd knows them.

    syncd tombstones [--system S] [--object O] [--limit N] [--restored] [--json]

Read-only (the store is opened as ``status`` opens it: never written, never migrated). Per
dead record: what happened (``deleted`` or ``merged`` into which id), when the CRM says it
happened and when syncd noticed, which feed or answer told it (``source``: ``queryAll``,
``archive``, ``hs_merged_object_ids``, ``write answer``, ``re-pull``, ``reconcile``…), the
person or deal it was part of, and what became of the other side: ``marked`` (nothing written
there, the default ``[deletions] other_side``), ``propagated`` (the twins' deletes, with their
outbox state) or, for a merge, ``survivor`` (links and pending writes moved to it). With
``--restored``, records restored since (HubSpot restore, Salesforce undelete) are listed too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from syncd._json import dumps, iso
from syncd.model import utcnow

if TYPE_CHECKING:
    from syncd.config import Config
    from syncd.store import OutboxRow, TombstoneRow, Tx

__all__ = ["listing", "run_cli", "tombstone_data"]


def _other_side(t: TombstoneRow, deletes: list[OutboxRow]) -> str:
    if t.kind == "merged":
        return "survivor"
    return "propagated" if deletes else "marked"


def tombstone_data(t: TombstoneRow, deletes: list[OutboxRow]) -> dict[str, Any]:
    """One tombstone as ``syncd tombstones --json`` gives it (docs/json.md)."""
    canonical = t.canonical or {}
    values, terms = canonical.get("values") or {}, canonical.get("terms") or {}
    name = " ".join(str(x) for x in (values.get("first_name"), values.get("last_name")) if x) or values.get("name")
    return {
        "key": f"{t.system}:{t.object}:{t.record_id}", "system": t.system, "object": t.object, "id": t.record_id,
        "kind": t.kind, "merged_into": t.merged_into, "deleted_at": iso(t.deleted_at),
        "detected_at": iso(t.detected_at), "source": t.source, "entity_id": t.entity_id,
        "name": str(name) if name else None, "email": values.get("email"), "lifecycle": terms.get("lifecycle"),
        "restored_at": iso(t.restored_at), "other_side": _other_side(t, deletes),
        "twins": [{"key": f"{w.system}:{w.object}:{w.record_id}", "state": w.state, "last_error": w.last_error}
                  for w in deletes],
    }


def listing(tx: Tx, *, system: str | None, obj: str | None, limit: int, restored: bool) -> dict[str, Any]:
    """The newest ``limit`` tombstones (of ``system`` / ``obj``), and how many there are."""
    rows = tx.list_tombstones(system, limit, object=obj, include_restored=restored)
    deletes = tx.propagated_deletes([t.key for t in rows])
    return {"now": iso(utcnow()),
            "total": tx.count_tombstones(system, object=obj, include_restored=restored),
            "tombstones": [tombstone_data(t, deletes.get(t.key, [])) for t in rows]}


def _minute(at: str | None) -> str:
    return at[:16].replace("T", " ") if at else ""


def _print(data: dict[str, Any]) -> None:
    from syncd.sheet import Sheet, say, stdout_console, token

    rows = data["tombstones"]
    console = stdout_console()
    if not rows:
        say(console, "no deleted or merged records known")
        return
    t = Sheet(f"deleted or merged records: {data['total']:,} (newest {len(rows):,} shown; nothing is written to them)")
    for col in ("record", "what", "deleted at", "noticed", "source", "other side", "person"):
        token(t, col)
    for r in rows:
        what = f"merged into {r['merged_into']}" if r["kind"] == "merged" else "deleted"
        if r["restored_at"]:
            what += f", restored {_minute(r['restored_at'])}"
        other = r["other_side"]
        if r["twins"]:
            other += " (" + ", ".join(f"{w['key']} {w['state']}" for w in r["twins"]) + ")"
        t.add_row(r["key"], what, _minute(r["deleted_at"]), _minute(r["detected_at"]), r["source"], other,
                  r["name"] or r["email"] or (r["entity_id"] or "")[:8])
    t.print(console)


def run_cli(cfg: Config, *, system: str | None, obj: str | None, limit: int, restored: bool,
            as_json: bool) -> None:
    from syncd.store import open_store_readonly

    store = open_store_readonly(cfg.state_url())
    try:
        with store.tx(readonly=True) as tx:
            data = listing(tx, system=system, obj=obj, limit=limit, restored=restored)
    finally:
        store.close()
    if as_json:
        click.echo(dumps(data))
    else:
        _print(data)
