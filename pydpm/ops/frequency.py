"""Frequency and NAF-block ops: FF-Parser, SimpleGate, simplified channel attention (SCA).

    ff_parser(x, w)                     y = irfft2(rfft2(x, ortho) · w, ortho),  w: [C, H, W/2+1] complex
    simple_gate(x)                      y = x1 · x2,  (x1, x2) = x.chunk(2, dim=1)
    simplified_channel_attention(x, A, b)  y = x · (A · mean_hw(x) + b)[..., None, None]
    simple_gate_sca(x, A, b)            (g, s): g = simple_gate(x), s = A · mean_hw(g) + b, so that
                                        SCA(SimpleGate(x)) = g · s[..., None, None]

FF-Parser is the learnable frequency filter of MedSegDiff; SimpleGate and SCA are the nonlinearity and
attention of NAFNet's block (Chen et al., "Simple Baselines for Image Restoration", 2022), the block EDiffSR's
EANet is built from. `pydpm.nn` assembles modules from these ops.

What is fused (one pass = one read of the inputs and one write of the outputs):
- ff_parser keeps both FFTs in cuFFT (torch.fft) and fuses everything between them: the complex multiply
  with w and both ortho scalings (folded into one factor 1/(H·W), so torch.fft runs unnormalised and skips
  its two scaling passes). For even W the fused stage also writes the spectrum *packed* for a half-length
  complex inverse (kernels/frequency.py), so the inverse is a c2c FFT: torch copies the input of every c2r
  transform first (cuFFT's c2r overwrites it), the c2c inverse needs no copy. Forward: rfft2, one fused
  pass, c2c inverse, against eager's rfft2, scale, multiply, copy, c2r, scale. The backward is rfft2(dy),
  ONE pass that writes the packed input-side spectrum dY·conj(w) and reduces the weight gradient
  Σ_b conj(X)·dY over the batch in registers, and the c2c inverse; the forward's rfft2(x) is kept for it
  (the packed stage leaves it intact), so the backward does no third FFT.
- simple_gate: one pass forward, one pass backward (both halves of dx written by one kernel).
- simple_gate_sca: SimpleGate and the spatial mean of its output in ONE pass; the scale s is returned, not
  applied, because applying it costs a full read and write of g while the next consumer can absorb it for
  free (NAFBlock folds it into the following 1×1 convolution's weights, per sample). Backward: one pass.
- simplified_channel_attention: two passes (the mean must be complete before any output can be scaled);
  backward two passes (Σ_hw dy·x, then dx = dy·s + Aᵀ(Σ dy·x)/HW) against eager's four or five.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU
path). Module layout: references → argument checks → backends → torch.library registration → public ops
→ sample inputs and registry entries.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from pydpm import _backend
from pydpm.ops._registry import Backend, Op, Tolerance, forced_backend, register, use_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# References (the CPU fallback's definition and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def ff_parser_reference(x, weight, *, compute_dtype=None):
    """FF-Parser as written in MedSegDiff: rfft2 (ortho) → multiply by the complex per-channel map →
    irfft2 (ortho) back to x's size. `weight`: real [C, H, W//2+1, 2] (view_as_complex) or complex
    [C, H, W//2+1]. Computes in `compute_dtype` (default float32, float64 for float64 x)."""
    acc = compute_dtype or _acc(x.dtype)
    w = weight if weight.is_complex() else torch.view_as_complex(weight.to(acc).contiguous())
    spectrum = torch.fft.rfft2(x.to(acc), norm="ortho")
    y = torch.fft.irfft2(spectrum * w.to(spectrum.dtype), s=x.shape[-2:], norm="ortho")
    return y.to(x.dtype)


def simple_gate_reference(x, *, compute_dtype=None):
    """NAFNet's SimpleGate: split the channels in two halves and multiply them."""
    x1, x2 = x.to(compute_dtype or _acc(x.dtype)).chunk(2, dim=1)
    return (x1 * x2).to(x.dtype)


def _spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """mean over every dim after the first two: [B, C, ...] -> [B, C]."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).mean(dim=2)


def _sca_scale(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """s = conv1x1(avgpool(g)) as [B, C]: weight · mean_hw(g) + bias, in g's dtype."""
    C = g.shape[1]
    s = _spatial_mean(g) @ weight.reshape(C, C).to(g.dtype).t()
    return s if bias is None else s + bias.to(g.dtype)


def _per_channel(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape + (1,) * (like.dim() - 2))


def simplified_channel_attention_reference(x, weight, bias=None, *, compute_dtype=None):
    """NAFNet's simplified channel attention: x · conv1x1(AdaptiveAvgPool2d(1)(x)), with the 1×1
    convolution's weight [C, C(, 1, 1)] and bias [C] (or None)."""
    xa = x.to(compute_dtype or _acc(x.dtype))
    return (xa * _per_channel(_sca_scale(xa, weight, bias), xa)).to(x.dtype)


def simple_gate_sca_reference(x, weight, bias=None, *, compute_dtype=None):
    """(g, s) with g = SimpleGate(x) and s = conv1x1(avgpool(g)) [B, C]: SCA(SimpleGate(x)) = g·s[..., None, None]."""
    x1, x2 = x.to(compute_dtype or _acc(x.dtype)).chunk(2, dim=1)
    g = x1 * x2
    return g.to(x.dtype), _sca_scale(g, weight, bias).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Arguments: checked at the boundary, then handed to a backend
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class FFArgs:
    """A checked ff_parser call. `weight` is the real view [C, H, W/2+1, 2]. In the backward stage `x` is dy
    (it decides dispatch: device and dtype), `spectrum` the forward's unnormalised rfft2(x) or None."""

    x: torch.Tensor
    weight: torch.Tensor
    out: torch.Tensor | None = None
    keep_spectrum: bool = False
    backward: bool = False
    spectrum: torch.Tensor | None = None
    need_dx: bool = True


@dataclasses.dataclass(slots=True)
class GateArgs:
    """A checked call of one stage of the SimpleGate / SCA family (see the *_run functions). `weight` is the
    1×1 convolution's [C, C] view; `x` is the forward input in every stage."""

    stage: str
    x: torch.Tensor
    out: Any = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    need_dx: bool = True


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _check_x(op: str, x, min_dim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, f"x must be a torch.Tensor {what}, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"x has dtype {x.dtype}; pass float32, float16, bfloat16 or float64 (cast with .float())")
    if x.dim() < min_dim:
        _fail(op, f"x has shape {tuple(x.shape)}; it must be {what}")


def _check_param(op: str, name: str, t, shape: Sequence[int], x: torch.Tensor, hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor of shape {list(shape)} ({hint}), got {type(t).__name__}")
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device} but x is on {x.device}; move it with .to(x.device)")
    if not t.is_floating_point():
        _fail(op, f"{name} has dtype {t.dtype}; it must be a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} has shape {tuple(t.shape)}; x of shape {tuple(x.shape)} needs {list(shape)} ({hint})")


def _check_out(op: str, name: str, out, shape: Sequence[int], dtype: torch.dtype, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(out).__name__}")
    if out.device != x.device:
        _fail(op, f"{name} is on {out.device} but x is on {x.device}; allocate it on x's device")
    if out.dtype != dtype:
        _fail(op, f"{name} has dtype {out.dtype}; it must be {dtype} (x's dtype)")
    if tuple(out.shape) != tuple(shape):
        _fail(op, f"{name} has shape {tuple(out.shape)}; it must be {list(shape)}")


def real_weight(weight: torch.Tensor) -> torch.Tensor:
    """The real view [C, H, W/2+1, 2] of an FF-Parser weight given real or complex (differentiable)."""
    return torch.view_as_real(weight) if isinstance(weight, torch.Tensor) and weight.is_complex() else weight


def check_ff_parser(x, weight, *, out=None) -> FFArgs:
    """Validate a call of `ff_parser`. Messages name the argument, what was expected and the fix."""
    op = "ff_parser"
    _check_x(op, x, 4, "[B, C, H, W]")
    if x.dim() != 4:
        _fail(op, f"x has shape {tuple(x.shape)}; it must be [B, C, H, W] (4-D)")
    B, C, H, W = x.shape
    if isinstance(weight, torch.Tensor) and weight.is_complex():
        if tuple(weight.shape) != (C, H, W // 2 + 1):
            _fail(op, f"weight (complex) has shape {tuple(weight.shape)}; x of shape {tuple(x.shape)} needs "
                      f"[{C}, {H}, {W // 2 + 1}] = [C, H, W//2+1] (the half spectrum of rfft2)")
        if weight.device != x.device:
            _fail(op, f"weight is on {weight.device} but x is on {x.device}; move it with .to(x.device)")
        weight = torch.view_as_real(weight)
    else:
        _check_param(op, "weight", weight, (C, H, W // 2 + 1, 2), x,
                     "real and imaginary parts of the half-spectrum map, as torch.view_as_real gives; or pass "
                     "a complex [C, H, W//2+1] tensor")
    if out is not None:
        _check_out(op, "out", out, x.shape, x.dtype, x)
    return FFArgs(x=x, weight=weight, out=out)


def _half_channels(op: str, x: torch.Tensor) -> int:
    if x.shape[1] % 2:
        _fail(op, f"x has {x.shape[1]} channels (shape {tuple(x.shape)}); SimpleGate splits dim 1 in two halves, "
                  f"so it must be even")
    return x.shape[1] // 2


def _sca_params(op: str, weight, bias, C: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    hint = "the 1×1 convolution over the pooled channels: [C, C, 1, 1] as nn.Conv2d(C, C, 1) holds it, or [C, C]"
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        _check_param(op, "weight", weight, (C, C, 1, 1), x, hint)
    else:
        _check_param(op, "weight", weight, (C, C), x, hint)
    if bias is not None:
        _check_param(op, "bias", bias, (C,), x, "the 1×1 convolution's bias; pass None for none")
    return weight.reshape(C, C), bias


def _out_shape(x: torch.Tensor, channels: int) -> tuple[int, ...]:
    return (x.shape[0], channels) + tuple(x.shape[2:])


def check_simple_gate(x, *, out=None) -> GateArgs:
    op = "simple_gate"
    _check_x(op, x, 2, "[B, 2C, ...]")
    C = _half_channels(op, x)
    if out is not None:
        _check_out(op, "out", out, _out_shape(x, C), x.dtype, x)
    return GateArgs("simple_gate", x, out)


def check_simplified_channel_attention(x, weight, bias=None, *, out=None) -> GateArgs:
    op = "simplified_channel_attention"
    _check_x(op, x, 2, "[B, C, ...]")
    w, b = _sca_params(op, weight, bias, x.shape[1], x)
    if out is not None:
        _check_out(op, "out", out, x.shape, x.dtype, x)
    return GateArgs("simplified_channel_attention", x, out, weight=w, bias=b)


def check_simple_gate_sca(x, weight, bias=None, *, out=None) -> GateArgs:
    op = "simple_gate_sca"
    _check_x(op, x, 2, "[B, 2C, ...]")
    C = _half_channels(op, x)
    w, b = _sca_params(op, weight, bias, C, x)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            _fail(op, "out must be a pair (g [B, C, ...], scale [B, C]) of tensors")
        _check_out(op, "out[0] (g)", out[0], _out_shape(x, C), x.dtype, x)
        _check_out(op, "out[1] (scale)", out[1], (x.shape[0], C), x.dtype, x)
    return GateArgs("simple_gate_sca", x, out, weight=w, bias=b)


# --------------------------------------------------------------------------------------------------
# Layouts: the kernels see [B, C, S] views with any strides; anything else is copied once
# --------------------------------------------------------------------------------------------------

def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _alloc(x: torch.Tensor, channels: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output [B, channels, ...] in x's layout family: channels-last for channels-last x, else contiguous.
    (The fake implementations use the same rule, so compiled graphs see the real strides.)"""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(_out_shape(x, channels), dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _viewable(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when the kernels can walk it as [B, C, S], else a contiguous copy (one extra pass)."""
    from pydpm.kernels.frequency import bcs_strides

    if t is None or bcs_strides(t) is not None:
        return t
    return t.contiguous()


def _deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    if out.data_ptr() != result.data_ptr() or out.stride() != result.stride():
        out.copy_(result)
    return out


def _target(out: torch.Tensor | None, x: torch.Tensor, channels: int) -> torch.Tensor:
    """Where a kernel writes: `out` when it can take the kernel's writes directly, else a fresh tensor."""
    from pydpm.kernels.frequency import bcs_strides

    if out is not None and bcs_strides(out) is not None:
        return out
    return _alloc(x, channels)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

def _triton_reasons(args) -> list[str]:
    reason = _backend.triton_reason(args.x.device, forced=forced_backend() == "triton")
    return [reason] if reason else []


def _no_reasons(args) -> list[str]:
    return []


# ---- FF-Parser: torch.fft around one fused stage -------------------------------------------------

def _ff_multiply_reference(spec, weight, out, height, width):
    w = torch.view_as_complex(weight.to(spec.real.dtype).contiguous()) / (height * width)
    torch.mul(spec, w, out=out)


def _ff_grad_reference(dspec, spec, weight, dxspec, height, width):
    scale = 1.0 / (height * width)
    dw = None
    if spec is not None:
        wf = dspec.shape[-1]
        mirrored = torch.ones(wf, dtype=dspec.real.dtype, device=dspec.device)
        mirrored[1:width - wf + 1] = 2.0  # the columns irfft2 also reads as their mirror images
        dw = torch.view_as_real((spec.conj() * dspec).sum(0) * (mirrored * scale))
    if dxspec is not None:
        w = torch.view_as_complex(weight.to(dspec.real.dtype).contiguous())
        torch.mul(dspec, w.conj() * scale, out=dxspec)
    return dw


def _ff_multiply_triton(spec, weight, out, height, width):
    from pydpm.kernels.frequency import ff_parser_fwd

    ff_parser_fwd(spec, weight.contiguous(), out, height, width)


def _ff_grad_triton(dspec, spec, weight, dxout, height, width):
    from pydpm.kernels.frequency import ff_parser_bwd

    return ff_parser_bwd(dspec, spec, weight.contiguous(), dxout, height, width)


def _ff_run(args: FFArgs, multiply, grad_stage, packed: bool):
    """Forward: (y, spectrum or None). Backward (args.backward, args.x = dy): (dx or None, ∂weight or None).

    torch.fft runs unnormalised (rfft2 norm='backward', the inverse norm='forward'): the two ortho factors
    are one 1/(H·W) inside the fused stage, saving torch's two scaling passes. With `packed` (the Triton
    stage) and an even W, the stage writes the packed spectrum and the inverse is a c2c FFT over (H, W/2)
    (`pydpm.kernels.frequency.packed_inverse`), saving the copy torch makes before every c2r transform;
    the forward spectrum then survives the stage, so keeping it for ∂W costs nothing."""
    x = args.x
    B, C, H, W = x.shape
    acc = _acc(x.dtype)
    if x.numel() == 0:  # torch.fft refuses empty batches
        return _ff_empty(args)
    spec = torch.fft.rfft2(x.to(acc).contiguous(), norm="backward").contiguous()
    packed = packed and W % 2 == 0
    if packed:
        from pydpm.kernels.frequency import packed_inverse as inverse
    else:
        def inverse(y_spec):
            return torch.fft.irfft2(y_spec, s=(H, W), norm="forward")
    if not args.backward:
        if packed:
            stage_out = torch.empty((B, C, H, W), dtype=acc, device=x.device)
        else:
            stage_out = torch.empty_like(spec) if args.keep_spectrum else spec
        multiply(spec, args.weight, stage_out, H, W)
        y = inverse(stage_out)
        if args.out is not None:
            return args.out.copy_(y), None
        return y.to(x.dtype), spec if args.keep_spectrum else None
    stage_out = None
    if args.need_dx:
        stage_out = torch.empty((B, C, H, W), dtype=acc, device=x.device) if packed else spec
    dw = grad_stage(spec, args.spectrum, args.weight, stage_out, H, W)
    dx = inverse(stage_out).to(x.dtype) if args.need_dx else None
    return dx, dw


def _ff_empty(args: FFArgs):
    """The results of a call with no elements (an empty batch): empty outputs and a zero weight gradient."""
    x = args.x
    B, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not args.backward:
        spec = x.new_empty((B, C, H, W // 2 + 1), dtype=_complex(x.dtype)) if args.keep_spectrum else None
        return (y if args.out is None else args.out), spec
    dw = torch.zeros(args.weight.shape, dtype=_acc(x.dtype), device=x.device) if args.spectrum is not None else None
    return (y if args.need_dx else None), dw


def _ff_run_triton(args: FFArgs):
    return _ff_run(args, _ff_multiply_triton, _ff_grad_triton, packed=True)


def _ff_run_reference(args: FFArgs):
    return _ff_run(args, _ff_multiply_reference, _ff_grad_reference, packed=False)


# ---- SimpleGate / SCA stages ---------------------------------------------------------------------
# Stages (GateArgs.stage) and what they return:
#   simple_gate                    out = x1·x2
#   simple_gate_backward           dx = [(grad + shift)·x2, (grad + shift)·x1]   (grad or shift may be None)
#   simplified_channel_attention   (y, scale, mean): mean = mean_hw(x), scale = A·mean + b, y = x·scale
#   simplified_channel_attention_backward  (dx or None, t): t = Σ_hw grad·x, dx = grad·scale + (t·A)/S
#   simple_gate_sca                (g, scale in x's dtype, mean): g = x1·x2, mean = mean_hw(g), scale = A·mean + b

def _spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _scale_of(mean: torch.Tensor, args: GateArgs) -> torch.Tensor:
    s = mean @ args.weight.to(mean.dtype).t()
    return s if args.bias is None else s + args.bias.to(mean.dtype)


def _gate_run_triton(args: GateArgs):
    from pydpm.kernels import frequency as k

    x = _viewable(args.x)
    S = _spatial(x)  # (0 gives NaN means, as avgpool does)
    acc = _acc(x.dtype)
    stage = args.stage
    if stage == "simple_gate":
        out = _target(args.out, x, x.shape[1] // 2)
        k.simple_gate_fwd(x, out)
        return _deliver(out, args.out)
    if stage == "simple_gate_backward":
        dx = _alloc(x, x.shape[1])
        k.simple_gate_bwd(_viewable(args.grad), dx, x=x, shift=args.shift)
        return dx
    if stage == "simplified_channel_attention":
        mean = k.simple_gate_fwd(x, None, gate=False, pool=True) / S
        scale = _scale_of(mean, args)
        y = _target(args.out, x, x.shape[1])
        k.simple_gate_bwd(x, y, scale=scale)
        return _deliver(y, args.out), scale, mean
    if stage == "simplified_channel_attention_backward":
        grad = _viewable(args.grad)
        t = k.simple_gate_fwd(x, None, gate=False, pool=True, dy=grad)
        dx = None
        if args.need_dx:
            dx = _alloc(x, x.shape[1])
            k.simple_gate_bwd(grad, dx, scale=args.scale, shift=(t @ args.weight.to(acc)) / S)
        return dx, t
    if stage == "simple_gate_sca":
        out = args.out
        g = _target(out[0] if out is not None else None, x, x.shape[1] // 2)
        mean = k.simple_gate_fwd(x, g, pool=True) / S
        scale = _scale_of(mean, args).to(x.dtype)
        if out is None:
            return g, scale, mean
        return _deliver(g, out[0]), out[1].copy_(scale), mean
    raise AssertionError(stage)


def _gate_run_reference(args: GateArgs):
    x, stage = args.x, args.stage
    acc = _acc(x.dtype)
    xa = x.to(acc)

    def per_channel(s):
        return _per_channel(s, x)

    if stage == "simple_gate":
        out = args.out if args.out is not None else _alloc(x, x.shape[1] // 2)  # the layout the fake promises
        return out.copy_(simple_gate_reference(x))
    if stage == "simple_gate_backward":
        x1, x2 = xa.chunk(2, dim=1)
        v = args.grad.to(acc) if args.grad is not None else torch.zeros_like(x1)
        if args.shift is not None:
            v = v + per_channel(args.shift)
        dx = _alloc(x, x.shape[1])
        dx.copy_(torch.cat([v * x2, v * x1], dim=1))
        return dx
    if stage == "simplified_channel_attention":
        mean = _spatial_mean(xa)
        scale = _scale_of(mean, args)
        y = _alloc(x, x.shape[1]).copy_(xa * per_channel(scale))
        return _deliver(y, args.out), scale, mean
    if stage == "simplified_channel_attention_backward":
        grad = args.grad.to(acc)
        t = (grad * xa).reshape(x.shape[0], x.shape[1], _spatial(x)).sum(dim=2)
        dx = None
        if args.need_dx:
            shift = (t @ args.weight.to(acc)) / _spatial(x)
            dx = _alloc(x, x.shape[1]).copy_(grad * per_channel(args.scale) + per_channel(shift))
        return dx, t
    if stage == "simple_gate_sca":
        x1, x2 = xa.chunk(2, dim=1)
        ga = x1 * x2
        mean = _spatial_mean(ga)
        scale = _scale_of(mean, args).to(x.dtype)
        g = _alloc(x, x.shape[1] // 2).copy_(ga)
        if args.out is None:
            return g, scale, mean
        return args.out[0].copy_(g), args.out[1].copy_(scale), mean
    raise AssertionError(stage)


FF_BACKENDS = (Backend("triton", _ff_run_triton, _triton_reasons), Backend("reference", _ff_run_reference, _no_reasons))
GATE_BACKENDS = (Backend("triton", _gate_run_triton, _triton_reasons),
                 Backend("reference", _gate_run_reference, _no_reasons))


def _dispatch_key(args) -> tuple:
    return args.x.device.type, args.x.dtype


# --------------------------------------------------------------------------------------------------
# torch.library registration (the path autograd and torch.compile take)
# --------------------------------------------------------------------------------------------------
# Outputs that only feed the backward (the spectrum, the pooled means, SCA's fp32 scale) are returned by
# the forward ops, marked non-differentiable, and never materialised as zero gradients. The backend forced
# when the forward ran (PYDPM_BACKEND / use_backend) is re-entered for the backward, which may run on
# autograd's device thread, where the context variable is not set.

def _empty(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((0,), dtype=dtype)


@torch.library.custom_op("pydpm::ff_parser", mutates_args=())
def _ff_op(x: torch.Tensor, weight: torch.Tensor, keep_spectrum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_ff_parser(x, weight)
    args.keep_spectrum = keep_spectrum
    y, spec = FF_OP(args)
    return y, spec if spec is not None else _empty(x, _complex(x.dtype))


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@_ff_op.register_fake
def _(x, weight, keep_spectrum):
    B, C, H, W = x.shape
    cdtype = _complex(x.dtype)
    spec = x.new_empty((B, C, H, W // 2 + 1), dtype=cdtype) if keep_spectrum else _empty(x, cdtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), spec


@torch.library.custom_op("pydpm::ff_parser_backward", mutates_args=())
def _ff_bwd_op(dy: torch.Tensor, spectrum: torch.Tensor, weight: torch.Tensor, need_dx: bool,
               need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = FFArgs(x=dy, weight=weight, backward=True, spectrum=spectrum if need_dw else None, need_dx=need_dx)
    dx, dw = FF_OP(args)
    return (dx if need_dx else _empty(dy, dy.dtype)), (dw.to(weight.dtype) if need_dw else _empty(dy, weight.dtype))


@_ff_bwd_op.register_fake
def _(dy, spectrum, weight, need_dx, need_dw):
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else _empty(dy, dy.dtype)
    dw = weight.new_empty(weight.shape) if need_dw else _empty(dy, weight.dtype)
    return dx, dw


def _ff_setup(ctx, inputs, output):
    x, weight, keep = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, output[1])
    ctx.keep, ctx.backend = keep, forced_backend()


def _ff_backward(ctx, dy, _):
    weight, spec = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.keep
    if dy is None or not (need_dx or need_dw):
        return None, None, None
    with use_backend(ctx.backend):
        dx, dw = _ff_bwd_op(dy, spec, weight, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


_ff_op.register_autograd(_ff_backward, setup_context=_ff_setup)


@torch.library.custom_op("pydpm::simple_gate", mutates_args=())
def _gate_op(x: torch.Tensor) -> torch.Tensor:
    return SIMPLE_GATE_OP(check_simple_gate(x))


@_gate_op.register_fake
def _(x):
    return _alloc(x, x.shape[1] // 2)


@torch.library.custom_op("pydpm::simple_gate_backward", mutates_args=())
def _gate_bwd_op(grad: torch.Tensor | None, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    return SIMPLE_GATE_OP(GateArgs("simple_gate_backward", x, grad=grad, shift=shift))


@_gate_bwd_op.register_fake
def _(grad, x, shift):
    return _alloc(x, x.shape[1])


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.backend = forced_backend()


def _gate_backward(ctx, dg):
    (x,) = ctx.saved_tensors
    with use_backend(ctx.backend):
        return _gate_bwd_op(dg, x, None)


_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


@torch.library.custom_op("pydpm::simplified_channel_attention", mutates_args=())
def _sca_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return SCA_OP(check_simplified_channel_attention(x, weight, bias))


@_sca_op.register_fake
def _(x, weight, bias):
    acc = _acc(x.dtype)
    return _alloc(x, x.shape[1]), x.new_empty((x.shape[0], x.shape[1]), dtype=acc), \
        x.new_empty((x.shape[0], x.shape[1]), dtype=acc)


@torch.library.custom_op("pydpm::simplified_channel_attention_backward", mutates_args=())
def _sca_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[1]
    dx, t = SCA_OP(GateArgs("simplified_channel_attention_backward", x, weight=weight.reshape(C, C), grad=grad,
                            scale=scale, need_dx=need_dx))
    return (dx if need_dx else _empty(x, x.dtype)), t


@_sca_bwd_op.register_fake
def _(grad, x, weight, scale, need_dx):
    return (_alloc(x, x.shape[1]) if need_dx else _empty(x, x.dtype)), \
        x.new_empty((x.shape[0], x.shape[1]), dtype=_acc(x.dtype))


def _sca_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias, ctx.backend = bias is not None, forced_backend()
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _param_grads(ctx, ds: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, bias_dtype: torch.dtype | None):
    """∂weight = dsᵀ·mean (in weight's shape) and ∂bias = Σ_b ds for s = weight·mean + bias."""
    dw = (ds.t() @ mean).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = ds.sum(0).to(bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dw, db


def _sca_backward(ctx, dy, _scale, _mean):
    x, weight, scale, mean = ctx.saved_tensors
    if dy is None:
        return None, None, None
    with use_backend(ctx.backend):
        dx, t = _sca_bwd_op(dy, x, weight, scale, ctx.needs_input_grad[0])
    dw, db = _param_grads(ctx, t, mean, weight, ctx.bias_dtype)
    return (dx if ctx.needs_input_grad[0] else None), dw, db


_sca_op.register_autograd(_sca_backward, setup_context=_sca_setup)


@torch.library.custom_op("pydpm::simple_gate_sca", mutates_args=())
def _gate_sca_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return GATE_SCA_OP(check_simple_gate_sca(x, weight, bias))


@_gate_sca_op.register_fake
def _(x, weight, bias):
    C = x.shape[1] // 2
    return _alloc(x, C), x.new_empty((x.shape[0], C)), x.new_empty((x.shape[0], C), dtype=_acc(x.dtype))


def _gate_sca_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[2])
    ctx.has_bias, ctx.backend = bias is not None, forced_backend()
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _gate_sca_backward(ctx, dg, dscale, _mean):
    x, weight, mean = ctx.saved_tensors
    C = x.shape[1] // 2
    shift = dw = db = dx = None
    if dscale is not None:
        ds = dscale.to(mean.dtype)
        shift = (ds @ weight.reshape(C, C).to(mean.dtype)) / _spatial(x)
        dw, db = _param_grads(ctx, ds, mean, weight, ctx.bias_dtype)
    if ctx.needs_input_grad[0] and (dg is not None or shift is not None):
        with use_backend(ctx.backend):
            dx = _gate_bwd_op(dg, x, shift)
    return dx, dw, db


_gate_sca_op.register_autograd(_gate_sca_backward, setup_context=_gate_sca_setup)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------

def _needs_graph(*ts) -> bool:
    """True when the call must go through torch.library: compiling, or some input needs a gradient."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in ts))


def _no_grad_out(op: str, out, *ts) -> None:
    if out is not None and _needs_graph(*ts) and not torch.compiler.is_compiling():
        _fail(op, "out= is not differentiable (like torch's out= arguments); drop out= to get gradients, or "
                  "run under torch.no_grad()")


def ff_parser(x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """FF-Parser (MedSegDiff): y = irfft2(rfft2(x, norm='ortho') · W, s=(H, W), norm='ortho').

    Args:
        x: [B, C, H, W], float32/float16/bfloat16/float64 (FFTs run in float32, float64 for float64).
        weight: the learnable per-channel complex map W: a real tensor [C, H, W//2+1, 2] holding real and
            imaginary parts (torch.view_as_complex's layout; `pydpm.nn.FFParser` stores it so), or a
            complex tensor [C, H, W//2+1]. Any floating dtype; read in float32.
        out: optional [B, C, H, W] tensor of x's dtype to write (not differentiable).

    cuFFT (torch.fft) does both FFTs, unnormalised; the complex multiply and both ortho scales are one
    fused pass between them, which for even W also packs the spectrum so that the inverse is a c2c FFT
    (no input copy, unlike torch's c2r). Backward: rfft2(dy), one fused pass giving the input-side spectrum
    and ∂W = Σ_b conj(X)·dY (m = 2 on mirrored columns), the inverse; the forward's spectrum is kept for ∂W
    when W requires grad. Channels-last x is copied to NCHW first; the output is contiguous (NCHW).
    Unfused equivalent: `ff_parser_reference`.
    """
    _no_grad_out("ff_parser", out, x, weight)
    args = check_ff_parser(x, weight, out=out)
    if _needs_graph(x, weight):
        y = _ff_op(x, args.weight, bool(torch.is_grad_enabled() and args.weight.requires_grad))[0]
        return y if out is None else out.copy_(y)
    return FF_OP(args)[0]


def simple_gate(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """NAFNet's SimpleGate: x [B, 2C, ...] → x[:, :C] · x[:, C:] [B, C, ...]. One pass; the backward (both
    halves of dx) is one pass. Contiguous and channels-last layouts run as they are. Unfused equivalent:
    `simple_gate_reference` (x.chunk(2, dim=1) then a product)."""
    _no_grad_out("simple_gate", out, x)
    args = check_simple_gate(x, out=out)
    if _needs_graph(x):
        y = _gate_op(x)
        return y if out is None else out.copy_(y)
    return SIMPLE_GATE_OP(args)


def simplified_channel_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                                 out: torch.Tensor | None = None) -> torch.Tensor:
    """NAFNet's simplified channel attention: y = x · conv1x1(avgpool(x)) = x · (A·mean_hw(x) + b).

    Args:
        x: [B, C, ...] (the mean is over every dim after the channels).
        weight: A, the 1×1 convolution's weight [C, C, 1, 1] (nn.Conv2d's) or [C, C].
        bias: b [C] or None.

    Two passes (the spatial mean, then the scaled write), mean and scale in fp32; backward: two passes
    (Σ_hw dy·x, then dx = dy·s + Aᵀ(Σ_hw dy·x)/HW). Unfused equivalent: `simplified_channel_attention_reference`.
    """
    _no_grad_out("simplified_channel_attention", out, x, weight, bias)
    args = check_simplified_channel_attention(x, weight, bias, out=out)
    if _needs_graph(x, weight, bias):
        y = _sca_op(x, weight, bias)[0]
        return y if out is None else out.copy_(y)
    return SCA_OP(args)[0]


def simple_gate_sca(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SimpleGate followed by simplified channel attention, with the final multiply left to the caller:

        g = x[:, :C] · x[:, C:]            [B, C, ...]
        s = A · mean_hw(g) + b              [B, C]
        SCA(SimpleGate(x)) = g · s[:, :, None, None]

    One pass writes g and reduces its spatial mean (fp32) at once. Applying s here would cost another read
    and write of g; a following 1×1 convolution absorbs it into its weights per sample instead
    (`pydpm.nn.NAFBlock` does), and elementwise consumers can multiply it into their own pass. Backward: one
    pass (dx from dg and the scale's gradient). `out`: an optional (g, s) pair. Unfused equivalent:
    `simple_gate_sca_reference`.
    """
    _no_grad_out("simple_gate_sca", out, x, weight, bias)
    args = check_simple_gate_sca(x, weight, bias, out=out)
    if _needs_graph(x, weight, bias):
        g, s, _ = _gate_sca_op(x, weight, bias)
        if out is None:
            return g, s
        out[0].copy_(g)
        out[1].copy_(s)
        return out
    g, s, _ = GATE_SCA_OP(args)
    return (g, s) if out is None else out


# --------------------------------------------------------------------------------------------------
# Sample inputs, tolerances and registry entries
# --------------------------------------------------------------------------------------------------

# DESIGN.md §3: fused error <= 2x the eager composition's in the same dtype; these bound the error against
# the float64 reference for unit-scale inputs (bf16 also covers the interpreter's truncating casts).
TOLERANCES = {torch.float64: Tolerance(1e-12, 1e-12), torch.float32: Tolerance(1e-5, 1e-5),
              torch.float16: Tolerance(2e-3, 2e-3), torch.bfloat16: Tolerance(1.6e-2, 1.6e-2)}


def _rand(shape, device, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _ff_samples(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """FF-Parser calls: C = 1, 3, 7; H ≠ W; odd and even W; 1×1 and 2×2 maps; batch 1; layouts; weight forms."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 1, 4, 6), (2, 3, 8, 8)]
    if not small:
        shapes += [(2, 4, 32, 32), (1, 8, 33, 31)]

    def weight(C, H, W, wdtype=dtype):
        return _rand((C, H, W // 2 + 1, 2), device, wdtype, gen)

    for shape in shapes:
        yield "x".join(map(str, shape)), dict(x=_rand(shape, device, dtype, gen), weight=weight(*shape[1:]))
    B, C, H, W = 2, 3, 6, 10
    yield "non-contiguous", dict(x=_rand((B, C, W, H), device, dtype, gen).transpose(2, 3), weight=weight(C, H, W))
    yield "channels-last", dict(x=_rand((B, C, H, W), device, dtype, gen).contiguous(memory_format=torch.channels_last),
                                weight=weight(C, H, W))
    yield "complex-weight", dict(x=_rand((B, C, H, W), device, dtype, gen),
                                 weight=torch.view_as_complex(weight(C, H, W, torch.float64)).to(
                                     _complex(dtype if dtype == torch.float64 else torch.float32)))
    yield "fp32-weight", dict(x=_rand((B, C, H, W), device, dtype, gen), weight=weight(C, H, W, torch.float32))


def _gate_shapes(small: bool, factor: int):
    """(B, channels, spatial...) with C = 1, 3, 7 (times `factor` in the channel dim), H ≠ W, 1×1 and 2×2
    maps, batch 1, and 2-D / 3-D inputs."""
    shapes = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 3, 4, 6), (2, 4, 8, 8), (3, 3), (2, 3, 9)]
    if not small:
        shapes += [(2, 32, 32, 32), (1, 16, 33, 31)]
    return [(s[0], s[1] * factor) + s[2:] for s in shapes]


def _gate_layouts(device, dtype, gen, factor: int):
    B, C, H, W = 2, 3 * factor, 6, 10
    yield "non-contiguous", _rand((B, C, W, H), device, dtype, gen).transpose(2, 3)
    yield "channels-last", _rand((B, C, H, W), device, dtype, gen).contiguous(memory_format=torch.channels_last)
    yield "channel-slice", _rand((B, C + 2, H, W), device, dtype, gen)[:, 1:C + 1]


def _simple_gate_samples(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    for shape in _gate_shapes(small, 2):
        yield "x".join(map(str, shape)), dict(x=_rand(shape, device, dtype, gen))
    for name, x in _gate_layouts(device, dtype, gen, 2):
        yield name, dict(x=x)


def _sca_params_sample(C, device, dtype, gen, conv_shape: bool, with_bias: bool):
    w = _rand((C, C, 1, 1) if conv_shape else (C, C), device, dtype, gen) / math.sqrt(C)
    return dict(weight=w, bias=_rand((C,), device, dtype, gen) if with_bias else None)


def _sca_samples(factor: int):
    def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
        device, gen = torch.device(device), torch.Generator().manual_seed(seed)
        for i, shape in enumerate(_gate_shapes(small, factor)):
            C = shape[1] // factor
            params = _sca_params_sample(C, device, dtype, gen, conv_shape=i % 2 == 0, with_bias=i % 3 != 2)
            yield "x".join(map(str, shape)), dict(x=_rand(shape, device, dtype, gen), **params)
        for name, x in _gate_layouts(device, dtype, gen, factor):
            yield name, dict(x=x, **_sca_params_sample(x.shape[1] // factor, device, dtype, gen, True, True))
    return sample_inputs


def _poisoned(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=like.dtype, device=like.device)


def _requiring_grad(*ts):
    return tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in ts)


def _ff_library_args(x, weight):
    x, w = _requiring_grad(x, real_weight(weight).detach())
    return x, w, True


FF_OP = register(Op(
    name="ff_parser", fn=ff_parser, backends=FF_BACKENDS, reference=ff_parser_reference, check=check_ff_parser,
    tolerances=TOLERANCES, sample_inputs=_ff_samples, dispatch_key=_dispatch_key,
    # torch.fft has no bfloat16 (and only power-of-two float16) transforms: the eager composition, as in
    # MedSegDiff, casts to float32, which is the reference.
    eager=lambda **kw: ff_parser_reference(**kw),
    library_op=torch.ops.pydpm.ff_parser.default, library_args=_ff_library_args,
    make_out=lambda kw: _poisoned(kw["x"].shape, kw["x"]),
))

SIMPLE_GATE_OP = register(Op(
    name="simple_gate", fn=simple_gate, backends=GATE_BACKENDS, reference=simple_gate_reference,
    check=check_simple_gate, tolerances=TOLERANCES, sample_inputs=_simple_gate_samples, dispatch_key=_dispatch_key,
    eager=lambda **kw: simple_gate_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=torch.ops.pydpm.simple_gate.default, library_args=lambda x: _requiring_grad(x),
    make_out=lambda kw: _poisoned(_out_shape(kw["x"], kw["x"].shape[1] // 2), kw["x"]),
))

SCA_OP = register(Op(
    name="simplified_channel_attention", fn=simplified_channel_attention, backends=GATE_BACKENDS,
    reference=simplified_channel_attention_reference, check=check_simplified_channel_attention,
    tolerances=TOLERANCES, sample_inputs=_sca_samples(1), dispatch_key=_dispatch_key,
    eager=lambda **kw: simplified_channel_attention_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=torch.ops.pydpm.simplified_channel_attention.default,
    library_args=lambda x, weight, bias=None: _requiring_grad(x, weight, bias),
    make_out=lambda kw: _poisoned(kw["x"].shape, kw["x"]),
))

GATE_SCA_OP = register(Op(
    name="simple_gate_sca", fn=simple_gate_sca, backends=GATE_BACKENDS, reference=simple_gate_sca_reference,
    check=check_simple_gate_sca, tolerances=TOLERANCES, sample_inputs=_sca_samples(2), dispatch_key=_dispatch_key,
    eager=lambda **kw: simple_gate_sca_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=torch.ops.pydpm.simple_gate_sca.default,
    library_args=lambda x, weight, bias=None: _requiring_grad(x, weight, bias),
    make_out=lambda kw: (_poisoned(_out_shape(kw["x"], kw["x"].shape[1] // 2), kw["x"]),
                         _poisoned((kw["x"].shape[0], kw["x"].shape[1] // 2), kw["x"])),
))
