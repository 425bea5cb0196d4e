#pragma once
// Internal: the numerical core of trainer.cpp that the Python bindings (csrc/python/) and the tests
// call directly. Not installed; C++ users use the classes of <ampkit/trainer.h>.

#include <ampkit/trainer.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace ampkit {

namespace detail {
/// torch.nn.utils.clip_grad_norm_(params, max_norm) without a sync: the total 2-norm of the
/// grads from per-(device, dtype) _foreach_norm results, clip coefficient
/// max_norm / (norm + 1e-6) clamped to 1, grads multiplied in place. Returns the total norm
/// (0-dim, on the first grad's device; a 0 on CPU when no param has a grad). Shared with
/// ampkit.Trainer in Python.
/// With \p grad_scale (a 1-element float32 tensor) the grads are still multiplied by it: the norm is
/// that of the grads divided by it (computed from the scaled ones in float32, so fp16 grads are
/// never unscaled in place, where small ones would underflow), and the grads are clipped while
/// still scaled. bf16/fp16 grads' norms are computed in float32.
at::Tensor clip_grad_norm_(at::ArrayRef<at::Tensor> params, double max_norm, const at::Tensor& grad_scale = {});
}  // namespace detail

}  // namespace ampkit
