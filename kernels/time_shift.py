"""Triton backend of the time-shift pick (`pydpm.ops.time_shift`): per sample b of x [B, N],

    v_b   = Σ (x_bi − mean_b)² / (N − 1)           (NaN when N < 2)
    k_b   = the first j minimising |v_b − promised_j|  (a NaN distance counts as +inf; all +inf: 0)
    out_b = (row_b mod modulus)·K + k_b             (floor modulo; without row: k_b)

The variance: with few samples or small ones, one program per sample makes two passes over its N elements
(the mean, then the squared deviations; the second pass reads what the first left in L2), each lane of the block
accumulating its own partial sums (fp32, fp64 for fp64 x) before one tree reduction. With many elements per
sample and too few samples to fill the device, the samples are split into S chunks first: `_chunk_kernel`
writes each chunk's (count, mean, M2) (two passes over the chunk) and the pick kernel merges them (Chan et al.'s
pairwise update, no cancellation): two launches, B·S programs reading. Then the K candidates in blocks of BK,
compared in float64. A sample's elements must be one dense block of N at offset b·stride (contiguous or
channels-last x: the variance does not depend on the order); the op copies other layouts once. Naming chain:
`_chunk_kernel`, `_pick_kernel` → the launcher `time_shift_pick`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc as _acc, cdiv, target_programs
from ._launch import Kernel

_NUM_WARPS = 4
_BLOCK = 1024           # elements per pass iteration (8 per thread at 4 warps)
_BK = 64                # candidates per block
_BS = 64                # chunk statistics merged per iteration
_MIN_CHUNK = 4096       # elements per chunk program at least: 4 iterations of each pass


@triton.jit
def _moments(base, lo, hi, BLOCK: tl.constexpr, F64: tl.constexpr):
    """(mean, M2) of base[lo:hi]: two passes, per-lane partial sums, one tree reduction each."""
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(lo, hi, BLOCK):
        i = s + lanes
        total += _acc(tl.load(base + i, mask=i < hi, other=0.0), F64)
    mean = tl.sum(total, axis=0) / (hi - lo)
    squares = tl.zeros([BLOCK], dtype=tl.float64 if F64 else tl.float32)
    for s in range(lo, hi, BLOCK):
        i = s + lanes
        d = _acc(tl.load(base + i, mask=i < hi, other=0.0), F64) - mean
        squares += tl.where(i < hi, d * d, 0.0)
    return mean, tl.sum(squares, axis=0)


@triton.jit(do_not_specialize=["xsb", "N", "S", "chunk"])
def _chunk_kernel(x, xsb, N, S, chunk, stats,
                  BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // S, pid % S
    lo = c * chunk
    hi = tl.minimum(lo + chunk, N)
    mean, m2 = _moments(x + b * xsb, lo, hi, BLOCK, F64)
    out = stats + pid * 3
    tl.store(out, (hi - lo).to(out.dtype.element_ty))
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit(do_not_specialize=["xsb", "N", "S", "K", "rsb", "modulus", "osb"])
def _pick_kernel(x, xsb, N, stats, S, promised, K, row, rsb, modulus, out, osb,
                 CHUNKED: tl.constexpr, HAS_ROW: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr,
                 BS: tl.constexpr, F64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if CHUNKED:                                                # merge the S chunks' (count, mean, M2)
        lanes = tl.arange(0, BS)
        total = tl.zeros([BS], dtype=tl.float64 if F64 else tl.float32)
        for s in range(0, S, BS):
            c = s + lanes
            base = stats + (b * S + c) * 3
            total += tl.load(base, mask=c < S, other=0.0) * tl.load(base + 1, mask=c < S, other=0.0)
        mean = tl.sum(total, axis=0) / N
        m2 = tl.zeros([BS], dtype=tl.float64 if F64 else tl.float32)
        for s in range(0, S, BS):
            c = s + lanes
            base = stats + (b * S + c) * 3
            d = tl.load(base + 1, mask=c < S, other=0.0) - mean
            m2 += tl.load(base + 2, mask=c < S, other=0.0) + tl.load(base, mask=c < S, other=0.0) * d * d
        m2 = tl.sum(m2, axis=0)
    else:
        mean, m2 = _moments(x + b * xsb, 0, N, BLOCK, F64)
    var = (m2 / (N - 1)).to(tl.float64)
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


_CHUNK = Kernel(_chunk_kernel)
_PICK = Kernel(_pick_kernel)


def chunks(B: int, N: int, device: torch.device) -> int:
    """How many chunks each sample's variance is split into: enough for B·S programs to fill the device, each
    with at least _MIN_CHUNK elements (1: no split, one program per sample)."""
    return max(1, min(cdiv(target_programs(device), max(B, 1)), N // _MIN_CHUNK))


def _split(x: torch.Tensor, splits: int | None) -> tuple[int, int, int]:
    """(N, S, chunk): the elements per sample, the chunks each is split into (no empty one) and their size."""
    B = x.shape[0]
    N = x.numel() // B
    S = chunks(B, N, x.device) if splits is None else max(1, min(splits, N))
    if S == 1:
        return N, 1, N
    chunk = cdiv(N, S)
    return N, cdiv(N, chunk), chunk


def _stats(x: torch.Tensor, S: int) -> torch.Tensor:
    """Scratch for each sample's S chunk statistics (count, mean, M2), in the variance's accumulation dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty(x.shape[0] * S * 3, dtype=dtype, device=x.device)


def stats_buffer(x: torch.Tensor, splits: int | None = None) -> torch.Tensor | None:
    """The chunk statistics' scratch for x's shape, dtype and device (None: one program per sample), for a caller
    that launches many times on one layout and passes it as `stats`."""
    if x.shape[0] == 0:
        return None
    _, S, _ = _split(x, splits)
    return _stats(x, S) if S > 1 else None


def time_shift_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int,
                    out: torch.Tensor, splits: int | None = None, stats: torch.Tensor | None = None) -> None:
    """out [B] (int64) ← the pick of the module docstring for x [B, ...] (each sample one dense block of N
    elements at x.stride(0) apart), promised [K] (contiguous, float32 or float64), row [B] (int64) or None.
    `splits`: the chunks per sample (default `chunks`); `stats`: `stats_buffer(x, splits)`, else allocated here."""
    B = x.shape[0]
    if B == 0:
        return
    K = promised.numel()
    N, S, chunk = _split(x, splits)
    f64 = x.dtype == torch.float64
    if S > 1:
        if stats is None:
            stats = _stats(x, S)
        _CHUNK((B * S,), [x, x.stride(0), N, S, chunk, stats], (_BLOCK, x.dtype, stats.dtype),
               dict(BLOCK=_BLOCK, F64=f64), num_warps=_NUM_WARPS)
    else:
        stats = out
    has_row = row is not None
    _PICK((B,), [x, x.stride(0), N, stats, S, promised, K, row if has_row else out, row.stride(0) if has_row else 0,
                 modulus, out, out.stride(0)],
          (S > 1, has_row, _BLOCK, _BK, _BS, x.dtype, stats.dtype, promised.dtype, out.dtype),
          dict(CHUNKED=S > 1, HAS_ROW=has_row, BLOCK=_BLOCK, BK=_BK, BS=_BS, F64=f64), num_warps=_NUM_WARPS)
