// transform_rows: logits -> target-space rows + per-row statistics, in one read and one write.
//
// Contract (the specification is rankest/ops/reference.py::transform_rows; this op must match
// it to within a small multiple of the working precision):
//
//   logits   (n, V)  float64 | float32 | float16 | bfloat16, any row stride (a tensor whose
//                    last dimension is not unit-stride is made contiguous first).
//                    Only the first n_cols columns are read (1 <= n_cols <= V).
//   targets  (n,)    integer (converted to int64), same device; < 0 = no target (NLL = NaN);
//                    a target >= n_cols is an error (checking it reads the targets' max: one
//                    device->host sync per call on CUDA).
//   n_cols   int     V', the real vocabulary; padded columns beyond are never read.
//   space    str     "clr": z - mean(z);  "prob": softmax(z);  "logprob": z - logsumexp(z).
//   write_rows bool  false: rows is an (n, 0) tensor and the write pass is skipped.
//   out_dtype        float64 | float32 | bfloat16 | float16 (dtype of rows).
//
//   returns rows  (n, n_cols) out_dtype, unit column stride ((n, 0) when !write_rows).
//                 Row stride: n_cols on the CPU (contiguous); on CUDA n_cols rounded up to a
//                 multiple of kRowAlign = 16 elements (a view of a padded buffer), so every
//                 row starts 16-byte aligned: 16-byte stores here, and aligned leading
//                 dimensions for the tensor-core GEMMs that consume the rows.
//           stats (n, 4) [logsumexp, entropy (nats), nll, sq_norm]; float64 for float64
//                 logits, else float32. sq_norm is the squared norm of the row in `space`
//                 before the cast to out_dtype; it is the same whether or not rows are written.
//
// Accumulation: the row is reduced in one read into a RowSummary (online max / sum-exp, the
// running sums that give the entropy and the sum of squares, count/mean/M2 of the logits);
// groups of a few elements are summarised exactly and merged (Chan et al. 1979 for mean/M2,
// Milakov & Gimelshein 2018 for the online softmax), so no sum ever cancels catastrophically.
//   CPU : one row per task (at::parallel_for). float32 rows without inf/NaN: 8-wide vector
//         passes, e^(z-max) in float32 (Cephes polynomial, ~1e-7 relative) summed in float32
//         over blocks of 512 and in float64 across them, Σ(z-mean)² in float64; every other
//         row: float64 accumulation of exact 16-element summaries.
//   CUDA: one block per row, float32 accumulation (float64 for float64 logits): pass 1 is an
//         online softmax (one exp per element), pass 2 re-reads the row (from shared memory
//         when it fits, else L2), writes it and sums Σ(z − c)² around the row's own centre.
// A logit of -inf among the real columns is a probability of 0 (prob/logprob/entropy stay
// finite); as in the reference, it makes the clr row and its sq_norm NaN/inf.
//
// Determinism: bitwise deterministic run to run on a given device (fixed reduction order, no
// atomics); CPU results do not depend on the number of threads. On CUDA the order follows the
// row's 16-byte alignment, so the same values at another offset may differ in the last bits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <math.h>

#include <tuple>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RANKEST_HD __host__ __device__ __forceinline__
#define RANKEST_UNROLL _Pragma("unroll")
#else
#define RANKEST_HD inline
#define RANKEST_UNROLL
#endif

namespace rankest {

enum class Space : int { kClr = 0, kProb = 1, kLogprob = 2 };

// Row stride of the rows tensor (see the contract above): padded to kRowAlign on CUDA.
constexpr int64_t kRowAlign = 16;
inline int64_t transform_rows_row_stride(int64_t n_cols, bool cuda) {
  return cuda ? (n_cols + kRowAlign - 1) / kRowAlign * kRowAlign : n_cols;
}

// Validates every argument (ValueError in Python) and parses `space`. Shared by all devices;
// defined in csrc/rankest.cpp.
Space check_transform_rows_args(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    at::ScalarType out_dtype);

std::tuple<at::Tensor, at::Tensor> transform_rows_cpu(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    bool write_rows,
    at::ScalarType out_dtype);

std::tuple<at::Tensor, at::Tensor> transform_rows_cuda(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    bool write_rows,
    at::ScalarType out_dtype);

// ---------------------------------------------------------------------------------------------
// The row reduction, shared by the CPU and CUDA kernels (host and device code).

RANKEST_HD float r_exp(float x) { return ::expf(x); }
RANKEST_HD double r_exp(double x) { return ::exp(x); }
RANKEST_HD float r_log(float x) { return ::logf(x); }
RANKEST_HD double r_log(double x) { return ::log(x); }

// Summary of a set of logits (a POD, so it can live in CUDA shared memory).
// Over the elements that are not -inf ("count" of them): max, sum = Σ e^(z-max),
// tsum = Σ e^(z-max)·(z-max), sqsum = Σ e^(2(z-max)), mean and m2 = Σ (z-mean)².
template <typename T>
struct RowSummary {
  T max, sum, tsum, sqsum, mean, m2;
  int count, n_neg_inf;

  static RANKEST_HD RowSummary empty() {
    RowSummary s;
    s.max = static_cast<T>(-INFINITY);
    s.sum = s.tsum = s.sqsum = s.mean = s.m2 = T(0);
    s.count = s.n_neg_inf = 0;
    return s;
  }
};

// Exact summary of K values (k <= K of them valid), two passes over registers / L1.
template <typename T, int K>
RANKEST_HD RowSummary<T> summarize(const T (&z)[K], int k) {
  RowSummary<T> s = RowSummary<T>::empty();
  const T neg_inf = static_cast<T>(-INFINITY);
  T total = T(0);
RANKEST_UNROLL
  for (int i = 0; i < K; ++i) {
    if (i < k) {
      if (z[i] == neg_inf) {
        ++s.n_neg_inf;
      } else {
        ++s.count;
        total += z[i];
        if (z[i] > s.max) s.max = z[i];  // NaN never becomes the max; it poisons sum below
      }
    }
  }
  if (s.count == 0) return s;
  s.mean = total / static_cast<T>(s.count);
RANKEST_UNROLL
  for (int i = 0; i < K; ++i) {
    if (i < k && z[i] != neg_inf) {
      const T d = z[i] - s.max;
      const T e = r_exp(d);
      const T c = z[i] - s.mean;
      s.sum += e;
      s.tsum += e * d;
      s.sqsum += e * e;
      s.m2 += c * c;
    }
  }
  return s;
}

// Summary of the union of two disjoint sets: online softmax rescaling + Chan's M2 update.
template <typename T>
RANKEST_HD RowSummary<T> merge(const RowSummary<T>& a, const RowSummary<T>& b) {
  if (b.count == 0 && b.n_neg_inf == 0) return a;
  if (a.count == 0 && a.n_neg_inf == 0) return b;
  RowSummary<T> r;
  r.count = a.count + b.count;
  r.n_neg_inf = a.n_neg_inf + b.n_neg_inf;
  r.max = a.max > b.max ? a.max : b.max;
  r.sum = r.tsum = r.sqsum = T(0);
  if (a.count > 0) {
    const T shift = a.max - r.max;  // <= 0
    const T f = shift == T(0) ? T(1) : r_exp(shift);
    r.sum += f * a.sum;
    r.tsum += f * (a.tsum + shift * a.sum);
    r.sqsum += f * f * a.sqsum;
  }
  if (b.count > 0) {
    const T shift = b.max - r.max;
    const T f = shift == T(0) ? T(1) : r_exp(shift);
    r.sum += f * b.sum;
    r.tsum += f * (b.tsum + shift * b.sum);
    r.sqsum += f * f * b.sqsum;
  }
  if (a.count == 0) {
    r.mean = b.mean;
    r.m2 = b.m2;
  } else if (b.count == 0) {
    r.mean = a.mean;
    r.m2 = a.m2;
  } else {
    const T na = static_cast<T>(a.count), nb = static_cast<T>(b.count), n = na + nb;
    const T delta = b.mean - a.mean;
    r.mean = a.mean + delta * (nb / n);
    r.m2 = a.m2 + b.m2 + delta * delta * (na * (nb / n));
  }
  return r;
}

template <typename T>
struct RowStats {
  T lse, entropy, nll, sq_norm;
  T center;  // the value subtracted from z to form the row: mean (clr) or logsumexp
};

// The four statistics of a finished row (z_target is ignored without a target).
template <typename T>
RANKEST_HD RowStats<T> row_stats(const RowSummary<T>& s, Space space, bool has_target, T z_target) {
  const T inf = static_cast<T>(INFINITY);
  const T nan = static_cast<T>(NAN);
  const bool any_neg_inf = s.n_neg_inf > 0;
  const T log_sum = r_log(s.sum);
  RowStats<T> o;
  o.lse = s.max + log_sum;
  // H = -Σ p (z - lse) = log(sum) - tsum/sum: two non-negative terms, no cancellation.
  o.entropy = log_sum - s.tsum / s.sum;
  o.nll = has_target ? o.lse - z_target : nan;
  if (space == Space::kClr) {
    o.center = any_neg_inf ? -inf : s.mean;
    o.sq_norm = any_neg_inf ? nan : s.m2;
  } else if (space == Space::kProb) {
    o.center = o.lse;
    o.sq_norm = s.sqsum / (s.sum * s.sum);
  } else {
    // Σ (z - lse)² = Σ (z - mean)² + count·(mean - lse)² (the cross term vanishes).
    const T d = s.mean - o.lse;
    o.center = o.lse;
    o.sq_norm = s.m2 + static_cast<T>(s.count) * d * d + (any_neg_inf ? inf : T(0));
  }
  return o;
}

// One element of the output row.
template <typename T>
RANKEST_HD T transform_value(Space space, T z, T center) {
  return space == Space::kProb ? r_exp(z - center) : z - center;
}

}  // namespace rankest
