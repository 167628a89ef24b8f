"""The CRM sandbox: HubSpot and Salesforce simulators on 127.0.0.1, over HTTPS with a throwaway CA.

Part of the product: ``syncd demo``, ``syncd sandbox serve``, the tests and the
benchmarks all run the real client libraries against it.

    with Sandbox() as sb:
        sb.hubspot.add("contacts", {"email": "a@example.com"})
        cfg_path = sb.write_config(tmp / "syncd.toml", state_url="sqlite:///state.db")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from syncd.sandbox._server import SimServer, make_tls, untrusted_tls
from syncd.sandbox.hubspot import HubSpotApp
from syncd.sandbox.oauth import (
    HS_CLIENT_ID,
    HS_CLIENT_SECRET,
    HS_REFRESH_TOKEN,
    SF_CLIENT_SECRET,
    SF_CONSUMER_KEY,
    SF_REFRESH_TOKEN,
    SF_USERNAME,
    HubSpotOAuth,
    SalesforceOAuth,
)
from syncd.sandbox.salesforce import SalesforceApp

HUBSPOT_TOKEN = "sandbox-token"
SALESFORCE_SESSION = "sandbox-session"
TOKEN_ENV = "SYNCD_HUBSPOT_TOKEN"
SESSION_ENV = "SYNCD_SALESFORCE_SESSION"
SF_SECRET_ENV = "SYNCD_SALESFORCE_CLIENT_SECRET"
HS_SECRET_ENV = "SYNCD_HUBSPOT_CLIENT_SECRET"
SALESFORCE_AUTH = ("session", "jwt", "client_credentials", "refresh_token")
HUBSPOT_AUTH = ("private_app", "oauth")


class Sandbox:
    """Both simulators, started together, sharing one throwaway CA."""

    def __init__(self, directory: Path | None = None, *, hubspot_port: int = 0, salesforce_port: int = 0,
                 salesforce_daily_budget: int = 1_000_000, hubspot_daily_limit: int = 10_000_000,
                 hubspot_options: dict[str, Any] | None = None,
                 salesforce_options: dict[str, Any] | None = None) -> None:
        """``hubspot_options`` / ``salesforce_options``: more arguments of the simulators (limits
        enforced, compressed windows: ``enforce_burst``, ``burst_limit``, ``day_s``,
        ``search_per_s``; ``window_s``)."""
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="syncd-sandbox-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        ctx, ca = make_tls(str(self.directory))
        self._tls = ctx
        self.ca_path = Path(ca)
        hs_opts = dict(hubspot_options or {})
        if not hs_opts.get("enforce_burst"):  # nothing enforced: the headers say so (a fast sandbox)
            hs_opts.setdefault("burst_limit", 10_000)
        self.hubspot = HubSpotApp(token=HUBSPOT_TOKEN, daily_limit=hubspot_daily_limit, **hs_opts)
        self.salesforce = SalesforceApp(session_ids=(SALESFORCE_SESSION,), daily_budget=salesforce_daily_budget,
                                        **(salesforce_options or {}))
        self.salesforce.oauth = SalesforceOAuth()  # token endpoints (sandbox/oauth.py)
        self.hubspot.oauth = HubSpotOAuth()
        self._jwt_key: Path | None = None
        self.hubspot_server = SimServer(self.hubspot, port=hubspot_port, ssl_context=ctx)
        self.salesforce_server = SimServer(self.salesforce, port=salesforce_port, ssl_context=ctx)
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Sandbox:
        self.hubspot_server.start()
        self.salesforce_server.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self.hubspot_server.stop()
            self.salesforce_server.stop()
            self._started = False
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- outages (the network, not the API: faults in the API are ``server.inject``) -------------
    def outage(self, system: str, kind: str) -> None:
        """Take ``system``'s simulator off the network: ``refused`` (nothing listens on its
        port) or ``tls`` (it answers with a certificate from a CA syncd does not trust).
        Its data stays; :meth:`restore` brings it back on the same port."""
        if kind not in ("refused", "tls"):
            raise ValueError(f"outage kind must be refused or tls, not {kind!r}")
        server = self._server(system)
        port = server.port
        server.stop()
        if kind == "tls":
            self._set_server(system, SimServer(server.app, port=port, ssl_context=untrusted_tls()).start())

    def restore(self, system: str) -> None:
        """Serve ``system`` again on its port with the sandbox's own certificate."""
        server = self._server(system)
        port = server.port
        with contextlib.suppress(OSError):
            server.stop()
        self._set_server(system, SimServer(server.app, port=port, ssl_context=self._tls).start())

    def _server(self, system: str) -> SimServer:
        return self.hubspot_server if system == "hubspot" else self.salesforce_server

    def _set_server(self, system: str, server: SimServer) -> None:
        if system == "hubspot":
            self.hubspot_server = server
        else:
            self.salesforce_server = server

    # -- pointing syncd at it -------------------------------------------------------------------
    @property
    def hubspot_url(self) -> str:
        return self.hubspot_server.url

    @property
    def salesforce_url(self) -> str:
        return self.salesforce_server.url

    def env(self) -> dict[str, str]:
        """The environment variables the generated config names for credentials."""
        return {TOKEN_ENV: HUBSPOT_TOKEN, SESSION_ENV: SALESFORCE_SESSION,
                SF_SECRET_ENV: SF_CLIENT_SECRET, HS_SECRET_ENV: HS_CLIENT_SECRET}

    # -- OAuth (sandbox/oauth.py) ---------------------------------------------------------------
    @property
    def sf_oauth(self) -> SalesforceOAuth:
        assert self.salesforce.oauth is not None
        return self.salesforce.oauth

    @property
    def hs_oauth(self) -> HubSpotOAuth:
        assert self.hubspot.oauth is not None
        return self.hubspot.oauth

    def set_token_lifetime(self, seconds: float) -> None:
        """Access tokens issued from now on live ``seconds`` (both systems)."""
        self.sf_oauth.lifetime_s = seconds
        self.hs_oauth.lifetime_s = seconds

    def jwt_key(self) -> Path:
        """A throwaway RSA key (0600) for the JWT bearer flow; the sandbox trusts its certificate."""
        if self._jwt_key is None:
            key_pem, cert_pem = _throwaway_key_and_certificate()
            key = self.directory / "salesforce-jwt.key"
            _write_private(key, key_pem)
            (self.directory / "salesforce-jwt.crt").write_bytes(cert_pem)
            self.sf_oauth.trust(cert_pem)
            self._jwt_key = key
        return self._jwt_key

    def refresh_token_file(self, system: str) -> Path:
        """The refresh-token file of ``system`` (written once, 0600; syncd rewrites it on rotation)."""
        path = self.directory / f"{system}-refresh-token"
        if not path.exists():
            _write_private(path, ((SF_REFRESH_TOKEN if system == "salesforce" else HS_REFRESH_TOKEN) + "\n").encode())
        return path

    def salesforce_auth_lines(self, method: str) -> list[str]:
        """The ``[salesforce]`` credential keys for ``method`` (one of SALESFORCE_AUTH)."""
        if method == "session":
            return [f'session_env = "{SESSION_ENV}"']
        lines = [f'auth = "{method}"', f'login_url = "{self.salesforce_url}"', f'consumer_key = "{SF_CONSUMER_KEY}"']
        if method == "jwt":
            return [*lines, f'username = "{SF_USERNAME}"', f'private_key_file = "{self.jwt_key()}"']
        lines.append(f'client_secret_env = "{SF_SECRET_ENV}"')
        if method == "refresh_token":
            lines.append(f'refresh_token_file = "{self.refresh_token_file("salesforce")}"')
        return lines

    def hubspot_auth_lines(self, method: str) -> list[str]:
        """The ``[hubspot]`` credential keys for ``method`` (one of HUBSPOT_AUTH)."""
        if method == "private_app":
            return [f'token_env = "{TOKEN_ENV}"']
        return ['auth = "oauth"', f'client_id = "{HS_CLIENT_ID}"', f'client_secret_env = "{HS_SECRET_ENV}"',
                f'refresh_token_file = "{self.refresh_token_file("hubspot")}"']

    def export_env(self) -> None:
        os.environ.update(self.env())

    def auth_snippets(self) -> dict[str, str]:
        """Ready-to-paste ``[salesforce]`` / ``[hubspot]`` sections, one per auth method."""
        out = {}
        for method in SALESFORCE_AUTH:
            out[f"salesforce/{method}"] = "\n".join(
                ["[salesforce]", f'instance_url = "{self.salesforce_url}"', *self.salesforce_auth_lines(method),
                 f'ca_bundle = "{self.ca_path}"'])
        for method in HUBSPOT_AUTH:
            out[f"hubspot/{method}"] = "\n".join(
                ["[hubspot]", f'base_url = "{self.hubspot_url}"', *self.hubspot_auth_lines(method),
                 f'ca_bundle = "{self.ca_path}"'])
        return out

    def config_text(self, *, state_url: str, mappings_dir: Path | None = None, extra: str = "",
                    salesforce_auth: str = "session", hubspot_auth: str = "private_app",
                    paced: bool = False, keys: dict[str, dict[str, Any]] | None = None) -> str:
        """``paced``: syncd's default (lowest-tier) pace; otherwise one the simulators allow,
        which enforce no burst limit unless asked to (a fast sandbox for demos and tests).
        ``keys``: more keys of the ``hubspot`` and ``salesforce`` sections (e.g. ``daily_share``)."""
        import json

        pace = {"hubspot": [] if paced else ["burst_per_10s = 5000", "search_per_s = 500"],
                "salesforce": [] if paced else ["calls_per_s = 500"]}
        for system, more in (keys or {}).items():
            pace[system] = [line for line in pace[system] if line.split(" = ")[0] not in more]
            pace[system] += [f"{k} = {json.dumps(v)}" for k, v in more.items()]
        lines = [
            "# Generated by the syncd sandbox: points syncd at the local simulators.",
            "[hubspot]",
            f'base_url = "{self.hubspot_url}"',
            *self.hubspot_auth_lines(hubspot_auth),
            f'ca_bundle = "{self.ca_path}"',
            "timeout_s = 10",
            *pace["hubspot"],
            "",
            "[salesforce]",
            f'instance_url = "{self.salesforce_url}"',
            *self.salesforce_auth_lines(salesforce_auth),
            f'ca_bundle = "{self.ca_path}"',
            "timeout_s = 10",
            *pace["salesforce"],
            "",
            "[state]",
            f'url = "{state_url}"',
            "",
        ]
        if mappings_dir is not None:
            lines += ["[mappings]", f'dir = "{mappings_dir}"', ""]
        return "\n".join(lines) + extra

    def write_config(self, path: Path, *, state_url: str, mappings_dir: Path | None = None,
                     extra: str = "", salesforce_auth: str = "session", hubspot_auth: str = "private_app",
                     paced: bool = False, keys: dict[str, dict[str, Any]] | None = None) -> Path:
        path.write_text(self.config_text(state_url=state_url, mappings_dir=mappings_dir, extra=extra,
                                         salesforce_auth=salesforce_auth, hubspot_auth=hubspot_auth,
                                         paced=paced, keys=keys))
        return path

    def request_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, server in (("hubspot", self.hubspot_server), ("salesforce", self.salesforce_server)):
            for endpoint, n in server.counts.items():
                counts[f"{name}.{endpoint}"] = n
        return counts


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _throwaway_key_and_certificate() -> tuple[bytes, bytes]:
    """An RSA key and a self-signed certificate for it, as a connected app would hold (PEM)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncd sandbox connected app")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


_PORT_FLAGS = ("--hubspot-port", "--salesforce-port")


def _check_serve_args(*, people: int, deals: int | None, hubspot_port: int, salesforce_port: int,
                      directory: Path | None) -> None:
    """Bad arguments of ``sandbox serve`` as one ConfigError (exit 2), before anything starts."""
    from syncd.errors import ConfigError

    ports = dict(zip(_PORT_FLAGS, (hubspot_port, salesforce_port), strict=True))
    counts = {"--people": people, "--deals": 0 if deals is None else deals}
    problems = [f"{flag} must not be negative, not {n}" for flag, n in counts.items() if n < 0]
    problems += [f"{flag} must be a port, 0-65535 (0: any free port), not {port}"
                 for flag, port in ports.items() if not 0 <= port <= 65535]
    if hubspot_port and hubspot_port == salesforce_port:
        problems.append(f"--hubspot-port and --salesforce-port are both {hubspot_port}; they need two ports")
    if problems:
        raise ConfigError("sandbox serve: " + "; ".join(problems))
    for flag, port in ports.items():
        why = _cannot_listen(port) if port else None
        if why:
            raise ConfigError(f"sandbox serve {flag} {port}: cannot listen on 127.0.0.1:{port}: {why}")
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"sandbox serve --dir {directory}: cannot create it: {exc.strerror or exc}") from None


def _cannot_listen(port: int) -> str | None:
    """Why 127.0.0.1:``port`` cannot be listened on (in use, not allowed), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the simulators' servers do
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
    return None


def serve_forever(*, seed: int, people: int, deals: int | None, hubspot_port: int, salesforce_port: int,
                  directory: Path | None, as_json: bool = False) -> int:
    """``syncd sandbox serve``: seeded simulators until Ctrl-C / SIGTERM.

    Bad arguments, a port already in use and an unusable ``--dir`` are ConfigError (exit 2):
    the fix is the operator's (another port, another folder), and nothing was started.
    """
    import click

    from syncd.errors import ConfigError
    from syncd.sandbox.seed import SeedSpec
    from syncd.sandbox.seed import seed as seed_apps

    _check_serve_args(people=people, deals=deals, hubspot_port=hubspot_port, salesforce_port=salesforce_port,
                      directory=directory)
    try:
        sb = Sandbox(directory, hubspot_port=hubspot_port, salesforce_port=salesforce_port).start()
    except OSError as exc:  # lost a race for a port since the check, or the folder is not writable
        raise ConfigError(f"sandbox serve: cannot start the simulators: {exc.strerror or exc}") from None
    try:
        summary: Any = seed_apps(sb.hubspot, sb.salesforce,
                                 SeedSpec(seed=seed, people=people, deals=deals if deals is not None else people // 5))
        cfg = sb.write_config(sb.directory / "syncd.toml", state_url=f"sqlite:///{sb.directory / 'syncd.db'}")
        snippets = sb.auth_snippets()  # before anything is printed: it makes the JWT key
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a SIGTERM after the first line stops cleanly
        if as_json:
            _serving_json(sb, cfg, summary, snippets)
        else:
            _serving_text(sb, cfg, summary, snippets)
        click.echo("Ctrl-C to stop.", err=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        sb.stop()
    return 0


def _serving_json(sb: Sandbox, cfg: Path, summary: Any, snippets: dict[str, str]) -> None:
    """``sandbox serve --json``: one document (docs/json.md), printed once the simulators serve."""
    import click

    from syncd._json import dumps

    click.echo(dumps({"hubspot": {"url": sb.hubspot_url, "token": HUBSPOT_TOKEN, "token_env": TOKEN_ENV},
                      "salesforce": {"url": sb.salesforce_url, "session": SALESFORCE_SESSION,
                                     "session_env": SESSION_ENV},
                      "ca_bundle": str(sb.ca_path), "config": str(cfg), "seeded": dict(summary.counts),
                      "auth_snippets": snippets}))


def _serving_text(sb: Sandbox, cfg: Path, summary: Any, snippets: dict[str, str]) -> None:
    import click

    click.echo(f"HubSpot sandbox    {sb.hubspot_url}   (Bearer token: {HUBSPOT_TOKEN})")
    click.echo(f"Salesforce sandbox {sb.salesforce_url}   (session id: {SALESFORCE_SESSION})")
    click.echo(f"CA bundle          {sb.ca_path}")
    click.echo(f"Seeded             {summary}")
    click.echo("")
    click.echo("Point syncd at it:")
    click.echo(f"  export {TOKEN_ENV}={HUBSPOT_TOKEN} {SESSION_ENV}={SALESFORCE_SESSION}")
    click.echo(f"  syncd --config {cfg} sync --once")
    click.echo("Or a client by hand:")
    click.echo(f"  HubSpot(access_token='{HUBSPOT_TOKEN}', host='{sb.hubspot_url}', ssl_ca_cert='{sb.ca_path}')")
    click.echo("  requests.Session() with verify=CA and trust_env=False, then")
    click.echo(f"  Salesforce(instance_url='{sb.salesforce_url}', session_id='{SALESFORCE_SESSION}', session=s)")
    click.echo("")
    click.echo("Config snippets, one per auth method (paste one [salesforce] and one [hubspot]; the")
    click.echo(f"secrets come from the environment: export {SF_SECRET_ENV}={SF_CLIENT_SECRET} "
               f"{HS_SECRET_ENV}={HS_CLIENT_SECRET}):")
    for name, snippet in snippets.items():
        click.echo(f"# --- {name}")
        click.echo(snippet)
