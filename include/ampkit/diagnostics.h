#pragma once
/// \file diagnostics.h
/// Two debugging tools that watch every op through PyTorch's `at::RecordFunction` callbacks
/// (what torch's profiler uses). Neither costs anything while none is alive: the callbacks are
/// registered by the constructor and removed by stop() / the destructor.
///
/// - PrecisionReport: which precision every op ran in, under which policy, with how many casts.
/// - OverflowLocator: the first op that produced inf/NaN from finite inputs, in the forward or the
///   backward pass, and the cast-policy edit that would have avoided it.
///
/// Both observe the thread that created them, and the autograd threads of backward passes started
/// there. Ops are attributed to modules through ModuleScope (the Python API pushes one per
/// submodule of the model it is given).
///
///     ampkit::OverflowLocator locator;
///     {
///       ampkit::AutocastGuard guard(torch::kCPU, torch::kHalf);
///       loss = model->forward(x).sum();
///     }
///     scaler.scale(loss).backward();
///     if (locator.first()) std::cout << locator.first()->to_string() << "\n";

#include <ampkit/cast_policy.h>

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace at {
class Tensor;
}

namespace ampkit {

namespace detail {
class DiagnosticSession;  // csrc/diagnostics.cpp
}  // namespace detail

/// RAII: while it lives, ops this thread runs are attributed to \p name (a module path such as
/// "encoder.layers.0.attn"). Nestable; the innermost scope wins. The backward of an op is
/// attributed to the scope its forward ran in.
class ModuleScope {
 public:
  explicit ModuleScope(std::string name);
  ~ModuleScope();
  ModuleScope(const ModuleScope&) = delete;
  ModuleScope& operator=(const ModuleScope&) = delete;
};

/// One row of a PrecisionReport: the calls of one op that agree in everything but their values.
struct PrecisionRecord {
  std::string op;  ///< full operator name with overload: "aten::pow.Tensor_Scalar"
  c10::DeviceType device = c10::DeviceType::CPU;
  std::string phase;                 ///< "forward" or "backward"
  std::string module;                ///< the innermost ModuleScope, "" when none
  std::optional<CastPolicy> policy;  ///< the policy ampkit's autocast applied, nullopt when none
  /// The dtypes of the op's tensor inputs as it computed in them: after ampkit's casts.
  std::vector<c10::ScalarType> in_dtypes;
  /// The dtypes of its tensor inputs as the caller passed them.
  std::vector<c10::ScalarType> arg_dtypes;
  std::optional<c10::ScalarType> out_dtype;  ///< of its first tensor output
  bool nested = false;                       ///< called by another op (a decomposition, or the kernel of a cast)
  std::int64_t calls = 0;
  std::int64_t casts = 0;         ///< inputs ampkit cast (from its weight cache or not)
  std::int64_t cached_casts = 0;  ///< of those, how many came from the weight cache
  std::int64_t cast_bytes = 0;    ///< bytes of the cast tensors
};

/// Records what every op did while it lives: for each op that ran on a device type with an open
/// autocast region (and everything in backward passes), listed in a policy table or not, a
/// PrecisionRecord. Ops called inside such ops are recorded too, marked `nested`.
class PrecisionReport {
 public:
  PrecisionReport();
  ~PrecisionReport();
  PrecisionReport(const PrecisionReport&) = delete;
  PrecisionReport& operator=(const PrecisionReport&) = delete;

  /// Stops recording (the destructor does it too). Must be called on the creating thread.
  void stop();
  /// The rows so far, in the order their first call ended.
  std::vector<PrecisionRecord> rows() const;
  /// A table of the rows; nested ones only when \p nested; only those of \p phase ("forward" or
  /// "backward") when it is not empty.
  std::string to_string(bool nested = false, const std::string& phase = "") const;

 private:
  std::shared_ptr<detail::DiagnosticSession> session_;
};

/// A policy-table edit, as set_policy takes it.
struct PolicyEdit {
  std::string op;
  c10::DeviceType device = c10::DeviceType::CPU;
  CastPolicy policy = CastPolicy::fp32;
};

/// What an OverflowLocator found.
struct OverflowEvent {
  std::string op;       ///< the op whose output was not finite although its inputs were
  std::string phase;    ///< "forward" or "backward"
  std::string module;   ///< innermost ModuleScope (in backward: that of the forward op), "" when none
  std::string grad_fn;  ///< in backward, the autograd node it ran in ("MmBackward0")
  c10::DeviceType device = c10::DeviceType::CPU;
  std::vector<c10::ScalarType> in_dtypes;  ///< as it computed in them (after ampkit's casts)
  std::optional<c10::ScalarType> out_dtype;
  std::vector<double> input_absmax;  ///< max |x| of each floating tensor input
  /// The op whose cast policy decided the precision (itself, or the op that called it; in backward
  /// the forward op that made the autograd node), and that policy.
  std::string policy_op;
  std::optional<CastPolicy> policy;
  /// "precision": finite when recomputed in float32; "loss_scale": a backward op whose output is
  /// finite once divided by the loss scale; "range": not finite in float32 either.
  std::string cause;
  std::optional<double> loss_scale;  ///< the GradScaler's scale when one was seen
  /// The table edit that makes it finite, when cause is "precision".
  std::optional<PolicyEdit> suggestion;
  std::string explanation;    ///< one or two sentences for a person
  std::int64_t op_index = 0;  ///< how many ops the locator had checked before this one

  /// A readable summary, with the suggestion as C++ code.
  std::string to_string() const;
};

/// Watches the outputs of every op while it lives (forward, backward, scaled losses included) and
/// keeps the first op that produced a non-finite output from finite inputs. It reads every output
/// (on CUDA that syncs) and recomputes the culprit in float32 to find the cause; it changes no
/// result (the random generators are restored after the recomputation).
class OverflowLocator {
 public:
  OverflowLocator();
  ~OverflowLocator();
  OverflowLocator(const OverflowLocator&) = delete;
  OverflowLocator& operator=(const OverflowLocator&) = delete;

  /// The first overflow, or nullopt.
  std::optional<OverflowEvent> first() const;
  /// The first op that received a non-finite input no watched op had produced (data, parameters or
  /// state that were non-finite before), or nullopt.
  std::optional<OverflowEvent> first_nonfinite_input() const;
  /// Forgets what was found and watches again.
  void reset();
  /// The loss scale that gradients carry: a backward overflow whose output divided by it is finite
  /// is put down to the scale. ampkit's GradScaler sets it on every scale() call.
  void set_loss_scale(const at::Tensor& scale);
  /// Stops watching (the destructor does it too). Must be called on the creating thread.
  void stop();

 private:
  std::shared_ptr<detail::DiagnosticSession> session_;
};

}  // namespace ampkit
