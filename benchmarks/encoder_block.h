#pragma once
// The transformer model of the C++ benchmarks (fp32_vs_amp.cpp, ddp_overlap.cpp): one encoder layer
// (attention + MLP), a LayerNorm, mean over the sequence, a linear head to `classes`.
#include <torch/torch.h>

#include <cstdint>

struct EncoderBlockImpl : torch::nn::Module {
  EncoderBlockImpl(int64_t d, int64_t heads, int64_t ff, int64_t classes)
      : block(register_module(
            "block", torch::nn::TransformerEncoderLayer(
                         torch::nn::TransformerEncoderLayerOptions(d, heads).dim_feedforward(ff).dropout(0.0)))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        head(register_module("head", torch::nn::Linear(d, classes))) {}
  torch::Tensor forward(const torch::Tensor& x) {  // x: (seq, batch, d), the C++ layer's layout
    return head(norm(block(x)).mean(0));
  }
  torch::nn::TransformerEncoderLayer block;
  torch::nn::LayerNorm norm;
  torch::nn::Linear head;
};
TORCH_MODULE(EncoderBlock);
