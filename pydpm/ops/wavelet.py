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

Module layout: references → argument checks → backends → torch.library ops with autograd → public ops.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from pydpm import _backend
from pydpm.ops._registry import Backend, Op, Tolerance, _forced, forced_backend, register, use_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# --------------------------------------------------------------------------------------------------
# References (the CPU path and the oracle)
# --------------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor, compute_dtype):
    return compute_dtype or (torch.float64 if t.dtype == torch.float64 else torch.float32)


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

@dataclasses.dataclass
class WaveletArgs:
    """A checked call: `kind` is the op; inputs and the output(s) the backend writes."""

    kind: str
    x: torch.Tensor                      # the first input (x, or ll for idwt)
    high: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    out: tuple[torch.Tensor, ...] = ()
    dy: torch.Tensor | None = None       # backward kinds: the incoming gradient


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _check_tensor(op: str, name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"{name} has dtype {t.dtype}; pass float32, float16, bfloat16 or float64")
    if t.dim() != dims:
        _fail(op, f"{name} has shape {tuple(t.shape)}; expected {dims} dimensions")


def _check_even(op: str, name: str, t: torch.Tensor) -> None:
    H, W = t.shape[-2:]
    if H % 2 or W % 2 or H == 0 or W == 0:
        _fail(op, f"{name} has spatial size {H}×{W}; the Haar transform needs even, non-zero sizes: pad first, "
                  f"e.g. torch.nn.functional.pad(x, (0, W % 2, 0, H % 2), mode='reflect')")


def _check_gates(op: str, gates, batch: int, channels: int, x: torch.Tensor) -> None:
    _check_tensor(op, "gates", gates, 3)
    if tuple(gates.shape) != (batch, 4, channels):
        _fail(op, f"gates has shape {tuple(gates.shape)}; expected [B, 4, C] = {(batch, 4, channels)} "
                  f"(bands ordered ll, h, v, d)")
    if gates.device != x.device:
        _fail(op, f"gates is on {gates.device} but x is on {x.device}; move it with .to(x.device)")


def _check_out(op: str, out, x: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """The output tensors: allocated like x with these shapes, or the caller's `out`, checked."""
    if out is None:
        return tuple(torch.empty(shape, dtype=x.dtype, device=x.device) for shape in shapes)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(shapes):
        _fail(op, f"out must hold {len(shapes)} tensor(s)")
    for i, (o, shape) in enumerate(zip(outs, shapes)):
        if not isinstance(o, torch.Tensor) or o.shape != shape or o.dtype != x.dtype or o.device != x.device:
            _fail(op, f"out[{i}] must be a {x.dtype} tensor of shape {shape} on {x.device}")
    return tuple(outs)


def check_dwt(x, out=None) -> WaveletArgs:
    _check_tensor("haar_dwt2", "x", x, 4)
    _check_even("haar_dwt2", "x", x)
    B, C, H, W = x.shape
    return WaveletArgs("dwt", x, out=_check_out("haar_dwt2", out, x, ((B, C, H // 2, W // 2), (B, C, 3, H // 2, W // 2))))


def check_idwt(ll, high, out=None) -> WaveletArgs:
    _check_tensor("haar_idwt2", "ll", ll, 4)
    _check_tensor("haar_idwt2", "high", high, 5)
    B, C, h, w = ll.shape
    if tuple(high.shape) != (B, C, 3, h, w):
        _fail("haar_idwt2", f"high has shape {tuple(high.shape)}; expected [B, C, 3, h, w] = {(B, C, 3, h, w)}")
    if high.dtype != ll.dtype or high.device != ll.device:
        _fail("haar_idwt2", f"high is {high.dtype} on {high.device} but ll is {ll.dtype} on {ll.device}")
    if h == 0 or w == 0:
        _fail("haar_idwt2", "ll has an empty spatial size")
    return WaveletArgs("idwt", ll, high=high, out=_check_out("haar_idwt2", out, ll, ((B, C, 2 * h, 2 * w),)))


def check_down(x, gates, out=None) -> WaveletArgs:
    _check_tensor("wavelet_gate_down", "x", x, 4)
    _check_even("wavelet_gate_down", "x", x)
    B, C, H, W = x.shape
    _check_gates("wavelet_gate_down", gates, B, C, x)
    return WaveletArgs("down", x, gates=gates,
                       out=_check_out("wavelet_gate_down", out, x, ((B, C, H // 2, W // 2),)))


def check_up(x, gates, out=None) -> WaveletArgs:
    _check_tensor("wavelet_gate_up", "x", x, 4)
    B, C4, h, w = x.shape
    if C4 % 4:
        _fail("wavelet_gate_up", f"x has {C4} channels; it needs 4·C (four band chunks ll, h, v, d)")
    if h == 0 or w == 0:
        _fail("wavelet_gate_up", "x has an empty spatial size")
    _check_gates("wavelet_gate_up", gates, B, C4 // 4, x)
    return WaveletArgs("up", x, gates=gates,
                       out=_check_out("wavelet_gate_up", out, x, ((B, C4 // 4, 2 * h, 2 * w),)))


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

def _plane_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels need rows of each plane contiguous (stride(-1) == 1, stride(-2) == width)."""
    return t if t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1]) else t.contiguous()


def _triton_reasons(args: WaveletArgs) -> list[str]:
    reason = _backend.triton_reason(args.x.device, forced=forced_backend() == "triton")
    reasons = [reason] if reason else []
    if args.x.dtype == torch.float64:
        reasons.append("float64 runs on the reference backend (the Triton kernels accumulate in float32)")
    return reasons


def _run_triton(args: WaveletArgs) -> None:
    from pydpm.kernels.wavelet import haar_analysis, haar_synthesis

    x, g = _plane_contiguous(args.x), args.gates
    outs = [_plane_contiguous(o) for o in args.out]
    if args.kind == "dwt":
        ll, high = outs
        haar_analysis(x, [ll, high[:, :, 0], high[:, :, 1], high[:, :, 2]])
    elif args.kind == "idwt":
        high = _plane_contiguous(args.high)
        haar_synthesis([x, high[:, :, 0], high[:, :, 1], high[:, :, 2]], outs[0])
    elif args.kind == "down":
        haar_analysis(x, [outs[0]], gates=g, write_sum=True)
    elif args.kind == "up":
        haar_synthesis(list(x.chunk(4, dim=1)), outs[0], gates=g)
    elif args.kind == "down_bwd":      # dx = synthesis of (g_i·dy), dg_i = Σ band_i(x)·dy
        haar_synthesis([_plane_contiguous(args.dy)] * 4, outs[0], gates=g, xs=x, dot_out=outs[1])
    else:                              # up_bwd: dx_i = g_i·band_i(dy), dg_i = Σ band_i(dy)·x_i
        haar_analysis(_plane_contiguous(args.dy), list(outs[0].chunk(4, dim=1)), gates=g,
                      refs=list(x.chunk(4, dim=1)), dot_out=outs[1])
    for user, tmp in zip(args.out, outs):
        if tmp is not user:
            user.copy_(tmp)


def _run_reference(args: WaveletArgs) -> None:
    x, g = args.x, args.gates
    if args.kind == "dwt":
        ll, high = haar_dwt2_reference(x)
        args.out[0].copy_(ll)
        args.out[1].copy_(high)
    elif args.kind == "idwt":
        args.out[0].copy_(haar_idwt2_reference(x, args.high))
    elif args.kind == "down":
        args.out[0].copy_(wavelet_gate_down_reference(x, g))
    elif args.kind == "up":
        args.out[0].copy_(wavelet_gate_up_reference(x, g))
    elif args.kind == "down_bwd":
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


BACKENDS = (Backend("triton", _run_triton, _triton_reasons), Backend("reference", _run_reference, lambda a: []))


def _dispatch_key(args: WaveletArgs):
    return (args.kind, args.x.device.type, args.x.dtype)


def _run(args: WaveletArgs) -> None:
    if args.x.numel() == 0:
        return
    _DISPATCH(args)


# --------------------------------------------------------------------------------------------------
# torch.library ops with autograd (the path autograd and torch.compile take)
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("pydpm::haar_dwt2", mutates_args=())
def _dwt_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_dwt(x)
    _run(args)
    return args.out


@_dwt_op.register_fake
def _(x):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // 2, W // 2)), x.new_empty((B, C, 3, H // 2, W // 2))


@torch.library.custom_op("pydpm::haar_idwt2", mutates_args=())
def _idwt_op(ll: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    args = check_idwt(ll, high)
    _run(args)
    return args.out[0]


@_idwt_op.register_fake
def _(ll, high):
    B, C, h, w = ll.shape
    return ll.new_empty((B, C, 2 * h, 2 * w))


# Autograd runs CUDA backwards on its own device thread, which does not see the ContextVar that
# `use_backend` sets: every backward re-enters the backend forced when its forward ran (ctx.backend).

def _dwt_backward(ctx, d_ll, d_high):
    if d_ll is None:
        d_ll = d_high.new_zeros(ctx.ll_shape)
    if d_high is None:
        d_high = d_ll.new_zeros(ctx.high_shape)
    with use_backend(ctx.backend):
        return torch.ops.pydpm.haar_idwt2(d_ll.contiguous(), d_high.contiguous())


def _dwt_setup(ctx, inputs, output):
    ctx.ll_shape, ctx.high_shape, ctx.backend = output[0].shape, output[1].shape, _forced.get()


def _idwt_backward(ctx, dy):
    with use_backend(ctx.backend):
        return torch.ops.pydpm.haar_dwt2(dy.contiguous())


def _idwt_setup(ctx, inputs, output):
    ctx.backend = _forced.get()


_dwt_op.register_autograd(_dwt_backward, setup_context=_dwt_setup)
_idwt_op.register_autograd(_idwt_backward, setup_context=_idwt_setup)


@torch.library.custom_op("pydpm::wavelet_gate_down", mutates_args=())
def _down_op(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    args = check_down(x, gates)
    _run(args)
    return args.out[0]


@torch.library.custom_op("pydpm::wavelet_gate_up", mutates_args=())
def _up_op(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    args = check_up(x, gates)
    _run(args)
    return args.out[0]


def _gate_backward(mode: str, dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor):
    """(dx, dgates) of a gate op: one pass, the gate gradient reduced in float32."""
    args = WaveletArgs(mode, x, gates=gates, dy=dy,
                       out=(torch.empty_like(x), torch.empty(gates.shape, dtype=torch.float32, device=x.device)))
    _run(args)
    return args.out[0], args.out[1].to(gates.dtype)


@torch.library.custom_op("pydpm::wavelet_gate_down_backward", mutates_args=())
def _down_bwd_op(dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _gate_backward("down_bwd", dy, x, gates)


@torch.library.custom_op("pydpm::wavelet_gate_up_backward", mutates_args=())
def _up_bwd_op(dy: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _gate_backward("up_bwd", dy, x, gates)


@_down_op.register_fake
def _(x, gates):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // 2, W // 2))


@_up_op.register_fake
def _(x, gates):
    B, C4, h, w = x.shape
    return x.new_empty((B, C4 // 4, 2 * h, 2 * w))


@_down_bwd_op.register_fake
def _(dy, x, gates):
    return torch.empty_like(x), torch.empty_like(gates)


@_up_bwd_op.register_fake
def _(dy, x, gates):
    return torch.empty_like(x), torch.empty_like(gates)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.backend = _forced.get()


def _down_backward(ctx, dy):
    x, gates = ctx.saved_tensors
    with use_backend(ctx.backend):
        return torch.ops.pydpm.wavelet_gate_down_backward(dy.contiguous(), x, gates)


def _up_backward(ctx, dy):
    x, gates = ctx.saved_tensors
    with use_backend(ctx.backend):
        return torch.ops.pydpm.wavelet_gate_up_backward(dy.contiguous(), x, gates)


_down_op.register_autograd(_down_backward, setup_context=_save_inputs)
_up_op.register_autograd(_up_backward, setup_context=_save_inputs)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------

def _apply(name: str, graph_op, checker, inputs: tuple, out):
    """Run a public op: through its torch.library op (autograd, torch.compile) when a graph is being
    recorded, else checked and dispatched straight to a backend, writing `out` when given."""
    graph = torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    if out is not None and graph and not torch.compiler.is_compiling():
        _fail(name, "out= is not differentiable (like torch's out= arguments); drop out= to get gradients")
    if out is None and graph:
        return graph_op(*inputs)
    args = checker(*inputs, out=out)
    _run(args)
    return out if out is not None else _unpack(args.out)


def haar_dwt2(x: torch.Tensor, *, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2-D Haar transform over the last two dims of x [B, C, H, W] (H, W
    even): (ll [B, C, H/2, W/2], high [B, C, 3, H/2, W/2]) with high = (horizontal, vertical, diagonal),
    equal to pywt.dwt2(x, 'haar'). Differentiable (the backward is `haar_idwt2`). One read of x, one write
    of the bands. Unfused equivalent: `haar_dwt2_reference`."""
    return _apply("haar_dwt2", _dwt_op, check_dwt, (x,), out)


def haar_idwt2(ll: torch.Tensor, high: torch.Tensor, *, out=None) -> torch.Tensor:
    """The exact inverse of `haar_dwt2`: x [B, C, 2h, 2w] from ll [B, C, h, w] and high [B, C, 3, h, w]
    (pywt.idwt2). Differentiable (the backward is `haar_dwt2`)."""
    return _apply("haar_idwt2", _idwt_op, check_idwt, (ll, high), out)


def wavelet_gate_down(x: torch.Tensor, gates: torch.Tensor, *, out=None) -> torch.Tensor:
    """WG-Down: y = Σᵢ gates[:, i, :, None, None] · bandᵢ(x), bands (ll, h, v, d) of the Haar transform of
    x [B, C, H, W]; gates [B, 4, C]; y [B, C, H/2, W/2]. One read of x, one write of y; the backward
    (x and gates) is one pass too. fp32 accumulation. Unfused equivalent: `wavelet_gate_down_reference`."""
    return _apply("wavelet_gate_down", _down_op, check_down, (x, gates), out)


def wavelet_gate_up(x: torch.Tensor, gates: torch.Tensor, *, out=None) -> torch.Tensor:
    """WG-Up: x [B, 4C, H, W] holds the four bands (ll, h, v, d) as channel chunks; each chunk is gated by
    gates[:, i, :] and the inverse Haar transform gives y [B, C, 2H, 2W]. One read of x, one write of y;
    the backward (x and gates) is one pass. Unfused equivalent: `wavelet_gate_up_reference`."""
    return _apply("wavelet_gate_up", _up_op, check_up, (x, gates), out)


def haar_wavedec2(x: torch.Tensor, levels: int) -> list:
    """`levels` levels of the Haar transform, pywt.wavedec2 order: [ll_L, high_L, …, high_1] with each
    high [B, C, 3, ·, ·]. Each level halves the spatial size, which must stay even."""
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"haar_wavedec2: levels={levels!r} must be a positive int")
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
    if len(coeffs) < 2:
        raise ValueError("haar_waverec2: coeffs must be [ll, high_L, ..., high_1] with at least one level")
    x = coeffs[0]
    for high in coeffs[1:]:
        x = haar_idwt2(x, high)
    return x


# --------------------------------------------------------------------------------------------------
# Registration: one Op per public function, sharing backends and tolerances
# --------------------------------------------------------------------------------------------------

TOLERANCES = {torch.float64: Tolerance(1e-12, 1e-12), torch.float32: Tolerance(1e-5, 1e-5),
              torch.float16: Tolerance(2e-3, 2e-3), torch.bfloat16: Tolerance(1.6e-2, 1.6e-2)}


def _shapes(small: bool):
    shapes = [(1, 1, 2, 2), (2, 3, 4, 6), (1, 7, 10, 14), (3, 5, 8, 8), (2, 3, 6, 258)]
    return shapes if small else shapes + [(2, 16, 64, 64), (4, 32, 34, 130)]


def _rand(shape, device, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _gates(B, C, device, dtype, gen):
    return torch.rand((B, 4, C), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) * 2 - 0.5


def _samples(kind):
    def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
        device, gen = torch.device(device), torch.Generator().manual_seed(seed)
        for shape in _shapes(small):
            B, C, H, W = shape
            tag = "x".join(map(str, shape))
            if kind == "dwt":
                yield tag, dict(x=_rand(shape, device, dtype, gen))
            elif kind == "idwt":
                yield tag, dict(ll=_rand((B, C, H // 2, W // 2), device, dtype, gen),
                                high=_rand((B, C, 3, H // 2, W // 2), device, dtype, gen))
            elif kind == "down":
                yield tag, dict(x=_rand(shape, device, dtype, gen), gates=_gates(B, C, device, dtype, gen))
            else:
                yield tag, dict(x=_rand((B, 4 * C, H // 2, W // 2), device, dtype, gen),
                                gates=_gates(B, C, device, dtype, gen))
        B, C, H, W = 2, 3, 6, 10
        if kind == "dwt":
            yield "non-contiguous", dict(x=_rand((B, C, W, H), device, dtype, gen).transpose(2, 3))
            yield "channels-last", dict(x=_rand((B, C, H, W), device, dtype, gen).contiguous(
                memory_format=torch.channels_last))
        elif kind == "idwt":
            yield "non-contiguous", dict(ll=_rand((B, C, 2 * H, W), device, dtype, gen)[:, :, ::2],
                                         high=_rand((B, 3, C, H, W), device, dtype, gen).transpose(1, 2))
        elif kind == "down":
            yield "non-contiguous", dict(x=_rand((B, C, W, H), device, dtype, gen).transpose(2, 3),
                                         gates=_gates(1, C, device, dtype, gen).expand(B, 4, C))
        else:
            yield "non-contiguous", dict(x=_rand((B, 4 * C, W, H), device, dtype, gen).transpose(2, 3),
                                         gates=_gates(B, C, device, dtype, gen).transpose(1, 2).contiguous()
                                         .transpose(1, 2))
    return sample_inputs


def _register(name, kind, fn, reference, checker, library_op):
    return register(Op(
        name=name, fn=fn, backends=BACKENDS, reference=reference, check=checker, tolerances=TOLERANCES,
        sample_inputs=_samples(kind), dispatch_key=_dispatch_key, library_op=library_op,
        library_args=lambda **kw: tuple(kw.values()),
        eager=lambda **kw: reference(**kw, compute_dtype=next(iter(kw.values())).dtype),
        make_out=lambda kw: _unpack(checker(**kw).out)))


def _unpack(outs: tuple[torch.Tensor, ...]):
    return outs[0] if len(outs) == 1 else outs


REGISTRY_OPS = {
    "haar_dwt2": _register("haar_dwt2", "dwt", haar_dwt2, haar_dwt2_reference, check_dwt,
                           torch.ops.pydpm.haar_dwt2.default),
    "haar_idwt2": _register("haar_idwt2", "idwt", haar_idwt2, haar_idwt2_reference, check_idwt,
                            torch.ops.pydpm.haar_idwt2.default),
    "wavelet_gate_down": _register("wavelet_gate_down", "down", wavelet_gate_down, wavelet_gate_down_reference,
                                   check_down, torch.ops.pydpm.wavelet_gate_down.default),
    "wavelet_gate_up": _register("wavelet_gate_up", "up", wavelet_gate_up, wavelet_gate_up_reference, check_up,
                                 torch.ops.pydpm.wavelet_gate_up.default),
}
_DISPATCH = REGISTRY_OPS["haar_dwt2"]  # the four Ops share backends: any one dispatches every kind
