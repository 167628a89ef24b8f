"""The `syncd` command as a user runs it: a subprocess, its exit code, its stdout and stderr.

Exit codes are the design's contract: 0 ok, 1 a failure during work, 2 bad usage,
bad config or bad mapping files, each with one clear line on stderr.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncd.mapping import default_mappings_dir
from syncd.sandbox import HUBSPOT_TOKEN, SALESFORCE_SESSION, TOKEN_ENV, Sandbox
from syncd.sandbox.seed import SeedSpec, SeedSummary, seed

SYNCD = str(Path(sys.executable).with_name("syncd"))
TIMEOUT = 180  # a generous deadline, never a performance assertion


def syncd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYNCD, *args],
        env=env or dict(os.environ),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("syncd: error:")]


def assert_one_clear_line(p: subprocess.CompletedProcess[str], code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p)
    return line


# -- bad config ---------------------------------------------------------------------------------


def test_unknown_config_key_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text('[state]\nurl = "sqlite:///s.db"\n\n[sync]\noverlap_s = 60\nbogus_key = 1\n')
    line = assert_one_clear_line(syncd("--config", str(cfg), "sync", "--once"), 2)
    assert f"{cfg}:6" in line or "syncd.toml:6" in line
    assert "sync.bogus_key" in line and "unknown" in line


def test_wrong_config_type_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text('[sync]\n# how far back each pull re-reads\noverlap_s = "two minutes"\n')
    line = assert_one_clear_line(syncd("--config", str(cfg), "status"), 2)
    assert "syncd.toml:3" in line and "sync.overlap_s" in line and "number" in line


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    line = assert_one_clear_line(syncd("--config", str(missing), "sync", "--once"), 2)
    assert "nowhere.toml" in line and "not found" in line
    # SYNCD_CONFIG is the same contract
    env = {**os.environ, "SYNCD_CONFIG": str(missing)}
    line = assert_one_clear_line(syncd("status", env=env), 2)
    assert "nowhere.toml" in line


# -- against the sandbox ------------------------------------------------------------------------


@dataclass
class World:
    sb: Sandbox
    summary: SeedSummary
    config: Path
    env: dict[str, str]

    def syncd(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return syncd("--config", str(self.config), *args, env=env or self.env)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with Sandbox(tmp_path / "sandbox") as sb:
        summary = seed(
            sb.hubspot, sb.salesforce, SeedSpec(seed=5, people=60, deals=12, duplicates=1)
        )
        (tmp_path / "state").mkdir()
        cfg = sb.write_config(
            tmp_path / "syncd.toml",
            state_url=f"sqlite:///{tmp_path / 'state' / 'syncd.db'}",
            extra="\n[sync]\nretry_cap_s = 1\n",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        yield World(sb, summary, cfg, {**env, **sb.env()})


def test_bad_mapping_file_exits_2_with_file_and_line(world: World, tmp_path: Path) -> None:
    mdir = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), mdir)
    path = mdir / "hubspot.toml"
    lines = path.read_text().splitlines()
    n = lines.index('mql = ["marketingqualifiedlead"]') + 1
    lines[n - 1] = 'mystery_stage = ["marketingqualifiedlead"]'
    path.write_text("\n".join(lines) + "\n")
    with world.config.open("a") as f:
        f.write(f'\n[mappings]\ndir = "{mdir}"\n')
    p = world.syncd("sync", "--once")
    line = assert_one_clear_line(p, 2)
    assert f"hubspot.toml:{n}" in line and "mystery_stage" in line
    assert world.sb.hubspot_server.request_count() == 0  # fail closed: no API call was made


def test_bad_credentials_exit_1_with_one_clear_line_and_no_secret(world: World) -> None:
    wrong = "wrong-token-4f9a"
    p = world.syncd("sync", "--once", env={**world.env, TOKEN_ENV: wrong})
    line = assert_one_clear_line(p, 1)
    assert "hubspot" in line and "401" in line and "auth" in line.lower()
    assert wrong not in p.stderr + p.stdout
    assert HUBSPOT_TOKEN not in p.stderr + p.stdout


def test_missing_credential_env_exits_2_naming_the_variable(world: World) -> None:
    env = {k: v for k, v in world.env.items() if k != TOKEN_ENV}
    line = assert_one_clear_line(world.syncd("sync", "--once", env=env), 2)
    assert TOKEN_ENV in line


def test_sync_once_then_status_shows_cursors_and_counts(world: World) -> None:
    p = world.syncd("sync", "--once")
    assert p.returncode == 0, p.stderr
    assert "pulled=" in p.stdout

    p = world.syncd("status", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    objects = {(o["system"], o["object"]): o for o in data["objects"]}
    expected_counts = {
        ("hubspot", "contacts"): len(world.sb.hubspot.all("contacts")),
        ("hubspot", "deals"): len(world.sb.hubspot.all("deals")),
        **{
            ("salesforce", o): len(world.sb.salesforce.all(o))
            for o in ("Contact", "Opportunity", "Task")
        },
    }
    for key, n in expected_counts.items():
        assert objects[key]["records"] == n, key
        assert objects[key]["cursor"] is not None, key
    # the Leads syncd created in this cycle (hand-offs) are pulled by the next one
    assert objects[("salesforce", "Lead")]["records"] == world.summary.counts["salesforce.leads"]
    assert data["link_conflicts"] == 1
    assert data["runs"][0]["status"] == "ok"
    # API usage of the last run, per system, as the simulators counted it (Salesforce also
    # reports its budget in Sforce-Limit-Info)
    usage = data["api_usage"]
    assert usage["hubspot"]["calls"] == world.sb.hubspot_server.request_count()
    assert usage["salesforce"]["calls"] == world.sb.salesforce_server.request_count()
    assert usage["salesforce"]["reported_limit"] == world.sb.salesforce.daily_budget

    p = world.syncd("status")
    assert p.returncode == 0, p.stderr
    for (system, obj), o in objects.items():
        row = next((ln for ln in p.stdout.splitlines() if system in ln and f" {obj} " in ln), None)
        assert row is not None, f"no status row for {system} {obj}:\n{p.stdout}"
        assert re.search(rf"\b{o['records']}\b", row), row


def test_logs_hold_no_raw_email_and_no_secret_at_info(world: World) -> None:
    # a 429 and a 503 make the connectors log retries too
    world.sb.hubspot_server.inject(
        "rate_limit", count=2, endpoint="contacts.search", retry_after=0.1
    )
    world.sb.salesforce_server.inject("server_error", count=1, endpoint="query", status=503)
    p = world.syncd("--log-format", "json", "sync", "--once")
    assert p.returncode == 0, p.stderr
    logs = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith("{")]
    assert any(e.get("event") == "cycle" for e in logs)  # info lines are there to look at
    assert any(e.get("level") == "warning" for e in logs)  # so are the retries / conflict
    text = p.stderr + p.stdout
    emails = {r["email"] for r in world.sb.hubspot.all("contacts")}
    emails |= {r["Email"].strip() for r in world.sb.salesforce.all("Lead") if r["Email"]}
    leaked = sorted(e for e in emails if e.lower() in text.lower())
    assert leaked == []
    assert HUBSPOT_TOKEN not in text and SALESFORCE_SESSION not in text


# -- mappings check -----------------------------------------------------------------------------


def test_mappings_check_default_files_exit_0() -> None:
    p = syncd("mappings", "check", str(default_mappings_dir()))
    assert p.returncode == 0, p.stdout + p.stderr


def test_mappings_check_broken_copy_exit_1_with_file_line_col(tmp_path: Path) -> None:
    mdir = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), mdir)
    path = mdir / "salesforce.toml"
    text = path.read_text()
    lines = text.splitlines()
    # point a Salesforce value at a term the glossary does not have
    n = next(i for i, ln in enumerate(lines, 1) if re.match(r"^mql = \[", ln))
    lines[n - 1] = lines[n - 1].replace("mql", "not_a_term", 1)
    path.write_text("\n".join(lines) + "\n")
    p = syncd("mappings", "check", str(mdir))
    assert p.returncode == 1, p.stdout + p.stderr
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if "error" in ln]
    assert errors
    assert all(re.match(r"^\S+\.toml:\d+:\d+: ", ln) for ln in errors), errors
    assert any(ln.startswith(f"{path}:{n}:") or f"salesforce.toml:{n}:" in ln for ln in errors), (
        errors
    )


def test_mappings_check_missing_dir_exit_2(tmp_path: Path) -> None:
    p = syncd("mappings", "check", str(tmp_path / "no-such-dir"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no-such-dir" in p.stdout + p.stderr


# -- sandbox serve ------------------------------------------------------------------------------


def test_sandbox_serve_prints_urls_token_and_ca_then_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            SYNCD,
            "sandbox",
            "serve",
            "--seed",
            "1",
            "--people",
            "5000",
            "--dir",
            str(tmp_path / "sb"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.put(ln.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: dict[str, str] = {}
    try:
        while not {"hubspot", "salesforce", "ca", "seeded"} <= seen.keys():
            ln = lines.get(timeout=TIMEOUT)
            assert ln is not None, f"sandbox serve exited early: {proc.wait()} {proc.stderr}"
            for key, pat in (
                ("hubspot", r"^HubSpot sandbox\s+(https://127\.0\.0\.1:\d+)"),
                ("salesforce", r"^Salesforce sandbox\s+(https://127\.0\.0\.1:\d+)"),
                ("ca", r"^CA bundle\s+(\S+)"),
                ("seeded", r"^Seeded\s+(.*)"),
            ):
                m = re.match(pat, ln)
                if m:
                    seen[key] = m.group(1)
        assert "5000 HubSpot contacts" in seen["seeded"]
        # what it printed works: the CA verifies the server, the token is accepted
        ctx = ssl.create_default_context(cafile=seen["ca"])
        req = urllib.request.Request(
            f"{seen['hubspot']}/crm/v3/objects/contacts?limit=1",
            headers={"Authorization": f"Bearer {HUBSPOT_TOKEN}"},
        )
        with urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx), urllib.request.ProxyHandler({})
        ).open(req, timeout=30) as r:
            assert r.status == 200
            assert json.loads(r.read())["results"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0


def test_mappings_check_live_compares_with_what_the_crms_allow(world: World, tmp_path: Path) -> None:
    """--live asks the CRMs (HubSpot properties API, Salesforce describe) for their values."""
    p = world.syncd("mappings", "check", "--live", str(default_mappings_dir()))
    assert p.returncode == 0, p.stdout + p.stderr  # the default files match the sandbox exactly

    mdir = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), mdir)
    path = mdir / "hubspot.toml"
    text = path.read_text()
    # a value the CRM does not have, and a CRM value (CONNECTED) the mappings no longer name
    text = text.replace('connected = ["CONNECTED"]', 'connected = ["TALKED_TO"]', 1)
    path.write_text(text)
    p = world.syncd("mappings", "check", "--live", "--format", "json", str(mdir))
    problems = json.loads(p.stdout)
    messages = " | ".join(str(x.get("message")) for x in problems)
    assert "TALKED_TO" in messages, messages
    assert "CONNECTED" in messages, messages
    assert all(str(x.get("file", "")).endswith(".toml") for x in problems if x.get("severity") == "error")
