"""Find or build the compiled ops (``rankest._C``).

:func:`load_extension` tries, in order:

1. ``import rankest._C`` — built by ``pip install -e . --no-build-isolation`` (or a wheel);
2. a JIT build of the same sources with :func:`torch.utils.cpp_extension.load`, cached in
   ``$RANKEST_CACHE/ext-<torch>-<hash>`` (default ``~/.cache/rankest/ext-<torch>-<hash>``), the
   hash covering every source file and whether CUDA kernels are included, so an edit or another
   torch rebuilds and nothing stale is ever loaded. The first build takes about a minute.

The sources are found in the installed package (``rankest/_csrc``, copied there by setup.py's
build_py) or, for an editable install / a source checkout, in ``<repo>/csrc``.
``RANKEST_NO_EXT=1`` skips both: :mod:`rankest.ops` then runs the pure-PyTorch reference.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from rankest.io.files import cache_home

_MARKER = "rankest.cpp"  # a folder holding this file is rankest's csrc
_result: tuple[str | None, str] | None = None


def source_dir() -> Path | None:
    """The folder holding the C++/CUDA sources, or None when they were not shipped."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / _MARKER).is_file():
            return cand
    return None


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME  # imports setuptools: only when deciding a build

    return bool(torch.version.cuda) and torch.cuda.is_available() and CUDA_HOME is not None


def _sources(root: Path, cuda: bool) -> list[Path]:
    files = [root / _MARKER, *sorted((root / "cpu").glob("*.cpp"))]
    if cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def cache_dir(root: Path, cuda: bool) -> Path:
    """``<cache>/ext-<torch version>-<hash of every source and header, and the CUDA flag>``."""

    h = hashlib.sha256(b"cuda" if cuda else b"cpu")
    for p in sorted(q for q in root.rglob("*") if q.suffix in {".h", ".cpp", ".cu", ".cuh"}):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return cache_home() / f"ext-{torch.__version__}-{h.hexdigest()[:16]}"


def _jit_build() -> str:
    """Compile and load the sources; returns where the library lives. Raises on failure."""
    import torch.utils.cpp_extension as cpp_extension  # setuptools and the compiler toolchain: only to build

    root = source_dir()
    if root is None:
        raise RuntimeError("the C++ sources are not installed (neither rankest/_csrc nor ./csrc)")
    cuda = _want_cuda()
    build = cache_dir(root, cuda)
    build.mkdir(parents=True, exist_ok=True)
    lib = build / "rankest_C.so"
    if lib.exists():  # the folder's name hashes the sources: a library there is current
        try:
            torch.ops.load_library(str(lib))
            return str(build)
        except OSError:  # e.g. a build interrupted while linking: rebuild below
            pass
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if not lib.exists():
        print(f"rankest: compiling the C++{'/CUDA' if cuda else ''} ops into {build} "
              "(first import only, about a minute)...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name="rankest_C",
        sources=[str(p) for p in _sources(root, cuda)],
        extra_include_paths=[str(root)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"] if cuda else None,
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return str(build)


def _registered() -> bool:

    try:
        torch.ops.rankest.transform_rows.default  # noqa: B018
        torch.ops.rankest.gram_update.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def load_extension() -> tuple[str | None, str]:
    """Load the compiled ops once; returns ``(backend, detail)``.

    backend is ``"installed"`` (``rankest._C`` was built at install), ``"jit"`` (compiled on
    import, cached) or ``None`` (not available: detail says why and how to fix it).
    """
    global _result
    if _result is not None:
        return _result
    if os.environ.get("RANKEST_NO_EXT", "") not in ("", "0"):
        _result = (None, "RANKEST_NO_EXT is set")
        return _result
    try:
        from rankest import _C  # noqa: F401  (loading the library registers the ops)

        if _registered():
            _result = ("installed", str(Path(_C.__file__)))
            return _result
        installed_err = "rankest._C loaded but registered no ops"
    except ImportError as e:  # not built at install, or built against another torch
        installed_err = f"rankest._C: {e}"
    try:
        where = _jit_build()
        if not _registered():
            raise RuntimeError("the JIT-built library registered no ops")
        _result = ("jit", where)
    except Exception as e:  # noqa: BLE001 - any build failure means "use the reference"
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        _result = (None, f"{installed_err}; JIT build failed: {why[:500]}")
    return _result
