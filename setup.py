"""Build rankest._C when torch is importable; otherwise install pure Python (see pyproject).

    pip install -e . --no-build-isolation    # builds rankest._C against the installed torch
    pip install -e .                         # isolated: no torch, the extension is JIT-built
                                             # by rankest/_build.py on first import

Switches: RANKEST_FORCE_CUDA=1 (build the CUDA kernels without a visible GPU),
TORCH_CUDA_ARCH_LIST (default "8.0;8.6;9.0" for CUDA builds), MAX_JOBS (default from cores and
memory). The C++/CUDA sources in csrc/ are also shipped as rankest/_csrc for the JIT build.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package (rankest/_csrc) so an installed wheel can JIT-build."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # editable installs read ROOT/csrc
            shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "rankest" / "_csrc",
                            dirs_exist_ok=True)


def max_jobs() -> str:
    """One compile job per core, at most one per 3 GB of memory (nvcc peaks near that)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 3.0 * cores
    return str(max(1, min(cores, int(mem_gb // 3))))


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # isolated build: no extension now, JIT on first import
        return [], {}
    cuda = bool(torch.version.cuda) and CUDA_HOME is not None and (
        os.environ.get("RANKEST_FORCE_CUDA") == "1"
        or "TORCH_CUDA_ARCH_LIST" in os.environ
        or torch.cuda.is_available())
    if os.environ.get("RANKEST_FORCE_CUDA") == "1" and not cuda:
        raise RuntimeError("RANKEST_FORCE_CUDA=1 needs a CUDA build of torch and CUDA_HOME "
                           f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})")
    os.environ.setdefault("MAX_JOBS", max_jobs())
    sources = ["csrc/rankest.cpp", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))]
    kwargs = dict(include_dirs=[str(ROOT / "csrc")], extra_compile_args={"cxx": ["-O3"]})
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
        ext = CUDAExtension("rankest._C", sources, **kwargs)
    else:
        ext = CppExtension("rankest._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
