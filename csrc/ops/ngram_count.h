// ngram_count: the distinct n-grams of a token stream and how often each occurs.
//
// Contract (the specification is rankest/ops/reference.py::ngram_count):
//
//   tokens  (L,) int64 | int32, CPU. A negative value is a boundary (end of a document):
//           no n-gram contains it, so n-grams never span two documents.
//   order   int n >= 1.
//
//   returns grams  (M, n) int64, contiguous: the M distinct n-grams (windows of n consecutive
//                  non-negative tokens), in lexicographic order, so the n-grams sharing a
//                  context (their first n-1 tokens) are consecutive and their next tokens
//                  increase: the CSR layout of the count matrix, rows = contexts.
//           counts (M,) int64: occurrences of each n-gram.
//
// Memory: an open-addressing hash table of at most 2M slots (it doubles at half load), plus the
// outputs: proportional to the distinct n-grams, never to V per context. When n × bits(max
// token) <= 128 (5-grams of any vocabulary below 2^25) a slot is (128-bit packed n-gram, count),
// 32 bytes; otherwise (first position in the stream, count), 16 bytes, windows compared token
// by token.
// Work: O(L·n) expected for hashing, O(M log M · n) for the final sort. Single-threaded and
// deterministic (the output is sorted, so independent of the hash order).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace rankest {

// Validates every argument (ValueError in Python). Defined in csrc/rankest.cpp.
void check_ngram_count_args(const at::Tensor& tokens, int64_t order);

std::tuple<at::Tensor, at::Tensor> ngram_count_cpu(const at::Tensor& tokens, int64_t order);

}  // namespace rankest
