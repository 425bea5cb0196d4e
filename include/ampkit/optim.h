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
///
/// bf16/fp16 parameters (see cast_model in <ampkit/low_precision.h>) can step through float32
/// masters (`master_weights(true)`: the master step equals torch's fused step on the master with
/// the grad upcast) or be rounded stochastically (`stochastic_rounding(true)`, bf16 on the CPU, and
/// on CUDA where ampkit is built with its CUDA kernels); each is one pass over every tensor (CUDA: a
/// few multi-tensor launches, sync-free). The grads of such parameters are left scaled
/// (the step divides by the scale in float32), so fp16 grads are never unscaled in place.

#include <ampkit/grad_scaler.h>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace ampkit::optim {

/// Options of Adam and AdamW, written once: the two differ only in the kind of weight decay
/// (\p DecoupledWeightDecay) and its default, torch.optim.Adam's 0 or torch.optim.AdamW's 1e-2.
/// Used through the names AdamOptions and AdamWOptions: `AdamOptions(1e-3).betas({0.9, 0.95})`.
/// The two are distinct types (a group's options must be of its optimizer's), with the same
/// fields, checks and archive keys (lr, betas, eps, weight_decay, amsgrad, maximize).
template <bool DecoupledWeightDecay>
struct AdamFamilyOptions : public torch::optim::OptimizerCloneableOptions<AdamFamilyOptions<DecoupledWeightDecay>> {
  /// The optimizer's name, "Adam" or "AdamW", as error messages give it.
  static constexpr const char* kName = DecoupledWeightDecay ? "AdamW" : "Adam";
  /// Whether weight decay is decoupled from the gradient (AdamW) or added to it as L2 (Adam).
  static constexpr bool kDecoupledWeightDecay = DecoupledWeightDecay;

  AdamFamilyOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  using betas_t = std::tuple<double, double>;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = DecoupledWeightDecay ? 1e-2 : 0.0;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;
  /// Keep a float32 master copy of every bf16/fp16 parameter (and float32 states): each step reads
  /// the low-precision grad, updates the master and writes the parameter rounded to nearest.
  /// float32 parameters of the group step as usual. Default false.
  TORCH_ARG(bool, master_weights) = false;
  /// No master: the update of every bf16 parameter is computed in float32 and rounded
  /// stochastically into it (CPU; CUDA with ampkit's CUDA kernels), with states of state_dtype.
  /// Exclusive with master_weights.
  TORCH_ARG(bool, stochastic_rounding) = false;
  /// With stochastic_rounding: the dtype of the states, float32 (default) or bfloat16.
  TORCH_ARG(c10::ScalarType, state_dtype) = c10::kFloat;
  /// With stochastic_rounding: the seed of the random bits (with the step, the param group and
  /// the tensor's index they decide every rounding, so a run is reproducible and resumes bitwise).
  TORCH_ARG(int64_t, seed) = 0;

 public:
  /// Throws c10::ValueError naming the option unless lr >= 0, eps >= 0, betas in [0, 1),
  /// weight_decay >= 0 (all finite), and the low-precision options are consistent.
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const AdamFamilyOptions& a, const AdamFamilyOptions& b) {
    return a.lr() == b.lr() && a.betas() == b.betas() && a.eps() == b.eps() && a.weight_decay() == b.weight_decay() &&
           a.amsgrad() == b.amsgrad() && a.maximize() == b.maximize() && a.master_weights() == b.master_weights() &&
           a.stochastic_rounding() == b.stochastic_rounding() && a.state_dtype() == b.state_dtype() &&
           a.seed() == b.seed();
  }
};

/// Options of Adam, with torch.optim.Adam's defaults (weight_decay 0, added to the gradient).
using AdamOptions = AdamFamilyOptions<false>;
/// Options of AdamW: Adam's, with torch.optim.AdamW's default weight_decay 1e-2 (decoupled).
using AdamWOptions = AdamFamilyOptions<true>;
extern template struct AdamFamilyOptions<false>;
extern template struct AdamFamilyOptions<true>;

/// Options of SGD, with torch.optim.SGD's defaults (lr 1e-3 as in torch >= 2.1).
struct SGDOptions : public torch::optim::OptimizerCloneableOptions<SGDOptions> {
  /// The optimizer's name, as error messages give it.
  static constexpr const char* kName = "SGD";

  SGDOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, dampening) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  TORCH_ARG(bool, maximize) = false;
  /// Keep a float32 master copy of every bf16/fp16 parameter (and float32 states): each step reads
  /// the low-precision grad, updates the master and writes the parameter rounded to nearest.
  /// float32 parameters of the group step as usual. Default false.
  TORCH_ARG(bool, master_weights) = false;
  /// No master: the update of every bf16 parameter is computed in float32 and rounded
  /// stochastically into it (CPU; CUDA with ampkit's CUDA kernels), with states of state_dtype.
  /// Exclusive with master_weights.
  TORCH_ARG(bool, stochastic_rounding) = false;
  /// With stochastic_rounding: the dtype of the states, float32 (default) or bfloat16.
  TORCH_ARG(c10::ScalarType, state_dtype) = c10::kFloat;
  /// With stochastic_rounding: the seed of the random bits (with the step, the param group and
  /// the tensor's index they decide every rounding, so a run is reproducible and resumes bitwise).
  TORCH_ARG(int64_t, seed) = 0;

 public:
  // torch::optim::OptimizerOptions' interface, declared by each options type (as torch's own
  // AdamOptions and SGDOptions do) over its own fields; AdamFamilyOptions declares the same.
  /// Throws c10::ValueError unless lr, momentum, weight_decay >= 0, nesterov comes with
  /// momentum > 0 and dampening 0 (torch's rules), and the low-precision options are consistent.
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const SGDOptions& a, const SGDOptions& b);
};

/// Per-parameter state of Adam and AdamW: torch's fused-path layout. `step` is a 0-dim float32
/// tensor on the parameter's device (the fused kernels read it there, so counting needs no host).
/// The moments are float32 with master weights, state_dtype with stochastic rounding, and of the
/// parameter's dtype otherwise.
struct AdamParamState : public torch::optim::OptimizerCloneableParamState<AdamParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);
  TORCH_ARG(at::Tensor, max_exp_avg_sq);  ///< defined only with amsgrad
  TORCH_ARG(at::Tensor, master);          ///< the float32 master weights of a bf16/fp16 parameter

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Per-parameter state of SGD with momentum.
struct SGDParamState : public torch::optim::OptimizerCloneableParamState<SGDParamState> {
  TORCH_ARG(at::Tensor, momentum_buffer);
  TORCH_ARG(at::Tensor, master);  ///< the float32 master weights of a bf16/fp16 parameter
  TORCH_ARG(at::Tensor, step);    ///< with stochastic rounding: the steps taken (float32), which key the random bits

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
/// step (an edited lr < 0 throws c10::ValueError, nothing changed), and so is every parameter with a
/// grad and its grad (errors name the group and the index in it). The per-parameter state is the
/// optimizer's own (made at the first step, or checked by load()) and is not checked again.
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
  /// The update itself. step_scaled() has checked everything first (the scale tensors, every
  /// group's options, every parameter with a grad and its grad), so a bad argument changes nothing.
  virtual void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) = 0;
  /// Throws c10::ValueError unless every group's options are of this optimizer's type and valid.
  virtual void check_groups() const = 0;
  /// "Adam", "AdamW", "SGD": the name error messages start with.
  virtual const char* name() const = 0;
  /// Whether \p group (options already checked) rounds its bf16 parameters stochastically.
  virtual bool stochastic_rounding(const torch::optim::OptimizerParamGroup& group) const = 0;
};

/// Adam and AdamW, written once; \p Options (AdamOptions or AdamWOptions) decides the weight
/// decay. Use them through the classes Adam and AdamW.
template <class Options>
class AdamFamily : public FusedOptimizer {
 public:
  /// Throws c10::ValueError for no parameters, options out of range or of another optimizer.
  explicit AdamFamily(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, Options defaults = {});
  explicit AdamFamily(std::vector<at::Tensor> params, Options defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  /// Loads what save() wrote; checks group sizes and state shapes first (nothing changes on a
  /// throw) and moves the state to its parameter's device.
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  void fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;
  void check_groups() const override;
  const char* name() const override;
  bool stochastic_rounding(const torch::optim::OptimizerParamGroup& group) const override;
};
extern template class AdamFamily<AdamOptions>;
extern template class AdamFamily<AdamWOptions>;

/// Adam (torch.optim.Adam(fused=True)): amsgrad, L2 weight decay, maximize.
class Adam : public AdamFamily<AdamOptions> {
 public:
  using AdamFamily::AdamFamily;
};

/// AdamW (torch.optim.AdamW(fused=True)): Adam with decoupled weight decay.
class AdamW : public AdamFamily<AdamWOptions> {
 public:
  using AdamFamily::AdamFamily;
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
  const char* name() const override;
  bool stochastic_rounding(const torch::optim::OptimizerParamGroup& group) const override;
};

}  // namespace ampkit::optim
