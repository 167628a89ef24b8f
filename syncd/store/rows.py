"""Rows the state store reads and writes (plain dataclasses, no SQLAlchemy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RecordKey = tuple[str, str, str]  # (system, object, id)


def raw_hash(raw: Mapping[str, Any]) -> str:
    """Stable content hash of a raw record's fields (key order does not matter)."""
    data = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(slots=True)
class RecordRow:
    """One pulled record: raw as the CRM gave it, canonical as mapping produced it.

    ``canonical`` is JSON: ``{"terms": {...}, "values": {...}, "unmapped": [[f, v], ...]}``.
    ``raw_hash`` defaults to :func:`raw_hash` of ``raw``.
    """

    system: str
    object: str
    id: str
    kind: str
    modified_at: datetime
    raw: dict[str, Any]
    canonical: dict[str, Any]
    email_norm: str | None = None
    raw_hash: str = ""
    entity_id: str | None = None
    dirty: bool = False
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.raw_hash:
            self.raw_hash = raw_hash(self.raw)

    @property
    def key(self) -> RecordKey:
        return (self.system, self.object, self.id)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An intended write, as the engine enqueues it. ``key`` is the idempotency key."""

    key: str
    system: str
    object: str
    op: str  # update | create
    fields: Mapping[str, Any]
    rule: str
    reason: str
    mapping_rev: str
    record_id: str | None = None
    entity_id: str | None = None
    email_norm: str | None = None
    clear_first: tuple[str, ...] = ()
    canonical: Mapping[str, tuple[Any, Any] | list[Any]] = field(default_factory=dict)
    # the raw values the target held, as the store knew them, when this was decided (updates)
    basis: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    key: str
    entity_id: str | None
    email_norm: str | None
    system: str
    object: str
    record_id: str | None
    op: str
    fields: dict[str, Any]
    clear_first: tuple[str, ...]
    canonical: dict[str, list[Any]]
    rule: str
    reason: str
    mapping_rev: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    done_at: datetime | None
    result_id: str | None
    basis: dict[str, Any] | None = None  # held raw values of the written fields at decision time
    fence: int | None = None  # the lease token it was (last) sent under

    @property
    def resend(self) -> bool:
        """Handed out before, so the CRM may already hold this write: the row was left
        ``sending`` (a crash after marking it, before ``done``), or an earlier send failed
        (``attempts`` counted; a timeout may come after the CRM applied it), or it failed
        into quarantine and was requeued (attempts reset, ``last_error`` kept).

        Meaningful on rows as :meth:`Tx.due` returns them, before ``mark_sending``.
        """
        return self.state == "sending" or self.attempts > 0 or self.last_error is not None


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    entity_id: str | None
    email_norm: str | None
    system: str
    object: str
    record_id: str | None
    field: str
    before: Any
    after: Any
    rule: str
    reason: str
    mapping_rev: str
    outbox_id: int | None


@dataclass(frozen=True, slots=True)
class RunRow:
    run_id: str
    job: str
    started_at: datetime
    finished_at: datetime | None
    status: str  # running | ok | partial | failed | interrupted
    stats: dict[str, Any]
    error: str | None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class PullStateRow:
    """How complete and fresh the store's copy of one CRM object is."""

    system: str
    object: str
    first_complete_at: datetime | None
    last_ok_at: datetime | None
    last_attempt_at: datetime
    last_error: str | None
    last_error_at: datetime | None
    failing_since: datetime | None


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    id: int
    system: str
    object: str
    record_id: str | None
    kind: str  # record | write
    reason: str
    raw: Any
    at: datetime
    attempts: int
    outbox_id: int | None
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class UnmappedRow:
    system: str
    object: str
    field: str
    value: str
    count: int
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    entity_id: str | None
    kind: str
    at: datetime
    details: dict[str, Any]
    open: bool


@dataclass(frozen=True, slots=True)
class LinkConflictRow:
    id: int
    email_norm: str
    candidates: list[Any]
    detected_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class ResyncRow:
    id: int
    requested_at: datetime
    params: dict[str, Any]
    state: str  # queued | running | done | failed
    picked_by: str | None
    picked_at: datetime | None
    done_at: datetime | None
    result: Any


@dataclass(frozen=True, slots=True)
class HeartbeatRow:
    owner: str
    started_at: datetime
    seen_at: datetime
    pid: int
    info: dict[str, Any]
