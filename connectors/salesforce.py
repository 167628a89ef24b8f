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
from typing import Any, TypeVar

import requests
import structlog
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceError,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceRefusedRequest,
)

from connectors._retry import RetryPolicy, retrying
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RetriableError
from syncd.model import ApiUsage, Cursor, FieldUpdate, Page, RawRecord, RecordCreate, WriteResult

log = structlog.get_logger()

T = TypeVar("T")

COLLECTION_LIMIT = 200  # sObject Collections: records per call
IN_CHUNK = 200  # values per SOQL IN (...) clause, keeps the GET URL well under 16k characters
RETRIABLE_RECORD_CODES = frozenset(
    {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "REQUEST_RUNNING_TOO_LONG"}
)
_TRANSPORT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class _NotRetried(Exception):
    """A transport failure on a non-idempotent call: raised as RetriableError, not retried."""

    def __init__(self, error: RetriableError) -> None:
        super().__init__(str(error))
        self.error = error


def soql_literal(value: str) -> str:
    """A quoted SOQL string literal (backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def soql_datetime(dt: datetime) -> str:
    """An unquoted SOQL datetime in UTC, floored to the second (never later than ``dt``)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SalesforceConnector:
    """The :class:`~connectors.base.Connector` for Salesforce."""

    system = "salesforce"

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
        self._session = requests.Session()
        self._session.verify = ca_bundle if ca_bundle else True
        # REQUESTS_CA_BUNDLE / proxies from the environment would override verify (crm-api.md §3)
        self._session.trust_env = False
        self._sf = Salesforce(
            instance_url=instance_url, session_id=session_id, session=self._session
        )
        self._fields = {obj: _with_keys(fs) for obj, fs in fields.items()}
        self._retry = retry
        self._timeout = timeout
        self.usage = ApiUsage()

    # ------------------------------------------------------------------ Connector
    def objects(self) -> Sequence[str]:
        return list(self._fields)

    def iter_changes(self, obj: str, since: Cursor | None, *, overlap: timedelta) -> Iterator[Page]:
        where = ""
        if since is not None:
            where = f" WHERE SystemModstamp >= {soql_datetime(since.modified_at - overlap)}"
        soql = (
            f"SELECT {', '.join(self._select(obj))} FROM {obj}{where} ORDER BY SystemModstamp, Id"
        )
        pages = records = 0
        for batch in self._query_pages(soql):
            pages += 1
            records += len(batch)
            yield Page([self._record(obj, r) for r in batch])
        log.info(
            "salesforce.pulled",
            object=obj,
            records=records,
            pages=pages,
            since=since.modified_at.isoformat() if since else None,
        )

    def fetch(self, obj: str, ids: Sequence[str]) -> list[RawRecord]:
        out: list[RawRecord] = []
        for chunk in _chunks(list(dict.fromkeys(ids)), IN_CHUNK):
            in_list = ", ".join(soql_literal(i) for i in chunk)
            soql = f"SELECT {', '.join(self._select(obj))} FROM {obj} WHERE Id IN ({in_list})"
            for batch in self._query_pages(soql):
                out.extend(self._record(obj, r) for r in batch)
        return out

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        """Salesforce compares strings case-insensitively, so normalised emails match as stored."""
        wanted = list(dict.fromkeys(e for e in emails if e))
        out: list[RawRecord] = []
        for chunk in _chunks(wanted, IN_CHUNK):
            in_list = ", ".join(soql_literal(e) for e in chunk)
            soql = f"SELECT {', '.join(self._select(obj))} FROM {obj} WHERE Email IN ({in_list})"
            for batch in self._query_pages(soql):
                out.extend(self._record(obj, r) for r in batch)
        return out

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
        for obj, names in self._fields.items():
            desc = self._call("describe", self._sf.restful, f"sobjects/{obj}/describe")
            wanted = set(names)
            for f in (desc or {}).get("fields", []):
                if f.get("name") in wanted and f.get("type") in ("picklist", "multipicklist"):
                    out[(obj, f["name"])] = [
                        p["value"] for p in f.get("picklistValues", []) if p.get("active", True)
                    ]
        return out

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ internals
    def _select(self, obj: str) -> list[str]:
        try:
            return self._fields[obj]
        except KeyError:
            raise FatalError(
                f"salesforce: object {obj!r} is not configured "
                f"(configured: {', '.join(self._fields)})"
            ) from None

    def _query_pages(self, soql: str) -> Iterator[list[dict[str, Any]]]:
        """One SOQL query, batch by batch through query locators; refuses a repeated locator."""
        result = self._call("query", self._sf.query, soql)
        seen: set[str] = set()
        while True:
            yield list(result.get("records", []))
            if result.get("done", True):
                return
            url = result.get("nextRecordsUrl")
            if not url:
                raise FatalError("salesforce: query answered done=false without nextRecordsUrl")
            if url in seen:
                raise FatalError(f"salesforce: query locator repeated ({url}); refusing to loop")
            seen.add(url)
            result = self._call("query_more", self._sf.query_more, url, identifier_is_url=True)

    def _record(self, obj: str, r: dict[str, Any]) -> RawRecord:
        fields = {k: v for k, v in r.items() if k != "attributes"}
        return RawRecord(
            system=self.system,
            object=obj,
            id=str(r["Id"]),
            modified_at=_parse_datetime(str(r["SystemModstamp"])),
            fields=fields,
        )

    def _call(
        self, endpoint: str, fn: Callable[..., T], *args: Any, idempotent: bool = True, **kw: Any
    ) -> T:
        """Call simple-salesforce under the retry policy, translating every failure once."""

        def attempt() -> T:
            self.usage.count(endpoint)
            try:
                value = fn(*args, timeout=self._timeout, **kw)
            except _TRANSPORT as e:
                err = RetriableError(f"salesforce {endpoint}: {type(e).__name__}: {e}")
                if not idempotent:
                    raise _NotRetried(err) from e
                raise err from e
            except SalesforceError as e:
                failure = self._translate(endpoint, e)
                # A 5xx answer to a create does not say whether it was applied: report it
                # rather than send it again here (the outbox's resend looks the email up).
                if not idempotent and isinstance(failure, RetriableError) and (failure.status or 0) >= 500:
                    raise _NotRetried(failure) from e
                raise failure from e
            self._note_usage()
            return value

        try:
            return retrying(self._retry, log_name=f"salesforce.{endpoint}")(attempt)
        except _NotRetried as e:
            raise e.error from e.__cause__

    def _note_usage(self) -> None:
        usage = self._sf.api_usage.get("api-usage")
        if usage is not None:
            self.usage.reported_used = int(usage.used)
            self.usage.reported_limit = int(usage.total)

    def _translate(self, endpoint: str, e: SalesforceError) -> Exception:
        code, message = _error_of(e)
        line = f"salesforce {endpoint}: HTTP {e.status} {code}: {message}"
        if isinstance(e, SalesforceExpiredSession):
            return AuthError(line + " (renew the session id; direct session auth cannot re-login)")
        if code == "REQUEST_LIMIT_EXCEEDED":
            self.usage.rate_limited[endpoint] = self.usage.rate_limited.get(endpoint, 0) + 1
            used = self.usage.reported_used
            limit = self.usage.reported_limit
            seen = f"; last reported usage {used}/{limit}" if used is not None else ""
            return BudgetExhausted(
                "salesforce daily API request limit exhausted (REQUEST_LIMIT_EXCEEDED"
                + seen
                + "). Salesforce sends no Retry-After; calls free up as the rolling 24-hour "
                "window moves or when the org's limit is raised."
            )
        if isinstance(e, SalesforceGeneralError) and e.status == 429:
            return RateLimited(line, status=e.status, body=str(e.content))
        if isinstance(e, SalesforceGeneralError) and e.status >= 500:
            return RetriableError(line, status=e.status, body=str(e.content))
        if isinstance(e, SalesforceRefusedRequest):
            return FatalError(line)
        return FatalError(line)


# ---------------------------------------------------------------------- helpers
def _with_keys(fields: Sequence[str]) -> list[str]:
    """The configured fields plus Id and SystemModstamp (needed for cursors), no duplicates."""
    out = ["Id", "SystemModstamp"]
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
        raise FatalError(f"salesforce collections: expected {len(keys)} SaveResults, got {got}")
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
