// CPU kernel of rankest::transform_rows (contract: csrc/ops/transform_rows.h).
// One row per task. float32 logits without inf/NaN take the fast path (fast_row): 8-wide
// vector passes, a float32 exp (exp_nonpos) and float64 sums; every other row
// (float64 / float16 / bfloat16 logits, or a row with an inf or NaN) is read into float64
// RowSummary groups (the exact path). Either way the row is re-read while it is still in cache
// to write the output row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../ops/transform_rows.h"

namespace rankest {
namespace {

constexpr int kGroup = 16;  // elements summarised exactly before each merge
#if defined(__GNUC__)  // GCC / Clang vector extensions: 8-wide code for any x86-64 / ARM target
#define RANKEST_FAST_ROWS 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
constexpr int64_t kBlock = 512;  // fast path: float32 partial sums go into float64 every kBlock

// The fast path compiled three times on x86-64 Linux (GCC's ifunc dispatch at load time): for
// AVX-512 (8 doubles in a register) and AVX2 (8 floats), and for the baseline x86-64 that every
// wheel must run on, where the same 8-wide code spills to the stack (2x slower per element;
// benchmarks/reports/estimate_cpu.md). Neither target enables FMA: no multiply-add is
// contracted, so every clone gives the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RANKEST_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RANKEST_WIDE
#endif

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline v8f splat8(float x) { return v8f{} + x; }
// mask ? a : b lane by lane, as bit operations: GCC scalarises the vector ?: on some targets.
__attribute__((always_inline)) inline v8f select8(v8i mask, v8f a, v8f b) {
  return reinterpret_cast<v8f>((reinterpret_cast<v8i>(a) & mask) | (reinterpret_cast<v8i>(b) & ~mask));
}

// e^x for x <= 0 in float32, 8 at a time, without a libm call: Cephes' expf (round-to-nearest
// range reduction x = n·ln2 + r, |r| <= ln2/2, degree-5 polynomial), within 1e-7 relative;
// 0 below -87.3 (e^x < 2^-126, negligible beside the row maximum's e^0 = 1).
__attribute__((always_inline)) inline v8f exp_nonpos(v8f x) {
  const v8f magic = splat8(12582912.0f);  // 1.5·2^23: adding and subtracting it rounds
  const v8f fx = (x * 1.44269504088896341f + magic) - magic;
  const v8f r = (x - fx * 0.693359375f) + fx * 2.12194440e-4f;
  v8f y = splat8(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const v8f fc = select8(fx < -126.0f, splat8(-126.0f), fx);
  const v8i bits = (__builtin_convertvector(fc, v8i) + 127) << 23;
  return select8(x < -87.3f, splat8(0.0f), y * reinterpret_cast<const v8f&>(bits));
}
inline float exp_nonpos(float x) { return exp_nonpos(splat8(x))[0]; }

// The RowSummary of a float32 row without inf or NaN, or false (the caller takes the exact
// path). Two 8-wide passes over the row (it stays in L2): the max, the sum of z (float64) and
// the inf/NaN test; then e = e^(z-max) in float32 with Σe, Σe·(z-max), Σe² summed in float32
// over blocks of kBlock and in float64 across them, and Σ(z-mean)² in float64. Fixed order:
// bitwise deterministic and independent of the thread count.
RANKEST_WIDE bool fast_row(const float* z, int64_t n_cols, RowSummary<double>& out) {
  const int64_t body = n_cols / 8 * 8;
  v8f mx = splat8(z[0]), bad = {};
  v8d tot = {};
  for (int64_t j = 0; j < body; j += 8) {
    const v8f v = load8(z + j);
    mx = select8(v > mx, v, mx);
    tot += __builtin_convertvector(v, v8d);
    bad += v - v;  // NaN for an inf or a NaN
  }
  float m = mx[0], b = 0.0f;
  double total = 0.0;
  for (int l = 0; l < 8; ++l) {
    m = mx[l] > m ? mx[l] : m;
    total += tot[l];
    b += bad[l];
  }
  for (int64_t j = body; j < n_cols; ++j) {
    m = z[j] > m ? z[j] : m;
    total += static_cast<double>(z[j]);
    b += z[j] - z[j];
  }
  if (!(b == 0.0f)) return false;
  const double mean = total / static_cast<double>(n_cols);
  const v8f vm = splat8(m);
  double sum = 0.0, tsum = 0.0, sqsum = 0.0, m2 = 0.0;
  for (int64_t b0 = 0; b0 < n_cols; b0 += kBlock) {
    const int64_t b1 = std::min<int64_t>(n_cols, b0 + kBlock), bb = b0 + (b1 - b0) / 8 * 8;
    v8f s = {}, t = {}, q = {};
    v8d c2 = {};
    for (int64_t j = b0; j < bb; j += 8) {
      const v8f v = load8(z + j);
      const v8f d = v - vm;
      const v8f e = exp_nonpos(d);
      s += e;
      t += e * d;
      q += e * e;
      const v8d c = __builtin_convertvector(v, v8d) - mean;
      c2 += c * c;
    }
    for (int l = 0; l < 8; ++l) {
      sum += s[l];
      tsum += t[l];
      sqsum += q[l];
      m2 += c2[l];
    }
    for (int64_t j = bb; j < b1; ++j) {
      const float d = z[j] - m, e = exp_nonpos(d);
      const double c = static_cast<double>(z[j]) - mean;
      sum += e;
      tsum += e * d;
      sqsum += e * e;
      m2 += c * c;
    }
  }
  out = RowSummary<double>::empty();
  out.max = m;
  out.sum = sum;
  out.tsum = tsum;
  out.sqsum = sqsum;
  out.mean = mean;
  out.m2 = m2;
  out.count = static_cast<int>(n_cols);
  return true;
}

// The prob row of a fast-path row: z - lse in float64, its exp in float32 (exp_nonpos).
template <typename out_t>
RANKEST_WIDE void fast_prob_row(const float* z, int64_t n_cols, double lse, out_t* o) {
  const int64_t body = n_cols / 8 * 8;
  for (int64_t j = 0; j < body; j += 8) {
    const v8d d = __builtin_convertvector(load8(z + j), v8d) - lse;
    const v8f e = exp_nonpos(__builtin_convertvector(d, v8f));
    for (int l = 0; l < 8; ++l) o[j + l] = static_cast<out_t>(e[l]);
  }
  for (int64_t j = body; j < n_cols; ++j) {
    o[j] = static_cast<out_t>(exp_nonpos(static_cast<float>(static_cast<double>(z[j]) - lse)));
  }
}
#endif

template <typename in_t, typename out_t>
void transform_rows_kernel(
    const at::Tensor& x,
    const at::Tensor& targets,
    int64_t n_cols,
    Space space,
    at::Tensor& rows,
    at::Tensor& stats) {
  using acc_t = double;
  using stat_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
  const int64_t n = x.size(0);
  const int64_t x_stride = x.stride(0);
  const in_t* x_ptr = x.data_ptr<in_t>();
  const int64_t* t_ptr = targets.data_ptr<int64_t>();
  out_t* r_ptr = rows.numel() > 0 ? rows.data_ptr<out_t>() : nullptr;
  stat_t* s_ptr = stats.data_ptr<stat_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / n_cols);

  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    acc_t buf[kGroup];
    for (int64_t r = begin; r < end; ++r) {
      const in_t* z = x_ptr + r * x_stride;
      RowSummary<acc_t> s = RowSummary<acc_t>::empty();
      bool fast = false;
#ifdef RANKEST_FAST_ROWS
      if constexpr (std::is_same_v<in_t, float>) fast = fast_row(z, n_cols, s);
#endif
      if (!fast) {
        for (int64_t j0 = 0; j0 < n_cols; j0 += kGroup) {
          const int k = static_cast<int>(std::min<int64_t>(kGroup, n_cols - j0));
          for (int i = 0; i < k; ++i) buf[i] = static_cast<acc_t>(z[j0 + i]);
          s = merge(s, summarize<acc_t, kGroup>(buf, k));
        }
      }
      const int64_t t = t_ptr[r];
      const RowStats<acc_t> st =
          row_stats(s, space, t >= 0, t >= 0 ? static_cast<acc_t>(z[t]) : acc_t(0));
      stat_t* so = s_ptr + 4 * r;
      so[0] = static_cast<stat_t>(st.lse);
      so[1] = static_cast<stat_t>(st.entropy);
      so[2] = static_cast<stat_t>(st.nll);
      so[3] = static_cast<stat_t>(st.sq_norm);
      if (r_ptr != nullptr) {
        out_t* o = r_ptr + r * n_cols;
#ifdef RANKEST_FAST_ROWS
        if constexpr (std::is_same_v<in_t, float> && !std::is_same_v<out_t, double>) {
          if (fast && space == Space::kProb) {
            fast_prob_row(z, n_cols, st.center, o);
            continue;
          }
        }
#endif
        for (int64_t j = 0; j < n_cols; ++j) {
          o[j] = static_cast<out_t>(transform_value(space, static_cast<acc_t>(z[j]), st.center));
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transform_rows_cpu(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    bool write_rows,
    at::ScalarType out_dtype) {
  const Space sp = check_transform_rows_args(logits, targets, n_cols, space, out_dtype);
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor t = targets.to(at::kLong).contiguous();
  const int64_t n = logits.size(0);
  const auto stats_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty({n, write_rows ? n_cols : 0}, logits.options().dtype(out_dtype));
  at::Tensor stats = at::empty({n, 4}, logits.options().dtype(stats_dtype));
  if (n == 0) return {rows, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "transform_rows_cpu", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, out_dtype, "transform_rows_cpu_out", [&] {
              transform_rows_kernel<in_t, scalar_t>(x, t, n_cols, sp, rows, stats);
            });
      });
  return {rows, stats};
}

TORCH_LIBRARY_IMPL(rankest, CPU, m) {
  m.impl("transform_rows", &transform_rows_cpu);
}

}  // namespace rankest
