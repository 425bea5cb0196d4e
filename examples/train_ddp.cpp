// Data-parallel mixed-precision training in C++ with ampkit and LibTorch alone: every process
// trains a replica of a small MLP on its share of each global batch; ampkit::Trainer with
// TrainerOptions::process_group averages the grads over c10d (gloo on the CPU, NCCL on CUDA) while
// backward runs, and every rank skips the same fp16 overflow steps. Launch one process per rank:
//
//   MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 RANK=0 build/examples/train_ddp &
//   MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 RANK=1 build/examples/train_ddp
//
// (torchrun sets the same variables: `torchrun --nproc-per-node 2 --no-python build/examples/train_ddp`.)
// Without WORLD_SIZE it trains alone.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>

int main() {
  const bool cuda = torch::cuda::is_available();
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, ampkit::dist::local_rank()) : torch::kCPU;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  if (std::getenv("WORLD_SIZE") != nullptr) {
    // The rest from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE; CUDA picks NCCL when LibTorch has it.
    group = ampkit::dist::init_process_group(ampkit::dist::ProcessGroupOptions().device_type(device.type()));
  }
  const int64_t rank = group ? group->getRank() : 0;
  const int64_t world = group ? group->getSize() : 1;

  // The same teacher on every rank (seeded alike); the student starts from rank 0's weights,
  // which the trainer broadcasts, whatever each rank initialized.
  torch::manual_seed(0);
  torch::nn::Sequential teacher(torch::nn::Linear(32, 64), torch::nn::Tanh(), torch::nn::Linear(64, 4));
  torch::manual_seed(1 + rank);
  torch::nn::Sequential model(torch::nn::Linear(32, 128), torch::nn::GELU(), torch::nn::Linear(128, 4));
  teacher->to(device);
  model->to(device);

  ampkit::optim::AdamW optimizer(model->parameters(), ampkit::optim::AdamWOptions(3e-3).weight_decay(1e-4));
  auto options = ampkit::TrainerOptions(device.type()).dtype(torch::kHalf).accumulation_steps(2).max_grad_norm(1.0);
  if (group) options.process_group(group);  // broadcast from rank 0, bucketed all-reduce, collective skips
  ampkit::Trainer trainer(*model, optimizer, options);

  const int64_t global_batch = 64;
  const int64_t rows = global_batch / world;
  double first = -1, last = 0;
  const int steps = 200;
  for (int step = 0; step < steps; ++step) {
    // Every rank draws the same global batch and keeps its slice of it.
    torch::manual_seed(100 + step);
    const auto x_all = torch::randn({global_batch, 32}, device);
    const auto x = x_all.slice(0, rank * rows, (rank + 1) * rows);
    at::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = teacher->forward(x);
    }
    const auto stats = trainer.step([&] { return torch::mse_loss(model->forward(x).to(torch::kFloat), y); });
    if (rank == 0 && (step % 50 == 0 || step == steps - 1)) {
      last = stats.loss().item<double>();  // syncs: only when printing
      if (first < 0) first = last;
      std::printf("step %4d  loss %.5f  scale %g  skipped %d\n", step, last,
                  stats.scale().defined() ? stats.scale().item<double>() : 1.0, int(stats.skipped().item<bool>()));
    }
  }

  // Rank 0 writes; the file loads at any world size (every rank loads the same file).
  const std::string path = "train_ddp_checkpoint.pt";
  trainer.save(path);
  if (group) group->barrier()->wait();  // every rank saw the file before rank 0 removes it
  if (rank == 0) {
    std::remove(path.c_str());
    std::printf("world size %lld: final loss %.5f (first %.5f), optimizer steps %lld\n", static_cast<long long>(world),
                last, first, static_cast<long long>(trainer.optimizer_steps()));
    if (!(last < first)) {
      std::cerr << "the loss did not decrease\n";
      return 1;
    }
  }
  return 0;
}
