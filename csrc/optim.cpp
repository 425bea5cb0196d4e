#include <ampkit/optim.h>

#include "optim_detail.h"
#include "tensor_groups.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <string>
#include <utility>

namespace ampkit::optim {

using ampkit::detail::group_by_device_and_dtype;
using ampkit::detail::PerDeviceCopies;
using ampkit::detail::pick;
namespace {

using torch::optim::OptimizerParamGroup;
using torch::optim::OptimizerParamState;

bool device_supported(c10::DeviceType t) {
  // The device types with fused Adam/AdamW/SGD kernels in torch (_get_fused_kernels_supported_devices).
  return t == c10::kCPU || t == c10::kCUDA || t == c10::kXPU || t == c10::kMPS;
}

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return t.toString() + " of shape " + c10::str(t.sizes()) + " on " + t.device().str();
}

// A parameter and its grad are usable by the fused kernels. Checked for every parameter before
// any state is created or any tensor changes.
void check_param_grad(const char* who, const at::Tensor& p, const at::Tensor& g, size_t group, size_t index) {
  TORCH_CHECK_VALUE(p.is_floating_point() && !p.is_complex(), who, ": expected floating-point parameters, got ",
                    describe(p), " (group ", group, ", index ", index, ")");
  // RuntimeError, the type torch's fused optimizers raise for such parameters.
  TORCH_CHECK(device_supported(p.device().type()), who,
              ": expected parameters on a device with fused kernels (cpu, cuda, xpu, mps), got ", describe(p),
              " (group ", group, ", index ", index, ")");
  TORCH_CHECK_VALUE(!g.is_sparse(), who, ": expected dense gradients, got a sparse one (group ", group, ", index ",
                    index, "); fused optimizers do not support sparse gradients");
  TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type() && g.device() == p.device() && g.sizes() == p.sizes(), who,
                    ": expected each gradient to match its parameter's dtype, device and shape (", describe(p),
                    "), got ", describe(g), " (group ", group, ", index ", index, ")");
}

void check_finite_nonneg(const char* who, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, who, ": expected ", name, " >= 0, got ", v);
}

void check_adam_like(const char* who, double lr, double eps, double wd, const std::tuple<double, double>& betas) {
  check_finite_nonneg(who, "lr", lr);
  check_finite_nonneg(who, "eps", eps);
  check_finite_nonneg(who, "weight_decay", wd);
  const double b1 = std::get<0>(betas);
  const double b2 = std::get<1>(betas);
  TORCH_CHECK_VALUE(b1 >= 0.0 && b1 < 1.0, who, ": expected betas[0] in [0, 1), got ", b1);
  TORCH_CHECK_VALUE(b2 >= 0.0 && b2 < 1.0, who, ": expected betas[1] in [0, 1), got ", b2);
}

// Index of the first parameter of every group, for error messages and the "no parameters" check.
void check_has_params(const char* who, const std::vector<OptimizerParamGroup>& groups) {
  size_t n = 0;
  for (const auto& g : groups) n += g.params().size();
  TORCH_CHECK_VALUE(n > 0, who, ": expected at least one parameter, got an empty parameter list");
}

// torch 2.13's add_param_group replaces group options of types it does not know (ours) by a copy
// of the defaults; put the caller's back (used as given: no field-by-field merge).
void restore_group_options(std::vector<OptimizerParamGroup>& mine, const std::vector<OptimizerParamGroup>& given) {
  for (size_t i = 0; i < given.size() && i < mine.size(); ++i) {
    if (given[i].has_options()) mine[i].set_options(given[i].options().clone());
  }
}

// The options of every group must be ours: torch::optim::Optimizer accepts any OptimizerOptions,
// and a static_cast of torch::optim::AdamOptions to ampkit's would read garbage.
template <class Options>
const Options& options_of(const char* who, const OptimizerParamGroup& group, size_t i) {
  const auto* o = dynamic_cast<const Options*>(&group.options());
  TORCH_CHECK_VALUE(o != nullptr, who, ": expected the options of param group ", i, " to be ampkit::optim::", who,
                    "Options, got another optimizer's options");
  return *o;
}

// Where GradScaler hands in one found_inf that is the sum over devices, the kernels want exactly
// 0 or 1 (they compare with 1 to skip, and the step rollback subtracts it).
PerDeviceCopies found_inf_copies(const at::Tensor& found_inf) {
  return PerDeviceCopies(found_inf, false, [](const at::Tensor& t) { return t.reshape({}).clamp_max(1.0); });
}

PerDeviceCopies grad_scale_copies(const at::Tensor& grad_scale) {
  return PerDeviceCopies(grad_scale, false, [](const at::Tensor& t) { return t.reshape({}); });
}

void check_list(const char* who, const char* name, at::TensorList list, at::TensorList params, bool state_step) {
  TORCH_CHECK_VALUE(list.size() == params.size(), who, ": expected ", name, " to have one tensor per parameter (",
                    params.size(), "), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    if (state_step) {
      TORCH_CHECK_VALUE(
          t.defined() && t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == params[i].device(), who,
          ": expected ", name, "[", i, "] to be a 1-element float32 tensor on ", params[i].device(), ", got ",
          describe(t));
    } else {
      TORCH_CHECK_VALUE(t.defined() && t.scalar_type() == params[i].scalar_type() && t.device() == params[i].device() &&
                            t.sizes() == params[i].sizes(),
                        who, ": expected ", name, "[", i, "] to match its parameter (", describe(params[i]), "), got ",
                        describe(t));
    }
  }
}

// Moves a loaded state tensor to its parameter (device, and dtype unless it is a step counter).
at::Tensor place_like(const char* who, const char* name, const at::Tensor& t, const at::Tensor& param) {
  if (!t.defined()) return t;
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), who, ".load: expected state '", name,
                    "' to have its parameter's shape ", param.sizes(), ", got ", t.sizes());
  return t.to(param.device(), param.scalar_type());
}

at::Tensor place_step(const char* who, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK_VALUE(t.defined() && t.numel() == 1, who, ".load: expected state 'step' to be a 1-element tensor, got ",
                    describe(t));
  return t.to(param.device(), at::kFloat).reshape({});
}

// torch::optim::serialize's format, read into temporaries and checked before anything changes
// (torch's own loader updates the optimizer as it goes and leaves state on the archive's device).
template <class State, class Options, class Fix>
void load_optimizer(const char* who, torch::optim::Optimizer& opt, torch::serialize::InputArchive& archive, Fix fix) {
  c10::IValue version;
  archive.read("pytorch_version", version);
  TORCH_CHECK_VALUE(version.isString() && version.toStringRef() == "1.5.0", who,
                    ".load: expected an archive written by save() (format 1.5.0)");
  torch::serialize::InputArchive state_archive;
  archive.read("state", state_archive);
  ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>> saved_state;
  torch::optim::detail::serialize<State>(state_archive, saved_state);
  torch::serialize::InputArchive groups_archive;
  archive.read("param_groups", groups_archive);
  std::vector<std::pair<std::vector<std::string>, std::unique_ptr<torch::optim::OptimizerOptions>>> saved_groups;
  torch::optim::detail::serialize<Options>(groups_archive, saved_groups);

  auto& groups = opt.param_groups();
  TORCH_CHECK_VALUE(saved_groups.size() == groups.size(), who, ".load: expected ", groups.size(),
                    " param groups in the archive, got ", saved_groups.size());
  ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>> new_state;
  std::vector<Options> new_options;
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto& keys = saved_groups[i].first;
    const auto& params = groups[i].params();
    TORCH_CHECK_VALUE(keys.size() == params.size(), who, ".load: expected param group ", i, " to hold ", params.size(),
                      " parameters, got ", keys.size());
    for (size_t j = 0; j < params.size(); ++j) {
      auto it = saved_state.find(reinterpret_cast<void*>(std::stoull(keys[j])));
      if (it == saved_state.end()) continue;
      auto state = std::make_unique<State>(static_cast<const State&>(*it->second));
      fix(*state, params[j]);
      new_state[params[j].unsafeGetTensorImpl()] = std::move(state);
    }
    const auto& o = static_cast<const Options&>(*saved_groups[i].second);
    o.validate();
    new_options.push_back(o);
  }
  // Commit: nothing below throws.
  opt.state() = std::move(new_state);
  for (size_t i = 0; i < groups.size(); ++i) groups[i].set_options(std::make_unique<Options>(new_options[i]));
}

template <class Options>
void adam_family_step(const char* who, torch::optim::Optimizer& opt, bool decoupled, const at::Tensor& grad_scale,
                      const at::Tensor& found_inf) {
  auto& groups = opt.param_groups();
  // Validate every parameter first, so a bad one leaves all state and all params untouched.
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    for (size_t j = 0; j < groups[gi].params().size(); ++j) {
      const auto& p = groups[gi].params()[j];
      if (p.grad().defined()) check_param_grad(who, p, p.grad(), gi, j);
    }
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& o = static_cast<const Options&>(groups[gi].options());
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps;
    for (const auto& p : groups[gi].params()) {
      if (!p.grad().defined()) continue;
      auto& slot = opt.state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        // torch's fused _init_group: zeros, and a float32 step on the param's device.
        auto s = std::make_unique<AdamParamState>();
        s->step(at::zeros({}, p.options().dtype(at::kFloat)));
        s->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
        s->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        if (o.amsgrad()) s->max_exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      auto& s = static_cast<AdamParamState&>(*slot);
      if (o.amsgrad() && !s.max_exp_avg_sq().defined()) {
        // amsgrad switched on after some steps: torch would fail; start the maximum at zero.
        s.max_exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
      }
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s.exp_avg());
      exp_avg_sqs.push_back(s.exp_avg_sq());
      if (o.amsgrad()) max_sqs.push_back(s.max_exp_avg_sq());
      steps.push_back(s.step());
    }
    if (params.empty()) continue;
    detail::AdamHyper h;
    h.lr = o.lr();
    h.beta1 = std::get<0>(o.betas());
    h.beta2 = std::get<1>(o.betas());
    h.weight_decay = o.weight_decay();
    h.eps = o.eps();
    h.amsgrad = o.amsgrad();
    h.maximize = o.maximize();
    h.decoupled_weight_decay = decoupled;
    detail::fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, h, grad_scale, found_inf);
  }
}

template <class Options>
void check_adam_groups(const char* who, const std::vector<OptimizerParamGroup>& groups) {
  for (size_t i = 0; i < groups.size(); ++i) options_of<Options>(who, groups[i], i).validate();
}

void fix_adam_state(const char* who, AdamParamState& s, const at::Tensor& p) {
  s.step(place_step(who, s.step(), p));
  TORCH_CHECK_VALUE(s.exp_avg().defined() && s.exp_avg_sq().defined(), who,
                    ".load: expected states 'exp_avg' and 'exp_avg_sq' in the archive");
  s.exp_avg(place_like(who, "exp_avg", s.exp_avg(), p));
  s.exp_avg_sq(place_like(who, "exp_avg_sq", s.exp_avg_sq(), p));
  s.max_exp_avg_sq(place_like(who, "max_exp_avg_sq", s.max_exp_avg_sq(), p));
}

}  // namespace

// ---- options ----

template <bool D>
void AdamFamilyOptions<D>::validate() const {
  check_adam_like(kName, lr(), eps(), weight_decay(), betas());
}

void SGDOptions::validate() const {
  check_finite_nonneg("SGD", "lr", lr());
  check_finite_nonneg("SGD", "momentum", momentum());
  check_finite_nonneg("SGD", "weight_decay", weight_decay());
  TORCH_CHECK_VALUE(std::isfinite(dampening()), "SGD: expected a finite dampening, got ", dampening());
  TORCH_CHECK_VALUE(!nesterov() || (momentum() > 0 && dampening() == 0),
                    "SGD: expected momentum > 0 and dampening == 0 with nesterov=true, got momentum ", momentum(),
                    " and dampening ", dampening());
}

template <bool D>
void AdamFamilyOptions<D>::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
}

template <bool D>
void AdamFamilyOptions<D>::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
}

template struct AdamFamilyOptions<false>;
template struct AdamFamilyOptions<true>;

void SGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dampening);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
}

void SGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, dampening);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
}

bool operator==(const SGDOptions& a, const SGDOptions& b) {
  return a.lr() == b.lr() && a.momentum() == b.momentum() && a.dampening() == b.dampening() &&
         a.weight_decay() == b.weight_decay() && a.nesterov() == b.nesterov() && a.maximize() == b.maximize();
}

// ---- param states ----

void AdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
}

void AdamParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, max_exp_avg_sq);
}

void SGDParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void SGDParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
}

// ---- FusedOptimizer ----

torch::Tensor FusedOptimizer::step(LossClosure closure) {
  at::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  step_scaled(at::Tensor(), at::Tensor());
  return loss;
}

void FusedOptimizer::step_scaled(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  detail::check_scale_tensor(grad_scale, "grad_scale");
  detail::check_scale_tensor(found_inf, "found_inf");
  check_groups();
  at::NoGradGuard no_grad;
  fused_step(grad_scale, found_inf);
}

// ---- Adam / AdamW ----

template <class Options>
AdamFamily<Options>::AdamFamily(const std::vector<OptimizerParamGroup>& param_groups, Options defaults)
    : FusedOptimizer(param_groups, std::make_unique<Options>(defaults)) {
  restore_group_options(param_groups_, param_groups);
  defaults.validate();
  check_has_params(Options::kName, param_groups_);
  check_groups();
}
template <class Options>
AdamFamily<Options>::AdamFamily(std::vector<at::Tensor> params, Options defaults)
    : AdamFamily({OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

template <class Options>
void AdamFamily<Options>::check_groups() const {
  check_adam_groups<Options>(Options::kName, param_groups_);
}
template <class Options>
void AdamFamily<Options>::fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  adam_family_step<Options>(Options::kName, *this, Options::kDecoupledWeightDecay, grad_scale, found_inf);
}
template <class Options>
void AdamFamily<Options>::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, Options>(archive, *this);
}
template <class Options>
void AdamFamily<Options>::load(torch::serialize::InputArchive& archive) {
  load_optimizer<AdamParamState, Options>(Options::kName, *this, archive, [](AdamParamState& s, const at::Tensor& p) {
    fix_adam_state(Options::kName, s, p);
  });
}

template class AdamFamily<AdamOptions>;
template class AdamFamily<AdamWOptions>;

// ---- SGD ----

SGD::SGD(const std::vector<OptimizerParamGroup>& param_groups, SGDOptions defaults)
    : FusedOptimizer(param_groups, std::make_unique<SGDOptions>(defaults)) {
  restore_group_options(param_groups_, param_groups);
  defaults.validate();
  check_has_params("SGD", param_groups_);
  check_groups();
}
SGD::SGD(std::vector<at::Tensor> params, SGDOptions defaults)
    : SGD({OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void SGD::check_groups() const {
  for (size_t i = 0; i < param_groups_.size(); ++i) options_of<SGDOptions>("SGD", param_groups_[i], i).validate();
}

void SGD::fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    for (size_t j = 0; j < param_groups_[gi].params().size(); ++j) {
      const auto& p = param_groups_[gi].params()[j];
      if (p.grad().defined()) check_param_grad("SGD", p, p.grad(), gi, j);
    }
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const SGDOptions&>(group.options());
    detail::SGDHyper h;
    h.lr = o.lr();
    h.momentum = o.momentum();
    h.dampening = o.dampening();
    h.weight_decay = o.weight_decay();
    h.nesterov = o.nesterov();
    h.maximize = o.maximize();
    std::vector<at::Tensor> params, grads, bufs;              // parameters with a buffer (or needing none)
    std::vector<at::Tensor> new_params, new_grads, new_bufs;  // first step with dampening != 0
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      if (h.momentum == 0) {
        params.push_back(p);
        grads.push_back(p.grad());
        continue;
      }
      auto it = state_.find(p.unsafeGetTensorImpl());
      if (it != state_.end() && static_cast<SGDParamState&>(*it->second).momentum_buffer().defined()) {
        params.push_back(p);
        grads.push_back(p.grad());
        bufs.push_back(static_cast<SGDParamState&>(*it->second).momentum_buffer());
      } else if (h.dampening == 0) {
        // momentum * 0 + 1 * grad == grad: the ordinary update is torch's first step, and a skipped
        // step leaves the zeros as they were.
        auto s = std::make_unique<SGDParamState>();
        s->momentum_buffer(at::zeros_like(p, at::MemoryFormat::Preserve));
        params.push_back(p);
        grads.push_back(p.grad());
        bufs.push_back(s->momentum_buffer());
        state_[p.unsafeGetTensorImpl()] = std::move(s);
      } else {
        new_params.push_back(p);
        new_grads.push_back(p.grad());
        new_bufs.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
      }
    }
    if (!params.empty()) detail::fused_sgd_(params, grads, bufs, h, /*is_first_step=*/false, grad_scale, found_inf);
    if (!new_params.empty()) {
      detail::fused_sgd_(new_params, new_grads, new_bufs, h, /*is_first_step=*/true, grad_scale, found_inf);
      // The one host read: only a first step that ran may turn its buffers into state.
      if (!detail::found_inf_is_set(found_inf)) {
        for (size_t i = 0; i < new_params.size(); ++i) {
          auto s = std::make_unique<SGDParamState>();
          s->momentum_buffer(new_bufs[i]);
          state_[new_params[i].unsafeGetTensorImpl()] = std::move(s);
        }
      }
    }
  }
}

void SGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SGDParamState, SGDOptions>(archive, *this);
}

void SGD::load(torch::serialize::InputArchive& archive) {
  load_optimizer<SGDParamState, SGDOptions>("SGD", *this, archive, [](SGDParamState& s, const at::Tensor& p) {
    s.momentum_buffer(place_like("SGD", "momentum_buffer", s.momentum_buffer(), p));
  });
}

// ---- shared core ----

namespace detail {

void check_scale_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(!t.defined() || (t.numel() == 1 && t.scalar_type() == at::kFloat),
                    "fused optimizer step: expected ", name,
                    " to be None/undefined or a 1-element float32 tensor, got ", describe(t));
}

// torch's CPU fused SGD kernel reads fp16/bf16 momentum buffers through a float pointer when
// is_first_step is false (torch 2.13: garbage buffers, parameters not updated), so with momentum
// those dtypes take this kernel: torch's fused arithmetic in float32 (its opmath type), in the same
// order of operations, one pass over each tensor. On the CPU the inf flag and the scale are read on
// the host (no device to sync with) and a step to skip is not run at all.
void sgd_lowp_cpu_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& buf, const SGDHyper& h,
                   bool is_first_step, const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  if (found_inf.defined() && found_inf.item<float>() != 0.0f) return;
  // The kernel walks memory linearly: a non-contiguous tensor is worked on through a copy.
  const at::Tensor p = param.contiguous(), g = grad.contiguous(), b = buf.contiguous();
  const float lr = h.lr_tensor.defined() ? h.lr_tensor.item<float>() : static_cast<float>(h.lr);
  const std::optional<float> scale =
      grad_scale.defined() ? std::optional<float>(grad_scale.item<float>()) : std::nullopt;
  SgdLowpArgs args{lr,
                   static_cast<float>(h.momentum),
                   static_cast<float>(1 - h.dampening),
                   static_cast<float>(h.weight_decay),
                   scale.value_or(1.0f),
                   scale.has_value(),
                   h.maximize,
                   h.nesterov,
                   is_first_step};
  at::parallel_for(0, p.numel(), 32768, [&](int64_t begin, int64_t end) {
    if (p.scalar_type() == at::kBFloat16) {
      sgd_lowp_range_bf16(p.data_ptr<c10::BFloat16>(), g.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), begin,
                          end, args);
    } else {
      sgd_lowp_range_fp16(p.data_ptr<c10::Half>(), g.data_ptr<c10::Half>(), b.data_ptr<c10::Half>(), begin, end, args);
    }
  });
  if (!p.is_same(param)) param.copy_(p);
  if (!g.is_same(grad) && args.unscale) grad.copy_(g);
  if (!b.is_same(buf)) buf.copy_(b);
}

// torch's fused optimizers pass a CPU tensor lr as it is (the kernels read it) and copy one on
// another device to each parameter device.
at::Tensor lr_on(const at::Tensor& lr, const c10::Device& device) {
  return lr.device().is_cpu() || lr.device() == device ? lr : lr.to(device, /*non_blocking=*/true);
}

void check_lr_tensor(const char* who, const at::Tensor& lr) {
  TORCH_CHECK_VALUE(!lr.defined() || (lr.numel() == 1 && lr.is_floating_point()), who,
                    ": expected a tensor lr to be a 1-element floating tensor, got ", describe(lr));
}

bool found_inf_is_set(const at::Tensor& found_inf) { return found_inf.defined() && found_inf.item<float>() != 0.0f; }

void fused_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, const AdamHyper& h, const at::Tensor& grad_scale,
                 const at::Tensor& found_inf) {
  const char* who = h.decoupled_weight_decay ? "AdamW" : "Adam";
  check_lr_tensor(who, h.lr_tensor);
  check_scale_tensor(grad_scale, "grad_scale");
  check_scale_tensor(found_inf, "found_inf");
  check_list(who, "grads", grads, params, false);
  for (size_t i = 0; i < params.size(); ++i) check_param_grad(who, params[i], grads[i], 0, i);
  check_list(who, "exp_avgs", exp_avgs, params, false);
  check_list(who, "exp_avg_sqs", exp_avg_sqs, params, false);
  if (h.amsgrad) {
    check_list(who, "max_exp_avg_sqs", max_exp_avg_sqs, params, false);
  } else {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.empty(), who, ": expected no max_exp_avg_sqs without amsgrad, got ",
                      max_exp_avg_sqs.size());
  }
  check_list(who, "state_steps", steps, params, true);
  if (params.empty()) return;

  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  for (const auto& idx : group_by_device_and_dtype(params)) {
    const c10::Device device = params[idx[0]].device();
    const auto p = pick(params, idx);
    const auto g = pick(grads, idx);
    const auto m = pick(exp_avgs, idx);
    const auto v = pick(exp_avg_sqs, idx);
    const auto vmax = pick(max_exp_avg_sqs, idx);
    const auto s = pick(steps, idx);
    const at::Tensor gs = scales.get(device);
    const at::Tensor fi = infs.get(device);
    const std::optional<at::Tensor> gs_opt = gs.defined() ? std::optional<at::Tensor>(gs) : std::nullopt;
    const std::optional<at::Tensor> fi_opt = fi.defined() ? std::optional<at::Tensor>(fi) : std::nullopt;
    // torch counts first and rolls the count back by found_inf afterwards, all on the device.
    at::_foreach_add_(s, 1);
    if (h.lr_tensor.defined()) {
      const at::Tensor lr = lr_on(h.lr_tensor, device);
      if (h.decoupled_weight_decay) {
        at::_fused_adamw_(p, g, m, v, vmax, s, lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                          gs_opt, fi_opt);
      } else {
        at::_fused_adam_(p, g, m, v, vmax, s, lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                         gs_opt, fi_opt);
      }
    } else if (h.decoupled_weight_decay) {
      at::_fused_adamw_(p, g, m, v, vmax, s, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                        gs_opt, fi_opt);
    } else {
      at::_fused_adam_(p, g, m, v, vmax, s, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                       gs_opt, fi_opt);
    }
    if (fi.defined()) at::_foreach_sub_(s, std::vector<at::Tensor>(s.size(), fi));
  }
}

void fused_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const SGDHyper& h,
                bool is_first_step, const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  check_lr_tensor("SGD", h.lr_tensor);
  check_scale_tensor(grad_scale, "grad_scale");
  check_scale_tensor(found_inf, "found_inf");
  check_list("SGD", "grads", grads, params, false);
  for (size_t i = 0; i < params.size(); ++i) check_param_grad("SGD", params[i], grads[i], 0, i);
  if (h.momentum != 0) {
    check_list("SGD", "momentum_buffers", momentum_buffers, params, false);
  } else {
    TORCH_CHECK_VALUE(momentum_buffers.empty(), "SGD: expected no momentum_buffers with momentum 0, got ",
                      momentum_buffers.size());
  }
  if (params.empty()) return;
  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  for (const auto& idx : group_by_device_and_dtype(params)) {
    const c10::Device device = params[idx[0]].device();
    const at::Tensor gs = scales.get(device);
    const at::Tensor fi = infs.get(device);
    const auto dtype = params[idx[0]].scalar_type();
    if (device.is_cpu() && h.momentum != 0 && (dtype == at::kHalf || dtype == at::kBFloat16)) {
      for (size_t i : idx) sgd_lowp_cpu_(params[i], grads[i], momentum_buffers[i], h, is_first_step, gs, fi);
      continue;
    }
    const auto gs_opt = gs.defined() ? std::optional<at::Tensor>(gs) : std::nullopt;
    const auto fi_opt = fi.defined() ? std::optional<at::Tensor>(fi) : std::nullopt;
    if (h.lr_tensor.defined()) {
      at::_fused_sgd_(pick(params, idx), pick(grads, idx), pick(momentum_buffers, idx), h.weight_decay, h.momentum,
                      lr_on(h.lr_tensor, device), h.dampening, h.nesterov, h.maximize, is_first_step, gs_opt, fi_opt);
    } else {
      at::_fused_sgd_(pick(params, idx), pick(grads, idx), pick(momentum_buffers, idx), h.weight_decay, h.momentum,
                      h.lr, h.dampening, h.nesterov, h.maximize, is_first_step, gs_opt, fi_opt);
    }
  }
}

}  // namespace detail
}  // namespace ampkit::optim
