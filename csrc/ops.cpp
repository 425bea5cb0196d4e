// ampkit's numerical core as PyTorch operators: torch.ops.ampkit.{unscale_grads_, update_scale_,
// fused_adam_, fused_sgd_}. The Python GradScaler and optimizers call these, the C++ classes call
// the same detail:: functions directly, so both languages take one path. Each kernel only converts
// the operator's arguments (the schema has done the parsing) and calls one function.
//
// The implementations are CompositeExplicitAutograd: they call ATen operators (torch's fused
// kernels), which dispatch to the tensors' device, so one kernel serves CPU and CUDA. The ops
// mutate their inputs and return no differentiable outputs; called outside no_grad, torch's
// autograd fallback runs them below autograd and bumps the version counters of the (a!) inputs.
// Their fake kernels, for torch.compile, are in python/ampkit/_ops.py: registered in Python, they
// serve FakeTensor only, and real meta tensors still reach the kernels' device checks (a clear
// error, as torch's fused optimizers raise). The ops return nothing (torch's auto_functionalize
// cannot take a mutating op that returns a list), so unscale_grads_ writes into found_infs the
// caller made, one per device, as torch's _amp_foreach_non_finite_check_and_unscale_ does.
#include "grad_scaler_detail.h"
#include "optim_detail.h"

#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

namespace ampkit {
namespace {

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
at::TensorList list_or_empty(const std::optional<at::TensorList>& l) { return l.has_value() ? *l : at::TensorList(); }

void unscale_grads(at::TensorList grads, at::TensorList found_infs, const at::Tensor& inv_scale, bool allow_fp16) {
  detail::unscale_grad_list_(grads, found_infs, inv_scale, allow_fp16);
}

void update_scale(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& overflow_streak,
                  at::TensorList found_infs, double growth_factor, double backoff_factor, int64_t growth_interval,
                  double min_scale, double max_scale, int64_t hysteresis) {
  // The scale itself was checked when it was set; the update reads the other fields.
  at::Tensor s = scale, t = growth_tracker, o = overflow_streak;
  detail::update_scale_(
      s, t, o, found_infs,
      detail::options_of(min_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, hysteresis));
}

// `Lr` is double (float lr) or const at::Tensor& (the tensor_lr overload), as torch's _fused_adam_.
template <class Hyper, class Lr>
void set_lr(Hyper& h, Lr lr) {
  if constexpr (std::is_same_v<Lr, double>) {
    h.lr = lr;
  } else {
    h.lr_tensor = lr;
  }
}

optim::detail::LowPrecision low_precision(bool stochastic_rounding, int64_t seed, int64_t group_index) {
  return {stochastic_rounding, seed, group_index};
}

template <class Lr>
void fused_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, Lr lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::TensorList>& masters, bool stochastic_rounding, int64_t seed,
                int64_t group_index) {
  optim::detail::AdamHyper h;
  h.low_precision = low_precision(stochastic_rounding, seed, group_index);
  set_lr(h, lr);
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.weight_decay = weight_decay;
  h.eps = eps;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  h.decoupled_weight_decay = decoupled_weight_decay;
  optim::detail::fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, list_or_empty(masters),
                             h, or_undefined(grad_scale), or_undefined(found_inf));
}

template <class Lr>
void fused_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, Lr lr, double momentum,
               double dampening, double weight_decay, bool nesterov, bool maximize, bool is_first_step,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               const std::optional<at::TensorList>& masters, const std::optional<at::TensorList>& state_steps,
               bool stochastic_rounding, int64_t seed, int64_t group_index) {
  optim::detail::SGDHyper h;
  h.low_precision = low_precision(stochastic_rounding, seed, group_index);
  set_lr(h, lr);
  h.momentum = momentum;
  h.dampening = dampening;
  h.weight_decay = weight_decay;
  h.nesterov = nesterov;
  h.maximize = maximize;
  optim::detail::fused_sgd_(params, grads, momentum_buffers, list_or_empty(masters), list_or_empty(state_steps), h,
                            is_first_step, or_undefined(grad_scale), or_undefined(found_inf));
}

}  // namespace

TORCH_LIBRARY(ampkit, m) {
  m.def("unscale_grads_(Tensor(a!)[] grads, Tensor(b!)[] found_infs, Tensor inv_scale, bool allow_fp16) -> ()",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) overflow_streak, Tensor[] found_infs, *, "
      "float growth_factor, float backoff_factor, int growth_interval, float min_scale, float max_scale, "
      "int hysteresis) -> ()",
      {at::Tag::pt2_compliant_tag});
  const char* adam_tail =
      "float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(g!)[]? masters=None, "
      "bool stochastic_rounding=False, int seed=0, int group_index=0) -> ()";
  const char* adam_head =
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, ";
  m.def((std::string("fused_adam_") + adam_head + "float lr, " + adam_tail).c_str(), {at::Tag::pt2_compliant_tag});
  m.def((std::string("fused_adam_.tensor_lr") + adam_head + "Tensor lr, " + adam_tail).c_str(),
        {at::Tag::pt2_compliant_tag});
  const char* sgd_head = "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, ";
  const char* sgd_tail =
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool is_first_step, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(d!)[]? masters=None, Tensor(e!)[]? state_steps=None, "
      "bool stochastic_rounding=False, int seed=0, int group_index=0) -> ()";
  m.def((std::string("fused_sgd_") + sgd_head + "float lr, " + sgd_tail).c_str(), {at::Tag::pt2_compliant_tag});
  m.def((std::string("fused_sgd_.tensor_lr") + sgd_head + "Tensor lr, " + sgd_tail).c_str(),
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ampkit, CompositeExplicitAutograd, m) {
  m.impl("unscale_grads_", TORCH_FN(unscale_grads));
  m.impl("update_scale_", TORCH_FN(update_scale));
  m.impl("fused_adam_", TORCH_FN(fused_adam<double>));
  m.impl("fused_adam_.tensor_lr", TORCH_FN(fused_adam<const at::Tensor&>));
  m.impl("fused_sgd_", TORCH_FN(fused_sgd<double>));
  m.impl("fused_sgd_.tensor_lr", TORCH_FN(fused_sgd<const at::Tensor&>));
}

}  // namespace ampkit
