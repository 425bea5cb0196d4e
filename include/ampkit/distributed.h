#pragma once
/// \file distributed.h
/// Data-parallel AMP training for C++ LibTorch loops on c10d, the engine under Python's
/// DistributedDataParallel: rendezvous through `c10d::TCPStore`, a gloo (CPU) or NCCL (CUDA)
/// `c10d::ProcessGroup`, and DataParallel, a thin owner of DDP's own `c10d::Reducer` (bucketed
/// gradient averaging overlapped with backward). ampkit adds no communication layer of its own.
///
/// Most loops only need the process group and TrainerOptions::process_group():
/// \code
///   auto pg = ampkit::dist::init_process_group();  // MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
///   ampkit::Trainer trainer(*model, opt, ampkit::TrainerOptions().dtype(at::kHalf).process_group(pg));
///   for (auto& [x, y] : shard_of_batches(pg->getRank(), pg->getSize()))
///     trainer.step([&] { return torch::mse_loss(model->forward(x), y); });
///   if (pg->getRank() == 0) trainer.save("ckpt.pt");  // or trainer.save(...) on every rank
/// \endcode
/// A hand-written loop drives DataParallel itself:
/// \code
///   ampkit::dist::DataParallel ddp(*model, pg);   // broadcasts parameters and buffers from rank 0
///   ddp.pre_forward();
///   auto loss = torch::mse_loss(model->forward(x), y);
///   ddp.post_forward({loss});                     // arms the reducer for this backward
///   scaler.scale(loss).backward();                // buckets are averaged while backward runs
/// \endcode

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}  // namespace torch::nn
namespace c10d {
class Reducer;
}  // namespace c10d

namespace ampkit::dist {

/// Where and how to rendezvous. Every unset field is read from the environment variable that
/// torchrun sets (named on each setter) when init_process_group() runs.
struct ProcessGroupOptions {
  /// "gloo" or "nccl". Default: "nccl" when \ref device_type is CUDA, else "gloo".
  ProcessGroupOptions& backend(std::string v) {
    backend_ = std::move(v);
    return *this;
  }
  /// Device type of the tensors the group will reduce (picks the default backend). Default CPU.
  ProcessGroupOptions& device_type(c10::DeviceType v) {
    device_type_ = v;
    return *this;
  }
  /// Host of rank 0's TCPStore. Default: MASTER_ADDR.
  ProcessGroupOptions& master_addr(std::string v) {
    master_addr_ = std::move(v);
    return *this;
  }
  /// Port of rank 0's TCPStore (1..65535). Default: MASTER_PORT.
  ProcessGroupOptions& master_port(int64_t v) {
    master_port_ = v;
    return *this;
  }
  /// This process's rank in [0, world_size). Default: RANK.
  ProcessGroupOptions& rank(int64_t v) {
    rank_ = v;
    return *this;
  }
  /// Number of processes (>= 1). Default: WORLD_SIZE.
  ProcessGroupOptions& world_size(int64_t v) {
    world_size_ = v;
    return *this;
  }
  /// Timeout of the rendezvous and of every collective (> 0). Default 10 minutes.
  ProcessGroupOptions& timeout(std::chrono::milliseconds v) {
    timeout_ = v;
    return *this;
  }

  const std::optional<std::string>& backend() const { return backend_; }
  c10::DeviceType device_type() const { return device_type_; }
  const std::optional<std::string>& master_addr() const { return master_addr_; }
  std::optional<int64_t> master_port() const { return master_port_; }
  std::optional<int64_t> rank() const { return rank_; }
  std::optional<int64_t> world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  std::optional<std::string> backend_;
  c10::DeviceType device_type_ = c10::kCPU;
  std::optional<std::string> master_addr_;
  std::optional<int64_t> master_port_;
  std::optional<int64_t> rank_;
  std::optional<int64_t> world_size_;
  std::chrono::milliseconds timeout_{std::chrono::minutes(10)};
};

/// Rendezvous and the process group, as torch.distributed.init_process_group(init_method="env://"):
/// rank 0 serves a c10d::TCPStore at master_addr:master_port, every rank connects, and a
/// ProcessGroupGloo (or ProcessGroupNCCL, in a CUDA build of LibTorch) is created on it. Blocks
/// until all world_size ranks have joined or the timeout expires. Throws c10::ValueError naming
/// the option or environment variable that is missing or out of range.
c10::intrusive_ptr<c10d::ProcessGroup> init_process_group(const ProcessGroupOptions& options = {});

/// Whether init_process_group can create gloo groups: false where ampkit was built without gloo's
/// headers (which the torch wheel does not ship; Debian's libgloo-dev has them).
bool gloo_available();

/// LOCAL_RANK from the environment (the device index a rank should use), or \p default_value when
/// it is not set. Throws c10::ValueError when it is set but not an integer >= 0.
int64_t local_rank(int64_t default_value = 0);

/// Broadcasts \p tensors in place from rank \p src in buckets of at most \p bucket_bytes
/// (c10d::broadcast_coalesced, what DDP's _sync_module_states uses).
void broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& group, std::vector<at::Tensor> tensors,
                         int64_t bucket_bytes = 250 * 1024 * 1024, int64_t src = 0);

/// Options of DataParallel, with torch.nn.parallel.DistributedDataParallel's names and defaults.
struct DataParallelOptions {
  /// Size cap of a gradient bucket in MiB (> 0), DDP's bucket_cap_mb.
  DataParallelOptions& bucket_cap_mb(double v) {
    bucket_cap_mb_ = v;
    return *this;
  }
  /// Allow parameters that get no gradient in an iteration (on some rank or all): the reducer then
  /// walks the autograd graph from post_forward()'s outputs and all-reduces a map of used
  /// parameters once per synchronized backward. Costs that walk and one collective.
  DataParallelOptions& find_unused_parameters(bool v) {
    find_unused_parameters_ = v;
    return *this;
  }
  /// Broadcast the module's buffers from rank 0 before each synchronized forward.
  DataParallelOptions& broadcast_buffers(bool v) {
    broadcast_buffers_ = v;
    return *this;
  }
  /// Let the grads be views into the buckets (saves one copy and the grads' memory).
  DataParallelOptions& gradient_as_bucket_view(bool v) {
    gradient_as_bucket_view_ = v;
    return *this;
  }

  double bucket_cap_mb() const { return bucket_cap_mb_; }
  bool find_unused_parameters() const { return find_unused_parameters_; }
  bool broadcast_buffers() const { return broadcast_buffers_; }
  bool gradient_as_bucket_view() const { return gradient_as_bucket_view_; }

  /// Throws c10::ValueError naming the option unless every option is in range.
  void validate() const;

 private:
  double bucket_cap_mb_ = 25.0;
  bool find_unused_parameters_ = false;
  bool broadcast_buffers_ = true;
  bool gradient_as_bucket_view_ = false;
};

/// DistributedDataParallel's semantics for a C++ module, on c10d::Reducer: the constructor
/// broadcasts parameters and buffers from rank 0; each synchronized backward averages the grads
/// over the group in buckets whose all-reduce starts as soon as a bucket's grads are ready (the
/// first iteration uses one bucket, and the buckets are then rebuilt in the order backward
/// produced the grads, as DDP does); with require_backward_grad_sync(false) (no_sync()) backward
/// only accumulates locally and nothing is communicated.
///
/// Call pre_forward() before and post_forward(outputs) after each forward whose backward follows.
/// Not thread-safe. The module must outlive this object and keep its parameters: the reducer
/// holds them and hooks their gradient accumulators. torch::nn::Module::load (torch::load of a
/// module) replaces the parameters' data with set_, which gives them new accumulators: load before
/// constructing the DataParallel, or construct a new one after (pre_forward() throws otherwise,
/// rather than silently not averaging).
class DataParallel {
 public:
  /// Throws c10::ValueError for bad options, a null group, a module without trainable parameters
  /// or parameters on several devices.
  DataParallel(torch::nn::Module& module, c10::intrusive_ptr<c10d::ProcessGroup> group,
               DataParallelOptions options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  /// Before a forward: when grads will be synchronized, rebuilds the buckets once (after the first
  /// iteration) and broadcasts the buffers from rank 0 (if broadcast_buffers). No-op otherwise.
  void pre_forward();
  /// After the forward, before backward: arms the reducer so that backward averages the grads
  /// (\p outputs are searched for unused parameters when find_unused_parameters is set). No-op
  /// when require_backward_grad_sync() is false.
  void post_forward(const std::vector<at::Tensor>& outputs);

  /// Whether the next backward averages the grads (DDP's require_backward_grad_sync).
  bool require_backward_grad_sync() const { return require_backward_grad_sync_; }
  void set_require_backward_grad_sync(bool v) { require_backward_grad_sync_ = v; }

  /// RAII form of set_require_backward_grad_sync(false), DDP's no_sync(): the backward passes in
  /// its scope accumulate grads locally; the first synchronized backward after it averages the sum.
  class NoSyncGuard {
   public:
    explicit NoSyncGuard(DataParallel& ddp) : ddp_(ddp), previous_(ddp.require_backward_grad_sync()) {
      ddp_.set_require_backward_grad_sync(false);
    }
    ~NoSyncGuard() { ddp_.set_require_backward_grad_sync(previous_); }
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;

   private:
    DataParallel& ddp_;
    bool previous_;
  };
  /// `auto guard = ddp.no_sync();`
  [[nodiscard]] NoSyncGuard no_sync() { return NoSyncGuard(*this); }

  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const { return group_; }
  const DataParallelOptions& options() const { return options_; }
  /// The c10d::Reducer itself, for what this class does not wrap (comm hooks, static graph).
  c10d::Reducer& reducer() { return *reducer_; }

 private:
  torch::nn::Module& module_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  DataParallelOptions options_;
  std::vector<at::Tensor> params_;
  std::vector<const void*> accumulators_;  // of params_, as hooked by the reducer
  std::vector<at::Tensor> buffers_;
  std::unique_ptr<c10d::Reducer> reducer_;
  bool require_backward_grad_sync_ = true;
};

/// All-reduces (MAX) each found_inf tensor in place over \p group and waits for the work, so that
/// an inf/NaN seen by one rank makes every rank skip (what torch's ShardedGradScaler does before
/// its skip decision). The wait does not synchronize the host with a CUDA device: NCCL work only
/// makes the current stream wait.
void all_reduce_found_infs(const c10::intrusive_ptr<c10d::ProcessGroup>& group, std::vector<at::Tensor>& found_infs);

}  // namespace ampkit::dist
