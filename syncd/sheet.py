"""Operator tables that never split a token (ids, terms, emails, times): a :class:`Sheet` is
printed as a rich table when it fits the console whole, else as one short card per row; free text
wraps between words. Off a terminal, tables are laid out :data:`WIDE` columns wide (or
``$COLUMNS``), not 80. Every command's table goes through it (status, audit, tombstones, review,
reconcile, plans, prune).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

WIDE = 200  # off a terminal: the width tables are laid out in


def stdout_console() -> Console:
    """The console the operator's tables go to: a terminal's width, else ``COLUMNS`` or :data:`WIDE`."""
    if sys.stdout.isatty():
        return Console(soft_wrap=False)
    columns = os.environ.get("COLUMNS", "")
    return Console(soft_wrap=False, width=int(columns) if columns.isdigit() and int(columns) > 0 else WIDE)


class Sheet:
    """A table of tokens and prose. Printed as a rich table when it fits the console whole (every
    token on one line, every word of prose unbroken); on a narrower console, each row as a short
    card of ``column: value`` lines, so that nothing is ever split mid-token."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.columns: list[tuple[str, str, dict[str, Any]]] = []  # (name, "token" | "prose", options)
        self.rows: list[tuple[str, ...]] = []

    def add_row(self, *cells: str) -> None:
        self.rows.append(tuple(cells))

    def table(self) -> Table:
        t = Table(title=self.title, title_justify="left")
        for name, kind, kw in self.columns:
            if kind == "token":
                t.add_column(name, no_wrap=True, overflow="ellipsis", **kw)
            else:
                t.add_column(name, overflow="ellipsis", ratio=1, **kw)
        for row in self.rows:
            t.add_row(*(Text(c) for c in row))  # cells are data, never markup ("[sync]" stays as it is)
        return t

    def needs(self) -> int:
        """The narrowest the table can be with every token whole and every word of prose unbroken."""
        widths = []
        for i, (name, kind, _) in enumerate(self.columns):
            cells = [row[i] for row in self.rows if i < len(row)]
            if kind == "token":
                widths.append(max([cell_len(name), *(cell_len(c) for c in cells)]))
            else:
                words = [w for c in [name, *cells] for w in c.split()]
                widths.append(max([1, *(cell_len(w) for w in words)]))
        return sum(widths) + 3 * len(widths) + 1  # "│ " before each cell, " " after, "│" at the end

    def print(self, console: Console) -> None:
        need = self.needs()
        if need <= console.width:
            console.print(self.table())
            return
        if not console.is_terminal and console.width >= WIDE:  # a file or a pipe: as wide as it takes
            console.print(self.table(), width=need)
            return
        console.print(Text(self.title, overflow="ellipsis"))
        for row in self.rows:
            self._card(console, row)

    def _card(self, console: Console, row: tuple[str, ...]) -> None:
        """One row on a narrow console: its first cells as a heading, then ``column value`` pairs
        packed into lines (a pair is never broken), then each prose cell wrapped between words."""
        cells = list(zip(self.columns, row, strict=False))
        lead = [v for (_, kind, _), v in cells[:2] if kind == "token" and v]
        pairs = [f"{name} {v}" for (name, kind, _), v in cells[len(lead):] if kind == "token" and v]
        console.print(Text("• " + " ".join(lead), no_wrap=True, overflow="ellipsis"))
        line = ""
        for pair in pairs:
            if line and cell_len(line) + 2 + cell_len(pair) > console.width - 4:
                console.print(Text("    " + line, no_wrap=True, overflow="ellipsis"))
                line = ""
            line = f"{line}, {pair}" if line else pair
        if line:
            console.print(Text("    " + line, no_wrap=True, overflow="ellipsis"))
        for (name, kind, _), v in cells:
            if kind == "prose" and v:
                console.print(Padding(Text(f"{name}: {v}", overflow="ellipsis"), (0, 0, 0, 4), expand=False))


def token(table: Sheet, name: str, **kw: Any) -> None:
    """A column of tokens (ids, terms, emails, times): never folded; shortened with … if it must be."""
    table.columns.append((name, "token", kw))


def prose(table: Sheet, name: str, **kw: Any) -> None:
    """A column of free text: wraps between words; a word too long for it is shortened with …."""
    table.columns.append((name, "prose", kw))


def say(console: Console, text: str, style: str = "") -> None:
    """A line of text (no markup): wrapped between words, a word too long for the console shortened with …."""
    console.print(Text(text, style=style, overflow="ellipsis"))
