"""``syncd auth check``: who syncd is in each CRM, how long its token lasts, and what it lacks.

For each system: the auth method, the identity (Salesforce org, user and instance; HubSpot
portal and app), when the current token expires, and every missing permission the mappings in
force need: HubSpot read/write scopes of each mapped object; Salesforce access to each mapped
object and field from describe (each pulled field visible, each field syncd writes updateable),
and the External ID each object declares for idempotent creates (there, an External ID, and
createable), by the same check as ``mappings check --live``.

Exit 0 when syncd can do its whole job; 1 with one line per missing thing otherwise. The check
reads (a login, identity, describe); it never writes to a CRM or to the state store.
``syncd run`` runs it at start and logs the result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import structlog

from syncd.config import Config
from syncd.connectors._errors import Peer
from syncd.connectors.auth import Token, TokenProvider
from syncd.errors import AuthError, SyncError
from syncd.logs import one_line
from syncd.mapping import Mappings
from syncd.mapping_check import check_external_ids

log = structlog.get_logger()

SF_API = "/services/data/v59.0"


@dataclass
class SystemReport:
    system: str
    method: str
    identity: dict[str, str] = field(default_factory=dict)
    expires: str = ""  # for people: a time, or how the token ends
    expires_at: str | None = None  # ISO 8601 UTC, when the token says
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


class _Client:
    """GETs and POSTs with the provider's token; a refused token is renewed once (single-flight).
    A call with no answer says what the connectors say (:class:`~syncd.connectors._errors.Peer`):
    ``salesforce describe: 127.0.0.1:8443: connection refused (nothing listens there)``."""

    def __init__(self, system: str, auth: TokenProvider, ca_bundle: Path | None, timeout: float,
                 budget: Any = None) -> None:
        self.system, self.auth, self.timeout = system, auth, timeout
        self.ca_bundle = str(ca_bundle) if ca_bundle else None
        self.budget = budget  # the run's API budget: these calls are counted and paced like any other
        self.session = requests.Session()
        self.session.verify = str(ca_bundle) if ca_bundle else True
        self.session.trust_env = False

    def request(self, method: str, url: str, endpoint: str, **kw: Any) -> requests.Response:
        """``endpoint`` names the call in errors (never the URL: a query may carry data)."""
        tok = self.auth.token()
        r = self._send(method, url, endpoint, tok, **kw)
        if r.status_code == 401 and self.auth.renewable:
            r = self._send(method, url, endpoint, self.auth.renew(tok), **kw)
        return r

    def _send(self, method: str, url: str, endpoint: str, tok: Token, **kw: Any) -> requests.Response:
        if self.budget is not None:
            self.budget.before("auth_check")  # CapReached: not sent (the cap is syncd's own)
        try:
            return self.session.request(method, url, headers={"Authorization": f"Bearer {tok.value}"},
                                        timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise Peer(self.system, url, self.ca_bundle, self.timeout).transport_error(endpoint, e) from None

    def close(self) -> None:
        self.session.close()


_FIXED = {
    "private_app": "never (a private-app token; a person rotates it)",
    "session": "at the org's session timeout (hours); a session id cannot be renewed",
}


def _expires_at(tok: Token) -> str | None:
    return datetime.fromtimestamp(tok.expires_at, UTC).isoformat() if tok.expires_at is not None else None


def _expiry(tok: Token, auth: TokenProvider) -> str:
    if tok.expires_at is not None:
        at = datetime.fromtimestamp(tok.expires_at, UTC).isoformat(timespec="seconds")
        return f"{at} (renewed before then)" if auth.renewable else at
    if not auth.renewable:
        return _FIXED.get(auth.method, "unknown (a fixed token)")
    return "at the org's session timeout; renewed when refused"


def _salesforce(cfg: Config, mappings: Mappings, auth: TokenProvider, objects: tuple[str, ...],
                budget: Any = None) -> SystemReport:
    sf = cfg.salesforce
    rep = SystemReport("salesforce", sf.auth)
    client = _Client("salesforce", auth, cfg.resolve(sf.ca_bundle) if sf.ca_bundle else None, sf.timeout_s, budget)
    try:
        tok = auth.token()
        base = sf.instance_url.rstrip("/")
        r = client.request("GET", f"{base}/services/oauth2/userinfo", "userinfo")
        if r.status_code == 200:
            who = r.json()
            rep.identity = {"org_id": str(who.get("organization_id", "")),
                            "user": str(who.get("preferred_username", "")),
                            "instance": tok.instance_url or sf.instance_url}
        else:
            rep.missing.append(f"salesforce: userinfo answered HTTP {r.status_code}: {_sf_error(r)}")
        rep.expires, rep.expires_at = _expiry(auth.token(), auth), _expires_at(auth.token())
        described: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for obj in objects:
            missing, fields = _sf_object(client, base, obj, mappings)
            rep.missing += missing
            if fields is not None:
                described[("salesforce", obj)] = fields
        rep.missing += _external_ids(mappings, described)
    except SyncError as e:
        rep.missing.append(_reason("salesforce", e))
    finally:
        client.close()
    return rep


def _sf_error(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return one_line(r.text)[:200]
    first = body[0] if isinstance(body, list) and body else body
    if isinstance(first, dict):
        code = first.get("errorCode") or first.get("error")
        return f"{code}: {first.get('message') or first.get('error_description')}"
    return one_line(str(body))[:200]


def _sf_object(client: _Client, base: str, obj: str,
               mappings: Mappings) -> tuple[list[str], list[dict[str, Any]] | None]:
    """What this user lacks on ``obj``, and describe's fields (None: it cannot be described)."""
    r = client.request("GET", f"{base}{SF_API}/sobjects/{obj}/describe", "describe")
    if r.status_code != 200:
        return [f"salesforce: `{obj}` cannot be described by this user (HTTP {r.status_code} {_sf_error(r)})"], None
    desc = r.json()
    fields = {f["name"].lower(): f for f in desc.get("fields", [])}
    out = [] if desc.get("queryable", True) else [f"salesforce: `{obj}` is not queryable for this user"]
    writes = set(mappings.term_fields("salesforce", obj))
    for name in mappings.pull_fields("salesforce", obj):
        if name.startswith("_"):
            continue
        f = fields.get(name.lower())
        if f is None:
            out.append(f"salesforce: `{obj}.{name}` is not visible for this user "
                       "(no field-level access, or no such field)")
        elif name in writes and not f.get("updateable"):
            out.append(f"salesforce: `{obj}.{name}` is not updateable for this user")
    return out, list(desc.get("fields", []))


def _external_ids(mappings: Mappings, described: Mapping[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """The External ID fields the mappings declare for idempotent creates (``external_id``), judged
    from describe by the check ``mappings check --live`` runs (:func:`mapping_check.check_external_ids`):
    missing, not an External ID, or not createable for this user. Its warnings (no object declares
    one) are not missing things: syncd still works, with the weaker email look-up."""
    problems = check_external_ids(mappings, described)
    return [f"salesforce: {p.message.removeprefix('salesforce ')} ({p.file}:{p.line})"
            for p in problems if p.severity == "error"]


def _hubspot(cfg: Config, auth: TokenProvider, objects: tuple[str, ...], budget: Any = None) -> SystemReport:
    hs = cfg.hubspot
    rep = SystemReport("hubspot", hs.auth)
    client = _Client("hubspot", auth, cfg.resolve(hs.ca_bundle) if hs.ca_bundle else None, hs.timeout_s, budget)
    base = hs.base_url.rstrip("/")
    try:
        tok = auth.token()
        r = client.request("GET", f"{base}/account-info/v3/details", "account-info")
        if r.status_code != 200:
            raise AuthError(f"hubspot: account-info answered HTTP {r.status_code}: {_hs_error(r)}", system="hubspot")
        rep.identity = {"portal_id": str(r.json().get("portalId", ""))}
        scopes = _hs_scopes(client, base, tok, rep)
        rep.expires, rep.expires_at = _expiry(auth.token(), auth), _expires_at(auth.token())
        if not scopes and rep.method == "oauth":  # an older token endpoint that does not list them
            rep.identity["scopes"] = "not reported by the token endpoint (not checked)"
            return rep
        for obj in objects:
            for access in ("read", "write"):
                scope = f"crm.objects.{obj}.{access}"
                if scope not in scopes:
                    rep.missing.append(f"hubspot: the app lacks the scope {scope}")
    except SyncError as e:
        rep.missing.append(_reason("hubspot", e))
    finally:
        client.close()
    return rep


def _hs_scopes(client: _Client, base: str, tok: Token, rep: SystemReport) -> set[str]:
    if rep.method == "oauth":
        rep.identity["app"] = str(getattr(client.auth.source, "client_id", ""))
        return set(client.auth.token().scopes)
    r = client.request("POST", f"{base}/oauth/v2/private-apps/get/access-token-info", "access-token-info",
                       json={"tokenKey": tok.value})
    if r.status_code != 200:
        raise AuthError(f"hubspot: private-app token info answered HTTP {r.status_code}: {_hs_error(r)}",
                        system="hubspot")
    info = r.json()
    rep.identity["app"] = str(info.get("appId", ""))
    return {str(s) for s in info.get("scopes") or []}


def _hs_error(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return one_line(r.text)[:200]
    return f"{body.get('category') or body.get('status')}: {body.get('message')}" if isinstance(body, dict) else ""


def _reason(system: str, e: BaseException) -> str:
    """One line that starts with the system: ``salesforce: …``, or the connectors' ``salesforce
    describe: host:port: cause``."""
    text = one_line(str(e))
    return text if text.startswith((f"{system}:", f"{system} ")) else f"{system}: {text}"


def check(cfg: Config, mappings: Mappings, providers: Mapping[str, TokenProvider],
          budgets: Mapping[str, Any] | None = None) -> list[SystemReport]:
    """Every system's report, with the providers in use (a login made here serves the run) and,
    in a run, its API budgets (the check's calls count against the shared cap)."""
    from syncd.runtime import PULL_OBJECTS

    def mapped(system: str) -> tuple[str, ...]:
        return tuple(o for o in PULL_OBJECTS[system] if (system, o) in set(mappings.objects()))

    budgets = budgets or {}
    return [_hubspot(cfg, providers["hubspot"], mapped("hubspot"), budgets.get("hubspot")),
            _salesforce(cfg, mappings, providers["salesforce"], mapped("salesforce"), budgets.get("salesforce"))]


def render(reports: list[SystemReport]) -> str:
    lines = []
    for rep in reports:
        who = " · ".join(f"{k} {v}" for k, v in rep.identity.items() if v)
        lines.append(f"{rep.system}: auth {rep.method}" + (f" · {who}" if who else "")
                     + (f" · token expires: {rep.expires}" if rep.expires else ""))
    missing = [m for rep in reports for m in rep.missing]
    lines += missing
    lines.append("ok: syncd can do its whole job" if not missing
                 else f"{len(missing)} missing: syncd cannot do its whole job")
    return "\n".join(lines)


def as_json(reports: list[SystemReport]) -> str:
    return json.dumps({"ok": all(r.ok for r in reports),
                       "systems": {r.system: asdict(r) for r in reports}}, indent=2)


def log_reports(reports: list[SystemReport]) -> None:
    """What ``syncd run`` logs at start: one line per system, one warning per missing thing."""
    for rep in reports:
        log.info("auth_check", system=rep.system, method=rep.method, expires=rep.expires, ok=rep.ok, **rep.identity)
        for m in rep.missing:
            log.warning("auth_check_missing", system=rep.system, missing=m)
        if rep.method == "session":
            log.warning("auth_session_expires", system=rep.system,
                        note="a session id dies with the org's session timeout and cannot be renewed; "
                             'use auth = "jwt" (README: Credentials)')


def run_check(cfg: Config) -> list[SystemReport]:
    """``syncd auth check``: config, mapping files and connectors' providers; no state store."""
    from syncd.runtime import build_connectors, load_rules_files

    mappings, _ = load_rules_files(cfg)
    connectors = build_connectors(cfg, mappings)
    try:
        return check(cfg, mappings, {s: c.auth for s, c in connectors.items()})  # type: ignore[attr-defined]
    finally:
        for c in connectors.values():
            c.close()


def log_at_start(cfg: Config, mappings: Mappings, connectors: Mapping[str, Any]) -> None:
    """``syncd run`` at start: the same check, logged; it never stops the service from starting
    (a system that cannot log in is backed off by its first cycle, with the same reason)."""
    try:
        log_reports(check(cfg, mappings, {s: c.auth for s, c in connectors.items()},
                          {s: getattr(c, "budget", None) for s, c in connectors.items()}))
    except Exception as e:  # noqa: BLE001 - a diagnostic; the cycles report real failures
        log.warning("auth_check_failed", error=one_line(str(e)) or type(e).__name__)
