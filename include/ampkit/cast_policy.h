#pragma once
/// \file cast_policy.h
/// The cast-policy tables that drive ampkit's autocast: for each device type, a map from a
/// full operator name (`aten::mm`, `aten::pow.Tensor_Scalar`, `myns::my_op`) to the
/// precision that operator runs in while an AutocastGuard is alive.
///
/// The default tables equal torch's own autocast lists of the installed torch version.
/// Tables are process-wide and may be edited at any time, from any thread, also while other
/// threads run ops under autocast: an edit never touches the PyTorch dispatcher's tables
/// after an operator's first entry, so it is safe alongside dispatch.

#include <c10/core/DeviceType.h>

#include <cstdint>
#include <iosfwd>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ampkit {

/// How an operator's floating-point inputs are treated under autocast. The semantics are
/// those of torch's `at::autocast::CastPolicy` (ATen/autocast_mode.h); "eligible" means a
/// defined floating-point tensor, not float64, on the guard's device type.
enum class CastPolicy : std::uint8_t {
  /// Cast eligible Tensor / Tensor? / Tensor[] inputs to the guard's dtype (fp16 or bf16).
  lower_precision_fp = 0,
  /// Cast eligible inputs to float32.
  fp32 = 1,
  /// When the first argument is eligible, fill an absent `ScalarType? dtype` with float32.
  fp32_set_opt_dtype = 2,
  /// Call the overload that takes a trailing `ScalarType dtype` (norm.Scalar ->
  /// norm.ScalarOpt_dtype) with float32, or with the first argument's dtype if it is not eligible.
  fp32_append_dtype = 3,
  /// Run in the widest floating type among the Tensor and Tensor[] inputs (Tensor? inputs
  /// are cast but do not vote); fp16 mixed with bf16 is an error.
  promote = 4,
  /// Refuse to run under autocast (torch bans binary_cross_entropy on CUDA).
  banned = 5,
};

/// Every policy, in declaration order.
const std::vector<CastPolicy>& all_cast_policies();

/// "lower_precision_fp", "fp32", ... as in torch's enum.
const char* to_string(CastPolicy policy);

/// Writes to_string(policy).
std::ostream& operator<<(std::ostream& out, CastPolicy policy);

/// Parses the names that to_string() gives; throws c10::Error naming the accepted values.
CastPolicy cast_policy_from_string(std::string_view name);

/// Operator name -> policy, ordered by name.
using PolicyMap = std::map<std::string, CastPolicy>;

/// Device types that have a policy table (CPU and CUDA).
const std::vector<c10::DeviceType>& policy_device_types();

/// True when \p device_type has a policy table.
bool has_policy_table(c10::DeviceType device_type);

/// The policy of \p op on \p device_type, or nullopt when the op is not in the table.
/// Throws for a device type without a table and for a malformed name.
std::optional<CastPolicy> get_policy(std::string_view op, c10::DeviceType device_type);

/// Adds or replaces the entry of \p op. Refused with c10::Error, leaving the table as it
/// was, when the name is malformed, the operator does not exist, the operator has mutable
/// (in-place or out=) arguments or no Tensor argument, or the policy does not fit its schema.
/// \param op full name with overload, e.g. "aten::pow.Tensor_Scalar"
/// \param device_type a device type with a table (see policy_device_types())
/// \param policy the precision the op runs in inside an AutocastGuard of that device type
void set_policy(std::string_view op, c10::DeviceType device_type, CastPolicy policy);

/// Removes the entry of \p op; returns false when it had none. Unknown or malformed names
/// are refused as in set_policy.
bool remove_policy(std::string_view op, c10::DeviceType device_type);

/// The whole table of \p device_type.
PolicyMap list_policies(c10::DeviceType device_type);

/// torch's own autocast list for \p device_type, for the installed torch version.
PolicyMap default_policies(c10::DeviceType device_type);

/// Restores the default table of \p device_type.
void reset_policies(c10::DeviceType device_type);

/// Restores the default tables of every device type.
void reset_policies();

}  // namespace ampkit
