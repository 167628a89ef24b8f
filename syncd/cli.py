"""The `syncd` command. Exit codes: 0 ok, 1 a failure during work, 2 bad usage/config/mapping files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import structlog

from syncd import catalogue, logs
from syncd.config import Config, config_path, load_config
from syncd.errors import AuthError, BudgetExhausted, ConfigError, MappingError, SyncError

T = TypeVar("T")
log = structlog.get_logger()


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"syncd: error: {message}", err=True)
    sys.exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn syncd errors into one clear line and the contract's exit code."""
    try:
        return fn()
    except (ConfigError, MappingError) as exc:
        _fail(2, str(exc))
    except AuthError as exc:
        _fail(1, f"authentication failed: {exc}")
    except BudgetExhausted as exc:
        _fail(1, f"API budget exhausted: {exc}")
    except SyncError as exc:
        _fail(1, str(exc))


class Ctx:
    def __init__(self, config_arg: str | None, log_format: str | None, verbose: bool) -> None:
        self.config_arg = config_arg
        self.log_format = log_format
        self.verbose = verbose
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(config_path(self.config_arg))
            self.setup_logging(self._config)
        return self._config

    def setup_logging(self, cfg: Config | None) -> None:
        level = "debug" if self.verbose else (cfg.logging.level if cfg else "info")
        fmt = self.log_format or (cfg.logging.format if cfg else "auto")
        logs.configure(level=level, fmt=fmt, show_emails=bool(cfg and cfg.logging.show_emails))


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_arg", metavar="FILE", default=None,
              help="Config file (default ./syncd.toml, or $SYNCD_CONFIG).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default=None)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="syncd")
@click.pass_context
def main(ctx: click.Context, config_arg: str | None, log_format: str | None, verbose: bool) -> None:
    """syncd keeps HubSpot and Salesforce aligned on one sales & marketing glossary."""
    ctx.obj = Ctx(config_arg, log_format, verbose)
    ctx.obj.setup_logging(None)


# -- sync -----------------------------------------------------------------------------------------

@main.command()
@click.option("--once", is_flag=True, required=True, help="Run exactly one cycle (the service is `syncd run`).")
@click.option("--object", "group", type=click.Choice(catalogue.GROUPS), default=None)
@click.option("--dry-run", is_flag=True, help="Print the planned writes; change nothing.")
@pass_ctx
def sync(c: Ctx, once: bool, group: str | None, dry_run: bool) -> None:
    """Run one sync cycle: pull, map, link, decide, write back."""
    from syncd.resync import LEASE_WAIT_S, LeaseKeeper, interrupt_dead_runs, make_engine, new_owner, run_cycle
    from syncd.runtime import open_runtime

    def go() -> None:
        cfg = c.config()
        rt = open_runtime(cfg)
        keeper = LeaseKeeper(rt.store, new_owner())
        try:
            engine = make_engine(rt, dry_run=dry_run, owner=keeper.owner)
            if dry_run:  # changes nothing (one transaction, rolled back): no lease needed
                stats = engine.cycle(group)
            else:
                interrupt_dead_runs(rt.store, keeper.owner, fresh_s=3 * min(cfg.sync.intervals().values()))
                got = run_cycle(engine, group, keeper, wait_s=LEASE_WAIT_S)
                if got is None:
                    raise SyncError(f"the store is busy: another syncd kept a cycle running for "
                                    f"{LEASE_WAIT_S:.0f}s; try again later")
                stats = got
        finally:
            keeper.close()
            rt.close()
        if dry_run:
            from syncd.report import planned_writes_table

            planned_writes_table(stats.planned)
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in stats.summary().items()))
        if stats.partial:
            # one side could not be pulled: the other was recorded, nothing decided on half a picture
            raise SyncError(f"partial cycle: {stats.partial_reason()}")

    guarded(go)


# -- status / audit -------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Per system/object: last run, cursor, outbox, quarantine, unmapped values, SLA breaches."""
    from syncd import freshness
    from syncd.report import print_status, status_data
    from syncd.store import Store

    def go() -> None:
        cfg = c.config()
        store = Store.open(cfg.state_url())
        try:
            data = status_data(store, datetime.now(UTC),
                               bounds=freshness.bounds(cfg.sync.intervals(), cfg.sync.freshness_intervals))
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            print_status(data)

    guarded(go)


@main.command()
@click.option("--email", default=None, help="A person's email (matched normalised).")
@click.option("--id", "record_id", default=None, help="A record id (either system).")
@click.option("--rule", default=None)
@click.option("--system", type=click.Choice(["hubspot", "salesforce"]), default=None)
@click.option("--since", type=click.DateTime(), default=None)
@click.option("--until", type=click.DateTime(), default=None)
@click.option("--limit", type=int, default=200, show_default=True,
              help="Show the most recent N writes.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit(c: Ctx, email: str | None, record_id: str | None, rule: str | None, system: str | None,
          since: datetime | None, until: datetime | None, limit: int, as_json: bool) -> None:
    """Why did this change? Every write: rule, reason, before → after, mapping revision."""
    from syncd.model import normalise_email
    from syncd.report import print_audit
    from syncd.store import Store

    def go() -> None:
        cfg = c.config()
        store = Store.open(cfg.state_url())
        try:
            with store.tx() as tx:
                rows = tx.query_audit(email=normalise_email(email), record_id=record_id, rule=rule,
                                      system=system, since=_utc(since), until=_utc(until),
                                      limit=limit, newest=True)
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps([_row_dict(r) for r in rows], indent=2, default=str))
        else:
            print_audit(rows)

    guarded(go)


def _utc(d: datetime | None) -> datetime | None:
    return d.replace(tzinfo=UTC) if d is not None and d.tzinfo is None else d


def _row_dict(r: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        return dataclasses.asdict(r)
    return dict(r._mapping)


# -- mappings -------------------------------------------------------------------------------------

@main.group()
def mappings() -> None:
    """Mapping and SLA files kept in git: check them, and see a change's impact."""


@mappings.command("check")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--live", is_flag=True, help="Also compare with the values the CRMs allow (API calls).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
def mappings_check(c: Ctx, directory: Path | None, live: bool, fmt: str) -> None:
    """Validate every mapping/SLA file; problems as file:line:col: message. Exit 0 clean, 1 problems, 2 unreadable."""
    from syncd.mapping_check import check_directory, compare_live, exit_code, format_problems

    def go() -> int:
        d = directory
        if d is None:
            from syncd.runtime import mappings_dir

            d = mappings_dir(c.config()) if (c.config_arg or config_path(None).exists()) else None
            if d is None:
                from syncd.mapping import default_mappings_dir

                d = default_mappings_dir()
        if not d.is_dir():
            _fail(2, f"{d}: not a readable directory")
        problems = check_directory(d)
        if live and not any(p.severity == "error" for p in problems):
            from syncd.mapping import load_mappings
            from syncd.runtime import build_connectors

            m = load_mappings(d)
            allowed: dict[tuple[str, str, str], list[str]] = {}
            for system, conn in build_connectors(c.config(), m).items():
                for (obj, fld), vals in conn.allowed_values().items():
                    allowed[(system, obj, fld)] = vals
                conn.close()
            problems += compare_live(m, allowed)
        out = format_problems(problems, fmt)
        if out:
            click.echo(out)
        return exit_code(problems)

    sys.exit(guarded(go))


@mappings.command("impact")
@click.option("--from", "rev_from", default="HEAD", show_default=True, help="Git revision of the old mappings.")
@click.option("--to", "rev_to", default=None, help="Git revision of the new mappings (default: working tree).")
@click.option("--samples", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def mappings_impact(c: Ctx, rev_from: str, rev_to: str | None, samples: int, as_json: bool) -> None:
    """Re-map the stored records under both versions (no writes, no API calls) and count the changes."""
    from syncd.impact import impact, print_impact
    from syncd.runtime import mappings_dir
    from syncd.store import Store

    def go() -> None:
        cfg = c.config()
        store = Store.open(cfg.state_url())
        try:
            result = impact(store, mappings_dir(cfg), rev_from, rev_to, samples=samples)
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        else:
            print_impact(result)

    guarded(go)


# -- resync / run / demo / sandbox ----------------------------------------------------------------

@main.command()
@click.option("--object", "group", type=click.Choice(catalogue.GROUPS), default=None)
@click.option("--since", type=click.DateTime(), default=None, help="Re-pull everything modified since DATE.")
@click.option("--full", is_flag=True, help="Re-pull everything.")
@click.option("--email", default=None, help="Resync one person by email.")
@click.option("--id", "record", default=None, metavar="SYSTEM:ID", help="Resync one record, e.g. salesforce:00Q…")
@click.option("--inline", is_flag=True, help="Run here in the foreground even if a service is running.")
@pass_ctx
def resync(c: Ctx, group: str | None, since: datetime | None, full: bool, email: str | None,
           record: str | None, inline: bool) -> None:
    """A manual resync. Queued for a running service on the same store, else run inline."""
    from syncd.resync import ResyncRequest, request_resync

    def go() -> None:
        req = ResyncRequest(group=group, since=_utc(since), full=full, email=email, record=record)
        req.validate()
        click.echo(request_resync(c.config(), req, inline=inline))

    guarded(go)


@main.command()
@pass_ctx
def run(c: Ctx) -> None:
    """The service: scheduled cycles, resync queue, metrics and health on 127.0.0.1."""
    from syncd.service import run_service

    def go() -> int:
        return run_service(c.config(), config_file=config_path(c.config_arg))

    sys.exit(guarded(go))


@main.command()
@click.option("--people", type=int, default=200, show_default=True)
@click.option("--deals", type=int, default=60, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep-running", is_flag=True, help="Leave the sandbox and the service up to explore.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Story speed factor.")
@pass_ctx
def demo(c: Ctx, people: int, deals: int, seed: int, keep_running: bool, speed: float) -> None:
    """Sandbox CRMs on loopback, seeded; the real daemon runs against them and tells what it did."""
    from syncd.demo import run_demo

    sys.exit(guarded(lambda: run_demo(people=people, deals=deals, seed=seed,
                                      keep_running=keep_running, speed=speed)))


@main.group()
def sandbox() -> None:
    """The local CRM simulators (HubSpot + Salesforce) used by demo, tests and benchmarks."""


@sandbox.command("serve")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--people", type=int, default=1000, show_default=True)
@click.option("--deals", type=int, default=None, help="Default: a fifth of --people.")
@click.option("--hubspot-port", type=int, default=0)
@click.option("--salesforce-port", type=int, default=0)
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Where to write the CA bundle and a ready-to-use syncd.toml (default: a temp dir).")
def sandbox_serve(seed: int, people: int, deals: int | None, hubspot_port: int, salesforce_port: int,
                  directory: Path | None) -> None:
    """Serve seeded simulators until Ctrl-C; prints URLs, token/session and CA path."""
    from syncd.sandbox import serve_forever

    sys.exit(guarded(lambda: serve_forever(seed=seed, people=people, deals=deals, hubspot_port=hubspot_port,
                                           salesforce_port=salesforce_port, directory=directory)))


if __name__ == "__main__":  # pragma: no cover
    main()
