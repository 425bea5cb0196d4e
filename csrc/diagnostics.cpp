// PrecisionReport and OverflowLocator: one observer of every op (at::RecordFunction thread-local
// callbacks, DESIGN.md §7) with two uses. The observer keeps, per thread, a stack of frames: one per
// op call (with copies of its inputs, the thread's dispatch-key state and the policy ampkit's kernel
// applies) and one per autograd node of a backward pass, so that an op knows who called it, which
// phase it runs in and which module its forward ran under.
#include <ampkit/diagnostics.h>

#include "autocast_kernel.h"
#include "diagnostics_hooks.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/SequenceNumber.h>
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <iomanip>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>

namespace ampkit {
namespace detail {

std::atomic<int> live_diagnostic_sessions{0};

namespace {

constexpr int kMaxSessions = 8;
constexpr std::string_view kEvaluatePrefix = "autograd::engine::evaluate_function: ";
// Forward records kept per thread before the oldest half is dropped (one per autograd node).
constexpr size_t kMaxForwardRecords = size_t{1} << 20;

// The open ModuleScopes of this thread, with the sequence number (autograd nodes made so far) at entry.
struct OpenModule {
  std::string name;
  std::uint64_t seq_begin;
};
thread_local std::vector<OpenModule> t_modules;

// What made an autograd node: the module its forward ran under and the op whose policy decided its
// precision (or the op the user called, when no policy applied).
struct ForwardInfo {
  std::string module;
  std::string policy_op;
  std::optional<CastPolicy> policy;
  int device = -1;  // policy device index, -1 when no policy applied
};
using ForwardInfoPtr = std::shared_ptr<const ForwardInfo>;

// What the observer needs of an operator's schema, looked up once per session and operator.
struct OpInfo {
  std::optional<c10::OperatorHandle> handle;
  size_t num_args = 0;
  std::vector<bool> written;         // per argument: the op writes it (in-place, out=)
  std::vector<bool> dtype_argument;  // per argument: a ScalarType / ScalarType?
  bool mutates = false;
  bool returns = false;        // has outputs to judge (in-place foreach ops and fused optimizer steps have none)
  bool conversion = false;     // its output dtype is the caller's choice (to, _to_copy, copy_)
  bool overwrites = false;     // writes its mutated arguments without reading them (copy_, fill_, out=)
  bool uninitialized = false;  // its output holds whatever the memory held (empty, resize_)
  std::atomic<const OpEntry*> entry{nullptr};  // set once ampkit's kernel for it is registered
};

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

std::string full_name(const c10::OperatorName& name) {
  return name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
}

template <class F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) f(t);
  } else if (v.isList()) {  // Tensor?[]
    for (const c10::IValue& e : v.toListRef()) {
      if (e.isTensor()) f(e.toTensor());
    }
  }
}

// A dense CPU/CUDA floating tensor with values to read (not a FakeTensor or a functional wrapper).
bool readable_floating(const at::Tensor& t) {
  if (!t.defined() || !t.is_floating_point() || t.layout() != at::kStrided) return false;
  if (!t.is_cpu() && !t.is_cuda()) return false;
  const auto ks = t.key_set();
  return !ks.has_any(c10::python_ks) && !ks.has(c10::DispatchKey::Functionalize);
}

// Work the observer does on tensors: no autograd, no autocast, not observed itself.
struct QuietGuard {
  at::RecordFunctionGuard no_observers{false};
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{kKernelExcludedKeys};
};

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  // A sum with an inf or NaN term is not finite, so a finite float32 sum proves every element finite
  // in one read of the tensor, without a temporary of its size; only a sum that overflowed from
  // large finite values (or a float64 tensor) needs the exact test.
  if (t.scalar_type() != at::kDouble && std::isfinite(t.sum(at::kFloat).item<float>())) return true;
  return at::isfinite(t).all().item<bool>();
}

double abs_max(const at::Tensor& t) {
  if (t.numel() == 0) return 0.0;
  return t.abs().max().item<double>();
}

double max_finite(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return 65504.0;
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::max());
    default: return std::numeric_limits<double>::max();
  }
}

bool low_precision(c10::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

std::string dtype_short(c10::ScalarType dtype) {
  const std::string name = dtype_name(dtype);  // "torch.float16"
  return starts_with(name, "torch.") ? name.substr(6) : name;
}

std::string format_number(double v) {
  std::ostringstream out;
  out << std::setprecision(3) << v;
  return out.str();
}

std::string dtypes_string(const std::vector<c10::ScalarType>& dtypes) {
  std::string out;
  for (size_t i = 0; i < dtypes.size(); ++i) out += (i ? ", " : "") + dtype_short(dtypes[i]);
  return out;
}

}  // namespace

class Frame;

// One session's state on one thread: its stack of frames, the innermost on top.
struct ThreadSlot {
  std::uint64_t generation = 0;
  Frame* top = nullptr;
};

class DiagnosticSession : public std::enable_shared_from_this<DiagnosticSession> {
 public:
  static constexpr int kReport = 1;
  static constexpr int kLocate = 2;

  explicit DiagnosticSession(int mode) : mode_(mode) {}
  void begin();
  void stop(bool from_destructor);

  std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn, int slot);
  void on_end(const at::RecordFunction& fn, Frame& f, int slot);
  void on_cast(Frame& top, const at::Tensor& from, const at::Tensor& to, bool cached);

  std::vector<PrecisionRecord> rows() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return rows_;
  }
  std::optional<OverflowEvent> first() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return first_;
  }
  std::optional<OverflowEvent> first_nonfinite_input() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return first_input_;
  }
  void reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    first_.reset();
    first_input_.reset();
    nonfinite_storages_.clear();
    checked_.store(0, std::memory_order_relaxed);
    found_.store(false, std::memory_order_relaxed);
  }
  void set_loss_scale(const at::Tensor& scale) {
    std::lock_guard<std::mutex> lock(mutex_);
    loss_scale_ = scale;
  }
  int mode() const { return mode_; }
  std::uint64_t generation() const { return generation_; }

 private:
  OpInfo& op_info(const c10::OperatorName& name, const std::string& full);
  ForwardInfoPtr find_forward(std::uint64_t thread, std::int64_t seq);
  void remember_forward(const Frame& f);
  void remember(std::uint64_t begin, std::uint64_t end, ForwardInfoPtr info);

 public:
  void remember_range(std::uint64_t begin, std::uint64_t end, const std::string& module);

 private:
  void record_row(const Frame& f, const std::vector<c10::IValue>& outputs);
  void check_outputs(Frame& f, const std::vector<c10::IValue>& outputs);
  OverflowEvent describe(const Frame& f, const std::vector<c10::IValue>& outputs, bool inputs_finite);
  bool known_nonfinite(const at::Tensor& t);
  void remember_nonfinite(const at::Tensor& t);  // with mutex_ held

  const int mode_;
  int slot_ = -1;
  std::uint64_t generation_ = 0;
  at::CallbackHandle handle_ = 0;
  std::thread::id owner_;
  bool stopped_ = false;

  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::unique_ptr<OpInfo>> ops_;
  std::unordered_map<std::uint64_t, std::map<std::int64_t, ForwardInfoPtr>> forward_;
  // report
  std::vector<PrecisionRecord> rows_;
  std::unordered_map<std::string, size_t> row_index_;
  // locator
  std::atomic<bool> found_{false};
  std::atomic<std::int64_t> checked_{0};
  std::optional<OverflowEvent> first_;
  std::optional<OverflowEvent> first_input_;
  at::Tensor loss_scale_;
  // Storages whose non-finite values an op put there on purpose (a -inf mask), or computed from such.
  std::unordered_map<const c10::StorageImpl*, c10::weak_intrusive_ptr<c10::StorageImpl>> nonfinite_storages_;
};

// One observed call: an op, or an autograd node of a backward pass.
class Frame : public at::ObserverContext {
 public:
  std::shared_ptr<DiagnosticSession> session;
  Frame* parent = nullptr;
  bool node = false;       // an autograd node, not an op
  bool backward = false;   // runs in a backward pass
  bool in_region = false;  // the report records it
  bool nested = false;     // called by another op
  std::string op;
  OpInfo* info = nullptr;
  std::vector<c10::IValue> inputs;  // the op's arguments as called
  c10::impl::LocalDispatchKeySet keys = c10::impl::tls_local_dispatch_key_set();
  int device = -1;  // the policy device index whose region applies, -1 when none
  std::optional<CastPolicy> policy;
  std::string module;
  std::string grad_fn;     // nodes: "MmBackward0"
  ForwardInfoPtr forward;  // nodes: what made the node
  std::uint64_t seq_begin = 0;
  std::int64_t casts = 0;
  std::int64_t cached_casts = 0;
  std::int64_t cast_bytes = 0;
  std::vector<std::pair<const c10::TensorImpl*, c10::ScalarType>> cast_to;
  // In-place ops (locator): per argument, whether it was finite before the call (-1: not measured), for
  // the arguments the op writes and those that share memory with them; a copy of what it writes.
  std::vector<std::int8_t> finite_before;
  std::vector<at::Tensor> written_before;  // per argument: the copy, for those judged before the call
  std::size_t modules_depth = 0;           // nodes: t_modules' depth when the node started
  int exceptions = 0;                      // std::uncaught_exceptions() at the start

  // The dtypes the op computed in: each tensor argument's, or what ampkit cast it to.
  std::vector<c10::ScalarType> computed_dtypes() const {
    std::vector<c10::ScalarType> out;
    for (const auto& v : inputs) {
      for_each_tensor(v, [&](const at::Tensor& t) {
        if (!t.defined()) return;
        auto dtype = t.scalar_type();
        for (const auto& [impl, to] : cast_to) {
          if (impl == t.unsafeGetTensorImpl()) dtype = to;
        }
        out.push_back(dtype);
      });
    }
    return out;
  }
  std::vector<c10::ScalarType> argument_dtypes() const {
    std::vector<c10::ScalarType> out;
    for (const auto& v : inputs) {
      for_each_tensor(v, [&](const at::Tensor& t) {
        if (t.defined()) out.push_back(t.scalar_type());
      });
    }
    return out;
  }
  const Frame* node_frame() const {
    const Frame* f = this;
    while (f && !f->node) f = f->parent;
    return f;
  }
  // The frame whose policy decided this op's precision: itself or an op that called it.
  const Frame* policy_frame() const {
    for (const Frame* f = this; f && !f->node; f = f->parent) {
      if (f->policy) return f;
    }
    return nullptr;
  }
  const Frame* outermost_op() const {
    const Frame* f = this;
    while (f->parent && !f->parent->node) f = f->parent;
    return f;
  }
};

namespace {

thread_local std::array<ThreadSlot, kMaxSessions> t_slots;

ThreadSlot& thread_slot(int slot, std::uint64_t generation) {
  ThreadSlot& ts = t_slots[slot];
  if (ts.generation != generation) ts = ThreadSlot{generation, nullptr};
  return ts;
}

std::mutex slots_mutex;
std::array<std::shared_ptr<DiagnosticSession>, kMaxSessions> slots;
// A slot whose session was stopped on another thread than its own: its thread-local callback may
// still be registered on that thread, so the slot is never given to another session.
std::array<bool, kMaxSessions> orphaned{};
std::uint64_t generations = 0;

// The sessions alive now, copied under the lock.
std::array<std::shared_ptr<DiagnosticSession>, kMaxSessions> live_sessions() {
  std::lock_guard<std::mutex> lock(slots_mutex);
  return slots;
}

std::shared_ptr<DiagnosticSession> session_in(int slot) {
  std::lock_guard<std::mutex> lock(slots_mutex);
  return slots[slot];
}

template <int kSlot>
std::unique_ptr<at::ObserverContext> start_callback(const at::RecordFunction& fn) {
  auto session = session_in(kSlot);
  if (!session) return nullptr;
  try {
    return session->on_start(fn, kSlot);
  } catch (const std::exception& e) {
    TORCH_WARN_ONCE("ampkit diagnostics: could not observe an op: ", e.what());
    return nullptr;
  }
}

template <int kSlot>
void end_callback(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  if (!ctx) return;
  auto& f = static_cast<Frame&>(*ctx);
  try {
    f.session->on_end(fn, f, kSlot);
  } catch (const std::exception& e) {
    TORCH_WARN_ONCE("ampkit diagnostics: could not observe an op: ", e.what());
  }
}

template <size_t... I>
constexpr auto make_callbacks(std::index_sequence<I...>) {
  return std::array<std::pair<at::RecordFunctionCallback::StartCallback, at::RecordFunctionCallback::EndCallback>,
                    sizeof...(I)>{{{&start_callback<I>, &end_callback<I>}...}};
}
constexpr auto kCallbacks = make_callbacks(std::make_index_sequence<kMaxSessions>{});

// The policy device index whose ampkit region applies to a call with \p inputs under \p keys (the
// kernel's own choice: the enabled one of highest priority among the tensors' device types), or -1.
int region_device(const std::vector<c10::IValue>& values, const c10::impl::LocalDispatchKeySet& keys) {
  if (!keys.included_.has(kAutocastKey) || keys.excluded_.has(kAutocastKey)) return -1;
  int best = -1;
  for (const auto& v : values) {
    for_each_tensor(v, [&](const at::Tensor& t) { vote_policy_device(best, t, keys.excluded_); });
  }
  return best;
}

std::optional<c10::Device> first_device(const std::vector<c10::IValue>& values) {
  std::optional<c10::Device> out;
  for (const auto& v : values) {
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (!out && t.defined()) out = t.device();
    });
  }
  return out;
}

struct Recomputed {
  bool ran = false;
  bool finite = false;
  double absmax = 0.0;
};

// Runs \p f's op again with its floating inputs (and ScalarType arguments) in float32, without
// autocast, autograd or observers, restoring the random generator of its device afterwards.
Recomputed recompute_fp32(const Frame& f) {
  const OpInfo& info = *f.info;
  if (!info.handle || f.inputs.size() != info.num_args) return {};
  QuietGuard quiet;
  torch::jit::Stack stack;
  stack.reserve(f.inputs.size());
  // Every tensor argument is a copy (in float32 where it was fp16/bf16): some ops write arguments their
  // schema does not mark (batch_norm's running statistics), and none may touch the caller's tensors.
  auto up = [](const at::Tensor& t) {
    if (!t.defined()) return t;
    return t.to(low_precision(t.scalar_type()) ? at::kFloat : t.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  // What the op writes it writes into float32 copies: of what it read (in-place ops), or of any
  // memory (copy_, out=).
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    const c10::IValue& v = f.inputs[i];
    if (info.written[i]) {
      at::Tensor source;
      if (i < f.written_before.size() && f.written_before[i].defined()) {
        source = f.written_before[i];
      } else if (info.overwrites && v.isTensor()) {
        source = v.toTensor();
      } else {
        return {};
      }
      written.push_back(source.to(low_precision(source.scalar_type()) ? at::kFloat : source.scalar_type(),
                                  /*non_blocking=*/false, /*copy=*/true));
      stack.emplace_back(written.back());
    } else if (v.isTensor()) {
      const bool before = i < f.written_before.size() && f.written_before[i].defined();
      stack.emplace_back(up(before ? f.written_before[i] : v.toTensor()));
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : v.toTensorList()) list.push_back(up(t));
      stack.emplace_back(std::move(list));
    } else if (v.isList() && !v.isIntList() && !v.isDoubleList() && !v.isBoolList()) {
      c10::List<std::optional<at::Tensor>> list;  // Tensor?[]
      for (const c10::IValue& e : v.toListRef()) {
        list.push_back(e.isTensor() ? std::optional<at::Tensor>(up(e.toTensor())) : std::nullopt);
      }
      stack.emplace_back(std::move(list));
    } else if (info.dtype_argument[i] && v.isInt() && low_precision(static_cast<c10::ScalarType>(v.toInt()))) {
      stack.emplace_back(static_cast<std::int64_t>(at::kFloat));
    } else {
      stack.push_back(v);
    }
  }
  // The random generators it may draw from (its device's default one and those it is given) are
  // restored afterwards.
  std::vector<std::pair<at::Generator, at::Tensor>> generators;
  auto save = [&](at::Generator gen) {
    try {
      std::lock_guard<std::mutex> lock(gen.mutex());
      at::Tensor state = gen.get_state();
      generators.emplace_back(std::move(gen), std::move(state));
    } catch (const c10::Error&) {
    }
  };
  try {
    save(at::globalContext().defaultGenerator(first_device(f.inputs).value_or(c10::Device(c10::kCPU))));
  } catch (const c10::Error&) {
  }
  for (const auto& v : f.inputs) {
    if (v.isGenerator()) save(v.toGenerator());
  }
  Recomputed out;
  try {
    info.handle->callBoxed(stack);
    out.ran = true;
    out.finite = true;
    for (const auto& t : written) stack.emplace_back(t);
    for (const auto& v : stack) {
      for_each_tensor(v, [&](const at::Tensor& t) {
        if (!readable_floating(t)) return;
        const bool finite = all_finite(t);
        out.finite = out.finite && finite;
        out.absmax = std::max(out.absmax, finite ? abs_max(t) : std::numeric_limits<double>::infinity());
      });
    }
  } catch (const std::exception&) {
    out = Recomputed{};
  }
  for (auto& [gen, state] : generators) {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  return out;
}

std::string policy_call_cpp(const PolicyEdit& e) {
  return c10::str("ampkit::set_policy(\"", e.op, "\", c10::DeviceType::", c10::DeviceTypeName(e.device),
                  ", ampkit::CastPolicy::", to_string(e.policy), ");");
}

}  // namespace

void DiagnosticSession::begin() {
  owner_ = std::this_thread::get_id();
  {
    std::lock_guard<std::mutex> lock(slots_mutex);
    for (int i = 0; i < kMaxSessions; ++i) {
      if (!slots[i] && !orphaned[i]) {
        slot_ = i;
        break;
      }
    }
    TORCH_CHECK(slot_ >= 0, "ampkit: expected at most ", kMaxSessions,
                " PrecisionReport / OverflowLocator objects alive at once, got one more; stop one first");
    generation_ = ++generations;
    slots[slot_] = shared_from_this();
  }
  handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(kCallbacks[slot_].first, kCallbacks[slot_].second)
                                           .needsInputs(true)
                                           .needsOutputs(true)
                                           .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  live_diagnostic_sessions.fetch_add(1, std::memory_order_relaxed);
}

void DiagnosticSession::stop(bool from_destructor) {
  if (stopped_) return;
  const bool own_thread = owner_ == std::this_thread::get_id();
  TORCH_CHECK(own_thread || from_destructor,
              "ampkit: expected stop() on the thread that created the report or locator, got a call from another "
              "thread (its callbacks are registered on its own thread)");
  stopped_ = true;
  if (own_thread) at::removeCallback(handle_);
  std::shared_ptr<DiagnosticSession> self;  // released after the lock
  {
    std::lock_guard<std::mutex> lock(slots_mutex);
    self = std::move(slots[slot_]);
    if (!own_thread) orphaned[slot_] = true;
  }
  live_diagnostic_sessions.fetch_sub(1, std::memory_order_relaxed);
}

OpInfo& DiagnosticSession::op_info(const c10::OperatorName& name, const std::string& full) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = ops_[full];
  if (slot) return *slot;
  slot = std::make_unique<OpInfo>();
  OpInfo& info = *slot;
  info.handle = c10::Dispatcher::singleton().findOp(name);
  if (info.handle && info.handle->hasSchema()) {
    const auto& args = info.handle->schema().arguments();
    info.num_args = args.size();
    info.returns = !info.handle->schema().returns().empty();
    for (const auto& a : args) {
      const bool written = a.alias_info() && a.alias_info()->isWrite();
      info.written.push_back(written);
      info.mutates = info.mutates || written;
      auto type = a.real_type();
      if (type->kind() == c10::TypeKind::OptionalType) type = type->castRaw<c10::OptionalType>()->getElementType();
      info.dtype_argument.push_back(type->kind() == c10::TypeKind::ScalarTypeType);
    }
  } else {
    info.handle.reset();
    info.returns = true;
  }
  info.conversion = starts_with(full, "aten::to") || starts_with(full, "aten::_to_copy") ||
                    starts_with(full, "aten::copy_") || starts_with(full, "aten::_copy_from");
  info.overwrites = starts_with(full, "aten::copy_") || starts_with(full, "aten::fill_") ||
                    starts_with(full, "aten::zero_") || starts_with(name.overload_name, "out");
  info.uninitialized =
      full.find("empty") != std::string::npos || starts_with(full, "aten::resize") || starts_with(full, "aten::set_");
  return info;
}

std::unique_ptr<at::ObserverContext> DiagnosticSession::on_start(const at::RecordFunction& fn, int slot) {
  ThreadSlot& ts = thread_slot(slot, generation_);
  auto f = std::make_unique<Frame>();
  f->session = shared_from_this();
  f->parent = ts.top;
  const std::string_view name = fn.name();
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION || starts_with(name, kEvaluatePrefix)) {
    f->node = true;
    f->backward = true;
    f->grad_fn = starts_with(name, kEvaluatePrefix) ? std::string(name.substr(kEvaluatePrefix.size())) : name;
    f->forward = find_forward(fn.forwardThreadId(), fn.seqNr());
    if (f->parent && f->parent->node) {
      // The engine's evaluate_function range has no sequence number; the node's own range, inside
      // it, does. What the engine runs after the node (validate_outputs' sum_to) is the node's too.
      if (!f->forward) f->forward = f->parent->forward;
      if (!f->parent->forward && f->forward) {
        f->parent->forward = f->forward;
        f->parent->module = f->forward->module;
      }
    }
    f->module = f->forward ? f->forward->module : std::string();
    f->modules_depth = t_modules.size();
  } else {
    const auto op_name = fn.operator_name();
    if (!op_name) return nullptr;  // a range of torch's own, not an op
    const std::string full = full_name(*op_name);
    f->info = &op_info(*op_name, full);
    f->op = full;
    f->backward = f->parent && f->parent->backward;
    f->nested = f->parent && !f->parent->node;
    if (f->backward) {
      // In backward an op belongs to its node's forward module, unless a module runs inside the
      // backward (the recomputation of reentrant checkpointing): then to that module.
      const Frame* node = f->node_frame();
      f->module = node && t_modules.size() > node->modules_depth ? t_modules.back().name : f->parent->module;
    } else if (!t_modules.empty()) {
      f->module = t_modules.back().name;
    }
    const auto args = fn.inputs();
    // A boxed call passes the whole stack: the op's arguments are its last ones.
    const size_t n = f->info->handle ? std::min(f->info->num_args, args.size()) : args.size();
    f->inputs.assign(args.end() - static_cast<std::ptrdiff_t>(n), args.end());
    f->keys = c10::impl::tls_local_dispatch_key_set();
    f->seq_begin = at::sequence_number::peek();
    f->exceptions = std::uncaught_exceptions();
    f->device = region_device(f->inputs, f->keys);
    if (f->device >= 0) {
      const OpEntry* entry = f->info->entry.load(std::memory_order_acquire);
      if (!entry) {
        entry = registered_entry(full);
        if (entry) f->info->entry.store(entry, std::memory_order_release);
      }
      if (entry && entry->signature.load(std::memory_order_acquire)) {
        const auto raw = entry->policy[f->device].load(std::memory_order_acquire);
        if (raw != kNoPolicy) f->policy = static_cast<CastPolicy>(raw);
      }
    }
    f->in_region = f->backward || (f->parent && f->parent->in_region) || f->device >= 0;
    if ((mode_ & kLocate) && f->info->mutates && f->info->returns && !found_.load(std::memory_order_relaxed) &&
        f->inputs.size() == f->info->num_args) {
      QuietGuard quiet;
      f->finite_before.assign(f->inputs.size(), -1);
      f->written_before.resize(f->inputs.size());
      std::vector<at::Tensor> written;
      for (size_t i = 0; i < f->inputs.size(); ++i) {
        if (f->info->written[i]) for_each_tensor(f->inputs[i], [&](const at::Tensor& t) { written.push_back(t); });
      }
      for (size_t i = 0; i < f->inputs.size(); ++i) {
        // What it writes (unless it only overwrites it: copy_, out=), and what it reads from the same
        // memory (y.add_(y), mul(y[0], y[1], out=y[0])), is judged as it was before the call.
        bool measure = f->info->written[i] && !f->info->overwrites;
        if (!f->info->written[i]) {
          for_each_tensor(f->inputs[i], [&](const at::Tensor& t) {
            for (const auto& w : written) measure = measure || (t.defined() && t.is_alias_of(w));
          });
        }
        if (!measure) continue;
        bool finite = true;
        for_each_tensor(f->inputs[i], [&](const at::Tensor& t) {
          if (readable_floating(t)) finite = finite && all_finite(t);
        });
        f->finite_before[i] = finite;
        // An in-place op that overflows is recomputed in float32 from what it read.
        if (f->inputs[i].isTensor() && readable_floating(f->inputs[i].toTensor())) {
          f->written_before[i] = f->inputs[i].toTensor().clone();
        }
      }
    }
  }
  ts.top = f.get();
  return f;
}

void DiagnosticSession::on_end(const at::RecordFunction& fn, Frame& f, int slot) {
  ThreadSlot& ts = thread_slot(slot, generation_);
  ts.top = f.parent;
  if (f.node) return;
  if (std::uncaught_exceptions() > f.exceptions) return;  // the op failed: it computed nothing
  const auto& outputs = fn.outputs();
  if (!f.backward && (mode_ != kLocate || !found_.load(std::memory_order_relaxed))) remember_forward(f);
  if (mode_ & kReport) record_row(f, outputs);
  if (mode_ & kLocate) check_outputs(f, outputs);
}

void DiagnosticSession::on_cast(Frame& top, const at::Tensor& from, const at::Tensor& to, bool cached) {
  top.casts += 1;
  top.cached_casts += cached ? 1 : 0;
  top.cast_bytes += static_cast<std::int64_t>(to.nbytes());
  top.cast_to.emplace_back(from.unsafeGetTensorImpl(), to.scalar_type());
}

ForwardInfoPtr DiagnosticSession::find_forward(std::uint64_t thread, std::int64_t seq) {
  if (seq < 0) return nullptr;
  std::lock_guard<std::mutex> lock(mutex_);
  auto t = forward_.find(thread);
  if (t == forward_.end()) return nullptr;
  auto it = t->second.find(seq);
  return it == t->second.end() ? nullptr : it->second;
}

// The autograd nodes an op made (the sequence numbers it took) remember its module and the op whose
// policy decided their precision; inner ops end first, so the most specific record wins.
void DiagnosticSession::remember_forward(const Frame& f) {
  const std::uint64_t end = at::sequence_number::peek();
  if (end <= f.seq_begin) return;
  auto info = std::make_shared<ForwardInfo>();
  info->module = f.module;
  if (const Frame* p = f.policy_frame()) {
    info->policy_op = p->op;
    info->policy = p->policy;
    info->device = p->device;
  } else {
    info->policy_op = f.outermost_op()->op;
  }
  remember(f.seq_begin, end, std::move(info));
}

void DiagnosticSession::remember_range(std::uint64_t begin, std::uint64_t end, const std::string& module) {
  if (end <= begin) return;
  auto info = std::make_shared<ForwardInfo>();
  info->module = module;
  remember(begin, end, std::move(info));
}

// Records \p info for the sequence numbers [begin, end) of this thread that have no record yet.
void DiagnosticSession::remember(std::uint64_t begin, std::uint64_t end, ForwardInfoPtr info) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& records = forward_[at::RecordFunction::currentThreadId()];
  for (std::uint64_t s = begin; s < end; ++s) records.emplace(static_cast<std::int64_t>(s), info);
  if (records.size() > kMaxForwardRecords) {
    auto middle = records.begin();
    std::advance(middle, records.size() / 2);
    records.erase(records.begin(), middle);
  }
}

void DiagnosticSession::record_row(const Frame& f, const std::vector<c10::IValue>& outputs) {
  int device = f.device;
  std::optional<c10::Device> where = first_device(f.inputs);
  if (!where) {  // a factory: its device comes from its output
    where = first_device(outputs);
    if (!where) return;
    if (!f.in_region) {
      const int d = region_device(outputs, f.keys);
      if (d < 0) return;
      device = d;
    }
  } else if (!f.in_region) {
    return;
  }
  PrecisionRecord row;
  row.op = f.op;
  row.device = device >= 0 ? policy_device_type(device) : where->type();
  row.phase = f.backward ? "backward" : "forward";
  row.module = f.module;
  row.policy = f.policy;
  row.in_dtypes = f.computed_dtypes();
  row.arg_dtypes = f.argument_dtypes();
  for (const auto& v : outputs) {
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (!row.out_dtype && t.defined()) row.out_dtype = t.scalar_type();
    });
  }
  row.nested = f.nested;
  std::string key = c10::str(row.op, '|', static_cast<int>(row.device), '|', row.phase, '|', row.module, '|',
                             row.policy ? static_cast<int>(*row.policy) : -1, '|', row.nested, '|',
                             row.out_dtype ? static_cast<int>(*row.out_dtype) : -1, '|');
  for (auto d : row.in_dtypes) key += std::to_string(static_cast<int>(d)) + ",";
  key += '|';
  for (auto d : row.arg_dtypes) key += std::to_string(static_cast<int>(d)) + ",";
  std::lock_guard<std::mutex> lock(mutex_);
  auto [it, added] = row_index_.emplace(std::move(key), rows_.size());
  if (added) rows_.push_back(std::move(row));
  PrecisionRecord& r = rows_[it->second];
  r.calls += 1;
  r.casts += f.casts;
  r.cached_casts += f.cached_casts;
  r.cast_bytes += f.cast_bytes;
}

void DiagnosticSession::check_outputs(Frame& f, const std::vector<c10::IValue>& outputs) {
  if (found_.load(std::memory_order_acquire) || f.info->uninitialized || !f.info->returns) return;
  checked_.fetch_add(1, std::memory_order_relaxed);
  QuietGuard quiet;
  auto written = [&](size_t i) { return f.info->mutates && i < f.info->written.size() && f.info->written[i]; };
  auto aliases = [&](const at::Tensor& out, bool want_written) {
    for (size_t i = 0; i < f.inputs.size(); ++i) {
      if (written(i) != want_written) continue;
      bool alias = false;
      for_each_tensor(f.inputs[i], [&](const at::Tensor& t) { alias = alias || (t.defined() && out.is_alias_of(t)); });
      if (alias) return true;
    }
    return false;
  };
  // An output that views an argument holds values already judged, unless the op wrote into it.
  std::vector<at::Tensor> bad_outputs;
  for (const auto& v : outputs) {
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (!readable_floating(t) || (aliases(t, false) && !aliases(t, true))) return;
      if (!all_finite(t)) bad_outputs.push_back(t);
    });
  }
  if (bad_outputs.empty()) return;
  // Where the non-finite values came from: a non-finite number argument (fill_(-inf), masked_fill of
  // an attention mask) or a tensor known to hold such values on purpose explains them; any other
  // non-finite input came from outside what was watched. What an op only overwrites (the memory
  // copy_ fills) is not an input.
  bool explained = false;
  bool unknown_input = false;
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    const c10::IValue& v = f.inputs[i];
    if (v.isDouble() && !std::isfinite(v.toDouble())) explained = true;
    if (v.isComplexDouble() && !std::isfinite(std::abs(v.toComplexDouble()))) explained = true;
    if (i < f.finite_before.size() && f.finite_before[i] >= 0) {
      if (f.finite_before[i] == 0) {
        bool known = false;
        for_each_tensor(v, [&](const at::Tensor& t) { known = known || known_nonfinite(t); });
        (known ? explained : unknown_input) = true;
      }
      continue;
    }
    if (written(i)) continue;
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (!readable_floating(t) || all_finite(t)) return;
      (known_nonfinite(t) ? explained : unknown_input) = true;
    });
  }
  const bool inputs_finite = !explained && !unknown_input;
  if (!inputs_finite) {
    // Deliberate infinities and what is computed from them are not news: remember where they are.
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& t : bad_outputs) remember_nonfinite(t);
    if (!unknown_input || first_input_) return;
  } else {
    std::lock_guard<std::mutex> lock(mutex_);
    if (first_) return;
  }
  // A cast that overflowed is named by the conversion the caller made (to.dtype), not by the
  // copy_ inside it.
  const Frame* shown = &f;
  while (shown->info->conversion && shown->parent && !shown->parent->node && shown->parent->info->conversion) {
    shown = shown->parent;
  }
  OverflowEvent event = describe(*shown, outputs, inputs_finite);
  std::lock_guard<std::mutex> lock(mutex_);
  if (inputs_finite) {
    if (!first_) first_ = std::move(event);
    found_.store(true, std::memory_order_release);
  } else if (!first_input_) {
    first_input_ = std::move(event);
  }
}

bool DiagnosticSession::known_nonfinite(const at::Tensor& t) {
  if (!t.has_storage()) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = nonfinite_storages_.find(t.storage().unsafeGetStorageImpl());
  return it != nonfinite_storages_.end() && !it->second.expired();
}

void DiagnosticSession::remember_nonfinite(const at::Tensor& t) {
  if (!t.has_storage()) return;
  if (nonfinite_storages_.size() > 4096) {  // forget the storages that were freed
    for (auto it = nonfinite_storages_.begin(); it != nonfinite_storages_.end();) {
      it = it->second.expired() ? nonfinite_storages_.erase(it) : std::next(it);
    }
  }
  c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
  nonfinite_storages_.insert_or_assign(
      impl, c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(impl)));
}

OverflowEvent DiagnosticSession::describe(const Frame& f, const std::vector<c10::IValue>& outputs, bool inputs_finite) {
  OverflowEvent ev;
  ev.op = f.op;
  ev.phase = f.backward ? "backward" : "forward";
  ev.module = f.module;
  const Frame* node = f.node_frame();
  if (node) ev.grad_fn = node->grad_fn;
  ev.device = first_device(f.inputs).value_or(first_device(outputs).value_or(c10::Device(c10::kCPU))).type();
  ev.in_dtypes = f.computed_dtypes();
  for (const auto& v : outputs) {
    for_each_tensor(v, [&](const at::Tensor& t) {
      if (!ev.out_dtype && t.defined()) ev.out_dtype = t.scalar_type();
    });
  }
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    // An in-place op's input is what it read, not what it wrote.
    const bool before = i < f.written_before.size() && f.written_before[i].defined();
    for_each_tensor(before ? c10::IValue(f.written_before[i]) : f.inputs[i], [&](const at::Tensor& t) {
      if (readable_floating(t)) ev.input_absmax.push_back(abs_max(t));
    });
  }
  at::Tensor scale;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ev.op_index = checked_.load(std::memory_order_relaxed) - 1;
    scale = loss_scale_;
  }
  if (scale.defined()) ev.loss_scale = scale.item<double>();  // checked when set: one floating element
  const std::string out_name = ev.out_dtype ? dtype_short(*ev.out_dtype) : std::string("?");

  if (!inputs_finite) {
    ev.cause = "input";
    ev.explanation =
        c10::str(ev.op, " received a non-finite input that no watched op produced: it came from data, ",
                 "parameters or state that were already non-finite when the locator started (or a deliberate ",
                 "-inf, such as an attention mask made before it)");
    return ev;
  }

  const bool any_low = std::any_of(ev.in_dtypes.begin(), ev.in_dtypes.end(), low_precision) ||
                       (ev.out_dtype && low_precision(*ev.out_dtype));
  if (f.backward) {
    ForwardInfoPtr fwd = node ? node->forward : nullptr;
    if (fwd) {
      ev.policy_op = fwd->policy_op;
      ev.policy = fwd->policy;
    }
    const Recomputed again = any_low ? recompute_fp32(f) : Recomputed{};
    if (again.ran && again.finite) {
      const double limit = ev.out_dtype ? max_finite(*ev.out_dtype) : max_finite(at::kHalf);
      if (ev.loss_scale && *ev.loss_scale > 1.0 && again.absmax / *ev.loss_scale <= limit) {
        ev.cause = "loss_scale";
        ev.explanation = c10::str("the gradient overflowed ", out_name, " only because it carries the loss scale ",
                                  format_number(*ev.loss_scale), ": unscaled its largest value is ",
                                  format_number(again.absmax / *ev.loss_scale),
                                  ". GradScaler skips this step and lowers the scale; this is dynamic loss scaling at "
                                  "work, not a bug, unless "
                                  "it happens every step (then lower init_scale or raise growth_interval)");
        return ev;
      }
      ev.cause = "precision";
      if (fwd && fwd->device >= 0) {
        ev.suggestion = PolicyEdit{fwd->policy_op, policy_device_type(fwd->device), CastPolicy::fp32};
      }
      ev.explanation =
          c10::str("the gradient does not fit in ", out_name, " (largest value ", format_number(again.absmax),
                   ev.loss_scale ? c10::str(" with the loss scale ", format_number(*ev.loss_scale)) : "",
                   "); computed in float32 it is finite",
                   ev.suggestion ? c10::str(": run its forward op ", ev.suggestion->op, " in float32") : "",
                   ev.loss_scale ? ""
                                 : ". No loss scale was seen: if the loss was scaled by hand, tell the locator "
                                   "with set_loss_scale()");
      return ev;
    }
    ev.cause = "range";
    ev.explanation = again.ran || !any_low ? "not finite in float32 either: the values themselves are too large "
                                             "(look at the learning rate, the initialization or the data)"
                                           : "could not be recomputed in float32 to tell why";
    return ev;
  }

  // The op whose policy to change: the one whose policy applied, else the op the caller made
  // (a policy on it makes ampkit cast its inputs; the ops it calls are its business).
  const Frame* p = f.policy_frame();
  const Frame* target = p ? p : f.outermost_op();
  // No policy can change an explicit conversion, nor an op that ran outside any ampkit region.
  if (!p && (target->info->conversion || target->device < 0)) target = nullptr;
  if (p) {
    ev.policy_op = p->op;
    ev.policy = p->policy;
  } else {
    ev.policy_op = f.outermost_op()->op;
  }
  if (!any_low) {
    ev.cause = "range";
    ev.explanation =
        "it ran in float32: the values themselves are too large (look at the learning rate, the "
        "initialization or the data)";
    return ev;
  }
  const Recomputed again = recompute_fp32(target ? *target : f);
  if (again.ran && again.finite) {
    ev.cause = "precision";
    if (target) {
      ev.suggestion = PolicyEdit{target->op, policy_device_type(target->device), CastPolicy::fp32};
      ev.explanation = c10::str("the result does not fit in ", out_name,
                                " (largest value in float32: ", format_number(again.absmax), "); ", target->op,
                                p ? c10::str(" runs in lower precision by its policy ", to_string(*p->policy))
                                  : std::string(" has no policy and ran in the precision of its inputs"),
                                ", and computed in float32 it is finite");
    } else if (f.outermost_op()->info->conversion) {
      ev.explanation =
          c10::str("the caller converted to ", out_name, " explicitly and the values exceed its range (largest value ",
                   format_number(again.absmax), "); no policy decides this conversion");
    } else {
      ev.explanation =
          c10::str("the result does not fit in ", out_name, " (largest value in float32: ", format_number(again.absmax),
                   "); ", f.outermost_op()->op,
                   " ran outside any ampkit region, in the precision of its inputs: compute it in float32");
    }
    return ev;
  }
  ev.cause = "range";
  ev.explanation = again.ran ? "not finite in float32 either: the values themselves are too large (look at the "
                               "learning rate, the initialization or the data)"
                             : "could not be recomputed in float32 to tell why";
  return ev;
}

void note_cast_slow(const at::Tensor& from, const at::Tensor& to, bool cached) {
  const auto live = live_sessions();
  for (int i = 0; i < kMaxSessions; ++i) {
    if (!live[i]) continue;
    ThreadSlot& ts = thread_slot(i, live[i]->generation());
    if (ts.top && !ts.top->node) live[i]->on_cast(*ts.top, from, to, cached);
  }
}

void note_loss_scale_slow(const at::Tensor& scale) {
  if (!scale.defined() || scale.numel() != 1 || !scale.is_floating_point()) return;
  const auto live = live_sessions();
  for (const auto& s : live) {
    if (s && (s->mode() & DiagnosticSession::kLocate)) s->set_loss_scale(scale);
  }
}

}  // namespace detail

using detail::DiagnosticSession;

namespace detail {
void push_module_scope(std::string name) {
  t_modules.push_back(OpenModule{std::move(name), at::sequence_number::peek()});
}

bool pop_module_scope(const std::string* expected) {
  if (t_modules.empty() || (expected && t_modules.back().name != *expected)) return false;
  OpenModule top = std::move(t_modules.back());
  t_modules.pop_back();
  // The autograd nodes made in the scope that no op claimed (a custom autograd Function's) are the
  // scope's; the ops' own records, made first, are more specific and stay.
  if (live_diagnostic_sessions.load(std::memory_order_relaxed) > 0) {
    const std::uint64_t end = at::sequence_number::peek();
    const auto live = live_sessions();
    for (const auto& session : live) {
      if (session) session->remember_range(top.seq_begin, end, top.name);
    }
  }
  return true;
}
std::size_t module_scope_depth() { return t_modules.size(); }

void truncate_module_scopes(std::size_t depth) {
  while (t_modules.size() > depth) pop_module_scope(nullptr);
}
}  // namespace detail

ModuleScope::ModuleScope(std::string name) { detail::push_module_scope(std::move(name)); }
ModuleScope::~ModuleScope() { detail::pop_module_scope(nullptr); }

PrecisionReport::PrecisionReport() : session_(std::make_shared<DiagnosticSession>(DiagnosticSession::kReport)) {
  session_->begin();
}
PrecisionReport::~PrecisionReport() {
  try {
    session_->stop(/*from_destructor=*/true);
  } catch (const std::exception&) {
  }
}
void PrecisionReport::stop() { session_->stop(/*from_destructor=*/false); }
std::vector<PrecisionRecord> PrecisionReport::rows() const { return session_->rows(); }

std::string PrecisionReport::to_string(bool nested, const std::string& phase) const {
  TORCH_CHECK_VALUE(phase.empty() || phase == "forward" || phase == "backward",
                    "PrecisionReport::to_string: expected phase \"forward\", \"backward\" or empty, got \"", phase,
                    "\"");
  const std::vector<std::string> header = {"op",        "device", "phase", "module",    "policy",
                                           "in -> out", "calls",  "casts", "cast bytes"};
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : session_->rows()) {
    if ((r.nested && !nested) || (!phase.empty() && r.phase != phase)) continue;
    const std::string casts =
        r.cached_casts ? c10::str(r.casts, " (", r.cached_casts, " cached)") : std::to_string(r.casts);
    cells.push_back({(r.nested ? "  " : "") + r.op, c10::DeviceTypeName(r.device, /*lower_case=*/true), r.phase,
                     r.module.empty() ? "-" : r.module, r.policy ? ampkit::to_string(*r.policy) : "-",
                     detail::dtypes_string(r.in_dtypes) + " -> " +
                         (r.out_dtype ? detail::dtype_short(*r.out_dtype) : std::string("-")),
                     std::to_string(r.calls), casts, std::to_string(r.cast_bytes)});
  }
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) {
    width[c] = header[c].size();
    for (const auto& row : cells) width[c] = std::max(width[c], row[c].size());
  }
  std::ostringstream out;
  auto line = [&](const std::vector<std::string>& row) {
    for (size_t c = 0; c < row.size(); ++c) {
      const bool numeric = c >= 6;
      out << (c ? "  " : "") << (numeric ? std::right : std::left) << std::setw(static_cast<int>(width[c])) << row[c];
    }
    out << "\n";
  };
  line(header);
  for (const auto& row : cells) line(row);
  return out.str();
}

OverflowLocator::OverflowLocator() : session_(std::make_shared<DiagnosticSession>(DiagnosticSession::kLocate)) {
  session_->begin();
}
OverflowLocator::~OverflowLocator() {
  try {
    session_->stop(/*from_destructor=*/true);
  } catch (const std::exception&) {
  }
}
std::optional<OverflowEvent> OverflowLocator::first() const { return session_->first(); }
std::optional<OverflowEvent> OverflowLocator::first_nonfinite_input() const {
  return session_->first_nonfinite_input();
}
void OverflowLocator::reset() { session_->reset(); }
void OverflowLocator::set_loss_scale(const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.defined() && scale.numel() == 1 && scale.is_floating_point(),
                    "OverflowLocator::set_loss_scale: expected scale to be a one-element floating-point tensor, got ",
                    scale.defined() ? c10::str(scale.scalar_type(), " tensor of ", scale.numel(), " elements")
                                    : std::string("an undefined tensor"));
  session_->set_loss_scale(scale);
}
void OverflowLocator::stop() { session_->stop(/*from_destructor=*/false); }

std::string OverflowEvent::to_string() const {
  std::ostringstream out;
  out << "first non-finite output: " << op << " (" << phase << (grad_fn.empty() ? "" : ", in " + grad_fn) << ")";
  if (!module.empty()) out << " in module '" << module << "'";
  out << "\n  inputs " << detail::dtypes_string(in_dtypes) << " -> "
      << (out_dtype ? detail::dtype_short(*out_dtype) : std::string("-"));
  if (!input_absmax.empty()) {
    out << "; max |input|";
    for (size_t i = 0; i < input_absmax.size(); ++i) out << (i ? ", " : " ") << detail::format_number(input_absmax[i]);
  }
  if (loss_scale) out << "; loss scale " << detail::format_number(*loss_scale);
  out << "\n  cause: " << cause << ": " << explanation;
  if (suggestion) out << "\n  fix: " << detail::policy_call_cpp(*suggestion);
  return out.str();
}

}  // namespace ampkit
