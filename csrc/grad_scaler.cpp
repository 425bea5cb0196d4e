#include <ampkit/grad_scaler.h>

#include <ampkit/distributed.h>

#include "diagnostics_hooks.h"
#include "grad_scaler_detail.h"
#include "tensor_groups.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace ampkit {
namespace {

// The scale and the trackers are float32 / int32 tensors (what the ATen kernels take), so every
// option that ends up in them must fit.
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// Sum of per-device found_inf tensors on \p device; nonzero iff any of them is.
at::Tensor combine_found_infs(at::ArrayRef<at::Tensor> found_infs, const c10::Device& device) {
  at::Tensor combined = found_infs[0].to(device, /*non_blocking=*/true);
  for (size_t i = 1; i < found_infs.size(); ++i) {
    combined = combined + found_infs[i].to(device, /*non_blocking=*/true);
  }
  return combined;
}

}  // namespace

using detail::params_of;
using detail::PerDeviceCopies;

void GradScalerOptions::validate() const { detail::validate_options(*this, /*check_init_scale=*/true); }

namespace detail {

// The scale lives in a float32 tensor: a value is usable if float32 holds it finite and > 0
// (1e-50 would round to 0, 1e39 to inf).
bool float32_positive(double v) {
  const float f = static_cast<float>(v);
  return std::isfinite(v) && std::isfinite(f) && f > 0.0f;
}

void validate_options(const GradScalerOptions& o, bool check_init_scale) {
  TORCH_CHECK_VALUE(std::isfinite(o.growth_factor()) && o.growth_factor() > 1.0,
                    "GradScaler: expected growth_factor to be finite and > 1, got ", o.growth_factor());
  TORCH_CHECK_VALUE(o.backoff_factor() > 0.0 && o.backoff_factor() < 1.0,
                    "GradScaler: expected backoff_factor in (0, 1), got ", o.backoff_factor());
  TORCH_CHECK_VALUE(o.growth_interval() > 0 && o.growth_interval() <= kMaxInt32,
                    "GradScaler: expected growth_interval in [1, 2**31 - 1], got ", o.growth_interval());
  TORCH_CHECK_VALUE(o.hysteresis() >= 1 && o.hysteresis() <= kMaxInt32,
                    "GradScaler: expected hysteresis in [1, 2**31 - 1], got ", o.hysteresis());
  TORCH_CHECK_VALUE(float32_positive(o.min_scale()),
                    "GradScaler: expected min_scale to be > 0 and finite in float32 (the scale's type: ",
                    std::numeric_limits<float>::denorm_min(), " to ", std::numeric_limits<float>::max(), "), got ",
                    o.min_scale());
  TORCH_CHECK_VALUE(!std::isnan(o.max_scale()) && o.max_scale() >= o.min_scale() &&
                        (std::isinf(o.max_scale()) || float32_positive(o.max_scale())),
                    "GradScaler: expected max_scale >= min_scale (", o.min_scale(),
                    ") and finite in float32 (<= ", std::numeric_limits<float>::max(), ") or inf, got ", o.max_scale());
  if (check_init_scale) {
    TORCH_CHECK_VALUE(float32_positive(o.init_scale()),
                      "GradScaler: expected init_scale to be > 0 and finite in float32 (<= ",
                      std::numeric_limits<float>::max(), "), got ", o.init_scale());
    TORCH_CHECK_VALUE(o.init_scale() >= o.min_scale() && o.init_scale() <= o.max_scale(),
                      "GradScaler: expected init_scale in [min_scale, max_scale] = [", o.min_scale(), ", ",
                      o.max_scale(), "], got ", o.init_scale());
  }
}

void check_new_scale(double new_scale, const GradScalerOptions& o) {
  TORCH_CHECK_VALUE(float32_positive(new_scale) && new_scale >= o.min_scale() && new_scale <= o.max_scale(),
                    "GradScaler.update: expected new_scale to be finite and in [min_scale, max_scale] = [",
                    o.min_scale(), ", ", o.max_scale(), "], got ", new_scale);
}

namespace {
void check_inv_scale(const at::Tensor& inv_scale) {
  TORCH_CHECK_VALUE(inv_scale.defined() && inv_scale.numel() == 1 && inv_scale.scalar_type() == at::kFloat,
                    "unscale_grads_: expected inv_scale to be a 1-element float32 tensor, got ",
                    inv_scale.defined() ? inv_scale.toString() : std::string("an undefined tensor"));
}
}  // namespace

at::Tensor reciprocal_scale(const at::Tensor& scale) {
  // float32 division can be inexact under some compile options; torch takes the reciprocal in
  // float64, and matching it keeps unscaled grads bitwise equal to torch's.
  return scale.to(at::kDouble).reciprocal().to(at::kFloat);
}

std::vector<at::Tensor> unscale_grads_(at::ArrayRef<at::Tensor> params, const at::Tensor& inv_scale, bool allow_fp16) {
  // Checked before any grad is touched, so that a throw changes nothing; the grads themselves are
  // checked by unscale_grad_list_, which refuses fp16 ones before anything changes unless allow_fp16.
  check_inv_scale(inv_scale);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].defined(),
                      "unscale_grads_: expected defined parameters, got an undefined one at index ", i);
  }
  std::vector<at::Tensor> grads;
  for (const at::Tensor& param : params) {
    if (!param.grad().defined()) continue;
    // An uncoalesced sparse grad may hold several values for one index that only overflow once
    // summed; fp16 sums overflow easily, so coalesce (replacing the grad) and check the sum. Only
    // with allow_fp16: otherwise the fp16 grad is refused below, and must be left as it was.
    if (allow_fp16 && param.grad().is_sparse() && param.grad().scalar_type() == at::kHalf) {
      at::NoGradGuard no_grad;
      param.mutable_grad() = param.grad().coalesce();
    }
    grads.push_back(param.grad());
  }
  // One found_inf per device, copied from a zero on inv_scale's device, as torch's
  // _MultiDeviceReplicator makes them.
  PerDeviceCopies found_infs(at::zeros({}, inv_scale.options()), /*always_copy=*/true);
  for (const auto& grad : grads) found_infs.get(grad.device());
  std::vector<at::Tensor> out;
  for (const auto& kv : found_infs.copies()) out.push_back(kv.second);
  unscale_grad_list_(grads, out, inv_scale, allow_fp16);
  return out;
}

void unscale_grad_list_(at::TensorList grads, at::TensorList found_infs, const at::Tensor& inv_scale, bool allow_fp16) {
  check_inv_scale(inv_scale);
  for (size_t i = 0; i < found_infs.size(); ++i) {
    const at::Tensor& f = found_infs[i];
    TORCH_CHECK_VALUE(f.defined() && f.numel() == 1 && f.scalar_type() == at::kFloat,
                      "unscale_grads_: expected found_infs[", i, "] to be a 1-element float32 tensor, got ",
                      f.defined() ? f.toString() : std::string("an undefined tensor"));
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(found_infs[j].device() != f.device(), "unscale_grads_: expected one found_inf per device, got ",
                        f.device(), " at indices ", j, " and ", i);
    }
  }
  const auto found_inf_on = [&](const c10::Device& device) -> const at::Tensor* {
    for (const auto& f : found_infs) {
      if (f.device() == device) return &f;
    }
    return nullptr;
  };
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].defined(), "unscale_grads_: expected defined grads, got an undefined one at index ", i);
    TORCH_CHECK_VALUE(allow_fp16 || grads[i].scalar_type() != at::kHalf, "Attempting to unscale FP16 gradients.");
    TORCH_CHECK_VALUE(found_inf_on(grads[i].device()) != nullptr, "unscale_grads_: expected a found_inf on ",
                      grads[i].device(), " (the device of grads[", i, "]), got none");
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> to_unscale;
  to_unscale.reserve(grads.size());
  for (const at::Tensor& grad : grads) to_unscale.push_back(grad.is_sparse() ? grad._values() : grad);
  // One inv_scale per device, copied from the master, as torch's _MultiDeviceReplicator does.
  PerDeviceCopies inv_scales(inv_scale);
  for (const auto& group : group_by_device_and_dtype(to_unscale)) {
    const c10::Device device = to_unscale[group.front()].device();
    at::Tensor found_inf = *found_inf_on(device);  // a handle: the kernel writes into the caller's tensor
    at::_amp_foreach_non_finite_check_and_unscale_(pick(to_unscale, group), found_inf, inv_scales.get(device));
  }
}

GradScalerOptions options_from_state(const GradScalerState& state, const GradScalerOptions& current) {
  GradScalerOptions o = current;
  o.growth_factor(state.growth_factor).backoff_factor(state.backoff_factor).growth_interval(state.growth_interval);
  if (state.min_scale) o.min_scale(*state.min_scale);
  if (state.max_scale) o.max_scale(*state.max_scale);
  if (state.hysteresis) o.hysteresis(*state.hysteresis);
  validate_options(o, /*check_init_scale=*/false);
  // A scale below min_scale (torch lets it go denormal) loads as is; the next update() clamps it.
  TORCH_CHECK_VALUE(float32_positive(state.scale),
                    "GradScaler.load_state_dict: expected 'scale' to be > 0 and finite in float32, got ", state.scale);
  TORCH_CHECK_VALUE(state.growth_tracker >= 0 && state.growth_tracker <= kMaxInt32,
                    "GradScaler.load_state_dict: expected '_growth_tracker' in [0, 2**31 - 1], got ",
                    state.growth_tracker);
  const int64_t streak = state.overflow_streak.value_or(0);
  TORCH_CHECK_VALUE(streak >= 0 && streak <= o.hysteresis(),
                    "GradScaler.load_state_dict: expected '_overflow_streak' in [0, hysteresis = ", o.hysteresis(),
                    "], got ", streak);
  o.init_scale(state.scale);
  return o;
}

void update_scale_(at::Tensor& scale, at::Tensor& growth_tracker, at::Tensor& overflow_streak,
                   at::ArrayRef<at::Tensor> found_infs, const GradScalerOptions& options) {
  TORCH_CHECK(!found_infs.empty(), "No inf checks were recorded prior to update().");
  const at::Tensor found_inf = combine_found_infs(found_infs, scale.device());
  if (options.hysteresis() == 1) {
    at::_amp_update_scale_(scale, growth_tracker, found_inf, options.growth_factor(), options.backoff_factor(),
                           options.growth_interval());
  } else {
    // torch's kernel backs off on every overflow; keep its growth logic and tracker reset, and
    // undo the backoff on device while the streak of overflowing updates is shorter than
    // hysteresis. No host sync: everything is a tensor op.
    const at::Tensor previous = scale.clone();
    at::_amp_update_scale_(scale, growth_tracker, found_inf, options.growth_factor(), options.backoff_factor(),
                           options.growth_interval());
    const at::Tensor overflowed = found_inf.ne(0);
    // Capped at hysteresis: the streak only needs to reach it, and stays bounded in int32.
    overflow_streak.copy_(
        at::where(overflowed, (overflow_streak + 1).clamp_max(options.hysteresis()), at::zeros_like(overflow_streak)));
    scale.copy_(at::where(overflowed.logical_and(overflow_streak.lt(options.hysteresis())), previous, scale));
  }
  // Bounds last, so that the default min_scale only differs from torch where torch would go
  // denormal. A growth that overflows to inf was already refused by _amp_update_scale_.
  if (std::isinf(options.max_scale())) {
    scale.clamp_min_(options.min_scale());
  } else {
    scale.clamp_(options.min_scale(), options.max_scale());
  }
}

}  // namespace detail

GradScaler::GradScaler(GradScalerOptions options) : options_(std::move(options)) { options_.validate(); }

void GradScaler::check_initialized(const char* call) const {
  TORCH_CHECK(scale_.defined(), "Attempted ", call,
              "() but the scale is not initialized yet. This may indicate your script did not use "
              "scaler.scale(loss or outputs) earlier in the iteration.");
}

void GradScaler::lazy_init(const c10::Device& device) {
  const auto float_opts = at::TensorOptions().dtype(at::kFloat).device(device);
  const auto int_opts = at::TensorOptions().dtype(at::kInt).device(device);
  // Build all three before assigning any, so that a failure leaves the scaler uninitialized.
  at::Tensor scale = at::full({}, options_.init_scale(), float_opts);
  at::Tensor tracker = at::full({}, init_growth_tracker_, int_opts);
  at::Tensor streak = at::full({}, init_overflow_streak_, int_opts);
  scale_ = std::move(scale);
  growth_tracker_ = std::move(tracker);
  overflow_streak_ = std::move(streak);
}

at::Tensor GradScaler::scale(const at::Tensor& outputs) {
  if (!is_enabled()) return outputs;
  TORCH_CHECK_VALUE(outputs.defined(), "GradScaler.scale: expected a defined tensor, got an undefined one");
  if (!scale_.defined()) lazy_init(outputs.device());
  detail::note_loss_scale(scale_);
  return outputs * scale_.to(outputs.device(), /*non_blocking=*/true);
}

std::vector<at::Tensor> GradScaler::scale(at::ArrayRef<at::Tensor> outputs) {
  if (!is_enabled()) return outputs.vec();
  for (size_t i = 0; i < outputs.size(); ++i) {
    TORCH_CHECK_VALUE(outputs[i].defined(),
                      "GradScaler.scale: expected defined tensors, got an undefined one at index ", i);
  }
  std::vector<at::Tensor> scaled;
  if (outputs.empty()) return scaled;
  if (!scale_.defined()) lazy_init(outputs[0].device());
  detail::note_loss_scale(scale_);
  PerDeviceCopies scales(scale_);
  scaled.reserve(outputs.size());
  for (const auto& t : outputs) scaled.push_back(t * scales.get(t.device()));
  return scaled;
}

std::vector<at::Tensor> GradScaler::unscale_grads_of(const torch::optim::Optimizer& optimizer,
                                                     const at::Tensor& inv_scale, bool allow_fp16) const {
  std::vector<at::Tensor> found_infs = detail::unscale_grads_(params_of(optimizer), inv_scale, allow_fp16);
  if (process_group_) dist::all_reduce_found_infs(process_group(), found_infs);
  return found_infs;
}

void GradScaler::set_process_group(const c10::intrusive_ptr<c10d::ProcessGroup>& group) { process_group_ = group; }

c10::intrusive_ptr<c10d::ProcessGroup> GradScaler::process_group() const {
  return c10::static_intrusive_pointer_cast<c10d::ProcessGroup>(process_group_);
}

void GradScaler::set_stage(const torch::optim::Optimizer& optimizer, OptimizerStage stage,
                           std::vector<at::Tensor> found_infs) {
  auto& state = per_optimizer_[&optimizer];
  state.stage = stage;
  state.found_inf_per_device = std::move(found_infs);
}

void GradScaler::unscale_(torch::optim::Optimizer& optimizer) {
  if (!is_enabled()) return;
  check_initialized("unscale_");
  const OptimizerStage stage = this->stage(optimizer);
  TORCH_CHECK(stage != OptimizerStage::Unscaled,
              "unscale_() has already been called on this optimizer since the last update().");
  TORCH_CHECK(stage != OptimizerStage::Stepped, "unscale_() is being called after step().");
  set_stage(optimizer, OptimizerStage::Unscaled,
            unscale_grads_of(optimizer, detail::reciprocal_scale(scale_), /*allow_fp16=*/false));
}

bool GradScaler::step(torch::optim::Optimizer& optimizer) {
  if (!is_enabled()) {
    optimizer.step();
    ++steps_;
    return true;
  }
  check_initialized("step");
  const OptimizerStage stage = this->stage(optimizer);
  TORCH_CHECK(stage != OptimizerStage::Stepped, "step() has already been called since the last update().");
  if (auto* aware = dynamic_cast<ScaleAwareOptimizer*>(&optimizer)) return step_sync_free(optimizer, *aware, stage);
  return step_with_sync(optimizer, stage);
}

bool GradScaler::step_sync_free(torch::optim::Optimizer& optimizer, ScaleAwareOptimizer& aware, OptimizerStage stage) {
  // The optimizer unscales and skips on the device; only check the grads (inv_scale 1) if
  // unscale_() has not done it, as torch's _check_inf_per_device.
  std::vector<at::Tensor> found_infs =
      stage == OptimizerStage::Ready ? unscale_grads_of(optimizer, at::ones({}, scale_.options()), /*allow_fp16=*/true)
                                     : found_inf_per_device(optimizer);
  // Without grads torch passes found_inf 0 and steps (the optimizer has nothing to do); the
  // update() that follows then finds no inf checks, as in torch.
  const at::Tensor found_inf =
      found_infs.empty() ? at::zeros({}, scale_.options()) : combine_found_infs(found_infs, scale_.device());
  const at::Tensor grad_scale = stage == OptimizerStage::Unscaled ? at::Tensor() : scale_;
  // Stage and found_infs change only once the step succeeded: a retry after a throw sees the
  // same stage (checking grads twice with inv_scale 1 is harmless).
  aware.step_scaled(grad_scale, found_inf);
  set_stage(optimizer, OptimizerStage::Stepped, std::move(found_infs));
  record_step(found_inf, std::nullopt);
  return true;
}

bool GradScaler::step_with_sync(torch::optim::Optimizer& optimizer, OptimizerStage stage) {
  const char* no_grads =
      "step(): no inf checks were recorded for this optimizer: none of its parameters has a "
      "gradient. Call backward() on the scaled loss before step().";
  if (stage == OptimizerStage::Ready) {
    auto found_infs = unscale_grads_of(optimizer, detail::reciprocal_scale(scale_), /*allow_fp16=*/false);
    TORCH_CHECK(!found_infs.empty(), no_grads);  // before set_stage: a throw leaves the optimizer Ready
    set_stage(optimizer, OptimizerStage::Unscaled, std::move(found_infs));
  }
  PerOptimizerState& state = per_optimizer_.at(&optimizer);
  TORCH_CHECK(!state.found_inf_per_device.empty(), no_grads);
  const at::Tensor found_inf = combine_found_infs(state.found_inf_per_device, scale_.device());
  // The one host sync of a step, as torch's _maybe_opt_step.
  const bool skipped = found_inf.item<float>() != 0.0f;
  if (!skipped) optimizer.step();
  state.stage = OptimizerStage::Stepped;
  record_step(found_inf, skipped);
  return !skipped;
}

void GradScaler::record_step(const at::Tensor& found_inf, std::optional<bool> skipped) {
  ++steps_;
  last_step_skipped_ = found_inf.ne(0);
  if (skipped.has_value()) {
    host_skipped_ += *skipped ? 1 : 0;
  } else {
    const at::Tensor count = last_step_skipped_.to(at::kLong);
    device_skipped_ = device_skipped_.defined() ? device_skipped_ + count : count;
  }
}

void GradScaler::update() {
  if (!is_enabled()) return;
  check_initialized("update");
  std::vector<at::Tensor> found_infs;
  for (const auto& kv : per_optimizer_) {
    found_infs.insert(found_infs.end(), kv.second.found_inf_per_device.begin(), kv.second.found_inf_per_device.end());
  }
  TORCH_CHECK(!found_infs.empty(),
              "No inf checks were recorded prior to update(). Call step(optimizer) (or "
              "unscale_(optimizer)) for at least one optimizer first.");
  detail::update_scale_(scale_, growth_tracker_, overflow_streak_, found_infs, options_);
  per_optimizer_.clear();
}

void GradScaler::update(double new_scale) {
  if (!is_enabled()) return;
  check_initialized("update");
  detail::check_new_scale(new_scale, options_);
  scale_.fill_(new_scale);
  per_optimizer_.clear();
}

void GradScaler::update(const at::Tensor& new_scale) {
  if (!is_enabled()) return;
  check_initialized("update");
  TORCH_CHECK_VALUE(new_scale.defined() && new_scale.numel() == 1 && !new_scale.requires_grad() &&
                        new_scale.is_floating_point() && new_scale.device().type() == scale_.device().type(),
                    "GradScaler.update: expected new_scale to be a float or a 1-element floating tensor on ",
                    scale_.device().type(), " with requires_grad=False, got ",
                    new_scale.defined()
                        ? new_scale.toString() + " of " + std::to_string(new_scale.numel()) + " elements on " +
                              new_scale.device().str() + (new_scale.requires_grad() ? " requiring grad" : "")
                        : std::string("an undefined tensor"));
  // One host read to check the value: a NaN, inf or negative scale would make every later step
  // skip (torch copies it unchecked).
  const double value = new_scale.item<double>();
  detail::check_new_scale(value, options_);
  scale_.copy_(new_scale.reshape({}));
  per_optimizer_.clear();
}

double GradScaler::get_scale() const {
  if (!is_enabled()) return 1.0;
  return scale_.defined() ? static_cast<double>(scale_.item<float>()) : options_.init_scale();
}

int64_t GradScaler::get_growth_tracker() const {
  if (!is_enabled()) return 0;
  return growth_tracker_.defined() ? growth_tracker_.item<int32_t>() : init_growth_tracker_;
}

int64_t GradScaler::get_overflow_streak() const {
  if (!is_enabled()) return 0;
  return overflow_streak_.defined() ? overflow_streak_.item<int32_t>() : init_overflow_streak_;
}

std::vector<at::Tensor> GradScaler::found_inf_per_device(const torch::optim::Optimizer& optimizer) const {
  const auto it = per_optimizer_.find(&optimizer);
  return it == per_optimizer_.end() ? std::vector<at::Tensor>{} : it->second.found_inf_per_device;
}

OptimizerStage GradScaler::stage(const torch::optim::Optimizer& optimizer) const {
  const auto it = per_optimizer_.find(&optimizer);
  return it == per_optimizer_.end() ? OptimizerStage::Ready : it->second.stage;
}

int64_t GradScaler::steps_skipped() const {
  return host_skipped_ + (device_skipped_.defined() ? device_skipped_.item<int64_t>() : 0);
}

int64_t GradScaler::steps_applied() const { return steps_ - steps_skipped(); }

void GradScaler::commit_options(const GradScalerOptions& candidate) {
  detail::validate_options(candidate, /*check_init_scale=*/false);
  options_ = candidate;
}

void GradScaler::set_growth_factor(double v) { commit_options(GradScalerOptions(options_).growth_factor(v)); }
void GradScaler::set_backoff_factor(double v) { commit_options(GradScalerOptions(options_).backoff_factor(v)); }
void GradScaler::set_growth_interval(int64_t v) { commit_options(GradScalerOptions(options_).growth_interval(v)); }
void GradScaler::set_min_scale(double v) { commit_options(GradScalerOptions(options_).min_scale(v)); }
void GradScaler::set_max_scale(double v) { commit_options(GradScalerOptions(options_).max_scale(v)); }

void GradScaler::set_hysteresis(int64_t v) {
  commit_options(GradScalerOptions(options_).hysteresis(v));
  // A streak counted under the old hysteresis would cap or trigger wrongly under the new one.
  init_overflow_streak_ = 0;
  if (overflow_streak_.defined()) overflow_streak_.zero_();
}

std::optional<GradScalerState> GradScaler::state_dict() const {
  if (!is_enabled()) return std::nullopt;
  GradScalerState state;
  state.scale = get_scale();
  state.growth_factor = options_.growth_factor();
  state.backoff_factor = options_.backoff_factor();
  state.growth_interval = options_.growth_interval();
  state.growth_tracker = get_growth_tracker();
  state.min_scale = options_.min_scale();
  state.max_scale = options_.max_scale();
  state.hysteresis = options_.hysteresis();
  state.overflow_streak = get_overflow_streak();
  return state;
}

void GradScaler::load_state_dict(const std::optional<GradScalerState>& state) {
  if (!is_enabled()) return;
  TORCH_CHECK(state.has_value(),
              "The source state dict is empty, possibly because it was saved from a disabled "
              "instance of GradScaler.");
  // Validates everything first: a bad state must leave the scaler as it was.
  const GradScalerOptions o = detail::options_from_state(*state, options_);
  const int64_t streak = state->overflow_streak.value_or(0);
  options_ = o;
  init_growth_tracker_ = state->growth_tracker;
  init_overflow_streak_ = streak;
  if (scale_.defined()) {
    scale_.fill_(state->scale);
    growth_tracker_.fill_(state->growth_tracker);
    overflow_streak_.fill_(streak);
  }
}

namespace {
// Archive keys: torch's state-dict keys, and ampkit's.
constexpr const char* kScaleKey = "scale";
constexpr const char* kGrowthFactorKey = "growth_factor";
constexpr const char* kBackoffFactorKey = "backoff_factor";
constexpr const char* kGrowthIntervalKey = "growth_interval";
constexpr const char* kGrowthTrackerKey = "_growth_tracker";
constexpr const char* kMinScaleKey = "min_scale";
constexpr const char* kMaxScaleKey = "max_scale";
constexpr const char* kHysteresisKey = "hysteresis";
constexpr const char* kOverflowStreakKey = "_overflow_streak";

template <class T>
std::optional<T> read_optional(torch::serialize::InputArchive& archive, const char* key) {
  c10::IValue v;
  if (!archive.try_read(key, v)) return std::nullopt;
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK_VALUE(v.isDouble() || v.isInt(), "GradScaler.load: expected '", key, "' to be a float, got ",
                      v.tagKind());
    return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
  } else {
    TORCH_CHECK_VALUE(v.isInt(), "GradScaler.load: expected '", key, "' to be an int, got ", v.tagKind());
    return v.toInt();
  }
}
}  // namespace

void GradScaler::save(torch::serialize::OutputArchive& archive) const {
  const auto state = state_dict();
  if (!state) return;  // a disabled scaler saves nothing, as its state dict is empty
  archive.write(kScaleKey, state->scale);
  archive.write(kGrowthFactorKey, state->growth_factor);
  archive.write(kBackoffFactorKey, state->backoff_factor);
  archive.write(kGrowthIntervalKey, state->growth_interval);
  archive.write(kGrowthTrackerKey, state->growth_tracker);
  archive.write(kMinScaleKey, *state->min_scale);
  archive.write(kMaxScaleKey, *state->max_scale);
  archive.write(kHysteresisKey, *state->hysteresis);
  archive.write(kOverflowStreakKey, *state->overflow_streak);
}

void GradScaler::load(torch::serialize::InputArchive& archive) {
  if (!is_enabled()) return;
  const auto scale = read_optional<double>(archive, kScaleKey);
  if (!scale) {
    load_state_dict(std::nullopt);  // throws: the archive came from a disabled scaler
    return;
  }
  GradScalerState state;
  state.scale = *scale;
  const auto required_double = [&](const char* key) {
    const auto v = read_optional<double>(archive, key);
    TORCH_CHECK_VALUE(v.has_value(), "GradScaler.load: expected key '", key, "' in the archive");
    return *v;
  };
  const auto required_int = [&](const char* key) {
    const auto v = read_optional<int64_t>(archive, key);
    TORCH_CHECK_VALUE(v.has_value(), "GradScaler.load: expected key '", key, "' in the archive");
    return *v;
  };
  state.growth_factor = required_double(kGrowthFactorKey);
  state.backoff_factor = required_double(kBackoffFactorKey);
  state.growth_interval = required_int(kGrowthIntervalKey);
  state.growth_tracker = required_int(kGrowthTrackerKey);
  state.min_scale = read_optional<double>(archive, kMinScaleKey);
  state.max_scale = read_optional<double>(archive, kMaxScaleKey);
  state.hysteresis = read_optional<int64_t>(archive, kHysteresisKey);
  state.overflow_streak = read_optional<int64_t>(archive, kOverflowStreakKey);
  load_state_dict(state);
}

// The stream operators of torch::save / torch::load, one pair per type as torch declares them for
// its modules and optimizers (a template over "anything with save()" would catch unrelated types).
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive, const GradScaler& scaler) {
  scaler.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, GradScaler& scaler) {
  scaler.load(archive);
  return archive;
}

}  // namespace ampkit
