// sparse_gram_update: gram += TᵀT on the lower triangle, from rows T given in CSR form,
// without densifying them.
//
// Contract (the specification is rankest/ops/reference.py::sparse_gram_update):
//
//   gram     (V, V) float64, contiguous, CPU, modified in place. Only the LOWER triangle,
//            diagonal included, is updated (the layout of rankest::gram_update and of the Gram
//            accumulator, whose eigvalsh reads UPLO='L'); the strict upper triangle is left
//            bitwise unchanged.
//   crow     (n + 1,) int64: row r holds the entries crow[r] .. crow[r+1]-1; crow[0] = 0,
//            non-decreasing, crow[n] = nnz.
//   col      (nnz,) int64: column of each entry, in [0, V), STRICTLY increasing within a row
//            (canonical CSR; duplicates would be double-counted, so they are refused).
//   val      (nnz,) float64: the entries.
//
// For every row and every pair of its entries a >= b (positions within the row):
//   gram[col[a], col[b]] += val[a] · val[b]   (col[a] >= col[b]: the lower triangle)
// in float64, rows in order: exact products, the same sums as the dense fp64 route up to the
// order of additions. Work Σ_r nnz_r (nnz_r + 1) / 2 multiply-adds; memory: none besides gram.
#pragma once

#include <ATen/core/Tensor.h>

namespace rankest {

// Validates every argument (ValueError in Python), including the CSR structure (one pass over
// crow and col). Defined in csrc/rankest.cpp.
void check_sparse_gram_update_args(
    const at::Tensor& gram,
    const at::Tensor& crow,
    const at::Tensor& col,
    const at::Tensor& val);

void sparse_gram_update_cpu(
    at::Tensor& gram,
    const at::Tensor& crow,
    const at::Tensor& col,
    const at::Tensor& val);

}  // namespace rankest
