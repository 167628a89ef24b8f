"""The README's quick start: two commands, the second is what CI runs, the first's demo works.

The install part of the commands (a fresh venv + pip install) is what ``.ci/run``
does from scratch; here the demo runs from this checkout's venv, as the last part
of the first command does after the install.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYNCD = str(Path(sys.executable).with_name("syncd"))
DEMO_TIMEOUT = 600  # generous: the demo plays a scripted story over about a minute


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)^## ", readme, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section.group(1), re.S)
    assert block, "the quick start has no code block"
    return [
        ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")
    ]


def test_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    cmds = quickstart_commands()
    assert len(cmds) == 2, cmds
    demo, tests = cmds
    assert demo.split("&&")[-1].strip().endswith("syncd demo")
    assert tests.split("&&")[-1].strip().endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [ln.strip() for ln in ci], (
        ".ci/run does not run the README's test command verbatim"
    )


@pytest.mark.slow
def test_demo_narrates_the_story_and_ends_with_the_status_table(tmp_path: Path) -> None:
    demo = quickstart_commands()[0].split("&&")[-1].split()
    assert demo[-1] == "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env["COLUMNS"] = "240"  # one narrated line per write, whatever the test runner's terminal
    p = subprocess.run(
        [SYNCD, *demo[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    out = p.stdout
    lines = out.splitlines()
    story = out[out.index("the story") : out.index("what syncd did")]
    syncd_lines = [ln for ln in story.splitlines() if re.match(r"^\s*[\d.]+s syncd ", ln)]
    # a hand-off: a new Salesforce Lead for an MQL
    assert any("salesforce Lead/" in ln and "R8-handoff" in ln for ln in syncd_lines), story
    # a return: returned – not ready travels back to marketing
    assert any("hubspot contacts/" in ln and "returned_not_ready" in ln for ln in syncd_lines), (
        story
    )
    # a won deal: the person becomes a customer, the HubSpot deal closed won
    assert "Closed Won" in story
    assert any("lifecycle opportunity → customer" in ln for ln in syncd_lines), story
    assert any("hubspot deals/" in ln and "closed_won" in ln for ln in syncd_lines), story
    # ... and the last story step (a deal moved in HubSpot) reaches Salesforce
    assert any("salesforce Opportunity/" in ln and "quote_presented" in ln for ln in syncd_lines), (
        story
    )

    # It ends with the status table: every system/object row, then only the audit hint.
    tail = lines[next(i for i, ln in enumerate(lines) if "what syncd did" in ln) :]
    header = next(
        i for i, ln in enumerate(tail) if "system" in ln and "object" in ln and "records" in ln
    )
    for system, obj in (
        ("hubspot", "contacts"),
        ("hubspot", "deals"),
        ("salesforce", "Lead"),
        ("salesforce", "Contact"),
        ("salesforce", "Opportunity"),
        ("salesforce", "Task"),
    ):
        assert any(system in ln and f" {obj} " in ln for ln in tail[header:]), (system, obj, tail)
    assert tail[-1].startswith("Audit trail:") and "service exit code 0" in tail[-1]
