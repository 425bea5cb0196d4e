#include <ampkit/cast_policy.h>

#include "autocast_kernel.h"
#include "autocast_lists.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cctype>
#include <deque>
#include <memory>
#include <mutex>
#include <ostream>
#include <sstream>
#include <unordered_map>

namespace ampkit {
namespace detail {

std::string dtype_name(c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Undefined) return "None";
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

const std::set<std::string>& torch_own_kernels(c10::DeviceType device_type) {
  static const std::set<std::string> cuda = AMPKIT_TORCH_OWN_CUDA_KERNELS;
  static const std::set<std::string> none;
  return device_type == c10::DeviceType::CUDA ? cuda : none;
}

namespace {

// "pow, Tensor_Scalar" (a stringized macro argument list) -> "aten::pow.Tensor_Scalar".
std::string aten_name_from_macro_args(std::string_view args) {
  std::string out = "aten::";
  for (char c : args) {
    if (c == ',')
      out += '.';
    else if (!std::isspace(static_cast<unsigned char>(c)))
      out += c;
  }
  return out;
}

// The CUDA lists come from the installed torch's own header, so they follow its version.
PolicyMap build_cuda_defaults() {
  PolicyMap m;
#define AMPKIT_CUDA_LOWER(...) m[aten_name_from_macro_args(#__VA_ARGS__)] = CastPolicy::lower_precision_fp;
#define AMPKIT_CUDA_FP32(...) m[aten_name_from_macro_args(#__VA_ARGS__)] = CastPolicy::fp32;
#define AMPKIT_CUDA_SET_OPT(...) m[aten_name_from_macro_args(#__VA_ARGS__)] = CastPolicy::fp32_set_opt_dtype;
#define AMPKIT_CUDA_PROMOTE(...) m[aten_name_from_macro_args(#__VA_ARGS__)] = CastPolicy::promote;
#define AMPKIT_CUDA_APPEND(REDISPATCH, NAME, ...) m[std::string("aten::") + NAME] = CastPolicy::fp32_append_dtype;
  AT_FORALL_LOWER_PRECISION_FP(AMPKIT_CUDA_LOWER)
  AT_FORALL_FP32(AMPKIT_CUDA_FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(AMPKIT_CUDA_SET_OPT)
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(AMPKIT_CUDA_APPEND)
  AT_FORALL_PROMOTE(AMPKIT_CUDA_PROMOTE)
#undef AMPKIT_CUDA_LOWER
#undef AMPKIT_CUDA_FP32
#undef AMPKIT_CUDA_SET_OPT
#undef AMPKIT_CUDA_PROMOTE
#undef AMPKIT_CUDA_APPEND
  // Registered by hand in autocast_mode.cpp rather than through the shared lists.
  m["aten::cudnn_convolution"] = CastPolicy::lower_precision_fp;
  m["aten::cudnn_convolution_transpose"] = CastPolicy::lower_precision_fp;
  m["aten::binary_cross_entropy"] = CastPolicy::banned;
  return m;
}

PolicyMap build_cpu_defaults() {
  PolicyMap m;
#define AMPKIT_CPU_ENTRY(POLICY, ...) m[aten_name_from_macro_args(#__VA_ARGS__)] = CastPolicy::POLICY;
  AMPKIT_FORALL_CPU_DEFAULTS(AMPKIT_CPU_ENTRY)
  AMPKIT_FORALL_CPU_DEFAULTS_BOXED_ONLY(AMPKIT_CPU_ENTRY)
#undef AMPKIT_CPU_ENTRY
  return m;
}

bool is_identifier(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(),
                                   [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

c10::OperatorName parse_op_name(std::string_view op) {
  const auto sep = op.find("::");
  const auto dot = sep == std::string_view::npos ? std::string_view::npos : op.find('.', sep + 2);
  const bool ok = sep != std::string_view::npos && is_identifier(op.substr(0, sep)) &&
                  is_identifier(op.substr(sep + 2, dot == std::string_view::npos ? op.npos : dot - sep - 2)) &&
                  (dot == std::string_view::npos || is_identifier(op.substr(dot + 1)));
  TORCH_CHECK_VALUE(ok,
                    "ampkit: expected op as 'namespace::name' or 'namespace::name.overload' "
                    "(e.g. 'aten::mm', 'aten::pow.Tensor_Scalar'), got '",
                    op, "'");
  const std::string name(op.substr(0, dot));
  const std::string overload = dot == std::string_view::npos ? "" : std::string(op.substr(dot + 1));
  return c10::OperatorName(name, overload);
}

std::string full_name(const c10::OperatorName& n) {
  return n.overload_name.empty() ? n.name : n.name + "." + n.overload_name;
}

c10::OperatorHandle find_op(std::string_view op) {
  const auto name = parse_op_name(op);
  auto handle = c10::Dispatcher::singleton().findSchema(name);
  if (handle) return *handle;
  std::vector<std::string> overloads;
  for (const auto& other : c10::Dispatcher::singleton().getAllOpNames()) {
    if (other.name == name.name) overloads.push_back(full_name(other));
  }
  std::sort(overloads.begin(), overloads.end());
  std::ostringstream hint;
  if (!overloads.empty()) {
    hint << "; overloads of '" << name.name << "':";
    for (const auto& o : overloads) hint << " " << o;
  } else {
    hint << " (load the library that defines it first)";
  }
  TORCH_CHECK_VALUE(false, "ampkit: expected an operator registered with the PyTorch dispatcher, got '", op,
                    "', which is not", hint.str());
}

ArgKind classify(const c10::Argument& arg) {
  const auto& type = arg.real_type();
  if (type->kind() == c10::TypeKind::TensorType) return ArgKind::Tensor;
  if (auto opt = type->cast<c10::OptionalType>()) {
    const auto kind = opt->getElementType()->kind();
    if (kind == c10::TypeKind::TensorType) return ArgKind::OptionalTensor;
    if (kind == c10::TypeKind::ScalarTypeType) return ArgKind::OptionalScalarType;
  }
  if (auto list = type->cast<c10::ListType>()) {
    if (list->getElementType()->kind() == c10::TypeKind::TensorType) return ArgKind::TensorList;
  }
  return ArgKind::Other;
}

std::vector<ArgKind> classify_all(const c10::FunctionSchema& schema) {
  std::vector<ArgKind> kinds;
  for (const auto& a : schema.arguments()) kinds.push_back(classify(a));
  return kinds;
}

bool same_or_widened(const c10::TypePtr& narrow, const c10::TypePtr& wide) {
  if (*narrow == *wide) return true;
  auto opt = wide->cast<c10::OptionalType>();
  return opt && *opt->getElementType() == *narrow;
}

bool has_mutable_argument(const c10::FunctionSchema& schema) {
  return std::any_of(schema.arguments().begin(), schema.arguments().end(),
                     [](const c10::Argument& a) { return a.alias_info() && a.alias_info()->isWrite(); });
}

// The overload that takes `schema`'s arguments plus a trailing `ScalarType dtype`
// (norm.Scalar -> norm.ScalarOpt_dtype), as torch's fp32_append_dtype redispatches.
std::optional<c10::OperatorHandle> find_dtype_overload(const c10::FunctionSchema& schema) {
  const auto& args = schema.arguments();
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name != schema.name()) continue;
    auto handle = c10::Dispatcher::singleton().findSchema(name);
    if (!handle) continue;
    const auto& cand = handle->schema();
    const auto& cargs = cand.arguments();
    if (cargs.size() != args.size() + 1 || has_mutable_argument(cand)) continue;
    const auto& last = cargs.back();
    if (last.name() != "dtype" || last.real_type()->kind() != c10::TypeKind::ScalarTypeType) continue;
    bool match = true;
    for (size_t i = 0; i < args.size() && match; ++i) {
      match = args[i].name() == cargs[i].name() && same_or_widened(args[i].real_type(), cargs[i].real_type());
    }
    if (match) return handle;
  }
  return std::nullopt;
}

// Refuses (with the reason) a policy that the operator's schema cannot carry out.
// Returns the dtype overload for fp32_append_dtype.
std::optional<c10::OperatorHandle> check_policy_fits(const std::string& op, const c10::FunctionSchema& schema,
                                                     CastPolicy policy) {
  for (const auto& a : schema.arguments()) {
    TORCH_CHECK_VALUE(!(a.alias_info() && a.alias_info()->isWrite()),
                      "ampkit: expected an out-of-place operator, got '", op, "', whose argument '", a.name(),
                      "' is mutable (in-place or out=); only out-of-place operators can be autocast");
  }
  const auto kinds = classify_all(schema);
  const bool has_tensor = std::any_of(kinds.begin(), kinds.end(), [](ArgKind k) {
    return k == ArgKind::Tensor || k == ArgKind::OptionalTensor || k == ArgKind::TensorList;
  });
  TORCH_CHECK_VALUE(has_tensor, "ampkit: expected an operator with a Tensor, Tensor? or Tensor[] argument, got '", op,
                    "' with schema ", schema);
  const bool first_is_tensor = !kinds.empty() && kinds.front() == ArgKind::Tensor;
  if (policy == CastPolicy::fp32_set_opt_dtype) {
    const bool has_opt_dtype = std::find(kinds.begin(), kinds.end(), ArgKind::OptionalScalarType) != kinds.end();
    TORCH_CHECK_VALUE(first_is_tensor && has_opt_dtype,
                      "ampkit: policy fp32_set_opt_dtype expects an operator whose first argument is a Tensor and that "
                      "has a 'ScalarType? dtype' argument, got '",
                      op, "' with schema ", schema);
  }
  if (policy == CastPolicy::fp32_append_dtype) {
    TORCH_CHECK_VALUE(first_is_tensor,
                      "ampkit: policy fp32_append_dtype expects an operator whose first argument is a "
                      "Tensor, got '",
                      op, "' with schema ", schema);
    auto target = find_dtype_overload(schema);
    TORCH_CHECK_VALUE(target.has_value(), "ampkit: policy fp32_append_dtype expects an overload of '", schema.name(),
                      "' that takes the arguments of '", op,
                      "' plus a trailing 'ScalarType dtype', got none for schema ", schema);
    return target;
  }
  return std::nullopt;
}

class AutocastKernel final : public c10::OperatorKernel {
 public:
  // The entry is published with a release store, read with an acquire load: the kernel may run on
  // another thread as soon as the dispatcher has it, and that publication is not synchronized.
  explicit AutocastKernel(const OpEntry* entry) { entry_.store(entry, std::memory_order_release); }
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    run_autocast_kernel(*entry_.load(std::memory_order_acquire), op, keys, stack);
  }

 private:
  std::atomic<const OpEntry*> entry_;
};

struct Registry {
  std::mutex mutex;
  std::atomic<bool> initialized{false};
  std::array<PolicyMap, kNumPolicyDevices> tables;
  std::deque<OpEntry> entries;         // deque: entries never move, kernels point at them
  std::deque<OpSignature> signatures;  // never freed: kernels on other threads may still read old ones
  std::unordered_map<std::string, OpEntry*> by_name;
  std::unique_ptr<torch::Library> fallback;
  std::unordered_map<std::string, std::unique_ptr<torch::Library>> libraries;  // per namespace
  // The schema listener's view of the entries. Its own mutex, never held while taking another:
  // the dispatcher calls the listener with its lock held, and `mutex` is held while registering.
  std::mutex index_mutex;
  std::unordered_map<std::string, OpEntry*> index;
  std::atomic<bool> stale{false};  // some entry's schema changed: rebuild before the next use
  std::optional<c10::RegistrationHandleRAII> listener;
  // Device types whose table's kernels are registered (see ensure_armed); set under `mutex`.
  std::array<std::atomic<bool>, kNumPolicyDevices> armed{};
};

// Never destroyed: the registered kernels and libraries must outlive every op call, also
// those made by other static destructors at exit.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

// Told by the dispatcher when an operator is defined or its definition removed (a
// torch.library.Library destroyed, then the name defined again, perhaps with other arguments).
// An entry of such an operator stops casting at once; the registry rebuilds it under its lock.
class SchemaListener final : public c10::OpRegistrationListener {
 public:
  void onOperatorRegistered(const c10::OperatorHandle& op) override { invalidate(op); }
  void onOperatorDeregistered(const c10::OperatorHandle& op) override { invalidate(op); }

 private:
  static void invalidate(const c10::OperatorHandle& op) {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.index_mutex);
    if (r.index.empty()) return;
    auto it = r.index.find(full_name(op.operator_name()));
    if (it == r.index.end()) return;
    it->second->signature.store(nullptr, std::memory_order_release);
    r.stale.store(true, std::memory_order_release);
  }
};

void publish_signature(Registry& r, OpEntry& e, const c10::FunctionSchema& schema, bool needs_append_target) {
  OpSignature& sig = r.signatures.emplace_back();
  sig.kinds = classify_all(schema);
  if (needs_append_target) sig.append_target = find_dtype_overload(schema);
  e.signature.store(&sig, std::memory_order_release);
}

bool has_append_policy(const Registry& r, const std::string& op) {
  for (const auto& table : r.tables) {
    auto it = table.find(op);
    if (it != table.end() && it->second == CastPolicy::fp32_append_dtype) return true;
  }
  return false;
}

OpEntry& entry_for(Registry& r, const std::string& op, const c10::OperatorHandle& handle) {
  auto it = r.by_name.find(op);
  if (it != r.by_name.end()) return *it->second;
  OpEntry& e = r.entries.emplace_back(op, handle);
  publish_signature(r, e, handle.schema(), false);
  r.by_name.emplace(op, &e);
  std::lock_guard<std::mutex> lock(r.index_mutex);
  r.index.emplace(op, &e);
  return e;
}

// Puts ampkit's kernel for \p e's operator on ampkit's key (once; never removed, see OpEntry).
void register_kernel(Registry& r, OpEntry& e) {
  if (e.registered) return;
  const auto& name = e.handle.operator_name();
  const std::string ns = name.name.substr(0, name.name.find("::"));
  auto& lib = r.libraries[ns];
  if (!lib) lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns, kAutocastKey, __FILE__, __LINE__);
  std::string local = name.name.substr(ns.size() + 2);
  if (!name.overload_name.empty()) local += "." + name.overload_name;
  // The default tables' operators get unboxed kernels (no boxing per call); any other one, the boxed.
  auto kernel = unboxed_kernel_for(e);
  lib->impl(local.c_str(), kernel ? std::move(*kernel)
                                  : torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutocastKernel>(&e)));
  e.registered = true;
}

// Gives \p e a signature with the dtype overload, for a policy fp32_append_dtype about to be stored.
void ensure_append_target(Registry& r, OpEntry& e) {
  const OpSignature* sig = e.signature.load(std::memory_order_acquire);
  if (sig == nullptr || sig->append_target) return;
  publish_signature(r, e, e.handle.schema(), true);
}

std::atomic<std::uint64_t> generation{0};

void store_policy(OpEntry& e, int device, std::optional<CastPolicy> policy) {
  generation.fetch_add(1, std::memory_order_relaxed);
  e.policy[device].store(policy ? static_cast<std::int8_t>(*policy) : kNoPolicy, std::memory_order_release);
}

// Rebuilds the entries whose operator was defined again since (see SchemaListener). A policy that
// does not fit the new schema is dropped from its table, with a warning that says why.
void revalidate_locked(Registry& r) {
  if (!r.stale.exchange(false, std::memory_order_acq_rel)) return;
  for (auto& e : r.entries) {
    if (e.signature.load(std::memory_order_acquire) != nullptr) continue;
    auto handle = c10::Dispatcher::singleton().findSchema(parse_op_name(e.name));
    if (!handle) continue;  // not defined at the moment; rebuilt when it is
    for (int d = 0; d < kNumPolicyDevices; ++d) {
      auto it = r.tables[d].find(e.name);
      if (it == r.tables[d].end()) continue;
      try {
        check_policy_fits(e.name, handle->schema(), it->second);
      } catch (const c10::Error& err) {
        TORCH_WARN("ampkit: dropped the ", to_string(it->second), " policy of '", e.name, "' on ",
                   c10::DeviceTypeName(policy_device_type(d), /*lower_case=*/true),
                   ": the operator was defined again as ", handle->schema(), ", which the policy does not fit (",
                   err.what_without_backtrace(), ")");
        r.tables[d].erase(it);
        store_policy(e, d, std::nullopt);
      }
    }
    publish_signature(r, e, handle->schema(), has_append_policy(r, e.name));
  }
}

const PolicyMap& defaults(int device) {
  static const std::array<PolicyMap, kNumPolicyDevices> d = [] {
    static_assert(kPolicyDevices[0].type == c10::DeviceType::CPU && kPolicyDevices[1].type == c10::DeviceType::CUDA,
                  "the default tables are built in kPolicyDevices' order");
    std::array<PolicyMap, kNumPolicyDevices> out{build_cpu_defaults(), build_cuda_defaults()};
    auto& dispatcher = c10::Dispatcher::singleton();
    for (int d = 0; d < kNumPolicyDevices; ++d) {
      // The lists are written for the supported torch releases; each torch gets the entries it
      // autocasts itself (an op it lacks, or does not autocast on this device type, is left out).
      const auto key = kPolicyDevices[d].torch_key;
      auto& m = out[d];
      for (auto it = m.begin(); it != m.end();) {
        auto op = dispatcher.findSchema(parse_op_name(it->first));
        it = op && op->hasKernelForDispatchKey(key) ? std::next(it) : m.erase(it);
      }
      // An aten op this torch autocasts that the list lacks has no known policy here: say so
      // (the tests compare the tables with the dispatcher and fail). torch's own kernels that are
      // no policy are left to torch on purpose.
      const auto& torch_own = torch_own_kernels(policy_device_type(d));
      std::vector<std::string> unknown;
      for (const auto& name : dispatcher.getAllOpNames()) {
        if (name.name.rfind("aten::", 0) != 0) continue;
        auto full = full_name(name);
        if (m.count(full) || torch_own.count(full)) continue;
        auto op = dispatcher.findSchema(name);
        if (op && op->hasKernelForDispatchKey(key)) unknown.push_back(std::move(full));
      }
      if (!unknown.empty()) {
        std::sort(unknown.begin(), unknown.end());
        std::ostringstream names;
        for (const auto& n : unknown) names << " " << n;
        TORCH_WARN("ampkit: torch ", TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR, " autocasts these operators on ",
                   c10::DeviceTypeName(policy_device_type(d), /*lower_case=*/true),
                   ", which ampkit's default table for that device type lacks: in ampkit regions torch's own "
                   "autocast kernel casts them, as under torch.autocast, but ampkit's table neither lists nor "
                   "changes them (set_policy takes one over; please report it):",
                   names.str());
      }
    }
    return out;
  }();
  return d[device];
}

void apply_table(Registry& r, int device, const PolicyMap& table) {
  for (const auto& [op, policy] : table) {
    auto& e = entry_for(r, op, find_op(op));
    if (policy == CastPolicy::fp32_append_dtype) ensure_append_target(r, e);
  }
  for (auto& e : r.entries) {
    auto it = table.find(e.name);
    store_policy(e, device, it == table.end() ? std::nullopt : std::optional<CastPolicy>(it->second));
  }
  r.tables[device] = table;
  if (r.armed[device].load(std::memory_order_relaxed)) {
    for (const auto& [op, policy] : table) register_kernel(r, *r.by_name.at(op));
  }
}

// Registers the kernels of every operator of \p device's table and of its defaults (an op removed
// from the defaults needs ampkit's kernel too: it hides torch's, which would cast it).
void arm_locked(Registry& r, int device) {
  if (r.armed[device].load(std::memory_order_relaxed)) return;
  for (const PolicyMap* table : std::array<const PolicyMap*, 2>{&r.tables[device], &defaults(device)}) {
    for (const auto& [op, policy] : *table) register_kernel(r, *r.by_name.at(op));
  }
  r.armed[device].store(true, std::memory_order_release);
}

void init_locked(Registry& r) {
  if (!r.initialized.load(std::memory_order_relaxed)) {
    auto& dispatcher = c10::Dispatcher::singleton();
    TORCH_CHECK(!dispatcher.hasBackendFallbackForDispatchKey(kAutocastKey),
                "ampkit: expected the AutocastPrivateUse1 dispatch key to be free, got a fallback already registered "
                "on it (a PrivateUse1 device backend such as torch_npu, auto-loaded by `import torch`, or a second "
                "copy of ampkit). ampkit's autocast needs that key: set TORCH_DEVICE_BACKEND_AUTOLOAD=0 or uninstall "
                "the backend");
    r.listener.emplace(dispatcher.addRegistrationListener(std::make_unique<SchemaListener>()));
    r.fallback = std::make_unique<torch::Library>(torch::Library::IMPL, "_", kAutocastKey, __FILE__, __LINE__);
    r.fallback->fallback(torch::CppFunction::makeFallthrough());
    for (int d = 0; d < kNumPolicyDevices; ++d) apply_table(r, d, defaults(d));
    r.initialized.store(true, std::memory_order_release);
  }
  revalidate_locked(r);
}

// "'cpu' or 'cuda'".
std::string policy_device_names() {
  std::string out;
  for (int d = 0; d < kNumPolicyDevices; ++d) {
    if (d > 0) out += d + 1 < kNumPolicyDevices ? ", " : " or ";
    out += "'" + c10::DeviceTypeName(kPolicyDevices[d].type, /*lower_case=*/true) + "'";
  }
  return out;
}

int checked_device(c10::DeviceType device_type) {
  const int d = policy_device_index(device_type);
  TORCH_CHECK_VALUE(d >= 0, "ampkit: expected device_type ", policy_device_names(),
                    " (a device type with a cast-policy table), got '",
                    c10::DeviceTypeName(device_type, /*lower_case=*/true), "'");
  return d;
}

}  // namespace

std::uint64_t policy_generation() { return generation.load(std::memory_order_relaxed); }

void ensure_armed(c10::DeviceType device_type) {
  const int d = policy_device_index(device_type);
  if (d < 0) return;
  auto& r = registry();
  if (r.armed[d].load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(r.mutex);
  init_locked(r);
  arm_locked(r, d);
}

const OpEntry* registered_entry(const std::string& name) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.by_name.find(name);
  return it != r.by_name.end() && it->second->registered ? it->second : nullptr;
}

void ensure_initialized() {
  auto& r = registry();
  // The fast path of every region entry: no lock once initialized and nothing to rebuild.
  if (r.initialized.load(std::memory_order_acquire) && !r.stale.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(r.mutex);
  init_locked(r);
}

}  // namespace detail

using namespace detail;

const std::vector<CastPolicy>& all_cast_policies() {
  static const std::vector<CastPolicy> all = {
      CastPolicy::lower_precision_fp, CastPolicy::fp32,    CastPolicy::fp32_set_opt_dtype,
      CastPolicy::fp32_append_dtype,  CastPolicy::promote, CastPolicy::banned};
  return all;
}

const char* to_string(CastPolicy policy) {
  switch (policy) {
    case CastPolicy::lower_precision_fp: return "lower_precision_fp";
    case CastPolicy::fp32: return "fp32";
    case CastPolicy::fp32_set_opt_dtype: return "fp32_set_opt_dtype";
    case CastPolicy::fp32_append_dtype: return "fp32_append_dtype";
    case CastPolicy::promote: return "promote";
    case CastPolicy::banned: return "banned";
  }
  TORCH_CHECK_VALUE(false, "ampkit: expected a CastPolicy, got the value ", static_cast<int>(policy));
}

std::ostream& operator<<(std::ostream& out, CastPolicy policy) { return out << to_string(policy); }

CastPolicy cast_policy_from_string(std::string_view name) {
  for (auto p : all_cast_policies()) {
    if (name == to_string(p)) return p;
  }
  TORCH_CHECK_VALUE(false,
                    "ampkit: expected a cast policy name (lower_precision_fp, fp32, fp32_set_opt_dtype, "
                    "fp32_append_dtype, promote, banned), got '",
                    name, "'");
}

const std::vector<c10::DeviceType>& policy_device_types() {
  static const std::vector<c10::DeviceType> types = [] {
    std::vector<c10::DeviceType> out;
    for (const auto& d : kPolicyDevices) out.push_back(d.type);
    return out;
  }();
  return types;
}

bool has_policy_table(c10::DeviceType device_type) { return policy_device_index(device_type) >= 0; }

namespace {
// Runs \p f(registry) under the registry's lock, once the registry is initialized: the prologue
// of every table call.
template <class F>
auto locked(F&& f) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  init_locked(r);
  return f(r);
}
}  // namespace

std::optional<CastPolicy> get_policy(std::string_view op, c10::DeviceType device_type) {
  const int d = checked_device(device_type);
  const std::string name = full_name(parse_op_name(op));
  return locked([&](Registry& r) -> std::optional<CastPolicy> {
    auto it = r.tables[d].find(name);
    if (it == r.tables[d].end()) return std::nullopt;
    return it->second;
  });
}

void set_policy(std::string_view op, c10::DeviceType device_type, CastPolicy policy) {
  const int d = checked_device(device_type);
  TORCH_CHECK_VALUE(static_cast<unsigned>(policy) <= static_cast<unsigned>(CastPolicy::banned),
                    "ampkit: expected a CastPolicy, got the value ", static_cast<int>(policy));
  auto handle = find_op(op);
  const std::string name = full_name(handle.operator_name());
  auto target = check_policy_fits(name, handle.schema(), policy);
  locked([&](Registry& r) {
    auto& e = entry_for(r, name, handle);
    if (target) ensure_append_target(r, e);
    r.tables[d][name] = policy;
    store_policy(e, d, policy);
    // An edited table differs from torch's lists: its kernels must be there even for torch regions
    // nested in ampkit ones, where no ampkit region of this device type was entered.
    arm_locked(r, d);
    register_kernel(r, e);
  });
}

bool remove_policy(std::string_view op, c10::DeviceType device_type) {
  const int d = checked_device(device_type);
  const std::string name = full_name(find_op(op).operator_name());
  return locked([&](Registry& r) {
    if (r.tables[d].erase(name) == 0) return false;
    store_policy(*r.by_name.at(name), d, std::nullopt);
    arm_locked(r, d);  // as set_policy; the removed op's kernel keeps torch's from casting it
    register_kernel(r, *r.by_name.at(name));
    return true;
  });
}

PolicyMap list_policies(c10::DeviceType device_type) {
  const int d = checked_device(device_type);
  return locked([&](Registry& r) { return r.tables[d]; });
}

PolicyMap default_policies(c10::DeviceType device_type) { return defaults(checked_device(device_type)); }

void reset_policies(c10::DeviceType device_type) {
  const int d = checked_device(device_type);
  locked([&](Registry& r) { apply_table(r, d, defaults(d)); });
}

void reset_policies() {
  for (auto t : policy_device_types()) reset_policies(t);
}

}  // namespace ampkit
