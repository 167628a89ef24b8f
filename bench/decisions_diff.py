"""Do two revisions of syncd decide the same things? (issue 13, "How we will know")

    .venv/bin/python bench/decisions_diff.py                       # HEAD vs the work tree
    .venv/bin/python bench/decisions_diff.py --from main           # main vs the work tree
    .venv/bin/python bench/decisions_diff.py --from WORKTREE --to WORKTREE   # determinism check
    .venv/bin/python bench/decisions_diff.py --from main --to rules --people 300 --keep /tmp/dd

Each side runs with its own code: a revision is checked out with ``git worktree`` into a
temporary directory and every process of that side (sandbox, seed, story, daemon) gets
``PYTHONPATH`` pointing at it; ``WORKTREE`` is this checkout as it is on disk, uncommitted
changes included. Per side, one child process:

1. starts the sandbox CRMs and seeds them (``--seed``, ``--people``; the seed's start is
   fixed by this script, so both sides get the same records and timestamps);
2. runs the real daemon, ``python -m syncd --config … sync --once``, until a cycle writes
   nothing (phase 0), then applies each step of the demo's story (``syncd.sandbox.story``)
   and again runs cycles until nothing is written (phases 1…7);
3. runs a last phase with the daemon's clock ``--later-hours`` (25) ahead, nobody acting,
   so the follow-up timers of the hand-offs come due (R9); this uses ``time-machine`` from
   the dev extras inside the daemon process only (``--later-hours 0`` skips it);
4. dumps, normalised, every ``decide_person``/``decide_deal`` outcome of those cycles (a
   thin wrapper around the two functions inside the daemon process records the decisions
   and the memory they return), the outbox, the audit rows and the SLA events.

Normalised means: wall-clock times, uuids (entity ids), outbox/audit row ids, idempotency
keys and the mapping revision are dropped; a timestamp inside a kept value or a reason
becomes ``<now>`` (the deciding cycle's own clock), ``<seeding>`` or ``<phase k>`` (taken
while the daemon ran: the step after which it was stamped); seeded timestamps stay as they
are. Records syncd created are named ``new:<system>/<object>:<email>`` instead of their
CRM ids (the order of creates inside a batch follows entity uuids). What is kept: system,
object, record id, rule, field before → after, the event and its details, the reason.
Rows are sorted, so the order entities are visited in (by uuid) does not matter.

Exit status: 0 the same, 1 different (a short diff is printed), 2 a side could not run.
About a minute at 300 people. What it compares is only what the seed and the story exercise
(e.g. no seeded score sits exactly on the threshold): edge cases are the unit tests' job.
The SLA windows (follow-up hours, attempt days) are measured against the wall clock, so a
seeded deadline that falls between the two sides' runs would show up as a difference: the
sides run side by side (in parallel) to keep their clocks a few seconds apart.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

WORKTREE = "WORKTREE"
SPAN = timedelta(days=20)  # SeedSpec.span's default: the seed covers [start, start + SPAN]
LOGGING = '\n[logging]\nlevel = "warning"\nformat = "json"\n'
SECTIONS = ("cycles", "decisions", "outbox", "audit", "events")

# ``python -m syncd`` with decide_person/decide_deal wrapped: each outcome becomes one JSON
# line in $SYNCD_DIFF_DECISIONS (raw timestamps; the child normalises them afterwards).
HOOK = r"""
import dataclasses, json, os, runpy
from datetime import date
from syncd import rules

_out = open(os.environ["SYNCD_DIFF_DECISIONS"], "a", encoding="utf-8")

def _plain(v):
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)

def _label(view):
    recs = [r for r in (view.hubspot, view.salesforce) if r is not None]
    return " + ".join(sorted(f"{r.system}/{r.object}/{r.id}" for r in recs))

def _wrap(fn, kind):
    def decide(view, ctx, now):
        out = fn(view, ctx, now)
        _out.write(json.dumps({
            "phase": int(os.environ["SYNCD_DIFF_PHASE"]), "cycle": int(os.environ["SYNCD_DIFF_CYCLE"]),
            "kind": kind, "entity": _label(view), "now": now.isoformat(),
            "decisions": [dataclasses.asdict(d) for d in out.decisions],
            "memory": out.memory.to_dict()}, default=_plain, sort_keys=True) + "\n")
        return out
    return decide

rules.decide_person = _wrap(rules.decide_person, "person")
rules.decide_deal = _wrap(rules.decide_deal, "deal")
if os.environ.get("SYNCD_DIFF_SHIFT_S"):  # the "later" phase: the daemon's clock runs ahead
    import time_machine
    from datetime import UTC, datetime, timedelta
    time_machine.travel(datetime.now(UTC) + timedelta(seconds=float(os.environ["SYNCD_DIFF_SHIFT_S"])),
                        tick=True).start()
try:
    runpy.run_module("syncd", run_name="__main__", alter_sys=True)
finally:
    _out.close()
"""


# ---- the driver ---------------------------------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


@contextmanager
def checkout(repo: Path, rev: str, tmp: Path) -> Iterator[tuple[Path, str]]:
    """The tree to run for ``rev`` and a description of it; a temporary git worktree for a revision."""
    if rev == WORKTREE:
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
        yield repo, f"work tree at {_git(repo, 'rev-parse', '--short', 'HEAD')}" + (" + changes" if dirty else "")
        return
    commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    where = Path(tempfile.mkdtemp(prefix="tree-", dir=tmp))
    _git(repo, "worktree", "add", "--detach", "--quiet", str(where), commit)
    try:
        yield where, f"{rev} ({commit[:9]})"
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(where)],
                       capture_output=True)


def run_side(tree: Path, out: Path, args: argparse.Namespace, start: datetime) -> dict[str, Any]:
    """Run one side in a child process with ``tree`` first on the path; its normalised dump."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--out", str(out),
           "--seed", str(args.seed), "--people", str(args.people), "--start", start.isoformat(),
           "--max-cycles", str(args.max_cycles), "--later-hours", str(args.later_hours)]
    if args.deals is not None:
        cmd += ["--deals", str(args.deals)]
    if args.no_story:
        cmd.append("--no-story")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"the run in {tree} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    dump: dict[str, Any] = json.loads(out.read_text())
    return dump


def _lines(section: Any) -> list[str]:
    if isinstance(section, list):
        return [json.dumps(x, sort_keys=True, ensure_ascii=False) for x in section]
    return json.dumps(section, sort_keys=True, indent=1, ensure_ascii=False).splitlines()


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], max_lines: int) -> bool:
    same = True
    for sec in SECTIONS:
        la, lb = _lines(a.get(sec)), _lines(b.get(sec))
        if la == lb:
            continue
        same = False
        diff = list(difflib.unified_diff(la, lb, names[0], names[1], n=0, lineterm=""))
        print(f"\n{sec}: differ ({len(la)} vs {len(lb)} rows)")
        for line in diff[:max_lines]:
            print("  " + line)
        if len(diff) > max_lines:
            print(f"  … {len(diff) - max_lines} more diff lines")
    return same


def summary(d: dict[str, Any]) -> str:
    n_dec = sum(len(o["decisions"]) for o in d["decisions"])
    return (f"{len(d['decisions'])} rule calls with {n_dec} decisions, {len(d['outbox'])} outbox rows, "
            f"{len(d['audit'])} audit rows, {len(d['events'])} events over "
            f"{sum(c['cycles'] for c in d['cycles'])} cycles in {len(d['cycles'])} phases")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="How it works and what is normalised: the docstring of bench/decisions_diff.py.")
    p.add_argument("--from", dest="rev_a", metavar="REV", default="HEAD",
                   help="a git revision, or WORKTREE (default: HEAD)")
    p.add_argument("--to", dest="rev_b", metavar="REV", default=WORKTREE,
                   help="a git revision, or WORKTREE: this checkout with its uncommitted changes (default)")
    p.add_argument("--people", type=int, default=300, help="seeded people (default 300)")
    p.add_argument("--deals", type=int, default=None, help="default: a fifth of --people")
    p.add_argument("--seed", type=int, default=1, help="the seed (default 1)")
    p.add_argument("--no-story", action="store_true", help="only reconcile the seeded data")
    p.add_argument("--max-cycles", type=int, default=8, help="per phase (default 8)")
    p.add_argument("--later-hours", type=float, default=25.0,
                   help="a last phase with the daemon's clock this far ahead (0: none; default 25, "
                        "past the follow-up window)")
    p.add_argument("--keep", type=Path, metavar="DIR", default=None,
                   help="write the two JSON dumps there (from.json, to.json)")
    p.add_argument("--serial", action="store_true", help="run the two sides one after the other")
    p.add_argument("--max-diff-lines", type=int, default=40, help="per section (default 40)")
    # the child's own options (one side's run), not for use by hand
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--start", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    repo = Path(_git(Path(__file__).resolve().parent, "rev-parse", "--show-toplevel"))
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - SPAN  # what `syncd sandbox serve` seeds today, fixed for both sides
    tmp = Path(tempfile.mkdtemp(prefix="syncd-decisions-diff-"))
    t0 = time.monotonic()
    try:
        with checkout(repo, args.rev_a, tmp) as (tree_a, desc_a), checkout(repo, args.rev_b, tmp) as (tree_b, desc_b):
            outs = (tmp / "a" / "dump.json", tmp / "b" / "dump.json")
            for o in outs:
                o.parent.mkdir()
            print(f"from: {desc_a}\nto:   {desc_b}\nseed {args.seed}, {args.people} people, "
                  f"story {'off' if args.no_story else 'on'}; running both sides …", flush=True)
            jobs: list[Callable[[], dict[str, Any]]] = [
                lambda: run_side(tree_a, outs[0], args, start), lambda: run_side(tree_b, outs[1], args, start)]
            try:
                if args.serial:
                    dumps = [j() for j in jobs]
                else:
                    with ThreadPoolExecutor(2) as pool:
                        dumps = [f.result() for f in [pool.submit(j) for j in jobs]]
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 2
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for name, o in zip(("from", "to"), outs, strict=True):
                    shutil.copy(o, args.keep / f"{name}.json")
        a, b = dumps
        print(f"from: {summary(a)}\nto:   {summary(b)}")
        same = compare(a, b, (f"from {desc_a}", f"to {desc_b}"), args.max_diff_lines)
        print(f"\n{'SAME' if same else 'DIFFERENT'} decisions and audit rows ({time.monotonic() - t0:.0f} s)")
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)


# ---- one side (the child: its syncd is the one on PYTHONPATH) ---------------------------------------

_TS = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Normaliser:
    """Times stamped while the side ran become the phase they belong to; created ids get names."""

    def __init__(self, seeding: datetime, phases: list[datetime]) -> None:
        self.seeding = seeding
        self.phases = phases
        self.ids: dict[str, str] = {}

    def when(self, t: datetime, now: datetime | None) -> str | None:
        t = t if t.tzinfo else t.replace(tzinfo=UTC)
        if now is not None and t == now:
            return "<now>"
        if t < self.seeding:
            return None  # a seeded timestamp: deterministic, kept
        k = sum(1 for p in self.phases if p <= t)
        return "<seeding>" if k == 0 else f"<phase {k - 1}>"

    def text(self, s: str, now: datetime | None) -> str:
        if s in self.ids:
            return self.ids[s]

        def ts(m: re.Match[str]) -> str:
            try:
                t = datetime.fromisoformat(m.group(0).replace("Z", "+00:00"))
            except ValueError:
                return m.group(0)
            return self.when(t, now) or m.group(0)

        return _UUID.sub("<uuid>", _TS.sub(ts, s))

    def __call__(self, v: Any, now: datetime | None = None) -> Any:
        if isinstance(v, str):
            return self.text(v, now)
        if isinstance(v, dict):
            return {self.text(str(k), now): self(x, now) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [self(x, now) for x in v]
        return v


def child(args: argparse.Namespace) -> int:
    import syncd  # from PYTHONPATH: the side's own tree
    import syncd.connectors as connectors
    from syncd.sandbox import Sandbox
    from syncd.sandbox.seed import SeedSpec, seed

    for pkg in (syncd, connectors):
        if not Path(pkg.__file__ or "").resolve().is_relative_to(args.tree.resolve()):
            raise SystemExit(f"{pkg.__name__} imported from {pkg.__file__}, not from {args.tree}")
    work: Path = args.out.parent
    decisions_file = work / "decisions.jsonl"
    seeding = datetime.now(UTC)
    phases: list[datetime] = []
    cycles: list[dict[str, Any]] = []
    with Sandbox(work / "sb") as sb:
        deals = args.deals if args.deals is not None else args.people // 5
        summary = seed(sb.hubspot, sb.salesforce, SeedSpec(seed=args.seed, people=args.people, deals=deals,
                                                           start=datetime.fromisoformat(args.start)))
        db = work / "state.db"
        cfg = sb.write_config(work / "syncd.toml", state_url=f"sqlite:///{db}",
                              mappings_dir=args.tree / "mappings", extra=LOGGING)
        env = {**os.environ, **sb.env(), "SYNCD_DIFF_DECISIONS": str(decisions_file)}
        steps: list[Any] = []
        if not args.no_story:
            from syncd.sandbox.story import DEFAULT_STEPS
            steps = list(DEFAULT_STEPS)
        for phase in range(len(steps) + 1):
            # A pause either side of the boundary: CRM timestamps (ms or s) fall clearly on one side.
            time.sleep(1.1)
            phases.append(datetime.now(UTC))
            time.sleep(1.1)
            if phase > 0:
                steps[phase - 1].apply(sb.hubspot, sb.salesforce, summary)
            cycles.append(_converge(cfg, db, env, phase, args.max_cycles))
        if args.later_hours:
            # Nobody acts, the daemon's clock jumps ahead: the follow-up timers (R9) come due.
            shift = timedelta(hours=args.later_hours)
            time.sleep(1.1)
            phases.append(datetime.now(UTC) + shift)
            env["SYNCD_DIFF_SHIFT_S"] = str(shift.total_seconds())
            cycles.append(_converge(cfg, db, env, len(phases) - 1, args.max_cycles))
    norm = Normaliser(seeding, phases)
    dump = _dump(db, decisions_file, norm)
    dump["cycles"] = cycles
    args.out.write_text(json.dumps(dump, sort_keys=True, indent=1, ensure_ascii=False))
    return 0


def _counts(db: Path) -> tuple[int, int, int, int]:
    with sqlite3.connect(db) as c:
        audit = c.execute("select count(*) from audit").fetchone()[0]
        outbox = c.execute("select count(*) from outbox").fetchone()[0]
        open_ = c.execute("select count(*) from outbox where state not in ('done', 'quarantined')").fetchone()[0]
        events = c.execute("select count(*) from sla_events").fetchone()[0]
    return audit, outbox, open_, events


def _converge(cfg: Path, db: Path, env: dict[str, str], phase: int, max_cycles: int) -> dict[str, Any]:
    """``sync --once`` until a cycle adds no outbox row, audit row or event and nothing is left to send."""
    seen: list[dict[str, Any]] = []
    before = _counts(db) if db.exists() else (0, 0, 0, 0)
    for n in range(max_cycles):
        r = subprocess.run([sys.executable, "-c", HOOK, "--config", str(cfg), "sync", "--once"],
                           env={**env, "SYNCD_DIFF_PHASE": str(phase), "SYNCD_DIFF_CYCLE": str(n)},
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        after = _counts(db)
        seen.append({"exit": r.returncode, **({"error": r.stderr.strip().splitlines()[-1:]} if r.returncode else {})})
        audit, outbox, open_, events = after
        if r.returncode == 0 and (audit, outbox, events) == (before[0], before[1], before[3]) and open_ == 0:
            return {"phase": phase, "cycles": n + 1, "converged": True, "runs": seen}
        before = after
    return {"phase": phase, "cycles": max_cycles, "converged": False, "runs": seen}


def _dump(db: Path, decisions_file: Path, norm: Normaliser) -> dict[str, Any]:
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    try:
        outbox = [dict(r) for r in c.execute("select * from outbox order by id")]
        audit = [dict(r) for r in c.execute("select * from audit order by id")]
        events = [dict(r) for r in c.execute("select * from sla_events order by id")]
        records = [dict(r) for r in c.execute("select system, object, id, kind, entity_id from records")]
    finally:
        c.close()
    # records syncd created: named by what they are for, not by the id the CRM handed out
    created = sorted((r for r in outbox if r["op"] == "create" and r["result_id"]),
                     key=lambda r: (r["system"], r["object"], r["email_norm"] or "", r["rule"]))
    for r in created:
        name = f"new:{r['system']}/{r['object']}:{r['email_norm'] or r['rule']}"
        while name in norm.ids.values():
            name += "'"
        norm.ids[r["result_id"]] = name
    label: dict[str, list[str]] = {}
    for r in records:
        if r["entity_id"] and r["kind"] in ("person", "deal"):
            rid = norm.ids.get(r["id"], r["id"])
            label.setdefault(r["entity_id"], []).append(f"{r['system']}/{r['object']}/{rid}")

    def entity(eid: str | None) -> str | None:
        return " + ".join(sorted(label[eid])) if eid in label else None

    def js(v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v

    out_rows = [norm({
        "entity": entity(r["entity_id"]), "system": r["system"], "object": r["object"],
        "record_id": r["record_id"], "op": r["op"], "rule": r["rule"], "reason": r["reason"],
        "fields": js(r["fields"]), "clear_first": js(r["clear_first"]), "canonical": js(r["canonical"]),
        "state": r["state"], "attempts": r["attempts"], "last_error": r["last_error"],
        "result_id": r["result_id"]}) for r in outbox]
    audit_rows = [norm({
        "entity": entity(r["entity_id"]), "email": r["email_norm"], "system": r["system"],
        "object": r["object"], "record_id": r["record_id"], "field": r["field"],
        "before": js(r["before"]), "after": js(r["after"]), "rule": r["rule"], "reason": r["reason"]})
        for r in audit]
    event_rows = [norm({"entity": entity(r["entity_id"]), "kind": r["kind"], "details": js(r["details"]),
                        "open": bool(r["open"])}) for r in events]
    calls = []
    if decisions_file.exists():
        for line in decisions_file.read_text(encoding="utf-8").splitlines():
            o = json.loads(line)
            now = datetime.fromisoformat(o.pop("now"))
            o["entity"] = " + ".join(sorted(_rename(part, norm.ids) for part in o["entity"].split(" + ")))
            calls.append(norm(o, now))
    if not calls:
        raise SystemExit("no rule calls were recorded: does the daemon still call rules.decide_person?")
    def key(o: Any) -> str:
        return json.dumps(o, sort_keys=True)

    return {
        "decisions": sorted(calls, key=lambda o: (o["phase"], o["cycle"], o["kind"], o["entity"], key(o))),
        "outbox": sorted(out_rows, key=key),
        "audit": sorted(audit_rows, key=key),
        "events": sorted(event_rows, key=key),
    }


def _rename(label: str, ids: dict[str, str]) -> str:
    """``system/object/id`` with a created record's id replaced by its name."""
    head, _, rid = label.rpartition("/")
    return f"{head}/{ids[rid]}" if rid in ids else label


if __name__ == "__main__":
    sys.exit(main())
