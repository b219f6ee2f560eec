"""Tokenizers for n-gram targets, offline: ``--tokenizer pythia | gpt2 | smollm2 | PATH``.

Pythia's (GPT-NeoX-20B byte-level BPE) and GPT-2's vocabularies are not committed here; they
ship inside a registry package — the llama.cpp test vocabularies of the ``llama-cpp-python``
sdist (``vendor/llama.cpp/models/ggml-vocab-gpt-neox.gguf`` and ``ggml-vocab-gpt-2.gguf``).
``python -m rankest setup-tokenizers`` downloads that sdist once with pip
(``pip download --no-deps --no-binary :all: llama-cpp-python==VER``), extracts only those two
files, builds a fast byte-level BPE (``tokenizers``) from their token list, merges and token
types, checks GPT-2's against llama.cpp's own reference tokenisation (``.gguf.inp/.out``,
shipped beside it) and caches ``tokenizer.json`` under ``~/.cache/rankest/tokenizers/<name>``.

``smollm2`` is the embedded teacher's tokenizer (no download); PATH is a tokenizer folder, a
``tokenizer.json`` or a ``.gguf`` file.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import struct
import tempfile
import zlib
from typing import Any

from rankest.errors import UserError
from rankest.io.files import cache_home, check_writable_folder
from rankest.sources.teachers import DEFAULT_TEACHER, TEACHERS, _gguf_location

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
GGUF_IN_SDIST = {"pythia": "ggml-vocab-gpt-neox.gguf", "gpt2": "ggml-vocab-gpt-2.gguf"}
ALIASES = {"pythia": "pythia", "gpt-neox": "pythia", "neox": "pythia", "gpt2": "gpt2", "gpt-2": "gpt2"}


def cache_root() -> pathlib.Path:
    return cache_home() / "tokenizers"


def load_tokenizer(spec) -> tuple[Any, str]:
    """``--tokenizer`` → (a transformers fast tokenizer, its name for the results); a file that
    cannot be read is a sentence."""
    try:
        return _load_tokenizer(spec)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a damaged file
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(f"cannot read the tokenizer {spec} ({type(exc).__name__}: {text}); pass a tokenizer folder "
                        f"saved with save_pretrained, a tokenizer.json or a .gguf file.") from exc


def _load_tokenizer(spec) -> tuple[Any, str]:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec is None:
        raise UserError("an n-gram target needs --tokenizer (pythia, gpt2, smollm2, or a tokenizer folder/file).")
    name = str(spec)
    key = ALIASES.get(name.lower())
    if key is not None:
        path = cache_root() / key / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"the {key} tokenizer is not set up yet; run `python -m rankest setup-tokenizers` once "
                            f"(downloads the {LLAMA_CPP_PYTHON} sdist from PyPI and extracts its vocabulary).")
        return PreTrainedTokenizerFast(tokenizer_file=str(path)), key
    if name.lower() in ("smollm2", "embedded"):

        info = TEACHERS[DEFAULT_TEACHER]
        file = _gguf_location(*info.gguf) if getattr(info, "gguf", None) else None
        if file is None:
            raise UserError("the embedded teacher has no GGUF file to take a tokenizer from.")
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name), "smollm2"
    p = pathlib.Path(name)
    if not p.exists():
        raise UserError(f"--tokenizer {name!r} is neither pythia, gpt2, smollm2 nor an existing path.")
    if p.is_dir():
        return AutoTokenizer.from_pretrained(str(p)), str(p)
    if p.suffix == ".gguf":
        return build_from_gguf(p), str(p)
    if p.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(p)), str(p)
    raise UserError(f"--tokenizer {name}: expected a folder, a tokenizer.json or a .gguf file.")


def build_from_gguf(path: os.PathLike):
    """A byte-level BPE fast tokenizer from a GGUF vocabulary (tokens, merges, token types).

    Token type 3 (control) becomes a special token, 4 (user-defined, e.g. GPT-NeoX's runs of
    spaces) an added token matched before the BPE, as in the original tokenizers.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = GGUFReader(str(path))

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    model = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "gpt2":
        raise UserError(f"{path}: only byte-level BPE (GGUF tokenizer model 'gpt2') vocabularies are supported, got {model!r}.")
    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    f = r.fields.get("tokenizer.ggml.token_type")
    types = [int(f.parts[i][0]) for i in f.data] if f is not None else [1] * len(tokens)
    # GPT-NeoX's GGUF pads the vocabulary to the model's logit width with placeholders
    # "[PAD50277]"… (user-defined, never produced): they are not tokens, so V' stops before them
    # (Pythia's real vocabulary is 50,277).
    while tokens and types[-1] == 4 and tokens[-1] == f"[PAD{len(tokens) - 1}]":
        tokens.pop()
        types.pop()
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    eos = tokens[0] if tokens and types[0] == 3 else None
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos)


def _check_against_llama_cpp(tok, inp: str, out: str) -> tuple[int, int]:
    """llama.cpp's reference tokenisation (``.gguf.inp`` texts, ``.gguf.out`` ids): (matches, cases)."""
    sep = "\n__ggml_vocab_test__\n"
    texts = inp.split(sep)
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__").rstrip("\n") if texts else texts
    want = [line.split() for line in out.strip("\n").split("\n")]
    ok = 0
    for text, ids in zip(texts, want):
        ok += [str(i) for i in tok(text, add_special_tokens=False)["input_ids"]] == ids
    return ok, min(len(texts), len(want))


def _open_sdist(sdist: os.PathLike) -> tarfile.TarFile:
    """The sdist as an open tar.gz, or a sentence saying why it is not one."""
    path = pathlib.Path(sdist)
    again = f"download it again (pip download --no-deps --no-binary :all: {LLAMA_CPP_PYTHON}) or drop --sdist"
    if not path.exists():
        raise UserError(f"--sdist {path} does not exist; check the path, or drop --sdist to download it with pip.")
    if not path.is_file():
        raise UserError(f"--sdist {path} is a folder, not the sdist file (llama_cpp_python-….tar.gz); pass the file.")
    try:
        return tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"--sdist {path} is not a readable .tar.gz ({e}); {again}.") from None


def _members(tar: tarfile.TarFile, sdist) -> list:
    """The members of a (possibly truncated) tar: a damaged archive is a sentence."""
    try:
        return tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"--sdist {sdist} is a damaged .tar.gz ({e}); download it again or drop --sdist.") from None


def setup_tokenizers(*, sdist: os.PathLike | None = None, quiet: bool = False) -> dict[str, str]:
    """Download the llama-cpp-python sdist (or use ``sdist``), extract the GPT-NeoX and GPT-2
    vocabularies, build and cache the tokenizers. Returns {name: tokenizer.json path}."""
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    check_writable_folder(cache_root(), "RANKEST_CACHE")  # before a 77 MB download
    if sdist is not None:
        _open_sdist(sdist).close()
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            log(f"rankest: downloading the {LLAMA_CPP_PYTHON} sdist (~77 MB) from PyPI...")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            found = list(pathlib.Path(tmp).glob("*.tar.gz"))
            if res.returncode != 0 or not found:
                raise UserError(f"could not download {LLAMA_CPP_PYTHON} with pip ({(res.stderr or '').strip()[-300:]}); "
                                f"download the sdist elsewhere and pass it: python -m rankest setup-tokenizers --sdist FILE.")
            sdist = found[0]
        written = {}
        with _open_sdist(sdist) as tar:
            members = {pathlib.PurePosixPath(m.name).name: m for m in _members(tar, sdist)
                       if "/vendor/llama.cpp/models/ggml-vocab-gpt" in m.name}
            for name, fname in GGUF_IN_SDIST.items():
                if fname not in members:
                    raise UserError(f"{sdist} has no {fname}; use {LLAMA_CPP_PYTHON}.")
                dst = pathlib.Path(tmp) / fname
                try:
                    dst.write_bytes(tar.extractfile(members[fname]).read())
                    tok = build_from_gguf(dst)
                except UserError:
                    raise
                except (tarfile.TarError, EOFError, zlib.error, ValueError, KeyError, IndexError, TypeError,
                        AttributeError, UnicodeDecodeError, struct.error) as e:
                    raise UserError(f"--sdist {sdist}: its {fname} is damaged ({type(e).__name__}: {e}); download the "
                                    f"sdist again or drop --sdist.") from None
                inp, out = members.get(fname + ".inp"), members.get(fname + ".out")
                if inp is not None and out is not None:
                    ok, n = _check_against_llama_cpp(tok, tar.extractfile(inp).read().decode(),
                                                     tar.extractfile(out).read().decode())
                    log(f"rankest: {name}: {ok}/{n} of llama.cpp's reference tokenisations reproduced")
                    if ok < n:
                        raise UserError(f"the {name} tokenizer built from {fname} reproduces only {ok}/{n} of llama.cpp's "
                                        f"reference tokenisations; not caching it.")
                folder = cache_root() / name
                folder.mkdir(parents=True, exist_ok=True)
                tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
                (folder / "SOURCE").write_text(f"{LLAMA_CPP_PYTHON} sdist: vendor/llama.cpp/models/{fname}\n")
                written[name] = str(folder / "tokenizer.json")
                log(f"rankest: {name} tokenizer ({len(tok):,} tokens) → {folder / 'tokenizer.json'}")
    return written
