"""The JSON schemas docs/json.md documents, and a check of a command's output against its own."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

DOC = Path(__file__).resolve().parents[2] / "docs" / "json.md"
BLOCK = re.compile(r"```json schema=([a-z ]+)\n(.*?)```", re.S)


@cache
def schemas() -> dict[str, dict[str, Any]]:
    """The schemas docs/json.md documents, by command (``defs`` shared by all)."""
    blocks = {name: json.loads(text) for name, text in BLOCK.findall(DOC.read_text())}
    defs = blocks.pop("defs")
    return {name: {**schema, "$defs": defs} for name, schema in blocks.items()}


def documented(name: str, stdout: str) -> Any:
    """The command's JSON, checked against its documented schema (exact keys, types, ISO times)."""
    data = json.loads(stdout)
    schema = schemas()[name]
    Draft202012Validator.check_schema(schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    return data
