#pragma once
// Internal: the numerical core of grad_scaler.cpp that the Python bindings (csrc/python/) and the tests
// call directly. Not installed; C++ users use the classes of <ampkit/grad_scaler.h>.

#include <ampkit/grad_scaler.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace ampkit {

namespace detail {
/// The numerical core shared by GradScaler and the Python ampkit.GradScaler (through ampkit._C).

/// 1 / scale computed in float64 and rounded to float32, as torch does.
at::Tensor reciprocal_scale(const at::Tensor& scale);

/// Multiplies the grads of \p params by \p inv_scale in place, grouped by device and dtype for
/// at::_amp_foreach_non_finite_check_and_unscale_; fp16 sparse grads are coalesced first (the
/// param's grad is replaced) and the values of sparse grads are checked. Returns one found_inf
/// (0-dim float32, 1 if any grad on that device is inf/NaN) per device, in order of first
/// appearance; the one on inv_scale's device is created there. Params without grad are skipped.
/// Throws c10::ValueError on fp16 grads unless \p allow_fp16, before changing anything.
std::vector<at::Tensor> unscale_grads_(at::ArrayRef<at::Tensor> params, const at::Tensor& inv_scale, bool allow_fp16);

/// unscale_grads_ on the grads themselves (the operator ampkit::unscale_grads_): the caller has
/// coalesced fp16 sparse grads and gives one 1-element float32 \p found_infs per device of the
/// grads (any order), which are set to 1 where a grad holds inf/NaN and otherwise left as they
/// are. Same checks as unscale_grads_, all made before anything changes.
void unscale_grad_list_(at::TensorList grads, at::TensorList found_infs, const at::Tensor& inv_scale,
                        bool allow_fp16);

/// Throws c10::ValueError unless \p new_scale is finite and > 0 in float32 and within
/// [min_scale, max_scale] of \p options.
void check_new_scale(double new_scale, const GradScalerOptions& options);

/// GradScalerOptions::validate(), optionally without the check that init_scale lies within
/// [min_scale, max_scale] (setters and loaded state dicts may move the bounds past it).
void validate_options(const GradScalerOptions& options, bool check_init_scale);

/// \p current with the options carried by \p state; throws c10::ValueError (naming the field)
/// if any of them, the scale or a tracker is out of range.
GradScalerOptions options_from_state(const GradScalerState& state, const GradScalerOptions& current);

/// Combines \p found_infs onto scale's device and updates \p scale, \p growth_tracker and
/// \p overflow_streak in place with \p options' factors, interval, bounds and hysteresis, on the
/// device. With hysteresis 1 the scale follows at::_amp_update_scale_ bit for bit, then the bounds.
void update_scale_(at::Tensor& scale, at::Tensor& growth_tracker, at::Tensor& overflow_streak,
                   at::ArrayRef<at::Tensor> found_infs, const GradScalerOptions& options);

/// The options of a scaler whose fields live elsewhere (the Python ampkit.GradScaler keeps them as
/// attributes, torch's layout): the bindings and the operators pass them on through this.
inline GradScalerOptions options_of(double init_scale, double growth_factor, double backoff_factor,
                                    int64_t growth_interval, double min_scale, double max_scale, int64_t hysteresis) {
  return GradScalerOptions()
      .init_scale(init_scale)
      .growth_factor(growth_factor)
      .backoff_factor(backoff_factor)
      .growth_interval(growth_interval)
      .min_scale(min_scale)
      .max_scale(max_scale)
      .hysteresis(hysteresis);
}
}  // namespace detail

}  // namespace ampkit
