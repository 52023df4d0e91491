// Element types the kernels understand and scalar conversions shared by the CPU and CUDA code.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYDPM_HD __host__ __device__ __forceinline__
#else
#define PYDPM_HD inline
#endif

namespace pydpm {

// Matches pydpm/_backend.py DTYPE_CODES.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Storage-only 16-bit types for the CPU kernels (the CUDA kernels use cuda_fp16/cuda_bf16).
struct Half16 { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

PYDPM_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
PYDPM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

PYDPM_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round-to-nearest-even float -> binary16, with overflow to inf and NaN preserved.
PYDPM_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // result is subnormal or zero: round |f| * 2^24 to an integer
    const float v = bits_to_float(ax) * 16777216.0f;  // exact scaling
    // round half to even on a value < 1024
    uint32_t i = uint32_t(v);
    const float rem = v - float(i);
    if (rem > 0.5f || (rem == 0.5f && (i & 1u))) ++i;
    return uint16_t(sign | i);
  }
  const uint32_t lsb = (ax >> 13) & 1u;
  const uint32_t rounded = ax + 0xfffu + lsb;
  return uint16_t(sign | ((rounded - (112u << 23)) >> 13));
}

PYDPM_HD float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

PYDPM_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  const uint32_t lsb = (x >> 16) & 1u;
  return uint16_t((x + 0x7fffu + lsb) >> 16);
}

}  // namespace pydpm
