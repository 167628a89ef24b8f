"""Salesforce connector on simple-salesforce 1.12.10 (REST v59.0, direct session auth).

Pulls with one SOQL query per object and cycle (``SystemModstamp >= since - overlap
ORDER BY SystemModstamp, Id``), paged by query locators; writes with sObject
Collections (200 records per call, ``allOrNone: false``). Vendor errors become
:mod:`syncd.errors` here and nowhere else:

- 401 / ``SalesforceExpiredSession`` -> :class:`AuthError` (no re-login: direct session auth).
- 403 ``REQUEST_LIMIT_EXCEEDED`` -> :class:`BudgetExhausted`. It is the org's rolling
  24-hour budget and Salesforce sends no Retry-After, so waiting minutes is pointless.
- 5xx, connection errors, timeouts -> :class:`RetriableError` (retried by the shared policy).
- Anything else -> :class:`FatalError` with the Salesforce errorCode and message on one line.
- Per-record failures inside a collection -> a failed :class:`WriteResult`, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import requests
import structlog
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceError,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceRefusedRequest,
)

from syncd import catalogue
from syncd.connectors._errors import NotRetried, call, lost_answer, may_be_applied
from syncd.connectors._pacing import Budget, paced
from syncd.connectors._retry import RetryPolicy
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RetriableError
from syncd.model import ApiUsage, Cursor, FieldUpdate, Page, RawRecord, RecordCreate, WriteResult

log = structlog.get_logger()

T = TypeVar("T")

SYSTEM = "salesforce"
COLLECTION_LIMIT = 200  # sObject Collections: records per call
IN_CHUNK = 200  # values per SOQL IN (...) clause, keeps the GET URL well under 16k characters
RETRIABLE_RECORD_CODES = frozenset(
    {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "REQUEST_RUNNING_TOO_LONG"}
)
_TRANSPORT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def soql_literal(value: str) -> str:
    """A quoted SOQL string literal (backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def soql_datetime(dt: datetime) -> str:
    """An unquoted SOQL datetime in UTC, floored to the second (never later than ``dt``)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- streams
class SObjectStream:
    """One sObject type, in the spirit of singer-sdk's ``Stream``.

    ``name`` picks the catalogue row, which gives the primary key and the
    replication key; an instance holds the fields the mappings need (plus both
    keys) and writes the SOQL of its pulls and look-ups.
    """

    name: ClassVar[str]
    primary_key: ClassVar[str]
    replication_key: ClassVar[str]
    email_field: ClassVar[str] = "Email"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        row = catalogue.get(SYSTEM, cls.name)
        cls.primary_key, cls.replication_key = row.key, row.cursor

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = _with_keys(fields, (self.primary_key, self.replication_key))

    def _select(self) -> str:
        return f"SELECT {', '.join(self.fields)} FROM {self.name}"

    def changes(self, since: Cursor | None, overlap: timedelta) -> str:
        """Records modified at or after ``since - overlap``, in (cursor, id) order."""
        rk = self.replication_key
        where = "" if since is None else f" WHERE {rk} >= {soql_datetime(since.modified_at - overlap)}"
        return f"{self._select()}{where} ORDER BY {rk}, {self.primary_key}"

    def where_in(self, field: str, values: Sequence[str]) -> str:
        return f"{self._select()} WHERE {field} IN ({', '.join(soql_literal(v) for v in values)})"


class Lead(SObjectStream):
    name = "Lead"


class Contact(SObjectStream):
    name = "Contact"


class Opportunity(SObjectStream):
    name = "Opportunity"


class Task(SObjectStream):
    name = "Task"


STREAMS: dict[str, type[SObjectStream]] = {s.name: s for s in (Lead, Contact, Opportunity, Task)}


class QueryLocatorPaginator:
    """Paging of one SOQL query by ``nextRecordsUrl``; refuses a repeated locator."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def next_url(self, result: dict[str, Any]) -> str | None:
        """The locator of the next batch, None after the last one."""
        if result.get("done", True):
            return None
        url = result.get("nextRecordsUrl")
        if not url:
            raise FatalError("salesforce: query answered done=false without nextRecordsUrl",
                             system=SYSTEM)
        if url in self.seen:
            raise FatalError(f"salesforce: query locator repeated ({url}); refusing to loop",
                             system=SYSTEM)
        self.seen.add(url)
        return str(url)


class SalesforceConnector:
    """The :class:`~connectors.base.Connector` for Salesforce: one :class:`SObjectStream` per object."""

    system = SYSTEM
    budget: Budget | None = None  # the API ledger and pace (syncd.connectors._pacing.attach)

    def __init__(
        self,
        instance_url: str,
        session_id: str,
        *,
        ca_bundle: str | None,
        fields: dict[str, list[str]],
        retry: RetryPolicy,
        timeout: float = 30.0,
    ) -> None:
        unknown = set(fields) - set(STREAMS)
        if unknown:
            raise FatalError(f"salesforce: unsupported objects {sorted(unknown)}", system=SYSTEM)
        self._session = requests.Session()
        self._session.verify = ca_bundle if ca_bundle else True
        # REQUESTS_CA_BUNDLE / proxies from the environment would override verify (crm-api.md §3)
        self._session.trust_env = False
        self._sf = Salesforce(
            instance_url=instance_url, session_id=session_id, session=self._session
        )
        self._streams = {obj: STREAMS[obj](fs) for obj, fs in fields.items()}
        self._retry = retry
        self._timeout = timeout
        self.usage = ApiUsage()

    # ------------------------------------------------------------------ Connector
    def objects(self) -> Sequence[str]:
        return list(self._streams)

    def iter_changes(self, obj: str, since: Cursor | None, *, overlap: timedelta) -> Iterator[Page]:
        stream = self._stream(obj)
        pages = records = 0
        for batch in self._query_pages(stream.changes(since, overlap)):
            pages += 1
            records += len(batch)
            yield Page([self._record(stream, r) for r in batch])
        log.info(
            "salesforce.pulled",
            object=obj,
            records=records,
            pages=pages,
            since=since.modified_at.isoformat() if since else None,
        )

    def fetch(self, obj: str, ids: Sequence[str]) -> list[RawRecord]:
        return self._query_in(obj, lambda s: s.primary_key, list(dict.fromkeys(ids)))

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        """Salesforce compares strings case-insensitively, so normalised emails match as stored."""
        return self._query_in(obj, lambda s: s.email_field, list(dict.fromkeys(e for e in emails if e)))

    def write(self, obj: str, updates: Sequence[FieldUpdate]) -> list[WriteResult]:
        """sObject Collections PATCH, 200 per call, ``allOrNone: false``.

        ``clear_first`` is ignored: Salesforce has no forward-only rule, and the
        final values are in ``fields`` (a null there clears the field).
        """
        results: list[WriteResult] = []
        for chunk in _chunks(list(updates), COLLECTION_LIMIT):
            body = {
                "allOrNone": False,
                "records": [
                    {"attributes": {"type": obj}, "id": u.record_id, **u.fields} for u in chunk
                ],
            }
            # PATCH with the same values is idempotent, so transport failures are retried
            saves = self._call(
                "collections.update",
                self._sf.restful,
                "composite/sobjects",
                method="PATCH",
                json=body,
            )
            results.extend(_results([u.key for u in chunk], [u.record_id for u in chunk], saves))
        return results

    def create(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        """sObject Collections POST. A create whose answer was lost is NOT retried here
        (it may have been applied); the caller sees a RetriableError and decides."""
        results: list[WriteResult] = []
        for chunk in _chunks(list(creates), COLLECTION_LIMIT):
            body = {
                "allOrNone": False,
                "records": [{"attributes": {"type": obj}, **c.fields} for c in chunk],
            }
            saves = self._call(
                "collections.create",
                self._sf.restful,
                "composite/sobjects",
                method="POST",
                json=body,
                idempotent=False,
            )
            results.extend(_results([c.key for c in chunk], [None] * len(chunk), saves))
        return results

    def allowed_values(self) -> dict[tuple[str, str], list[str]]:
        out: dict[tuple[str, str], list[str]] = {}
        for obj, stream in self._streams.items():
            desc = self._call("describe", self._sf.restful, f"sobjects/{obj}/describe")
            wanted = set(stream.fields)
            for f in (desc or {}).get("fields", []):
                if f.get("name") in wanted and f.get("type") in ("picklist", "multipicklist"):
                    out[(obj, f["name"])] = [
                        p["value"] for p in f.get("picklistValues", []) if p.get("active", True)
                    ]
        return out

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ internals
    def _stream(self, obj: str) -> SObjectStream:
        try:
            return self._streams[obj]
        except KeyError:
            raise FatalError(
                f"salesforce: object {obj!r} is not configured "
                f"(configured: {', '.join(self._streams)})",
                system=SYSTEM,
            ) from None

    def _query_in(self, obj: str, field: Callable[[SObjectStream], str],
                  values: list[str]) -> list[RawRecord]:
        """Records of ``obj`` whose ``field`` is one of ``values``, IN_CHUNK values per query."""
        out: list[RawRecord] = []
        for chunk in _chunks(values, IN_CHUNK):
            stream = self._stream(obj)
            for batch in self._query_pages(stream.where_in(field(stream), chunk)):
                out.extend(self._record(stream, r) for r in batch)
        return out

    def _query_pages(self, soql: str) -> Iterator[list[dict[str, Any]]]:
        """One SOQL query, batch by batch through query locators (:class:`QueryLocatorPaginator`)."""
        result = self._call("query", self._sf.query, soql)
        pager = QueryLocatorPaginator()
        while True:
            yield list(result.get("records", []))
            url = pager.next_url(result)
            if url is None:
                return
            result = self._call("query_more", self._sf.query_more, url, identifier_is_url=True)

    def _record(self, stream: SObjectStream, r: dict[str, Any]) -> RawRecord:
        fields = {k: v for k, v in r.items() if k != "attributes"}
        return RawRecord(
            system=self.system,
            object=stream.name,
            id=str(r[stream.primary_key]),
            modified_at=_parse_datetime(str(r[stream.replication_key])),
            fields=fields,
        )

    def _call(
        self, endpoint: str, fn: Callable[..., T], *args: Any, idempotent: bool = True, **kw: Any
    ) -> T:
        """Call simple-salesforce under the retry policy, translating every failure once."""

        def attempt() -> T:
            with paced(self.budget, endpoint):  # ledger, pace, concurrency; CapReached: not sent
                return sent()

        def sent() -> T:
            self.usage.count(endpoint)
            try:
                value = fn(*args, timeout=self._timeout, **kw)
            except _TRANSPORT as e:
                err = RetriableError(f"salesforce {endpoint}: {type(e).__name__}: {e}", system=SYSTEM)
                raise lost_answer(err, idempotent=idempotent) from e
            except SalesforceError as e:
                failure = self._translate(endpoint, e)
                # A 5xx answer to a create does not say whether it was applied: report it
                # rather than send it again here (the outbox's resend looks the email up).
                if may_be_applied(failure, idempotent=idempotent):
                    raise NotRetried(failure) from e
                raise failure from e
            self._note_usage()
            return value

        return call(self._retry, f"salesforce.{endpoint}", attempt)

    def _note_usage(self) -> None:
        usage = self._sf.api_usage.get("api-usage")
        if usage is not None:
            self.usage.reported_used = int(usage.used)
            self.usage.reported_limit = int(usage.total)
            if self.budget is not None:
                self.budget.report(self.usage.reported_used, self.usage.reported_limit)

    def read_limits(self) -> None:
        """``/limits`` (the budget reads it at most once per run): the org's daily API use and limit."""
        daily = (self._call("limits", self._sf.limits) or {}).get("DailyApiRequests") or {}
        if self.budget is not None and isinstance(daily.get("Max"), int) and isinstance(daily.get("Remaining"), int):
            self.budget.report(daily["Max"] - daily["Remaining"], daily["Max"])

    def _translate(self, endpoint: str, e: SalesforceError) -> Exception:
        code, message = _error_of(e)
        line = f"salesforce {endpoint}: HTTP {e.status} {code}: {message}"
        if isinstance(e, SalesforceExpiredSession):
            return AuthError(line + " (renew the session id; direct session auth cannot re-login)",
                             system=SYSTEM)
        if code == "REQUEST_LIMIT_EXCEEDED":
            self.usage.limited(endpoint)
            if self.budget is not None:
                self.budget.exhausted("Salesforce reports the org's API request limit spent (REQUEST_LIMIT_EXCEEDED)")
            used = self.usage.reported_used
            limit = self.usage.reported_limit
            seen = f"; last reported usage {used}/{limit}" if used is not None else ""
            return BudgetExhausted(
                "salesforce daily API request limit exhausted (REQUEST_LIMIT_EXCEEDED"
                + seen
                + "). Salesforce sends no Retry-After; calls free up as the rolling 24-hour "
                "window moves or when the org's limit is raised.",
                system=SYSTEM,
            )
        if isinstance(e, SalesforceGeneralError) and e.status == 429:
            if self.budget is not None:
                self.budget.limited(endpoint, None, line)
            return RateLimited(line, status=e.status, body=str(e.content), system=SYSTEM)
        if isinstance(e, SalesforceGeneralError) and e.status >= 500:
            return RetriableError(line, status=e.status, body=str(e.content), system=SYSTEM)
        if isinstance(e, SalesforceRefusedRequest):
            return FatalError(line, system=SYSTEM)
        return FatalError(line, system=SYSTEM)


# ---------------------------------------------------------------------- helpers
def _with_keys(fields: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The keys (Id, SystemModstamp: needed for cursors), then the configured fields, no duplicates."""
    out = list(keys)
    for f in fields:
        if f.lower() not in {o.lower() for o in out}:
            out.append(f)
    return out


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _parse_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _error_of(e: SalesforceError) -> tuple[str, str]:
    content = e.content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        return str(first.get("errorCode", "UNKNOWN")), str(first.get("message", "")).replace(
            "\n", " "
        )
    return "UNKNOWN", str(content).replace("\n", " ")[:300]


def _results(keys: list[str], ids: list[str | None], saves: Any) -> list[WriteResult]:
    if not isinstance(saves, list) or len(saves) != len(keys):
        got = len(saves) if isinstance(saves, list) else type(saves).__name__
        raise FatalError(f"salesforce collections: expected {len(keys)} SaveResults, got {got}",
                         system=SYSTEM)
    out: list[WriteResult] = []
    for key, rid, save in zip(keys, ids, saves, strict=True):
        if save.get("success"):
            out.append(WriteResult(key=key, ok=True, record_id=save.get("id") or rid))
            continue
        errors = save.get("errors") or [{}]
        first = errors[0]
        code = str(first.get("statusCode", "UNKNOWN"))
        fields = first.get("fields") or []
        detail = f" (fields: {', '.join(fields)})" if fields else ""
        out.append(
            WriteResult(
                key=key,
                ok=False,
                record_id=rid,
                error=f"{code}: {first.get('message', '')}{detail}",
                retriable=code in RETRIABLE_RECORD_CODES,
            )
        )
    return out
