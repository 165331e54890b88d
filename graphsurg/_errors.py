"""graphsurg's exceptions. Messages are one line: what was wrong, where, and what to do."""

from __future__ import annotations


class GraphsurgError(Exception):
    """Base class of graphsurg's errors."""


class BadInputError(GraphsurgError, ValueError):
    """The model, data or file given to graphsurg cannot be used (exit code 2 in the CLI)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: for one-line errors."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Refused(GraphsurgError):
    """A replacement cannot be applied at a site; the message says why."""
