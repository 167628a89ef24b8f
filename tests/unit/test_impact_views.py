"""`syncd mappings impact` sees exactly what the rules see: the engine's own views, including the
pending-writes overlay (a value one of syncd's outbox rows is about to write is not news)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from syncd.engine import CycleStats, Engine
from syncd.impact import impact
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.model import RawRecord
from syncd.sla import load_sla
from syncd.store import Store

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


def _repo(tmp: Path) -> Path:
    root = tmp / "repo"
    shutil.copytree(default_mappings_dir(), root / "mappings")
    who = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "mappings"]):
        subprocess.run(["git", "-C", str(root), *who, *args], check=True, capture_output=True)
    return root / "mappings"


def _rules(result: dict) -> dict[tuple[str, str], int]:
    return {(r["rule"], r["action"]): r["count"] for r in result["rules"]}


def test_impact_counts_no_write_that_syncd_already_has_pending(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    try:
        mdir = _repo(tmp_path)
        eng = Engine(store, load_mappings(mdir), load_sla(mdir), {}, clock=lambda: NOW, require_pulls=False)
        stats = CycleStats()
        contact = {"hs_object_id": "1", "email": "ann.lee@example.com", "firstname": "Ann", "lastname": "Lee",
                   "lifecyclestage": "lead", "hubspotscore": "80", "hs_lead_status": "OPEN",
                   "lastmodifieddate": T0.isoformat()}
        lead = {"Id": "00Q000000000001", "Email": "ann.lee@example.com", "FirstName": "Ann", "LastName": "Lee",
                "Company": "Acme", "Status": "Open - Not Contacted", "IsConverted": False,
                "LastModifiedDate": T0.isoformat()}
        eng.ingest("hubspot", "contacts", [RawRecord("hubspot", "contacts", "1", T0, contact)], stats)
        eng.ingest("salesforce", "Lead", [RawRecord("salesforce", "Lead", lead["Id"], T0, lead)], stats)
        eng.link_and_decide(stats)  # decided; the writes wait in the outbox (nothing sent)
        with store.tx() as tx:
            pending = [w for ws in tx.open_writes([e for e in {r.entity_id for r in tx.iter_records()} if e]).values()
                       for w in ws]
        assert any(w.rule == "R4-lead-score" for w in pending), pending

        # a mapping change under review that touches this person: impact decides them again
        hs = mdir / "hubspot.toml"
        text = hs.read_text()
        old = 'new = ["NEW", "OPEN"]\nattempting = ["ATTEMPTED_TO_CONTACT", "IN_PROGRESS"]'
        assert old in text
        hs.write_text(text.replace(old, 'new = ["NEW"]\nattempting = ["ATTEMPTED_TO_CONTACT", "IN_PROGRESS", "OPEN"]'))
        result = impact(store, mdir, "HEAD", None, now=NOW)
        assert result["people_affected"] == 1
        # what the engine would do now: the MQL writes are pending already, so not decided again
        rules = _rules(result)
        assert rules.get(("R4-lead-score", "set"), 0) == 0, result["rules"]
    finally:
        store.close()
