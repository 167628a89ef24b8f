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

        code, problems = _check(sb, tmp_path, 'external_id = "Return_Reason__c"')  # a plain text field
        (plain,) = [p for p in problems if "external" in p["code"]]
        assert (code, plain["code"]) == (1, "live-external-id-not-external"), problems
        assert "Lead.Return_Reason__c: not an External ID field" in plain["message"]

        sb.salesforce.deny_field("Lead", "Syncd_Key__c")  # field-level security: this user cannot set it
        code, problems = _check(sb, tmp_path, None)
        (denied,) = [p for p in problems if "external" in p["code"]]
        assert (code, denied["code"]) == (1, "live-external-id-not-createable"), problems


def _auth_check(sb: Sandbox, tmp: Path, replacement: str | None) -> tuple[int, list[str], dict[str, Any]]:
    mdir = tmp / "auth-mappings"
    shutil.copytree(default_mappings_dir(), mdir, dirs_exist_ok=True)
    text = (default_mappings_dir() / "salesforce.toml").read_text()
    (mdir / "salesforce.toml").write_text(text if replacement is None else text.replace(DECLARED, replacement))
    cfg = sb.write_config(tmp / "auth.toml", state_url=f"sqlite:///{tmp / 'state.db'}", mappings_dir=mdir,
                          salesforce_auth="jwt")
    run = [SYNCD, "--config", str(cfg), "auth", "check"]
    p = subprocess.run(run, env={**os.environ, **sb.env()}, capture_output=True, text=True, timeout=120)
    j = subprocess.run([*run, "--json"], env={**os.environ, **sb.env()}, capture_output=True, text=True, timeout=120)
    assert j.returncode == p.returncode, j.stderr
    return p.returncode, p.stdout.splitlines(), json.loads(j.stdout)


def test_auth_check_names_the_external_id_when_missing_not_one_or_not_createable_for_this_user(
        tmp_path: Path) -> None:
    """The same check as `mappings check --live` (mapping_check.check_external_ids), from the describe
    `auth check` reads as the user syncd runs as; one line naming the field and the mapping file."""
    with Sandbox(tmp_path / "sb") as sb:
        code, out, doc = _auth_check(sb, tmp_path, None)
        assert code == 0 and out[-1] == "ok: syncd can do its whole job", out

        code, out, doc = _auth_check(sb, tmp_path, 'external_id = "Nope__c"')
        (line,) = [x for x in out if "Nope__c" in x]
        assert code == 1 and line.startswith("salesforce: Lead.Nope__c: no such External ID field in the CRM")
        assert "salesforce.toml:" in line and str(tmp_path / "auth-mappings") in line
        assert doc["ok"] is False and doc["systems"]["salesforce"]["missing"] == [line]

        code, out, _ = _auth_check(sb, tmp_path, 'external_id = "Return_Reason__c"')  # a plain text field
        (line,) = [x for x in out if "Return_Reason__c" in x]
        assert code == 1 and line.startswith("salesforce: Lead.Return_Reason__c: not an External ID field")

        sb.salesforce.deny_field("Lead", "Syncd_Key__c")  # the field-level security of this user: read only
        code, out, doc = _auth_check(sb, tmp_path, None)
        (line,) = [x for x in out if "Syncd_Key__c" in x]
        assert code == 1 and line.startswith(
            "salesforce: Lead.Syncd_Key__c: the External ID is not createable for this user")
        assert out[-1] == "1 missing: syncd cannot do its whole job"

        code, _, _ = _auth_check(sb, tmp_path, "")  # none declared: weaker, but syncd does its job
        assert code == 0
