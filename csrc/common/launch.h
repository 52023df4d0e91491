// Launching kernels compiled elsewhere (Triton's cubins, loaded by Triton as CUfunctions) through the driver
// API, with the parameters packed by the caller into one buffer at the driver's offsets. No torch here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace pydpm {

#ifdef PYDPM_WITH_CUDA
// The `count` parameters of a loaded kernel, as (byte offset, byte size) pairs in order (cuFuncGetParamInfo,
// queried once per function; the caller knows the count from the kernel's declaration: probing past the last
// parameter would be an API error, which compute-sanitizer reports). Returns an empty string on success,
// else the reason.
const char* kernel_param_layout(uintptr_t function, size_t count, std::vector<std::pair<size_t, size_t>>& layout);

// Launches `function` on `stream` with grid (gx, gy, gz), `threads` per block and `shared` bytes of dynamic
// shared memory; `params` holds the kernel's parameters at the offsets kernel_param_layout reported (it must
// have run for `function`). The runtime's current device must be the one the function was loaded on; where no
// context is current on the calling thread yet, that device's primary context is made current. Returns an
// empty string on success, else the reason.
const char* launch_kernel(uintptr_t function, unsigned gx, unsigned gy, unsigned gz, unsigned threads, unsigned shared,
                          uintptr_t stream, const char* params, size_t params_size);
#endif

}  // namespace pydpm
