"""`heads --family`: each family's forward against explicit fp64 loops, parameter counts and their
inversion, the output-rank measurement against numpy's fp64 SVD, seed intervals and the knee on
planted curves, a families run on a tiny random NeoX (MoS measured above d, linear ≤ r), resume
bit for bit, and the warnings when training undoes the init.
"""

import math
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import rankest.heads.family_sweep as fs_mod
from rankest import UserError, fit_heads
from rankest.heads import HeadsResult
from rankest.heads.families import FamilySpec, make_head, parse_families, rank_for_params
from rankest.heads.intervals import knee, knee_index, mean_interval
from rankest.heads.output_rank import output_spectrum, resolved_rank
from rankest.runtime.run import Interrupted

SEQ = 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus_file(make_word_corpus):
    return make_word_corpus("families-corpus", seed=29, paragraphs=60)


@pytest.fixture(scope="module")
def neox64(make_tiny_neox, load_tiny_teacher):
    return load_tiny_teacher(str(make_tiny_neox("families-neox", context_length=128, seed=8)), "fp64")


def run(teacher, corpus, **kw):
    opts = dict(teacher=teacher, corpus=corpus, seq_len=SEQ, tokens=512, val_tokens=256, batch_size=4, quiet=True,
                seed=3, ranks="4,8,full", init="scaled", lr=1e-2, steps=6)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short-schedule warning: tested on its own below
        return fit_heads(**opts)


# ---- the families against explicit loops ------------------------------------------------------------
def _np(p):
    return p.detach().numpy()


def _log_softmax(z):
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def brute_log_probs(head, h):
    """Row by row, component by component, in numpy fp64."""
    A, b = _np(head.A), (np.zeros(head.n_cols) if head.b is None else _np(head.b))
    out = np.zeros((h.shape[0], head.n_cols))
    for i, x in enumerate(h):
        if head.family in ("linear", "sigsoftmax"):
            z = A @ (_np(head.B) @ x) + b
            if head.family == "sigsoftmax":  # p_j ∝ exp(z_j)·σ(z_j)
                w = np.exp(z) / (1 + np.exp(-z))
                out[i] = np.log(w / w.sum())
            else:
                out[i] = _log_softmax(z)
        elif head.family == "mlp":
            u = _np(head.W) @ x + _np(head.c)
            u = 0.5 * u * (1 + np.array([math.erf(v / math.sqrt(2)) for v in u]))  # exact GELU
            out[i] = _log_softmax(A @ (_np(head.B) @ u) + b)
        else:
            K, r = head.width, head.rank
            gate = np.exp(_log_softmax(_np(head.G) @ x + _np(head.g)))
            p = np.zeros(head.n_cols)
            for k in range(K):
                ctx = np.tanh(_np(head.P)[k * r:(k + 1) * r] @ x + _np(head.c)[k * r:(k + 1) * r])
                p += gate[k] * np.exp(_log_softmax(A @ ctx + b))
            out[i] = np.log(p)
    return out


@pytest.mark.parametrize("family", ["linear", "mos:3", "sigsoftmax", "mlp:7"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_brute_force_and_counts(family, bias):
    spec = parse_families(family)[0]
    d, v, r = 6, 11, 3
    head = make_head(spec, d, v, r, bias=bias)
    head.reset(torch.Generator().manual_seed(4), "scaled")
    with torch.no_grad():  # non-zero biases, so they are checked too
        for p in head.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.3)
    h = torch.randn(9, d, dtype=torch.float64)
    got = head(h).detach().numpy()
    np.testing.assert_allclose(got, brute_log_probs(head, h.numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-12)
    assert head.n_params() == type(head).count(d, v, r, bias=bias, arg=spec.arg)
    # --match-params: the largest rank within a linear head's count
    target = make_head(FamilySpec("linear"), d, v, 5, bias=bias).n_params()
    own = rank_for_params(spec, target, d, v, bias=bias)
    assert make_head(spec, d, v, own, bias=bias).n_params() <= target or own == 1
    assert make_head(spec, d, v, own + 1, bias=bias).n_params() > target


def test_parse_families_refuses_bad_entries():
    assert [f.label for f in parse_families("linear, mos:4,sigsoftmax,mlp:64,linear")] == \
        ["linear", "mos:4", "sigsoftmax", "mlp:64"]
    for bad in ("mos", "mos:0", "linear:3", "softmax", "mlp:x", ""):
        with pytest.raises(UserError):
            parse_families(bad)


# ---- the output rank against numpy's SVD -----------------------------------------------------------
@pytest.mark.parametrize("n", [40, 90])  # V' = 60: the n×n route (n < V') and the V'×V' route
def test_output_spectrum_equals_fp64_svd(n):
    d, v, r = 8, 60, 3
    h = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for spec, rank_ok in ((FamilySpec("linear"), lambda k: k <= r), (FamilySpec("mos", 4), lambda k: k > d)):
        head = make_head(spec, d, v, r, bias=False)
        head.reset(torch.Generator().manual_seed(9), "scaled")
        with torch.no_grad():  # weights 3× the init's: a clearly non-linear mixture (and a larger linear head)
            for p in head.parameters():
                p.mul_(3)
        got = output_spectrum(head, h, v, chunk=16)
        lp = head(h).detach().numpy()
        t = lp - lp.mean(1, keepdims=True)
        sv = np.linalg.svd(t, compute_uv=False)
        # the Gram route's precision: σ² to fp64 round-off of σ_1², so σ to sqrt(eps·V)·σ_1 absolutely
        np.testing.assert_allclose(got.sigma[:len(sv)], sv, rtol=1e-9, atol=4 * math.sqrt(2.2e-16 * max(n, v)) * sv[0])
        assert got.energy == pytest.approx((t ** 2).sum(), rel=1e-12)
        assert got.n_rows == n and got.n_cols == v and got.space == "clr"
        assert rank_ok(got.numerical_rank) and rank_ok(resolved_rank(got)), (spec, got.numerical_rank)
        assert resolved_rank(got) == int((sv > 1e-6 * sv[0]).sum())
    assert got.numerical_rank == min(n, v - 1)  # a generic MoS matrix: full clr rank (centring removes one)


# ---- intervals and the knee ----------------------------------------------------------------------
def test_mean_interval_is_student_t():
    x = [1.0, 2.0, 4.5]
    m, half = mean_interval(x)
    assert m == pytest.approx(np.mean(x))
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3))
    assert math.isnan(mean_interval([3.0])[1])


def test_knee_on_a_planted_curve():
    ranks = [4, 8, 16, 32, 64, 128, 256]
    # 0.4 nats per doubling up to r = 32, then 0.01: the knee is 32
    base = np.array([3.0 - 0.4 * min(i, 3) - 0.01 * max(0, i - 3) for i in range(len(ranks))])
    assert knee_index(ranks, base, 0.05) == 3
    noisy = base + np.random.default_rng(0).normal(0, 0.005, (5, len(ranks)))
    k = knee(ranks, noisy, 0.05)
    assert k["rank"] == 32 and k["low"] <= 32 <= k["high"] and k["no_knee_share"] == 0
    # still improving at the largest rank: no knee
    assert knee(ranks, 3.0 - 0.3 * np.arange(len(ranks))[None], 0.05)["rank"] is None
    # uneven rank spacing counts per doubling: 0.12 over two doublings is 0.06 > 0.05
    assert knee_index([8, 32, 64], [3.0, 2.88, 2.87], 0.05) == 1
    assert knee_index([8, 32, 64], [3.0, 2.92, 2.91], 0.05) == 0


# ---- a families run on a tiny random NeoX --------------------------------------------------------
def test_families_run_ranks_counts_and_intervals(neox64, corpus_file, tmp_path):
    out = tmp_path / "fam"
    res = run(neox64, corpus_file, family="linear,mos:4,sigsoftmax,mlp:16", seeds=3, match_params=True,
              rank_rows=200, out=str(out))
    fam = res.families
    d = res.meta["hidden_size"]
    linear = {g["label"]: g for g in fam["groups"] if g["family"] == "linear"}
    for g in fam["groups"]:
        assert g["seeds"] == 3 and g["val_loss_ci95"] > 0 and math.isfinite(g["val_loss"])
        assert g["n_params"] <= linear[g["label"]]["n_params"]  # equal-or-below the linear head's count
        if g["family"] in ("linear", "mlp:16"):
            assert g["output_numerical_rank_max"] <= g["rank"] and g["output_resolved_rank_max"] <= g["rank"]
    mos = [g for g in fam["groups"] if g["family"] == "mos:4"]
    assert max(g["output_resolved_rank_min"] for g in mos) > d  # MoS escapes the bottleneck
    assert fam["teacher_output_rank"]["resolved_rank"] <= d
    for h in fam["heads"]:
        assert h["gap_to_teacher"] == pytest.approx(h["val_loss"] - res.reference["loss"])
    assert set(fam["knees"]) == {"linear", "mos:4", "sigsoftmax", "mlp:16"}
    back = HeadsResult.load(out / "heads.h5")
    assert back.families["groups"] == fam["groups"] and back.families["w_error"].shape[0] == len(fam["heads"])
    np.testing.assert_array_equal(back.families["train_loss"], fam["train_loss"])
    text = (out / "heads.md").read_text()
    assert "## Head families" in text and "Knee of loss vs rank" in text
    for png in ("heads_families_loss_vs_params.png", "heads_families_loss_vs_rank.png",
                "heads_families_output_rank.png"):
        assert (out / png).stat().st_size > 10_000


def test_families_kl_objective_reports_kl_and_gap(neox64, corpus_file):
    res = run(neox64, corpus_file, family="linear,mos:2", objective="kl", ranks="4,full")
    for g in res.families["groups"]:
        assert g["val_kl"] is not None and g["val_kl"] > 0
        assert g["gap_to_teacher"] == pytest.approx(g["val_loss"] - res.reference["loss"], abs=1e-12)
    # the families' linear heads and the rank sweep's distil the same teacher: same KL scale
    lin = [g["val_kl"] for g in res.families["groups"] if g["family"] == "linear"]
    np.testing.assert_allclose(lin, res.val_kl, rtol=0.5)


def test_families_resume_bit_identical(neox64, corpus_file, tmp_path, monkeypatch):
    kw = dict(family="linear,mos:2,mlp:8", seeds=2, steps=8, checkpoint_every=3)
    want = run(neox64, corpus_file, out=str(tmp_path / "a"), **kw)
    calls = {"n": 0}
    original = fs_mod.FamilySweep.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(fs_mod.FamilySweep, "step", step)
        with pytest.raises(Interrupted):
            run(neox64, corpus_file, out=str(tmp_path / "b"), **kw)
    got = run(neox64, corpus_file, out=str(tmp_path / "b"), resume=True, **kw)
    assert got.meta["resumed_at_step"] == 5
    np.testing.assert_array_equal(got.families["train_loss"], want.families["train_loss"])
    assert [h["val_loss"] for h in got.families["heads"]] == [h["val_loss"] for h in want.families["heads"]]
    assert got.val_loss == want.val_loss


def test_warns_when_training_undoes_the_svd_init(neox64, corpus_file):
    """svd init, two steps at a large peak LR (AdamW's first steps move every weight by ≈ the LR):
    the heads end worse than their truncation; both warnings fire and the result records it."""
    with pytest.warns(UserWarning) as got:
        res = fit_heads(teacher=neox64, corpus=corpus_file, seq_len=SEQ, tokens=512, val_tokens=256, batch_size=4,
                        quiet=True, seed=3, ranks="4,8,full", init="svd", steps=2, lr=0.5)
    text = " ".join(str(w.message) for w in got)
    assert "far too short for the schedule" in text
    assert "raised the validation loss above the init's" in text
    assert res.meta["warnings"] and all(v > i for v, i in zip(res.val_loss, res.init_loss))
    assert res.init_loss == res.truncation_loss_feature


def test_option_errors():
    for kw in (dict(seeds=2), dict(match_params=True), dict(family="linear", knee_threshold=0.0),
               dict(family="mos:0")):
        with pytest.raises(UserError):
            fit_heads(teacher="none", **kw)


@pytest.mark.slow  # torchrun: 2 gloo processes
def test_families_two_gloo_processes_equal_one(neox64, corpus_file, tmp_path):
    """torchrun --nproc_per_node=2 of the real CLI: every family head's loss and output rank as in one process."""
    import subprocess
    import sys
    from pathlib import Path

    from rankest.testing import subprocess_env

    kw = dict(family="linear,mos:2,sigsoftmax", seeds=2, rank_rows=200)
    want = run(neox64, corpus_file, **kw)
    out = tmp_path / "run"
    args = ["heads", "--teacher", neox64.source.split(":", 1)[1], "--corpus", corpus_file, "--dtype", "fp64",
            "--seq-len", str(SEQ), "--tokens", "512", "--val-tokens", "256", "--batch-size", "4", "--seed", "3",
            "--ranks", "4,8,full", "--init", "scaled", "--lr", "1e-2", "--steps", "6", "--family", kw["family"],
            "--seeds", "2", "--rank-rows", "200", "--device", "cpu", "--quiet", "--out", str(out),
            "--checkpoint-every", "3"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rankest", *args], env=subprocess_env(root), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = HeadsResult.load(out / "heads.h5")
    assert got.meta["world_size"] == 2
    np.testing.assert_allclose([h["val_loss"] for h in got.families["heads"]],
                               [h["val_loss"] for h in want.families["heads"]], rtol=1e-10)
    assert [h["output_rank"]["resolved_rank"] for h in got.families["heads"]] == \
        [h["output_rank"]["resolved_rank"] for h in want.families["heads"]]


def test_schema_1_heads_file_still_reads_and_renders(neox64, corpus_file, tmp_path):
    """A heads.h5 of schema 1 (no init_loss, no families) loads and renders its report."""
    import json

    import h5py

    from rankest.report.heads import write_heads_report

    out = tmp_path / "old"
    run(neox64, corpus_file, out=str(out))
    with h5py.File(out / "heads.h5", "r+") as f:
        assert int(f.attrs["schema_version"]) == 2
        summary = json.loads(f.attrs["summary"])
        del summary["init_loss"]
        f.attrs["summary"] = json.dumps(summary)
        f.attrs["schema_version"] = 1
        del f.attrs["sha256"]  # schema 1 predates the file checksum
    back = HeadsResult.load(out / "heads.h5")
    assert back.init_loss is None and back.families is None
    write_heads_report(out, back)
    assert "| loss at init |" in (out / "heads.md").read_text()
