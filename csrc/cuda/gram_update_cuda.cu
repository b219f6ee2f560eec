// CUDA kernel of rankest::gram_update (contract: csrc/ops/gram_update.h): the blocked
// lower-triangle driver with cuBLAS GEMMs reached through ATen (at::mm / addmm_), so this file
// needs no cuBLAS header. 2048-column blocks, panels of up to 16384 columns (the fp32 product
// of one panel, 128 MiB, is the only temporary).
//
// Alignment matters more than anything else here: a half-precision GEMM whose leading
// dimension is not a multiple of 8 elements falls off cuBLAS's tensor-core fast path (an odd
// V' = 50,277 ran at 131 TFLOP/s on an H200 where 8192³ runs at 779). transform_rows writes
// its CUDA rows at a row stride padded to 16 elements, and chunks are used as they are when
// their row stride is aligned; anything else is copied once into a padded buffer.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>

#include "../ops/gram_update.h"

// aten::mm.dtype (half/bf16 inputs, float32 output) exists from PyTorch 2.9 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define RANKEST_HAS_MM_DTYPE 1
#else
#define RANKEST_HAS_MM_DTYPE 0
#endif

namespace rankest {
namespace {

// The chunk in `dtype`: itself when its rows are unit-stride with a row stride that is a
// multiple of 16 elements (and 16-byte aligned storage), else one converting copy into such a
// padded buffer.
at::Tensor aligned_rows(const at::Tensor& chunk, at::ScalarType dtype) {
  constexpr int64_t kAlign = 16;
  const auto ptr = reinterpret_cast<std::uintptr_t>(chunk.data_ptr());
  if (chunk.scalar_type() == dtype && chunk.stride(1) == 1 && chunk.stride(0) % kAlign == 0 &&
      ptr % 16 == 0) {
    return chunk;
  }
  const int64_t n = chunk.size(0), v = chunk.size(1);
  const int64_t ld = (v + kAlign - 1) / kAlign * kAlign;
  at::Tensor padded = at::empty({n, ld}, chunk.options().dtype(dtype)).narrow(1, 0, v);
  padded.copy_(chunk);
  return padded;
}

}  // namespace

void gram_update_cuda(at::Tensor& gram, const at::Tensor& chunk, c10::string_view precision) {
  const GramPrecision p = check_gram_update_args(gram, chunk, precision);
  if (chunk.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::NoTF32Guard no_tf32;  // "fast" means fp32 products, never TF32 (thread-local)
  constexpr int64_t kBlock = 2048, kPanel = 16384;
  if (p == GramPrecision::kFp64) {
    const at::Tensor c = aligned_rows(chunk, at::kDouble);
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) { dst.addmm_(a, b); });
    return;
  }
  const bool half = chunk.scalar_type() == at::kHalf || chunk.scalar_type() == at::kBFloat16;
#if RANKEST_HAS_MM_DTYPE
  if (half) {
    // Tensor-core GEMM on the half chunk with float32 accumulation and output: the products of
    // two bf16/fp16 numbers are exact in float32, so this equals the fp32 route's arithmetic.
    const at::Tensor c = aligned_rows(chunk, chunk.scalar_type());
    gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                    const at::Tensor& b) {
      dst.add_(at::mm(a, b, at::kFloat));
    });
    return;
  }
#endif
  (void)half;
  const at::Tensor c = aligned_rows(chunk, at::kFloat);
  gram_update_blocked(gram, c, kBlock, kPanel, [](at::Tensor& dst, const at::Tensor& a,
                                                  const at::Tensor& b) { dst.add_(at::mm(a, b)); });
}

TORCH_LIBRARY_IMPL(rankest, CUDA, m) {
  m.impl("gram_update", &gram_update_cuda);
}

}  // namespace rankest
