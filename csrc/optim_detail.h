#pragma once
// Internal: the numerical core of optim.cpp that the Python bindings (csrc/python/) and the tests
// call directly. Not installed; C++ users use the classes of <ampkit/optim.h>.

#include <ampkit/optim.h>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ampkit::optim {

namespace detail {
/// The numerical core shared by the optimizer classes and the Python ampkit.optim optimizers
/// (through ampkit._C), so both take exactly the same path.

struct AdamHyper {
  double lr = 1e-3;
  at::Tensor lr_tensor;  ///< when defined, the lr (1 element), as torch's fused Adam accepts a tensor lr
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 0;
  double eps = 1e-8;
  bool amsgrad = false;
  bool maximize = false;
  bool decoupled_weight_decay = false;  ///< AdamW
};

/// torch's _fused_adam / _fused_adamw: groups the tensors by device and dtype, adds 1 to the
/// steps, runs the fused kernel with \p grad_scale / \p found_inf copied to each device, and
/// subtracts found_inf from the steps. \p max_exp_avg_sqs is empty unless amsgrad. Validates every
/// list (lengths, dense grads matching their params, float32 steps, supported devices) before
/// changing anything; throws c10::ValueError naming the list and index.
void fused_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& hyper,
                 const at::Tensor& grad_scale, const at::Tensor& found_inf);

struct SGDHyper {
  double lr = 1e-3;
  at::Tensor lr_tensor;  ///< when defined, the lr (1 element)
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
  bool maximize = false;
};

/// torch's _fused_sgd on existing buffers (\p momentum_buffers empty when momentum == 0).
/// \p is_first_step sets the buffers to the grads instead of updating them.
void fused_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const SGDHyper& hyper,
                bool is_first_step, const at::Tensor& grad_scale, const at::Tensor& found_inf);

/// The scalars of one fp16/bf16 SGD-with-momentum pass on the CPU (optim_lowp_kernels.cpp).
struct SgdLowpArgs {
  float lr, momentum, keep /* 1 - dampening */, weight_decay, grad_scale;
  bool unscale, maximize, nesterov, first_step;
};
/// One pass over elements [begin, end) of contiguous tensors, in float32 opmath.
void sgd_lowp_range_bf16(c10::BFloat16* param, c10::BFloat16* grad, c10::BFloat16* buf, int64_t begin, int64_t end,
                         const SgdLowpArgs& args);
void sgd_lowp_range_fp16(c10::Half* param, c10::Half* grad, c10::Half* buf, int64_t begin, int64_t end,
                         const SgdLowpArgs& args);

/// Throws c10::ValueError unless \p t is undefined or a 1-element float32 tensor.
void check_scale_tensor(const at::Tensor& t, const char* name);

/// Whether \p found_inf (undefined: no) is nonzero. Synchronizes.
bool found_inf_is_set(const at::Tensor& found_inf);
}  // namespace detail

}  // namespace ampkit::optim
