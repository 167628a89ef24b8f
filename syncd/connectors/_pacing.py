"""One API budget per CRM, paced ahead of time, shared by threads and by processes on a store.

Every request a connector sends first passes :meth:`Budget.before` (Salesforce's also the
concurrency gate of :meth:`Budget.call`); the connectors report what the CRM answered
(:meth:`Budget.report`, :meth:`Budget.report_burst`, :meth:`Budget.limited`,
:meth:`Budget.exhausted`):

- **Ledger** (:mod:`syncd.store.ledger`): the call is counted per system, endpoint class and
  time bucket. Counts are batched: the process claims a block of ``flush_every`` calls from the
  store's cap in one transaction, spends it locally, and writes what it spent with the next
  claim (every ``flush_every`` calls or ``flush_s`` seconds) and at the end of each run
  (:meth:`Budget.settle`), giving back what it did not use. Claims never pass the cap, so
  several processes on one store never exceed it together.
- **Caps**: syncd's share of the org's daily limit (``daily_share`` x the limit the CRM reports,
  else the configured ``daily_limit``), an optional absolute ``daily_budget``, and ``run_cap``
  calls per cycle or resync. At a cap the call is not sent: :class:`CapReached` (a
  :class:`~syncd.errors.BudgetExhausted`) says until when, in the status line's words.
- **Pacing**: a token bucket per endpoint class (HubSpot ``burst`` and ``search``, Salesforce
  ``api``) and a concurrency gate (Salesforce ``concurrent``). A process paces at its share of
  the rate: the configured rate divided by the processes pacing on the store.
- **Retry-After**: a 429 holds the whole class (every endpoint of it) until its Retry-After and
  halves the class's pace, which recovers gradually (doubling every :data:`RECOVER_S`). The hold
  is written to the store at once, so other processes and later cycles honour it too.
- **The CRMs' numbers**: HubSpot's ``X-HubSpot-RateLimit-*`` headers and Salesforce's
  ``Sforce-Limit-Info`` (plus ``/limits`` at most once per run) replace the assumed org limit,
  lower the burst pace to what the account allows, and show the org's own use next to syncd's.
  When the CRM says the org's limit is spent (429 DAILY, REQUEST_LIMIT_EXCEEDED), this process
  sends nothing more to it for at most an hour.

For planning (``resync --plan``): :func:`would_exceed` and :func:`headroom`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from syncd.errors import AuthError, BudgetExhausted, RateLimited
from syncd.model import OBJECT_GROUPS
from syncd.store.ledger import Hold, Window, utc

log = structlog.get_logger()

SYSTEM_HOLD = "*"  # the hold of a whole system (the org's own limit is spent)
PEER_TTL_S = 30.0  # a pacer not seen on the store for this long no longer takes a share
RECOVER_S = 30.0  # after a 429 the pace doubles back every this many seconds, up to the full rate
MIN_FACTOR = 1 / 16
DEFAULT_HOLD_S = 1.0  # a 429 without Retry-After holds its class this long
PROBE_AGE_S = 300.0  # /limits is read at the start of a run when the last report is older


def classes_of(system: str, endpoint: str) -> tuple[str, ...]:
    """The endpoint classes a call to ``endpoint`` spends from; the first is the one counted.
    A HubSpot search spends from the search limit and from the 10-second burst limit."""
    if system == "hubspot":
        return ("search", "burst") if endpoint.endswith(".search") else ("burst",)
    return ("api",)


BURST_S = 0.25  # a quiet class may send this many seconds' worth at once (at least one call)


@dataclass(frozen=True, slots=True)
class Pace:
    per_s: float


def capacity(rate: float) -> float:
    """Tokens a class may hold: in any window of W seconds it sends at most capacity + rate x W."""
    return max(1.0, rate * BURST_S)


def header_rate(max_: int, interval_s: float) -> float:
    """The fastest pace that keeps any window of ``interval_s`` under ``max_`` calls (95 %)."""
    return min(0.95 * max_ / (interval_s + BURST_S), (max_ - 1) / interval_s)


@dataclass(frozen=True, slots=True)
class Settings:
    system: str
    window: Window
    daily_share: float = 0.5
    daily_limit: int = 15_000  # the org's limit assumed until the CRM reports its own
    daily_budget: int | None = None
    run_cap: int = 0
    paces: Mapping[str, Pace] = field(default_factory=dict)
    concurrency: int = 0  # 0: no gate
    flush_every: int = 50
    flush_s: float = 2.0
    max_wait_s: float = 60.0  # a class held longer than this fails the call (RateLimited)

    def cap(self, org_limit: int | None) -> int:
        share = math.floor(self.daily_share * (org_limit or self.daily_limit))
        return max(0, min(share, self.daily_budget) if self.daily_budget else share)


def settings_of(cfg: Any) -> dict[str, Settings]:
    """The budget settings of both CRMs from a :class:`syncd.config.Config`."""
    hs, sf = cfg.hubspot, cfg.salesforce
    tier = {"starter": 100.0, "professional": 190.0, "enterprise": 190.0}[hs.tier]
    burst_10s = hs.burst_per_10s or 0.9 * tier
    common = {"daily_share": "daily_share", "daily_limit": "daily_limit", "daily_budget": "daily_budget",
              "run_cap": "run_cap"}
    return {
        "hubspot": Settings("hubspot", Window("day", hs.window_s), **{k: getattr(hs, v) for k, v in common.items()},
                            paces={"burst": Pace(burst_10s / 10), "search": Pace(hs.search_per_s)}),
        "salesforce": Settings("salesforce", Window("rolling", sf.window_s),
                               **{k: getattr(sf, v) for k, v in common.items()},
                               paces={"api": Pace(sf.calls_per_s)},
                               concurrency=sf.concurrency),
    }


class CapReached(BudgetExhausted):
    """A cap of syncd's own is reached: nothing is sent to ``system`` until ``until`` (epoch
    seconds; None: the next run). The message is the status line."""

    def __init__(self, message: str, *, system: str, until: float | None) -> None:
        super().__init__(message, system=system)
        self.until = until


def when(t: float, window: Window) -> str:
    fmt = "%Y-%m-%d %H:%M UTC" if window.length_s >= 3600 else "%Y-%m-%d %H:%M:%S UTC"
    return utc(t).strftime(fmt)


def factor_at(hold: Hold | None, now: float) -> float:
    """The pace multiplier of a class ``now``: halved by each 429, doubling back every RECOVER_S."""
    if hold is None:
        return 1.0
    return min(1.0, hold.factor * 2 ** (max(0.0, now - hold.at) / RECOVER_S))


class TokenBucket:
    """Tokens at ``rate`` per second up to :func:`capacity`; a reservation may run into debt, and
    the caller sleeps the debt off (callers are serialised by the Budget's lock)."""

    def __init__(self, rate: float, now: float) -> None:
        self.tokens = capacity(rate)
        self.at = now

    def reserve(self, rate: float, now: float) -> float:
        """Take one token; the seconds to wait before using it."""
        self.tokens = min(capacity(rate), self.tokens + max(0.0, now - self.at) * rate)
        self.at = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / rate

    def drain(self, now: float) -> None:
        self.tokens, self.at = min(self.tokens, 0.0), now


@dataclass
class _Report:
    org_used: int | None = None
    org_limit: int | None = None
    at: float | None = None


class Budget:
    """The budget and pace of one CRM in this process (thread-safe). See the module docstring."""

    def __init__(self, store: Any, settings: Settings, *, owner: str | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.s = settings
        self.system = settings.system
        self.owner = owner or f"{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock, self.sleep = clock, sleep
        self.probe: Callable[[], None] | None = None  # the connector's /limits reader, if it has one
        self._lock = threading.RLock()
        now = clock()
        self._buckets = {k: TokenBucket(p.per_s, now) for k, p in settings.paces.items()}
        self._caps: dict[str, float] = {}  # class -> a lower rate the CRM's headers allow
        self._holds: dict[str, Hold] = {}
        self._pending: Counter[tuple[str, int]] = Counter()
        self._left = 0  # claimed calls not yet spent
        self._claim_bucket: int | None = None
        self._last_sync = -math.inf
        self._peers = 1
        self._claims: dict[int, int] = {}  # the window's claims as last read
        self._spent = 0  # the window's calls in the ledger as last read (written by every process)
        self.report_ = _Report()
        self.run_calls = 0
        self._probed = False
        self._probing = False
        self._paused_logged: float | None = None
        self._gate = threading.Condition()
        self._in_flight = 0
        self._deferred = 0  # > 0: the store is locked by the caller (a dry run's transaction)
        self._local = 0  # calls granted locally while deferred

    # ------------------------------------------------------------------ the call path
    @contextmanager
    def call(self, endpoint: str) -> Iterator[None]:
        """``before`` plus the concurrency gate around the request (Salesforce)."""
        self.before(endpoint)
        if not self.s.concurrency:
            yield
            return
        limit = max(1, self.s.concurrency // self._peers)
        with self._gate:
            self._gate.wait_for(lambda: self._in_flight < limit)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify()

    def before(self, endpoint: str) -> None:
        """Count one call to ``endpoint`` and wait for its pace. Raises :class:`CapReached` (not
        sent: a cap is reached) or RateLimited (its class is held longer than ``max_wait_s``)."""
        classes = classes_of(self.system, endpoint)
        self._maybe_probe()
        now = self.clock()
        with self._lock:
            self._check_holds(classes, now)
            if self._sync_due(now):
                self._sync(now)
                self._check_holds(classes, now)  # holds other processes wrote
            self._spend(classes[0], now)  # counted only once nothing stops it
            wait = max(self._reserve(k, now) for k in classes)
        if wait > 0:
            self.sleep(wait)

    def _maybe_probe(self) -> None:
        probe = self.probe
        if probe is None or self._probed or self._probing:
            return
        self._probed = True
        at = self.report_.at
        if at is not None and self.clock() - at < PROBE_AGE_S:
            return
        self._probing = True
        try:
            probe()
        except (BudgetExhausted, AuthError):  # the call itself would fail the same way: one login, not two
            raise
        except Exception as exc:  # noqa: BLE001 - the limits read is a nicety; the call goes on
            log.warning("api_limits_read_failed", system=self.system, error=str(exc))
        finally:
            self._probing = False

    def _check_holds(self, classes: tuple[str, ...], now: float) -> None:
        whole = self._holds.get(SYSTEM_HOLD)
        if whole is not None and whole.until > now:
            raise CapReached(f"{self.system}: {whole.reason} — paused until {when(whole.until, self.s.window)}",
                             system=self.system, until=whole.until)
        for k in classes:
            h = self._holds.get(k)
            if h is not None and h.until - now > self.s.max_wait_s:
                raise RateLimited(f"{self.system} {k}: held {h.until - now:.0f}s more ({h.reason})",
                                  status=429, retry_after=h.until - now, system=self.system)

    def _spend(self, klass: str, now: float) -> None:
        run_cap = self.s.run_cap
        if run_cap and self.run_calls >= run_cap:
            raise CapReached(f"{self.system}: per-run cap of {run_cap:,} calls reached — the rest waits "
                             "for the next run", system=self.system, until=None)
        bucket = self.s.window.bucket(now)
        if self._left <= 0:
            raise self._paused(now)
        self._left -= 1
        self.run_calls += 1
        self._pending[(klass, bucket)] += 1

    def _sync_due(self, now: float) -> bool:
        return (self._left <= 0 or self.s.window.bucket(now) != self._claim_bucket
                or now - self._last_sync >= self.s.flush_s)

    def _reserve(self, klass: str, now: float) -> float:
        """Seconds until ``klass`` may send: its hold (Retry-After), then its token bucket."""
        pace = self.s.paces.get(klass)
        hold = self._holds.get(klass)
        held = max(0.0, hold.until - now) if hold is not None else 0.0
        if pace is None:
            return held
        rate = min(pace.per_s, self._caps.get(klass, pace.per_s)) * factor_at(hold, now) / self._peers
        return held + self._buckets[klass].reserve(rate, now + held)

    def pace(self, now: float | None = None) -> dict[str, float]:
        """The rate in use per class (calls per second, this process's share)."""
        now = self.clock() if now is None else now
        with self._lock:
            return {k: round(min(p.per_s, self._caps.get(k, p.per_s)) * factor_at(self._holds.get(k), now)
                             / self._peers, 3) for k, p in self.s.paces.items()}

    # ------------------------------------------------------------------ the store
    def cap(self) -> int:
        return self.s.cap(self.report_.org_limit)

    def _org_left(self, now: float) -> int | None:
        r = self.report_
        if r.org_used is None or r.org_limit is None or r.at is None:
            return None
        if self.s.window.kind == "day" and self.s.window.start(r.at) != self.s.window.start(now):
            return None  # reported before the reset
        return max(0, r.org_limit - r.org_used)

    def _sync(self, now: float, *, want: int | None = None, release_all: bool = False) -> None:
        """One transaction: write the pending counts, give back a stale (or, ``release_all``,
        every unused) claim, top the claim up to ``want``, and read back holds and peers."""
        if self._deferred:
            self._grant_locally(now)
            return
        window = self.s.window
        bucket = window.bucket(now)
        release = (self._claim_bucket, self._left) if self._left and self._claim_bucket is not None and (
            release_all or self._claim_bucket != bucket) else None
        left = 0 if release else self._left
        top_up = 0 if release_all else max(0, (self.s.flush_every if want is None else want) - left)
        org_left = self._org_left(now)
        cap = self.cap()
        with self.store.tx() as tx:
            tx.add_api_calls(self.system, self._pending)
            if release is not None:
                tx.release_api_claim(self.system, release[0], release[1])
            granted = 0
            if top_up:
                granted, _ = tx.claim_api_calls(self.system, min(top_up, org_left) if org_left is not None
                                                else top_up, cap, window, now)
            tx.touch_pacer(self.system, self.owner, now)
            peers = tx.live_pacers(self.system, now - PEER_TTL_S)
            tx.put_api_report(self.system, self._report_row(now, cap))
            holds = tx.api_holds(self.system)
            self._claims = tx.api_claims_since(self.system, window.start(now))
            self._spent = sum(tx.api_calls_since(self.system, window.start(now)).values())
        self._pending.clear()
        self._left = left + granted
        self._claim_bucket = bucket if self._left else None
        self._last_sync = now
        self._peers = max(1, peers)
        for (_, k), h in holds.items():
            mine = self._holds.get(k)
            if mine is None or h.at > mine.at or h.until > mine.until:
                self._holds[k] = h

    def _grant_locally(self, now: float) -> None:
        """While the store is locked by our own caller: grant from what the last sync saw."""
        room = self.cap() - sum(self._claims.values()) - self._local
        granted = max(0, min(self.s.flush_every, room))
        self._local += granted
        self._left += granted
        self._claim_bucket = self.s.window.bucket(now)
        self._last_sync = now

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Ledger writes wait until the block ends (a dry run holds the store's write lock)."""
        with self._lock:
            if not self._deferred and self._left:
                self._sync(self.clock(), release_all=True)
            self._deferred += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferred -= 1
                if not self._deferred:
                    spent, self._local = self._local - self._left, 0
                    self._left = 0
                    now = self.clock()
                    with self.store.tx() as tx:
                        tx.add_api_calls(self.system, self._pending)
                        tx.claim_api_calls(self.system, spent, 2**62, self.s.window, now)
                    self._pending.clear()
                    self._claim_bucket = None

    def _report_row(self, now: float, cap: int) -> dict[str, Any]:
        r = self.report_
        return {"org_used": r.org_used, "org_limit": r.org_limit, "reported_at": r.at, "cap": cap,
                "updated_at": now,
                "settings": {"window": self.s.window.kind, "window_s": self.s.window.length_s,
                             "run_cap": self.s.run_cap, "daily_share": self.s.daily_share,
                             "pace": {k: round(min(p.per_s, self._caps.get(k, p.per_s)), 3)
                                      for k, p in self.s.paces.items()}}}

    def _paused(self, now: float) -> CapReached:
        cap = self.cap()
        used = sum(self._claims.values())
        window = self.s.window
        org_left = self._org_left(now)
        if used < cap and org_left is not None and org_left <= 0:  # the org's own limit, as reported
            until = window.end(now) if window.kind == "day" else now + window.bucket_s
            line = (f"{self.system}: the org's daily API limit is spent ({self.report_.org_used or 0:,}/"
                    f"{self.report_.org_limit or 0:,} reported)")
        elif used < cap or self._spent + sum(self._pending.values()) < cap:  # others hold the last claims
            until = now + 2 * self.s.flush_s
            line = (f"{self.system}: daily API share {used:,}/{cap:,} used or claimed by other syncd "
                    "processes")
        else:
            until = window.frees_at(self._claims, used, cap, now)
            line = f"{self.system}: daily API share {used:,}/{cap:,} used"
        line += f" — paused until {when(until, window)}"
        if self._paused_logged != until:
            self._paused_logged = until
            log.error("api_paused", system=self.system, status=line, until=utc(until).isoformat(),
                      next="resumes by itself when the window moves; nothing is decided on one side alone")
        return CapReached(line, system=self.system, until=until)

    def settle(self) -> None:
        """End of a run: write what was spent, give back the unused claim, reset the run's count."""
        with self._lock:
            self.run_calls = 0
            self._probed = False
            if self._pending or self._left:
                self._sync(self.clock(), release_all=True)

    def paused(self) -> CapReached | None:
        """Is this system paused now (a cap, or the org's limit)? Reads the store (a cheap sync)."""
        now = self.clock()
        with self._lock:
            whole = self._holds.get(SYSTEM_HOLD)
            if whole is not None and whole.until > now:
                return CapReached(f"{self.system}: {whole.reason} — paused until {when(whole.until, self.s.window)}",
                                  system=self.system, until=whole.until)
            # want one call in hand: a claim of an earlier bucket is given back by the sync
            # (a new ledger hour), and an empty hand then is no pause unless nothing is granted
            self._sync(now, want=1)
            return self._paused(now) if self._left <= 0 else None

    def close(self) -> None:
        try:
            self.settle()
            with self.store.tx() as tx:
                tx.drop_pacer(self.system, self.owner)
        except Exception as exc:  # noqa: BLE001 - closing must not fail on a store gone away
            log.warning("api_ledger_close_failed", system=self.system, error=str(exc))

    # ------------------------------------------------------------------ what the CRM said
    def limited(self, endpoint: str, retry_after: float | None, reason: str) -> None:
        """A 429 on ``endpoint``: hold its class until Retry-After, halve its pace; persisted."""
        klass = classes_of(self.system, endpoint)[0]
        if klass == "search" and "TEN_SECONDLY" in reason:
            klass = "burst"
        now = self.clock()
        with self._lock:
            factor = max(MIN_FACTOR, factor_at(self._holds.get(klass), now) / 2)
            hold = Hold(now + (retry_after if retry_after is not None else DEFAULT_HOLD_S), factor, reason, now)
            self._holds[klass] = hold
            if klass in self._buckets:
                self._buckets[klass].drain(now)
        log.warning("api_class_held", system=self.system, klass=klass, endpoint=endpoint,
                    hold_s=round(hold.until - now, 3), pace_factor=round(factor, 3), reason=reason)
        self._persist(klass, hold)

    def exhausted(self, reason: str) -> None:
        """The CRM says the org's limit is spent: this process sends nothing more to the system
        for a while (at most one bucket: an hour). Not written to the store: the limit may be
        raised, or reset at the account's midnight rather than UTC's, and the next process (or
        the service after its back-off) finds out with one call."""
        now = self.clock()
        w = self.s.window
        until = min(w.end(now), now + w.bucket_s)
        with self._lock:
            self._holds[SYSTEM_HOLD] = Hold(until, 1.0, reason, now)
        log.error("api_paused", system=self.system, status=f"{self.system}: {reason} — paused until "
                  f"{when(until, w)}", until=utc(until).isoformat())

    def _persist(self, klass: str, hold: Hold) -> None:
        try:
            with self.store.tx() as tx:
                tx.set_api_hold(self.system, klass, hold)
        except Exception as exc:  # noqa: BLE001 - the hold still holds in this process
            log.warning("api_hold_not_stored", system=self.system, error=str(exc))

    def report(self, used: int | None, limit: int | None) -> None:
        """The org's use and limit as the CRM reports them (a response header, /limits)."""
        if used is None or limit is None:
            return
        with self._lock:
            self.report_ = _Report(used, limit, self.clock())

    def report_burst(self, max_: int, remaining: int, interval_ms: int) -> None:
        """HubSpot's burst headers: never pace faster than the account allows, and wait
        a moment when the window is nearly spent (another integration may be busy)."""
        if max_ <= 0 or interval_ms <= 0:
            return
        now = self.clock()
        with self._lock:
            self._caps["burst"] = header_rate(max_, interval_ms / 1000)
            if remaining <= max(1, max_ // 20):
                mine = self._holds.get("burst")
                until = now + min(1.0, interval_ms / 1000 / 10)
                if mine is None or mine.until < until:
                    self._holds["burst"] = Hold(until, mine.factor if mine else 1.0,
                                                f"only {remaining}/{max_} left in the burst window",
                                                mine.at if mine else now - 10 * RECOVER_S)


# ---------------------------------------------------------------------- wiring and reading
def cycle_floor(connectors: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """Per system, the calls one cycle of every object makes at the least, when nothing changed:
    a pull per object (one search page / one queryAll, which brings Salesforce's deaths along), a
    deletion-feed read per object where the pull does not (HubSpot's archive scan, due on the
    first cycle), and the run's ``/limits`` read; with why, in words."""
    out: dict[str, tuple[int, str]] = {}
    for system, conn in connectors.items():
        objs = [o for g in OBJECT_GROUPS for o in OBJECT_GROUPS[g][system]]
        feed = 1 if callable(getattr(conn, "deleted", None)) else 0
        limits = 1 if callable(getattr(conn, "read_limits", None)) else 0
        calls = sum(conn.pull_calls(o, 0) + feed for o in objs) + limits
        each = "a pull" + (" and a deletion-feed read" if feed else "")
        out[system] = (calls, f"{each} for each of {', '.join(objs)}" + (", and the /limits read" if limits else ""))
    return out


def attach(connectors: Mapping[str, Any], store: Any, cfg: Any) -> dict[str, Budget]:
    """Give each connector its :class:`Budget` on ``store`` (connectors read ``self.budget``)."""
    out: dict[str, Budget] = {}
    owner = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"
    for system, settings in settings_of(cfg).items():
        conn = connectors.get(system)
        if conn is None:
            continue
        budget = Budget(store, settings, owner=owner)
        conn.budget = budget
        probe = getattr(conn, "read_limits", None)
        if callable(probe):
            budget.probe = probe
        out[system] = budget
    return out


def settle(connectors: Mapping[str, Any]) -> None:
    """End of a run: every connector's budget writes what was spent and gives back the rest."""
    for conn in connectors.values():
        budget = getattr(conn, "budget", None)
        if isinstance(budget, Budget):
            try:
                budget.settle()
            except Exception as exc:  # noqa: BLE001 - the counts stay pending for the next flush
                log.warning("api_ledger_flush_failed", system=budget.system, error=str(exc))


@contextmanager
def paced(budget: Budget | None, endpoint: str) -> Iterator[None]:
    """:meth:`Budget.call` when the connector has a budget; nothing otherwise (connectors
    built without a store: tests, ``mappings check``)."""
    if budget is None:
        yield
        return
    with budget.call(endpoint):
        yield


@contextmanager
def deferred(connectors: Mapping[str, Any]) -> Iterator[None]:
    """Every connector's ledger writes wait until the block ends (see :meth:`Budget.deferred`)."""
    with contextlib.ExitStack() as stack:
        for conn in connectors.values():
            budget = getattr(conn, "budget", None)
            if isinstance(budget, Budget):
                stack.enter_context(budget.deferred())
        yield


def close(connectors: Mapping[str, Any]) -> None:
    for conn in connectors.values():
        budget = getattr(conn, "budget", None)
        if isinstance(budget, Budget):
            budget.close()


def paused(conn: Any) -> CapReached | None:
    """Is ``conn``'s system paused by a cap or the org's limit (the service asks before a job)?"""
    budget = getattr(conn, "budget", None)
    if not isinstance(budget, Budget):
        return None
    try:
        return budget.paused()
    except CapReached as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a store hiccup: the job's own calls will tell
        log.warning("api_ledger_read_failed", system=budget.system, error=str(exc))
        return None


def backoff_s(exc: BaseException, default: float) -> float:
    """How long a system backs off after ``exc``: until a cap's window frees calls, else ``default``."""
    until = getattr(exc, "until", None)
    if isinstance(until, int | float):
        return max(1.0, until - time.time())
    return 0.0 if isinstance(exc, CapReached) else default  # a per-run cap: the next run goes on


# ---------------------------------------------------------------------- planning (resync --plan)
def headroom(store: Any, cfg: Any, system: str, now: float | None = None) -> tuple[int, int]:
    """(calls left, cap) of ``system`` in its current window: what every process on ``store``
    has spent or claimed, against the cap of ``cfg`` (the org limit as last reported). Read-only."""
    now = time.time() if now is None else now
    s = settings_of(cfg)[system]
    with store.tx(readonly=True) as tx:
        start = s.window.start(now)
        claimed = sum(tx.api_claims_since(system, start).values())
        spent = sum(tx.api_calls_since(system, start).values())
        report = tx.api_reports().get(system) or {}
    cap = s.cap(report.get("org_limit"))
    return max(0, cap - max(claimed, spent)), cap


def would_exceed(store: Any, cfg: Any, estimate: Mapping[str, int], now: float | None = None) -> dict[str, str]:
    """For each system whose ``estimate`` (calls) would pass what is left of its cap in the
    current window, one line saying so (empty: it fits). For ``resync --plan`` / ``--force``."""
    out: dict[str, str] = {}
    for system, calls in sorted(estimate.items()):
        left, cap = headroom(store, cfg, system, now)
        if calls > left:
            window = settings_of(cfg)[system].window.describe()
            out[system] = (f"{system}: about {calls:,} calls needed but only {left:,} of syncd's API share "
                           f"of {cap:,} are left ({window})")
    return out
