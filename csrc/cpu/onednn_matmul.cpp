// See onednn_matmul.h.
#include "cpu/onednn_matmul.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastnlp {
namespace {

// The operator `name`, if this torch registers it with `num_arguments`
// arguments and a CPU kernel.
std::optional<c10::OperatorHandle> find_operator(const char* name, size_t num_arguments) {
  const std::optional<c10::OperatorHandle> op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!op.has_value() || op->schema().arguments().size() != num_arguments ||
      !op->hasKernelForDispatchKey(c10::DispatchKey::CPU))
    return std::nullopt;
  return op;
}

// mkldnn::_reorder_linear_weight(Tensor self, int? batch_size) -> Tensor
const std::optional<c10::OperatorHandle>& reorder_operator() {
  static const std::optional<c10::OperatorHandle> op = find_operator("mkldnn::_reorder_linear_weight", 2);
  return op;
}

// mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr,
//                           Scalar?[] scalars, str? algorithm) -> Tensor
const std::optional<c10::OperatorHandle>& linear_operator() {
  static const std::optional<c10::OperatorHandle> op = find_operator("mkldnn::_linear_pointwise", 6);
  return op;
}

// Called boxed, so that the C++ types of the arguments (which have changed
// between torch releases: c10::string_view, std::string_view) do not matter.
at::Tensor call(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// Whether this torch has the operators and oneDNN is on.
bool onednn_usable() {
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && reorder_operator().has_value() &&
         linear_operator().has_value();
}

// Whether oneDNN has bfloat16 products on this CPU, as torch decides it for
// its own bfloat16 operators (mkldnn::_is_mkldnn_bf16_supported: AVX-512 or
// newer). Asked once: the answer is the hardware's.
bool onednn_has_bfloat16() {
  static const bool has = [] {
    const std::optional<c10::OperatorHandle> op =
        c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op.has_value() || !op->schema().arguments().empty()) return false;
    std::vector<c10::IValue> stack;
    op->callBoxed(&stack);
    return stack.size() == 1 && stack[0].isBool() && stack[0].toBool();
  }();
  return has;
}

// Whether the oneDNN operators may take the CPU matrix m (float32, or
// bfloat16 where oneDNN has it).
bool onednn_applies(const at::Tensor& m) {
  return m.is_cpu() && m.dim() == 2 &&
         (m.scalar_type() == at::kFloat || (m.scalar_type() == at::kBFloat16 && onednn_has_bfloat16())) &&
         onednn_usable();
}

// The pages of t's storage, where the OS has transparent huge pages for
// regions that ask (Linux, "madvise" mode), as 2 MiB pages when first
// touched: one page fault (and one zeroing) per 2 MiB instead of per 4 KiB.
// Only the whole 2 MiB pages inside the storage are advised. A hint: where
// it is not taken, the pages are the usual ones.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel() * t.element_size());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (first < last) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

bool onednn_bfloat16_products() { return onednn_usable() && onednn_has_bfloat16(); }

at::Tensor onednn_prepare_right(const at::Tensor& b, int64_t rows) {
  if (!onednn_applies(b)) return at::Tensor();
  // The operators compute X W^T for a weight W (n, k), as nn.Linear does.
  return call(*reorder_operator(), {b.t().contiguous(), rows});
}

at::Tensor onednn_prepared_matmul(const at::Tensor& a, const at::Tensor& prepared) {
  return call(*linear_operator(),
              {a, prepared, c10::IValue(), "none", c10::List<std::optional<at::Scalar>>(), c10::IValue()});
}

at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias) {
  if (!onednn_applies(a) || weight.scalar_type() != a.scalar_type() || !onednn_applies(weight) ||
      a.numel() == 0 || weight.numel() == 0 || (bias.defined() && bias.scalar_type() != a.scalar_type()))
    return at::Tensor();
  const auto product = [&](const at::Tensor& rows) {
    return call(*linear_operator(), {rows, weight, bias.defined() ? c10::IValue(bias) : c10::IValue(), "none",
                                     c10::List<std::optional<at::Scalar>>(), c10::IValue()});
  };
  const int64_t rows = a.size(0), n = weight.size(0), row_bytes = n * a.element_size();
  if (rows * row_bytes < kHugeResultBytes) return product(a);
  at::Tensor result = at::empty({rows, n}, a.options());
  advise_huge_pages(result);
  const int64_t block = std::max<int64_t>(1, kResultBlockBytes / row_bytes);
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t count = std::min(block, rows - first);
    result.narrow(0, first, count).copy_(product(a.narrow(0, first, count)));
  }
  return result;
}

}  // namespace fastnlp
