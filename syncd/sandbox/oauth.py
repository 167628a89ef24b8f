"""The sandbox's OAuth side: token endpoints, short-lived access tokens, who-am-I endpoints.

Mounted on the simulators (``SalesforceApp.oauth``, ``HubSpotApp.oauth``); the shapes follow
crm-api.md §8.

Salesforce (:class:`SalesforceOAuth`), ``POST /services/oauth2/token`` (form-encoded):

- ``urn:ietf:params:oauth:grant-type:jwt-bearer``: the RS256 assertion is verified (PyJWT)
  against the certificate given to :meth:`SalesforceOAuth.trust`; ``iss`` must be the consumer
  key, ``sub`` the pre-authorised user, ``aud`` one of :data:`SF_AUDIENCES` or the sandbox's URL;
- ``client_credentials`` (client id + secret) and ``refresh_token`` (optionally rotating: every
  answer carries a new refresh token and the old one stops working);
- errors as Salesforce sends them: ``400 {"error": "invalid_grant", "error_description": …}``.

Access tokens live ``lifetime_s`` seconds (monotonic clock); after that the API answers the real
401 ``INVALID_SESSION_ID``. ``GET /services/oauth2/userinfo`` and ``GET /id/{org}/{user}`` say
who the token belongs to.

HubSpot (:class:`HubSpotOAuth`): ``POST /oauth/2026-03/token`` and the legacy ``/oauth/v1/token``
(refresh grant; 30-minute tokens by default, ``expires_in`` in the answer),
``POST /oauth/v2/private-apps/get/access-token-info`` (a private-app token's scopes) and
``GET /account-info/v3/details``. An expired token gets 401 ``EXPIRED_AUTHENTICATION``.

``requests`` counts every grant answered (refused ones too), by grant type.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import jwt

from syncd.sandbox._server import Request, Response

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SF_AUDIENCES = ("https://login.salesforce.com", "https://test.salesforce.com")
SF_CONSUMER_KEY = "3MVG9sandbox.syncd.consumer.key"
SF_CLIENT_SECRET = "sandbox-client-secret"
SF_USERNAME = "integration@syncd-sandbox.example"
SF_REFRESH_TOKEN = "5Aep861sandbox.refresh.token"
HS_CLIENT_ID = "sandbox-hubspot-client-id"
HS_CLIENT_SECRET = "sandbox-hubspot-client-secret"
HS_REFRESH_TOKEN = "na1-sandbox-hubspot-refresh-token"
HS_SCOPES = ("oauth", "crm.objects.contacts.read", "crm.objects.contacts.write",
             "crm.objects.deals.read", "crm.objects.deals.write")


def _form(req: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items() if v}


def _bearer(req: Request) -> str:
    auth = req.headers.get("authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


def _base(req: Request) -> str:
    return f"https://{req.headers.get('host', '127.0.0.1')}"


class _Tokens:
    """Issued access tokens and when they die (monotonic seconds)."""

    def __init__(self, lifetime_s: float, clock: Callable[[], float]) -> None:
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self.history: list[tuple[float, float]] = []  # (issued at, expires at) of every token, in order

    def issue(self, prefix: str) -> str:
        tok = f"{prefix}{secrets.token_urlsafe(24)}"
        now = self._clock()
        self._expiry[tok] = now + self.lifetime_s
        self.history.append((now, now + self.lifetime_s))
        return tok

    def values(self) -> list[str]:
        return list(self._expiry)

    def expire_all(self) -> None:
        """Every token issued so far is dead from now on (answers the expired-token error)."""
        now = self._clock()
        self._expiry = {t: min(at, now) for t, at in self._expiry.items()}

    def state(self, tok: str) -> str:
        """``valid``, ``expired`` (issued here, dead now) or ``unknown``."""
        at = self._expiry.get(tok)
        if at is None:
            return "unknown"
        return "valid" if self._clock() < at else "expired"

    def expired_for(self, tok: str) -> float:
        return max(0.0, self._clock() - self._expiry.get(tok, self._clock()))


class _OAuthServer:
    """What both token endpoints share: issued tokens, refresh tokens, the secrets seen."""

    tokens: _Tokens
    refresh_tokens: set[str]
    seen: list[str]
    _lock: threading.Lock

    @property
    def lifetime_s(self) -> float:
        return self.tokens.lifetime_s

    @lifetime_s.setter
    def lifetime_s(self, seconds: float) -> None:
        self.tokens.lifetime_s = seconds

    def revoke_refresh_tokens(self) -> None:
        with self._lock:
            self.refresh_tokens.clear()

    def expire_tokens(self) -> None:
        """Every access token issued so far expires now."""
        with self._lock:
            self.tokens.expire_all()

    def secrets(self) -> list[str]:
        """Every secret this endpoint issued or was sent: access and refresh tokens, client
        secret, JWT assertions (a test checks that none of them reaches a log)."""
        with self._lock:
            return [*self.seen, *self.tokens.values()]

    def issue_history(self) -> list[tuple[float, float]]:
        """(issued at, expires at), monotonic seconds, of every access token issued, in order."""
        with self._lock:
            return list(self.tokens.history)


class SalesforceOAuth(_OAuthServer):
    """The Salesforce token endpoint and identity of one connected app and one user."""

    def __init__(self, *, consumer_key: str = SF_CONSUMER_KEY, client_secret: str = SF_CLIENT_SECRET,
                 username: str = SF_USERNAME, refresh_tokens: Iterable[str] = (SF_REFRESH_TOKEN,),
                 rotate_refresh_tokens: bool = False, lifetime_s: float = 7200.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer_key = consumer_key
        self.client_secret = client_secret
        self.username = username
        self.approved = True  # the user is pre-authorised for the app
        self.client_credentials_enabled = True
        self.refresh_tokens: set[str] = set(refresh_tokens)
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.org_id = "00D5g000004SYNCD"
        self.user_id = "0055g00000SYNCDAAA"
        self.requests: Counter[str] = Counter()  # grant type -> token requests answered
        self.seen: list[str] = [client_secret, *self.refresh_tokens]  # secrets issued or received
        self._public_key: Any = None
        self._lock = threading.Lock()
        self.tokens = _Tokens(lifetime_s, clock)

    # -- control (tests, the sandbox) -------------------------------------------------------------
    def trust(self, certificate_pem: bytes) -> None:
        """Verify JWT assertions against this X.509 certificate (the connected app's)."""
        from cryptography import x509

        self._public_key = x509.load_pem_x509_certificate(certificate_pem).public_key()

    def valid(self, token: str) -> bool:
        with self._lock:
            return self.tokens.state(token) == "valid"

    # -- HTTP -------------------------------------------------------------------------------------
    @staticmethod
    def owns(path: str) -> bool:
        return path.startswith("/services/oauth2/") or path.startswith("/id/")

    @staticmethod
    def endpoint(req: Request) -> str:
        if req.path.startswith("/id/"):
            return "oauth.identity"
        return "oauth." + req.path.rstrip("/").rsplit("/", 1)[-1]

    def handle(self, req: Request, sessions: Iterable[str] = ()) -> Response:
        """``sessions``: the app's fixed session ids, which the identity endpoints accept too."""
        ep = self.endpoint(req)
        if ep == "oauth.token" and req.method == "POST":
            return self._token(req)
        if ep in ("oauth.userinfo", "oauth.identity") and req.method == "GET":
            with self._lock:
                state = "valid" if _bearer(req) in set(sessions) else self.tokens.state(_bearer(req))
            if state != "valid":
                return Response(401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
            return Response(200, self._identity(_base(req)))
        return Response(404, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}])

    def _token(self, req: Request) -> Response:
        form = _form(req)
        grant = form.get("grant_type", "")
        with self._lock:
            self.requests[grant] += 1
            handler = {JWT_GRANT: self._jwt, "client_credentials": self._client_credentials,
                       "refresh_token": self._refresh}.get(grant)
            if handler is None:
                return _refused("unsupported_grant_type", "grant type not supported")
            refusal = handler(form, _base(req))
            if refusal is not None:
                return refusal
            return Response(200, self._grant_body(_base(req), form if grant == "refresh_token" else None))

    def _jwt(self, form: dict[str, str], base: str) -> Response | None:
        self.seen.append(form.get("assertion", ""))
        if self._public_key is None:
            return _refused("invalid_grant", "invalid assertion")
        try:
            claims = jwt.decode(form.get("assertion", ""), self._public_key, algorithms=["RS256"],
                                audience=[*SF_AUDIENCES, base], options={"require": ["exp", "iss", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            return _refused("invalid_grant", "expired authorization code")
        except jwt.InvalidAudienceError:
            return _refused("invalid_grant", "audience is invalid")
        except jwt.PyJWTError:
            return _refused("invalid_grant", "invalid assertion")
        if claims["iss"] != self.consumer_key:
            return _refused("invalid_client_id", "client identifier invalid")
        if claims["sub"] != self.username or not self.approved:
            return _refused("invalid_grant", "user hasn't approved this consumer")
        return None

    def _client(self, form: dict[str, str], *, secret_required: bool) -> Response | None:
        if form.get("client_id") != self.consumer_key:
            return _refused("invalid_client_id", "client identifier invalid")
        if (secret_required or "client_secret" in form) and form.get("client_secret") != self.client_secret:
            return _refused("invalid_client", "invalid client credentials")
        return None

    def _client_credentials(self, form: dict[str, str], _base: str) -> Response | None:
        refusal = self._client(form, secret_required=True)
        if refusal is None and not self.client_credentials_enabled:
            return _refused("invalid_grant", "no client credentials user enabled")
        return refusal

    def _refresh(self, form: dict[str, str], _base: str) -> Response | None:
        refusal = self._client(form, secret_required=False)
        if refusal is None and form.get("refresh_token") not in self.refresh_tokens:
            return _refused("invalid_grant", "expired access/refresh token")
        return refusal

    def _grant_body(self, base: str, refresh_form: dict[str, str] | None) -> dict[str, Any]:
        issued = str(int(time.time() * 1000))
        identity = f"{base}/id/{self.org_id}/{self.user_id}"
        signature = base64.b64encode(
            hmac.new(self.client_secret.encode(), (identity + issued).encode(), hashlib.sha256).digest()).decode()
        body: dict[str, Any] = {
            "access_token": self.tokens.issue(f"{self.org_id}!"), "instance_url": base, "id": identity,
            "token_type": "Bearer", "issued_at": issued, "signature": signature, "scope": "api refresh_token",
        }
        if refresh_form is not None and self.rotate_refresh_tokens:
            self.refresh_tokens.discard(refresh_form["refresh_token"])
            new = f"5Aep861{secrets.token_urlsafe(24)}"
            self.refresh_tokens.add(new)
            self.seen.append(new)
            body["refresh_token"] = new
        return body

    def _identity(self, base: str) -> dict[str, Any]:
        return {
            "sub": f"{base}/id/{self.org_id}/{self.user_id}", "user_id": self.user_id,
            "organization_id": self.org_id, "preferred_username": self.username, "nickname": "syncd",
            "name": "syncd integration", "email": self.username, "active": True, "user_type": "STANDARD",
            "urls": {"rest": f"{base}/services/data/v{{version}}/"},
        }


def _refused(error: str, description: str) -> Response:
    return Response(400, {"error": error, "error_description": description})


class HubSpotOAuth(_OAuthServer):
    """HubSpot's OAuth token endpoint for one public app, plus the private-app token's metadata."""

    def __init__(self, *, client_id: str = HS_CLIENT_ID, client_secret: str = HS_CLIENT_SECRET,
                 refresh_tokens: Iterable[str] = (HS_REFRESH_TOKEN,), lifetime_s: float = 1800.0,
                 scopes: Iterable[str] = HS_SCOPES, clock: Callable[[], float] = time.monotonic) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_tokens: set[str] = set(refresh_tokens)
        self.scopes: list[str] = list(scopes)  # granted to OAuth tokens and to the private-app token
        self.hub_id = 62515
        self.app_id = 456789
        self.requests: Counter[str] = Counter()
        self.seen: list[str] = [client_secret, *self.refresh_tokens]
        self._lock = threading.Lock()
        self.tokens = _Tokens(lifetime_s, clock)


    def remove_scope(self, scope: str) -> None:
        with self._lock:
            self.scopes = [s for s in self.scopes if s != scope]


    def refusal(self, token: str) -> Response | None:
        """None when ``token`` is one this endpoint issued and it is alive; the 401 otherwise
        (``EXPIRED_AUTHENTICATION`` for an expired one, None-equivalent handled by the app)."""
        with self._lock:
            state = self.tokens.state(token)
            ago = self.tokens.expired_for(token)
        if state == "valid":
            return None
        if state == "expired":
            return Response(401, _hs_error(f"The OAuth token used to make this call expired {int(ago)} second(s) ago.",
                                           "EXPIRED_AUTHENTICATION"))
        return Response(401, _hs_error("Authentication credentials not found.", "INVALID_AUTHENTICATION"))

    @staticmethod
    def owns(path: str) -> bool:
        return path.startswith("/oauth/") or path.startswith("/account-info/")

    @staticmethod
    def endpoint(req: Request) -> str:
        if req.path.startswith("/account-info/"):
            return "account_info"
        if req.path.rstrip("/") in ("/oauth/v1/token", "/oauth/2026-03/token"):
            return "oauth.token"
        return "oauth.token_info"

    def handle(self, req: Request, private_token: str) -> Response:
        ep = self.endpoint(req)
        if ep == "oauth.token" and req.method == "POST":
            return self._token(_form(req), rfc6749=not req.path.startswith("/oauth/v1/"))
        if ep == "oauth.token_info" and req.method == "POST":
            body = req.json() if req.body else {}
            if not isinstance(body, dict) or body.get("tokenKey") != private_token:
                return Response(404, _hs_error("token not found", "OBJECT_NOT_FOUND"))
            return Response(200, {"userId": 1234567, "hubId": self.hub_id, "appId": self.app_id,
                                  "scopes": list(self.scopes)})
        if ep == "account_info" and req.method == "GET":
            tok = _bearer(req)
            refused = None if tok == private_token else self.refusal(tok)
            if refused is not None:
                return refused
            return Response(200, {"portalId": self.hub_id, "timeZone": "US/Eastern", "accountType": "STANDARD",
                                  "companyCurrency": "USD", "uiDomain": "app.hubspot.com",
                                  "dataHostingLocation": "na1"})
        return Response(404, _hs_error("resource not found", "OBJECT_NOT_FOUND"))

    def _token(self, form: dict[str, str], *, rfc6749: bool) -> Response:
        """The refresh grant. The 2026-03 endpoint's errors add RFC 6749's ``error`` and
        ``error_description`` to the v1 ``status`` and ``message``."""
        with self._lock:
            self.requests[form.get("grant_type", "")] += 1
            refusal = next((r for bad, r in (
                (form.get("grant_type") != "refresh_token",
                 ("unsupported_grant_type", "BAD_GRANT_TYPE", "grant_type must be refresh_token here")),
                (form.get("client_id") != self.client_id,
                 ("invalid_client", "BAD_CLIENT_ID", "missing or invalid client_id")),
                (form.get("client_secret") != self.client_secret,
                 ("invalid_client", "BAD_CLIENT_SECRET", "missing or invalid client_secret")),
                (form.get("refresh_token") not in self.refresh_tokens,
                 ("invalid_grant", "BAD_REFRESH_TOKEN", "refresh token is invalid, expired or revoked")),
            ) if bad), None)
            if refusal is not None:
                error, status, message = refusal
                body = _hs_error(message, status, status=True)
                if rfc6749:
                    body = {"error": error, "error_description": message, **body}
                return Response(400, body)
            return Response(200, {
                "token_type": "bearer", "refresh_token": form["refresh_token"], "hub_id": self.hub_id,
                "scopes": list(self.scopes), "access_token": self.tokens.issue("CKsandbox"),
                "expires_in": int(self.tokens.lifetime_s) if self.tokens.lifetime_s >= 1 else 1,
            })


def _hs_error(message: str, category: str, *, status: bool = False) -> dict[str, Any]:
    """HubSpot's error body: API errors carry ``category``; the OAuth endpoint puts it in ``status``."""
    body: dict[str, Any] = {"status": category if status else "error", "message": message,
                            "correlationId": str(uuid.uuid4())}
    if not status:
        body["category"] = category
    return body
