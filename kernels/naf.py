"""Triton backend of the NAF-block gates (`pydpm.ops.naf`): SimpleGate and simplified channel attention
(SCA) view every tensor as [B, C, S] (S = the flattened spatial dims; any strides for which that view exists:
NCHW, channels-last, expanded). Two kernels serve every stage:

`_simple_gate_fwd_kernel`  a reading pass: v = x1·x2 (GATE; x1, x2 the channel halves of x) or v = x;
                           optionally stores v (STORE) and reduces Σ_s v (POOL) or Σ_s v·dy (POOL, DOT)
`_simple_gate_bwd_kernel`  a writing pass: v = src·scale[b, c] + shift[b, c]; stores v, or with GATE the
                           two halves v·x2 and v·x1 (the SimpleGate backward)

    op stage                                kernel  mode
    simple_gate                             fwd     GATE, STORE
    simple_gate_sca (g and its mean)        fwd     GATE, STORE, POOL
    simplified_channel_attention: mean      fwd     POOL
    simplified_channel_attention: y = x·s   bwd     SCALE
    ∂simple_gate, ∂simple_gate_sca          bwd     GATE (+ SHIFT: the mean's gradient / S)
    ∂simplified_channel_attention: Σ dy·x   fwd     POOL, DOT
    ∂simplified_channel_attention: dx       bwd     SCALE, SHIFT

Accumulation is fp32 (fp64 for fp64 tensors). Pooled sums come back per (split, b, c) and the launcher adds
the splits in a fixed order: deterministic. Naming chain: `_simple_gate_fwd_kernel` / `_simple_gate_bwd_kernel`
→ the launchers `simple_gate_fwd`, `simple_gate_bwd`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc as _acc
from ._common import MAX_GRID_YZ, bcs_strides, cdiv, channels_last, next_power_of_2, target_programs
from ._launch import Kernel

_NUM_WARPS = 4
_TILE = 1024            # elements per program and tensor (8 per thread at 4 warps)


@triton.jit(do_not_specialize=["B", "C"])
def _simple_gate_fwd_kernel(x, xsb, xsc, xss, half,
                            out, osb, osc, oss,
                            dy, dsb, dsc, dss,
                            partial, B, C, S, chunk,
                            GATE: tl.constexpr, STORE: tl.constexpr, POOL: tl.constexpr, DOT: tl.constexpr,
                            BC: tl.constexpr, BS: tl.constexpr, F64: tl.constexpr):
    n_cb = tl.cdiv(C, BC)
    b = tl.program_id(0) // n_cb
    cs = (tl.program_id(0) % n_cb) * BC + tl.arange(0, BC)[:, None]
    c_ok = cs < C
    b64 = b.to(tl.int64)
    cs64 = cs.to(tl.int64)  # offsets in 64 bits: a tensor may hold more than 2³¹ elements
    x_row = x + b64 * xsb + cs64 * xsc
    o_row = out + b64 * osb + cs64 * osc
    d_row = dy + b64 * dsb + cs64 * dsc
    s0 = tl.program_id(1) * chunk
    s_end = tl.minimum(s0 + chunk, S)
    if POOL:
        acc = _acc(tl.zeros([BC, BS], dtype=tl.float32), F64)
    for start in range(s0, s_end, BS):
        s = (start + tl.arange(0, BS)[None, :]).to(tl.int64)
        m = c_ok & (s < s_end)
        v = _acc(tl.load(x_row + s * xss, mask=m, other=0.0), F64)
        if GATE:
            v = v * _acc(tl.load(x_row + half + s * xss, mask=m, other=0.0), F64)
        if STORE:
            tl.store(o_row + s * oss, v.to(out.dtype.element_ty), mask=m)
        if POOL:
            if DOT:
                acc += v * _acc(tl.load(d_row + s * dss, mask=m, other=0.0), F64)
            else:
                acc += v
    if POOL:
        tl.store(partial + (tl.program_id(1) * B + b64) * C + cs, tl.sum(acc, axis=1)[:, None], mask=c_ok)


@triton.jit(do_not_specialize=["C"])
def _simple_gate_bwd_kernel(src, ssb, ssc, sss,
                            x, xsb, xsc, xss, half,
                            out, osb, osc, oss, ohalf,
                            scale, shift, C, S,
                            HAS_SRC: tl.constexpr, SCALE: tl.constexpr, SHIFT: tl.constexpr, GATE: tl.constexpr,
                            BC: tl.constexpr, BS: tl.constexpr, F64: tl.constexpr):
    n_cb = tl.cdiv(C, BC)
    b = tl.program_id(0) // n_cb
    cs = (tl.program_id(0) % n_cb) * BC + tl.arange(0, BC)[:, None]
    tile = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)  # tiles past S are masked off
    s = tile.to(tl.int64) * BS + tl.arange(0, BS)[None, :]
    c_ok = cs < C
    m = c_ok & (s < S)
    b64 = b.to(tl.int64)
    cs64 = cs.to(tl.int64)  # offsets in 64 bits: a tensor may hold more than 2³¹ elements
    if HAS_SRC:
        v = _acc(tl.load(src + b64 * ssb + cs64 * ssc + s * sss, mask=m, other=0.0), F64)
        if SCALE:
            v = v * _acc(tl.load(scale + b64 * C + cs, mask=c_ok, other=0.0), F64)
        if SHIFT:
            v = v + _acc(tl.load(shift + b64 * C + cs, mask=c_ok, other=0.0), F64)
    else:
        v = tl.broadcast_to(_acc(tl.load(shift + b64 * C + cs, mask=c_ok, other=0.0), F64), (BC, BS))
    o = out + b64 * osb + cs64 * osc + s * oss
    if GATE:
        xp = x + b64 * xsb + cs64 * xsc + s * xss
        x1 = _acc(tl.load(xp, mask=m, other=0.0), F64)
        x2 = _acc(tl.load(xp + half, mask=m, other=0.0), F64)
        tl.store(o, (v * x2).to(out.dtype.element_ty), mask=m)
        tl.store(o + ohalf, (v * x1).to(out.dtype.element_ty), mask=m)
    else:
        tl.store(o, v.to(out.dtype.element_ty), mask=m)


# The strides, halves and spatial sizes stay specialised as Triton's JIT would (a unit spatial stride makes the
# loads contiguous); batch and channel counts do not change the code.
_FWD = Kernel(_simple_gate_fwd_kernel, specialized=("xsb", "xsc", "xss", "half", "osb", "osc", "oss", "dsb", "dsc",
                                                     "dss", "S", "chunk"))
_BWD = Kernel(_simple_gate_bwd_kernel, specialized=("ssb", "ssc", "sss", "xsb", "xsc", "xss", "half", "osb", "osc",
                                                     "oss", "ohalf", "S"))


def _tile(C: int, S: int, nhwc: bool) -> tuple[int, int]:
    """(BC, BS): a tile of _TILE elements, long along the dimension that is contiguous in memory (the channels
    when `nhwc`)."""
    if nhwc:  # channels are adjacent
        bc = max(2, min(next_power_of_2(C), 128))
        return bc, max(2, min(next_power_of_2(S), _TILE // bc))
    bs = max(2, min(next_power_of_2(S), _TILE // 2))
    return max(2, min(next_power_of_2(C), _TILE // bs)), bs


def _f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def simple_gate_fwd(x: torch.Tensor, out: torch.Tensor | None, *, gate: bool = True, pool: bool = False,
                    dy: torch.Tensor | None = None) -> torch.Tensor | None:
    """The reading pass over x [B, C·(2 if gate else 1), S...] (any strides `bcs_strides` accepts):
    v = x1·x2 (gate) or x; stores v into `out` [B, C, S...] when given; with `pool` returns Σ_s v (or
    Σ_s v·dy when dy is given) as [B, C] in fp32 (fp64 for fp64)."""
    B, C = x.shape[0], x.shape[1] // (2 if gate else 1)
    S = math.prod(x.shape[2:])
    acc = torch.float64 if _f64(x) else torch.float32
    if B * C * S == 0:
        return torch.zeros((B, C), dtype=acc, device=x.device) if pool else None
    xs = bcs_strides(x)
    os_ = bcs_strides(out) if out is not None else (0, 0, 0)
    ds = bcs_strides(dy) if dy is not None else (0, 0, 0)
    assert xs is not None and os_ is not None and ds is not None, "simple_gate_fwd: a tensor does not view as [B, C, S]"
    bc, bs = _tile(C, S, channels_last(xs))
    programs = B * cdiv(C, bc)
    if pool:
        splits = max(1, min(cdiv(S, bs), target_programs(x.device) // programs))
        chunk = cdiv(cdiv(S, splits), bs) * bs
        splits = cdiv(S, chunk)
        partial = torch.empty((splits, B, C), dtype=acc, device=x.device)
    else:  # one tile per program, or several where the spatial programs would pass the grid's y limit
        chunk = cdiv(cdiv(S, MAX_GRID_YZ), bs) * bs
        splits, partial = cdiv(S, chunk), x
    o, d = out if out is not None else x, dy if dy is not None else x
    flags = (gate, out is not None, pool, dy is not None, bc, bs)
    _FWD((programs, splits), [x, *xs, C * xs[1], o, *os_, d, *ds, partial, B, C, S, chunk],
         (flags, x.dtype, o.dtype, d.dtype, partial.dtype),
         dict(GATE=gate, STORE=out is not None, POOL=pool, DOT=dy is not None, BC=bc, BS=bs, F64=_f64(x)),
         num_warps=_NUM_WARPS)
    if not pool:
        return None
    return partial[0] if splits == 1 else partial.sum(0)


def simple_gate_bwd(src: torch.Tensor | None, out: torch.Tensor, *, x: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> None:
    """The writing pass: v = src·scale[b, c] + shift[b, c] (scale, shift: contiguous [B, C]; src None reads
    as zeros); with `x` [B, 2C, S...] stores the SimpleGate backward (v·x2, v·x1) into out [B, 2C, S...],
    else v into out [B, C, S...]."""
    gate = x is not None
    B, C = out.shape[0], out.shape[1] // (2 if gate else 1)
    S = math.prod(out.shape[2:])
    if B * C * S == 0:
        return
    os_ = bcs_strides(out)
    ss = bcs_strides(src) if src is not None else (0, 0, 0)
    xs = bcs_strides(x) if gate else (0, 0, 0)
    assert os_ is not None and ss is not None and xs is not None, "simple_gate_bwd: a tensor does not view as [B, C, S]"
    assert src is not None or shift is not None
    bc, bs = _tile(C, S, channels_last(os_))
    like = src if src is not None else out
    scale = scale.contiguous() if scale is not None else None  # [B, C] rows, as the kernel indexes them
    shift = shift.contiguous() if shift is not None else None
    xx, sc, sh = x if gate else like, scale if scale is not None else like, shift if shift is not None else like
    flags = (src is not None, scale is not None, shift is not None, gate, bc, bs)
    blocks = cdiv(S, bs)  # spatial tiles, folded over grid axes 1 and 2 (each at most MAX_GRID_YZ)
    _BWD((B * cdiv(C, bc), min(blocks, MAX_GRID_YZ), cdiv(blocks, MAX_GRID_YZ)),
         [like, *ss, xx, *xs, C * xs[1], out, *os_, C * os_[1], sc, sh, C, S],
         (flags, like.dtype, xx.dtype, out.dtype, sc.dtype, sh.dtype),
         dict(HAS_SRC=src is not None, SCALE=scale is not None, SHIFT=shift is not None, GATE=gate, BC=bc, BS=bs,
              F64=_f64(out)), num_warps=_NUM_WARPS)
