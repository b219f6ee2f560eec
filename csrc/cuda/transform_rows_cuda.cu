// CUDA kernel of rankest::transform_rows (contract: csrc/ops/transform_rows.h).
//
// One block of 512 threads per row, two passes:
//   pass 1  reads the logits once (16-byte loads, kUnroll of them in flight per thread) into
//           per-thread online-softmax summaries (running max m; Σe^(z−m), Σe^(z−m)(z−m),
//           Σe^(2(z−m)), Σz) — one exp per element, a rescale only when a vector raises the
//           max — then merges the 512 summaries in a fixed order (warp shuffles, shared memory).
//           While reading, it stages the row in shared memory when the row fits (≤ kSmemMax).
//   pass 2  reads the row again (from shared memory, else from L2), writes the output row with
//           16-byte stores, and sums Σ(z − c)² of the clr / logprob row exactly around its own
//           centre (two-pass, so no cancellation; prob takes Σp² from pass 1).
// float32 arithmetic (float64 for float64 logits). Rows are written at a row stride padded to
// a multiple of kRowAlign elements (transform_rows_row_stride), so every output row starts
// 16-byte aligned and the GEMMs that consume the rows see aligned leading dimensions.
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which pulls in cublas_v2.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../ops/transform_rows.h"

namespace rankest {
namespace {

constexpr int kThreads = 512;
constexpr int kWarp = 32;
constexpr int kUnroll = 4;                    // 16-byte loads in flight per thread
constexpr int64_t kSmemMax = 112 * 1024;      // stage rows up to this size: two blocks per SM

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// One thread's (or a merged group's) share of a row. -inf and NaN logits need no per-element
// branch: e^(-inf − m) = 0 drops a -inf from the sums (its (z − m) is clamped to -1e30 so that
// 0·(z − m) stays 0), it drives Σz to -inf (the clr centre then is -inf, as the contract says),
// and a NaN poisons Σe. While no finite max has been seen (m = -inf) the sums hold only zeros
// (or NaN) and are never rescaled.
template <typename T>
struct Partial {
  T m;    // running max (-inf while no finite value has been seen)
  T s;    // Σ e^(z−m)
  T ts;   // Σ e^(z−m)·(z−m)
  T ss;   // Σ e^(2(z−m))
  T tot;  // Σ z
};

template <typename T>
__device__ __forceinline__ Partial<T> empty_partial() {
  return {static_cast<T>(-INFINITY), T(0), T(0), T(0), T(0)};
}

// Rescale the running sums to a new, larger max (online softmax, Milakov & Gimelshein 2018).
template <typename T>
__device__ __forceinline__ void raise_max(Partial<T>& p, T m) {
  if (p.m != static_cast<T>(-INFINITY)) {
    const T shift = p.m - m;  // < 0
    const T f = r_exp(shift);
    p.ts = f * (p.ts + shift * p.s);
    p.s *= f;
    p.ss *= f * f;
  }
  p.m = m;
}

template <typename T, int N>
__device__ __forceinline__ void accumulate(Partial<T>& p, const T (&v)[N]) {
  const T neg_inf = static_cast<T>(-INFINITY);
  T vmax = neg_inf;
#pragma unroll
  for (int k = 0; k < N; ++k) vmax = v[k] > vmax ? v[k] : vmax;  // NaN never becomes the max
  if (vmax > p.m) raise_max(p, vmax);
  const T m = p.m == neg_inf ? T(0) : p.m;  // all -inf so far: any finite reference will do
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const T d = v[k] - m;
    const T e = r_exp(d);
    p.s += e;
    p.ts += e * fmax(d, static_cast<T>(-1e30));
    p.ss += e * e;
    p.tot += v[k];
  }
}

template <typename T>
__device__ __forceinline__ void add_scaled(Partial<T>& r, const Partial<T>& a) {
  if (a.m == static_cast<T>(-INFINITY)) {  // only zeros (or NaN) in the sums: nothing to rescale
    r.s += a.s;
    r.ts += a.ts;
    r.ss += a.ss;
    return;
  }
  const T sh = a.m - r.m;
  const T f = sh == T(0) ? T(1) : r_exp(sh);
  r.s += f * a.s;
  r.ts += f * (a.ts + sh * a.s);
  r.ss += f * f * a.ss;
}

template <typename T>
__device__ __forceinline__ Partial<T> merge_partial(const Partial<T>& a, const Partial<T>& b) {
  Partial<T> r = {a.m > b.m ? a.m : b.m, T(0), T(0), T(0), a.tot + b.tot};
  add_scaled(r, a);
  add_scaled(r, b);
  return r;
}

template <typename T>
__device__ __forceinline__ Partial<T> shfl_down(const Partial<T>& p, int offset) {
  constexpr unsigned kAll = 0xffffffffu;
  return {__shfl_down_sync(kAll, p.m, offset), __shfl_down_sync(kAll, p.s, offset),
          __shfl_down_sync(kAll, p.ts, offset), __shfl_down_sync(kAll, p.ss, offset),
          __shfl_down_sync(kAll, p.tot, offset)};
}

// Block-wide merge in a fixed order (deterministic); the result is valid in thread 0.
template <typename T>
__device__ Partial<T> block_merge(Partial<T> p) {
  __shared__ Partial<T> warp_part[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) p = merge_partial(p, shfl_down(p, off));
  if (lane == 0) warp_part[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / kWarp ? warp_part[lane] : empty_partial<T>();
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) p = merge_partial(p, shfl_down(p, off));
  }
  return p;
}

// Block-wide sum in a fixed order; valid in thread 0.
template <typename T>
__device__ T block_sum(T x) {
  __shared__ T warp_sum[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
  if (lane == 0) warp_sum[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / kWarp ? warp_sum[lane] : T(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

// The layout of one row for this thread: an unaligned head (element by element), an aligned
// body of 16-byte vectors, and a tail.
template <typename in_t>
struct RowLayout {
  static constexpr int kVec = 16 / sizeof(in_t);
  int64_t head, n_vec;

  __device__ RowLayout(const in_t* z, int64_t n_cols) {
    const auto addr = reinterpret_cast<std::uintptr_t>(z);
    head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(in_t));
    head = head < n_cols ? head : n_cols;
    n_vec = (n_cols - head) / kVec;
  }
};

// Writes N consecutive outputs at dst; 16-byte stores when `vec` (dst then 16-byte aligned).
template <typename out_t, int N>
__device__ __forceinline__ void store(out_t* dst, const out_t (&v)[N], bool vec) {
  constexpr int kPer = 16 / sizeof(out_t);
  if constexpr (N % kPer == 0) {
    if (vec) {
      auto* d = reinterpret_cast<AlignedVec<out_t, kPer>*>(dst);
#pragma unroll
      for (int c = 0; c < N / kPer; ++c) {
        AlignedVec<out_t, kPer> w;
#pragma unroll
        for (int k = 0; k < kPer; ++k) w.val[k] = v[c * kPer + k];
        d[c] = w;
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = v[k];
}

template <typename in_t, typename out_t, typename acc_t, bool kStage>
__global__ void __launch_bounds__(kThreads) transform_rows_kernel(
    const in_t* __restrict__ x,
    int64_t x_stride,
    const int64_t* __restrict__ targets,
    int64_t n_cols,
    Space space,
    out_t* __restrict__ rows,
    int64_t out_stride,
    acc_t* __restrict__ stats) {
  using Vec = AlignedVec<in_t, 16 / sizeof(in_t)>;
  constexpr int kVec = RowLayout<in_t>::kVec;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Vec* staged = reinterpret_cast<Vec*>(smem_raw);

  const int64_t r = blockIdx.x;
  const in_t* z = x + r * x_stride;
  const RowLayout<in_t> lay(z, n_cols);
  const Vec* zv = reinterpret_cast<const Vec*>(z + lay.head);
  const int tid = threadIdx.x;

  // ---- pass 1: the online-softmax summary (two partials: independent dependency chains) ----
  Partial<acc_t> p = empty_partial<acc_t>(), p_odd = empty_partial<acc_t>();
  for (int64_t j = tid; j < lay.head; j += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(z[j])};
    accumulate(p, v);
  }
  int64_t i = tid;
  for (; i + (kUnroll - 1) * kThreads < lay.n_vec; i += kUnroll * kThreads) {
    Vec w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = zv[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if constexpr (kStage) staged[i + u * kThreads] = w[u];
      acc_t v[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = static_cast<acc_t>(w[u].val[k]);
      accumulate(u % 2 ? p_odd : p, v);
    }
  }
  for (; i < lay.n_vec; i += kThreads) {
    const Vec w = zv[i];
    if constexpr (kStage) staged[i] = w;
    acc_t v[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = static_cast<acc_t>(w.val[k]);
    accumulate(p, v);
  }
  const int64_t tail0 = lay.head + lay.n_vec * kVec;
  for (int64_t j = tail0 + tid; j < n_cols; j += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(z[j])};
    accumulate(p, v);
  }
  p = block_merge(merge_partial(p, p_odd));

  __shared__ acc_t center_sh;
  __shared__ acc_t stat_sh[4];
  if (tid == 0) {
    const acc_t nan = static_cast<acc_t>(NAN);
    const acc_t log_sum = r_log(p.s);
    const acc_t lse = p.m + log_sum;
    const int64_t t = targets[r];
    stat_sh[0] = lse;
    stat_sh[1] = log_sum - p.ts / p.s;  // H = log Σ − Σe·d/Σ: no cancellation
    stat_sh[2] = t >= 0 ? lse - static_cast<acc_t>(z[t]) : nan;
    stat_sh[3] = p.ss / (p.s * p.s);    // prob: Σ p²
    // clr: the mean (-inf when a logit is -inf: Σz = -inf); else the logsumexp.
    center_sh = space == Space::kClr ? p.tot / static_cast<acc_t>(n_cols) : lse;
  }
  __syncthreads();
  const acc_t c = center_sh;
  const bool write = rows != nullptr;
  const bool need_sq = space != Space::kProb;
  if (write || need_sq) {
    // ---- pass 2: write the row; Σ(z − c)² for clr / logprob ----
    out_t* o = write ? rows + r * out_stride : nullptr;
    const bool vec_out = write && lay.head == 0 && reinterpret_cast<std::uintptr_t>(o) % 16 == 0;
    // Σ(z − c)²: a -inf logit makes it NaN for clr (c = -inf) and +inf for logprob, as the
    // contract says, with no branch. Two sums for two independent dependency chains.
    acc_t q[2] = {acc_t(0), acc_t(0)};
    auto emit = [&](int64_t j, const auto& v, bool vec) {
      constexpr int kN = sizeof(v) / sizeof(acc_t);
      out_t out[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const acc_t y = transform_value(space, v[k], c);
        out[k] = static_cast<out_t>(y);
        if (need_sq) q[k % 2] += y * y;
      }
      if (write) store(o + j, out, vec);
    };
    for (int64_t j = tid; j < lay.head; j += kThreads) {
      const acc_t v[1] = {static_cast<acc_t>(z[j])};
      emit(j, v, false);
    }
    for (int64_t ii = tid; ii < lay.n_vec; ii += kThreads) {
      Vec w;
      if constexpr (kStage) {
        w = staged[ii];
      } else {
        w = zv[ii];
      }
      acc_t v[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = static_cast<acc_t>(w.val[k]);
      emit(lay.head + ii * kVec, v, vec_out);
    }
    for (int64_t j = tail0 + tid; j < n_cols; j += kThreads) {
      const acc_t v[1] = {static_cast<acc_t>(z[j])};
      emit(j, v, false);
    }
    if (need_sq) {
      const acc_t qs = block_sum(q[0] + q[1]);
      if (tid == 0) stat_sh[3] = qs;
    }
  }
  if (tid == 0) {
    acc_t* so = stats + 4 * r;
#pragma unroll
    for (int k = 0; k < 4; ++k) so[k] = stat_sh[k];
  }
}

template <typename in_t, typename out_t, typename acc_t, bool kStage>
void launch(const at::Tensor& x, const at::Tensor& t, int64_t n_cols, Space sp, at::Tensor* rows,
            at::Tensor& stats, int64_t smem, cudaStream_t stream) {
  auto kernel = transform_rows_kernel<in_t, out_t, acc_t, kStage>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(x.size(0)), kThreads, smem, stream>>>(
      x.data_ptr<in_t>(), x.stride(0), t.data_ptr<int64_t>(), n_cols, sp,
      rows != nullptr ? rows->data_ptr<out_t>() : nullptr, rows != nullptr ? rows->stride(0) : 0,
      stats.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transform_rows_cuda(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    bool write_rows,
    at::ScalarType out_dtype) {
  const Space sp = check_transform_rows_args(logits, targets, n_cols, space, out_dtype);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor t = targets.to(at::kLong).contiguous();
  const int64_t n = logits.size(0);
  const auto stats_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Rows live in an (n, ld) buffer with ld a multiple of kRowAlign: every row 16-byte aligned.
  const int64_t ld = write_rows ? transform_rows_row_stride(n_cols, true) : 0;
  at::Tensor buffer = at::empty({n, ld}, logits.options().dtype(out_dtype));
  at::Tensor rows = write_rows ? buffer.narrow(1, 0, n_cols) : buffer;
  at::Tensor stats = at::empty({n, 4}, logits.options().dtype(stats_dtype));
  if (n == 0) return {rows, stats};
  TORCH_CHECK(n <= INT32_MAX, "rankest.transform_rows: at most 2^31-1 rows per call, got ",
              std::to_string(n));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool pass2 = write_rows || sp != Space::kProb;
  const int64_t stage_bytes = (n_cols + 16) * static_cast<int64_t>(logits.element_size());
  // RANKEST_TRANSFORM_ROWS_STAGE=0 turns the staging off (benchmarks compare the two).
  const char* knob = std::getenv("RANKEST_TRANSFORM_ROWS_STAGE");
  const bool stage = pass2 && stage_bytes <= kSmemMax && !(knob != nullptr && knob[0] == '0');
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "transform_rows_cuda", [&] {
        using in_t = scalar_t;
        using acc_t = at::opmath_type<in_t>;  // float, or double for double logits
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, out_dtype, "transform_rows_cuda_out", [&] {
              using out_t = scalar_t;
              at::Tensor* r = write_rows ? &rows : nullptr;
              if (stage) {
                launch<in_t, out_t, acc_t, true>(x, t, n_cols, sp, r, stats, stage_bytes, stream);
              } else {
                launch<in_t, out_t, acc_t, false>(x, t, n_cols, sp, r, stats, 0, stream);
              }
            });
      });
  return {rows, stats};
}

TORCH_LIBRARY_IMPL(rankest, CUDA, m) {
  m.impl("transform_rows", &transform_rows_cuda);
}

}  // namespace rankest
