// The fused solver step on CUDA (semantics: csrc/common/solver_step.h and the PyTorch reference
// solver_step_reference in pydpm/ops/solver_step.py).
//
// Launches, all on p.stream, no host synchronisation, no allocation (CUDA-graph capturable):
//   plain / fused step (no threshold, or a constant clamp): 1 kernel, step_kernel.
//   dynamic thresholding:              1 cudaMemsetAsync (histograms, NaN flags) + 7 kernels:
//       threshold_d_kernel       pass 0: d -> fp32 scratch, histogram of |d|'s top digit, NaN flags
//       threshold_pick_kernel    top digit of the values at ranks lo and hi
//       threshold_hist_kernel    pass 1: histogram of the middle digit among elements matching the top
//       threshold_pick_kernel    middle digit
//       threshold_hist_kernel    pass 2: histogram of the low digit
//       threshold_pick_kernel    low digit -> the quantile -> scale s_b
//       step_kernel              reads d from scratch, clamps and scales it, writes save and out
//
// Work decomposition shared by every elementwise kernel: grid = (batch, blocks per sample); block
// (b, k) walks the vectors of sample b with a stride of gridDim.y * blockDim.x vectors, kU vectors
// per thread per iteration (all loads issued before any math). A block thus always works inside one
// sample: its coefficient row, threshold scale and histogram belong to blockIdx.x.
// A "vector" is kVec consecutive elements read with one 16-byte access (4 floats or 8 halves/bf16)
// when every pointer is 16-byte aligned and per_sample is a multiple of kVec (so no vector straddles
// two samples); otherwise kVec = 1 and a runtime-configured instance of the same kernel is used.
//
// step_kernel instances (per architecture): dtype (3) x source of d (4) x plain terms 0..7 for the
// vector path without Philox noise (96); dtype x source of d with Philox noise, the term count a
// run-time value (12); one run-time-configured kVec = 1 fallback per dtype (3).
#ifdef PYDPM_WITH_CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/philox.h"
#include "common/solver_step.h"

namespace pydpm {
namespace {

constexpr int kBlock = 256;                  // threads per block of the elementwise kernels (at most)
constexpr int kThreadsPerSm = 2048;          // threads an SM holds at full occupancy
constexpr int kWaves = 8;                    // grid target: this many full-occupancy waves (small tail)
constexpr int kMaxIn = kMaxModels + 1;       // plain terms c*t: the models, then a noise tensor
constexpr int kMaxDevices = 64;

// Where d comes from in a step_kernel launch.
enum DSource : int {
  kNoD = 0,      // no d term
  kDModel = 1,   // d = conv0*x + conv1*cond
  kDGuided = 2,  // d = conv0*x + conv1*(uncond + guidance*(cond - uncond))
  kDScratch = 3  // d = clamp(scratch, -s_b, s_b) / s_b (final pass of thresholding)
};

// ------------------------------------------------------------------------------------------------
// Element types and 16-byte packs
// ------------------------------------------------------------------------------------------------

// N elements accessed as one load/store (16 bytes for the vector path; larger packs split into
// 16-byte accesses, smaller ones are plain scalar accesses).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& p, float (&f)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(p.v[i]);
}

// Round to nearest even, like torch's casts; pairs use the packed two-element conversions.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack(const float (&f)[N]) {
  Pack<T, N> p;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = f[i];
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 h = __floats2half2_rn(f[i], f[i + 1]);
        p.v[i] = __low2half(h);
        p.v[i + 1] = __high2half(h);
      } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(f[i], f[i + 1]);
        p.v[i] = __low2bfloat16(h);
        p.v[i + 1] = __high2bfloat16(h);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (std::is_same_v<T, __half>) p.v[i] = __float2half_rn(f[i]);
      else p.v[i] = __float2bfloat16_rn(f[i]);
    }
  }
  return p;
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments
// ------------------------------------------------------------------------------------------------

// Coefficient slots of a step: x, d, the plain terms in[0..kMaxIn-1], the Philox noise. Kernels read
// a slot by constant index; the host maps each used slot to its column of the caller's row.
constexpr int kSlotX = 0, kSlotD = 1, kSlotIn = 2, kSlotZ = kSlotIn + kMaxIn, kSlots = kSlotZ + 1;

// A coefficient row source: a device table (float or double, sample b's row at ptr + b*row_stride)
// or host values, converted to float on the host (the reference casts coefficients to float32).
struct CoefTable {
  const void* ptr;          // nullptr: use values
  int64_t row_stride;
  int32_t is_double;
  int32_t column[kSlots];   // slot -> column of the row
  float values[kSlots];     // slot -> host value
};

// The slots of sample b's row for which used(slot) holds (others read 0). One branch on the source,
// then independent loads: a device row costs one memory round trip.
template <typename Used>
__device__ __forceinline__ void load_coefs(const CoefTable& t, int64_t b, const Used& used, float (&c)[kSlots]) {
  if (t.ptr == nullptr) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) c[s] = used(s) ? t.values[s] : 0.0f;
  } else if (t.is_double) {
    const double* row = static_cast<const double*>(t.ptr) + b * t.row_stride;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) c[s] = used(s) ? float(row[t.column[s]]) : 0.0f;
  } else {
    const float* row = static_cast<const float*>(t.ptr) + b * t.row_stride;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) c[s] = used(s) ? row[t.column[s]] : 0.0f;
  }
}

struct StepArgs {
  const void* x;
  const void* in[kMaxIn];  // models[0..n_models-1], then the noise tensor (noise_mode 1)
  uint32_t broadcast;      // bit k: in[k] holds one sample, read at the sample-local index
  const void* cond;
  const void* uncond;
  const float* scratch;    // thresholding: d for every element
  const float* scale;      // thresholding: s_b per sample
  void* out;
  void* save;              // nullptr: d is not saved
  int64_t per_sample;      // elements per sample
  float guidance;
  float clamp;             // > 0: d = clamp(d, -clamp, clamp) / clamp (kThresholdClamp); 0: none
  CoefTable coefs;         // slots x, d, in[...], z
  CoefTable conv;          // slots 0 and 1: the two conversion coefficients
  uint64_t seed;
  uint64_t offset;
};

// What a step_kernel instance computes. The vector path fixes it at compile time (FixedShape; with
// Philox noise, whose cost dominates, only the d source is fixed: PhiloxShape), so the hot loop
// carries no branches on it; the kVec = 1 fallback reads it at run time (RuntimeShape). Code below
// reads shape.n_in / shape.d / shape.philox; static members are constants and fold away.
template <int kIn, int kD, bool kPhilox>
struct FixedShape {
  static constexpr int n_in = kIn;
  static constexpr int d = kD;
  static constexpr bool philox = kPhilox;
  static constexpr bool preload = true;  // all loads of the plain terms before any math
};

// Philox instances: the noise dominates their cost, so the number of terms stays a run-time value.
template <int kD>
// With a run-time term count, preloading would hold kMaxIn 16-byte registers sets live whatever n_in
// is (98-128 registers for 16-bit types); the plain terms are read where they are added instead.
struct PhiloxShape {
  int n_in;
  static constexpr int d = kD;
  static constexpr bool philox = true;
  static constexpr bool preload = false;
};

struct RuntimeShape {
  int n_in;
  int d;
  bool philox;
  static constexpr bool preload = true;  // kVec = 1: one register per term
};

// ------------------------------------------------------------------------------------------------
// Element math shared by all kernels
// ------------------------------------------------------------------------------------------------

// Classifier-free guidance: m = uncond + guidance * (cond - uncond).
__device__ __forceinline__ float guide(float cond, float uncond, float guidance) {
  return uncond + guidance * (cond - uncond);
}

// The converted model output d = conv0 * x + conv1 * m.
__device__ __forceinline__ float convert(float x, float m, float conv0, float conv1) { return conv0 * x + conv1 * m; }

// max(min(d, s), -s) / s with torch's NaN propagation: a NaN d or s gives NaN.
__device__ __forceinline__ float apply_threshold(float d, float s) {
  const float clamped = d > s ? s : (d < -s ? -s : d);
  return clamped / s;
}

__device__ __forceinline__ float normal_lane(const Normal4<float>& n, int lane) {
  return lane == 0 ? n.v[0] : lane == 1 ? n.v[1] : lane == 2 ? n.v[2] : n.v[3];
}

// Philox normals of elements e0 .. e0 + N - 1 (philox.h: element e takes lane e % 4 of group e / 4).
template <int N>
__device__ __forceinline__ void philox_normals(uint64_t seed, uint64_t offset, int64_t e0, float (&z)[N]) {
  if constexpr (N % 4 == 0) {  // e0 is a multiple of 4: whole groups
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const Normal4<float> n = philox_normal4(seed, offset, uint64_t(e0 / 4 + q));
#pragma unroll
      for (int j = 0; j < 4; ++j) z[4 * q + j] = n.v[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int64_t e = e0 + i;
      z[i] = normal_lane(philox_normal4(seed, offset, uint64_t(e / 4)), int(e % 4));
    }
  }
}

// Runs body.run<kU>(v, stride) over the vectors v in [0, n) of this block's share of its sample:
// full groups of kU vectors (no bounds checks), then the remaining vectors one at a time.
template <int kU, typename Body>
__device__ __forceinline__ void for_each_vector(int64_t n, const Body& body) {
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  int64_t v = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  for (; v + (kU - 1) * stride < n; v += kU * stride) body.template run<kU>(v, stride);
  for (; v < n; v += stride) body.template run<1>(v, stride);
}

// Vectors per thread per iteration, from the 16-byte loads one vector needs: about 8 loads in
// flight per thread while bounding the registers that hold them.
__host__ __device__ constexpr int unroll_for(int loads) { return loads <= 2 ? 4 : loads <= 4 ? 2 : 1; }

// ------------------------------------------------------------------------------------------------
// The step kernel (the whole plain/fused step, or the final pass of thresholding)
// ------------------------------------------------------------------------------------------------

// One sample's coefficients; the tensors are read through the kernel parameters (constant bank),
// at global vector index first + v, which keeps per-stream pointers out of the registers.
template <typename T, int kVec, typename Shape>
struct StepBody {
  using P = Pack<T, kVec>;
  using F = Pack<float, kVec>;

  const StepArgs& a;
  Shape shape;
  int64_t first;       // global index of the sample's first vector
  float c[kSlots];     // coefficients by slot
  float conv[kSlots];  // slots 0 and 1: d = conv[0]*x + conv[1]*m
  float scale;         // s_b (kDScratch)

  __device__ __forceinline__ StepBody(const StepArgs& args, Shape s, int64_t b)
      : a(args), shape(s), first(b * (args.per_sample / kVec)) {
    scale = s.d == kDScratch ? a.scale[b] : 0.0f;
    load_coefs(a.coefs, b, [&](int slot) {
      return slot == kSlotX || (slot == kSlotD && s.d != kNoD) || (slot >= kSlotIn && slot < kSlotIn + s.n_in) ||
             (slot == kSlotZ && s.philox);
    }, c);
    const bool has_cond = s.d == kDModel || s.d == kDGuided;
    load_coefs(a.conv, b, [&](int slot) { return has_cond && slot < 2; }, conv);
  }

  static __device__ __forceinline__ const P* vec(const void* p) { return static_cast<const P*>(p); }

  // Where plain term k reads global vector i: i itself, or i's place within its sample for a broadcast
  // model (one sample that every sample reads).
  __device__ __forceinline__ int64_t in_index(int k, int64_t i) const {
    return (a.broadcast >> k) & 1u ? i - first : i;
  }

  template <int kU>
  __device__ __forceinline__ void run(int64_t v, int64_t stride) const {
    const bool has_d = shape.d != kNoD;
    const bool has_cond = shape.d == kDModel || shape.d == kDGuided;
    const bool guided = shape.d == kDGuided;
    // 1. Issue every load of the kU vectors.
    P xr[kU], cr[kU], ur[kU], ir[kU][kMaxIn];
    F sr[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = first + v + u * stride;
      xr[u] = vec(a.x)[i];
      if (has_cond) cr[u] = vec(a.cond)[i];
      if (guided) ur[u] = vec(a.uncond)[i];
      if (shape.d == kDScratch) sr[u] = reinterpret_cast<const F*>(a.scratch)[i];
      if constexpr (Shape::preload) {
#pragma unroll
        for (int k = 0; k < kMaxIn; ++k)
          if (k < shape.n_in) ir[u][k] = vec(a.in[k])[in_index(k, i)];
      }
    }
    // 2. Combine in fp32 and store. Every element was loaded above, so out/save may alias inputs.
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = first + v + u * stride;
      float xf[kVec], acc[kVec];
      unpack(xr[u], xf);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = c[kSlotX] * xf[j];
      if (has_d) {
        float d[kVec];
        if (has_cond) {
          float cf[kVec], uf[kVec];
          unpack(cr[u], cf);
          if (guided) unpack(ur[u], uf);
#pragma unroll
          for (int j = 0; j < kVec; ++j)
            d[j] = convert(xf[j], guided ? guide(cf[j], uf[j], a.guidance) : cf[j], conv[0], conv[1]);
          if (a.clamp > 0.0f) {  // a uniform branch: clip_sample's constant clamp
#pragma unroll
            for (int j = 0; j < kVec; ++j) d[j] = apply_threshold(d[j], a.clamp);
          }
        } else {
          unpack(sr[u], d);
#pragma unroll
          for (int j = 0; j < kVec; ++j) d[j] = apply_threshold(d[j], scale);
        }
        // A uniform branch: save is not a template flag, which would double the instances.
        if (a.save != nullptr) static_cast<P*>(a.save)[i] = pack<T>(d);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += c[kSlotD] * d[j];
      }
#pragma unroll
      for (int k = 0; k < kMaxIn; ++k) {
        if (k < shape.n_in) {
          float f[kVec];
          if constexpr (Shape::preload) unpack(ir[u][k], f);
          else unpack(vec(a.in[k])[in_index(k, i)], f);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += c[kSlotIn + k] * f[j];
        }
      }
      if (shape.philox) {
        float z[kVec];
        philox_normals(a.seed, a.offset, i * kVec, z);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += c[kSlotZ] * z[j];
      }
      static_cast<P*>(a.out)[i] = pack<T>(acc);
    }
  }
};

template <typename T, int kVec, int kU, typename Shape>
__global__ void __launch_bounds__(kBlock) step_kernel(const StepArgs a, const Shape shape) {
  const StepBody<T, kVec, Shape> body(a, shape, blockIdx.x);
  for_each_vector<kU>(a.per_sample / kVec, body);
}

// ------------------------------------------------------------------------------------------------
// Dynamic thresholding: exact per-sample quantile of |d| by radix select
// ------------------------------------------------------------------------------------------------
//
// Non-negative floats order like their uint32 bit patterns, so the k-th smallest |d| is found
// digit by digit on the bits of |d|, most significant digit first: bits 31..21, 20..10, 9..0
// (11 + 11 + 10 bits; bit 31, the sign, is always 0). Each pass histograms the next digit of the
// elements whose higher digits equal the prefix chosen so far, and a pick kernel finds the bin
// holding the wanted rank: that bin is the next digit, and the rank drops by the count of the
// elements in lower bins. After three passes the prefix is the exact bit pattern of the value.
// torch.quantile's linear interpolation needs the values at ranks lo and hi = lo + 1, so both are
// selected side by side (state and histograms per rank; the first pass's histogram serves both).
// NaN patterns (above +inf's) are counted like any value; a per-sample flag then makes s_b NaN,
// as the reference does.

constexpr int kPasses = 3;
constexpr int kRanks = 2;  // lo, hi

// Digit of pass `pass` is bits [shift, shift + bits) of |d|.
__host__ __device__ constexpr int digit_shift(int pass) {
  return pass == 0 ? 2 * kThresholdDigitBits - 1 : pass == 1 ? kThresholdDigitBits - 1 : 0;
}
__host__ __device__ constexpr int digit_bits(int pass) {
  return (pass == 0 ? 32 : digit_shift(pass - 1)) - digit_shift(pass);
}
static_assert(digit_bits(0) == kThresholdDigitBits && digit_bits(1) == kThresholdDigitBits &&
                  digit_bits(2) == 32 - 2 * kThresholdDigitBits,
              "three digits covering the 32 bits of |d|");

struct RadixState {
  uint32_t prefix[kRanks];  // the digits chosen so far, in place (lower bits zero)
  uint32_t rank[kRanks];    // rank still wanted among the elements matching prefix
};

// Workspace: [scratch d: numel floats][histograms][NaN flags][states][scales], regions 256-byte
// aligned. Histograms and flags are contiguous: one memset clears them.
struct WorkspaceLayout {
  size_t hist, nan, state, scale, total;  // byte offsets; scratch is at 0
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

WorkspaceLayout workspace_layout(int64_t numel, int64_t batch) {
  WorkspaceLayout l;
  l.hist = align256(size_t(numel) * sizeof(float));
  l.nan = l.hist + size_t(kPasses) * size_t(batch) * kRanks * kThresholdBins * sizeof(uint32_t);
  l.state = align256(l.nan + size_t(batch) * sizeof(uint32_t));
  l.scale = align256(l.state + size_t(batch) * sizeof(RadixState));
  l.total = align256(l.scale + size_t(batch) * sizeof(float));
  return l;
}

struct ThresholdWork {
  float* scratch;     // [numel] d
  uint32_t* hist;     // [kPasses][batch][kRanks][kThresholdBins] counts
  uint32_t* nan;      // [batch] nonzero when the sample's d holds a NaN
  RadixState* state;  // [batch]
  float* scale;       // [batch] s_b
};

__host__ __device__ __forceinline__ size_t hist_offset(int pass, int64_t batch, int64_t b, int rank) {
  return ((size_t(pass) * size_t(batch) + size_t(b)) * kRanks + size_t(rank)) * kThresholdBins;
}

__device__ __forceinline__ uint32_t abs_bits(float d) { return __float_as_uint(fabsf(d)); }

// Adds a block's shared histogram to the global one (only the bins it touched).
__device__ __forceinline__ void flush_histogram(const uint32_t* local, uint32_t* global) {
  for (int i = threadIdx.x; i < kThresholdBins; i += blockDim.x)
    if (local[i] != 0) atomicAdd(&global[i], local[i]);
}

// Pass 0 body: d for every element -> scratch, top digit of |d| -> shared histogram, NaN -> flag.
template <typename T, int kVec, bool kGuided>
struct ModelDBody {
  using P = Pack<T, kVec>;
  using F = Pack<float, kVec>;
  const StepArgs& a;
  float* scratch;
  int64_t first;   // global index of the sample's first vector
  float conv[kSlots];
  uint32_t* hist;  // shared
  int* nan_seen;   // shared

  template <int kU>
  __device__ __forceinline__ void run(int64_t v, int64_t stride) const {
    P xr[kU], cr[kU], ur[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = first + v + u * stride;
      xr[u] = static_cast<const P*>(a.x)[i];
      cr[u] = static_cast<const P*>(a.cond)[i];
      if (kGuided) ur[u] = static_cast<const P*>(a.uncond)[i];
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float xf[kVec], cf[kVec], uf[kVec], d[kVec];
      unpack(xr[u], xf);
      unpack(cr[u], cf);
      if (kGuided) unpack(ur[u], uf);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        d[j] = convert(xf[j], kGuided ? guide(cf[j], uf[j], a.guidance) : cf[j], conv[0], conv[1]);
        atomicAdd(&hist[abs_bits(d[j]) >> digit_shift(0)], 1u);
        if (isnan(d[j])) *nan_seen = 1;
      }
      reinterpret_cast<F*>(scratch)[first + v + u * stride] = pack<float>(d);
    }
  }
};

template <typename T, int kVec, int kU, bool kGuided>
__global__ void __launch_bounds__(kBlock) threshold_d_kernel(const StepArgs a, const ThresholdWork w, int64_t batch) {
  __shared__ uint32_t hist[kThresholdBins];
  __shared__ int nan_seen;
  for (int i = threadIdx.x; i < kThresholdBins; i += blockDim.x) hist[i] = 0;
  if (threadIdx.x == 0) nan_seen = 0;
  __syncthreads();

  const int64_t b = blockIdx.x;
  ModelDBody<T, kVec, kGuided> body{a, w.scratch, b * (a.per_sample / kVec), {}, hist, &nan_seen};
  load_coefs(a.conv, b, [](int slot) { return slot < 2; }, body.conv);
  for_each_vector<kU>(a.per_sample / kVec, body);

  __syncthreads();
  flush_histogram(hist, w.hist + hist_offset(0, batch, b, 0));
  if (threadIdx.x == 0 && nan_seen) w.nan[b] = 1;
}

// Passes 1 and 2 body: the pass's digit of |d| for the elements matching each rank's prefix.
template <int kVec>
struct RadixHistBody {
  using F = Pack<float, kVec>;
  const float* scratch;
  int64_t first;            // global index of the sample's first vector
  uint32_t* hist[kRanks];   // shared
  uint32_t high[kRanks];    // prefix >> high_shift: the higher digits to match
  int shift, high_shift;
  uint32_t mask;

  template <int kU>
  __device__ __forceinline__ void run(int64_t v, int64_t stride) const {
    F dr[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) dr[u] = reinterpret_cast<const F*>(scratch)[first + v + u * stride];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t bits = abs_bits(dr[u].v[j]);
        const uint32_t digit = (bits >> shift) & mask;
#pragma unroll
        for (int r = 0; r < kRanks; ++r)
          if ((bits >> high_shift) == high[r]) atomicAdd(&hist[r][digit], 1u);
      }
    }
  }
};

template <int kVec>
__global__ void __launch_bounds__(kBlock) threshold_hist_kernel(const ThresholdWork w, int64_t per_sample,
                                                                int64_t batch, int pass) {
  __shared__ uint32_t hist[kRanks][kThresholdBins];
  for (int i = threadIdx.x; i < kRanks * kThresholdBins; i += blockDim.x)
    hist[i / kThresholdBins][i % kThresholdBins] = 0;
  __syncthreads();

  const int64_t b = blockIdx.x;
  const RadixState st = w.state[b];
  RadixHistBody<kVec> body;
  body.scratch = w.scratch;
  body.first = b * (per_sample / kVec);
  body.shift = digit_shift(pass);
  body.high_shift = digit_shift(pass - 1);
  body.mask = (1u << digit_bits(pass)) - 1u;
  for (int r = 0; r < kRanks; ++r) {
    body.hist[r] = hist[r];
    body.high[r] = st.prefix[r] >> body.high_shift;
  }
  for_each_vector<unroll_for(1)>(per_sample / kVec, body);

  __syncthreads();
  for (int r = 0; r < kRanks; ++r) flush_histogram(hist[r], w.hist + hist_offset(pass, batch, b, r));
}

constexpr int kPickThreads = 256;
constexpr int kBinsPerThread = kThresholdBins / kPickThreads;
static_assert(kThresholdBins % kPickThreads == 0 && kPickThreads % 32 == 0, "pick kernel layout");

// Exclusive prefix sum of v over the block (kPickThreads threads).
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t v, uint32_t* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t inclusive = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const uint32_t t = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += t;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  uint32_t before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  __syncthreads();  // warp_totals is reused by the next call
  return before + inclusive - v;
}

struct PickArgs {
  ThresholdWork w;
  int64_t batch;
  int pass;
  uint32_t rank_lo, rank_hi;  // initial ranks (pass 0)
  float frac;                 // q = v_lo + frac * (v_hi - v_lo)
  float min_scale, max_scale;
};

// One block per sample: for each rank, find the bin of this pass's histogram that holds it.
__global__ void __launch_bounds__(kPickThreads) threshold_pick_kernel(const PickArgs a) {
  __shared__ uint32_t warp_totals[kPickThreads / 32];
  __shared__ RadixState next;
  const int64_t b = blockIdx.x;
  const RadixState st = a.pass == 0 ? RadixState{{0u, 0u}, {a.rank_lo, a.rank_hi}} : a.w.state[b];
  const int shift = digit_shift(a.pass);

  for (int r = 0; r < kRanks; ++r) {
    // The first pass (no prefix yet) has one histogram, shared by both ranks.
    const uint32_t* hist = a.w.hist + hist_offset(a.pass, a.batch, b, a.pass == 0 ? 0 : r);
    // Thread t owns bins [t * kBinsPerThread, (t + 1) * kBinsPerThread).
    uint32_t count[kBinsPerThread], total = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      count[j] = hist[threadIdx.x * kBinsPerThread + j];
      total += count[j];
    }
    uint32_t below = block_exclusive_sum(total, warp_totals);  // elements in lower bins
    const uint32_t rank = st.rank[r];
    if (rank >= below && rank - below < total) {  // exactly one thread owns the rank's bin
#pragma unroll
      for (int j = 0; j < kBinsPerThread; ++j) {
        if (rank - below < count[j]) {
          next.prefix[r] = st.prefix[r] | (uint32_t(threadIdx.x * kBinsPerThread + j) << shift);
          next.rank[r] = rank - below;
          break;
        }
        below += count[j];
      }
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (a.pass < kPasses - 1) {
    a.w.state[b] = next;
    return;
  }
  // The reference's formula in fp32, unfused: v_lo + frac * (v_hi - v_lo), then clamp (NaN kept).
  const float v_lo = __uint_as_float(next.prefix[0]), v_hi = __uint_as_float(next.prefix[1]);
  const float q = __fadd_rn(v_lo, __fmul_rn(a.frac, __fsub_rn(v_hi, v_lo)));
  float s = q < a.min_scale ? a.min_scale : (q > a.max_scale ? a.max_scale : q);
  if (a.w.nan[b] != 0) s = __int_as_float(0x7fc00000);  // quiet NaN
  a.w.scale[b] = s;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

cudaError_t sm_count(int& sms) {
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && (sms = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device < kMaxDevices) cache[device].store(sms, std::memory_order_relaxed);
  return err;
}

// Grid (batch, blocks per sample) for `vectors` vectors per sample: about kWaves full-occupancy
// waves in total (a single wave left a partial second wave whenever registers cut occupancy: 91% of
// copy bandwidth on an H200), and no more blocks per sample than its vectors fill. Blocks shrink (down to 64 threads)
// while half a block still covers a sample or the grid would leave SMs idle, so that small tensors
// spread over the SMs and short samples waste few threads.
struct Geometry {
  dim3 grid, block;
};

Geometry geometry(int64_t batch, int64_t vectors, int sms) {
  int block = kBlock;
  while (block > 64 && (block / 2 >= vectors || batch * ceil_div(vectors, block) < sms)) block /= 2;
  const int64_t target = ceil_div(int64_t(sms) * (kThreadsPerSm / block) * kWaves, batch);
  int64_t per_sample = ceil_div(vectors, block);
  if (per_sample > target) per_sample = target;
  if (per_sample > 65535) per_sample = 65535;
  return Geometry{dim3(unsigned(batch), unsigned(per_sample)), dim3(unsigned(block))};
}

template <typename T, int kD, int kIn = 0>
void launch_fixed(const StepArgs& a, int n_in, const Geometry& g, cudaStream_t stream) {
  if constexpr (kIn < kMaxIn) {
    if (n_in != kIn) return launch_fixed<T, kD, kIn + 1>(a, n_in, g, stream);
  }
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kLoads = 1 + kIn + (kD == kDModel ? 1 : kD == kDGuided ? 2 : kD == kDScratch ? kVec / 4 : 0);
  step_kernel<T, kVec, unroll_for(kLoads)><<<g.grid, g.block, 0, stream>>>(a, FixedShape<kIn, kD, false>{});
}

// Philox makes the step compute-heavy: no unrolling, which would only multiply its large code.
template <typename T, int kD>
void launch_philox(const StepArgs& a, int n_in, const Geometry& g, cudaStream_t stream) {
  step_kernel<T, 16 / sizeof(T), 1><<<g.grid, g.block, 0, stream>>>(a, PhiloxShape<kD>{n_in});
}

template <typename T>
void launch_step(const StepArgs& a, const RuntimeShape& s, bool vector, int64_t batch, int sms, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (!vector) {
    const Geometry g = geometry(batch, a.per_sample, sms);
    step_kernel<T, 1, 1><<<g.grid, g.block, 0, stream>>>(a, s);
    return;
  }
  const Geometry g = geometry(batch, a.per_sample / kVec, sms);
  switch (s.d * 2 + int(s.philox)) {
    case kNoD * 2: return launch_fixed<T, kNoD>(a, s.n_in, g, stream);
    case kNoD * 2 + 1: return launch_philox<T, kNoD>(a, s.n_in, g, stream);
    case kDModel * 2: return launch_fixed<T, kDModel>(a, s.n_in, g, stream);
    case kDModel * 2 + 1: return launch_philox<T, kDModel>(a, s.n_in, g, stream);
    case kDGuided * 2: return launch_fixed<T, kDGuided>(a, s.n_in, g, stream);
    case kDGuided * 2 + 1: return launch_philox<T, kDGuided>(a, s.n_in, g, stream);
    case kDScratch * 2: return launch_fixed<T, kDScratch>(a, s.n_in, g, stream);
    default: return launch_philox<T, kDScratch>(a, s.n_in, g, stream);
  }
}

// A failed runtime call also leaves its error as the thread's last error, which the next cudaGetLastError()
// (ours after a later launch, or torch's) would report as its own: read it back here so that it is reported once.
#define PYDPM_CUDA_CHECK(expr)                                 \
  do {                                                         \
    const cudaError_t err_ = (expr);                           \
    if (err_ != cudaSuccess) {                                 \
      (void)cudaGetLastError();                                \
      return cudaGetErrorString(err_);                         \
    }                                                          \
  } while (0)

// Launches the thresholding passes (memset + 6 kernels) that leave s_b in w.scale.
template <typename T>
const char* launch_threshold_select(const SolverStepParams& p, const StepArgs& a, const ThresholdWork& w,
                                    bool vector, int sms, cudaStream_t stream) {
  const WorkspaceLayout l = workspace_layout(p.numel, p.batch);
  PYDPM_CUDA_CHECK(cudaMemsetAsync(w.hist, 0, l.state - l.hist, stream));

  constexpr int kVec = 16 / sizeof(T);
  const bool guided = p.uncond != nullptr;
  if (vector) {
    const Geometry g = geometry(p.batch, p.per_sample / kVec, sms);
    if (guided) threshold_d_kernel<T, kVec, unroll_for(3), true><<<g.grid, g.block, 0, stream>>>(a, w, p.batch);
    else threshold_d_kernel<T, kVec, unroll_for(2), false><<<g.grid, g.block, 0, stream>>>(a, w, p.batch);
  } else {
    const Geometry g = geometry(p.batch, p.per_sample, sms);
    if (guided) threshold_d_kernel<T, 1, 1, true><<<g.grid, g.block, 0, stream>>>(a, w, p.batch);
    else threshold_d_kernel<T, 1, 1, false><<<g.grid, g.block, 0, stream>>>(a, w, p.batch);
  }
  PYDPM_CUDA_CHECK(cudaGetLastError());

  int64_t lo = 0, hi = 0;
  double frac = 0.0;
  quantile_ranks(p.per_sample, p.ratio, lo, hi, frac);
  PickArgs pick{w, p.batch, 0, uint32_t(lo), uint32_t(hi), float(frac), float(p.min_scale), float(p.max_scale)};
  // The scratch d is our own 16-byte aligned buffer: float4 whenever samples hold whole float4s.
  const bool hist_vector = p.per_sample % 4 == 0;
  const Geometry hg = geometry(p.batch, hist_vector ? p.per_sample / 4 : p.per_sample, sms);
  for (int pass = 0; pass < kPasses; ++pass) {
    if (pass > 0) {
      if (hist_vector) threshold_hist_kernel<4><<<hg.grid, hg.block, 0, stream>>>(w, p.per_sample, p.batch, pass);
      else threshold_hist_kernel<1><<<hg.grid, hg.block, 0, stream>>>(w, p.per_sample, p.batch, pass);
      PYDPM_CUDA_CHECK(cudaGetLastError());
    }
    pick.pass = pass;
    threshold_pick_kernel<<<unsigned(p.batch), kPickThreads, 0, stream>>>(pick);
    PYDPM_CUDA_CHECK(cudaGetLastError());
  }
  return "";
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// `columns[slot]`: the slot's column in the caller's row, or -1 for an unused slot.
CoefTable coef_table(const CoefRow& row, const int (&columns)[kSlots]) {
  CoefTable t{};
  t.ptr = row.ptr;
  t.row_stride = row.row_stride;
  t.is_double = row.dtype == kFloat64;
  for (int slot = 0; slot < kSlots; ++slot) {
    t.column[slot] = columns[slot] < 0 ? 0 : columns[slot];
    if (row.ptr == nullptr && columns[slot] >= 0) t.values[slot] = float(row.values[columns[slot]]);
  }
  return t;
}

// Makes `device` current for the launches and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&previous_);
    if (err_ == cudaSuccess && previous_ != device) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  cudaError_t error() const { return err_; }

 private:
  int previous_ = 0;
  cudaError_t err_;
};

template <typename T>
const char* run(const SolverStepParams& p, StepArgs a, RuntimeShape shape) {
  const DeviceGuard guard(p.device);
  PYDPM_CUDA_CHECK(guard.error());
  int sms = 0;
  PYDPM_CUDA_CHECK(sm_count(sms));
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  constexpr int kVec = 16 / sizeof(T);

  bool vector = p.per_sample % kVec == 0 && aligned16(a.x) && aligned16(a.out);
  for (int k = 0; k < shape.n_in; ++k) vector = vector && aligned16(a.in[k]);
  if (p.has_d) vector = vector && aligned16(p.cond) && (p.uncond == nullptr || aligned16(p.uncond));
  if (p.save != nullptr) vector = vector && aligned16(p.save);

  if (p.threshold == kThresholdQuantile) {
    const WorkspaceLayout l = workspace_layout(p.numel, p.batch);
    char* base = static_cast<char*>(p.workspace);
    const ThresholdWork w{reinterpret_cast<float*>(base), reinterpret_cast<uint32_t*>(base + l.hist),
                          reinterpret_cast<uint32_t*>(base + l.nan), reinterpret_cast<RadixState*>(base + l.state),
                          reinterpret_cast<float*>(base + l.scale)};
    const char* err = launch_threshold_select<T>(p, a, w, vector, sms, stream);
    if (err[0] != '\0') return err;
    a.scratch = w.scratch;
    a.scale = w.scale;
    shape.d = kDScratch;
  }
  launch_step<T>(a, shape, vector, p.batch, sms, stream);
  PYDPM_CUDA_CHECK(cudaGetLastError());
  return "";
}

#undef PYDPM_CUDA_CHECK

}  // namespace

size_t solver_step_cuda_workspace_bytes(int64_t numel, int64_t batch) {
  return workspace_layout(numel, batch).total;
}

// Enqueues on p.device (made current for the call) and p.stream.
const char* solver_step_cuda(const SolverStepParams& p) {
  if (p.dtype == kFloat64) return "float64 is not supported by the CUDA kernels (use the cpu or reference backend)";
  if (p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16) return "unknown dtype code";
  if (p.numel == 0) return "";
  if (p.batch <= 0 || p.per_sample <= 0 || p.batch * p.per_sample != p.numel)
    return "numel must equal batch * per_sample with batch, per_sample > 0";
  if (p.batch > INT_MAX) return "batch exceeds the CUDA grid limit (2^31 - 1 samples)";
  if (p.n_models < 0 || p.n_models > kMaxModels) return "n_models must lie in [0, 6]";
  if (p.broadcast < 0 || p.broadcast >= (1 << p.n_models)) return "broadcast has bits beyond n_models";
  if (p.noise_mode < kNoNoise || p.noise_mode > kNoisePhilox) return "noise_mode must be 0, 1 or 2";
  if (p.noise_mode == kNoiseTensor && p.noise == nullptr) return "noise_mode 1 needs a noise tensor";
  if (p.n_coefs != 1 + (p.has_d ? 1 : 0) + p.n_models + (p.noise_mode != kNoNoise ? 1 : 0))
    return "n_coefs must be 1 + has_d + n_models + (noise_mode != 0)";
  for (const CoefRow* row : {&p.coefs, &p.conv})
    if (row->ptr != nullptr && row->dtype != kFloat32 && row->dtype != kFloat64)
      return "coefficient tables must be float32 or float64";
  if (p.has_d && p.cond == nullptr) return "has_d needs cond";
  if (p.threshold < kNoThreshold || p.threshold > kThresholdClamp) return "threshold mode must be 0, 1 or 2";
  if (p.threshold != kNoThreshold && !p.has_d) return "threshold needs has_d";
  if (p.threshold == kThresholdClamp && !(p.min_scale > 0)) return "a clamp threshold needs min_scale > 0";
  if (p.threshold == kThresholdQuantile) {
    if (p.workspace == nullptr || !aligned16(p.workspace))
      return "threshold needs a 16-byte aligned workspace of solver_step_cuda_workspace_bytes() bytes";
    if (p.per_sample > int64_t(UINT32_MAX)) return "threshold supports at most 2^32 - 1 elements per sample";
  }

  StepArgs a{};
  a.x = p.x;
  for (int k = 0; k < p.n_models; ++k) a.in[k] = p.models[k];
  a.broadcast = uint32_t(p.broadcast);
  if (p.noise_mode == kNoiseTensor) a.in[p.n_models] = p.noise;
  a.cond = p.cond;
  a.uncond = p.uncond;
  a.out = p.out;
  a.save = p.has_d ? p.save : nullptr;
  a.per_sample = p.per_sample;
  a.guidance = p.guidance;
  a.clamp = p.threshold == kThresholdClamp ? float(p.min_scale) : 0.0f;
  a.seed = p.seed;
  a.offset = p.offset;
  const RuntimeShape shape{p.n_models + (p.noise_mode == kNoiseTensor ? 1 : 0),
                           !p.has_d ? kNoD : p.uncond == nullptr ? kDModel : kDGuided, p.noise_mode == kNoisePhilox};
  // Row order (solver_step_reference's terms): x, [d], models..., [noise tensor or Philox noise].
  int columns[kSlots], conv_columns[kSlots];
  for (int slot = 0; slot < kSlots; ++slot) columns[slot] = conv_columns[slot] = -1;
  int column = 0;
  columns[kSlotX] = column++;
  if (p.has_d) columns[kSlotD] = column++;
  for (int k = 0; k < shape.n_in; ++k) columns[kSlotIn + k] = column++;
  if (shape.philox) columns[kSlotZ] = column++;
  if (p.has_d) conv_columns[0] = 0, conv_columns[1] = 1;
  a.coefs = coef_table(p.coefs, columns);
  a.conv = coef_table(p.conv, conv_columns);

  switch (p.dtype) {
    case kFloat32: return run<float>(p, a, shape);
    case kFloat16: return run<__half>(p, a, shape);
    default: return run<__nv_bfloat16>(p, a, shape);
  }
}

}  // namespace pydpm

#endif  // PYDPM_WITH_CUDA
