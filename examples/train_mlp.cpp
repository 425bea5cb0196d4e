// A complete mixed-precision training loop in C++ with ampkit::Trainer: a small MLP learns a
// synthetic regression task (targets from a fixed random "teacher" network) with fp16 autocast,
// dynamic loss scaling, a fused AdamW, gradient accumulation and clipping, then checkpoints and
// resumes. Runs on CUDA when available, else on the CPU.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <cstdio>
#include <iostream>

int main() {
  torch::manual_seed(0);
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;

  torch::nn::Sequential teacher(torch::nn::Linear(32, 64), torch::nn::Tanh(), torch::nn::Linear(64, 4));
  torch::nn::Sequential model(torch::nn::Linear(32, 128), torch::nn::GELU(), torch::nn::Linear(128, 4));
  teacher->to(device);
  model->to(device);

  ampkit::optim::AdamW optimizer(model->parameters(), ampkit::optim::AdamWOptions(3e-3).weight_decay(1e-4));
  // fp16 comes with a GradScaler by default; with the fused optimizer no step syncs with the host.
  ampkit::Trainer trainer(
      *model, optimizer,
      ampkit::TrainerOptions(device.type()).dtype(torch::kHalf).accumulation_steps(2).max_grad_norm(1.0));

  auto batch = [&] {
    auto x = torch::randn({64, 32}, device);
    torch::NoGradGuard no_grad;
    return std::make_pair(x, teacher->forward(x));
  };

  double first = -1, last = 0;
  const int steps = 300;
  for (int step = 0; step < steps; ++step) {
    const auto [x, y] = batch();
    const auto stats = trainer.step([&] { return torch::mse_loss(model->forward(x).to(torch::kFloat), y); });
    if (step % 50 == 0 || step == steps - 1) {
      last = stats.loss().item<double>();  // syncs: only when printing
      if (first < 0) first = last;
      std::printf("step %4d  loss %.5f  scale %g  skipped %d\n", step, last,
                  stats.scale().defined() ? stats.scale().item<double>() : 1.0, int(stats.skipped().item<bool>()));
    }
  }

  // Checkpoint and resume: model, optimizer, scaler and counters in one file.
  const std::string path = "train_mlp_checkpoint.pt";
  trainer.save(path);
  ampkit::Trainer resumed(
      *model, optimizer,
      ampkit::TrainerOptions(device.type()).dtype(torch::kHalf).accumulation_steps(2).max_grad_norm(1.0));
  resumed.load(path);
  std::remove(path.c_str());

  std::printf("final loss %.5f (first %.5f); optimizer steps %lld, skipped %lld\n", last, first,
              static_cast<long long>(resumed.optimizer_steps()),
              static_cast<long long>(trainer.scaler()->steps_skipped()));
  if (!(last < first)) {
    std::cerr << "the loss did not decrease\n";
    return 1;
  }
  return 0;
}
