#include <ampkit/distributed.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/nn/module.h>
// gloo when its headers were found at configure time (CMakeLists.txt; the torch wheel lacks them).
#if defined(AMPKIT_HAVE_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
// NCCL when LibTorch was built with it and its header is there (CUDA wheels keep nccl.h in a
// separate package).
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define AMPKIT_HAVE_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace ampkit::dist {

bool gloo_available() {
#if defined(AMPKIT_HAVE_GLOO)
  return true;
#else
  return false;
#endif
}

namespace {

// The integer in environment variable \p name, nullopt when unset; a ValueError names the variable
// when it is set to something else.
std::optional<int64_t> env_int(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) return std::nullopt;
  const std::string text(raw);
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(!text.empty() && errno == 0 && end != nullptr && *end == '\0',
                    "init_process_group: expected environment variable ", name, " to be an integer, got '", text, "'");
  return value;
}

// The option if set, else the environment variable, else a ValueError naming both.
int64_t option_or_env(std::optional<int64_t> option, const char* setter, const char* env) {
  if (option) return *option;
  const auto from_env = env_int(env);
  TORCH_CHECK_VALUE(from_env.has_value(), "init_process_group: expected ProcessGroupOptions::", setter,
                    " or environment variable ", env, ", got neither");
  return *from_env;
}

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout) {
#if defined(AMPKIT_HAVE_GLOO)
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // torch's choice of interface: GLOO_SOCKET_IFNAME, else the hostname's address, else loopback.
  options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice(/*lazyInit=*/false));
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
#else
  (void)store, (void)rank, (void)size, (void)timeout;
  TORCH_CHECK_VALUE(false,
                    "init_process_group: expected an ampkit built with gloo's headers for backend 'gloo' (this "
                    "build found none: install libgloo-dev and rebuild), got a build without them; a process group "
                    "made elsewhere works with DataParallel, GradScaler::set_process_group and the Trainer");
#endif
}

}  // namespace

c10::intrusive_ptr<c10d::ProcessGroup> init_process_group(const ProcessGroupOptions& options) {
  const int64_t world_size = option_or_env(options.world_size(), "world_size", "WORLD_SIZE");
  const int64_t rank = option_or_env(options.rank(), "rank", "RANK");
  const int64_t port = option_or_env(options.master_port(), "master_port", "MASTER_PORT");
  std::string addr;
  if (options.master_addr()) {
    addr = *options.master_addr();
  } else {
    const char* env = std::getenv("MASTER_ADDR");
    TORCH_CHECK_VALUE(env != nullptr,
                      "init_process_group: expected ProcessGroupOptions::master_addr or environment variable "
                      "MASTER_ADDR, got neither");
    addr = env;
  }
  const std::string backend =
      options.backend().value_or(options.device_type() == c10::kCUDA ? std::string("nccl") : std::string("gloo"));
  TORCH_CHECK_VALUE(world_size >= 1 && world_size <= std::numeric_limits<int>::max(),
                    "init_process_group: expected world_size >= 1, got ", world_size);
  TORCH_CHECK_VALUE(rank >= 0 && rank < world_size, "init_process_group: expected rank in [0, world_size ", world_size,
                    "), got ", rank);
  TORCH_CHECK_VALUE(port >= 1 && port <= 65535, "init_process_group: expected master_port in [1, 65535], got ", port);
  TORCH_CHECK_VALUE(!addr.empty(), "init_process_group: expected a non-empty master_addr, got ''");
  TORCH_CHECK_VALUE(options.timeout().count() > 0, "init_process_group: expected timeout > 0 ms, got ",
                    options.timeout().count());
  TORCH_CHECK_VALUE(backend == "gloo" || backend == "nccl",
                    "init_process_group: expected backend 'gloo' or 'nccl', got '", backend, "'");
#ifndef AMPKIT_HAVE_NCCL
  TORCH_CHECK_VALUE(backend != "nccl",
                    "init_process_group: expected backend 'gloo': the LibTorch ampkit was built "
                    "against has no NCCL, got 'nccl'");
#endif

  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(port);
  store_options.isServer = rank == 0;
  store_options.numWorkers = static_cast<int>(world_size);
  store_options.waitWorkers = true;
  store_options.timeout = options.timeout();
  auto store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);

  const int r = static_cast<int>(rank);
  const int n = static_cast<int>(world_size);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, r, n);
  if (backend == "gloo") {
    auto gloo = make_gloo(store, r, n, options.timeout());
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    // gloo reduces CUDA tensors too (through host copies), as torch registers it.
    group->setBackend(c10::kCPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    group->setBackend(c10::kCUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
  }
#ifdef AMPKIT_HAVE_NCCL
  if (backend == "nccl") {
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = options.timeout();
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, r, n, nccl_options);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
    group->setBackend(c10::kCUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
  }
#endif
  return group;
}

int64_t local_rank(int64_t default_value) {
  const char* raw = std::getenv("LOCAL_RANK");
  if (raw == nullptr) return default_value;
  const std::string text(raw);
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(!text.empty() && *end == '\0' && value >= 0,
                    "local_rank: expected environment variable LOCAL_RANK to be an integer >= 0, got '", text, "'");
  return value;
}

void broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& group, std::vector<at::Tensor> tensors,
                         int64_t bucket_bytes, int64_t src) {
  TORCH_CHECK_VALUE(group, "broadcast_coalesced: expected a process group, got nullptr");
  TORCH_CHECK_VALUE(bucket_bytes > 0, "broadcast_coalesced: expected bucket_bytes > 0, got ", bucket_bytes);
  TORCH_CHECK_VALUE(src >= 0 && src < group->getSize(), "broadcast_coalesced: expected src in [0, ", group->getSize(),
                    "), got ", src);
  if (tensors.empty()) return;
  at::NoGradGuard no_grad;
  c10d::broadcast_coalesced(group, tensors, static_cast<size_t>(bucket_bytes), static_cast<int>(src));
}

void all_reduce_found_infs(const c10::intrusive_ptr<c10d::ProcessGroup>& group, std::vector<at::Tensor>& found_infs) {
  TORCH_CHECK_VALUE(group, "all_reduce_found_infs: expected a process group, got nullptr");
  // Start every all-reduce before waiting on any, as torch's ShardedGradScaler does.
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(found_infs.size());
  for (auto& found_inf : found_infs) {
    std::vector<at::Tensor> one{found_inf};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::MAX;
    works.push_back(group->allreduce(one, opts));
  }
  for (auto& work : works) work->wait();
}

// ---- DataParallel ----

void DataParallelOptions::validate() const {
  TORCH_CHECK_VALUE(std::isfinite(bucket_cap_mb_) && bucket_cap_mb_ > 0.0,
                    "DataParallel: expected bucket_cap_mb to be finite and > 0, got ", bucket_cap_mb_);
}

DataParallel::DataParallel(torch::nn::Module& module, c10::intrusive_ptr<c10d::ProcessGroup> group,
                           DataParallelOptions options)
    : module_(module), group_(std::move(group)), options_(options) {
  options_.validate();
  TORCH_CHECK_VALUE(group_, "DataParallel: expected a process group, got nullptr");
  // The trainable parameters, each once (a shared parameter must not get two autograd hooks).
  std::vector<at::Tensor> params;
  std::unordered_map<size_t, std::string> names;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& item : module_.named_parameters(/*recurse=*/true)) {
    const at::Tensor& p = item.value();
    if (!p.requires_grad() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
    names.emplace(params.size(), item.key());
    params.push_back(p);
  }
  TORCH_CHECK_VALUE(!params.empty(),
                    "DataParallel: expected a module with at least one parameter that requires grad, "
                    "got none");
  for (const auto& p : params) {
    TORCH_CHECK_VALUE(p.device() == params.front().device(),
                      "DataParallel: expected every parameter on one device (a module per rank and device), got ",
                      params.front().device().str(), " and ", p.device().str());
  }
  for (const auto& b : module_.buffers(/*recurse=*/true)) {
    if (b.defined()) buffers_.push_back(b);
  }

  // As DDP's constructor: the same shapes on every rank, then rank 0's parameters and buffers.
  c10d::verify_params_across_processes(group_, params, std::nullopt);
  std::vector<at::Tensor> state = params;
  state.insert(state.end(), buffers_.begin(), buffers_.end());
  broadcast_coalesced(group_, state);

  // DDP's bucketing: without unused parameters the first iteration uses one bucket, and
  // rebuild_buckets() then cuts [1 MiB, bucket_cap, bucket_cap, ...] in the order backward
  // produced the grads; with them, the caps apply from the start, in reverse parameter order.
  const auto cap = static_cast<int64_t>(options_.bucket_cap_mb() * 1024.0 * 1024.0);
  std::vector<size_t> limits;
  if (options_.find_unused_parameters()) {
    limits = {static_cast<size_t>(c10d::kDefaultFirstBucketBytes), static_cast<size_t>(cap)};
  } else {
    limits = {std::numeric_limits<size_t>::max()};
  }
  const std::vector<bool> expect_sparse(params.size(), false);
  auto [bucket_indices, per_bucket_limits] = c10d::compute_bucket_assignment_by_size(params, limits, expect_sparse);
  std::reverse(bucket_indices.begin(), bucket_indices.end());
  params_ = params;
  reducer_ = std::make_unique<c10d::Reducer>(params, std::move(bucket_indices), group_, expect_sparse, cap,
                                             options_.find_unused_parameters(), options_.gradient_as_bucket_view(),
                                             std::move(names), static_cast<int64_t>(c10d::kDefaultFirstBucketBytes),
                                             /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
                                             /*bucket_bytes_cap_list=*/std::vector<int64_t>{});
  // The reducer keeps these alive (a weak reference in the parameter would let them go).
  for (const auto& p : params_) accumulators_.push_back(torch::autograd::impl::grad_accumulator(p).get());
}

DataParallel::~DataParallel() = default;

void DataParallel::pre_forward() {
  if (!require_backward_grad_sync_) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    TORCH_CHECK(torch::autograd::impl::grad_accumulator(params_[i]).get() == accumulators_[i],
                "DataParallel.pre_forward: parameter ", i,
                " has another gradient accumulator than the one the "
                "reducer hooked (torch::nn::Module::load or set_ replaced its data), so its grads would not be "
                "averaged: construct a new DataParallel after loading");
  }
  reducer_->prepare_for_forward();
  // Once, after the first synchronized iteration recorded the order of the grads (a broadcast of
  // the new assignment from rank 0 inside).
  reducer_->rebuild_buckets();
  // Unlike DDP, which broadcasts buffers in the first forward after a synchronized one, only
  // before synchronized forwards: accumulation micro-steps then communicate nothing at all.
  if (options_.broadcast_buffers() && !buffers_.empty()) broadcast_coalesced(group_, buffers_);
}

void DataParallel::post_forward(const std::vector<at::Tensor>& outputs) {
  if (!require_backward_grad_sync_) return;
  // DDP passes the outputs only when it must search them for unused parameters.
  reducer_->prepare_for_backward(options_.find_unused_parameters() ? outputs : std::vector<at::Tensor>{});
}

}  // namespace ampkit::dist
