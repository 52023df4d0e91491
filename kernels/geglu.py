"""Triton backend of GEGLU (`pydpm.ops.geglu`): y = a · gelu(b) with (a, b) the two halves of h's last dim.

Every tensor is seen as rows [R, N] (R = the leading dims flattened, which must share one row stride; any
column stride): h [R, 2D], y [R, D], the gradient dy [R, D] and dh [R, 2D]. The launchers take any tensor
`row_strides` accepts; the op copies the others once.

`_geglu_fwd_kernel`  y = a · b · Φ(b)                                 reads 2D, writes D per row
`_geglu_bwd_kernel`  dh = [dy · b · Φ(b), dy · a · (Φ(b) + b · Φ'(b))]  reads 3D, writes 2D per row

with gelu(x) = x · Φ(x): Φ the normal CDF 0.5·(1 + erf(x/√2)) ("none") or its tanh approximation
sigmoid(2u), u = √(2/π)·(x + 0.044715·x³) ("tanh"), written through exp(−2|u|) ∈ (0, 1] so that neither the
value nor the derivative overflows. Arithmetic is fp32 (fp64 for fp64 tensors), cast once at the store; offsets
are 64-bit. Each program owns a tile of BR rows × BD columns; the tiles are numbered along axis 0 of the grid
(up to 2³¹ − 1 programs). Naming chain: `_geglu_fwd_kernel` / `_geglu_bwd_kernel` → the launchers `geglu_fwd`,
`geglu_bwd`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc as _acc
from ._common import cdiv, next_power_of_2
from ._launch import Kernel

_NUM_WARPS = 4
_TILE = 2048            # elements per program and tensor half (16 per thread at 4 warps)
_MAX_BD = 256           # columns per tile; SD's feed-forward widths (1280, 2560, 5120) are multiples


@triton.jit
def _gelu_cdf(x, TANH: tl.constexpr):
    """(Φ(x), Φ'(x)) in x's dtype, so that gelu(x) = x·Φ(x) and gelu'(x) = Φ(x) + x·Φ'(x). The constants are
    made in x's dtype (a float literal would be rounded to fp32 first)."""
    if TANH:
        k = tl.full([], 0.7978845608028654, x.dtype)        # √(2/π)
        c = tl.full([], 0.044715, x.dtype)
        u = k * (x + c * x * x * x)
        t = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + t)
        cdf = tl.where(u >= 0, r, t * r)                     # sigmoid(2u)
        dcdf = 2.0 * t * r * r * k * (1.0 + 3.0 * c * x * x)  # 2·sigmoid(2u)·sigmoid(−2u)·u'
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * tl.full([], 0.7071067811865476, x.dtype)))  # x/√2
        dcdf = tl.exp(-0.5 * x * x) * tl.full([], 0.3989422804014327, x.dtype)  # 1/√(2π)
    return cdf, dcdf


@triton.jit
def _tile(R, D, BR: tl.constexpr, BD: tl.constexpr):
    """This program's rows [BR, 1] (int64), columns [1, BD] (int64) and mask."""
    n_cols = tl.cdiv(D, BD)
    pid = tl.program_id(0)
    rows = (pid // n_cols).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    cols = (pid % n_cols) * BD + tl.arange(0, BD)[None, :]
    return rows, cols.to(tl.int64), (rows < R) & (cols < D)


@triton.jit(do_not_specialize=["R"])
def _geglu_fwd_kernel(h, hr, hc, half,
                      out, o_r, oc,
                      R, D,
                      TANH: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, F64: tl.constexpr):
    rows, cols, m = _tile(R, D, BR, BD)
    hp = h + rows * hr + cols * hc
    a = _acc(tl.load(hp, mask=m, other=0.0), F64)
    b = _acc(tl.load(hp + half, mask=m, other=0.0), F64)
    cdf, _ = _gelu_cdf(b, TANH)
    tl.store(out + rows * o_r + cols * oc, (a * b * cdf).to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["R"])
def _geglu_bwd_kernel(dy, gr, gc,
                      h, hr, hc, half,
                      dh, dr, dc, dhalf,
                      R, D,
                      TANH: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, F64: tl.constexpr):
    rows, cols, m = _tile(R, D, BR, BD)
    hp = h + rows * hr + cols * hc
    a = _acc(tl.load(hp, mask=m, other=0.0), F64)
    b = _acc(tl.load(hp + half, mask=m, other=0.0), F64)
    g = _acc(tl.load(dy + rows * gr + cols * gc, mask=m, other=0.0), F64)
    cdf, dcdf = _gelu_cdf(b, TANH)
    dp = dh + rows * dr + cols * dc
    tl.store(dp, (g * b * cdf).to(dh.dtype.element_ty), mask=m)
    tl.store(dp + dhalf, (g * a * (cdf + b * dcdf)).to(dh.dtype.element_ty), mask=m)


# Strides, half offsets and D stay specialised as Triton's JIT would (a unit column stride makes the accesses
# contiguous, divisibility by 16 vectorises them); the row count does not change the code.
_FWD = Kernel(_geglu_fwd_kernel, specialized=("hr", "hc", "half", "o_r", "oc", "D"))
_BWD = Kernel(_geglu_bwd_kernel, specialized=("gr", "gc", "hr", "hc", "half", "dr", "dc", "dhalf", "D"))


def row_strides(t: torch.Tensor) -> tuple[int, int] | None:
    """(row stride, column stride) of t viewed as [R, N], R the leading dims flattened, or None when the
    leading dims do not flatten to one stride (e.g. two of them transposed). A 0-dim t has no rows: None."""
    if t.dim() == 0:
        return None
    if t.is_contiguous():  # the usual case, decided by one call
        return t.shape[-1], 1
    lead = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    for (_, st_out), (n_in, st_in) in zip(lead, lead[1:]):
        if st_out != st_in * n_in:
            return None
    return (lead[-1][1] if lead else 0), t.stride(-1)


def _tile_shape(D: int) -> tuple[int, int]:
    """(BR, BD): _TILE elements of each half, at most _MAX_BD columns wide."""
    bd = max(2, min(next_power_of_2(D), _MAX_BD))
    return _TILE // bd, bd


def _grid(R: int, D: int, br: int, bd: int) -> tuple[int]:
    return (cdiv(R, br) * cdiv(D, bd),)


def geglu_fwd(h: torch.Tensor, out: torch.Tensor, *, tanh: bool) -> None:
    """out [..., D] = a · gelu(b), (a, b) the halves of h [..., 2D]'s last dim (tanh: the tanh approximation).
    Both tensors must have `row_strides`."""
    D = h.shape[-1] // 2
    R = math.prod(h.shape[:-1])
    if R * D == 0:
        return
    hs, os_ = row_strides(h), row_strides(out)
    assert hs is not None and os_ is not None, "geglu_fwd: a tensor does not view as rows [R, N]"
    br, bd = _tile_shape(D)
    _FWD(_grid(R, D, br, bd), [h, *hs, D * hs[1], out, *os_, R, D], (tanh, br, bd, h.dtype, out.dtype),
         dict(TANH=tanh, BR=br, BD=bd, F64=h.dtype == torch.float64), num_warps=_NUM_WARPS)


def geglu_bwd(dy: torch.Tensor, h: torch.Tensor, dh: torch.Tensor, *, tanh: bool) -> None:
    """dh [..., 2D] = [dy · gelu(b), dy · a · gelu'(b)] given dy [..., D] and h [..., 2D] (one pass; every tensor
    must have `row_strides`)."""
    D = h.shape[-1] // 2
    R = math.prod(h.shape[:-1])
    if R * D == 0:
        return
    gs, hs, ds = row_strides(dy), row_strides(h), row_strides(dh)
    assert gs is not None and hs is not None and ds is not None, "geglu_bwd: a tensor does not view as rows [R, N]"
    br, bd = _tile_shape(D)
    _BWD(_grid(R, D, br, bd), [dy, *gs, h, *hs, D * hs[1], dh, *ds, D * ds[1], R, D],
         (tanh, br, bd, dy.dtype, h.dtype, dh.dtype),
         dict(TANH=tanh, BR=br, BD=bd, F64=h.dtype == torch.float64), num_warps=_NUM_WARPS)
