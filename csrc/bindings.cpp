// The only pybind11 file: converts Python integers (raw pointers), floats and lists into the torch-free
// parameter structs of csrc/common and calls the launchers. Argument order matches
// pydpm/ops/solver_step.py:pack().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/solver_step.h"

namespace py = pybind11;
using pydpm::SolverStepParams;

namespace {

const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

void fill_row(pydpm::CoefRow& row, uintptr_t ptr, int32_t dtype, int64_t row_stride,
              const std::vector<double>& values, const char* name) {
  row.ptr = as_ptr(ptr);
  row.dtype = dtype;
  row.row_stride = row_stride;
  if (values.size() > size_t(pydpm::kMaxCoefs))
    throw std::invalid_argument(std::string(name) + ": too many coefficient values");
  for (size_t i = 0; i < values.size(); ++i) row.values[i] = values[i];
}

SolverStepParams make_params(int64_t numel, int64_t batch, int64_t per_sample, int32_t dtype, uintptr_t x,
                             const std::vector<uintptr_t>& models, uintptr_t out, int32_t n_coefs,
                             uintptr_t coef_ptr, int32_t coef_dtype, int64_t coef_row_stride,
                             const std::vector<double>& coef_values, int32_t noise_mode, uintptr_t noise,
                             uint64_t seed, uint64_t offset, bool has_d, uintptr_t cond, uintptr_t uncond,
                             double guidance, uintptr_t conv_ptr, int32_t conv_dtype, int64_t conv_row_stride,
                             const std::vector<double>& conv_values, uintptr_t save, bool threshold, double ratio,
                             double min_scale, double max_scale, uintptr_t workspace, uintptr_t stream,
                             int32_t device) {
  if (models.size() > size_t(pydpm::kMaxModels))
    throw std::invalid_argument("solver_step: at most " + std::to_string(pydpm::kMaxModels) + " models");
  SolverStepParams p;
  p.numel = numel;
  p.batch = batch;
  p.per_sample = per_sample;
  p.dtype = dtype;
  p.x = as_ptr(x);
  p.n_models = int32_t(models.size());
  for (size_t i = 0; i < models.size(); ++i) p.models[i] = as_ptr(models[i]);
  p.out = reinterpret_cast<void*>(out);
  p.n_coefs = n_coefs;
  fill_row(p.coefs, coef_ptr, coef_dtype, coef_row_stride, coef_values, "coeffs");
  p.noise_mode = noise_mode;
  p.noise = as_ptr(noise);
  p.seed = seed;
  p.offset = offset;
  p.has_d = has_d;
  p.cond = as_ptr(cond);
  p.uncond = as_ptr(uncond);
  p.guidance = float(guidance);
  fill_row(p.conv, conv_ptr, conv_dtype, conv_row_stride, conv_values, "convert");
  p.save = reinterpret_cast<void*>(save);
  p.threshold = threshold;
  p.ratio = ratio;
  p.min_scale = min_scale;
  p.max_scale = max_scale;
  p.workspace = reinterpret_cast<void*>(workspace);
  p.stream = reinterpret_cast<void*>(stream);
  p.device = device;
  return p;
}

template <const char* (*Launch)(const SolverStepParams&)>
void solver_step_entry(int64_t numel, int64_t batch, int64_t per_sample, int32_t dtype, uintptr_t x,
                       const std::vector<uintptr_t>& models, uintptr_t out, int32_t n_coefs, uintptr_t coef_ptr,
                       int32_t coef_dtype, int64_t coef_row_stride, const std::vector<double>& coef_values,
                       int32_t noise_mode, uintptr_t noise, uint64_t seed, uint64_t offset, bool has_d,
                       uintptr_t cond, uintptr_t uncond, double guidance, uintptr_t conv_ptr, int32_t conv_dtype,
                       int64_t conv_row_stride, const std::vector<double>& conv_values, uintptr_t save,
                       bool threshold, double ratio, double min_scale, double max_scale, uintptr_t workspace,
                       uintptr_t stream, int32_t device) {
  const SolverStepParams p = make_params(numel, batch, per_sample, dtype, x, models, out, n_coefs, coef_ptr,
                                         coef_dtype, coef_row_stride, coef_values, noise_mode, noise, seed, offset,
                                         has_d, cond, uncond, guidance, conv_ptr, conv_dtype, conv_row_stride,
                                         conv_values, save, threshold, ratio, min_scale, max_scale, workspace,
                                         stream, device);
  const char* err;
  {
    py::gil_scoped_release release;
    err = Launch(p);
  }
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string("solver_step: ") + err);
}

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
  m.doc() = "pydpm compiled kernels (torch-free; tensors arrive as raw pointers)";
  m.def("build_info", &build_info, "Compiler, OpenMP, CUDA version and archs of this build.");
  m.def("solver_step_cpu", &solver_step_entry<&pydpm::solver_step_cpu>, "Fused solver step on host memory.");
#ifdef PYDPM_WITH_CUDA
  m.def("solver_step_cuda", &solver_step_entry<&pydpm::solver_step_cuda>,
        "Fused solver step on device memory, enqueued on the given stream.");
  m.def("solver_step_cuda_workspace_bytes", &pydpm::solver_step_cuda_workspace_bytes,
        "Scratch bytes solver_step_cuda needs for dynamic thresholding.");
#endif
}
