#pragma once
/// \file low_precision.h
/// Low-precision parameters: cast_model prepares a model whose bf16/fp16 parameters the optimizers
/// of <ampkit/optim.h> update through float32 masters (`master_weights(true)`) or with stochastic
/// rounding (`stochastic_rounding(true)`), as Apex's O2 and DeepSpeed's bf16 optimizer do.
///
/// \code
///   ampkit::cast_model(*model, c10::kBFloat16);  // norms stay float32
///   ampkit::optim::AdamW opt(model->parameters(), ampkit::optim::AdamWOptions(1e-3).master_weights(true));
/// \endcode

#include <c10/core/ScalarType.h>

#include <functional>
#include <string>

namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace ampkit {

/// Whether a module keeps its own parameters and buffers in float32: called with the module's
/// qualified name ("" for the root, "encoder.0.norm") and the module.
using KeepFp32 = std::function<bool(const std::string& name, const torch::nn::Module& module)>;

/// The default of cast_model: true for the normalization layers of torch::nn (BatchNorm1d/2d/3d,
/// InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, LocalResponseNorm), whose statistics and affine
/// parameters lose too much in 16 bits (Apex's keep_batchnorm_fp32).
bool keep_norm_layers_fp32(const std::string& name, const torch::nn::Module& module);

/// Casts the floating parameters and buffers of \p model and its submodules to \p dtype in place,
/// except those of the modules \p keep_fp32 keeps (a parameter shared with a kept module stays
/// float32). Parameters keep their identity (their data is replaced), so an optimizer made before
/// still holds them; grads of cast parameters are dropped. Throws c10::ValueError unless \p dtype is
/// kBFloat16 or kHalf; everything \p keep_fp32 decides is decided before anything is cast.
void cast_model(torch::nn::Module& model, c10::ScalarType dtype = c10::kBFloat16,
                const KeepFp32& keep_fp32 = keep_norm_layers_fp32);

}  // namespace ampkit
