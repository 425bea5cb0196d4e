#include "python/bind.h"

#include <ampkit/diagnostics.h>

#include "diagnostics_hooks.h"

#include <torch/csrc/DynamicTypes.h>

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

namespace ampkit::python {
namespace {

// torch.float16 and friends, as Python objects.
py::object dtype_object(c10::ScalarType dtype) {
  return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
}
py::list dtype_list(const std::vector<c10::ScalarType>& dtypes) {
  py::list out;
  for (auto d : dtypes) out.append(dtype_object(d));
  return out;
}
py::object optional_dtype(const std::optional<c10::ScalarType>& dtype) {
  return dtype ? dtype_object(*dtype) : py::object(py::none());
}
std::string device_name(c10::DeviceType type) { return c10::DeviceTypeName(type, /*lower_case=*/true); }
py::object policy_name(const std::optional<CastPolicy>& policy) {
  return policy ? py::object(py::str(to_string(*policy))) : py::object(py::none());
}

}  // namespace

// ampkit.precision_report and ampkit.overflow_locator (python/ampkit/_diagnostics.py) are context
// managers around these; the records come back as plain values (dtypes as torch.dtype, policies and
// device types as strings) and the Python side makes dicts of them.
void bind_diagnostics(py::module_& m) {
  py::class_<PrecisionRecord>(m, "_PrecisionRecord", "One row of a precision report.")
      .def_readonly("op", &PrecisionRecord::op)
      .def_property_readonly("device", [](const PrecisionRecord& r) { return device_name(r.device); })
      .def_readonly("phase", &PrecisionRecord::phase)
      .def_readonly("module", &PrecisionRecord::module)
      .def_property_readonly("policy", [](const PrecisionRecord& r) { return policy_name(r.policy); })
      .def_property_readonly("in_dtypes", [](const PrecisionRecord& r) { return dtype_list(r.in_dtypes); })
      .def_property_readonly("arg_dtypes", [](const PrecisionRecord& r) { return dtype_list(r.arg_dtypes); })
      .def_property_readonly("out_dtype", [](const PrecisionRecord& r) { return optional_dtype(r.out_dtype); })
      .def_readonly("nested", &PrecisionRecord::nested)
      .def_readonly("calls", &PrecisionRecord::calls)
      .def_readonly("casts", &PrecisionRecord::casts)
      .def_readonly("cached_casts", &PrecisionRecord::cached_casts)
      .def_readonly("cast_bytes", &PrecisionRecord::cast_bytes);

  py::class_<OverflowEvent>(m, "_OverflowEvent", "What an overflow locator found.")
      .def_readonly("op", &OverflowEvent::op)
      .def_readonly("phase", &OverflowEvent::phase)
      .def_readonly("module", &OverflowEvent::module)
      .def_readonly("grad_fn", &OverflowEvent::grad_fn)
      .def_property_readonly("device", [](const OverflowEvent& e) { return device_name(e.device); })
      .def_property_readonly("in_dtypes", [](const OverflowEvent& e) { return dtype_list(e.in_dtypes); })
      .def_property_readonly("out_dtype", [](const OverflowEvent& e) { return optional_dtype(e.out_dtype); })
      .def_readonly("input_absmax", &OverflowEvent::input_absmax)
      .def_readonly("policy_op", &OverflowEvent::policy_op)
      .def_property_readonly("policy", [](const OverflowEvent& e) { return policy_name(e.policy); })
      .def_readonly("cause", &OverflowEvent::cause)
      .def_readonly("loss_scale", &OverflowEvent::loss_scale)
      .def_property_readonly("suggested_edit",
                             [](const OverflowEvent& e) -> py::object {
                               if (!e.suggestion) return py::none();
                               return py::make_tuple(e.suggestion->op, device_name(e.suggestion->device),
                                                     to_string(e.suggestion->policy));
                             })
      .def_readonly("explanation", &OverflowEvent::explanation)
      .def_readonly("op_index", &OverflowEvent::op_index);

  py::class_<PrecisionReport>(m, "_PrecisionReport", "Records every op from construction until stop().")
      .def(py::init<>())
      .def("stop", &PrecisionReport::stop)
      .def("rows", &PrecisionReport::rows)
      .def("to_string", &PrecisionReport::to_string, py::arg("nested") = false, py::arg("phase") = "");

  py::class_<OverflowLocator>(m, "_OverflowLocator", "Watches every op's outputs from construction until stop().")
      .def(py::init<>())
      .def("stop", &OverflowLocator::stop)
      .def("first", &OverflowLocator::first)
      .def("first_nonfinite_input", &OverflowLocator::first_nonfinite_input)
      .def("reset", &OverflowLocator::reset)
      .def("set_loss_scale", &OverflowLocator::set_loss_scale, py::arg("scale"));

  m.def("_push_module_scope", &detail::push_module_scope, py::arg("name"),
        "Ops this thread runs are attributed to name until the matching _pop_module_scope().");
  m.def(
      "_pop_module_scope", [](const std::string& name) { return detail::pop_module_scope(&name); }, py::arg("name"),
      "Ends the innermost _push_module_scope() if it is name; returns whether it did.");
  m.def("_module_scope_depth", &detail::module_scope_depth, "How many module scopes are open on this thread.");
  m.def("_truncate_module_scopes", &detail::truncate_module_scopes, py::arg("depth"),
        "Ends the module scopes above depth (those a KeyboardInterrupt in a forward left open).");
  m.def(
      "_diagnostics_live", [] { return detail::live_diagnostic_sessions.load(std::memory_order_relaxed) > 0; },
      "Whether a precision report or overflow locator is alive.");
  m.def("_note_loss_scale", &detail::note_loss_scale, py::arg("scale"),
        "Tells live overflow locators the loss scale that this backward pass's gradients carry.");
}

}  // namespace ampkit::python
