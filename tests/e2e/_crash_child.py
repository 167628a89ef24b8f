"""The process tests/e2e/test_crash.py kills: sync cycles back to back on one config.

    python tests/e2e/_crash_child.py CONFIG [--until-quiet] [--report-writes]

Prints ``ready`` once the runtime is open (imports and config done, so a kill
after it lands inside real work), then one JSON line per cycle (its summary and ``elapsed_s``). Loops
until killed; with ``--until-quiet`` it exits 0 after the first cycle that
changed, sent and failed nothing. With ``--report-writes`` it prints ``write``
each time the CRM accepted a write, before the outbox commit marks it done (so
the parent can kill it at exactly that point).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

from syncd import logs
from syncd.config import load_config
from syncd.engine import Engine
from syncd.runtime import open_runtime
from syncd.store import OutboxRow


def main(argv: list[str]) -> int:
    config, until_quiet = Path(argv[0]), "--until-quiet" in argv[1:]
    logs.configure(level="warning", fmt="json")
    rt = open_runtime(load_config(config))

    def report(row: OutboxRow, result_id: str | None) -> None:
        print("write", flush=True)

    engine = Engine(
        rt.store,
        rt.mappings,
        rt.sla,
        rt.connectors,
        overlap=timedelta(seconds=rt.config.sync.overlap_s),
        write_batch=rt.config.sync.write_batch,
        on_write=report if "--report-writes" in argv[1:] else None,
    )
    print("ready", flush=True)
    try:
        for _ in range(1000):
            t0 = time.monotonic()
            st = engine.cycle().summary()
            print(json.dumps({**st, "elapsed_s": time.monotonic() - t0}), flush=True)
            if until_quiet and st["changed"] == st["sent"] == st["failed"] == 0:
                return 0
    finally:
        rt.close()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
