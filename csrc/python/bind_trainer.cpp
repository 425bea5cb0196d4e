#include "python/bind.h"

#include <ampkit/trainer.h>

#include "trainer_detail.h"

#include <pybind11/stl.h>

#include <vector>

namespace ampkit::python {

// ampkit.Trainer is written in Python on ampkit.autocast and ampkit.GradScaler (it must drive
// Python modules, optimizers and closures); its clipping is the C++ trainer's.
void bind_trainer(py::module_& m) {
  m.def(
      "_clip_grad_norm_",
      [](const std::vector<at::Tensor>& params, double max_norm, const std::optional<at::Tensor>& grad_scale) {
        return detail::clip_grad_norm_(params, max_norm, grad_scale.value_or(at::Tensor()));
      },
      py::arg("params"), py::arg("max_norm"), py::arg("grad_scale") = py::none(),
      "torch.nn.utils.clip_grad_norm_(params, max_norm) without a host sync (foreach norms, clip coefficient "
      "clamped to 1): multiplies the grads in place and returns the total 2-norm before clipping. With "
      "grad_scale the grads are still scaled by it: the norm is theirs divided by it, and they are clipped "
      "scaled. bf16/fp16 norms in float32.",
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace ampkit::python
