"""Hypothesis fuzzing of the command line: for every command, random option values and random file
contents either succeed (exit 0) or exit 2 with one ``rankest: error: …`` line (plus, for an
argparse refusal, one line pointing at ``--help``) — never a traceback, never "internal error".

``rankest.cli.main`` is called in-process on a tiny random GPT-NeoX folder and a small corpus. A
valid value may start real work (``heads --steps 1e15`` is a fine request): an example still
running after :data:`BUDGET_S` seconds is stopped by SIGALRM and counts as accepted input. The
examples are derandomised, so CI sees the same ones every run; the module takes about a minute.
"""

from __future__ import annotations

import json
import shutil
import signal
import string
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rankest import cli
from rankest.testing import assert_cli_promise

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM to bound an example")

BUDGET_S = 3  # seconds an accepted input may run before it is stopped
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class _Budget(BaseException):
    """Raised by SIGALRM: not an Exception, so cli.main does not turn it into exit 1."""


def _alarm(signum, frame):
    raise _Budget()


def run_bounded(argv, capsys):
    """(exit status or None when stopped by the budget, stderr) of ``cli.main(argv)``."""
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET_S)
    try:
        code = cli.main([str(a) for a in argv])
    except _Budget:
        code = None
    except SystemExit as e:  # --help / --version
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err


# ---- the command lines ---------------------------------------------------------------------------
def _options() -> dict[str, list[tuple[str, bool]]]:
    """{command: [(flag, takes a value)]} from the parser itself, so a new option is fuzzed too."""
    parser = cli.build_parser()
    out = {}
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                out[name] = [(a.option_strings[-1], a.nargs != 0) for a in sub._actions
                             if a.option_strings and a.option_strings[-1] not in ("--help", "--debug")]
    return out


OPTIONS = _options()
SPECIAL = ["all", "auto", "full", "nan", "inf", "-inf", "1e400", "1e-400", "-1", "0", "1", "2", "10", "0x10", "",
           " ", "1e5", "2.5", str(10**30), str(2**63), "stride:3", "stride:0", "stride:", "last", "16GB", "1B",
           "512MiB", "-5GB", "8,32,full", "0,full", "ngram:3", "ngram:0", "logits:nope.npy", "cpu", "cuda:7",
           "clr", "prob", "gram", "sketch", "fp64", "add-k:1", "add-k:-1", "kn", "0.5,1", "none"]
values = st.one_of(st.sampled_from(SPECIAL), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(string.printable, max_size=12))


def _base(command, good_dir, corpus):
    model = ["--teacher", good_dir, "--corpus", corpus, "--tokens", "32", "--seq-len", "8", "--device", "cpu",
             "--quiet"]
    return {"estimate": ["estimate", *model], "anisotropy": ["anisotropy", *model],
            "head-spectrum": ["head-spectrum", "--teacher", good_dir, "--quiet"],
            "heads": ["heads", *model, "--ranks", "2,full", "--steps", "2", "--val-tokens", "100"],
            "report": ["report", good_dir], "teachers": ["teachers"], "setup-tokenizers": ["setup-tokenizers"],
            "saturation": ["saturation", "--teachers", good_dir, "--corpus", corpus, "--tokens", "32", "--seq-len", "8",
                           "--device", "cpu", "--quiet"]}[command]


@pytest.fixture(scope="module")
def good_dir(make_tiny_neox):
    return str(make_tiny_neox("fuzz-neox", hidden_size=16, layers=1, heads=2))


@pytest.fixture(scope="module")
def corpus(make_word_corpus):
    return make_word_corpus("fuzz-corpus", seed=1, paragraphs=8)


@pytest.fixture(autouse=True)
def _sandbox(tmp_path, monkeypatch):
    """Relative paths (--out x, --cache-features y) land in a temporary folder; setup-tokenizers
    writes into a temporary cache and never downloads."""
    from rankest.sources import tokenizers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokenizers, "cache_root", lambda: tmp_path / "tok-cache")
    monkeypatch.setattr(tokenizers.subprocess, "run",  # pip download fails as offline (a sentence, exit 2)
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network in tests"))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_option_values(data, good_dir, corpus, capsys):
    command = data.draw(st.sampled_from(sorted(OPTIONS)), label="command")
    argv = _base(command, good_dir, corpus)
    for _ in range(data.draw(st.integers(1, 2), label="options")):
        if not OPTIONS[command]:
            break
        flag, takes = data.draw(st.sampled_from(OPTIONS[command]), label="flag")
        if flag == "--out" or flag == "--cache-features":  # inside the sandbox, never over the model folder
            argv += [flag, data.draw(st.sampled_from(["run", "x/y", "x" * 300, "feats.h5", ".", ""]))]
        else:
            argv += [flag, data.draw(values, label="value")] if takes else [flag]
    code, err = run_bounded(argv, capsys)
    event(f"{command}: {'still running after the budget' if code is None else f'exit {code}'}")
    if code is not None:
        assert_cli_promise(code, err, argv)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=6)
CONFIG_KEYS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
               "max_position_embeddings", "num_key_value_heads", "model_type", "architectures",
               "tie_word_embeddings", "rotary_pct", "eos_token_id", "rope_parameters"]


def _mutate(data, blob: bytes, *, header_only: int | None = None) -> bytes:
    """A truncation, an overwritten span (inside the first ``header_only`` bytes when given) or
    random bytes."""
    how = data.draw(st.sampled_from(["truncate", "overwrite", "random", "empty"]), label="mutation")
    if how == "truncate":
        return blob[:data.draw(st.integers(0, max(0, len(blob) - 1)), label="cut")]
    if how == "overwrite":
        hi = min(len(blob), header_only or len(blob))
        at = data.draw(st.integers(0, max(0, hi - 1)), label="at")
        junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
        return blob[:at] + junk + blob[at + len(junk):]
    return b"" if how == "empty" else data.draw(st.binary(max_size=256), label="random")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_file_contents(data, good_dir, corpus, tmp_path_factory, capsys):
    """Damaged config.json, safetensors headers, tokenizer.json, corpus files and sdists."""
    what = data.draw(st.sampled_from(["config", "weights", "tokenizer", "corpus", "sdist"]), label="file")
    tmp = tmp_path_factory.mktemp("fuzz-file")
    if what == "sdist":
        path = tmp / "llama_cpp_python-0.3.36.tar.gz"
        path.write_bytes(data.draw(st.binary(max_size=512), label="sdist"))
        argv = ["setup-tokenizers", "--sdist", path]
    elif what == "corpus":
        path = tmp / data.draw(st.sampled_from(["docs.txt", "docs.jsonl", "docs.parquet"]), label="name")
        text = data.draw(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode), label="corpus")
        path.write_bytes(text)
        argv = _base("estimate", good_dir, str(path))
    else:
        folder = tmp / "model"
        shutil.copytree(good_dir, folder)
        if what == "config":
            config = json.loads((folder / "config.json").read_text())
            config[data.draw(st.sampled_from(CONFIG_KEYS), label="key")] = data.draw(JSON, label="value")
            (folder / "config.json").write_text(json.dumps(config))
        elif what == "weights":  # the header only: garbage tensor data is the NaN-weights case, not a format error
            blob = (folder / "model.safetensors").read_bytes()
            n = 8 + int.from_bytes(blob[:8], "little")
            (folder / "model.safetensors").write_bytes(_mutate(data, blob, header_only=n))
        else:
            blob = (folder / "tokenizer.json").read_bytes()
            (folder / "tokenizer.json").write_bytes(_mutate(data, blob))
        argv = ["head-spectrum", "--teacher", folder, "--quiet"]
        if what == "tokenizer" and data.draw(st.booleans(), label="as an n-gram tokenizer"):
            argv = ["estimate", "--teacher", "ngram:2", "--space", "prob", "--corpus", corpus, "--quiet",
                    "--tokenizer", data.draw(st.sampled_from([folder, folder / "tokenizer.json"]), label="path")]
    code, err = run_bounded(argv, capsys)
    event(f"{what}: {'still running after the budget' if code is None else f'exit {code}'}")
    if code is not None:
        assert_cli_promise(code, err, argv)
