#include <ampkit/ampkit.h>
#include <torch/torch.h>

int main() {
  torch::nn::Sequential model(torch::nn::Linear(8, 32), torch::nn::GELU(), torch::nn::Linear(32, 1));
  auto x = torch::randn({64, 8});
  auto y = torch::randn({64, 1});

  ampkit::set_policy("aten::gelu", torch::kCPU, ampkit::CastPolicy::fp32);  // edit the table
  torch::Tensor loss;
  {
    ampkit::AutocastGuard guard(torch::kCPU, torch::kBFloat16);  // RAII, nestable, thread-local
    loss = torch::mse_loss(model->forward(x), y);  // linear in bf16; gelu (edited) and mse_loss in fp32
  }
  loss.backward();  // outside the guard; grads reach the fp32 weights in fp32
}
