"""Triton backend of the Haar wavelet family (`pydpm.ops.wavelet`): two kernels cover every op.

One level of the orthonormal 2-D Haar transform maps each 2×2 block [a b; c d] of a plane to four bands
at one half-resolution pixel (pywt.dwt2(·, 'haar') order and signs):

    ll = (a + b + c + d)/2   h = (a + b − c − d)/2   v = (a − b + c − d)/2   d = (a − b − c + d)/2

The matrix is symmetric and orthogonal, so the inverse (synthesis) is the same formula read backwards.

`_haar_analysis_kernel`  space → bands: writes the 4 bands (each optionally times a per-(b, band, c) gate),
    or their gated sum, and optionally reduces Σ band_i · ref_i over the tile (a gate gradient).
`_haar_synthesis_kernel` bands → space: optionally gates the 4 input bands first, and optionally reduces
    Σ band_i(xs) · in_i for another space tensor xs (the gate gradient of the gated analysis).

    op                      kernel      mode
    haar_dwt2               analysis    4 bands
    wavelet_gate_down       analysis    gated sum
    ∂wavelet_gate_up        analysis    4 gated bands + dot with the up-gate input (dx, dgates)
    haar_idwt2              synthesis   plain
    wavelet_gate_up         synthesis   gated
    ∂wavelet_gate_down      synthesis   gated, all four inputs = dy, dot with analysis(x) (dx, dgates)

Each program handles one (b, c) plane tile of BH half-resolution rows × BW half-resolution columns,
reading full-resolution rows contiguously (2·BW elements) and splitting even/odd columns in registers.
Planes must be contiguous (row stride = width); batch and channel strides are free. Partial dot products
go to a [tiles, B·C, 4] buffer that the launcher sums: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

WRITE_BANDS = tl.constexpr(0)
WRITE_SUM = tl.constexpr(1)


@triton.jit
def _gates(gate, g_sb, g_si, g_sc, b, c, GATED: tl.constexpr):
    """The four band gates of plane (b, c) in fp32 (ones when ungated)."""
    if GATED:
        gbase = gate + b * g_sb + c * g_sc
        return (tl.load(gbase).to(tl.float32), tl.load(gbase + g_si).to(tl.float32),
                tl.load(gbase + 2 * g_si).to(tl.float32), tl.load(gbase + 3 * g_si).to(tl.float32))
    return 1.0, 1.0, 1.0, 1.0


@triton.jit
def _haar_analysis_kernel(src, s_sb, s_sc,
                          out0, out1, out2, out3, o0_sb, o0_sc, o1_sb, o1_sc,
                          gate, g_sb, g_si, g_sc,
                          ref0, ref1, ref2, ref3, r0_sb, r0_sc, r1_sb, r1_sc,
                          dot, B, C, h, w, n_tw, n_tiles,
                          MODE: tl.constexpr, GATED: tl.constexpr, DOT: tl.constexpr,
                          BH: tl.constexpr, BW: tl.constexpr):
    plane, split, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, c = plane // C, plane % C
    g0, g1, g2, g3 = _gates(gate, g_sb, g_si, g_sc, b, c, GATED)
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    for tile in range(split, n_tiles, n_splits):
        s0, s1, s2, s3 = _analysis_tile(
            src, s_sb, s_sc, out0, out1, out2, out3, o0_sb, o0_sc, o1_sb, o1_sc, g0, g1, g2, g3,
            ref0, ref1, ref2, ref3, r0_sb, r0_sc, r1_sb, r1_sc, s0, s1, s2, s3, b, c, tile, h, w, n_tw,
            MODE, DOT, BH, BW)
    if DOT:
        _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3)


@triton.jit
def _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3):
    """Partial gate gradients of one (split, b, c) into dot [splits, B, 4, C]."""
    slot = dot + ((split.to(tl.int64) * B + b) * 4) * C + c
    tl.store(slot, s0)
    tl.store(slot + C, s1)
    tl.store(slot + 2 * C, s2)
    tl.store(slot + 3 * C, s3)


@triton.jit
def _analysis_tile(src, s_sb, s_sc, out0, out1, out2, out3, o0_sb, o0_sc, o1_sb, o1_sc, g0, g1, g2, g3,
                   ref0, ref1, ref2, ref3, r0_sb, r0_sc, r1_sb, r1_sc, s0, s1, s2, s3, b, c, tile, h, w, n_tw,
                   MODE: tl.constexpr, DOT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    rows = (tile // n_tw) * BH + tl.arange(0, BH)[:, None]
    cols = (tile % n_tw) * BW + tl.arange(0, BW)[None, :]
    full = (tile % n_tw) * 2 * BW + tl.arange(0, 2 * BW)[None, :]
    m_full = (rows < h) & (full < 2 * w)
    base = src + b.to(tl.int64) * s_sb + c.to(tl.int64) * s_sc
    top = tl.load(base + (2 * rows) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
    bot = tl.load(base + (2 * rows + 1) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
    a, bb = tl.split(tl.reshape(top, (BH, BW, 2)))
    cc, d = tl.split(tl.reshape(bot, (BH, BW, 2)))
    ll = (a + bb + cc + d) * 0.5
    hh = (a + bb - cc - d) * 0.5
    vv = (a - bb + cc - d) * 0.5
    dd = (a - bb - cc + d) * 0.5
    m = (rows < h) & (cols < w)
    off = rows * w + cols
    o0 = out0 + b.to(tl.int64) * o0_sb + c.to(tl.int64) * o0_sc + off
    o1 = b.to(tl.int64) * o1_sb + c.to(tl.int64) * o1_sc + off
    if MODE == WRITE_BANDS:
        ty = out0.dtype.element_ty
        tl.store(o0, (g0 * ll).to(ty), mask=m)
        tl.store(out1 + o1, (g1 * hh).to(ty), mask=m)
        tl.store(out2 + o1, (g2 * vv).to(ty), mask=m)
        tl.store(out3 + o1, (g3 * dd).to(ty), mask=m)
    elif MODE == WRITE_SUM:
        tl.store(o0, (g0 * ll + g1 * hh + g2 * vv + g3 * dd).to(out0.dtype.element_ty), mask=m)
    if DOT:
        r0 = ref0 + b.to(tl.int64) * r0_sb + c.to(tl.int64) * r0_sc + off
        r1 = b.to(tl.int64) * r1_sb + c.to(tl.int64) * r1_sc + off
        s0 += tl.sum(tl.sum(ll * tl.load(r0, mask=m, other=0.0).to(tl.float32), 1), 0)
        s1 += tl.sum(tl.sum(hh * tl.load(ref1 + r1, mask=m, other=0.0).to(tl.float32), 1), 0)
        s2 += tl.sum(tl.sum(vv * tl.load(ref2 + r1, mask=m, other=0.0).to(tl.float32), 1), 0)
        s3 += tl.sum(tl.sum(dd * tl.load(ref3 + r1, mask=m, other=0.0).to(tl.float32), 1), 0)
    return s0, s1, s2, s3


@triton.jit
def _haar_synthesis_kernel(in0, in1, in2, in3, i0_sb, i0_sc, i1_sb, i1_sc,
                           gate, g_sb, g_si, g_sc,
                           dst, d_sb, d_sc,
                           xs, x_sb, x_sc,
                           dot, B, C, h, w, n_tw, n_tiles,
                           GATED: tl.constexpr, DOT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    plane, split, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, c = plane // C, plane % C
    g0, g1, g2, g3 = _gates(gate, g_sb, g_si, g_sc, b, c, GATED)
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    for tile in range(split, n_tiles, n_splits):
        s0, s1, s2, s3 = _synthesis_tile(in0, in1, in2, in3, i0_sb, i0_sc, i1_sb, i1_sc, g0, g1, g2, g3,
                                         dst, d_sb, d_sc, xs, x_sb, x_sc, s0, s1, s2, s3, b, c, tile, h, w, n_tw,
                                         DOT, BH, BW)
    if DOT:
        _store_dot(dot, split, B, C, b, c, s0, s1, s2, s3)


@triton.jit
def _synthesis_tile(in0, in1, in2, in3, i0_sb, i0_sc, i1_sb, i1_sc, g0, g1, g2, g3, dst, d_sb, d_sc,
                    xs, x_sb, x_sc, s0, s1, s2, s3, b, c, tile, h, w, n_tw,
                    DOT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    rows = (tile // n_tw) * BH + tl.arange(0, BH)[:, None]
    cols = (tile % n_tw) * BW + tl.arange(0, BW)[None, :]
    full = (tile % n_tw) * 2 * BW + tl.arange(0, 2 * BW)[None, :]
    m = (rows < h) & (cols < w)
    m_full = (rows < h) & (full < 2 * w)
    off = rows * w + cols
    p0 = b.to(tl.int64) * i0_sb + c.to(tl.int64) * i0_sc + off
    p1 = b.to(tl.int64) * i1_sb + c.to(tl.int64) * i1_sc + off
    ll = tl.load(in0 + p0, mask=m, other=0.0).to(tl.float32)
    hh = tl.load(in1 + p1, mask=m, other=0.0).to(tl.float32)
    vv = tl.load(in2 + p1, mask=m, other=0.0).to(tl.float32)
    dd = tl.load(in3 + p1, mask=m, other=0.0).to(tl.float32)
    gl, gh, gv, gd = ll * g0, hh * g1, vv * g2, dd * g3
    a = (gl + gh + gv + gd) * 0.5
    bb = (gl + gh - gv - gd) * 0.5
    cc = (gl - gh + gv - gd) * 0.5
    d = (gl - gh - gv + gd) * 0.5
    ty = dst.dtype.element_ty
    base = dst + b.to(tl.int64) * d_sb + c.to(tl.int64) * d_sc
    tl.store(base + (2 * rows) * (2 * w) + full, tl.reshape(tl.join(a, bb), (BH, 2 * BW)).to(ty), mask=m_full)
    tl.store(base + (2 * rows + 1) * (2 * w) + full, tl.reshape(tl.join(cc, d), (BH, 2 * BW)).to(ty), mask=m_full)
    if DOT:
        xb = xs + b.to(tl.int64) * x_sb + c.to(tl.int64) * x_sc
        top = tl.load(xb + (2 * rows) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
        bot = tl.load(xb + (2 * rows + 1) * (2 * w) + full, mask=m_full, other=0.0).to(tl.float32)
        xa, xbb = tl.split(tl.reshape(top, (BH, BW, 2)))
        xc, xd = tl.split(tl.reshape(bot, (BH, BW, 2)))
        s0 += tl.sum(tl.sum((xa + xbb + xc + xd) * 0.5 * ll, 1), 0)
        s1 += tl.sum(tl.sum((xa + xbb - xc - xd) * 0.5 * hh, 1), 0)
        s2 += tl.sum(tl.sum((xa - xbb + xc - xd) * 0.5 * vv, 1), 0)
        s3 += tl.sum(tl.sum((xa - xbb - xc + xd) * 0.5 * dd, 1), 0)
    return s0, s1, s2, s3


def _tiles(h: int, w: int) -> tuple[int, int, int, int]:
    """(BH, BW, tiles along w, tiles in total): ~1024 half-resolution pixels per tile."""
    bw = min(64, triton.next_power_of_2(w))
    bh = min(max(1024 // bw, 1), triton.next_power_of_2(h))
    n_tw = triton.cdiv(w, bw)
    return bh, bw, n_tw, triton.cdiv(h, bh) * n_tw


# A gate-gradient launch walks several tiles per program so that each (b, c) sums in registers; it
# keeps this many programs in flight (the H200 has 132 SMs) and splits planes only when there are few.
_DOT_PROGRAMS = 1024


def _splits(planes: int, n_tiles: int, dot: bool) -> int:
    return min(n_tiles, max(1, _DOT_PROGRAMS // planes)) if dot else n_tiles


def _bc(t):
    """Batch and channel strides of a [B, C, ·, ·] view."""
    return t.stride(0), t.stride(1)


def _dot_buffer(splits: int, B: int, C: int, dot_out):
    """Where the kernel writes [splits, B, 4, C] partial sums: dot_out itself when there is one split."""
    return dot_out if splits == 1 else torch.empty((splits, B, 4, C), dtype=torch.float32, device=dot_out.device)


def haar_analysis(src, outs, *, gates=None, write_sum=False, refs=None, dot_out=None):
    """Launch the analysis kernel. src [B, C, 2h, 2w]; outs: 4 band views [B, C, h, w] (the last three
    sharing strides), or one [B, C, h, w] with write_sum, or None; gates [B, 4, C]; refs: 4 band views
    to dot with, the sums going to dot_out [B, 4, C] (float32, contiguous)."""
    B, C, H2, W2 = src.shape
    h, w = H2 // 2, W2 // 2
    bh, bw, n_tw, n_tiles = _tiles(h, w)
    splits = _splits(B * C, n_tiles, refs is not None)
    outs = list(outs) if outs is not None else [src] * 4
    outs += [outs[0]] * (4 - len(outs))
    refs_ = list(refs) if refs is not None else [src] * 4
    dot = _dot_buffer(splits, B, C, dot_out) if refs is not None else src
    g = gates if gates is not None else src
    gs = gates.stride() if gates is not None else (0, 0, 0)
    mode = WRITE_SUM if write_sum else (WRITE_BANDS if outs[0] is not src else 2)
    _haar_analysis_kernel[(B * C, splits)](
        src, *_bc(src), *outs, *_bc(outs[0]), *_bc(outs[1]), g, gs[0], gs[1], gs[2],
        *refs_, *_bc(refs_[0]), *_bc(refs_[1]), dot, B, C, h, w, n_tw, n_tiles,
        MODE=mode, GATED=gates is not None, DOT=refs is not None, BH=bh, BW=bw, num_warps=4)
    if refs is not None and splits > 1:
        torch.sum(dot, 0, out=dot_out)


def haar_synthesis(ins, dst, *, gates=None, xs=None, dot_out=None):
    """Launch the synthesis kernel. ins: 4 band views [B, C, h, w] (the last three sharing strides);
    dst [B, C, 2h, 2w]; gates [B, 4, C]; xs: a space tensor like dst whose bands are dotted with `ins`,
    the sums going to dot_out [B, 4, C] (float32, contiguous)."""
    B, C, h, w = ins[0].shape
    bh, bw, n_tw, n_tiles = _tiles(h, w)
    splits = _splits(B * C, n_tiles, xs is not None)
    dot = _dot_buffer(splits, B, C, dot_out) if xs is not None else dst
    g = gates if gates is not None else dst
    gs = gates.stride() if gates is not None else (0, 0, 0)
    x = xs if xs is not None else dst
    _haar_synthesis_kernel[(B * C, splits)](
        *ins, *_bc(ins[0]), *_bc(ins[1]), g, gs[0], gs[1], gs[2], dst, *_bc(dst), x, *_bc(x),
        dot, B, C, h, w, n_tw, n_tiles, GATED=gates is not None, DOT=xs is not None, BH=bh, BW=bw, num_warps=4)
    if xs is not None and splits > 1:
        torch.sum(dot, 0, out=dot_out)
