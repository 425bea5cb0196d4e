#include "python/bind.h"

#include <ampkit/optim.h>

#include "optim_detail.h"

#include <pybind11/stl.h>

#include <optional>
#include <variant>
#include <vector>

namespace ampkit::python {
namespace {

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// A float lr, or a tensor lr as torch's fused optimizers accept.
using Lr = std::variant<at::Tensor, double>;

template <class Hyper>
void set_lr(Hyper& h, const Lr& lr) {
  if (const auto* t = std::get_if<at::Tensor>(&lr)) {
    h.lr_tensor = *t;
  } else {
    h.lr = std::get<double>(lr);
  }
}

}  // namespace

// ampkit.optim's Python optimizers subclass torch.optim.Optimizer (so that schedulers, state
// dicts and hooks work) and keep their state in Python; each step calls these, the same code
// that ampkit::optim's C++ optimizers run.
void bind_optim(py::module_& m) {
  m.def(
      "_fused_adam_",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
         const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps, const Lr& lr,
         double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
         bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
         const std::optional<at::Tensor>& found_inf) {
        optim::detail::AdamHyper h;
        set_lr(h, lr);
        h.beta1 = beta1;
        h.beta2 = beta2;
        h.weight_decay = weight_decay;
        h.eps = eps;
        h.amsgrad = amsgrad;
        h.maximize = maximize;
        h.decoupled_weight_decay = decoupled_weight_decay;
        optim::detail::fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, h,
                                   or_undefined(grad_scale), or_undefined(found_inf));
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
      py::arg("state_steps"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
      py::arg("eps"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"),
      py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
      "One fused Adam (or AdamW with decoupled_weight_decay) step, as torch's _fused_adam: grouped by device and "
      "dtype, steps counted on the device and rolled back by found_inf. Raises ValueError on mismatched lists.",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "_fused_sgd_",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& momentum_buffers, const Lr& lr, double momentum, double dampening,
         double weight_decay, bool nesterov, bool maximize, bool is_first_step,
         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
        optim::detail::SGDHyper h;
        set_lr(h, lr);
        h.momentum = momentum;
        h.dampening = dampening;
        h.weight_decay = weight_decay;
        h.nesterov = nesterov;
        h.maximize = maximize;
        optim::detail::fused_sgd_(params, grads, momentum_buffers, h, is_first_step, or_undefined(grad_scale),
                                  or_undefined(found_inf));
      },
      py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::kw_only(), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
      py::arg("is_first_step"), py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
      "One fused SGD step on existing momentum buffers (empty list when momentum == 0), grouped by device and "
      "dtype.",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "_check_sgd_options",
      [](double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
        optim::SGDOptions(lr)
            .momentum(momentum)
            .dampening(dampening)
            .weight_decay(weight_decay)
            .nesterov(nesterov)
            .validate();
      },
      py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      "Raises ValueError, naming the option, unless SGD's options are valid.");

  m.def(
      "_check_adam_options",
      [](double lr, double beta1, double beta2, double eps, double weight_decay) {
        optim::AdamOptions(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay).validate();
      },
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      "Raises ValueError, naming the option, unless Adam's / AdamW's options are valid.");
}

}  // namespace ampkit::python
