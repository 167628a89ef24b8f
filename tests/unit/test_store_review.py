"""The review loop's store side (syncd/store/review.py), on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from syncd._json import dumps, iso
from syncd.store import OutboxItem, RecordRow, Store

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _write(key: str) -> OutboxItem:
    return OutboxItem(key=key, system="hubspot", object="contacts", op="update", record_id="7",
                      fields={"lifecyclestage": "salesacceptedlead"}, rule="R1-forward-only", reason="r",
                      mapping_rev="abc", entity_id="e1", email_norm="ann@example.com")


def test_a_dismissed_write_is_never_requeued(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([_write("a"), _write("b")], now=T0)
        a, b = (r.id for r in tx.due("hubspot", None, T0, 10))
        for oid in (a, b):
            assert tx.mark_failed(oid, "INVALID_OPTION", T0, retriable=False, now=T0)
        qa = next(q for q in tx.open_quarantine() if q.outbox_id == a)
        assert tx.quarantine_entry(qa.id) == qa and tx.quarantine_entry(10_000) is None
        assert tx.dismiss_write(a, "dismissed by ann") is True
        assert tx.dismiss_write(a, "again") is False  # only a quarantined write
        assert tx.requeue_quarantined() == 1  # b only
        got = tx.get_outbox([a, b])
        assert (got[a].state, got[a].last_error) == ("dismissed", "dismissed by ann")
        assert got[b].state == "pending"


def test_held_items_by_id_and_a_resolution_in_the_audit(store: Store) -> None:
    with store.tx() as tx:
        cid = tx.add_link_conflict("ann@example.com", ["hubspot:contacts:7", "salesforce:Lead:00Q1"], now=T0)
        assert tx.link_conflict(cid) is not None and tx.link_conflict(cid + 1) is None
        eid = tx.add_event("promotion_blocked", "e1", {"reason": "mql (score)"}, now=T0)
        assert tx.event(eid).kind == "promotion_blocked"  # type: ignore[union-attr]
        aid = tx.audit_resolution(system="salesforce", object="Lead", record_id="00Q1", field="link",
                                  before={"candidates": ["a", "b"]}, after={"action": "pick", "by": "ann"},
                                  reason="picked by ann", email_norm="ann@example.com", now=T0)
        (row,) = tx.query_audit(rule="operator")
        assert (row.id, row.after, row.before, row.at) == (aid, {"action": "pick", "by": "ann"},
                                                            {"candidates": ["a", "b"]}, T0)


def test_unmapped_value_samples_and_forgetting(store: Store) -> None:
    v = ("hubspot", "contacts", "lifecyclestage", "partner")
    rows = [RecordRow(system="hubspot", object="contacts", id=str(i), kind="person",
                      modified_at=T0 + timedelta(minutes=i),
                      raw={"lifecyclestage": "partner" if i % 2 else "lead"},
                      canonical={"terms": {}, "values": {}, "unmapped": []}) for i in range(1, 8)]
    with store.tx() as tx:
        tx.upsert_records(rows)
        tx.count_unmapped([v, v], now=T0)
        assert tx.unmapped_value(*v).count == 2  # type: ignore[union-attr]
        assert tx.sample_records(*v) == ["7", "5", "3"]  # newest first
        assert tx.sample_records(*v, limit=10) == ["7", "5", "3", "1"]
        assert tx.forget_unmapped(*v) is True
        assert tx.unmapped_value(*v) is None and tx.forget_unmapped(*v) is False


def test_json_times_are_iso_8601_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert iso(datetime(2026, 12, 1, 7, 50, 2, 173635, tzinfo=paris)) == "2026-12-01T06:50:02.173635+00:00"
    assert iso(datetime(2026, 12, 1, 6, 50)) == "2026-12-01T06:50:00+00:00"  # naive: taken as UTC
    assert iso(None) is None
    assert json.loads(dumps({"at": T0, "ids": {"b", "a"}})) == {"at": "2026-03-01T12:00:00.123456+00:00",
                                                                 "ids": ["a", "b"]}
