"""`syncd demo`: the sandbox CRMs, seeded, with the real service running against them.

The service is started exactly as an operator would (`syncd --config … run`, a
child process talking HTTPS to the simulators on 127.0.0.1), while the story plays
the changes a marketer and a sales rep would make. The demo prints what happened
and what syncd changed, where and why, from syncd's own audit trail.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from syncd.errors import ConfigError, RecordError, SyncError
from syncd.logs import mask_email
from syncd.mapping import Mappings, default_mappings_dir, load_mappings
from syncd.report import print_status, status_data
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import (
    STORY_ATTEMPTS,
    STORY_CONTRACT,
    STORY_KINDS,
    STORY_RETURN,
    STORY_SCORE,
    STORY_WIN,
    SeedSpec,
    SeedSummary,
    seed,
)
from syncd.sandbox.story import Played, Story
from syncd.store import AuditRow, Store

CONTACTS_INTERVAL_S = 2.0
DEALS_INTERVAL_S = 3.0


def _config_extra() -> str:
    return (f"[sync]\ncontacts_interval_s = {CONTACTS_INTERVAL_S}\ndeals_interval_s = {DEALS_INTERVAL_S}\n"
            "jitter_s = 0.2\noverlap_s = 5\nretry_cap_s = 2\n\n[service]\nmetrics_port = 0\n"
            "shutdown_grace_s = 10\n\n[logging]\nformat = \"json\"\n")


_KEY_FIELDS = ("lifecycle", "lead_status", "deal_stage", "score")


class _Narrator:
    """Prints the story and syncd's audited writes as they happen."""

    def __init__(self, console: Console, summary: SeedSummary) -> None:
        self.console = console
        self.names: dict[str, str] = {}
        for cases in summary.cases.values():
            for c in cases:
                self.names.setdefault(c.email.strip().lower(), c.name)
        self.story_emails = {c.email.strip().lower() for k in STORY_KINDS for c in summary.cases.get(k, [])}
        # Deal writes carry no email: the story's deals are recognised by their record ids.
        self.story_deals: dict[str, str] = {
            rid: c.email.strip().lower() for k in STORY_KINDS for c in summary.cases.get(k, [])
            for rid in (c.hubspot_deal_id, c.sf_opportunity_id) if rid}
        self.seen: set[int] = set()
        self.by_rule: dict[str, set[tuple[str, ...]]] = {}  # the records each rule wrote
        self.created: dict[str, set[tuple[str, ...]]] = {}  # of which it created
        self.mappings: Mappings | None = None
        try:
            self.mappings = load_mappings(default_mappings_dir())
        except Exception:  # noqa: BLE001 - the raw values are a courtesy; terms are shown anyway
            self.mappings = None
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def stamp(self) -> str:
        return f"[dim]{time.monotonic() - self.t0:5.1f}s[/dim]"

    def step(self, p: Played) -> None:
        who = "[magenta]marketing[/magenta]" if p.step.actor == "marketing" else "[cyan]sales[/cyan]    "
        with self.lock:
            if p.error:
                self.console.print(f"{self.stamp()} {who} {p.text} [red](could not apply: {p.error})[/red]")
            else:
                self.console.print(f"{self.stamp()} {who} {p.text}")
                if p.step.expect:
                    self.console.print(f"              [dim]expected from syncd: {p.step.expect}[/dim]")

    def writes(self, rows: list[AuditRow], *, detail_all: bool) -> None:
        """One line per record written (an outbox entry): the record, each field before → after in
        glossary terms with the CRM's raw value beside them, the rule and its reason."""
        with self.lock:
            groups: dict[tuple[str, ...], list[AuditRow]] = {}  # one per record and rule
            for r in rows:
                if r.id in self.seen:
                    continue
                self.seen.add(r.id)
                record = r.record_id or f"new {r.outbox_id if r.outbox_id is not None else -r.id}"
                groups.setdefault((r.system, r.object, record, r.rule), []).append(r)
            for key, group in groups.items():
                r = group[0]
                created = _created(group)
                self.by_rule.setdefault(r.rule, set()).add(key[:3])  # records, not field writes
                if created:
                    self.created.setdefault(r.rule, set()).add(key[:3])
                email = r.email_norm or self.story_deals.get(r.record_id or "", "")
                if not (detail_all or email in self.story_emails):
                    continue
                name = self.names.get(email, "a person")
                if created:
                    shown = [g for g in group if g.field in _KEY_FIELDS]
                    changes = "created: " + ", ".join(f"{g.field} {self.term(g, g.after)}" for g in shown) + \
                        f" (+{len(group) - len(shown)} more fields)"
                else:
                    changes = ", ".join(f"{g.field} {self.term(g, g.before)} → {self.term(g, g.after)}"
                                        for g in group)
                record = f"{r.object}/{r.record_id}" if r.record_id else f"a new {r.object}"
                self.console.print(
                    f"{self.stamp()} [green]syncd[/green]     {r.system} {record} ({name}): "
                    f"{changes}  [dim]{r.rule}: {for_people(r.reason)}[/dim]", soft_wrap=True)

    def rules(self) -> list[str]:
        """Rules by how many records they wrote, most first."""
        return sorted(self.by_rule, key=lambda r: (-len(self.by_rule[r]), r))

    def records(self, rule: str | None = None) -> str:
        """``57 records (5 created, 52 updated)``: what a person counts, not field writes."""
        rules = [rule] if rule else list(self.by_rule)
        written = set().union(*(self.by_rule.get(r, set()) for r in rules))
        created = set().union(*(self.created.get(r, set()) for r in rules))
        n, c = len(written), len(created)
        word = "record" if n == 1 else "records"
        return f"{n} {word} ({c} created, {n - c} updated)" if c else f"{n} {word} updated"

    def term(self, row: AuditRow, value: Any) -> str:
        """A glossary term with the CRM's own value beside it: ``returned_not_ready (BAD_TIMING)``."""
        if value is None or value == "":
            return "(empty)"
        shown = mask_email(for_people(str(value)))
        if self.mappings is None:
            return shown
        try:
            raw = self.mappings.to_raw(row.system, row.object, {row.field: value})
        except (RecordError, KeyError, TypeError, ValueError):
            return shown
        raws = [str(v) for v in raw.values() if v not in (None, "")]
        return f"{shown} ({raws[0]})" if len(raws) == 1 and raws[0] != str(value) else shown


def _created(group: Sequence[AuditRow]) -> bool:
    return all(g.before is None for g in group) and len(group) > 3


_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2})(?::\d{2}(?:\.\d+)?)?(?:\+00:00|Z)?")


def for_people(text: str) -> str:
    """Times without seconds' fractions (``2026-12-01 06:50 UTC``), and no ``None``."""
    return _STAMP.sub(r"\1 \2 UTC", text).replace("None → ", "(empty) → ")


# -- expectations: each story step's, checked against syncd's own audit trail ---------------------

@dataclass(frozen=True, slots=True)
class _Seen:
    """What a check reads: the audit rows, the story's people, and when each step was played."""

    rows: Sequence[AuditRow]
    summary: SeedSummary
    played: Sequence[Played]

    def email(self, kind: str) -> str:
        return self.summary.first(kind).email.strip().lower()

    def at(self, step: str) -> datetime | None:
        return next((p.at for p in self.played if p.step.apply.__name__ == step and not p.error), None)

    def wrote(self, since: datetime, until: datetime | None = None, **match: Any) -> bool:
        """Did syncd write a row matching ``match`` (field=value; ``after`` a set is any of) in the window?"""
        for r in self.rows:
            if r.at < since or (until is not None and r.at >= until):
                continue
            ok = True
            for k, want in match.items():
                got = (r.email_norm or "") if k == "email" else getattr(r, k)
                if not (got in want if isinstance(want, set | frozenset | tuple) else got == want):
                    ok = False
                    break
            if ok:
                return True
        return False


def _score_handed_off(s: _Seen, t: datetime) -> bool:
    return s.wrote(t, email=s.email(STORY_SCORE), system="salesforce", object="Lead")


def _attempts_returned(s: _Seen, t: datetime) -> bool:
    return s.wrote(t, email=s.email(STORY_ATTEMPTS), system="hubspot", field="lifecycle", after="lead")


def _returned_to_nurture(s: _Seen, t: datetime) -> bool:
    e = s.email(STORY_RETURN)
    return (s.wrote(t, email=e, system="hubspot", field="lifecycle", after="lead")
            and s.wrote(t, email=e, system="hubspot", field="lead_status", after="returned_not_ready"))


def _no_rehandoff(s: _Seen, t: datetime) -> bool:
    until = s.at("demo_request")
    return not s.wrote(t, until, email=s.email(STORY_RETURN), system="salesforce", field="lifecycle",
                       after={"mql", "sal", "sql"})


def _handed_back(s: _Seen, t: datetime) -> bool:
    return s.wrote(t, email=s.email(STORY_RETURN), system="salesforce", field="lifecycle", after={"mql", "sal"}) \
        or s.wrote(t, email=s.email(STORY_RETURN), system="salesforce", object="Lead", field="lead_status",
                   after="new")


def _won(s: _Seen, t: datetime) -> bool:
    deal = s.summary.first(STORY_WIN).hubspot_deal_id
    return s.wrote(t, record_id=deal, system="hubspot", field="deal_stage", after="closed_won") \
        or s.wrote(t, email=s.email(STORY_WIN), system="hubspot", field="lifecycle", after="customer")


def _quote_presented(s: _Seen, t: datetime) -> bool:
    opp = s.summary.first(STORY_CONTRACT).sf_opportunity_id
    return s.wrote(t, record_id=opp, system="salesforce", field="deal_stage", after="quote_presented")


#: story step (its function's name) → how to tell whether syncd did what the step expects
CHECKS: dict[str, Callable[[_Seen, datetime], bool]] = {
    "score_crosses_threshold": _score_handed_off,
    "unanswered_calls": _attempts_returned,
    "returned_not_ready": _returned_to_nurture,
    "small_score_bump": _no_rehandoff,
    "demo_request": _handed_back,
    "opportunity_won": _won,
    "contract_sent": _quote_presented,
}


def expectations(seen: _Seen) -> list[tuple[Played, bool | None]]:
    """Each played step that expects something, and whether syncd did it (None: no check known)."""
    out: list[tuple[Played, bool | None]] = []
    for p in seen.played:
        if not p.step.expect:
            continue
        check = CHECKS.get(p.step.apply.__name__)
        out.append((p, None if check is None or p.error else check(seen, p.at)))
    return out


def print_expectations(console: Console, results: Sequence[tuple[Played, bool | None]]) -> int:
    """✓ / ✗ per expectation; returns how many were not met."""
    missed = 0
    for p, ok in results:
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]" if ok is False else "[yellow]?[/yellow]"
        missed += ok is False
        console.print(f"  {mark} {p.text}\n      [dim]expected: {p.step.expect}[/dim]", soft_wrap=True)
    met = sum(1 for _, ok in results if ok)
    console.print(f"  {met} of {len(results)} expectations met")
    return missed


def run_demo(*, people: int = 200, deals: int = 60, seed_value: int | None = None, seed: int = 1,
             keep_running: bool = False, speed: float = 1.0, console: Console | None = None,
             keep: bool = False) -> int:
    """``keep``: leave the demo's folder (config, state store, service log) in the temp directory."""
    problems = [f"--{name} must not be negative, not {n}" for name, n in (("people", people), ("deals", deals))
                if n < 0]
    if not (math.isfinite(speed) and speed > 0):
        problems.append(f"--speed must be a positive number, not {speed}")
    if problems:  # before anything starts
        raise ConfigError("demo: " + "; ".join(problems))
    console = console or Console()
    # The narrative is the output; the demo's own log lines (story steps) would only interleave with it.
    from syncd import logs

    logs.configure(level="warning", fmt="console")
    seed_no = seed if seed_value is None else seed_value
    workdir = Path(tempfile.mkdtemp(prefix="syncd-demo-"))
    try:
        sb = Sandbox(workdir / "sandbox").start()
        try:
            return _demo(console, sb, workdir, people, deals, seed_no, keep_running, speed, keep)
        finally:
            sb.stop()
    finally:
        if keep:
            console.print(f"Kept the demo's folder: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(console: Console, sb: Sandbox, workdir: Path, people: int, deals: int, seed_no: int,
          keep_running: bool, speed: float, keep: bool = False) -> int:
    from syncd.sandbox.seed import seed as seed_apps

    summary = seed_apps(sb.hubspot, sb.salesforce, SeedSpec(seed=seed_no, people=people, deals=deals))
    state_url = f"sqlite:///{workdir / 'syncd.db'}"
    # Salesforce by the JWT bearer flow with a throwaway key: the production path, not a session id
    cfg = sb.write_config(workdir / "syncd.toml", state_url=state_url, extra=_config_extra(), salesforce_auth="jwt")
    console.rule("[bold]syncd demo")
    console.print(f"Sandbox HubSpot at {sb.hubspot_url}, Salesforce at {sb.salesforce_url} (HTTPS, throwaway CA).")
    console.print(f"Seeded: {summary}")
    console.print(f"Starting the service: syncd --config {cfg} run  (logs: {workdir / 'service.log'})")
    env = {**os.environ, **sb.env()}
    log_file = (workdir / "service.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "syncd", "--config", str(cfg), "run"],
                            stdout=log_file, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    service_log = workdir / "service.log"
    store = Store.open(state_url)
    narrator = _Narrator(console, summary)
    since = datetime.now(UTC)
    try:
        # 1. the first cycles reconcile the seeded data
        _wait_first_cycles(store, proc, service_log, timeout=60)
        rows = _audit_since(store, since)
        narrator.writes(rows, detail_all=False)
        console.print(f"{narrator.stamp()} [green]syncd[/green]     first cycles done: "
                      f"{narrator.records()} to reconcile the seeded CRMs — "
                      + ", ".join(f"{rule} {narrator.records(rule)}" for rule in narrator.rules()))
        console.rule("the story: what people do, and what syncd does about it")
        # 2. the story
        stop = threading.Event()
        story = Story(on_step=narrator.step)
        thread = story.play(sb.hubspot, sb.salesforce, summary, speed=speed, stop=stop)
        try:
            while thread.is_alive():
                _check_alive(proc, service_log)
                narrator.writes(_audit_since(store, since), detail_all=False)
                thread.join(timeout=0.5)
        finally:
            stop.set()
        # 3. let syncd catch up with the last step
        deadline = time.monotonic() + 4 * DEALS_INTERVAL_S
        while time.monotonic() < deadline:
            _check_alive(proc, service_log)
            narrator.writes(_audit_since(store, since), detail_all=False)
            time.sleep(0.5)
        if keep_running:
            console.print(f"\nStill running. Try: SYNCD_HUBSPOT_TOKEN=sandbox-token SYNCD_SALESFORCE_SESSION="
                          f"sandbox-session syncd --config {cfg} status   (Ctrl-C to stop)")
            try:
                while proc.poll() is None:
                    narrator.writes(_audit_since(store, since), detail_all=False)
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        # 4. stop the service as systemd would
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        console.rule("did syncd do what was expected?")
        print_expectations(console, expectations(_Seen(_audit_since(store, since), summary, story.played)))
        console.rule("what syncd did")
        for rule in sorted(narrator.by_rule):
            console.print(f"  {rule:<28} {narrator.records(rule)}")
        print_status(status_data(store, datetime.now(UTC)), console)
        trail = (f"syncd --config {cfg} audit" if keep
                 else "run the demo with --keep to keep its folder and read `syncd audit`")
        console.print(f"Audit trail: {trail}   |   service exit code {code}")
        return 0 if code == 0 else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()
        log_file.close()


def _check_alive(proc: subprocess.Popen[bytes], service_log: Path) -> None:
    if proc.poll() is not None:
        raise SyncError(f"the service exited early with code {proc.returncode}; see its log, {service_log}")


def _wait_first_cycles(store: Store, proc: subprocess.Popen[bytes], service_log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc, service_log)
        with store.tx() as tx:
            jobs = {r.job for r in tx.last_runs(limit=50) if r.status == "ok"}
        if any("contacts" in j for j in jobs) and any("deals" in j for j in jobs):
            return
        time.sleep(0.3)
    raise SyncError(f"the service did not complete a cycle within {timeout:.0f} s; see its log, {service_log}")


def _audit_since(store: Store, since: datetime) -> list[AuditRow]:
    with store.tx() as tx:
        return list(tx.query_audit(since=since, limit=100_000))


__all__ = ["run_demo", "seed"]
