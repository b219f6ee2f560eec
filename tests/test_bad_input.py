"""Every bad input gets one clear sentence: exit 2, ``rankest: error: …`` on one line of stderr (an
argparse refusal adds one line pointing at ``--help``), never a traceback, never "internal error".

Each case of :data:`CASES` is a bad input a user can make (numbers, model folders, paths, sdists,
the Hub without network); ``test_bad_input_keeps_the_promise`` tries them all through
``rankest.cli.main`` in-process, and ``test_count`` states how many there are. The cases that
must leave a trace beyond the sentence (a suggestion, a cap, "nothing was saved") have tests of
their own below. Everything fails before a model is run, so the module takes seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import tarfile
import time

import pytest
import torch

from rankest import cli
from rankest.sources import teachers
from rankest.sources.model_folder import safetensors_shapes
from rankest.testing import assert_cli_promise, write_word_corpus

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``rankest.cli.main(argv)``; SystemExit counts as its code."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # --help / --version only
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- fixtures: a tiny model folder, its damaged copies, a corpus, read-only folders --------------
@pytest.fixture(scope="module")
def good_dir(make_tiny_neox):
    return make_tiny_neox("bad-input-neox")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("bad-corpus") / "docs.txt", seed=0, paragraphs=20)


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory):
    """A folder nobody may write: chmod 0555, or /proc for root (whom permissions do not stop)."""
    if ROOT_USER:
        yield "/proc"
        return
    d = tmp_path_factory.mktemp("readonly")
    d.chmod(0o555)
    yield str(d)
    d.chmod(0o755)


def _copy(good, tmp, name):
    d = tmp / name
    shutil.copytree(good, d)
    return d


def _edit_config(edit):
    def make(d):
        c = json.loads((d / "config.json").read_text())
        r = edit(c)
        (d / "config.json").write_text(json.dumps(c if r is None else r))
    return make


def _weights(fn):
    def make(d):
        p = d / "model.safetensors"
        p.write_bytes(fn(p.read_bytes()))
    return make


def _pickle_bin(d):
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    import numpy as np

    torch.save({**sd, "extra": np.zeros(3)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)


def _drop(*names):
    def make(d):
        for n in names:
            (d / n).unlink()
    return make


def _other_tokenizer(d):
    """The folder's tokenizer saved beside a head of 2,048 rows: 320 tokens cannot be its vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    for f in d.iterdir():
        f.unlink()
    teachers.build_tiny_neox(vocab=2048, tokenizer=tok, save_dir=d)


FOLDERS = {  # name → how a good folder is damaged
    "config a list": _edit_config(lambda c: [c]),
    "config not JSON": lambda d: (d / "config.json").write_text("{hidden_size: 32,"),
    "hidden_size a string": _edit_config(lambda c: c.update(hidden_size="32")),
    "hidden_size negative": _edit_config(lambda c: c.update(hidden_size=-32)),
    "hidden_size a bool": _edit_config(lambda c: c.update(hidden_size=True)),
    "heads do not divide the width": _edit_config(lambda c: c.update(num_attention_heads=5)),
    "kv heads do not divide the heads": _edit_config(lambda c: c.update(num_key_value_heads=3)),
    "vocab_size not the weights'": _edit_config(lambda c: c.update(vocab_size=500)),
    "width not the weights'": _edit_config(lambda c: c.update(hidden_size=64)),
    "truncated safetensors": _weights(lambda b: b[: len(b) // 2]),
    "safetensors cut by 1 byte": _weights(lambda b: b[:-1]),
    "garbage safetensors": _weights(lambda b: os.urandom(len(b))),
    "empty safetensors": _weights(lambda b: b""),
    "safetensors header garbage": _weights(lambda b: b[:8] + b"\xff" * 40 + b[48:]),
    "no weights": _drop("model.safetensors"),
    "legacy pickle bin refused by weights_only": _pickle_bin,
    "garbage bin": lambda d: (_drop("model.safetensors")(d), (d / "pytorch_model.bin").write_bytes(b"\x00" * 999)),
    "no tokenizer files": _drop("tokenizer.json", "tokenizer_config.json"),
    "tokenizer of another model": _other_tokenizer,
}


@pytest.fixture(scope="module")
def bad_folders(good_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-folders")
    made = {}
    for i, (name, damage) in enumerate(FOLDERS.items()):
        d = _copy(good_dir, tmp, f"f{i}")
        damage(d)
        made[name] = str(d)
    return made


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-gguf")
    files = {"empty gguf": b"", "garbage gguf": os.urandom(4000),
             "gguf of an unknown version": b"GGUF" + (99).to_bytes(4, "little") + bytes(16),
             "gguf header only": b"GGUF" + (3).to_bytes(4, "little") + bytes(16)}
    out = {}
    for i, (name, data) in enumerate(files.items()):
        (tmp / f"g{i}.gguf").write_bytes(data)
        out[name] = str(tmp / f"g{i}.gguf")
    return out


def _sdist(path, payload):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in ("ggml-vocab-gpt-neox.gguf", "ggml-vocab-gpt-2.gguf"):
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/{f}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def sdists(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdists")
    (tmp / "garbage.tar.gz").write_bytes(os.urandom(3000))
    (tmp / "notar.tar.gz").write_bytes(gzip.compress(b"hello" * 100))
    damaged = _sdist(tmp / "damaged.tar.gz", b"GGUF" + os.urandom(2000))
    whole = (tmp / "damaged.tar.gz").read_bytes()
    (tmp / "truncated.tar.gz").write_bytes(whole[: len(whole) // 2])
    (tmp / "folder.tar.gz").mkdir()
    return {"missing": str(tmp / "nope.tar.gz"), "garbage": str(tmp / "garbage.tar.gz"),
            "gzip of no tar": str(tmp / "notar.tar.gz"), "damaged gguf inside": damaged,
            "truncated": str(tmp / "truncated.tar.gz"), "a folder": str(tmp / "folder.tar.gz"),
            "without the vocabularies": _sdist(tmp / "empty.tar.gz", b"")}


@pytest.fixture(autouse=True)
def _tokenizer_cache(tmp_path, monkeypatch):
    """setup-tokenizers writes into a temporary cache, never the user's."""
    from rankest.sources import tokenizers

    monkeypatch.setattr(tokenizers, "cache_root", lambda: tmp_path / "tok-cache")


# ---- the cases ------------------------------------------------------------------------------------
BIG = str(10**30)
NUMBERS = {  # (command, [args]) with a bad number; each must fail before the teacher loads
    "--tokens 1e400": ["--tokens", "1e400"], "--tokens nan": ["--tokens", "nan"],
    "--tokens inf": ["--tokens", "inf"], "--tokens=-inf": ["--tokens=-inf"],
    "--tokens 1e20": ["--tokens", "1e20"], "--tokens 2.5": ["--tokens", "2.5"], "--tokens 1": ["--tokens", "1"],
    "--tokens 0x10": ["--tokens", "0x10"], "--tokens ''": ["--tokens", ""],
    "--seed 10**30": ["--seed", BIG], "--seed -1": ["--seed", "-1"], "--seed 1.5": ["--seed", "1.5"],
    "--max-memory inf": ["--max-memory", "inf"], "--max-memory 1e400": ["--max-memory", "1e400"],
    "--max-memory nan": ["--max-memory", "nan"], "--max-memory=-5GB": ["--max-memory=-5GB"],
    "--max-memory 0": ["--max-memory", "0"], "--max-memory 2EB": ["--max-memory", "2000000TB"],
    "--max-memory lots": ["--max-memory", "lots"],
    "--batch-size 1e400": ["--batch-size", "1e400"], "--batch-size 0": ["--batch-size", "0"],
    "--seq-len 10**30": ["--seq-len", BIG], "--rank-max 10**30": ["--rank-max", BIG],
    "--checkpoint-every 0": ["--checkpoint-every", "0"], "--passes 10**30": ["--passes", BIG],
    "--positions stride:10**30": ["--positions", "stride:" + BIG], "--positions stride:-1": ["--positions", "stride:-1"],
    "--contexts 1e400": ["--teacher", "ngram:3", "--space", "prob", "--contexts", "1e400"],
    "--contexts nan": ["--teacher", "ngram:3", "--space", "prob", "--contexts", "nan"],
    "--contexts 2.5": ["--teacher", "ngram:3", "--space", "prob", "--contexts", "2.5"],
    "--corpus-fractions nan": ["--teacher", "ngram:3", "--space", "prob", "--corpus-fractions", "nan"],
    "--corpus-fractions inf": ["--teacher", "ngram:3", "--space", "prob", "--corpus-fractions", "0.5,inf"],
    "ngram:1e400": ["--teacher", "ngram:1e400"],
    "--tokns (a typo)": ["--tokns", "5"], "--space svd": ["--space", "svd"],
}
HEADS_NUMBERS = {"heads --lr inf": ["--lr", "inf"], "heads --lr nan": ["--lr", "nan"],
                 "heads --lr -1": ["--lr", "-1"], "heads --steps 1e400": ["--steps", "1e400"],
                 "heads --val-tokens 10**30": ["--val-tokens", BIG], "heads --ranks 1e400": ["--ranks", "1e400"]}

CASES = ([("number", k) for k in NUMBERS] + [("heads-number", k) for k in HEADS_NUMBERS]
         + [("folder", k) for k in FOLDERS] + [("gguf", k) for k in
                                               ("empty gguf", "garbage gguf", "gguf of an unknown version",
                                                "gguf header only")]
         + [("sdist", k) for k in ("missing", "garbage", "gzip of no tar", "damaged gguf inside", "truncated",
                                   "a folder", "without the vocabularies")]
         + [("path", k) for k in ("--out 300 characters", "--out an existing file", "--out in a read-only folder",
                                  "heads --cache-features in a missing folder",
                                  "heads --cache-features in a read-only folder",
                                  "heads --cache-features a folder", "heads --cache-features 300 characters",
                                  "anisotropy results path a folder", "head-spectrum --out in a read-only folder",
                                  "report --out an existing file", "report --out a read-only folder",
                                  "report --out 300 characters", "report of a file", "report in a read-only folder",
                                  "estimate results.h5 a folder")]
         + [("hub", "uncached hub teacher, no network")])


def _argv(kind, key, *, good_dir, corpus, bad_folders, bad_ggufs, sdists, readonly_dir, tmp_path):
    base = ["estimate", "--corpus", corpus, "--tokens", "64", "--seq-len", "16", "--quiet", "--device", "cpu"]
    if kind == "number":
        return base + ["--teacher", str(good_dir)] + NUMBERS[key]
    if kind == "heads-number":
        return ["heads", "--teacher", str(good_dir), "--corpus", corpus, "--quiet"] + HEADS_NUMBERS[key]
    if kind == "folder":
        return base + ["--teacher", bad_folders[key]]
    if kind == "gguf":
        return base + ["--teacher", bad_ggufs[key]]
    if kind == "sdist":
        return ["setup-tokenizers", "--sdist", sdists[key]]
    if kind == "hub":
        return ["head-spectrum", "--teacher", "pythia-14m", "--quiet"]
    long = "x" * 300
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "run" / "results.h5").mkdir(parents=True)
    (tmp_path / "run" / "other").write_text("x")
    (tmp_path / "aniso" / "anisotropy.h5").mkdir(parents=True)
    heads = ["heads", "--teacher", str(good_dir), "--corpus", corpus, "--quiet", "--seq-len", "16"]
    return {
        "--out 300 characters": base + ["--teacher", str(good_dir), "--out", tmp_path / long],
        "--out an existing file": base + ["--teacher", str(good_dir), "--out", tmp_path / "afile"],
        "--out in a read-only folder": base + ["--teacher", str(good_dir), "--out", f"{readonly_dir}/run"],
        "heads --cache-features in a missing folder": heads + ["--cache-features", tmp_path / "nope" / "f.h5"],
        "heads --cache-features in a read-only folder": heads + ["--cache-features", f"{readonly_dir}/f.h5"],
        "heads --cache-features a folder": heads + ["--cache-features", tmp_path / "adir"],
        "heads --cache-features 300 characters": heads + ["--cache-features", tmp_path / (long + ".h5")],
        "anisotropy results path a folder": ["anisotropy", "--teacher", str(good_dir), "--corpus", corpus,
                                             "--tokens", "64", "--seq-len", "16", "--quiet",
                                             "--out", tmp_path / "aniso"],
        "head-spectrum --out in a read-only folder": ["head-spectrum", "--teacher", str(good_dir), "--quiet",
                                                      "--out", f"{readonly_dir}/hs"],
        "report --out an existing file": ["report", tmp_path, tmp_path, "--out", tmp_path / "afile"],
        "report --out a read-only folder": ["report", tmp_path, "--out", f"{readonly_dir}/cmp"],
        "report --out 300 characters": ["report", tmp_path, "--out", tmp_path / long],
        "report of a file": ["report", tmp_path / "afile"],
        "report in a read-only folder": ["report", readonly_dir],
        "estimate results.h5 a folder": base + ["--teacher", str(good_dir), "--out", tmp_path / "run", "--overwrite"],
    }[key]


@pytest.mark.parametrize("kind, key", CASES, ids=[f"{k}: {v}" for k, v in CASES])
def test_bad_input_keeps_the_promise(kind, key, good_dir, corpus, bad_folders, bad_ggufs, sdists, readonly_dir,
                                     tmp_path, capsys, monkeypatch):
    if kind == "hub":  # a machine without network: the probe answers at once, no client retries
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr(teachers, "hub_reachable", lambda timeout=2.0: False)
    argv = _argv(kind, key, good_dir=good_dir, corpus=corpus, bad_folders=bad_folders, bad_ggufs=bad_ggufs,
                 sdists=sdists, readonly_dir=readonly_dir, tmp_path=tmp_path)
    t0 = time.perf_counter()
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (argv, err)
    assert_cli_promise(code, err, argv)
    assert time.perf_counter() - t0 < 30, "a bad input must be refused before the work"


def test_count():
    """The inputs tried above (the closing note quotes this number)."""
    assert len(CASES) == len(set(CASES)) == 87


# ---- what the sentences say ------------------------------------------------------------------------
def test_typo_suggests_the_option_and_points_at_help(capsys):
    code, _, err = run_cli(["estimate", "--tokns", "5"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert "--tokns" in lines[0] and "did you mean --tokens?" in lines[0]
    assert lines[1] == "Run `python -m rankest estimate --help` for the options."
    code, _, err = run_cli(["estimate", "--space", "svd"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 2 and "usage:" not in err


@pytest.mark.parametrize("argv, needle", [
    (["estimate", "--tokens", "1e400"], "finite"), (["estimate", "--seed", BIG], "4,611,686,018,427,387,904"),
    (["estimate", "--max-memory", "inf"], "finite size"), (["estimate", "--tokens", "1e20"], "9,007,199,254,740,992"),
])
def test_numbers_name_the_bound(argv, needle, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and needle in err and argv[1] in err


def test_tokenizerless_folder_is_refused_not_guessed(bad_folders, corpus, capsys):
    code, _, err = run_cli(["estimate", "--teacher", bad_folders["no tokenizer files"], "--corpus", corpus,
                            "--tokens", "64", "--seq-len", "16", "--quiet"], capsys)
    assert code == 2 and "has no tokenizer" in err
    with pytest.raises(Exception, match="does not belong to this model"):
        teachers.load_teacher(bad_folders["tokenizer of another model"], device="cpu")


def test_head_padding_rule_accepts_real_models():
    """Pythia-12B (50,277 tokens, 50,688 rows), DeepSeek-LLM (100,015 / 102,400), the tiny NeoX (320 / 384)."""
    for tokens, width in ((50277, 50688), (100015, 102400), (320, 384), (49152, 49152)):
        teachers.check_vocabulary("m", tokens, width)
    for tokens, width in ((2, 384), (320, 2048), (50277, 60000), (385, 384)):
        with pytest.raises(Exception):
            teachers.check_vocabulary("m", tokens, width)


def test_safetensors_header_check_agrees_with_the_reader(good_dir):
    from safetensors import safe_open

    path = good_dir / "model.safetensors"
    shapes = safetensors_shapes(path)
    with safe_open(str(path), "pt") as f:
        assert shapes == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_hub_probe_is_fast_and_true(monkeypatch):
    """hub_reachable: False within its timeout for a port nobody listens on, True for one that does."""
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    assert not teachers.hub_reachable(timeout=1.0)
    assert time.perf_counter() - t0 < 1.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert teachers.hub_reachable(timeout=1.0)


def test_uncached_hub_teacher_without_network_is_refused_in_seconds(tmp_path, monkeypatch, capsys):
    """The real probe (this test machine has no route to the Hub, or the probe would succeed and
    the test is skipped): refused within a few seconds, saying how to provide the weights."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    if teachers.hub_reachable():
        pytest.skip("the Hub is reachable from this machine")
    t0 = time.perf_counter()
    code, _, err = run_cli(["head-spectrum", "--teacher", "pythia-14m", "--quiet"], capsys)
    assert code == 2 and time.perf_counter() - t0 < 10
    assert "cannot be reached" in err and "hf download EleutherAI/pythia-14m" in err and "HF_HUB_OFFLINE" in err


def test_contexts_cap_and_nothing_saved(good_dir, corpus, capsys):
    """An n-gram run (the tiny folder's tokenizer) with --contexts above the contexts seen says it
    was capped; without --out it says nothing was saved."""
    code, out, err = run_cli(["estimate", "--teacher", "ngram:2", "--tokenizer", good_dir, "--corpus", corpus,
                              "--contexts", "1000000", "--space", "prob", "--quiet"], capsys)
    assert code == 0, err
    assert "--contexts 1,000,000 is more than the" in err and "capped" in err
    assert "nothing was saved (no --out)" in out


def test_control_characters_stay_on_one_line(good_dir, corpus, capsys):
    """A value with a carriage return or an escape echoed in the sentence is shown escaped."""
    for bad in (["--revision", "0\r"], ["--tokens", "5\n6"], ["--space", "\x1b[31mred"]):
        code, _, err = run_cli(["anisotropy", "--teacher", good_dir, "--corpus", corpus, "--tokens", "32",
                                "--seq-len", "8", "--quiet", *bad], capsys)
        assert_cli_promise(code, err, bad)
        assert code == 2 and "\r" not in err and "\x1b" not in err and err.count("\n") <= 2


@pytest.mark.parametrize("kwargs", [dict(tokens=float("inf")), dict(tokens=10**30), dict(seed=10**30),
                                    dict(seed=-1), dict(seq_len=2.5), dict(batch_size=True), dict(tokens=float("nan"))])
def test_python_api_bounds_the_same_numbers(kwargs, good_dir):
    """rankest.estimate / fit_heads / anisotropy refuse what the flags' parsers refuse, naming the option."""
    import rankest
    from rankest.errors import UserError

    for fn in (rankest.estimate, rankest.fit_heads, rankest.anisotropy):
        with pytest.raises(UserError, match=next(iter(kwargs))):
            fn(teacher=str(good_dir), corpus="lee", quiet=True, **kwargs)


def test_hub_probe_trusts_a_proxy(monkeypatch):
    """Behind a proxy a direct connection proves nothing: the probe steps aside for the Hub client."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nobody listens
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert teachers.hub_reachable(timeout=0.5)
