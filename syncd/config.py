"""The deployment config: TOML, validated up front into frozen objects.

Every problem is found at load and reported at once, on one line (``; `` between
problems), each naming the file, the line and the key: unknown keys, wrong types,
missing required keys, URLs without a scheme or host, ports out of range, a state
URL that does not parse, files named in the config that are not there or cannot be
read (the mapping folder is the mapping loader's to check: it names what is missing).
Secrets never live in the config: it names the environment variable or the secret
file that holds them.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from syncd._toml import locate
from syncd.errors import ConfigError
from syncd.logs import one_line

DEFAULT_CONFIG = "syncd.toml"
CONFIG_ENV = "SYNCD_CONFIG"
EXAMPLE = "config.example.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# -- field checks -----------------------------------------------------------------------------------
# They raise ValueError; pydantic collects every one of them, so all problems are reported at once.
# File checks need to know where relative paths start: the loader passes it as validation context
# ({"base_dir": Path, "credentials": bool}); without a context (a Config built in code) they are skipped.

_USERINFO = re.compile(r"(://[^/@\s]*?:)[^/@\s]*@")


def _shown(url: str) -> str:
    """A URL as an error may show it: any password replaced by ***."""
    return _USERINFO.sub(r"\1***@", url)


def _http_url(v: str) -> str:
    if not v.strip():
        raise ValueError("is empty (expected https://HOST)")
    if v != v.strip() or any(c.isspace() for c in v):
        raise ValueError(f"{_shown(v)!r} contains spaces")
    try:
        u = urlsplit(v)
        port = u.port
    except ValueError as exc:  # a bad port or a broken [IPv6] literal
        why = str(exc).lower()
        why = ("the port is not a number" if "cast to integer" in why else
               "the port is out of range (1-65535)" if "out of range" in why else why)
        raise ValueError(f"{_shown(v)!r} does not parse: {why}") from None
    if u.scheme not in ("https", "http"):
        what = f"scheme {u.scheme!r}" if u.scheme and "//" in v else "no scheme"
        raise ValueError(f"{_shown(v)!r} has {what} (expected https://HOST or http://HOST)")
    if not u.hostname:
        raise ValueError(f"{_shown(v)!r} has no host (expected {u.scheme}://HOST)")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{_shown(v)!r}: port {port} is out of range (1-65535)")
    if u.query or u.fragment:
        raise ValueError(f"{_shown(v)!r} must not carry a query or a fragment")
    return v


HttpUrl = Annotated[str, AfterValidator(_http_url)]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(v: str | None) -> str | None:
    if v and not _ENV_NAME.fullmatch(v):  # "" (or none): no variable, e.g. when a secret file is named
        # never echo the value: a common slip is pasting the secret itself here
        raise ValueError("is not an environment variable name (letters, digits, _): it names the "
                         "variable that holds the credential, never the credential itself")
    return v


EnvName = Annotated[str | None, AfterValidator(_env_name)]


def _resolved(p: Path, info: ValidationInfo) -> Path | None:
    ctx = info.context if isinstance(info.context, dict) else None
    if ctx is None or "base_dir" not in ctx:
        return None
    return p if p.is_absolute() else Path(ctx["base_dir"]) / p


def _open_check(path: Path) -> None:
    """Raise ValueError naming ``path`` unless it is a regular file this process can read."""
    try:
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        if not path.is_file():
            raise ValueError(f"{path}: not a regular file")
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _ca_bundle(p: Path | None, info: ValidationInfo) -> Path | None:
    path = _resolved(p, info) if p is not None else None
    if path is None:
        return p
    try:
        _open_check(path)
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ValueError(f"{path}: not a PEM CA bundle (no certificate could be read from it)") from None
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return p


def _secret_file(p: Path | None, info: ValidationInfo) -> Path | None:
    path = _resolved(p, info) if p is not None else None
    if path is None or not (info.context or {}).get("credentials", True):
        return p  # commands that call no API do not need (and may not be able to read) the secrets
    _open_check(path)
    try:
        empty = path.stat().st_size == 0
    except OSError:  # gone between the two checks: reading it later names it again
        empty = False
    if empty:
        raise ValueError(f"{path}: the secret file is empty")
    return p


CaBundle = Annotated[Path | None, AfterValidator(_ca_bundle)]
SecretFile = Annotated[Path | None, AfterValidator(_secret_file)]

_STATE_DRIVERS = ("sqlite", "postgresql", "postgresql+psycopg", "postgres")
_STATE_FORMS = "sqlite:///PATH or postgresql://USER@HOST:PORT/DB"


def _state_url(v: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if v.startswith("sqlite:") and not v.startswith("sqlite://"):
        raise ValueError(f"{v!r} does not parse: an SQLite URL has three slashes, "
                         "sqlite:///relative/path.db or sqlite:////absolute/path.db")
    try:
        u = make_url(v)
        port = u.port
    except (ArgumentError, ValueError) as exc:
        why = "the port is not a number" if isinstance(exc, ValueError) and "int()" in str(exc) else "not a URL"
        raise ValueError(f"{_shown(v)!r} does not parse: {why} (expected {_STATE_FORMS})") from None
    shown = _shown(v)
    if u.drivername not in _STATE_DRIVERS:
        raise ValueError(f"{shown!r}: unsupported database {u.drivername!r} (expected {_STATE_FORMS})")
    if u.drivername == "sqlite":
        if u.host:
            raise ValueError(f"{shown!r}: an SQLite URL has no host; three slashes, then the path "
                             "(sqlite:///relative/path.db or sqlite:////absolute/path.db)")
    elif port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{shown!r}: port {port} is out of range (1-65535)")
    return v


StateUrl = Annotated[str, AfterValidator(_state_url)]


# -- the sections ------------------------------------------------------------------------------------

class _Credential(_Section):
    """Where a secret comes from: an environment variable, or a file (e.g. a systemd credential)."""

    def _secret(self, system: str, env: str | None, file: Path | None, base: Path) -> SecretStr:
        if file is not None:
            path = file if file.is_absolute() else base / file
            try:
                value = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ConfigError(f"{system}: cannot read secret file {path}: {why}") from None
            if not value:
                raise ConfigError(f"{system}: secret file {path} is empty")
            return SecretStr(value)
        if env:
            value = os.environ.get(env, "").strip()
            if not value:
                raise ConfigError(f"{system}: environment variable {env} is not set (it must hold the credential)")
            return SecretStr(value)
        raise ConfigError(f"{system}: no credential configured")


PositiveSeconds = Annotated[float, Field(gt=0)]


class _OAuthFields(_Credential):
    """The OAuth fields both systems share (issue 15); which are needed depends on ``auth``."""

    # An app's client id (Salesforce: the consumer key) identifies the app; it is not a secret.
    client_secret_env: EnvName = None
    client_secret_file: SecretFile = None
    # The refresh token: a rotated one is written back to refresh_token_file (atomically, 0600).
    refresh_token_env: EnvName = None
    refresh_token_file: SecretFile = None

    def _needs(self, method: str, need: dict[str, bool]) -> None:
        missing = [k for k, ok in need.items() if not ok]
        if missing:
            raise ValueError(f'auth = "{method}" needs {", ".join(missing)} (see {EXAMPLE})')

    def client_secret(self, system: str, base: Path) -> SecretStr:
        return self._secret(f"{system} client secret", self.client_secret_env, self.client_secret_file, base)

    def refresh_token(self, system: str, base: Path) -> SecretStr:
        return self._secret(f"{system} refresh token", self.refresh_token_env, self.refresh_token_file, base)

    def has_secret(self) -> bool:
        return bool(self.client_secret_env or self.client_secret_file)

    def has_refresh(self) -> bool:
        return bool(self.refresh_token_env or self.refresh_token_file)


Share = Annotated[float, Field(gt=0, le=1)]
WindowSeconds = Annotated[int, Field(ge=2, le=86_400)]


class _ApiBudget(_Section):
    """The API budget and pace of one CRM (syncd/connectors/_pacing.py; README "API budget").

    ``daily_share``: the part of the org's limit syncd may use per window (the limit the CRM
    reports, else ``daily_limit``); ``daily_budget``: an absolute cap on top of it (optional);
    ``run_cap``: calls per cycle or resync (0: none); ``window_s``: the window's length (tests
    and the sandbox compress it; production keeps 86,400)."""

    daily_share: Share = 0.5
    daily_budget: Annotated[int, Field(gt=0)] | None = None
    run_cap: Annotated[int, Field(ge=0)] = 0
    window_s: WindowSeconds = 86_400


class _HubSpotBudget(_ApiBudget):
    daily_limit: Annotated[int, Field(gt=0)] = 250_000  # lowest tier, until HubSpot reports its own
    # free/starter: 100 requests per 10 s; professional/enterprise: 190 (syncd paces at 90 % of it,
    # and never faster than HubSpot's X-HubSpot-RateLimit-Max / -Interval-Milliseconds headers allow)
    tier: Literal["starter", "professional", "enterprise"] = "starter"
    burst_per_10s: Annotated[float, Field(gt=0)] | None = None  # default: 90 % of the tier's limit
    search_per_s: Annotated[float, Field(gt=0)] = 3.0  # HubSpot allows 4-5: at most 4 in any second


class _SalesforceBudget(_ApiBudget):
    daily_limit: Annotated[int, Field(gt=0)] = 15_000  # lowest edition, until Salesforce reports it
    calls_per_s: Annotated[float, Field(gt=0)] = 20.0
    concurrency: Annotated[int, Field(ge=1, le=25)] = 20  # Salesforce allows 25 long requests


class HubSpotConfig(_OAuthFields, _HubSpotBudget):
    base_url: HttpUrl  # required: no silent production default
    # "private_app": a private app's access token (token_env / token_file; it does not expire).
    # "oauth": a public app's client_id + client secret + refresh token; syncd renews the 30-minute token.
    auth: Literal["private_app", "oauth"] = "private_app"
    token_env: EnvName = "SYNCD_HUBSPOT_TOKEN"
    token_file: SecretFile = None
    client_id: str | None = None
    ca_bundle: CaBundle = None
    timeout_s: PositiveSeconds = 30.0
    # HubSpot's archive (deleted contacts and deals) cannot be filtered by date: it is listed
    # whole, so at most this often (it is never scanned on every poll).
    archive_scan_s: PositiveSeconds = 900.0

    @model_validator(mode="after")
    def _auth_fields(self) -> HubSpotConfig:
        if self.auth == "oauth":
            self._needs("oauth", {"client_id": bool(self.client_id),
                                  "client_secret_env or client_secret_file": self.has_secret(),
                                  "refresh_token_env or refresh_token_file": self.has_refresh()})
        return self

    def token(self, base: Path) -> SecretStr:
        return self._secret("hubspot", self.token_env, self.token_file, base)


class SalesforceConfig(_OAuthFields, _SalesforceBudget):
    instance_url: HttpUrl  # required: your org's My Domain URL, never a guessed login host
    # "jwt" (JWT bearer, the server-to-server standard), "client_credentials", "refresh_token",
    # or "session": a session id pasted by a person, which expires and cannot be renewed.
    auth: Literal["session", "jwt", "client_credentials", "refresh_token"] = "session"
    session_env: EnvName = "SYNCD_SALESFORCE_SESSION"
    session_file: SecretFile = None
    # Where grants are sent. Default: https://login.salesforce.com for jwt, instance_url otherwise.
    login_url: HttpUrl | None = None
    consumer_key: str | None = None  # the connected app's consumer key (client id)
    username: str | None = None  # jwt: the pre-authorised user syncd acts as
    private_key_env: EnvName = None  # jwt: the PEM private key matching the app's certificate
    private_key_file: SecretFile = None
    # jwt: the assertion's aud (default: https://test.salesforce.com when login_url is
    # test.salesforce.com, else https://login.salesforce.com).
    jwt_audience: HttpUrl | None = None
    ca_bundle: CaBundle = None
    timeout_s: PositiveSeconds = 30.0

    @model_validator(mode="after")
    def _auth_fields(self) -> SalesforceConfig:
        ck = bool(self.consumer_key)
        need: dict[str, dict[str, bool]] = {
            "jwt": {"consumer_key": ck, "username": bool(self.username),
                    "private_key_file or private_key_env": bool(self.private_key_file or self.private_key_env)},
            "client_credentials": {"consumer_key": ck,
                                   "client_secret_env or client_secret_file": self.has_secret()},
            "refresh_token": {"consumer_key": ck, "refresh_token_env or refresh_token_file": self.has_refresh()},
        }
        self._needs(self.auth, need.get(self.auth, {}))
        return self

    def session_id(self, base: Path) -> SecretStr:
        return self._secret("salesforce", self.session_env, self.session_file, base)

    def private_key(self, base: Path) -> SecretStr:
        return self._secret("salesforce private key", self.private_key_env, self.private_key_file, base)

    def token_host(self) -> str:
        """Where this method's grant is sent."""
        if self.login_url:
            return self.login_url
        return "https://login.salesforce.com" if self.auth == "jwt" else self.instance_url

    def audience(self) -> str:
        if self.jwt_audience:
            return self.jwt_audience
        test = "https://test.salesforce.com"
        return test if self.token_host().rstrip("/") == test else "https://login.salesforce.com"


class StateConfig(_Section):
    url: StateUrl = "sqlite:///syncd.db"
    # SQLite only: "full" syncs every commit to disk (nothing committed is lost on a power cut or a
    # filesystem forced read-only); "normal" is an explicit opt-in for speed (see docs/benchmarks.md)
    sqlite_synchronous: Literal["full", "normal"] = "full"


class MappingsConfig(_Section):
    dir: Path | None = None  # default: the mappings/ shipped with syncd
    # "file": the folder's sla.toml, which must exist; "defaults": the built-in SLA when it has none
    sla: Literal["file", "defaults"] = "file"


class SyncConfig(_Section):
    overlap_s: Annotated[float, Field(ge=0)] = 120.0
    contacts_interval_s: PositiveSeconds = 30.0
    deals_interval_s: PositiveSeconds = 60.0
    jitter_s: Annotated[float, Field(ge=0)] = 2.0
    retry_max_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    retry_cap_s: PositiveSeconds = 30.0
    write_batch: Annotated[int, Field(ge=1)] = 1000
    # Never act on half a picture: an entity is decided only when every object it reads pulled
    # successfully within this many intervals of its group (and finished a first full pull).
    freshness_intervals: Annotated[float, Field(ge=1, le=1000)] = 2.0
    # A write that failed transiently (5xx, timeout) is sent again after a jittered wait that
    # doubles from write_retry_base_s up to write_retry_cap_s; it is never given up.
    write_retry_base_s: PositiveSeconds = 2.0
    write_retry_cap_s: PositiveSeconds = 300.0

    def intervals(self) -> dict[str, float]:
        return {"contacts": self.contacts_interval_s, "deals": self.deals_interval_s}


def _listen_host(v: str) -> str:
    import ipaddress

    if v == "localhost":
        return v
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address to listen on (e.g. 127.0.0.1, 0.0.0.0, ::)") from None
    return v


class ServiceConfig(_Section):
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    # where /metrics and /healthz listen: loopback by default; another address lets a scraper on
    # another host reach them (no auth: the service logs a warning)
    metrics_host: Annotated[str, AfterValidator(_listen_host)] = "127.0.0.1"
    shutdown_grace_s: PositiveSeconds = 10.0
    # This daemon's stable name on this host (default: the config file's path). A restarted daemon
    # of the same name takes its dead predecessor's leases at once instead of waiting out their TTL.
    instance_id: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    # How long a lease (a cycle's, the decide lease) outlives its holder: a daemon that dies or
    # freezes is taken over after this (holders renew every third of it).
    lease_ttl_s: Annotated[float, Field(ge=1, le=3600)] = 30.0


KeepDays = Annotated[int, Field(ge=0, le=36_500)]  # 0: kept for ever


class RetentionConfig(_Section):
    """How long finished rows are kept (days; 0 keeps them for ever). ``syncd prune`` and the
    service's prune job delete older ones, ``batch_size`` rows per short transaction."""

    outbox_done_days: KeepDays = 30  # done / skipped / superseded writes (their audit rows stay)
    runs_days: KeepDays = 90  # finished runs
    quarantine_resolved_days: KeepDays = 90  # resolved quarantine entries
    tombstones_days: KeepDays = 0  # deleted/merged records: kept for ever by default
    audit_days: KeepDays = 400
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    every_s: PositiveSeconds = 3600.0  # how often the service prunes
    pause_s: Annotated[float, Field(ge=0, le=60)] = 0.05  # between two batches: the cycle goes first


class ReconcileConfig(_Section):
    """The service's cheap count check (CRM counts vs the store), at most every ``count_every_s``
    (0: never); ``syncd reconcile`` diffs id sets on demand."""

    count_every_s: Annotated[float, Field(ge=0)] = 3600.0
    sample_ids: Annotated[int, Field(ge=1, le=100)] = 5


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    show_emails: bool = False  # only for debugging: emails are masked otherwise


class Config(_Section):
    hubspot: HubSpotConfig
    salesforce: SalesforceConfig
    state: StateConfig = StateConfig()
    mappings: MappingsConfig = MappingsConfig()
    sync: SyncConfig = SyncConfig()
    service: ServiceConfig = ServiceConfig()
    logging: LoggingConfig = LoggingConfig()
    retention: RetentionConfig = RetentionConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    # Directory relative paths are resolved against (the config file's folder).
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="", exclude=True)  # the file it was read from (named by later checks)

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p

    def state_url(self) -> str:
        url = self.state.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
            return prefix + str(self.resolve(Path(url[len(prefix):])))
        return url


# -- loading -----------------------------------------------------------------------------------------

def config_path(explicit: str | None) -> Path:
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path, *, credentials: bool = True) -> Config:
    """Read and validate ``path``; every problem is reported at once, on one line.

    ``credentials=False`` (commands that call no API: status, audit, impact) skips the checks of
    the secret files, which an operator's shell may rightly be unable to read.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config or {CONFIG_ENV}; "
                          f"see {EXAMPLE})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    text = _decode(path, raw)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, exc)) from None
    except (ValueError, RecursionError) as exc:  # tomllib's own edge cases, e.g. huge nesting
        raise ConfigError(f"{path}: invalid TOML: {one_line(str(exc)) or type(exc).__name__}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent, text=text,
                        credentials=credentials)


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text; a UTF-8 BOM (as some editors write) is accepted and dropped."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset}; "
                          "save the file as UTF-8") from None


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    return f"{path}: invalid TOML: {one_line(str(exc))}"  # tomllib says "(at line N, column M)"


def parse_config(data: dict[str, Any], *, source: str, base_dir: Path, text: str = "",
                 credentials: bool = True) -> Config:
    """Validate parsed TOML; raise one ConfigError naming every problem (``; `` between them)."""
    problems: list[str] = []
    data = dict(data)
    for internal in ("base_dir", "source"):
        if internal in data:
            data.pop(internal)
            problems.append(f"{source}: {internal}: unknown key")
    try:
        cfg = Config.model_validate({**data, "base_dir": base_dir, "source": source},
                                    context={"base_dir": base_dir, "credentials": credentials})
    except ValidationError as exc:
        problems = _problems(exc, source, text) + problems
    else:
        if not problems:
            return cfg
    raise ConfigError("; ".join(problems))


def _problems(exc: ValidationError, source: str, text: str) -> list[str]:
    locator = locate(text) if text else None

    def where(loc: tuple[Any, ...]) -> str:
        if locator is not None:
            for n in range(len(loc), 0, -1):
                pos = locator.exact(tuple(loc[:n]))
                if pos is not None:
                    return f"{source}:{pos[0]}"
        return source

    missing: list[str] = []
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "missing":
            missing += _required_keys(loc)
        else:
            out.append(f"{where(loc)}: {_key(loc)}: {one_line(_message(err))}")
    if missing:
        out.insert(0, f"{source}: missing required key{'s' if len(missing) > 1 else ''}: "
                      f"{', '.join(missing)} (see {EXAMPLE})")
    return out


def _message(err: Any) -> str:
    """What an operator reads for one pydantic error (``err`` is its ErrorDetails)."""
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(loc)
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        key = _key(loc)
        return f"must be a table ([{key}] or {key} = {{ … }})"
    if kind == "path_type":
        return "must be a path (a string)"
    return str(err["msg"])


def _key(loc: tuple[Any, ...]) -> str:
    key = ".".join(str(p) for p in loc)
    key = one_line(key)
    return key if len(key) <= 80 else key[:77] + "..."


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _required_keys(loc: tuple[Any, ...]) -> list[str]:
    """A missing key, or for a missing section the keys in it that are required."""
    sub = _model_at(loc)
    if sub is None:
        return [_key(loc)]
    return [_key((*loc, name)) for name, f in sub.model_fields.items() if f.is_required()] or [_key(loc)]


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    known = [n for n in model.model_fields if n != "base_dir"]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
