"""Deleting records one by one (``[deletions] other_side = "propagate"``), for both connectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from syncd.errors import RetriableError
from syncd.model import WriteResult


def delete_each(targets: Sequence[tuple[str, str]], send: Callable[[str], object], *,
                refused: tuple[type[Exception], ...], gone: Callable[[str], bool]) -> list[WriteResult]:
    """``send(id)`` for each (key, id): a transient failure is a retriable result; a refusal
    (``refused``) a failed one, unless ``gone`` says the record was deleted already (done)."""
    out: list[WriteResult] = []
    for key, rid in targets:
        try:
            send(rid)
        except RetriableError as e:
            out.append(WriteResult(key, False, rid, str(e), retriable=True))
            continue
        except refused as e:
            if not gone(str(e)):
                out.append(WriteResult(key, False, rid, str(e)))
                continue
        out.append(WriteResult(key, True, rid))
    return out
