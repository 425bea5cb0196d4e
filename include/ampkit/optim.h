#pragma once
/// \file optim.h
/// Fused, sync-free optimizers: Adam, AdamW and SGD whose every step is one ATen fused kernel
/// (`at::_fused_adam_`, `at::_fused_adamw_`, `at::_fused_sgd_`) per device and dtype, with the
/// loss scale and the inf flag of a GradScaler folded in. Under ampkit::GradScaler a step needs
/// no host synchronization: the kernel unscales the grads itself and does nothing on the device
/// when found_inf is set, and the step counters (float32 tensors, as in torch's fused path) are
/// rolled back on the device.
///
/// \code
///   ampkit::optim::AdamW opt(model->parameters(), ampkit::optim::AdamWOptions(1e-3).weight_decay(0.1));
///   ampkit::GradScaler scaler;
///   scaler.scale(loss).backward();
///   scaler.step(opt);   // calls opt.step_scaled(scale, found_inf): no sync
///   scaler.update();
/// \endcode
///
/// The results equal those of `torch.optim.Adam/AdamW/SGD(fused=True)` bitwise (the same kernels
/// with the same arguments), with one deliberate difference: SGD with momentum never reads an
/// uninitialized momentum buffer after a skipped first step (see SGD).

#include <ampkit/grad_scaler.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace ampkit::optim {

/// Options of Adam, with torch.optim.Adam's defaults. `AdamOptions(1e-3).betas({0.9, 0.95})`.
struct AdamOptions : public torch::optim::OptimizerCloneableOptions<AdamOptions> {
  AdamOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  using betas_t = std::tuple<double, double>;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;

 public:
  /// Throws c10::ValueError naming the option unless lr >= 0, eps >= 0, betas in [0, 1),
  /// weight_decay >= 0 (all finite).
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const AdamOptions& a, const AdamOptions& b);
};

/// Options of AdamW: Adam's, with torch.optim.AdamW's default weight_decay 1e-2 (decoupled).
struct AdamWOptions : public torch::optim::OptimizerCloneableOptions<AdamWOptions> {
  AdamWOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  using betas_t = std::tuple<double, double>;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;

 public:
  /// Same ranges as AdamOptions::validate().
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const AdamWOptions& a, const AdamWOptions& b);
};

/// Options of SGD, with torch.optim.SGD's defaults (lr 1e-3 as in torch >= 2.1).
struct SGDOptions : public torch::optim::OptimizerCloneableOptions<SGDOptions> {
  SGDOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, dampening) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  TORCH_ARG(bool, maximize) = false;

 public:
  /// Throws c10::ValueError unless lr, momentum, weight_decay >= 0, and nesterov comes with
  /// momentum > 0 and dampening 0 (torch's rules).
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const SGDOptions& a, const SGDOptions& b);
};

/// Per-parameter state of Adam and AdamW: torch's fused-path layout. `step` is a 0-dim float32
/// tensor on the parameter's device (the fused kernels read it there, so counting needs no host).
struct AdamParamState : public torch::optim::OptimizerCloneableParamState<AdamParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);
  TORCH_ARG(at::Tensor, max_exp_avg_sq);  ///< defined only with amsgrad

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Per-parameter state of SGD with momentum.
struct SGDParamState : public torch::optim::OptimizerCloneableParamState<SGDParamState> {
  TORCH_ARG(at::Tensor, momentum_buffer);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Base of the fused optimizers: the closure protocol of torch::optim and the
/// ScaleAwareOptimizer hook through which GradScaler::step passes the scale and the inf flag.
///
/// Param groups: a group given with options of this optimizer's type keeps them exactly as given
/// (torch::optim merges unset fields from the defaults only for its own option types); a group
/// without options takes the defaults. Group options are checked at construction and before every
/// step (an edited lr < 0 throws c10::ValueError, nothing changed).
class FusedOptimizer : public torch::optim::Optimizer, public ScaleAwareOptimizer {
 public:
  using torch::optim::Optimizer::Optimizer;

  /// Runs \p closure (with grad enabled) if given, then one unscaled step; returns the closure's loss.
  torch::Tensor step(LossClosure closure = nullptr) override;

  /// One step on grads still multiplied by \p grad_scale (undefined: already unscaled); nothing
  /// changes, step counters included, where \p found_inf (undefined: no check) is nonzero.
  /// Both are 1-element float32 tensors; they are copied to every parameter device. No host sync
  /// (except SGD's documented first step with dampening != 0).
  void step_scaled(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;

 protected:
  /// The update itself; arguments already validated.
  virtual void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) = 0;
  /// Throws c10::ValueError unless every group's options are of this optimizer's type and valid.
  virtual void check_groups() const = 0;
};

/// Adam (torch.optim.Adam(fused=True)): amsgrad, L2 weight decay, maximize.
class Adam : public FusedOptimizer {
 public:
  /// Throws c10::ValueError for no parameters, options out of range or of another optimizer.
  explicit Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults = {});
  explicit Adam(std::vector<at::Tensor> params, AdamOptions defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  /// Loads what save() wrote; checks group sizes and state shapes first (nothing changes on a
  /// throw) and moves the state to its parameter's device.
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;
  void check_groups() const override;
};

/// AdamW (torch.optim.AdamW(fused=True)): Adam with decoupled weight decay.
class AdamW : public FusedOptimizer {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamWOptions defaults = {});
  explicit AdamW(std::vector<at::Tensor> params, AdamWOptions defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;
  void check_groups() const override;
};

/// SGD (torch.optim.SGD(fused=True)): momentum, dampening, Nesterov, weight decay, maximize.
///
/// torch's fused SGD allocates the momentum buffers uninitialized (empty_like) and fills them on
/// the first step; if that step is skipped for inf/NaN, later steps read garbage. Here a momentum
/// buffer is created zeroed, which with dampening == 0 makes the ordinary update
/// `buf = momentum * 0 + 1 * grad` give exactly torch's first step `buf = grad`, so no special
/// first step and no sync is needed. With dampening != 0 the first step must be torch's
/// `buf = grad`, which differs from the ordinary update, so the first step of each parameter reads
/// found_inf on the host once (the only sync) and keeps the new buffer only if the step ran.
///
/// torch 2.13's CPU fused SGD kernel mis-reads fp16/bf16 momentum buffers after the first step, so
/// CPU fp16/bf16 parameters with momentum take a float32-opmath path of ATen ops (still sync-free).
class SGD : public FusedOptimizer {
 public:
  explicit SGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SGDOptions defaults);
  explicit SGD(std::vector<at::Tensor> params, SGDOptions defaults);

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;
  void check_groups() const override;
};

}  // namespace ampkit::optim
