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
using CtxGetCurrentFn = CUresult (*)(CUcontext*);

template <typename F>
F entry_point(const char* name, int version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status;
  if (cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<F>(fn);
}

// Parameter offsets per function, filled by kernel_param_layout, which the caller runs before the first launch.
std::mutex layout_mutex;
std::unordered_map<uintptr_t, std::vector<std::pair<size_t, size_t>>> layouts;

}  // namespace

const char* kernel_param_layout(uintptr_t function, size_t count, std::vector<std::pair<size_t, size_t>>& layout) {
  static const ParamInfoFn info = entry_point<ParamInfoFn>("cuFuncGetParamInfo", 12040);
  if (info == nullptr) return "the CUDA driver has no cuFuncGetParamInfo (it needs CUDA 12.4 or newer)";
  if (count > size_t(kMaxParams)) return "the kernel takes more parameters than launch_kernel supports";
  std::lock_guard<std::mutex> lock(layout_mutex);
  auto it = layouts.find(function);
  if (it == layouts.end()) {
    std::vector<std::pair<size_t, size_t>> found;
    for (size_t i = 0; i < count; ++i) {
      size_t offset = 0, size = 0;
      if (info(reinterpret_cast<CUfunction>(function), i, &offset, &size) != CUDA_SUCCESS)
        return "the kernel has fewer parameters than its declaration lists";
      found.emplace_back(offset, size);
    }
    it = layouts.emplace(function, std::move(found)).first;
  }
  if (it->second.size() != count) return "the kernel's parameter count differs from the one first given";
  layout = it->second;
  return "";
}

const char* launch_kernel(uintptr_t function, unsigned gx, unsigned gy, unsigned gz, unsigned threads, unsigned shared,
                          uintptr_t stream, const char* params, size_t params_size) {
  static const LaunchFn launch = entry_point<LaunchFn>("cuLaunchKernel", 12000);
  if (launch == nullptr) return "the CUDA driver entry point cuLaunchKernel was not found";
  const std::vector<std::pair<size_t, size_t>>* layout = nullptr;
  {
    std::lock_guard<std::mutex> lock(layout_mutex);
    auto it = layouts.find(function);
    if (it == layouts.end()) return "kernel_param_layout was not called for this function";
    layout = &it->second;  // entries are never erased: the pointer outlives the lock
  }
  void* pointers[kMaxParams];
  for (size_t i = 0; i < layout->size(); ++i) {
    const auto& [offset, size] = (*layout)[i];
    if (offset + size > params_size) return "the packed parameters are shorter than the kernel's parameter layout";
    pointers[i] = const_cast<char*>(params + offset);
  }
  if (gx == 0 || gy == 0 || gz == 0) return "";
  // A thread on which no runtime call has run yet (autograd's device threads, a user's) has no current context:
  // the runtime binds the primary context lazily, the driver does not. cudaSetDevice binds it (CUDA 12+).
  static const CtxGetCurrentFn get_current = entry_point<CtxGetCurrentFn>("cuCtxGetCurrent", 12000);
  if (get_current == nullptr) return "the CUDA driver entry point cuCtxGetCurrent was not found";
  CUcontext context = nullptr;
  if (get_current(&context) != CUDA_SUCCESS) return "cuCtxGetCurrent failed";
  if (context == nullptr) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();  // read back: the next runtime check must not report it as its own
      return "no CUDA context was current on this thread and the current device's could not be made current";
    }
  }
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
