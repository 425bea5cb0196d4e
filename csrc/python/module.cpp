#include "python/bind.h"

#include <c10/util/Exception.h>

namespace ampkit::python {

c10::DeviceType parse_device_type(const std::string& device_type) {
  try {
    return c10::Device(device_type).type();
  } catch (const c10::Error&) {
    // RuntimeError, the type torch raises for an invalid device string.
    TORCH_CHECK(false, "ampkit: expected device_type to be a device type string such as 'cpu' or 'cuda', got '",
                device_type, "'");
  }
}

}  // namespace ampkit::python

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() =
      "ampkit's C++ core: cast-policy tables, autocast regions, gradient scaling, fused optimizers, the trainer's "
      "clipping";
  // c10 errors arrive as the Python exceptions torch raises for them, without the C++ backtrace.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  ampkit::python::bind_cast_policy(m);
  ampkit::python::bind_autocast(m);
  ampkit::python::bind_grad_scaler(m);
  ampkit::python::bind_optim(m);
  ampkit::python::bind_trainer(m);
  ampkit::python::bind_diagnostics(m);
  ampkit::python::bind_testing(m);
}
