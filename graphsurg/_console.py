"""Console output for the CLI: rich tables and progress bars on a terminal, plain text otherwise.

``Console(quiet=..., stream=...)`` decides once: rich when the stream is a TTY, ``--quiet``
is off and rich is installed; plain otherwise. ``--quiet`` keeps results (tables, the report
path) and drops chatter and progress.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO


class Console:
    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None,
                 force_plain: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self._rich: Any = None
        if not quiet and not force_plain and _isatty(self.stream):
            try:
                from rich.console import Console as RichConsole

                self._rich = RichConsole(file=self.stream, highlight=False)
            except ImportError:  # pragma: no cover - rich is in the report extra
                self._rich = None

    @property
    def fancy(self) -> bool:
        return self._rich is not None

    def info(self, text: str) -> None:
        """Chatter: dropped with --quiet."""
        if self.quiet:
            return
        self.result(text)

    def result(self, text: str) -> None:
        """Always shown."""
        if self._rich is not None:
            self._rich.print(text, markup=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def rule(self, title: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.rule(title, style="cyan")
        else:
            print(f"\n== {title} ==", file=self.stream, flush=True)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
              *, highlight_last: bool = False) -> None:
        """A table; always shown (it is a result)."""
        if self._rich is not None:
            from rich.table import Table

            t = Table(title=title, title_justify="left", title_style="bold")
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i == 0 else "right",
                             style="bold" if highlight_last and i == len(header) - 1 else None)
            for r in rows:
                t.add_row(*r)
            self._rich.print(t)
            return
        print(plain_table(title, header, rows), file=self.stream, flush=True)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """``with console.progress("training", 200) as advance: advance(1)``."""
        if self._rich is None:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=self._rich, transient=True) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)


def plain_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    allrows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    out = ["", title] if title else []
    out.append(line(allrows[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in allrows[1:])
    return "\n".join(out)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Console", "plain_table"]
