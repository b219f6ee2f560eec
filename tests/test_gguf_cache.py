"""The dequantised copy of a GGUF teacher (rankest.sources.teachers.gguf_cache_dir): the second
load reads it and gives bit-identical logits and tokens; a changed file misses and replaces it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from rankest.sources import teachers
from rankest.sources.teachers import DEFAULT_TEACHER, TEACHERS, gguf_cache_dir, load_teacher


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
    """A copy of the embedded teacher's GGUF file, with the rankest cache under tmp_path."""
    monkeypatch.setenv("RANKEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANKEST_GGUF_CACHE", raising=False)
    src = teachers._gguf_location(*TEACHERS[DEFAULT_TEACHER].gguf)
    dst = tmp_path / src.name
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.slow  # dequantises the GGUF file once (~40 s on 2 cores)
def test_second_load_reads_the_copy_bit_identically_and_a_changed_file_misses(gguf_copy, monkeypatch):
    first = load_teacher(gguf_copy, device="cpu", dtype="fp32")  # dequantises, writes the copy
    folder = gguf_cache_dir(gguf_copy, torch.float32)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    calls = []
    real = teachers._load_gguf
    monkeypatch.setattr(teachers, "_load_gguf", lambda *a: calls.append(a) or real(*a))
    second = load_teacher(gguf_copy, device="cpu", dtype="fp32")
    assert calls == []  # the copy was read, the GGUF file was not
    ids = torch.randint(0, first.n_cols, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.full_logits(ids), second.full_logits(ids))
    assert torch.equal(first.features(ids), second.features(ids))
    text = "The softmax bottleneck, 0123 — naïve tokenisation!"
    assert first.tokenizer(text)["input_ids"] == second.tokenizer(text)["input_ids"]
    assert (second.n_cols, second.hidden_size, second.logit_width) == (first.n_cols, first.hidden_size,
                                                                       first.logit_width)

    # A changed file (here its modification time) has another key: the GGUF file is read again
    # and the stale copy is replaced.
    st = gguf_copy.stat()
    os.utime(gguf_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache_dir(gguf_copy, torch.float32) != folder
    monkeypatch.setattr(teachers, "_load_gguf", lambda *a: calls.append(a) or (first.model, first.tokenizer))
    load_teacher(gguf_copy, device="cpu", dtype="fp32")
    assert len(calls) == 1
    assert gguf_cache_dir(gguf_copy, torch.float32).is_dir() and not folder.exists()


def test_cache_key_follows_content_size_and_dtype(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 5000)
    st = f.stat()
    key = gguf_cache_dir(f, torch.float32)
    assert gguf_cache_dir(f, torch.float32) == key and gguf_cache_dir(f, torch.bfloat16) != key
    f.write_bytes(b"b" * 5000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time, other content
    assert gguf_cache_dir(f, torch.float32) != key
