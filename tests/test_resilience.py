"""Hostile conditions: kill -9 and resume, full disks during a checkpoint, corrupt / truncated /
foreign HDF5 files, bad command lines, merge order and sharding, and a 2-process gloo run.

The oracle everywhere is the uninterrupted one-process run of the same command (fp64 teacher,
fp64 Gram): a resumed run adds the same chunks in the same order, so it must agree to fp64
round-off; P processes add them in another order, so they agree within the Gram route's
round-off model |Δσ_i| ≲ c·eps·σ_1²/σ_i (a Gram squares the condition number).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankest import cli
from rankest.io import checkpoint as ckpt_mod
from rankest.testing import checkpoint_progress, subprocess_env
from rankest.accumulate import Chunk, Factor, Gram, RowStats
from rankest.io.checkpoint import CHECKPOINT_NAME, CheckpointWriteError, read_checkpoint, write_checkpoint
from rankest.runtime.run import Interrupted
from rankest.runtime.distributed import sum_states
from rankest.errors import UserError
from rankest.estimator.pipeline import run_estimate
from rankest.io.results import read_spectrum_h5
from rankest.accumulate.sketch import Sketch
from rankest.sources.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
EPS = np.finfo(np.float64).eps
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "river market school budget storm council bridge winter garden doctor rain fire train paper").split()

#: The run every test repeats: N = 2048 rows of 32-token windows, one window per chunk (64 chunks),
#: prob rows (V' = 320) into an exact fp64 Gram, so the checkpoint holds a real V'×V' state.
TOKENS, SEQ = 2048, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus_file(make_word_corpus):
    return make_word_corpus("corpus", seed=7, paragraphs=40, words=WORDS)


@pytest.fixture(scope="module")
def neox_dir(make_tiny_neox):
    return str(make_tiny_neox("resilience-neox", context_length=128, seed=3))


@pytest.fixture(scope="module")
def teacher64(neox_dir):
    """This module's own fp64 teacher, not the shared ``load_tiny_teacher`` one: its tests
    monkeypatch its ``features`` / ``hidden_states``."""
    return load_teacher(neox_dir, device="cpu", dtype="fp64")


def cli_args(neox_dir, corpus_file, out, tokens=TOKENS):
    return ["estimate", "--teacher", neox_dir, "--corpus", corpus_file, "--tokens", str(tokens), "--seq-len",
            str(SEQ), "--batch-size", "1", "--dtype", "fp64", "--device", "cpu", "--route", "gram", "--space", "prob",
            "--quiet", "--out", str(out)]


def api_kwargs(teacher, corpus_file, out=None, **kw):
    base = dict(teacher=teacher, corpus=corpus_file, tokens=256, seq_len=SEQ, batch_size=1, route="gram",
                space="prob", quiet=True, out=None if out is None else str(out))
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def ref256(teacher64, corpus_file):
    """The uninterrupted in-process run of `api_kwargs` (256 rows, 8 chunks), no run folder."""
    return run_estimate(**api_kwargs(teacher64, corpus_file))


@pytest.fixture(scope="module")
def reference(teacher64, corpus_file, tmp_path_factory):
    """The uninterrupted one-process run of `cli_args` (in process, on the already loaded
    teacher: the same weights in fp64), as its results.h5."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_estimate(**api_kwargs(teacher64, corpus_file, out, tokens=TOKENS, dtype="fp64", device="cpu"))
    return out / "results.h5"


def assert_same_spectrum(got, want, *, c=50.0):
    """σ within the Gram round-off model, same rows, same convergence prefixes."""
    assert got.n_rows == want.n_rows and got.n_cols == want.n_cols
    tol = 1e-12 * want.sigma + c * EPS * want.sigma[0] ** 2 / np.maximum(want.sigma, 1e-300)
    np.testing.assert_array_less(np.abs(got.sigma - want.sigma), tol + 1e-300)
    assert got.energy == pytest.approx(want.energy, rel=1e-13)
    assert sorted(got.convergence) == sorted(want.convergence)
    for n, metrics in want.convergence.items():
        assert got.convergence[n]["stable_rank"] == pytest.approx(metrics["stable_rank"], rel=1e-11)
        assert got.convergence[n]["rank_at"] == metrics["rank_at"]


# ---- kill -9 -------------------------------------------------------------------------------------
@pytest.mark.slow  # six real `python -m rankest` processes, five killed with SIGKILL
def test_kill9_at_random_points_then_resume_equals_uninterrupted(neox_dir, corpus_file, reference, tmp_path):
    """Six real processes: five killed by SIGKILL at seeded random points of the stream (the
    checkpoint has passed a random row count, then a random delay, so some land mid-write),
    each followed by --resume; the sixth finishes. The spectrum equals the uninterrupted run's."""
    rng = np.random.default_rng(20261127)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rankest", *cli_args(neox_dir, corpus_file, out), "--checkpoint-every", "1",
           "--resume"]
    # Five kill points spread over the first 80% of the rows, in increasing order.
    targets = np.sort(rng.choice(np.arange(1, int(0.8 * TOKENS)), size=5, replace=False))
    kills, last = 0, -1
    for target in targets:
        proc = subprocess.Popen(cmd, env=subprocess_env(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while proc.poll() is None:
                done = checkpoint_progress(out / CHECKPOINT_NAME, "rows_done")
                if done >= target and done > last:
                    time.sleep(rng.uniform(0, 0.1))
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode in (-signal.SIGKILL, 0), err
        if proc.returncode == 0:
            break
        done = checkpoint_progress(out / CHECKPOINT_NAME, "rows_done")
        assert done > last, "each resumed process made progress"
        last = done
    assert kills >= 5
    final = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert not (out / CHECKPOINT_NAME).exists(), "a finished run keeps no checkpoint"
    assert not list(out.glob(".*.tmp")), "no temporary file is left behind"
    got = read_spectrum_h5(out / "results.h5")
    assert got.meta["resumed_at_rows"] == last > 0
    assert_same_spectrum(got, read_spectrum_h5(reference))


# ---- SIGTERM / SIGINT in process ----------------------------------------------------------------
def _signal_at_batch(monkeypatch, teacher, k, signum):
    """Make the forward pass of batch k − 1 send ``signum`` to this process (as a scheduler
    would): the run then stops with batches [0, k) in its checkpoint. (prob rows: no linearity
    check runs a forward before the stream.)"""
    calls = {"n": 0}
    original = teacher.features

    def features(ids):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signum)
        return original(ids)

    monkeypatch.setattr(teacher, "features", features)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_resume_matches(teacher64, corpus_file, tmp_path, monkeypatch, signum, ref256):
    want = ref256
    out = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as m:
        _signal_at_batch(m, teacher64, 5, signum)
        with pytest.raises(Interrupted) as info:
            run_estimate(**api_kwargs(teacher64, corpus_file, out))
    assert info.value.exit_code == 128 + signum and "--resume" in str(info.value)
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.position["next_batch"] == 5 and ck.position["rows_done"] == 5 * SEQ
    assert signal.getsignal(signum) == handler_before, "the run's handlers are removed"
    got = run_estimate(**api_kwargs(teacher64, corpus_file, out, resume=True))
    assert_same_spectrum(got, want, c=1.0)
    assert not (out / CHECKPOINT_NAME).exists()


# ---- a failing disk during a checkpoint ------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_checkpoint_write_keeps_previous(teacher64, corpus_file, tmp_path, monkeypatch, code, ref256):
    out = tmp_path / "run"
    original = ckpt_mod._write_file
    seen = {"n": 0, "before": None}

    def faulty(tmp, **kw):
        seen["n"] += 1
        if seen["n"] == 3:  # the third checkpoint: half a file, then the disk refuses
            seen["before"] = (tmp.parent / CHECKPOINT_NAME).read_bytes()
            tmp.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
            raise OSError(code, os.strerror(code))
        return original(tmp, **kw)

    monkeypatch.setattr(ckpt_mod, "_write_file", faulty)
    with pytest.raises(CheckpointWriteError) as info:
        run_estimate(**api_kwargs(teacher64, corpus_file, out, checkpoint_every=2))
    msg = str(info.value)
    assert os.strerror(code) in msg and errno.errorcode[code] in msg and "intact" in msg and "--resume" in msg
    assert (out / CHECKPOINT_NAME).read_bytes() == seen["before"], "the previous checkpoint is byte-identical"
    assert read_checkpoint(out / CHECKPOINT_NAME).position["next_batch"] == 4
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(ckpt_mod, "_write_file", original)
    got = run_estimate(**api_kwargs(teacher64, corpus_file, out, checkpoint_every=2, resume=True))
    assert_same_spectrum(got, ref256, c=1.0)


def test_failed_first_checkpoint_says_none_exists(teacher64, corpus_file, tmp_path, monkeypatch):
    def full(tmp, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "_write_file", full)
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint exists"):
        run_estimate(**api_kwargs(teacher64, corpus_file, tmp_path / "run", checkpoint_every=1))
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


# ---- a checkpoint of another run ---------------------------------------------------------------
def _interrupted_run(monkeypatch, teacher, corpus_file, out, **kw):
    with monkeypatch.context() as m:
        _signal_at_batch(m, teacher, 3, signal.SIGTERM)
        with pytest.raises(Interrupted):
            run_estimate(**api_kwargs(teacher, corpus_file, out, **kw))


def test_resume_refuses_other_configuration(teacher64, corpus_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_run(monkeypatch, teacher64, corpus_file, out)
    with pytest.raises(UserError) as info:
        run_estimate(**api_kwargs(teacher64, corpus_file, out, resume=True, seed=1, tokens=300))
    msg = str(info.value)
    assert "seed" in msg and "tokens" in msg and "space" not in msg and "--overwrite" in msg
    # Same options, other text in the same corpus file: the rows differ, and that is refused too.
    other = tmp_path / "docs.txt"
    other.write_text(Path(corpus_file).read_text().replace("river", "ocean"))
    _interrupted_run(monkeypatch, teacher64, str(other), tmp_path / "run2")
    other.write_text(Path(corpus_file).read_text())
    with pytest.raises(UserError, match="rows_sha256"):
        run_estimate(**api_kwargs(teacher64, str(other), tmp_path / "run2", resume=True))
    # Options that do not change the result may differ (device spelling, checkpoint period).
    got = run_estimate(**api_kwargs(teacher64, corpus_file, out, resume=True, device="cpu", checkpoint_every=7))
    assert got.meta["resumed_at_rows"] == 3 * SEQ


def test_resume_of_finished_run_is_refused(neox_dir, corpus_file, tmp_path, capsys, reference):
    """(--resume of a folder without a checkpoint starts afresh: the kill -9 test's first process.)"""
    out = tmp_path / "done"
    out.mkdir()
    shutil.copy(reference, out / "results.h5")
    assert cli.main(cli_args(neox_dir, corpus_file, out) + ["--resume"]) == 2
    assert "has finished" in capsys.readouterr().err


# ---- corrupt, truncated, foreign files ---------------------------------------------------------
def _damage(kind: str, src: Path, dst: Path, dataset: str) -> None:
    data = bytearray(src.read_bytes())
    if kind == "garbage":
        dst.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        dst.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "empty":
        dst.write_bytes(b"")
    elif kind == "bitflip":  # one byte inside the data of `dataset`: its checksum must catch it
        with h5py.File(src, "r") as f:
            info = f[dataset].id.get_chunk_info(0)
        pos = info.byte_offset + info.size // 2
        data[pos] ^= 0x40
        dst.write_bytes(bytes(data))
    elif kind == "foreign":
        with h5py.File(dst, "w") as f:
            f.create_dataset("sigma", data=np.arange(3.0))
            f.attrs["format"] = "someone.else"
    elif kind == "newer":
        shutil.copy(src, dst)
        with h5py.File(dst, "a") as f:
            key = "version" if f.attrs["format"] == "rankest.checkpoint" else "schema_version"
            f.attrs[key] = int(f.attrs[key]) + 1
    else:
        raise ValueError(kind)


KINDS = ["garbage", "truncated", "empty", "bitflip", "foreign", "newer"]
NEEDLES = {"garbage": ("not a readable HDF5",), "truncated": ("not a readable HDF5", "damaged"),
           "empty": ("not a readable HDF5",), "bitflip": ("damaged",), "foreign": ("not a rankest",),
           "newer": ("newer",)}


@pytest.fixture(scope="module")
def a_checkpoint(teacher64, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    mp = pytest.MonkeyPatch()
    try:
        _interrupted_run(mp, teacher64, corpus_file, out)
    finally:
        mp.undo()
    return out / CHECKPOINT_NAME


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_refused_by_resume(kind, a_checkpoint, neox_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _damage(kind, a_checkpoint, out / CHECKPOINT_NAME, "state/gram/gram")
    code = cli.main(cli_args(neox_dir, corpus_file, out)[:-2] + ["--out", str(out), "--resume", "--tokens", "256"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert any(n in err for n in NEEDLES[kind]) and err.startswith("rankest: error:") and "\n" not in err


def test_results_file_given_as_checkpoint(reference, tmp_path):
    shutil.copy(reference, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(UserError, match="results file, not a rankest checkpoint"):
        read_checkpoint(tmp_path / CHECKPOINT_NAME)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_results_refused_by_readers(kind, reference, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    _damage(kind, reference, folder / "results.h5", "sigma")
    with pytest.raises(UserError) as info:
        read_spectrum_h5(folder / "results.h5")
    assert any(n in str(info.value) for n in NEEDLES[kind])
    assert cli.main(["report", str(folder)]) == 2
    assert "rankest: error:" in capsys.readouterr().err


def test_checkpoint_roundtrip_is_bitwise(tmp_path):
    rng = np.random.default_rng(1)
    states = {"gram": {"gram": rng.standard_normal((33, 33)), "n_rows": np.asarray(7)},
              "row_stats": {"sums": rng.standard_normal(4), "n_rows": np.asarray(7)}}
    conv = {8: {"stable_rank": 1.5, "effective_rank": float("nan"), "rank_at": {"0.5": 2}}}
    write_checkpoint(tmp_path / "c.h5", config={"a": 1}, derived={"b": "x"}, position={"next_batch": 3},
                     convergence=conv, states=states, rng=ckpt_mod.rng_state())
    ck = read_checkpoint(tmp_path / "c.h5")
    for name, state in states.items():
        for key, value in state.items():
            np.testing.assert_array_equal(ck.states[name][key], value)
    assert ck.convergence[8]["rank_at"] == {"0.5": 2} and np.isnan(ck.convergence[8]["effective_rank"])
    before = torch.rand(3)
    ckpt_mod.set_rng_state(ck.rng)
    torch.manual_seed(99)
    ckpt_mod.set_rng_state(ck.rng)
    assert torch.equal(torch.rand(3), before)


# ---- command lines (hypothesis) --------------------------------------------------------------------
class _Reached(BaseException):
    """Raised where a valid command line starts real work (so no teacher is loaded)."""


def _sentence_ok(err: str) -> bool:
    """The error line (an argparse refusal adds one line pointing at --help after it) is a sentence."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rankest: error:")]
    return len(lines) == 1 and len(lines[0].split("error:", 1)[1].split()) >= 3


OPTION = st.fixed_dictionaries({
    "tokens": st.one_of(st.integers(-3, 5000).map(str), st.sampled_from(["all", "1e3", "abc", "1.5"])),
    "seq_len": st.integers(-2, 64),
    "batch_size": st.integers(-2, 8),
    "checkpoint_every": st.one_of(st.none(), st.integers(-2, 5)),
    "rank_max": st.one_of(st.none(), st.integers(-1, 50)),
    "max_memory": st.sampled_from([None, "16GB", "512MiB", "-1GB", "lots", "0"]),
    "positions": st.sampled_from(["all", "last", "stride:4", "stride:0", "every"]),
    "route": st.sampled_from(["auto", "factor", "gram", "sketch"]),
    "space": st.sampled_from(["clr", "prob", "logprob"]),
    "out": st.booleans(), "resume": st.booleans(), "overwrite": st.booleans(),
})


def _is_bad(o) -> bool:
    """The specification of a valid `estimate` command line, written independently of rankest."""
    t = o["tokens"]
    tokens_ok = t == "all" or t == "1e3" or (t.lstrip("-").isdigit() and int(t) >= 2)
    mem_ok = o["max_memory"] in (None, "16GB", "512MiB")
    return (not tokens_ok or o["seq_len"] < 1 or o["batch_size"] < 1
            or (o["checkpoint_every"] is not None and o["checkpoint_every"] < 1)
            or (o["rank_max"] is not None and o["rank_max"] < 1) or not mem_ok
            or o["positions"] in ("stride:0", "every") or (o["route"] == "factor" and o["space"] != "clr")
            or ((o["resume"] or o["checkpoint_every"] is not None) and not o["out"])
            or (o["resume"] and o["overwrite"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(o=OPTION)
def test_cli_bad_combinations_exit_2_with_a_sentence(o, tmp_path_factory, monkeypatch, capsys):
    import rankest.sources.corpus

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr(rankest.sources.corpus, "load_documents", reached)
    argv = ["estimate", "--teacher", "unused", "--quiet", "--tokens", o["tokens"], "--seq-len", str(o["seq_len"]),
            "--batch-size", str(o["batch_size"]), "--positions", o["positions"], "--route", o["route"],
            "--space", o["space"]]
    for key in ("checkpoint_every", "rank_max", "max_memory"):
        if o[key] is not None:
            argv += [f"--{key.replace('_', '-')}", str(o[key])]
    if o["out"]:
        argv += ["--out", str(tmp_path_factory.mktemp("cli") / "run")]
    argv += ["--resume"] * o["resume"] + ["--overwrite"] * o["overwrite"]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    except _Reached:
        code = None
    err = capsys.readouterr().err
    if _is_bad(o):
        assert code == 2, (argv, err)
        assert _sentence_ok(err), err
    else:
        assert code is None, (argv, err)


# ---- merge order and sharding (hypothesis) --------------------------------------------------------
def _shards(n, cuts):
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@pytest.mark.parametrize("route", ["gram", "factor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reduced_state_keeps_the_inputs_precision(route, dtype):
    """The distributed reduction sums every state entry but the fixed ones: the precision the
    rows (gram) or features (factor) had must come through 4 shards as it is, not summed."""
    rng = np.random.default_rng(11)
    feats = torch.from_numpy(rng.standard_normal((40, 4))).to(dtype)
    weight = torch.from_numpy(rng.standard_normal((9, 4)))
    rows = (feats.double() @ weight.T).to(dtype)

    def make():
        return Gram(9, space="clr", precision="fp64") if route == "gram" else Factor(weight, None, 9, precision="fp64")

    parts = []
    for lo in range(0, 40, 10):
        a = make()
        a.update(Chunk(stats=torch.zeros(10, 4, dtype=torch.float64), rows=rows[lo:lo + 10], features=feats[lo:lo + 10]))
        parts.append(a)
    reduced = make()
    reduced.load_state(sum_states([p.state() for p in parts], make().fixed_state_keys))
    assert reduced.inputs.name == parts[0].inputs.name == {torch.float64: "fp64", torch.float32: "fp32",
                                                           torch.bfloat16: "bf16"}[dtype]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), v=st.integers(5, 12), cuts=st.lists(st.integers(0, 40), max_size=5),
       order_seed=st.integers(0, 2**31 - 1), scale=st.floats(-6, 6), route=st.sampled_from(["gram", "factor", "sketch"]))
def test_merge_order_and_sharding_within_roundoff(n, v, cuts, order_seed, scale, route):
    """Any sharding of the rows and any merge order (Accumulator.merge, and the distributed
    reduction's sum of states) gives the one-pass state within the fp64 summation bound
    |Δ| ≤ γ_n·Σ|terms| (Higham 2002, §4.2), with γ_n = n·eps/(1 − n·eps)."""
    rng = np.random.default_rng(order_seed)
    d = 4
    feats = torch.from_numpy(rng.standard_normal((n, d)) * 10.0 ** scale)
    weight = torch.from_numpy(rng.standard_normal((v, d)))
    rows = feats @ weight.T  # (n, v) rows of a linear head: the factor route applies too
    stats = torch.from_numpy(rng.standard_normal((n, 4)))

    def make():
        if route == "gram":
            return Gram(v, space="clr", precision="fp64")
        if route == "factor":
            return Factor(weight, None, v, precision="fp64")
        return Sketch(v, 2, space="clr", seed=order_seed % 1000, n_probes=2)

    def fill(a, lo, hi):
        a.update(Chunk(stats=stats[lo:hi], rows=rows[lo:hi], features=feats[lo:hi]))
        return a

    one = fill(make(), 0, n)
    one_stats = RowStats()
    one_stats.update(Chunk(stats=stats))
    parts = [fill(make(), lo, hi) for lo, hi in _shards(n, cuts)]
    order = rng.permutation(len(parts))
    merged = make()
    for i in order:
        merged.merge(parts[i])
    reduced = make()
    reduced.load_state(sum_states([parts[i].state() for i in order[::-1]], make().fixed_state_keys))
    # Bound from the absolute values of the same sums.
    a_rows = (feats if route == "factor" else rows).abs().numpy()
    if route == "factor":
        bound_terms = a_rows.T @ a_rows
    elif route == "gram":
        bound_terms = a_rows.T @ a_rows
    else:
        x = np.abs(make().test_block().numpy())
        bound_terms = a_rows.T @ (a_rows @ x)
    gamma = 4 * (n + v) * EPS
    for got in (merged, reduced):
        assert got.n_rows == n
        for key, want in one.state().items():
            if key == "n_chunks":  # the sketch counts its updates: sharding changes that, not the sums
                continue
            g = np.asarray(got.state()[key])
            if np.issubdtype(np.asarray(want).dtype, np.floating) and np.asarray(want).ndim == 2:
                np.testing.assert_array_less(np.abs(np.tril(g) - np.tril(want)) if route != "sketch"
                                             else np.abs(g - want), gamma * bound_terms + 1e-300)
            else:
                np.testing.assert_allclose(g, want, rtol=gamma, atol=gamma * np.abs(np.asarray(want)).max())
    # The summed state finalises to the one-pass spectrum (Gram round-off model).
    s_one, s_got = one.finalize().sigma, reduced.finalize().sigma
    assert np.all(np.abs(s_one - s_got) <= 1e-9 * s_one[0] + 1e3 * EPS * s_one[0] ** 2 / np.maximum(s_one, 1e-300))
    stats_parts = []
    for lo, hi in _shards(n, cuts):
        r = RowStats()
        r.update(Chunk(stats=stats[lo:hi]))
        stats_parts.append(r.state())
    total = RowStats()
    total.load_state(sum_states(stats_parts))
    np.testing.assert_allclose(total.sums.numpy(), one_stats.sums.numpy(), rtol=0,
                               atol=gamma * float(stats.abs().sum()))


# ---- two processes (gloo) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_diagnostics(teacher64, corpus_file):
    """Per-layer anisotropy of the reference run's rows (one process, `estimate --diagnostics`)."""
    spec = run_estimate(**api_kwargs(teacher64, corpus_file, tokens=TOKENS, dtype="fp64", device="cpu",
                                     diagnostics=True))
    return np.asarray(spec.meta["anisotropy"])


@pytest.mark.slow  # torchrun: 2 gloo processes
def test_two_gloo_processes_equal_one(neox_dir, corpus_file, reference, ref_diagnostics, tmp_path):
    """torchrun --nproc_per_node=2 of the real CLI on the CPU (gloo), with checkpoints and the
    diagnostics on: the same rows (the plan does not depend on P), every state (the layers'
    anisotropy sums too) summed across processes before finalize."""
    out = tmp_path / "run2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rankest",
           *cli_args(neox_dir, corpus_file, out), "--checkpoint-every", "5", "--diagnostics"]
    proc = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("route gram: N = 2,048") == 1, "only rank 0 reports"
    got = read_spectrum_h5(out / "results.h5")
    assert got.meta["world_size"] == 2
    assert not (out / CHECKPOINT_NAME).exists()
    assert_same_spectrum(got, read_spectrum_h5(reference))
    summary = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(summary["anisotropy"], ref_diagnostics, rtol=1e-12)
    assert (out / "anisotropy.h5").exists() and (out / "head_spectrum.h5").exists()


def test_diagnostics_signal_then_resume_equals_uninterrupted(teacher64, corpus_file, tmp_path, monkeypatch,
                                                             ref_diagnostics):
    """--diagnostics with checkpoints: the layers' anisotropy sums are in the checkpoint."""
    out = tmp_path / "run"
    kw = dict(tokens=TOKENS, dtype="fp64", device="cpu", diagnostics=True, checkpoint_every=16)
    calls = {"n": 0}
    original = teacher64.hidden_states

    def hidden_states(ids):
        calls["n"] += 1
        if calls["n"] == 1 + 20:  # (call 1 is the one-token forward that sizes the accumulator)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(ids)

    with monkeypatch.context() as m:
        m.setattr(teacher64, "hidden_states", hidden_states)
        with pytest.raises(Interrupted):
            run_estimate(**api_kwargs(teacher64, corpus_file, out, **kw))
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.position["next_batch"] == 20 and "anisotropy" in ck.states
    spec = run_estimate(**api_kwargs(teacher64, corpus_file, out, resume=True, **kw))
    np.testing.assert_allclose(spec.meta["anisotropy"], ref_diagnostics, rtol=1e-13)


@pytest.mark.slow  # torchrun: 2 gloo processes
def test_checkpoint_of_one_process_resumed_by_two(teacher64, neox_dir, corpus_file, reference, tmp_path,
                                                  monkeypatch):
    """The number of processes may change on --resume: one process stops (SIGTERM) after 23 of
    the 64 chunks, torchrun with 2 gloo processes resumes its checkpoint; the result equals the
    uninterrupted one-process run (the plan, not P, fixes the rows; batch j of the rest goes to
    process j mod 2)."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_batch(m, teacher64, 23, signal.SIGTERM)
        with pytest.raises(Interrupted):
            run_estimate(**api_kwargs(teacher64, corpus_file, out, tokens=TOKENS, dtype="fp64", device="cpu"))
    assert read_checkpoint(out / CHECKPOINT_NAME).position["next_batch"] == 23
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rankest",
           *cli_args(neox_dir, corpus_file, out), "--resume"]
    proc = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_spectrum_h5(out / "results.h5")
    assert got.meta["world_size"] == 2 and got.meta["resumed_at_rows"] == 23 * SEQ
    assert_same_spectrum(got, read_spectrum_h5(reference))


# ---- --passes >= 2: the row cache is part of the checkpoint ------------------------------------------
def _sketch_kwargs(teacher, corpus_file, out=None, **kw):
    return api_kwargs(teacher, corpus_file, out, tokens=1024, route="sketch", rank_max=24, passes=3,
                      dtype="fp64", device="cpu", **kw)


@pytest.fixture(scope="module")
def ref_passes(teacher64, corpus_file):
    """The uninterrupted one-process --passes 3 run (1024 rows, 32 chunks, fp64 rows cached in fp64)."""
    return run_estimate(**_sketch_kwargs(teacher64, corpus_file))


def test_passes_signal_then_resume_equals_uninterrupted(teacher64, corpus_file, tmp_path, monkeypatch, ref_passes):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_batch(m, teacher64, 11, signal.SIGTERM)
        with pytest.raises(Interrupted):
            run_estimate(**_sketch_kwargs(teacher64, corpus_file, out, checkpoint_every=4))
    assert read_checkpoint(out / CHECKPOINT_NAME).position["next_batch"] == 11
    assert (out / "rows.h5").exists(), "the row cache is the interrupted run's state: kept"
    got = run_estimate(**_sketch_kwargs(teacher64, corpus_file, out, checkpoint_every=4, resume=True))
    assert got.meta["resumed_at_rows"] == 11 * SEQ and got.meta["passes"] == 3
    # the same rows in the same cache, the same passes: the same numbers
    np.testing.assert_array_equal(got.sigma, ref_passes.sigma)
    assert not (out / "rows.h5").exists() and not (out / CHECKPOINT_NAME).exists()


@pytest.mark.slow  # torchrun: 2 gloo processes
def test_passes_two_gloo_processes_equal_one(neox_dir, corpus_file, tmp_path, ref_passes):
    """torchrun with 2 processes, each caching its shard (rows.rank{r}.h5) and summing every
    pass's Tᵀ(T·X) with all-reduce: the one-process result up to fp64 round-off."""
    out = tmp_path / "run2"
    args = cli_args(neox_dir, corpus_file, out, tokens=1024)
    args[args.index("gram")] = "sketch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rankest",
           *args, "--rank-max", "24", "--passes", "3", "--checkpoint-every", "5"]
    proc = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_spectrum_h5(out / "results.h5")
    assert got.meta["world_size"] == 2 and got.n_rows == ref_passes.n_rows == 1024
    np.testing.assert_allclose(got.sigma, ref_passes.sigma, rtol=1e-10, atol=0)
    assert not list(out.glob("rows*.h5")) and not (out / CHECKPOINT_NAME).exists()


def test_passes_resume_needs_the_same_process_count(tmp_path):
    from rankest.runtime.distributed import World
    from rankest.estimator import EstimateConfig
    from rankest.estimator.multipass import open_row_cache as _open_row_cache

    cfg = EstimateConfig(out=str(tmp_path), passes=3)
    with pytest.raises(UserError, match="sharded over the 1 process"):
        _open_row_cache(cfg, World(size=2, rank=1), {"world_size": 1, "next_batch": 3}, n_cols=8, shard_rows=32,
                        row_dtype=torch.float64, rows_of_rank=lambda r, j: 0)
