// CPU kernel of rankest::sparse_gram_update (contract: csrc/ops/sparse_gram_update.h): for
// each CSR row, the outer product of its non-zeros with itself, lower triangle only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops/sparse_gram_update.h"

namespace rankest {

void sparse_gram_update_cpu(
    at::Tensor& gram,
    const at::Tensor& crow,
    const at::Tensor& col,
    const at::Tensor& val) {
  check_sparse_gram_update_args(gram, crow, col, val);
  const int64_t n = crow.size(0) - 1, v = gram.size(0);
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous(), vl = val.contiguous();
  const int64_t* p = cr.data_ptr<int64_t>();
  const int64_t* c = cl.data_ptr<int64_t>();
  const double* x = vl.data_ptr<double>();
  double* g = gram.data_ptr<double>();
  // Sequential over rows: two rows may hit the same Gram entries; the row's entries are
  // sorted, so entry a's row of the Gram is written left to right over b <= a (cache-friendly).
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t a = p[r]; a < p[r + 1]; ++a) {
      double* grow = g + c[a] * v;
      const double xa = x[a];
      for (int64_t b = p[r]; b <= a; ++b) grow[c[b]] += xa * x[b];
    }
  }
}

TORCH_LIBRARY_IMPL(rankest, CPU, m) {
  m.impl("sparse_gram_update", &sparse_gram_update_cpu);
}

}  // namespace rankest
