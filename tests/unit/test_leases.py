"""Leases as the daemons hold them (``LeaseKeeper`` in syncd/resync.py) on a SQLite state store:
one holder at a time, all-or-nothing for a set of names, renewed while held, released on exit,
and taken over after a dead holder's TTL. The store-level semantics on both backends are in
test_store.py; here it is the keeper a ``syncd run`` / ``syncd resync`` process relies on.

Lease expiry reads the wall clock (``utcnow``), which ``time_machine`` moves; renewals are
driven by the keeper's own thread, so the tests wait (bounded) for them instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from structlog.testing import capture_logs

from syncd.resync import LeaseKeeper
from syncd.store import Store

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LEASE = "cycle:contacts"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    (tmp_path / "state").mkdir()
    s = Store.open(f"sqlite:///{tmp_path / 'state' / 'syncd.db'}")
    yield s
    s.close()


@pytest.fixture
def keeper(store: Store) -> Iterator[Callable[..., LeaseKeeper]]:
    """Make keepers (one per daemon); each is closed after the test."""
    made: list[LeaseKeeper] = []

    def _make(owner: str, ttl_s: float = 30.0) -> LeaseKeeper:
        k = LeaseKeeper(store, owner, ttl_s=ttl_s)
        made.append(k)
        return k

    yield _make
    for k in made:
        k.close()


def holder(store: Store, name: str = LEASE, at: datetime | None = None) -> str | None:
    with store.tx() as tx:
        return tx.lease_holder(name, at or datetime.now(UTC))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------ one holder at a time

def test_a_lease_has_one_holder_until_it_is_released(store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire(LEASE)
    assert holder(store) == "daemon-a"
    assert not b.try_acquire(LEASE)
    assert a.try_acquire(LEASE)  # taking it again is fine for its holder
    a.release(LEASE)
    assert holder(store) is None
    assert b.try_acquire(LEASE)
    assert holder(store) == "daemon-b"


def test_releasing_a_lease_one_does_not_hold_leaves_the_holder_alone(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire(LEASE)
    b.release(LEASE)
    assert holder(store) == "daemon-a"


def test_leases_of_different_names_are_independent(keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire("cycle:contacts")
    assert b.try_acquire("cycle:deals")


# ------------------------------------------------------------------ holding a set of names

def test_holding_takes_every_name_and_gives_them_back_on_exit(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    a = keeper("daemon-a")
    with a.holding(["cycle:contacts", "cycle:deals"]) as got:
        assert got is True
        assert holder(store, "cycle:contacts") == holder(store, "cycle:deals") == "daemon-a"
    assert holder(store, "cycle:contacts") is None and holder(store, "cycle:deals") is None


def test_holding_gives_the_leases_back_when_the_work_fails(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    a = keeper("daemon-a")
    with pytest.raises(RuntimeError, match="cycle failed"), a.holding([LEASE]):
        raise RuntimeError("cycle failed")
    assert holder(store) is None


def test_holding_is_all_or_nothing(store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    """If the second name is taken, the first is given back: no daemon sits on half a set."""
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert b.try_acquire("cycle:deals")
    with a.holding(["cycle:contacts", "cycle:deals"]) as got:
        assert got is False
    assert holder(store, "cycle:contacts") is None
    assert holder(store, "cycle:deals") == "daemon-b"


def test_holding_waits_for_a_running_cycle_to_finish(store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire(LEASE)
    releaser = threading.Timer(0.2, a.release, args=(LEASE,))
    releaser.start()
    try:
        with b.holding([LEASE], wait_s=10) as got:
            assert got is True
            assert holder(store) == "daemon-b"
    finally:
        releaser.cancel()


def test_holding_stops_waiting_when_asked_to(keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire(LEASE)
    started = time.monotonic()
    with b.holding([LEASE], wait_s=60, should_stop=lambda: True) as got:
        assert got is False
    assert time.monotonic() - started < 5  # a SIGTERM does not sit out the whole wait


def test_holding_without_a_wait_gives_up_at_once(keeper: Callable[..., LeaseKeeper]) -> None:
    a, b = keeper("daemon-a"), keeper("daemon-b")
    assert a.try_acquire(LEASE)
    started = time.monotonic()
    with b.holding([LEASE]) as got:
        assert got is False
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------ expiry, renewal, shutdown

def test_a_dead_holders_lease_is_taken_over_after_its_ttl(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    """A daemon killed with -9 never releases; the lease lapses after the TTL and no sooner."""
    with time_machine.travel(T0, tick=False) as clock:
        with store.tx() as tx:  # what a process that then died left behind
            assert tx.acquire_lease(LEASE, "dead-daemon", 30, T0)
        b = keeper("daemon-b", ttl_s=30)
        clock.move_to(T0 + timedelta(seconds=29))
        assert not b.try_acquire(LEASE)
        clock.move_to(T0 + timedelta(seconds=30))
        assert b.try_acquire(LEASE)
        assert holder(store, at=T0 + timedelta(seconds=59)) == "daemon-b"  # a fresh TTL from the take-over


def test_a_held_lease_is_renewed_so_it_outlives_its_ttl(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    ttl = 0.3  # the keeper renews every ttl/3 (real time)
    with time_machine.travel(T0, tick=False) as clock:
        a, b = keeper("daemon-a", ttl_s=ttl), keeper("daemon-b", ttl_s=ttl)
        assert a.try_acquire(LEASE)  # expires at T0 + ttl unless renewed
        past_first_expiry = T0 + timedelta(seconds=ttl * 4 / 3)
        assert holder(store, at=past_first_expiry) is None
        clock.move_to(T0 + timedelta(seconds=ttl * 2 / 3))
        wait_for(lambda: holder(store, at=past_first_expiry) == "daemon-a", "the lease to be renewed")
        clock.move_to(past_first_expiry)
        assert not b.try_acquire(LEASE)


def test_a_released_lease_is_no_longer_renewed(store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    """Renewing a lease given back would report it lost (or keep it from the next daemon)."""
    ttl = 0.3
    a = keeper("daemon-a", ttl_s=ttl)
    with capture_logs() as logs:
        assert a.try_acquire(LEASE)
        a.release(LEASE)
        time.sleep(2.5 * ttl / 3)  # two renewal ticks: nothing happens in the background, so wait
    assert [e for e in logs if e["event"].startswith("lease_")] == []
    assert holder(store) is None


def test_a_lease_lost_to_another_daemon_is_reported_and_not_stolen_back(
        store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    ttl = 0.3
    a = keeper("daemon-a", ttl_s=ttl)
    with capture_logs() as logs:
        assert a.try_acquire(LEASE)
        with store.tx() as tx:  # e.g. a's lease lapsed during a long store outage and b took it
            tx.release_lease(LEASE, "daemon-a")
            assert tx.acquire_lease(LEASE, "daemon-b", 30, datetime.now(UTC))
        wait_for(lambda: any(e["event"] == "lease_lost" for e in logs), "lease_lost")
    assert holder(store) == "daemon-b"
    (lost,) = {e["lease"] for e in logs if e["event"] == "lease_lost"}
    assert lost == LEASE


def test_close_gives_back_every_lease_at_once(store: Store, keeper: Callable[..., LeaseKeeper]) -> None:
    """A clean shutdown does not make the other daemons wait for the TTL."""
    a, b = keeper("daemon-a", ttl_s=300), keeper("daemon-b")
    assert a.try_acquire("cycle:contacts") and a.try_acquire("cycle:deals")
    a.close()
    assert holder(store, "cycle:contacts") is None and holder(store, "cycle:deals") is None
    assert b.try_acquire("cycle:contacts") and b.try_acquire("cycle:deals")


def test_a_confirm_that_extends_the_lease_past_its_ttl_is_confirmed_again(
    store: Store, keeper: Callable[..., LeaseKeeper]
) -> None:
    """Fencing confirms the lease before every CRM call for the call's timeout, which may be
    longer than the TTL (30 s timeout + margin > 30 s TTL by default). The extended expiry must
    still read as held: the writer confirms again before its next batch."""
    a = keeper("a", ttl_s=3.0)
    assert a.try_acquire(LEASE)
    assert a.confirm([LEASE], for_s=8.0)
    assert a.confirm([LEASE], for_s=8.0)  # failed before: the extension was stored as an older-sorting text
    b = keeper("b", ttl_s=3.0)
    assert not b.try_acquire(LEASE)
