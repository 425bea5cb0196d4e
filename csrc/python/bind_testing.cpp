// ampkit._C._testing: the C++ GradScaler and Trainer driven from Python, so that the Python tests
// can run them over the same sequences as torch.amp.GradScaler and ampkit.Trainer and compare
// (tests/python/test_cpp_against_torch.py). Not part of the API.
#include "python/bind.h"
#include "optim_detail.h"
#include "optim_lowp_cuda.h"

#include <ampkit/grad_scaler.h>
#include <ampkit/optim.h>
#include <ampkit/trainer.h>

#include <torch/optim/sgd.h>

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ampkit::python {
namespace {

// The optimizers the differential tests use, by name.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind, const std::vector<at::Tensor>& params,
                                                        double lr) {
  if (kind == "sgd") return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(lr));
  if (kind == "sgd_momentum") {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(lr).momentum(0.9));
  }
  if (kind == "adamw_fused") return std::make_unique<optim::AdamW>(params, optim::AdamWOptions(lr));
  // Low-precision parameters (ampkit.optim's master_weights / stochastic_rounding, seed 7).
  if (kind == "adamw_master")
    return std::make_unique<optim::AdamW>(params, optim::AdamWOptions(lr).master_weights(true));
  if (kind == "adamw_sr") {
    return std::make_unique<optim::AdamW>(
        params, optim::AdamWOptions(lr).stochastic_rounding(true).state_dtype(at::kBFloat16).seed(7));
  }
  if (kind == "sgd_master") {
    return std::make_unique<optim::SGD>(params, optim::SGDOptions(lr).momentum(0.9).master_weights(true));
  }
  if (kind == "sgd_sr") {
    return std::make_unique<optim::SGD>(params, optim::SGDOptions(lr).momentum(0.9).stochastic_rounding(true).seed(7));
  }
  TORCH_CHECK_VALUE(false,
                    "_testing: expected optimizer 'sgd', 'sgd_momentum', 'adamw_fused', 'adamw_master', 'adamw_sr', "
                    "'sgd_master' or 'sgd_sr', got '",
                    kind, "'");
}

GradScalerOptions scaler_options(double init_scale, double growth_factor, double backoff_factor,
                                 int64_t growth_interval, bool enabled) {
  return GradScalerOptions()
      .init_scale(init_scale)
      .growth_factor(growth_factor)
      .backoff_factor(backoff_factor)
      .growth_interval(growth_interval)
      .enabled(enabled);
}

// ampkit::GradScaler with a C++ optimizer over tensors that Python owns.
class CppScaler {
 public:
  CppScaler(const std::vector<at::Tensor>& params, const std::string& optimizer, double lr, GradScalerOptions options)
      : optimizer_(make_optimizer(optimizer, params, lr)), scaler_(options) {}

  at::Tensor scale(const at::Tensor& loss) { return scaler_.scale(loss); }
  void unscale_() { scaler_.unscale_(*optimizer_); }
  bool step() { return scaler_.step(*optimizer_); }
  void update(std::optional<double> new_scale) {
    if (new_scale) {
      scaler_.update(*new_scale);
    } else {
      scaler_.update();
    }
  }
  void zero_grad() { optimizer_->zero_grad(); }
  const GradScaler& scaler() const { return scaler_; }

 private:
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  GradScaler scaler_;
};

// ampkit::Trainer with ampkit's fused AdamW over tensors that Python owns.
class CppTrainer {
 public:
  CppTrainer(const std::vector<at::Tensor>& params, double lr, TrainerOptions options)
      : optimizer_(params, optim::AdamWOptions(lr)), trainer_(optimizer_, std::move(options)) {}

  std::optional<double> step(const Trainer::Closure& closure) {
    const StepStats stats = trainer_.step(closure);
    return stats.stepped() && stats.grad_norm().defined() ? std::optional<double>(stats.grad_norm().item<double>())
                                                          : std::nullopt;
  }
  double scale() const { return trainer_.scaler() ? trainer_.scaler()->get_scale() : 1.0; }
  int64_t micro_steps() const { return trainer_.micro_steps(); }

 private:
  optim::AdamW optimizer_;
  Trainer trainer_;
};

}  // namespace

void bind_testing(py::module_& m) {
  auto t = m.def_submodule("_testing", "C++ classes driven from Python by the differential tests; not API.");
  py::class_<CppScaler>(t, "CppScaler", "ampkit::GradScaler and a C++ optimizer over the given tensors.")
      .def(
          py::init([](const std::vector<at::Tensor>& params, const std::string& optimizer, double lr, double init_scale,
                      double growth_factor, double backoff_factor, int64_t growth_interval, bool enabled) {
            return CppScaler(params, optimizer, lr,
                             scaler_options(init_scale, growth_factor, backoff_factor, growth_interval, enabled));
          }),
          py::arg("params"), py::arg("optimizer"), py::arg("lr"), py::arg("init_scale"), py::arg("growth_factor"),
          py::arg("backoff_factor"), py::arg("growth_interval"), py::arg("enabled"))
      .def("scale", &CppScaler::scale, py::arg("loss"))
      .def("unscale_", &CppScaler::unscale_)
      .def("step", &CppScaler::step)
      .def("update", &CppScaler::update, py::arg("new_scale") = py::none())
      .def("zero_grad", &CppScaler::zero_grad)
      .def("get_scale", [](const CppScaler& s) { return s.scaler().get_scale(); })
      .def("get_growth_tracker", [](const CppScaler& s) { return s.scaler().get_growth_tracker(); })
      .def("scale_tensor", [](const CppScaler& s) { return s.scaler().scale_tensor(); });

  py::class_<CppTrainer>(t, "CppTrainer", "ampkit::Trainer with ampkit::optim::AdamW over the given tensors.")
      .def(py::init([](const std::vector<at::Tensor>& params, double lr, c10::ScalarType dtype,
                       int64_t accumulation_steps, std::optional<double> max_grad_norm, double init_scale,
                       int64_t growth_interval) {
             auto options = TrainerOptions(c10::kCPU)
                                .dtype(dtype)
                                .accumulation_steps(accumulation_steps)
                                .scaler(GradScalerOptions().init_scale(init_scale).growth_interval(growth_interval));
             if (dtype != at::kHalf) options.no_scaler();
             if (max_grad_norm) options.max_grad_norm(*max_grad_norm);
             return std::make_unique<CppTrainer>(params, lr, std::move(options));
           }),
           py::arg("params"), py::arg("lr"), py::arg("dtype"), py::arg("accumulation_steps"), py::arg("max_grad_norm"),
           py::arg("init_scale"), py::arg("growth_interval"))
      .def("step", &CppTrainer::step, py::arg("closure"),
           "One micro-batch; returns the grad norm when the optimizer stepped with clipping.",
           py::call_guard<py::gil_scoped_release>())  // backward must not hold the GIL; the closure takes it
      .def("get_scale", &CppTrainer::scale)
      .def_property_readonly("micro_steps", &CppTrainer::micro_steps);

  t.def("set_emulate_cuda_kernels", &optim::detail::set_emulate_cuda_kernels, py::arg("enabled"),
        "Route CPU low-precision optimizer steps through ampkit's CUDA kernel path, its block bodies run on the "
        "host; returns the previous setting.");
  t.def("cuda_kernels_built", &optim::detail::cuda::kernels_built,
        "Whether this build has ampkit's CUDA kernels for low-precision parameters.");
}

}  // namespace ampkit::python
