#include "tensor_groups.h"

#include <torch/optim/optimizer.h>

#include <algorithm>

namespace ampkit::detail {

std::vector<at::Tensor> params_of(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> params;
  for (const auto& group : optimizer.param_groups()) {
    params.insert(params.end(), group.params().begin(), group.params().end());
  }
  return params;
}

std::vector<std::vector<size_t>> group_by_device_and_dtype(at::ArrayRef<at::Tensor> tensors) {
  std::vector<std::pair<std::pair<c10::Device, c10::ScalarType>, std::vector<size_t>>> buckets;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto key = std::make_pair(tensors[i].device(), tensors[i].scalar_type());
    auto it = std::find_if(buckets.begin(), buckets.end(), [&](const auto& b) { return b.first == key; });
    if (it == buckets.end()) {
      buckets.push_back({key, {}});
      it = buckets.end() - 1;
    }
    it->second.push_back(i);
  }
  std::vector<std::vector<size_t>> out;
  out.reserve(buckets.size());
  for (auto& b : buckets) out.push_back(std::move(b.second));
  return out;
}

std::vector<at::Tensor> pick(at::ArrayRef<at::Tensor> tensors, const std::vector<size_t>& indices) {
  std::vector<at::Tensor> out;
  if (tensors.empty()) return out;
  out.reserve(indices.size());
  for (size_t i : indices) out.push_back(tensors[i]);
  return out;
}

at::Tensor& PerDeviceCopies::get(const c10::Device& device) {
  if (!master_.defined()) return master_;
  for (auto& kv : copies_) {
    if (kv.first == device) return kv.second;
  }
  at::Tensor copy = !always_copy_ && master_.device() == device
                        ? master_
                        : master_.to(device, /*non_blocking=*/true, /*copy=*/always_copy_);
  if (prepare_) copy = prepare_(copy);
  copies_.emplace_back(device, std::move(copy));
  return copies_.back().second;
}

}  // namespace ampkit::detail
