"""The `syncd` command. Exit codes: 0 ok, 1 a failure during work, 2 bad usage/config/mapping files.

Every failure is one line on stderr, ``syncd: error: …``, never a traceback: syncd's own
errors say what, where and why; anything else is reported as an internal error with its
type and message. ``-v`` / ``--debug`` shows the traceback (for bug reports) and debug logs.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import structlog

from syncd import catalogue, logs
from syncd.config import Config, config_path, load_config
from syncd.errors import SyncError
from syncd.exits import DEBUG, fail, guarded, report

log = structlog.get_logger()


class _Syncd(click.Group):
    """The top-level group: usage errors, too, are one line (exit 2), and nothing escapes as a traceback."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        DEBUG["on"] = False
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `syncd` alone (click ≥ 8.2): the help, as click does
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            fail(exc.exit_code, f"{exc.format_message()}{where}")
        except click.ClickException as exc:
            fail(exc.exit_code, exc.format_message())
        except click.exceptions.Abort as exc:
            report(exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else KeyboardInterrupt())
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - never a traceback, even from set-up
            report(exc)
        sys.exit(rv if isinstance(rv, int) else 0)


class Ctx:
    def __init__(self, config_arg: str | None, log_format: str | None, verbose: bool) -> None:
        self.config_arg = config_arg
        self.log_format = log_format
        self.verbose = verbose
        self._config: Config | None = None
        self._with_credentials = False

    def config(self, *, credentials: bool = True) -> Config:
        """The config, validated. ``credentials=False``: a command that calls no API (the secret
        files are not checked: an operator's shell may rightly be unable to read them)."""
        if self._config is None or (credentials and not self._with_credentials):
            self._config = load_config(config_path(self.config_arg), credentials=credentials)
            self._with_credentials = credentials
            self.setup_logging(self._config)
        return self._config

    def setup_logging(self, cfg: Config | None) -> None:
        level = "debug" if self.verbose else (cfg.logging.level if cfg else "info")
        fmt = self.log_format or (cfg.logging.format if cfg else "auto")
        logs.configure(level=level, fmt=fmt, show_emails=bool(cfg and cfg.logging.show_emails),
                       tracebacks=self.verbose or level == "debug", capture_stdlib=True)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=_Syncd, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_arg", metavar="FILE", default=None,
              help="Config file (default ./syncd.toml, or $SYNCD_CONFIG).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default=None)
@click.option("-v", "--verbose", "--debug", "verbose", is_flag=True,
              help="Debug logging, and the Python traceback of an error (for bug reports).")
@click.version_option(package_name="syncd")
@click.pass_context
def main(ctx: click.Context, config_arg: str | None, log_format: str | None, verbose: bool) -> None:
    """syncd keeps HubSpot and Salesforce aligned on one sales & marketing glossary."""
    DEBUG["on"] = verbose
    ctx.obj = Ctx(config_arg, log_format, verbose)
    ctx.obj.setup_logging(None)


# -- argument checks ------------------------------------------------------------------------------

def _rule_ids() -> tuple[str, ...]:
    """The rule ids syncd.rules declares: its ``RULE_IDS`` if it has one, else the rules its steps
    (``PERSON_STEPS``, ``RETURN_STEPS``) name, else the list in its docstring."""
    from syncd import rules

    declared = tuple(getattr(rules, "RULE_IDS", ()))
    if not declared:
        steps = [*getattr(rules, "PERSON_STEPS", ()), *getattr(rules, "RETURN_STEPS", ())]
        declared = tuple(dict.fromkeys(r for step in steps for r in getattr(step, "rules", ())))
    if not declared:
        doc = rules.__doc__ or ""
        section = doc.split("Rule ids:", 1)[1].split("\n\n", 1)[0] if "Rule ids:" in doc else ""
        declared = tuple(re.findall(r"^\s+(R\d+-[a-z0-9-]+)\s", section, re.M))
    return tuple(sorted(declared, key=lambda r: (int(re.sub(r"\D.*", "", r[1:]) or 0), r)))


def _known_rule(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--rule R2-returned`` (or just ``R2``): a rule id syncd.rules declares."""
    if value is None:
        return None
    from syncd.store.review import OPERATOR_RULE

    known = _rule_ids()
    if not known or value in known or value == OPERATOR_RULE:  # operator: the review loop's resolutions
        return value
    by_number = [r for r in known if r.split("-", 1)[0].lower() == value.strip().lower()]
    if len(by_number) == 1:
        return by_number[0]
    raise click.BadParameter(f"unknown rule id {value!r} (known: {', '.join(known)})")


def _finite_positive(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{value} is not a positive number")
    return value


Count = click.IntRange(min=0)
Port = click.IntRange(min=0, max=65535)


# -- sync -----------------------------------------------------------------------------------------

@main.command()
@click.option("--once", is_flag=True, required=True, help="Run exactly one cycle (the service is `syncd run`).")
@click.option("--object", "group", type=click.Choice(catalogue.GROUPS), default=None)
@click.option("--dry-run", is_flag=True, help="Print the planned writes; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
@pass_ctx
def sync(c: Ctx, once: bool, group: str | None, dry_run: bool, as_json: bool) -> None:
    """Run one sync cycle: pull, map, link, decide, write back."""
    from syncd.progress import progress_for
    from syncd.resync import LEASE_WAIT_S, LeaseKeeper, interrupt_dead_runs, make_engine, new_owner, run_cycle
    from syncd.runtime import open_runtime

    def go() -> None:
        cfg = c.config()
        rt = open_runtime(cfg)
        keeper = LeaseKeeper(rt.store, new_owner())
        try:
            engine = make_engine(rt, dry_run=dry_run, owner=keeper.owner)
            with progress_for("sync --once") as shown:  # on a terminal: live; off it: a line every 10 s
                engine.progress = shown
                stats = _one_cycle(engine, group, dry_run, keeper, cfg)
        finally:
            keeper.close()
            rt.close()
        if as_json:
            from syncd._json import dumps
            from syncd.machine import cycle_data

            click.echo(dumps(cycle_data(stats, dry_run=dry_run, group=group)))
        elif dry_run:
            from syncd.report import planned_writes_table

            planned_writes_table(stats.planned)
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in stats.summary().items()))
        if stats.partial:
            # one side could not be pulled: the other was recorded, nothing decided on half a picture
            raise SyncError(f"partial cycle: {stats.partial_reason()}")

    def _one_cycle(engine: Any, group: str | None, dry_run: bool, keeper: Any, cfg: Config) -> Any:
        if dry_run:  # changes nothing (one transaction, rolled back): no lease needed
            return engine.cycle(group)
        interrupt_dead_runs(engine.store, keeper.owner, fresh_s=3 * min(cfg.sync.intervals().values()))
        got = run_cycle(engine, group, keeper, wait_s=LEASE_WAIT_S)
        if got is None:
            raise SyncError(f"the store is busy: another syncd kept a cycle running for "
                            f"{LEASE_WAIT_S:.0f}s; try again later")
        return got

    guarded(go)


# -- status / audit -------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--explain", is_flag=True, help="Say what each word of the status means, and exit.")
@pass_ctx
def status(c: Ctx, as_json: bool, explain: bool) -> None:
    """Per system/object: last run, cursor, outbox, quarantine, unmapped values, SLA breaches."""
    from syncd import freshness
    from syncd._json import dumps
    from syncd.report import print_explain, print_status, status_data
    from syncd.store import open_store_readonly

    if explain:
        print_explain()
        return

    def go() -> None:
        cfg = c.config(credentials=False)
        store = open_store_readonly(cfg.state_url())
        try:
            data = status_data(store, datetime.now(UTC),
                               bounds=freshness.bounds(cfg.sync.intervals(), cfg.sync.freshness_intervals))
        finally:
            store.close()
        if as_json:
            click.echo(dumps(data))
        else:
            print_status(data)

    guarded(go)


@main.command()
@click.option("--email", default=None, help="A person's email (matched normalised).")
@click.option("--id", "record_id", default=None, help="A record id (either system).")
@click.option("--rule", default=None, callback=_known_rule, help="A rule id, e.g. R2-returned (or R2).")
@click.option("--system", type=click.Choice(["hubspot", "salesforce"]), default=None)
@click.option("--since", type=click.DateTime(), default=None)
@click.option("--until", type=click.DateTime(), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Show the most recent N writes.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit(c: Ctx, email: str | None, record_id: str | None, rule: str | None, system: str | None,
          since: datetime | None, until: datetime | None, limit: int, as_json: bool) -> None:
    """Why did this change? Every write: rule, reason, before → after, mapping revision."""
    from syncd._json import dumps
    from syncd.model import normalise_email
    from syncd.report import deal_labels, print_audit
    from syncd.store import open_store_readonly

    if since is not None and until is not None and since.replace(tzinfo=None) >= until.replace(tzinfo=None):
        raise click.BadParameter(f"--since {since} is not before --until {until}", param_hint="'--since'")

    def go() -> None:
        cfg = c.config(credentials=False)
        store = open_store_readonly(cfg.state_url())
        try:
            with store.tx(readonly=True) as tx:
                rows = tx.query_audit(email=normalise_email(email), record_id=record_id, rule=rule,
                                      system=system, since=_utc(since), until=_utc(until),
                                      limit=limit, newest=True)
                labels = deal_labels(tx, rows)
        finally:
            store.close()
        if as_json:
            click.echo(dumps([_row_dict(r) for r in rows]))
        else:
            print_audit(rows, labels=labels)

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
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              help="json: the same as --json (kept as an alias).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
@pass_ctx
def mappings_check(c: Ctx, directory: Path | None, live: bool, fmt: str, as_json: bool) -> None:
    """Validate every mapping/SLA file; problems as file:line:col: message. Exit 0 clean, 1 problems, 2 unreadable."""
    from syncd.mapping_check import check_directory, exit_code, format_problems, live_problems

    def go() -> int:
        # the config is read when it names the folder, when --live needs it, or when it is given
        use_config = live or c.config_arg is not None or (directory is None and config_path(None).exists())
        cfg = c.config(credentials=live) if use_config else None
        d = directory
        if d is None:
            from syncd.mapping import default_mappings_dir
            from syncd.runtime import mappings_dir

            d = mappings_dir(cfg) if cfg is not None else default_mappings_dir()
        if not d.is_dir():
            fail(2, f"{d}: not a readable directory")
        problems = check_directory(d)
        if cfg is not None and cfg.mappings.sla == "defaults":  # the built-in SLA is asked for
            from syncd.sla import SLA_MISSING

            problems = [p for p in problems if p.code != SLA_MISSING]
        if live and not any(p.severity == "error" for p in problems):
            from syncd.mapping import load_mappings
            from syncd.runtime import build_connectors

            m = load_mappings(d)
            problems += live_problems(m, build_connectors(c.config(), m))
        out = format_problems(problems, "json" if as_json else fmt)
        if out:
            click.echo(out)
        elif fmt == "text":  # a clean check says what it read
            from syncd.report import mappings_summary

            click.echo(mappings_summary(d))
        return exit_code(problems)

    sys.exit(guarded(go))


@mappings.command("impact")
@click.option("--from", "rev_from", default="HEAD", show_default=True, help="Git revision of the old mappings.")
@click.option("--to", "rev_to", default=None, help="Git revision of the new mappings (default: working tree).")
@click.option("--samples", type=Count, default=3, show_default=True, help="Example records per change.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def mappings_impact(c: Ctx, rev_from: str, rev_to: str | None, samples: int, as_json: bool) -> None:
    """Re-map the stored records under both versions (no writes, no API calls) and count the changes."""
    from syncd._json import dumps
    from syncd.impact import impact, print_impact
    from syncd.runtime import mappings_dir
    from syncd.store import open_store_readonly

    def go() -> None:
        cfg = c.config(credentials=False)
        store = open_store_readonly(cfg.state_url())
        try:
            result = impact(store, mappings_dir(cfg), rev_from, rev_to, samples=samples,
                            sla_defaults=cfg.mappings.sla == "defaults")
        finally:
            store.close()
        if as_json:
            click.echo(dumps(result))
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
@click.option("--plan", "show_plan", is_flag=True, help="Print its cost in API calls per system; resync nothing.")
@click.option("--force", is_flag=True, help="Start even if the plan would cross the daily API cap.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
@pass_ctx
def resync(c: Ctx, group: str | None, since: datetime | None, full: bool, email: str | None,
           record: str | None, inline: bool, show_plan: bool, force: bool, as_json: bool) -> None:
    """A manual resync. Queued for a running service on the same store, else run inline."""
    from syncd.resync import ResyncRequest, request_resync, resync_outcome

    def go() -> None:
        req = ResyncRequest(group=group, since=_utc(since), full=full, email=email, record=record)
        req.validate()
        if show_plan or full or since is not None:  # a pull of everything or of a period: cost it first
            from syncd.plan import check_resync

            check_resync(c.config(), req, show=show_plan, force=force)
            if show_plan:
                return
        if as_json:
            from syncd._json import dumps

            click.echo(dumps(resync_outcome(c.config(), req, inline=inline)))
        else:
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
@click.option("--people", type=Count, default=200, show_default=True)
@click.option("--deals", type=Count, default=60, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--keep-running", is_flag=True, help="Leave the sandbox and the service up to explore.")
@click.option("--speed", type=float, default=1.0, show_default=True, callback=_finite_positive,
              help="Story speed factor (> 0; 10 plays it ten times faster).")
@click.option("--keep", is_flag=True, help="Keep the demo's folder (config, state store, service log) afterwards.")
@pass_ctx
def demo(c: Ctx, people: int, deals: int, seed: int, keep_running: bool, speed: float, keep: bool) -> None:
    """Sandbox CRMs on loopback, seeded; the real daemon runs against them and tells what it did."""
    from syncd.demo import run_demo

    sys.exit(guarded(lambda: run_demo(people=people, deals=deals, seed=seed,
                                      keep_running=keep_running, speed=speed, keep=keep)))


@main.group()
def sandbox() -> None:
    """The local CRM simulators (HubSpot + Salesforce) used by demo, tests and benchmarks."""


@sandbox.command("serve")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--people", type=Count, default=1000, show_default=True)
@click.option("--deals", type=Count, default=None, help="Default: a fifth of --people.")
@click.option("--hubspot-port", type=Port, default=0, help="Default: any free port.")
@click.option("--salesforce-port", type=Port, default=0, help="Default: any free port.")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where to write the CA bundle and a ready-to-use syncd.toml (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the URLs, credentials and paths as JSON (docs/json.md).")
def sandbox_serve(seed: int, people: int, deals: int | None, hubspot_port: int, salesforce_port: int,
                  directory: Path | None, as_json: bool) -> None:
    """Serve seeded simulators until Ctrl-C; prints URLs, token/session and CA path."""
    from syncd.sandbox import serve_forever


    sys.exit(guarded(lambda: serve_forever(seed=seed, people=people, deals=deals, hubspot_port=hubspot_port,
                                           salesforce_port=salesforce_port, directory=directory,
                                           as_json=as_json)))


# -- review loop: conflicts, quarantine, unmapped, blocked (syncd/review.py) ----------------------

def _register_review() -> None:
    from syncd.review import commands

    for cmd in commands():
        main.add_command(cmd)


_register_review()


# -- reconcile / prune (issue 16: nothing silently missed; retention) ----------------------------

@main.command("reconcile")
@click.option("--object", "group", type=click.Choice(catalogue.GROUPS), default=None)
@click.option("--repair", is_flag=True, help="Fetch exactly the missing records and decide them again.")
@click.option("--force", is_flag=True, help="Run even if the id listing would cross the daily API cap.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def reconcile_cmd(c: Ctx, group: str | None, repair: bool, force: bool, as_json: bool) -> None:
    """Diff the CRMs' id sets with the store, page by page: missing and extra ids (exit 1 on a gap
    left unrepaired)."""
    from syncd.reconcile import run_cli

    guarded(lambda: run_cli(c.config(), group=group, do_repair=repair, as_json=as_json, force=force))


@main.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def prune_cmd(c: Ctx, dry_run: bool, as_json: bool) -> None:
    """Delete finished rows older than [retention] keeps them (small batches, short transactions)."""
    from syncd.retention import run_cli

    guarded(lambda: run_cli(c.config(credentials=False), dry_run=dry_run, as_json_out=as_json))


@main.command("tombstones")
@click.option("--system", type=click.Choice(["hubspot", "salesforce"]), default=None)
@click.option("--object", "obj", default=None, metavar="OBJECT", help="One object: contacts, Lead, deals…")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="The newest N.")
@click.option("--restored", is_flag=True, help="List records restored since too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
@pass_ctx
def tombstones_cmd(c: Ctx, system: str | None, obj: str | None, limit: int, restored: bool, as_json: bool) -> None:
    """Records the CRMs deleted, archived or merged away: when, how syncd learnt it, what became
    of the other side (read-only)."""
    from syncd.tombstones import run_cli

    guarded(lambda: run_cli(c.config(credentials=False), system=system, obj=obj, limit=limit,
                            restored=restored, as_json=as_json))


# -- migrate --------------------------------------------------------------------------------------

@main.command()
@pass_ctx
def migrate(c: Ctx) -> None:
    """Bring the state store's schema to this version (the service and sync do it on start)."""
    from syncd.migrate import run_migrate

    guarded(lambda: click.echo(run_migrate(c.config(credentials=False))))


# -- auth (issue 15) --------------------------------------------------------------------------------

@main.group()
def auth() -> None:
    """Credentials: who syncd is in each CRM, how long its token lasts, what it may do."""


@auth.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def auth_check(c: Ctx, as_json: bool) -> None:
    """Log in to both CRMs and name every permission the mappings need that is missing (exit 1)."""
    from syncd.auth_check import as_json as to_json
    from syncd.auth_check import render, run_check

    def go() -> int:
        reports = run_check(c.config())
        click.echo(to_json(reports) if as_json else render(reports))
        return 0 if all(r.ok for r in reports) else 1

    sys.exit(guarded(go))


if __name__ == "__main__":  # pragma: no cover
    main()
