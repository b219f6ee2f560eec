"""Status lines of the phases without a bar (rankest.runtime.progress), with patched thresholds."""

from __future__ import annotations

import io
import time

import pytest

from rankest.runtime import progress
from rankest.runtime.progress import status


def test_long_phase_prints_while_running_and_when_done(monkeypatch):
    monkeypatch.setattr(progress, "AFTER_S", 0.05)
    monkeypatch.setattr(progress, "EVERY_S", 0.05)
    out = io.StringIO()
    with status("eigensolve of the Gram", stream=out):
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(ln.startswith("rankest: eigensolve of the Gram") for ln in lines)
    assert lines[-1].endswith(" s") and "done in" in lines[-1] and "done in" not in lines[0]


def test_short_or_quiet_phase_prints_nothing(monkeypatch):
    out = io.StringIO()
    with status("quick", stream=out):  # AFTER_S (3 s) not reached
        pass
    monkeypatch.setattr(progress, "AFTER_S", 0.0)
    with status("quiet", quiet=True, stream=out):
        time.sleep(0.05)
    assert out.getvalue() == ""


def test_estimate_finalize_reports_its_status(tiny_teacher, make_word_corpus, monkeypatch, capsys):
    """The finalize of an estimate (the n-gram eigensolve, the prob sketch's core) says that it runs."""
    from rankest.estimator.pipeline import run_estimate

    corpus = make_word_corpus("progress", seed=3)
    monkeypatch.setattr(progress, "AFTER_S", 0.0)
    run_estimate(teacher=tiny_teacher, corpus=corpus, tokens=256, seq_len=32, route="gram", space="prob",
                 convergence=False)
    err = capsys.readouterr().err
    assert "rankest: finalize of the gram route (256 rows)" in err and "done in" in err
    run_estimate(teacher=tiny_teacher, corpus=corpus, tokens=256, seq_len=32, route="gram", space="prob",
                 convergence=False, quiet=True)
    assert "finalize of" not in capsys.readouterr().err


@pytest.mark.parametrize("what", ["x"])
def test_status_reraises_and_stops(what, monkeypatch):
    monkeypatch.setattr(progress, "AFTER_S", 0.0)
    out = io.StringIO()
    with pytest.raises(KeyError):
        with status(what, stream=out):
            time.sleep(0.02)
            raise KeyError(what)
    n = len(out.getvalue())
    time.sleep(0.05)
    assert len(out.getvalue()) == n  # the status thread ended with the block
