"""Where the connectors' access tokens come from, and how they renew themselves.

A :class:`TokenSource` knows one way to get an access token (one OAuth grant, or a fixed
token); a :class:`TokenProvider` holds the current token for a connector and renews it:

- before it expires, when the grant said how long it lives (HubSpot's 30 minutes);
- after the CRM refused it (401 / ``INVALID_SESSION_ID``): :meth:`TokenProvider.renew` is
  single-flight, so concurrent calls that saw the same dead token wait for one login and all
  use its result.

Sources (crm-api.md §8): Salesforce ``jwt`` (JWT bearer, signed with PyJWT + cryptography),
``client_credentials``, ``refresh_token`` (a rotated refresh token is written atomically, mode
0600, to the file the config names *before* the new access token is used) and ``session``
(a fixed session id: it cannot re-login); HubSpot ``private_app`` (a fixed token) and ``oauth``
(refresh token). A refused grant is an :class:`~syncd.errors.AuthError` whose message is one
line: ``salesforce: JWT grant refused: invalid_grant (user hasn't approved this consumer)``.
A grant that could not be sent (network, 5xx) is a :class:`~syncd.errors.RetriableError`, in
the connectors' words for a call with no answer (:class:`~syncd.connectors._errors.Peer`:
``salesforce JWT grant: login.example.com:443: connection refused (nothing listens there)``;
a TLS certificate the CA bundle did not sign is fatal, as there).

Every grant a :class:`TokenProvider` asks for is counted by outcome (:attr:`TokenProvider.grants`:
``ok``, ``refused``, ``error``); ``syncd run`` exports them as ``syncd_auth_grants_total``.

Secrets (tokens, keys, assertions, client secrets) never reach a log line or an error message.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
import requests
import structlog

from syncd.connectors._errors import Peer
from syncd.errors import AuthError, ConfigError, RetriableError

if TYPE_CHECKING:
    from syncd.config import HubSpotConfig, SalesforceConfig

log = structlog.get_logger()

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_LIFETIME_S = 180  # Salesforce accepts an assertion whose exp is at most 3 minutes ahead
# HubSpot's date-versioned token endpoint: every parameter in the body (v1, /oauth/v1/token, is
# retired on 2027-02-16)
HUBSPOT_TOKEN_PATH = "/oauth/2026-03/token"
GRANT_OUTCOMES = ("ok", "refused", "error")
RENEW_MARGIN_S = 300.0  # renew a token that expires within this (or a tenth of its life, if shorter)

DESCRIBE = {
    "jwt": "JWT grant",
    "client_credentials": "client-credentials grant",
    "refresh_token": "refresh-token grant",
    "oauth": "OAuth refresh",
}


@dataclass(frozen=True, slots=True)
class Token:
    """One access token. ``expires_at`` (epoch seconds) is None when the grant does not say
    (Salesforce: the org's session timeout decides; a 401 tells)."""

    value: str = field(repr=False)
    issued_at: float = 0.0
    expires_at: float | None = None
    instance_url: str | None = None
    identity_url: str | None = None
    scopes: tuple[str, ...] = ()
    account_id: str | None = None  # HubSpot hub id, when the grant names it


class TokenSource(Protocol):
    system: str
    method: str
    renewable: bool  # False: a fixed token; a refusal is final until the operator replaces it

    def fetch(self) -> Token:
        """A new access token (AuthError: refused, RetriableError: could not ask)."""
        ...


class StaticToken:
    """A token given as it is: a Salesforce session id, a HubSpot private-app token."""

    renewable = False

    def __init__(self, system: str, method: str, value: str) -> None:
        self.system, self.method = system, method
        self._value = value

    def fetch(self) -> Token:
        return Token(self._value, issued_at=time.time())


class RefreshTokenFile:
    """Where a refresh token lives: read at start, rewritten atomically (0600) when rotated."""

    def __init__(self, value: str, path: Path | None) -> None:
        self.value = value
        self.path = path

    def replace(self, new: str) -> None:
        """Persist ``new`` first (temp file, fsync, rename, fsync the folder), then use it."""
        if self.path is not None:
            write_secret(self.path, new)
        self.value = new


def write_secret(path: Path, value: str) -> None:
    """Atomically replace ``path`` with ``value``, mode 0600 (never world- or group-readable)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # a folder cannot be fsynced on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _Grant:
    """A form-encoded POST to an OAuth token endpoint, its answer and its refusals."""

    renewable = True

    def __init__(self, system: str, method: str, token_url: str, *, session: requests.Session,
                 timeout: float, secrets: Callable[[], list[str]]) -> None:
        self.system, self.method = system, method
        self.token_url = token_url
        self._session = session
        self._timeout = timeout
        self._secrets = secrets  # values that must never appear in an error message

    def _post(self, form: dict[str, str]) -> dict[str, Any]:
        what = DESCRIBE.get(self.method, self.method)
        try:
            r = self._session.post(self.token_url, data=form, timeout=self._timeout,
                                   headers={"Accept": "application/json"})
        except requests.RequestException as e:  # no answer: the connectors' words (host and cause)
            verify = self._session.verify
            peer = Peer(self.system, self.token_url, verify if isinstance(verify, str) else None, self._timeout)
            raise peer.transport_error(what, e) from None
        try:
            body = r.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        for camel, snake in (("accessToken", "access_token"), ("refreshToken", "refresh_token")):
            body.setdefault(snake, body.get(camel))  # some HubSpot answers are camelCase
        if r.status_code == 429 or r.status_code >= 500:
            raise RetriableError(f"{self.system}: {what}: HTTP {r.status_code} from {self.token_url}",
                                 status=r.status_code, system=self.system)
        if r.status_code != 200 or not body.get("access_token"):
            raise AuthError(f"{self.system}: {what} refused: {self._reason(r.status_code, body)}",
                            system=self.system)
        return body

    def _reason(self, status: int, body: dict[str, Any]) -> str:
        code = body.get("error") or body.get("status") or body.get("category") or f"HTTP {status}"
        text = body.get("error_description") or body.get("message") or ""
        line = f"{code} ({text})" if text else str(code)
        for s in self._secrets():
            if s:
                line = line.replace(s, "***")
        return " ".join(line.split())[:300]

    def _token(self, body: dict[str, Any]) -> Token:
        now = time.time()
        expires_in = body.get("expires_in", body.get("expiresIn"))
        scopes = body.get("scopes") or str(body.get("scope") or "").split()
        hub = body.get("hub_id", body.get("hubId"))
        return Token(
            str(body["access_token"]), issued_at=now,
            expires_at=now + float(expires_in) if isinstance(expires_in, int | float) else None,
            instance_url=body.get("instance_url"), identity_url=body.get("id"),
            scopes=tuple(str(s) for s in scopes), account_id=str(hub) if hub is not None else None)


class SalesforceJWT(_Grant):
    """OAuth 2.0 JWT bearer: an RS256 assertion signed with the connected app's private key."""

    def __init__(self, login_url: str, *, consumer_key: str, username: str, private_key: str,
                 audience: str, session: requests.Session, timeout: float) -> None:
        super().__init__("salesforce", "jwt", login_url.rstrip("/") + "/services/oauth2/token",
                         session=session, timeout=timeout, secrets=lambda: [private_key])
        self._claims = {"iss": consumer_key, "sub": username, "aud": audience}
        self._key = private_key

    def fetch(self) -> Token:
        claims = {**self._claims, "exp": int(time.time()) + JWT_LIFETIME_S}
        assertion = jwt.encode(claims, self._key, algorithm="RS256")
        return self._token(self._post({"grant_type": JWT_GRANT, "assertion": assertion}))


class SalesforceClientCredentials(_Grant):
    """OAuth 2.0 client credentials against the org's My Domain URL (the app's run-as user)."""

    def __init__(self, url: str, *, client_id: str, client_secret: str, session: requests.Session,
                 timeout: float) -> None:
        super().__init__("salesforce", "client_credentials", url.rstrip("/") + "/services/oauth2/token",
                         session=session, timeout=timeout, secrets=lambda: [client_secret])
        self._form = {"grant_type": "client_credentials", "client_id": client_id,
                      "client_secret": client_secret}

    def fetch(self) -> Token:
        return self._token(self._post(dict(self._form)))


class RefreshGrant(_Grant):
    """OAuth 2.0 refresh token (Salesforce or HubSpot). A rotated refresh token in the answer is
    persisted before the new access token is handed out: the old one no longer works."""

    def __init__(self, system: str, method: str, token_url: str, *, client_id: str,
                 client_secret: str | None, refresh: RefreshTokenFile, session: requests.Session,
                 timeout: float) -> None:
        super().__init__(system, method, token_url, session=session, timeout=timeout,
                         secrets=lambda: [refresh.value, client_secret or ""])
        self.client_id, self._client_secret = client_id, client_secret
        self.refresh = refresh

    def fetch(self) -> Token:
        form = {"grant_type": "refresh_token", "client_id": self.client_id,
                "refresh_token": self.refresh.value}
        if self._client_secret:
            form["client_secret"] = self._client_secret
        body = self._post(form)
        new = body.get("refresh_token")
        if isinstance(new, str) and new and new != self.refresh.value:
            self.refresh.replace(new)
            if self.refresh.path is not None:
                log.info("auth.rotated", system=self.system, persisted_to=str(self.refresh.path))
            else:
                log.warning("auth.rotated", system=self.system, persisted_to=None,
                            note="set refresh_token_file: the rotated refresh token is lost on restart")
        return self._token(body)


class TokenProvider:
    """The current token of one connector, renewed before expiry and, single-flight, on refusal."""

    def __init__(self, source: TokenSource, *, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Token | None = None
        self.logins = 0  # successful grants (a test and `auth check` read it)
        # grants asked of a renewable source, by outcome: ok, refused (AuthError), error
        # (no usable answer: network, TLS, 5xx); /metrics adds them up (ServiceMetrics.observe_grants)
        self.grants: dict[str, int] = dict.fromkeys(GRANT_OUTCOMES, 0)

    @property
    def system(self) -> str:
        return self.source.system

    @property
    def method(self) -> str:
        return self.source.method

    @property
    def renewable(self) -> bool:
        return self.source.renewable

    def token(self) -> Token:
        """The token to use now: the current one, or a new one if there is none or it is expiring."""
        tok = self._token
        if tok is not None and not self._expiring(tok):
            return tok
        with self._lock:
            tok = self._token
            if tok is None:
                return self._login("start")
            if self._expiring(tok):
                try:
                    return self._login("expiring")
                except (AuthError, RetriableError) as e:
                    if tok.expires_at is None or self._clock() >= tok.expires_at:
                        raise
                    # still alive for a moment: use it; the next call (or a 401) tries again
                    log.warning("auth.renew_failed", system=self.system, method=self.method,
                                error=str(e), expires_in_s=round(tok.expires_at - self._clock(), 1))
            return tok

    def renew(self, refused: Token) -> Token:
        """After the CRM refused ``refused``: one login, whoever else saw the same refusal.

        A caller that arrives after another already renewed gets that newer token at once."""
        with self._lock:
            current = self._token
            if current is not None and current is not refused:
                return current
            return self._login("refused")

    def _expiring(self, tok: Token) -> bool:
        if tok.expires_at is None or not self.renewable:
            return False
        margin = min(RENEW_MARGIN_S, (tok.expires_at - tok.issued_at) / 10)
        return self._clock() >= tok.expires_at - margin

    def _login(self, reason: str) -> Token:
        try:
            tok = self.source.fetch()
        except AuthError:
            self._count("refused")
            raise
        except Exception:
            self._count("error")
            raise
        self._count("ok")
        self._token = tok
        self.logins += 1
        expires = round(tok.expires_at - self._clock(), 1) if tok.expires_at is not None else None
        level = log.info if reason != "start" else log.debug
        level("auth.login", system=self.system, method=self.method, reason=reason, expires_in_s=expires)
        return tok

    def _count(self, outcome: str) -> None:
        if self.renewable:  # a fixed token is not a grant: its refusal is the CRM's 401
            self.grants[outcome] += 1


# ---------------------------------------------------------------------- from the config
def _grant_session(ca_bundle: Path | None) -> requests.Session:
    s = requests.Session()
    s.verify = str(ca_bundle) if ca_bundle else True
    s.trust_env = False  # REQUESTS_CA_BUNDLE / proxies from the environment would override verify
    return s


def _resolve(base: Path, p: Path | None) -> Path | None:
    return None if p is None else (p if p.is_absolute() else base / p)


def _check_private_key(pem: str, where: str) -> None:
    """A ConfigError (exit 2) unless ``pem`` is an RSA private key in PEM form; never shows it."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"salesforce: {where}: not an unencrypted PEM private key", system="salesforce") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"salesforce: {where}: the JWT bearer flow needs an RSA key (RS256)",
                          system="salesforce")


def salesforce_provider(sf: SalesforceConfig, base: Path) -> TokenProvider:
    """The token provider ``[salesforce] auth`` names (secrets read now: ConfigError if missing)."""
    if sf.auth == "session":
        return TokenProvider(StaticToken("salesforce", "session", sf.session_id(base).get_secret_value()))
    session = _grant_session(_resolve(base, sf.ca_bundle))
    consumer_key = str(sf.consumer_key)
    if sf.auth == "jwt":
        key = sf.private_key(base).get_secret_value()
        _check_private_key(key, str(_resolve(base, sf.private_key_file) or sf.private_key_env))
        source: TokenSource = SalesforceJWT(sf.token_host(), consumer_key=consumer_key, username=str(sf.username),
                                            private_key=key, audience=sf.audience(), session=session,
                                            timeout=sf.timeout_s)
    elif sf.auth == "client_credentials":
        source = SalesforceClientCredentials(sf.token_host(), client_id=consumer_key,
                                             client_secret=sf.client_secret("salesforce", base).get_secret_value(),
                                             session=session, timeout=sf.timeout_s)
    else:
        secret = sf.client_secret("salesforce", base).get_secret_value() if sf.has_secret() else None
        refresh = RefreshTokenFile(sf.refresh_token("salesforce", base).get_secret_value(),
                                   _resolve(base, sf.refresh_token_file))
        source = RefreshGrant("salesforce", "refresh_token", sf.token_host().rstrip("/") + "/services/oauth2/token",
                              client_id=consumer_key, client_secret=secret, refresh=refresh, session=session,
                              timeout=sf.timeout_s)
    return TokenProvider(source)


def hubspot_provider(hs: HubSpotConfig, base: Path) -> TokenProvider:
    """The token provider ``[hubspot] auth`` names."""
    if hs.auth == "private_app":
        return TokenProvider(StaticToken("hubspot", "private_app", hs.token(base).get_secret_value()))
    refresh = RefreshTokenFile(hs.refresh_token("hubspot", base).get_secret_value(),
                               _resolve(base, hs.refresh_token_file))
    return TokenProvider(RefreshGrant(
        "hubspot", "oauth", hs.base_url.rstrip("/") + HUBSPOT_TOKEN_PATH, client_id=str(hs.client_id),
        client_secret=hs.client_secret("hubspot", base).get_secret_value(), refresh=refresh,
        session=_grant_session(_resolve(base, hs.ca_bundle)), timeout=hs.timeout_s))
