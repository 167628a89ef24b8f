"""Where an incremental pull starts (:func:`syncd.engine.pull_overlap`): the overlap window is
kept while records before the cursor may still have been invisible when it was read, and
dropped once the cursor was old when read (a backfill resumed, a quiet object)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from syncd.engine import pull_overlap
from syncd.model import Cursor
from syncd.store import Store

T = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
OVERLAP = timedelta(seconds=120)


def test_a_cursor_read_as_it_happened_keeps_the_overlap() -> None:
    assert pull_overlap(OVERLAP, Cursor(T, "1"), T + timedelta(seconds=3)) == OVERLAP
    assert pull_overlap(OVERLAP, Cursor(T, "1"), T - timedelta(seconds=30)) == OVERLAP  # syncd's clock behind


def test_a_cursor_already_old_when_read_resumes_at_the_cursor() -> None:
    assert pull_overlap(OVERLAP, Cursor(T, "1"), T + timedelta(days=1)) == timedelta(0)  # a backfill's page
    assert pull_overlap(OVERLAP, Cursor(T, "1"), T + 2 * OVERLAP) == OVERLAP  # within the margin: kept


@given(age=st.integers(min_value=-3600, max_value=86_400), overlap=st.integers(min_value=0, max_value=900))
def test_every_record_that_may_have_been_invisible_is_read_again(age: int, overlap: int) -> None:
    """A record modified up to ``overlap`` before being read could have been invisible (index lag,
    clock skew up to the overlap): the next pull starts at or before every such record."""
    ov, read_at = timedelta(seconds=overlap), T + timedelta(seconds=age)
    start = T - pull_overlap(ov, Cursor(T, "1"), read_at)
    # records modified in [T - ov, T] that were within lag + skew (2 x overlap) of the read
    for before in (0, overlap):
        m = T - timedelta(seconds=before)
        if read_at - m <= 2 * ov:
            assert start <= m


def test_the_cursors_read_time_moves_when_its_record_is_read_again(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with store.tx() as tx:
            tx.set_cursor("hubspot", "contacts", Cursor(T, "7"), now=T + timedelta(seconds=2))
            tx.set_cursor("hubspot", "contacts", Cursor(T, "7"), now=T + timedelta(minutes=10))  # the overlap re-read
            tx.set_cursor("hubspot", "contacts", Cursor(T, "6"), now=T + timedelta(minutes=20))  # an older record
            got = tx.get_cursor_read_at("hubspot", "contacts")
    finally:
        store.close()
    assert got == (Cursor(T, "7"), T + timedelta(minutes=10))
    assert pull_overlap(OVERLAP, *got) == timedelta(0)  # nothing new for 10 minutes: the next pull starts at T
