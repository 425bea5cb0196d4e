#pragma once
/// \file trainer.h
/// Trainer: one call per micro-batch runs the AMP recipe that a hand-written loop spells out —
/// forward inside an AutocastGuard, backward on the scaled loss outside it, gradient
/// accumulation, optional clipping after unscaling, the (skippable) optimizer step, the scale
/// update and zero_grad — without a host synchronization when the optimizer is one of
/// ampkit::optim's fused ones.
///
/// \code
///   ampkit::optim::AdamW opt(model->parameters());
///   ampkit::Trainer trainer(*model, opt, ampkit::TrainerOptions(c10::kCUDA).max_grad_norm(1.0));
///   for (auto& [x, y] : batches) {
///     auto stats = trainer.step([&] { return torch::mse_loss(model->forward(x), y); });
///     if (i % 100 == 0) std::cout << stats.loss().item<double>() << "\n";  // the item() syncs
///   }
/// \endcode

#include <ampkit/distributed.h>
#include <ampkit/grad_scaler.h>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace ampkit {

/// Options of a Trainer. Chained setters: `TrainerOptions(c10::kCUDA).accumulation_steps(4)`.
/// Written out one by one, as GradScalerOptions' are, each with its documentation.
struct TrainerOptions {
  /// \param device_type device type of the autocast region and of the parameters (cpu, cuda)
  TrainerOptions(c10::DeviceType device_type = c10::kCPU) : device_type_(device_type) {}

  TrainerOptions& device_type(c10::DeviceType v) {
    device_type_ = v;
    return *this;
  }
  /// Autocast dtype (fp16 or bf16). Default: torch's autocast dtype of the device type
  /// (CPU bf16, CUDA fp16).
  TrainerOptions& dtype(c10::ScalarType v) {
    dtype_ = v;
    return *this;
  }
  /// false: run the closure without autocast (plain fp32; the rest of the recipe stays).
  TrainerOptions& enabled(bool v) {
    enabled_ = v;
    return *this;
  }
  /// Loss scaling with these options. Default: a default GradScaler under fp16, none under bf16,
  /// whose range makes scaling unnecessary.
  TrainerOptions& scaler(GradScalerOptions v) {
    scaler_ = v;
    scaler_set_ = true;
    return *this;
  }
  /// No loss scaling whatever the dtype.
  TrainerOptions& no_scaler() {
    scaler_.reset();
    scaler_set_ = true;
    return *this;
  }
  /// Micro-batches per optimizer step (>= 1); each micro-batch loss is divided by it.
  TrainerOptions& accumulation_steps(int64_t v) {
    accumulation_steps_ = v;
    return *this;
  }
  /// Clip the total 2-norm of the grads to this value (> 0) before each step, as
  /// torch.nn.utils.clip_grad_norm_ after unscaling. Default: no clipping.
  TrainerOptions& max_grad_norm(std::optional<double> v) {
    max_grad_norm_ = v;
    return *this;
  }
  /// zero_grad(set_to_none) after each step (default true, as torch).
  TrainerOptions& set_to_none(bool v) {
    set_to_none_ = v;
    return *this;
  }
  /// Data-parallel training over \p group (from dist::init_process_group): the trainer wraps the
  /// model in a dist::DataParallel (rank 0's parameters and buffers broadcast at construction,
  /// grads averaged in buckets overlapping backward on the last micro-batch of each accumulation,
  /// no communication on the others), makes its GradScaler's skip decision collective
  /// (GradScaler::set_process_group), clips the averaged grads, and save(path) writes on rank 0
  /// only. Needs the Trainer constructor that takes the model. Default: none (one process).
  TrainerOptions& process_group(c10::intrusive_ptr<c10d::ProcessGroup> v) {
    process_group_ = std::move(v);
    return *this;
  }
  /// Bucketing and the other DDP options of the process_group() wrapper.
  TrainerOptions& data_parallel(dist::DataParallelOptions v) {
    data_parallel_ = v;
    return *this;
  }

  c10::DeviceType device_type() const { return device_type_; }
  /// The dtype set, else the device type's default autocast dtype.
  c10::ScalarType dtype() const;
  bool enabled() const { return enabled_; }
  /// The scaler's options, or std::nullopt for no scaling (resolving the default by dtype).
  std::optional<GradScalerOptions> scaler() const;
  int64_t accumulation_steps() const { return accumulation_steps_; }
  std::optional<double> max_grad_norm() const { return max_grad_norm_; }
  bool set_to_none() const { return set_to_none_; }
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const { return process_group_; }
  const dist::DataParallelOptions& data_parallel() const { return data_parallel_; }

  /// Throws c10::ValueError naming the option unless every option is in range.
  void validate() const;

 private:
  c10::DeviceType device_type_;
  std::optional<c10::ScalarType> dtype_;
  bool enabled_ = true;
  std::optional<GradScalerOptions> scaler_;
  bool scaler_set_ = false;
  int64_t accumulation_steps_ = 1;
  std::optional<double> max_grad_norm_;
  bool set_to_none_ = true;
  c10::intrusive_ptr<c10d::ProcessGroup> process_group_;
  dist::DataParallelOptions data_parallel_;
};

/// What one Trainer::step did: ampkit.StepStats's fields, as device tensors (reading them does not
/// synchronize; `loss().item<double>()` does).
class StepStats {
 public:
  /// The closure's loss (before division by accumulation_steps), detached. 0-dim.
  const at::Tensor& loss() const { return loss_; }
  /// The scale the loss was multiplied by (a copy, 0-dim float32); undefined without a scaler.
  const at::Tensor& scale() const { return scale_; }
  /// 0-dim bool: whether the optimizer step was skipped for inf/NaN grads (false on
  /// micro-batches that only accumulate, and without a scaler).
  const at::Tensor& skipped() const { return skipped_; }
  /// Total 2-norm of the unscaled grads before clipping (0-dim); undefined unless this call
  /// stepped with max_grad_norm set.
  const at::Tensor& grad_norm() const { return grad_norm_; }
  /// Whether this call ran the optimizer step (the last micro-batch of an accumulation).
  bool stepped() const { return stepped_; }

 private:
  friend class Trainer;
  at::Tensor loss_, scale_, skipped_, grad_norm_;
  bool stepped_ = false;
};

/// The AMP training step for any torch::optim::Optimizer. Not thread-safe; the optimizer (and
/// the model, if given) must outlive the trainer.
class Trainer {
 public:
  using Closure = std::function<at::Tensor()>;

  /// Throws c10::ValueError for bad options, an optimizer without parameters, parameters not
  /// on options.device_type(), or a process_group (which needs the model).
  Trainer(torch::optim::Optimizer& optimizer, TrainerOptions options = {});
  /// Also saves and loads \p model's parameters and buffers with the trainer's state.
  Trainer(torch::nn::Module& model, torch::optim::Optimizer& optimizer, TrainerOptions options = {});

  /// One micro-batch: runs \p closure (forward + loss) in the autocast region, leaves it, runs
  /// backward on loss / accumulation_steps times the scale; every accumulation_steps-th call also
  /// unscales, clips (if asked), steps (skipped on the device for inf/NaN), updates the scale and
  /// zeroes the grads. Throws c10::ValueError if the closure returns an undefined tensor, a tensor
  /// with more than one element, a non-floating one, or one that does not require grad; nothing
  /// has changed then (the grads are untouched).
  StepStats step(const Closure& closure);

  /// Micro-batches run so far.
  int64_t micro_steps() const { return micro_steps_; }
  /// Optimizer steps run so far (skipped ones included).
  int64_t optimizer_steps() const { return micro_steps_ / options_.accumulation_steps(); }
  const TrainerOptions& options() const { return options_; }
  /// The scaler, or nullptr when the trainer does not scale.
  GradScaler* scaler() { return scaler_ ? &*scaler_ : nullptr; }
  const GradScaler* scaler() const { return scaler_ ? &*scaler_ : nullptr; }
  torch::optim::Optimizer& optimizer() { return optimizer_; }
  /// The data-parallel wrapper of the model, or nullptr without a process_group.
  dist::DataParallel* data_parallel() { return data_parallel_.get(); }

  /// Writes the model (if given), the optimizer, the scaler and the counters. Throws c10::Error in
  /// the middle of an accumulation (accumulated grads are not part of the state): save after a
  /// step() that returned stepped().
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what save() wrote; a run resumed from it continues bitwise as the uninterrupted one.
  /// Every part is checked before any is loaded (model keys and shapes, the scaler's state,
  /// micro_steps); a part that still refuses its state is rolled back with the others, so a failed
  /// load changes nothing. Archives are TorchScript-format files: load only trusted ones. With a
  /// process_group every rank must call it (the data-parallel wrapper is rebuilt on the loaded
  /// parameters, a collective).
  void load(torch::serialize::InputArchive& archive);
  /// save() / load() through a file. With a process_group only rank 0 writes, and every rank
  /// returns once the file is complete (a barrier); every rank loads the same file, whatever the
  /// world size it was written at (the state holds nothing per rank).
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  /// What both constructors do: check the options and the parameters, make the scaler and the
  /// data-parallel wrapper.
  void init();

  torch::nn::Module* model_ = nullptr;
  torch::optim::Optimizer& optimizer_;
  TrainerOptions options_;
  std::optional<GradScaler> scaler_;
  std::shared_ptr<dist::DataParallel> data_parallel_;
  int64_t micro_steps_ = 0;
};

/// `archive << trainer` and `archive >> trainer`.
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive, const Trainer& trainer);
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, Trainer& trainer);

}  // namespace ampkit
