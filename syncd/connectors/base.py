"""The connector Protocol: what syncd needs from a CRM, nothing more."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from syncd.model import ApiUsage, Cursor, FieldUpdate, Page, RawRecord, RecordCreate, WriteResult


class Connector(Protocol):
    system: str
    usage: ApiUsage

    def objects(self) -> Sequence[str]:
        """Object names this connector pulls (the CRM's own names)."""
        ...

    def iter_changes(self, obj: str, since: Cursor | None, *, overlap: timedelta) -> Iterator[Page]:
        """Records of ``obj`` modified at or after ``since.modified_at - overlap``,
        in (modified_at, id) order, page by page (bounded memory). Never drops a
        record sharing the cursor's timestamp; duplicates are allowed."""
        ...

    def fetch(self, obj: str, ids: Sequence[str]) -> list[RawRecord]:
        """Current state of the given records (batched). Missing ids are left out."""
        ...

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        """Records whose email matches one of ``emails`` (normalised, lower-case)."""
        ...

    def write(self, obj: str, updates: Sequence[FieldUpdate]) -> list[WriteResult]:
        """Apply updates in as few calls as the CRM allows; one result per update, same order."""
        ...

    def create(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        """Create records; one result per create, same order."""
        ...

    def allowed_values(self) -> dict[tuple[str, str], list[str]]:
        """(object, field) -> the values the CRM allows for the fields syncd maps."""
        ...

    def count(self, obj: str, *, since: datetime | None = None,
              until: datetime | None = None) -> int:
        """How many records of ``obj`` the CRM holds, modified in ``[since, until]`` when
        given (one cheap call: HubSpot search ``total``, SOQL ``COUNT()``)."""
        ...

    def iter_ids(self, obj: str) -> Iterator[list[tuple[str, datetime]]]:
        """Every (id, modified_at) of ``obj``, page by page (for ``syncd reconcile``)."""
        ...

    def pull_calls(self, obj: str, records: int) -> int:
        """The API calls a pull of ``records`` records of ``obj`` makes (for cost plans)."""
        ...

    def fetch_calls(self, obj: str, records: int) -> int:
        """The API calls :meth:`fetch` of ``records`` ids makes."""
        ...

    def write_calls(self, obj: str, writes: int) -> int:
        """The API calls sending ``writes`` updates of ``obj`` makes, at least."""
        ...

    def close(self) -> None: ...
