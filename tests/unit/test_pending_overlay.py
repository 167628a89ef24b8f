"""The pending-writes overlay (views.with_pending): it never hides a value newer than the write,
and it does not mistake syncd's own half-done backwards move for someone's edit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from syncd.store import OutboxRow, RecordRow
from syncd.views import with_pending

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _contact(stage: str | None) -> RecordRow:
    terms = {} if stage is None else {"lifecycle": stage}
    return RecordRow("hubspot", "contacts", "7", "person", T0, {"lifecyclestage": stage or ""},
                     {"terms": terms, "values": {}, "unmapped": []})


def _return_write(state: str, attempts: int = 0) -> OutboxRow:
    """R2's backwards move of contact 7, MQL -> lead: HubSpot clears the stage first."""
    return OutboxRow(id=1, key="k", entity_id="e", email_norm=None, system="hubspot", object="contacts",
                     record_id="7", op="update", fields={"lifecyclestage": "lead"},
                     clear_first=("lifecyclestage",), canonical={"lifecycle": ["mql", "lead"]},
                     rule="R2-returned", reason="r", mapping_rev="m", state=state, attempts=attempts,
                     last_error=None, next_attempt_at=T0, created_at=T0, done_at=None, result_id=None)


def _overlay(stage: str | None, w: OutboxRow) -> tuple[Any, list[Any]]:
    stale: list[Any] = []
    out = with_pending({"e": [_contact(stage)]}, {"e": [w]}, stale)
    return out["e"][0].canonical["terms"].get("lifecycle"), stale


@pytest.mark.parametrize(("state", "attempts"), [("sending", 0), ("pending", 1)])
def test_a_stage_cleared_by_the_write_s_own_first_step_is_overlaid_not_superseded(state: str, attempts: int) -> None:
    # killed (sending) or failed (attempts) between the clear and the set: the write is finished
    assert _overlay(None, _return_write(state, attempts)) == ("lead", [])


def test_a_stage_cleared_before_the_write_was_ever_sent_is_someone_else_s_change() -> None:
    w = _return_write("pending")
    assert _overlay(None, w) == (None, [(w, {"lifecycle": ["mql", None]})])


def test_a_newer_stage_is_never_hidden_even_for_a_write_in_flight() -> None:
    w = _return_write("sending")
    assert _overlay("sql", w) == ("sql", [(w, {"lifecycle": ["mql", "sql"]})])


@pytest.mark.parametrize("stage", ["mql", "lead"])
def test_the_decided_on_or_the_written_stage_is_overlaid(stage: str) -> None:
    assert _overlay(stage, _return_write("pending")) == ("lead", [])
