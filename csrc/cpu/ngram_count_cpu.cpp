// CPU kernel of rankest::ngram_count (contract: csrc/ops/ngram_count.h).
//
// Fast path (n × bits(max token) <= 128, e.g. 5-grams of any vocabulary below 2^25): each window
// is packed into a 128-bit key (first token most significant, so numeric order of keys is the
// lexicographic order of windows), updated in O(1) per token; an open-addressing table of
// (key, count) slots; the distinct keys are sorted contiguously and unpacked.
// General path: the table is keyed by each distinct window's first position in the stream
// (windows compared token by token), then one sort of the distinct windows.
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

template <typename tok_t>
std::tuple<at::Tensor, at::Tensor> count_packed(const tok_t* t, int64_t len, int64_t n, int bits) {
  using u128 = unsigned __int128;
  struct Slot {
    u128 key;
    int64_t count;  // 0 = empty slot
  };
  std::vector<Slot> tab(1024, Slot{0, 0});
  uint64_t mask = tab.size() - 1;
  int64_t used = 0;
  const int width = static_cast<int>(n) * bits;
  const u128 full = width >= 128 ? ~u128(0) : ((u128(1) << width) - 1);
  auto slot_of = [](u128 key, uint64_t m) {
    return mix(static_cast<uint64_t>(key) ^ mix(static_cast<uint64_t>(key >> 64) + 0x9e3779b97f4a7c15ULL)) & m;
  };
  auto grow = [&]() {
    std::vector<Slot> t2(tab.size() * 2, Slot{0, 0});
    const uint64_t m2 = t2.size() - 1;
    for (const Slot& s : tab) {
      if (!s.count) continue;
      uint64_t j = slot_of(s.key, m2);
      while (t2[j].count) j = (j + 1) & m2;
      t2[j] = s;
    }
    tab.swap(t2);
    mask = m2;
  };
  u128 key = 0;
  int64_t run = 0;  // consecutive non-negative tokens ending here
  for (int64_t i = 0; i < len; ++i) {
    if (t[i] < 0) {
      run = 0;
      key = 0;
      continue;
    }
    key = ((key << bits) | static_cast<u128>(t[i])) & full;
    if (++run < n) continue;
    uint64_t j = slot_of(key, mask);
    while (tab[j].count && tab[j].key != key) j = (j + 1) & mask;
    if (tab[j].count) {
      ++tab[j].count;
    } else {
      tab[j] = Slot{key, 1};
      if (2 * ++used > static_cast<int64_t>(tab.size())) grow();
    }
  }
  std::vector<Slot> items;
  items.reserve(used);
  for (const Slot& s : tab)
    if (s.count) items.push_back(s);
  std::vector<Slot>().swap(tab);
  std::sort(items.begin(), items.end(), [](const Slot& a, const Slot& b) { return a.key < b.key; });
  const int64_t m = static_cast<int64_t>(items.size());
  at::Tensor grams = at::empty({m, n}, at::TensorOptions().dtype(at::kLong));
  at::Tensor counts = at::empty({m}, at::TensorOptions().dtype(at::kLong));
  int64_t* g = grams.data_ptr<int64_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  const u128 digit = (u128(1) << bits) - 1;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < n; ++k)
      g[r * n + k] = static_cast<int64_t>((items[r].key >> (bits * (n - 1 - k))) & digit);
    c[r] = items[r].count;
  }
  return {grams, counts};
}

// Bits needed by the largest token (at least 1).
template <typename tok_t>
int token_bits(const tok_t* t, int64_t len) {
  int64_t mx = 0;
  for (int64_t i = 0; i < len; ++i) mx = std::max<int64_t>(mx, static_cast<int64_t>(t[i]));
  int b = 1;
  while (b < 63 && (mx >> b) != 0) ++b;
  return b;
}

template <typename tok_t>
std::tuple<at::Tensor, at::Tensor> count_any(const tok_t* t, int64_t len, int64_t n) {
  const int bits = token_bits(t, len);
  if (n * bits <= 128) return count_packed(t, len, n, bits);
  return count_kernel(t, len, n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ngram_count_cpu(const at::Tensor& tokens, int64_t order) {
  check_ngram_count_args(tokens, order);
  const at::Tensor t = tokens.contiguous();
  if (t.scalar_type() == at::kInt) return count_any(t.data_ptr<int32_t>(), t.numel(), order);
  return count_any(t.data_ptr<int64_t>(), t.numel(), order);
}

TORCH_LIBRARY_IMPL(rankest, CPU, m) {
  m.impl("ngram_count", &ngram_count_cpu);
}

}  // namespace rankest
