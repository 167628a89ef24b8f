"""The operator's tables at 60, 80 and 200 columns and off a terminal: no id, term, email or time
is ever split across lines (kept whole, or shortened with an ellipsis); deals are named, not a UUID;
`status --explain` names every noun status shows."""

from __future__ import annotations

import io
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from syncd import report
from syncd.model import Cursor
from syncd.stats import PlannedWrite
from syncd.store import Store
from syncd.store.rows import AuditRow

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
LEAD = "Lead/00Q5e0000000AbCdEEAV"
TOKENS = [LEAD, "00Q5e0000000AbCdEEAV", "returned_not_ready", "salesacceptedlead",
          "jane.doe.longname@example-company.test", "2026-12-01 09:20:00", "marketingqualifiedlead"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]


def assert_no_token_split(text: str, tokens: list[str]) -> None:
    """No cell's last word plus the next line's same cell's first word is a piece of a token."""
    lines = [ln for ln in text.splitlines() if "│" in ln or "┃" in ln]
    for a, b in zip(lines, lines[1:], strict=False):
        ca, cb = _cells(a), _cells(b)
        if len(ca) != len(cb):
            continue
        for x, y in zip(ca, cb, strict=True):
            if not x or not y:
                continue
            joined = x.split()[-1] + y.split()[0]
            for t in tokens:
                assert joined not in t or len(joined) < 4, f"token {t!r} split across lines:\n{a}\n{b}"
    for t in tokens:
        whole = t in text
        shortened = any(t.startswith(m.group(1)) for m in re.finditer(r"(\S+)…", text))
        if not (whole or shortened) and t[:6] in text:
            pytest.fail(f"token {t!r} neither whole nor ellipsised:\n{text}")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    with st.tx() as tx:
        for system, obj in (("hubspot", "contacts"), ("hubspot", "deals"), ("salesforce", "Lead"),
                            ("salesforce", "Contact"), ("salesforce", "Task"), ("salesforce", "Opportunity")):
            tx.set_cursor(system, obj, Cursor(NOW - timedelta(days=3), "1"), now=NOW)
            tx.pull_succeeded(system, obj, NOW - timedelta(minutes=3))
        tx.pull_failed("salesforce", "Lead", "AuthError: salesforce query: HTTP 401 INVALID_SESSION_ID", NOW)
        tx.quarantine_record("salesforce", "Lead", "00Q5e0000000AbCdEEAV",
                             "Status 'returned_not_ready' is no value of salesacceptedlead for "
                             "jane.doe.longname@example-company.test", raw={})
        tx.count_unmapped([("hubspot", "contacts", "lifecyclestage", "marketingqualifiedlead")])
        run = tx.start_run("cycle:contacts", now=NOW - timedelta(minutes=1))
        tx.finish_run(run, "partial", {"pulled": 12, "sent": 0},
                      "salesforce: AuthError: salesforce query: HTTP 401 INVALID_SESSION_ID", now=NOW)
        rid = tx.queue_resync({"group": None, "full": True}, now=NOW - timedelta(minutes=5))
        tx.finish_resync(rid, "failed", {"error": "resync partial: salesforce: AuthError"}, now=NOW)
    yield st
    st.close()


def _audit_rows() -> list[AuditRow]:
    return [AuditRow(id=1, at=NOW - timedelta(minutes=10), entity_id="7f1c2d3e-aaaa-bbbb-cccc-1234567890ab",
                     email_norm="jane.doe.longname@example-company.test", system="salesforce", object="Lead",
                     record_id="00Q5e0000000AbCdEEAV", field="lead_status", before="salesacceptedlead",
                     after="returned_not_ready", rule="R2-returned",
                     reason="returned – not ready at 2026-12-01 09:20:00: marketingqualifiedlead again later",
                     mapping_rev="e3c4c88dac8d0000", outbox_id=1)]


def _planned() -> list[PlannedWrite]:
    return [PlannedWrite("salesforce", "Lead", "00Q5e0000000AbCdEEAV", "update",
                         "jane.doe.longname@example-company.test",
                         {"lead_status": ("salesacceptedlead", "returned_not_ready")}, "R2-returned",
                         "returned – not ready: back to marketingqualifiedlead")]


def _render(width: int, fn: object, *args: object) -> str:
    buf = io.StringIO()
    fn(*args, console=Console(file=buf, width=width, soft_wrap=False))  # type: ignore[operator]
    return buf.getvalue()


@pytest.mark.parametrize("width", [60, 80, 200])
def test_no_token_is_split_at_any_width(store: Store, width: int) -> None:
    data = report.status_data(store, NOW)
    for fn, arg in ((report.print_status, data), (report.print_audit, _audit_rows()),
                    (report.planned_writes_table, _planned())):
        text = _render(width, fn, arg)
        assert max(len(ln) for ln in text.splitlines()) <= width
        assert_no_token_split(text, TOKENS)


def test_off_a_terminal_tables_use_a_wide_layout(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert not sys.stdout.isatty()
    report.print_audit(_audit_rows())
    report.print_status(report.status_data(store, NOW))
    out = capsys.readouterr().out
    assert_no_token_split(out, TOKENS)
    # whole tokens, on one line each, wider than 80 columns
    assert any(LEAD in ln and "returned_not_ready" in ln for ln in out.splitlines())
    assert max(len(ln) for ln in out.splitlines()) > 80
    assert "quarantin…" not in out


def test_status_says_times_and_lag_for_people(store: Store) -> None:
    text = _render(200, report.print_status, report.status_data(store, NOW))
    assert "≤ 3m" in text  # lag: the age of the last complete pull, not of the newest record (3 days)
    assert "µs" not in text and ".000" not in text and "+00:00" not in text
    assert "failing since 09:30 UTC (0s ago) (auth)" in text
    assert re.search(r"#\s*┃|# ┃", text) or "resyncs" in text
    assert "failed" in text and "resync partial: salesforce: AuthError" in text


def test_explain_names_every_noun_status_shows() -> None:
    text = _render(120, report.print_explain)
    assert "([sync]" in text  # cells are text, not markup
    for noun in ("records", "newest change held", "last complete pull", "lag", "quarantined", "unmapped",
                 "picture", "paused", "cycle", "resync", "pending outbox", "open SLA breaches", "link conflicts",
                 "blocked re-hand-offs", "services on this store", "API usage"):
        assert noun in text, noun


def test_a_deal_is_named_in_the_audit_not_a_uuid(store: Store) -> None:
    from syncd.store import RecordRow

    with store.tx() as tx:
        entity = tx.new_entity("deal", now=NOW)
        tx.upsert_records([RecordRow(system="hubspot", object="deals", id="9001", kind="deal", modified_at=NOW,
                                     raw={}, canonical={"terms": {}, "values": {"name": "Acme renewal"},
                                                        "unmapped": []})])
        tx.set_entity([("hubspot", "deals", "9001")], entity)
        row = AuditRow(id=2, at=NOW, entity_id=entity, email_norm=None, system="hubspot", object="deals",
                       record_id="9001", field="deal_stage", before="contract_sent", after="closed_won",
                       rule="R6-deals", reason="won in salesforce", mapping_rev="abc", outbox_id=2)
        labels = report.deal_labels(tx, [row])
    assert labels == {entity: 'deal "Acme renewal"'}
    text = _render(200, lambda rows, console: report.print_audit(rows, console, labels=labels), [row])
    assert 'deal "Acme renewal"' in text and "deals/9001" in text and entity not in text


def test_a_dry_run_names_a_deal_by_name_and_id() -> None:
    from syncd.model import CanonicalRecord
    from syncd.writeback import who

    deal = CanonicalRecord("hubspot", "deals", "9001", "deal", NOW, values={"name": "Acme renewal"})
    person = CanonicalRecord("hubspot", "contacts", "101", "person", NOW, values={"email": "a@example.com"})
    assert who([deal]) == 'deal "Acme renewal" (9001)'
    assert who([person]) == "a@example.com"
    assert who([CanonicalRecord("hubspot", "deals", "9002", "deal", NOW)]) == "9002"


def test_a_cycle_stopped_by_a_shutdown_says_so_instead_of_an_empty_reason(store: Store) -> None:
    with store.tx() as tx:
        run = tx.start_run("cycle:contacts", now=NOW - timedelta(seconds=30))
        tx.finish_run(run, "interrupted", {"pulled": 2, "sent": 0}, None, now=NOW)
    text = _render(200, report.print_status, report.status_data(store, NOW))
    (line,) = [ln for ln in text.splitlines() if ln.startswith("last cycle:")]
    assert line.startswith("last cycle: interrupted (cycle:contacts, 09:29 UTC (30s ago)): stopped before it finished")


def test_what_is_held_for_a_person_names_the_command_that_lists_it(store: Store) -> None:
    data = report.status_data(store, NOW)
    data = {**data, "link_conflicts": 3, "events_open": {**data["events_open"], "promotion_blocked": 2}}
    text = _render(200, report.print_status, data)
    assert "3 link conflicts: one email on several records of one CRM" in text and "`syncd conflicts`" in text
    assert "2 people qualified again" in text and "`syncd blocked` lists them" in text


def _command_tables() -> None:
    """The tables the other commands print on stdout: review (quarantine, link conflicts), reconcile,
    a resync's cost plan, prune, tombstones."""
    from syncd import plan, reconcile, retention, review, tombstones

    review._quarantine_text({"quarantine": [{
        "id": 7, "system": "salesforce", "object": "Lead", "record_id": "00Q5e0000000AbCdEEAV", "kind": "write",
        "attempts": 3, "at": "2026-12-01 09:20:00+00:00",
        "reason": "Status 'returned_not_ready' is no value of salesacceptedlead"}]})
    cand = {"key": LEAD, "name": "Jane Doe", "company": "Acme", "lifecycle": "salesacceptedlead",
            "lead_status": "returned_not_ready", "converted": False, "entity_id": None,
            "modified_at": "2026-12-01 09:20:00", "in_store": True}
    review._conflicts_text({"conflicts": [{"id": 3, "email": "jane.doe.longname@example-company.test",
                                           "detected_at": "2026-12-01 09:20:00", "candidates": [cand, cand]}]})
    reconcile._print([reconcile.ObjectDiff("salesforce", "Lead", crm=12_000, store=11_998,
                                           missing=["00Q5e0000000AbCdEEAV", "00Q5e0000000AbCdEEAW"],
                                           extra=["00Q5e0000000AbCdEEAX"], calls=6)], 5, None)
    plan.print_plan(plan.Plan("resync --full", [plan.ObjectCost("salesforce", "Lead", None, 120_000, 60, 1, 2)],
                              {"salesforce": 1}, {"salesforce": "salesforce 120,064 calls > 100,000 left today"}))
    retention.print_lines([retention.PruneLine("audit", "audit rows", 400, NOW - timedelta(days=400), 1_000_000)],
                          dry_run=True)
    tombstones._print({"total": 1, "tombstones": [{
        "key": LEAD, "kind": "deleted", "merged_into": None, "restored_at": None,
        "deleted_at": "2026-12-01T09:20:00+00:00", "detected_at": "2026-12-01T09:21:00+00:00",
        "source": "getDeleted", "other_side": "marked", "twins": [], "name": None,
        "email": "jane.doe.longname@example-company.test", "entity_id": None}]})


@pytest.mark.parametrize("columns", ["60", "80", "200", None])
def test_every_commands_table_keeps_tokens_whole(columns: str | None, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal, at ``$COLUMNS`` or the wide default: review, reconcile, plan, prune and
    tombstones keep every id, term, email and time whole, and stay within the width."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    _command_tables()
    out = capsys.readouterr().out
    assert_no_token_split(out, [*TOKENS, "00Q5e0000000AbCdEEAW", "00Q5e0000000AbCdEEAX", "120,064"])
    for t in ("00Q5e0000000AbCdEEAV", "00Q5e0000000AbCdEEAW", "jane.doe.longname@example-company.test"):
        assert t in out, (t, out)
    if columns == "60":  # too narrow for two candidates side by side: a card per candidate, named
        assert f"• {LEAD} Jane Doe" in out.splitlines(), out
    else:
        assert any(ln.count(LEAD) == 2 for ln in out.splitlines()), out  # side by side
    table_lines = [ln for ln in out.splitlines() if ln[:1] in "┏┃┡│└•" or ln.startswith("    ")]
    assert max(len(ln) for ln in table_lines) <= int(columns or 200)  # hints after a table are plain lines
