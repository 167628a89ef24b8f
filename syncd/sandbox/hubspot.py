"""A HubSpot CRM v3/v4 simulator faithful enough for the unmodified hubspot-api-client.

Serve it with :class:`syncd.sandbox._server.SimServer`::

    app = HubSpotApp(token="sandbox-token")
    server = SimServer(app, ssl_context=ctx).start()
    HubSpot(access_token="sandbox-token", host=server.url, ssl_ca_cert=ca_path)

Shapes and limits follow ``crm-api.md`` §1 and §4. Decisions where the real API is
unknown or the docs are silent:

- A backwards ``lifecyclestage`` write is accepted and silently changes nothing
  (crm-api.md's sandbox decision). Clearing with ``""`` then setting an earlier
  value works. Stage order is the option ``displayOrder``.
- Every write moves ``updatedAt`` and the modified property (``lastmodifieddate``
  for contacts, ``hs_lastmodifieddate`` for deals), even when no value changed.
- **Association changes bump the deal's ``hs_lastmodifieddate``** (not the
  contact's), so an incremental deal pull sees a deal whose contacts changed.
- A validation error in a batch write fails the whole batch with 400 and
  applies nothing (what the live API does for invalid property values); unknown
  ids and injected ``partial`` faults give 207 with per-record errors.
- String search operators (EQ, NEQ, IN, NOT_IN) compare case-insensitively.
- An API create of a contact whose email another contact has is refused: 409 CONFLICT,
  ``"Contact already exists. Existing ID: <id>"`` (a batch create as a whole). The
  ground-truth :meth:`add` may still make duplicates (to stage link conflicts).
- :meth:`lose_answers` makes an endpoint apply requests and answer 504 (a lost answer).
- Properties written as ``""`` are stored and returned as ``null``.
- Deletion and merges (:meth:`archive`, :meth:`restore`, :meth:`merge`, :meth:`purge`,
  contacts and deals alike): a purged record is gone from every endpoint; an archived record
  leaves search and is listed with ``archived=true`` (``archivedAt`` set; archiving does not
  move the modified date, as on the live API). A merge keeps the primary's id: its empty
  properties are filled from the other, its ``lifecyclestage`` is the furthest of the two
  (a deal keeps the primary's ``dealstage``), its associations are the union,
  ``hs_merged_object_ids`` lists the merged-away ids (``;``-separated) and the modified date
  moves. The merged-away id is not archived: reads and updates of it answer with the
  surviving record (its id in the result), as the live API does.
- :attr:`HubSpotApp.id_requests` counts API requests naming each record id (path or batch
  input), so tests can assert that nothing asks for a dead id.
- The 10-second burst limit is reported in headers but only enforced when
  ``enforce_burst=True``; the daily budget is always enforced (429 DAILY). The day is the UTC
  day, or with ``day_s`` a compressed one (windows of ``day_s`` seconds from the epoch, as
  syncd's ledger counts them). ``search_per_s`` enforces the search limit (429 SECONDLY).

The ground-truth API (:meth:`add`, :meth:`modify`, :meth:`get`, :meth:`all`,
:meth:`associate`, :attr:`write_log`) plays "a marketer changed this" without
counting as API traffic.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncd.sandbox._server import Fault, FaultPlan, Request, Response
from syncd.sandbox.oauth import HubSpotOAuth

OBJECT_TYPES = ("contacts", "deals")
MODIFIED_PROP = {"contacts": "lastmodifieddate", "deals": "hs_lastmodifieddate"}
TYPE_IDS = {"contacts": "0-1", "deals": "0-3"}
ASSOC_TYPE_ID = {("contacts", "deals"): 4, ("deals", "contacts"): 3}
DEFAULT_PROPS = {
    "contacts": (
        "firstname",
        "lastname",
        "email",
        "createdate",
        "lastmodifieddate",
        "hs_object_id",
    ),
    "deals": (
        "dealname",
        "amount",
        "closedate",
        "pipeline",
        "dealstage",
        "createdate",
        "hs_lastmodifieddate",
        "hs_object_id",
    ),
}
LIST_LIMIT, SEARCH_LIMIT, SEARCH_MAX_OFFSET, BATCH_LIMIT, ASSOC_BATCH_LIMIT = (
    100,
    200,
    10_000,
    100,
    1000,
)
READ_ONLY = {"hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate",
             "hs_merged_object_ids"}

LIFECYCLE_STAGES = [
    ("subscriber", "Subscriber"),
    ("lead", "Lead"),
    ("marketingqualifiedlead", "Marketing Qualified Lead"),
    ("salesacceptedlead", "Sales Accepted Lead"),
    ("salesqualifiedlead", "Sales Qualified Lead"),
    ("opportunity", "Opportunity"),
    ("customer", "Customer"),
    ("evangelist", "Evangelist"),
    ("other", "Other"),
]
LEAD_STATUSES = [
    "NEW",
    "OPEN",
    "IN_PROGRESS",
    "OPEN_DEAL",
    "UNQUALIFIED",
    "ATTEMPTED_TO_CONTACT",
    "CONNECTED",
    "BAD_TIMING",
]
ANALYTICS_SOURCES = [
    "ORGANIC_SEARCH",
    "PAID_SEARCH",
    "EMAIL_MARKETING",
    "SOCIAL_MEDIA",
    "REFERRALS",
    "OTHER_CAMPAIGNS",
    "DIRECT_TRAFFIC",
    "OFFLINE",
    "PAID_SOCIAL",
]
LEAD_TYPES = [
    ("new_business", "New Business"),
    ("existing_customer", "Existing Customer"),
    ("maintenance", "Maintenance"),
]
# (id, label, isClosed, probability) in displayOrder.
DEAL_STAGES = [
    ("appointmentscheduled", "Appointment Scheduled", "false", "0.2"),
    ("qualifiedtobuy", "Qualified To Buy", "false", "0.4"),
    ("presentationscheduled", "Presentation Scheduled", "false", "0.6"),
    ("decisionmakerboughtin", "Decision Maker Bought-In", "false", "0.8"),
    ("contractsent", "Contract Sent", "false", "0.9"),
    ("onhold", "On Hold", "false", "0.0"),
    ("closedwon", "Closed Won", "true", "1.0"),
    ("closedlost", "Closed Lost", "true", "0.0"),
]


def _title(v: str) -> str:
    return v.replace("_", " ").title().replace(" To ", " to ")


@dataclass(frozen=True)
class Prop:
    object: str
    name: str
    label: str
    type: str  # string | number | enumeration | datetime
    options: tuple[tuple[str, str], ...] = ()  # (value, label) in displayOrder

    @property
    def field_type(self) -> str:
        return {"enumeration": "select", "number": "number", "datetime": "date"}.get(
            self.type, "text"
        )


# The property catalogue: adding a property is one line.
PROPERTIES: tuple[Prop, ...] = (
    Prop("contacts", "email", "Email", "string"),
    Prop("contacts", "firstname", "First Name", "string"),
    Prop("contacts", "lastname", "Last Name", "string"),
    Prop("contacts", "company", "Company Name", "string"),
    Prop("contacts", "lifecyclestage", "Lifecycle Stage", "enumeration", tuple(LIFECYCLE_STAGES)),
    Prop(
        "contacts",
        "hs_lead_status",
        "Lead Status",
        "enumeration",
        tuple((v, _title(v)) for v in LEAD_STATUSES),
    ),
    Prop("contacts", "hubspotscore", "HubSpot Score", "number"),
    Prop(
        "contacts",
        "hs_analytics_source",
        "Original Source",
        "enumeration",
        tuple((v, _title(v)) for v in ANALYTICS_SOURCES),
    ),
    Prop("contacts", "recent_conversion_event_name", "Recent Conversion", "string"),
    Prop("contacts", "recent_conversion_date", "Recent Conversion Date", "datetime"),
    Prop("contacts", "syncd_return_reason", "Return Reason (syncd)", "string"),
    Prop("contacts", "syncd_lead_type", "Lead Type (syncd)", "enumeration", tuple(LEAD_TYPES)),
    Prop("contacts", "createdate", "Create Date", "datetime"),
    Prop("contacts", "lastmodifieddate", "Last Modified Date", "datetime"),
    Prop("contacts", "hs_object_id", "Record ID", "number"),
    Prop("contacts", "hs_merged_object_ids", "Merged Contact IDs", "string"),
    Prop("deals", "dealname", "Deal Name", "string"),
    Prop(
        "deals", "dealstage", "Deal Stage", "enumeration", tuple((s[0], s[1]) for s in DEAL_STAGES)
    ),
    Prop("deals", "pipeline", "Pipeline", "enumeration", (("default", "Sales Pipeline"),)),
    Prop("deals", "amount", "Amount", "number"),
    Prop("deals", "closedate", "Close Date", "datetime"),
    Prop("deals", "createdate", "Create Date", "datetime"),
    Prop("deals", "hs_lastmodifieddate", "Last Modified Date", "datetime"),
    Prop("deals", "hs_object_id", "Record ID", "number"),
    Prop("deals", "hs_merged_object_ids", "Merged Deal IDs", "string"),
)
CATALOGUE: dict[str, dict[str, Prop]] = {
    o: {p.name: p for p in PROPERTIES if p.object == o} for o in OBJECT_TYPES
}
_EPOCH_ISO = "2024-01-01T00:00:00.000Z"


def to_ms(at: datetime) -> int:
    if at.tzinfo is None:
        raise ValueError("naive datetime: pass a tz-aware UTC datetime")
    return int(round(at.timestamp() * 1000))


def iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


def parse_ms(value: str) -> int:
    """Epoch-ms string or ISO-8601 → epoch ms (what search filters and datetime writes accept)."""
    v = value.strip()
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    return to_ms(datetime.fromisoformat(v.replace("Z", "+00:00")))


def _now_ms() -> int:
    return int(time.time() * 1000)


class ApiError(Exception):
    def __init__(self, status: int, message: str, category: str, **extra: Any) -> None:
        super().__init__(message)
        self.response = Response(status, _error_body(message, category, **extra))


def _error_body(message: str, category: str, **extra: Any) -> dict[str, Any]:
    return {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
        **extra,
    }


def _invalid(name: str, message: str, error: str) -> ApiError:
    import json

    detail = json.dumps([{"isValid": False, "message": message, "error": error, "name": name}])
    return ApiError(
        400,
        f"Property values were not valid: {detail}",
        "VALIDATION_ERROR",
        errors=[{"message": message, "code": error, "context": {"propertyName": [name]}}],
    )


@dataclass
class _Record:
    id: str
    props: dict[str, str | None]
    created: int
    updated: int
    archived: bool = False
    archived_at: int | None = None


@dataclass
class _Store:
    records: dict[str, _Record] = field(default_factory=dict)
    # (updated ms, int id) of non-archived records, sorted: the search index
    by_mod: list[tuple[int, int]] = field(default_factory=list)
    # id-ordered ids for the list endpoint, per "live"/"archived"; cleared on create/archive
    sorted_ids: dict[str, list[int] | None] = field(default_factory=dict)
    # merged-away id -> the surviving id (reads and writes of the old id reach the survivor)
    merged: dict[str, str] = field(default_factory=dict)


class HubSpotApp:
    """The HubSpot simulator (an :class:`~syncd.sandbox._server.App`)."""

    name = "hubspot"

    def __init__(
        self,
        *,
        token: str = "sandbox-token",
        daily_limit: int = 1_000_000,
        search_max_offset: int = SEARCH_MAX_OFFSET,
        burst_limit: int = 190,
        enforce_burst: bool = False,
        clock: Callable[[], int] = _now_ms,
        day_s: float | None = None,
        search_per_s: int | None = None,
        burst_window_s: float = 10.0,
    ) -> None:
        self.token = token
        self.daily_limit = daily_limit
        self.search_max_offset = search_max_offset  # lower it in tests to exercise the cap
        self.burst_limit = burst_limit
        self.enforce_burst = enforce_burst
        self.daily_used = 0
        self.write_log: list[dict[str, Any]] = []
        self._clock = clock
        self._lock = threading.RLock()
        self._stores = {o: _Store() for o in OBJECT_TYPES}
        self._next_id = {"contacts": 101, "deals": 9001}
        self._assoc: dict[str, dict[str, set[str]]] = {"contacts": {}, "deals": {}}
        self._burst: deque[float] = deque()
        self.day_s = day_s
        self.burst_window_s = burst_window_s
        self.search_per_s = search_per_s
        self._day = self._day_of()
        self._searches: deque[float] = deque()
        # endpoint -> how many more requests are applied and then answered 504 (lost answers)
        self._lose: dict[str, int] = {}
        self.id_requests: Counter[str] = Counter()
        self.oauth: HubSpotOAuth | None = None  # the OAuth token endpoint + expiring tokens (sandbox/oauth.py)

    def lose_answers(self, endpoint: str, count: int = 1) -> None:
        """The next ``count`` requests to ``endpoint`` are applied, then answered 504 (a gateway
        timeout after the CRM did the work: the client cannot tell it was applied)."""
        with self._lock:
            self._lose[endpoint] = self._lose.get(endpoint, 0) + count

    # ------------------------------------------------------------------ ground truth
    def add(
        self,
        object_type: str,
        properties: Mapping[str, Any],
        *,
        at: datetime | None = None,
        record_id: str | None = None,
    ) -> str:
        """Create a record directly (not API traffic); returns its id. Bad values: ValueError."""
        with self._lock:
            try:
                rid = self._create(object_type, properties, _ms(at, self._clock), record_id)
            except ApiError as e:
                raise ValueError(str(e)) from None
            return rid

    def modify(
        self,
        object_type: str,
        id: str,
        properties: Mapping[str, Any],
        *,  # noqa: A002
        at: datetime | None = None,
    ) -> None:
        """Update a record with the same rules as an API write (not API traffic; ValueError)."""
        with self._lock:
            rec = self._store(object_type).records.get(id)
            if rec is None:
                raise KeyError(f"{object_type} {id} not found")
            try:
                self._update(object_type, rec, properties, _ms(at, self._clock))
            except ApiError as e:
                raise ValueError(str(e)) from None

    def get(self, object_type: str, id: str) -> dict[str, Any]:  # noqa: A002
        with self._lock:
            return dict(self._store(object_type).records[id].props)

    def all(self, object_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(r.props) for r in self._store(object_type).records.values() if not r.archived
            ]

    def archive(self, object_type: str, id: str, *, at: datetime | None = None) -> None:  # noqa: A002
        """Archive (delete) a record as a user would: it goes to the recycle bin."""
        with self._lock:
            self._archive(object_type, self._live(object_type, id), _ms(at, self._clock))

    def purge(self, object_type: str, id: str) -> None:  # noqa: A002
        """Delete a record for good (a GDPR delete, or the recycle bin emptied after 90 days):
        neither search, nor the archive list, nor a read by id knows it any more."""
        with self._lock:
            st = self._store(object_type)
            rec = st.records.pop(id)
            key = (rec.updated, int(rec.id))
            i = bisect.bisect_left(st.by_mod, key)
            if i < len(st.by_mod) and st.by_mod[i] == key:
                del st.by_mod[i]
            for old, new in list(st.merged.items()):
                if new == id:
                    del st.merged[old]
            o = "deals" if object_type == "contacts" else "contacts"
            for other in self._assoc[object_type].pop(id, set()):
                self._assoc[o].get(other, set()).discard(id)
            st.sorted_ids.clear()

    def restore(self, object_type: str, id: str, *, at: datetime | None = None) -> None:  # noqa: A002
        """Restore an archived record from the recycle bin (its modified date moves)."""
        with self._lock:
            st = self._store(object_type)
            rec = st.records[id]
            if not rec.archived:
                raise ValueError(f"{object_type} {id} is not archived")
            rec.archived, rec.archived_at = False, None
            st.sorted_ids.clear()
            self._reindex(object_type, rec, _ms(at, self._clock))

    def merge(self, object_type: str, primary: str, secondary: str, *,
              at: datetime | None = None) -> None:
        """Merge ``secondary`` into ``primary`` (see the module docstring)."""
        with self._lock:
            st = self._store(object_type)
            keep, gone = self._live(object_type, primary), self._live(object_type, secondary)
            when = _ms(at, self._clock)
            for name, value in gone.props.items():
                if value not in (None, "") and keep.props.get(name) in (None, "") \
                        and name not in READ_ONLY:
                    keep.props[name] = value
            a, b = keep.props.get("lifecyclestage"), gone.props.get("lifecyclestage")
            if a and b and _is_backwards(b, a):
                keep.props["lifecyclestage"] = b
            ids = [*(keep.props.get("hs_merged_object_ids") or "").split(";"), secondary,
                   *(gone.props.get("hs_merged_object_ids") or "").split(";")]
            keep.props["hs_merged_object_ids"] = ";".join(i for i in dict.fromkeys(ids) if i)
            for old, new in list(st.merged.items()):
                if new == secondary:
                    st.merged[old] = primary
            st.merged[secondary] = primary
            for other in self._assoc[object_type].pop(secondary, set()):
                o = "deals" if object_type == "contacts" else "contacts"
                self._assoc[o][other].discard(secondary)
                self._associate(object_type, primary, o, other, when)
            key = (gone.updated, int(secondary))
            i = bisect.bisect_left(st.by_mod, key)
            if i < len(st.by_mod) and st.by_mod[i] == key:
                del st.by_mod[i]
            del st.records[secondary]
            st.sorted_ids.clear()
            self._reindex(object_type, keep, when)

    def _archive(self, t: str, rec: _Record, at: int) -> None:
        st = self._stores[t]
        i = bisect.bisect_left(st.by_mod, (rec.updated, int(rec.id)))
        if i < len(st.by_mod) and st.by_mod[i] == (rec.updated, int(rec.id)):
            del st.by_mod[i]
        rec.archived, rec.archived_at = True, at
        st.sorted_ids.clear()

    def _resolve(self, t: str, rid: str) -> str:
        """The id a request for ``rid`` reaches: the survivor of a merge, else ``rid``."""
        return self._stores[t].merged.get(rid, rid)

    def associate(self, contact_id: str, deal_id: str, *, at: datetime | None = None) -> None:
        with self._lock:
            self._associate("contacts", contact_id, "deals", deal_id, _ms(at, self._clock))

    def associations(self, object_type: str, id: str) -> list[str]:  # noqa: A002
        with self._lock:
            return sorted(self._assoc[object_type].get(id, set()), key=int)

    # ------------------------------------------------------------------ App protocol
    def endpoint(self, req: Request) -> str:
        if self.oauth is not None and self.oauth.owns(req.path):
            return self.oauth.endpoint(req)
        return self._route(req)[0]

    def fault_response(self, fault: Fault, req: Request) -> Response:  # noqa: ARG002 - same for all
        if fault.kind == "rate_limit":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = _fmt_seconds(fault.retry_after)
            return Response(
                429,
                self._rate_body(
                    "TEN_SECONDLY_ROLLING", "You have reached your ten_secondly_rolling limit."
                ),
                headers,
            )
        if fault.kind == "expired_session":
            return Response(
                401,
                _error_body(
                    fault.message
                    or "The OAuth token used to make this call expired 0 second(s) ago.",
                    "EXPIRED_AUTHENTICATION",
                ),
            )
        return Response(
            fault.status,
            _error_body(
                fault.message or "Service temporarily unavailable",
                "INTERNAL_ERROR" if fault.status < 502 else "SERVICE_UNAVAILABLE",
            ),
        )

    def handle(self, req: Request, faults: FaultPlan) -> Response:
        if self.oauth is not None and self.oauth.owns(req.path):
            return self.oauth.handle(req, self.token)
        endpoint, handler, args = self._route(req)
        if handler is None:
            return Response(404, _error_body("resource not found", "OBJECT_NOT_FOUND"))
        auth = req.headers.get("authorization", "")
        if auth != f"Bearer {self.token}" and self.oauth is not None and auth.startswith("Bearer "):
            refused = self.oauth.refusal(auth[7:])
            if refused is not None:
                return refused
        elif auth != f"Bearer {self.token}":
            return Response(
                401,
                _error_body(
                    "Authentication credentials not found. This API supports OAuth 2.0 "
                    "authentication and you can find more details at "
                    "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                    "INVALID_AUTHENTICATION",
                ),
            )
        limited = self._spend(endpoint)
        if limited is not None:
            return limited
        if endpoint.rsplit(".", 1)[-1] in ("get", "update", "archive"):
            self.id_requests[args[1]] += 1
        try:
            with self._lock:
                resp = handler(req, faults, endpoint, *args)
                if self._lose.get(endpoint):
                    self._lose[endpoint] -= 1
                    resp = Response(504, _error_body("The gateway timed out", "GATEWAY_TIMEOUT"))
        except ApiError as e:
            resp = e.response
        if not endpoint.endswith(".search"):
            resp.headers.update(self._rate_headers())
        return resp

    # ------------------------------------------------------------------ routing
    def _route(self, req: Request) -> tuple[str, Any, tuple[Any, ...]]:
        p = req.path.rstrip("/").split("/")[1:]
        m = req.method
        if p[:3] == ["crm", "v3", "objects"] and len(p) >= 4 and p[3] in OBJECT_TYPES:
            t = p[3]
            rest = p[4:]
            if not rest:
                if m == "GET":
                    return f"{t}.list", self._h_list, (t,)
                if m == "POST":
                    return f"{t}.create", self._h_create, (t,)
            elif rest == ["search"] and m == "POST":
                return f"{t}.search", self._h_search, (t,)
            elif len(rest) == 2 and rest[0] == "batch" and m == "POST":
                op = {
                    "read": self._h_batch_read,
                    "update": self._h_batch_update,
                    "create": self._h_batch_create,
                }.get(rest[1])
                if op is not None:
                    return f"{t}.batch_{rest[1]}", op, (t,)
            elif len(rest) == 1:
                h = {
                    "GET": ("get", self._h_get),
                    "PATCH": ("update", self._h_patch),
                    "DELETE": ("archive", self._h_archive),
                }.get(m)
                if h is not None:
                    return f"{t}.{h[0]}", h[1], (t, rest[0])
        if p[:3] == ["crm", "v4", "objects"] and len(p) >= 7 and p[5] == "associations":
            ft, fid, tt = p[3], p[4], p[6]
            if _pair_ok(ft, tt):
                if len(p) == 7 and m == "GET":
                    return "associations.list", self._h_assoc_list, (ft, fid, tt)
                if len(p) == 8 and m == "PUT":
                    return "associations.create", self._h_assoc_create, (ft, fid, tt, p[7])
                if len(p) == 9 and p[6] == "default" and m == "PUT" and _pair_ok(ft, p[7]):
                    return "associations.create", self._h_assoc_create, (ft, fid, p[7], p[8], True)
        if (
            p[:3] == ["crm", "v4", "associations"]
            and len(p) == 7
            and p[5:] == ["batch", "read"]
            and m == "POST"
            and _pair_ok(p[3], p[4])
        ):
            return "associations.batch_read", self._h_assoc_batch_read, (p[3], p[4])
        if (
            p[:3] == ["crm", "v3", "properties"]
            and len(p) in (4, 5)
            and p[3] in OBJECT_TYPES
            and m == "GET"
        ):
            return "properties", self._h_properties, (p[3], p[4] if len(p) == 5 else None)
        if p[:3] == ["crm", "v3", "pipelines"] and len(p) == 4 and p[3] == "deals" and m == "GET":
            return "pipelines", self._h_pipelines, ()
        return "unknown", None, ()

    # ------------------------------------------------------------------ budget
    def _day_of(self) -> int:
        return int(time.time() // self.day_s) if self.day_s else datetime.now(UTC).toordinal()

    def _search_limited(self, endpoint: str, now: float) -> Response | None:
        if not self.search_per_s or not endpoint.endswith(".search"):
            return None
        while self._searches and now - self._searches[0] >= 1.0:
            self._searches.popleft()
        if len(self._searches) >= self.search_per_s:
            return Response(429, self._rate_body("SECONDLY", "You have reached your secondly limit."))
        self._searches.append(now)
        return None

    def _spend(self, endpoint: str = "") -> Response | None:
        with self._lock:
            now = time.monotonic()
            while self._burst and now - self._burst[0] >= self.burst_window_s:
                self._burst.popleft()
            day = self._day_of()
            if day != self._day:
                self._day, self.daily_used = day, 0
            if self.daily_used >= self.daily_limit:
                return Response(
                    429,
                    self._rate_body("DAILY", "You have reached your daily limit."),
                    self._rate_headers(),
                )
            if self.enforce_burst and len(self._burst) >= self.burst_limit:
                return Response(
                    429,
                    self._rate_body(
                        "TEN_SECONDLY_ROLLING", "You have reached your ten_secondly_rolling limit."
                    ),
                    self._rate_headers(),
                )
            searched = self._search_limited(endpoint, now)
            if searched is not None:
                return searched
            self._burst.append(now)
            self.daily_used += 1
            return None

    def _rate_headers(self) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Max": str(self.burst_limit),
            "X-HubSpot-RateLimit-Remaining": str(max(0, self.burst_limit - len(self._burst))),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(self.burst_window_s * 1000)),
            "X-HubSpot-RateLimit-Daily": str(self.daily_limit),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, self.daily_limit - self.daily_used)),
        }

    @staticmethod
    def _rate_body(policy: str, message: str) -> dict[str, Any]:
        return {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
            "requestId": str(uuid.uuid4()),
        }

    # ------------------------------------------------------------------ core writes
    def _store(self, object_type: str) -> _Store:
        if object_type not in self._stores:
            raise KeyError(f"unknown object type {object_type!r}")
        return self._stores[object_type]

    def _validate(self, t: str, props: Mapping[str, Any]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, raw in props.items():
            prop = CATALOGUE[t].get(name)
            if prop is None:
                raise _invalid(name, f'Property "{name}" does not exist', "PROPERTY_DOESNT_EXIST")
            if name in READ_ONLY:
                raise _invalid(
                    name,
                    f"{name} is a read only property; its value cannot be set.",
                    "READ_ONLY_VALUE",
                )
            value = None if raw is None else str(raw)
            if value == "" or value is None:
                out[name] = None
                continue
            if prop.type == "enumeration" and value not in {o[0] for o in prop.options}:
                allowed = ", ".join(o[0] for o in prop.options)
                raise _invalid(
                    name,
                    f"{value} was not one of the allowed options: [{allowed}]",
                    "INVALID_OPTION",
                )
            if prop.type == "number":
                try:
                    float(value)
                except ValueError:
                    raise _invalid(
                        name, f"{value} is not a valid number", "INVALID_INTEGER"
                    ) from None
            if prop.type == "datetime":
                try:
                    value = iso(parse_ms(value))
                except ValueError:
                    raise _invalid(
                        name, f"{value} is not a valid datetime", "INVALID_DATE"
                    ) from None
            out[name] = value
        return out

    def _reindex(self, t: str, rec: _Record, new_ms: int) -> None:
        st = self._stores[t]
        if not rec.archived:
            key = (rec.updated, int(rec.id))
            i = bisect.bisect_left(st.by_mod, key)
            if i < len(st.by_mod) and st.by_mod[i] == key:
                del st.by_mod[i]
        rec.updated = new_ms
        rec.props[MODIFIED_PROP[t]] = iso(new_ms)
        if not rec.archived:
            bisect.insort(st.by_mod, (new_ms, int(rec.id)))

    def _create(
        self, t: str, props: Mapping[str, Any], at: int, record_id: str | None = None
    ) -> str:
        st = self._store(t)
        values = self._validate(t, props)
        if record_id is None:
            while str(self._next_id[t]) in st.records:
                self._next_id[t] += 1
            record_id = str(self._next_id[t])
            self._next_id[t] += 1
        elif not record_id.isdigit() or record_id in st.records:
            raise ValueError(f"record_id {record_id!r} must be a new numeric id")
        base: dict[str, str | None] = {"hs_object_id": record_id, "createdate": iso(at)}
        if t == "deals":
            base["pipeline"] = "default"
        base.update({k: v for k, v in values.items() if v is not None})
        rec = _Record(record_id, base, at, at)
        st.records[record_id] = rec
        st.sorted_ids.clear()
        rec.props[MODIFIED_PROP[t]] = iso(at)
        bisect.insort(st.by_mod, (at, int(record_id)))
        return record_id

    def _update(self, t: str, rec: _Record, props: Mapping[str, Any], at: int) -> dict[str, Any]:
        values = self._validate(t, props)
        applied: dict[str, Any] = {}
        for name, value in values.items():
            if (
                name == "lifecyclestage"
                and value is not None
                and _is_backwards(rec.props.get(name), value)
            ):
                continue  # accepted, silently ignored (see module docstring)
            if value is None:
                rec.props.pop(name, None)
            else:
                rec.props[name] = value
            applied[name] = value
        self._reindex(t, rec, max(at, rec.created))
        return applied

    def _associate(self, ft: str, fid: str, tt: str, tid: str, at: int) -> None:
        if fid not in self._store(ft).records or tid not in self._store(tt).records:
            raise ApiError(404, f"{ft} {fid} or {tt} {tid} not found", "OBJECT_NOT_FOUND")
        self._assoc[ft].setdefault(fid, set()).add(tid)
        self._assoc[tt].setdefault(tid, set()).add(fid)
        deal_id = fid if ft == "deals" else tid
        self._reindex("deals", self._stores["deals"].records[deal_id], at)

    def _log(self, endpoint: str, t: str, rid: str, props: Mapping[str, Any], at: int) -> None:
        self.write_log.append(
            {
                "time": iso(at),
                "object": t,
                "id": rid,
                "properties": dict(props),
                "endpoint": endpoint,
            }
        )

    # ------------------------------------------------------------------ object rendering
    def _obj(self, t: str, rec: _Record, names: Iterable[str] | None) -> dict[str, Any]:
        wanted = (
            list(DEFAULT_PROPS[t]) if names is None else [n for n in names if n in CATALOGUE[t]]
        )
        out: dict[str, Any] = {
            "id": rec.id,
            "properties": {n: rec.props.get(n) for n in wanted},
            "createdAt": iso(rec.created),
            "updatedAt": iso(rec.updated),
            "archived": rec.archived,
        }
        if rec.archived_at is not None:
            out["archivedAt"] = iso(rec.archived_at)
        return out

    # ------------------------------------------------------------------ handlers: objects
    def _h_list(self, req: Request, _f: FaultPlan, _e: str, t: str) -> Response:
        limit = _int(req.q("limit", "10"), "limit")
        if limit > LIST_LIMIT or limit < 1:
            raise ApiError(400, f"limit must be between 1 and {LIST_LIMIT}", "VALIDATION_ERROR")
        archived = (req.q("archived", "false") or "false").lower() == "true"
        after = req.q("after")
        names = _props_query(req)
        ids = self._sorted_ids(t, archived)
        start = bisect.bisect_right(ids, int(after)) if after and after.isdigit() else 0
        page = ids[start : start + limit]
        body: dict[str, Any] = {
            "results": [self._obj(t, self._stores[t].records[str(i)], names) for i in page]
        }
        if start + limit < len(ids):
            nxt = str(page[-1])
            body["paging"] = {"next": {"after": nxt, "link": f"/crm/v3/objects/{t}?after={nxt}"}}
        return Response(200, body)

    def _sorted_ids(self, t: str, archived: bool) -> list[int]:
        """Record ids in id order (cached until the next create/archive)."""
        st = self._stores[t]
        key = "archived" if archived else "live"
        if st.sorted_ids.get(key) is None:
            st.sorted_ids[key] = sorted(
                int(r.id) for r in st.records.values() if r.archived == archived
            )
        return st.sorted_ids[key] or []

    def _live(self, t: str, rid: str) -> _Record:
        rec = self._stores[t].records.get(self._resolve(t, rid))
        if rec is None or rec.archived:
            raise ApiError(404, "resource not found", "OBJECT_NOT_FOUND")
        return rec

    def _h_get(self, req: Request, _f: FaultPlan, _e: str, t: str, rid: str) -> Response:
        return Response(200, self._obj(t, self._live(t, rid), _props_query(req)))

    def _h_patch(self, req: Request, _f: FaultPlan, endpoint: str, t: str, rid: str) -> Response:
        rec = self._live(t, rid)
        props = (req.json() or {}).get("properties") or {}
        at = self._clock()
        applied = self._update(t, rec, props, at)
        self._log(endpoint, t, rid, props, at)
        del applied
        return Response(200, self._obj(t, rec, list(DEFAULT_PROPS[t]) + list(props)))

    def _h_archive(self, _r: Request, _f: FaultPlan, _e: str, t: str, rid: str) -> Response:
        self._archive(t, self._live(t, rid), self._clock())
        return Response(204)

    def _refuse_duplicate_emails(self, t: str, inputs: list[Mapping[str, Any]]) -> None:
        """HubSpot keeps one contact per email: an API create of an email a contact already has
        (or that two inputs share) is refused as a whole, 409 CONFLICT naming the existing id."""
        if t != "contacts":
            return
        held = {str(r.props.get("email") or "").strip().lower(): rid
                for rid, r in self._stores[t].records.items() if not r.archived and r.props.get("email")}
        seen: set[str] = set()
        for inp in inputs:
            email = str((inp.get("properties") or {}).get("email") or "").strip().lower()
            if not email:
                continue
            if email in held:
                raise ApiError(409, f"Contact already exists. Existing ID: {held[email]}", "CONFLICT")
            if email in seen:
                raise ApiError(400, f"Duplicate email {email!r} in one batch", "VALIDATION_ERROR")
            seen.add(email)

    def _h_create(self, req: Request, _f: FaultPlan, endpoint: str, t: str) -> Response:
        props = (req.json() or {}).get("properties") or {}
        self._refuse_duplicate_emails(t, [{"properties": props}])
        at = self._clock()
        rid = self._create(t, props, at)
        self._log(endpoint, t, rid, props, at)
        return Response(
            201, self._obj(t, self._stores[t].records[rid], list(DEFAULT_PROPS[t]) + list(props))
        )

    def _h_batch_read(self, req: Request, _f: FaultPlan, _e: str, t: str) -> Response:
        body = req.json() or {}
        inputs = body.get("inputs") or []
        _check_batch(inputs)
        names = body.get("properties") or None
        started = iso(self._clock())
        archived = (req.q("archived", "false") or "false").lower() == "true"
        results, missing = [], []
        for inp in inputs:
            rid = str(inp.get("id"))
            self.id_requests[rid] += 1
            rec = self._stores[t].records.get(self._resolve(t, rid))
            if rec is None or rec.archived != archived:
                missing.append(rid)
            else:
                results.append(self._obj(t, rec, names))
        return _batch_response(results, missing, started, self._clock(), 200)

    def _h_batch_update(self, req: Request, faults: FaultPlan, endpoint: str, t: str) -> Response:
        inputs = (req.json() or {}).get("inputs") or []
        _check_batch(inputs)
        started = iso(self._clock())
        ids = [str(i.get("id")) for i in inputs]
        for inp in inputs:  # validate all first: a bad value fails the whole batch
            self._validate(t, inp.get("properties") or {})
        failing = faults.failing_ids(endpoint, set(ids))
        results, missing, errors = [], [], []
        at = self._clock()
        for rid, inp in zip(ids, inputs, strict=True):
            self.id_requests[rid] += 1
            rec = self._stores[t].records.get(self._resolve(t, rid))
            if rec is None or rec.archived:
                missing.append(rid)
                continue
            if rid in failing:
                errors.append(rid)
                continue
            props = inp.get("properties") or {}
            self._update(t, rec, props, at)
            self._log(endpoint, t, rec.id, props, at)
            obj = self._obj(t, rec, list(DEFAULT_PROPS[t]) + list(props))
            if inp.get("objectWriteTraceId"):
                obj["objectWriteTraceId"] = inp["objectWriteTraceId"]
            results.append(obj)
        return _batch_response(results, missing, started, self._clock(), 200, errors)

    def _h_batch_create(self, req: Request, faults: FaultPlan, endpoint: str, t: str) -> Response:
        inputs = (req.json() or {}).get("inputs") or []
        _check_batch(inputs)
        started = iso(self._clock())
        for inp in inputs:
            self._validate(t, inp.get("properties") or {})
        self._refuse_duplicate_emails(t, inputs)
        # A create has no id yet: partial faults match its objectWriteTraceId, else its
        # position in the batch ("0", "1", ...).
        keys = [str(inp.get("objectWriteTraceId") or i) for i, inp in enumerate(inputs)]
        failing = faults.failing_ids(endpoint, set(keys))
        results, errors = [], []
        at = self._clock()
        for key, inp in zip(keys, inputs, strict=True):
            if key in failing:
                errors.append(key)
                continue
            props = inp.get("properties") or {}
            rid = self._create(t, props, at)
            self._log(endpoint, t, rid, props, at)
            obj = self._obj(t, self._stores[t].records[rid], list(DEFAULT_PROPS[t]) + list(props))
            if inp.get("objectWriteTraceId"):
                obj["objectWriteTraceId"] = inp["objectWriteTraceId"]
            results.append(obj)
        return _batch_response(results, [], started, self._clock(), 201, errors)

    def _h_search(self, req: Request, _f: FaultPlan, _e: str, t: str) -> Response:
        body = req.json() or {}
        limit = int(body.get("limit") or 10)
        if limit > SEARCH_LIMIT or limit < 0:
            raise ApiError(
                400, f"limit must be less than or equal to {SEARCH_LIMIT}", "VALIDATION_ERROR"
            )
        offset = _int(str(body.get("after") or "0"), "after")
        if offset >= self.search_max_offset:
            raise ApiError(
                400,
                "There was a problem with the request.",
                "VALIDATION_ERROR",
                subCategory="PublicSearchValidationError.MAX_SEARCH_OFFSET_EXCEEDED",
            )
        sorts = body.get("sorts") or []
        if len(sorts) > 1:
            raise ApiError(400, "only one sort is supported", "VALIDATION_ERROR")
        groups = body.get("filterGroups") or []
        matches = self._search_ids(t, groups, sorts[0] if sorts else None, body.get("query"))
        page = matches[offset : offset + limit]
        names = body.get("properties") or None
        out: dict[str, Any] = {
            "total": len(matches),
            "results": [self._obj(t, self._stores[t].records[r], names) for r in page],
        }
        if offset + limit < len(matches):
            out["paging"] = {"next": {"after": str(offset + limit)}}
        return Response(200, out)

    def _search_ids(
        self, t: str, groups: list[dict[str, Any]], sort: Any, query: str | None
    ) -> list[str]:
        st = self._stores[t]
        mod = MODIFIED_PROP[t]
        rest: list[list[dict[str, Any]]] = [list(g.get("filters") or []) for g in groups]
        candidates: list[str]
        indexed = False
        if len(rest) == 1 and any(f.get("propertyName") == mod for f in rest[0]):
            lo, hi = -(2**62), 2**62
            keep = []
            for f in rest[0]:
                rng = _range(f) if f.get("propertyName") == mod else None
                if rng is None:
                    keep.append(f)
                else:
                    lo, hi = max(lo, rng[0]), min(hi, rng[1])
            i = bisect.bisect_left(st.by_mod, (lo, -1))
            j = bisect.bisect_right(st.by_mod, (hi, 2**62))
            candidates = [str(r[1]) for r in st.by_mod[i:j]]
            rest = [keep]
            indexed = True
        else:
            candidates = [str(r[1]) for r in st.by_mod]  # (modified, id) order
        preds = [
            [_predicate(CATALOGUE[t].get(f.get("propertyName", "")), f) for f in g] for g in rest
        ]
        q = (query or "").strip().lower()
        recs = st.records
        if any(preds) or q:

            def ok(rid: str) -> bool:
                props = recs[rid].props
                if q and not any(
                    q in (props.get(n) or "").lower()
                    for n in ("email", "firstname", "lastname", "company", "dealname")
                ):
                    return False
                return not preds or any(all(p(props) for p in g) for g in preds)

            candidates = [r for r in candidates if ok(r)]
        del indexed
        if sort is None:
            return sorted(candidates, key=int)
        if isinstance(sort, str):
            name, desc = sort.lstrip("-"), sort.startswith("-")
        else:
            name, desc = (
                sort.get("propertyName", ""),
                sort.get("direction", "ASCENDING") == "DESCENDING",
            )
        if name == mod:
            return candidates[::-1] if desc else candidates
        prop = CATALOGUE[t].get(name)
        conv = _converter(prop)

        def key(rid: str) -> tuple[int, Any, int]:
            v = recs[rid].props.get(name)
            return (1, 0, int(rid)) if v is None else (0, conv(v), int(rid))

        return sorted(candidates, key=key, reverse=desc)

    # ------------------------------------------------------------------ handlers: associations
    def _h_assoc_list(
        self, req: Request, _f: FaultPlan, _e: str, ft: str, fid: str, tt: str
    ) -> Response:
        self._live(ft, fid)
        limit = _int(req.q("limit", "500"), "limit")
        after = req.q("after")
        ids = sorted(self._assoc[ft].get(fid, set()), key=int)
        start = (
            bisect.bisect_right([int(i) for i in ids], int(after))
            if after and after.isdigit()
            else 0
        )
        page = ids[start : start + limit]
        body: dict[str, Any] = {"results": [_assoc_to(ft, tt, i) for i in page]}
        if start + limit < len(ids):
            body["paging"] = {"next": {"after": page[-1], "link": None}}
        return Response(200, body)

    def _h_assoc_create(
        self,
        req: Request,
        _f: FaultPlan,
        endpoint: str,
        ft: str,
        fid: str,
        tt: str,
        tid: str,
        default: bool = False,
    ) -> Response:
        at = self._clock()
        self._associate(ft, fid, tt, tid, at)
        self._log(endpoint, ft, fid, {"_associate": f"{tt}/{tid}"}, at)
        if default:
            return Response(
                200,
                {
                    "status": "COMPLETE",
                    "results": [
                        {
                            "from": {"id": fid},
                            "to": {"id": tid},
                            "associationSpec": {
                                "associationCategory": "HUBSPOT_DEFINED",
                                "associationTypeId": ASSOC_TYPE_ID[(ft, tt)],
                            },
                        }
                    ],
                    "startedAt": iso(at),
                    "completedAt": iso(self._clock()),
                },
            )
        del req
        return Response(
            201,
            {
                "fromObjectTypeId": TYPE_IDS[ft],
                "fromObjectId": int(fid),
                "toObjectTypeId": TYPE_IDS[tt],
                "toObjectId": int(tid),
                "labels": [],
            },
        )

    def _h_assoc_batch_read(
        self, req: Request, _f: FaultPlan, _e: str, ft: str, tt: str
    ) -> Response:
        inputs = (req.json() or {}).get("inputs") or []
        if len(inputs) > ASSOC_BATCH_LIMIT:
            raise ApiError(400, f"Batch input limit is {ASSOC_BATCH_LIMIT}", "VALIDATION_ERROR")
        started = iso(self._clock())
        results, empty = [], []
        for inp in inputs:
            fid = str(inp.get("id"))
            to = sorted(self._assoc[ft].get(fid, set()), key=int)
            if to:
                results.append({"from": {"id": fid}, "to": [_assoc_to(ft, tt, i) for i in to]})
            else:
                empty.append(fid)
        resp = _batch_response(results, [], started, self._clock(), 200)
        if empty:
            resp.status = 207
            resp.body["numErrors"] = len(empty)
            resp.body["errors"] = [
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
                    "message": f"No {tt} is associated with {ft} {i}.",
                    "context": {"fromObjectId": [i]},
                }
                for i in empty
            ]
        return resp

    # ------------------------------------------------------------------ handlers: metadata
    def _h_properties(
        self, _r: Request, _f: FaultPlan, _e: str, t: str, name: str | None
    ) -> Response:
        props = [_prop_json(p) for p in CATALOGUE[t].values()]
        if name is None:
            return Response(200, {"results": props})
        for p in props:
            if p["name"] == name:
                return Response(200, p)
        raise ApiError(404, f"Unable to find property {name}", "OBJECT_NOT_FOUND")

    def _h_pipelines(self, _r: Request, _f: FaultPlan, _e: str) -> Response:
        stages = [
            {
                "id": sid,
                "label": label,
                "displayOrder": i,
                "archived": False,
                "metadata": {"isClosed": closed, "probability": prob},
                "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT",
                "createdAt": _EPOCH_ISO,
                "updatedAt": _EPOCH_ISO,
            }
            for i, (sid, label, closed, prob) in enumerate(DEAL_STAGES)
        ]
        return Response(
            200,
            {
                "results": [
                    {
                        "id": "default",
                        "label": "Sales Pipeline",
                        "displayOrder": 0,
                        "archived": False,
                        "createdAt": _EPOCH_ISO,
                        "updatedAt": _EPOCH_ISO,
                        "stages": stages,
                    }
                ]
            },
        )


# ---------------------------------------------------------------------- helpers
def _ms(at: datetime | None, clock: Callable[[], int]) -> int:
    return clock() if at is None else to_ms(at)


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else str(s)


def _pair_ok(a: str, b: str) -> bool:
    return (a, b) in ASSOC_TYPE_ID


def _assoc_to(ft: str, tt: str, tid: str) -> dict[str, Any]:
    return {
        "toObjectId": int(tid),
        "associationTypes": [
            {"category": "HUBSPOT_DEFINED", "typeId": ASSOC_TYPE_ID[(ft, tt)], "label": None}
        ],
    }


def _int(v: str | None, name: str) -> int:
    try:
        return int(v or "0")
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", "VALIDATION_ERROR") from None


def _props_query(req: Request) -> list[str] | None:
    names = [n for v in req.query.get("properties", []) for n in v.split(",") if n]
    return names or None


def _check_batch(inputs: list[Any]) -> None:
    if len(inputs) > BATCH_LIMIT:
        raise ApiError(
            400, f"Batch input limit is {BATCH_LIMIT}; got {len(inputs)} inputs", "VALIDATION_ERROR"
        )


def _batch_response(
    results: list[dict[str, Any]],
    missing: list[str],
    started: str,
    now: int,
    ok: int,
    failed: list[str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "startedAt": started,
        "completedAt": iso(now),
    }
    errors = (
        [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some objects, they may be deleted or not exist. "
                f"Check that ids are valid and that the objects are not archived: {missing}",
                "context": {"ids": missing},
            }
        ]
        if missing
        else []
    )
    errors += [
        {
            "status": "error",
            "category": "INTERNAL_ERROR",
            "message": f"Internal error processing {i}; please retry",
            "context": {"ids": [i]},
        }
        for i in failed or []
    ]
    if errors:
        body["numErrors"] = len(errors)
        body["errors"] = errors
        return Response(207, body)
    return Response(ok, body)


def _is_backwards(current: str | None, new: str) -> bool:
    order = {v: i for i, (v, _) in enumerate(LIFECYCLE_STAGES)}
    return current is not None and current in order and new in order and order[new] < order[current]


def _converter(prop: Prop | None) -> Callable[[str], Any]:
    if prop is not None and prop.type == "number":
        return float
    if prop is not None and prop.type == "datetime":
        return parse_ms
    return lambda v: v.lower()


def _range(f: Mapping[str, Any]) -> tuple[int, int] | None:
    op = f.get("operator")
    try:
        v = parse_ms(str(f.get("value"))) if "value" in f and f.get("value") is not None else None
        if op == "GTE" and v is not None:
            return v, 2**62
        if op == "GT" and v is not None:
            return v + 1, 2**62
        if op == "LTE" and v is not None:
            return -(2**62), v
        if op == "LT" and v is not None:
            return -(2**62), v - 1
        if op == "EQ" and v is not None:
            return v, v
        if op == "BETWEEN" and v is not None:
            return v, parse_ms(str(f.get("highValue")))
    except ValueError:
        raise ApiError(
            400, f"invalid value for {f.get('propertyName')}", "VALIDATION_ERROR"
        ) from None
    return None


def _predicate(prop: Prop | None, f: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    name = str(f.get("propertyName", ""))
    op = f.get("operator", "EQ")
    conv = _converter(prop)
    if op == "HAS_PROPERTY":
        return lambda p: p.get(name) is not None
    if op == "NOT_HAS_PROPERTY":
        return lambda p: p.get(name) is None
    try:
        if op in ("IN", "NOT_IN"):
            values = {conv(str(v)) for v in f.get("values") or []}
            if op == "IN":
                return lambda p: p.get(name) is not None and conv(p[name]) in values
            return lambda p: p.get(name) is None or conv(p[name]) not in values
        if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
            tok = str(f.get("value", "")).lower().strip("*")
            has = op == "CONTAINS_TOKEN"
            return lambda p: (tok in (p.get(name) or "").lower()) == has
        value = conv(str(f.get("value")))
        if op == "BETWEEN":
            high = conv(str(f.get("highValue")))
            return lambda p: p.get(name) is not None and value <= conv(p[name]) <= high
    except (ValueError, TypeError):
        raise ApiError(400, f"invalid filter value for {name}", "VALIDATION_ERROR") from None
    cmp: dict[str, Callable[[Any, Any], bool]] = {
        "EQ": lambda a, b: a == b,
        "NEQ": lambda a, b: a != b,
        "LT": lambda a, b: a < b,
        "LTE": lambda a, b: a <= b,
        "GT": lambda a, b: a > b,
        "GTE": lambda a, b: a >= b,
    }
    if op not in cmp:
        raise ApiError(400, f"unsupported operator {op}", "VALIDATION_ERROR")
    fn = cmp[op]
    if op == "NEQ":
        return lambda p: p.get(name) is None or fn(conv(p[name]), value)
    return lambda p: p.get(name) is not None and fn(conv(p[name]), value)


def _prop_json(p: Prop) -> dict[str, Any]:
    return {
        "name": p.name,
        "label": p.label,
        "type": p.type,
        "fieldType": p.field_type,
        "groupName": "contactinformation" if p.object == "contacts" else "dealinformation",
        "description": "",
        "hidden": False,
        "displayOrder": -1,
        "hubspotDefined": not p.name.startswith("syncd_"),
        "calculated": p.name in READ_ONLY,
        "hasUniqueValue": p.name == "hs_object_id",
        "createdAt": _EPOCH_ISO,
        "updatedAt": _EPOCH_ISO,
        "archived": False,
        "modificationMetadata": {
            "archivable": True,
            "readOnlyDefinition": True,
            "readOnlyValue": p.name in READ_ONLY,
        },
        "options": [
            {"label": label, "value": v, "displayOrder": i, "hidden": False}
            for i, (v, label) in enumerate(p.options)
        ],
    }
