"""Triton backend of the Haar wavelet family (`pydpm.ops.wavelet`): two kernels cover every op.

One level of the orthonormal 2-D Haar transform maps each 2×2 block [a b; c d] of a plane to four bands
at one half-resolution pixel (pywt.dwt2(·, 'haar') order and signs):

    ll = (a + b + c + d)/2   h = (a + b − c − d)/2   v = (a − b + c − d)/2   d = (a − b − c + d)/2

The matrix is symmetric and orthogonal, so the inverse (synthesis) is the same formula read backwards.

`_haar_analysis_kernel`  space → bands: writes the 4 bands (each optionally times a per-(b, band, c) gate),
    or their gated sum, and optionally reduces Σ band_i · ref_i over the plane (a gate gradient).
`_haar_synthesis_kernel` bands → space: optionally gates the 4 input bands first, and optionally reduces
    Σ band_i(xs) · in_i for another space tensor xs (the gate gradient of the gated analysis).

    op                      kernel      mode
    haar_dwt2               analysis    4 bands
    wavelet_gate_down       analysis    gated sum
    ∂wavelet_gate_up        analysis    4 gated bands + dot with the up-gate input (dx, dgates)
    haar_idwt2              synthesis   plain
    wavelet_gate_up         synthesis   gated
    ∂wavelet_gate_down      synthesis   gated, all four inputs = dy, dot with analysis(x) (dx, dgates)

A group of four bands is a `Bands` (first tensor, then the other three at `first + k·step` elements from a
second base): the bands of [B, C, 3, h, w] (`high`), the four channel chunks of [B, 4C, h, w], or one tensor
read four times, all without views. Each program handles one (b, c) plane tile of BH half-resolution rows ×
BW half-resolution columns, reading full-resolution rows contiguously (2·BW elements) and splitting even/odd
columns in registers. Planes must be contiguous (row stride = width); batch and channel strides are free.
Every size and stride is a run-time argument; ALIGN (the largest power of two ≤ 16 dividing all of them) is
a constexpr, written into them (`s // ALIGN * ALIGN`) so that the compiler vectorises the loads and stores.
Gate gradients: each program walks several tiles of its plane and sums in registers; with more programs than
planes the partial sums go to a [splits, B, 4, C] buffer that one torch.sum reduces. Deterministic, no atomics.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import MAX_GRID_YZ, cdiv, next_power_of_2
from ._launch import Kernel

WRITE_BANDS = tl.constexpr(0)
WRITE_SUM = tl.constexpr(1)


class Bands(NamedTuple):
    """Four band planes: band 0 is `t0` (batch and channel strides sb0, sc0); band k = 1, 2, 3 is read at
    `rest + first + (k − 1)·step` elements with strides sb, sc."""

    t0: torch.Tensor
    sb0: int
    sc0: int
    rest: torch.Tensor
    sb: int
    sc: int
    first: int
    step: int


def bands_of(ll: torch.Tensor, high: torch.Tensor) -> Bands:
    """ll [B, C, h, w] and high [B, C, 3, h, w] (both with contiguous planes)."""
    return Bands(ll, ll.stride(0), ll.stride(1), high, high.stride(0), high.stride(1), 0, high.stride(2))


def chunks_of(t: torch.Tensor) -> Bands:
    """The four channel chunks of t [B, 4C, h, w]: band k is channels [k·C, (k + 1)·C)."""
    sb, sc = t.stride(0), t.stride(1)
    chunk = t.shape[1] // 4 * sc
    return Bands(t, sb, sc, t, sb, sc, chunk, chunk)


def repeated(t: torch.Tensor) -> Bands:
    """One tensor [B, C, h, w] as all four bands."""
    sb, sc = t.stride(0), t.stride(1)
    return Bands(t, sb, sc, t, sb, sc, 0, 0)


def _align(*values: int) -> int:
    """The largest power of two ≤ 16 dividing every value (the lowest set bit of their OR)."""
    v = 16
    for value in values:
        v |= value
    return v & -v


@triton.jit
def _gates(gate, g_sb, g_si, g_sc, b, c, GATED: tl.constexpr):
    """The four band gates of plane (b, c) in fp32 (ones when ungated)."""
    if GATED:
        gbase = gate + b * g_sb + c * g_sc
        return (tl.load(gbase).to(tl.float32), tl.load(gbase + g_si).to(tl.float32),
                tl.load(gbase + 2 * g_si).to(tl.float32), tl.load(gbase + 3 * g_si).to(tl.float32))
    return 1.0, 1.0, 1.0, 1.0


@triton.jit
def _band_bases(t0, sb0, sc0, rest, sb, sc, first, step, b, c):
    """Pointers to plane (b, c) of the four bands of a Bands group."""
    b64, c64 = b.to(tl.int64), c.to(tl.int64)
    p1 = rest + b64 * sb + c64 * sc + first
    return t0 + b64 * sb0 + c64 * sc0, p1, p1 + step, p1 + 2 * step


@triton.jit
def _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3):
    """Partial gate gradients of one (split, b, c) into dot [splits, B, 4, C]."""
    slot = dot + ((split.to(tl.int64) * B + b) * 4) * C + c
    tl.store(slot, s0)
    tl.store(slot + C, s1)
    tl.store(slot + 2 * C, s2)
    tl.store(slot + 3 * C, s3)


@triton.jit(do_not_specialize=["s_sb", "s_sc", "o_sb0", "o_sc0", "o_sb", "o_sc", "o_first", "o_step", "g_sb", "g_si",
                               "g_sc", "r_sb0", "r_sc0", "r_sb", "r_sc", "r_first", "r_step", "B", "C", "h", "w",
                               "n_tw", "n_tiles"])
def _haar_analysis_kernel(src, out0, out, gate, ref0, ref, dot,
                          s_sb, s_sc, o_sb0, o_sc0, o_sb, o_sc, o_first, o_step, g_sb, g_si, g_sc,
                          r_sb0, r_sc0, r_sb, r_sc, r_first, r_step, B, C, h, w, n_tw, n_tiles,
                          MODE: tl.constexpr, GATED: tl.constexpr, DOT: tl.constexpr, ALIGN: tl.constexpr,
                          BH: tl.constexpr, BW: tl.constexpr):
    plane, split, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, c = plane // C, plane % C
    w = w // ALIGN * ALIGN
    g0, g1, g2, g3 = _gates(gate, g_sb, g_si, g_sc, b, c, GATED)
    src_base = src + b.to(tl.int64) * (s_sb // ALIGN * ALIGN) + c.to(tl.int64) * (s_sc // ALIGN * ALIGN)
    o0, o1, o2, o3 = _band_bases(out0, o_sb0 // ALIGN * ALIGN, o_sc0 // ALIGN * ALIGN, out, o_sb // ALIGN * ALIGN,
                                 o_sc // ALIGN * ALIGN, o_first // ALIGN * ALIGN, o_step // ALIGN * ALIGN, b, c)
    r0, r1, r2, r3 = _band_bases(ref0, r_sb0 // ALIGN * ALIGN, r_sc0 // ALIGN * ALIGN, ref, r_sb // ALIGN * ALIGN,
                                 r_sc // ALIGN * ALIGN, r_first // ALIGN * ALIGN, r_step // ALIGN * ALIGN, b, c)
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    for tile in range(split, n_tiles, n_splits):
        rows = ((tile // n_tw) * BH + tl.arange(0, BH)[:, None]).to(tl.int64)  # a plane may exceed 2³¹ elements
        cols = (tile % n_tw) * BW + tl.arange(0, BW)[None, :]
        full = (tile % n_tw) * 2 * BW + tl.arange(0, 2 * BW)[None, :]
        m_full = (rows < h) & (full < 2 * w)
        top = tl.load(src_base + (2 * rows) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
        bot = tl.load(src_base + (2 * rows + 1) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
        a, bb = tl.split(tl.reshape(top, (BH, BW, 2)))
        cc, d = tl.split(tl.reshape(bot, (BH, BW, 2)))
        ll = (a + bb + cc + d) * 0.5
        hh = (a + bb - cc - d) * 0.5
        vv = (a - bb + cc - d) * 0.5
        dd = (a - bb - cc + d) * 0.5
        m = (rows < h) & (cols < w)
        off = rows * w + cols
        ty = out0.dtype.element_ty
        if MODE == WRITE_BANDS:
            tl.store(o0 + off, (g0 * ll).to(ty), mask=m)
            tl.store(o1 + off, (g1 * hh).to(ty), mask=m)
            tl.store(o2 + off, (g2 * vv).to(ty), mask=m)
            tl.store(o3 + off, (g3 * dd).to(ty), mask=m)
        elif MODE == WRITE_SUM:
            tl.store(o0 + off, (g0 * ll + g1 * hh + g2 * vv + g3 * dd).to(ty), mask=m)
        if DOT:
            s0 += tl.sum(tl.sum(ll * tl.load(r0 + off, mask=m, other=0.0).to(tl.float32), 1), 0)
            s1 += tl.sum(tl.sum(hh * tl.load(r1 + off, mask=m, other=0.0).to(tl.float32), 1), 0)
            s2 += tl.sum(tl.sum(vv * tl.load(r2 + off, mask=m, other=0.0).to(tl.float32), 1), 0)
            s3 += tl.sum(tl.sum(dd * tl.load(r3 + off, mask=m, other=0.0).to(tl.float32), 1), 0)
    if DOT:
        _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3)


@triton.jit(do_not_specialize=["i_sb0", "i_sc0", "i_sb", "i_sc", "i_first", "i_step", "g_sb", "g_si", "g_sc",
                               "d_sb", "d_sc", "x_sb", "x_sc", "B", "C", "h", "w", "n_tw", "n_tiles"])
def _haar_synthesis_kernel(in0, inp, gate, dst, xs, dot,
                           i_sb0, i_sc0, i_sb, i_sc, i_first, i_step, g_sb, g_si, g_sc, d_sb, d_sc, x_sb, x_sc,
                           B, C, h, w, n_tw, n_tiles,
                           GATED: tl.constexpr, DOT: tl.constexpr, ALIGN: tl.constexpr, BH: tl.constexpr,
                           BW: tl.constexpr):
    plane, split, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, c = plane // C, plane % C
    w = w // ALIGN * ALIGN
    g0, g1, g2, g3 = _gates(gate, g_sb, g_si, g_sc, b, c, GATED)
    p0, p1, p2, p3 = _band_bases(in0, i_sb0 // ALIGN * ALIGN, i_sc0 // ALIGN * ALIGN, inp, i_sb // ALIGN * ALIGN,
                                 i_sc // ALIGN * ALIGN, i_first // ALIGN * ALIGN, i_step // ALIGN * ALIGN, b, c)
    dst_base = dst + b.to(tl.int64) * (d_sb // ALIGN * ALIGN) + c.to(tl.int64) * (d_sc // ALIGN * ALIGN)
    xb = xs + b.to(tl.int64) * (x_sb // ALIGN * ALIGN) + c.to(tl.int64) * (x_sc // ALIGN * ALIGN)
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    for tile in range(split, n_tiles, n_splits):
        rows = ((tile // n_tw) * BH + tl.arange(0, BH)[:, None]).to(tl.int64)  # a plane may exceed 2³¹ elements
        cols = (tile % n_tw) * BW + tl.arange(0, BW)[None, :]
        full = (tile % n_tw) * 2 * BW + tl.arange(0, 2 * BW)[None, :]
        m = (rows < h) & (cols < w)
        m_full = (rows < h) & (full < 2 * w)
        off = rows * w + cols
        ll = tl.load(p0 + off, mask=m, other=0.0).to(tl.float32)
        hh = tl.load(p1 + off, mask=m, other=0.0).to(tl.float32)
        vv = tl.load(p2 + off, mask=m, other=0.0).to(tl.float32)
        dd = tl.load(p3 + off, mask=m, other=0.0).to(tl.float32)
        gl, gh, gv, gd = ll * g0, hh * g1, vv * g2, dd * g3
        a = (gl + gh + gv + gd) * 0.5
        bb = (gl + gh - gv - gd) * 0.5
        cc = (gl - gh + gv - gd) * 0.5
        d = (gl - gh - gv + gd) * 0.5
        ty = dst.dtype.element_ty
        tl.store(dst_base + (2 * rows) * (2 * w) + full, tl.reshape(tl.join(a, bb), (BH, 2 * BW)).to(ty),
                 mask=m_full)
        tl.store(dst_base + (2 * rows + 1) * (2 * w) + full, tl.reshape(tl.join(cc, d), (BH, 2 * BW)).to(ty),
                 mask=m_full)
        if DOT:
            top = tl.load(xb + (2 * rows) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
            bot = tl.load(xb + (2 * rows + 1) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
            xa, xbb = tl.split(tl.reshape(top, (BH, BW, 2)))
            xc, xd = tl.split(tl.reshape(bot, (BH, BW, 2)))
            s0 += tl.sum(tl.sum((xa + xbb + xc + xd) * 0.5 * ll, 1), 0)
            s1 += tl.sum(tl.sum((xa + xbb - xc - xd) * 0.5 * hh, 1), 0)
            s2 += tl.sum(tl.sum((xa - xbb + xc - xd) * 0.5 * vv, 1), 0)
            s3 += tl.sum(tl.sum((xa - xbb - xc + xd) * 0.5 * dd, 1), 0)
    if DOT:
        _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3)


_ANALYSIS = Kernel(_haar_analysis_kernel)
_SYNTHESIS = Kernel(_haar_synthesis_kernel)


def _tiles(h: int, w: int) -> tuple[int, int, int, int]:
    """(BH, BW, tiles along w, tiles in total): ~1024 half-resolution pixels per tile."""
    bw = min(64, next_power_of_2(w))
    bh = min(max(1024 // bw, 1), next_power_of_2(h))
    n_tw = cdiv(w, bw)
    return bh, bw, n_tw, cdiv(h, bh) * n_tw


# A gate-gradient launch walks several tiles per program so that each (b, c) sums in registers; it
# keeps this many programs in flight (the H200 has 132 SMs) and splits planes only when there are few.
_DOT_PROGRAMS = 1024


def _splits(planes: int, n_tiles: int, dot: bool) -> int:
    """Programs per plane (grid axis 1); each walks tiles split, split + splits, ... of its plane."""
    return min(n_tiles, max(1, _DOT_PROGRAMS // planes)) if dot else min(n_tiles, MAX_GRID_YZ)


def _dot_buffer(splits: int, B: int, C: int, dot_out):
    """Where the kernel writes [splits, B, 4, C] partial sums: dot_out itself when there is one split."""
    return dot_out if splits == 1 else torch.empty((splits, B, 4, C), dtype=torch.float32, device=dot_out.device)


def haar_analysis(src: torch.Tensor, out: Bands | torch.Tensor, *, gates=None, refs: Bands | None = None,
                  dot_out=None) -> None:
    """Launch the analysis kernel. src [B, C, 2h, 2w]; out: the four band planes (Bands), or one [B, C, h, w]
    tensor receiving their gated sum; gates [B, 4, C]; refs: four band planes to dot with, the sums going to
    dot_out [B, 4, C] (float32, contiguous)."""
    B, C, H2, W2 = src.shape
    h, w = H2 // 2, W2 // 2
    bh, bw, n_tw, n_tiles = _tiles(h, w)
    splits = _splits(B * C, n_tiles, refs is not None)
    mode, o = (WRITE_BANDS.value, out) if isinstance(out, Bands) else (WRITE_SUM.value, repeated(out))
    r = refs if refs is not None else repeated(src)
    dot = _dot_buffer(splits, B, C, dot_out) if refs is not None else src
    g = gates if gates is not None else src
    gs = gates.stride() if gates is not None else (0, 0, 0)
    s_sb, s_sc = src.stride(0), src.stride(1)
    align = _align(s_sb, s_sc, o.sb0, o.sc0, o.sb, o.sc, o.first, o.step, r.sb0, r.sc0, r.sb, r.sc, r.first,
                   r.step, w)
    key = (mode, gates is not None, refs is not None, align, bh, bw, src.dtype, o.t0.dtype, g.dtype, r.t0.dtype)
    _ANALYSIS((B * C, splits), [
        src, o.t0, o.rest, g, r.t0, r.rest, dot, s_sb, s_sc, o.sb0, o.sc0, o.sb, o.sc, o.first, o.step,
        gs[0], gs[1], gs[2], r.sb0, r.sc0, r.sb, r.sc, r.first, r.step, B, C, h, w, n_tw, n_tiles], key,
        dict(MODE=mode, GATED=gates is not None, DOT=refs is not None, ALIGN=align, BH=bh, BW=bw), num_warps=4)
    if refs is not None and splits > 1:
        torch.sum(dot, 0, out=dot_out)


def haar_synthesis(ins: Bands, dst: torch.Tensor, *, gates=None, xs=None, dot_out=None) -> None:
    """Launch the synthesis kernel. ins: four band planes [B, C, h, w]; dst [B, C, 2h, 2w]; gates [B, 4, C];
    xs: a space tensor like dst whose bands are dotted with `ins`, the sums going to dot_out [B, 4, C]
    (float32, contiguous)."""
    B, C, H2, W2 = dst.shape
    h, w = H2 // 2, W2 // 2
    bh, bw, n_tw, n_tiles = _tiles(h, w)
    splits = _splits(B * C, n_tiles, xs is not None)
    dot = _dot_buffer(splits, B, C, dot_out) if xs is not None else dst
    g = gates if gates is not None else dst
    gs = gates.stride() if gates is not None else (0, 0, 0)
    x = xs if xs is not None else dst
    d_sb, d_sc, x_sb, x_sc = dst.stride(0), dst.stride(1), x.stride(0), x.stride(1)
    align = _align(ins.sb0, ins.sc0, ins.sb, ins.sc, ins.first, ins.step, d_sb, d_sc, x_sb, x_sc, w)
    key = (gates is not None, xs is not None, align, bh, bw, ins.t0.dtype, g.dtype, dst.dtype, x.dtype)
    _SYNTHESIS((B * C, splits), [
        ins.t0, ins.rest, g, dst, x, dot, ins.sb0, ins.sc0, ins.sb, ins.sc, ins.first, ins.step, gs[0], gs[1], gs[2],
        d_sb, d_sc, x_sb, x_sc, B, C, h, w, n_tw, n_tiles], key,
        dict(GATED=gates is not None, DOT=xs is not None, ALIGN=align, BH=bh, BW=bw), num_warps=4)
    if xs is not None and splits > 1:
        torch.sum(dot, 0, out=dot_out)
