// CPU kernel of rankest::ngram_count (contract: csrc/ops/ngram_count.h): an open-addressing
// hash table keyed by each distinct window's first position in the stream, then one sort of
// the distinct windows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops/ngram_count.h"

namespace rankest {
namespace {

inline uint64_t mix(uint64_t h) {  // splitmix64 finaliser: good avalanche for sequential ids
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return h;
}

template <typename tok_t>
std::tuple<at::Tensor, at::Tensor> count_kernel(const tok_t* t, int64_t len, int64_t n) {
  // Slots hold (first position + 1, count); position 0 in `pos` marks an empty slot.
  std::vector<int64_t> pos(1024, 0), cnt(1024, 0);
  uint64_t mask = pos.size() - 1;
  int64_t used = 0;
  auto hash_at = [&](int64_t i) {
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    for (int64_t k = 0; k < n; ++k) h = mix(h ^ (static_cast<uint64_t>(t[i + k]) + k * 0x632be59bd9b4e019ULL));
    return h;
  };
  auto same = [&](int64_t a, int64_t b) {
    for (int64_t k = 0; k < n; ++k)
      if (t[a + k] != t[b + k]) return false;
    return true;
  };
  auto grow = [&]() {
    std::vector<int64_t> p2(pos.size() * 2, 0), c2(pos.size() * 2, 0);
    const uint64_t m2 = p2.size() - 1;
    for (size_t s = 0; s < pos.size(); ++s) {
      if (!pos[s]) continue;
      uint64_t j = hash_at(pos[s] - 1) & m2;
      while (p2[j]) j = (j + 1) & m2;
      p2[j] = pos[s];
      c2[j] = cnt[s];
    }
    pos.swap(p2);
    cnt.swap(c2);
    mask = m2;
  };
  // `bad` = index of the last boundary (negative token) seen at or after the window start;
  // a window [i, i+n) is valid when no boundary lies inside it.
  int64_t last_bad = -1;  // last boundary position < i + n
  for (int64_t i = 0; i + n <= len; ++i) {
    if (i == 0) {
      for (int64_t k = 0; k < n; ++k)
        if (t[k] < 0) last_bad = k;
    } else if (t[i + n - 1] < 0) {
      last_bad = i + n - 1;
    }
    if (last_bad >= i) continue;
    uint64_t j = hash_at(i) & mask;
    while (pos[j] && !same(pos[j] - 1, i)) j = (j + 1) & mask;
    if (pos[j]) {
      ++cnt[j];
    } else {
      pos[j] = i + 1;
      cnt[j] = 1;
      if (2 * ++used > static_cast<int64_t>(pos.size())) grow();
    }
  }
  std::vector<std::pair<int64_t, int64_t>> items;
  items.reserve(used);
  for (size_t s = 0; s < pos.size(); ++s)
    if (pos[s]) items.emplace_back(pos[s] - 1, cnt[s]);
  std::vector<int64_t>().swap(pos);
  std::vector<int64_t>().swap(cnt);
  std::sort(items.begin(), items.end(), [&](const auto& a, const auto& b) {
    for (int64_t k = 0; k < n; ++k) {
      if (t[a.first + k] != t[b.first + k]) return t[a.first + k] < t[b.first + k];
    }
    return false;
  });
  const int64_t m = static_cast<int64_t>(items.size());
  at::Tensor grams = at::empty({m, n}, at::TensorOptions().dtype(at::kLong));
  at::Tensor counts = at::empty({m}, at::TensorOptions().dtype(at::kLong));
  int64_t* g = grams.data_ptr<int64_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < n; ++k) g[r * n + k] = static_cast<int64_t>(t[items[r].first + k]);
    c[r] = items[r].second;
  }
  return {grams, counts};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ngram_count_cpu(const at::Tensor& tokens, int64_t order) {
  check_ngram_count_args(tokens, order);
  const at::Tensor t = tokens.contiguous();
  if (t.scalar_type() == at::kInt) return count_kernel(t.data_ptr<int32_t>(), t.numel(), order);
  return count_kernel(t.data_ptr<int64_t>(), t.numel(), order);
}

TORCH_LIBRARY_IMPL(rankest, CPU, m) {
  m.impl("ngram_count", &ngram_count_cpu);
}

}  // namespace rankest
