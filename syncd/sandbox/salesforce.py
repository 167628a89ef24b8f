"""A Salesforce REST simulator (API v59.0) that the unmodified simple-salesforce talks to.

Faithful to crm-api.md §2 and §4: SOQL query + query locators, sObject
get/update/create, sObject Collections, describe, limits, the usage header and
the vendor's error bodies. Serve it with :class:`~syncd.sandbox._server.SimServer`
over HTTPS (simple-salesforce forces https)::

    ctx, ca = make_tls(tmpdir)
    server = SimServer(SalesforceApp(), ssl_context=ctx).start()

Decisions where crm-api.md is silent (documented here, relied on by tests):

- ``Opportunity.ContactId`` exists as a plain, writable reference to the primary
  contact (a stand-in for the primary OpportunityContactRole).
- Salesforce's rate limit is the daily budget: an injected ``rate_limit`` fault
  answers 403 ``REQUEST_LIMIT_EXCEEDED`` (no Retry-After, like the real API).
- String comparisons (``=``, ``!=``, ``IN``, ``LIKE``) are case-insensitive, Ids included.
- Every authenticated API request counts against the daily budget; refused
  (403) requests do not. Direct-access calls (``insert``/``modify``…) never count.
  The budget is the rolling 24 hours, or with ``window_s`` a compressed rolling window.
- A ``partial`` fault makes the named ids fail in a collection with
  ``UNABLE_TO_LOCK_ROW`` (a transient per-record error on the real API).
"""

from __future__ import annotations

import bisect
import email.utils
import itertools
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from syncd.sandbox import soql
from syncd.sandbox._server import Fault, FaultPlan, Request, Response
from syncd.sandbox.oauth import SalesforceOAuth

API = "/services/data/v59.0"
_PATH = re.compile(r"^/services/data/v\d+\.\d+(?P<rest>/.*)?$")
MAX_COLLECTION = 200
GET_DELETED_WINDOW = timedelta(days=30)
DEFAULT_BATCH = 2000

LEAD_STATUSES = (
    "Open - Not Contacted",
    "Working - Contacted",
    "Closed - Converted",
    "Closed - Not Converted",
    "Returned - Not Ready",
)
# (stage, IsClosed, IsWon, DefaultProbability)
OPPORTUNITY_STAGES: tuple[tuple[str, bool, bool, float], ...] = (
    ("Prospecting", False, False, 10.0),
    ("Qualification", False, False, 10.0),
    ("Needs Analysis", False, False, 20.0),
    ("Value Proposition", False, False, 50.0),
    ("Id. Decision Makers", False, False, 60.0),
    ("Perception Analysis", False, False, 70.0),
    ("Proposal/Price Quote", False, False, 75.0),
    ("Negotiation/Review", False, False, 90.0),
    ("On Hold", False, False, 10.0),
    ("Closed Won", True, True, 100.0),
    ("Closed Lost", True, False, 0.0),
)
LIFECYCLE_STAGES = ("Subscriber", "Lead", "MQL", "SAL", "SQL", "Opportunity", "Customer")
LEAD_TYPES = ("New Business", "Existing Customer", "Maintenance")
LEAD_SOURCES = ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other")
TASK_TYPES = ("Call", "Email", "Meeting", "Other")
TASK_STATUSES = ("Not Started", "In Progress", "Completed")
TASK_SUBTYPES = ("Call", "Email", "Task")

_STRINGY = {"id", "string", "email", "picklist", "reference", "textarea"}
_NUMERIC = {"double", "currency", "percent"}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    # id string email picklist reference textarea double currency percent boolean date datetime
    type: str
    required: bool = False  # on create, and may not be set to null
    updateable: bool = True
    createable: bool = True
    picklist: tuple[str, ...] = ()
    default: Any = None
    restricted: bool = True
    reference_to: tuple[str, ...] = ()
    external_id: bool = False  # an External ID, unique (case-insensitive): upserts match on it


def _ro(name: str, type_: str, **kw: Any) -> FieldSpec:
    return FieldSpec(name, type_, updateable=False, createable=False, **kw)


_AUDIT = (
    _ro("IsDeleted", "boolean", default=False),
    _ro("CreatedDate", "datetime"),
    _ro("LastModifiedDate", "datetime"),
    _ro("SystemModstamp", "datetime"),
)
_PERSON_CUSTOM = (
    # syncd's own External ID (mappings: [Lead] external_id): creates are upserts on it
    FieldSpec("Syncd_Key__c", "string", external_id=True),
    FieldSpec("Lifecycle_Stage__c", "picklist", picklist=LIFECYCLE_STAGES),
    FieldSpec("Lead_Score__c", "double"),
    FieldSpec("Return_Reason__c", "string"),
    FieldSpec("Lead_Type__c", "picklist", picklist=LEAD_TYPES),
)

SCHEMA: dict[str, tuple[str, tuple[FieldSpec, ...]]] = {
    "Lead": (
        "00Q",
        (
            _ro("Id", "id"),
            FieldSpec("FirstName", "string"),
            FieldSpec("LastName", "string", required=True),
            FieldSpec("Company", "string", required=True),
            FieldSpec("Email", "email"),
            FieldSpec(
                "Status",
                "picklist",
                required=True,
                picklist=LEAD_STATUSES,
                default=LEAD_STATUSES[0],
            ),
            FieldSpec("LeadSource", "picklist", picklist=LEAD_SOURCES, restricted=False),
            FieldSpec("Description", "textarea"),
            _ro("IsConverted", "boolean", default=False),
            _ro("ConvertedContactId", "reference", reference_to=("Contact",)),
            _ro("ConvertedAccountId", "reference", reference_to=("Account",)),
            _ro("ConvertedOpportunityId", "reference", reference_to=("Opportunity",)),
            _ro("ConvertedDate", "date"),
            _ro("MasterRecordId", "reference", reference_to=("Lead",)),
            *_PERSON_CUSTOM,
            *_AUDIT,
        ),
    ),
    "Contact": (
        "003",
        (
            _ro("Id", "id"),
            FieldSpec("AccountId", "reference", reference_to=("Account",)),
            FieldSpec("FirstName", "string"),
            FieldSpec("LastName", "string", required=True),
            FieldSpec("Email", "email"),
            FieldSpec("LeadSource", "picklist", picklist=LEAD_SOURCES, restricted=False),
            _ro("MasterRecordId", "reference", reference_to=("Contact",)),
            *_PERSON_CUSTOM,
            *_AUDIT,
        ),
    ),
    "Account": ("001", (_ro("Id", "id"), FieldSpec("Name", "string", required=True), *_AUDIT)),
    "Opportunity": (
        "006",
        (
            _ro("Id", "id"),
            FieldSpec("Name", "string", required=True),
            FieldSpec("AccountId", "reference", reference_to=("Account",)),
            FieldSpec("ContactId", "reference", reference_to=("Contact",)),
            FieldSpec(
                "StageName",
                "picklist",
                required=True,
                picklist=tuple(s[0] for s in OPPORTUNITY_STAGES),
            ),
            _ro("IsClosed", "boolean", default=False),
            _ro("IsWon", "boolean", default=False),
            FieldSpec("Amount", "currency"),
            FieldSpec("CloseDate", "date", required=True),
            FieldSpec("Probability", "percent"),
            FieldSpec("LeadSource", "picklist", picklist=LEAD_SOURCES, restricted=False),
            *_AUDIT,
        ),
    ),
    "Task": (
        "00T",
        (
            _ro("Id", "id"),
            FieldSpec("WhoId", "reference", reference_to=("Lead", "Contact")),
            FieldSpec("Subject", "string"),
            FieldSpec("Type", "picklist", picklist=TASK_TYPES),
            FieldSpec(
                "Status",
                "picklist",
                required=True,
                picklist=TASK_STATUSES,
                default=TASK_STATUSES[0],
            ),
            FieldSpec("TaskSubtype", "picklist", picklist=TASK_SUBTYPES, updateable=False),
            FieldSpec("ActivityDate", "date"),
            *_AUDIT,
        ),
    ),
    # read-only catalogue objects (SOQL only)
    "OpportunityStage": (
        "01J",
        (
            _ro("Id", "id"),
            _ro("MasterLabel", "string"),
            _ro("ApiName", "string"),
            _ro("IsActive", "boolean"),
            _ro("IsClosed", "boolean"),
            _ro("IsWon", "boolean"),
            _ro("DefaultProbability", "percent"),
            _ro("SortOrder", "double"),
        ),
    ),
    "LeadStatus": (
        "01J",
        (
            _ro("Id", "id"),
            _ro("MasterLabel", "string"),
            _ro("ApiName", "string"),
            _ro("IsConverted", "boolean"),
            _ro("IsDefault", "boolean"),
            _ro("SortOrder", "double"),
        ),
    ),
}
_READ_ONLY_OBJECTS = {"OpportunityStage", "LeadStatus"}
_SPECS: dict[str, dict[str, FieldSpec]] = {
    o: {f.name.lower(): f for f in fs} for o, (_, fs) in SCHEMA.items()
}
_OBJECTS_CI = {o.lower(): o for o in SCHEMA}


class SfError(Exception):
    """A Salesforce error answer: status, errorCode, message, fields."""

    def __init__(self, status: int, code: str, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = list(fields)

    def body(self) -> list[dict[str, Any]]:
        d: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields:
            d["fields"] = self.fields
        return [d]

    def save_error(self) -> dict[str, Any]:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}


def format_datetime(dt: datetime) -> str:
    """Salesforce's wire format: ``2024-01-02T03:04:05.000+0000`` (UTC)."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


def parse_datetime(text: str) -> datetime:
    """Parse any ISO datetime Salesforce sends or accepts; tz-aware UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def _id18(id15: str) -> str:
    suffix = ""
    for chunk in range(3):
        bits = 0
        for j, ch in enumerate(id15[chunk * 5 : chunk * 5 + 5]):
            if ch.isupper():
                bits |= 1 << j
        suffix += _SUFFIX[bits]
    return id15 + suffix


def _b62(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = _B62[r] + out
    return out.rjust(width, "0")


def _err(e: SfError, headers: dict[str, str]) -> Response:
    return Response(e.status, e.body(), headers)


class SalesforceApp:
    """The simulator. Thread-safe; every public method takes one lock."""

    name = "salesforce"

    def __init__(
        self,
        *,
        session_ids: Iterable[str] = ("sandbox-session",),
        daily_budget: int = 15_000,
        clock: Callable[[], datetime] | None = None,
        max_cursors: int = 32,
        window_s: float | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.window_s = window_s or 86_400.0
        self._calls: deque[float] = deque()  # when each counted request came (the rolling window)
        self.sessions: set[str] = set(session_ids)
        self.daily_budget = daily_budget
        self.api_used = 0
        self._clock = clock or (lambda: datetime.now(UTC))
        self._rows: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in SCHEMA}
        self._index: dict[str, list[tuple[str, str]]] = {o: [] for o in SCHEMA}
        self._counter = itertools.count(1)
        self._cursors: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()
        self._max_cursors = max_cursors
        self.write_log: list[dict[str, Any]] = []
        # the recycle bin: deleted (and merged-away) rows, IsDeleted true, seen only by queryAll
        # and getDeleted; every other read or write of their id answers ENTITY_IS_DELETED
        self._bin: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in SCHEMA}
        # API requests naming each record id (path, collection record, SOQL literal, getDeleted
        # answer excluded): tests assert that nothing asks for a dead id after syncd saw it die
        self.id_requests: Counter[str] = Counter()
        self.oauth: SalesforceOAuth | None = None  # token endpoints + expiring tokens (sandbox/oauth.py)
        self.denied_fields: set[tuple[str, str]] = set()  # (sObject, field) this user may not edit
        self._seed_catalogue()

    # ------------------------------------------------------------------ direct access API
    def insert(self, sobject: str, fields: dict[str, Any], *, at: datetime | None = None) -> str:
        """Create a record as a user would (same validation; not counted as traffic)."""
        with self._lock:
            return self._create(sobject, fields, at)

    def modify(
        self, sobject: str, record_id: str, fields: dict[str, Any], *, at: datetime | None = None
    ) -> None:
        """Change a record as a user would ("a sales rep changed this")."""
        with self._lock:
            self._update(sobject, record_id, fields, at)

    def delete(
        self, sobject: str, record_id: str, *, at: datetime | None = None,
        master_id: str | None = None,
    ) -> None:
        """Delete a record as a user would: it goes to the recycle bin (``IsDeleted`` true,
        SystemModstamp the deletion time; ``MasterRecordId`` when a merge deleted it). Only
        queryAll and getDeleted see it from then on; any other request naming it answers
        ENTITY_IS_DELETED."""
        with self._lock:
            rid = self._canon_id(sobject, record_id)  # NOT_FOUND for an unknown id
            row = self._rows[sobject].pop(rid)
            self._index[sobject] = [k for k in self._index[sobject] if k[1] != rid]
            stamp = format_datetime(at or self._clock())
            row.update(IsDeleted=True, SystemModstamp=stamp, LastModifiedDate=stamp)
            if master_id is not None:
                row["MasterRecordId"] = master_id
            self._bin[sobject][rid] = row

    def undelete(self, sobject: str, record_id: str, *, at: datetime | None = None) -> None:
        """Restore a deleted record from the recycle bin (it is modified: pulls see it again)."""
        with self._lock:
            row = self._bin[sobject].pop(record_id)
            row["IsDeleted"] = False
            if "MasterRecordId" in row:
                row["MasterRecordId"] = None
            self._rows[sobject][record_id] = row
            self._apply(sobject, row, {}, at or self._clock(), new=True)

    def merge(
        self, sobject: str, master_id: str, loser_id: str, *, at: datetime | None = None
    ) -> None:
        """Merge ``loser_id`` into ``master_id`` as the merge wizard does with its defaults: the
        master keeps its values, fills its empty fields from the loser, takes over the loser's
        Tasks and Opportunities; the loser is deleted with ``MasterRecordId`` set."""
        with self._lock:
            when = at or self._clock()
            master, loser = self._row(sobject, master_id), self._row(sobject, loser_id)
            fill = {s.name: loser[s.name] for s in SCHEMA[sobject][1]
                    if s.updateable and master.get(s.name) in (None, "") and loser.get(s.name)
                    not in (None, "")}
            self._apply(sobject, master, fill, when)
            for child, ref in (("Task", "WhoId"), ("Opportunity", "ContactId")):
                for row in list(self._rows[child].values()):
                    if row.get(ref) == loser["Id"]:
                        self._apply(child, row, {ref: master["Id"]}, when)
            self.delete(sobject, loser["Id"], at=when, master_id=master["Id"])

    def deleted_ids(self, sobject: str) -> list[str]:
        with self._lock:
            return sorted(self._bin[sobject])

    def get(self, sobject: str, record_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._row(sobject, record_id))

    def all(self, sobject: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(self._rows[sobject][i]) for _, i in self._index[sobject]]

    def convert_lead(
        self, lead_id: str, *, at: datetime | None = None, create_opportunity: bool = True
    ) -> dict[str, str | None]:
        """Convert a Lead: Account + Contact (copying person fields) [+ Opportunity]."""
        with self._lock:
            lead = self._row("Lead", lead_id)
            if lead["IsConverted"]:
                raise SfError(
                    400, "CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead"
                )
            when = at or self._clock()
            account_id = self._create("Account", {"Name": lead["Company"]}, when)
            copy = (
                "FirstName",
                "LastName",
                "Email",
                "LeadSource",
                "Lifecycle_Stage__c",
                "Lead_Score__c",
                "Return_Reason__c",
                "Lead_Type__c",
            )
            contact_id = self._create(
                "Contact", {"AccountId": account_id, **{k: lead[k] for k in copy}}, when
            )
            opp_id = None
            if create_opportunity:
                opp_id = self._create(
                    "Opportunity",
                    {
                        "Name": f"{lead['Company']} - Opportunity",
                        "AccountId": account_id,
                        "ContactId": contact_id,
                        "StageName": "Prospecting",
                        "CloseDate": (when.date()).isoformat(),
                    },
                    when,
                )
            self._apply(
                "Lead",
                lead,
                {
                    "IsConverted": True,
                    "ConvertedContactId": contact_id,
                    "ConvertedAccountId": account_id,
                    "ConvertedOpportunityId": opp_id,
                    "ConvertedDate": when.date().isoformat(),
                    "Status": "Closed - Converted",
                },
                when,
            )
            return {"contact_id": contact_id, "account_id": account_id, "opportunity_id": opp_id}

    def log_task(
        self,
        who_id: str,
        type: str = "Call",
        status: str = "Completed",
        *,  # noqa: A002 - SF name
        at: datetime | None = None,
        subject: str | None = None,
    ) -> str:
        """A logged activity (connection attempt) on a Lead or Contact."""
        with self._lock:
            when = at or self._clock()
            subtype = {"Call": "Call", "Email": "Email"}.get(type, "Task")
            return self._create(
                "Task",
                {
                    "WhoId": who_id,
                    "Type": type,
                    "Status": status,
                    "Subject": subject or type,
                    "TaskSubtype": subtype,
                    "ActivityDate": when.date().isoformat(),
                },
                when,
            )

    def expire_sessions(self) -> None:
        """Every session id becomes invalid (401 INVALID_SESSION_ID from now on)."""
        with self._lock:
            self.sessions.clear()

    # ------------------------------------------------------------------ App protocol
    def deny_field(self, sobject: str, field: str) -> None:
        """Take the user's edit permission on a field away: describe says not updateable/createable."""
        with self._lock:
            self.denied_fields.add((sobject, field))

    def endpoint(self, req: Request) -> str:
        if self.oauth is not None and self.oauth.owns(req.path):
            return self.oauth.endpoint(req)
        m = _PATH.match(req.path)
        if m is None:
            return "unknown"
        parts = [p for p in (m.group("rest") or "/").split("/") if p]
        if not parts:
            return "unknown"
        head = parts[0]
        if head in ("query", "queryAll"):
            return "query_more" if len(parts) > 1 else "query"
        if head == "limits":
            return "limits"
        if head == "composite" and len(parts) == 4 and parts[1] == "sobjects" and req.method == "PATCH":
            return "collections.upsert"
        if head == "composite" and parts[1:] == ["sobjects"]:
            return {"PATCH": "collections.update", "POST": "collections.create"}.get(
                req.method, "unknown"
            )
        if head == "sobjects":
            if len(parts) >= 3 and parts[2] == "deleted" and req.method == "GET":
                return "sobject.deleted"
            if len(parts) == 1 or (len(parts) >= 3 and parts[2] == "describe"):
                return "describe"
            if len(parts) == 2:
                return "sobject.create" if req.method == "POST" else "describe"
            return {"GET": "sobject.get", "PATCH": "sobject.update", "DELETE": "sobject.delete"}.get(
                req.method, "unknown"
            )
        return "unknown"

    def fault_response(self, fault: Fault, req: Request) -> Response:  # noqa: ARG002 - protocol
        with self._lock:
            headers = self._usage_header()
        if fault.kind == "rate_limit":
            return Response(
                403,
                [
                    {
                        "message": fault.message or "TotalRequests Limit exceeded.",
                        "errorCode": "REQUEST_LIMIT_EXCEEDED",
                    }
                ],
                headers,
            )
        if fault.kind == "expired_session":
            return Response(
                401,
                [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                headers,
            )
        return Response(
            fault.status,
            [
                {
                    "message": fault.message or "Server is temporarily unavailable",
                    "errorCode": "SERVER_UNAVAILABLE",
                }
            ],
            headers,
        )

    def handle(self, req: Request, faults: FaultPlan) -> Response:
        if self.oauth is not None and self.oauth.owns(req.path):
            with self._lock:
                sessions = set(self.sessions)
            return self.oauth.handle(req, sessions)
        with self._lock:
            auth = req.headers.get("authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            if token not in self.sessions and not (self.oauth is not None and self.oauth.valid(token)):
                return Response(
                    401,
                    [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                    self._usage_header(),
                )
            self._roll()
            if self.api_used >= self.daily_budget:
                return Response(
                    403,
                    [
                        {
                            "message": "TotalRequests Limit exceeded.",
                            "errorCode": "REQUEST_LIMIT_EXCEEDED",
                        }
                    ],
                    self._usage_header(),
                )
            self.api_used += 1
            self._calls.append(time.time())
            headers = self._usage_header()
            try:
                status, body = self._dispatch(req, faults)
            except soql.SoqlError as e:
                return Response(400, [{"message": str(e), "errorCode": e.code}], headers)
            except SfError as e:
                return _err(e, headers)
            return Response(status, body, headers)

    # ------------------------------------------------------------------ HTTP routing
    def _dispatch(self, req: Request, faults: FaultPlan) -> tuple[int, Any]:
        ep = self.endpoint(req)
        m = _PATH.match(req.path)
        parts = [p for p in ((m.group("rest") if m else None) or "/").split("/") if p]
        if ep == "query":
            q = req.q("q")
            if not q:
                raise SfError(400, "MALFORMED_QUERY", "A query string has to be specified")
            batch = _batch_size(req.headers.get("sforce-query-options", ""))
            self._count_ids(re.findall(r"'([0-9A-Za-z]{15}(?:[0-9A-Za-z]{3})?)'", q))
            return 200, self._query(q, batch, include_deleted=parts[0] == "queryAll")
        if ep == "query_more":
            return 200, self._query_more(parts[1])
        if ep == "limits":
            return 200, {
                "DailyApiRequests": {
                    "Max": self.daily_budget,
                    "Remaining": max(0, self.daily_budget - self.api_used),
                }
            }
        if ep == "describe":
            if len(parts) == 1:
                return 200, {
                    "encoding": "UTF-8",
                    "maxBatchSize": MAX_COLLECTION,
                    "sobjects": [{"name": o, "keyPrefix": SCHEMA[o][0]} for o in SCHEMA],
                }
            return 200, self._describe(self._object(parts[1]))
        if ep == "sobject.deleted":
            return 200, self._get_deleted(self._object(parts[1]), req)
        if len(parts) >= 3 and parts[0] == "sobjects":
            self._count_ids([parts[2]])
        if ep == "sobject.get":
            sobject = self._object(parts[1])
            row = self._row(sobject, parts[2])
            wanted = req.q("fields")
            names = [f.strip() for f in wanted.split(",")] if wanted else None
            return 200, self._project(sobject, row, names)
        if ep == "sobject.update":
            sobject = self._object(parts[1])
            body = _json_object(req)
            self._unmodified_since(sobject, parts[2], req.headers.get("if-unmodified-since"))
            self._update(sobject, parts[2], body, None)
            self._log(
                sobject, self._rows[sobject][self._canon_id(sobject, parts[2])]["Id"], body, ep
            )
            return 204, None
        if ep == "sobject.delete":
            sobject = self._object(parts[1])
            self.delete(sobject, parts[2])
            self._log(sobject, parts[2], {}, ep)
            return 204, None
        if ep == "sobject.create":
            sobject = self._object(parts[1])
            body = _json_object(req)
            new_id = self._create(sobject, body, None)
            self._log(sobject, new_id, body, ep)
            return 201, {"id": new_id, "success": True, "errors": []}
        if ep == "collections.upsert":
            return 200, self._upsert(req, self._object(parts[2]), parts[3])
        if ep in ("collections.update", "collections.create"):
            return 200, self._collection(req, faults, ep)
        raise SfError(404, "NOT_FOUND", "The requested resource does not exist")

    def _log(self, sobject: str, record_id: str, fields: dict[str, Any], endpoint: str) -> None:
        self.write_log.append(
            {
                "time": self._clock(),
                "sobject": sobject,
                "id": record_id,
                "fields": dict(fields),
                "endpoint": endpoint,
            }
        )

    def _roll(self) -> None:
        """Requests older than the rolling window no longer count."""
        cutoff = time.time() - self.window_s
        while self._calls and self._calls[0] <= cutoff:
            self._calls.popleft()
            self.api_used = max(0, self.api_used - 1)

    def _usage_header(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.api_used}/{self.daily_budget}"}

    # ------------------------------------------------------------------ collections
    def _collection(self, req: Request, faults: FaultPlan, ep: str) -> list[dict[str, Any]]:
        body = _json_object(req)
        records = body.get("records")
        if not isinstance(records, list):
            raise SfError(400, "JSON_PARSER_ERROR", "records is required and must be a list")
        if len(records) > MAX_COLLECTION:
            raise SfError(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than "
                f"{MAX_COLLECTION} records into this call",
            )
        all_or_none = bool(body.get("allOrNone", False))
        creating = ep == "collections.create"
        ids = {str(r.get("id")) for r in records if isinstance(r, dict) and r.get("id")}
        self._count_ids(sorted(ids))
        failing = faults.failing_ids(ep, ids) if ids else set()
        # validate everything first: (sobject, id or None, prepared changes) or an error
        planned: list[tuple[str, str | None, dict[str, Any]] | SfError] = []
        for r in records:
            try:
                planned.append(self._plan(r, creating, failing))
            except SfError as e:
                planned.append(e)
        if all_or_none and any(isinstance(p, SfError) for p in planned):
            rolled = SfError(
                400,
                "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "Record rolled back because not all records were valid and the request "
                "was using AllOrNone header",
            )
            return [
                {
                    "success": False,
                    "errors": [_or(p, rolled).save_error()],
                }
                for p in planned
            ]
        now = self._clock()
        out: list[dict[str, Any]] = []
        for r, p in zip(records, planned, strict=True):
            if isinstance(p, SfError):
                out.append({"success": False, "errors": [p.save_error()]})
                continue
            sobject, rid, changes = p
            if rid is None:
                rid = self._insert_prepared(sobject, changes, now)
            else:
                self._apply(sobject, self._rows[sobject][rid], changes, now)
            self._log(
                sobject, rid, {k: v for k, v in r.items() if k not in ("attributes", "id")}, ep
            )
            out.append({"id": rid, "success": True, "errors": []})
        return out

    def _unmodified_since(self, sobject: str, record_id: str, header: str | None) -> None:
        """A conditional update (sObject Rows only): 412 when the record was modified after the
        ``If-Unmodified-Since`` date (HTTP-date: whole seconds)."""
        if not header:
            return
        try:
            since = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            raise SfError(400, "MALFORMED_QUERY", f"If-Unmodified-Since: not an HTTP date: {header}") from None
        if parse_datetime(str(self._row(sobject, record_id)["LastModifiedDate"])) > since:
            raise SfError(412, "PRECONDITION_FAILED",
                          f"The requested resource has been modified since {header}")

    def _unique(self, sobject: str, field: str, value: str, existing: dict[str, Any] | None,
                index: dict[str, str] | None = None) -> None:
        """A unique External ID: no second record may hold ``value`` (case-insensitive).
        ``index``: the field's values (lowercased) to their record ids, when the caller holds one."""
        if index is not None:
            rid = index.get(value.lower())
            if rid is not None and self._rows[sobject].get(rid) is not existing:
                raise SfError(400, "DUPLICATE_VALUE",
                              f"duplicate value found: {field} duplicates value on record with id: {rid}", [field])
            return
        for rid, row in self._rows[sobject].items():
            if row is not existing and str(row.get(field) or "").lower() == value.lower():
                raise SfError(400, "DUPLICATE_VALUE",
                              f"duplicate value found: {field} duplicates value on record with id: {rid}", [field])

    def _upsert(self, req: Request, sobject: str, field: str) -> list[dict[str, Any]]:
        """sObject Collections upsert (PATCH /composite/sobjects/{type}/{externalIdField}): each
        record is matched on the External ID's value (case-insensitive), updated when found,
        created when not; ``created`` says which."""
        spec = _SPECS[sobject].get(field.lower())
        if spec is None or not spec.external_id:
            raise SfError(404, "NOT_FOUND",
                          f"Provided external ID field does not exist or is not accessible: {field}")
        body = _json_object(req)
        records = body.get("records")
        if not isinstance(records, list) or len(records) > MAX_COLLECTION:
            raise SfError(400, "JSON_PARSER_ERROR", f"records must be a list of at most {MAX_COLLECTION}")
        now = self._clock()
        out: list[dict[str, Any]] = []
        # one scan of the object per request, not two per record (a 50k-row org made upserts slow)
        index = {str(row.get(spec.name)).lower(): i for i, row in self._rows[sobject].items() if row.get(spec.name)}
        for r in records:
            fields = {k: v for k, v in (r if isinstance(r, dict) else {}).items() if k != "attributes"}
            key = str(fields.get(spec.name) or "").lower()
            if not key:
                out.append({"success": False, "created": False, "errors": [SfError(
                    400, "MISSING_ARGUMENT", f"{spec.name} not specified", [spec.name]).save_error()]})
                continue
            rid = index.get(key)
            try:
                changes = self._prepare(sobject, fields, self._rows[sobject][rid] if rid else None,
                                        {spec.name: index})
            except SfError as e:
                out.append({"success": False, "created": False, "errors": [e.save_error()]})
                continue
            if rid is None:
                rid = self._insert_prepared(sobject, changes, now)
                out.append({"id": rid, "success": True, "errors": [], "created": True})
            else:
                self._apply(sobject, self._rows[sobject][rid], changes, now)
                out.append({"id": rid, "success": True, "errors": [], "created": False})
            index[key] = rid
            self._log(sobject, rid, fields, "collections.upsert")
        return out

    def _plan(
        self, r: Any, creating: bool, failing: set[str]
    ) -> tuple[str, str | None, dict[str, Any]]:
        if not isinstance(r, dict):
            raise SfError(400, "JSON_PARSER_ERROR", "each record must be a JSON object")
        sobject_name = (r.get("attributes") or {}).get("type")
        if not sobject_name:
            raise SfError(400, "INVALID_TYPE", "Must send a concrete entity type.")
        sobject = self._object(str(sobject_name))
        fields = {k: v for k, v in r.items() if k not in ("attributes", "id", "Id")}
        if creating:
            if r.get("id"):
                raise SfError(400, "INVALID_FIELD", "cannot specify Id in an insert call", ["Id"])
            return sobject, None, self._prepare(sobject, fields, None)
        raw_id = r.get("id")
        if not raw_id:
            raise SfError(400, "MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
        rid = self._canon_id(sobject, str(raw_id))
        if str(raw_id) in failing:
            raise SfError(
                400,
                "UNABLE_TO_LOCK_ROW",
                f"unable to obtain exclusive access to this record or 1 records: {raw_id}",
            )
        return sobject, rid, self._prepare(sobject, fields, self._rows[sobject][rid])

    # ------------------------------------------------------------------ records
    def _object(self, name: str) -> str:
        sobject = _OBJECTS_CI.get(name.lower())
        if sobject is None:
            raise SfError(
                404,
                "NOT_FOUND",
                f"The requested resource does not exist: sObject type '{name}' is not supported.",
            )
        return sobject

    def _canon_id(self, sobject: str, record_id: str) -> str:
        if len(record_id) not in (15, 18) or not record_id.isalnum():
            raise SfError(400, "MALFORMED_ID", f"malformed id {record_id}", ["Id"])
        rows = self._rows[sobject]
        if record_id in rows:
            return record_id
        if len(record_id) == 15 and _id18(record_id) in rows:
            return _id18(record_id)
        if record_id in self._bin[sobject] or _id18(record_id[:15]) in self._bin[sobject]:
            raise SfError(404, "ENTITY_IS_DELETED", "entity is deleted", ["Id"])
        if record_id[:3] != SCHEMA[sobject][0]:
            raise SfError(
                400,
                "MALFORMED_ID",
                f"{sobject} ID: id value of incorrect type: {record_id}",
                ["Id"],
            )
        raise SfError(404, "NOT_FOUND", "The requested resource does not exist")

    def _row(self, sobject: str, record_id: str) -> dict[str, Any]:
        return self._rows[sobject][self._canon_id(sobject, record_id)]

    def _new_id(self, sobject: str) -> str:
        return _id18(SCHEMA[sobject][0] + "5e" + _b62(next(self._counter), 10))

    def _create(self, sobject: str, fields: dict[str, Any], at: datetime | None) -> str:
        if sobject in _READ_ONLY_OBJECTS:
            raise SfError(
                400, "INVALID_TYPE_FOR_OPERATION", f"entity type {sobject} does not support insert"
            )
        return self._insert_prepared(
            sobject, self._prepare(sobject, fields, None), at or self._clock()
        )

    def _insert_prepared(self, sobject: str, changes: dict[str, Any], when: datetime) -> str:
        row: dict[str, Any] = {}
        for spec in SCHEMA[sobject][1]:
            row[spec.name] = spec.default
        new_id = self._new_id(sobject)
        row["Id"] = new_id
        row["CreatedDate"] = format_datetime(when)
        self._rows[sobject][new_id] = row
        self._apply(sobject, row, changes, when, new=True)
        return new_id

    def _update(
        self, sobject: str, record_id: str, fields: dict[str, Any], at: datetime | None
    ) -> None:
        if sobject in _READ_ONLY_OBJECTS:
            raise SfError(
                400, "INVALID_TYPE_FOR_OPERATION", f"entity type {sobject} does not support update"
            )
        row = self._row(sobject, record_id)
        changes = self._prepare(
            sobject, {k: v for k, v in fields.items() if k not in ("Id", "attributes")}, row
        )
        self._apply(sobject, row, changes, at or self._clock())

    def _prepare(
        self, sobject: str, fields: dict[str, Any], existing: dict[str, Any] | None,
        unique_index: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Validate and coerce ``fields`` for a create (existing None) or an update;
        ``unique_index``: per External ID field, its values' record ids (see :meth:`_unique`)."""
        if existing is not None and sobject == "Lead" and existing.get("IsConverted"):
            raise SfError(400, "CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead")
        specs = _SPECS[sobject]
        out: dict[str, Any] = {}
        for key, value in fields.items():
            spec = specs.get(key.lower())
            if spec is None:
                raise SfError(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{key}' on sobject of type {sobject}",
                    [key],
                )
            allowed = spec.createable if existing is None else spec.updateable
            if not allowed:
                raise SfError(
                    400,
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {spec.name}. Please check the security "
                    "settings of this field and verify that it is read/write for your profile "
                    "or permission set.",
                    [spec.name],
                )
            out[spec.name] = _coerce(spec, value)
            if spec.external_id and out[spec.name]:
                self._unique(sobject, spec.name, str(out[spec.name]), existing,
                             (unique_index or {}).get(spec.name))
        merged = {**(existing or {s.name: s.default for s in SCHEMA[sobject][1]}), **out}
        missing = [
            s.name for s in SCHEMA[sobject][1] if s.required and merged.get(s.name) in (None, "")
        ]
        picklist_missing = [n for n in missing if specs[n.lower()].type == "picklist"]
        if picklist_missing:
            raise SfError(
                400,
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"{picklist_missing[0]}: bad value for restricted picklist field: null",
                picklist_missing[:1],
            )
        if missing:
            raise SfError(
                400,
                "REQUIRED_FIELD_MISSING",
                f"Required fields are missing: [{', '.join(missing)}]",
                missing,
            )
        return out

    def _apply(
        self,
        sobject: str,
        row: dict[str, Any],
        changes: dict[str, Any],
        when: datetime,
        *,
        new: bool = False,
    ) -> None:
        if not new:
            key = (row["SystemModstamp"], row["Id"])
            idx = self._index[sobject]
            pos = bisect.bisect_left(idx, key)
            if pos < len(idx) and idx[pos] == key:
                idx.pop(pos)
        row.update(changes)
        if sobject == "Opportunity":
            stage = next(s for s in OPPORTUNITY_STAGES if s[0] == row["StageName"])
            row["IsClosed"], row["IsWon"] = stage[1], stage[2]
            if "StageName" in changes and "Probability" not in changes:
                row["Probability"] = stage[3]
        stamp = format_datetime(when)
        row["LastModifiedDate"] = row["SystemModstamp"] = stamp
        bisect.insort(self._index[sobject], (stamp, row["Id"]))

    def _seed_catalogue(self) -> None:
        when = datetime(2020, 1, 1, tzinfo=UTC)
        for i, (label, closed, won, prob) in enumerate(OPPORTUNITY_STAGES):
            self._seed(
                "OpportunityStage",
                {
                    "MasterLabel": label,
                    "ApiName": label,
                    "IsActive": True,
                    "IsClosed": closed,
                    "IsWon": won,
                    "DefaultProbability": prob,
                    "SortOrder": float(i + 1),
                },
                when,
            )
        for i, label in enumerate(LEAD_STATUSES):
            self._seed(
                "LeadStatus",
                {
                    "MasterLabel": label,
                    "ApiName": label,
                    "IsConverted": label == "Closed - Converted",
                    "IsDefault": i == 0,
                    "SortOrder": float(i + 1),
                },
                when,
            )

    def _seed(self, sobject: str, fields: dict[str, Any], when: datetime) -> None:
        rid = self._new_id(sobject)
        stamp = format_datetime(when)
        self._rows[sobject][rid] = {"Id": rid, **fields}
        self._index[sobject].append((stamp, rid))
        self._rows[sobject][rid]["SystemModstamp"] = stamp
        self._index[sobject].sort()

    # ------------------------------------------------------------------ describe
    def _describe(self, sobject: str) -> dict[str, Any]:
        prefix, specs = SCHEMA[sobject]
        fields = []
        for s in specs:
            fields.append(
                {
                    "name": s.name,
                    "label": s.name.removesuffix("__c").replace("_", " "),
                    "type": s.type,
                    "custom": s.name.endswith("__c"),
                    "nillable": not s.required and s.type != "boolean",
                    "createable": s.createable and (sobject, s.name) not in self.denied_fields,
                    "updateable": s.updateable and (sobject, s.name) not in self.denied_fields,
                    "defaultedOnCreate": s.default is not None,
                    "restrictedPicklist": s.type == "picklist" and s.restricted,
                    "referenceTo": list(s.reference_to),
                    "externalId": s.external_id,
                    "unique": s.external_id,
                    "picklistValues": [
                        {
                            "active": True,
                            "defaultValue": v == s.default,
                            "label": v,
                            "value": v,
                            "validFor": None,
                        }
                        for v in s.picklist
                    ],
                }
            )
        ro = sobject in _READ_ONLY_OBJECTS
        return {
            "name": sobject,
            "label": sobject,
            "keyPrefix": prefix,
            "createable": not ro,
            "updateable": not ro,
            "queryable": True,
            "custom": False,
            "fields": fields,
        }

    # ------------------------------------------------------------------ SOQL
    def _count_ids(self, ids: Iterable[str]) -> None:
        for i in ids:
            self.id_requests[_id18(i) if len(i) == 15 else i] += 1

    def _get_deleted(self, sobject: str, req: Request) -> dict[str, Any]:
        """getDeleted: ids deleted in [start, end], at most 30 days back (whole minutes)."""
        try:
            start = parse_datetime(req.q("start") or "")
            end = parse_datetime(req.q("end") or "")
        except ValueError:
            raise SfError(400, "INVALID_REPLICATION_DATE", "start and end are required") from None
        now = self._clock()
        earliest = now - GET_DELETED_WINDOW
        if start < earliest:
            raise SfError(400, "INVALID_REPLICATION_DATE",
                          "startDate cannot be more than 30 days ago")
        start, end = start.replace(second=0, microsecond=0), min(end, now).replace(second=0, microsecond=0)
        found = [
            {"id": r["Id"], "deletedDate": r["SystemModstamp"]}
            for r in self._bin[sobject].values()
            if start <= parse_datetime(r["SystemModstamp"]) <= end
        ]
        found.sort(key=lambda d: (d["deletedDate"], d["id"]))
        return {"deletedRecords": found, "earliestDateAvailable": format_datetime(earliest),
                "latestDateCovered": format_datetime(end)}

    def _query(self, text: str, batch: int, include_deleted: bool = False) -> dict[str, Any]:
        q = soql.parse(text)
        sobject = _OBJECTS_CI.get(q.sobject.lower())
        if sobject is None:
            raise soql.SoqlError(f"sObject type '{q.sobject}' is not supported.", "INVALID_TYPE")
        specs = _SPECS[sobject]
        for name in (*q.fields, *soql.fields_of(q.where), *(f for f, _ in q.order_by)):
            if name.lower() not in specs:
                raise soql.SoqlError(
                    f"No such column '{name}' on entity '{sobject}'.", "INVALID_FIELD"
                )
        where = _compile(q.where, specs) if q.where is not None else None
        rows = self._candidates(sobject, q)
        if include_deleted:  # queryAll: the recycle bin too
            rows = sorted([*rows, *self._bin[sobject].values()],
                          key=lambda r: (r.get("SystemModstamp") or "", r["Id"]))
        matched = [r for r in rows if where is None or where(r)]
        order = [(specs[f.lower()].name, desc) for f, desc in q.order_by]
        if order and not _index_ordered(q):
            for name, desc in reversed(order):
                matched.sort(key=_sort_key_for(name), reverse=desc)
        if q.limit is not None:
            matched = matched[: q.limit]
        if q.count:
            return {"totalSize": len(matched), "done": True, "records": []}
        names = [specs[f.lower()].name for f in q.fields]
        records = [self._project(sobject, r, names) for r in matched]
        return self._page(records, batch, 0)

    def _candidates(self, sobject: str, q: soql.Query) -> list[dict[str, Any]]:
        """Rows worth evaluating, in index order; narrowed by Id IN or a SystemModstamp bound."""
        rows = self._rows[sobject]
        idx = self._index[sobject]
        conds = _top_conds(q.where)
        for c in conds:
            if c.field.lower() == "id" and c.op in ("=", "IN"):
                vals = c.value if c.op == "IN" else (c.value,)
                found: dict[str, dict[str, Any]] = {}
                for v in vals:
                    if isinstance(v, str):
                        for cand in (v, _id18(v) if len(v) == 15 else v):
                            if cand in rows:
                                found[cand] = rows[cand]
                keys = sorted((r["SystemModstamp"], i) for i, r in found.items())
                return [rows[i] for _, i in keys]
        start = 0
        for c in conds:
            if (
                c.field.lower() == "systemmodstamp"
                and c.op in (">=", ">")
                and isinstance(c.value, datetime)
            ):
                stamp = format_datetime(c.value)
                start = max(
                    start,
                    bisect.bisect_left(idx, (stamp, ""))
                    if c.op == ">="
                    else bisect.bisect_right(idx, (stamp, "\uffff")),
                )
        return [rows[i] for _, i in idx[start:]]

    def _project(
        self, sobject: str, row: dict[str, Any], names: list[str] | None
    ) -> dict[str, Any]:
        specs = _SPECS[sobject]
        out: dict[str, Any] = {
            "attributes": {"type": sobject, "url": f"{API}/sobjects/{sobject}/{row['Id']}"}
        }
        for n in names if names is not None else [s.name for s in SCHEMA[sobject][1]]:
            spec = specs.get(n.lower())
            if spec is None:
                raise SfError(
                    400, "INVALID_FIELD", f"No such column '{n}' on entity '{sobject}'.", [n]
                )
            out[spec.name] = row.get(spec.name)
        return out

    def _page(self, records: list[dict[str, Any]], batch: int, offset: int) -> dict[str, Any]:
        chunk = records[offset : offset + batch]
        end = offset + len(chunk)
        page: dict[str, Any] = {
            "totalSize": len(records),
            "done": end >= len(records),
            "records": chunk,
        }
        if end < len(records):
            locator = self._new_locator(records, batch)
            page["nextRecordsUrl"] = f"{API}/query/{locator}-{end}"
        return page

    def _new_locator(self, records: list[dict[str, Any]], batch: int) -> str:
        for loc, (recs, _) in self._cursors.items():
            if recs is records:
                return loc
        loc = _id18("01g" + "5e" + _b62(next(self._counter), 10))
        self._cursors[loc] = (records, batch)
        while len(self._cursors) > self._max_cursors:
            self._cursors.popitem(last=False)
        return loc

    def _query_more(self, token: str) -> dict[str, Any]:
        loc, _, offset = token.partition("-")
        cursor = self._cursors.get(loc)
        if cursor is None or not offset.isdigit() or int(offset) > len(cursor[0]):
            raise SfError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        records, batch = cursor
        return self._page(records, batch, int(offset))


# ---------------------------------------------------------------------- helpers
def _json_object(req: Request) -> dict[str, Any]:
    try:
        body = req.json()
    except ValueError as e:
        raise SfError(400, "JSON_PARSER_ERROR", f"malformed JSON: {e}") from e
    if not isinstance(body, dict):
        raise SfError(400, "JSON_PARSER_ERROR", "the request body must be a JSON object")
    return body


def _or(p: object, rolled: SfError) -> SfError:
    return p if isinstance(p, SfError) else rolled


def _batch_size(header: str) -> int:
    m = re.search(r"batchSize\s*=\s*(\d+)", header)
    if m is None:
        return DEFAULT_BATCH
    return max(200, min(DEFAULT_BATCH, int(m.group(1))))


def _coerce(spec: FieldSpec, value: Any) -> Any:
    if value is None:
        return None
    t = spec.type
    if t in _NUMERIC:
        if isinstance(value, bool):
            raise _parse_error(spec, value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _parse_error(spec, value) from None
    if t == "boolean":
        if not isinstance(value, bool):
            raise _parse_error(spec, value)
        return value
    if not isinstance(value, str):
        raise _parse_error(spec, value)
    if t == "picklist" and spec.restricted and value not in spec.picklist:
        raise SfError(
            400,
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            f"{spec.name}: bad value for restricted picklist field: {value}",
            [spec.name],
        )
    if t == "date":
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            raise _parse_error(spec, value) from None
    if t == "datetime":
        try:
            return format_datetime(parse_datetime(value))
        except ValueError:
            raise _parse_error(spec, value) from None
    if t == "reference" and value and (len(value) not in (15, 18) or not value.isalnum()):
        raise SfError(
            400, "MALFORMED_ID", f"{spec.name}: id value of incorrect type: {value}", [spec.name]
        )
    if value == "":
        return None  # Salesforce stores empty strings as null
    return value


def _parse_error(spec: FieldSpec, value: Any) -> SfError:
    return SfError(
        400,
        "JSON_PARSER_ERROR",
        f"Cannot deserialize instance of {spec.type} from value {value!r} for field {spec.name}",
        [spec.name],
    )


def _top_conds(expr: soql.Expr | None) -> list[soql.Cond]:
    if isinstance(expr, soql.Cond):
        return [expr]
    if isinstance(expr, soql.And):
        return [p for p in expr.parts if isinstance(p, soql.Cond)]
    return []


def _index_ordered(q: soql.Query) -> bool:
    """True when ORDER BY is the index order (SystemModstamp[, Id] ascending)."""
    keys = [(f.lower(), d) for f, d in q.order_by]
    return keys in ([("systemmodstamp", False)], [("systemmodstamp", False), ("id", False)])


def _sort_key_for(name: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    return lambda r: _sort_key(r.get(name))


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, "")  # nulls first
    if isinstance(v, str):
        return (1, v.casefold())
    return (1, v)


Pred = Callable[[dict[str, Any]], bool]


def _literal(spec: FieldSpec, v: Any) -> Any:
    """A SOQL literal in the row's representation (raises when the types do not fit)."""
    if v is None:
        return None
    t = spec.type
    if t == "datetime":
        if not isinstance(v, datetime):
            raise soql.SoqlError(
                f"value of filter criterion for field '{spec.name}' must be of type dateTime "
                "and should not be enclosed in quotes",
                "INVALID_FIELD",
            )
        return format_datetime(v)
    if t == "date":
        if not isinstance(v, date) or isinstance(v, datetime):
            raise soql.SoqlError(
                f"value of filter criterion for field '{spec.name}' must be of type date "
                "and should not be enclosed in quotes",
                "INVALID_FIELD",
            )
        return v.isoformat()
    if t == "boolean":
        if not isinstance(v, bool):
            raise soql.SoqlError(
                f"value of filter criterion for field '{spec.name}' must be of type boolean "
                "and should not be enclosed in quotes",
                "INVALID_FIELD",
            )
        return v
    if t in _NUMERIC:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise soql.SoqlError(
                f"value of filter criterion for field '{spec.name}' must be of type double "
                "and should not be enclosed in quotes",
                "INVALID_FIELD",
            )
        return float(v)
    if not isinstance(v, str):
        raise soql.SoqlError(
            f"value of filter criterion for field '{spec.name}' must be of type string "
            "and should be enclosed in quotes",
            "INVALID_FIELD",
        )
    return v.casefold()


def _compile(expr: soql.Expr, specs: dict[str, FieldSpec]) -> Pred:
    if isinstance(expr, soql.And):
        preds = [_compile(p, specs) for p in expr.parts]
        return lambda r: all(p(r) for p in preds)
    if isinstance(expr, soql.Or):
        preds = [_compile(p, specs) for p in expr.parts]
        return lambda r: any(p(r) for p in preds)
    if isinstance(expr, soql.Not):
        inner = _compile(expr.part, specs)
        return lambda r: not inner(r)
    spec = specs[expr.field.lower()]
    name, op, stringy = spec.name, expr.op, spec.type in _STRINGY

    def get(r: dict[str, Any]) -> Any:
        v = r.get(name)
        return v.casefold() if stringy and isinstance(v, str) else v

    if op in ("IN", "NOT IN"):
        vals = {_literal(spec, v) for v in expr.value}
        if op == "IN":
            return lambda r: get(r) in vals
        return lambda r: get(r) not in vals
    if op == "LIKE":
        if not stringy:
            raise soql.SoqlError(f"LIKE is not supported on field '{name}' of type {spec.type}")
        rx = soql.like_to_regex(expr.value)
        return lambda r: isinstance(r.get(name), str) and rx.fullmatch(r[name]) is not None
    lit = _literal(spec, expr.value)
    if op == "=":
        return lambda r: get(r) == lit
    if op == "!=":
        return lambda r: get(r) != lit
    if lit is None:
        raise soql.SoqlError(f"operator {op} cannot compare with null")
    cmp: dict[str, Callable[[Any, Any], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    fn = cmp[op]

    def pred(r: dict[str, Any]) -> bool:
        v = get(r)
        return v is not None and fn(v, lit)

    return pred
