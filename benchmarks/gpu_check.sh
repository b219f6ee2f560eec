#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU, PyTorch and nvcc
# but no network, `datasets` or `gguf` (e.g. the lent H100/H200: Python 3.12, torch 2.11+cu130):
#
#   bash benchmarks/gpu_check.sh            # build + CUDA op tests + benchmark: ~5 min on an H100
#   bash benchmarks/gpu_check.sh --full     # + gram fp64 mode and the 50k fp64 eigensolve (~+2 min)
#
# Arguments are passed to benchmarks/bench_gpu.py. Steps:
#   1. build rankest._C in place with the CUDA kernels for sm_90 against the installed torch
#      (pip editable install, no build isolation, no deps, no index: nothing is downloaded);
#   2. fail unless the CUDA kernels of every op are registered;
#   3. python3 -m pytest -q -x tests/test_ops.py (CUDA cases included) under a timeout;
#   4. python3 benchmarks/bench_gpu.py "$@" under a timeout (runs even when 3 failed, so one
#      lease gives the numbers; the exit status still reports the test failure).
# With OUT set (the device tool), everything is tee'd to $OUT/gpu_check.log, the build log goes
# to $OUT/build.log and the benchmark copies its gpu_<card>.{md,png,json} to $OUT.
# Knobs: PY (python3), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16), TEST_TIMEOUT (300 s),
# BENCH_TIMEOUT (480 s). GPU_CHECK_CPU_DRYRUN=1 walks the same steps on a machine without a GPU
# (CPU build, CPU kernels checked, pass --tiny yourself): a test of this script, nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${OUT:-}" && -z "${_GPU_CHECK_TEED:-}" ]]; then
  mkdir -p "$OUT"
  set +e
  _GPU_CHECK_TEED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
step() { echo; echo "=== [$((SECONDS - T0)) s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || echo "nvidia-smi: not available"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())"
DRY=${GPU_CHECK_CPU_DRYRUN:-0}
DEV_KEY=CUDA; [[ $DRY == 1 ]] && DEV_KEY=CPU
if [[ $DRY != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FAIL: no CUDA GPU visible to torch"; exit 1
fi

# CUDA_HOME: torch guesses it from `nvcc` on PATH; a wrapper script there (or none) is resolved here.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")" \
              /usr/local/cuda; do
    if [[ -f "$cand/include/cuda_runtime.h" && -x "$cand/bin/nvcc" ]]; then export CUDA_HOME=$cand; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-<unset: torch will guess>}"
"${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" --version | tail -n 2 || echo "nvcc: not found"

step "build rankest._C with the CUDA kernels (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}, MAX_JOBS=${MAX_JOBS:-16})"
BUILD_LOG=${OUT:-/tmp}/build.log
FORCE_CUDA=1; [[ $DRY == 1 ]] && FORCE_CUDA=0
if ! RANKEST_FORCE_CUDA=$FORCE_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
     "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$BUILD_LOG" 2>&1; then
  tail -n 60 "$BUILD_LOG"
  echo "FAIL: the build failed (full log: $BUILD_LOG)"; exit 1
fi
grep -E "warning|error" "$BUILD_LOG" | grep -v -E "^\s*$|Warning: (Using|This)" | tail -n 15 || true
SO=$("$PY" -c "import sysconfig; print('rankest/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
ls -l "$SO" || echo "WARNING: $SO is not in the tree (the import below will say where the ops come from)"
step "built in $((SECONDS - T0)) s"

step "check that the CUDA kernels are registered"
DEV_KEY=$DEV_KEY "$PY" - <<'EOF'
import os
import sys
import torch
import rankest.ops as ops

print("rankest.ops backend:", ops.extension_backend(), "-", ops.extension_detail())
if ops.extension_backend() != "installed":
    print("WARNING: rankest._C from the build did not load (the ops were JIT-built or are missing)")
key = os.environ["DEV_KEY"]
dev = "cuda" if key == "CUDA" else "cpu"
missing = [op for op in ("transform_rows", "gram_update")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rankest::{op}", key)]
if ops.extension_backend() is None or missing:
    sys.exit(f"FAIL: no {key} kernel registered for {missing or 'any op'}")
# One call of each on the GPU, so a kernel that cannot launch fails here, not in the benchmark.
z = torch.randn(3, 1000, device=dev, dtype=torch.bfloat16)
rows, stats = ops.transform_rows(z, torch.tensor([0, 5, -1], device=dev), 997, "prob", True, torch.float32)
g = torch.zeros(997, 997, dtype=torch.float64, device=dev)
ops.gram_update(g, rows, "fast")
if dev == "cuda":
    torch.cuda.synchronize()
print(f"{key} kernels registered and launched: transform_rows, gram_update; prob row sums",
      [round(float(x), 4) for x in rows.double().sum(1)])
EOF

step "CUDA op tests (tests/test_ops.py)"
test_rc=0
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops.py || test_rc=$?
[[ $test_rc -eq 0 ]] || echo "FAIL: tests/test_ops.py exited with $test_rc (124 = timeout); running the benchmark anyway"

step "benchmark: benchmarks/bench_gpu.py $*"
bench_rc=0
timeout "${BENCH_TIMEOUT:-480}" "$PY" benchmarks/bench_gpu.py "$@" || bench_rc=$?
step "done in $((SECONDS - T0)) s: tests rc=$test_rc, benchmark rc=$bench_rc (2 = a phase failed, 124 = timeout)"
[[ $test_rc -eq 0 && $bench_rc -eq 0 ]]
