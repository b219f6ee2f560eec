"""`heads` survives interruptions and runs on several processes.

Oracles: the uninterrupted one-process sweep of the same options on the same fp64 teacher.

* Interrupted by SIGTERM/SIGINT (sent from inside a training step, as a scheduler would), then
  ``--resume``: the resumed sweep restores the heads, AdamW's moments and step counts, the LR
  schedule's position and the batch position bit for bit and then repeats the same fp64
  operations on the same batches, so it must give the uninterrupted result to fp64 round-off
  (we allow 1e-12 relative; measured here: bit-identical).
* ``torchrun --nproc_per_node=2`` (gloo) of the real CLI: every batch is split between the two
  processes and their gradients are summed, so the gradients differ from one process's only by
  the order of fp64 additions (≈ 1e-16 relative). AdamW normalises every gradient element by its
  own RMS, so such a difference can move an element's update by about its own relative size,
  except for elements whose gradient is a near-total cancellation; over 10 steps the validation
  losses then agree to far better than 1e-10 relative (the bound used; measured here: 1.5e-16).
  The reference row and the truncations are plain sums of per-row terms: 1e-12 relative.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rankest import cli
from rankest.heads import pipeline as heads_mod
from rankest.runtime.run import Run
from rankest.io.checkpoint import CHECKPOINT_NAME, read_checkpoint, write_checkpoint
from rankest.runtime.run import Interrupted
from rankest.errors import UserError
from rankest.heads import HeadsResult, run_heads
from rankest.testing import checkpoint_progress, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
#: 512 training rows = 16 windows of 32 positions; batches of 3 windows: 6 batches, the last one a
#: single window (under 2 processes one of them has no rows in that batch); 10 steps wrap around.
OPTS = dict(seq_len=SEQ, tokens=512, val_tokens=128, batch_size=3, ranks="2,5,full", init="scaled", steps=10,
            seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus_file(make_word_corpus):
    return make_word_corpus("hr-corpus", seed=17, paragraphs=40)


@pytest.fixture(scope="module")
def neox_dir(make_tiny_neox):
    return str(make_tiny_neox("heads-resilience-neox", context_length=128, seed=6))


@pytest.fixture(scope="module")
def teacher64(neox_dir, load_tiny_teacher):
    return load_tiny_teacher(neox_dir, "fp64")


def api(teacher, corpus, out=None, **kw):
    opts = dict(OPTS, teacher=teacher, corpus=corpus, quiet=True, out=None if out is None else str(out))
    opts.update(kw)
    return run_heads(**opts)


def assert_same_sweep(got: HeadsResult, want: HeadsResult, *, rtol: float, rtol_sums: float = 1e-12) -> None:
    assert got.ranks == want.ranks and got.labels == want.labels and got.lr == want.lr
    np.testing.assert_allclose(got.val_loss, want.val_loss, rtol=rtol, atol=0)
    np.testing.assert_allclose(got.train_loss, want.train_loss, rtol=rtol, atol=0)
    if want.val_kl is not None:
        np.testing.assert_allclose(got.val_kl, want.val_kl, rtol=rtol, atol=1e-300)
    for key in ("truncation_loss", "truncation_loss_feature"):
        np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=rtol_sums, atol=0)
    assert got.reference["loss"] == pytest.approx(want.reference["loss"], rel=rtol_sums, abs=0)
    assert got.meta["n_train_rows"] == want.meta["n_train_rows"] and got.meta["n_val_rows"] == want.meta["n_val_rows"]


def _signal_at_step(monkeypatch, k: int, signum: int) -> None:
    """SIGTERM/SIGINT to this process during the k-th training step (1-based): the sweep then
    writes a checkpoint holding steps [0, k) and stops."""
    calls = {"n": 0}
    original = heads_mod.HeadSweep.step

    def step(self, *a, **kw):
        if len(self.specs) != 3:  # the LR search's sweep (3 LRs × 3 ranks) is not the training
            return original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signum)
        return original(self, *a, **kw)

    monkeypatch.setattr(heads_mod.HeadSweep, "step", step)


VARIANTS = {
    "on-the-fly": dict(signum=signal.SIGTERM, kw={}),
    # Feature cache, kl objective and the LR search (the LRs found must be the ones resumed).
    "cache-kl-lr-search": dict(signum=signal.SIGINT, kw=dict(objective="kl", lr_search=True, init="svd")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupt_then_resume_equals_uninterrupted(variant, teacher64, corpus_file, tmp_path, monkeypatch):
    signum, kw = VARIANTS[variant]["signum"], dict(VARIANTS[variant]["kw"])
    if variant.startswith("cache"):
        kw["cache_features"] = str(tmp_path / "feats.h5")
    want = api(teacher64, corpus_file, **kw)  # uninterrupted, no run folder (writes the cache)
    out = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as m:
        _signal_at_step(m, 4, signum)
        with pytest.raises(Interrupted) as info:
            api(teacher64, corpus_file, out, checkpoint_every=3, **kw)
    assert info.value.exit_code == 128 + signum and "--resume" in str(info.value)
    assert signal.getsignal(signum) == handler_before, "the sweep's handlers are removed"
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.position["step"] == 4 and ck.position["command"] == "heads"
    assert ck.states["history"]["train_loss"].shape == (4, 3)
    assert "p0" in ck.states["sweep"] and "exp_avg_sq0" in ck.states["sweep"]
    assert not (out / "heads.h5").exists()
    got = api(teacher64, corpus_file, out, resume=True, checkpoint_every=3, **kw)
    assert got.meta["resumed_at_step"] == 4
    assert_same_sweep(got, want, rtol=1e-12)
    assert not (out / CHECKPOINT_NAME).exists(), "a finished sweep keeps no checkpoint"
    assert not list(out.glob(".*.tmp"))
    back = HeadsResult.load(out / "heads.h5")
    np.testing.assert_array_equal(back.train_loss, got.train_loss)
    # Periodic checkpoints alone (no signal): one from step 6 resumes to the same result.
    out2 = tmp_path / "run2"
    original_save = Run.save
    with monkeypatch.context() as m:
        def save_then_stop(self, *, position, **kw):
            original_save(self, position=position, **kw)
            if position["step"] == 6:
                raise KeyboardInterrupt  # a crash right after the checkpoint of step 6
        m.setattr(Run, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            api(teacher64, corpus_file, out2, checkpoint_every=3, **kw)
    assert read_checkpoint(out2 / CHECKPOINT_NAME).position["step"] == 6
    assert_same_sweep(api(teacher64, corpus_file, out2, resume=True, **kw), want, rtol=1e-12)


def test_resume_refuses_another_configuration(teacher64, corpus_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_step(m, 2, signal.SIGTERM)
        with pytest.raises(Interrupted):
            api(teacher64, corpus_file, out)
    with pytest.raises(UserError) as info:
        api(teacher64, corpus_file, out, resume=True, seed=4, ranks="2,6,full")
    msg = str(info.value)
    assert "seed" in msg and "ranks" in msg and "init" not in msg and "--overwrite" in msg
    # Same options, another text behind the same corpus file: other rows, refused too.
    text = Path(corpus_file).read_text()
    other = tmp_path / "docs.txt"
    other.write_text(text)
    out2 = tmp_path / "run2"
    with monkeypatch.context() as m:
        _signal_at_step(m, 2, signal.SIGTERM)
        with pytest.raises(Interrupted):
            api(teacher64, str(other), out2)
    other.write_text(text.replace("river", "ocean"))
    with pytest.raises(UserError, match="train_rows_sha256"):
        api(teacher64, str(other), out2, resume=True)
    # A checkpoint of another command (estimate's) in the folder: refused, not misread.
    out3 = tmp_path / "run3"
    out3.mkdir()
    write_checkpoint(out3 / CHECKPOINT_NAME, config={}, derived={}, position={"next_batch": 3}, convergence={},
                     states={"gram": {"gram": np.eye(3)}})
    with pytest.raises(UserError, match="not a heads checkpoint"):
        api(teacher64, corpus_file, out3, resume=True)
    # Options that do not change the result may differ (checkpoint period, device spelling).
    got = api(teacher64, corpus_file, out, resume=True, checkpoint_every=5, device="cpu")
    assert got.meta["resumed_at_step"] == 2
    # A finished sweep has nothing to resume; flags without a run folder are refused (exit 2).
    with pytest.raises(UserError, match="has finished"):
        api(teacher64, corpus_file, out, resume=True)
    capsys.readouterr()  # the interruptions' notices
    for flags in (["--resume"], ["--checkpoint-every", "2"], ["--out", str(out), "--resume", "--overwrite"]):
        assert cli.main(["heads", "--teacher", "unused", "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rankest: error:") and ("--out" in err or "only one" in err), err


def _cli(neox_dir, corpus_file, out, **kw):
    opts = dict(OPTS, **kw)
    argv = ["heads", "--teacher", neox_dir, "--corpus", corpus_file, "--dtype", "fp64", "--device", "cpu", "--quiet",
            "--out", str(out)]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


@pytest.mark.slow  # torchrun: 2 gloo processes
@pytest.mark.parametrize("variant", ["on-the-fly", "cache"])
def test_two_gloo_processes_equal_one(variant, neox_dir, corpus_file, teacher64, tmp_path):
    """torchrun --nproc_per_node=2 of the real CLI (gloo, CPU), with checkpoints on: each process
    takes half of every batch (windows on the fly, rows from the cache), gradients summed."""
    kw = {} if variant == "on-the-fly" else dict(cache_features=str(tmp_path / "feats.h5"), objective="kl",
                                                 lr_search=True)
    want = api(teacher64, corpus_file, **{k: v for k, v in kw.items() if k != "cache_features"})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rankest",
           *_cli(neox_dir, corpus_file, out, checkpoint_every=3, **kw)]
    proc = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("· heads (") == 1, "only rank 0 reports"
    got = HeadsResult.load(out / "heads.h5")
    assert got.meta["world_size"] == 2
    assert not (out / CHECKPOINT_NAME).exists()
    assert_same_sweep(got, want, rtol=1e-10)
    summary = json.loads((out / "heads.json").read_text())
    assert summary["n_train_rows"] == 512 and summary["steps"] == 10


@pytest.mark.slow  # real `python -m rankest` processes, one killed with SIGKILL
def test_kill9_of_a_real_process_then_resume(neox_dir, corpus_file, teacher64, tmp_path):
    """A real `heads` process checkpointing every step is killed with SIGKILL once its checkpoint
    has passed a seeded random step (plus a random delay, so the kill may land mid-write); the
    same command with --resume finishes with the uninterrupted sweep's numbers."""
    import time

    rng = np.random.default_rng(20261127)
    steps = 150
    want = api(teacher64, corpus_file, steps=steps)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rankest", *_cli(neox_dir, corpus_file, out, steps=steps, checkpoint_every=1),
           "--resume"]
    target = int(rng.integers(5, 60))
    proc = subprocess.Popen(cmd, env=subprocess_env(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and checkpoint_progress(out / CHECKPOINT_NAME, "step") < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr.close()
    assert killed and proc.returncode == -signal.SIGKILL, "the process was still training when killed"
    done = checkpoint_progress(out / CHECKPOINT_NAME, "step")
    assert target <= done < steps
    final = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    got = HeadsResult.load(out / "heads.h5")
    assert got.meta["resumed_at_step"] == done
    assert not (out / CHECKPOINT_NAME).exists() and not list(out.glob(".*.tmp"))
    assert_same_sweep(got, want, rtol=1e-12)


def test_failed_checkpoint_write_keeps_previous(teacher64, corpus_file, tmp_path, monkeypatch):
    """The disk refuses the second checkpoint (ENOSPC after half a file): the sweep stops with
    the reason, the first checkpoint is byte-identical, and --resume from it gives the result."""
    import errno

    from rankest.io import checkpoint as ckpt_mod
    from rankest.io.checkpoint import CheckpointWriteError

    want = api(teacher64, corpus_file)
    out = tmp_path / "run"
    original = ckpt_mod._write_file
    seen = {"n": 0, "before": None}

    def faulty(tmp, **kw):
        seen["n"] += 1
        if seen["n"] == 2:
            seen["before"] = (tmp.parent / CHECKPOINT_NAME).read_bytes()
            tmp.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(tmp, **kw)

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "_write_file", faulty)
        with pytest.raises(CheckpointWriteError) as info:
            api(teacher64, corpus_file, out, checkpoint_every=3)
    assert "ENOSPC" in str(info.value) and "intact" in str(info.value)
    assert (out / CHECKPOINT_NAME).read_bytes() == seen["before"]
    assert read_checkpoint(out / CHECKPOINT_NAME).position["step"] == 3 and not list(out.glob(".*.tmp"))
    assert_same_sweep(api(teacher64, corpus_file, out, resume=True), want, rtol=1e-12)
