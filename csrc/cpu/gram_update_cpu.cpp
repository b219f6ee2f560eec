// CPU kernel of rankest::gram_update (contract: csrc/ops/gram_update.h): the blocked
// lower-triangle driver with ATen GEMMs (MKL / OpenBLAS) on 512-column blocks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops/gram_update.h"

namespace rankest {

void gram_update_cpu(at::Tensor& gram, const at::Tensor& chunk, c10::string_view precision) {
  const GramPrecision p = check_gram_update_args(gram, chunk, precision);
  if (chunk.size(0) == 0) return;
  constexpr int64_t kBlock = 512, kPanel = 4096;
  if (p == GramPrecision::kFp64) {
    const at::Tensor c = chunk.to(at::kDouble).contiguous();
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) { dst.addmm_(a, b); });
  } else {
    // fp32 products, fp32 accumulation over the chunk, added to the fp64 carry per block.
    const at::Tensor c = chunk.to(at::kFloat).contiguous();
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) { dst.add_(at::mm(a, b)); });
  }
}

TORCH_LIBRARY_IMPL(rankest, CPU, m) {
  m.impl("gram_update", &gram_update_cpu);
}

}  // namespace rankest
