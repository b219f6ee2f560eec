// CUDA kernel of rankest::gram_update (contract: csrc/ops/gram_update.h): the blocked
// lower-triangle driver with cuBLAS GEMMs reached through ATen (at::mm / addmm_), so this file
// needs no cuBLAS header. 1024-column blocks, panels of up to 8192 columns.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include "../ops/gram_update.h"

// aten::mm.dtype (half/bf16 inputs, float32 output) exists from PyTorch 2.9 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define RANKEST_HAS_MM_DTYPE 1
#else
#define RANKEST_HAS_MM_DTYPE 0
#endif

namespace rankest {

void gram_update_cuda(at::Tensor& gram, const at::Tensor& chunk, c10::string_view precision) {
  const GramPrecision p = check_gram_update_args(gram, chunk, precision);
  if (chunk.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::NoTF32Guard no_tf32;  // "fast" means fp32 products, never TF32 (thread-local)
  constexpr int64_t kBlock = 1024, kPanel = 8192;
  if (p == GramPrecision::kFp64) {
    const at::Tensor c = chunk.to(at::kDouble).contiguous();
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) { dst.addmm_(a, b); });
    return;
  }
  const bool half = chunk.scalar_type() == at::kHalf || chunk.scalar_type() == at::kBFloat16;
#if RANKEST_HAS_MM_DTYPE
  if (half) {
    // Tensor-core GEMM on the half chunk with float32 accumulation and output: the products of
    // two bf16/fp16 numbers are exact in float32, so this equals the fp32 route's arithmetic.
    const at::Tensor c = chunk.contiguous();
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) {
      dst.add_(at::mm(a, b, at::kFloat));
    });
    return;
  }
#endif
  (void)half;
  const at::Tensor c = chunk.to(at::kFloat).contiguous();
  gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                  const at::Tensor& b) { dst.add_(at::mm(a, b)); });
}

TORCH_LIBRARY_IMPL(rankest, CUDA, m) {
  m.impl("gram_update", &gram_update_cuda);
}

}  // namespace rankest
