#include <ampkit/optim.h>

#include "optim_detail.h"
#include "optim_lowp_cuda.h"
#include "tensor_groups.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <ostream>
#include <string>
#include <utility>

namespace ampkit::optim {

using ampkit::detail::group_by_device_and_dtype;
using ampkit::detail::PerDeviceCopies;
using ampkit::detail::pick;
namespace {

using torch::optim::OptimizerParamGroup;
using torch::optim::OptimizerParamState;

// The device types with fused Adam/AdamW/SGD kernels in torch (_get_fused_kernels_supported_devices):
// the one list that both the check and its message read.
constexpr std::array<c10::DeviceType, 4> kFusedDeviceTypes = {c10::kCPU, c10::kCUDA, c10::kXPU, c10::kMPS};

bool device_supported(c10::DeviceType t) {
  return std::find(kFusedDeviceTypes.begin(), kFusedDeviceTypes.end(), t) != kFusedDeviceTypes.end();
}

// "cpu, cuda, xpu, mps".
std::string fused_device_names() {
  std::string out;
  for (const auto t : kFusedDeviceTypes) out += (out.empty() ? "" : ", ") + c10::DeviceTypeName(t, /*lower_case=*/true);
  return out;
}

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return t.toString() + " of shape " + c10::str(t.sizes()) + " on " + t.device().str();
}

// Where a parameter sits, for error messages: "(group 1, index 3)" in an optimizer's param groups,
// "(index 3)" in the flat lists of fused_adam_ / fused_sgd_, which know no groups.
struct ParamPosition {
  std::optional<size_t> group;
  size_t index;
};
std::ostream& operator<<(std::ostream& out, const ParamPosition& pos) {
  out << "(";
  if (pos.group) out << "group " << *pos.group << ", ";
  return out << "index " << pos.index << ")";
}

// A parameter and its grad are usable by the fused kernels. Checked once per step for every
// parameter, before any state is created or any tensor changes: by FusedOptimizer::step_scaled for
// the optimizers, by fused_adam_ / fused_sgd_ for their lists.
void check_param_grad(const char* who, const at::Tensor& p, const at::Tensor& g, ParamPosition pos) {
  TORCH_CHECK_VALUE(p.defined() && p.is_floating_point() && !p.is_complex(), who,
                    ": expected floating-point parameters, got ", describe(p), " ", pos);
  // RuntimeError, the type torch's fused optimizers raise for such parameters.
  TORCH_CHECK(device_supported(p.device().type()), who, ": expected parameters on a device with fused kernels (",
              fused_device_names(), "), got ", describe(p), " ", pos);
  TORCH_CHECK_VALUE(!g.is_sparse(), who, ": expected dense gradients, got a sparse one ", pos,
                    "; fused optimizers do not support sparse gradients");
  TORCH_CHECK_VALUE(
      g.defined() && g.scalar_type() == p.scalar_type() && g.device() == p.device() && g.sizes() == p.sizes(), who,
      ": expected each gradient to match its parameter's dtype, device and shape (", describe(p), "), got ",
      describe(g), " ", pos);
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
const Options& options_of(const OptimizerParamGroup& group, size_t i) {
  const auto* o = dynamic_cast<const Options*>(&group.options());
  TORCH_CHECK_VALUE(o != nullptr, Options::kName, ": expected the options of param group ", i,
                    " to be ampkit::optim::", Options::kName, "Options, got another optimizer's options");
  return *o;
}

template <class Options>
void check_groups_of(const std::vector<OptimizerParamGroup>& groups) {
  for (size_t i = 0; i < groups.size(); ++i) options_of<Options>(groups[i], i).validate();
}

// What every fused optimizer's constructor does after torch::optim::Optimizer's: the caller's group
// options back, then the checks (defaults, at least one parameter, every group's options).
template <class Options>
void finish_construction(torch::optim::Optimizer& opt, const std::vector<OptimizerParamGroup>& given,
                         const Options& defaults) {
  restore_group_options(opt.param_groups(), given);
  defaults.validate();
  check_has_params(Options::kName, opt.param_groups());
  check_groups_of<Options>(opt.param_groups());
  for (size_t gi = 0; gi < opt.param_groups().size(); ++gi) {
    const auto& group = opt.param_groups()[gi];
    if (!static_cast<const Options&>(group.options()).stochastic_rounding()) continue;
    for (size_t j = 0; j < group.params().size(); ++j)
      detail::check_rounded_param(Options::kName, group.params()[j], gi, j);
  }
}

// Where GradScaler hands in one found_inf that is the sum over devices, the kernels want exactly
// 0 or 1 (they compare with 1 to skip, and the step rollback subtracts it).
PerDeviceCopies found_inf_copies(const at::Tensor& found_inf) {
  return PerDeviceCopies(found_inf, false, [](const at::Tensor& t) { return t.reshape({}).clamp_max(1.0); });
}

PerDeviceCopies grad_scale_copies(const at::Tensor& grad_scale) {
  return PerDeviceCopies(grad_scale, false, [](const at::Tensor& t) { return t.reshape({}); });
}

// The checks of fused_adam_ / fused_sgd_, whose callers hand in every list: the grads, then each
// state list (one tensor per parameter, like it, or a float32 step counter on its device).
void check_params_and_grads(const char* who, at::TensorList params, at::TensorList grads) {
  TORCH_CHECK_VALUE(grads.size() == params.size(), who, ": expected grads to have one tensor per parameter (",
                    params.size(), "), got ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) check_param_grad(who, params[i], grads[i], {std::nullopt, i});
}

enum class StateKind { like_param, step };

bool is_low_precision(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// How the parameters of one call step: with masters (one per parameter, or none), stochastically
// rounded, or neither.
struct LowpLayout {
  at::TensorList masters;
  bool stochastic = false;
  // Whether params[i] steps through the one-pass low-precision path.
  bool master_of(const at::Tensor& p) const { return !masters.empty() && is_low_precision(p); }
  bool rounded(const at::Tensor& p) const { return stochastic && p.scalar_type() == at::kBFloat16; }
  // The dtypes a state of \p p may have: float32 next to a master, float32 or bf16 with stochastic
  // rounding, the parameter's own otherwise.
  bool state_dtype_ok(const at::Tensor& p, at::ScalarType dtype) const {
    if (master_of(p)) return dtype == at::kFloat;
    if (rounded(p)) return dtype == at::kFloat || dtype == at::kBFloat16;
    return dtype == p.scalar_type();
  }
};

// Set by _C._testing: CPU tensors take the CUDA kernels' path, their block bodies run on the host.
std::atomic<bool> emulating_cuda_kernels{false};

// Whether bf16/fp16 parameters with masters or stochastic rounding on \p device take ampkit's CUDA
// kernels (optim_lowp_cuda.h): CUDA tensors in a build with them.
bool takes_cuda_kernels(const c10::Device& device) {
  return (device.is_cuda() && detail::cuda::kernels_built()) || (device.is_cpu() && emulating_cuda_kernels.load());
}

// A parameter that a stochastic_rounding step can take: bf16 on the CPU (or on CUDA in a build with
// ampkit's CUDA kernels), or float32 (which steps as usual).
void check_rounded_param(const char* who, const at::Tensor& p, ParamPosition pos) {
  TORCH_CHECK_VALUE(p.scalar_type() != at::kHalf, who,
                    ": expected bfloat16 or float32 parameters with stochastic_rounding (fp16 needs master_weights), "
                    "got ",
                    describe(p), " ", pos);
  const c10::Device device = p.device();
  TORCH_CHECK_VALUE(p.scalar_type() != at::kBFloat16 || device.is_cpu() || takes_cuda_kernels(device), who,
                    ": stochastic_rounding runs on CPU parameters and on CUDA ones where ampkit is built with its "
                    "CUDA kernels (this build: ",
                    detail::cuda::kernels_built() ? "with" : "without", "); got ", describe(p), " ", pos);
}

void check_lowp_layout(const char* who, at::TensorList params, const LowpLayout& layout) {
  const auto& masters = layout.masters;
  TORCH_CHECK_VALUE(!(layout.stochastic && !masters.empty()), who,
                    ": expected at most one of master_weights and stochastic_rounding, got both");
  TORCH_CHECK_VALUE(masters.empty() || masters.size() == params.size(), who,
                    ": expected masters to be empty or to have one tensor per parameter (", params.size(), "), got ",
                    masters.size());
  for (size_t i = 0; i < masters.size(); ++i) {
    const auto& p = params[i];
    const auto& m = masters[i];
    if (is_low_precision(p)) {
      TORCH_CHECK_VALUE(m.defined() && m.scalar_type() == at::kFloat && m.device() == p.device() &&
                            m.sizes() == p.sizes() && !m.is_same(p),
                        who, ": expected masters[", i, "] to be a float32 copy of its parameter (", describe(p),
                        "), got ", describe(m));
    } else {
      TORCH_CHECK_VALUE(m.is_same(p), who, ": expected masters[", i,
                        "] to be the parameter itself (a float32 parameter is its own master), got ", describe(m));
    }
  }
  if (!layout.stochastic) return;
  for (size_t i = 0; i < params.size(); ++i) check_rounded_param(who, params[i], {std::nullopt, i});
}

void check_state_list(const char* who, const char* name, at::TensorList list, at::TensorList params, StateKind kind,
                      const LowpLayout& layout = {}) {
  TORCH_CHECK_VALUE(list.size() == params.size(), who, ": expected ", name, " to have one tensor per parameter (",
                    params.size(), "), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    if (kind == StateKind::step) {
      TORCH_CHECK_VALUE(
          t.defined() && t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == params[i].device(), who,
          ": expected ", name, "[", i, "] to be a 1-element float32 tensor on ", params[i].device(), ", got ",
          describe(t));
    } else {
      TORCH_CHECK_VALUE(t.defined() && layout.state_dtype_ok(params[i], t.scalar_type()) &&
                            t.device() == params[i].device() && t.sizes() == params[i].sizes(),
                        who, ": expected ", name, "[", i, "] to match its parameter (", describe(params[i]),
                        layout.master_of(params[i]) ? ", in float32 next to a master"
                        : layout.rounded(params[i]) ? ", in float32 or bfloat16"
                                                    : "",
                        "), got ", describe(t));
    }
  }
}

void check_lr_tensor(const char* who, const at::Tensor& lr) {
  TORCH_CHECK_VALUE(!lr.defined() || (lr.numel() == 1 && lr.is_floating_point()), who,
                    ": expected a tensor lr to be a 1-element floating tensor, got ", describe(lr));
}

// Moves a loaded state tensor to its parameter's device, in \p dtype.
at::Tensor place_like(const char* who, const char* name, const at::Tensor& t, const at::Tensor& param,
                      at::ScalarType dtype) {
  if (!t.defined()) return t;
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), who, ".load: expected state '", name,
                    "' to have its parameter's shape ", param.sizes(), ", got ", t.sizes());
  return t.to(param.device(), dtype);
}

// The dtype of the states of \p p under options \p o: float32 next to a master, state_dtype with
// stochastic rounding, the parameter's own otherwise.
template <class Options>
at::ScalarType state_dtype_for(const at::Tensor& p, const Options& o) {
  if (is_low_precision(p) && o.master_weights()) return at::kFloat;
  if (o.stochastic_rounding() && p.scalar_type() == at::kBFloat16) return o.state_dtype();
  return p.scalar_type();
}

// The master of \p p where \p o asks for one: the loaded or existing one (float32, on p's device),
// or a copy of p; undefined otherwise (a master left from before is dropped: p already holds it
// rounded).
template <class Options>
at::Tensor master_for(const at::Tensor& p, const Options& o, const at::Tensor& existing) {
  if (!(is_low_precision(p) && o.master_weights())) return at::Tensor();
  if (existing.defined()) return existing.to(p.device(), at::kFloat);
  return p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
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
    const auto& o = static_cast<const Options&>(*saved_groups[i].second);
    o.validate();
    for (size_t j = 0; j < params.size(); ++j) {
      auto it = saved_state.find(reinterpret_cast<void*>(std::stoull(keys[j])));
      if (it == saved_state.end()) continue;
      auto state = std::make_unique<State>(static_cast<const State&>(*it->second));
      fix(*state, params[j], o);
      new_state[params[j].unsafeGetTensorImpl()] = std::move(state);
    }
    new_options.push_back(o);
  }
  // Commit: nothing below throws.
  opt.state() = std::move(new_state);
  for (size_t i = 0; i < groups.size(); ++i) groups[i].set_options(std::make_unique<Options>(new_options[i]));
}

// ---- the kernels, on lists already checked ----

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Calls \p run with the lr of \p h as ATen's fused kernels take it, which have one overload per lr
// type: the double, or the tensor. torch's fused optimizers pass a CPU tensor lr as it is (the
// kernels read it) and copy one on another device to each parameter device.
template <class Hyper, class Run>
void with_lr(const Hyper& h, const c10::Device& device, Run&& run) {
  const at::Tensor& lr = h.lr_tensor;
  if (!lr.defined()) {
    run(h.lr);
  } else {
    run(lr.device().is_cpu() || lr.device() == device ? lr : lr.to(device, /*non_blocking=*/true));
  }
}

// The tensors a one-pass CPU kernel walks: each contiguous (a non-contiguous one is worked on
// through a copy, written back afterwards) and seen through a raw pointer.
class ContiguousWork {
 public:
  void* ptr(const at::Tensor& t) {
    if (!t.defined()) return nullptr;
    at::Tensor c = t.contiguous();
    if (!c.is_same(t)) copies_.emplace_back(t, c);
    return c.data_ptr();
  }
  // Writes the copies back (the grads only if \p grads_changed). \p grad is the grad of this tensor.
  void finish(const at::Tensor& grad, bool grads_changed) {
    for (auto& [orig, copy] : copies_) {
      if (orig.is_same(grad) && !grads_changed) continue;
      orig.copy_(copy);
    }
    copies_.clear();
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
};

detail::LowpDtype lowp_dtype(at::ScalarType t) {
  return t == at::kHalf       ? detail::LowpDtype::fp16
         : t == at::kBFloat16 ? detail::LowpDtype::bf16
                              : detail::LowpDtype::fp32;
}

// Whether torch's CPU kernels run their FMA builds here (AVX2, AVX-512: ATen's capability, which
// ATEN_CPU_CAPABILITY lowers), whose fused Adam fuses some multiply-adds (optim_lowp_kernels.cpp).
bool torch_kernels_fuse() {
  static const bool fuse = [] {
    const std::string cap = at::get_cpu_capability();
    return cap.find("AVX512") != std::string::npos || cap.find("AVX2") != std::string::npos;
  }();
  return fuse;
}

double lr_value(const at::Tensor& lr_tensor, double lr) { return lr_tensor.defined() ? lr_tensor.item<double>() : lr; }

// Adam/AdamW on bf16/fp16 parameters of one device (the CPU) and dtype, in one pass per tensor:
// with masters (\p masters one per parameter), or stochastically rounded (\p masters empty). The
// steps were counted already; the CPU reads found_inf and the scale directly (no device to sync
// with), and a step to skip is not run at all.
void run_adam_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const detail::AdamHyper& h, const at::Tensor& grad_scale, const at::Tensor& found_inf,
                       const std::vector<size_t>& indices) {
  if (detail::found_inf_is_set(found_inf)) return;
  const double lr = lr_value(h.lr_tensor, h.lr);
  for (size_t i = 0; i < params.size(); ++i) {
    // torch's fused kernel: the scalars in double, then rounded to float32 where the lanes use them.
    const double step = steps[i].item<float>();
    const double bias_correction1 = 1 - std::pow(h.beta1, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(1 - std::pow(h.beta2, step));
    const detail::AdamLowpArgs args{static_cast<float>(1 - h.beta1),
                                    static_cast<float>(h.beta2),
                                    static_cast<float>(1 - h.beta2),
                                    static_cast<float>(bias_correction2_sqrt),
                                    static_cast<float>(h.eps),
                                    static_cast<float>(-step_size),
                                    static_cast<float>(h.weight_decay),
                                    static_cast<float>(1 - lr * h.weight_decay),
                                    grad_scale.defined() ? grad_scale.item<float>() : 1.0f,
                                    h.decoupled_weight_decay,
                                    grad_scale.defined(),
                                    h.maximize,
                                    torch_kernels_fuse()};
    ContiguousWork work;
    detail::LowpTensors t;
    t.param = work.ptr(params[i]);
    t.grad = work.ptr(grads[i]);
    t.master = masters.empty() ? nullptr : static_cast<float*>(work.ptr(masters[i]));
    t.state = {work.ptr(exp_avgs[i]), work.ptr(exp_avg_sqs[i]),
               max_exp_avg_sqs.empty() ? nullptr : work.ptr(max_exp_avg_sqs[i])};
    t.param_dtype = lowp_dtype(params[i].scalar_type());
    t.state_dtype = lowp_dtype(exp_avgs[i].scalar_type());
    t.stochastic = masters.empty();
    t.rounding_key = detail::rounding_key(
        static_cast<std::uint64_t>(h.low_precision.seed), static_cast<std::uint64_t>(step),
        detail::rounding_tensor_index(static_cast<std::uint64_t>(h.low_precision.group_index), indices[i]));
    at::parallel_for(0, params[i].numel(), 32768,
                     [&](int64_t begin, int64_t end) { detail::adam_lowp_range(t, begin, end, args); });
    work.finish(grads[i], /*grads_changed=*/false);
  }
}

// The tensors of one launch of ampkit's CUDA kernels (or of their emulation on the CPU): every
// pointer into a contiguous tensor (a non-contiguous one through a copy, written back after the
// launch; the grads are only read, so theirs are not), plus the scalars every kernel reads, with the
// inf flag, the scale and a device lr read on the device (no sync).
class CudaLaunch {
 public:
  CudaLaunch(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList steps,
             const std::vector<size_t>& indices, const detail::LowPrecision& lp, const at::Tensor& lr_tensor, double lr,
             double weight_decay, bool maximize, const at::Tensor& grad_scale, const at::Tensor& found_inf)
      : device_(params[0].device()), tensors_(params.size()) {
    for (size_t i = 0; i < params.size(); ++i) {
      auto& t = tensors_[i];
      t.param = written_.ptr(params[i]);
      t.grad = read_.ptr(grads[i]);
      t.master = masters.empty() ? nullptr : static_cast<float*>(written_.ptr(masters[i]));
      t.step = steps.empty() ? nullptr : static_cast<const float*>(steps[i].const_data_ptr());
      t.numel = params[i].numel();
      t.index = static_cast<std::uint32_t>(indices[i]);
    }
    common_.param_dtype = lowp_dtype(params[0].scalar_type());
    common_.stochastic = masters.empty();
    common_.maximize = maximize;
    // torch's functor: the double scalars rounded to float32; a tensor lr read on the device, or on
    // the host where it is a CPU tensor.
    if (lr_tensor.defined() && !lr_tensor.device().is_cpu()) {
      lr_ = lr_tensor.to(device_, at::kFloat, /*non_blocking=*/true);
      common_.lr_ptr = lr_.const_data_ptr<float>();
    } else {
      common_.lr = static_cast<float>(lr_value(lr_tensor, lr));
    }
    common_.weight_decay = static_cast<float>(weight_decay);
    common_.grad_scale = grad_scale.defined() ? grad_scale.const_data_ptr<float>() : nullptr;
    common_.found_inf = found_inf.defined() ? found_inf.const_data_ptr<float>() : nullptr;
    common_.seed = static_cast<std::uint64_t>(lp.seed);
    common_.group_index = static_cast<std::uint64_t>(lp.group_index);
  }

  // The states (one list per state, one tensor per parameter, all of one dtype).
  void set_states(std::initializer_list<at::TensorList> states) {
    size_t k = 0;
    for (const auto& list : states) {
      for (size_t i = 0; i < list.size(); ++i) tensors_[i].state[k] = written_.ptr(list[i]);
      if (!list.empty()) common_.state_dtype = lowp_dtype(list[0].scalar_type());
      ++k;
    }
  }
  const detail::cuda::Common& common() const { return common_; }

  // Runs \p launch(tensors, count, stream) on the device (the CUDA kernels), or \p emulate(tensors,
  // count) for CPU tensors, then writes the copies back.
  template <class Launch, class Emulate>
  void run(const char* who, Launch&& launch, Emulate&& emulate) {
    const char* error = nullptr;
    if (device_.is_cpu()) {
      error = emulate(tensors_.data(), tensors_.size());
    } else {
      const c10::DeviceGuard guard(device_);
      void* stream = c10::impl::getDeviceGuardImpl(device_.type())->getStream(device_).native_handle();
      error = launch(tensors_.data(), tensors_.size(), stream);
    }
    TORCH_CHECK(error == nullptr, who, ": ampkit's low-precision kernel on ", device_, " failed: ", error);
    written_.finish(at::Tensor(), true);
  }

 private:
  c10::Device device_;
  std::vector<detail::cuda::TensorPtrs> tensors_;
  detail::cuda::Common common_;
  ContiguousWork written_;
  ContiguousWork read_;  // never finished: the grads are not written
  at::Tensor lr_;        // a device lr on this device, alive until the launch
};

// The positions of \p states by dtype (one launch per dtype: a kernel reads one state type); all
// positions of \p count when \p states is empty.
std::vector<std::vector<size_t>> by_state_dtype(at::TensorList states, size_t count) {
  std::vector<std::vector<size_t>> out;
  std::vector<at::ScalarType> dtypes;
  for (size_t i = 0; i < count; ++i) {
    const auto dtype = states.empty() ? at::kFloat : states[i].scalar_type();
    const auto it = std::find(dtypes.begin(), dtypes.end(), dtype);
    if (it == dtypes.end()) {
      dtypes.push_back(dtype);
      out.push_back({i});
    } else {
      out[it - dtypes.begin()].push_back(i);
    }
  }
  return out;
}

std::vector<size_t> pick_indices(const std::vector<size_t>& indices, const std::vector<size_t>& positions) {
  std::vector<size_t> out;
  out.reserve(positions.size());
  for (const size_t k : positions) out.push_back(indices[k]);
  return out;
}

// Adam/AdamW on bf16/fp16 CUDA parameters with masters or stochastic rounding: ampkit's kernels,
// sync-free (the steps were counted already; a step to skip is skipped on the device). With
// stochastic rounding the tensors' states may differ in dtype (float32 or bf16): one launch each.
void run_adam_lowp_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                        const detail::AdamHyper& h, const at::Tensor& grad_scale, const at::Tensor& found_inf,
                        const std::vector<size_t>& indices) {
  const auto groups = by_state_dtype(exp_avgs, params.size());
  if (groups.size() > 1) {
    for (const auto& k : groups) {
      run_adam_lowp_cuda(pick(params, k), pick(grads, k), pick(masters, k), pick(exp_avgs, k), pick(exp_avg_sqs, k),
                         pick(max_exp_avg_sqs, k), pick(steps, k), h, grad_scale, found_inf, pick_indices(indices, k));
    }
    return;
  }
  CudaLaunch launch(params, grads, masters, steps, indices, h.low_precision, h.lr_tensor, h.lr, h.weight_decay,
                    h.maximize, grad_scale, found_inf);
  launch.set_states({exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  detail::cuda::AdamArgs args;
  args.common = launch.common();
  args.beta1 = static_cast<float>(h.beta1);
  args.beta2 = static_cast<float>(h.beta2);
  args.eps = static_cast<float>(h.eps);
  args.decoupled_weight_decay = h.decoupled_weight_decay;
  args.amsgrad = !max_exp_avg_sqs.empty();
  launch.run(
      h.decoupled_weight_decay ? AdamWOptions::kName : AdamOptions::kName,
      [&](const auto* t, size_t n, void* stream) { return detail::cuda::adam(t, n, args, stream); },
      [&](const auto* t, size_t n) { return detail::cuda::emulate_adam(t, n, args); });
}

// The master step where no one-pass kernel exists (CUDA and the other devices): torch's fused step
// on the float32 masters with the grads upcast, then the parameters rounded from the masters. A
// skipped step leaves the masters, and so the parameters, as they were.
template <class Step>
void run_master_composed(at::TensorList params, at::TensorList grads, at::TensorList masters, Step&& step) {
  std::vector<at::Tensor> grads32;
  grads32.reserve(grads.size());
  for (const auto& g : grads) grads32.push_back(g.to(at::kFloat));
  step(masters, grads32);
  at::_foreach_copy_(params, masters);
}

// torch's _fused_adam / _fused_adamw over each device and dtype: steps counted first and rolled
// back by found_inf afterwards, all on the device. bf16/fp16 parameters with masters or stochastic
// rounding take the one-pass kernel on the CPU (masters: torch's fused step on them elsewhere).
void run_fused_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList masters,
                    const detail::AdamHyper& h, PerDeviceCopies& scales, PerDeviceCopies& infs) {
  const LowpLayout layout{masters, h.low_precision.stochastic_rounding};
  for (const auto& idx : group_by_device_and_dtype(params)) {
    const c10::Device device = params[idx[0]].device();
    const auto p = pick(params, idx);
    const auto g = pick(grads, idx);
    const auto m = pick(exp_avgs, idx);
    const auto v = pick(exp_avg_sqs, idx);
    const auto vmax = pick(max_exp_avg_sqs, idx);
    const auto s = pick(steps, idx);
    const auto mst = pick(masters, idx);
    const at::Tensor fi = infs.get(device);
    const auto gs_opt = optional_of(scales.get(device));
    const auto fi_opt = optional_of(fi);
    auto fused = [&](at::TensorList ps, at::TensorList gs) {
      with_lr(h, device, [&](const auto& lr) {
        if (h.decoupled_weight_decay) {
          at::_fused_adamw_(ps, gs, m, v, vmax, s, lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                            gs_opt, fi_opt);
        } else {
          at::_fused_adam_(ps, gs, m, v, vmax, s, lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.amsgrad, h.maximize,
                           gs_opt, fi_opt);
        }
      });
    };
    at::_foreach_add_(s, 1);
    const at::Tensor& first = params[idx[0]];
    const bool lowp = layout.master_of(first) || layout.rounded(first);
    if (lowp && takes_cuda_kernels(device)) {
      run_adam_lowp_cuda(p, g, mst, m, v, vmax, s, h, scales.get(device), fi, idx);
    } else if (lowp && device.is_cpu()) {
      run_adam_lowp_cpu(p, g, mst, m, v, vmax, s, h, scales.get(device), fi, idx);
    } else if (layout.master_of(first)) {
      run_master_composed(p, g, mst, fused);
    } else {
      fused(p, g);
    }
    if (fi.defined()) at::_foreach_sub_(s, std::vector<at::Tensor>(s.size(), fi));
  }
}

// SGD on bf16/fp16 parameters of the CPU in one pass per tensor: with masters, stochastically rounded
// (\p steps: the counters that key the random bits, counted here), or neither (with momentum:
// torch's CPU fused SGD kernel reads fp16/bf16 momentum buffers through a float pointer when
// is_first_step is false, torch 2.13: garbage buffers, parameters not updated). torch's fused
// arithmetic in float32 (its opmath type), in the same order of operations. On the CPU the inf flag
// and the scale are read on the host (no device to sync with) and a step to skip is not run at all.
void run_sgd_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                      at::TensorList steps, const detail::SGDHyper& h, bool is_first_step, const at::Tensor& grad_scale,
                      const at::Tensor& found_inf, const std::vector<size_t>& indices) {
  if (detail::found_inf_is_set(found_inf)) return;
  const bool stochastic = !steps.empty();
  const detail::SgdLowpArgs args{static_cast<float>(lr_value(h.lr_tensor, h.lr)),
                                 static_cast<float>(h.momentum),
                                 static_cast<float>(1 - h.dampening),
                                 static_cast<float>(h.weight_decay),
                                 grad_scale.defined() ? grad_scale.item<float>() : 1.0f,
                                 grad_scale.defined(),
                                 h.maximize,
                                 h.nesterov,
                                 is_first_step,
                                 /*write_grad=*/masters.empty() && !stochastic};
  for (size_t i = 0; i < params.size(); ++i) {
    ContiguousWork work;
    detail::LowpTensors t;
    t.param = work.ptr(params[i]);
    t.grad = work.ptr(grads[i]);
    t.master = masters.empty() ? nullptr : static_cast<float*>(work.ptr(masters[i]));
    t.state[0] = bufs.empty() ? nullptr : work.ptr(bufs[i]);
    t.param_dtype = lowp_dtype(params[i].scalar_type());
    t.state_dtype = bufs.empty() ? detail::LowpDtype::fp32 : lowp_dtype(bufs[i].scalar_type());
    if (stochastic) {
      steps[i].add_(1);
      t.stochastic = true;
      t.rounding_key = detail::rounding_key(
          static_cast<std::uint64_t>(h.low_precision.seed), static_cast<std::uint64_t>(steps[i].item<float>()),
          detail::rounding_tensor_index(static_cast<std::uint64_t>(h.low_precision.group_index), indices[i]));
    }
    at::parallel_for(0, params[i].numel(), 32768,
                     [&](int64_t begin, int64_t end) { detail::sgd_lowp_range(t, begin, end, args); });
    work.finish(grads[i], args.write_grad && args.unscale);
  }
}

// SGD on bf16/fp16 CUDA parameters with masters or stochastic rounding (\p steps: the counters that
// key the random bits, counted already): ampkit's kernels, sync-free.
void run_sgd_lowp_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                       at::TensorList steps, const detail::SGDHyper& h, bool is_first_step,
                       const at::Tensor& grad_scale, const at::Tensor& found_inf, const std::vector<size_t>& indices) {
  const auto groups = by_state_dtype(bufs, params.size());
  if (groups.size() > 1) {
    for (const auto& k : groups) {
      run_sgd_lowp_cuda(pick(params, k), pick(grads, k), pick(bufs, k), pick(masters, k), pick(steps, k), h,
                        is_first_step, grad_scale, found_inf, pick_indices(indices, k));
    }
    return;
  }
  CudaLaunch launch(params, grads, masters, steps, indices, h.low_precision, h.lr_tensor, h.lr, h.weight_decay,
                    h.maximize, grad_scale, found_inf);
  launch.set_states({bufs});
  detail::cuda::SgdArgs args;
  args.common = launch.common();
  args.momentum = static_cast<float>(h.momentum);
  args.dampening = static_cast<float>(h.dampening);
  args.nesterov = h.nesterov;
  args.first_step = is_first_step;
  launch.run(
      SGDOptions::kName, [&](const auto* t, size_t n, void* stream) { return detail::cuda::sgd(t, n, args, stream); },
      [&](const auto* t, size_t n) { return detail::cuda::emulate_sgd(t, n, args); });
}

// torch's _fused_sgd over each device and dtype; run_sgd_lowp_cpu for bf16/fp16 CPU parameters with
// masters, stochastic rounding or momentum (where torch's CPU kernel is wrong).
void run_fused_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList masters,
                   at::TensorList steps, const detail::SGDHyper& h, bool is_first_step, PerDeviceCopies& scales,
                   PerDeviceCopies& infs) {
  const LowpLayout layout{masters, h.low_precision.stochastic_rounding};
  for (const auto& idx : group_by_device_and_dtype(params)) {
    const c10::Device device = params[idx[0]].device();
    const at::Tensor gs = scales.get(device);
    const at::Tensor fi = infs.get(device);
    const auto p = pick(params, idx);
    const auto g = pick(grads, idx);
    const auto b = pick(momentum_buffers, idx);
    const at::Tensor& first = params[idx[0]];
    auto fused = [&](at::TensorList ps, at::TensorList grs) {
      with_lr(h, device, [&](const auto& lr) {
        at::_fused_sgd_(ps, grs, b, h.weight_decay, h.momentum, lr, h.dampening, h.nesterov, h.maximize, is_first_step,
                        optional_of(gs), optional_of(fi));
      });
    };
    const bool master = layout.master_of(first);
    const bool rounded = layout.rounded(first);
    if ((master || rounded) && takes_cuda_kernels(device)) {
      const auto s = rounded ? pick(steps, idx) : std::vector<at::Tensor>();
      if (!s.empty()) at::_foreach_add_(s, 1);
      run_sgd_lowp_cuda(p, g, b, master ? pick(masters, idx) : std::vector<at::Tensor>(), s, h, is_first_step, gs, fi,
                        idx);
      if (!s.empty() && fi.defined()) at::_foreach_sub_(s, std::vector<at::Tensor>(s.size(), fi));
    } else if (device.is_cpu() && (master || rounded || (h.momentum != 0 && is_low_precision(first)))) {
      run_sgd_lowp_cpu(p, g, b, master ? pick(masters, idx) : std::vector<at::Tensor>(),
                       rounded ? pick(steps, idx) : std::vector<at::Tensor>(), h, is_first_step, gs, fi, idx);
    } else if (master) {
      run_master_composed(p, g, pick(masters, idx), fused);
    } else {
      fused(p, g);
    }
  }
}

// ---- what the optimizer classes hand to the kernels ----

template <class Options>
detail::LowPrecision low_precision_of(const Options& o, size_t group_index) {
  return {o.stochastic_rounding(), o.seed(), static_cast<int64_t>(group_index)};
}

template <class Options>
detail::AdamHyper adam_hyper(const Options& o, size_t group_index) {
  detail::AdamHyper h;
  h.low_precision = low_precision_of(o, group_index);
  h.lr = o.lr();
  h.beta1 = std::get<0>(o.betas());
  h.beta2 = std::get<1>(o.betas());
  h.weight_decay = o.weight_decay();
  h.eps = o.eps();
  h.amsgrad = o.amsgrad();
  h.maximize = o.maximize();
  h.decoupled_weight_decay = Options::kDecoupledWeightDecay;
  return h;
}

detail::SGDHyper sgd_hyper(const SGDOptions& o, size_t group_index) {
  detail::SGDHyper h;
  h.low_precision = low_precision_of(o, group_index);
  h.lr = o.lr();
  h.momentum = o.momentum();
  h.dampening = o.dampening();
  h.weight_decay = o.weight_decay();
  h.nesterov = o.nesterov();
  h.maximize = o.maximize();
  return h;
}

// A state tensor of \p p in \p dtype: zeros where there is none yet, the existing one otherwise
// (converted where the options changed the dtype since it was made).
at::Tensor state_like(const at::Tensor& existing, const at::Tensor& p, at::ScalarType dtype) {
  if (!existing.defined()) return at::zeros_like(p, p.options().dtype(dtype), at::MemoryFormat::Preserve);
  return existing.to(dtype);
}

// The parameters with a grad of one Adam group and their state, created where missing as torch's
// fused _init_group creates it: zeros, and a float32 step on the param's device; with master
// weights the masters (copies of the parameters) and float32 moments.
struct AdamLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters;
};

template <class Options>
AdamLists adam_lists_of(const OptimizerParamGroup& group, const Options& o,
                        ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>>& state) {
  AdamLists l;
  for (const auto& p : group.params()) {
    if (!p.grad().defined()) continue;
    auto& slot = state[p.unsafeGetTensorImpl()];
    if (!slot) {
      auto s = std::make_unique<AdamParamState>();
      s->step(at::zeros({}, p.options().dtype(at::kFloat)));
      slot = std::move(s);
    }
    auto& s = static_cast<AdamParamState&>(*slot);
    const at::ScalarType dtype = state_dtype_for(p, o);
    s.exp_avg(state_like(s.exp_avg(), p, dtype));
    s.exp_avg_sq(state_like(s.exp_avg_sq(), p, dtype));
    // Also where amsgrad was switched on after some steps (torch would fail): the maximum starts at zero.
    if (o.amsgrad()) s.max_exp_avg_sq(state_like(s.max_exp_avg_sq(), p, dtype));
    s.master(master_for(p, o, s.master()));
    l.params.push_back(p);
    l.grads.push_back(p.grad());
    l.exp_avgs.push_back(s.exp_avg());
    l.exp_avg_sqs.push_back(s.exp_avg_sq());
    if (o.amsgrad()) l.max_exp_avg_sqs.push_back(s.max_exp_avg_sq());
    l.steps.push_back(s.step());
    if (o.master_weights()) l.masters.push_back(s.master().defined() ? s.master() : p);
  }
  return l;
}

// The parameters with a grad of one SGD group, sorted by how their step runs.
struct SgdLists {
  std::vector<at::Tensor> params, grads, bufs, masters, steps;
  void add(const at::Tensor& p, const at::Tensor& buf, const SGDParamState* s, const SGDOptions& o) {
    params.push_back(p);
    grads.push_back(p.grad());
    if (buf.defined()) bufs.push_back(buf);
    if (o.master_weights()) masters.push_back(s != nullptr && s->master().defined() ? s->master() : p);
    if (o.stochastic_rounding()) steps.push_back(s->step());
  }
};
struct SgdGroupPlan {
  SgdLists ordinary;        // momentum 0, or a buffer that the ordinary update may change in place
  SgdLists first_dampened;  // the first step with dampening != 0: buffers that become state if it ran
};

// The state of \p p before a step: the master and the rounding counter that the options ask for
// (made here: a skipped step leaves them as made), the momentum buffer in its dtype. Null where p
// needs none of them yet (plain SGD, or a first dampened step: its buffer becomes state only if the
// step runs).
SGDParamState* sgd_state_of(const at::Tensor& p, const SGDOptions& o, bool keep_buffer,
                            ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>>& state) {
  auto it = state.find(p.unsafeGetTensorImpl());
  SGDParamState* s = it == state.end() ? nullptr : static_cast<SGDParamState*>(it->second.get());
  const bool master = is_low_precision(p) && o.master_weights();
  const bool counter = o.stochastic_rounding();
  if (s == nullptr && !(master || counter || keep_buffer)) return nullptr;
  if (s == nullptr) {
    auto made = std::make_unique<SGDParamState>();
    s = made.get();
    state[p.unsafeGetTensorImpl()] = std::move(made);
  }
  s->master(master_for(p, o, s->master()));
  if (counter && !s->step().defined()) s->step(at::zeros({}, p.options().dtype(at::kFloat)));
  if (s->momentum_buffer().defined()) s->momentum_buffer(s->momentum_buffer().to(state_dtype_for(p, o)));
  return s;
}

SgdGroupPlan plan_sgd_group(const OptimizerParamGroup& group, const SGDOptions& o, const detail::SGDHyper& h,
                            ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>>& state) {
  SgdGroupPlan plan;
  for (const auto& p : group.params()) {
    if (!p.grad().defined()) continue;
    const at::ScalarType dtype = state_dtype_for(p, o);
    if (h.momentum == 0) {
      plan.ordinary.add(p, at::Tensor(), sgd_state_of(p, o, false, state), o);
      continue;
    }
    SGDParamState* s = sgd_state_of(p, o, h.dampening == 0, state);
    if (s != nullptr && s->momentum_buffer().defined()) {
      plan.ordinary.add(p, s->momentum_buffer(), s, o);
    } else if (h.dampening == 0) {
      // momentum * 0 + 1 * grad == grad: the ordinary update is torch's first step, and a skipped
      // step leaves the zeros as they were.
      s->momentum_buffer(state_like(at::Tensor(), p, dtype));
      plan.ordinary.add(p, s->momentum_buffer(), s, o);
    } else {
      plan.first_dampened.add(p, state_like(at::Tensor(), p, dtype), s, o);
    }
  }
  return plan;
}

// torch's first step `buf = grad` on fresh buffers. It differs from the ordinary update when
// dampening != 0, so a skipped one must not leave its buffers behind: the one host read of SGD.
void sgd_first_dampened_step(const SgdLists& l, const detail::SGDHyper& h, const at::Tensor& found_inf,
                             PerDeviceCopies& scales, PerDeviceCopies& infs,
                             ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>>& state) {
  run_fused_sgd(l.params, l.grads, l.bufs, l.masters, l.steps, h, /*is_first_step=*/true, scales, infs);
  if (detail::found_inf_is_set(found_inf)) return;
  for (size_t i = 0; i < l.params.size(); ++i) {
    auto& slot = state[l.params[i].unsafeGetTensorImpl()];
    if (!slot) slot = std::make_unique<SGDParamState>();
    static_cast<SGDParamState&>(*slot).momentum_buffer(l.bufs[i]);
  }
}

// A loaded master: float32 of the parameter's shape, on its device; dropped where the options
// want none (master_for).
template <class Options>
at::Tensor place_master(const char* who, const at::Tensor& t, const at::Tensor& p, const Options& o) {
  return master_for(p, o, place_like(who, "master", t, p, at::kFloat));
}

template <class Options>
void fix_adam_state(const char* who, AdamParamState& s, const at::Tensor& p, const Options& o) {
  s.step(place_step(who, s.step(), p));
  TORCH_CHECK_VALUE(s.exp_avg().defined() && s.exp_avg_sq().defined(), who,
                    ".load: expected states 'exp_avg' and 'exp_avg_sq' in the archive");
  const at::ScalarType dtype = state_dtype_for(p, o);
  s.exp_avg(place_like(who, "exp_avg", s.exp_avg(), p, dtype));
  s.exp_avg_sq(place_like(who, "exp_avg_sq", s.exp_avg_sq(), p, dtype));
  s.max_exp_avg_sq(place_like(who, "max_exp_avg_sq", s.max_exp_avg_sq(), p, dtype));
  s.master(place_master(who, s.master(), p, o));
}

}  // namespace

// ---- options ----

// The low-precision options, the same in every options type.
template <class Options>
void check_low_precision(const Options& o) {
  const char* who = Options::kName;
  TORCH_CHECK_VALUE(!(o.master_weights() && o.stochastic_rounding()), who,
                    ": expected at most one of master_weights and stochastic_rounding, got both");
  TORCH_CHECK_VALUE(o.state_dtype() == at::kFloat || o.state_dtype() == at::kBFloat16, who,
                    ": expected state_dtype float32 or bfloat16, got ", o.state_dtype());
  TORCH_CHECK_VALUE(o.state_dtype() == at::kFloat || o.stochastic_rounding(), who,
                    ": expected state_dtype bfloat16 only with stochastic_rounding (master weights keep float32 "
                    "states), got state_dtype ",
                    o.state_dtype(), " without it");
}

template <class Options>
void write_low_precision(torch::serialize::OutputArchive& archive, const Options& o) {
  archive.write("master_weights", c10::IValue(o.master_weights()));
  archive.write("stochastic_rounding", c10::IValue(o.stochastic_rounding()));
  archive.write("state_dtype", c10::IValue(static_cast<int64_t>(o.state_dtype())));
  archive.write("seed", c10::IValue(o.seed()));
}

// Archives of versions before the low-precision options hold none of them: the defaults stay.
template <class Options>
void read_low_precision(torch::serialize::InputArchive& archive, Options& o) {
  c10::IValue v;
  if (archive.try_read("master_weights", v)) o.master_weights(v.toBool());
  if (archive.try_read("stochastic_rounding", v)) o.stochastic_rounding(v.toBool());
  if (archive.try_read("state_dtype", v)) o.state_dtype(static_cast<c10::ScalarType>(v.toInt()));
  if (archive.try_read("seed", v)) o.seed(v.toInt());
}

template <bool D>
void AdamFamilyOptions<D>::validate() const {
  check_adam_like(kName, lr(), eps(), weight_decay(), betas());
  check_low_precision(*this);
}

void SGDOptions::validate() const {
  check_finite_nonneg("SGD", "lr", lr());
  check_finite_nonneg("SGD", "momentum", momentum());
  check_finite_nonneg("SGD", "weight_decay", weight_decay());
  TORCH_CHECK_VALUE(std::isfinite(dampening()), "SGD: expected a finite dampening, got ", dampening());
  TORCH_CHECK_VALUE(!nesterov() || (momentum() > 0 && dampening() == 0),
                    "SGD: expected momentum > 0 and dampening == 0 with nesterov=true, got momentum ", momentum(),
                    " and dampening ", dampening());
  check_low_precision(*this);
}

template <bool D>
void AdamFamilyOptions<D>::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  write_low_precision(archive, *this);
}

template <bool D>
void AdamFamilyOptions<D>::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  read_low_precision(archive, *this);
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
  write_low_precision(archive, *this);
}

void SGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, dampening);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  read_low_precision(archive, *this);
}

bool operator==(const SGDOptions& a, const SGDOptions& b) {
  return a.lr() == b.lr() && a.momentum() == b.momentum() && a.dampening() == b.dampening() &&
         a.weight_decay() == b.weight_decay() && a.nesterov() == b.nesterov() && a.maximize() == b.maximize() &&
         a.master_weights() == b.master_weights() && a.stochastic_rounding() == b.stochastic_rounding() &&
         a.state_dtype() == b.state_dtype() && a.seed() == b.seed();
}

// ---- param states ----

void AdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master);
}

void AdamParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, max_exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, master);
}

void SGDParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
}

void SGDParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, master);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
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
  // Every check of a step, once, before anything changes; fused_step then only works.
  detail::check_scale_tensor(grad_scale, "grad_scale");
  detail::check_scale_tensor(found_inf, "found_inf");
  check_groups();
  const char* who = name();
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    const auto& params = param_groups_[gi].params();
    const bool rounded = stochastic_rounding(param_groups_[gi]);
    for (size_t j = 0; j < params.size(); ++j) {
      if (!params[j].grad().defined()) continue;
      check_param_grad(who, params[j], params[j].grad(), {gi, j});
      if (rounded) check_rounded_param(who, params[j], {gi, j});
    }
  }
  at::NoGradGuard no_grad;
  fused_step(grad_scale, found_inf);
}

// ---- Adam / AdamW ----

template <class Options>
AdamFamily<Options>::AdamFamily(const std::vector<OptimizerParamGroup>& param_groups, Options defaults)
    : FusedOptimizer(param_groups, std::make_unique<Options>(defaults)) {
  finish_construction(*this, param_groups, defaults);
}
template <class Options>
AdamFamily<Options>::AdamFamily(std::vector<at::Tensor> params, Options defaults)
    : AdamFamily({OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

template <class Options>
const char* AdamFamily<Options>::name() const {
  return Options::kName;
}
template <class Options>
void AdamFamily<Options>::check_groups() const {
  check_groups_of<Options>(param_groups_);
}
template <class Options>
bool AdamFamily<Options>::stochastic_rounding(const OptimizerParamGroup& group) const {
  return static_cast<const Options&>(group.options()).stochastic_rounding();
}
template <class Options>
void AdamFamily<Options>::fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    const auto& group = param_groups_[gi];
    const auto& o = static_cast<const Options&>(group.options());
    const AdamLists l = adam_lists_of(group, o, state_);
    if (l.params.empty()) continue;
    run_fused_adam(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.max_exp_avg_sqs, l.steps, l.masters,
                   adam_hyper(o, gi), scales, infs);
  }
}
template <class Options>
void AdamFamily<Options>::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, Options>(archive, *this);
}
template <class Options>
void AdamFamily<Options>::load(torch::serialize::InputArchive& archive) {
  load_optimizer<AdamParamState, Options>(
      Options::kName, *this, archive,
      [](AdamParamState& s, const at::Tensor& p, const Options& o) { fix_adam_state(Options::kName, s, p, o); });
}

template class AdamFamily<AdamOptions>;
template class AdamFamily<AdamWOptions>;

// ---- SGD ----

SGD::SGD(const std::vector<OptimizerParamGroup>& param_groups, SGDOptions defaults)
    : FusedOptimizer(param_groups, std::make_unique<SGDOptions>(defaults)) {
  finish_construction(*this, param_groups, defaults);
}
SGD::SGD(std::vector<at::Tensor> params, SGDOptions defaults)
    : SGD({OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

const char* SGD::name() const { return SGDOptions::kName; }
void SGD::check_groups() const { check_groups_of<SGDOptions>(param_groups_); }
bool SGD::stochastic_rounding(const OptimizerParamGroup& group) const {
  return static_cast<const SGDOptions&>(group.options()).stochastic_rounding();
}

void SGD::fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    const auto& group = param_groups_[gi];
    const auto& o = static_cast<const SGDOptions&>(group.options());
    const detail::SGDHyper h = sgd_hyper(o, gi);
    const SgdGroupPlan plan = plan_sgd_group(group, o, h, state_);
    const SgdLists& l = plan.ordinary;
    if (!l.params.empty()) {
      run_fused_sgd(l.params, l.grads, l.bufs, l.masters, l.steps, h, /*is_first_step=*/false, scales, infs);
    }
    if (!plan.first_dampened.params.empty()) {
      sgd_first_dampened_step(plan.first_dampened, h, found_inf, scales, infs, state_);
    }
  }
}

void SGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SGDParamState, SGDOptions>(archive, *this);
}

void SGD::load(torch::serialize::InputArchive& archive) {
  load_optimizer<SGDParamState, SGDOptions>(
      "SGD", *this, archive, [](SGDParamState& s, const at::Tensor& p, const SGDOptions& o) {
        s.momentum_buffer(place_like("SGD", "momentum_buffer", s.momentum_buffer(), p, state_dtype_for(p, o)));
        s.master(place_master("SGD", s.master(), p, o));
        if (s.step().defined()) s.step(place_step("SGD", s.step(), p));
      });
}

// ---- the entry points of the Python optimizers: every list checked, then the kernels ----

namespace detail {

void check_rounded_param(const char* who, const at::Tensor& p, size_t group, size_t index) {
  ampkit::optim::check_rounded_param(who, p, {group, index});
}

void check_scale_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(!t.defined() || (t.numel() == 1 && t.scalar_type() == at::kFloat),
                    "fused optimizer step: expected ", name,
                    " to be None/undefined or a 1-element float32 tensor, got ", describe(t));
}

bool set_emulate_cuda_kernels(bool enabled) { return emulating_cuda_kernels.exchange(enabled); }

bool found_inf_is_set(const at::Tensor& found_inf) { return found_inf.defined() && found_inf.item<float>() != 0.0f; }

void fused_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList masters, const AdamHyper& h,
                 const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  const char* who = h.decoupled_weight_decay ? AdamWOptions::kName : AdamOptions::kName;
  check_lr_tensor(who, h.lr_tensor);
  check_scale_tensor(grad_scale, "grad_scale");
  check_scale_tensor(found_inf, "found_inf");
  check_params_and_grads(who, params, grads);
  const LowpLayout layout{masters, h.low_precision.stochastic_rounding};
  check_lowp_layout(who, params, layout);
  check_state_list(who, "exp_avgs", exp_avgs, params, StateKind::like_param, layout);
  check_state_list(who, "exp_avg_sqs", exp_avg_sqs, params, StateKind::like_param, layout);
  if (h.amsgrad) {
    check_state_list(who, "max_exp_avg_sqs", max_exp_avg_sqs, params, StateKind::like_param, layout);
  } else {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.empty(), who, ": expected no max_exp_avg_sqs without amsgrad, got ",
                      max_exp_avg_sqs.size());
  }
  check_state_list(who, "state_steps", steps, params, StateKind::step);
  // The one-pass kernel reads all states of a tensor as one dtype (float32 or bf16 when rounded).
  for (size_t i = 0; i < params.size(); ++i) {
    const at::ScalarType dtype = exp_avgs[i].scalar_type();
    TORCH_CHECK_VALUE(
        exp_avg_sqs[i].scalar_type() == dtype && (!h.amsgrad || max_exp_avg_sqs[i].scalar_type() == dtype), who,
        ": expected the states of parameter ", i, " to share one dtype (exp_avgs[", i, "] is ", dtype,
        "), got exp_avg_sqs[", i, "] ", exp_avg_sqs[i].scalar_type());
  }
  if (params.empty()) return;
  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  run_fused_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, h, scales, infs);
}

void fused_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList masters,
                at::TensorList steps, const SGDHyper& h, bool is_first_step, const at::Tensor& grad_scale,
                const at::Tensor& found_inf) {
  const char* who = SGDOptions::kName;
  check_lr_tensor(who, h.lr_tensor);
  check_scale_tensor(grad_scale, "grad_scale");
  check_scale_tensor(found_inf, "found_inf");
  check_params_and_grads(who, params, grads);
  const LowpLayout layout{masters, h.low_precision.stochastic_rounding};
  check_lowp_layout(who, params, layout);
  if (layout.stochastic) {
    check_state_list(who, "state_steps", steps, params, StateKind::step);
  } else {
    TORCH_CHECK_VALUE(steps.empty(), who, ": expected no state_steps without stochastic_rounding, got ", steps.size());
  }
  if (h.momentum != 0) {
    check_state_list(who, "momentum_buffers", momentum_buffers, params, StateKind::like_param, layout);
  } else {
    TORCH_CHECK_VALUE(momentum_buffers.empty(), who, ": expected no momentum_buffers with momentum 0, got ",
                      momentum_buffers.size());
  }
  if (params.empty()) return;
  auto scales = grad_scale_copies(grad_scale);
  auto infs = found_inf_copies(found_inf);
  run_fused_sgd(params, grads, momentum_buffers, masters, steps, h, is_first_step, scales, infs);
}

}  // namespace detail
}  // namespace ampkit::optim
