"""``syncd mappings check --live`` says whether the Salesforce org has the External ID field the
mappings declare for idempotent creates ([Lead] external_id), against the sandbox (describe)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from syncd.mapping import default_mappings_dir
from syncd.sandbox import Sandbox

SYNCD = str(Path(sys.executable).with_name("syncd"))
DECLARED = 'external_id = "Syncd_Key__c"'


def _check(sb: Sandbox, tmp: Path, replacement: str | None) -> tuple[int, list[dict[str, Any]]]:
    mdir = tmp / "mappings"
    shutil.copytree(default_mappings_dir(), mdir, dirs_exist_ok=True)
    sf = mdir / "salesforce.toml"
    text = (default_mappings_dir() / "salesforce.toml").read_text()
    assert DECLARED in text
    sf.write_text(text if replacement is None else text.replace(DECLARED, replacement))
    cfg = sb.write_config(tmp / "syncd.toml", state_url=f"sqlite:///{tmp / 'state.db'}")
    p = subprocess.run([SYNCD, "--config", str(cfg), "mappings", "check", "--live", "--format", "json", str(mdir)],
                       env={**os.environ, **sb.env()}, capture_output=True, text=True, timeout=120)
    return p.returncode, json.loads(p.stdout or "[]")


def test_live_check_reports_a_missing_external_id_field_and_a_mapping_without_one(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sb") as sb:
        code, problems = _check(sb, tmp_path, None)
        assert (code, [p for p in problems if "external" in p["code"]]) == (0, [])  # the sandbox has it

        code, problems = _check(sb, tmp_path, 'external_id = "Nope__c"')
        (missing,) = [p for p in problems if p["code"] == "live-external-id-missing"]
        assert code == 1 and missing["severity"] == "error"
        assert missing["file"].endswith("salesforce.toml") and "Lead.Nope__c" in missing["message"]
        assert "weaker" in missing["message"]

        code, problems = _check(sb, tmp_path, "")
        (none,) = [p for p in problems if p["code"] == "live-external-id-none"]
        assert code == 0 and none["severity"] == "warning" and "weaker" in none["message"]
