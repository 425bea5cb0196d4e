// A short AMP training loop with ampkit's guard: a small MLP learns y = sin(x) on the CPU
// (or CUDA), and the first step reports which dtype each layer ran in.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const auto device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const auto dtype = device == torch::kCUDA ? torch::kHalf : torch::kBFloat16;
  torch::nn::Sequential model(torch::nn::Linear(1, 64), torch::nn::Tanh(), torch::nn::Linear(64, 1));
  model->to(device);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05));
  auto x = torch::linspace(-3, 3, 256, torch::TensorOptions().device(device)).unsqueeze(1);
  auto y = torch::sin(x);

  std::cout << "device " << device << ", autocast dtype " << dtype << "\n";
  for (int step = 0; step <= 300; ++step) {
    torch::Tensor loss;
    {
      ampkit::AutocastGuard guard(device, dtype);
      auto h = model[0]->as<torch::nn::Linear>()->forward(x);
      auto a = torch::tanh(h);
      auto out = model[2]->as<torch::nn::Linear>()->forward(a);
      loss = torch::mse_loss(out, y);
      if (step == 0) {
        std::cout << "  linear  (policy " << ampkit::to_string(*ampkit::get_policy("aten::linear", device))
                  << ") ran in " << h.scalar_type() << "\n"
                  << "  tanh    (no entry) ran in " << a.scalar_type() << "\n"
                  << "  mse_loss (policy " << ampkit::to_string(*ampkit::get_policy("aten::mse_loss", device))
                  << ") ran in " << loss.scalar_type() << "\n";
      }
    }
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step % 100 == 0) std::cout << "step " << step << " loss " << loss.item<float>() << "\n";
  }
  std::cout << "weights stay " << model->parameters()[0].scalar_type() << ", grads "
            << model->parameters()[0].grad().scalar_type() << "\n";
  return 0;
}
