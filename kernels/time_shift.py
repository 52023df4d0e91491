"""Triton backend of the time-shift pick (`pydpm.ops.time_shift`): per sample b of x [B, N],

    v_b   = Σ (x_bi − mean_b)² / (N − 1)           (NaN when N < 2)
    k_b   = the first j minimising |v_b − promised_j|  (a NaN distance counts as +inf; all +inf: 0)
    out_b = (row_b mod modulus)·K + k_b             (floor modulo; without row: k_b)

One program per sample: two passes over its N elements (the mean, then the squared deviations; the second pass
reads what the first left in L2 for the sample sizes of latent diffusion), each lane of the block accumulating
its own partial sums (fp32, fp64 for fp64 x) before one tree reduction; then the K candidates in blocks of BK,
compared in float64. A sample's elements must be one dense block of N at offset b·stride (contiguous or
channels-last x: the variance does not depend on the order); the op copies other layouts once. Naming chain:
`_pick_kernel` → the launcher `time_shift_pick`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc as _acc
from ._launch import Kernel

_NUM_WARPS = 4
_BLOCK = 1024           # elements per pass iteration (8 per thread at 4 warps)
_BK = 64                # candidates per block


@triton.jit(do_not_specialize=["xsb", "N", "K", "rsb", "modulus", "osb"])
def _pick_kernel(x, xsb, N, promised, K, row, rsb, modulus, out, osb,
                 HAS_ROW: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr, F64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = x + b * xsb
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(0, N, BLOCK):
        i = s + lanes
        total += _acc(tl.load(base + i, mask=i < N, other=0.0), F64)
    mean = tl.sum(total, axis=0) / N
    squares = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(0, N, BLOCK):
        i = s + lanes
        d = _acc(tl.load(base + i, mask=i < N, other=0.0), F64) - mean
        squares += tl.where(i < N, d * d, 0.0)
    var = (tl.sum(squares, axis=0) / (N - 1)).to(tl.float64)
    var = tl.where(N < 2, float("nan"), var)
    inf = float("inf")
    best = tl.full([], inf, tl.float64)
    pick = tl.full([], 0, tl.int64)
    found = tl.full([], 0, tl.int1)
    cand = tl.arange(0, BK)
    for s in range(0, K, BK):
        j = s + cand
        p = tl.load(promised + j, mask=j < K, other=inf).to(tl.float64)
        dist = tl.abs(var - p)
        dist = tl.where(dist != dist, inf, dist)                   # NaN (a NaN variance or candidate): never nearer
        low = tl.min(dist, axis=0)
        first = tl.min(tl.where((dist == low) & (j < K), j, K), axis=0).to(tl.int64)
        better = low < best
        pick = tl.where(better, first, pick)
        best = tl.where(better, low, best)
        found = found | better
    pick = tl.where(found, pick, 0)                                # every distance +inf: the first candidate
    if HAS_ROW:
        r = tl.load(row + b * rsb) % modulus
        r = tl.where(r < 0, r + modulus, r)
        pick = r * K + pick
    tl.store(out + b * osb, pick)


_PICK = Kernel(_pick_kernel)


def time_shift_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int,
                    out: torch.Tensor) -> None:
    """out [B] (int64) ← the pick of the module docstring for x [B, ...] (each sample one dense block of N
    elements at x.stride(0) apart), promised [K] (contiguous, float32 or float64), row [B] (int64) or None."""
    B = x.shape[0]
    if B == 0:
        return
    N, K = x.numel() // B, promised.numel()
    has_row = row is not None
    _PICK((B,), [x, x.stride(0), N, promised, K, row if has_row else out, row.stride(0) if has_row else 0,
                 modulus, out, out.stride(0)],
          (has_row, _BLOCK, _BK, x.dtype, promised.dtype, out.dtype),
          dict(HAS_ROW=has_row, BLOCK=_BLOCK, BK=_BK, F64=x.dtype == torch.float64), num_warps=_NUM_WARPS)
