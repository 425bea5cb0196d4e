#include <algorithm>
#include <ampkit/trainer.h>

#include <ampkit/autocast.h>
#include <ampkit/optim.h>

#include "autocast_region.h"
#include "tensor_groups.h"
#include "trainer_detail.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <exception>
#include <memory>
#include <sstream>
#include <utility>

namespace ampkit {
namespace {

constexpr int64_t kFormatVersion = 1;

using detail::params_of;

bool any_half_grad(const std::vector<at::Tensor>& params) {
  return std::any_of(params.begin(), params.end(),
                     [](const at::Tensor& p) { return p.grad().defined() && p.grad().scalar_type() == at::kHalf; });
}

at::Tensor false_on(const c10::Device& device) {
  return at::zeros({}, at::TensorOptions().dtype(at::kBool).device(device));
}

}  // namespace

// ---- options ----

c10::ScalarType TrainerOptions::dtype() const {
  return dtype_.has_value() ? *dtype_ : at::autocast::get_autocast_dtype(device_type_);
}

std::optional<GradScalerOptions> TrainerOptions::scaler() const {
  if (scaler_set_) return scaler_;
  // bf16 has fp32's exponent range: gradients do not underflow, so there is nothing to scale.
  if (enabled_ && dtype() == at::kHalf) return GradScalerOptions();
  return std::nullopt;
}

void TrainerOptions::validate() const {
  detail::check_autocast_arguments(device_type_, dtype(), enabled_);
  TORCH_CHECK_VALUE(accumulation_steps_ >= 1, "Trainer: expected accumulation_steps >= 1, got ", accumulation_steps_);
  TORCH_CHECK_VALUE(!max_grad_norm_.has_value() || (std::isfinite(*max_grad_norm_) && *max_grad_norm_ > 0.0),
                    "Trainer: expected max_grad_norm to be finite and > 0 (or unset), got ",
                    max_grad_norm_.value_or(0.0));
  if (auto s = scaler()) s->validate();
}

// ---- trainer ----

Trainer::Trainer(torch::optim::Optimizer& optimizer, TrainerOptions options)
    : optimizer_(optimizer), options_(std::move(options)) {
  init();
}

Trainer::Trainer(torch::nn::Module& model, torch::optim::Optimizer& optimizer, TrainerOptions options)
    : model_(&model), optimizer_(optimizer), options_(std::move(options)) {
  init();
}

void Trainer::init() {
  options_.validate();
  const auto params = params_of(optimizer_);
  TORCH_CHECK_VALUE(!params.empty(), "Trainer: expected an optimizer with at least one parameter, got none");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].device().type() == options_.device_type(), "Trainer: expected every parameter on ",
                      c10::DeviceTypeName(options_.device_type(), /*lower_case=*/true),
                      " (options.device_type), got parameter ", i, " on ", params[i].device().str());
  }
  const auto& group = options_.process_group();
  TORCH_CHECK_VALUE(!group || model_ != nullptr,
                    "Trainer: expected the model with options.process_group (Trainer(model, optimizer, options)), got "
                    "an optimizer alone");
  if (auto s = options_.scaler(); s && s->enabled()) scaler_.emplace(*s);
  if (group) {
    // A collective: every rank constructs its trainer at the same point of the program.
    data_parallel_ = std::make_shared<dist::DataParallel>(*model_, group, options_.data_parallel());
    if (scaler_) scaler_->set_process_group(group);
  }
}

StepStats Trainer::step(const Closure& closure) {
  TORCH_CHECK_VALUE(static_cast<bool>(closure), "Trainer.step: expected a closure, got an empty std::function");
  const int64_t n = options_.accumulation_steps();
  if (data_parallel_) {
    // Only the last micro-batch of an accumulation averages the grads (DDP's no_sync before it).
    data_parallel_->set_require_backward_grad_sync((micro_steps_ + 1) % n == 0);
    data_parallel_->pre_forward();
  }
  at::Tensor loss;
  {
    // Forward in the region; the guard is gone before backward, which runs with the TLS of the
    // thread that calls it.
    AutocastGuard guard(options_.device_type(), options_.dtype(), options_.enabled());
    loss = closure();
  }
  TORCH_CHECK_VALUE(loss.defined(), "Trainer.step: expected the closure to return the loss, got an undefined tensor");
  TORCH_CHECK_VALUE(loss.numel() == 1 && loss.is_floating_point(),
                    "Trainer.step: expected the closure to return a floating-point scalar loss, got ", loss.toString(),
                    " of shape ", loss.sizes());
  TORCH_CHECK_VALUE(loss.requires_grad(),
                    "Trainer.step: expected the closure's loss to require grad (is it computed from the model's "
                    "parameters, outside torch::NoGradGuard?), got a tensor that does not");

  const at::Tensor to_backward = n > 1 ? loss / n : loss;
  StepStats stats;
  stats.loss_ = loss.detach();
  at::Tensor scaled = to_backward;
  if (scaler_) {
    scaled = scaler_->scale(to_backward);
    stats.scale_ = scaler_->scale_tensor().clone();  // update() changes the scale in place below
  }
  // Armed only now that the loss passed its checks: an armed reducer expects this backward.
  if (data_parallel_) data_parallel_->post_forward({loss});
  scaled.backward();
  ++micro_steps_;
  if (micro_steps_ % n != 0) {
    stats.skipped_ = false_on(loss.device());
    return stats;
  }

  stats.stepped_ = true;
  const auto max_norm = options_.max_grad_norm();
  if (scaler_) {
    if (max_norm) {
      const auto params = params_of(optimizer_);
      if (any_half_grad(params)) {
        // fp16 grads (fp16 parameters with master weights): clipped while scaled, unscaled by the
        // optimizer's fused step, never in place in fp16 (what torch refuses).
        stats.grad_norm_ = detail::clip_grad_norm_(params, *max_norm, scaler_->scale_tensor());
      } else {
        scaler_->unscale_(optimizer_);
        stats.grad_norm_ = detail::clip_grad_norm_(params, *max_norm);
      }
    }
    scaler_->step(optimizer_);  // sync-free for a ScaleAwareOptimizer
    stats.skipped_ = scaler_->last_step_skipped();
    scaler_->update();
  } else {
    if (max_norm) stats.grad_norm_ = detail::clip_grad_norm_(params_of(optimizer_), *max_norm);
    optimizer_.step();
    stats.skipped_ = false_on(loss.device());
  }
  optimizer_.zero_grad(options_.set_to_none());
  return stats;
}

void Trainer::save(torch::serialize::OutputArchive& archive) const {
  TORCH_CHECK(micro_steps_ % options_.accumulation_steps() == 0, "Trainer.save: called after micro-batch ",
              micro_steps_, ", in the middle of an accumulation of ", options_.accumulation_steps(),
              "; accumulated grads are not saved, so save after a step that stepped the optimizer");
  archive.write("ampkit_trainer_version", c10::IValue(kFormatVersion));
  archive.write("micro_steps", c10::IValue(micro_steps_));
  archive.write("accumulation_steps", c10::IValue(options_.accumulation_steps()));
  if (model_ != nullptr) {
    torch::serialize::OutputArchive m(archive.compilation_unit());
    model_->save(m);
    archive.write("model", m);
  }
  torch::serialize::OutputArchive o(archive.compilation_unit());
  optimizer_.save(o);
  archive.write("optimizer", o);
  if (scaler_) {
    torch::serialize::OutputArchive s(archive.compilation_unit());
    scaler_->save(s);
    archive.write("scaler", s);
  }
}

namespace {

// What torch::nn::Module::load would read, checked first: Module::load copies tensor by tensor
// with set_, so a missing entry throws half-way and a tensor of another shape silently replaces
// the parameter's shape.
void check_module_archive(const torch::nn::Module& module, torch::serialize::InputArchive& archive,
                          const std::string& prefix) {
  auto check = [&](const std::string& key, const at::Tensor& own, bool is_buffer) {
    at::Tensor saved;
    TORCH_CHECK_VALUE(archive.try_read(key, saved, is_buffer), "Trainer.load: expected the model's ",
                      is_buffer ? "buffer '" : "parameter '", prefix, key, "' in the archive, got none");
    TORCH_CHECK_VALUE(saved.sizes() == own.sizes(), "Trainer.load: expected the model's ",
                      is_buffer ? "buffer '" : "parameter '", prefix, key, "' of shape ", own.sizes(), ", got ",
                      saved.sizes());
  };
  for (const auto& p : module.named_parameters(/*recurse=*/false)) check(p.key(), p.value(), false);
  for (const auto& b : module.named_buffers(/*recurse=*/false)) check(b.key(), b.value(), true);
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive child_archive;
    TORCH_CHECK_VALUE(archive.try_read(child.key(), child_archive), "Trainer.load: expected the model's submodule '",
                      prefix, child.key(), "' in the archive, got none");
    check_module_archive(*child.value(), child_archive, prefix + child.key() + ".");
  }
}

// An in-memory copy of a module's or optimizer's state, to put back if a load fails half-way.
template <class T>
std::string snapshot_of(const T& object) {
  torch::serialize::OutputArchive archive;
  object.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

template <class T>
void restore_from(T& object, const std::string& snapshot) {
  torch::serialize::InputArchive archive;
  std::istringstream in(snapshot);
  archive.load_from(in);
  object.load(archive);
}

}  // namespace

void Trainer::load(torch::serialize::InputArchive& archive) {
  c10::IValue version, micro, accumulation;
  TORCH_CHECK_VALUE(
      archive.try_read("ampkit_trainer_version", version) && version.isInt() && version.toInt() == kFormatVersion,
      "Trainer.load: expected an archive written by Trainer::save (format ", kFormatVersion, ")");
  TORCH_CHECK_VALUE(archive.try_read("micro_steps", micro) && archive.try_read("accumulation_steps", accumulation) &&
                        micro.isInt() && accumulation.isInt(),
                    "Trainer.load: expected integer 'micro_steps' and 'accumulation_steps' in the archive");
  TORCH_CHECK_VALUE(accumulation.toInt() == options_.accumulation_steps(),
                    "Trainer.load: expected an archive saved with accumulation_steps ", options_.accumulation_steps(),
                    ", got ", accumulation.toInt());
  TORCH_CHECK_VALUE(micro.toInt() >= 0 && micro.toInt() % options_.accumulation_steps() == 0,
                    "Trainer.load: expected micro_steps >= 0 and a multiple of accumulation_steps (",
                    options_.accumulation_steps(), "), got ", micro.toInt());
  // Read and check every part before loading any.
  torch::serialize::InputArchive m, o, s;
  if (model_ != nullptr) {
    TORCH_CHECK_VALUE(archive.try_read("model", m),
                      "Trainer.load: expected the model's state in the archive (it was saved without a model)");
    check_module_archive(*model_, m, "");
  }
  TORCH_CHECK_VALUE(archive.try_read("optimizer", o), "Trainer.load: expected the optimizer's state in the archive");
  const bool has_scaler = archive.try_read("scaler", s);
  TORCH_CHECK_VALUE(has_scaler == scaler_.has_value(), "Trainer.load: expected an archive ",
                    scaler_ ? "with" : "without", " a GradScaler state, as this trainer has ",
                    scaler_ ? "a scaler" : "none", ", got one ", has_scaler ? "with" : "without");
  if (scaler_) GradScaler(scaler_->options()).load(s);  // a throwaway scaler checks the state
  // A part can still refuse its state (a torch::optim optimizer checks as it loads): put back
  // what was loaded before it, so that a failed load changes nothing.
  const std::string optimizer_before = snapshot_of(optimizer_);
  const std::string model_before = model_ != nullptr ? snapshot_of(*model_) : std::string();
  const std::optional<GradScalerState> scaler_before = scaler_ ? scaler_->state_dict() : std::nullopt;
  try {
    if (model_ != nullptr) model_->load(m);
    optimizer_.load(o);
    if (scaler_) scaler_->load(s);
  } catch (...) {
    restore_from(optimizer_, optimizer_before);
    if (model_ != nullptr) restore_from(*model_, model_before);
    if (scaler_) scaler_->load_state_dict(scaler_before);
    throw;
  }
  micro_steps_ = micro.toInt();
  if (data_parallel_) {
    // torch::nn::Module::load replaces each parameter's data with set_, which gives it a new
    // gradient accumulator: the reducer's hooks sit on the old ones. A new wrapper hooks the new
    // ones (a collective: every rank loads at the same point).
    const dist::DataParallelOptions ddp_options = data_parallel_->options();
    data_parallel_.reset();
    data_parallel_ = std::make_shared<dist::DataParallel>(*model_, options_.process_group(), ddp_options);
  }
}

void Trainer::save(const std::string& path) const {
  const auto& group = options_.process_group();
  if (!group) {
    torch::serialize::OutputArchive archive;
    save(archive);
    archive.save_to(path);
    return;
  }
  // Every rank holds the same state: rank 0 writes, the others wait until the file is complete (and
  // rank 0 reaches the barrier even when writing failed, so that the others do not hang on it).
  std::exception_ptr failure;
  if (group->getRank() == 0) {
    try {
      torch::serialize::OutputArchive archive;
      save(archive);
      archive.save_to(path);
    } catch (...) {
      failure = std::current_exception();
    }
  }
  group->barrier()->wait();
  if (failure) std::rethrow_exception(failure);
}

void Trainer::load(const std::string& path) {
  torch::serialize::InputArchive archive;
  archive.load_from(path);
  load(archive);
}

// The stream operators of torch::save / torch::load, one pair per type as torch declares them for
// its modules and optimizers (a template over "anything with save()" would catch unrelated types).
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive, const Trainer& trainer) {
  trainer.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, Trainer& trainer) {
  trainer.load(archive);
  return archive;
}

namespace detail {

at::Tensor clip_grad_norm_(at::ArrayRef<at::Tensor> params, double max_norm, const at::Tensor& grad_scale) {
  TORCH_CHECK_VALUE(std::isfinite(max_norm) && max_norm > 0.0,
                    "clip_grad_norm_: expected max_norm to be finite and "
                    "> 0, got ",
                    max_norm);
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return at::zeros({});
  // Grouped as torch's _group_tensors_by_device_and_dtype: the order of the stacked norms decides
  // the last bits of the total.
  const auto groups = group_by_device_and_dtype(grads);
  const c10::Device first = grads.front().device();
  std::vector<at::Tensor> norms;
  for (const auto& g : groups) {
    const at::ScalarType dtype = grads[g.front()].scalar_type();
    const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
    for (auto& n :
         at::_foreach_norm(pick(grads, g), 2, low ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt)) {
      norms.push_back(n.to(first));
    }
  }
  at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
  if (grad_scale.defined()) total = total / grad_scale.to(total.device()).reshape({});
  // Python's `max_norm / tensor` is tensor.reciprocal() * max_norm: same op order, same bits.
  const at::Tensor coef = at::clamp_max((total + 1e-6).reciprocal() * max_norm, 1.0);
  for (const auto& g : groups) at::_foreach_mul_(pick(grads, g), coef.to(grads[g.front()].device()));
  return total;
}

}  // namespace detail
}  // namespace ampkit
