// The fused solver step: parameter struct shared by the CPU and CUDA kernels. No torch here.
//
//   (optional) model-output stage, when has_d:
//       m = cond                                   (uncond == nullptr)
//       m = uncond + guidance * (cond - uncond)    (classifier-free guidance)
//       d = conv[0] * x + conv[1] * m              (e.g. the x0 prediction (x - sigma*eps) / alpha)
//       d = clamp(d, -s_b, s_b) / s_b,             threshold kThresholdQuantile: s_b = clamp(quantile(|d_b|,
//                                                   ratio), min_scale, max_scale) for each sample b;
//                                                   kThresholdClamp: s_b = min_scale (a constant: no quantile)
//       save <- d                                  (when save != nullptr)
//   combination:
//       out = c[0]*x + [c[1]*d] + sum_k c[.]*models[k] + [c[-1]*z]
//   z is the `noise` tensor (noise_mode 1) or Philox normals (noise_mode 2, see philox.h).
//
// All tensors share one dense layout; element e belongs to sample e / per_sample. A model whose bit is set
// in `broadcast` holds one sample (per_sample elements), which every sample reads: element e reads its
// element e % per_sample (a constant term, e.g. DPM-Solver-v3's bias). Coefficients are a
// row per sample read from `coefs` (row_stride 0: one row for all) or, when coefs == nullptr, the
// values in coef_values.
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace pydpm {

constexpr int kMaxModels = 6;
constexpr int kMaxCoefs = kMaxModels + 3;  // x, d, models, noise
constexpr int kThresholdDigitBits = 11;    // radix-select digits: 11 + 11 + 10 bits of |d| as fp32
constexpr int kThresholdBins = 1 << kThresholdDigitBits;

enum NoiseMode : int32_t { kNoNoise = 0, kNoiseTensor = 1, kNoisePhilox = 2 };
enum ThresholdMode : int32_t { kNoThreshold = 0, kThresholdQuantile = 1, kThresholdClamp = 2 };

struct CoefRow {
  const void* ptr = nullptr;   // table on the kernel's device, or nullptr: use values
  int32_t dtype = kFloat32;    // kFloat32 or kFloat64
  int64_t row_stride = 0;      // elements between consecutive samples' rows; 0 = shared row
  double values[kMaxCoefs] = {};
};

struct SolverStepParams {
  int64_t numel = 0;
  int64_t batch = 1;
  int64_t per_sample = 0;      // numel / batch
  int32_t dtype = kFloat32;    // of x, models, cond, uncond, noise, save and out
  const void* x = nullptr;
  int32_t n_models = 0;
  const void* models[kMaxModels] = {};
  int32_t broadcast = 0;       // bit k: models[k] holds one sample, shared by every sample
  void* out = nullptr;
  int32_t n_coefs = 0;         // 1 + has_d + n_models + (noise_mode != 0)
  CoefRow coefs;

  int32_t noise_mode = kNoNoise;
  const void* noise = nullptr;
  uint64_t seed = 0;
  uint64_t offset = 0;

  int32_t has_d = 0;
  const void* cond = nullptr;
  const void* uncond = nullptr;
  float guidance = 1.0f;
  CoefRow conv;                // two values per row
  void* save = nullptr;

  int32_t threshold = kNoThreshold;  // ThresholdMode
  double ratio = 0.995;
  double min_scale = 1.0;
  double max_scale = 1.0;
  void* workspace = nullptr;   // CUDA, kThresholdQuantile: solver_step_cuda_workspace_bytes() bytes
  void* stream = nullptr;      // CUDA only: cudaStream_t
  int32_t device = 0;          // CUDA only: the tensors' device (made current for the launch)
};

// Returns an empty string on success, else the reason.
const char* solver_step_cpu(const SolverStepParams& p);

#ifdef PYDPM_WITH_CUDA
size_t solver_step_cuda_workspace_bytes(int64_t numel, int64_t batch);
const char* solver_step_cuda(const SolverStepParams& p);
#endif

// Quantile position of torch.quantile(..., interpolation="linear") over n values.
inline void quantile_ranks(int64_t n, double ratio, int64_t& lo, int64_t& hi, double& frac) {
  const double pos = ratio * double(n - 1);
  lo = int64_t(pos);
  if (lo > n - 1) lo = n - 1;
  hi = lo + 1 < n ? lo + 1 : n - 1;
  frac = pos - double(lo);
}

}  // namespace pydpm
