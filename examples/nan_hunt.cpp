// A NaN hunt in C++, end to end (examples/nan_hunt.py is the same in Python): an fp16 run whose
// loss is NaN from the first step, what ran in which precision (ampkit::PrecisionReport), the op
// that overflowed and the table edit that avoids it (ampkit::OverflowLocator), and the run again.
//
// The model is an attention block that forgets the 1/sqrt(d) scaling of its scores and gets large
// activations: q k^T exceeds float16's range (65504) although every input is finite. Its forward
// names its parts with ampkit::ModuleScope, which the reports use.
#include <ampkit/ampkit.h>

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <iostream>

struct AttentionNetImpl : torch::nn::Module {
  AttentionNetImpl() {
    embed = register_module("embed", torch::nn::Linear(16, 64));
    q = register_module("q", torch::nn::Linear(64, 64));
    k = register_module("k", torch::nn::Linear(64, 64));
    v = register_module("v", torch::nn::Linear(64, 64));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})));
    head = register_module("head", torch::nn::Linear(64, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h;
    {
      ampkit::ModuleScope scope("embed");
      h = embed->forward(x);
    }
    {
      ampkit::ModuleScope scope("attn");
      const auto scores = torch::matmul(q->forward(h), k->forward(h).transpose(-2, -1));  // no / sqrt(d): the bug
      h = torch::matmul(torch::softmax(scores, -1), v->forward(h));
    }
    ampkit::ModuleScope scope("head");
    return head->forward(norm->forward(h).mean(1));
  }
  torch::nn::Linear embed{nullptr}, q{nullptr}, k{nullptr}, v{nullptr}, head{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(AttentionNet);

int main() {
  torch::manual_seed(0);
  AttentionNet model;
  ampkit::optim::AdamW optimizer(model->parameters(), ampkit::optim::AdamWOptions(1e-3));
  ampkit::Trainer trainer(*model, optimizer, ampkit::TrainerOptions(torch::kCPU).dtype(torch::kHalf));
  const auto x = 200.0 * torch::randn({32, 16, 16});  // features in raw units, not normalized
  const auto y = torch::randint(0, 4, {32});
  auto closure = [&] { return torch::cross_entropy_loss(model->forward(x), y); };

  std::printf("1. fp16 training: the loss is NaN and GradScaler skips every step\n");
  for (int step = 0; step < 3; ++step) {
    const auto stats = trainer.step(closure);
    std::printf("   step %d: loss %g, scale %g, skipped %d\n", step, stats.loss().item<double>(),
                stats.scale().item<double>(), int(stats.skipped().item<bool>()));
  }

  std::printf("\n2. what ran in which precision (one step, the forward's top-level ops):\n");
  {
    ampkit::PrecisionReport report;
    trainer.step(closure);
    report.stop();
    std::cout << report.to_string(/*nested=*/false, "forward");
  }

  std::printf("\n3. where it overflows first:\n");
  std::optional<ampkit::OverflowEvent> first;
  {
    ampkit::OverflowLocator locator;
    trainer.step(closure);
    first = locator.first();
  }
  if (!first || first->module != "attn" || !first->suggestion) {
    std::cerr << "the locator did not find the attention scores' overflow\n";
    return 1;
  }
  std::cout << first->to_string() << "\n";

  std::printf("\n4. the fix, and training again:\n");
  ampkit::set_policy(first->suggestion->op, first->suggestion->device, first->suggestion->policy);
  double loss0 = 0, loss = 0;
  const int steps = 30;
  for (int step = 0; step < steps; ++step) {
    loss = trainer.step(closure).loss().item<double>();
    if (step == 0) loss0 = loss;
    if (!std::isfinite(loss)) {
      std::cerr << "the loss is still not finite at step " << step << "\n";
      return 1;
    }
  }
  std::printf("   loss %g -> %g in %d steps; scale %g\n", loss0, loss, steps, trainer.scaler()->get_scale());
  return loss < loss0 ? 0 : 1;
}
