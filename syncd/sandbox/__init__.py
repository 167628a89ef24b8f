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
from syncd.sandbox.salesforce import SalesforceApp

HUBSPOT_TOKEN = "sandbox-token"
SALESFORCE_SESSION = "sandbox-session"
TOKEN_ENV = "SYNCD_HUBSPOT_TOKEN"
SESSION_ENV = "SYNCD_SALESFORCE_SESSION"


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
        return {TOKEN_ENV: HUBSPOT_TOKEN, SESSION_ENV: SALESFORCE_SESSION}

    def export_env(self) -> None:
        os.environ.update(self.env())

    def config_text(self, *, state_url: str, mappings_dir: Path | None = None, extra: str = "",
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
            f'token_env = "{TOKEN_ENV}"',
            f'ca_bundle = "{self.ca_path}"',
            "timeout_s = 10",
            *pace["hubspot"],
            "",
            "[salesforce]",
            f'instance_url = "{self.salesforce_url}"',
            f'session_env = "{SESSION_ENV}"',
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
                     extra: str = "", paced: bool = False, keys: dict[str, dict[str, Any]] | None = None) -> Path:
        path.write_text(self.config_text(state_url=state_url, mappings_dir=mappings_dir, extra=extra,
                                         paced=paced, keys=keys))
        return path

    def request_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, server in (("hubspot", self.hubspot_server), ("salesforce", self.salesforce_server)):
            for endpoint, n in server.counts.items():
                counts[f"{name}.{endpoint}"] = n
        return counts


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
                  directory: Path | None) -> int:
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
        click.echo("Ctrl-C to stop.", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        sb.stop()
    return 0
