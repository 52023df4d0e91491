"""Triton backend of `pydpm.ops.attention`: non-causal flash attention, forward and backward, any head
dimension (padded to a power of two inside the kernel), any sequence lengths, strided layouts.

Forward (`_attention_fwd_kernel`, one program per (query block, batch·head)): one pass over K/V with an
online softmax in base 2 (s = q·kᵀ·scale·log2 e), saving lse₂ = m + log2 l per query for the backward.
Backward (FlashAttention-2's split): `_attention_bwd_delta_kernel` δ = rowsum(o·do);
`_attention_bwd_dkdv_kernel` (one program per key block) walks the query blocks for dk and dv;
`_attention_bwd_dq_kernel` (one program per query block) walks the key blocks for dq. No atomics.
fp32 inputs multiply in TF32 unless `IEEE` (exact fp32 products); accumulation is fp32 throughout.

Loads: where the launch configuration asks for it (CONFIGS) and the strides are 16-byte aligned, q, k, v
and do are read as tiles of 4-D [B, H, N, D] tensor descriptors (Hopper's copy engine on the GPU; rows and
head dims past the end read as zero), otherwise by pointer loads, vectorised through the strides'
alignment (ALIGN). Either way the loops run
unmasked over whole blocks and mask only the last, partial one (`TAIL`). Where the padding is harmless
the math is unmasked too: zero rows of q and do (and δ = lse₂ = 0 there) add nothing to dk and dv, and
zero rows of k and v add nothing to dq; only the softmax of the forward and the dq kernel's last key
block mask their scores (exp2 of an unmasked padded score could overflow).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import MAX_GRID_YZ, cdiv, next_power_of_2
from ._launch import Kernel

_LOG2E = tl.constexpr(1.4426950408889634)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One kernel's launch configuration: block rows (queries) and columns (keys), warps, pipeline depth,
    and whether q, k, v, do are read through tensor descriptors (where the strides allow)."""
    m: int
    n: int
    warps: int
    stages: int
    tma: bool = False


# Per head-dim class (BLOCK_D) and element size: forward, dk/dv and dq launch configurations, from the
# sweeps of bench/attention_tune.py on an H200 (bench/NOTES.md, "Attention"). Descriptor loads where they
# won there: the fp32 64-wide class (16-25% faster) and the fp16 backward at 128 (5-9%); elsewhere pointer
# loads matched or won, and the fp32 backward at 128 ran 7-9x slower through descriptors.
CONFIGS: dict[tuple[int, int], tuple[Blocks, Blocks, Blocks]] = {
    (32, 2): (Blocks(64, 64, 4, 3), Blocks(64, 64, 4, 2), Blocks(64, 32, 4, 3)),
    (64, 2): (Blocks(128, 64, 4, 3), Blocks(64, 64, 4, 3), Blocks(128, 64, 8, 3)),
    (128, 2): (Blocks(128, 128, 8, 3), Blocks(64, 64, 4, 2, True), Blocks(128, 64, 8, 3, True)),
    (256, 2): (Blocks(64, 32, 8, 2), Blocks(32, 64, 8, 2), Blocks(64, 32, 8, 2)),
    (32, 4): (Blocks(128, 64, 8, 2), Blocks(64, 64, 4, 2, True), Blocks(64, 64, 4, 2, True)),
    (64, 4): (Blocks(128, 64, 4, 2, True), Blocks(64, 32, 4, 2, True), Blocks(64, 64, 4, 2, True)),
    (128, 4): (Blocks(128, 32, 4, 3), Blocks(64, 32, 4, 2), Blocks(128, 16, 4, 3)),
    (256, 4): (Blocks(32, 32, 8, 2), Blocks(32, 32, 8, 2), Blocks(32, 32, 8, 2)),
}
# The forward over short key sequences (NK ≤ 256), where the long-sequence entry's blocks leave the chip
# idle: (32, 16, 256, 72) fp16 in 62 µs instead of 76 µs.
SHORT_FWD: dict[tuple[int, int], Blocks] = {(128, 2): Blocks(128, 64, 4, 2, True)}


@triton.jit
def _tile(X, b, h, s_b, s_h, s_n, s_d, start, n, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
          TMA: tl.constexpr, MASK_R: tl.constexpr, MASK_D: tl.constexpr):
    """Rows start .. start + BLOCK_R (those < n) × head dims (< D) of (batch b, head h), [BLOCK_R, BLOCK_D],
    zero outside: a tile of the 4-D descriptor X (TMA) or masked loads from the pointer X."""
    if TMA:
        tile = X.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        rows = start + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        ptrs = X + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + rows[:, None] * s_n + cols[None, :] * s_d
        if MASK_R and MASK_D:
            tile = tl.load(ptrs, mask=(rows[:, None] < n) & (cols[None, :] < D), other=0.0)
        elif MASK_R:
            tile = tl.load(ptrs, mask=rows[:, None] < n, other=0.0)
        elif MASK_D:
            tile = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store(X, b, h, s_b, s_h, s_n, s_d, start, n, D, value, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ptrs = X + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + rows[:, None] * s_n + cols[None, :] * s_d
    tl.store(ptrs, value.to(X.dtype.element_ty), mask=(rows[:, None] < n) & (cols[None, :] < D))


@triton.jit
def _hint(s_b, s_h, s_n, ALIGN: tl.constexpr):
    """The strides, which the launcher found to be multiples of ALIGN elements, written so that the compiler
    sees it (tl.multiple_of does not reach scalars) and vectorises the pointer loads."""
    return s_b // ALIGN * ALIGN, s_h // ALIGN * ALIGN, s_n // ALIGN * ALIGN


@triton.jit
def _tf32(x):
    """fp32 x rounded to the nearest TF32 value (10-bit mantissa, ties to even): the tensor cores truncate
    the fp32 operands Triton gives them, which doubles to quadruples the error of a TF32 matmul against
    cuBLAS's, whose operands are rounded (bench/NOTES.md, "Attention"). NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b with fp32 accumulation. IEEE: exact fp32 products (also what the launcher asks for under the
    interpreter, whose dot mishandles bf16 operands: they are widened to fp32 first). Otherwise fp32
    operands multiply in TF32, rounded to nearest first."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        out = tl.dot(_tf32(a), _tf32(b))
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, start, NK, D,
               qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, TAIL: tl.constexpr,
               MASK_D: tl.constexpr, IEEE: tl.constexpr, POSITIVE: tl.constexpr):
    """One key block of the online softmax: (acc, l, m) updated by keys start .. start + BLOCK_N. POSITIVE
    (scale > 0): the row max of the raw logits scales to the max of the scaled ones, and the scaling folds into
    the exponent's fused multiply-add; otherwise the logits are scaled first, then masked and maxed."""
    k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, start, NK, D, BLOCK_N, BLOCK_D, TMA, TAIL, MASK_D)
    s = _dot(q, tl.trans(k), IEEE)
    if not POSITIVE:
        s = s * qk_scale
    if TAIL:
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < NK, s, float("-inf"))
    if POSITIVE:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, start, NK, D, BLOCK_N, BLOCK_D, TMA, TAIL, MASK_D)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


# Batch, head and token strides reach the kernels through ALIGN (`_hint`) and the sequence lengths only mask
# rows: unspecialised. The head-dim strides (1 for every layout the kernels vectorise) stay specialised.
_STRIDES_BHN = ["s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "s_db", "s_dh", "s_dn",
                "s_ob", "s_oh", "s_on", "H", "NQ", "NK"]


@triton.jit(do_not_specialize=_STRIDES_BHN)
def _attention_fwd_kernel(Q, K, V, O, LSE, scale,
                          s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                          s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
                          H, NQ, NK, D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          TMA: tl.constexpr, MASK_D: tl.constexpr, ALIGN: tl.constexpr, IEEE: tl.constexpr,
                          POSITIVE: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    s_qb, s_qh, s_qn = _hint(s_qb, s_qh, s_qn, ALIGN)
    s_kb, s_kh, s_kn = _hint(s_kb, s_kh, s_kn, ALIGN)
    s_vb, s_vh, s_vn = _hint(s_vb, s_vh, s_vn, ALIGN)
    start_m = pid_m * BLOCK_M
    q = _tile(Q, b, h, s_qb, s_qh, s_qn, s_qd, start_m, NQ, D, BLOCK_M, BLOCK_D, TMA, True, MASK_D)
    qk_scale = scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    whole = NK // BLOCK_N * BLOCK_N
    for start in range(0, whole, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                                   start, NK, D, qk_scale, BLOCK_N, BLOCK_D, TMA, False, MASK_D, IEEE, POSITIVE)
    if whole < NK:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                                   whole, NK, D, qk_scale, BLOCK_N, BLOCK_D, TMA, True, MASK_D, IEEE, POSITIVE)
    _store(O, b, h, s_ob, s_oh, s_on, s_od, start_m, NQ, D, acc / l_i[:, None], BLOCK_M, BLOCK_D)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, m_i + tl.log2(l_i), mask=offs_m < NQ)


@triton.jit(do_not_specialize=_STRIDES_BHN)
def _attention_bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_od, s_db, s_dh, s_dn, s_dd, H, NQ, D,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    o = _tile(O, b, h, s_ob, s_oh, s_on, s_od, pid_m * BLOCK_M, NQ, D, BLOCK_M, BLOCK_D, False, True, True)
    do = _tile(DO, b, h, s_db, s_dh, s_dn, s_dd, pid_m * BLOCK_M, NQ, D, BLOCK_M, BLOCK_D, False, True, True)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=offs_m < NQ)


@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qn, s_qd, s_db, s_dh, s_dn, s_dd,
                start, NQ, D, qk_scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                TAIL: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr):
    """dv += pᵀ·do, dk += dsᵀ·q over queries start .. start + BLOCK_M (padded rows add zero), computed
    transposed ([keys, queries]) so that only loaded tiles are transposed."""
    q = _tile(Q, b, h, s_qb, s_qh, s_qn, s_qd, start, NQ, D, BLOCK_M, BLOCK_D, TMA, TAIL, MASK_D)
    do = _tile(DO, b, h, s_db, s_dh, s_dn, s_dd, start, NQ, D, BLOCK_M, BLOCK_D, TMA, TAIL, MASK_D)
    rows = start + tl.arange(0, BLOCK_M)
    if TAIL:
        lse = tl.load(LSE + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
    else:
        lse = tl.load(LSE + bh.to(tl.int64) * NQ + rows)
        delta = tl.load(DELTA + bh.to(tl.int64) * NQ + rows)
    p_t = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])
    ds_t = p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
    dv += _dot(p_t.to(do.dtype), do, IEEE)
    dk += _dot(ds_t.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=_STRIDES_BHN)
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale,
                               s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                               s_db, s_dh, s_dn, s_dd, H, NQ, NK, D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               TMA: tl.constexpr, MASK_D: tl.constexpr, ALIGN: tl.constexpr, IEEE: tl.constexpr):
    """dv = Σ_m pᵀ·do, dk = scale·Σ_m dsᵀ·q with ds = p·(do·vᵀ − δ), for one block of keys.
    DK and DV are contiguous [B, H, NK, D]."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    s_qb, s_qh, s_qn = _hint(s_qb, s_qh, s_qn, ALIGN)
    s_kb, s_kh, s_kn = _hint(s_kb, s_kh, s_kn, ALIGN)
    s_vb, s_vh, s_vn = _hint(s_vb, s_vh, s_vn, ALIGN)
    s_db, s_dh, s_dn = _hint(s_db, s_dh, s_dn, ALIGN)
    start_n = pid_n * BLOCK_N
    k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, start_n, NK, D, BLOCK_N, BLOCK_D, TMA, True, MASK_D)
    v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, start_n, NK, D, BLOCK_N, BLOCK_D, TMA, True, MASK_D)
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    whole = NQ // BLOCK_M * BLOCK_M
    for start in range(0, whole, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qn, s_qd, s_db, s_dh, s_dn,
                             s_dd, start, NQ, D, qk_scale, BLOCK_M, BLOCK_D, TMA, False, MASK_D, IEEE)
    if whole < NQ:
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qn, s_qd, s_db, s_dh, s_dn,
                             s_dd, whole, NQ, D, qk_scale, BLOCK_M, BLOCK_D, TMA, True, MASK_D, IEEE)
    s_b, s_h = H * NK * D, NK * D
    _store(DK, b, h, s_b, s_h, D, 1, start_n, NK, D, dk * scale, BLOCK_N, BLOCK_D)
    _store(DV, b, h, s_b, s_h, D, 1, start_n, NK, D, dv, BLOCK_N, BLOCK_D)


@triton.jit
def _dq_block(dq, q, do, lse, delta, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, start, NK, D,
              qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, TAIL: tl.constexpr,
              MASK_D: tl.constexpr, IEEE: tl.constexpr):
    """dq += ds·k over keys start .. start + BLOCK_N."""
    k = _tile(K, b, h, s_kb, s_kh, s_kn, s_kd, start, NK, D, BLOCK_N, BLOCK_D, TMA, TAIL, MASK_D)
    v = _tile(V, b, h, s_vb, s_vh, s_vn, s_vd, start, NK, D, BLOCK_N, BLOCK_D, TMA, TAIL, MASK_D)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None]
    if TAIL:
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < NK, s, float("-inf"))
    p = tl.exp2(s)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit(do_not_specialize=_STRIDES_BHN)
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale,
                             s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                             s_db, s_dh, s_dn, s_dd, H, NQ, NK, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             TMA: tl.constexpr, MASK_D: tl.constexpr, ALIGN: tl.constexpr, IEEE: tl.constexpr):
    """dq = scale·Σ_n ds·k for one block of queries. DQ is contiguous [B, H, NQ, D]."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    s_qb, s_qh, s_qn = _hint(s_qb, s_qh, s_qn, ALIGN)
    s_kb, s_kh, s_kn = _hint(s_kb, s_kh, s_kn, ALIGN)
    s_vb, s_vh, s_vn = _hint(s_vb, s_vh, s_vn, ALIGN)
    s_db, s_dh, s_dn = _hint(s_db, s_dh, s_dn, ALIGN)
    start_m = pid_m * BLOCK_M
    q = _tile(Q, b, h, s_qb, s_qh, s_qn, s_qd, start_m, NQ, D, BLOCK_M, BLOCK_D, TMA, True, MASK_D)
    do = _tile(DO, b, h, s_db, s_dh, s_dn, s_dd, start_m, NQ, D, BLOCK_M, BLOCK_D, TMA, True, MASK_D)
    rows = start_m + tl.arange(0, BLOCK_M)
    lse = tl.load(LSE + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
    qk_scale = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    whole = NK // BLOCK_N * BLOCK_N
    for start in range(0, whole, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, start,
                       NK, D, qk_scale, BLOCK_N, BLOCK_D, TMA, False, MASK_D, IEEE)
    if whole < NK:
        dq = _dq_block(dq, q, do, lse, delta, K, V, b, h, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, whole,
                       NK, D, qk_scale, BLOCK_N, BLOCK_D, TMA, True, MASK_D, IEEE)
    _store(DQ, b, h, H * NQ * D, NQ * D, D, 1, start_m, NQ, D, dq * scale, BLOCK_M, BLOCK_D)


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether every tensor can back a tensor descriptor: contiguous head dim, 16-byte aligned base and
    strides (the copy engine's rule); otherwise the kernels read through pointers."""
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3]) for t in ts)


def _align(*ts: torch.Tensor) -> int:
    """The largest power of two (≤ 16) dividing every batch, head and token stride, in elements (the lowest
    set bit of their OR)."""
    v = 16
    for t in ts:
        s = t.stride()
        v |= s[0] | s[1] | s[2]
    return v & -v


def _bhnd_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a [B, H, N, D] ('bhnd') or [B, N, H, D] ('bnhd') tensor."""
    s = t.stride()
    return (s[0], s[1], s[2], s[3]) if layout == "bhnd" else (s[0], s[2], s[1], s[3])


def _bhnd(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, N, D) of a tensor in `layout`."""
    s = t.shape
    return (s[0], s[1], s[2], s[3]) if layout == "bhnd" else (s[0], s[2], s[1], s[3])


def _operand(t: torch.Tensor, layout: str, rows: int, block_d: int, tma: bool):
    """The kernel argument for q, k, v or do: a [B, H, N, D] descriptor with [1, 1, rows, block_d] tiles, or
    the tensor itself (pointer loads with the strides passed beside it)."""
    if not tma:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(_bhnd(t, layout)), list(_bhnd_strides(t, layout)), [1, 1, rows, block_d])


def configs(D: int, NK: int, dtype: torch.dtype, interpreting: bool) -> tuple[int, Blocks, Blocks, Blocks]:
    """(BLOCK_D, forward, dk/dv, dq launch configurations) for a head dim, key count and dtype; under the
    interpreter 16×16 blocks with the same load paths (the tests cover both)."""
    block_d = max(16, next_power_of_2(D))
    key = (max(block_d, 32), 4 if dtype == torch.float32 else 2)
    fwd, dkdv, dq = CONFIGS[key]
    if NK <= 256:
        fwd = SHORT_FWD.get(key, fwd)
    if interpreting:
        return (block_d, *(dataclasses.replace(b, m=16, n=16, warps=1, stages=1) for b in (fwd, dkdv, dq)))
    return block_d, fwd, dkdv, dq


_D_STRIDES = ("s_qd", "s_kd", "s_vd", "s_dd")
_FWD = Kernel(_attention_fwd_kernel, specialized=("s_qd", "s_kd", "s_vd", "s_od"))
_DELTA = Kernel(_attention_bwd_delta_kernel, specialized=("s_od", "s_dd", "D"))
_DKDV = Kernel(_attention_bwd_dkdv_kernel, specialized=_D_STRIDES)
_DQ = Kernel(_attention_bwd_dq_kernel, specialized=_D_STRIDES)


def _batch_ranges(B: int, H: int) -> list[tuple[int, int]]:
    """Batch ranges of at most MAX_GRID_YZ (batch, head) pairs each."""
    if H > MAX_GRID_YZ:
        raise ValueError(f"attention with {H} heads: the Triton kernels take at most {MAX_GRID_YZ}")
    step = MAX_GRID_YZ // H
    return [(b0, min(b0 + step, B)) for b0 in range(0, B, step)]


def attention_fwd(q, k, v, o, lse, scale: float, layout: str, ieee: bool, interpreting: bool,
                  blocks: Blocks | None = None) -> None:
    """o (layout like q) and lse [B, H, NQ] (fp32, base 2) from q [.., NQ, ..], k and v [.., NK, ..].
    `blocks` overrides the launch configuration (bench/attention_tune.py)."""
    B, H, NQ, D = _bhnd(q, layout)
    NK = _bhnd(k, layout)[2]
    if o.numel() == 0:
        return
    if B * H > MAX_GRID_YZ:  # (batch, head) pairs are grid axis 1: launch per batch range
        for b0, b1 in _batch_ranges(B, H):
            attention_fwd(q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1], lse[b0:b1], scale, layout, ieee, interpreting,
                          blocks)
        return
    bd, fwd, _, _ = configs(D, NK, q.dtype, interpreting)
    fwd = blocks or fwd
    tma = fwd.tma and _tma_ok(q, k, v)
    align, ieee = _align(q, k, v), ieee or interpreting
    _FWD((cdiv(NQ, fwd.m), B * H), [
        _operand(q, layout, fwd.m, bd, tma), _operand(k, layout, fwd.n, bd, tma), _operand(v, layout, fwd.n, bd, tma),
        o, lse, scale, *_bhnd_strides(q, layout), *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
        *_bhnd_strides(o, layout), H, NQ, NK], (q.dtype, D, fwd, bd, tma, align, ieee, scale > 0),
        dict(D=D, BLOCK_M=fwd.m, BLOCK_N=fwd.n, BLOCK_D=bd, TMA=tma, MASK_D=not tma and D < bd, ALIGN=align,
             IEEE=ieee, POSITIVE=scale > 0), num_warps=fwd.warps, num_stages=fwd.stages)


def attention_bwd(do, q, k, v, o, lse, scale: float, layout: str, ieee: bool, interpreting: bool,
                  blocks: tuple[Blocks, Blocks] | None = None):
    """(dq, dk, dv), each contiguous [B, H, N, D] (the caller views them in its layout). `blocks` overrides
    the (dk/dv, dq) launch configurations (bench/attention_tune.py)."""
    B, H, NQ, D = _bhnd(q, layout)
    NK = _bhnd(k, layout)[2]
    if B * H > MAX_GRID_YZ:  # (batch, head) pairs are grid axis 1: launch per batch range
        parts = [attention_bwd(do[b0:b1], q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1], lse[b0:b1], scale, layout, ieee,
                               interpreting, blocks) for b0, b1 in _batch_ranges(B, H)]
        return tuple(torch.cat(grads) for grads in zip(*parts))
    bd, _, dkdv, dq_blocks = configs(D, NK, q.dtype, interpreting)
    dkdv, dq_blocks = blocks or (dkdv, dq_blocks)
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    _DELTA((cdiv(NQ, 64), B * H), [o, do, delta, *_bhnd_strides(o, layout), *_bhnd_strides(do, layout), H, NQ,
                                          D], (q.dtype, bd), dict(BLOCK_M=64, BLOCK_D=bd))
    aligned, align, ieee = _tma_ok(q, k, v, do), _align(q, k, v, do), ieee or interpreting
    strides = (*_bhnd_strides(q, layout), *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
               *_bhnd_strides(do, layout))
    for kernel, blk, grid, outs in ((_DKDV, dkdv, cdiv(NK, dkdv.n), (dk, dv)),
                                    (_DQ, dq_blocks, cdiv(NQ, dq_blocks.m), (dq,))):
        tma = blk.tma and aligned
        kernel((grid, B * H), [
            _operand(q, layout, blk.m, bd, tma), _operand(k, layout, blk.n, bd, tma),
            _operand(v, layout, blk.n, bd, tma), _operand(do, layout, blk.m, bd, tma), lse, delta, *outs, scale,
            *strides, H, NQ, NK], (q.dtype, D, blk, bd, tma, align, ieee),
            dict(D=D, BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_D=bd, TMA=tma, MASK_D=not tma and D < bd, ALIGN=align,
                 IEEE=ieee), num_warps=blk.warps, num_stages=blk.stages)
    return dq, dk, dv
