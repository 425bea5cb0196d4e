#include "python/bind.h"

#include <ampkit/grad_scaler.h>

#include "grad_scaler_detail.h"

#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace ampkit::python {
namespace {

// ampkit.GradScaler keeps its options as Python attributes (torch's layout, so that code poking
// at them keeps working); this rebuilds the C++ options object for the shared core.
GradScalerOptions make_options(double init_scale, double growth_factor, double backoff_factor, int64_t growth_interval,
                               double min_scale, double max_scale, int64_t hysteresis) {
  return GradScalerOptions()
      .init_scale(init_scale)
      .growth_factor(growth_factor)
      .backoff_factor(backoff_factor)
      .growth_interval(growth_interval)
      .min_scale(min_scale)
      .max_scale(max_scale)
      .hysteresis(hysteresis);
}

// A number from a state dict: Python int or float (bool is an int to Python, not to us).
template <class T>
std::optional<T> state_number(const py::dict& sd, const char* key, bool required) {
  if (!sd.contains(key)) {
    TORCH_CHECK_VALUE(!required, "GradScaler.load_state_dict: expected key '", key, "' in the state dict, got keys ",
                      py::str(py::list(sd.attr("keys")())).cast<std::string>());
    return std::nullopt;
  }
  const py::handle v = sd[key];
  const bool is_int = py::isinstance<py::int_>(v) && !py::isinstance<py::bool_>(v);
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK_VALUE(is_int || py::isinstance<py::float_>(v), "GradScaler.load_state_dict: expected '", key,
                      "' to be a float, got ", py::repr(v).cast<std::string>());
    return v.cast<double>();
  } else {
    TORCH_CHECK_VALUE(is_int, "GradScaler.load_state_dict: expected '", key, "' to be an int, got ",
                      py::repr(v).cast<std::string>());
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    TORCH_CHECK_VALUE(overflow == 0, "GradScaler.load_state_dict: expected '", key, "' to fit in 64 bits, got ",
                      py::repr(v).cast<std::string>());
    return static_cast<int64_t>(value);
  }
}

}  // namespace

void bind_grad_scaler(py::module_& m) {
  m.def(
      "_check_grad_scaler_options",
      [](double init_scale, double growth_factor, double backoff_factor, int64_t growth_interval, double min_scale,
         double max_scale, int64_t hysteresis, bool check_init_scale) {
        detail::validate_options(
            make_options(init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, hysteresis),
            check_init_scale);
      },
      py::arg("init_scale"), py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"),
      py::arg("min_scale"), py::arg("max_scale"), py::arg("hysteresis"), py::arg("check_init_scale") = true,
      "Raises ValueError, naming the option, unless GradScaler's options are all in range (init_scale is "
      "ignored when check_init_scale is False, as setters do).");

  m.def(
      "_check_grad_scaler_state",
      [](const py::dict& sd, double growth_factor, double backoff_factor, int64_t growth_interval, double min_scale,
         double max_scale, int64_t hysteresis) {
        GradScalerState state;
        state.scale = *state_number<double>(sd, "scale", true);
        state.growth_factor = *state_number<double>(sd, "growth_factor", true);
        state.backoff_factor = *state_number<double>(sd, "backoff_factor", true);
        state.growth_interval = *state_number<int64_t>(sd, "growth_interval", true);
        state.growth_tracker = *state_number<int64_t>(sd, "_growth_tracker", true);
        state.min_scale = state_number<double>(sd, "min_scale", false);
        state.max_scale = state_number<double>(sd, "max_scale", false);
        state.hysteresis = state_number<int64_t>(sd, "hysteresis", false);
        state.overflow_streak = state_number<int64_t>(sd, "_overflow_streak", false);
        detail::options_from_state(
            state, make_options(1.0, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, hysteresis));
      },
      py::arg("state_dict"), py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"),
      py::arg("min_scale"), py::arg("max_scale"), py::arg("hysteresis"),
      "Raises ValueError, naming the key, unless state_dict (ampkit's or torch.amp.GradScaler's) can be loaded into "
      "a scaler with these options; absent ampkit keys keep these options.");

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

  m.def(
      "_unscale_grads_",
      [](const std::vector<at::Tensor>& params, const at::Tensor& inv_scale, bool allow_fp16) {
        return detail::unscale_grads_(params, inv_scale, allow_fp16);
      },
      py::arg("params"), py::arg("inv_scale"), py::arg("allow_fp16"),
      "Multiplies the grads of params by inv_scale in place, grouped by device and dtype; coalesces fp16 sparse "
      "grads. Returns one found_inf tensor per device (1.0 where a grad held inf/NaN). Raises ValueError on fp16 "
      "grads unless allow_fp16.",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "_update_scale_",
      [](at::Tensor& scale, at::Tensor& growth_tracker, at::Tensor& overflow_streak,
         const std::vector<at::Tensor>& found_infs, double growth_factor, double backoff_factor,
         int64_t growth_interval, double min_scale, double max_scale, int64_t hysteresis) {
        // The scale is valid (it was checked when set); only the update parameters matter here.
        const auto options =
            make_options(min_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, hysteresis);
        detail::update_scale_(scale, growth_tracker, overflow_streak, found_infs, options);
      },
      py::arg("scale"), py::arg("growth_tracker"), py::arg("overflow_streak"), py::arg("found_infs"),
      py::arg("growth_factor"), py::arg("backoff_factor"), py::arg("growth_interval"), py::arg("min_scale"),
      py::arg("max_scale"), py::arg("hysteresis"),
      "Updates scale, growth_tracker and overflow_streak in place on their device from the combined found_infs: "
      "torch's _amp_update_scale_, then hysteresis and the [min_scale, max_scale] bounds. Never synchronizes.",
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace ampkit::python
