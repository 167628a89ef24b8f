"""The store's side of the review loop (``syncd conflicts | quarantine | unmapped | blocked``):
reading one held item by id, and the few changes an operator's resolution makes to the inputs
(the next cycle decides on them). Every resolution is also an audit row (:meth:`audit_resolution`)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from syncd.model import utcnow
from syncd.store import schema as s
from syncd.store._base import TxBase
from syncd.store.rows import EventRow, LinkConflictRow, QuarantineRow, UnmappedRow

#: the ``rule`` of an operator's resolution in the audit (the operator's name is in ``after.by``)
OPERATOR_RULE = "operator"


class ReviewTx(TxBase):
    """Held items by id, and an operator's resolutions."""

    def link_conflict(self, id: int) -> LinkConflictRow | None:
        t = s.link_conflicts
        m = self.conn.execute(sa.select(t).where(t.c.id == id)).mappings().first()
        return LinkConflictRow(**m) if m is not None else None

    def quarantine_entry(self, id: int) -> QuarantineRow | None:
        t = s.quarantine
        m = self.conn.execute(sa.select(t).where(t.c.id == id)).mappings().first()
        return QuarantineRow(**m) if m is not None else None

    def dismiss_write(self, outbox_id: int, why: str) -> bool:
        """A quarantined write an operator dismissed: never sent, and a resync does not requeue it
        (state ``dismissed``, ``why`` kept in ``last_error``)."""
        t = s.outbox
        return bool(self.conn.execute(sa.update(t).where(t.c.id == outbox_id, t.c.state == "quarantined")
                                      .values(state="dismissed", last_error=why)).rowcount)

    def unmapped_value(self, system: str, object: str, field: str, value: str) -> UnmappedRow | None:
        t = s.unmapped
        m = self.conn.execute(sa.select(t).where(t.c.system == system, t.c.object == object,
                                                 t.c.field == field, t.c.value == value)).mappings().first()
        return UnmappedRow(**m) if m is not None else None

    def forget_unmapped(self, system: str, object: str, field: str, value: str) -> bool:
        """Drop a value's sightings (it is counted again from zero when seen again)."""
        t = s.unmapped
        return bool(self.conn.execute(sa.delete(t).where(t.c.system == system, t.c.object == object,
                                                         t.c.field == field, t.c.value == value)).rowcount)

    def sample_records(self, system: str, object: str, field: str, value: str, limit: int = 3) -> list[str]:
        """Ids of up to ``limit`` stored records whose raw ``field`` holds ``value``, newest first."""
        t = s.records
        q = (sa.select(t.c.id).where(t.c.system == system, t.c.object == object,
                                     t.c.raw[field].as_string() == value)
             .order_by(t.c.modified_at.desc(), t.c.id).limit(limit))
        return [str(r) for r in self.conn.execute(q).scalars()]

    def event(self, id: int) -> EventRow | None:
        t = s.sla_events
        m = self.conn.execute(sa.select(t).where(t.c.id == id)).mappings().first()
        return EventRow(**m) if m is not None else None

    def audit_resolution(self, *, system: str, object: str, record_id: str | None, field: str,
                         before: Any, after: Mapping[str, Any], reason: str, entity_id: str | None = None,
                         email_norm: str | None = None, now: datetime | None = None) -> int:
        """One audit row for an operator's resolution: rule ``operator``, ``after`` holds what was
        decided and ``by`` (the operator's name), ``reason`` says it in words."""
        return int(self.conn.execute(sa.insert(s.audit).values(
            at=now or utcnow(), entity_id=entity_id, email_norm=email_norm, system=system, object=object,
            record_id=record_id, field=field, before=before, after=dict(after), rule=OPERATOR_RULE,
            reason=reason, mapping_rev="-", outbox_id=None).returning(s.audit.c.id)).scalar_one())
