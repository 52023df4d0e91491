"""Haar wavelet family: the orthonormal 2-D Haar transform and the wavelet gates of Spectral Diffusion
(Yang et al., "Diffusion Probabilistic Model Made Slim", CVPR 2023), forward and backward.

    haar_dwt2(x) -> (ll, high)          x [B, C, H, W] -> ll [B, C, H/2, W/2], high [B, C, 3, H/2, W/2]
    haar_idwt2(ll, high) -> x           its exact inverse
    haar_wavedec2 / haar_waverec2       several levels (pywt.wavedec2 / waverec2 order)
    wavelet_gate_down(x, gates) -> y    WG-Down: y = Σᵢ gates[:, i, :]·bandᵢ(x), [B, C, H/2, W/2]
    wavelet_gate_up(x, gates) -> y      WG-Up: x [B, 4C, H, W] = four band chunks, each gated, then the
                                        inverse transform: y [B, C, 2H, 2W]

Bands are (approximation, horizontal, vertical, diagonal) = pywt.dwt2(x, 'haar')'s (cA, (cH, cV, cD)):
for a 2×2 block [a b; c d], ll = (a+b+c+d)/2, h = (a+b−c−d)/2, v = (a−b+c−d)/2, d = (a−b−c+d)/2. The
transform matrix is symmetric and orthogonal: its adjoint is its inverse, which gives the backward passes
(∂dwt = idwt, ∂idwt = dwt; the gate gradients are spatial reductions fused into the same kernel).

Module layout (the op framework's skeleton, pydpm/ops/_framework.py): references → argument checks →
backends → registration (differentiable ops, public ops) → sample inputs and registry entries.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, Backend, BadInput, Differentiable, Entry, Op, acc_dtype,
                                  check_no_alias, check_tensor, fail, fail_type, register, sample_maker, sample_tensor,
                                  tensor_mutations, triton_reasons)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# --------------------------------------------------------------------------------------------------
# References (the CPU path and the oracle)
# --------------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor, compute_dtype):
    return compute_dtype or acc_dtype(t.dtype)


def haar_bands(x: torch.Tensor) -> torch.Tensor:
    """The four Haar bands of x [..., 2h, 2w], stacked as [..., 4, h, w] (ll, h, v, d)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.stack([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=-3) * 0.5


def haar_merge(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of `haar_bands`: [..., 4, h, w] -> [..., 2h, 2w]."""
    ll, h, v, d = bands.unbind(-3)
    out = bands.new_empty(bands.shape[:-3] + (2 * bands.shape[-2], 2 * bands.shape[-1]))
    out[..., 0::2, 0::2] = (ll + h + v + d) * 0.5
    out[..., 0::2, 1::2] = (ll + h - v - d) * 0.5
    out[..., 1::2, 0::2] = (ll - h + v - d) * 0.5
    out[..., 1::2, 1::2] = (ll - h - v + d) * 0.5
    return out


def haar_dwt2_reference(x, *, compute_dtype=None):
    bands = haar_bands(x.to(_acc(x, compute_dtype))).to(x.dtype)
    return bands[:, :, 0].contiguous(), bands[:, :, 1:].contiguous()


def haar_idwt2_reference(ll, high, *, compute_dtype=None):
    acc = _acc(ll, compute_dtype)
    return haar_merge(torch.cat([ll.unsqueeze(2), high], dim=2).to(acc)).to(ll.dtype)


def wavelet_gate_down_reference(x, gates, *, compute_dtype=None):
    acc = _acc(x, compute_dtype)
    bands = haar_bands(x.to(acc))                                     # [B, C, 4, h, w]
    g = gates.to(acc).transpose(1, 2)[..., None, None]               # [B, C, 4, 1, 1]
    return (bands * g).sum(dim=2).to(x.dtype)


def wavelet_gate_up_reference(x, gates, *, compute_dtype=None):
    acc = _acc(x, compute_dtype)
    B, C4, h, w = x.shape
    chunks = x.to(acc).reshape(B, 4, C4 // 4, h, w)                   # band i = channels [i·C, (i+1)·C)
    g = gates.to(acc)[..., None, None]                               # [B, 4, C, 1, 1]
    return haar_merge((chunks * g).transpose(1, 2)).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------

class WaveletArgs:
    """A checked call: `kind` is the op (dwt, idwt, down, up, or the gate backwards down_bwd, up_bwd);
    inputs, the output(s) the backend writes, and `result`, what the call returns."""

    __slots__ = ("kind", "x", "high", "gates", "dy", "out", "result")

    def __init__(self, kind, x, out, result, high=None, gates=None, dy=None):
        self.kind, self.x, self.out, self.result = kind, x, out, result
        self.high, self.gates, self.dy = high, gates, dy


def _check_even(op: str, name: str, t: torch.Tensor) -> None:
    H, W = t.shape[-2:]
    if H % 2 or W % 2 or H == 0 or W == 0:
        fail(op, f"{name} has spatial size {H}×{W}; the Haar transform needs even, non-zero sizes: pad first, "
                  f"e.g. torch.nn.functional.pad(x, (0, W % 2, 0, H % 2), mode='reflect')")


def _check_gates(op: str, gates, batch: int, channels: int, x: torch.Tensor) -> None:
    check_tensor(op, "gates", gates, 3)
    if gates.shape != (batch, 4, channels):
        fail(op, f"gates has shape {tuple(gates.shape)}; expected [B, 4, C] = {(batch, 4, channels)} "
                  f"(bands ordered ll, h, v, d)")
    if gates.get_device() != x.get_device() or gates.is_cpu is not x.is_cpu:
        fail(op, f"gates is on {gates.device} but x is on {x.device}; move it with .to(x.device)")


def _outputs(op: str, out, x: torch.Tensor, shapes: Sequence[tuple[int, ...]], names: Sequence[str],
             reads: Sequence[tuple[str, torch.Tensor]]) -> tuple[tuple, object]:
    """(the tensors to write, what the call returns): allocated like x with these shapes, or the caller's
    `out` (named `names`), checked: shape, dtype, device, and no memory shared with `reads`, each other or
    itself (the kernels write every output directly)."""
    if out is None:
        outs = tuple(torch.empty(shape, dtype=x.dtype, device=x.device) for shape in shapes)
        return outs, outs[0] if len(outs) == 1 else outs
    if not isinstance(out, (tuple, list, torch.Tensor)):
        fail_type(op, f"out must be {'a tensor' if len(shapes) == 1 else 'a tuple of tensors ' + str(tuple(names))},"
                      f" got {type(out).__name__}")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(shapes):
        fail(op, f"out must hold {len(shapes)} tensor(s)")
    for name, o, shape in zip(names, outs, shapes):
        if not isinstance(o, torch.Tensor):
            fail_type(op, f"{name} must be a {x.dtype} tensor of shape {shape} on {x.device}, got {type(o).__name__}")
        if o.shape != shape or o.dtype != x.dtype or o.device != x.device:
            fail(op, f"{name} must be a {x.dtype} tensor of shape {shape} on {x.device}, got {o.dtype} "
                     f"{tuple(o.shape)} on {o.device}")
    check_no_alias(op, list(zip(names, outs)), reads)
    return tuple(outs), out


def check_dwt(x, out=None) -> WaveletArgs:
    check_tensor("haar_dwt2", "x", x, 4)
    _check_even("haar_dwt2", "x", x)
    B, C, H, W = x.shape
    outs, result = _outputs("haar_dwt2", out, x, ((B, C, H // 2, W // 2), (B, C, 3, H // 2, W // 2)),
                            ("out[0] (ll)", "out[1] (high)"), (("x", x),))
    return WaveletArgs("dwt", x, outs, result)


def check_idwt(ll, high, out=None) -> WaveletArgs:
    check_tensor("haar_idwt2", "ll", ll, 4)
    check_tensor("haar_idwt2", "high", high, 5)
    B, C, h, w = ll.shape
    if high.shape != (B, C, 3, h, w):
        fail("haar_idwt2", f"high has shape {tuple(high.shape)}; expected [B, C, 3, h, w] = {(B, C, 3, h, w)}")
    if high.dtype != ll.dtype or high.device != ll.device:
        fail("haar_idwt2", f"high is {high.dtype} on {high.device} but ll is {ll.dtype} on {ll.device}; "
                           f"cast or move it with .to(ll)")
    if h == 0 or w == 0:
        fail("haar_idwt2", f"ll has an empty spatial size {h}×{w}; the inverse transform needs h, w >= 1")
    outs, result = _outputs("haar_idwt2", out, ll, ((B, C, 2 * h, 2 * w),), ("out",), (("ll", ll), ("high", high)))
    return WaveletArgs("idwt", ll, outs, result, high=high)


def check_down(x, gates, out=None) -> WaveletArgs:
    check_tensor("wavelet_gate_down", "x", x, 4)
    _check_even("wavelet_gate_down", "x", x)
    B, C, H, W = x.shape
    _check_gates("wavelet_gate_down", gates, B, C, x)
    outs, result = _outputs("wavelet_gate_down", out, x, ((B, C, H // 2, W // 2),), ("out",),
                            (("x", x), ("gates", gates)))
    return WaveletArgs("down", x, outs, result, gates=gates)


def check_up(x, gates, out=None) -> WaveletArgs:
    check_tensor("wavelet_gate_up", "x", x, 4)
    B, C4, h, w = x.shape
    if C4 % 4:
        fail("wavelet_gate_up", f"x has {C4} channels; it needs 4·C (four band chunks ll, h, v, d)")
    if h == 0 or w == 0:
        fail("wavelet_gate_up", f"x has an empty spatial size {h}×{w}; the inverse transform needs h, w >= 1")
    _check_gates("wavelet_gate_up", gates, B, C4 // 4, x)
    outs, result = _outputs("wavelet_gate_up", out, x, ((B, C4 // 4, 2 * h, 2 * w),), ("out",),
                            (("x", x), ("gates", gates)))
    return WaveletArgs("up", x, outs, result, gates=gates)


def gate_backward_args(kind: str, dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> WaveletArgs:
    """The call of a gate op's backward: (dx, dgates), the gate gradient reduced in float32."""
    outs = (torch.empty_like(x), torch.empty(gates.shape, dtype=torch.float32, device=x.device))
    return WaveletArgs(kind, x, outs, outs, gates=gates, dy=dy)


# --------------------------------------------------------------------------------------------------
# Backends: run(args) writes args.out and returns args.result
# --------------------------------------------------------------------------------------------------

def _plane_contiguous(t: torch.Tensor) -> bool:
    """The kernels need rows of each plane contiguous (stride(-1) == 1, stride(-2) == width)."""
    s = t.stride()
    return s[-1] == 1 and (t.shape[-2] <= 1 or s[-2] == t.shape[-1])


def _planes(t: torch.Tensor) -> torch.Tensor:
    return t if _plane_contiguous(t) else t.contiguous()


def _triton_reasons(args: WaveletArgs) -> list[str]:
    reasons = triton_reasons(args.x.device)
    if args.x.dtype == torch.float64:
        reasons.append("float64 runs on the reference backend (the Triton kernels accumulate in float32)")
    return reasons


def _run_triton(args: WaveletArgs):
    if args.x.numel() == 0:
        return args.result
    K = _backend.kernels("wavelet")
    x, g, kind = _planes(args.x), args.gates, args.kind
    outs = [o if _plane_contiguous(o) else torch.empty_like(o, memory_format=torch.contiguous_format)
            for o in args.out]
    if kind == "dwt":
        K.haar_analysis(x, K.bands_of(outs[0], outs[1]))
    elif kind == "idwt":
        K.haar_synthesis(K.bands_of(x, _planes(args.high)), outs[0])
    elif kind == "down":
        K.haar_analysis(x, outs[0], gates=g)
    elif kind == "up":
        K.haar_synthesis(K.chunks_of(x), outs[0], gates=g)
    elif kind == "down_bwd":      # dx = synthesis of (g_i·dy), dg_i = Σ band_i(x)·dy
        K.haar_synthesis(K.repeated(_planes(args.dy)), outs[0], gates=g, xs=x, dot_out=outs[1])
    else:                         # up_bwd: dx_i = g_i·band_i(dy), dg_i = Σ band_i(dy)·x_i
        K.haar_analysis(_planes(args.dy), K.chunks_of(outs[0]), gates=g, refs=K.chunks_of(x), dot_out=outs[1])
    for user, tmp in zip(args.out, outs):
        if tmp is not user:
            user.copy_(tmp)
    return args.result


def _run_reference(args: WaveletArgs):
    x, g, kind = args.x, args.gates, args.kind
    if kind == "dwt":
        ll, high = haar_dwt2_reference(x)
        args.out[0].copy_(ll)
        args.out[1].copy_(high)
    elif kind == "idwt":
        args.out[0].copy_(haar_idwt2_reference(x, args.high))
    elif kind == "down":
        args.out[0].copy_(wavelet_gate_down_reference(x, g))
    elif kind == "up":
        args.out[0].copy_(wavelet_gate_up_reference(x, g))
    elif kind == "down_bwd":
        acc = _acc(x, None)
        dy, gf = args.dy.to(acc), g.to(acc)
        args.out[0].copy_(haar_merge(dy.unsqueeze(2) * gf.transpose(1, 2)[..., None, None]))
        args.out[1].copy_((haar_bands(x.to(acc)) * dy.unsqueeze(2)).sum(dim=(-2, -1)).transpose(1, 2))
    else:
        acc = _acc(x, None)
        B, C4, h, w = x.shape
        bands = haar_bands(args.dy.to(acc))                           # [B, C, 4, h, w]
        gf = g.to(acc).transpose(1, 2)[..., None, None]
        args.out[0].copy_((bands * gf).transpose(1, 2).reshape(B, C4, h, w))
        chunks = x.to(acc).reshape(B, 4, C4 // 4, h, w).transpose(1, 2)
        args.out[1].copy_((bands * chunks).sum(dim=(-2, -1)).transpose(1, 2))
    return args.result


BACKENDS = (Backend("triton", _run_triton, _triton_reasons), Backend("reference", _run_reference, lambda a: []))


def _dispatch_key(args: WaveletArgs):
    return args.kind, args.x.is_cuda, args.x.is_cpu, args.x.dtype


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable ops (torch.library custom ops + the eager autograd.Function)
# --------------------------------------------------------------------------------------------------

def _dwt_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return DWT_OP(check_dwt(x))


def _dwt_fake(x):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // 2, W // 2)), x.new_empty((B, C, 3, H // 2, W // 2))


def _idwt_forward(ll: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return IDWT_OP(check_idwt(ll, high))


def _idwt_fake(ll, high):
    B, C, h, w = ll.shape
    return ll.new_empty((B, C, 2 * h, 2 * w))


def _nothing_saved(ctx, inputs, output) -> None:
    return None


# The transform is orthogonal: ∂dwt = idwt and ∂idwt = dwt.
DWT_GRAD = Differentiable(
    "haar_dwt2", forward=_dwt_forward, forward_fake=_dwt_fake, backward=_idwt_forward, backward_fake=_idwt_fake,
    save=_nothing_saved, grads=lambda ctx, backward, d_ll, d_high: (backward(d_ll, d_high),))
IDWT_GRAD = Differentiable(
    "haar_idwt2", forward=_idwt_forward, forward_fake=_idwt_fake, backward=_dwt_forward, backward_fake=_dwt_fake,
    save=_nothing_saved, grads=lambda ctx, backward, dy: backward(dy))


def _down_forward(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    return DOWN_OP(check_down(x, gates))


def _down_fake(x, gates):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // 2, W // 2))


def _up_forward(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    return UP_OP(check_up(x, gates))


def _up_fake(x, gates):
    B, C4, h, w = x.shape
    return x.new_empty((B, C4 // 4, 2 * h, 2 * w))


def _down_backward(dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dg = DOWN_OP(gate_backward_args("down_bwd", dy, x, gates))
    return dx, dg.to(gates.dtype)


def _up_backward(dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dg = UP_OP(gate_backward_args("up_bwd", dy, x, gates))
    return dx, dg.to(gates.dtype)


def _gate_backward_fake(dy, x, gates):
    return torch.empty_like(x), torch.empty_like(gates)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _gate_grads(ctx, backward, dy):
    return backward(dy, *ctx.saved_tensors)


DOWN_GRAD = Differentiable(
    "wavelet_gate_down", forward=_down_forward, forward_fake=_down_fake, backward=_down_backward,
    backward_fake=_gate_backward_fake, save=_save_inputs, grads=_gate_grads)
UP_GRAD = Differentiable(
    "wavelet_gate_up", forward=_up_forward, forward_fake=_up_fake, backward=_up_backward,
    backward_fake=_gate_backward_fake, save=_save_inputs, grads=_gate_grads)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------

def haar_dwt2(x: torch.Tensor, *, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2-D Haar transform over the last two dims of x [B, C, H, W] (H, W
    even): (ll [B, C, H/2, W/2], high [B, C, 3, H/2, W/2]) with high = (horizontal, vertical, diagonal),
    equal to pywt.dwt2(x, 'haar'). Differentiable (the backward is `haar_idwt2`). One read of x, one write
    of the bands. Unfused equivalent: `haar_dwt2_reference`.

    `out`: an optional (ll, high) pair of x's dtype and device. Aliasing: no in-place use; ll and high must not
    share memory with x, with each other, or within themselves (an expand()ed view): such calls raise."""
    return _DWT(x, out=out)


def haar_idwt2(ll: torch.Tensor, high: torch.Tensor, *, out=None) -> torch.Tensor:
    """The exact inverse of `haar_dwt2`: x [B, C, 2h, 2w] from ll [B, C, h, w] and high [B, C, 3, h, w]
    (pywt.idwt2). Differentiable (the backward is `haar_dwt2`).

    Aliasing: `out` must not share memory with ll or high, nor within itself (an expand()ed view): no in-place
    use (each output 2×2 block reads four bands at other addresses); such calls raise."""
    return _IDWT(ll, high, out=out)


def wavelet_gate_down(x: torch.Tensor, gates: torch.Tensor, *, out=None) -> torch.Tensor:
    """WG-Down: y = Σᵢ gates[:, i, :, None, None] · bandᵢ(x), bands (ll, h, v, d) of the Haar transform of
    x [B, C, H, W]; gates [B, 4, C]; y [B, C, H/2, W/2]. One read of x, one write of y; the backward
    (x and gates) is one pass too. fp32 accumulation. Unfused equivalent: `wavelet_gate_down_reference`.

    Aliasing: `out` must not share memory with x or gates, nor within itself (an expand()ed view); such calls
    raise. gates may be an expanded view (it is only read)."""
    return _DOWN(x, gates, out=out)


def wavelet_gate_up(x: torch.Tensor, gates: torch.Tensor, *, out=None) -> torch.Tensor:
    """WG-Up: x [B, 4C, H, W] holds the four bands (ll, h, v, d) as channel chunks; each chunk is gated by
    gates[:, i, :] and the inverse Haar transform gives y [B, C, 2H, 2W]. One read of x, one write of y;
    the backward (x and gates) is one pass. Unfused equivalent: `wavelet_gate_up_reference`.

    Aliasing: `out` must not share memory with x or gates, nor within itself (an expand()ed view); such calls
    raise."""
    return _UP(x, gates, out=out)


def haar_wavedec2(x: torch.Tensor, levels: int) -> list:
    """`levels` levels of the Haar transform, pywt.wavedec2 order: [ll_L, high_L, …, high_1] with each
    high [B, C, 3, ·, ·]. Each level halves the spatial size, which must stay even."""
    check_tensor("haar_wavedec2", "x", x, 4, what="[B, C, H, W]")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        fail_type("haar_wavedec2", f"levels must be a positive int, got {type(levels).__name__} {levels!r}")
    levels = int(levels)
    if levels < 1:
        fail("haar_wavedec2", f"levels={levels!r} must be a positive int")
    H, W = x.shape[-2:]
    if H % (2 ** levels) or W % (2 ** levels):
        raise ValueError(f"haar_wavedec2: {levels} levels need H and W divisible by {2 ** levels}, got {H}×{W}")
    highs = []
    for _ in range(levels):
        x, high = haar_dwt2(x)
        highs.append(high)
    return [x] + highs[::-1]


def haar_waverec2(coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of `haar_wavedec2` (pywt.waverec2 order)."""
    if not isinstance(coeffs, (list, tuple)):
        fail_type("haar_waverec2", f"coeffs must be a list [ll, high_L, ..., high_1] (haar_wavedec2's result), got "
                                   f"{type(coeffs).__name__}")
    if len(coeffs) < 2:
        raise ValueError("haar_waverec2: coeffs must be [ll, high_L, ..., high_1] with at least one level")
    x = coeffs[0]
    for high in coeffs[1:]:
        x = haar_idwt2(x, high)
    return x


# --------------------------------------------------------------------------------------------------
# Sample inputs and registry entries: one Op per public function, sharing backends and tolerances
# --------------------------------------------------------------------------------------------------

def _shapes(small: bool):
    shapes = [(1, 1, 2, 2), (2, 3, 4, 6), (1, 7, 10, 14), (3, 5, 8, 8), (2, 3, 6, 258)]
    return shapes if small else shapes + [(2, 16, 64, 64), (4, 32, 34, 130)]


def _gates(B, C, device, dtype, gen):
    return torch.rand((B, 4, C), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) * 2 - 0.5


def _samples(kind):
    def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
        device, gen = torch.device(device), torch.Generator().manual_seed(seed)
        for shape in _shapes(small):
            B, C, H, W = shape
            tag = "x".join(map(str, shape))
            if kind == "dwt":
                yield tag, dict(x=sample_tensor(shape, device, dtype, gen))
            elif kind == "idwt":
                yield tag, dict(ll=sample_tensor((B, C, H // 2, W // 2), device, dtype, gen),
                                high=sample_tensor((B, C, 3, H // 2, W // 2), device, dtype, gen))
            elif kind == "down":
                yield tag, dict(x=sample_tensor(shape, device, dtype, gen), gates=_gates(B, C, device, dtype, gen))
            else:
                yield tag, dict(x=sample_tensor((B, 4 * C, H // 2, W // 2), device, dtype, gen),
                                gates=_gates(B, C, device, dtype, gen))
        B, C, H, W = 2, 3, 6, 10
        if kind == "dwt":
            yield "non-contiguous", dict(x=sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3))
            yield "channels-last", dict(x=sample_tensor((B, C, H, W), device, dtype, gen).contiguous(
                memory_format=torch.channels_last))
        elif kind == "idwt":
            yield "non-contiguous", dict(ll=sample_tensor((B, C, 2 * H, W), device, dtype, gen)[:, :, ::2],
                                         high=sample_tensor((B, 3, C, H, W), device, dtype, gen).transpose(1, 2))
        elif kind == "down":
            yield "non-contiguous", dict(x=sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3),
                                         gates=_gates(1, C, device, dtype, gen).expand(B, 4, C))
        else:
            yield "non-contiguous", dict(x=sample_tensor((B, 4 * C, W, H), device, dtype, gen).transpose(2, 3),
                                         gates=_gates(B, C, device, dtype, gen).transpose(1, 2).contiguous()
                                         .transpose(1, 2))
    return sample_inputs


def _bad_inputs(kind):
    """The bad-input axis of one op of the family (BadInput: what must be refused, what has a defined result)."""
    def bad_inputs(device):
        device = torch.device(device)
        r = sample_maker(device)

        B, C, h, w = 2, 3, 2, 3
        if kind == "dwt":
            def base():
                return dict(x=r(B, C, 2 * h, 2 * w))
            yield from tensor_mutations(base, ("x",), ranks={"x": 4}, anchor="x")
            yield BadInput("x-odd-height", dict(x=r(B, C, 3, 4)), ValueError, "x")
            yield BadInput("x-zero-width", dict(x=r(B, C, 4, 0)), ValueError, "x")
            yield BadInput("empty-batch", dict(x=r(0, C, 4, 6)), None)
            yield BadInput("empty-channels", dict(x=r(B, 0, 4, 6)), None)
            out_ll, out_high = (B, C, h, w), (B, C, 3, h, w)
            yield BadInput("out-not-a-pair", dict(x=r(B, C, 4, 6), out=r(*out_ll)), ValueError, "out")
            yield BadInput("out-a-dict", dict(x=r(B, C, 4, 6), out={"ll": r(*out_ll)}), TypeError, "out")
            yield BadInput("out0-none", dict(x=r(B, C, 4, 6), out=(None, r(*out_high))), TypeError, "out[0]")
            yield BadInput("out1-shape", dict(x=r(B, C, 4, 6), out=(r(*out_ll), r(B, C, 4, h, w))), ValueError,
                           "out[1]")
            yield BadInput("out0-dtype", dict(x=r(B, C, 4, 6), out=(r(*out_ll).double(), r(*out_high))), ValueError,
                           "out[0]")
            yield BadInput("out0-meta", dict(x=r(B, C, 4, 6), out=(r(*out_ll).to("meta"), r(*out_high))), ValueError,
                           "out[0]")
            yield BadInput("out0-expanded", dict(x=r(B, C, 4, 6), out=(r(1, C, h, w).expand(out_ll), r(*out_high))),
                           ValueError, "out[0]")
            yield BadInput("out1-expanded", dict(x=r(B, C, 4, 6), out=(r(*out_ll), r(B, C, 1, h, w).expand(out_high))),
                           ValueError, "out[1]")
            buf = r(B * C * 4 * h * w + 1)
            yield BadInput("outs-share-memory", dict(x=r(B, C, 4, 6), out=(buf[1:B * C * h * w + 1].view(out_ll),
                                                                            buf[:B * C * 3 * h * w].view(out_high))),
                           ValueError, "out[0]")
            x = r(B, C, 4, 6)
            yield BadInput("out0-overlaps-x", dict(x=x, out=(x.view(-1)[1:B * C * h * w + 1].view(out_ll),
                                                             r(*out_high))), ValueError, "out[0]")
            x = r(B, C, 4, 6)
            yield BadInput("out1-is-x-memory", dict(x=x, out=(r(*out_ll), x.view(-1)[:B * C * 3 * h * w]
                                                                .view(out_high))), ValueError, "out[1]")
        elif kind == "idwt":
            def base():
                return dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w))
            yield from tensor_mutations(base, ("ll", "high"), ranks={"ll": 4, "high": 5}, anchor="ll")
            yield BadInput("high-shape", dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w + 1)), ValueError, "high")
            yield BadInput("high-bands", dict(ll=r(B, C, h, w), high=r(B, C, 2, h, w)), ValueError, "high")
            yield BadInput("high-dtype", dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w).double()), ValueError, "high")
            yield BadInput("ll-zero-height", dict(ll=r(B, C, 0, w), high=r(B, C, 3, 0, w)), ValueError, "ll")
            yield BadInput("empty-batch", dict(ll=r(0, C, h, w), high=r(0, C, 3, h, w)), None)
            yield BadInput("out-list", dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w), out=[[0.0]]), TypeError, "out")
            yield BadInput("out-shape", dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w), out=r(B, C, h, w)), ValueError,
                           "out")
            yield BadInput("out-expanded", dict(ll=r(B, C, h, w), high=r(B, C, 3, h, w),
                                                out=r(B, C, 1, 2 * w).expand(B, C, 2 * h, 2 * w)), ValueError, "out")
            buf = r(B * C * 4 * h * w + 8)
            high = buf[:B * C * 3 * h * w].view(B, C, 3, h, w)
            yield BadInput("out-overlaps-high", dict(ll=r(B, C, h, w), high=high,
                                                   out=buf[8:].view(B, C, 2 * h, 2 * w)), ValueError, "out")
            ll = r(B, C, 2 * h, 2 * w)
            yield BadInput("out-overlaps-ll", dict(ll=ll[:, :, :h, :w], high=r(B, C, 3, h, w), out=ll), ValueError,
                           "out")
        else:
            Cx = C if kind == "down" else 4 * C
            Hx, Wx = (2 * h, 2 * w) if kind == "down" else (h, w)
            oshape = (B, C, h, w) if kind == "down" else (B, C, 2 * h, 2 * w)

            def base():
                return dict(x=r(B, Cx, Hx, Wx), gates=r(B, 4, C))
            yield from tensor_mutations(base, ("x", "gates"), ranks={"x": 4, "gates": 3}, anchor="x")
            yield BadInput("gates-shape", dict(x=r(B, Cx, Hx, Wx), gates=r(B, 3, C)), ValueError, "gates")
            yield BadInput("gates-batch", dict(x=r(B, Cx, Hx, Wx), gates=r(B + 1, 4, C)), ValueError, "gates")
            if kind == "down":
                yield BadInput("x-odd-width", dict(x=r(B, C, 4, 5), gates=r(B, 4, C)), ValueError, "x")
            else:
                yield BadInput("x-channels", dict(x=r(B, 6, h, w), gates=r(B, 4, 1)), ValueError, "x")
                yield BadInput("x-zero-height", dict(x=r(B, Cx, 0, w), gates=r(B, 4, C)), ValueError, "x")
            yield BadInput("empty-batch", dict(x=r(0, Cx, Hx, Wx), gates=r(0, 4, C)), None)
            yield BadInput("gates-expanded", dict(x=r(B, Cx, Hx, Wx), gates=r(1, 4, C).expand(B, 4, C)), None)
            yield BadInput("out-tuple", dict(x=r(B, Cx, Hx, Wx), gates=r(B, 4, C), out=(r(*oshape), r(*oshape))),
                           ValueError, "out")
            yield BadInput("out-int", dict(x=r(B, Cx, Hx, Wx), gates=r(B, 4, C), out=3), TypeError, "out")
            yield BadInput("out-dtype", dict(x=r(B, Cx, Hx, Wx), gates=r(B, 4, C), out=r(*oshape).half()), ValueError,
                           "out")
            yield BadInput("out-expanded", dict(x=r(B, Cx, Hx, Wx), gates=r(B, 4, C),
                                                out=r(1, C, oshape[2], oshape[3]).expand(oshape)), ValueError, "out")
            n, nx = B * C * oshape[2] * oshape[3], B * Cx * Hx * Wx
            buf = r(max(n, nx) + 1)
            yield BadInput("out-overlaps-x", dict(x=buf[:nx].view(B, Cx, Hx, Wx), gates=r(B, 4, C),
                                                  out=buf[1:n + 1].view(oshape)), ValueError, "out")
            g = r(B * 4 * C + n)
            yield BadInput("out-overlaps-gates", dict(x=r(B, Cx, Hx, Wx), gates=g[:B * 4 * C].view(B, 4, C),
                                                      out=g[B * 4 * C - 1:-1].view(oshape)), ValueError, "out")
    return bad_inputs


def _register(name, kind, fn, reference, checker, grad):
    return register(Op(
        name=name, fn=fn, backends=BACKENDS, reference=reference, check=checker, tolerances=ELEMENTWISE_TOLERANCES,
        sample_inputs=_samples(kind), dispatch_key=_dispatch_key, library_op=grad.overload,
        library_args=lambda **kw: tuple(kw.values()),
        eager=lambda **kw: reference(**kw, compute_dtype=next(iter(kw.values())).dtype),
        make_out=lambda kw: checker(**kw).result, bad_inputs=_bad_inputs(kind)))


DWT_OP = _register("haar_dwt2", "dwt", haar_dwt2, haar_dwt2_reference, check_dwt, DWT_GRAD)
IDWT_OP = _register("haar_idwt2", "idwt", haar_idwt2, haar_idwt2_reference, check_idwt, IDWT_GRAD)
DOWN_OP = _register("wavelet_gate_down", "down", wavelet_gate_down, wavelet_gate_down_reference, check_down,
                    DOWN_GRAD)
UP_OP = _register("wavelet_gate_up", "up", wavelet_gate_up, wavelet_gate_up_reference, check_up, UP_GRAD)
_DWT, _IDWT = Entry(DWT_OP, grad=DWT_GRAD), Entry(IDWT_OP, grad=IDWT_GRAD)
_DOWN, _UP = Entry(DOWN_OP, grad=DOWN_GRAD), Entry(UP_OP, grad=UP_GRAD)
