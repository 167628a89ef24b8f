"""Shapes shared by every layer: raw records as pulled, cursors, pages, writes.

Raw records keep the CRM's own field names and values; canonical terms are
produced by :mod:`syncd.mapping` and decisions by :mod:`syncd.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncd import catalogue

System = catalogue.System
SYSTEMS: tuple[System, ...] = catalogue.SYSTEMS

# Object names are the CRM's own (see syncd.catalogue). The CLI's --object groups them:
# group -> system -> objects, read from the catalogue.
OBJECT_GROUPS: dict[str, dict[str, tuple[str, ...]]] = catalogue.object_groups()


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalise_email(email: str | None) -> str | None:
    """The identity key: trimmed, lower-cased; None when empty."""
    if email is None:
        return None
    e = email.strip().lower()
    return e or None


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Incremental-pull watermark: (modification time, id). Compare as a tuple."""

    modified_at: datetime
    id: str

    def to_json(self) -> dict[str, str]:
        return {"modified_at": self.modified_at.isoformat(), "id": self.id}

    @classmethod
    def from_json(cls, d: Mapping[str, str]) -> Cursor:
        return cls(datetime.fromisoformat(d["modified_at"]), d["id"])


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as the CRM returned it (values untouched; HubSpot's are strings)."""

    system: str
    object: str
    id: str
    modified_at: datetime  # tz-aware UTC
    fields: Mapping[str, Any]

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.modified_at, self.id)


@dataclass(slots=True)
class Page:
    """A page of changed records, in (modified_at, id) order."""

    records: list[RawRecord]
    # how many records the whole pull reads, when the CRM's first answer says (progress displays)
    total: int | None = None
    # records of the page's time range the CRM says died (Salesforce's queryAll pull reads the
    # deleted and merged-away rows with the live ones: one query for both)
    deleted: list[Deletion] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FieldUpdate:
    """Update raw fields of one existing record. ``key`` correlates the result (outbox id).

    ``clear_first`` names fields that must be cleared in a separate, earlier
    request (HubSpot refuses to move lifecyclestage backwards otherwise).
    """

    key: str
    record_id: str
    fields: Mapping[str, Any]
    clear_first: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordCreate:
    """Create a record (hand-off). ``key`` is the idempotency key. ``upsert_on``: an External
    ID field syncd owns whose value (in ``fields``) is unique per create: the CRM upserts on
    it, so a create sent twice (a lost answer, a stalled daemon) makes one record."""

    key: str
    fields: Mapping[str, Any]
    upsert_on: str | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    key: str
    ok: bool
    record_id: str | None = None
    error: str | None = None  # the CRM's own error code + message, one line
    retriable: bool = False


@dataclass(slots=True)
class ApiUsage:
    """Calls this process made, by endpoint, and what the CRM reports of its budget."""

    calls: dict[str, int] = field(default_factory=dict)
    rate_limited: dict[str, int] = field(default_factory=dict)
    reported_used: int | None = None
    reported_limit: int | None = None

    def count(self, endpoint: str) -> None:
        self.calls[endpoint] = self.calls.get(endpoint, 0) + 1

    def limited(self, endpoint: str) -> None:
        """The CRM refused a call to ``endpoint`` for its rate or daily limit."""
        self.rate_limited[endpoint] = self.rate_limited.get(endpoint, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())


RecordKind = catalogue.RecordKind


@dataclass(frozen=True, slots=True)
class CanonicalRecord:
    """One CRM record translated into glossary terms by :mod:`syncd.mapping`.

    ``terms`` holds glossary terms (None = the CRM value was unmapped/unknown, never guessed):
      person: ``lifecycle`` (subscriber|lead|mql|sal|sql|opportunity|customer by default),
              ``lead_status`` (new|attempting|connected|returned_not_ready|disqualified|converted),
              ``lead_type``
      deal:   ``deal_stage`` (exploration|quote_building|quote_presented|closed_won|closed_lost|on_hold)
    ``values`` holds plain canonical values:
      person: email (normalised), first_name, last_name, company, lead_source, score (int|None),
              return_reason, bofu_conversion_at (datetime|None), is_converted (bool),
              converted_contact_id, converted_opportunity_id
      deal:   name, amount (float|None), close_date, contact_ids (list[str], same-system person ids)
      attempt (Salesforce Task): who_id, type, at (datetime), counts (bool: an agreed connection attempt)
    ``unmapped`` lists (raw field, raw value) pairs no mapping names.
    """

    system: str
    object: str
    id: str
    kind: RecordKind
    modified_at: datetime
    terms: Mapping[str, str | None] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    unmapped: tuple[tuple[str, str], ...] = ()

    @property
    def email(self) -> str | None:
        v = self.values.get("email")
        return v if isinstance(v, str) else None


@dataclass(frozen=True, slots=True)
class Deletion:
    """A record the CRM no longer has: deleted (archived), or merged into ``merged_into``
    (a Salesforce MasterRecordId, a HubSpot ``hs_merged_object_ids`` survivor). ``source``
    names the feed or answer that told syncd (``queryAll``, ``archive``, ``merged_ids``,
    ``write answer``, ``re-pull``). ``confirmed`` is False where the CRM only stopped
    answering for the id (not in its recycle bin, no merge: purged, or no longer visible to
    syncd's user): syncd stops writing to it, but never deletes a twin on that word alone."""

    system: str
    object: str
    id: str
    deleted_at: datetime | None = None
    merged_into: str | None = None
    source: str = "feed"
    confirmed: bool = True

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.system, self.object, self.id)
