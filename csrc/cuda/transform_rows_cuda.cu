// CUDA kernel of rankest::transform_rows (contract: csrc/ops/transform_rows.h).
// One block per row: 16-byte loads where the row is aligned, a RowSummary per thread
// (float32 math, float64 for float64 logits), warp-shuffle then shared-memory merges in a fixed
// order (deterministic), then a second pass re-reads the row (from L2) and writes it.
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which pulls in cublas_v2.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../ops/transform_rows.h"

namespace rankest {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

template <typename T>
__device__ __forceinline__ RowSummary<T> shfl_down(const RowSummary<T>& s, int offset) {
  constexpr unsigned kAll = 0xffffffffu;
  RowSummary<T> o;
  o.max = __shfl_down_sync(kAll, s.max, offset);
  o.sum = __shfl_down_sync(kAll, s.sum, offset);
  o.tsum = __shfl_down_sync(kAll, s.tsum, offset);
  o.sqsum = __shfl_down_sync(kAll, s.sqsum, offset);
  o.mean = __shfl_down_sync(kAll, s.mean, offset);
  o.m2 = __shfl_down_sync(kAll, s.m2, offset);
  o.count = __shfl_down_sync(kAll, s.count, offset);
  o.n_neg_inf = __shfl_down_sync(kAll, s.n_neg_inf, offset);
  return o;
}

// Merge of the block's summaries; the result is valid in thread 0.
template <typename T>
__device__ RowSummary<T> block_merge(RowSummary<T> s) {
  __shared__ RowSummary<T> warp_summary[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) s = merge(s, shfl_down(s, off));
  if (lane == 0) warp_summary[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / kWarp ? warp_summary[lane] : RowSummary<T>::empty();
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) s = merge(s, shfl_down(s, off));
  }
  return s;
}

// Calls f(j, z_j as acc_t[VEC or 1]) over the row's first n_cols elements, this thread's share:
// an unaligned head element by element, the aligned body in 16-byte vectors, then the tail.
template <typename in_t, typename acc_t, typename F>
__device__ __forceinline__ void for_row(const in_t* __restrict__ z, int64_t n_cols, F&& f) {
  constexpr int kVec = 16 / sizeof(in_t);
  const auto addr = reinterpret_cast<std::uintptr_t>(z);
  int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(in_t));
  if (addr % sizeof(in_t) != 0) head = n_cols;  // cannot happen for a tensor; be safe
  head = head < n_cols ? head : n_cols;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(z[j])};
    f(j, v);
  }
  const int64_t n_vec = (n_cols - head) / kVec;
  const auto* zv = reinterpret_cast<const AlignedVec<in_t, kVec>*>(z + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const AlignedVec<in_t, kVec> w = zv[i];
    acc_t v[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = static_cast<acc_t>(w.val[k]);
    f(head + i * kVec, v);
  }
  for (int64_t j = head + n_vec * kVec + threadIdx.x; j < n_cols; j += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(z[j])};
    f(j, v);
  }
}

template <typename in_t, typename out_t, typename acc_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) transform_rows_kernel(
    const in_t* __restrict__ x,
    int64_t x_stride,
    const int64_t* __restrict__ targets,
    int64_t n_cols,
    Space space,
    out_t* __restrict__ rows,
    stat_t* __restrict__ stats) {
  const int64_t r = blockIdx.x;
  const in_t* z = x + r * x_stride;

  RowSummary<acc_t> s = RowSummary<acc_t>::empty();
  for_row<in_t, acc_t>(z, n_cols, [&](int64_t, const auto& v) {
    constexpr int kN = sizeof(v) / sizeof(acc_t);
    s = merge(s, summarize<acc_t, kN>(v, kN));
  });
  s = block_merge(s);

  __shared__ acc_t center;
  if (threadIdx.x == 0) {
    const int64_t t = targets[r];
    const RowStats<acc_t> st =
        row_stats(s, space, t >= 0, t >= 0 ? static_cast<acc_t>(z[t]) : acc_t(0));
    stat_t* so = stats + 4 * r;
    so[0] = static_cast<stat_t>(st.lse);
    so[1] = static_cast<stat_t>(st.entropy);
    so[2] = static_cast<stat_t>(st.nll);
    so[3] = static_cast<stat_t>(st.sq_norm);
    center = st.center;
  }
  if (rows == nullptr) return;
  __syncthreads();
  const acc_t c = center;
  out_t* o = rows + r * n_cols;
  for_row<in_t, acc_t>(z, n_cols, [&](int64_t j, const auto& v) {
    constexpr int kN = sizeof(v) / sizeof(acc_t);
#pragma unroll
    for (int k = 0; k < kN; ++k) o[j + k] = static_cast<out_t>(transform_value(space, v[k], c));
  });
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
  at::Tensor rows = at::empty({n, write_rows ? n_cols : 0}, logits.options().dtype(out_dtype));
  at::Tensor stats = at::empty({n, 4}, logits.options().dtype(stats_dtype));
  if (n == 0) return {rows, stats};
  TORCH_CHECK(n <= INT32_MAX, "rankest.transform_rows: at most 2^31-1 rows per call, got ",
              std::to_string(n));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "transform_rows_cuda", [&] {
        using in_t = scalar_t;
        using acc_t = at::opmath_type<in_t>;  // float, or double for double logits
        using stat_t = acc_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, out_dtype, "transform_rows_cuda_out", [&] {
              using out_t = scalar_t;
              transform_rows_kernel<in_t, out_t, acc_t, stat_t>
                  <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
                      x.data_ptr<in_t>(), x.stride(0), t.data_ptr<int64_t>(), n_cols, sp,
                      write_rows ? rows.data_ptr<out_t>() : nullptr,
                      stats.data_ptr<stat_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
  return {rows, stats};
}

TORCH_LIBRARY_IMPL(rankest, CUDA, m) {
  m.impl("transform_rows", &transform_rows_cuda);
}

}  // namespace rankest
