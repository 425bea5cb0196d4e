#include "python/bind.h"

#include <ampkit/autocast.h>

#include "autocast_region.h"

#include <ATen/autocast_mode.h>

#include <pybind11/stl.h>

#include <optional>

namespace ampkit::python {
namespace {

// A region entered and left by explicit calls: Python's `with` decides when, not the
// garbage collector.
class PyAutocastRegion {
 public:
  PyAutocastRegion(const std::string& device_type, c10::ScalarType dtype, bool enabled,
                   std::optional<bool> cache_enabled)
      : device_type_(parse_device_type(device_type)), dtype_(dtype), enabled_(enabled), cache_enabled_(cache_enabled) {}

  void enter() {
    TORCH_CHECK(!region_,
                "ampkit._C._AutocastRegion.enter: expected a region that is not entered, got one "
                "already entered");
    // Entering may rebuild table entries of redefined operators, which can warn.
    region_ =
        with_python_warnings([&] { return detail::enter_autocast(device_type_, dtype_, enabled_, cache_enabled_); });
  }

  void exit() {
    TORCH_CHECK(region_, "ampkit._C._AutocastRegion.exit: expected an entered region, got one not entered");
    detail::AutocastRegionPtr region = std::move(region_);
    detail::exit_autocast(region);  // on a throw the region is left for good (closed or abandoned)
  }

 private:
  c10::DeviceType device_type_;
  c10::ScalarType dtype_;
  bool enabled_;
  std::optional<bool> cache_enabled_;
  detail::AutocastRegionPtr region_;
};

}  // namespace

void bind_autocast(py::module_& m) {
  py::class_<PyAutocastRegion>(m, "_AutocastRegion", "One autocast region; ampkit.autocast enters and leaves it.")
      .def(py::init<const std::string&, c10::ScalarType, bool, std::optional<bool>>(), py::arg("device_type"),
           py::arg("dtype"), py::arg("enabled"), py::arg("cache_enabled"))
      .def("enter", &PyAutocastRegion::enter, "Enters the region on the calling thread.")
      .def("exit", &PyAutocastRegion::exit,
           "Leaves the region, in any order; raises if called on another thread than the one that entered it.");

  m.def(
      "check_autocast_device",
      [](const std::string& device_type) {
        detail::check_autocast_arguments(parse_device_type(device_type), c10::ScalarType::Undefined, false);
      },
      py::arg("device_type"), "Raises RuntimeError unless torch's autocast supports device_type.");
  m.def(
      "is_autocast_enabled", [](const std::string& t) { return is_autocast_enabled(parse_device_type(t)); },
      py::arg("device_type"), "Whether ops on device_type are autocast by ampkit's table on this thread.");
  m.def("autocast_nesting_depth", &autocast_nesting_depth, "Number of ampkit regions open on this thread.");
  m.def("autocast_cache_size", &autocast_cache_size, "Number of weight casts cached on this thread.");
  m.def("clear_autocast_cache", &clear_autocast_cache, "Drops this thread's cached weight casts.");
}

}  // namespace ampkit::python
