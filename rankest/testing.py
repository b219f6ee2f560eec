"""Helpers shared by rankest's tests (the pattern of pyg-lib's ``testing.py``)."""

from __future__ import annotations

import torch
import h5py
import json
import numpy as np
import os


def devices() -> list[str]:
    """Every device the tests run on: ``cpu``, plus ``cuda`` when a GPU is visible."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    """A seeded generator, so each test draws fresh inputs without touching global RNG state."""
    return torch.Generator(device=device).manual_seed(seed)


#: Words of the small synthetic corpora the end-to-end tests feed tiny teachers.
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more out up into do any "
         "your what has man could other than then its time only some two may first new about these like very "
         "river market school budget storm council bridge winter garden doctor rain fire train paper").split()


def write_word_corpus(path, *, seed: int, paragraphs: int = 40, words=WORDS) -> str:
    """A text file of ``paragraphs`` paragraphs (blank-line separated) of 5 random sentences of
    6–13 ``words``, seeded; returns its path as a string."""
    rng = np.random.default_rng(seed)
    paras = [" ".join(" ".join(rng.choice(words, size=rng.integers(6, 14))).capitalize() + "." for _ in range(5))
             for _ in range(paragraphs)]
    path.write_text("\n\n".join(paras) + "\n")
    return str(path)


def subprocess_env(root) -> dict:
    """Environment of a real ``python -m rankest`` child process in the tests: this checkout
    first on PYTHONPATH, the Hub offline, one OpenMP thread (2 shared cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def checkpoint_progress(path, key: str) -> int:
    """``position[key]`` of the checkpoint at ``path`` (−1 while there is none, or it is being
    replaced); reads one attribute only, so a test can poll it while a child process runs."""
    try:
        with h5py.File(path, "r") as f:
            return int(json.loads(f.attrs["position"])[key])
    except (OSError, KeyError):
        return -1


def count_calls(monkeypatch, obj, names) -> dict:
    """Wrap the attributes ``names`` of ``obj`` (functions of a module, methods of an object)
    with ``monkeypatch`` so that each call is counted; returns the live {name: calls} dict."""
    calls = {name: 0 for name in names}
    for name in names:
        real = getattr(obj, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)
    return calls


def assert_cli_promise(code, err: str, argv=None) -> None:
    """The command line's promise for an exit status and its stderr: success (0), or exit 2 with
    exactly one ``rankest: error: …`` sentence — after an argparse refusal, one more line pointing
    at ``--help`` — and never a traceback or "internal error"."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 0:
        return
    assert code == 2, (argv, code, err)
    errors = [ln for ln in lines if ln.startswith("rankest: error: ")]
    assert len(errors) == 1, (argv, err)
    after = lines[lines.index(errors[0]) + 1:]
    assert len(after) <= 1 and all("--help" in ln for ln in after), (argv, err)
