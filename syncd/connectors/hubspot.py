"""HubSpot connector on hubspot-api-client 12 (contacts and deals).

- urllib3's own retries are off (crm-api.md §3: they silently retry some verbs and
  not others); every call goes through :mod:`connectors._retry`.
- Vendor errors are translated once, in :meth:`HubSpotConnector._once`.
- Calls use the real client with ``_preload_content=False`` and parse the JSON
  themselves: the client's model deserialisation (dateutil on every timestamp)
  costs more than the HTTP round trip and would cap batch throughput far below
  2,000 records/s. Status handling and exceptions are still the client's.
- Incremental pulls use the search API sorted by the modified property ascending
  with ``GTE (since - overlap)``. Search only reaches 10,000 results per query, so
  before the offset reaches 10,000 the query restarts from the last timestamp
  seen; when a whole window shares one timestamp it walks that timestamp by id
  (``hs_object_id GT last``). Records already yielded at the restart timestamp are
  skipped, so restarts add no duplicates.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import structlog
import urllib3
from hubspot import HubSpot
from urllib3.util.retry import Retry

from syncd import catalogue
from syncd.connectors._deletes import delete_each
from syncd.connectors._errors import NotRetried, Peer, call, may_be_applied
from syncd.connectors._pacing import Budget
from syncd.connectors._retry import RetryPolicy
from syncd.connectors.auth import StaticToken, Token, TokenProvider
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RetriableError
from syncd.model import (
    ApiUsage,
    Cursor,
    Deletion,
    FieldUpdate,
    Page,
    RawRecord,
    RecordCreate,
    WriteResult,
)

log = structlog.get_logger()

SYSTEM = "hubspot"
SEARCH_CAP = 10_000
BATCH = 100
ASSOC_BATCH = 1000
IN_VALUES = 100
NOT_RETRIABLE_CATEGORIES = {"VALIDATION_ERROR", "OBJECT_NOT_FOUND", "CONFLICT"}

Read = Callable[..., Any]
"""``HubSpotConnector._read_call(endpoint, api, method, *args)``: one read under the retry policy."""


# ---------------------------------------------------------------------- streams
class HubSpotStream:
    """One HubSpot object type, in the spirit of singer-sdk's ``Stream``.

    ``name`` picks the catalogue row, which gives the primary key and the
    replication key (the modified property the search filters and sorts on).
    An instance holds the properties the mappings need. Subclasses say what their
    object needs beyond a search: a property to find records by email, a read
    back of forward-only lifecycle writes, an ``enrich`` hook run on every page
    (``enrich_batch`` regroups pages to that many records first), and picklist
    values that are not properties (``allowed_values``).
    """

    name: ClassVar[str]
    primary_key: ClassVar[str]
    replication_key: ClassVar[str]
    refs: ClassVar[tuple[str, ...]]
    email_property: ClassVar[str | None] = None  # find_by_email searches it; None: never found
    merged_property: ClassVar[str | None] = None  # the survivor's list of merged-away ids
    checks_lifecycle: ClassVar[bool] = False  # HubSpot ignores backwards lifecyclestage writes
    enrich_batch: ClassVar[int] = 0  # 0: pages are yielded as searched

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        row = catalogue.get(SYSTEM, cls.name)
        cls.primary_key, cls.replication_key, cls.refs = row.key, row.cursor, row.refs

    def __init__(self, properties: Sequence[str]) -> None:
        merged = [self.merged_property] if self.merged_property else []
        self.properties = list(dict.fromkeys(
            [*dict.fromkeys(properties), self.replication_key, self.primary_key, *merged]))

    def enrich(self, read: Read, records: list[RawRecord]) -> list[RawRecord]:
        """The records with whatever the search does not return."""
        return records

    def allowed_values(self, read: Read) -> dict[tuple[str, str], list[str]]:
        """Allowed values of fields that are not enumeration properties."""
        return {}


class Contacts(HubSpotStream):
    name = "contacts"
    email_property = "email"
    checks_lifecycle = True
    merged_property = "hs_merged_object_ids"


class Deals(HubSpotStream):
    """Deals carry their contacts (``_contact_ids``), read by association batches."""

    name = "deals"
    merged_property = "hs_merged_object_ids"  # deals merge like contacts (the survivor lists them)
    # One association batch read takes up to ASSOC_BATCH deals: search pages (200) are
    # buffered and yielded ASSOC_BATCH deals at a time.
    enrich_batch = ASSOC_BATCH

    def enrich(self, read: Read, records: list[RawRecord]) -> list[RawRecord]:
        links = self._contact_ids(read, [r.id for r in records])
        return [RawRecord(r.system, r.object, r.id, r.modified_at,
                          {**r.fields, "_contact_ids": links.get(r.id, [])}) for r in records]

    def _contact_ids(self, read: Read, deal_ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for i in range(0, len(deal_ids), ASSOC_BATCH):
            body = {"inputs": [{"id": d} for d in deal_ids[i:i + ASSOC_BATCH]]}
            resp = read("associations.batch_read", "assoc.batch", "get_page",
                        self.name, self.refs[0], body)
            for r in resp.get("results") or []:
                to = (str(t["toObjectId"]) for t in r.get("to") or [])
                out[str(r["from"]["id"])] = sorted(to, key=int)
        return out

    def allowed_values(self, read: Read) -> dict[tuple[str, str], list[str]]:
        """Deal stages and pipelines come from the pipelines API."""
        resp = read("pipelines", "pipelines", "get_all", self.name)
        stages: list[str] = []
        pipelines: list[str] = []
        for pl in sorted(resp.get("results") or [], key=lambda p: p.get("displayOrder") or 0):
            if pl.get("archived"):
                continue
            pipelines.append(pl["id"])
            for st in sorted(pl.get("stages") or [], key=lambda s: s.get("displayOrder") or 0):
                if not st.get("archived") and st["id"] not in stages:
                    stages.append(st["id"])
        return {(self.name, "dealstage"): stages, (self.name, "pipeline"): pipelines}


STREAMS: dict[str, type[HubSpotStream]] = {s.name: s for s in (Contacts, Deals)}
MODIFIED_PROP = {name: cls.replication_key for name, cls in STREAMS.items()}


class SearchPaginator:
    """Paging of one search query by its ``after`` offsets.

    Each ``after`` must be a number larger than the last (a repeated one would loop
    forever). Paging stops at the last page, or (``capped``) where the next page
    would pass the search cap: the caller then restarts the query.
    """

    def __init__(self, endpoint: str, page_size: int, cap: int) -> None:
        self.endpoint, self.page_size, self.cap = endpoint, page_size, cap
        self.after = 0
        self.done = self.capped = False

    def advance(self, response: dict[str, Any], got_results: bool) -> None:
        nxt = ((response.get("paging") or {}).get("next") or {}).get("after")
        if nxt is None or not got_results:
            self.done = True
            return
        try:
            nxt_i = int(nxt)
        except ValueError:
            raise FatalError(f"hubspot {self.endpoint}: non-numeric after {nxt!r}",
                             system=SYSTEM) from None
        if nxt_i <= self.after:
            raise FatalError(f"hubspot {self.endpoint}: paging loop (after {nxt!r} repeated)",
                             system=SYSTEM)
        if nxt_i + self.page_size > self.cap:
            self.done = self.capped = True
            return
        self.after = nxt_i


class _BadRequest(Exception):
    """A 400: for a write, the record's own fault (becomes a failed WriteResult)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Conflict(_BadRequest):
    """A 409 CONFLICT: for a create, the record exists already (HubSpot names its id)."""

    def existing_id(self) -> str | None:
        m = re.search(r"Existing ID:\s*(\d+)", self.message)
        return m.group(1) if m else None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(dt: datetime) -> int:
    """Epoch milliseconds, floored, in exact integer arithmetic (no float rounding)."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _ts(rec: RawRecord, mod: str) -> int:
    """The search-side timestamp of a record: its modified property (what the search filters
    and sorts on), else updatedAt."""
    v = rec.fields.get(mod)
    if isinstance(v, str) and v:
        try:
            return _ms(datetime.fromisoformat(v).astimezone(UTC))
        except ValueError:
            pass
    return _ms(rec.modified_at)


@dataclass(slots=True)
class _PullSize:
    """The size of one pull (the first search answer's ``total``), carried by that pull alone:
    two pulls on one connector (a cycle and a reconcile) never read each other's."""

    total: int | None = None


def _order(rec: RawRecord) -> tuple[datetime, int, str]:
    """The order of records in a Page: (modified_at, id), numeric ids numerically."""
    return rec.modified_at, int(rec.id) if rec.id.isdigit() else 0, rec.id


def _one_line(body: Any) -> str:
    """The CRM's error code + message, on one line."""
    text = body.decode() if isinstance(body, bytes) else str(body or "")
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300]
    if not isinstance(data, dict):
        return " ".join(text.split())[:300]
    code = data.get("category") or data.get("policyName") or data.get("errorType") or "ERROR"
    return f"{code}: {' '.join(str(data.get('message', '')).split())}"[:500]


class HubSpotConnector:
    """The :class:`connectors.base.Connector` for HubSpot: one :class:`HubSpotStream` per object."""

    system = SYSTEM
    search_cap = SEARCH_CAP  # results reachable per search query (a class attribute for tests)
    budget: Budget | None = None  # the API ledger and pace (syncd.connectors._pacing.attach)

    def __init__(
        self,
        base_url: str,
        token: str | TokenProvider,
        *,
        ca_bundle: str | None,
        properties: dict[str, list[str]],
        retry: RetryPolicy,
        page_size: int = 200,
        timeout: float = 30.0,
        archive_scan_s: float = 900.0,
    ) -> None:
        unknown = set(properties) - set(STREAMS)
        if unknown:
            raise FatalError(f"hubspot: unsupported objects {sorted(unknown)}", system=SYSTEM)
        self.usage = ApiUsage()
        self.deletion_scan_s = archive_scan_s  # how often the engine reads the archive (deleted)
        self._streams = {o: STREAMS[o](p) for o, p in properties.items()}
        self._retry = retry
        self._page_size = max(1, min(page_size, 200))
        self._timeout = timeout
        self._peer = Peer(SYSTEM, base_url, ca_bundle, timeout)
        self.auth = token if isinstance(token, TokenProvider) else TokenProvider(
            StaticToken(SYSTEM, "private_app", token))
        self._token_lock = threading.Lock()
        kw: dict[str, Any] = {"access_token": "-", "host": base_url.rstrip("/"),  # set per call
                              "retry": Retry(total=0, raise_on_status=False,
                                             respect_retry_after_header=False)}
        if ca_bundle:
            kw["ssl_ca_cert"] = ca_bundle
        self._client = HubSpot(**kw)
        self._apis: dict[str, Any] = {}

    # ------------------------------------------------------------------ plumbing
    def _api(self, name: str) -> Any:
        """Cache the API objects: each attribute access builds a new pool (crm-api.md §1.1).

        ``name`` is ``<object>.<api>`` (``contacts.search`` is ``crm.contacts.search_api``)
        or one of the shared APIs below."""
        api = self._apis.get(name)
        if api is None:
            crm = self._client.crm
            shared: dict[str, Callable[[], Any]] = {
                "assoc.batch": lambda: crm.associations.v4.batch_api,
                "properties": lambda: crm.properties.core_api,
                "pipelines": lambda: crm.pipelines.pipelines_api,
            }
            if name in shared:
                api = shared[name]()
            else:
                obj, kind = name.split(".")
                api = getattr(getattr(crm, obj), f"{kind}_api")
            self._apis[name] = api
        return api

    def _call(self, endpoint: str, api: str, method: str, *args: Any,
              idempotent: bool = True, **kw: Any) -> Any:
        """One API call under the retry policy. ``idempotent=False`` (creates): a transport
        failure (timeout, dropped connection) is raised, not retried, because the CRM may
        have applied the request before the answer was lost; the caller decides (the engine
        looks the record up by email before sending it again)."""
        return call(self._retry, f"hubspot.{endpoint}", self._authed_once, endpoint, api, method, *args,
                    idempotent=idempotent, **kw)

    def _authed_once(self, endpoint: str, api: str, method: str, *args: Any,
                     idempotent: bool = True, **kw: Any) -> Any:
        """:meth:`_once` with the provider's token (renewed before it expires); a 401 renews it
        once (single-flight) and sends the call again. A refused re-login is the AuthError."""
        used = self._use(api, self.auth.token())
        try:
            return self._once(endpoint, api, method, *args, idempotent=idempotent, **kw)
        except AuthError:
            if not self.auth.renewable:
                raise
        self._use(api, self.auth.renew(used))
        return self._once(endpoint, api, method, *args, idempotent=idempotent, **kw)

    def _use(self, api: str, tok: Token) -> Token:
        """Put ``tok`` in the client's configuration (new APIs) and every cached API's."""
        with self._token_lock:
            if self._client.config.get("access_token") != tok.value:
                self._client.config["access_token"] = tok.value
                for a in self._apis.values():
                    a.api_client.configuration.access_token = tok.value
            self._api(api).api_client.configuration.access_token = tok.value
        return tok

    def _once(self, endpoint: str, api: str, method: str, *args: Any,
              idempotent: bool = True, **kw: Any) -> Any:
        if self.budget is not None:
            self.budget.before(endpoint)  # counted in the ledger, paced; CapReached: not sent
        self.usage.count(endpoint)
        fn = getattr(self._api(api), f"{method}_with_http_info")
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self._timeout, **kw)
            try:
                raw, headers = resp.data, resp.headers
            finally:
                resp.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise self._peer.transport_error(endpoint, e, idempotent=idempotent) from None
        except Exception as e:
            status = getattr(e, "status", None)
            if not isinstance(status, int):
                raise
            try:
                self._translate(endpoint, status, getattr(e, "body", None), getattr(e, "headers", None))
            except RetriableError as err:
                # A 5xx answer to a create does not say whether it was applied: like a lost
                # answer, report it rather than send it again here (429 and 423 were refused).
                if not may_be_applied(err, idempotent=idempotent):
                    raise
                raise NotRetried(err) from None
        self._read_budget(headers)
        try:
            data: dict[str, Any] = json.loads(raw) if raw else {}
        except ValueError:
            raise RetriableError(f"hubspot {endpoint}: unreadable response body", system=SYSTEM) from None
        return data

    def _translate(self, endpoint: str, status: int, body: Any, headers: Any) -> None:
        msg = _one_line(body)
        self._read_budget(headers)
        if status == 401:
            raise AuthError(f"hubspot {endpoint}: 401 {msg}", system=SYSTEM)
        if status == 429:
            self.usage.limited(endpoint)
            self._held(endpoint, msg, headers)
            if "DAILY" in msg.split(":")[0]:
                raise BudgetExhausted(f"hubspot {endpoint}: daily API limit spent ({msg})", system=SYSTEM)
            raise RateLimited(f"hubspot {endpoint}: 429 {msg}", status=429,
                              retry_after=_retry_after(headers), body=msg, system=SYSTEM)
        if status >= 500 or status in (423, 477):
            raise RetriableError(f"hubspot {endpoint}: {status} {msg}", status=status,
                                 retry_after=_retry_after(headers), body=msg, system=SYSTEM)
        if status == 400:
            raise _BadRequest(f"{status} {msg}")
        if status == 409:
            raise _Conflict(f"{status} {msg}")
        raise FatalError(f"hubspot {endpoint}: {status} {msg}", system=SYSTEM)

    def _read_budget(self, headers: Any) -> None:
        if not headers:
            return
        limit, remaining = (headers.get("X-HubSpot-RateLimit-Daily"),
                            headers.get("X-HubSpot-RateLimit-Daily-Remaining"))
        if limit is not None and remaining is not None:
            try:
                self.usage.reported_limit = int(limit)
                self.usage.reported_used = int(limit) - int(remaining)
            except ValueError:
                pass
            else:
                if self.budget is not None:
                    self.budget.report(self.usage.reported_used, self.usage.reported_limit)
        burst = [_int(headers.get(f"X-HubSpot-RateLimit-{h}")) for h in ("Max", "Remaining", "Interval-Milliseconds")]
        if self.budget is not None and burst[0] is not None and burst[1] is not None and burst[2] is not None:
            self.budget.report_burst(burst[0], burst[1], burst[2])

    def _held(self, endpoint: str, msg: str, headers: Any) -> None:
        """A 429: the budget holds the endpoint's class (Retry-After) or, DAILY, the whole system."""
        if self.budget is None:
            return
        if "DAILY" in msg.split(":")[0]:
            self.budget.exhausted("HubSpot reports the daily API limit spent (429 DAILY)")
        else:
            self.budget.limited(endpoint, _retry_after(headers), msg)

    def _read_call(self, endpoint: str, api: str, method: str, *args: Any) -> Any:
        """A read: a 400 is our bug or a cap, never the record's fault -> FatalError."""
        try:
            return self._call(endpoint, api, method, *args)
        except _BadRequest as e:
            raise FatalError(f"hubspot {endpoint}: {e.message}", system=SYSTEM) from None

    def _record(self, obj: str, o: dict[str, Any]) -> RawRecord:
        try:
            updated = datetime.fromisoformat(o["updatedAt"]).astimezone(UTC)
        except (KeyError, TypeError, ValueError):
            raise FatalError(f"hubspot {obj} {o.get('id')}: no valid updatedAt", system=SYSTEM) from None
        props = {k: v if v is None or isinstance(v, str) else str(v)
                 for k, v in (o.get("properties") or {}).items()}
        return RawRecord(self.system, obj, str(o["id"]), updated, props)

    # ------------------------------------------------------------------ Connector
    def objects(self) -> Sequence[str]:
        return list(self._streams)

    def _stream(self, obj: str) -> HubSpotStream:
        stream = self._streams.get(obj)
        if stream is None:
            raise FatalError(f"hubspot: object {obj!r} is not configured", system=SYSTEM)
        return stream

    def _search(self, obj: str, filters: list[dict[str, Any]], sort: str, after: int,
                props: list[str]) -> Any:
        body = {"filterGroups": [{"filters": filters}],
                "sorts": [{"propertyName": sort, "direction": "ASCENDING"}],
                "properties": props, "limit": self._page_size, "after": str(after)}
        return self._read_call(f"{obj}.search", f"{obj}.search", "do_search", body)

    def iter_changes(self, obj: str, since: Cursor | None, *, overlap: timedelta) -> Iterator[Page]:
        if obj not in STREAMS:
            raise FatalError(f"hubspot: object {obj!r} is not supported", system=SYSTEM)
        stream = self._stream(obj)
        size_of = _PullSize()  # this pull's own: the first search answer's ``total`` (progress)
        walk = self._walk(stream, since, overlap, size_of)
        size = stream.enrich_batch
        if not size:
            yield from (Page(stream.enrich(self._read_call, recs), size_of.total) for recs in walk)
            return
        # Search pages are buffered and enriched ``size`` records at a time. Nothing is lost
        # if the caller stops early: the cursor only moves with what was yielded (the max of
        # a page's records), so the buffered rest is read again.
        buf: list[RawRecord] = []
        for recs in walk:
            buf.extend(recs)
            while len(buf) >= size:
                yield Page(stream.enrich(self._read_call, sorted(buf[:size], key=_order)), size_of.total)
                buf = buf[size:]
        if buf:
            yield Page(stream.enrich(self._read_call, sorted(buf, key=_order)), size_of.total)

    def _walk(self, stream: HubSpotStream, since: Cursor | None, overlap: timedelta,
              size_of: _PullSize | None = None) -> Iterator[list[RawRecord]]:
        """The records modified at or after ``since - overlap``, a search page at a time,
        ascending, each record once (restarts at the 10k cap skip what was yielded)."""
        obj, mod, props = stream.name, stream.replication_key, list(stream.properties)
        lo = 0 if since is None else max(0, _ms(since.modified_at - overlap))
        boundary_ts: int | None = None  # the timestamp of the last yielded record
        boundary_ids: set[str] = set()  # ids already yielded at boundary_ts

        def fresh(results: list[RawRecord]) -> list[RawRecord]:
            nonlocal boundary_ts, boundary_ids
            out = []
            for rec in results:
                ts = _ts(rec, mod)
                if ts == boundary_ts and rec.id in boundary_ids:
                    continue
                out.append(rec)
            out.sort(key=_order)
            for rec in out:
                ts = _ts(rec, mod)
                if ts != boundary_ts:
                    boundary_ts, boundary_ids = ts, set()
                boundary_ids.add(rec.id)
            return out

        while True:
            # Main walk: modified >= lo, ascending, until the end or the 10k cap.
            filters = [{"propertyName": mod, "operator": "GTE", "value": str(lo)}]
            capped, last_ts = False, None
            for results, at_cap in self._pages(obj, filters, mod, props, size_of):
                recs = fresh(results)
                if recs:
                    yield recs
                if results:
                    last_ts = max(_ts(r, mod) for r in results)
                capped = at_cap
            if not capped:
                return
            assert last_ts is not None
            if last_ts > lo:
                log.info("hubspot search cap: restarting", object=obj, since_ms=last_ts)
                lo = last_ts
                continue
            # A full 10k window shares one timestamp: walk it by id, then go past it.
            log.info("hubspot search cap on one timestamp: walking by id", object=obj, ts_ms=lo)
            yield from self._walk_timestamp(stream, lo, props, fresh)
            lo += 1

    def _walk_timestamp(self, stream: HubSpotStream, ts: int, props: list[str],
                        fresh: Callable[[list[RawRecord]], list[RawRecord]]
                        ) -> Iterator[list[RawRecord]]:
        key = stream.primary_key
        last_id = 0
        while True:
            filters = [{"propertyName": stream.replication_key, "operator": "EQ", "value": str(ts)},
                       {"propertyName": key, "operator": "GT", "value": str(last_id)}]
            capped = False
            for results, at_cap in self._pages(stream.name, filters, key, props):
                recs = fresh(results)
                if recs:
                    yield recs
                if results:
                    last_id = max(last_id, *(int(r.id) for r in results))
                capped = at_cap
            if not capped:
                return

    def _pages(self, obj: str, filters: list[dict[str, Any]], sort: str, props: list[str],
               size_of: _PullSize | None = None) -> Iterator[tuple[list[RawRecord], bool]]:
        """Search pages: (results, stopped_at_cap), paged by a :class:`SearchPaginator`;
        ``size_of`` takes the first answer's ``total``."""
        pager = SearchPaginator(f"{obj}.search", self._page_size, self.search_cap)
        while not pager.done:
            resp = self._search(obj, filters, sort, pager.after, props)
            if size_of is not None and size_of.total is None:
                size_of.total = resp.get("total")
            results = [self._record(obj, o) for o in resp.get("results") or []]
            pager.advance(resp, bool(results))
            yield results, pager.capped

    def fetch(self, obj: str, ids: Sequence[str]) -> list[RawRecord]:
        stream = self._stream(obj)
        props = list(stream.properties)
        out: list[RawRecord] = []
        uniq = list(dict.fromkeys(ids))
        for i in range(0, len(uniq), BATCH):
            body = {"inputs": [{"id": x} for x in uniq[i:i + BATCH]], "properties": props,
                    "propertiesWithHistory": []}
            resp = self._read_call(f"{obj}.batch_read", f"{obj}.batch", "read", body)
            out.extend(self._record(obj, o) for o in resp.get("results") or [])
        return stream.enrich(self._read_call, out) if out else out

    def find_by_email(self, obj: str, emails: Sequence[str]) -> list[RawRecord]:
        email = STREAMS[obj].email_property if obj in STREAMS else None
        if email is None:
            return []
        stream = self._stream(obj)
        props = list(stream.properties)
        wanted = list(dict.fromkeys(e.strip().lower() for e in emails if e and e.strip()))
        out: dict[str, RawRecord] = {}
        for i in range(0, len(wanted), IN_VALUES):
            chunk = wanted[i : i + IN_VALUES]
            filters = [{"propertyName": email, "operator": "IN", "values": chunk}]
            for results, capped in self._pages(obj, filters, stream.primary_key, props):
                if capped:
                    raise FatalError(f"hubspot {obj}.search: over 10,000 matches for emails",
                                     system=SYSTEM)
                for rec in results:
                    out[rec.id] = rec
        return list(out.values())

    # ------------------------------------------------------------------ deletions
    def deleted(self, obj: str, since: datetime | None) -> tuple[list[Deletion], datetime | None]:
        """Records of ``obj`` archived at or after ``since`` (all archived ones when None), and
        the new watermark (the latest ``archivedAt`` seen). HubSpot cannot filter its archive:
        the list endpoint (``archived=true``, 100 per page, in id order) is read whole and only
        records archived since the watermark are returned; the caller paces how often (never
        on every poll: ``[sync] archive_scan_s``)."""
        stream = self._stream(obj)
        out: list[Deletion] = []
        latest = since
        after: str | None = None
        while True:
            resp = self._list_archived(obj, stream, after)
            for o in resp.get("results") or []:
                at = _archived_at(o)
                if at is None or (since is not None and at < since):
                    continue
                out.append(Deletion(SYSTEM, obj, str(o["id"]), at, None, "archive"))
                latest = at if latest is None or at > latest else latest
            nxt = ((resp.get("paging") or {}).get("next") or {}).get("after")
            if not nxt or nxt == after:
                break
            after = str(nxt)
        log.info("hubspot.archive_scanned", object=obj, archived=len(out))
        return out, latest

    def _list_archived(self, obj: str, stream: HubSpotStream, after: str | None) -> Any:
        try:
            return self._call(f"{obj}.list_archived", f"{obj}.basic", "get_page", limit=100, after=after,
                              properties=[stream.primary_key], archived=True)
        except _BadRequest as e:
            raise FatalError(f"hubspot {obj}.list_archived: {e.message}", system=SYSTEM) from None

    def dead(self, obj: str, ids: Sequence[str], *, answered: Sequence[RawRecord] | None = None) -> list[Deletion]:
        """Which of ``ids`` are gone, and how: merged (a read of the old id answers with the
        survivor, whose ``hs_merged_object_ids`` names it) or archived (in the recycle bin).
        Ids still live, or unknown to HubSpot, are left out. ``answered``: what a :meth:`fetch`
        of these ids just returned; the live read is then not made again."""
        stream = self._stream(obj)
        wanted = list(dict.fromkeys(ids))
        out: list[Deletion] = []
        props = [stream.primary_key, *([stream.merged_property] if stream.merged_property else [])]
        fetched: list[dict[str, Any]] | None = None if answered is None else [
            {"id": r.id, "properties": {stream.merged_property or "": r.fields.get(stream.merged_property or "")}}
            for r in answered]
        for i in range(0, len(wanted), BATCH):
            chunk = wanted[i:i + BATCH]
            live = self._batch_read(obj, chunk, props, archived=False) if fetched is None else fetched
            told: set[str] = set()  # a survivor asked for with its merged-away id answers twice
            for o in live:
                merged = str((o.get("properties") or {}).get(stream.merged_property or "") or "").split(";")
                for rid in chunk:
                    if rid != str(o["id"]) and rid in merged and rid not in told:
                        told.add(rid)
                        out.append(Deletion(SYSTEM, obj, rid, None, str(o["id"]), "re-pull"))
            seen = {d.id for d in out} | {str(o["id"]) for o in live}
            rest = [rid for rid in chunk if rid not in seen]
            if rest:
                out += [Deletion(SYSTEM, obj, str(o["id"]), _archived_at(o), None, "re-pull")
                        for o in self._batch_read(obj, rest, props, archived=True)]
        return out

    def merges_in(self, records: Sequence[RawRecord]) -> list[Deletion]:
        """The ids pulled survivors name as merged into them (``hs_merged_object_ids``)."""
        out: list[Deletion] = []
        for r in records:
            stream = self._streams.get(r.object)
            prop = stream.merged_property if stream is not None else None
            for old in str(r.fields.get(prop or "") or "").split(";") if prop else ():
                if old.strip() and old.strip() != r.id:
                    out.append(Deletion(SYSTEM, r.object, old.strip(), r.modified_at, r.id, prop or ""))
        return out

    def delete(self, obj: str, targets: Sequence[tuple[str, str]]) -> list[WriteResult]:
        """Archive records, (key, id) each (``[deletions] other_side = "propagate"``). One
        already gone counts as done."""
        self._stream(obj)
        return delete_each(targets, lambda rid: self._call(f"{obj}.archive", f"{obj}.basic", "archive", rid),
                           refused=(FatalError, _BadRequest), gone=lambda e: " 404 " in e)

    def _batch_read(self, obj: str, ids: list[str], props: list[str], *, archived: bool) -> list[Any]:
        body = {"inputs": [{"id": x} for x in ids], "properties": props, "propertiesWithHistory": []}
        try:
            resp = self._call(f"{obj}.batch_read", f"{obj}.batch", "read", body, archived=archived)
        except _BadRequest as e:
            raise FatalError(f"hubspot {obj}.batch_read: {e.message}", system=SYSTEM) from None
        return list(resp.get("results") or [])
    # ------------------------------------------------------------------ counts and ids
    def count(self, obj: str, *, since: datetime | None = None,
              until: datetime | None = None) -> int:
        """How many records of ``obj`` the CRM holds (modified in ``[since, until]`` when
        given): one search call with ``limit`` 1, read from its ``total``."""
        stream = self._stream(obj)
        mod = stream.replication_key
        filters = [{"propertyName": mod, "operator": op, "value": str(_ms(at))}
                   for op, at in (("GTE", since), ("LTE", until)) if at is not None]
        body = {"filterGroups": [{"filters": filters}] if filters else [],
                "properties": [stream.primary_key], "limit": 1, "after": "0"}
        resp = self._read_call(f"{obj}.search", f"{obj}.search", "do_search", body)
        return int(resp.get("total") or 0)

    def iter_ids(self, obj: str) -> Iterator[list[tuple[str, datetime]]]:
        """Every (id, modified_at) of ``obj``, ascending by id, a page (up to 200) at a time: a
        search sorted by id with ``id > last`` per page, so the 10,000-result cap is never reached."""
        stream = self._stream(obj)
        key, last = stream.primary_key, 0
        while True:
            body = {"filterGroups": [{"filters": [
                        {"propertyName": key, "operator": "GT", "value": str(last)}]}],
                    "sorts": [{"propertyName": key, "direction": "ASCENDING"}],
                    "properties": [key, stream.replication_key], "limit": self._page_size, "after": "0"}
            resp = self._read_call(f"{obj}.search", f"{obj}.search", "do_search", body)
            page = [(r.id, r.modified_at) for r in (self._record(obj, o) for o in resp.get("results") or [])]
            if page:
                yield page
                last = max(last, *(int(i) for i, _ in page))
            if len(page) < self._page_size or not (resp.get("paging") or {}).get("next"):
                return

    def pull_calls(self, obj: str, records: int) -> int:
        """The calls a pull of ``records`` records of ``obj`` makes (for ``resync --plan``):
        search pages of ``page_size`` (a restart per 10,000-result window re-reads one record),
        and the association reads of streams that enrich pages."""
        stream = self._stream(obj)
        per_window = self._page_size * max(1, self.search_cap // self._page_size)  # full pages, then a restart
        windows = max(1, -(-records // per_window))
        pages = max(1, -(-(records + windows - 1) // self._page_size))  # a restart re-reads its boundary
        enrich = -(-records // stream.enrich_batch) if stream.enrich_batch and records else 0
        return pages + enrich

    def fetch_calls(self, obj: str, records: int) -> int:
        """The calls :meth:`fetch` of ``records`` ids makes (batch reads of 100, + enrichment)."""
        stream = self._stream(obj)
        reads = -(-records // BATCH)
        enrich = -(-records // stream.enrich_batch) if stream.enrich_batch and records else 0
        return reads + enrich

    def write_calls(self, obj: str, writes: int) -> int:
        """The calls sending ``writes`` updates makes, at least (batch updates of 100)."""
        self._stream(obj)
        return -(-writes // BATCH)

    # ------------------------------------------------------------------ writes
    def write(self, obj: str, updates: Sequence[FieldUpdate]) -> list[WriteResult]:
        stream = self._stream(obj)
        results = self._clear_first(obj, updates)
        main = [(u.key, u.record_id, {k: _str(v) for k, v in u.fields.items()}) for u in updates
                if u.key not in results]
        stored: dict[str, dict[str, Any]] = {}
        groups = _merge_same_record(main)
        members = {keys[0]: keys for keys, _, _ in groups}  # an input is sent under its first key
        retry_alone: list[tuple[str, str, dict[str, str]]] = []
        for r in self._batch_update(obj, [(keys[0], rid, props) for keys, rid, props in groups],
                                    stored):
            keys = members[r.key]
            if len(keys) > 1 and not r.ok and not r.retriable:
                # refused as a whole (a bad value, say): nothing applied; send each update
                # alone (the record has no other input) so only the faulty one fails
                retry_alone += [it for it in main if it[0] in keys]
                continue
            for k in keys:
                results[k] = replace(r, key=k)
                if r.key in stored:
                    stored[k] = stored[r.key]
        for r in self._batch_update(obj, retry_alone, stored):
            results[r.key] = r
        if stream.checks_lifecycle:
            self._verify_lifecycle(obj, updates, results, stored)
        return [results[u.key] for u in updates]

    def _clear_first(self, obj: str, updates: Sequence[FieldUpdate]) -> dict[str, WriteResult]:
        """Clear the fields of backwards moves (a separate, earlier request). A backwards move is
        atomic from syncd's side: a clear that failed transiently is sent again at once, and
        one still failing fails its update (its set is not sent; the outbox retries clear and
        set together). Returns the failed updates' results."""
        clears = [(u.key, u.record_id, dict.fromkeys(u.clear_first, "")) for u in updates if u.clear_first]
        failed = {r.key: r for r in self._batch_update(obj, clears) if not r.ok}
        again = [c for c in clears if c[0] in failed and failed[c[0]].retriable]
        for r in self._batch_update(obj, again) if again else ():
            if r.ok:
                del failed[r.key]
            else:
                failed[r.key] = r
        return {k: WriteResult(k, False, r.record_id, f"clearing {', '.join(_clear_of(updates, k))} "
                                                      f"failed: {r.error}", r.retriable)
                for k, r in failed.items()}

    def _batch_update(self, obj: str, items: list[tuple[str, str, dict[str, str]]],
                      stored: dict[str, dict[str, Any]] | None = None) -> list[WriteResult]:
        """Batch updates of ``items`` (key, record id, properties). ``stored`` receives, per
        key applied, the record's properties as the response returned them (after the update)."""
        out: list[WriteResult] = []
        for chunk in _chunks_unique_ids(items, BATCH):
            out.extend(self._update_chunk(obj, chunk, stored))
        return out

    def _update_chunk(self, obj: str, chunk: list[tuple[str, str, dict[str, str]]],
                      stored: dict[str, dict[str, Any]] | None = None) -> list[WriteResult]:
        body = {"inputs": [{"id": rid, "properties": props, "objectWriteTraceId": key}
                           for key, rid, props in chunk]}
        try:
            resp = self._call(f"{obj}.batch_update", f"{obj}.batch", "update", body)
        except _BadRequest as e:
            if len(chunk) == 1:
                return [WriteResult(chunk[0][0], False, chunk[0][1], e.message)]
            half = len(chunk) // 2  # find the bad record(s): the rest must go through
            return (self._update_chunk(obj, chunk[:half], stored)
                    + self._update_chunk(obj, chunk[half:], stored))
        except RetriableError as e:
            return [WriteResult(k, False, rid, str(e), retriable=True) for k, rid, _ in chunk]
        by_id = {str(o["id"]): o.get("properties") or {} for o in resp.get("results") or []}
        # an input whose record was merged away is applied to the survivor, and the answer
        # carries the survivor's id: found by the trace id we sent (syncd treats it as the merge)
        by_trace = {str(o["objectWriteTraceId"]): o for o in resp.get("results") or []
                    if o.get("objectWriteTraceId")}
        errs = _errors_by_id(resp)
        out = []
        for key, rid, _ in chunk:
            survivor = by_trace.get(key)
            if rid not in by_id and survivor is not None and str(survivor["id"]) != rid:
                out.append(WriteResult(key, True, str(survivor["id"])))
                log.info("hubspot write answered by the merge survivor", object=obj, record_id=rid,
                         survivor_id=str(survivor["id"]))
                if stored is not None:
                    stored[key] = survivor.get("properties") or {}
            elif rid in errs:
                cat, msg = errs[rid]
                out.append(WriteResult(key, False, rid, msg, cat not in NOT_RETRIABLE_CATEGORIES))
            elif rid in by_id:
                out.append(WriteResult(key, True, rid))
                if stored is not None:
                    stored[key] = by_id[rid]
            else:
                out.append(WriteResult(key, False, rid, "UNKNOWN: no result for this record", True))
        return out

    def _verify_lifecycle(self, obj: str, updates: Sequence[FieldUpdate],
                          results: dict[str, WriteResult],
                          stored: dict[str, dict[str, Any]]) -> None:
        """Backwards lifecyclestage writes are accepted and ignored (crm-api.md §1.3): check
        that each one stuck. The batch-update response carries the record's properties as
        stored after the update, so a write is checked against its own response; a record
        is read back only when the response does not say (no value there) and for
        backwards moves (``clear_first``: clear, then set, in two requests), which are
        verified by reading, not trusted."""
        check = [u for u in updates if results[u.key].ok and u.fields.get("lifecyclestage")]
        if not check:
            return
        got: dict[str, Any] = {}
        reread: list[FieldUpdate] = []
        for u in check:
            value = stored.get(u.key, {}).get("lifecyclestage")
            if u.clear_first or value is None:
                reread.append(u)
            else:
                got[u.key] = value
        held: dict[str, Any] = {}
        target = {u.key: results[u.key].record_id or u.record_id for u in reread}  # a survivor's id
        ids = list(dict.fromkeys(target.values()))
        for i in range(0, len(ids), BATCH):
            body = {"inputs": [{"id": x} for x in ids[i:i + BATCH]],
                    "properties": ["lifecyclestage"], "propertiesWithHistory": []}
            resp = self._read_call(f"{obj}.batch_read", f"{obj}.batch", "read", body)
            held.update({str(o["id"]): (o.get("properties") or {}).get("lifecyclestage")
                         for o in resp.get("results") or []})
        got.update({u.key: held.get(target[u.key]) for u in reread})
        for u in check:
            want = _str(u.fields["lifecyclestage"])
            if got[u.key] != want:
                results[u.key] = WriteResult(
                    u.key, False, u.record_id,
                    f"LIFECYCLE_NOT_APPLIED: lifecyclestage is {got[u.key]!r} after writing "
                    f"{want!r} (HubSpot ignores backwards moves; clear it first with clear_first)")
                log.warning("hubspot write did not stick", object=obj, record_id=u.record_id,
                            field="lifecyclestage")

    def create(self, obj: str, creates: Sequence[RecordCreate]) -> list[WriteResult]:
        """Batch creates. A create whose answer was lost (timeout, dropped connection) is
        NOT retried here (it may have been applied): its result is a retriable failure."""
        self._stream(obj)
        results: dict[str, WriteResult] = {}
        for i in range(0, len(creates), BATCH):
            self._create_chunk(obj, list(creates[i:i + BATCH]), results)
        return [results[c.key] for c in creates]

    def _create_chunk(self, obj: str, chunk: list[RecordCreate],
                      results: dict[str, WriteResult]) -> None:
        body = {"inputs": [{"properties": {k: _str(v) for k, v in c.fields.items()},
                            "objectWriteTraceId": c.key, "associations": []} for c in chunk]}
        try:
            resp = self._call(f"{obj}.batch_create", f"{obj}.batch", "create", body,
                              idempotent=False)
        except _Conflict as e:
            # One contact per email: the create is already there (an earlier send whose answer
            # was lost, or a record made meanwhile). Applied, with the id HubSpot names; a batch
            # is refused as a whole, so halve it to find which input it was.
            existing = e.existing_id()
            if len(chunk) == 1:
                results[chunk[0].key] = (WriteResult(chunk[0].key, True, existing) if existing
                                         else WriteResult(chunk[0].key, False, None, e.message))
                if existing:
                    log.info("hubspot create already applied", object=obj, record_id=existing)
                return
            half = len(chunk) // 2
            self._create_chunk(obj, chunk[:half], results)
            self._create_chunk(obj, chunk[half:], results)
            return
        except _BadRequest as e:
            if len(chunk) == 1:
                results[chunk[0].key] = WriteResult(chunk[0].key, False, None, e.message)
                return
            half = len(chunk) // 2
            self._create_chunk(obj, chunk[:half], results)
            self._create_chunk(obj, chunk[half:], results)
            return
        except RetriableError as e:
            for c in chunk:
                results[c.key] = WriteResult(c.key, False, None, str(e), retriable=True)
            return
        made = {o["objectWriteTraceId"]: str(o["id"]) for o in resp.get("results") or []
                if o.get("objectWriteTraceId")}
        errs = _errors_by_id(resp)
        for c in chunk:
            if c.key in made:
                results[c.key] = WriteResult(c.key, True, made[c.key])
            elif c.key in errs:
                cat, msg = errs[c.key]
                results[c.key] = WriteResult(c.key, False, None, msg,
                                             cat not in NOT_RETRIABLE_CATEGORIES)
            else:
                results[c.key] = WriteResult(c.key, False, None,
                                             "UNKNOWN: no result for this create", True)

    # ------------------------------------------------------------------ metadata
    def allowed_values(self) -> dict[tuple[str, str], list[str]]:
        out: dict[tuple[str, str], list[str]] = {}
        for obj in self._streams:
            resp = self._read_call("properties", "properties", "get_all", obj)
            for p in resp.get("results") or []:
                if p.get("type") == "enumeration" and p.get("options"):
                    opts = sorted((o for o in p["options"] if not o.get("hidden")),
                                  key=lambda o: o.get("displayOrder") or 0)
                    out[(obj, p["name"])] = [o["value"] for o in opts]
        for stream in self._streams.values():
            out.update(stream.allowed_values(self._read_call))
        return out

    def close(self) -> None:
        self._apis.clear()


# ---------------------------------------------------------------------- helpers
def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime):
        v = v.astimezone(UTC)
        return v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
    return str(v)


def _archived_at(o: Mapping[str, Any]) -> datetime | None:
    v = o.get("archivedAt")
    try:
        return datetime.fromisoformat(str(v)).astimezone(UTC) if v else None
    except ValueError:
        return None


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    v = headers.get("Retry-After")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _clear_of(updates: Sequence[FieldUpdate], key: str) -> tuple[str, ...]:
    return next((u.clear_first for u in updates if u.key == key), ())


def _merge_same_record(items: list[tuple[str, str, dict[str, str]]]
                       ) -> list[tuple[tuple[str, ...], str, dict[str, str]]]:
    """(keys, record id, properties) inputs: the updates of one record merged into one input
    when they set different properties (one batch input instead of one batch per update).
    A record with two updates of one property keeps all its updates apart, in order (they
    go in successive batches, so the later value wins), and so does a record updated once."""
    props_of: dict[str, list[dict[str, str]]] = {}
    for _, rid, props in items:
        props_of.setdefault(rid, []).append(props)
    mergeable = {rid for rid, ps in props_of.items()
                 if len(ps) > 1 and sum(map(len, ps)) == len(set().union(*ps))}
    out: list[tuple[tuple[str, ...], str, dict[str, str]]] = []
    at: dict[str, int] = {}  # a mergeable record -> its input in out
    for key, rid, props in items:
        if rid in at:
            keys, _, merged = out[at[rid]]
            out[at[rid]] = ((*keys, key), rid, {**merged, **props})
            continue
        if rid in mergeable:
            at[rid] = len(out)
        out.append(((key,), rid, props))
    return out


def _chunks_unique_ids(items: list[tuple[str, str, dict[str, str]]],
                       size: int) -> Iterator[list[tuple[str, str, dict[str, str]]]]:
    """Chunks of ≤ size with no record twice (HubSpot rejects duplicate ids in one batch;
    later updates of the same record go in a later batch, so they apply after)."""
    pending = list(items)
    while pending:
        chunk: list[tuple[str, str, dict[str, str]]] = []
        rest: list[tuple[str, str, dict[str, str]]] = []
        ids: set[str] = set()
        for it in pending:
            if len(chunk) < size and it[1] not in ids:
                chunk.append(it)
                ids.add(it[1])
            else:
                rest.append(it)
        yield chunk
        pending = rest


def _errors_by_id(resp: dict[str, Any]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for err in resp.get("errors") or []:
        cat = err.get("category") or "ERROR"
        msg = f"{cat}: {' '.join((err.get('message') or '').split())}"[:500]
        for ids in (err.get("context") or {}).values():
            for i in ids or []:
                out[str(i)] = (cat, msg)
    return out
