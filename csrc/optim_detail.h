#pragma once
// Internal: the numerical core of optim.cpp that the Python bindings (csrc/python/) and the tests
// call directly. Not installed; C++ users use the classes of <ampkit/optim.h>.

#include <ampkit/optim.h>

#include "optim_lowp_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>

namespace ampkit::optim {

namespace detail {
/// The numerical core shared by the optimizer classes and the Python ampkit.optim optimizers
/// (through ampkit._C), so both take exactly the same path.

/// How bf16/fp16 parameters step: with float32 masters (the lists' masters), or stochastically
/// rounded; the random bits depend on (seed, group_index, the tensor's index in the lists, step).
struct LowPrecision {
  bool stochastic_rounding = false;
  int64_t seed = 0;
  int64_t group_index = 0;
};

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
  LowPrecision low_precision;
};

/// torch's _fused_adam / _fused_adamw: groups the tensors by device and dtype, adds 1 to the
/// steps, runs the fused kernel with \p grad_scale / \p found_inf copied to each device, and
/// subtracts found_inf from the steps. \p max_exp_avg_sqs is empty unless amsgrad. \p masters is
/// empty, or holds one tensor per parameter: the float32 master of a bf16/fp16 one (whose states
/// are then float32 too; the grads stay scaled), the parameter itself for a float32 one. Validates
/// every list (lengths, dense grads matching their params, float32 steps, state dtypes, supported
/// devices) before changing anything; throws c10::ValueError naming the list and index.
void fused_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList masters, const AdamHyper& hyper,
                 const at::Tensor& grad_scale, const at::Tensor& found_inf);

struct SGDHyper {
  double lr = 1e-3;
  at::Tensor lr_tensor;  ///< when defined, the lr (1 element)
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
  bool maximize = false;
  LowPrecision low_precision;
};

/// torch's _fused_sgd on existing buffers (\p momentum_buffers empty when momentum == 0).
/// \p is_first_step sets the buffers to the grads instead of updating them. \p masters as in
/// fused_adam_; \p steps (float32 counters) is one per parameter with stochastic rounding, else empty.
void fused_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList masters,
                at::TensorList steps, const SGDHyper& hyper, bool is_first_step, const at::Tensor& grad_scale,
                const at::Tensor& found_inf);

/// One tensor's memory for a one-pass CPU kernel: contiguous, every pointer at element 0.
struct LowpTensors {
  void* param = nullptr;    ///< bf16 or fp16 (param_dtype)
  void* grad = nullptr;     ///< the parameter's dtype
  float* master = nullptr;  ///< float32 master weights; null: the parameter is the value updated
  /// SGD: the momentum buffer (null with momentum 0); Adam: exp_avg, exp_avg_sq, max_exp_avg_sq
  /// (null without amsgrad). All of state_dtype: the parameter's dtype, or fp32.
  std::array<void*, 3> state = {nullptr, nullptr, nullptr};
  LowpDtype param_dtype = LowpDtype::bf16;
  LowpDtype state_dtype = LowpDtype::fp32;
  bool stochastic = false;         ///< round the parameter stochastically (bf16 only)
  std::uint32_t rounding_key = 0;  ///< the random stream of this tensor and step (rounding_key())
};

/// The scalars of one SGD pass.
struct SgdLowpArgs {
  float lr, momentum, keep /* 1 - dampening */, weight_decay, grad_scale;
  bool unscale, maximize, nesterov, first_step;
  bool write_grad;  ///< write the unscaled grad back, as torch's fused kernels do
};
/// The scalars of one Adam/AdamW pass, as torch's fused kernel rounds them to float32.
struct AdamLowpArgs {
  float lerp_weight /* 1 - beta1 */, beta2, sq_coeff /* 1 - beta2 */, bc2_sqrt, eps, neg_step_size;
  float weight_decay, decay_keep /* 1 - lr * weight_decay */, grad_scale;
  bool decoupled, unscale, maximize;
  bool fma;  ///< fuse the multiply-adds that torch's kernel fuses where it runs with FMA
};
/// One pass over elements [begin, end) in float32 arithmetic; the copy for this CPU's instruction set.
void sgd_lowp_range(const LowpTensors& tensors, int64_t begin, int64_t end, const SgdLowpArgs& args);
void adam_lowp_range(const LowpTensors& tensors, int64_t begin, int64_t end, const AdamLowpArgs& args);

/// Throws c10::ValueError unless \p p can be rounded stochastically (bf16 on the CPU, or float32),
/// naming the optimizer and (group, index).
void check_rounded_param(const char* who, const at::Tensor& p, size_t group, size_t index);

/// Throws c10::ValueError unless \p t is undefined or a 1-element float32 tensor.
void check_scale_tensor(const at::Tensor& t, const char* name);

/// Tests: when enabled, CPU parameters with masters or stochastic rounding take the path of CUDA
/// parameters, with the CUDA kernels' block bodies run on the host (optim_lowp_cuda.h). Returns the
/// previous setting.
bool set_emulate_cuda_kernels(bool enabled);

/// Whether \p found_inf (undefined: no) is nonzero. Synchronizes.
bool found_inf_is_set(const at::Tensor& found_inf);
}  // namespace detail

}  // namespace ampkit::optim
