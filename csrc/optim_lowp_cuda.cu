// The CUDA kernels of optim_lowp_cuda.h. Compiled only where ampkit is built against a CUDA
// LibTorch (CMakeLists.txt); no ATen header, so nvcc sees this file and the two shared headers only.
// Built with nvcc's defaults for floating point (multiply-adds contracted, IEEE division and square
// root), as torch's own fused kernels are.
#include "optim_lowp_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ampkit::optim::detail::cuda {
namespace {

struct DeviceHalf {
  __device__ static float to_float(std::uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static std::uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <LowpDtype P, LowpDtype S>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ LaunchTable table, const AdamArgs args) {
  adam_block<DeviceHalf, P, S>(table, args, blockIdx.x, threadIdx.x, blockDim.x);
}

template <LowpDtype P, LowpDtype S>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const __grid_constant__ LaunchTable table, const SgdArgs args) {
  sgd_block<DeviceHalf, P, S>(table, args, blockIdx.x, threadIdx.x, blockDim.x);
}

// Launches kernel_of(P, S) over every table for the type pair of args.
template <class Args, class KernelOf>
const char* launch_all(const TensorPtrs* tensors, std::size_t count, const Args& args, void* stream,
                       KernelOf&& kernel_of) {
  cudaError_t error = cudaSuccess;
  const bool supported = with_dtypes(args.common.param_dtype, args.common.state_dtype, [&](auto p, auto s) {
    const auto kernel = kernel_of(p, s);
    for_each_table(tensors, count, [&](const LaunchTable& table) {
      if (error != cudaSuccess) return;  // after a failed launch, no more
      kernel<<<static_cast<unsigned>(table.blocks()), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table, args);
      error = cudaGetLastError();
    });
  });
  if (!supported) return kUnsupportedPair;
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

bool kernels_built() { return true; }

const char* adam(const TensorPtrs* tensors, std::size_t count, const AdamArgs& args, void* stream) {
  return launch_all(tensors, count, args, stream,
                    [](auto p, auto s) { return adam_kernel<decltype(p)::value, decltype(s)::value>; });
}

const char* sgd(const TensorPtrs* tensors, std::size_t count, const SgdArgs& args, void* stream) {
  return launch_all(tensors, count, args, stream,
                    [](auto p, auto s) { return sgd_kernel<decltype(p)::value, decltype(s)::value>; });
}

}  // namespace ampkit::optim::detail::cuda
