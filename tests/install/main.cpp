#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <iostream>

int main() {
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  ampkit::AutocastGuard guard(torch::kCPU, torch::kBFloat16);
  const bool ok = torch::mm(a, b).scalar_type() == torch::kBFloat16;
  std::cout << (ok ? "consumer: ok" : "consumer: mm did not run in bf16") << "\n";
  return ok ? 0 : 1;
}
