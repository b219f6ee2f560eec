"""Errors that the command line turns into an exit status.

`UserError` is bad input: the CLI prints its one-sentence message to stderr and exits 2.
Anything else is an internal failure: exit 1, with a traceback only under ``--debug``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message says what was wrong and how to fix it."""


def first_line(exc: BaseException, *, limit: int | None = None, typed: bool = False) -> str:
    """A library exception as a clause of a UserError's sentence: its message's first line
    (cut to ``limit`` characters, prefixed with its type when ``typed``), or its type name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(exc).__name__}: {line}" if typed else line
