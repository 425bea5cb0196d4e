#include <ampkit/low_precision.h>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/instancenorm.h>
#include <torch/nn/modules/normalization.h>

#include <unordered_set>
#include <vector>

namespace ampkit {

bool keep_norm_layers_fp32(const std::string& /*name*/, const torch::nn::Module& module) {
  namespace nn = torch::nn;
  const auto* m = &module;
  return dynamic_cast<const nn::BatchNorm1dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::BatchNorm2dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::BatchNorm3dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::InstanceNorm1dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::InstanceNorm2dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::InstanceNorm3dImpl*>(m) != nullptr ||
         dynamic_cast<const nn::LayerNormImpl*>(m) != nullptr || dynamic_cast<const nn::GroupNormImpl*>(m) != nullptr ||
         dynamic_cast<const nn::LocalResponseNormImpl*>(m) != nullptr;
}

void cast_model(torch::nn::Module& model, c10::ScalarType dtype, const KeepFp32& keep_fp32) {
  TORCH_CHECK_VALUE(dtype == c10::kBFloat16 || dtype == c10::kHalf, "cast_model: expected dtype BFloat16 or Half, got ",
                    dtype);
  TORCH_CHECK_VALUE(static_cast<bool>(keep_fp32), "cast_model: expected keep_fp32 to be a callable, got an empty one");
  // Decide for every module first (keep_fp32 may throw), then cast: a throw changes nothing.
  std::unordered_set<const c10::TensorImpl*> kept;
  std::vector<at::Tensor> cast;
  for (const auto& item : model.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    const bool keep = keep_fp32(item.key(), *item.value());
    auto visit = [&](const at::Tensor& t) {
      if (!t.defined() || !t.is_floating_point()) return;
      if (keep) {
        kept.insert(t.unsafeGetTensorImpl());
      } else {
        cast.push_back(t);
      }
    };
    for (const auto& p : item.value()->parameters(/*recurse=*/false)) visit(p);
    for (const auto& b : item.value()->buffers(/*recurse=*/false)) visit(b);
  }
  std::unordered_set<const c10::TensorImpl*> done;
  at::NoGradGuard no_grad;
  for (auto& t : cast) {
    const auto* impl = t.unsafeGetTensorImpl();
    if (kept.count(impl) != 0 || !done.insert(impl).second) continue;
    t.set_data(t.to(dtype));
    if (t.grad().defined()) t.mutable_grad() = at::Tensor();
  }
}

}  // namespace ampkit
