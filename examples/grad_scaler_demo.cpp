// fp16 training with loss scaling: the forward runs under ampkit's autocast in float16, the
// GradScaler keeps small gradients from flushing to zero in fp16 and skips the steps whose
// gradients overflowed while it calibrates the scale. Prints the scale and the skip counters.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const auto device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  torch::nn::Sequential model(torch::nn::Linear(1, 64), torch::nn::Tanh(), torch::nn::Linear(64, 1));
  model->to(device);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  // A large initial scale on purpose: the first steps overflow in fp16 and are skipped.
  ampkit::GradScaler scaler(ampkit::GradScalerOptions().init_scale(std::ldexp(1.0, 24)).growth_interval(50));
  auto x = torch::linspace(-3, 3, 256, torch::TensorOptions().device(device)).unsqueeze(1);
  auto y = torch::sin(x);

  for (int step = 0; step <= 300; ++step) {
    torch::Tensor loss;
    {
      ampkit::AutocastGuard guard(device, torch::kHalf);
      loss = torch::mse_loss(model->forward(x), y);
    }
    opt.zero_grad();
    scaler.scale(loss).backward();
    scaler.unscale_(opt);  // grads are now true gradients: clip them
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0, 2.0, /*error_if_nonfinite=*/false);
    const bool applied = scaler.step(opt);
    scaler.update();
    if (!applied || step % 100 == 0) {
      std::cout << "step " << step << (applied ? " applied" : " skipped") << ", loss " << loss.item<float>()
                << ", scale now " << scaler.get_scale() << "\n";
    }
  }
  std::cout << scaler.steps_applied() << " steps applied, " << scaler.steps_skipped() << " skipped\n";
  return 0;
}
