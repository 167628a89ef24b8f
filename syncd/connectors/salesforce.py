"""Salesforce connector on simple-salesforce 1.12.10 (REST v59.0; tokens from :mod:`connectors.auth`).

Pulls with one SOQL queryAll per object and cycle (``SystemModstamp >= since - overlap
ORDER BY SystemModstamp, Id``), paged by query locators: the live rows are the changes, the
``IsDeleted`` ones (with ``MasterRecordId`` for a merge) the deaths, so one query serves both
(a delete moves ``SystemModstamp``; the recycle bin keeps deleted rows 30 days); writes with sObject
Collections (200 records per call, ``allOrNone: false``). Vendor errors become
:mod:`syncd.errors` here and nowhere else:

- 401 / ``SalesforceExpiredSession`` -> one re-login through the token provider (single-flight)
  and the call again; :class:`AuthError` when the re-login is refused, or with ``session`` auth.
- 403 ``REQUEST_LIMIT_EXCEEDED`` -> :class:`BudgetExhausted`. It is the org's rolling
  24-hour budget and Salesforce sends no Retry-After, so waiting minutes is pointless.
- 5xx, connection errors, timeouts -> :class:`RetriableError` (retried by the shared policy).
- Anything else -> :class:`FatalError` with the Salesforce errorCode and message on one line.
- Per-record failures inside a collection -> a failed :class:`WriteResult`, never an exception.
"""

from __future__ import annotations

import email.utils
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
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from syncd import catalogue
from syncd.connectors._deletes import delete_each
from syncd.connectors._errors import NotRetried, Peer, call, may_be_applied
from syncd.connectors._pacing import Budget, paced
from syncd.connectors._retry import RetryPolicy
from syncd.connectors.auth import StaticToken, Token, TokenProvider
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RetriableError
from syncd.model import ApiUsage, Cursor, Deletion, FieldUpdate, Page, RawRecord, RecordCreate, WriteResult

log = structlog.get_logger()

T = TypeVar("T")

SYSTEM = "salesforce"
COLLECTION_LIMIT = 200  # sObject Collections: records per call
IN_CHUNK = 200  # values per SOQL IN (...) clause, keeps the GET URL well under 16k characters
# getDeleted and queryAll reach back this far (the recycle bin; older deletions are gone)
DELETED_WINDOW = timedelta(days=30)
QUERY_BATCH = 2000  # records per query batch: Salesforce's default (syncd sends no batchSize option)
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
    merges: ClassVar[bool] = False  # merged records are deleted with MasterRecordId set

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        row = catalogue.get(SYSTEM, cls.name)
        cls.primary_key, cls.replication_key = row.key, row.cursor

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = _with_keys(fields, (self.primary_key, self.replication_key))

    def _select(self) -> str:
        return f"SELECT {', '.join(self.fields)} FROM {self.name}"

    @property
    def death_fields(self) -> tuple[str, ...]:
        """What a queryAll row says of its death: ``IsDeleted`` (and who it merged into)."""
        return ("IsDeleted", "MasterRecordId") if self.merges else ("IsDeleted",)

    def changes(self, since: Cursor | None, overlap: timedelta) -> str:
        """For queryAll: records modified at or after ``since - overlap``, the deleted and merged
        away ones too (a delete moves ``SystemModstamp``), in (cursor, id) order."""
        rk = self.replication_key
        where = "" if since is None else f" WHERE {rk} >= {soql_datetime(since.modified_at - overlap)}"
        extra = [f for f in self.death_fields if f not in self.fields]
        return f"SELECT {', '.join([*self.fields, *extra])} FROM {self.name}{where} ORDER BY {rk}, {self.primary_key}"

    def where_in(self, field: str, values: Sequence[str]) -> str:
        return f"{self._select()} WHERE {field} IN ({', '.join(soql_literal(v) for v in values)})"

    def _dead_select(self) -> str:
        master = ", MasterRecordId" if self.merges else ""
        return f"SELECT {self.primary_key}, {self.replication_key}{master} FROM {self.name}"

    def dead_in(self, ids: Sequence[str]) -> str:
        """For queryAll: which of ``ids`` are deleted."""
        return (f"{self._dead_select()} WHERE IsDeleted = TRUE AND {self.primary_key} IN "
                f"({', '.join(soql_literal(v) for v in ids)})")


class Lead(SObjectStream):
    name = "Lead"
    merges = True


class Contact(SObjectStream):
    name = "Contact"
    merges = True


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
        session_id: str | TokenProvider,
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
        self.auth = (session_id if isinstance(session_id, TokenProvider)
                     else TokenProvider(StaticToken(SYSTEM, "session", session_id)))
        self._sf = Salesforce(  # the token goes in per call (_authed): no HTTP call here
            instance_url=instance_url, session_id="-", session=self._session
        )
        self._streams = {obj: STREAMS[obj](fs) for obj, fs in fields.items()}
        self._retry = retry
        self._timeout = timeout
        self._peer = Peer(SYSTEM, instance_url, ca_bundle, timeout)
        self.usage = ApiUsage()
        self._no_upsert: set[tuple[str, str]] = set()  # (object, External ID field) the org lacks

    # ------------------------------------------------------------------ Connector
    def objects(self) -> Sequence[str]:
        return list(self._streams)

    def iter_changes(self, obj: str, since: Cursor | None, *, overlap: timedelta) -> Iterator[Page]:
        stream = self._stream(obj)
        pages = records = 0
        # each page carries its own query's ``totalSize`` (the pull's size, for progress): two
        # pulls on this connector (a cycle and a reconcile, or threads) never see each other's
        edge = datetime.now(UTC) - DELETED_WINDOW
        if since is not None and since.modified_at - overlap < edge:
            log.warning("salesforce.deleted_window_passed", object=obj, since=since.modified_at.isoformat(),
                        note="deletions older than the recycle bin cannot be read; run syncd reconcile")
        dead = 0
        for batch, total in self._query_sized(stream.changes(since, overlap), include_deleted=True):
            pages += 1
            live = [r for r in batch if r.get("IsDeleted") is not True]
            gone = [Deletion(SYSTEM, obj, str(r[stream.primary_key]), _parse_datetime(str(r[stream.replication_key])),
                             r.get("MasterRecordId") or None, "queryAll") for r in batch if r.get("IsDeleted") is True]
            records += len(live)
            dead += len(gone)
            yield Page([self._record(stream, r) for r in live], total, gone)
        log.info(
            "salesforce.pulled",
            object=obj,
            records=records,
            deleted=dead,
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
        """Creates keyed on an External ID syncd owns (``upsert_on``) are sObject Collections
        upserts: idempotent, so one sent twice (a lost answer, a stalled daemon, a resend
        racing a late original) makes one record, and a lost answer is retried here. An org
        without that field (the upsert answers NOT_FOUND / INVALID_FIELD) gets plain creates,
        logged once: weaker, the outbox's resend looks the email up first."""
        results: list[WriteResult] = []
        plain: list[RecordCreate] = []
        keyed: dict[str, list[RecordCreate]] = {}
        for c in creates:
            if c.upsert_on and (obj, c.upsert_on) not in self._no_upsert:
                keyed.setdefault(c.upsert_on, []).append(c)
            else:
                plain.append(_unkeyed(c))
        for field, batch in keyed.items():
            try:
                results += self._upsert(obj, field, batch)
            except FatalError as exc:
                if not any(code in str(exc) for code in ("NOT_FOUND", "INVALID_FIELD")):
                    raise
                self._no_upsert.add((obj, field))
                log.error("salesforce_external_id_missing", object=obj, field=field, error=str(exc),
                          note="creates fall back to the email look-up (weaker); add the field or "
                               "remove external_id from the mappings")
                plain += [_unkeyed(c) for c in batch]
        return results + self._create_plain(obj, plain)

    def _upsert(self, obj: str, field: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        results: list[WriteResult] = []
        for chunk in _chunks(list(creates), COLLECTION_LIMIT):
            body = {"allOrNone": False, "records": [{"attributes": {"type": obj}, **c.fields} for c in chunk]}
            saves = self._call("collections.upsert", self._sf.restful, f"composite/sobjects/{obj}/{field}",
                               method="PATCH", json=body)
            results.extend(_results([c.key for c in chunk], [None] * len(chunk), saves))
        return results

    def _create_plain(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
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

    def write_unless_modified(self, obj: str, updates: Sequence[tuple[FieldUpdate, datetime]]) -> list[WriteResult]:
        """Each update as a single-record PATCH with ``If-Unmodified-Since`` (sObject Collections
        cannot carry it): applied only if the record was not modified after the given time (a
        resend's look-first read), atomically. A record modified since answers 412: a failed
        result ``PRECONDITION_FAILED`` (not retriable); other per-record refusals are failed
        results too; 5xx / transport failures raise RetriableError (a PATCH is idempotent).
        HTTP dates are whole seconds: the time is rounded up, so a change within the same
        second as the read goes unseen."""
        results: list[WriteResult] = []
        for u, since in updates:
            header = email.utils.format_datetime(_ceil_second(since), usegmt=True)

            def patch(*, timeout: float, headers: dict[str, str] | None = None, u: FieldUpdate = u,
                      header: str = header) -> str | None:
                try:  # ``headers``: the token's, from :meth:`_authed`
                    self._sf.restful(f"sobjects/{obj}/{u.record_id}", method="PATCH", json=dict(u.fields),
                                     headers={**(headers or {}), "If-Unmodified-Since": header}, timeout=timeout)
                except (SalesforceGeneralError, SalesforceMalformedRequest, SalesforceResourceNotFound) as e:
                    if e.status >= 500 or e.status == 429:
                        raise
                    code, message = _error_of(e)
                    return f"{code}: {message}"
                return None

            error = self._call("sobject.update", patch)
            results.append(WriteResult(key=u.key, ok=error is None, record_id=u.record_id, error=error,
                                       retriable=bool(error) and str(error).split(":")[0] in RETRIABLE_RECORD_CODES))
        return results

    def described_fields(self, obj: str) -> list[dict[str, Any]]:
        """The object's fields as this user sees them (describe: ``name``, ``externalId``,
        ``createable``, …): which External ID a create may upsert on, and whether it may set it."""
        desc = self._call("describe", self._sf.restful, f"sobjects/{obj}/describe")
        return [dict(f) for f in (desc or {}).get("fields", [])]

    # ------------------------------------------------------------------ deletions
    def dead(self, obj: str, ids: Sequence[str], *, answered: Sequence[RawRecord] | None = None) -> list[Deletion]:
        """Which of ``ids`` are deleted (or merged away), by queryAll (which answers both: a
        fetch's ``answered`` records tell it nothing more)."""
        stream = self._stream(obj)
        out: list[Deletion] = []
        for chunk in _chunks(list(dict.fromkeys(ids)), IN_CHUNK):
            for batch in self._query_pages(stream.dead_in(chunk), include_deleted=True):
                out += [Deletion(SYSTEM, obj, str(r[stream.primary_key]),
                                 _parse_datetime(str(r[stream.replication_key])),
                                 r.get("MasterRecordId") or None, "re-pull") for r in batch]
        return out

    def delete(self, obj: str, targets: Sequence[tuple[str, str]]) -> list[WriteResult]:
        """Delete records, (key, id) each (``[deletions] other_side = "propagate"``). One
        already deleted counts as done."""
        self._stream(obj)
        return delete_each(
            targets, lambda rid: self._call("sobject.delete", self._sf.restful, f"sobjects/{obj}/{rid}",
                                            method="DELETE"),
            refused=(FatalError,), gone=lambda e: "ENTITY_IS_DELETED" in e)

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

    # ------------------------------------------------------------------ counts and ids
    def count(self, obj: str, *, since: datetime | None = None,
              until: datetime | None = None) -> int:
        """How many records of ``obj`` there are (modified in ``[since, until]`` when given):
        one ``SELECT COUNT()`` query, read from its ``totalSize``."""
        stream = self._stream(obj)
        rk = stream.replication_key
        conds = [f"{rk} {op} {soql_datetime(at)}"
                 for op, at in ((">=", since), ("<=", until)) if at is not None]
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        result = self._call("query", self._sf.query, f"SELECT COUNT() FROM {obj}{where}")
        return int(result.get("totalSize") or 0)

    def iter_ids(self, obj: str) -> Iterator[list[tuple[str, datetime]]]:
        """Every (id, modified_at) of ``obj`` in id order, a query batch (2,000) at a time."""
        stream = self._stream(obj)
        key, rk = stream.primary_key, stream.replication_key
        for batch in self._query_pages(f"SELECT {key}, {rk} FROM {obj} ORDER BY {key}"):
            if batch:
                yield [(str(r[key]), _parse_datetime(str(r[rk]))) for r in batch]

    def pull_calls(self, obj: str, records: int) -> int:
        """The calls a pull of ``records`` records of ``obj`` makes: one query, then a
        ``query_more`` per further batch of :data:`QUERY_BATCH`."""
        self._stream(obj)
        return max(1, -(-records // QUERY_BATCH))

    def fetch_calls(self, obj: str, records: int) -> int:
        """The calls :meth:`fetch` of ``records`` ids makes (one query per IN_CHUNK ids)."""
        self._stream(obj)
        return -(-records // IN_CHUNK)

    def write_calls(self, obj: str, writes: int) -> int:
        """The calls sending ``writes`` updates makes (sObject Collections of 200)."""
        self._stream(obj)
        return -(-writes // COLLECTION_LIMIT)

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

    def _query_pages(self, soql: str, *, include_deleted: bool = False) -> Iterator[list[dict[str, Any]]]:
        """One SOQL query, batch by batch through query locators (:class:`QueryLocatorPaginator`);
        ``include_deleted``: through queryAll (deleted and merged rows too)."""
        for batch, _total in self._query_sized(soql, include_deleted=include_deleted):
            yield batch

    def _query_sized(self, soql: str, *,
                     include_deleted: bool = False) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
        """:meth:`_query_pages`, each batch with the query's ``totalSize`` from its first answer
        (None when it has none): the size travels with this query's batches, no state is kept."""
        if include_deleted:
            result = self._call("queryAll", self._sf.query, soql, include_deleted=True)
        else:
            result = self._call("query", self._sf.query, soql)
        size = result.get("totalSize")
        total = size if isinstance(size, int) and not isinstance(size, bool) else None
        pager = QueryLocatorPaginator()
        while True:
            yield list(result.get("records", [])), total
            url = pager.next_url(result)
            if url is None:
                return
            result = self._call("query_more", self._sf.query_more, url, identifier_is_url=True)

    def _record(self, stream: SObjectStream, r: dict[str, Any]) -> RawRecord:
        drop = {"attributes", *(f for f in stream.death_fields if f not in stream.fields)}
        fields = {k: v for k, v in r.items() if k not in drop}
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
        fn = self._authed(fn)

        def attempt() -> T:
            with paced(self.budget, endpoint):  # ledger, pace, concurrency; CapReached: not sent
                return sent()

        def sent() -> T:
            self.usage.count(endpoint)
            try:
                value = fn(*args, timeout=self._timeout, **kw)
            except _TRANSPORT as e:
                raise self._peer.transport_error(endpoint, e, idempotent=idempotent) from None
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

    def _authed(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` with the provider's token; a refused token is renewed once (single-flight) and
        the call sent again. A refused re-login is the AuthError; a second refusal is translated."""

        def run(*args: Any, **kw: Any) -> T:
            used = self.auth.token()
            try:
                return fn(*args, **self._with(used, kw))
            except SalesforceExpiredSession:
                if not self.auth.renewable:
                    raise
            return fn(*args, **self._with(self.auth.renew(used), kw))

        return run

    def _with(self, tok: Token, kw: dict[str, Any]) -> dict[str, Any]:
        """The call's keyword arguments with this token's header (per request: concurrent calls
        each send the token they will blame if it is refused)."""
        if self._sf.session_id != tok.value:  # for anything that reads the client's own headers
            self._sf.session_id = tok.value
            self._sf.headers = {**self._sf.headers, "Authorization": "Bearer " + tok.value}
        return {**kw, "headers": {**(kw.get("headers") or {}), "Authorization": "Bearer " + tok.value}}

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
            hint = ("renew the session id; session auth cannot re-login" if not self.auth.renewable
                    else f"a fresh token from the {self.auth.method} grant was refused too")
            return AuthError(f"{line} ({hint})", system=SYSTEM)
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


def _ceil_second(dt: datetime) -> datetime:
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=0) + timedelta(seconds=1) if dt.microsecond else dt


def _unkeyed(c: RecordCreate) -> RecordCreate:
    """A plain create: without the External ID (the org has no such field)."""
    if not c.upsert_on:
        return c
    return RecordCreate(key=c.key, fields={k: v for k, v in c.fields.items() if k != c.upsert_on})


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
