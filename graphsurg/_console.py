"""Console output for the CLI: rich tables and progress bars on a terminal, plain text otherwise.

``Console(quiet=..., stream=...)`` decides once: rich when the stream is a TTY, ``--quiet``
is off and rich is installed; plain otherwise. ``--quiet`` keeps results (tables, the report
path) and drops chatter and progress.

Progress on long work, for any layer to call (this module imports nothing from graphsurg)::

    with progress(len(batches), "measuring") as bar:
        for batch in batches:
            ...
            bar.advance()

On stderr: a rich bar when stderr is a terminal and rich (the ``report`` extra) is
installed; a plain line rewritten in place on a terminal without rich; nothing off a
terminal unless the caller passes ``enabled=True`` (then a plain line every 10 %). Bars
opened inside an open bar (a diagnosis inside a surgery round) show under it and disappear
when they end; the outermost bar stays on screen, complete. The CLI turns every bar off for
``--quiet`` and ``--json`` with ``progress_enabled(False)``, which wins over ``enabled=``.
"""

from __future__ import annotations

import sys
import time
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
    def progress(self, description: str, total: int | None) -> Iterator[Progress]:
        """:func:`progress` on stderr, off with ``quiet``:
        ``with console.progress("training", 200) as bar: bar.advance()``."""
        with progress(total, description, enabled=False if self.quiet else None) as bar:
            yield bar


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


# -- progress ---------------------------------------------------------------------------------

_ENABLED: list[bool | None] = [None]  # the innermost progress_enabled(); None: on a terminal
_LIVE: list[Any] = []  # the rich Progress shown now, shared by nested bars


class Progress:
    """One bar: ``advance(n)`` moves it, ``label`` renames it; ``completed`` and ``total``
    count steps (``total`` None: unknown, the bar shows a count)."""

    def __init__(self, total: int | None, label: str) -> None:
        self.total = total
        self.label = label
        self.completed = 0

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._show()

    def relabel(self, label: str) -> None:
        self.label = label
        self._show()

    def _show(self) -> None:  # silent
        pass

    def _close(self) -> None:
        pass


class _RichBar(Progress):
    def __init__(self, total: int | None, label: str, stream: TextIO) -> None:
        super().__init__(total, label)
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.outer = not _LIVE
        if self.outer:
            live = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                console=RichConsole(file=stream, highlight=False))
            live.start()
            _LIVE.append(live)
        self.live = _LIVE[0]
        self.task = self.live.add_task(label, total=total)

    def _show(self) -> None:
        self.live.update(self.task, completed=self.completed, description=self.label)

    def _close(self) -> None:
        if self.outer:
            self.live.stop()  # the finished bar stays on screen
            _LIVE.clear()
        else:
            self.live.remove_task(self.task)


class _PlainBar(Progress):
    """``label 3/10`` rewritten in place on a terminal (at most 10 times a second); off a
    terminal a new line at each 10 % (or every 100 steps when the total is unknown)."""

    def __init__(self, total: int | None, label: str, stream: TextIO, tty: bool) -> None:
        super().__init__(total, label)
        self.stream, self.tty = stream, tty
        self.t0 = self.last = time.monotonic()
        self.shown_at = -1
        self._write(force=True)

    def _text(self) -> str:
        total = f"/{self.total}" if self.total else ""
        return f"graphsurg: {self.label} {self.completed}{total}"

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self.last >= 0.1:
                self.stream.write("\r\x1b[2K" + self._text())
                self.stream.flush()
                self.last = now
            return
        step = max(1, self.total // 10) if self.total else 100
        if force or self.completed // step != self.shown_at // step:
            self.stream.write(self._text() + "\n")
            self.stream.flush()
            self.shown_at = self.completed

    def _show(self) -> None:
        self._write()

    def _close(self) -> None:
        done = f" done in {time.monotonic() - self.t0:.1f} s"
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._text() + done + "\n")
        else:
            self.stream.write(self._text() + done + "\n")
        self.stream.flush()


@contextmanager
def progress_enabled(enabled: bool | None) -> Iterator[None]:
    """Within the block, bars show always (True), never (False: the CLI's ``--quiet`` and
    ``--json``) or on a terminal (None, the default). False wins over ``progress(enabled=)``."""
    _ENABLED.append(enabled)
    try:
        yield
    finally:
        _ENABLED.pop()


@contextmanager
def progress(total: int | None, label: str, *, enabled: bool | None = None,
             stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress bar for ``total`` steps of ``label`` on ``stream`` (stderr), closed (shown
    complete, or removed when nested) when the block ends; see the module docstring.

    Args:
        total: the number of steps, None when unknown.
        label: what is being done, e.g. ``"measuring"``, ``"healing"``.
        enabled: True shows it even off a terminal, False hides it, None (default) follows
            :func:`progress_enabled` (on a terminal). Pass ``DiagnoseConfig.progress``.
        stream: where to draw it (default ``sys.stderr``).
    """
    out = stream if stream is not None else sys.stderr
    mode = _ENABLED[-1]
    show = False if mode is False else (enabled if enabled is not None else mode)
    tty = _isatty(out)
    bar: Progress
    if show is False or (show is None and not tty):
        bar = Progress(total, label)
    elif tty and (_LIVE or _has_rich()):
        bar = _RichBar(total, label, out)
    else:
        bar = _PlainBar(total, label, out, tty)
    try:
        yield bar
    finally:
        bar._close()


def _has_rich() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Console", "Progress", "plain_table", "progress", "progress_enabled"]
