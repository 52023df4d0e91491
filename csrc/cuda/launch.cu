// Driver-API launches of kernels compiled elsewhere (csrc/common/launch.h). The driver entry points come
// through the runtime (cudaGetDriverEntryPointByVersion): no link against libcuda.
#ifdef PYDPM_WITH_CUDA

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <unordered_map>

#include "common/launch.h"

namespace pydpm {
namespace {

constexpr int kMaxParams = 128;

using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);
using ParamInfoFn = CUresult (*)(CUfunction, size_t, size_t*, size_t*);

template <typename F>
F entry_point(const char* name, int version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status;
  if (cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<F>(fn);
}

// Parameter offsets per function, filled on first use (kernel_param_layout or launch_kernel).
std::mutex layout_mutex;
std::unordered_map<uintptr_t, std::vector<std::pair<size_t, size_t>>> layouts;

const char* layout_of(uintptr_t function, const std::vector<std::pair<size_t, size_t>>** out) {
  std::lock_guard<std::mutex> lock(layout_mutex);
  auto it = layouts.find(function);
  if (it == layouts.end()) {
    static const ParamInfoFn info = entry_point<ParamInfoFn>("cuFuncGetParamInfo", 12040);
    if (info == nullptr) return "the CUDA driver has no cuFuncGetParamInfo (it needs CUDA 12.4 or newer)";
    std::vector<std::pair<size_t, size_t>> layout;
    for (size_t i = 0; i < size_t(kMaxParams) + 1; ++i) {
      size_t offset = 0, size = 0;
      if (info(reinterpret_cast<CUfunction>(function), i, &offset, &size) != CUDA_SUCCESS) break;
      layout.emplace_back(offset, size);
    }
    if (layout.size() > size_t(kMaxParams)) return "the kernel takes more parameters than launch_kernel supports";
    it = layouts.emplace(function, std::move(layout)).first;
  }
  *out = &it->second;
  return "";
}

}  // namespace

const char* kernel_param_layout(uintptr_t function, std::vector<std::pair<size_t, size_t>>& layout) {
  const std::vector<std::pair<size_t, size_t>>* found = nullptr;
  const char* err = layout_of(function, &found);
  if (err[0] == '\0') layout = *found;
  return err;
}

const char* launch_kernel(uintptr_t function, unsigned gx, unsigned gy, unsigned gz, unsigned threads, unsigned shared,
                          uintptr_t stream, const char* params, size_t params_size) {
  static const LaunchFn launch = entry_point<LaunchFn>("cuLaunchKernel", 12000);
  if (launch == nullptr) return "the CUDA driver entry point cuLaunchKernel was not found";
  const std::vector<std::pair<size_t, size_t>>* layout = nullptr;
  const char* err = layout_of(function, &layout);
  if (err[0] != '\0') return err;
  void* pointers[kMaxParams];
  for (size_t i = 0; i < layout->size(); ++i) {
    const auto& [offset, size] = (*layout)[i];
    if (offset + size > params_size) return "the packed parameters are shorter than the kernel's parameter layout";
    pointers[i] = const_cast<char*>(params + offset);
  }
  if (gx == 0 || gy == 0 || gz == 0) return "";
  const CUresult result = launch(reinterpret_cast<CUfunction>(function), gx, gy, gz, threads, 1, 1, shared,
                                 reinterpret_cast<CUstream>(stream), pointers, nullptr);
  if (result != CUDA_SUCCESS) {
    static thread_local char message[96];
    snprintf(message, sizeof(message), "cuLaunchKernel failed with CUresult %d", int(result));
    return message;
  }
  return "";
}

}  // namespace pydpm

#endif  // PYDPM_WITH_CUDA
