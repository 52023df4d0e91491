// Counter-based normal noise shared by every backend (CPU, CUDA; kernels/solver_step.py and the
// PyTorch reference re-implement the same recipe bit for bit).
//
// Element i of a tensor (its index in memory order) takes lane i % 4 of
//   Philox4x32-10(counter = (g_lo, g_hi, offset_lo, offset_hi), key = (seed_lo, seed_hi)),  g = i / 4
// and four uint32 words r0..r3 become four normals by Box-Muller:
//   u(r) = ((r >> 8) + 1) * 2^-24  in (0, 1],   v(r) = (r >> 8) * 2^-24  in [0, 1)
//   n0 = sqrt(-2 ln u(r0)) cos(2 pi v(r1)),  n1 = sqrt(-2 ln u(r0)) sin(2 pi v(r1))
//   n2, n3 likewise from (r2, r3); computed in float32 (float64 for float64 tensors).
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace pydpm {

struct Philox4 { uint32_t v[4]; };

PYDPM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

PYDPM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c0, hi0, lo0);
    mulhilo32(M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += W0; k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

template <class F>
struct Normal4 { F v[4]; };

// The four normals of group g (elements 4g .. 4g+3), computed in F (float; double for float64 tensors).
template <class F = float>
PYDPM_HD Normal4<F> philox_normal4(uint64_t seed, uint64_t offset, uint64_t g) {
  const Philox4 r = philox4x32_10(uint32_t(g), uint32_t(g >> 32), uint32_t(offset), uint32_t(offset >> 32),
                                  uint32_t(seed), uint32_t(seed >> 32));
  constexpr F kInv24 = F(5.9604644775390625e-08);  // 2^-24
  constexpr F kTwoPi = F(6.283185307179586476925);
#if !defined(__CUDA_ARCH__)
  using std::log;
  using std::sqrt;
#endif
  Normal4<F> n;
  for (int p = 0; p < 2; ++p) {
    const F u = F((r.v[2 * p] >> 8) + 1u) * kInv24;
    const F v = F(r.v[2 * p + 1] >> 8) * kInv24;
    const F rad = sqrt(F(-2) * log(u));
#if defined(__CUDA_ARCH__)
    F s, c;  // sin/cos of pi * (2v): exact argument reduction, no slow path for large arguments
    if constexpr (sizeof(F) == 4) sincospif(F(2) * v, &s, &c);
    else sincospi(F(2) * v, &s, &c);
#else
    const F s = std::sin(kTwoPi * v), c = std::cos(kTwoPi * v);
#endif
    n.v[2 * p] = rad * c;
    n.v[2 * p + 1] = rad * s;
  }
  return n;
}

}  // namespace pydpm
