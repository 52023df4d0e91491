"""Triton backend of the normalisation blocks (`pydpm.ops.norm`): GroupNorm with the per-sample modulation and
SiLU of diffusers' ResNet blocks, and the AdaLN modulate of DiT / PixArt.

`_group_norm_fwd_kernel`   one program per (sample, group), or per (sample, group, share of the positions) when
                           there are fewer groups than the card holds programs (then two launches): the
                           group's mean and variance (tile statistics merged by Chan's formula: no
                           E[x²] − E[x]² cancellation), then one pass writing
                           u = (x − μ)·σ⁻¹·w·(1 + scale) + b·(1 + scale) + shift and y = u or u·sigmoid(u)
`_group_norm_bwd_kernel`   one program per (sample, group): du = dy·act'(u) reduced per channel to Σ du and
                           Σ du·x̂ (stored: the parameter, scale and shift gradients come from them), then
                           dx = σ⁻¹·(du·w·(1 + scale) − mean(dx̂) − x̂·mean(dx̂·x̂)) in a second pass
`_layer_norm_fwd_kernel`   one program per row of [B, N, C], the row held in registers: exact two-pass mean
                           and variance, y = x̂·w·(1 + scale[b]) + b·(1 + scale[b]) + shift[b]
`_layer_norm_bwd_kernel`   one program per block of rows of one sample: dx per row, and per channel the
                           partial sums Σ dy and Σ dy·x̂ over the block (added over blocks by the launcher in a
                           fixed order: deterministic)

Tensors are read through their strides: GroupNorm sees x as [B, C, S] (S the flattened spatial dims: NCHW,
channels-last), LayerNorm as [B, N, C]. Accumulation is fp32 (fp64 for fp64 tensors); outputs are rounded once.
"""
from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from pydpm._cache import BoundedCache

from ._common import acc as _acc
from ._common import bcs_strides, cdiv, channels_last, next_power_of_2, target_programs
from ._launch import Kernel

_TILE = 2048            # elements per GroupNorm tile (8 per thread at 8 warps)
_GN_WARPS = 8


@triton.jit
def _silu_and_grad(u):
    """(u·sigmoid(u), d/du u·sigmoid(u)); exp of −|u| only, so no lane overflows (masked lanes included)."""
    e = tl.exp(-tl.abs(u))
    sig = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return u * sig, sig * (1.0 + u * (1.0 - sig))


@triton.jit
def _channel_coefficients(weight, bias, scale, ssb, ssc, shift, tsb, tsc, b64, c, c_ok,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, SCALE: tl.constexpr, SHIFT: tl.constexpr,
                          F64: tl.constexpr):
    """Per channel: (k, q) with u = x̂·k + q, k = w·(1 + scale), q = b·(1 + scale) + shift."""
    k = _acc(tl.full(c.shape, 1.0, tl.float32), F64)
    q = _acc(tl.zeros(c.shape, tl.float32), F64)
    if HAS_W:
        k = _acc(tl.load(weight + c, mask=c_ok, other=0.0), F64)
    if HAS_B:
        q = _acc(tl.load(bias + c, mask=c_ok, other=0.0), F64)
    if SCALE:
        one_plus = 1.0 + _acc(tl.load(scale + b64 * ssb + c.to(tl.int64) * ssc, mask=c_ok, other=0.0), F64)
        k = k * one_plus
        q = q * one_plus
    if SHIFT:
        q = q + _acc(tl.load(shift + b64 * tsb + c.to(tl.int64) * tsc, mask=c_ok, other=0.0), F64)
    return k, q


@triton.jit
def _chan_merge(n, mean, m2, n_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2) summaries: exact, no E[x²] − E[x]² cancellation."""
    total = n + n_b
    delta = mean_b - mean
    return total, mean + delta * (n_b / total), m2 + m2_b + delta * delta * (n * n_b / total)


@triton.jit(do_not_specialize=["G", "cpg", "n_split"])
def _group_norm_fwd_kernel(x, xsb, xsc, xss,
                           out, osb, osc, oss,
                           weight, bias, scale, ssb, ssc, shift, tsb, tsc,
                           stats, partial, G, cpg, S, chunk, n_split, eps_hi, eps_lo,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, SCALE: tl.constexpr, SHIFT: tl.constexpr,
                           SILU: tl.constexpr, STATS: tl.constexpr, PHASE: tl.constexpr, BC: tl.constexpr,
                           BS: tl.constexpr, F64: tl.constexpr):
    """Program (group, split) covers the spatial positions [split·chunk, (split + 1)·chunk) of every channel of
    the group. PHASE 0 (one split): statistics and output. PHASE 1: the split's (count, mean, M2) into
    `partial`. PHASE 2: the group's statistics merged from `partial`, then the split's output."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b64 = (pid // G).to(tl.int64)
    c0 = (pid % G) * cpg
    s_lo = split * chunk
    s_hi = tl.minimum(s_lo + chunk, S)
    x_b = x + b64 * xsb
    o_b = out + b64 * osb
    one = tl.arange(0, 1)
    n = _acc(tl.zeros([1], tl.float32), F64)
    mean = _acc(tl.zeros([1], tl.float32), F64)
    m2 = _acc(tl.zeros([1], tl.float32), F64)
    if PHASE == 2:
        row = partial + 3 * (pid.to(tl.int64) * n_split)
        for i in range(0, n_split):
            n, mean, m2 = _chan_merge(n, mean, m2, tl.load(row + 3 * i + one), tl.load(row + 3 * i + 1 + one),
                                      tl.load(row + 3 * i + 2 + one))
    else:
        for cs in range(0, cpg, BC):
            c = cs + tl.arange(0, BC)[:, None]
            c_ok = c < cpg
            x_c = x_b + (c0 + c).to(tl.int64) * xsc
            cnt_c = tl.minimum(cpg - cs, BC)
            for ss in range(s_lo, s_hi, BS):
                s = ss + tl.arange(0, BS)[None, :]
                m = c_ok & (s < s_hi)
                v = _acc(tl.load(x_c + s.to(tl.int64) * xss, mask=m, other=0.0), F64)
                cnt = (cnt_c * tl.minimum(s_hi - ss, BS)).to(v.dtype)
                t_mean = tl.sum(tl.sum(v, axis=1), axis=0) / cnt
                d = tl.where(m, v - t_mean, 0.0)
                n, mean, m2 = _chan_merge(n, mean, m2, cnt, t_mean, tl.sum(tl.sum(d * d, axis=1), axis=0))
    if PHASE == 1:
        row = partial + 3 * (pid.to(tl.int64) * n_split + split)
        tl.store(row + one, n)
        tl.store(row + 1 + one, mean)
        tl.store(row + 2 + one, m2)
    else:
        rstd = 1.0 / tl.sqrt(m2 / n + eps_hi + eps_lo)  # float64 variance + float32 halves: exact
        if STATS:
            if split == 0:
                tl.store(stats + 2 * pid + one, mean)
                tl.store(stats + 2 * pid + 1 + one, rstd)
        for cs in range(0, cpg, BC):
            c = cs + tl.arange(0, BC)[:, None]
            c_ok = c < cpg
            k, q = _channel_coefficients(weight, bias, scale, ssb, ssc, shift, tsb, tsc, b64, c0 + c, c_ok,
                                         HAS_W, HAS_B, SCALE, SHIFT, F64)
            k = k * rstd
            x_c = x_b + (c0 + c).to(tl.int64) * xsc
            o_c = o_b + (c0 + c).to(tl.int64) * osc
            for ss in range(s_lo, s_hi, BS):
                s = (ss + tl.arange(0, BS)[None, :]).to(tl.int64)
                m = c_ok & (s < s_hi)
                u = (_acc(tl.load(x_c + s * xss, mask=m, other=0.0), F64) - mean) * k + q
                if SILU:
                    u, _ = _silu_and_grad(u)
                tl.store(o_c + s * oss, u.to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["C", "G", "cpg"])
def _group_norm_bwd_kernel(dy, dsb, dsc, dss,
                           x, xsb, xsc, xss,
                           dx, osb, osc, oss,
                           weight, bias, scale, ssb, ssc, shift, tsb, tsc,
                           stats, sums, C, G, cpg, S,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, SCALE: tl.constexpr, SHIFT: tl.constexpr,
                           SILU: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    b64 = b.to(tl.int64)
    c0 = (pid % G) * cpg
    one = tl.arange(0, 1)
    mean = tl.load(stats + 2 * pid + one)
    rstd = tl.load(stats + 2 * pid + 1 + one)
    x_b = x + b64 * xsb
    d_b = dy + b64 * dsb
    o_b = dx + b64 * osb
    g1 = _acc(tl.zeros([1], tl.float32), F64)  # Σ over the group of dx̂ = du·k
    g2 = _acc(tl.zeros([1], tl.float32), F64)  # Σ over the group of dx̂·x̂
    for cs in range(0, cpg, BC):
        c = cs + tl.arange(0, BC)[:, None]
        c_ok = c < cpg
        k, q = _channel_coefficients(weight, bias, scale, ssb, ssc, shift, tsb, tsc, b64, c0 + c, c_ok,
                                     HAS_W, HAS_B, SCALE, SHIFT, F64)
        x_c = x_b + (c0 + c).to(tl.int64) * xsc
        d_c = d_b + (c0 + c).to(tl.int64) * dsc
        sum_du = _acc(tl.zeros([BC, BS], tl.float32), F64)
        sum_dux = _acc(tl.zeros([BC, BS], tl.float32), F64)
        for ss in range(0, S, BS):
            s = (ss + tl.arange(0, BS)[None, :]).to(tl.int64)
            m = c_ok & (s < S)
            xhat = (_acc(tl.load(x_c + s * xss, mask=m, other=0.0), F64) - mean) * rstd
            du = _acc(tl.load(d_c + s * dss, mask=m, other=0.0), F64)
            if SILU:
                _, grad = _silu_and_grad(xhat * k + q)
                du = du * grad
            sum_du += du
            sum_dux += du * xhat  # zero where masked: du loads as 0
        a = tl.sum(sum_du, axis=1)[:, None]
        a_x = tl.sum(sum_dux, axis=1)[:, None]
        row = sums + (2 * b64 * C + c0 + c)
        tl.store(row, a, mask=c_ok)
        tl.store(row + C, a_x, mask=c_ok)
        g1 += tl.sum(tl.sum(k * a, axis=1), axis=0)
        g2 += tl.sum(tl.sum(k * a_x, axis=1), axis=0)
    inv_n = 1.0 / (cpg * S)
    g1 = g1 * inv_n
    g2 = g2 * inv_n
    for cs in range(0, cpg, BC):
        c = cs + tl.arange(0, BC)[:, None]
        c_ok = c < cpg
        k, q = _channel_coefficients(weight, bias, scale, ssb, ssc, shift, tsb, tsc, b64, c0 + c, c_ok,
                                     HAS_W, HAS_B, SCALE, SHIFT, F64)
        x_c = x_b + (c0 + c).to(tl.int64) * xsc
        d_c = d_b + (c0 + c).to(tl.int64) * dsc
        o_c = o_b + (c0 + c).to(tl.int64) * osc
        for ss in range(0, S, BS):
            s = (ss + tl.arange(0, BS)[None, :]).to(tl.int64)
            m = c_ok & (s < S)
            xhat = (_acc(tl.load(x_c + s * xss, mask=m, other=0.0), F64) - mean) * rstd
            du = _acc(tl.load(d_c + s * dss, mask=m, other=0.0), F64)
            if SILU:
                _, grad = _silu_and_grad(xhat * k + q)
                du = du * grad
            tl.store(o_c + s * oss, (rstd * (du * k - g1 - xhat * g2)).to(dx.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["N"])
def _layer_norm_fwd_kernel(x, xsb, xsn, xsc,
                           out, osb, osn, osc,
                           weight, bias, scale, ssb, ssc, shift, tsb, tsc,
                           stats, N, C, eps_hi, eps_lo,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr,
                           F64: tl.constexpr):
    pid = tl.program_id(0)
    b64 = (pid // N).to(tl.int64)
    n64 = (pid % N).to(tl.int64)
    c = tl.arange(0, BLOCK)
    c_ok = c < C
    c64 = c.to(tl.int64)
    v = _acc(tl.load(x + b64 * xsb + n64 * xsn + c64 * xsc, mask=c_ok, other=0.0), F64)
    mean = tl.sum(v, axis=0) / C
    d = tl.where(c_ok, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps_hi + eps_lo)
    if STATS:
        tl.store(stats + 2 * pid, mean)
        tl.store(stats + 2 * pid + 1, rstd)
    k, q = _channel_coefficients(weight, bias, scale, ssb, ssc, shift, tsb, tsc, b64, c, c_ok,
                                 HAS_W, HAS_B, True, True, F64)
    tl.store(out + b64 * osb + n64 * osn + c64 * osc, (d * rstd * k + q).to(out.dtype.element_ty), mask=c_ok)


@triton.jit(do_not_specialize=["N", "rows"])
def _layer_norm_bwd_kernel(dy, dsb, dsn, dsc,
                           x, xsb, xsn, xsc,
                           dx, osb, osn, osc,
                           weight, scale, ssb, ssc,
                           stats, partial, N, C, rows,
                           HAS_W: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    b64 = b.to(tl.int64)
    c = tl.arange(0, BLOCK)
    c_ok = c < C
    c64 = c.to(tl.int64)
    k, _ = _channel_coefficients(weight, weight, scale, ssb, ssc, scale, ssb, ssc, b64, c, c_ok,
                                 HAS_W, False, True, False, F64)
    sum_du = _acc(tl.zeros([BLOCK], tl.float32), F64)
    sum_dux = _acc(tl.zeros([BLOCK], tl.float32), F64)
    first = blk.to(tl.int64) * rows
    for i in range(0, tl.minimum(rows, N - blk * rows)):
        n64 = first + i
        r = b64 * N + n64
        mean = tl.load(stats + 2 * r)
        rstd = tl.load(stats + 2 * r + 1)
        xhat = tl.where(c_ok, (_acc(tl.load(x + b64 * xsb + n64 * xsn + c64 * xsc, mask=c_ok, other=0.0), F64)
                               - mean) * rstd, 0.0)
        du = _acc(tl.load(dy + b64 * dsb + n64 * dsn + c64 * dsc, mask=c_ok, other=0.0), F64)
        dxhat = du * k
        g1 = tl.sum(dxhat, axis=0) / C
        g2 = tl.sum(dxhat * xhat, axis=0) / C
        tl.store(dx + b64 * osb + n64 * osn + c64 * osc, (rstd * (dxhat - g1 - xhat * g2)).to(dx.dtype.element_ty),
                 mask=c_ok)
        sum_du += du
        sum_dux += du * xhat
    row = partial + (2 * (b64 * tl.num_programs(1) + blk)) * C + c
    tl.store(row, sum_du, mask=c_ok)
    tl.store(row + C, sum_dux, mask=c_ok)


# Strides and the spatial size stay specialised as Triton's JIT would (a unit stride makes the loads
# contiguous); sample, group and row counts do not change the code.
_GN_FWD = Kernel(_group_norm_fwd_kernel, specialized=("xsb", "xsc", "xss", "osb", "osc", "oss", "ssb", "ssc",
                                                     "tsb", "tsc", "S", "chunk"))
_GN_BWD = Kernel(_group_norm_bwd_kernel, specialized=("dsb", "dsc", "dss", "xsb", "xsc", "xss", "osb", "osc", "oss",
                                                     "ssb", "ssc", "tsb", "tsc", "S"))
_LN_FWD = Kernel(_layer_norm_fwd_kernel, specialized=("xsb", "xsn", "xsc", "osb", "osn", "osc", "ssb", "ssc", "tsb",
                                                     "tsc", "C"))
_LN_BWD = Kernel(_layer_norm_bwd_kernel, specialized=("dsb", "dsn", "dsc", "xsb", "xsn", "xsc", "osb", "osn", "osc",
                                                     "ssb", "ssc", "C"))


def _f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def _gn_tile(cpg: int, S: int, nhwc: bool) -> tuple[int, int]:
    """(BC, BS): a tile of at most _TILE elements over (channels of a group, S spatial positions), long along
    the dimension that is contiguous in memory (the channels when `nhwc`)."""
    if nhwc:  # the group's channels are adjacent
        bc = max(2, min(next_power_of_2(cpg), 64))
        return bc, max(2, min(next_power_of_2(S), _TILE // bc))
    bs = max(2, min(next_power_of_2(S), _TILE))
    return max(2, min(next_power_of_2(cpg), _TILE // bs)), bs


def gn_splits(groups: int, S: int, device: torch.device) -> int:
    """How many programs share one group's positions: enough for about two programs per SM when the groups are
    fewer (SD's 32 groups at batch 2 would fill half an H200), at least 256 positions each; 1 under the
    interpreter."""
    sms = target_programs(device) // 8
    if sms == 0 or groups >= 2 * sms:
        return 1
    return max(1, min(cdiv(2 * sms, groups), S // 256))


def _pair_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(batch, channel) strides of a per-sample [B, C] operand (0, 0 when absent)."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _modulation(weight, bias, scale, shift, like):
    """The launch arguments of the per-channel and per-sample operands (absent ones point at `like`)."""
    return [weight if weight is not None else like, bias if bias is not None else like,
            scale if scale is not None else like, *_pair_strides(scale),
            shift if shift is not None else like, *_pair_strides(shift)]


def _operands(weight, bias, scale, shift) -> tuple:
    """The key part of the optional operands: which are given, and their dtypes."""
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype,
            None if scale is None else scale.dtype, None if shift is None else shift.dtype)


def _has(operands: tuple) -> dict:
    return dict(HAS_W=operands[0] is not None, HAS_B=operands[1] is not None, SCALE=operands[2] is not None,
                SHIFT=operands[3] is not None)


_CONSTEXPRS: dict = {}


def _constexprs(key: tuple, build) -> dict:
    """The launch's constexpr values, built (`build()`) once per key: a dict per call costs the host µs."""
    found = _CONSTEXPRS.get(key)
    if found is None:
        found = _CONSTEXPRS[key] = build()
    return found


@functools.lru_cache(maxsize=64)
def _eps_pair(eps: float) -> tuple[float, float]:
    """eps as two float32 numbers whose sum is eps to ~48 bits (scalar kernel arguments are float32; the
    float64 kernels add them in float64)."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def _stats(shape: tuple[int, ...], x: torch.Tensor, keep: bool) -> torch.Tensor | None:
    return torch.empty(shape, dtype=torch.float64 if _f64(x) else torch.float32, device=x.device) if keep else None


def group_norm_fwd(x: torch.Tensor, out: torch.Tensor, groups: int, weight, bias, scale, shift, eps: float,
                   silu: bool, keep_stats: bool, splits: int | None = None) -> torch.Tensor | None:
    """GroupNorm of x [B, C, S...] into out (both views `bcs_strides` accepts) with the optional affine
    (weight, bias [C]), per-sample modulation (scale, shift: [B, C] views, any strides) and SiLU; with
    `keep_stats` returns the statistics [B, G, 2] (mean, 1/σ) in fp32 (fp64 for fp64), else None. `splits`
    programs per group (default `gn_splits`): above one, a statistics launch then an output launch."""
    B, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    cpg = C // groups
    stats = _stats((B, groups, 2), x, keep_stats)
    if B * C * S == 0:
        return None if stats is None else stats.fill_(math.nan)
    xs, os_ = bcs_strides(x), bcs_strides(out)
    assert xs is not None and os_ is not None, "group_norm_fwd: a tensor does not view as [B, C, S]"
    operands = _operands(weight, bias, scale, shift)
    signature = (B * groups, cpg, S, channels_last(xs), splits, x.device, operands, silu, keep_stats,
                 x.dtype, out.dtype)
    plan = _GN_FWD_PLANS.get(signature)
    if plan is None:
        plan = _GN_FWD_PLANS.put(signature, _gn_fwd_plan(*signature))
    n_split, chunk, launches = plan
    partial = torch.empty((B * groups, n_split, 3), dtype=torch.float64 if _f64(x) else torch.float32,
                          device=x.device) if n_split > 1 else x
    args = [x, *xs, out, *os_, *_modulation(weight, bias, scale, shift, x), stats if keep_stats else x, partial,
            groups, cpg, S, chunk, n_split, *_eps_pair(eps)]
    for key, constexprs in launches:
        _GN_FWD((B * groups, n_split), list(args), key, constexprs, num_warps=_GN_WARPS)
    return stats


# A forward's launch plan per signature: what the launcher would otherwise recompute on every call
_GN_FWD_PLANS = BoundedCache(256)


def _gn_fwd_plan(programs: int, cpg: int, S: int, nhwc: bool, splits: int | None, device: torch.device,
                 operands: tuple, silu: bool, keep_stats: bool, x_dtype: torch.dtype, out_dtype: torch.dtype):
    """(shares per group, positions per share, [(variant key, constexprs) per launch]) of `group_norm_fwd`."""
    n_split = splits or gn_splits(programs, S, device)
    chunk = cdiv(S, n_split)
    n_split = cdiv(S, chunk)
    bc, bs = _gn_tile(cpg, chunk, nhwc)
    launches = []
    for phase in ((1, 2) if n_split > 1 else (0,)):
        key = ("gn_fwd", phase, operands, silu, keep_stats, bc, bs, x_dtype, out_dtype)
        launches.append((key, dict(_has(operands), SILU=silu, STATS=keep_stats, PHASE=phase, BC=bc, BS=bs,
                                   F64=x_dtype == torch.float64)))
    return n_split, chunk, launches


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, groups: int, weight, bias, scale, shift,
                   stats: torch.Tensor, silu: bool) -> torch.Tensor:
    """dx of `group_norm_fwd` into dx; returns [B, 2, C] in the accumulation dtype: per sample and channel
    Σ_s du and Σ_s du·x̂ (du the gradient before the activation, x̂ the normalised input)."""
    B, C = x.shape[0], x.shape[1]
    sums = torch.empty((B, 2, C), dtype=stats.dtype, device=x.device)
    if x.numel() == 0:
        return sums.zero_()
    operands = _operands(weight, bias, scale, shift)
    signature = (x.shape, x.stride(), dy.stride(), dx.stride(), groups, operands, silu, dy.dtype, x.dtype, dx.dtype)
    plan = _GN_BWD_PLANS.get(signature)
    if plan is None:
        plan = _GN_BWD_PLANS.put(signature, _gn_bwd_plan(dy, x, dx, groups, operands, silu))
    strides, sizes, key, constexprs = plan
    ds, xs, os_ = strides
    _GN_BWD((B * groups,), [dy, *ds, x, *xs, dx, *os_, *_modulation(weight, bias, scale, shift, x), stats, sums, C,
                            *sizes], key, constexprs, num_warps=_GN_WARPS)
    return sums


# A backward's launch plan per signature (shapes, strides, operands, dtypes), as the forward's
_GN_BWD_PLANS = BoundedCache(256)


def _gn_bwd_plan(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, groups: int, operands: tuple, silu: bool):
    """((dy's, x's, dx's [B, C, S] strides), (groups, channels per group, S), variant key, constexprs) of
    `group_norm_bwd`."""
    S = math.prod(x.shape[2:])
    cpg = x.shape[1] // groups
    xs, ds, os_ = bcs_strides(x), bcs_strides(dy), bcs_strides(dx)
    assert xs is not None and ds is not None and os_ is not None, "group_norm_bwd: a tensor does not view as [B, C, S]"
    bc, bs = _gn_tile(cpg, S, channels_last(xs))
    key = ("gn_bwd", operands, silu, bc, bs, dy.dtype, x.dtype, dx.dtype)
    return (ds, xs, os_), (groups, cpg, S), key, dict(_has(operands), SILU=silu, BC=bc, BS=bs, F64=_f64(x))


def _ln_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def layer_norm_fwd(x: torch.Tensor, out: torch.Tensor, weight, bias, scale, shift, eps: float,
                   keep_stats: bool) -> torch.Tensor | None:
    """LayerNorm over the last dim of x [B, N, C] (a row in registers: C ≤ 16384) into out, modulated per
    sample by scale and shift ([B, C] views, any strides); with `keep_stats` returns the statistics [B, N, 2]
    (mean, 1/σ), else None."""
    B, N, C = x.shape
    stats = _stats((B, N, 2), x, keep_stats)
    if B * N * C == 0:
        return None if stats is None else stats.fill_(math.nan)
    block = max(2, next_power_of_2(C))
    operands = _operands(weight, bias, scale, shift)
    key = ("ln_fwd", operands, keep_stats, block, x.dtype, out.dtype)
    _LN_FWD((B * N,), [x, *x.stride(), out, *out.stride(), *_modulation(weight, bias, scale, shift, x),
                       stats if keep_stats else x, N, C, *_eps_pair(eps)], key,
            _constexprs(key, lambda: dict(HAS_W=weight is not None, HAS_B=bias is not None, STATS=keep_stats,
                                          BLOCK=block, F64=_f64(x))), num_warps=_ln_warps(block))
    return stats


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, weight, scale, stats: torch.Tensor
                   ) -> torch.Tensor:
    """dx of `layer_norm_fwd` into dx; returns [B, 2, C] in the accumulation dtype: per sample and channel
    Σ_n dy and Σ_n dy·x̂."""
    B, N, C = x.shape
    if B * N * C == 0:
        return torch.zeros((B, 2, C), dtype=stats.dtype, device=x.device)
    block = max(2, next_power_of_2(C))
    blocks = max(1, min(N, target_programs(x.device) // max(B, 1)))
    rows = cdiv(N, blocks)
    blocks = cdiv(N, rows)
    partial = torch.empty((B, blocks, 2, C), dtype=stats.dtype, device=x.device)
    w = weight if weight is not None else x
    key = ("ln_bwd", weight is not None, block, dy.dtype, x.dtype, dx.dtype, w.dtype, scale.dtype)
    _LN_BWD((B, blocks), [dy, *dy.stride(), x, *x.stride(), dx, *dx.stride(), w, scale, *_pair_strides(scale), stats,
                          partial, N, C, rows], key,
            _constexprs(key, lambda: dict(HAS_W=weight is not None, BLOCK=block, F64=_f64(x))),
            num_warps=_ln_warps(block))
    return partial[:, 0] if blocks == 1 else partial.sum(1)
