#pragma once
/// \file grad_scaler.h
/// GradScaler: dynamic loss scaling with the semantics of PyTorch's `torch.amp.GradScaler`
/// (scale / unscale_ / step / update, the same scale arithmetic, the same state dict), for
/// any `torch::optim::Optimizer`, plus bounds on the scale, hysteresis, skip counters and a
/// sync-free path for optimizers that take the scale and the inf flag themselves.
///
/// A training step:
/// \code
///   ampkit::GradScaler scaler(ampkit::GradScalerOptions().init_scale(1024));
///   optimizer.zero_grad();
///   scaler.scale(loss).backward();
///   scaler.unscale_(optimizer);            // optional: clip or inspect grads here
///   bool applied = scaler.step(optimizer); // skips the update when a grad is inf/NaN
///   scaler.update();                       // grows or backs off the scale on the device
/// \endcode

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace c10d {
class ProcessGroup;
}  // namespace c10d
namespace torch::optim {
class Optimizer;
}  // namespace torch::optim
namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace ampkit {

/// The default min_scale of a GradScaler: FLT_MIN, the smallest positive normal float32 (the
/// scale's type), 1.1754943508222875e-38. Python's ampkit.GradScaler uses the same value,
/// torch.finfo(torch.float32).tiny.
inline constexpr double kDefaultMinScale = std::numeric_limits<float>::min();

/// Options of a GradScaler, with `torch.amp.GradScaler`'s defaults. Chained setters:
/// `GradScalerOptions().init_scale(1024).growth_interval(100)`. Validated by GradScaler
/// (or by validate()), which throws c10::ValueError naming the offending option.
///
/// The setters repeat one shape on purpose: each is written out to carry its own documented range
/// (TORCH_ARG would also add mutable getters that skip validation, and needs torch/arg.h here).
struct GradScalerOptions {
  /// Scale before the first update() (torch: 2**16). Finite, > 0, within [min_scale, max_scale].
  GradScalerOptions& init_scale(double v) {
    init_scale_ = v;
    return *this;
  }
  /// Factor applied after growth_interval consecutive steps without inf/NaN (> 1).
  GradScalerOptions& growth_factor(double v) {
    growth_factor_ = v;
    return *this;
  }
  /// Factor applied after a step with inf/NaN grads (in (0, 1)).
  GradScalerOptions& backoff_factor(double v) {
    backoff_factor_ = v;
    return *this;
  }
  /// Consecutive finite steps before the scale grows (> 0).
  GradScalerOptions& growth_interval(int64_t v) {
    growth_interval_ = v;
    return *this;
  }
  /// false: scale() returns its input, step() just calls optimizer.step(), the rest is a no-op.
  GradScalerOptions& enabled(bool v) {
    enabled_ = v;
    return *this;
  }
  /// Lower bound of the scale (> 0 and finite in float32, the scale's type). The default, the smallest positive normal
  /// float, keeps a long run of overflows from driving the scale into denormals and then to 0 (pytorch#99640).
  GradScalerOptions& min_scale(double v) {
    min_scale_ = v;
    return *this;
  }
  /// Upper bound of the scale (>= min_scale, may be +inf). With the default +inf the only bound is
  /// torch's: a growth whose result would not be finite is not applied.
  GradScalerOptions& max_scale(double v) {
    max_scale_ = v;
    return *this;
  }
  /// Back off only after this many consecutive steps with inf/NaN (>= 1). 1 is torch's
  /// behaviour; larger values tolerate isolated overflows, as DeepSpeed's loss scaler does
  /// (its consecutive_hysteresis mode). A step with inf/NaN is skipped either way.
  GradScalerOptions& hysteresis(int64_t v) {
    hysteresis_ = v;
    return *this;
  }

  double init_scale() const { return init_scale_; }
  double growth_factor() const { return growth_factor_; }
  double backoff_factor() const { return backoff_factor_; }
  int64_t growth_interval() const { return growth_interval_; }
  bool enabled() const { return enabled_; }
  double min_scale() const { return min_scale_; }
  double max_scale() const { return max_scale_; }
  int64_t hysteresis() const { return hysteresis_; }

  /// Throws c10::ValueError (message names the option, the expectation and the value) unless
  /// every option is in range.
  void validate() const;

 private:
  double init_scale_ = 65536.0;
  double growth_factor_ = 2.0;
  double backoff_factor_ = 0.5;
  int64_t growth_interval_ = 2000;
  bool enabled_ = true;
  double min_scale_ = kDefaultMinScale;
  double max_scale_ = std::numeric_limits<double>::infinity();
  int64_t hysteresis_ = 1;
};

/// Mixin for optimizers that consume scaled gradients and an inf flag on the device, so that
/// GradScaler::step needs no host synchronization (the C++ form of torch's
/// `_step_supports_amp_scaling` contract, which fused Adam/AdamW/SGD follow).
///
/// Implement it beside torch::optim::Optimizer:
/// \code
///   class FusedAdam : public torch::optim::Optimizer, public ampkit::ScaleAwareOptimizer { ... };
/// \endcode
/// GradScaler::step detects it with dynamic_cast and then calls step_scaled() instead of
/// unscaling the grads, reading found_inf on the host and calling step().
class ScaleAwareOptimizer {
 public:
  virtual ~ScaleAwareOptimizer() = default;

  /// Applies one step. Must not synchronize with the host.
  /// \param grad_scale 0-dim float32 tensor the grads are still multiplied by; undefined when
  ///        GradScaler::unscale_ already divided them (the step must then not unscale again).
  /// \param found_inf 0-dim float32 tensor, nonzero if any grad holds inf/NaN: the step must then
  ///        leave the parameters and the optimizer state unchanged (step counters included).
  virtual void step_scaled(const at::Tensor& grad_scale, const at::Tensor& found_inf) = 0;
};

/// A GradScaler's state dict. The first five fields are torch.amp.GradScaler's keys "scale",
/// "growth_factor", "backoff_factor", "growth_interval" (int) and "_growth_tracker" (int); the
/// others are ampkit's "min_scale", "max_scale", "hysteresis" and "_overflow_streak", which torch
/// ignores when it loads ampkit's dict and which are absent (std::nullopt: keep the scaler's
/// value; the streak restarts at 0) when ampkit loads torch's.
struct GradScalerState {
  double scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  int64_t growth_tracker = 0;
  std::optional<double> min_scale;
  std::optional<double> max_scale;
  std::optional<int64_t> hysteresis;
  std::optional<int64_t> overflow_streak;

  // Written out, not defaulted: the header stays C++17 where the LibTorch is (torch < 2.13).
  bool operator==(const GradScalerState& o) const {
    return scale == o.scale && growth_factor == o.growth_factor && backoff_factor == o.backoff_factor &&
           growth_interval == o.growth_interval && growth_tracker == o.growth_tracker && min_scale == o.min_scale &&
           max_scale == o.max_scale && hysteresis == o.hysteresis && overflow_streak == o.overflow_streak;
  }
  bool operator!=(const GradScalerState& o) const { return !(*this == o); }
};

/// Stage of one optimizer between two update() calls (torch's OptState).
enum class OptimizerStage { Ready, Unscaled, Stepped };

/// Dynamic loss scaler. Not thread-safe: one training loop drives it.
///
/// State machine per optimizer, reset by update(): Ready --unscale_--> Unscaled --step-->
/// Stepped (step() from Ready unscales first). Misuse throws c10::Error (RuntimeError in Python)
/// with torch's wording; bad arguments throw c10::ValueError. A call that throws leaves the
/// scaler as it was, with one exception: if optimizer.step() itself throws inside step(), the
/// grads stay unscaled and the optimizer stays Unscaled, so that a retry does not unscale twice.
///
/// The scale (0-dim float32), the growth tracker (0-dim int32) and the overflow streak
/// (0-dim int32) live on the device of the first tensor given to scale(); update() changes them
/// there without synchronizing.
class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options = {});

  /// \p outputs times the scale (a new tensor); \p outputs itself when disabled. The first call
  /// creates the scale on outputs' device.
  at::Tensor scale(const at::Tensor& outputs);
  /// Each tensor times the scale, which is copied once to each device it meets.
  std::vector<at::Tensor> scale(at::ArrayRef<at::Tensor> outputs);

  /// Divides the grads of \p optimizer's parameters by the scale in place and records, per
  /// device, whether any is inf/NaN. Optional: step() does it when it was not called. Throws
  /// c10::ValueError on fp16 grads (keep fp32 master weights, as torch requires) and c10::Error
  /// when called twice or after step() before update(). Never synchronizes.
  void unscale_(torch::optim::Optimizer& optimizer);

  /// Unscales (unless unscale_() was called) and calls optimizer.step() unless a grad held
  /// inf/NaN. Returns whether the step ran; this costs one host synchronization, as in torch.
  /// For a ScaleAwareOptimizer it instead calls step_scaled() without synchronizing and returns
  /// true: the optimizer itself skips the update on the device when found_inf is set, and
  /// last_step_skipped() tells whether it did. Disabled: calls optimizer.step(), returns true.
  /// Throws if no parameter of \p optimizer has a gradient, unless it is a ScaleAwareOptimizer:
  /// that one steps with found_inf 0 (it has nothing to update), and the update() that follows
  /// throws for want of inf checks, as torch's scale-aware path does.
  bool step(torch::optim::Optimizer& optimizer);

  /// Backs off the scale if any optimizer stepped since the last update() found inf/NaN (after
  /// `hysteresis` such updates in a row), grows it after growth_interval clean updates, keeps it in
  /// [min_scale, max_scale]; all on the device. Throws if no unscale_()/step() happened since the
  /// last update().
  void update();
  /// Sets the scale to \p new_scale (in [min_scale, max_scale]) instead of updating it.
  void update(double new_scale);
  /// Copies the 1-element \p new_scale (on the scale's device type, no grad) into the scale after
  /// reading it once (a host sync) to check it as update(double) does: torch copies a NaN, inf
  /// or negative value unchecked, and every later step would then be skipped.
  void update(const at::Tensor& new_scale);

  /// The scale as a double (synchronizes); init_scale before the first scale(); 1 when disabled.
  double get_scale() const;
  /// Number of consecutive clean updates counted toward growth (synchronizes).
  int64_t get_growth_tracker() const;
  /// Number of consecutive updates that found inf/NaN, capped at hysteresis (synchronizes).
  int64_t get_overflow_streak() const;

  /// The scale tensor itself (undefined before the first scale()); reading it does not sync.
  const at::Tensor& scale_tensor() const { return scale_; }
  /// The growth tracker tensor (undefined before the first scale()).
  const at::Tensor& growth_tracker_tensor() const { return growth_tracker_; }
  /// found_inf of \p optimizer since the last update(), one 0-dim float32 tensor per grad device
  /// (empty if not unscaled yet). No sync.
  std::vector<at::Tensor> found_inf_per_device(const torch::optim::Optimizer& optimizer) const;
  /// Stage of \p optimizer since the last update().
  OptimizerStage stage(const torch::optim::Optimizer& optimizer) const;
  /// 0-dim bool tensor on the scale's device: whether the last step() skipped its optimizer's
  /// update. Undefined before the first step(). No sync (pytorch#152279).
  const at::Tensor& last_step_skipped() const { return last_step_skipped_; }

  /// step() calls that ran the optimizer's update. Synchronizes only if sync-free steps are
  /// pending.
  int64_t steps_applied() const;
  /// step() calls that skipped it because of inf/NaN. Same sync rule.
  int64_t steps_skipped() const;

  const GradScalerOptions& options() const { return options_; }
  bool is_enabled() const { return options_.enabled(); }
  double get_growth_factor() const { return options_.growth_factor(); }
  double get_backoff_factor() const { return options_.backoff_factor(); }
  int64_t get_growth_interval() const { return options_.growth_interval(); }
  double get_min_scale() const { return options_.min_scale(); }
  double get_max_scale() const { return options_.max_scale(); }
  int64_t get_hysteresis() const { return options_.hysteresis(); }
  /// Setters validate like the constructor and take effect at the next update().
  void set_growth_factor(double v);
  void set_backoff_factor(double v);
  void set_growth_interval(int64_t v);
  void set_min_scale(double v);
  void set_max_scale(double v);
  void set_hysteresis(int64_t v);

  /// Makes the skip decision collective: every found_inf is all-reduced (MAX) over \p group after the
  /// grads are checked and before step() decides, so that an inf/NaN on one rank's grads (or on
  /// one rank's shard) makes every rank skip and back off alike, as torch's ShardedGradScaler does.
  /// A null group (the default) decides locally. Needs <ampkit/distributed.h> for the group type.
  /// The all-reduce adds no host sync beyond what the step already has (NCCL work only makes the
  /// stream wait; gloo on CPU completes before wait() returns).
  void set_process_group(const c10::intrusive_ptr<c10d::ProcessGroup>& group);
  /// The group set by set_process_group() (null by default).
  c10::intrusive_ptr<c10d::ProcessGroup> process_group() const;

  /// torch's state dict as a struct (keys and types in GradScalerState); std::nullopt when
  /// disabled, where torch returns {}. Synchronizes. Take it after update().
  std::optional<GradScalerState> state_dict() const;
  /// Loads a state of ampkit's or of torch.amp.GradScaler (ampkit's fields are optional). No-op
  /// when disabled; throws c10::Error on std::nullopt (saved from a disabled scaler) and
  /// c10::ValueError on out-of-range values (nothing changed then).
  void load_state_dict(const std::optional<GradScalerState>& state);

  /// Writes state_dict() into \p archive (nothing when disabled).
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what save() wrote, through load_state_dict(). Archives are TorchScript-format files:
  /// load only trusted ones (Python's state dicts load with torch.load(weights_only=True)).
  void load(torch::serialize::InputArchive& archive);

 private:
  struct PerOptimizerState {
    OptimizerStage stage = OptimizerStage::Ready;
    std::vector<at::Tensor> found_inf_per_device;
  };

  void check_initialized(const char* call) const;
  void lazy_init(const c10::Device& device);
  /// Divides \p optimizer's grads by \p inv_scale; one found_inf per device, all-reduced over the
  /// process group if one is set.
  std::vector<at::Tensor> unscale_grads_of(const torch::optim::Optimizer& optimizer, const at::Tensor& inv_scale,
                                           bool allow_fp16) const;
  void set_stage(const torch::optim::Optimizer& optimizer, OptimizerStage stage, std::vector<at::Tensor> found_infs);
  /// step() for a ScaleAwareOptimizer: step_scaled() with the scale and the inf flag, no host sync.
  bool step_sync_free(torch::optim::Optimizer& optimizer, ScaleAwareOptimizer& aware, OptimizerStage stage);
  /// step() for any other optimizer: unscale unless done, read found_inf on the host, step unless set.
  bool step_with_sync(torch::optim::Optimizer& optimizer, OptimizerStage stage);
  void record_step(const at::Tensor& found_inf, std::optional<bool> skipped);
  /// What every setter does: validates \p candidate (the options with one value changed) and
  /// takes it, or throws and keeps the options as they were.
  void commit_options(const GradScalerOptions& candidate);

  GradScalerOptions options_;
  at::Tensor scale_;            // 0-dim float32, created by the first scale()
  at::Tensor growth_tracker_;   // 0-dim int32
  at::Tensor overflow_streak_;  // 0-dim int32
  int64_t init_growth_tracker_ = 0;
  int64_t init_overflow_streak_ = 0;
  // Keyed by address, as torch keys by id(optimizer); emptied by update().
  std::unordered_map<const torch::optim::Optimizer*, PerOptimizerState> per_optimizer_;
  at::Tensor last_step_skipped_;
  int64_t steps_ = 0;
  int64_t host_skipped_ = 0;   // skips seen on the host (the synchronizing path)
  at::Tensor device_skipped_;  // int64 count of skips of sync-free steps, created on first use
  // A c10d::ProcessGroup, held through its base so that this header needs no c10d headers.
  c10::intrusive_ptr<c10::intrusive_ptr_target> process_group_;
};

/// `archive << scaler` and `archive >> scaler`, so that torch::save / torch::load work.
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive, const GradScaler& scaler);
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, GradScaler& scaler);

}  // namespace ampkit
