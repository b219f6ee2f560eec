// CPU kernel of rankest::transform_rows (contract: csrc/ops/transform_rows.h).
// One row per task; the row is read once into float64 RowSummary groups, then (write_rows)
// read again while it is still in cache to write the output row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../ops/transform_rows.h"

namespace rankest {
namespace {

constexpr int kGroup = 16;  // elements summarised exactly before each merge

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
      for (int64_t j0 = 0; j0 < n_cols; j0 += kGroup) {
        const int k = static_cast<int>(std::min<int64_t>(kGroup, n_cols - j0));
        for (int i = 0; i < k; ++i) buf[i] = static_cast<acc_t>(z[j0 + i]);
        s = merge(s, summarize<acc_t, kGroup>(buf, k));
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
