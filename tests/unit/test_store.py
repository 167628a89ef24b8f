"""Contract suite of the state store: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncd.errors import ConfigError, FatalError
from syncd.model import Cursor
from syncd.store import (
    OutboxItem,
    RecordRow,
    Store,
    StoreVersionError,
    migrations,
    normalise_url,
    raw_hash,
)
from syncd.store import schema as s

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def rec(rid: str, raw: dict[str, object] | None = None, *, at: datetime = T0,
        email: str | None = None, system: str = "hubspot", obj: str = "contacts",
        entity_id: str | None = None) -> RecordRow:
    return RecordRow(system=system, object=obj, id=rid, kind="person", modified_at=at,
                     raw=raw if raw is not None else {"id": rid},
                     canonical={"terms": {"lifecycle": "lead"}, "values": {}, "unmapped": []},
                     email_norm=email, entity_id=entity_id)


def item(key: str, *, record_id: str | None = "r1", system: str = "hubspot",
         obj: str = "contacts", op: str = "update",
         canonical: dict[str, tuple[object, object]] | None = None) -> OutboxItem:
    return OutboxItem(
        key=key, system=system, object=obj, op=op, record_id=record_id,
        fields={"lifecyclestage": "marketingqualifiedlead"}, rule="score_mql",
        reason="score 80 >= 70", mapping_rev="abc123", entity_id="e1",
        email_norm="ann@example.com", clear_first=("lifecyclestage",),
        canonical=canonical if canonical is not None else {"lifecycle": ("lead", "mql")},
    )


# ------------------------------------------------------------------ open/migrate

def test_schema_version_is_recorded_and_reopen_is_idempotent(
        store: Store, open_store: Callable[[], Store]) -> None:
    assert store.schema_version() == migrations.LATEST >= 1
    again = open_store()
    assert again.schema_version() == migrations.LATEST
    with again.tx() as tx:
        assert tx.count_records() == 0


def test_a_store_newer_than_the_code_is_refused(store: Store, store_url: str) -> None:
    with store.tx() as tx:
        tx.conn.execute(sa.update(s.meta).where(s.meta.c.key == "schema_version")
                        .values(value=str(migrations.LATEST + 1)))
    with pytest.raises(StoreVersionError, match="upgrade syncd") as err:
        Store.open(store_url)
    assert f"version {migrations.LATEST + 1}" in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_a_version_1_store_is_migrated_to_the_work_queue_indexes_keeping_its_data(
        store: Store, store_url: str) -> None:
    """An existing (version 1) store gains the queue indexes on open and keeps every record."""
    with store.tx() as tx:
        tx.upsert_records([RecordRow("hubspot", "contacts", "1", "person", T0, {"a": "1"}, {"values": {}})])
        tx.conn.execute(sa.text("DROP INDEX ix_records_dirty_queue"))
        tx.conn.execute(sa.text("DROP INDEX ix_entities_due_walk"))
        tx.conn.execute(sa.text("CREATE INDEX ix_records_dirty ON records (dirty)"))  # as version 1 had it
        tx.conn.execute(sa.update(s.meta).where(s.meta.c.key == "schema_version").values(value="1"))
    store.close()
    again = Store.open(store_url)
    try:
        assert again.schema_version() == migrations.LATEST >= 2
        with again.tx() as tx:
            indexes = {ix["name"] for t in ("records", "entities") for ix in sa.inspect(tx.conn).get_indexes(t)}
            assert {"ix_records_dirty_queue", "ix_entities_due_walk"} <= indexes
            assert "ix_records_dirty" not in indexes
            assert [r.id for r in tx.dirty_records()] == ["1"]
    finally:
        again.close()


def test_taking_the_next_batch_of_either_queue_never_sorts_the_whole_queue(tmp_path: Path) -> None:
    """SQLite's plans for the dirty-record batch and the due-entity walk read an index in
    order (a temporary sort would make each batch cost the whole queue: quadratic backfills)."""
    store = Store.open(f"sqlite:///{tmp_path / 'q.db'}")
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not executemany:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, params)
            plans.append(" | ".join(str(r[-1]) for r in cursor.fetchall()))

    try:
        sa.event.listen(store.engine, "before_cursor_execute", explain)
        with store.tx() as tx:
            tx.dirty_records(limit=10)
            tx.due_batch(T0, after="", limit=10)
        sa.event.remove(store.engine, "before_cursor_execute", explain)
    finally:
        store.close()
    queue_plans = [p for p in plans if "records" in p or "entities" in p]
    assert any("ix_records_dirty_queue" in p for p in queue_plans), plans
    assert any("ix_entities_due_walk" in p for p in queue_plans), plans
    assert not any("TEMP B-TREE" in p for p in queue_plans), plans


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "state.db"
    path.parent.mkdir()
    old = os.umask(0o022)
    try:
        store = Store.open(f"sqlite:///{path}")
        with store.tx() as tx:
            tx.upsert_records([rec("1")])
            journal = tx.conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = tx.conn.exec_driver_sql("PRAGMA synchronous").scalar()
            fks = tx.conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
            busy = tx.conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (journal, sync, fks) == ("wal", 2, 1)  # synchronous 2 = FULL by default (issue 14)
    assert busy and busy > 0
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent


def test_analyze_gives_the_planner_statistics(store: Store) -> None:
    with store.tx() as tx:
        tx.upsert_records([rec(str(i)) for i in range(50)])
    store.analyze()
    with store.tx() as tx:
        if store.dialect == "postgresql":
            rows = tx.conn.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'records'::regclass").scalar()
        else:
            rows = tx.conn.exec_driver_sql(
                "SELECT stat FROM sqlite_stat1 WHERE tbl = 'records' AND idx IS NULL"
                " OR tbl = 'records' AND idx LIKE 'sqlite_autoindex_records%'").scalar()
            rows = int(str(rows).split()[0])
        assert rows == 50


def test_an_unusable_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        Store.open(f"sqlite:///{tmp_path / 'file' / 'state.db'}")
    with pytest.raises(FatalError, match=r"state store .*127\.0\.0\.1:1/x unreachable") as err:
        Store.open("postgresql://syncd:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(err.value)


def test_urls_are_normalised_and_bad_ones_refused() -> None:
    assert normalise_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:////var/x.db") == "sqlite:////var/x.db"
    for bad in ("mysql://u@h/db", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match=r"\[state\] url"):
            normalise_url(bad)


# --------------------------------------------------------------------- records

def test_upsert_returns_new_and_changed_rows_only(store: Store) -> None:
    with store.tx() as tx:
        changed = tx.upsert_records([rec("1"), rec("2")])
        assert sorted(r.id for r in changed) == ["1", "2"]
        assert all(r.dirty for r in changed)
        tx.clear_dirty([r.key for r in changed])

    with store.tx() as tx:  # overlap re-read: identical rows are ignored, not dirtied
        assert tx.upsert_records([rec("1"), rec("2")]) == []
        assert tx.count_records(dirty=True) == 0

    with store.tx() as tx:
        later = T0 + timedelta(minutes=1)
        changed = tx.upsert_records([rec("1", {"id": "1", "x": 2}, at=later), rec("2")])
        assert [r.id for r in changed] == ["1"]
        assert [r.id for r in tx.dirty_records(10)] == ["1"]
        stored = tx.get_records([("hubspot", "contacts", "1")])[("hubspot", "contacts", "1")]
        assert stored.raw == {"id": "1", "x": 2}
        assert stored.modified_at == later
        assert stored.raw_hash == raw_hash({"x": 2, "id": "1"})


def test_upsert_ignores_an_older_version_and_keeps_the_link(store: Store) -> None:
    with store.tx() as tx:
        tx.upsert_records([rec("1", {"v": 2}, at=T0, entity_id="e-1")])
        tx.clear_dirty([("hubspot", "contacts", "1")])
        assert tx.upsert_records([rec("1", {"v": 1}, at=T0 - timedelta(seconds=1))]) == []
        changed = tx.upsert_records([rec("1", {"v": 3}, at=T0)])  # no entity given
        assert changed[0].entity_id == "e-1"
        got = tx.get_records([("hubspot", "contacts", "1")])[("hubspot", "contacts", "1")]
        assert (got.raw, got.entity_id, got.dirty) == ({"v": 3}, "e-1", True)


def test_upsert_keeps_the_last_duplicate_within_one_batch(store: Store) -> None:
    with store.tx() as tx:
        changed = tx.upsert_records([rec("1", {"v": 1}), rec("1", {"v": 2})])
        assert [r.raw for r in changed] == [{"v": 2}]
        assert tx.count_records() == 1


def test_bulk_reads_by_key_email_and_entity(store: Store) -> None:
    n = 1234  # more than one IN-list chunk
    rows = [rec(str(i), email=f"p{i % 10}@example.com") for i in range(n)]
    rows.append(rec("003X", system="salesforce", obj="Lead", email="p1@example.com"))
    with store.tx() as tx:
        assert len(tx.upsert_records(rows)) == n + 1
        keys = [r.key for r in rows] + [("hubspot", "contacts", "missing")]
        got = tx.get_records(keys)
        assert len(got) == n + 1 and ("hubspot", "contacts", "missing") not in got
        assert got[("hubspot", "contacts", "7")].email_norm == "p7@example.com"

        by_email = tx.records_by_email(["p1@example.com", "nobody@example.com"])
        assert set(by_email) == {"p1@example.com"}
        assert len(by_email["p1@example.com"]) == len(range(1, n, 10)) + 1
        assert {"salesforce", "hubspot"} == {r.system for r in by_email["p1@example.com"]}

        tx.set_entity([("hubspot", "contacts", "5"), ("salesforce", "Lead", "003X")], "e-5")
        by_entity = tx.records_by_entity(["e-5", "e-none"])
        assert sorted(r.id for r in by_entity["e-5"]) == ["003X", "5"]
        assert "e-none" not in by_entity


def test_key_lists_of_any_length_read_exactly_their_rows_with_few_statement_texts(store: Store) -> None:
    # SQLite: IN lists are padded to powers of two so the driver's prepared-statement cache
    # does not fill with one large statement per list length (memory of a backfill).
    with store.tx() as tx:
        tx.upsert_records([rec(str(i), entity_id=f"e{i}") for i in range(70)])
    texts: set[str] = set()

    def seen(conn: object, cursor: object, statement: str, *rest: object) -> None:
        texts.add(statement)

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    try:
        with store.tx() as tx:
            for n in range(1, 70):
                keys = [("hubspot", "contacts", str(i)) for i in range(n)] + [("hubspot", "contacts", "none")]
                assert sorted(tx.get_records(keys)) == sorted(keys[:-1])
                by_entity = tx.records_by_entity([f"e{i}" for i in range(n)])
                assert sorted(by_entity) == sorted(f"e{i}" for i in range(n))
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", seen)
    if store.dialect == "sqlite":
        assert len(texts) <= 2 * 8  # two queries, lengths 2..70 -> 8 powers of two


def test_dirty_records_clear_dirty_iter_and_count(store: Store) -> None:
    with store.tx() as tx:
        tx.upsert_records([rec(str(i)) for i in range(5)], now=T0)
        tx.upsert_records([rec("a", system="salesforce", obj="Lead")],
                          now=T0 + timedelta(seconds=1))
        assert len(tx.dirty_records(limit=3)) == 3
        assert tx.dirty_records(limit=10)[-1].id == "a"  # oldest change first
        tx.clear_dirty([("hubspot", "contacts", "0"), ("hubspot", "contacts", "1")])
        assert tx.count_records(dirty=True) == 4
        assert tx.count_records(system="hubspot") == 5
        assert tx.count_records(system="salesforce", object="Lead") == 1

        streamed = list(tx.iter_records(batch=2))
        assert [r.key for r in streamed] == sorted(r.key for r in streamed)
        assert len(streamed) == 6
        assert [r.id for r in tx.iter_records(system="hubspot", batch=2)] == list("01234")
        assert [r.id for r in tx.iter_records(object="Lead", batch=2)] == ["a"]


def test_datetimes_round_trip_exactly_as_utc(store: Store) -> None:
    paris = timezone(timedelta(hours=1))
    at = datetime(2026, 3, 1, 13, 0, 0, 999999, tzinfo=paris)
    with store.tx() as tx:
        tx.upsert_records([rec("1", at=at)])
        got = tx.get_records([("hubspot", "contacts", "1")])[("hubspot", "contacts", "1")]
    assert got.modified_at == at
    assert got.modified_at.utcoffset() == timedelta(0)
    with pytest.raises(sa.exc.StatementError, match="tz-aware"), store.tx() as tx:
        tx.upsert_records([rec("2", at=datetime(2026, 1, 1))])


# ------------------------------------------------------------- atomicity/kill -9

def test_an_exception_in_a_page_transaction_changes_nothing(store: Store) -> None:
    with store.tx() as tx:
        tx.set_cursor("hubspot", "contacts", Cursor(T0, "1"))

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.tx() as tx:
        tx.upsert_records([rec("1"), rec("2")])
        assert tx.enqueue([item("k1")]) == 1
        tx.set_cursor("hubspot", "contacts", Cursor(T0 + timedelta(hours=1), "2"))
        raise Boom

    with store.tx() as tx:
        assert tx.count_records() == 0
        assert tx.outbox_depth() == 0
        assert tx.get_cursor("hubspot", "contacts") == Cursor(T0, "1")


def test_a_committed_outbox_survives_kill_9(store: Store, store_url: str) -> None:
    code = (
        "import os, signal, sys\n"
        "from syncd.store import Store, OutboxItem\n"
        "st = Store.open(sys.argv[1])\n"
        "with st.tx() as tx:\n"
        "    tx.enqueue([OutboxItem(key='k', system='hubspot', object='contacts', op='update',"
        " record_id='1', fields={'a': 1}, rule='r', reason='why', mapping_rev='m')])\n"
        "tx2 = st.tx(); t = tx2.__enter__()\n"
        "t.enqueue([OutboxItem(key='uncommitted', system='hubspot', object='contacts',"
        " op='update', record_id='2', fields={}, rule='r', reason='w', mapping_rev='m')])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, store_url], capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    with store.tx() as tx:
        due = tx.due("hubspot", None, datetime.now(UTC) + timedelta(seconds=1))
    assert [o.key for o in due] == ["k"]


def test_a_readonly_scan_does_not_block_the_writer(
        store: Store, open_store: Callable[[], Store]) -> None:
    with store.tx() as tx:
        tx.upsert_records([rec(str(i)) for i in range(10)])
    writer = open_store()
    with store.tx(readonly=True) as reader:
        scan = reader.iter_records(batch=3)
        first = next(scan)
        with writer.tx() as tx:  # another daemon writes while the scan is open
            tx.upsert_records([rec("new")])
            tx.set_cursor("hubspot", "contacts", Cursor(T0, "9"))
        assert [first.id, *(r.id for r in scan)] == [str(i) for i in range(10)]  # snapshot
    with store.tx() as tx:
        assert tx.count_records() == 11


def test_a_readonly_transaction_refuses_writes_on_postgresql(store: Store) -> None:
    if store.dialect != "postgresql":
        pytest.skip("SQLite read-only transactions are a locking mode, not enforced")
    with pytest.raises(sa.exc.InternalError, match="read-only"), store.tx(readonly=True) as tx:
        tx.upsert_records([rec("1")])


# --------------------------------------------------------------------- entities

def test_entities_and_their_memory(store: Store) -> None:
    with store.tx() as tx:
        eid = tx.new_entity("person")
        other = tx.new_entity("deal", memory={"stage": "exploration"})
        assert eid != other and len(eid) == 36
        tx.set_memory(eid, {"returned_at": "2026-03-01", "score_at_return": 40})
        assert tx.get_memory([eid, other, "nope"]) == {
            eid: {"returned_at": "2026-03-01", "score_at_return": 40},
            other: {"stage": "exploration"},
        }
        with pytest.raises(KeyError):
            tx.set_memory("nope", {})
        with pytest.raises(ValueError):
            tx.new_entity("company")


def test_due_timers_of_entities(store: Store) -> None:
    with store.tx() as tx:
        a, b, c = tx.new_entity("person"), tx.new_entity("person"), tx.new_entity("person")
        tx.set_due(a, T0 + timedelta(hours=24))
        tx.set_due(b, T0 + timedelta(hours=1))
        assert tx.due_entities(T0) == []
        assert tx.due_entities(T0 + timedelta(hours=1)) == [b]
        assert tx.due_entities(T0 + timedelta(days=2)) == [b, a]
        assert tx.due_entities(T0 + timedelta(days=2), limit=1) == [b]
        tx.set_due(b, None)
        assert tx.due_entities(T0 + timedelta(days=2)) == [a]
        assert c not in tx.due_entities(T0 + timedelta(days=999))


def test_referrers_follow_the_refs_of_deals_and_attempts(store: Store) -> None:
    deal = RecordRow(system="salesforce", object="Opportunity", id="006A", kind="deal",
                     modified_at=T0, raw={"Name": "Big"}, canonical={})
    task = RecordRow(system="salesforce", object="Task", id="00TA", kind="attempt",
                     modified_at=T0, raw={"WhoId": "003A"}, canonical={})
    other = RecordRow(system="hubspot", object="deals", id="9", kind="deal",
                      modified_at=T0, raw={}, canonical={})
    with store.tx() as tx:
        tx.upsert_records([deal, task, other])
        tx.set_refs(deal.key, ["003A", "003B", "003A"])
        tx.set_refs(task.key, ["003A"])
        tx.set_refs(other.key, ["003A"])  # same id string, other system
        assert [r.id for r in tx.referrers("salesforce", ["003A", "003B"])] == ["006A", "00TA"]
        assert [r.id for r in tx.deals_of_people("salesforce", ["003B"])] == ["006A"]
        assert [r.id for r in tx.referrers("salesforce", ["003A"], kind="attempt")] == ["00TA"]
        tx.set_refs(deal.key, ["003C"])  # replaced, not added
        assert tx.deals_of_people("salesforce", ["003A", "003B"]) == []
        assert [r.id for r in tx.deals_of_people("hubspot", ["003A"])] == ["9"]
        tx.set_refs(deal.key, [])
        assert tx.referrers("salesforce", ["003C"]) == []


def test_link_conflicts_are_reported_once_until_resolved(store: Store) -> None:
    with store.tx() as tx:
        a = tx.add_link_conflict("ann@example.com", [["salesforce", "Lead", "1"]])
        b = tx.add_link_conflict("ann@example.com", [["salesforce", "Lead", "1"],
                                                     ["salesforce", "Contact", "2"]])
        assert a == b
        (c,) = tx.open_link_conflicts()
        assert len(c.candidates) == 2
        tx.resolve_link_conflicts([a])
        assert tx.open_link_conflicts() == []
        assert tx.add_link_conflict("ann@example.com", []) != a


# ---------------------------------------------------------------------- cursors

def test_cursor_never_moves_backwards_but_can_be_reset(store: Store) -> None:
    with store.tx() as tx:
        assert tx.get_cursor("hubspot", "contacts") is None
        assert tx.set_cursor("hubspot", "contacts", Cursor(T0, "5")) == Cursor(T0, "5")
        assert tx.set_cursor("hubspot", "contacts", Cursor(T0 - timedelta(1), "9")) \
            == Cursor(T0, "5")
        tx.set_cursor("hubspot", "contacts", Cursor(T0, "4"))  # same time, lower id
        assert tx.get_cursor("hubspot", "contacts") == Cursor(T0, "5")
        tx.set_cursor("hubspot", "contacts", Cursor(T0, "6"))
        assert tx.get_cursor("hubspot", "contacts") == Cursor(T0, "6")
        assert tx.get_cursor("salesforce", "Lead") is None  # per system and object

        tx.reset_cursor("hubspot", "contacts", Cursor(T0 - timedelta(days=7), ""))
        assert tx.get_cursor("hubspot", "contacts") == Cursor(T0 - timedelta(days=7), "")
        tx.reset_cursor("hubspot", "contacts", None)
        assert tx.get_cursor("hubspot", "contacts") is None
        tx.reset_cursor("salesforce", "Lead", Cursor(T0, "x"))  # creates too
        assert tx.get_cursor("salesforce", "Lead") == Cursor(T0, "x")


# ------------------------------------------------------------------------- runs

def test_runs_are_recorded_most_recent_first(store: Store) -> None:
    with store.tx() as tx:
        r1 = tx.start_run("sync", now=T0)
        r2 = tx.start_run("sync", now=T0 + timedelta(minutes=5))
        r3 = tx.start_run("resync", now=T0 + timedelta(minutes=6))
        tx.finish_run(r1, "ok", {"pulled": 10}, now=T0 + timedelta(minutes=1))
        tx.finish_run(r2, "failed", {}, error="hubspot: 401", now=T0 + timedelta(minutes=6))
        with pytest.raises(ValueError):
            tx.finish_run(r3, "great", {})
        assert tx.interrupt_running(now=T0 + timedelta(minutes=7)) == 1

        runs = tx.last_runs()
        assert [r.run_id for r in runs] == [r3, r2, r1]
        assert [r.status for r in runs] == ["interrupted", "failed", "ok"]
        assert runs[2].stats == {"pulled": 10} and runs[1].error == "hubspot: 401"
        assert [r.run_id for r in tx.last_runs(limit=1, job="sync")] == [r2]


# ----------------------------------------------------------------------- outbox

def test_enqueue_ignores_known_keys_in_any_state(store: Store) -> None:
    now = T0
    with store.tx() as tx:
        assert tx.enqueue([item("k1"), item("k2"), item("k1")], now=now) == 2
        assert tx.enqueue([item("k1")], now=now) == 0  # pending: ignored
        (k1, _) = tx.due("hubspot", "contacts", now, 10)
        tx.mark_sending([k1.id])
        assert tx.mark_done(k1.id, now=now)
        assert tx.enqueue([item("k1"), item("k3")], now=now) == 1  # done: still ignored
        assert [o.key for o in tx.due("hubspot", None, now, 10)] == ["k2", "k3"]
        with pytest.raises(ValueError):
            tx.enqueue([item("k4", record_id=None)])  # an update needs its target


def test_due_respects_time_system_object_order_and_limit(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([item("a"), item("b", system="salesforce", obj="Lead"), item("c"),
                    item("d", obj="deals")], now=T0)
        assert [o.key for o in tx.due("hubspot", None, T0, 10)] == ["a", "c", "d"]
        assert [o.key for o in tx.due("hubspot", "contacts", T0, 10)] == ["a", "c"]
        assert [o.key for o in tx.due("hubspot", None, T0, 1)] == ["a"]
        assert tx.due("hubspot", None, T0 - timedelta(microseconds=1), 10) == []

        a = tx.due("hubspot", "contacts", T0, 1)[0]
        assert (a.fields, a.clear_first, a.canonical) == (
            {"lifecyclestage": "marketingqualifiedlead"}, ("lifecyclestage",),
            {"lifecycle": ["lead", "mql"]})
        tx.mark_sending([a.id])  # a crash mid-send: still due, attempt counted
        again = tx.due("hubspot", "contacts", T0, 1)[0]
        assert (again.id, again.state, again.attempts) == (a.id, "sending", 1)
        assert tx.outbox_depth() == 4 and tx.outbox_depth("salesforce") == 1


def test_mark_done_writes_the_audit_exactly_once(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([item("k", canonical={"lifecycle": ("lead", "mql"),
                                         "lead_status": ("new", None)})], now=T0)
        (o,) = tx.due("hubspot", None, T0, 10)
        tx.mark_sending([o.id])
        assert tx.mark_done(o.id, now=T0 + timedelta(seconds=1)) is True
        assert tx.mark_done(o.id) is False
        assert tx.mark_skipped(o.id, "already") is False
        assert tx.outbox_depth() == 0
        audit = tx.query_audit()
        assert [(a.field, a.before, a.after) for a in audit] == [
            ("lead_status", "new", None), ("lifecycle", "lead", "mql")]
        a = audit[0]
        assert (a.record_id, a.rule, a.reason, a.mapping_rev, a.outbox_id, a.email_norm,
                a.entity_id, a.at) == ("r1", "score_mql", "score 80 >= 70", "abc123", o.id,
                                       "ann@example.com", "e1", T0 + timedelta(seconds=1))
        assert tx.get_outbox([o.id])[o.id].state == "done"


def test_a_create_is_audited_against_the_new_record_id(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([item("c", op="create", record_id=None, system="salesforce", obj="Lead")],
                   now=T0)
        (o,) = tx.due("salesforce", "Lead", T0, 10)
        tx.mark_done(o.id, result_id="00Q1", now=T0)
        assert tx.get_outbox([o.id])[o.id].result_id == "00Q1"
        assert [a.record_id for a in tx.query_audit(system="salesforce")] == ["00Q1"]


def test_mark_skipped_is_not_audited(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([item("k")], now=T0)
        (o,) = tx.due("hubspot", None, T0, 10)
        assert tx.mark_skipped(o.id, "target already holds the value", now=T0)
        got = tx.get_outbox([o.id])[o.id]
        assert (got.state, got.last_error) == ("skipped", "target already holds the value")
        assert tx.query_audit() == [] and tx.outbox_depth() == 0


def test_transient_failures_back_off_for_ever_permanent_ones_quarantine_at_once(store: Store) -> None:
    """A retriable failure (5xx, timeout) goes back to pending however often it failed, and is
    reported by ``failing_writes`` past the threshold; a permanent one is quarantined at once
    and its person marked due (decided again on what is true now)."""
    with store.tx() as tx:
        tx.enqueue([item("k")], now=T0)
        tx.add_entities({"e1": "person"}, now=T0)
        (o,) = tx.due("hubspot", None, T0, 10)
        retry_at = T0 + timedelta(minutes=1)
        for attempt in range(1, 8):
            tx.mark_sending([o.id])
            assert tx.mark_failed(o.id, f"503 try {attempt}", retry_at, retriable=True) is False
            assert tx.due("hubspot", None, retry_at - timedelta(seconds=1), 10) == []
            got = tx.due("hubspot", None, retry_at, 10)[0]
            assert (got.state, got.attempts, got.last_error) == ("pending", attempt,
                                                                 f"503 try {attempt}")
            assert tx.count_failing_writes(5) == (1 if attempt >= 5 else 0)
        assert [r.id for r in tx.failing_writes(5)] == [o.id]
        assert tx.open_quarantine() == [] and tx.outbox_depth() == 1
        assert tx.due_entities(T0 + timedelta(days=1)) == []

        # not marked sending: the failure counts as the attempt itself
        assert tx.mark_failed(o.id, "INVALID_FIELD", retry_at, retriable=False, now=T0) is True
        assert tx.due("hubspot", None, retry_at + timedelta(days=1), 10) == []
        assert tx.outbox_depth() == 0 and tx.count_failing_writes(1) == 0
        (q,) = tx.open_quarantine()
        assert (q.kind, q.outbox_id, q.reason, q.record_id, q.attempts) == (
            "write", o.id, "INVALID_FIELD", "r1", 8)
        assert tx.due_entities(T0) == ["e1"]  # decided again
        assert tx.mark_failed(o.id, "again", retry_at, retriable=False) is False

        assert tx.requeue_quarantined(system="salesforce") == 0
        assert tx.requeue_quarantined(now=T0) == 1
        back = tx.due("hubspot", None, T0, 10)[0]
        assert (back.id, back.state, back.attempts) == (o.id, "pending", 0)
        assert tx.open_quarantine() == []


def test_due_tells_first_sends_from_resends(store: Store) -> None:
    """``OutboxRow.resend``: the CRM may already hold the write (creates look it up first)."""
    retry_at = T0 + timedelta(minutes=1)
    with store.tx() as tx:
        tx.enqueue([item("crashed"), item("failed"), item("requeued"), item("fresh")], now=T0)
        rows = {o.key: o for o in tx.due("hubspot", None, T0, 10)}
        assert not any(o.resend for o in rows.values())  # never handed out
        tx.mark_sending([rows[k].id for k in ("crashed", "failed", "requeued")])
        # crashed: left sending. failed: a timeout, back to pending. requeued: quarantined
        # (a permanent error), then requeued by the operator (attempts reset to 0).
        tx.mark_failed(rows["failed"].id, "timeout", T0, retriable=True)
        assert tx.mark_failed(rows["requeued"].id, "INVALID_FIELD", T0, retriable=False) is True
        assert tx.requeue_quarantined(now=T0) == 1
        again = {o.key: o for o in tx.due("hubspot", None, retry_at, 10)}
        assert {k: (o.state, o.attempts, o.resend) for k, o in again.items()} == {
            "crashed": ("sending", 1, True), "failed": ("pending", 1, True),
            "requeued": ("pending", 0, True), "fresh": ("pending", 0, False)}


# ------------------------------------------------------------------------ audit

def test_query_audit_filters_and_orders_by_time(store: Store) -> None:
    with store.tx() as tx:
        tx.enqueue([item("a"), item("b", system="salesforce", obj="Lead"),
                    OutboxItem(key="c", system="hubspot", object="contacts", op="update",
                               record_id="r9", fields={}, rule="returned", reason="3 attempts",
                               mapping_rev="m", email_norm="bob@example.com",
                               canonical={"lead_status": ("attempting", "returned_not_ready")})],
                   now=T0)
        ids = {o.key: o.id for o in tx.due("hubspot", None, T0, 10)}
        ids |= {o.key: o.id for o in tx.due("salesforce", None, T0, 10)}
        tx.mark_done(ids["c"], now=T0 + timedelta(hours=2))
        tx.mark_done(ids["b"], now=T0 + timedelta(hours=1))
        tx.mark_done(ids["a"], now=T0 + timedelta(hours=3))

        assert [a.outbox_id for a in tx.query_audit()] == [ids["b"], ids["c"], ids["a"]]
        assert [a.record_id for a in tx.query_audit(email="bob@example.com")] == ["r9"]
        assert [a.rule for a in tx.query_audit(record_id="r9")] == ["returned"]
        assert [a.outbox_id for a in tx.query_audit(rule="score_mql", system="hubspot")] == [
            ids["a"]]
        window = tx.query_audit(since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=3))
        assert [a.outbox_id for a in window] == [ids["c"]]
        assert len(tx.query_audit(limit=2)) == 2


# ------------------------------------------------ quarantine, unmapped, events

def test_quarantined_records_are_kept_once_until_resolved(store: Store) -> None:
    with store.tx() as tx:
        a = tx.quarantine_record("salesforce", "Lead", "00Q1", "bad date", raw={"x": 1}, now=T0)
        b = tx.quarantine_record("salesforce", "Lead", "00Q1", "still bad", raw={"x": 2}, now=T0)
        c = tx.quarantine_record("hubspot", "contacts", "7", "no id", now=T0)
        assert a == b != c
        open_ = tx.open_quarantine()
        assert [(q.record_id, q.reason, q.raw, q.attempts) for q in open_] == [
            ("00Q1", "still bad", {"x": 2}, 2), ("7", "no id", None, 1)]
        assert [q.id for q in tx.open_quarantine(system="hubspot")] == [c]
        assert tx.resolve_quarantine([a]) == 1
        assert [q.id for q in tx.open_quarantine()] == [c]


def test_unmapped_values_are_counted_in_bulk(store: Store) -> None:
    v = ("hubspot", "contacts", "lifecyclestage", "partner")
    w = ("salesforce", "Lead", "Status", "Cold")
    with store.tx() as tx:
        tx.count_unmapped([v, v, w], now=T0)
        tx.count_unmapped([v], now=T0 + timedelta(hours=1))
        tx.count_unmapped([])
        rows = tx.unmapped_values()
        assert [(r.value, r.count) for r in rows] == [("partner", 3), ("Cold", 1)]
        assert rows[0].last_seen == T0 + timedelta(hours=1)
        assert [r.value for r in tx.unmapped_values(system="salesforce")] == ["Cold"]


def test_sla_events_are_deduplicated_while_open(store: Store) -> None:
    with store.tx() as tx:
        a = tx.add_event("sla_breach", "e1", {"hours": 25}, now=T0)
        assert tx.add_event("sla_breach", "e1", {"hours": 26}, now=T0) == a
        b = tx.add_event("sla_breach", "e2", {}, now=T0 + timedelta(seconds=1))
        c = tx.add_event("returned", "e1", {"reason": "3 attempts"}, now=T0)
        d = tx.add_event("conflict", "e1", {}, now=T0, dedupe=False)
        assert len({a, b, c, d}) == 4
        assert [e.id for e in tx.open_events("sla_breach")] == [a, b]
        assert tx.open_events("sla_breach")[0].details == {"hours": 25}
        tx.close_events([a])
        assert [e.id for e in tx.open_events("sla_breach")] == [b]
        assert tx.add_event("sla_breach", "e1", {}, now=T0) not in (a, b, c, d)
        assert len(tx.open_events()) == 4  # b, c, d and the new breach


# ------------------------------------------------------------- resync + leases

def test_resync_queue_lifecycle(store: Store) -> None:
    with store.tx() as tx:
        first = tx.queue_resync({"object": "contacts", "since": "2026-01-01"}, now=T0)
        second = tx.queue_resync({"full": True}, now=T0)
        got = tx.claim_resync("daemon-a", now=T0)
        assert got is not None
        assert (got.id, got.state, got.picked_by, got.params) == (
            first, "running", "daemon-a", {"object": "contacts", "since": "2026-01-01"})
        tx.finish_resync(first, "done", {"pulled": 12}, now=T0)
        assert [(r.id, r.state) for r in tx.resync_queue()] == [(second, "queued")]
        everything = tx.resync_queue(include_finished=True)
        assert [(r.id, r.state, r.result) for r in everything] == [
            (first, "done", {"pulled": 12}), (second, "queued", None)]
        assert tx.claim_resync("daemon-b", now=T0).id == second  # type: ignore[union-attr]
        assert tx.claim_resync("daemon-b", now=T0) is None
        with pytest.raises(ValueError):
            tx.finish_resync(second, "queued")


def test_a_resync_left_running_by_a_dead_daemon_is_requeued(store: Store) -> None:
    with store.tx() as tx:
        rid = tx.queue_resync({"full": True}, now=T0)
        tx.claim_resync("dead-daemon", now=T0)
        assert tx.claim_resync("live-daemon", now=T0) is None
        assert tx.requeue_stale_resyncs(picked_before=T0) == 0
        assert tx.requeue_stale_resyncs(picked_before=T0 + timedelta(minutes=10)) == 1
        got = tx.claim_resync("live-daemon", now=T0 + timedelta(minutes=10))
        assert got is not None and (got.id, got.picked_by) == (rid, "live-daemon")


def _race(n_threads: int, work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_two_daemons_never_claim_the_same_resync(
        store: Store, open_store: Callable[[], Store]) -> None:
    n = 40
    with store.tx() as tx:
        for i in range(n):
            tx.queue_resync({"i": i})
    stores = [store, open_store()]
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        st, owner = stores[i % 2], f"daemon-{i}"
        while True:
            with st.tx() as tx:
                got = tx.claim_resync(owner)
            if got is None:
                return
            with lock:
                claims.append((owner, got.id))

    _race(6, work)
    ids = [rid for _, rid in claims]
    assert len(ids) == n and len(set(ids)) == n
    with store.tx() as tx:
        assert {(r.picked_by, r.id) for r in tx.resync_queue()} == set(claims)


def test_lease_acquire_renew_release_and_expiry(store: Store) -> None:
    with store.tx() as tx:
        assert tx.acquire_lease("sync:hubspot", "a", 30, T0)
        assert not tx.acquire_lease("sync:hubspot", "b", 30, T0 + timedelta(seconds=29))
        assert tx.acquire_lease("sync:hubspot", "a", 30, T0 + timedelta(seconds=10))  # ours
        assert tx.lease_holder("sync:hubspot", T0 + timedelta(seconds=39)) == "a"
        assert tx.renew_lease("sync:hubspot", "a", 30, T0 + timedelta(seconds=20))
        assert not tx.renew_lease("sync:hubspot", "b", 30, T0)
        assert not tx.acquire_lease("sync:hubspot", "b", 30, T0 + timedelta(seconds=49))
        assert tx.acquire_lease("sync:hubspot", "b", 30, T0 + timedelta(seconds=50))  # expired
        assert not tx.renew_lease("sync:hubspot", "a", 30, T0 + timedelta(seconds=51))
        assert tx.lease_holder("sync:hubspot", T0 + timedelta(seconds=51)) == "b"
        assert not tx.release_lease("sync:hubspot", "a")
        assert tx.release_lease("sync:hubspot", "b")
        assert tx.lease_holder("sync:hubspot", T0) is None
        assert tx.acquire_lease("sync:hubspot", "a", 30, T0)


def test_two_daemons_never_hold_the_same_lease(
        store: Store, open_store: Callable[[], Store]) -> None:
    rounds = 15
    stores = [store, open_store()]
    winners: dict[str, list[str]] = {f"lease-{r}": [] for r in range(rounds)}
    lock = threading.Lock()

    def work(i: int) -> None:
        st, owner = stores[i % 2], f"daemon-{i}"
        for name in winners:
            with st.tx() as tx:
                won = tx.acquire_lease(name, owner, 60, T0)
            if won:
                with lock:
                    winners[name].append(owner)

    _race(6, work)
    assert all(len(w) == 1 for w in winners.values()), winners
    with store.tx() as tx:
        for name, (owner,) in winners.items():
            assert tx.lease_holder(name, T0) == owner


# -------------------------------------------------------------------- heartbeat

def test_heartbeat_tells_a_service_is_running(store: Store) -> None:
    with store.tx() as tx:
        tx.beat("host-1:123", {"version": "0.1"}, now=T0, pid=123)
        tx.beat("host-1:123", {"version": "0.1", "cycle": 2}, now=T0 + timedelta(minutes=1),
                pid=123)
        tx.beat("host-2:9", now=T0 - timedelta(hours=1), pid=9)
        (alive,) = tx.heartbeats(seen_since=T0)
        assert (alive.owner, alive.started_at, alive.seen_at, alive.pid, alive.info) == (
            "host-1:123", T0, T0 + timedelta(minutes=1), 123, {"version": "0.1", "cycle": 2})
        assert [h.owner for h in tx.heartbeats()] == ["host-1:123", "host-2:9"]
        tx.remove_heartbeat("host-1:123")
        assert [h.owner for h in tx.heartbeats()] == ["host-2:9"]


def test_bulk_entities_links_and_memories(store: Store) -> None:
    """The engine's per-batch writes: many new entities, links and memories in one statement each."""
    rows = [rec(f"c{i}") for i in range(5)]
    a, b = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    with store.tx() as tx:
        tx.upsert_records(rows)
        tx.add_entities({a: "person", b: "deal"})
        tx.set_entities({rows[0].key: a, rows[1].key: a, rows[2].key: b})
        tx.set_memories({a: ({"returned_at": "2026-03-01"}, T0 + timedelta(hours=1)), b: ({"x": 1}, None)})
    with store.tx() as tx:
        got = tx.get_records([r.key for r in rows])
        assert [got[r.key].entity_id for r in rows] == [a, a, b, None, None]
        assert tx.get_memory([a, b]) == {a: {"returned_at": "2026-03-01"}, b: {"x": 1}}
        assert tx.due_entities(T0 + timedelta(hours=2)) == [a]
        assert {r.key for r in tx.records_by_entity([a])[a]} == {rows[0].key, rows[1].key}
        with pytest.raises(ValueError):
            tx.add_entities({"00000000-0000-4000-8000-00000000000c": "company"})
