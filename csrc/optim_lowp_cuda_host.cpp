// The host side of optim_lowp_cuda.h that needs no GPU: the CPU emulation of the CUDA kernels (the
// same block bodies run block by block, for the tests), and, in a build without the CUDA kernels
// (ampkit built against a CPU LibTorch), the entry points saying so.
#include "optim_lowp_cuda.h"

#include <c10/util/Half.h>

namespace ampkit::optim::detail::cuda {
namespace {

struct HostHalf {
  static float to_float(std::uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }
  static std::uint16_t from_float(float v) { return c10::Half(v).x; }
};

// Runs body_of(P, S)(table, args, block, thread, threads) for every block and thread of every table.
template <class Args, class BodyOf>
const char* run_all(const TensorPtrs* tensors, std::size_t count, const Args& args, BodyOf&& body_of) {
  const bool supported = with_dtypes(args.common.param_dtype, args.common.state_dtype, [&](auto p, auto s) {
    const auto body = body_of(p, s);
    for_each_table(tensors, count, [&](const LaunchTable& table) {
      for (int64_t block = 0; block < table.blocks(); ++block) {
        for (int thread = 0; thread < kThreads; ++thread) body(table, args, block, thread, kThreads);
      }
    });
  });
  return supported ? nullptr : kUnsupportedPair;
}

}  // namespace

const char* emulate_adam(const TensorPtrs* tensors, std::size_t count, const AdamArgs& args) {
  return run_all(tensors, count, args,
                 [](auto p, auto s) { return adam_block<HostHalf, decltype(p)::value, decltype(s)::value>; });
}

const char* emulate_sgd(const TensorPtrs* tensors, std::size_t count, const SgdArgs& args) {
  return run_all(tensors, count, args,
                 [](auto p, auto s) { return sgd_block<HostHalf, decltype(p)::value, decltype(s)::value>; });
}

#if !defined(AMPKIT_CUDA_KERNELS)
namespace {
constexpr const char* kNotBuilt = "ampkit was built against a LibTorch without CUDA: no CUDA kernels";
}
bool kernels_built() { return false; }
const char* adam(const TensorPtrs*, std::size_t, const AdamArgs&, void*) { return kNotBuilt; }
const char* sgd(const TensorPtrs*, std::size_t, const SgdArgs&, void*) { return kNotBuilt; }
#endif

}  // namespace ampkit::optim::detail::cuda
