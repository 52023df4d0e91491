// The only pybind11 file. Kernels take torch-free parameter structs (csrc/common); Python fills them by field
// name through a ctypes view built from the layouts this module reports (`struct_layouts()`: every field's
// name, byte offset, kind and count, so the Python view cannot drift from the C++ struct), and a launcher
// takes the struct's address. Filling a field costs ~40 ns from Python, where a pybind11 argument or
// attribute costs ~150 ns: a sampling step swaps its pointers by name and launches in ~1 µs of host time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/launch.h"
#include "common/solver_step.h"

namespace py = pybind11;
using pydpm::CoefRow;
using pydpm::SolverStepParams;

namespace {

// One field: (name, byte offset, kind, element count, bytes). Kinds: i32, i64, u64, f32, f64, ptr, or the name
// of another reported struct. The byte size lets the Python side check every kind it maps.
#define PYDPM_FIELD(S, f, kind) fields.append(py::make_tuple(#f, offsetof(S, f), kind, 1, sizeof(S::f)))
#define PYDPM_ARRAY(S, f, kind) \
  fields.append(py::make_tuple(#f, offsetof(S, f), kind, sizeof(S::f) / sizeof(S::f[0]), sizeof(S::f)))

py::dict layout(std::size_t size, const py::list& fields) {
  py::dict d;
  d["size"] = size;
  d["fields"] = fields;
  return d;
}

py::dict struct_layouts() {
  py::dict all;
  {
    py::list fields;
    PYDPM_FIELD(CoefRow, ptr, "ptr");
    PYDPM_FIELD(CoefRow, dtype, "i32");
    PYDPM_FIELD(CoefRow, row_stride, "i64");
    PYDPM_ARRAY(CoefRow, values, "f64");
    all["CoefRow"] = layout(sizeof(CoefRow), fields);
  }
  {
    py::list fields;
    PYDPM_FIELD(SolverStepParams, numel, "i64");
    PYDPM_FIELD(SolverStepParams, batch, "i64");
    PYDPM_FIELD(SolverStepParams, per_sample, "i64");
    PYDPM_FIELD(SolverStepParams, dtype, "i32");
    PYDPM_FIELD(SolverStepParams, x, "ptr");
    PYDPM_FIELD(SolverStepParams, n_models, "i32");
    PYDPM_ARRAY(SolverStepParams, models, "ptr");
    PYDPM_FIELD(SolverStepParams, broadcast, "i32");
    PYDPM_FIELD(SolverStepParams, out, "ptr");
    PYDPM_FIELD(SolverStepParams, n_coefs, "i32");
    PYDPM_FIELD(SolverStepParams, coefs, "CoefRow");
    PYDPM_FIELD(SolverStepParams, noise_mode, "i32");
    PYDPM_FIELD(SolverStepParams, noise, "ptr");
    PYDPM_FIELD(SolverStepParams, seed, "u64");
    PYDPM_FIELD(SolverStepParams, offset, "u64");
    PYDPM_FIELD(SolverStepParams, has_d, "i32");
    PYDPM_FIELD(SolverStepParams, cond, "ptr");
    PYDPM_FIELD(SolverStepParams, uncond, "ptr");
    PYDPM_FIELD(SolverStepParams, guidance, "f32");
    PYDPM_FIELD(SolverStepParams, conv, "CoefRow");
    PYDPM_FIELD(SolverStepParams, save, "ptr");
    PYDPM_FIELD(SolverStepParams, threshold, "i32");
    PYDPM_FIELD(SolverStepParams, ratio, "f64");
    PYDPM_FIELD(SolverStepParams, min_scale, "f64");
    PYDPM_FIELD(SolverStepParams, max_scale, "f64");
    PYDPM_FIELD(SolverStepParams, workspace, "ptr");
    PYDPM_FIELD(SolverStepParams, stream, "ptr");
    PYDPM_FIELD(SolverStepParams, device, "i32");
    all["SolverStepParams"] = layout(sizeof(SolverStepParams), fields);
  }
  return all;
}

#undef PYDPM_FIELD
#undef PYDPM_ARRAY

// Launches the kernel on the struct at `address` (a ctypes view of it, kept alive by the caller).
template <const char* (*Launch)(const SolverStepParams&), bool kReleaseGil>
void solver_step_entry(uintptr_t address) {
  const auto& p = *reinterpret_cast<const SolverStepParams*>(address);
  const char* err;
  if (kReleaseGil) {
    py::gil_scoped_release release;
    err = Launch(p);
  } else {
    err = Launch(p);
  }
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string("solver_step: ") + err);
}

#ifdef PYDPM_WITH_CUDA
std::vector<std::pair<size_t, size_t>> param_layout(uintptr_t function, size_t count) {
  std::vector<std::pair<size_t, size_t>> layout;
  const char* err = pydpm::kernel_param_layout(function, count, layout);
  if (err[0] != '\0') throw std::runtime_error(std::string("kernel_param_layout: ") + err);
  return layout;
}

void launch(uintptr_t function, unsigned gx, unsigned gy, unsigned gz, unsigned threads, unsigned shared,
            uintptr_t stream, const py::bytes& params) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  PyBytes_AsStringAndSize(params.ptr(), &data, &size);
  const char* err = pydpm::launch_kernel(function, gx, gy, gz, threads, shared, stream, data, size_t(size));
  if (err[0] != '\0') throw std::runtime_error(std::string("launch_kernel: ") + err);
}
#endif

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
                     std::to_string(__GNUC_PATCHLEVEL__);
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef PYDPM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = PYDPM_CUDA_VERSION;
  info["cuda_archs"] = PYDPM_CUDA_ARCHS_STR;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydpm compiled kernels (torch-free: parameter structs of raw pointers, sizes and scalars)";
  m.def("build_info", &build_info, "Compiler, OpenMP, CUDA version and archs of this build.");
  m.def("struct_layouts", &struct_layouts, "Every parameter struct's size and fields (name, offset, kind, count).");
  // The CPU kernel may run long (OpenMP over large tensors): other Python threads go on meanwhile.
  m.def("solver_step_cpu", &solver_step_entry<&pydpm::solver_step_cpu, true>,
        "Fused solver step on host memory; takes the address of a SolverStepParams.");
#ifdef PYDPM_WITH_CUDA
  // A CUDA launch returns in microseconds: holding the GIL is cheaper than releasing it.
  m.def("solver_step_cuda", &solver_step_entry<&pydpm::solver_step_cuda, false>,
        "Fused solver step on device memory, enqueued on p.stream; takes the address of a SolverStepParams.");
  m.def("solver_step_cuda_workspace_bytes", &pydpm::solver_step_cuda_workspace_bytes,
        "Scratch bytes solver_step_cuda needs for dynamic thresholding.");
  m.def("kernel_param_layout", &param_layout,
        "(offset, size) of each of the `count` parameters of a loaded kernel (a CUfunction handle), in order.",
        py::arg("function"), py::arg("count"));
  m.def("launch_kernel", &launch,
        "Launch a loaded kernel: (function, gx, gy, gz, threads, shared bytes, stream, packed parameters).");
#endif
}
