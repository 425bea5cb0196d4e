#pragma once
// One bind_<concept>() per concept; module.cpp only calls them.

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/core/DeviceType.h>

#include <string>

namespace ampkit::python {

namespace py = pybind11;

// "cpu" / "cuda" (also "cuda:0") -> the device type, with an error that names the argument.
c10::DeviceType parse_device_type(const std::string& device_type);

// Runs \p f with TORCH_WARN turned into Python warnings, as torch's own bindings do. Needs the GIL.
template <class F>
auto with_python_warnings(F&& f) -> decltype(f()) {
  torch::PyWarningHandler handler;
  try {
    return f();
  } catch (...) {
    handler.set_in_exception();
    throw;
  }
}

void bind_cast_policy(py::module_& m);
void bind_autocast(py::module_& m);
void bind_grad_scaler(py::module_& m);
void bind_optim(py::module_& m);
void bind_trainer(py::module_& m);
void bind_diagnostics(py::module_& m);
void bind_testing(py::module_& m);

}  // namespace ampkit::python
