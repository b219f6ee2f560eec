"""Every HDF5 reader checks the format mark, the schema version and the datasets' checksums; the
two head Gram functions compute what their names say (against brute force)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from rankest.accumulate import centred_head_gram
from rankest.errors import UserError
from rankest.heads import HeadsResult, head_moments
from rankest.io.sweep_results import read_results, write_results


def a_heads_result(rng) -> HeadsResult:
    k = 3
    f = lambda: rng.random(k).tolist()  # noqa: E731
    return HeadsResult(ranks=[2, 4, 8], labels=["2", "4", "full"], lr=f(), val_loss=f(), val_accuracy=f(),
                       val_perplexity=f(), reference={"loss": 3.0, "accuracy": 0.2}, truncation_loss=f(),
                       truncation_accuracy=f(), head_w_error_weight=f(), truncation_loss_feature=f(),
                       truncation_accuracy_feature=f(), head_w_error_feature=f(),
                       w_error_weight_curve=rng.random(8), w_error_feature_curve=rng.random(8),
                       train_loss=rng.random((40, k)), meta={"teacher": "t"})


def flip_a_byte(path, dataset: str) -> None:
    """One bit inside the data of ``dataset``: its Fletcher-32 checksum must catch it."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_heads_results_round_trip_and_damage_is_refused(tmp_path):
    res = a_heads_result(np.random.default_rng(1))
    res.save(tmp_path / "heads.h5")
    back = HeadsResult.load(tmp_path / "heads.h5")
    np.testing.assert_array_equal(back.train_loss, res.train_loss)
    assert back.val_loss == res.val_loss and back.labels == res.labels
    flip_a_byte(tmp_path / "heads.h5", "train_loss")
    with pytest.raises(UserError, match="damaged"):
        HeadsResult.load(tmp_path / "heads.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.attrs["format"] = "someone.else"
    with pytest.raises(UserError, match="not a rankest heads results file"):
        HeadsResult.load(tmp_path / "foreign.h5")
    res.save(tmp_path / "newer.h5")
    with h5py.File(tmp_path / "newer.h5", "a") as f:
        f.attrs["schema_version"] = int(f.attrs["schema_version"]) + 1
    with pytest.raises(UserError, match="newer rankest"):
        HeadsResult.load(tmp_path / "newer.h5")
    with pytest.raises(UserError, match="no rankest heads results file"):
        HeadsResult.load(tmp_path / "missing.h5")


def test_sweep_results_are_checksummed(tmp_path):
    result = {"anisotropy": np.linspace(0, 1, 64), "depth": np.linspace(0, 1, 64), "n_rows": 10}
    write_results(tmp_path, "anisotropy", {"step1": result}, config={"tokens": 10}, prov={})
    _, back = read_results(tmp_path / "anisotropy.h5", "anisotropy")
    np.testing.assert_array_equal(back["step1"]["anisotropy"], result["anisotropy"])
    flip_a_byte(tmp_path / "anisotropy.h5", "checkpoints/00000/anisotropy")
    with pytest.raises(UserError, match="damaged"):
        read_results(tmp_path / "anisotropy.h5", "anisotropy")


def test_head_moments_and_the_centred_head_gram_against_brute_force():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1000, 12, generator=gen, dtype=torch.float64)
    wtw, mean = head_moments(w, block=96)  # blocks that do not divide V
    torch.testing.assert_close(wtw, w.T @ w, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(mean, w.mean(0), rtol=1e-13, atol=1e-15)
    wc = w - w.mean(0)  # the column-centred head W_c
    torch.testing.assert_close(centred_head_gram(w, None, 1000), wc.T @ wc, rtol=1e-12, atol=1e-10)
    # the two are one identity apart: W_cᵀW_c = WᵀW − V·w̄w̄ᵀ
    torch.testing.assert_close(centred_head_gram(w, None, 1000), wtw - 1000 * torch.outer(mean, mean), rtol=1e-11,
                               atol=1e-9)
