"""Retention on both backends: ``prune --dry-run`` counts exactly what ``prune`` then deletes
(finished rows past their age, in batches), and nothing open or recent goes."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from syncd import retention
from syncd.cli import main
from syncd.config import Config, HubSpotConfig, RetentionConfig, SalesforceConfig, StateConfig
from syncd.model import utcnow
from syncd.store import OutboxItem, Store
from syncd.store import schema as s

NOW = utcnow()
OLD = NOW - timedelta(days=500)  # past every default retention
RECENT = NOW - timedelta(days=3)  # within every default retention


def _cfg(store_url: str = "sqlite:///unused.db", **retention_kw: object) -> Config:
    return Config(hubspot=HubSpotConfig(base_url="https://hubspot.invalid"),
                  salesforce=SalesforceConfig(instance_url="https://salesforce.invalid"),
                  state=StateConfig(url=store_url), retention=RetentionConfig(**retention_kw))  # type: ignore[arg-type]


def _item(key: str) -> OutboxItem:
    return OutboxItem(key=key, system="hubspot", object="contacts", op="update", fields={"lifecyclestage": "lead"},
                      rule="R1", reason="test", mapping_rev="abc", record_id=key,
                      canonical={"lifecycle": ("subscriber", "lead")})


def _fill(store: Store, *, old_done: int = 5, old_audit_extra: int = 0) -> dict[str, int]:
    """Old and recent rows of every kind; returns how many of each kind must go."""
    with store.tx() as tx:
        tx.enqueue([_item(f"old{i}") for i in range(old_done)] + [_item("new"), _item("open")], now=OLD)
        ids = {r.key: r.id for r in tx.due("hubspot", None, NOW, limit=1000)}
        for i in range(old_done):
            tx.mark_done(ids[f"old{i}"], now=OLD)  # one old audit row each
        tx.mark_done(ids["new"], now=RECENT)  # kept, with its audit row
        if old_audit_extra:
            tx.conn.execute(sa.insert(s.audit), [
                {"at": OLD, "system": "hubspot", "object": "contacts", "record_id": str(i), "field": "lifecycle",
                 "before": "a", "after": "b", "rule": "R1", "reason": "old", "mapping_rev": "abc"}
                for i in range(old_audit_extra)])
        for when, finish in ((OLD, True), (OLD, False), (RECENT, True)):
            run = tx.start_run("cycle:contacts", now=when)
            if finish:
                tx.finish_run(run, "ok", {}, now=when)
        q_old = tx.quarantine_record("hubspot", "contacts", "1", "bad", now=OLD)
        tx.quarantine_record("hubspot", "contacts", "2", "bad, still open", now=OLD)
        q_new = tx.quarantine_record("hubspot", "contacts", "3", "bad", now=RECENT)
        tx.resolve_quarantine([q_old], now=OLD)
        tx.resolve_quarantine([q_new], now=RECENT)
    return {"outbox": old_done, "runs": 1, "quarantine": 1, "tombstones": 0, "audit": old_done + old_audit_extra}


def _rows(store: Store) -> dict[str, int]:
    with store.tx() as tx:
        return {t: int(tx.conn.execute(sa.select(sa.func.count()).select_from(s.metadata.tables[t])).scalar_one())
                for t in ("outbox", "runs", "quarantine", "audit")}


def test_dry_run_counts_exactly_what_prune_deletes_in_batches(store: Store) -> None:
    expected = _fill(store, old_done=5, old_audit_extra=12)
    cfg = _cfg(batch_size=4, pause_s=0)
    before = _rows(store)

    planned = {x.kind: x.rows for x in retention.plan(store, cfg, NOW)}

    assert planned == expected
    assert _rows(store) == before  # a dry run deletes nothing
    batches: list[tuple[str, int]] = []
    done = {x.kind: x.rows for x in retention.prune(store, cfg, NOW, on_batch=lambda k, n: batches.append((k, n)))}
    assert done == expected
    assert max(n for _, n in batches) <= 4 and sum(n for k, n in batches if k == "audit") == 17
    assert [n for k, n in batches if k == "audit"] == [4, 4, 4, 4, 1]  # one transaction per batch
    after = _rows(store)
    assert {k: before[k] - after[k] for k in after} == {k: expected[k] for k in after}
    assert {x.kind: x.rows for x in retention.plan(store, cfg, NOW)} == dict.fromkeys(expected, 0)
    with store.tx() as tx:  # what stays: open work and recent rows
        states = sorted(r for r in tx.conn.execute(sa.select(s.outbox.c.key)).scalars())
        assert states == ["new", "open"]
        assert [q.record_id for q in tx.open_quarantine()] == ["2"]
        assert {r.status for r in tx.last_runs()} == {"running", "ok"}


def test_zero_days_keeps_for_ever(store: Store) -> None:
    _fill(store)
    cfg = _cfg(audit_days=0, outbox_done_days=0, runs_days=0, quarantine_resolved_days=0)
    assert all(x.rows == 0 and x.cutoff is None for x in retention.prune(store, cfg, NOW))


def test_prune_stops_between_batches_when_asked(store: Store) -> None:
    _fill(store, old_done=0, old_audit_extra=30)
    stop = threading.Event()

    def on_batch(kind: str, n: int) -> None:
        if kind == "audit" and n:
            stop.set()

    lines = retention.prune(store, _cfg(batch_size=10, pause_s=0), NOW, should_stop=stop.is_set, on_batch=on_batch)
    assert {x.kind: x.rows for x in lines}["audit"] == 10
    assert {x.kind: x.rows for x in retention.plan(store, _cfg(), NOW)}["audit"] == 20


@pytest.mark.parametrize("dry_run", [True, False])
def test_prune_cli(tmp_path: Path, dry_run: bool) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store.open(url)
    expected = _fill(store)
    store.close()
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(f'[hubspot]\nbase_url = "https://h.invalid"\n[salesforce]\ninstance_url = "https://s.invalid"\n'
                   f'[state]\nurl = "{url}"\n[retention]\nbatch_size = 2\npause_s = 0\n')
    args = ["--config", str(cfg), "prune", "--json"] + (["--dry-run"] if dry_run else [])

    r = CliRunner().invoke(main, args)

    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["dry_run"] is dry_run
    assert {k["kind"]: k["rows"] for k in out["kinds"]} == expected
    r = CliRunner().invoke(main, ["--config", str(cfg), "prune", "--dry-run"])
    assert r.exit_code == 0, r.output
    audit_line = next(line for line in r.stdout.splitlines() if "audit rows" in line)
    assert audit_line.split("│")[2].strip() == str(expected["audit"] if dry_run else 0)


def test_old_tombstones_go_only_when_a_retention_is_set(store: Store) -> None:
    from syncd.model import Deletion

    with store.tx() as tx:
        tx.add_tombstone(Deletion("salesforce", "Lead", "00Qold", OLD, None, "queryAll"),
                         now=OLD, entity_id=None, canonical=None)
        tx.add_tombstone(Deletion("hubspot", "contacts", "101", RECENT, "102", "merged_ids"),
                         now=RECENT, entity_id=None, canonical=None)
    kept = {x.kind: x.rows for x in retention.prune(store, _cfg(), NOW)}
    assert kept["tombstones"] == 0  # default: kept for ever (they stop re-creation)
    gone = {x.kind: x.rows for x in retention.prune(store, _cfg(tombstones_days=30, batch_size=1, pause_s=0), NOW)}
    assert gone["tombstones"] == 1
    with store.tx() as tx:
        assert [t.record_id for t in tx.list_tombstones()] == ["101"]
