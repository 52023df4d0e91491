// CPU kernel of the fused solver step (semantics: csrc/common/solver_step.h). Work is split into chunks
// that never straddle two samples; within a chunk every stage is a simple loop over a local buffer, so
// the compiler vectorises the fp32/fp64 arithmetic. OpenMP spreads the chunks over cores.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "common/solver_step.h"

namespace pydpm {
namespace {

constexpr int64_t kChunk = 2048;
constexpr int64_t kParallelGrain = 1 << 16;  // below this many elements one thread beats waking a team

template <class T> struct Storage;
template <> struct Storage<float> {
  static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void store(void* p, int64_t i, double v) { static_cast<float*>(p)[i] = float(v); }
};
template <> struct Storage<double> {
  static double load(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
  static void store(void* p, int64_t i, double v) { static_cast<double*>(p)[i] = v; }
};
template <> struct Storage<Half16> {
  static float load(const void* p, int64_t i) { return half_to_float(static_cast<const uint16_t*>(p)[i]); }
  static void store(void* p, int64_t i, double v) { static_cast<uint16_t*>(p)[i] = float_to_half(float(v)); }
};
template <> struct Storage<BFloat16> {
  static float load(const void* p, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); }
  static void store(void* p, int64_t i, double v) { static_cast<uint16_t*>(p)[i] = float_to_bf16(float(v)); }
};

// Coefficient i of sample b.
double coef(const CoefRow& row, int64_t b, int i) {
  if (row.ptr == nullptr) return row.values[i];
  const int64_t k = b * row.row_stride + i;
  return row.dtype == kFloat64 ? static_cast<const double*>(row.ptr)[k] : double(static_cast<const float*>(row.ptr)[k]);
}

template <class T, class A>
class Step {
 public:
  explicit Step(const SolverStepParams& p) : p_(p) {}

  void run() {
    const int64_t per = p_.per_sample;
    const int64_t chunks_per_sample = (per + kChunk - 1) / kChunk;
    const int64_t n_chunks = p_.batch * chunks_per_sample;
    const bool parallel = p_.numel >= kParallelGrain;
    (void)parallel;  // unused without OpenMP
    std::vector<A> scale;
    const bool quantile = p_.threshold == kThresholdQuantile;
    if (quantile) {
      d_all_.resize(size_t(p_.numel));
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t j = 0; j < n_chunks; ++j) {
        const int64_t b = j / chunks_per_sample, begin = b * per + (j % chunks_per_sample) * kChunk;
        model_stage(b, begin, std::min(kChunk, (b + 1) * per - begin), d_all_.data() + begin);
      }
      scale.resize(size_t(p_.batch));
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
      for (int64_t b = 0; b < p_.batch; ++b) scale[size_t(b)] = sample_scale(d_all_.data() + b * per);
    }
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t j = 0; j < n_chunks; ++j) {
      const int64_t b = j / chunks_per_sample, begin = b * per + (j % chunks_per_sample) * kChunk;
      combine(b, begin, std::min(kChunk, (b + 1) * per - begin), quantile ? scale[size_t(b)] : A(p_.min_scale));
    }
  }

 private:
  using S = Storage<T>;

  // d = conv0*x + conv1*m for elements [begin, begin+n) of sample b.
  void model_stage(int64_t b, int64_t begin, int64_t n, A* d) const {
    const A k0 = A(coef(p_.conv, b, 0)), k1 = A(coef(p_.conv, b, 1)), g = A(p_.guidance);
    if (p_.uncond == nullptr) {
      for (int64_t i = 0; i < n; ++i) d[i] = k0 * A(S::load(p_.x, begin + i)) + k1 * A(S::load(p_.cond, begin + i));
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const A u = A(S::load(p_.uncond, begin + i)), c = A(S::load(p_.cond, begin + i));
        d[i] = k0 * A(S::load(p_.x, begin + i)) + k1 * (u + g * (c - u));
      }
    }
  }

  // clamp(quantile(|d|, ratio), min_scale, max_scale) over one sample; NaN when the sample holds a NaN.
  A sample_scale(const A* d) const {
    const int64_t n = p_.per_sample;
    std::vector<A> a(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(d[i])) return std::numeric_limits<A>::quiet_NaN();
      a[size_t(i)] = std::fabs(d[i]);
    }
    int64_t lo, hi;
    double frac;
    quantile_ranks(n, p_.ratio, lo, hi, frac);
    std::nth_element(a.begin(), a.begin() + lo, a.end());
    const A v_lo = a[size_t(lo)];
    const A v_hi = hi > lo ? *std::min_element(a.begin() + lo + 1, a.end()) : v_lo;
    const A q = v_lo + A(frac) * (v_hi - v_lo);
    return std::min(std::max(q, A(p_.min_scale)), A(p_.max_scale));
  }

  void combine(int64_t b, int64_t begin, int64_t n, A scale) const {
    A acc[kChunk], d[kChunk];
    int c = 0;
    const A cx = A(coef(p_.coefs, b, c++));
    for (int64_t i = 0; i < n; ++i) acc[i] = cx * A(S::load(p_.x, begin + i));
    if (p_.has_d) {
      if (p_.threshold == kThresholdQuantile) {
        const A* src = d_all_.data() + begin;
        for (int64_t i = 0; i < n; ++i) d[i] = std::min(std::max(src[i], -scale), scale) / scale;
      } else {
        model_stage(b, begin, n, d);
        if (p_.threshold == kThresholdClamp)  // a constant scale (min_scale): clamp without a quantile
          for (int64_t i = 0; i < n; ++i) d[i] = std::min(std::max(d[i], -scale), scale) / scale;
      }
      const A cd = A(coef(p_.coefs, b, c++));
      for (int64_t i = 0; i < n; ++i) acc[i] += cd * d[i];
    }
    for (int k = 0; k < p_.n_models; ++k) {
      const A ck = A(coef(p_.coefs, b, c++));
      const int64_t first = (p_.broadcast >> k) & 1 ? begin - b * p_.per_sample : begin;  // chunks stay in b
      for (int64_t i = 0; i < n; ++i) acc[i] += ck * A(S::load(p_.models[k], first + i));
    }
    if (p_.noise_mode == kNoiseTensor) {
      const A cz = A(coef(p_.coefs, b, c++));
      for (int64_t i = 0; i < n; ++i) acc[i] += cz * A(S::load(p_.noise, begin + i));
    } else if (p_.noise_mode == kNoisePhilox) {
      const A cz = A(coef(p_.coefs, b, c++));
      Normal4<A> z{};
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = begin + i;
        if (i == 0 || (e & 3) == 0) z = philox_normal4<A>(p_.seed, p_.offset, uint64_t(e) >> 2);
        acc[i] += cz * A(z.v[e & 3]);
      }
    }
    // Store last: out and save may alias x or a model, which every stage above has finished reading.
    if (p_.has_d && p_.save != nullptr)
      for (int64_t i = 0; i < n; ++i) S::store(p_.save, begin + i, d[i]);
    for (int64_t i = 0; i < n; ++i) S::store(p_.out, begin + i, acc[i]);
  }

  const SolverStepParams& p_;
  std::vector<A> d_all_;  // the data prediction of every element, kept only for thresholding
};

}  // namespace

const char* solver_step_cpu(const SolverStepParams& p) {
  if (p.numel == 0) return "";
  if (p.batch <= 0 || p.per_sample * p.batch != p.numel) return "numel must equal batch * per_sample";
  if (p.n_models < 0 || p.n_models > kMaxModels) return "n_models out of range";
  if (p.broadcast < 0 || p.broadcast >= (1 << p.n_models)) return "broadcast has bits beyond n_models";
  if (p.n_coefs != 1 + p.has_d + p.n_models + (p.noise_mode != kNoNoise)) return "n_coefs does not match the terms";
  if (p.threshold < kNoThreshold || p.threshold > kThresholdClamp) return "threshold mode must be 0, 1 or 2";
  if (p.threshold != kNoThreshold && !p.has_d) return "threshold needs has_d";
  switch (p.dtype) {
    case kFloat32: Step<float, float>(p).run(); return "";
    case kFloat64: Step<double, double>(p).run(); return "";
    case kFloat16: Step<Half16, float>(p).run(); return "";
    case kBFloat16: Step<BFloat16, float>(p).run(); return "";
    default: return "unsupported dtype code";
  }
}

}  // namespace pydpm
