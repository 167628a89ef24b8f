"""`syncd demo`: the sandbox CRMs, seeded, with the real service running against them.

The service is started exactly as an operator would (`syncd --config … run`, a
child process talking HTTPS to the simulators on 127.0.0.1), while the story plays
the changes a marketer and a sales rep would make. The demo prints what happened
and what syncd changed, where and why, from syncd's own audit trail.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from syncd.errors import ConfigError, SyncError
from syncd.logs import mask_email
from syncd.report import print_status, status_data
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import STORY_KINDS, SeedSpec, SeedSummary, seed
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
        self.by_rule: Counter[str] = Counter()
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
        """One line per write (an outbox entry): the record, each field before → after, rule and reason."""
        with self.lock:
            groups: dict[int, list[AuditRow]] = {}
            for r in rows:
                if r.id in self.seen:
                    continue
                self.seen.add(r.id)
                self.by_rule[r.rule] += 1
                groups.setdefault(r.outbox_id if r.outbox_id is not None else -r.id, []).append(r)
            for group in groups.values():
                r = group[0]
                email = r.email_norm or self.story_deals.get(r.record_id or "", "")
                if not (detail_all or email in self.story_emails):
                    continue
                name = self.names.get(email, "a person")
                if all(g.before is None for g in group) and len(group) > 3:  # a record syncd created
                    shown = [g for g in group if g.field in _KEY_FIELDS]
                    changes = "created: " + ", ".join(f"{g.field} {g.after}" for g in shown) + \
                        f" (+{len(group) - len(shown)} more fields)"
                else:
                    changes = ", ".join(f"{g.field} {mask_email(str(g.before))} → {mask_email(str(g.after))}"
                                        for g in group)
                self.console.print(
                    f"{self.stamp()} [green]syncd[/green]     {r.system} {r.object}/{r.record_id} ({name}): "
                    f"{changes}  [dim]{r.rule}: {r.reason}[/dim]", soft_wrap=True)


def run_demo(*, people: int = 200, deals: int = 60, seed_value: int | None = None, seed: int = 1,
             keep_running: bool = False, speed: float = 1.0, console: Console | None = None) -> int:
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
    sb = Sandbox(workdir / "sandbox").start()
    try:
        return _demo(console, sb, workdir, people, deals, seed_no, keep_running, speed)
    finally:
        sb.stop()


def _demo(console: Console, sb: Sandbox, workdir: Path, people: int, deals: int, seed_no: int,
          keep_running: bool, speed: float) -> int:
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
                      f"{len(rows)} field writes to reconcile the seeded CRMs — "
                      + ", ".join(f"{rule} ×{n}" for rule, n in narrator.by_rule.most_common()))
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
        console.rule("what syncd did")
        for rule, n in sorted(narrator.by_rule.items()):
            console.print(f"  {rule:<28} {n:>5} field writes")
        print_status(status_data(store, datetime.now(UTC)), console)
        console.print(f"Audit trail: syncd --config {cfg} audit   |   service exit code {code}")
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
