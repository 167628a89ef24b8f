"""The API ledger: every CRM call syncd makes, counted in the store, shared by every process on it.

Calls are counted per system, endpoint class and time bucket (``api_calls``); a window is a
run of buckets: HubSpot's is the UTC day (its daily limit resets at midnight), Salesforce's
the rolling 24 hours (hourly buckets: the window is over-counted by at most one bucket, never
under-counted). Increments are UPSERTs (``calls = calls + n``), so concurrent processes never
lose one; the pacer (:mod:`syncd.connectors._pacing`) batches them (one write per N calls).

The cap is kept exact across processes by *claims* (``api_claims``): before spending, a process
claims a block of calls inside the cap in one serialised transaction (a PostgreSQL advisory lock
per system; SQLite's ``BEGIN IMMEDIATE``) and gives back what it did not use at the end of a run.
The claims in a window therefore never exceed the cap, and every call sent was claimed first.
A process that dies holding a claim leaves it counted until the window moves on (conservative).

Also here: holds per endpoint class (a 429's Retry-After and slow-down, persisted so that other
processes and later cycles honour it), the CRMs' own reported numbers, and the pacers alive on
the store (each process paces at its share of the rate).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from syncd.store import schema as s
from syncd.store._base import TxBase

api_calls = sa.Table(
    "api_calls", s.metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("klass", sa.String(32), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),  # epoch seconds of the bucket's start
    sa.Column("calls", sa.BigInteger, nullable=False),
)

api_claims = sa.Table(
    "api_claims", s.metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("calls", sa.BigInteger, nullable=False),
)

api_holds = sa.Table(
    "api_holds", s.metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("klass", sa.String(32), primary_key=True),  # "*": the whole system (org limit spent)
    sa.Column("until", sa.Float, nullable=False),  # epoch seconds
    sa.Column("factor", sa.Float, nullable=False),  # pace multiplier after a 429 (recovers to 1)
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

api_reports = sa.Table(
    "api_reports", s.metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("org_used", sa.BigInteger, nullable=True),  # the CRM's own count of the org's calls
    sa.Column("org_limit", sa.BigInteger, nullable=True),
    sa.Column("reported_at", sa.Float, nullable=True),
    sa.Column("cap", sa.BigInteger, nullable=True),  # syncd's cap in force (share x limit, budget)
    sa.Column("settings", s.JSONType, nullable=False),  # window, pace per class, run cap
    sa.Column("updated_at", sa.Float, nullable=False),
)

api_pacers = sa.Table(
    "api_pacers", s.metadata,
    sa.Column("system", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),
)

LEDGER_TABLES = (api_calls, api_claims, api_holds, api_reports, api_pacers)


def create_tables(conn: sa.Connection) -> None:
    """Schema step: the ledger's tables."""
    s.metadata.create_all(conn, tables=list(LEDGER_TABLES), checkfirst=True)


@dataclass(frozen=True, slots=True)
class Window:
    """A budget window: ``day`` (fixed, aligned to the epoch: UTC midnight for 86,400 s) or
    ``rolling`` (the last ``length_s``), counted in buckets of ``length_s / 24``."""

    kind: str  # "day" | "rolling"
    length_s: int = 86_400

    @property
    def bucket_s(self) -> int:
        return max(1, self.length_s // 24)

    def bucket(self, t: float) -> int:
        return int(t // self.bucket_s) * self.bucket_s

    def start(self, t: float) -> int:
        """The first bucket counted in the window at ``t``."""
        if self.kind == "day":
            return int(t // self.length_s) * self.length_s
        return self.bucket(t) - self.length_s  # the oldest bucket still partly in the window

    def end(self, t: float) -> float:
        """When the window at ``t`` ends: the next reset (``day``), or ``t + length`` (rolling)."""
        if self.kind == "day":
            return float(self.start(t) + self.length_s)
        return t + self.length_s

    def frees_at(self, buckets: Mapping[int, int], used: int, cap: int, t: float) -> float:
        """When a quarter of ``cap`` (at least one call) is free again of the calls counted in
        ``buckets``: a rolling window resumes with room for real work, not one call at a time
        (a day window: at its end)."""
        if self.kind == "day":
            return self.end(t)
        left = used
        for b in sorted(buckets):
            left -= buckets[b]
            if left <= cap - max(1, cap // 4):
                return float(b + self.length_s + self.bucket_s)
        return float(self.bucket(t) + self.length_s + self.bucket_s)

    def describe(self) -> str:
        if self.length_s == 86_400:
            return "UTC day" if self.kind == "day" else "rolling 24 h"
        return f"{self.kind} {self.length_s}s"


@dataclass(frozen=True, slots=True)
class Hold:
    until: float
    factor: float
    reason: str
    at: float


def _lock_key(system: str) -> int:
    return 0x6C6564 << 32 | zlib.crc32(system.encode())  # "led" + the system


class LedgerTx(TxBase):
    """The API ledger's store operations (see the module docstring)."""

    # ---------------------------------------------------------------------- counting
    def _upsert_add(self, table: sa.Table, keys: dict[str, Any], n: int) -> None:
        ins = self._insert(table).values(**keys, calls=n)
        self.conn.execute(ins.on_conflict_do_update(
            index_elements=list(keys), set_={"calls": table.c.calls + ins.excluded.calls}))

    def add_api_calls(self, system: str, counts: Mapping[tuple[str, int], int]) -> None:
        """Add ``counts`` ((class, bucket) -> calls) to the ledger: atomic increments."""
        for (klass, bucket), n in sorted(counts.items()):
            if n:
                self._upsert_add(api_calls, {"system": system, "klass": klass, "bucket": bucket}, n)

    def api_calls_since(self, system: str, start: int) -> dict[tuple[str, int], int]:
        """(class, bucket) -> calls, for the buckets from ``start`` on."""
        t = api_calls
        rows = self.conn.execute(sa.select(t.c.klass, t.c.bucket, t.c.calls).where(
            t.c.system == system, t.c.bucket >= start))
        return {(k, int(b)): int(n) for k, b, n in rows}

    # ---------------------------------------------------------------------- claims (the cap)
    def _serialise(self, system: str) -> None:
        if self.dialect == "postgresql":
            self.conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(system))))

    def api_claims_since(self, system: str, start: int) -> dict[int, int]:
        t = api_claims
        rows = self.conn.execute(sa.select(t.c.bucket, t.c.calls).where(
            t.c.system == system, t.c.bucket >= start))
        return {int(b): int(n) for b, n in rows if n}

    def claim_api_calls(self, system: str, want: int, cap: int, window: Window, now: float) -> tuple[int, int]:
        """Claim up to ``want`` calls within ``cap`` for ``window`` at ``now``. Serialised per
        system, so the claims in a window never pass the cap whatever runs beside. Returns
        (granted, claimed in the window after this claim)."""
        self._serialise(system)
        used = sum(self.api_claims_since(system, window.start(now)).values())
        # at most a quarter of what is left: near the cap no process holds calls the others need
        granted = max(0, min(want, cap - used, max(1, (cap - used) // 4)))
        if granted:
            self._upsert_add(api_claims, {"system": system, "bucket": window.bucket(now)}, granted)
        return granted, used + granted

    def release_api_claim(self, system: str, bucket: int, n: int) -> None:
        """Give back ``n`` claimed calls that were not spent."""
        if n <= 0:
            return
        t = api_claims
        self.conn.execute(sa.update(t).where(t.c.system == system, t.c.bucket == bucket).values(
            calls=sa.case((t.c.calls > n, t.c.calls - n), else_=0)))

    # ---------------------------------------------------------------------- holds
    def set_api_hold(self, system: str, klass: str, hold: Hold) -> None:
        """Record a hold on ``klass`` (keeps the later ``until`` of the two)."""
        t = api_holds
        ins = self._insert(t).values(system=system, klass=klass, until=hold.until, factor=hold.factor,
                                     reason=hold.reason, at=hold.at)
        later = ins.excluded.until > t.c.until
        self.conn.execute(ins.on_conflict_do_update(index_elements=["system", "klass"], set_={
            "until": sa.case((later, ins.excluded.until), else_=t.c.until),
            "reason": sa.case((later, ins.excluded.reason), else_=t.c.reason),
            "factor": ins.excluded.factor, "at": ins.excluded.at}))

    def api_holds(self, system: str | None = None) -> dict[tuple[str, str], Hold]:
        t = api_holds
        q = sa.select(t.c.system, t.c.klass, t.c.until, t.c.factor, t.c.reason, t.c.at)
        if system is not None:
            q = q.where(t.c.system == system)
        return {(sy, k): Hold(float(u), float(f), r, float(a)) for sy, k, u, f, r, a in self.conn.execute(q)}

    # ---------------------------------------------------------------------- reports and pacers
    def put_api_report(self, system: str, values: Mapping[str, Any]) -> None:
        """The latest the CRM reported (org use and limit) and the cap and settings in force."""
        t = api_reports
        ins = self._insert(t).values(system=system, **values)
        self.conn.execute(ins.on_conflict_do_update(index_elements=["system"], set_=dict(values)))

    def api_reports(self) -> dict[str, dict[str, Any]]:
        t = api_reports
        return {r["system"]: dict(r) for r in self.conn.execute(sa.select(t)).mappings()}

    def touch_pacer(self, system: str, owner: str, now: float) -> None:
        t = api_pacers
        ins = self._insert(t).values(system=system, owner=owner, seen_at=now)
        self.conn.execute(ins.on_conflict_do_update(index_elements=["system", "owner"], set_={"seen_at": now}))

    def drop_pacer(self, system: str, owner: str) -> None:
        t = api_pacers
        self.conn.execute(sa.delete(t).where(t.c.system == system, t.c.owner == owner))

    def live_pacers(self, system: str, since: float) -> int:
        t = api_pacers
        self.conn.execute(sa.delete(t).where(t.c.system == system, t.c.seen_at < since - 3600))
        return int(self.conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.system == system, t.c.seen_at >= since)).scalar_one())


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)
