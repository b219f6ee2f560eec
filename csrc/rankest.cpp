// rankest._C: the op schemas (declared once, here), the argument checks and device-agnostic
// helpers every kernel shares, and an empty Python module so that `import rankest._C` loads
// the library (the pattern of pytorch/extension-cpp). Kernels register per device in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <string>

#include "ops/gram_update.h"
#include "ops/ngram_count.h"
#include "ops/sparse_gram_update.h"
#include "ops/transform_rows.h"

extern "C" {
// `import rankest._C` only needs a module object; loading the shared library runs the
// TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", /*doc=*/nullptr, /*size=*/-1, /*methods=*/nullptr};
  return PyModule_Create(&module_def);
}
}

namespace rankest {
namespace {

// Messages format numbers with std::to_string and never stream integers or shapes into the
// std::ostringstream behind TORCH_CHECK: on one CUDA image (gcc 13.3, torch 2.11) streaming an
// integer from an extension segfaulted, while strings were fine.
std::string num(int64_t v) {
  return std::to_string(v);
}

std::string shape(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (auto d : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(d);
  }
  return s;
}

// The one argument check every op uses: rank and dtype of a tensor, with a sentence that says
// what was wrong (raised as ValueError in Python).
void check_tensor(
    const char* op,
    const char* name,
    const at::Tensor& t,
    int64_t dim,
    std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK_VALUE(t.defined(), "rankest.", op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(
      t.dim() == dim, "rankest.", op, ": ", name, " must be ", num(dim), "-D, got shape ",
      shape(t.sizes()));
  const bool ok = std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end();
  TORCH_CHECK_VALUE(
      ok, "rankest.", op, ": ", name, " must be one of (", dtype_list(dtypes), "), got ",
      t.scalar_type());
}

void check_same_device(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn) {
  TORCH_CHECK_VALUE(
      a.device() == b.device(), "rankest.", op, ": ", an, " and ", bn,
      " must be on the same device, got ", a.device().str(), " and ", b.device().str());
}

constexpr std::initializer_list<at::ScalarType> kFloatDtypes = {
    at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};

}  // namespace

Space check_transform_rows_args(
    const at::Tensor& logits,
    const at::Tensor& targets,
    int64_t n_cols,
    c10::string_view space,
    at::ScalarType out_dtype) {
  constexpr const char* op = "transform_rows";
  check_tensor(op, "logits", logits, 2, kFloatDtypes);
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK_VALUE(
      n_cols >= 1 && n_cols <= v, "rankest.transform_rows: n_cols must be in [1, ", num(v),
      "], got ", num(n_cols));
  check_tensor(op, "targets", targets, 1,
               {at::kLong, at::kInt, at::kShort, at::kChar, at::kByte});
  TORCH_CHECK_VALUE(
      targets.size(0) == n, "rankest.transform_rows: targets must have shape (", num(n),
      ",), got ", shape(targets.sizes()));
  check_same_device(op, logits, "logits", targets, "targets");
  TORCH_CHECK_VALUE(
      std::find(kFloatDtypes.begin(), kFloatDtypes.end(), out_dtype) != kFloatDtypes.end(),
      "rankest.transform_rows: out_dtype must be one of (", dtype_list(kFloatDtypes), "), got ",
      out_dtype);
  if (n > 0) {
    // One device->host sync on CUDA: the price of an error instead of a wrong gather.
    const int64_t t_max = targets.max().item<int64_t>();
    TORCH_CHECK_VALUE(
        t_max < n_cols, "rankest.transform_rows: a target is >= n_cols (", num(n_cols),
        "); targets index the first n_cols columns");
  }
  if (space == "clr") return Space::kClr;
  if (space == "prob") return Space::kProb;
  if (space == "logprob") return Space::kLogprob;
  TORCH_CHECK_VALUE(
      false, "rankest.transform_rows: space must be one of ('clr', 'prob', 'logprob'), got '",
      std::string(space), "'");
  return Space::kClr;  // unreachable
}

GramPrecision check_gram_update_args(
    const at::Tensor& gram,
    const at::Tensor& chunk,
    c10::string_view precision) {
  constexpr const char* op = "gram_update";
  check_tensor(op, "gram", gram, 2, {at::kDouble});
  TORCH_CHECK_VALUE(
      gram.size(0) == gram.size(1), "rankest.gram_update: gram must be a square float64 "
      "matrix, got shape ", shape(gram.sizes()));
  check_tensor(op, "chunk", chunk, 2, kFloatDtypes);
  TORCH_CHECK_VALUE(
      chunk.size(1) == gram.size(0), "rankest.gram_update: chunk must be (n, ",
      num(gram.size(0)), "), got shape ", shape(chunk.sizes()));
  check_same_device(op, gram, "gram", chunk, "chunk");
  if (precision == "fp64") return GramPrecision::kFp64;
  if (precision == "fast") return GramPrecision::kFast;
  TORCH_CHECK_VALUE(
      false, "rankest.gram_update: precision must be one of ('fp64', 'fast'), got '",
      std::string(precision), "'");
  return GramPrecision::kFp64;  // unreachable
}

void check_ngram_count_args(const at::Tensor& tokens, int64_t order) {
  check_tensor("ngram_count", "tokens", tokens, 1, {at::kLong, at::kInt});
  TORCH_CHECK_VALUE(
      tokens.device().is_cpu(), "rankest.ngram_count: tokens must be on the CPU, got ",
      tokens.device().str());
  TORCH_CHECK_VALUE(order >= 1, "rankest.ngram_count: order must be >= 1, got ", num(order));
}

void check_sparse_gram_update_args(
    const at::Tensor& gram,
    const at::Tensor& crow,
    const at::Tensor& col,
    const at::Tensor& val) {
  constexpr const char* op = "sparse_gram_update";
  check_tensor(op, "gram", gram, 2, {at::kDouble});
  TORCH_CHECK_VALUE(
      gram.size(0) == gram.size(1) && gram.is_contiguous(), "rankest.sparse_gram_update: gram "
      "must be a square contiguous float64 matrix, got shape ", shape(gram.sizes()));
  check_tensor(op, "crow", crow, 1, {at::kLong});
  check_tensor(op, "col", col, 1, {at::kLong});
  check_tensor(op, "val", val, 1, {at::kDouble});
  for (const at::Tensor* t : {&gram, &crow, &col, &val}) {
    TORCH_CHECK_VALUE(
        t->device().is_cpu(), "rankest.sparse_gram_update: every argument must be on the CPU, got ",
        t->device().str());
  }
  TORCH_CHECK_VALUE(
      crow.size(0) >= 1, "rankest.sparse_gram_update: crow must have n + 1 >= 1 entries");
  const int64_t nnz = col.size(0), v = gram.size(0);
  TORCH_CHECK_VALUE(
      val.size(0) == nnz, "rankest.sparse_gram_update: col and val must have the same length, got ",
      num(nnz), " and ", num(val.size(0)));
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous();
  const int64_t* p = cr.data_ptr<int64_t>();
  const int64_t* c = cl.data_ptr<int64_t>();
  const int64_t n = crow.size(0) - 1;
  TORCH_CHECK_VALUE(
      p[0] == 0 && p[n] == nnz, "rankest.sparse_gram_update: crow must start at 0 and end at nnz = ",
      num(nnz), ", got ", num(p[0]), " and ", num(p[n]));
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_VALUE(
        p[r] <= p[r + 1], "rankest.sparse_gram_update: crow must be non-decreasing (row ", num(r), ")");
    for (int64_t a = p[r]; a < p[r + 1]; ++a) {
      TORCH_CHECK_VALUE(
          c[a] >= 0 && c[a] < v, "rankest.sparse_gram_update: col must be in [0, ", num(v),
          "), got ", num(c[a]), " in row ", num(r));
      TORCH_CHECK_VALUE(
          a == p[r] || c[a] > c[a - 1], "rankest.sparse_gram_update: the columns of a row must be "
          "strictly increasing (canonical CSR), row ", num(r), " is not");
    }
  }
}

void gram_update_blocked(
    at::Tensor& gram,
    const at::Tensor& c,
    int64_t block,
    int64_t panel,
    const AddProduct& add_product) {
  const int64_t v = gram.size(0);
  if (v == 0 || c.size(0) == 0) return;
  const int64_t b0 = std::min(block, v);
  const at::Tensor lower = at::ones({b0, b0}, gram.options().dtype(at::kBool)).tril_();
  for (int64_t i0 = 0; i0 < v; i0 += block) {
    const int64_t bi = std::min(block, v - i0);
    const at::Tensor a = c.narrow(1, i0, bi).t();  // (bi, n)
    at::Tensor rows = gram.narrow(0, i0, bi);
    // Strictly-lower blocks: straight into the Gram, in panels of at most `panel` columns.
    for (int64_t j0 = 0; j0 < i0; j0 += panel) {
      const int64_t bj = std::min(panel, i0 - j0);
      at::Tensor dst = rows.narrow(1, j0, bj);
      add_product(dst, a, c.narrow(1, j0, bj));
    }
    // Diagonal block: full square into a temporary, merged through the lower mask so the
    // strict upper triangle is left bitwise untouched.
    at::Tensor diag = rows.narrow(1, i0, bi);
    at::Tensor tmp = diag.clone(at::MemoryFormat::Contiguous);
    add_product(tmp, a, c.narrow(1, i0, bi));
    diag.copy_(at::where(lower.narrow(0, 0, bi).narrow(1, 0, bi), tmp, diag));
  }
}

}  // namespace rankest

TORCH_LIBRARY(rankest, m) {
  m.def(
      "transform_rows(Tensor logits, Tensor targets, int n_cols, str space, bool write_rows, "
      "ScalarType out_dtype) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "gram_update(Tensor(a!) gram, Tensor chunk, str precision) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def("ngram_count(Tensor tokens, int order) -> (Tensor, Tensor)");
  m.def(
      "sparse_gram_update(Tensor(a!) gram, Tensor crow, Tensor col, Tensor val) -> ()",
      {at::Tag::pt2_compliant_tag});
}
