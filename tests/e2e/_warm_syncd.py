"""``syncd ARGS`` (the console script's entry point, unchanged) with its imports done before it
is told to go: tests/e2e/test_chaos.py restarts ``syncd run`` 25 times, and on busy cores the
Python imports (the CRM clients, SQLAlchemy, APScheduler) would be most of the test's time.

    python tests/e2e/_warm_syncd.py ARGS...   # then one line on stdin starts ``syncd ARGS``
"""

from __future__ import annotations

import sys

import syncd.cli
import syncd.connectors.hubspot
import syncd.connectors.salesforce
import syncd.runtime
import syncd.service  # imported ahead on purpose

if __name__ == "__main__":
    sys.stdin.readline()
    sys.argv = ["syncd", *sys.argv[1:]]
    syncd.cli.main()
