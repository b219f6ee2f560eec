"""Targets other than a neural teacher through the one estimate pipeline.

* ``logits:PATH`` files (.npy, .safetensors, HDF5) and rows in memory: a planted rank-r logit
  matrix gives its exact numerical rank, σ against an fp64 SVD of the explicitly centred matrix;
  the three formats and the in-memory rows give bitwise the same spectrum; a file larger than the
  memory budget is streamed with a measured peak far below the file's size.
* n-gram targets now run through the run skeleton: killed after a checkpoint and resumed, they
  give bitwise the uninterrupted spectrum; two gloo processes give the one-process spectrum.

Tolerances: the Gram route forms TᵀT in fp64 from fp32 rows, so σ_i² is exact to ≈ 1e-12·σ_1²
(a few hundred fp64 roundings of σ_1²); the assertions use 1e-9·σ_1².
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import rankest
from rankest.errors import UserError
from rankest.estimator import run_estimate
from rankest.io.checkpoint import CHECKPOINT_NAME, read_checkpoint
from rankest.io.results import read_spectrum_h5
from rankest.runtime.run import Run
from rankest.targets import ngram as ngram_mod
from rankest.testing import subprocess_env, write_word_corpus

ROOT = Path(__file__).resolve().parents[1]


def planted(rng, n: int, v: int, r: int) -> np.ndarray:
    """(n, v) fp32 logits of rank r plus a random per-row shift (which clr removes)."""
    z = rng.standard_normal((n, r)) @ rng.standard_normal((r, v)) + 5 * rng.standard_normal((n, 1))
    return z.astype(np.float32)


def centred_sigma(z: np.ndarray) -> np.ndarray:
    """The oracle: fp64 singular values of the explicitly built clr matrix z − mean(z)."""
    z = z.astype(np.float64)
    return np.linalg.svd(z - z.mean(axis=1, keepdims=True), compute_uv=False)


@pytest.fixture(scope="module")
def logits_files(tmp_path_factory):
    rng = np.random.default_rng(20261203)
    z = planted(rng, 3000, 120, 7)
    d = tmp_path_factory.mktemp("logits")
    np.save(d / "z.npy", z)
    from safetensors.numpy import save_file

    save_file({"other": z[:10, :5].copy(), "logits": z}, str(d / "z.safetensors"))
    with h5py.File(d / "z.h5", "w") as f:
        f.create_dataset("val/logits", data=z, chunks=(256, 120))
    return z, d


def test_planted_rank_is_exact_and_sigma_matches_the_fp64_svd(logits_files):
    z, d = logits_files
    spec = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="clr", tokens=None, quiet=True)
    truth = centred_sigma(z)
    assert spec.route == "gram" and spec.exact and spec.n_rows == 3000 and spec.n_cols == 120
    assert spec.numerical_rank == 7
    np.testing.assert_allclose(spec.sigma[:20] ** 2, truth[:20] ** 2, rtol=0, atol=1e-9 * truth[0] ** 2)
    np.testing.assert_allclose(spec.energy, (truth ** 2).sum(), rtol=1e-9)
    assert np.isnan(spec.meta["nll"])  # no next-token targets: the NLL is not defined
    assert sorted(spec.convergence) == [375, 750, 1500, 3000]


def test_the_three_formats_and_rows_in_memory_give_the_same_spectrum(logits_files):
    z, d = logits_files
    want = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="prob", tokens=None, quiet=True)
    for spec in (f"logits:{d / 'z.safetensors'}::logits", f"logits:{d / 'z.h5'}::val/logits"):
        got = rankest.estimate(teacher=spec, space="prob", tokens=None, quiet=True)
        np.testing.assert_array_equal(got.sigma, want.sigma)
    chunks = [torch.from_numpy(z[a:a + 700]) for a in range(0, 3000, 700)]  # chunks of another size
    mem = rankest.estimate(rows=chunks, space="prob", tokens=None, quiet=True)
    np.testing.assert_array_equal(mem.sigma, want.sigma)
    assert mem.meta["teacher"] == "rows"


def test_a_sample_of_rows_and_the_sketch_route(logits_files):
    z, d = logits_files
    sample = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="clr", tokens=1000, seed=3, quiet=True)
    assert sample.n_rows == 1000 and sample.numerical_rank == 7
    again = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="clr", tokens=1000, seed=3, quiet=True)
    np.testing.assert_array_equal(sample.sigma, again.sigma)  # the sample is seeded
    exact = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="prob", tokens=None, quiet=True)
    sk = rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="prob", tokens=None, route="sketch", rank_max=10,
                          quiet=True)
    assert sk.route == "sketch" and not sk.exact
    assert np.all(sk.sigma[:10] <= exact.sigma[:10] * (1 + 1e-6))  # Nyström never overestimates


def test_passes_auto_on_stored_rows_is_accuracy_driven(tmp_path, capsys):
    """Stored rows (a logits file) on the sketch route: ``--passes auto`` caches them and adds
    passes until randomized_svd's estimate of σ_1…σ_k meets 1e-3; σ̂ within 1e-3 of the fp64 SVD
    of the explicitly centred matrix on a slowly decaying (i^-0.5) spectrum, where one pass is
    ~1e-1 off; the passes and the estimate are in results.json and on the summary line."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 31)))
    n, v, k = 2000, 240, 24
    i = np.arange(1, v + 1, dtype=np.float64)
    u = np.linalg.qr(rng.standard_normal((n, v)))[0]
    w = np.linalg.qr(rng.standard_normal((v, v)))[0]
    z = ((u * (30.0 * i ** -0.5)) @ w.T + 3 * rng.standard_normal((n, 1))).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    truth = centred_sigma(z)[:k]
    out = tmp_path / "run"
    spec = rankest.estimate(teacher=f"logits:{tmp_path / 'z.npy'}", space="clr", tokens=None, route="sketch",
                            rank_max=k, quiet=True, out=str(out))
    err = spec.meta["sketch_error"]
    assert spec.meta["passes_auto"] and spec.meta["passes"] >= 2 and spec.meta["method"] == "krylov"
    assert "--passes auto" in spec.meta["route_reason"] and not (out / "rows.h5").exists()
    assert err["sigma_rel_error"] <= err["tol"] == 1e-3
    assert np.max(np.abs(spec.sigma - truth) / truth) <= 1e-3
    one = rankest.estimate(teacher=f"logits:{tmp_path / 'z.npy'}", space="clr", tokens=None, route="sketch",
                           rank_max=k, passes=1, quiet=True)
    assert one.meta["passes"] == 1 and np.max(np.abs(one.sigma - truth) / truth) > 1e-2
    saved = json.loads((out / "results.json").read_text())
    assert saved["passes"] == spec.meta["passes"] and saved["passes_auto"] is True
    assert saved["sketch_error"]["sigma_rel_error"] == err["sigma_rel_error"]
    from rankest import cli

    assert cli.main(["estimate", "--teacher", f"logits:{tmp_path / 'z.npy'}", "--space", "clr", "--route", "sketch",
                     "--rank-max", str(k), "--quiet"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  sketch:")][0]
    assert "(auto), krylov" in line and "(tol 0.001)" in line


def test_bad_uses_of_a_logits_target_are_refused(logits_files, tmp_path):
    z, d = logits_files
    with pytest.raises(UserError, match="linear head"):
        rankest.estimate(teacher=f"logits:{d / 'z.npy'}", space="clr", route="factor", tokens=None, quiet=True)
    with pytest.raises(UserError, match="--diagnostics"):
        rankest.estimate(teacher=f"logits:{d / 'z.npy'}", diagnostics=True, quiet=True)
    bad = z.copy()
    bad[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(UserError, match="row 17 "):
        rankest.estimate(teacher=f"logits:{tmp_path / 'nan.npy'}", tokens=None, quiet=True)
    with pytest.raises(UserError, match="needs a file"):
        rankest.estimate(teacher="logits:", quiet=True)


MEASURE = """
import json, resource, sys, torch
torch.set_num_threads(1)
import rankest
big, small = sys.argv[1], sys.argv[2]
rankest.estimate(teacher="logits:" + small, space="clr", tokens=None, max_memory="16MB", quiet=True)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = rankest.estimate(teacher="logits:" + big, space="clr", tokens=None, max_memory="16MB", quiet=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rise_bytes": (after - before) * 1024, "rank": spec.numerical_rank, "route": spec.route}))
"""


@pytest.mark.slow
def test_a_file_larger_than_the_budget_is_streamed_in_chunks(tmp_path):
    """The CLI on a 96 MiB file with --max-memory 16MB gives the planted rank; the Python run's peak
    RSS rises by far less than the file (a warm-up run first loads the extension and imports)."""
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(7)
    n, v, r = 49152, 512, 23
    big = open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, v))
    basis = rng.standard_normal((r, v)).astype(np.float32)
    for a in range(0, n, 8192):
        big[a:a + 8192] = rng.standard_normal((8192, r)).astype(np.float32) @ basis
    big.flush()
    del big
    np.save(tmp_path / "small.npy", planted(rng, 2000, v, r))
    size = os.path.getsize(tmp_path / "big.npy")
    assert size > 90 * 2**20 > 16 * 10**6
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rankest", "estimate", "--teacher", f"logits:{tmp_path / 'big.npy'}",
                           "--space", "clr", "--tokens", "all", "--max-memory", "16MB", "--out", str(out), "--quiet"],
                          env=subprocess_env(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["numerical_rank"] == r and summary["n_rows"] == n and summary["route"] == "gram"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big.npy"), str(tmp_path / "small.npy")],
                          env=subprocess_env(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rank"] == r
    assert got["rise_bytes"] < size / 2, f"peak RSS rose by {got['rise_bytes'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


# ---- n-gram targets through the run skeleton -------------------------------------------------
@pytest.fixture(scope="module")
def ngram_corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("ngram") / "words.txt", seed=4, paragraphs=60)


def ngram_args(tiny_neox_dir, corpus, order=4, **kw):
    return dict(teacher=f"ngram:{order}", tokenizer=str(tiny_neox_dir), corpus=corpus, space="prob", smoothing="add-k:1",
                quiet=True, **kw)


def test_ngram_killed_after_a_checkpoint_resumes_bitwise(tiny_neox_dir, ngram_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(ngram_mod, "CHUNK_ROWS", 256)  # several units on a small corpus
    want = run_estimate(**ngram_args(tiny_neox_dir, ngram_corpus))
    assert want.n_rows > 4 * 256, "the corpus must give several units"
    out = tmp_path / "run"
    original = Run.save

    def save_then_crash(self, *, position, **kw):
        original(self, position=position, **kw)
        if position["next_batch"] == 3:
            raise KeyboardInterrupt  # a crash right after the checkpoint of unit 3

    with monkeypatch.context() as m:
        m.setattr(Run, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            run_estimate(**ngram_args(tiny_neox_dir, ngram_corpus, out=str(out), checkpoint_every=1))
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.position["next_batch"] == 3 and ck.position["route"] == "gram" and "sparse_gram" in ck.states
    got = run_estimate(**ngram_args(tiny_neox_dir, ngram_corpus, out=str(out), resume=True))
    assert got.meta["resumed_at_rows"] == 3 * 256
    np.testing.assert_array_equal(got.sigma, want.sigma)
    assert got.energy == want.energy and got.n_cols == want.n_cols
    assert got.convergence == want.convergence
    assert not (out / CHECKPOINT_NAME).exists()
    assert read_spectrum_h5(out / "results.h5").meta["contexts"] == want.meta["contexts"]


@pytest.mark.slow
def test_ngram_two_gloo_processes_equal_one(tiny_neox_dir, tmp_path_factory):
    corpus = write_word_corpus(tmp_path_factory.mktemp("ngram2") / "words.txt", seed=5, paragraphs=300)
    one = run_estimate(**ngram_args(tiny_neox_dir, corpus, order=6))
    assert one.n_rows > 2 * ngram_mod.CHUNK_ROWS, "two processes need several units"
    out = tmp_path_factory.mktemp("ngram2run") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rankest",
           "estimate", "--teacher", "ngram:6", "--tokenizer", str(tiny_neox_dir), "--corpus", corpus, "--space", "prob",
           "--smoothing", "add-k:1", "--checkpoint-every", "1", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_spectrum_h5(out / "results.h5")
    assert got.meta["world_size"] == 2 and got.n_rows == one.n_rows
    np.testing.assert_allclose(got.sigma, one.sigma, rtol=1e-10, atol=1e-12 * one.sigma[0])
    np.testing.assert_allclose(got.energy, one.energy, rtol=1e-12)
