"""Terminal output of the command line: tables and progress, with rich when installed.

``pip install "eplb[cli]"`` brings rich: coloured tables and a progress bar on
stderr (shown only on a terminal, and gone once the step is done). Without
rich the same tables print as aligned text and progress is one line per step.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["Console"]


class Console:
    """Tables on stdout, progress and notes on stderr."""

    def __init__(self, *, plain: bool = False) -> None:
        self._rich: Any = None
        if not plain:
            try:
                import rich.console
            except ImportError:
                pass
            else:
                self._rich = rich.console.Console(highlight=False)
                self._err = rich.console.Console(stderr=True, highlight=False)

    def escape(self, text: str) -> str:
        """``text`` (a file name, a message) made safe to print as it is."""
        return text.replace("[", "\\[") if self._rich is not None else text

    def print(self, text: str = "") -> None:
        """A line on stdout (rich markup such as ``[bold]`` is stripped without rich)."""
        if self._rich is not None:
            self._rich.print(text)
        else:
            print(_strip_markup(text))

    def note(self, text: str) -> None:
        """A line on stderr."""
        if self._rich is not None:
            self._err.print(text)
        else:
            print(_strip_markup(text), file=sys.stderr)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 2) -> None:
        """A table; the first ``left`` columns are left-aligned, the others right-aligned."""
        if self._rich is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for i, name in enumerate(columns):
                table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            self._rich.print(table)
            return
        cells = [list(columns), *[[_strip_markup(c) for c in row] for row in rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

        def line(row: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        print(title)
        print(line(cells[0]))
        print("  ".join("-" * w for w in widths))
        for row in cells[1:]:
            print(line(row))

    @contextmanager
    def progress(self, total: int) -> Iterator[Any]:
        """``with console.progress(n) as step: step("reading ...")``: a bar of ``n`` steps on stderr.

        Each call of ``step(text)`` finishes the previous step and shows ``text``.
        The bar appears only on a terminal and is removed when the block ends.
        """
        if self._rich is None or not self._err.is_terminal:
            tty = sys.stderr.isatty()

            def step(text: str) -> None:
                if tty:
                    print(f"  {_strip_markup(text)}", file=sys.stderr, flush=True)

            yield step
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self._err, transient=True) as bar:
            task = bar.add_task("", total=total)
            started = False

            def step(text: str) -> None:
                nonlocal started
                bar.update(task, description=text, advance=1 if started else 0)
                started = True

            yield step


_MARKUP = re.compile(r"\[/?(?:bold|dim|italic|green|red|yellow|cyan|bold green|bold red)?\]")


def _strip_markup(text: str) -> str:
    """Drop the few rich markup tags eplb uses (``[bold]``, ``[green]``, ``[/]`` ...) from ``text``."""
    return _MARKUP.sub("", text)
