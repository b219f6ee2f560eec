#!/usr/bin/env python3
"""rankest on a GPU at Pythia-6.9B scale: `estimate` against one bare forward pass.

    python3 benchmarks/bench_gpu.py                  # H100/H200: ~2–3 min (model build included)
    python3 benchmarks/bench_gpu.py --full           # + gram fp64 mode and the 50k fp64 eigensolve (~+2 min)
    python3 benchmarks/bench_gpu.py --tiny           # the same code, tiny shapes, CPU fp32 (CI smoke test)

Normally run through ``benchmarks/gpu_check.sh`` (builds the CUDA extension and runs the CUDA
tests first). Needs torch, transformers, numpy, matplotlib — never ``datasets`` or ``gguf``.

What is measured, in one process, on the same synthetic tokens (seeded uniform ids < V'):

0. ceilings: device-to-device copy bandwidth (bytes read + written) and GEMM rates (bf16,
   fp32, fp64), then the two compiled ops alone on fresh random inputs (CUDA events, warm-up,
   median): ``transform_rows`` GB/s (bf16 logits → fp32 clr / prob rows + stats, n = 8192)
   against the copy bandwidth, and ``gram_update`` TFLOP/s (fp64 and fast modes, V' = 50,277);
1. the bare teacher forward, ``model(input_ids=ids).logits`` in bf16 (use_cache=False), tokens/s;
2. ``rankest.estimator.pipeline.run_estimate`` with route ``factor`` (clr), ``sketch`` (prob, k = 4096,
   fast; skipped while ``rankest.accumulate.sketch`` does not exist) and ``gram`` (prob, V' = 50,277, fast),
   and with ``--full`` gram fp64 — each as a ratio to (1);
3. a naive PyTorch baseline a user would write: the same forward, fp32 ``log_softmax``, explicit
   centring (clr) and fp32 sketch GEMMs ``Y += Tᵀ(TΩ)`` with Ω V'×k fp32 — ratio to (1).

Timing: ``torch.cuda.synchronize()`` + ``perf_counter`` around each whole phase; after one
warm-up of every phase on one batch, the phases run interleaved in rounds (forward, factor,
sketch, gram, naive; ``--repeats`` rounds, default 2, fewer if ``--budget-s`` would be
exceeded) and each phase's median is reported.

Two ratios per route. *Streaming* = (wall time of ``run_estimate`` − its ``finalize``) / forward:
the per-token cost, what the issue's goals are about. *Total* includes ``finalize``, a one-off
cost independent of N (d×d eigh/SVD for factor, k×k for sketch). The ``gram`` route's
``finalize`` (fp64 ``eigvalsh`` of the 50k Gram, about a minute) is replaced by a stub in the
timed runs and timed on its own with ``--full``. The accumulators' ``finalize`` is wrapped to
synchronise first, so queued streaming work is never counted as finalize.

Writes ``<report-dir>/gpu_<card>.md``, ``.png`` (ratios with the goals) and ``.json`` (every
number), updated after each phase so a run cut short still leaves its numbers; copies them to
``$OUT`` when that is set. The summary table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOALS = {"factor": 1.02, "factor_fast": 1.02, "sketch": 1.10, "gram_fast": 1.35}  # streaming ratio to the bare forward
TRANSFORM_GOAL = 0.80  # transform_rows bandwidth / measured copy bandwidth
FORBIDDEN_MODULES = ("datasets", "gguf")  # absent on the GPU machine: must never be imported


@dataclass
class Shape:
    """The teacher's shape and the sizes of every measurement."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    logit_width: int  # V (rows of the head, padded)
    vocab: int  # V' (real vocabulary)
    seq_len: int
    batch_windows: int  # windows per batch
    batches: int
    micro_rows: int  # n of the op micro-benchmarks
    micro_cols: int  # V' of gram_update alone
    sketch_k: int
    copy_bytes: int
    gemm_n: int
    init_std: float
    dtype: str
    device: str

    @property
    def tokens(self) -> int:
        return self.batches * self.batch_windows * self.seq_len


PYTHIA_6_9B = Shape(hidden=4096, layers=32, heads=32, intermediate=16384, logit_width=50432, vocab=50277,
                    seq_len=2048, batch_windows=8, batches=8, micro_rows=8192, micro_cols=50277, sketch_k=4096,
                    copy_bytes=2 << 30, gemm_n=8192, init_std=0.02, dtype="bf16", device="cuda")
TINY = Shape(hidden=64, layers=2, heads=4, intermediate=256, logit_width=576, vocab=500, seq_len=64,
             batch_windows=4, batches=3, micro_rows=256, micro_cols=500, sketch_k=32, copy_bytes=16 << 20,
             gemm_n=256, init_std=0.1, dtype="fp32", device="cpu")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# --- timing --------------------------------------------------------------------------------
def sync(dev: torch.device | None = None) -> None:
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        torch.cuda.synchronize()


def timed(fn, dev):
    """(seconds, result) of fn(), synchronised before and after."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def time_calls(fn, dev, *, warmup: int, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls fn(i) after ``warmup`` calls: CUDA events on a GPU."""
    for i in range(warmup):
        fn(i)
    sync(dev)
    out = []
    for r in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + r)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(warmup + r)
            out.append(time.perf_counter() - t0)
    return out


def reset_peak(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def free_memory(dev) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


# --- machine -------------------------------------------------------------------------------
def machine_info(dev: torch.device) -> dict:
    import rankest.ops as ops

    info = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "rankest_backend": ops.extension_backend(), "rankest_backend_detail": ops.extension_detail(),
        "cuda_matmul_fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    key = {"cuda": "CUDA", "cpu": "CPU"}[dev.type]
    info["kernels"] = {op: (ops.extension_backend() is not None
                            and torch._C._dispatch_has_kernel_for_dispatch_key(f"rankest::{op}", key))
                       for op in ("transform_rows", "gram_update")}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(card=torch.cuda.get_device_name(dev), sm=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                    "power.limit", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30)
                info["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else q.stderr.strip()
                info["driver"] = info["nvidia_smi"].split(",")[1].strip() if "," in info["nvidia_smi"] else None
            except (OSError, subprocess.SubprocessError, IndexError) as e:
                info["nvidia_smi"] = f"failed: {e}"
        info.setdefault("driver", None)
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()})", driver=None)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def card_slug(info: dict, tiny: bool) -> str:
    if tiny and not info["card"].startswith("NVIDIA"):
        return "cpu_tiny"
    slug = re.sub(r"[^a-z0-9]+", "_", info["card"].lower()).strip("_")
    return slug + ("_tiny" if tiny else "")


# --- ceilings and ops alone ----------------------------------------------------------------
def bench_ceilings(shape: Shape, dev) -> dict:
    out = {}
    n_el = shape.copy_bytes // 4
    x = torch.randn(n_el, device=dev)
    y = torch.empty_like(x)
    t = time_calls(lambda i: y.copy_(x), dev, warmup=3, reps=10)
    out["copy"] = {"bytes_moved": 2 * x.numel() * 4, "seconds": statistics.median(t),
                   "GBps": 2 * x.numel() * 4 / statistics.median(t) / 1e9}
    del x, y
    n = shape.gemm_n
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp64", torch.float64)):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        t = time_calls(lambda i: a @ b, dev, warmup=2, reps=5)
        out[f"gemm_{name}"] = {"n": n, "seconds": statistics.median(t), "TFLOPs": 2 * n**3 / statistics.median(t) / 1e12}
        del a, b
    free_memory(dev)
    return out


def bench_transform_rows(shape: Shape, dev, copy_gbps: float, seed: int) -> dict:
    import rankest.ops as ops

    n, v, vp = shape.micro_rows, shape.logit_width, shape.vocab
    in_dtype = torch.bfloat16  # what the teacher produces on a GPU (also on the CPU in --tiny)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sets = 3
    logits = [(torch.randn(n, v, device=dev, dtype=torch.float32, generator=gen) * 3.0).to(in_dtype)
              for _ in range(sets)]
    targets = [torch.randint(0, vp, (n,), device=dev, generator=gen) for _ in range(sets)]
    in_b = logits[0].element_size()
    results = {}
    cases = [("clr", "clr", True, "1"), ("prob", "prob", True, "1"), ("clr_stats_only", "clr", False, "1"),
             ("prob_stats_only", "prob", False, "1"), ("clr_no_smem", "clr", True, "0"),
             ("prob_no_smem", "prob", True, "0")]
    for label, space, write, stage in cases:
        def call(i, space=space, write=write):
            return ops.transform_rows(logits[i % sets], targets[i % sets], vp, space, write, torch.float32)

        # *_no_smem: pass 2 re-reads the row from L2 instead of the shared-memory copy (kernel knob).
        os.environ["RANKEST_TRANSFORM_ROWS_STAGE"] = stage
        try:
            t = time_calls(call, dev, warmup=3, reps=20)
        finally:
            os.environ.pop("RANKEST_TRANSFORM_ROWS_STAGE", None)
        sec = statistics.median(t)
        # The fewest bytes: the n×V' real columns read once (the padded V − V' are never needed),
        # the rows written once, the stats written and the targets read.
        nbytes = n * vp * in_b + (n * vp * 4 if write else 0) + n * 4 * 4 + n * 8
        r = {"n": n, "V": v, "V_real": vp, "in_dtype": str(in_dtype).replace("torch.", ""),
             "out_dtype": "float32" if write else None, "seconds": sec, "bytes": nbytes,
             "GBps": nbytes / sec / 1e9, "fraction_of_copy": nbytes / sec / 1e9 / copy_gbps}
        # Sanity: the timed op against the fp64 reference on a few rows.
        rows, stats = call(0)
        rr, rs = ops.reference.transform_rows(logits[0][:8], targets[0][:8], vp, space, write, torch.float64)
        if write:
            r["rows_max_rel_err"] = float((rows[:8].double() - rr).abs().max() / rr.abs().max().clamp_min(1e-30))
        r["stats_max_rel_err"] = float(((stats[:8].double() - rs).abs() / rs.abs().clamp_min(1e-6)).nan_to_num().max())
        results[label] = r
        del rows, stats
    del logits, targets
    free_memory(dev)
    return results


def bench_gram_update(shape: Shape, dev, seed: int) -> dict:
    import rankest.ops as ops

    n, vp = shape.micro_rows, shape.micro_cols
    gen = torch.Generator(device=dev).manual_seed(seed + 7)
    out: dict = {}
    try:
        gram = torch.zeros(vp, vp, dtype=torch.float64, device=dev)
    except RuntimeError as e:  # OOM: report and try a smaller V'
        if not is_oom(e):
            raise
        out["oom_at_V_real"] = vp
        vp = 32768
        free_memory(dev)
        gram = torch.zeros(vp, vp, dtype=torch.float64, device=dev)
    chunks = [torch.randn(n, vp, device=dev, dtype=torch.float32, generator=gen) for _ in range(2)]
    flops = n * vp * (vp + 1)  # lower triangle incl. diagonal: n·V'(V'+1)/2 multiply-adds × 2 flops
    # fp32 chunks are what run_estimate feeds the gram route; bf16 chunks show the half-input path.
    for label, mode, cdt, reps in (("fp64", "fp64", torch.float32, 3), ("fast", "fast", torch.float32, 5),
                                   ("fast_bf16_chunk", "fast", torch.bfloat16, 5)):
        cs = [c.to(cdt) for c in chunks]
        t = time_calls(lambda i, mode=mode, cs=cs: ops.gram_update(gram, cs[i % 2], mode), dev, warmup=1, reps=reps)
        sec = statistics.median(t)
        r = {"n": n, "V_real": vp, "chunk_dtype": str(cdt).replace("torch.", ""), "precision": mode, "flops": flops,
             "seconds": sec, "TFLOPs": flops / sec / 1e12}
        # Sanity: one update into a zeroed Gram against fp64, on the first and the last 64 columns.
        gram.zero_()
        ops.gram_update(gram, cs[0], mode)
        errs = []
        for lo in (0, vp - min(64, vp)):
            c = cs[0][:, lo:lo + 64].double()
            ref = torch.tril(c.T @ c)
            got = torch.tril(gram[lo:lo + 64, lo:lo + 64])
            errs.append(float((got - ref).abs().max() / ref.abs().max()))
        r["block_max_rel_err"] = max(errs)
        out[label] = r
        del cs
    # cuBLAS DGEMM on the same problem (full product, in place): the fp64 mode's yardstick.
    c = chunks[0]
    cd = c.double()
    t = time_calls(lambda i: gram.addmm_(cd.T, cd), dev, warmup=1, reps=2)
    out["torch_fp64_full_gemm"] = {"flops": 2 * n * vp * vp, "seconds": statistics.median(t),
                                   "TFLOPs": 2 * n * vp * vp / statistics.median(t) / 1e12,
                                   "note": "gram.addmm_(Cᵀ, C) in fp64: full (not triangular) product"}
    del gram, chunks, c, cd
    free_memory(dev)
    return out


# --- the teacher ---------------------------------------------------------------------------
class VocabSize:
    """The tokenizer a Teacher needs for pre-tokenised windows: only len() = V'."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def build_teacher(shape: Shape, dev, seed: int):
    """GPT-NeoX of the given shape, random weights created directly on the device in its dtype."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rankest.sources.teachers import Teacher

    dtype = DTYPES[shape.dtype]
    kw = dict(vocab_size=shape.logit_width, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
              num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
              max_position_embeddings=max(2048, shape.seq_len), hidden_act="gelu", layer_norm_eps=1e-5,
              use_parallel_residual=True, tie_word_embeddings=False, use_cache=False,
              initializer_range=shape.init_std, bos_token_id=0, eos_token_id=0)
    if "rope_parameters" in inspect.signature(GPTNeoXConfig.__init__).parameters:  # transformers ≥ 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    else:
        kw.update(rotary_pct=0.25, rotary_emb_base=10000)
    config = GPTNeoXConfig(**kw)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = GPTNeoXForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    if any(p.dtype != dtype or p.device.type != dev.type for p in model.parameters()):
        model = model.to(device=dev, dtype=dtype)  # (.to() would also cast rotary's fp32 inv_freq)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    with torch.no_grad():  # randomised norms (as rankest.sources.teachers.build_tiny_neox): β ≠ 0, γ ≠ 1
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, device=dev, generator=gen) + 0.5)
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, device=dev, generator=gen))
    model.eval().requires_grad_(False)
    teacher = Teacher(model, VocabSize(shape.vocab), name=f"random-neox-d{shape.hidden}-L{shape.layers}",
                      source="synthetic:bench_gpu")
    rot = getattr(getattr(model, "gpt_neox", None), "rotary_emb", None)
    desc = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        "param_devices": sorted({str(p.device) for p in model.parameters()}),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "rotary_dims": 2 * int(rot.inv_freq.numel()) if rot is not None and hasattr(rot, "inv_freq") else None,
        "head_dim": shape.hidden // shape.heads,
    }
    return model, teacher, desc


# --- the phases ----------------------------------------------------------------------------
def forward_pass(model, windows, shape: Shape, dev) -> None:
    with torch.inference_mode():
        for lo in range(0, windows.shape[0], shape.batch_windows):
            ids = windows[lo:lo + shape.batch_windows, :-1].to(dev, non_blocking=True)
            logits = model(input_ids=ids).logits
        del logits


def naive_pass(model, windows, shape: Shape, dev, omega) -> torch.Tensor:
    """What a user writes without rankest: fp32 log_softmax, explicit centring, fp32 sketch GEMMs."""
    vp = shape.vocab
    y = torch.zeros(vp, omega.shape[1], device=dev, dtype=torch.float32)
    with torch.inference_mode():
        for lo in range(0, windows.shape[0], shape.batch_windows):
            ids = windows[lo:lo + shape.batch_windows, :-1].to(dev, non_blocking=True)
            logits = model(input_ids=ids).logits
            logp = torch.log_softmax(logits[..., :vp].float(), dim=-1)
            t = (logp - logp.mean(dim=-1, keepdim=True)).reshape(-1, vp)
            y += t.T @ (t @ omega)
    return y


def accumulate_pass(teacher, windows, shape: Shape, dev, *, side_stream: bool) -> torch.Tensor:
    """The gram route's per-batch work written out (features → logits → transform_rows → fast
    gram_update of bf16 prob rows), with the Gram update on the teacher's stream (serial), or on
    a side stream while the next batch's forward runs (does overlapping pay?)."""
    from rankest import ops

    vp = teacher.n_cols
    gram = torch.zeros(vp, vp, dtype=torch.float64, device=dev)
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev) if side_stream and cuda else None
    main = torch.cuda.current_stream(dev) if cuda else None
    with torch.inference_mode():
        for lo in range(0, windows.shape[0], shape.batch_windows):
            w = windows[lo:lo + shape.batch_windows]
            ids = w[:, :-1].to(dev, non_blocking=True)
            targets = w[:, 1:].reshape(-1).to(dev, non_blocking=True)
            h = teacher.features(ids).reshape(-1, teacher.hidden_size)
            rows, _ = ops.transform_rows(teacher.logits(h), targets, vp, "prob", True, torch.bfloat16)
            if side is None:
                ops.gram_update(gram, rows, "fast")
                continue
            side.wait_stream(main)
            with torch.cuda.stream(side):
                ops.gram_update(gram, rows, "fast")
            rows.record_stream(side)
        if side is not None:
            main.wait_stream(side)
    return gram


class FinalizeProbe:
    """Wraps the accumulator classes run_estimate builds: times finalize (after a sync) and
    optionally replaces it by a stub (no eigensolve), keeping the accumulator when asked."""

    def __init__(self) -> None:
        self.finalize_s = 0.0
        self.test_block_s = 0.0
        self.acc = None
        self.gram_check = None

    @contextlib.contextmanager
    def patch(self, stub: bool, keep: bool = False):
        import rankest.estimator.pipeline as est

        saved = {"Factor": est.Factor, "Gram": est.Gram}
        sketch_mod = None
        try:
            import rankest.accumulate.sketch as sketch_mod
        except ImportError:
            sketch_mod = None
        self.finalize_s, self.test_block_s, self.acc, self.gram_check = 0.0, 0.0, None, None
        est.Factor = self._wrap(saved["Factor"], stub, keep)
        est.Gram = self._wrap(saved["Gram"], stub, keep)
        saved_sketch = getattr(sketch_mod, "Sketch", None)
        if saved_sketch is not None:
            sketch_mod.Sketch = self._wrap(saved_sketch, stub, keep)
        try:
            yield self
        finally:
            est.Factor, est.Gram = saved["Factor"], saved["Gram"]
            if saved_sketch is not None:
                sketch_mod.Sketch = saved_sketch

    def _wrap(self, cls, stub: bool, keep: bool):
        probe = self

        class Probed(cls):
            if hasattr(cls, "test_block"):  # the sketch's test matrix, generated on first use
                def test_block(self):
                    if getattr(self, "_x", None) is not None:
                        return super().test_block()
                    sync()
                    t0 = time.perf_counter()
                    x = super().test_block()
                    sync()
                    probe.test_block_s += time.perf_counter() - t0
                    return x

            def finalize(self, energy=float("nan")):
                from rankest.spectrum import Spectrum

                sync()
                t0 = time.perf_counter()
                gram = getattr(self, "gram", None)
                if isinstance(gram, torch.Tensor) and energy == energy and energy > 0:
                    # trace(TᵀT) = ‖T‖_F²: the Gram's diagonal against the streamed energy.
                    probe.gram_check = abs(float(gram.diagonal().sum()) - energy) / energy
                if stub:
                    spec = Spectrum(sigma=np.zeros(1), energy=energy, n_rows=self.n_rows, n_cols=self.n_cols,
                                    space=getattr(self, "space", "clr"), route=getattr(self, "name", "?"),
                                    exact=False)
                else:
                    spec = super().finalize(energy=energy)
                sync()
                probe.finalize_s += time.perf_counter() - t0
                if keep:
                    probe.acc = self
                return spec

        Probed.__name__ = Probed.__qualname__ = cls.__name__
        return Probed


class _Windows(torch.Tensor):
    """Pre-tokenised windows passed as ``corpus``. ``run_estimate`` does ``cfg.corpus or
    DEFAULT_CORPUS``, which raises on a tensor of several elements; this subclass is truthy and
    hands out plain tensors from every operation (so the forward passes see ordinary tensors)."""

    def __bool__(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


PHASE_ORDER = ("forward", "factor", "factor_fast", "sketch", "gram_fast", "gram_fp64", "naive", "overlap_off",
               "overlap_on")


def sketch_available() -> bool:
    try:
        import rankest.accumulate.sketch  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_kwargs(shape: Shape) -> dict[str, dict]:
    common = dict(seq_len=shape.seq_len, tokens=None, batch_size=shape.batch_windows, quiet=True, convergence=False)
    return {
        "factor": dict(common, route="factor", space="clr", gram_precision="fp64"),
        # bf16 features on tensor cores: products exact in fp32, fp32 sums per chunk, fp64 carry.
        "factor_fast": dict(common, route="factor", space="clr", gram_precision="fast"),
        "sketch": dict(common, route="sketch", space="prob", rank_max=shape.sketch_k, gram_precision="fast"),
        # The budget only steers the route check: rankest's gram_nbytes counts 4 Gram copies
        # (81 GB at V' = 50,277, over an H100's free/2); the run itself needs ~2 (Gram + eigvalsh copy).
        "gram_fast": dict(common, route="gram", space="prob", gram_precision="fast", max_memory="1TB"),
        "gram_fp64": dict(common, route="gram", space="prob", gram_precision="fp64", max_memory="1TB"),
    }


class Bench:
    def __init__(self, args, shape: Shape) -> None:
        self.args, self.shape = args, shape
        self.dev = torch.device(shape.device)
        self.t_start = time.perf_counter()
        self.res: dict = {"config": {"args": vars(args), "shape": asdict(shape), "tokens": shape.tokens},
                          "errors": {}, "phases": {}, "log": []}
        self.report_dir = Path(args.report_dir) if args.report_dir else HERE / "reports"
        self.slug = None

    # -- bookkeeping
    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t_start:7.1f} s] {msg}"
        print(line, flush=True)
        self.res["log"].append(line)

    def error(self, key: str, exc: BaseException) -> None:
        self.res["errors"][key] = short_error(exc)
        self.log(f"ERROR in {key}: {short_error(exc)}")
        traceback.print_exc()
        free_memory(self.dev)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    # -- the run
    def run(self) -> int:
        a, s, dev = self.args, self.shape, self.dev
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py: no CUDA device visible (use --tiny for the CPU smoke run)")
        torch.manual_seed(a.seed)
        info = machine_info(dev)
        self.res["machine"] = info
        self.slug = card_slug(info, a.tiny)
        self.log(f"{info['card']} · driver {info.get('driver')} · torch {info['torch']} (CUDA {info['torch_cuda']}) · "
                 f"rankest ops {info['rankest_backend']} · kernels {info['kernels']}")
        if dev.type == "cuda" and not all(info["kernels"].values()):
            self.log("WARNING: some rankest CUDA kernels are missing: the ops run the pure-PyTorch reference")
        self.save()

        # 0. ceilings and the ops alone (before the model, so the 20 GB Gram has room)
        try:
            self.res["ceilings"] = bench_ceilings(s, dev)
            c = self.res["ceilings"]
            self.log(f"copy {c['copy']['GBps']:.4g} GB/s; GEMM bf16 {c['gemm_bf16']['TFLOPs']:.4g}, fp32 "
                     f"{c['gemm_fp32']['TFLOPs']:.3g}, fp64 {c['gemm_fp64']['TFLOPs']:.3g} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            self.error("ceilings", e)
        copy_gbps = self.res.get("ceilings", {}).get("copy", {}).get("GBps", float("nan"))
        try:
            self.res["transform_rows"] = bench_transform_rows(s, dev, copy_gbps, a.seed)
            for k, r in self.res["transform_rows"].items():
                self.log(f"transform_rows {k}: {r['GBps']:.4g} GB/s = {100 * r['fraction_of_copy']:.0f}% of copy "
                         f"({r['seconds'] * 1e3:.3f} ms)")
        except Exception as e:  # noqa: BLE001
            self.error("transform_rows", e)
        try:
            self.res["gram_update"] = bench_gram_update(s, dev, a.seed)
            for k, r in self.res["gram_update"].items():
                if isinstance(r, dict):
                    self.log(f"gram_update {k}: {r['TFLOPs']:.3g} TFLOP/s ({r['seconds'] * 1e3:.1f} ms)")
        except Exception as e:  # noqa: BLE001
            self.error("gram_update", e)
        self.save()
        try:
            self.teacher_phases()
        except Exception as e:  # noqa: BLE001 - whatever broke, the numbers so far are kept
            self.error("teacher_phases", e)
        self.res["forbidden_modules_imported"] = [m for m in FORBIDDEN_MODULES if m in sys.modules]
        self.res["seconds_total"] = self.elapsed()
        self.save(plot=True)
        self.print_summary()
        return 2 if self.res["errors"] else 0

    def teacher_phases(self) -> None:
        """1–3: the bare forward, the estimate routes and the naive baseline on the same tokens."""
        a, s, dev = self.args, self.shape, self.dev
        t_build, (model, teacher, desc) = timed(lambda: build_teacher(s, dev, a.seed), dev)
        desc["build_seconds"] = t_build
        self.res["teacher"] = desc
        self.log(f"teacher built in {t_build:.1f} s: {desc['parameters'] / 1e9:.2f} B params, {desc['param_dtypes']}, "
                 f"attn {desc['attn_implementation']}, rotary dims {desc['rotary_dims']}/{desc['head_dim']}")
        gen = torch.Generator().manual_seed(a.seed)
        windows = torch.randint(0, s.vocab, (s.batches * s.batch_windows, s.seq_len + 1), generator=gen)
        warm_windows = windows[:s.batch_windows]
        naive_l = min(2 * s.sketch_k, s.vocab)  # the sketch route's default l = 2k test columns
        self.res["config"]["naive_l"] = naive_l
        omega = torch.randn(s.vocab, naive_l, device=dev, dtype=torch.float32,
                            generator=torch.Generator(device=dev).manual_seed(a.seed + 3))
        ek = estimate_kwargs(s)
        probe = FinalizeProbe()
        from rankest.estimator.pipeline import run_estimate

        def run_phase(name: str, wins, *, stub: bool, keep: bool = False) -> dict:
            free_memory(dev)  # each phase starts from the same allocator state (the Gram is 20 GB)
            reset_peak(dev)
            if name == "forward":
                sec, _ = timed(lambda: forward_pass(model, wins, s, dev), dev)
                return {"wall": sec, "stream": sec, "finalize": 0.0, "peak_gib": peak_gib(dev)}
            if name.startswith("overlap_"):
                sec, g = timed(lambda: accumulate_pass(teacher, wins, s, dev, side_stream=name == "overlap_on"), dev)
                del g
                return {"wall": sec, "stream": sec, "finalize": 0.0, "peak_gib": peak_gib(dev)}
            if name == "naive":
                sec, y = timed(lambda: naive_pass(model, wins, s, dev, omega), dev)
                ok = bool(torch.isfinite(y).all())
                del y
                return {"wall": sec, "stream": sec, "finalize": 0.0, "peak_gib": peak_gib(dev), "finite": ok}
            with probe.patch(stub=stub, keep=keep):
                sec, spec = timed(lambda: run_estimate(teacher=teacher, corpus=wins.as_subclass(_Windows),
                                                       **ek[name]), dev)
            out = {"wall": sec, "finalize": probe.finalize_s, "stream": sec - probe.finalize_s,
                   "peak_gib": peak_gib(dev), "finalize_stubbed": stub,
                   "meta_seconds_stream": spec.meta.get("seconds_stream"),
                   "meta_seconds_finalize": spec.meta.get("seconds_finalize"),
                   "n_rows": spec.n_rows, "energy": spec.energy, "nll": spec.meta.get("nll"),
                   "gram_trace_rel_err": probe.gram_check}
            if name == "sketch":
                out["test_block_s"] = probe.test_block_s
                out["sketch_l"] = spec.meta.get("l")
                out["trusted_d"] = spec.meta.get("trusted_d") if not stub else None
            if not stub:
                out["metrics"] = spec.metrics()
            return out

        phases = ["forward", "factor", "factor_fast", "sketch", "gram_fast", "naive", "overlap_off", "overlap_on"]
        for name in [x for x in (self.args.skip or "").split(",") if x]:
            if name in phases and name != "forward":
                phases.remove(name)
                self.res["phases"][name] = {"skipped": "--skip"}
                self.log(f"{name}: skipped (--skip)")
        if not sketch_available():
            phases.remove("sketch")
            self.res["phases"]["sketch"] = {"skipped": "rankest.accumulate.sketch is not available in this build"}
            self.log("sketch: skipped (rankest.accumulate.sketch not available)")
        # Warm-up: every phase once on one batch; factor's finalize runs for real (cuSOLVER set-up),
        # the others' are stubbed (the sketch's costs seconds whatever the batch).
        for name in list(phases):
            try:
                r = run_phase(name, warm_windows, stub=name != "factor")
                self.log(f"warm-up {name}: {r['wall']:.2f} s")
            except Exception as e:  # noqa: BLE001
                self.error(f"warmup_{name}", e)
                phases.remove(name)
                self.res["phases"][name] = {"error": short_error(e)}
        runs: dict[str, list[dict]] = {p: [] for p in phases}
        for rnd in range(a.repeats):
            for name in list(phases):
                if rnd and runs[name] and runs[name][0]["wall"] > a.slow_phase_s:
                    continue  # one run of a phase slower than --slow-phase-s is enough
                try:
                    r = run_phase(name, windows, stub=name.startswith("gram"))
                except Exception as e:  # noqa: BLE001
                    self.error(f"{name}_round{rnd}", e)
                    phases.remove(name)
                    self.res["phases"][name] = {"error": short_error(e)}
                    continue
                runs[name].append(r)
                self.log(f"round {rnd + 1} {name}: {r['wall']:.2f} s (stream {r['stream']:.2f}, finalize "
                         f"{r['finalize']:.2f}, peak {r['peak_gib'] if r['peak_gib'] is None else round(r['peak_gib'], 1)} GiB)")
            self.summarise(runs)
            self.save(plot=True)
            nxt = sum(runs[p][-1]["wall"] + 1.0 for p in phases if runs[p] and runs[p][0]["wall"] <= a.slow_phase_s)
            if rnd + 1 < a.repeats and self.elapsed() + nxt > a.budget_s:
                self.log(f"stopping after {rnd + 1} round(s): another (~{nxt:.0f} s) would pass --budget-s {a.budget_s:.0f}")
                break

        for name in [x for x in (a.profile or "").split(",") if x]:
            self.profile(name, lambda name=name: run_phase(name, warm_windows, stub=True))

        if a.full:
            try:
                r = run_phase("gram_fp64", windows, stub=True, keep=True)
                runs["gram_fp64"] = [r]
                self.log(f"gram fp64: {r['wall']:.2f} s (stream {r['stream']:.2f})")
            except Exception as e:  # noqa: BLE001
                self.error("gram_fp64", e)
                self.res["phases"]["gram_fp64"] = {"error": short_error(e)}
            self.summarise(runs)
            self.save(plot=True)
            acc = probe.acc
            probe.acc = None
            del model, teacher, omega
            free_memory(dev)
            if acc is not None:
                self.eigensolve(acc)
            else:
                self.res["eigensolve"] = {"skipped": "no fp64 Gram (gram_fp64 failed)"}

    def profile(self, name: str, fn) -> None:
        """torch.profiler over one batch of a phase: the top kernels by device time, and the device's
        busy time against the wall time (idle gaps = host-side work or syncs)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        try:
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                fn()
                sync(self.dev)
            wall = time.perf_counter() - t0
            ka = prof.key_averages()
            attr = "device_time_total" if hasattr(ka[0], "device_time_total") else "cuda_time_total"
            table = ka.table(sort_by=attr if self.dev.type == "cuda" else "cpu_time_total", row_limit=15)
            busy = sum(getattr(e, "self_" + attr, 0) for e in ka) / 1e6 if self.dev.type == "cuda" else None
            self.res.setdefault("profile", {})[name] = {"wall_s": wall, "device_busy_s": busy, "table": table}
            self.log(f"profile {name}: wall {wall:.3f} s (profiled), device busy {_fmt(busy, '.3f')} s\n{table}")
        except Exception as e:  # noqa: BLE001
            self.error(f"profile_{name}", e)

    def eigensolve(self, acc) -> None:
        """fp64 eigvalsh of the V'×V' Gram (lower triangle), on the device, timed alone."""
        from rankest.spectrum import Spectrum

        gram = acc.gram
        reset_peak(self.dev)
        self.log(f"eigensolve: torch.linalg.eigvalsh fp64 of the {gram.shape[0]:,}² Gram on {gram.device} ...")
        try:
            sec, lam = timed(lambda: torch.linalg.eigvalsh(gram, UPLO="L"), self.dev)
            lam = lam.cpu().numpy()
            spec = Spectrum(sigma=np.sqrt(np.clip(lam, 0, None)), energy=float("nan"), n_rows=acc.n_rows,
                            n_cols=acc.n_cols, space="prob", route="gram", exact=True, precision="fp64")
            self.res["eigensolve"] = {"n": int(gram.shape[0]), "seconds": sec, "peak_gib": peak_gib(self.dev),
                                      "negative_eigs_rel": float(max(0.0, -lam.min()) / max(lam.max(), 1e-300)),
                                      "metrics": spec.metrics(),
                                      "w_error": {str(d): float(spec.w_error(d)) for d in (10, 100, 1000, 2000, 4096)
                                                  if d < spec.sigma.size}}
            self.log(f"eigensolve: {sec:.1f} s")
        except Exception as e:  # noqa: BLE001
            self.res["eigensolve"] = {"error": short_error(e), "oom": is_oom(e)}
            self.error("eigensolve", e)

    def summarise(self, runs: dict[str, list[dict]]) -> None:
        fwd = [r["wall"] for r in runs.get("forward", [])]
        f_med = statistics.median(fwd) if fwd else float("nan")
        for name, rs in runs.items():
            if not rs:
                continue
            wall = statistics.median(r["wall"] for r in rs)
            stream = statistics.median(r["stream"] for r in rs)
            ph = {"repeats": len(rs), "wall_median": wall, "stream_median": stream,
                  "finalize_median": statistics.median(r["finalize"] for r in rs),
                  "tokens_per_second": self.shape.tokens / wall, "runs": rs}
            if any("test_block_s" in r for r in rs):
                ph["test_block_median"] = statistics.median(r.get("test_block_s", 0.0) for r in rs)
            if name != "forward":
                ph["ratio_stream"] = stream / f_med
                ph["ratio_total"] = wall / f_med
                if name in GOALS:
                    ph["goal"] = GOALS[name]
                    ph["meets_goal"] = bool(ph["ratio_stream"] <= GOALS[name])
            self.res["phases"][name] = ph

    # -- outputs
    def paths(self) -> dict[str, Path]:
        base = self.report_dir / f"gpu_{self.slug}"
        return {"md": base.with_suffix(".md"), "json": base.with_suffix(".json"), "png": base.with_suffix(".png")}

    def save(self, plot: bool = False) -> None:
        """Write the JSON and the report (and the chart once there are ratios); copy to $OUT."""
        self.report_dir.mkdir(parents=True, exist_ok=True)
        p = self.paths()
        p["json"].write_text(json.dumps(_jsonable(self.res), indent=2) + "\n")
        p["md"].write_text(self.markdown())
        if plot and self.ratio_rows():
            try:
                self.plot(p["png"])
            except Exception as e:  # noqa: BLE001
                self.error("plot", e)
                p["json"].write_text(json.dumps(_jsonable(self.res), indent=2) + "\n")
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            for f in p.values():
                if f.exists():
                    shutil.copy2(f, Path(out) / f.name)

    def ratio_rows(self) -> list[tuple[str, str, dict]]:
        labels = [("factor", "factor (clr)"), ("factor_fast", "factor (clr, fast)"), ("sketch", f"sketch (prob, k={self.shape.sketch_k}, fast)"),
                  ("gram_fast", "gram (prob, fast)"), ("gram_fp64", "gram (prob, fp64)"),
                  ("naive", "naive PyTorch (fp32)"), ("overlap_off", "gram work by hand, one stream"),
                  ("overlap_on", "same, Gram on a side stream")]
        return [(k, lab, self.res["phases"][k]) for k, lab in labels if "ratio_stream" in self.res["phases"].get(k, {})]

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.ratio_rows()
        fig, ax = plt.subplots(figsize=(9, 4.8))
        x = np.arange(len(rows))
        w = 0.38
        colors = ["#7f7f7f" if k == "naive" else "#1f77b4" for k, _, _ in rows]
        stream = [ph["ratio_stream"] for _, _, ph in rows]
        total = [ph["ratio_total"] for _, _, ph in rows]
        ax.bar(x - w / 2, stream, w, color=colors, label="streaming (estimate − finalize)")
        ax.bar(x + w / 2, total, w, color=colors, alpha=0.4, hatch="//", label="total (incl. finalize)")
        for i, (k, _, ph) in enumerate(rows):
            ax.text(i - w / 2, stream[i], f"{stream[i]:.2f}×", ha="center", va="bottom", fontsize=8)
            ax.text(i + w / 2, total[i], f"{total[i]:.2f}×", ha="center", va="bottom", fontsize=8)
            if k in GOALS:
                ax.hlines(GOALS[k], i - 0.48, i + 0.48, colors="red", linestyles="--", lw=1.5)
                ax.text(i + 0.48, GOALS[k], f"goal ≤ {GOALS[k]:.2f}×", color="red", ha="right", va="bottom",
                        fontsize=7, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([lab for _, lab, _ in rows], fontsize=8)
        ax.set_ylabel("time / bare forward (same tokens)")
        m = self.res["machine"]
        ax.set_title(f"rankest estimate vs bare forward — {m['card']}, {self.shape.tokens:,} tokens\n"
                     f"torch {m['torch']} (CUDA {m['torch_cuda']}), driver {m.get('driver')}, ops {m['rankest_backend']}",
                     fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def markdown(self) -> str:
        r, s = self.res, self.shape
        m = r.get("machine", {})
        L = [f"# rankest GPU benchmark — {m.get('card', '?')}", ""]
        if self.args.tiny:
            L += ["**Tiny smoke configuration (`--tiny`): the numbers say nothing about performance.**", ""]
        L += ["| | |", "|---|---|"]
        for k in ("card", "driver", "nvidia_smi", "sm", "multiprocessors", "gpu_memory_gib", "torch", "torch_cuda",
                  "transformers", "python", "rankest_backend", "rankest_backend_detail", "kernels",
                  "cuda_matmul_fp32_precision", "float32_matmul_precision",
                  "git_commit"):
            if k in m:
                L.append(f"| {k} | {m[k]} |")
        t = r.get("teacher", {})
        L += ["", "## Setup", "",
              f"GPT-NeoX with Pythia-6.9B's shape unless `--tiny`: d = {s.hidden}, {s.layers} layers, {s.heads} heads, "
              f"intermediate {s.intermediate}, rotary 25% ({t.get('rotary_dims')} of {t.get('head_dim')} dims), "
              f"parallel residual, V = {s.logit_width:,} logits, V' = {s.vocab:,}; random weights "
              f"(std {s.init_std}) with randomised LayerNorms, {s.dtype} on {s.device}, attention "
              f"`{t.get('attn_implementation')}`, use_cache=False; built in {_fmt(t.get('build_seconds'), '.1f')} s. "
              f"Tokens: {s.tokens:,} = {s.batches} batches × {s.batch_windows} windows × {s.seq_len}, seeded uniform ids < V'.",
              "",
              "Each phase was warmed up once on one batch, then run in interleaved rounds (median shown). "
              "*Streaming* = wall time of `run_estimate` minus its `finalize` (the per-token cost); *total* "
              "includes `finalize` (a one-off cost, independent of N). The gram route's finalize (the 50k "
              "fp64 eigensolve) is stubbed in the timed runs and timed alone under `--full`. "
              "`run_estimate(convergence=False)`; `factor` accumulates its feature Gram in fp64, `factor_fast` "
              "on tensor cores (bf16 features, fp32 sums per chunk, fp64 carry). `overlap_off` / `overlap_on`: "
              "the gram route's per-batch work written out by hand, with the Gram update on the teacher's "
              "stream or on a side stream that runs while the next batch's forward does (CUDA streams).", ""]
        L += ["## estimate vs bare forward", "",
              "| phase | repeats | wall s (median) | streaming s | finalize s | tokens/s | ratio streaming | "
              "ratio total | goal | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in PHASE_ORDER:
            ph = r["phases"].get(name)
            if ph is None:
                continue
            if "wall_median" not in ph:
                L.append(f"| {name} | — | {ph.get('skipped') or ph.get('error')} | | | | | | | |")
                continue
            goal = ph.get("goal")
            goal_s = "" if goal is None else f"≤ {goal:.2f}× {'✅' if ph.get('meets_goal') else '❌'}"
            peaks = [x["peak_gib"] for x in ph["runs"] if x.get("peak_gib") is not None]
            L.append(f"| {name} | {ph['repeats']} | {ph['wall_median']:.2f} | {ph['stream_median']:.2f} | "
                     f"{ph['finalize_median']:.2f} | {ph['tokens_per_second']:,.0f} | {_fmt(ph.get('ratio_stream'), '.3f')} | "
                     f"{_fmt(ph.get('ratio_total'), '.3f')} | {goal_s} | {_fmt(max(peaks) if peaks else None, '.1f')} |")
        for name in ("gram_fast", "gram_fp64"):
            ph = r["phases"].get(name, {})
            errs = [x.get("gram_trace_rel_err") for x in ph.get("runs", []) if x.get("gram_trace_rel_err") is not None]
            if errs:
                L.append(f"\n{name}: |trace(Gram) − ‖T‖_F²| / ‖T‖_F² = {max(errs):.2e} (sanity of the accumulation)")
        sk = r["phases"].get("sketch", {})
        if "test_block_median" in sk:
            L.append(f"\nsketch: generating its test matrix [Ω Θ] (V' × (l+s), CPU generator, once per run, inside "
                     f"the streaming time) took {sk['test_block_median']:.2f} s of the {sk['stream_median']:.2f} s; "
                     f"l = {sk['runs'][-1].get('sketch_l')}")
        on, off = r["phases"].get("overlap_on", {}), r["phases"].get("overlap_off", {})
        if "wall_median" in on and "wall_median" in off:
            ratio = on["wall_median"] / off["wall_median"]
            L.append(f"\noverlap: the Gram update on a side stream, concurrent with the next batch's forward, takes "
                     f"{ratio:.3f}× the one-stream time ({'pays' if ratio < 0.98 else 'does not pay'}: "
                     f"{on['wall_median']:.2f} s vs {off['wall_median']:.2f} s)")
        fm = r["phases"].get("factor", {}).get("runs", [{}])[-1].get("metrics") if r["phases"].get("factor", {}).get("runs") else None
        if fm:
            L.append(f"\nfactor spectrum: numerical rank {fm.get('numerical_rank')} (d = {s.hidden}), "
                     f"rank_at {fm.get('rank_at')}, off-model energy {_fmt(fm.get('off_model_energy'), '.2e')}")
        for name, pr in r.get("profile", {}).items():
            L += ["", f"### Profile of `{name}` on one batch (wall {pr['wall_s']:.3f} s under the profiler, device busy "
                      f"{_fmt(pr.get('device_busy_s'), '.3f')} s)", "", "```", pr["table"], "```"]
        e = r.get("eigensolve")
        if e:
            L += ["", "## fp64 eigensolve of the V'×V' Gram (`--full`)", ""]
            if "seconds" in e:
                L.append(f"`torch.linalg.eigvalsh` fp64, n = {e['n']:,}, on the device: **{e['seconds']:.1f} s** "
                         f"(peak {_fmt(e.get('peak_gib'), '.1f')} GiB). W-error of the prob matrix: {e.get('w_error')}; "
                         f"metrics: {e.get('metrics')}")
            else:
                L.append(f"not measured: {e.get('skipped') or e.get('error')}")
        c = r.get("ceilings")
        if c:
            L += ["", "## Ceilings and ops alone", "",
                  f"Device-to-device copy: **{c['copy']['GBps']:.4g} GB/s** (bytes read + written, "
                  f"{c['copy']['bytes_moved'] / 2**30:.1f} GiB per copy). GEMM {c['gemm_bf16']['n']}³: bf16 "
                  f"{c['gemm_bf16']['TFLOPs']:.4g}, fp32 {c['gemm_fp32']['TFLOPs']:.3g}, fp64 {c['gemm_fp64']['TFLOPs']:.3g} TFLOP/s "
                  f"(random inputs, median)."]
        tr = r.get("transform_rows")
        if tr:
            L += ["", "`transform_rows` (CUDA events, 3 warm-ups, median of 20, 3 rotating random input sets). Bytes = "
                  "n·V'·2 logits read (only the real columns are needed) + n·V'·4 rows written + n·16 stats + n·8 targets:",
                  "", "| case | n | in → out | ms | GB/s | % of copy | goal | rows rel err vs fp64 | stats rel err |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for k, x in tr.items():
                goal = "" if x["out_dtype"] is None else ("✅" if x["fraction_of_copy"] >= TRANSFORM_GOAL else "❌") + \
                    f" ≥ {100 * TRANSFORM_GOAL:.0f}%"
                L.append(f"| {k} | {x['n']} | {x['in_dtype']} → {x['out_dtype'] or 'stats only'} | {x['seconds'] * 1e3:.3f} | "
                         f"{x['GBps']:.4g} | {100 * x['fraction_of_copy']:.0f}% | {goal} | "
                         f"{_fmt(x.get('rows_max_rel_err'), '.1e')} | {_fmt(x.get('stats_max_rel_err'), '.1e')} |")
        gu = r.get("gram_update")
        if gu:
            L += ["", "`gram_update` into an fp64 V'×V' Gram from fp32 rows (what the gram route feeds it) and, for "
                  "comparison, bf16 rows (1 warm-up, median of 3 / 5). "
                  "FLOPs counted: n·V'·(V'+1) (the lower triangle with its diagonal, a multiply-add = 2):", "",
                  "| case | n | V' | ms | TFLOP/s | block rel err vs fp64 |", "|---|---|---|---|---|---|"]
            for k in ("fp64", "fast", "fast_bf16_chunk"):
                if k in gu:
                    x = gu[k]
                    L.append(f"| {k} | {x['n']} | {x['V_real']:,} | {x['seconds'] * 1e3:.1f} | {x['TFLOPs']:.3g} | "
                             f"{x['block_max_rel_err']:.1e} |")
            if "torch_fp64_full_gemm" in gu:
                x = gu["torch_fp64_full_gemm"]
                L.append(f"| torch `addmm_` fp64, full product (2·n·V'² flops) | | | {x['seconds'] * 1e3:.1f} | "
                         f"{x['TFLOPs']:.3g} | |")
            if "oom_at_V_real" in gu:
                L.append(f"\nV' = {gu['oom_at_V_real']:,} did not fit; measured at a smaller V'.")
        if r["errors"]:
            L += ["", "## Errors", ""] + [f"* `{k}`: {v}" for k, v in r["errors"].items()]
        L += ["", f"Forbidden modules imported: {r.get('forbidden_modules_imported', '?')}. "
              f"Total script time {_fmt(r.get('seconds_total'), '.0f')} s. JSON beside this file has every number.", ""]
        return "\n".join(L)

    def print_summary(self) -> None:
        r, s = self.res, self.shape
        m = r["machine"]
        print("\n" + "=" * 100)
        print(f"rankest GPU benchmark: {m['card']} | driver {m.get('driver')} | torch {m['torch']} CUDA {m['torch_cuda']} "
              f"| ops {m['rankest_backend']} {m['kernels']}")
        print(f"{s.tokens:,} tokens ({s.batches}×{s.batch_windows}×{s.seq_len}), model build "
              f"{_fmt(r.get('teacher', {}).get('build_seconds'), '.0f')} s, script {r['seconds_total']:.0f} s")
        print(f"{'phase':<12}{'n':>3}{'wall s':>9}{'stream s':>10}{'final s':>9}{'tok/s':>10}{'ratio':>8}{'total':>8}"
              f"  goal")
        for name in PHASE_ORDER:
            ph = r["phases"].get(name)
            if ph is None:
                continue
            if "wall_median" not in ph:
                print(f"{name:<12}  {ph.get('skipped') or ph.get('error')}")
                continue
            goal = ph.get("goal")
            gs = "" if goal is None else f"≤{goal:.2f} {'OK' if ph['meets_goal'] else 'MISS'}"
            if "test_block_median" in ph:
                gs += f" (test matrix {ph['test_block_median']:.1f} s of stream)"
            print(f"{name:<12}{ph['repeats']:>3}{ph['wall_median']:>9.2f}{ph['stream_median']:>10.2f}"
                  f"{ph['finalize_median']:>9.2f}{ph['tokens_per_second']:>10,.0f}{_fmt(ph.get('ratio_stream'), '.3f'):>8}"
                  f"{_fmt(ph.get('ratio_total'), '.3f'):>8}  {gs}")
        c = r.get("ceilings", {})
        if c:
            print(f"copy {c['copy']['GBps']:.4g} GB/s | GEMM TFLOP/s bf16 {c['gemm_bf16']['TFLOPs']:.4g} fp32 "
                  f"{c['gemm_fp32']['TFLOPs']:.3g} fp64 {c['gemm_fp64']['TFLOPs']:.3g}")
        for k, x in r.get("transform_rows", {}).items():
            print(f"transform_rows {k:<15} {x['GBps']:>6.4g} GB/s {100 * x['fraction_of_copy']:>4.0f}% of copy "
                  f"{x['seconds'] * 1e3:8.3f} ms  rel err rows {_fmt(x.get('rows_max_rel_err'), '.1e')}")
        gu = r.get("gram_update", {})
        for k in ("fp64", "fast", "fast_bf16_chunk", "torch_fp64_full_gemm"):
            if k in gu:
                extra = f"  block rel err {gu[k]['block_max_rel_err']:.1e}" if "block_max_rel_err" in gu[k] else ""
                print(f"gram_update {k:<22} {gu[k]['TFLOPs']:>7.3g} TFLOP/s {gu[k]['seconds'] * 1e3:9.1f} ms{extra}")
        e = r.get("eigensolve")
        if e:
            print(f"eigvalsh fp64 n={e.get('n', '?')}: " + (f"{e['seconds']:.1f} s" if "seconds" in e
                                                           else str(e.get("error") or e.get("skipped"))))
        if r["errors"]:
            print(f"ERRORS: {r['errors']}")
        print(f"report: {self.paths()['md']}" + (f" (copied to {os.environ['OUT']})" if os.environ.get("OUT") else ""))


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU in fp32 (smoke test of every code path)")
    p.add_argument("--full", action="store_true", help="also gram fp64 and the fp64 eigensolve of the V'×V' Gram")
    p.add_argument("--report-dir", default=None, help="where the .md/.png/.json go (default benchmarks/reports)")
    p.add_argument("--batches", type=int, default=None, help="batches of the measured runs (default 8)")
    p.add_argument("--batch-windows", type=int, default=None, help="windows per batch (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="measured rounds (median); default 2")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="start no further round once the script would pass this many seconds (default 210)")
    p.add_argument("--slow-phase-s", type=float, default=25.0,
                   help="run a phase whose first run took longer than this only once (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="", help="comma-separated phases to profile on one batch (torch.profiler)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out: factor,factor_fast,sketch,gram_fast,naive,"
                                                    "overlap_off,overlap_on")
    args = p.parse_args(argv)
    shape = TINY if args.tiny else PYTHIA_6_9B
    if args.batches:
        shape.batches = args.batches
    if args.batch_windows:
        shape.batch_windows = args.batch_windows
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.tiny:
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    return Bench(args, shape).run()


if __name__ == "__main__":
    sys.exit(main())
