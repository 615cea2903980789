"""Printing a table for a person without cutting a name or a number.

Every table ftlab prints (``ftlab compare``, the end-of-sweep comparison, ``ftlab methods`` and
``--sizes``, the per-class table of ``ftlab eval``) is markdown text first: pipe tables with prose around them, the same text a sweep writes to
``comparison.md``. rich's renderers squeeze columns into the console width and cut cells with "…"
(``Markdown`` does so for every table; a ``Table`` does so for a column that does not wrap), and
when stdout is a file or a CI log rich still assumes 80 columns, so ``ftlab compare DIR >
report.txt`` used to hold ``meth…`` and ``6.91…``. Here the choice is made once, for all of them:

- stdout is a terminal and every table fits its width (each column as wide as its longest word):
  a rich table whose cells wrap at spaces or fold onto the next line, never "…";
- otherwise (redirected, piped, captured, or a table wider than the terminal): the markdown text
  itself, unchanged, to paste or grep; the terminal wraps its long lines, losing nothing.

The prose lines are printed as they are in both cases. A cell's line breaks are written ``<br>``
in the markdown (``pipe_table`` does it) and become lines of the rich cell.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["pipe_table", "print_markdown", "parse_blocks"]

_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def pipe_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown pipe table of ``rows`` under ``header`` (``|`` escaped, line breaks as ``<br>``)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]) + "\n"


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner[1:]
    return [c.strip().replace("\\|", "|").replace("<br>", "\n") for c in _CELL_SPLIT.split(inner)]


def parse_blocks(text: str) -> list[str | list[list[str]]]:
    """``text`` as a list of prose lines (str) and tables (rows of cells, the header first)."""
    lines = text.splitlines()
    blocks: list[str | list[list[str]]] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            rows = [_cells(lines[i])]
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            blocks.append(rows)
        else:
            blocks.append(lines[i])
            i += 1
    return blocks


def _widths(rows: list[list[str]]) -> tuple[list[int], list[int]]:
    """Each column's narrowest width that breaks no word (its longest word) and its natural width
    (its longest line), without padding."""
    columns = list(zip(*rows))
    narrow = [max((cell_len(w) for c in col for w in c.split()), default=1) for col in columns]
    wide = [max((cell_len(line) for c in col for line in c.splitlines()), default=1) for col in columns]
    return narrow, wide


def _frame(columns: int) -> int:
    return 3 * columns + 1  # a space each side of every column, and the borders


def _min_width(rows: list[list[str]]) -> int:
    """The narrowest a rich table of ``rows`` can be without breaking a word."""
    return sum(_widths(rows)[0]) + _frame(len(rows[0]))


def _share(narrow: list[int], wide: list[int], room: int) -> list[int]:
    """Column widths within ``room``: each column gets its longest word, then the room left is
    shared max-min fairly, so a column that needs little (a number, ``1.1000 ± 0.0816``) is
    whole and the long ones (labels, help) share the rest and wrap."""
    widths = list(narrow)
    spare = room - sum(narrow)
    short = [i for i in range(len(widths)) if wide[i] > widths[i]]
    while short and spare > 0:
        share = spare // len(short)
        if not share:  # less room left than columns: one more each, in order
            for i in short[:spare]:
                widths[i] += 1
            break
        done = [i for i in short if wide[i] - widths[i] <= share]
        for i in done or short:  # the columns a share makes whole, else a share to each
            grant = min(wide[i] - widths[i], share)
            widths[i] += grant
            spare -= grant
        short = [i for i in short if wide[i] > widths[i]]
    return widths


def _rich_table(rows: list[list[str]], width: int) -> Table:
    """A rich table of ``rows`` at most ``width`` wide whose cells wrap between words. The column
    widths are set here (``_share``): rich's own narrowing squeezes the widest columns first and
    breaks words (``complete|d``) where a layout that keeps them exists."""
    narrow, wide = _widths(rows)
    room = width - _frame(len(narrow))
    table = Table(show_lines=any("\n" in c for r in rows[1:] for c in r))
    for header, w in zip(rows[0], wide if sum(wide) <= room else _share(narrow, wide, room)):
        table.add_column(Text(header), width=w, overflow="fold", no_wrap=False)
    for row in rows[1:]:
        table.add_row(*(Text(c, overflow="fold") for c in row))
    return table


def print_markdown(text: str, console: Console | None = None) -> None:
    """Print markdown ``text`` (prose and pipe tables) to ``console`` (stdout by default): rich
    tables on a terminal they fit, else ``text`` unchanged. Nothing is ever cut."""
    console = console or Console()
    blocks = parse_blocks(text)
    tables = [b for b in blocks if isinstance(b, list)]
    readable = all(len(set(map(len, t))) == 1 for t in tables)  # a ragged table is left as text
    if not console.is_terminal or not readable or any(_min_width(t) > console.width for t in tables):
        console.file.write(text if text.endswith("\n") else text + "\n")
        console.file.flush()
        return
    for block in blocks:
        if isinstance(block, list):
            console.print(_rich_table(block, console.width))
        else:  # as written: no markup, emoji or highlighting; the terminal wraps a long line
            console.print(Text(block, style="bold" if block.startswith("#") else ""), soft_wrap=True,
                          markup=False, emoji=False, highlight=False)
