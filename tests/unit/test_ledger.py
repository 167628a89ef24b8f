"""The API ledger in the store: exact under concurrency, claims never pass the cap (SQLite and PostgreSQL)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from syncd.connectors._pacing import Budget, CapReached, Pace, Settings
from syncd.store import Store, migrations
from syncd.store.ledger import Hold, Window

T0 = 1_796_083_200.0  # 2026-12-01 00:00 UTC


def test_ledger_is_a_schema_step(store: Store) -> None:
    assert store.schema_version() == migrations.LATEST
    with store.tx() as tx:
        assert tx.api_calls_since("hubspot", 0) == {}


def test_concurrent_increments_from_many_stores_are_all_counted(open_store: Callable[[], Store]) -> None:
    stores = [open_store() for _ in range(4)]
    day = Window("day")
    b = day.bucket(T0)

    def work(st: Store) -> None:
        for _ in range(25):
            with st.tx() as tx:
                tx.add_api_calls("hubspot", {("burst", b): 2, ("search", b): 1})

    threads = [threading.Thread(target=work, args=(st,)) for st in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with stores[0].tx() as tx:
        got = tx.api_calls_since("hubspot", day.start(T0))
    assert got == {("burst", b): 8 * 25 * 2, ("search", b): 8 * 25}


def test_concurrent_claims_never_pass_the_cap(open_store: Callable[[], Store]) -> None:
    stores = [open_store() for _ in range(4)]
    w = Window("rolling")
    granted: list[int] = []
    lock = threading.Lock()

    def work(st: Store) -> None:
        for _ in range(20):
            with st.tx() as tx:
                g, _ = tx.claim_api_calls("salesforce", 7, 333, w, T0)
            with lock:
                granted.append(g)

    threads = [threading.Thread(target=work, args=(st,)) for st in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 333  # 8 x 20 x 7 = 1120 wanted: exactly the cap granted, not one more
    with stores[0].tx() as tx:
        assert sum(tx.api_claims_since("salesforce", w.start(T0)).values()) == 333
        tx.release_api_claim("salesforce", w.bucket(T0), 33)
        assert sum(tx.api_claims_since("salesforce", w.start(T0)).values()) == 300


def test_windows_day_and_rolling() -> None:
    day, roll = Window("day"), Window("rolling")
    assert day.start(T0 + 3600 * 5) == T0 and day.end(T0 + 5) == T0 + 86_400
    assert roll.bucket_s == 3600 and roll.start(T0 + 1800) == T0 - 24 * 3600  # never under-counted
    # 60 calls in the oldest bucket, 40 in the newest: a quarter of a cap of 80 is free once the
    # oldest leaves; of a cap of 40, only once both have
    buckets = {int(T0 - 23 * 3600): 60, int(T0): 40}
    assert roll.frees_at(buckets, 100, 80, T0 + 10) == T0 + 2 * 3600
    assert roll.frees_at(buckets, 100, 40, T0 + 10) == T0 + 25 * 3600
    assert day.frees_at(buckets, 100, 80, T0 + 10) == T0 + 86_400


def test_holds_keep_the_later_until(store: Store) -> None:
    with store.tx() as tx:
        tx.set_api_hold("hubspot", "burst", Hold(T0 + 5, 0.5, "429", T0))
        tx.set_api_hold("hubspot", "burst", Hold(T0 + 2, 0.25, "429 again", T0 + 1))
        h = tx.api_holds("hubspot")[("hubspot", "burst")]
    assert (h.until, h.factor, h.reason) == (T0 + 5, 0.25, "429")


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.slept = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept += s
        self.t += s


def _budget(store: Store, clock: FakeClock, **kw: object) -> Budget:
    s = Settings("salesforce", Window("rolling"), daily_share=0.5, daily_limit=200, flush_every=10,
                 paces={"api": Pace(1000.0)}, **kw)  # type: ignore[arg-type]
    return Budget(store, s, clock=clock, sleep=clock.sleep)


def test_budgets_of_two_processes_share_one_cap_and_count_exactly(open_store: Callable[[], Store]) -> None:
    clock = FakeClock(T0)
    a, b = _budget(open_store(), clock), _budget(open_store(), clock)
    sent, stopped = 0, {}
    while len(stopped) < 2:
        for name, budget in (("a", a), ("a", a), ("b", b)):
            if name in stopped:
                continue
            try:
                budget.before("query")
                sent += 1
            except CapReached as exc:
                stopped[name] = str(exc)
    assert sent == 100  # 0.5 x 200, between the two, not one more
    a.settle()
    b.settle()
    with pytest.raises(CapReached) as paused:
        a.before("query")
    assert str(paused.value) == "salesforce: daily API share 100/100 used — paused until 2026-12-02 01:00 UTC"
    with a.store.tx() as tx:
        assert sum(tx.api_calls_since("salesforce", 0).values()) == 100
        assert sum(tx.api_claims_since("salesforce", 0).values()) == 100


@pytest.mark.parametrize("window", ["day", "rolling"])
@pytest.mark.parametrize("boundary", [T0 + 3600, T0 + 86_400], ids=["hour", "midnight"])
def test_a_new_ledger_hour_is_no_pause(store: Store, window: str, boundary: float) -> None:
    """The service asks ``paused()`` before each job. Across a ledger bucket (hour) boundary the
    unspent claim of the last hour is given back: that must not read as "the org's daily limit
    is spent" (a service paused HubSpot until midnight at 11 of 10,000,000 calls)."""
    clock = FakeClock(boundary - 5)  # five seconds before the hour (or the UTC day)
    s = Settings("hubspot", Window(window), daily_limit=10_000_000, flush_every=50, paces={"burst": Pace(1000.0)})
    budget = Budget(store, s, clock=clock, sleep=clock.sleep)
    budget.report(11, 10_000_000)
    for _ in range(3):
        budget.before("contacts.search")
    assert budget.paused() is None
    clock.t += 10  # the next hour: the unspent claim goes back
    assert budget.paused() is None
    budget.before("contacts.search")  # and calls go on
    assert budget.paused() is None


def test_a_429_holds_the_class_for_retry_after_and_slows_it(store: Store) -> None:
    clock = FakeClock(T0)
    s = Settings("hubspot", Window("day"), daily_limit=10_000, paces={"burst": Pace(10.0), "search": Pace(4.0)})
    budget = Budget(store, s, clock=clock, sleep=clock.sleep)
    budget.before("contacts.batch_read")
    budget.limited("contacts.batch_update", 2.0, "TEN_SECONDLY_ROLLING: slow down")
    start = clock.t
    budget.before("deals.batch_read")  # another endpoint of the class waits out the Retry-After
    assert clock.t - start >= 2.0
    assert budget.pace()["burst"] == pytest.approx(5.0, rel=0.05)  # halved, recovering
    clock.t += 120
    assert budget.pace()["burst"] == 10.0
    # another process on the store (or the next cycle) sees the hold
    other = Budget(store, s, clock=clock, sleep=clock.sleep)
    clock.t = start
    other.before("deals.batch_read")
    assert clock.t - start >= 2.0


def test_a_per_run_cap_stops_the_run_and_the_next_run_goes_on(store: Store) -> None:
    clock = FakeClock(T0)
    budget = _budget(store, clock, run_cap=5)
    for _ in range(5):
        budget.before("query")
    with pytest.raises(CapReached, match="per-run cap of 5 calls"):
        budget.before("query")
    budget.settle()
    budget.before("query")


def test_burn_shows_calls_cap_pace_share_and_the_pause_in_status_and_metrics(store: Store) -> None:
    from datetime import UTC, datetime

    from prometheus_client.parser import text_string_to_metric_families

    from syncd import burn
    from syncd.metrics import ServiceMetrics

    clock = FakeClock(T0 + 5 * 3600)
    s = Settings("hubspot", Window("day"), daily_limit=1000, flush_every=7, paces={"burst": Pace(9.0)})
    budget = Budget(store, s, clock=clock, sleep=clock.sleep)
    budget.report(300, 1000)  # HubSpot's headers: the org made 300 calls of its 1,000 today
    for _ in range(20):
        budget.before("contacts.batch_read")
    budget.settle()
    with store.tx(readonly=True) as tx:
        data = burn.burn(tx, clock.t)
    h = data["hubspot"]
    assert (h["today"], h["rolling"], h["cap"], h["remaining"]) == (20, 20, 500, 480)
    assert h["org_share"] == round(20 / 300, 4) and h["pace_per_s"] == {"burst": 9.0} and h["paused"] is None
    line = burn.status_lines(data)[0]
    assert line.startswith("hubspot API: 20 calls today, 20 in the rolling window (UTC day budget: 480 of 500 left)")
    assert "syncd is 7% of the org's 300 calls" in line
    metrics = ServiceMetrics({"contacts": 30.0, "deals": 60.0})
    metrics.observe_budget(store, now=datetime.fromtimestamp(clock.t, UTC))
    got = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
           for fam in text_string_to_metric_families(metrics.render().decode()) for smp in fam.samples}
    assert got[("syncd_api_remaining", (("system", "hubspot"),))] == 480
    assert got[("syncd_api_ledger_calls", (("system", "hubspot"), ("window", "today")))] == 20
    assert got[("syncd_api_paused", (("system", "hubspot"),))] == 0
    budget.report(10, 1000)  # a report older than syncd's calls (search answers carry no headers)
    budget.before("contacts.search")
    budget.settle()
    with store.tx(readonly=True) as tx:
        lagging = burn.burn(tx, clock.t)["hubspot"]
    assert (lagging["org_used"], lagging["org_share"]) == (21, 1.0)  # the org made at least syncd's 21


def test_a_status_of_a_store_without_the_ledger_shows_no_burn(tmp_path: object) -> None:
    import sqlalchemy as sa

    from syncd import burn

    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn:
        class _Tx:
            pass

        tx = _Tx()
        tx.conn = conn  # type: ignore[attr-defined]
        assert burn.burn(tx, T0) == {}


def test_a_429_without_retry_after_is_never_retried_at_once() -> None:
    from syncd.connectors._retry import RetryPolicy
    from syncd.errors import RateLimited

    policy = RetryPolicy()
    assert min(policy.wait_for(1, RateLimited("429", status=429)) for _ in range(50)) >= 1.0
    assert policy.wait_for(1, RateLimited("429", status=429, retry_after=2)) == 2.0


def test_would_exceed_tells_a_plan_what_is_left_of_the_share(store: Store, tmp_path: Path) -> None:
    from syncd.config import load_config
    from syncd.connectors._pacing import headroom, would_exceed

    cfg_file = tmp_path / "syncd.toml"
    cfg_file.write_text('[hubspot]\nbase_url = "https://hubspot.example"\ndaily_limit = 1000\n'
                        '[salesforce]\ninstance_url = "https://sf.example"\ndaily_budget = 300\n'
                        f'[state]\nurl = "sqlite:///{tmp_path / "x.db"}"\n')
    cfg = load_config(cfg_file)
    clock = FakeClock(T0 + 60)
    sf = Budget(store, Settings("salesforce", Window("rolling"), daily_budget=300, flush_every=10,
                                paces={"api": Pace(1000.0)}), clock=clock, sleep=clock.sleep)
    for _ in range(100):
        sf.before("query")
    sf.settle()
    assert headroom(store, cfg, "salesforce", clock.t) == (200, 300)
    assert headroom(store, cfg, "hubspot", clock.t) == (500, 500)  # 0.5 x the assumed 1,000
    assert would_exceed(store, cfg, {"hubspot": 400, "salesforce": 150}, clock.t) == {}
    assert would_exceed(store, cfg, {"salesforce": 250}, clock.t) == {
        "salesforce": "salesforce: about 250 calls needed but only 200 of syncd's API share of 300 are left "
                      "(rolling 24 h)"}


def test_processes_on_one_store_share_the_rate_and_a_closed_one_gives_its_share_back(
        open_store: Callable[[], Store]) -> None:
    clock = FakeClock(T0)
    s = Settings("hubspot", Window("day"), daily_limit=10_000, flush_every=5, paces={"burst": Pace(9.0)})
    a = Budget(open_store(), s, clock=clock, sleep=clock.sleep)
    b = Budget(open_store(), s, clock=clock, sleep=clock.sleep)
    a.before("contacts.batch_read")
    b.before("contacts.batch_read")
    clock.t += 3  # the next sync of each sees the other
    a.before("contacts.batch_read")
    b.before("contacts.batch_read")
    assert a.pace()["burst"] == b.pace()["burst"] == 4.5
    b.close()
    clock.t += 3
    a.before("contacts.batch_read")
    assert a.pace()["burst"] == 9.0


def test_the_concurrency_gate_keeps_at_most_n_requests_in_flight(store: Store) -> None:
    s = Settings("salesforce", Window("rolling"), daily_limit=10_000, concurrency=2, paces={"api": Pace(1e6)})
    budget = Budget(store, s)
    lock = threading.Lock()
    in_flight, most = [0], [0]
    release = threading.Event()

    def request() -> None:
        with budget.call("query"):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            release.wait(10)
            with lock:
                in_flight[0] -= 1

    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = threading.Event()
    for _ in range(100):  # wait (generously) until two are in flight and the rest wait at the gate
        with lock:
            if in_flight[0] == 2:
                break
        deadline.wait(0.05)
    release.set()
    for t in threads:
        t.join(10)
    assert most[0] == 2


@pytest.mark.parametrize(("system", "window"), [("hubspot", "day"), ("salesforce", "rolling")])
def test_three_days_of_calls_far_below_the_cap_are_never_paused(store: Store, system: str, window: str) -> None:
    """Whatever the clock does between calls (seconds to hours, across hours and UTC midnights),
    a budget far from its cap and from the org's limit never says it is paused."""
    rng = random.Random(20261201)
    clock = FakeClock(T0 - 7)
    s = Settings(system, Window(window), daily_limit=1_000_000, flush_every=25, paces={"burst": Pace(1e6)})
    budget = Budget(store, s, clock=clock, sleep=clock.sleep)
    end = T0 + 3 * 86_400
    while clock.t < end:
        at = datetime.fromtimestamp(clock.t, UTC).isoformat()
        assert budget.paused() is None, at  # the service asks before each job
        budget.report(rng.randrange(10, 1000), 1_000_000)
        for _ in range(rng.randrange(1, 40)):
            budget.before("contacts.search" if system == "hubspot" else "query")
        assert budget.paused() is None, at
        if rng.random() < 0.1:
            budget.settle()  # the end of a run
        clock.t += rng.choice([0.5, 7.0, 59.0, 600.0, 3599.0, 3600.0, 7201.0])
