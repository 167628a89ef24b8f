"""Progress of long work (`sync --once`, a first backfill, `resync`): what is pulled, decided, sent.

An engine reports to a :class:`Progress` (see :class:`syncd.resync.ObservedEngine`):

- ``pull(system, obj)`` when it starts pulling an object, ``page(system, obj, n, total)`` per page
  (``total``: how many records the CRM says the pull will read, when the connector's first page
  says so — HubSpot's search ``total``, Salesforce's ``totalSize``; None shows counts only);
- ``stage("decide")`` before linking and deciding, ``stage("write", total)`` before sending, and
  ``written(system)`` per write the CRM confirmed; ``done(stage, summary)`` after a stage.

On a terminal, :class:`LiveProgress` shows a rich progress display on stderr, and while it is up,
log lines are printed above it through the same console (they never land inside it). Off a
terminal, :class:`LogProgress` writes one ``progress`` log line every :data:`EVERY_S` seconds.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import structlog
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

log = structlog.get_logger()

EVERY_S = 10.0  # off a terminal: one progress line this often
STAGES = {"decide": "linking and deciding", "write": "writes sent"}


class Progress:
    """What an engine reports; this base class ignores it (no display)."""

    def pull(self, system: str, obj: str) -> None:
        """``system``/``obj`` starts pulling."""

    def page(self, system: str, obj: str, n: int, total: int | None = None) -> None:
        """A page of ``n`` records of ``system``/``obj`` was stored (``total`` when known)."""

    def stage(self, stage: str, total: int | None = None) -> None:
        """``stage`` ("decide", "write") starts; ``total``: how many items it will handle, if known."""

    def written(self, system: str) -> None:
        """A write to ``system`` was confirmed."""

    def done(self, stage: str, summary: str) -> None:
        """``stage`` finished; ``summary`` says what it did in a few words."""

    def close(self) -> None:
        """The work is over (the display goes)."""


class _Counts:
    """Per system/object pulled (and total), the stage, writes sent: shared by both displays."""

    def __init__(self) -> None:
        self.pulled: dict[str, int] = {}
        self.totals: dict[str, int | None] = {}
        self.stage_name: str = "pull"
        self.sent = 0
        self.write_total: int | None = None
        self.lock = threading.Lock()

    def add(self, key: str, n: int, total: int | None) -> None:
        with self.lock:
            self.pulled[key] = self.pulled.get(key, 0) + n
            if total is not None and self.totals.get(key) is None:
                self.totals[key] = total

    def line(self) -> dict[str, Any]:
        with self.lock:
            pulled = {k: (f"{n}/{self.totals[k]}" if self.totals.get(k) is not None else str(n))
                      for k, n in self.pulled.items()}
            sent = f"{self.sent}/{self.write_total}" if self.write_total is not None else str(self.sent)
            return {"stage": STAGES.get(self.stage_name, "pulling"), "pulled": pulled, "writes_sent": sent}


class LogProgress(Progress):
    """Off a terminal: one ``progress`` log line every ``every_s`` seconds while work goes on."""

    def __init__(self, every_s: float = EVERY_S, what: str = "cycle") -> None:
        self.counts = _Counts()
        self.every_s = every_s
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="syncd-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info("progress", work=self.what, **self.counts.line())

    def page(self, system: str, obj: str, n: int, total: int | None = None) -> None:
        self.counts.add(f"{system}.{obj}", n, total)

    def stage(self, stage: str, total: int | None = None) -> None:
        self.counts.stage_name = stage
        if stage == "write":
            self.counts.write_total = total

    def written(self, system: str) -> None:
        with self.counts.lock:
            self.counts.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class LiveProgress(Progress):
    """On a terminal: a rich progress display, one row per system/object, then the stages."""

    def __init__(self, console: Console, title: str = "sync") -> None:
        self.console = console
        self.title = title
        self.counts = _Counts()
        self.bar = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def start(self) -> LiveProgress:
        self.console.print(Text(self.title, style="bold"))
        self.bar.start()
        return self

    def _task(self, key: str, description: str) -> TaskID:
        with self._lock:
            if key not in self.tasks:
                self.tasks[key] = self.bar.add_task(description, total=None, count="…")
            return self.tasks[key]

    def pull(self, system: str, obj: str) -> None:
        self._task(f"{system}.{obj}", f"{system} {obj}")

    def page(self, system: str, obj: str, n: int, total: int | None = None) -> None:
        key = f"{system}.{obj}"
        self.counts.add(key, n, total)
        task = self._task(key, f"{system} {obj}")
        done, of = self.counts.pulled[key], self.counts.totals.get(key)
        shown = f"{done:,} of {of:,} records" if of is not None else f"{done:,} records (total not known)"
        self.bar.update(task, completed=done, total=max(of, done) if of is not None else None, count=shown)

    def stage(self, stage: str, total: int | None = None) -> None:
        self._finish_pulls()
        self.counts.stage_name = stage
        task = self._task(stage, STAGES.get(stage, stage))
        if stage == "write":
            self.counts.write_total = total
            self.bar.update(task, total=total or None, completed=0,
                            count=f"0 of {total:,}" if total else "0")

    def _finish_pulls(self) -> None:
        for key, task in list(self.tasks.items()):
            if "." in key:  # a pull: it is over once a later stage starts
                n, of = self.counts.pulled.get(key, 0), self.counts.totals.get(key)
                shown = f"{n:,} of {of:,} records" if of is not None else f"{n:,} records"
                self.bar.update(task, total=max(n, 1), completed=max(n, 1), count=shown)

    def written(self, system: str) -> None:
        with self.counts.lock:
            self.counts.sent += 1
            sent, total = self.counts.sent, self.counts.write_total
        task = self._task("write", STAGES["write"])
        self.bar.update(task, completed=sent, count=f"{sent:,} of {total:,}" if total else f"{sent:,}")

    def done(self, stage: str, summary: str) -> None:
        task = self._task(stage, STAGES.get(stage, stage))
        self.bar.update(task, total=1, completed=1, count=summary)

    def close(self) -> None:
        self._finish_pulls()
        self.bar.stop()


@contextmanager
def logs_through(console: Console) -> Iterator[None]:
    """While inside: structlog writes through ``console`` (above a live display, never into it)."""
    cfg = structlog.get_config()
    old = cfg["logger_factory"]
    stream: IO[str] = getattr(old, "_file", None) or sys.stderr  # PrintLoggerFactory's stream
    proxy: Any = FileProxy(console, stream)  # a text file that prints above the live display
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(proxy))
    try:
        yield
    finally:
        structlog.configure(logger_factory=old)


@contextmanager
def progress_for(title: str = "sync", *, stream: IO[str] | None = None,
                 every_s: float = EVERY_S) -> Iterator[Progress]:
    """The display that fits ``stream`` (default stderr): live on a terminal, log lines off it."""
    stream = stream or sys.stderr
    shown: Progress
    if stream.isatty():
        console = Console(file=stream, soft_wrap=True)  # a log line is never broken (JSON stays one line)
        live = LiveProgress(console, title)
        with logs_through(console):
            live.start()
            try:
                yield live
            finally:
                live.close()
        return
    shown = LogProgress(every_s, title)
    try:
        yield shown
    finally:
        shown.close()
