// gram_update: gram += chunkᵀ·chunk on the lower triangle, in place.
//
// Contract (the specification is rankest/ops/reference.py::gram_update):
//
//   gram      (V, V) float64, modified in place (any strides).
//             Only the LOWER triangle, diagonal included, is updated; every element strictly
//             above the diagonal is left bitwise unchanged (diagonal blocks are computed in
//             full into a temporary and merged back through the lower-triangular mask).
//             Symmetrise once at the end, not per chunk.
//   chunk     (n, V) float64 | float32 | bfloat16 | float16, same device; n may be 0.
//   precision "fp64": the chunk is cast to float64 and the products are accumulated in
//                     float64 (DGEMM) straight into the Gram.
//             "fast": float32 accumulation over the chunk (SGEMM, TF32 disabled; on CUDA
//                     bf16/fp16 chunks use a half-precision GEMM with float32 output, whose
//                     products are exact), added to the float64 carry once per chunk.
//
// Work: V×V is split into row blocks of `block` columns; block row i multiplies against the
// columns [0, end of block i) in panels of at most `panel` columns, so only the lower block
// triangle is computed: (V²/2 + V·block/2)·n multiply-adds, half a full GEMM's.
//
// Determinism: the same GEMM calls in the same order on every call; as deterministic as the
// underlying BLAS (MKL/OpenBLAS with a fixed thread count, cuBLAS on a fixed stream).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <functional>

namespace rankest {

enum class GramPrecision : int { kFp64 = 0, kFast = 1 };

// Validates every argument (ValueError in Python) and parses `precision`. Shared by all
// devices; defined in csrc/rankest.cpp.
GramPrecision check_gram_update_args(
    const at::Tensor& gram,
    const at::Tensor& chunk,
    c10::string_view precision);

// dst (p, q, float64) += a (p, n) · b (n, q), however the device computes it best.
using AddProduct =
    std::function<void(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b)>;

// The blocked lower-triangle driver (device-agnostic ATen; defined in csrc/rankest.cpp).
// `c` is the chunk already in the GEMM dtype, unit column stride (any row stride).
void gram_update_blocked(
    at::Tensor& gram,
    const at::Tensor& c,
    int64_t block,
    int64_t panel,
    const AddProduct& add_product);

void gram_update_cpu(at::Tensor& gram, const at::Tensor& chunk, c10::string_view precision);
void gram_update_cuda(at::Tensor& gram, const at::Tensor& chunk, c10::string_view precision);

}  // namespace rankest
