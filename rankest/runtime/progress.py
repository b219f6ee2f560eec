"""Status lines for phases that have no bar: one LAPACK call (an eigensolve, a QR) cannot report
its progress, but the user can be told that it is running, for how long, and when it ended.

    with status("finalize: eigensolve of the 4,096² Gram", quiet=cfg.quiet):
        spec = acc.finalize()

Nothing is printed for a phase shorter than :data:`AFTER_S` seconds; a longer one prints a line
when it passes :data:`AFTER_S`, another every :data:`EVERY_S` seconds, and one when it ends.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, Optional, TextIO

#: Seconds a phase runs silently before its first status line.
AFTER_S = 3.0
#: Seconds between the status lines of a phase that goes on.
EVERY_S = 30.0


@contextlib.contextmanager
def status(what: str, *, quiet: bool = False, stream: Optional[TextIO] = None) -> Iterator[None]:
    """Report ``what`` on stderr while the block runs longer than :data:`AFTER_S` (see module)."""
    if quiet:
        yield
        return
    out = stream if stream is not None else sys.stderr
    t0, done, said = time.perf_counter(), threading.Event(), threading.Event()

    def beat() -> None:
        wait = AFTER_S
        while not done.wait(wait):
            print(f"rankest: {what} … {time.perf_counter() - t0:.0f} s", file=out, flush=True)
            said.set()
            wait = EVERY_S

    thread = threading.Thread(target=beat, name="rankest-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if said.is_set():
            print(f"rankest: {what}: done in {time.perf_counter() - t0:.0f} s", file=out, flush=True)
