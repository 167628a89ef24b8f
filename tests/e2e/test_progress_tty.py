"""`syncd sync --once` on a terminal (a pty, through pexpect): a live progress display per system and
object with the CRM's totals, then linking/deciding and writes; log lines above it, never inside it.
Off a terminal: no display, and the usual summary line."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_MOVE = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b\][^\x07]*\x07")


def _screen_lines(raw: str) -> list[str]:
    """What a terminal shows line by line, roughly: escapes dropped, a carriage return starts over."""
    out = []
    for line in _MOVE.sub("\n", _COLOUR.sub("", raw)).split("\n"):
        out.extend(p for p in line.split("\r") if p.strip())
    return out


def _on_a_terminal(sb: Sandbox, cfg: Path, *args: str) -> list[str]:
    """``syncd ARGS`` on a 120×40 pty; what the terminal showed, line by line (it must exit 0)."""
    env = {**os.environ, **sb.env(), "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "syncd", "--config", str(cfg), *args],
                          env=env, encoding="utf-8", timeout=240, dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    raw = child.before or ""
    assert child.exitstatus == 0, raw[-2000:]
    return _screen_lines(raw)


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Sandbox, Path]:
    sb = Sandbox(tmp_path / "sandbox").start()
    seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=150, deals=30))
    cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                          extra='[logging]\nlevel = "info"\nformat = "console"\n')
    yield sb, cfg
    sb.stop()


def test_sync_once_on_a_terminal_shows_progress_and_logs_stay_outside_it(seeded: tuple[Sandbox, Path]) -> None:
    lines = _on_a_terminal(*seeded, "sync", "--once")
    progress = [ln for ln in lines if " records" in ln and ("hubspot" in ln or "salesforce" in ln)]
    # per system and object, records pulled of the CRM's total
    assert any(re.search(r"hubspot contacts .*\d+ of \d+ records", ln) for ln in progress), lines[-40:]
    assert any(re.search(r"salesforce Lead .*\d+ of \d+ records", ln) for ln in progress), lines[-40:]
    assert any("linking and deciding" in ln for ln in lines)
    assert any("writes sent" in ln for ln in lines)
    # the connector logs a line per Salesforce pull while the display is up: printed on its own line
    logged = [ln for ln in lines if "salesforce.pulled" in ln]
    assert logged, lines[-40:]
    for ln in logged:
        assert " records " not in ln.split("salesforce.pulled")[0] and "━" not in ln, ln
    assert any(re.match(r"pulled=\d+ changed=\d+", ln.strip()) for ln in lines)


def test_sync_once_off_a_terminal_prints_no_display(seeded: tuple[Sandbox, Path]) -> None:
    import subprocess

    sb, cfg = seeded
    r = subprocess.run([sys.executable, "-m", "syncd", "--config", str(cfg), "sync", "--once"],
                       env={**os.environ, **sb.env()}, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "━" not in r.stdout + r.stderr and "linking and deciding" not in r.stderr
    assert r.stdout.startswith("pulled=")


def test_resync_inline_on_a_terminal_shows_its_progress_with_a_title(seeded: tuple[Sandbox, Path]) -> None:
    lines = _on_a_terminal(*seeded, "resync", "--inline", "--full")
    assert any(ln.strip() == "resync all objects, full" for ln in lines), lines[:10]
    assert any(re.search(r"salesforce Opportunity .*\d+ of \d+ records", ln) for ln in lines)
    assert any(ln.strip().startswith("resync done (all objects, full)") for ln in lines)
