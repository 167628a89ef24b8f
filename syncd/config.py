"""The deployment config: TOML, validated up front into frozen objects.

Unknown keys, wrong types and missing values are errors that name the file, the
key and what is wrong (exit 2). Secrets never live in the config: it names the
environment variable or the secret file that holds them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from syncd.errors import ConfigError

DEFAULT_CONFIG = "syncd.toml"
CONFIG_ENV = "SYNCD_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Credential(_Section):
    """Where a secret comes from: an environment variable, or a file (e.g. a systemd credential)."""

    def _secret(self, system: str, env: str | None, file: Path | None, base: Path) -> SecretStr:
        if file is not None:
            path = file if file.is_absolute() else base / file
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{system}: cannot read secret file {path}: {exc.strerror}") from None
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


class HubSpotConfig(_Credential):
    base_url: str = "https://api.hubapi.com"
    token_env: str | None = "SYNCD_HUBSPOT_TOKEN"
    token_file: Path | None = None
    ca_bundle: Path | None = None
    timeout_s: PositiveSeconds = 30.0
    daily_budget: Annotated[int, Field(gt=0)] = 250_000

    def token(self, base: Path) -> SecretStr:
        return self._secret("hubspot", self.token_env, self.token_file, base)


class SalesforceConfig(_Credential):
    instance_url: str = "https://login.salesforce.com"
    session_env: str | None = "SYNCD_SALESFORCE_SESSION"
    session_file: Path | None = None
    ca_bundle: Path | None = None
    timeout_s: PositiveSeconds = 30.0
    daily_budget: Annotated[int, Field(gt=0)] = 15_000

    def session_id(self, base: Path) -> SecretStr:
        return self._secret("salesforce", self.session_env, self.session_file, base)


class StateConfig(_Section):
    url: str = "sqlite:///syncd.db"

    @field_validator("url")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("must be sqlite:///PATH or postgresql://…")
        return v


class MappingsConfig(_Section):
    dir: Path | None = None  # default: the mappings/ shipped with syncd


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


class ServiceConfig(_Section):
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    shutdown_grace_s: PositiveSeconds = 10.0


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    show_emails: bool = False  # only for debugging: emails are masked otherwise


class Config(_Section):
    hubspot: HubSpotConfig = HubSpotConfig()
    salesforce: SalesforceConfig = SalesforceConfig()
    state: StateConfig = StateConfig()
    mappings: MappingsConfig = MappingsConfig()
    sync: SyncConfig = SyncConfig()
    service: ServiceConfig = ServiceConfig()
    logging: LoggingConfig = LoggingConfig()
    # Directory relative paths are resolved against (the config file's folder).
    base_dir: Path = Field(default=Path("."), exclude=True)

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p

    def state_url(self) -> str:
        url = self.state.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
            return prefix + str(self.resolve(Path(url[len(prefix):])))
        return url


def config_path(explicit: str | None) -> Path:
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path) -> Config:
    """Read and validate ``path``; every problem is reported at once, one per line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config or {CONFIG_ENV}; "
                          "see config.example.toml)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if "base_dir" in data:
        raise ConfigError(f"{path}: base_dir: unknown key")
    return parse_config(data, source=str(path), base_dir=path.resolve().parent, text=text)


def parse_config(data: dict[str, object], *, source: str, base_dir: Path, text: str = "") -> Config:
    try:
        return Config.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            line = _line_of(text, err["loc"])
            where = f"{source}:{line}" if line else source
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def _line_of(text: str, loc: tuple[object, ...]) -> int | None:
    """Best-effort line of ``[section]`` / ``key =`` for a validation error."""
    if not text or not loc:
        return None
    section, key = str(loc[0]), str(loc[-1]) if len(loc) > 1 else None
    in_section = False
    section_line = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("["):
            in_section = line.strip("[] ") == section
            if in_section:
                section_line = n
            continue
        if key and in_section and line.split("=", 1)[0].strip() == key:
            return n
    return section_line
