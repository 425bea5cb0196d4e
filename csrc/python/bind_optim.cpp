#include "python/bind.h"

#include <ampkit/optim.h>

#include "optim_detail.h"
namespace ampkit::python {

// ampkit.optim's Python optimizers subclass torch.optim.Optimizer (so that schedulers, state
// dicts and hooks work) and keep their state in Python; each step calls the operators
// torch.ops.ampkit.fused_adam_ / fused_sgd_ (csrc/ops.cpp), the code ampkit::optim's C++
// optimizers run. Here: the option checks the C++ options classes make.
namespace {
// The low-precision options, set the same way on either options type.
template <class Options>
Options& with_low_precision(Options& o, bool master_weights, bool stochastic_rounding, c10::ScalarType state_dtype) {
  return o.master_weights(master_weights).stochastic_rounding(stochastic_rounding).state_dtype(state_dtype);
}
}  // namespace

void bind_optim(py::module_& m) {
  m.def(
      "_check_sgd_options",
      [](double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool master_weights,
         bool stochastic_rounding, c10::ScalarType state_dtype) {
        auto o =
            optim::SGDOptions(lr).momentum(momentum).dampening(dampening).weight_decay(weight_decay).nesterov(nesterov);
        with_low_precision(o, master_weights, stochastic_rounding, state_dtype).validate();
      },
      py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("master_weights"), py::arg("stochastic_rounding"), py::arg("state_dtype"),
      "Raises ValueError, naming the option, unless SGD's options are valid.");

  m.def(
      "_check_adam_options",
      [](double lr, double beta1, double beta2, double eps, double weight_decay, bool master_weights,
         bool stochastic_rounding, c10::ScalarType state_dtype) {
        auto o = optim::AdamOptions(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay);
        with_low_precision(o, master_weights, stochastic_rounding, state_dtype).validate();
      },
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("master_weights"), py::arg("stochastic_rounding"), py::arg("state_dtype"),
      "Raises ValueError, naming the option, unless Adam's / AdamW's options are valid.");

  m.def(
      "_check_rounded_param",
      [](const std::string& who, const at::Tensor& p, size_t group, size_t index) {
        optim::detail::check_rounded_param(who.c_str(), p, group, index);
      },
      py::arg("who"), py::arg("param"), py::arg("group"), py::arg("index"),
      "Raises ValueError unless param can be rounded stochastically (bf16 on the CPU, or float32).");
}

}  // namespace ampkit::python
