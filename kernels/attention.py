"""Triton backend of `pydpm.ops.attention`: non-causal flash attention, forward and backward, any head
dimension (padded to a power of two inside the kernel, masked), any sequence lengths, strided layouts.

Forward (`_attention_fwd_kernel`, one program per (query block, batch·head)): one pass over K/V with an
online softmax in base 2 (s = q·kᵀ·scale·log2 e), saving lse₂ = m + log2 l per query for the backward.
Backward (FlashAttention-2's split): `_attention_bwd_delta_kernel` δ = rowsum(o·do);
`_attention_bwd_dkdv_kernel` (one program per key block) walks the query blocks for dk and dv;
`_attention_bwd_dq_kernel` (one program per query block) walks the key blocks for dq. No atomics.
fp32 inputs multiply in TF32 unless `IEEE` (exact fp32 products); accumulation is fp32 throughout.
"""
import torch
import triton
import triton.language as tl

from pydpm.ops.attention import dims

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_rows(base, offs, n, s_n, offs_d, D, s_d):
    """rows offs (< n) × head dims offs_d (< D) of one (batch, head), as [len(offs), BLOCK_D]."""
    return tl.load(base + offs[:, None] * s_n + offs_d[None, :] * s_d,
                   mask=(offs[:, None] < n) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b with fp32 accumulation. IEEE: exact fp32 products (also what the launcher asks for under the
    interpreter, whose dot mishandles bf16 operands: they are widened to fp32 first)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, valid, qk_scale, IEEE: tl.constexpr):
    """The backward's recomputed probabilities p = exp2(s − lse₂) (zero outside `valid`) and the score
    gradients ds = p·(do·vᵀ − δ) of one [M, N] block."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    return p, p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, scale,
                          s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                          s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
                          H, NQ, NK, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          IEEE: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b.to(tl.int64) * s_qb + h * s_qh, offs_m, NQ, s_qn, offs_d, D, s_qd)
    kb = K + b.to(tl.int64) * s_kb + h * s_kh
    vb = V + b.to(tl.int64) * s_vb + h * s_vh
    qk_scale = scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        k = _load_rows(kb, cols, NK, s_kn, offs_d, D, s_kd)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(cols[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(vb, cols, NK, s_vn, offs_d, D, s_vd)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    ob = O + b.to(tl.int64) * s_ob + h * s_oh
    tl.store(ob + offs_m[:, None] * s_on + offs_d[None, :] * s_od, acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, m_i + tl.log2(l_i), mask=offs_m < NQ)


@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_od, s_db, s_dh, s_dn, s_dd, H, NQ, D,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b.to(tl.int64) * s_ob + h * s_oh, offs_m, NQ, s_on, offs_d, D, s_od).to(tl.float32)
    do = _load_rows(DO + b.to(tl.int64) * s_db + h * s_dh, offs_m, NQ, s_dn, offs_d, D, s_dd).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale,
                               s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                               s_db, s_dh, s_dn, s_dd, H, NQ, NK, D,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               IEEE: tl.constexpr):
    """dv = Σ_m pᵀ·do, dk = scale·Σ_m dsᵀ·q with ds = p·(do·vᵀ − δ), for one block of keys.
    DK and DV are contiguous [B, H, NK, D]."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b.to(tl.int64) * s_kb + h * s_kh, offs_n, NK, s_kn, offs_d, D, s_kd)
    v = _load_rows(V + b.to(tl.int64) * s_vb + h * s_vh, offs_n, NK, s_vn, offs_d, D, s_vd)
    qb = Q + b.to(tl.int64) * s_qb + h * s_qh
    dob = DO + b.to(tl.int64) * s_db + h * s_dh
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows = start + offs_m
        q = _load_rows(qb, rows, NQ, s_qn, offs_d, D, s_qd)
        do = _load_rows(dob, rows, NQ, s_dn, offs_d, D, s_dd)
        lse = tl.load(LSE + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
        valid = (rows[:, None] < NQ) & (offs_n[None, :] < NK)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, valid, qk_scale, IEEE)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out = (bh.to(tl.int64) * NK + offs_n[:, None]) * D + offs_d[None, :]
    mask = (offs_n[:, None] < NK) & (offs_d[None, :] < D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale,
                             s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                             s_db, s_dh, s_dn, s_dd, H, NQ, NK, D,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             IEEE: tl.constexpr):
    """dq = scale·Σ_n ds·k for one block of queries. DQ is contiguous [B, H, NQ, D]."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b.to(tl.int64) * s_qb + h * s_qh, offs_m, NQ, s_qn, offs_d, D, s_qd)
    do = _load_rows(DO + b.to(tl.int64) * s_db + h * s_dh, offs_m, NQ, s_dn, offs_d, D, s_dd)
    lse = tl.load(LSE + bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    kb = K + b.to(tl.int64) * s_kb + h * s_kh
    vb = V + b.to(tl.int64) * s_vb + h * s_vh
    qk_scale = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        k = _load_rows(kb, cols, NK, s_kn, offs_d, D, s_kd)
        v = _load_rows(vb, cols, NK, s_vn, offs_d, D, s_vd)
        valid = (offs_m[:, None] < NQ) & (cols[None, :] < NK)
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, valid, qk_scale, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    out = (bh.to(tl.int64) * NQ + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def _blocks(D: int, interpreting: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): 16 under the interpreter (speed), else by head dim (registers)."""
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting:
        return 16, 16, block_d
    if block_d <= 64:
        return 64, 64, block_d
    if block_d <= 128:
        return 64, 32, block_d
    return 32, 32, block_d


def _bhnd_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a [B, H, N, D] ('bhnd') or [B, N, H, D] ('bnhd') tensor."""
    s = t.stride()
    return (s[0], s[1], s[2], s[3]) if layout == "bhnd" else (s[0], s[2], s[1], s[3])


def attention_fwd(q, k, v, o, lse, scale: float, layout: str, ieee: bool, interpreting: bool) -> None:
    """o (layout like q) and lse [B, H, NQ] (fp32, base 2) from q [.., NQ, ..], k and v [.., NK, ..]."""
    B, H, NQ, NK, D = dims(q, k, layout)
    bm, bn, bd = _blocks(D, interpreting)
    ieee = ieee or interpreting
    _attention_fwd_kernel[(triton.cdiv(NQ, bm), B * H)](
        q, k, v, o, lse, scale, *_bhnd_strides(q, layout), *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
        *_bhnd_strides(o, layout), H, NQ, NK, D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee,
        num_warps=4 if bd <= 64 else 8)


def attention_bwd(do, q, k, v, o, lse, scale: float, layout: str, ieee: bool, interpreting: bool):
    """(dq, dk, dv), each contiguous [B, H, N, D] (the caller views them in its layout)."""
    B, H, NQ, NK, D = dims(q, k, layout)
    bm, bn, bd = _blocks(D, interpreting)
    ieee = ieee or interpreting
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(triton.cdiv(NQ, bm), B * H)](
        o, do, delta, *_bhnd_strides(o, layout), *_bhnd_strides(do, layout), H, NQ, D, BLOCK_M=bm, BLOCK_D=bd)
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=v.device)
    strides = (*_bhnd_strides(q, layout), *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
               *_bhnd_strides(do, layout))
    warps = 4 if bd <= 64 else 8
    _attention_bwd_dkdv_kernel[(triton.cdiv(NK, bn), B * H)](
        q, k, v, do, lse, delta, dk, dv, scale, *strides, H, NQ, NK, D,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, num_warps=warps)
    _attention_bwd_dq_kernel[(triton.cdiv(NQ, bm), B * H)](
        q, k, v, do, lse, delta, dq, scale, *strides, H, NQ, NK, D,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, num_warps=warps)
    return dq, dk, dv
