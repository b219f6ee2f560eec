"""Representation diagnostics (rankest.diagnostics.pipeline, rankest.sources.revisions) against oracles.

* anisotropy: the O(n·d) streamed formula against the brute-force mean of the n×n cosine
  matrix, on random data and on a random GPT-NeoX's real hidden states (read through the full
  model's own forward); mean norm and PC1 share against numpy's covariance eigenvalues;
* head spectrum: against numpy.linalg.svd of the explicit matrix and the explicit rank-d
  truncation; KL(σ̂‖u) = 0 for a flat spectrum and log n for one spike;
* sweeps over local checkpoints (random models saved with save_pretrained) end to end, with an
  interrupted sweep resumed; `estimate --diagnostics` on the same forward passes; bad input.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch

import rankest
from rankest import cli
from rankest.sources.corpus import iter_batches, load_documents, pack_windows, plan_rows
from rankest.accumulate.anisotropy import Anisotropy
from rankest.diagnostics.head_spectrum import head_spectrum_metrics, singular_entropy_kl, teacher_head_spectrum
from rankest.diagnostics.commands import run_anisotropy, run_head_spectrum
from rankest.diagnostics.anisotropy import teacher_anisotropy
from rankest.errors import UserError
from rankest.sources.revisions import Checkpoint, resolve_checkpoints
from rankest.io.sweep_results import read_results
from rankest.diagnostics.commands import sweep_checkpoints
from rankest.sources.teachers import build_tiny_neox, load_teacher

SEQ = 16


# ---- oracles -----------------------------------------------------------------------------------
def brute_anisotropy(x: np.ndarray) -> float:
    """Mean cosine over the n² − n ordered pairs i ≠ j of the non-zero rows, from the n×n matrix."""
    x = x[np.linalg.norm(x, axis=1) > 0].astype(np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    n = len(u)
    return float((c.sum() - np.trace(c)) / (n * n - n))


def pc1_share(x: np.ndarray) -> float:
    lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T, bias=True))
    return float(lam[-1] / lam.sum())


def _random_layers(rng, n, widths):
    """Rows with a shared offset (so anisotropy is far from 0) and a few exact zero rows."""
    out = []
    for w in widths:
        x = rng.standard_normal((n, w)) + rng.uniform(0.2, 2.0) * rng.standard_normal(w)
        x[rng.choice(n, 3, replace=False)] = 0.0
        out.append(x)
    return out


# ---- anisotropy --------------------------------------------------------------------------------
def test_anisotropy_matches_brute_force_on_random_layers_of_different_widths():
    rng = np.random.default_rng()
    n, widths = int(rng.integers(150, 300)), [7, 24, 13]
    layers = _random_layers(rng, n, widths)
    acc = Anisotropy(widths)
    cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, n]):  # uneven chunks; fp32 inputs as a teacher gives them
        acc.update([torch.from_numpy(x[lo:hi]).float() for x in layers])
    res = acc.finalize()
    for l, x in enumerate(layers):
        x32 = x.astype(np.float32)
        # fp64 sums of fp32 inputs: the only error is fp64 round-off, ≈ n·1e-16.
        assert res["anisotropy"][l] == pytest.approx(brute_anisotropy(x32), abs=1e-12)
        assert res["mean_norm"][l] == pytest.approx(np.linalg.norm(x32.astype(np.float64), axis=1).mean(), rel=1e-12)
        assert res["pc1_variance_share"][l] == pytest.approx(pc1_share(x32), rel=1e-9)
    assert res["width"].tolist() == widths
    assert res["depth"].tolist() == [0.0, 0.5, 1.0]
    assert int(res["n_rows"]) == n


def test_anisotropy_of_identical_and_opposite_directions():
    rng = np.random.default_rng()
    v = rng.standard_normal(9)
    scales = rng.uniform(0.1, 5.0, 20)
    acc = Anisotropy([9])
    acc.update([torch.from_numpy(scales[:, None] * v)])
    assert acc.finalize()["anisotropy"][0] == pytest.approx(1.0, abs=1e-13)
    acc = Anisotropy([9])
    acc.update([torch.from_numpy(np.stack([v, -2 * v]))])  # n = 2, one pair with cosine −1
    assert acc.finalize()["anisotropy"][0] == pytest.approx(-1.0, abs=1e-13)


def test_anisotropy_merge_and_state_equal_one_pass():
    rng = np.random.default_rng()
    widths = [5, 11]
    layers = _random_layers(rng, 80, widths)
    whole, a, b = Anisotropy(widths), Anisotropy(widths), Anisotropy(widths)
    whole.update([torch.from_numpy(x) for x in layers])
    a.update([torch.from_numpy(x[:30]) for x in layers])
    b.update([torch.from_numpy(x[30:]) for x in layers])
    a.merge(b)
    restored = Anisotropy(widths)
    restored.load_state(a.state())
    for acc in (a, restored):
        got = acc.finalize()
        for key, want in whole.finalize().items():
            np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        a.merge(Anisotropy([5, 12]))


def test_anisotropy_needs_two_rows():
    acc = Anisotropy([4])
    acc.update([torch.ones(1, 4)])
    with pytest.raises(UserError, match="at least 2"):
        acc.finalize()
    with pytest.raises(UserError, match="at least 2"):
        run_anisotropy(teacher="unused-because-tokens-fail-first", tokens=1)


def test_anisotropy_on_real_hidden_states_of_a_random_neox(tiny_teacher):
    teacher = tiny_teacher
    windows = pack_windows(load_documents("lee")[:40], teacher.tokenizer, SEQ, progress=False)
    plan = plan_rows(len(windows), SEQ, tokens=300, seed=int(np.random.default_rng().integers(1000)))
    res = teacher_anisotropy(teacher, windows, plan, batch_size=8, quiet=True)
    # Oracle: the hidden states of the full model's own forward, gathered explicitly.
    per_layer = None
    with torch.inference_mode():
        for b in iter_batches(windows, plan, 8):
            hs = teacher.model(input_ids=b.input_ids, output_hidden_states=True, use_cache=False).hidden_states
            rows = [h[b.mask].double().numpy() for h in hs]
            per_layer = rows if per_layer is None else [np.vstack([p, r]) for p, r in zip(per_layer, rows)]
    n_blocks = teacher.model.config.num_hidden_layers
    assert len(per_layer) == n_blocks + 1 == len(res["anisotropy"])
    for l, x in enumerate(per_layer):
        assert x.shape[0] == 300
        assert res["anisotropy"][l] == pytest.approx(brute_anisotropy(x), abs=1e-10)
        assert res["pc1_variance_share"][l] == pytest.approx(pc1_share(x), rel=1e-8)
    # The last representation is the head's input (after the final LayerNorm) in transformers ≥ 5.
    assert res["last_is_head_input"] is True


# ---- head spectrum -----------------------------------------------------------------------------
def test_head_spectrum_matches_numpy_svd_and_explicit_truncation():
    rng = np.random.default_rng()
    v_real, pad, d = int(rng.integers(60, 120)), int(rng.integers(1, 20)), int(rng.integers(8, 30))
    w = rng.standard_normal((v_real + pad, d)) * np.exp(-np.arange(d) / 4.0)  # a decaying spectrum
    w[v_real:] = 1e3  # padded rows must be ignored
    m = head_spectrum_metrics(torch.from_numpy(w).float(), v_real, top=5)
    real = w[:v_real].astype(np.float32).astype(np.float64)
    u, s, vt = np.linalg.svd(real, full_matrices=False)
    np.testing.assert_allclose(m["head_sigma"], s, rtol=1e-12)
    np.testing.assert_allclose(m["head_sigma_ratio"], s[:5] / s[0], rtol=1e-12)
    for k in (1, d // 2, d - 1):
        approx = (u[:, :k] * s[:k]) @ vt[:k]
        want = np.linalg.norm(real - approx) / np.linalg.norm(real)
        assert m["head_w_error"][k - 1] == pytest.approx(want, rel=1e-9, abs=1e-12)
    p = s / s.sum()
    assert m["head_singular_entropy_kl"] == pytest.approx(np.sum(p * np.log(p * d)), abs=1e-12)
    q = s ** 2 / np.sum(s ** 2)
    assert m["head_singular_entropy_kl_sq"] == pytest.approx(np.sum(q * np.log(q * d)), abs=1e-12)
    assert m["head_effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    assert m["head_singular_entropy_max"] == pytest.approx(math.log(d))
    assert (m["head_n_rows"], m["head_n_cols"]) == (v_real, d)


@pytest.mark.parametrize("power", [1, 2])
def test_singular_entropy_flat_and_one_spike(power):
    rng = np.random.default_rng()
    n = int(rng.integers(2, 500))
    assert singular_entropy_kl(np.full(n, rng.uniform(0.1, 10)), power=power) == pytest.approx(0.0, abs=1e-12)
    spike = np.zeros(n)
    spike[rng.integers(n)] = rng.uniform(0.1, 10)
    assert singular_entropy_kl(spike, power=power) == pytest.approx(math.log(n), abs=1e-12)
    # In between: strictly between the two for a non-flat, non-spike spectrum.
    s = np.sort(rng.uniform(0.1, 1.0, n))[::-1]
    assert 0 < singular_entropy_kl(s, power=power) < math.log(n)


def test_model_without_accessible_head_is_a_clear_error(fresh_tiny_teacher):
    teacher = fresh_tiny_teacher  # its own: the test takes its head away
    teacher.model.get_output_embeddings = lambda: None
    with pytest.raises(UserError, match="no output embeddings"):
        teacher_head_spectrum(teacher)


# ---- sweeps over local checkpoints -------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    """A folder with two checkpoints of one tiny model (same tokenizer, other weights)."""
    root = tmp_path_factory.mktemp("ckpts")
    _, tok = build_tiny_neox(hidden_size=16, layers=2, heads=2, context_length=64, seed=1, save_dir=root / "step1")
    build_tiny_neox(hidden_size=16, layers=2, heads=2, context_length=64, seed=2, save_dir=root / "step2",
                    tokenizer=tok)
    return root


def test_head_spectrum_sweep_end_to_end(ckpt_root, tmp_path):
    out = tmp_path / "hs"
    res = rankest.head_spectrum(teacher=str(ckpt_root), revisions="step1,step2", device="cpu", dtype="fp32",
                                out=str(out), quiet=True)
    assert list(res) == ["step1", "step2"]
    for label in res:
        w = load_teacher(ckpt_root / label, device="cpu", dtype="fp32")
        s = np.linalg.svd(w.head()[0][: w.n_cols].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(res[label]["head_sigma"], s, rtol=1e-12)
    assert not np.allclose(res["step1"]["head_sigma"], res["step2"]["head_sigma"])
    config, stored = read_results(out / "head_spectrum.h5", "head_spectrum")
    assert list(stored) == ["step1", "step2"] and config["revisions"] == ["step1", "step2"]
    np.testing.assert_array_equal(stored["step2"]["head_sigma"], res["step2"]["head_sigma"])
    summary = json.loads((out / "head_spectrum.json").read_text())
    assert summary["revisions"] == ["step1", "step2"]
    assert summary["results"]["step1"]["head_singular_entropy_kl"] == pytest.approx(
        res["step1"]["head_singular_entropy_kl"])
    report = (out / "report.md").read_text()
    assert "Output head spectrum" in report and "head_sigma_heatmap.png" in report
    assert (out / "head_sigma_heatmap.png").stat().st_size > 0
    assert (out / "head_singular_entropy.png").stat().st_size > 0


def test_anisotropy_sweep_resumes_where_it_stopped(ckpt_root, tmp_path, monkeypatch):
    import rankest.sources.teachers as teachers

    out = tmp_path / "an"
    opts = dict(teacher=str(ckpt_root), corpus="lee", tokens=120, seq_len=SEQ, device="cpu", dtype="fp32",
                out=str(out), quiet=True)
    first = run_anisotropy(revisions="step1", **opts)
    with pytest.raises(UserError, match="--resume"):
        run_anisotropy(revisions="step1,step2", **opts)
    with pytest.raises(UserError, match="other settings"):
        run_anisotropy(revisions="step1,step2", resume=True, **{**opts, "tokens": 99})
    loads = []
    real_load = teachers.load_teacher
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    both = run_anisotropy(revisions="step1,step2", resume=True, **opts)
    assert [str(p) for p in loads] == [str(ckpt_root / "step2")]  # step1 was not recomputed
    assert list(both) == ["step1", "step2"]
    np.testing.assert_array_equal(both["step1"]["anisotropy"], first["step1"]["anisotropy"])
    _, stored = read_results(out / "anisotropy.h5", "anisotropy")
    assert list(stored) == ["step1", "step2"]
    assert "anisotropy.png" in (out / "report.md").read_text()
    # A direct computation on step2 gives the stored values.
    t2 = real_load(ckpt_root / "step2", device="cpu", dtype="fp32")
    windows = pack_windows(load_documents("lee"), t2.tokenizer, SEQ, max_windows=math.ceil(2**20 / SEQ),
                           progress=False)
    direct = teacher_anisotropy(t2, windows, plan_rows(len(windows), SEQ, tokens=120, seed=0), quiet=True)
    np.testing.assert_allclose(stored["step2"]["anisotropy"], direct["anisotropy"], rtol=1e-12)


def test_interrupted_sweep_keeps_finished_checkpoints(ckpt_root, tmp_path):
    ckpts = resolve_checkpoints(str(ckpt_root), ["step1", "step2"])
    calls = []

    def compute(teacher):
        calls.append(teacher.source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the sweep during the second checkpoint
        return teacher_head_spectrum(teacher)

    kw = dict(out=tmp_path, config={"top": 100}, device="cpu", dtype="fp32", quiet=True)
    with pytest.raises(KeyboardInterrupt):
        sweep_checkpoints("head_spectrum", ckpts, compute, **kw)
    _, stored = read_results(tmp_path / "head_spectrum.h5", "head_spectrum")
    assert list(stored) == ["step1"]
    res = sweep_checkpoints("head_spectrum", ckpts, compute, resume=True, **kw)
    assert len(calls) == 3 and list(res) == ["step1", "step2"]
    _, stored = read_results(tmp_path / "head_spectrum.h5", "head_spectrum")
    assert list(stored) == ["step1", "step2"]


def test_revisions_given_as_local_folders(ckpt_root):
    ckpts = resolve_checkpoints("pythia-70m", [str(ckpt_root / "step2"), str(ckpt_root / "step1")])
    assert [c.label for c in ckpts] == [str(ckpt_root / "step2"), str(ckpt_root / "step1")]
    assert all(c.revision is None for c in ckpts)


# ---- bad input ---------------------------------------------------------------------------------
def test_unknown_revisions_list_what_was_found(ckpt_root, tmp_path, capsys):
    rc = cli.main(["head-spectrum", "--teacher", str(ckpt_root), "--revisions", "step1,step3", "--quiet",
                   "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "step3" in err and "step1, step2" in err
    assert not (tmp_path / "x" / "head_spectrum.h5").exists()  # checked before anything is loaded
    with pytest.raises(UserError, match="Hugging Face cache"):  # the suite is offline: nothing is cached
        resolve_checkpoints("pythia-70m", ["step999999"])
    with pytest.raises(UserError, match="without revisions"):
        resolve_checkpoints("smollm2-135m-instruct", ["step1000"])
    with pytest.raises(UserError, match="twice"):
        resolve_checkpoints(str(ckpt_root), ["step1", "step1"])
    with pytest.raises(UserError, match="not both"):
        run_head_spectrum(teacher=str(ckpt_root), revision="step1", revisions="step2")


def test_cli_anisotropy_and_too_few_tokens(ckpt_root, tmp_path, capsys):
    assert cli.main(["anisotropy", "--tokens", "1"]) == 2
    out = tmp_path / "cli"
    rc = cli.main(["anisotropy", "--teacher", str(ckpt_root / "step1"), "--corpus", "lee", "--tokens", "64",
                   "--seq-len", str(SEQ), "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    assert "anisotropy by depth" in capsys.readouterr().out
    summary = json.loads((out / "anisotropy.json").read_text())
    [label] = summary["revisions"]
    assert len(summary["results"][label]["anisotropy"]) == 3  # embeddings + 2 blocks


# ---- estimate --diagnostics --------------------------------------------------------------------
def test_estimate_diagnostics_on_the_same_forward_passes(fresh_tiny_teacher, tmp_path, monkeypatch):
    from rankest.estimator.pipeline import run_estimate
    from rankest.testing import count_calls

    tiny_teacher = fresh_tiny_teacher  # its own, not the shared one: count_calls monkeypatches it
    calls = count_calls(monkeypatch, tiny_teacher, ("features", "hidden_states"))
    out = tmp_path / "est"
    opts = dict(teacher=tiny_teacher, corpus="lee", tokens=200, seq_len=SEQ, batch_size=4, quiet=True,
                convergence=False, seed=3)
    spec = run_estimate(diagnostics=True, out=str(out), **opts)
    n_batches = math.ceil(200 / SEQ / 4)
    # The linear-head check reads features once; every batch is one forward that gives all layers
    # (plus one one-token forward that sizes the anisotropy accumulator before the first batch).
    assert calls == {"features": 1, "hidden_states": n_batches + 1}
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["anisotropy"]) == 3 and summary["head_singular_entropy_kl"] >= 0
    report = (out / "report.md").read_text()
    assert "rankest estimate" in report and "Anisotropy per layer" in report and "Output head spectrum" in report
    with h5py.File(out / "anisotropy.h5", "r") as f:
        assert f.attrs["format"] == "rankest.anisotropy"
    # Same rows as a standalone run with the same plan.
    windows = pack_windows(load_documents("lee"), tiny_teacher.tokenizer, SEQ,
                           max_windows=math.ceil(2**20 / SEQ), progress=False)
    plan = plan_rows(len(windows), SEQ, tokens=200, seed=3)
    direct = teacher_anisotropy(tiny_teacher, windows, plan, batch_size=4, quiet=True)
    np.testing.assert_allclose(spec.meta["anisotropy"], direct["anisotropy"], rtol=1e-12)
    calls.update(features=0, hidden_states=0)
    run_estimate(**opts)
    # Without diagnostics the head check rides on batch 0's own forward (features_with_head_check):
    # `features` runs for the other batches only.
    assert calls == {"features": n_batches - 1, "hidden_states": 0}


def test_estimate_diagnostics_count_against_max_memory(tiny_teacher):
    """--diagnostics' per-layer Grams come out of --max-memory: a budget they alone exceed is
    refused with a sentence; the anisotropy state's size is that of its tensors."""
    from rankest.accumulate.anisotropy import Anisotropy
    from rankest.estimator.pipeline import run_estimate

    acc = Anisotropy([32, 32, 32], pca=True)
    assert acc.nbytes() == 8 * 3 * (32 * 32 + 2 * 32) + 8 * 3 * 2
    with pytest.raises(UserError, match="--diagnostics keeps a d×d fp64 Gram per layer"):
        run_estimate(teacher=tiny_teacher, corpus="lee", tokens=64, seq_len=SEQ, quiet=True, diagnostics=True,
                     max_memory="20KB")
