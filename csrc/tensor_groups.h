#pragma once
// Internal: how the GradScaler, the optimizers and the trainer walk tensors, written once.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

namespace torch::optim {
class Optimizer;
}  // namespace torch::optim

namespace ampkit::detail {

// The parameters of every group of \p optimizer, in order.
std::vector<at::Tensor> params_of(const torch::optim::Optimizer& optimizer);

// Indices of \p tensors grouped by (device, dtype), groups and members in order of first
// appearance: torch's _group_tensors_by_device_and_dtype, whose order decides the last bits of
// anything summed across groups.
std::vector<std::vector<size_t>> group_by_device_and_dtype(at::ArrayRef<at::Tensor> tensors);

// \p tensors at \p indices.
std::vector<at::Tensor> pick(at::ArrayRef<at::Tensor> tensors, const std::vector<size_t>& indices);

// One copy of a tensor per device, made on first request (torch's _MultiDeviceReplicator); the
// copy on the tensor's own device is the tensor itself unless \p always_copy. \p prepare, if
// given, is applied to every copy.
class PerDeviceCopies {
 public:
  explicit PerDeviceCopies(at::Tensor master, bool always_copy = false,
                           std::function<at::Tensor(const at::Tensor&)> prepare = {})
      : master_(std::move(master)), always_copy_(always_copy), prepare_(std::move(prepare)) {}

  // Undefined if the master is.
  at::Tensor& get(const c10::Device& device);
  // The devices asked for so far, in order, with their copies.
  const std::vector<std::pair<c10::Device, at::Tensor>>& copies() const { return copies_; }

 private:
  at::Tensor master_;
  bool always_copy_;
  std::function<at::Tensor(const at::Tensor&)> prepare_;
  std::vector<std::pair<c10::Device, at::Tensor>> copies_;  // few devices: a linear search
};

}  // namespace ampkit::detail
