#!/usr/bin/env bash
# Proves that the CUDA sources (csrc/cuda/*.cu) compile for sm_90 on a machine without a GPU.
#
# One-time setup (a CUDA build of torch, ~5.5 GB, from the local pip cache / PyPI):
#   python -m venv /tmp/cudavenv && /tmp/cudavenv/bin/pip install torch==2.14.1 numpy ninja
#
# The exact command (run from the repository root):
#   CUDA_HOME=/usr/local/cuda-13.0 TORCH_CUDA_ARCH_LIST=9.0 RANKEST_FORCE_CUDA=1 MAX_JOBS=2 \
#     /tmp/cudavenv/bin/python setup.py build_ext --build-temp /tmp/cudabuild \
#     --build-lib /tmp/cudabuild/lib
#
# CUDA_HOME is the toolkit folder (/usr/local/bin/nvcc is a wrapper script around
# /usr/local/cuda-13.0/bin/nvcc, so `dirname $(dirname $(which nvcc))` = /usr/local has no
# CUDA headers). No cuBLAS header is needed: the .cu files use ATen ops (at::mm / addmm_) for
# GEMMs and only c10/cuda headers (CUDAGuard, CUDAStream, CUDAException), never
# ATen/cuda/CUDAContext.h (which includes cublas_v2.h).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/tmp/cudavenv/bin/python}
NVCC=$(readlink -f "$(command -v nvcc)")
if grep -q '^exec ' "$NVCC" 2>/dev/null; then NVCC=$(awk '/^exec /{print $2}' "$NVCC"); fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RANKEST_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf /tmp/cudabuild
time "$PY" setup.py build_ext --build-temp /tmp/cudabuild --build-lib /tmp/cudabuild/lib
so=$(find /tmp/cudabuild/lib -name '_C*.so')
echo "built $so"
# The kernels must be in the library as sm_90 SASS (cuobjdump: the toolkit's, else Triton's copy).
CUOBJDUMP=$(command -v cuobjdump || true)
for c in "$CUDA_HOME/bin/cuobjdump" \
    "$("$PY" -c 'import triton, os; print(os.path.dirname(triton.__file__))' 2>/dev/null)/backends/nvidia/bin/cuobjdump"; do
  [ -z "$CUOBJDUMP" ] && [ -x "$c" ] && CUOBJDUMP=$c
done
"$CUOBJDUMP" --list-elf "$so"
"$CUOBJDUMP" --list-elf "$so" | grep -q sm_90 && echo "sm_90 code: yes"
"$CUOBJDUMP" -res-usage "$so" 2>/dev/null | grep -c "Function .*transform_rows_kernel" | xargs echo "transform_rows kernels:"
