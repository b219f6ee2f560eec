"""Teachers spread by a device map (accelerate's dispatch): the features, logits and a whole
`estimate` through the dispatched model equal those of the model on one device.

This machine has no GPU, so the split is CPU + disk offload: a middle block's weights live on
disk and accelerate's hooks bring them in for every forward — the same hook path that carries
activations from GPU to GPU under ``--device-map auto``.
"""

import pytest
import torch

from rankest import cli
from rankest.errors import UserError
from rankest.estimator.pipeline import run_estimate
from rankest.sources.teachers import load_teacher

pytest.importorskip("accelerate")

SEQ = 24


@pytest.fixture(scope="module")
def neox3(make_tiny_neox):
    return make_tiny_neox("neox3", layers=3, seed=4, context_length=64)


def _split_map(head: str = "cpu") -> dict:
    return {"gpt_neox.embed_in": "cpu", "gpt_neox.emb_dropout": "cpu", "gpt_neox.layers.0": "cpu",
            "gpt_neox.layers.1": "disk", "gpt_neox.layers.2": "cpu", "gpt_neox.final_layer_norm": "cpu",
            "gpt_neox.rotary_emb": "cpu", "lm_head": head}


def test_dispatched_teacher_equals_the_plain_one(neox3, tmp_path):
    plain = load_teacher(neox3, device="cpu", dtype="fp32")
    split = load_teacher(neox3, dtype="fp32", device_map=_split_map(), offload_folder=tmp_path / "offload")
    assert split.device_map is not None and split.device_map["gpt_neox.layers.1"] == "disk"
    assert split.provenance()["device_map"] == {"cpu": 7, "disk": 1}
    assert plain.device_map is None and plain.provenance()["device_map"] is None
    ids = torch.randint(0, plain.n_cols, (3, SEQ), generator=torch.Generator().manual_seed(7))
    h_plain, h_split = plain.features(ids), split.features(ids)
    assert torch.equal(h_plain, h_split)  # same fp32 kernels on the same device: bitwise
    assert torch.equal(split.logits(h_split), split.full_logits(ids))
    # the offloaded block really took part: zeroing its weights on disk would change the result
    # (checked by comparing against a model whose middle block is skipped)
    skipped = load_teacher(neox3, device="cpu", dtype="fp32")
    skipped.model.gpt_neox.layers = skipped.model.gpt_neox.layers[::2]
    skipped.model.config.num_hidden_layers = 2
    assert not torch.allclose(skipped.features(ids), h_split)


def test_estimate_through_a_device_map_equals_one_device(neox3, make_word_corpus):
    corpus = make_word_corpus("device-map-corpus", seed=11, paragraphs=12)
    common = dict(corpus=str(corpus), tokens=300, seq_len=SEQ, space="clr", route="gram", device="auto",
                  dtype="fp32", quiet=True, convergence=False, return_summary=False)
    ref = run_estimate(teacher=str(neox3), **common)
    got = run_estimate(teacher=str(neox3), device_map="auto", **common)
    assert got.n_rows == ref.n_rows == 300
    assert torch.allclose(torch.as_tensor(got.sigma), torch.as_tensor(ref.sigma), rtol=1e-10, atol=0)
    assert ref.meta["device_map"] is None  # on a CPU-only machine "auto" dispatches nothing: no map


def test_offloaded_head_is_refused(neox3, tmp_path):
    with pytest.raises(UserError, match="LM head .* is offloaded"):
        load_teacher(neox3, dtype="fp32", device_map=_split_map(head="disk"), offload_folder=tmp_path / "off")


def test_device_map_bad_combinations(neox3, monkeypatch):
    with pytest.raises(UserError, match="unknown --device-map 'everywhere'"):
        load_teacher(neox3, device_map="everywhere")
    with pytest.raises(UserError, match="with --device auto or cuda"):
        load_teacher(neox3, device="cpu", device_map="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun"):
        load_teacher(neox3, device_map="auto")


def test_cli_device_map_with_cpu_exits_2(neox3, capsys):
    code = cli.main(["estimate", "--teacher", str(neox3), "--device", "cpu", "--device-map", "auto", "--quiet"])
    assert code == 2
    assert "--device-map auto places the teacher over every visible GPU" in capsys.readouterr().err
