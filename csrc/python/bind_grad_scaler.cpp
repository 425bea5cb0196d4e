#include "python/bind.h"

#include <ampkit/grad_scaler.h>

#include "grad_scaler_detail.h"

#include <pybind11/stl.h>

#include <optional>

namespace ampkit::python {

// ampkit.GradScaler keeps its options as Python attributes (torch's layout, so that code poking at
// them keeps working) and runs its numerics through the operators torch.ops.ampkit.unscale_grads_
// and update_scale_ (csrc/ops.cpp). What is left here are the range checks, shared with the C++
// GradScaler: each binding converts its arguments and calls one function.
void bind_grad_scaler(py::module_& m) {
  m.def(
      "_check_grad_scaler_options",
      [](double init_scale, double growth_factor, double backoff_factor, int64_t growth_interval, double min_scale,
         double max_scale, int64_t hysteresis, bool check_init_scale) {
        detail::validate_options(detail::options_of(init_scale, growth_factor, backoff_factor, growth_interval,
                                                    min_scale, max_scale, hysteresis),
                                 check_init_scale);
      },
      py::arg("init_scale"), py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"),
      py::arg("min_scale"), py::arg("max_scale"), py::arg("hysteresis"), py::arg("check_init_scale") = true,
      "Raises ValueError, naming the option, unless GradScaler's options are all in range (init_scale is "
      "ignored when check_init_scale is False, as setters do).");

  m.def(
      "_check_grad_scaler_state",
      [](double scale, double growth_factor, double backoff_factor, int64_t growth_interval, int64_t growth_tracker,
         std::optional<double> min_scale, std::optional<double> max_scale, std::optional<int64_t> hysteresis,
         std::optional<int64_t> overflow_streak, double current_growth_factor, double current_backoff_factor,
         int64_t current_growth_interval, double current_min_scale, double current_max_scale,
         int64_t current_hysteresis) {
        detail::options_from_state(
            GradScalerState{scale, growth_factor, backoff_factor, growth_interval, growth_tracker, min_scale, max_scale,
                            hysteresis, overflow_streak},
            detail::options_of(1.0, current_growth_factor, current_backoff_factor, current_growth_interval,
                               current_min_scale, current_max_scale, current_hysteresis));
      },
      py::arg("scale"), py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"),
      py::arg("growth_tracker"), py::arg("min_scale"), py::arg("max_scale"), py::arg("hysteresis"),
      py::arg("overflow_streak"), py::kw_only(), py::arg("current_growth_factor"), py::arg("current_backoff_factor"),
      py::arg("current_growth_interval"), py::arg("current_min_scale"), py::arg("current_max_scale"),
      py::arg("current_hysteresis"),
      "Raises ValueError, naming the key, unless a state dict with these values (None: an absent ampkit key) can "
      "be loaded into a scaler with the current options.");

  m.def(
      "_check_new_scale",
      [](double new_scale, double min_scale, double max_scale) {
        detail::check_new_scale(new_scale, GradScalerOptions().min_scale(min_scale).max_scale(max_scale));
      },
      py::arg("new_scale"), py::arg("min_scale"), py::arg("max_scale"),
      "Raises ValueError unless new_scale is finite and > 0 in float32 and within [min_scale, max_scale].");

  m.def("_reciprocal_scale", &detail::reciprocal_scale, py::arg("scale"),
        "1 / scale in float64, rounded to float32, as torch.amp.GradScaler computes it.",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace ampkit::python
