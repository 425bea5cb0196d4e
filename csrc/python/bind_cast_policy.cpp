#include "python/bind.h"

#include <ampkit/cast_policy.h>

#include "autocast_kernel.h"

#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace ampkit::python {

void bind_cast_policy(py::module_& m) {
  py::enum_<CastPolicy>(m, "CastPolicy", "How an operator's floating inputs are treated under autocast.")
      .value("lower_precision_fp", CastPolicy::lower_precision_fp, "cast to the autocast dtype (fp16 / bf16)")
      .value("fp32", CastPolicy::fp32, "cast to float32")
      .value("fp32_set_opt_dtype", CastPolicy::fp32_set_opt_dtype, "fill an absent dtype= with float32")
      .value("fp32_append_dtype", CastPolicy::fp32_append_dtype, "call the dtype overload with float32")
      .value("promote", CastPolicy::promote, "run in the widest floating input type")
      .value("banned", CastPolicy::banned, "refuse to run under autocast");

  m.def(
      "get_policy",
      [](const std::string& op, const std::string& device_type) {
        return with_python_warnings([&] { return get_policy(op, parse_device_type(device_type)); });
      },
      py::arg("op"), py::arg("device_type"),
      "The policy of op (e.g. 'aten::mm') on device_type, or None when it has no entry.");
  m.def(
      "set_policy",
      [](const std::string& op, const std::string& device_type, CastPolicy policy) {
        with_python_warnings([&] { set_policy(op, parse_device_type(device_type), policy); });
      },
      py::arg("op"), py::arg("device_type"), py::arg("policy"),
      "Adds or replaces the entry of op. Refused (table unchanged) for unknown or in-place ops and for a "
      "policy that does not fit the op's schema.");
  m.def(
      "remove_policy",
      [](const std::string& op, const std::string& device_type) {
        return with_python_warnings([&] { return remove_policy(op, parse_device_type(device_type)); });
      },
      py::arg("op"), py::arg("device_type"), "Removes the entry of op; returns False when it had none.");
  m.def(
      "list_policies",
      [](const std::string& device_type) {
        return with_python_warnings([&] { return list_policies(parse_device_type(device_type)); });
      },
      py::arg("device_type"), "The table of device_type as a dict op -> CastPolicy.");
  m.def(
      "default_policies",
      [](const std::string& device_type) { return default_policies(parse_device_type(device_type)); },
      py::arg("device_type"), "torch's own autocast list for device_type, for the installed torch.");
  m.def(
      "reset_policies",
      [](const std::optional<std::string>& device_type) {
        with_python_warnings([&] {
          if (device_type)
            reset_policies(parse_device_type(*device_type));
          else
            reset_policies();
        });
      },
      py::arg("device_type") = py::none(), "Restores the default table of device_type, or of every device type.");
  m.def(
      "policy_device_types",
      [] {
        std::vector<std::string> names;
        for (auto t : policy_device_types()) names.push_back(c10::DeviceTypeName(t, /*lower_case=*/true));
        return names;
      },
      "The device types that have a cast-policy table, e.g. ['cpu', 'cuda'].");
  m.def("_policy_generation", &detail::policy_generation,
        "A counter bumped by every table edit, from C++ or Python (compiled graphs compare it).");
}

}  // namespace ampkit::python
