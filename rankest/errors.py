"""Errors that the command line turns into an exit status.

`UserError` is bad input: the CLI prints its one-sentence message to stderr and exits 2.
Anything else is an internal failure: exit 1, with a traceback only under ``--debug``.
"""


class UserError(Exception):
    """Bad input from the user; the message says what was wrong and how to fix it."""
