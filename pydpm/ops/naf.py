"""The NAF-block gates: SimpleGate and simplified channel attention (SCA), the nonlinearity and attention of
NAFNet's block (Chen et al., "Simple Baselines for Image Restoration", 2022), the block EDiffSR's EANet is
built from. `pydpm.nn` assembles modules from these ops.

    simple_gate(x)                      y = x1 · x2,  (x1, x2) = x.chunk(2, dim=1)
    simplified_channel_attention(x, A, b)  y = x · (A · mean_hw(x) + b)[..., None, None]
    simple_gate_sca(x, A, b)            (g, s): g = simple_gate(x), s = A · mean_hw(g) + b, so that
                                        SCA(SimpleGate(x)) = g · s[..., None, None]

What is fused (one pass = one read of the inputs and one write of the outputs):
- simple_gate: one pass forward, one pass backward (both halves of dx written by one kernel).
- simple_gate_sca: SimpleGate and the spatial mean of its output in ONE pass; the scale s is returned, not
  applied, because applying it costs a full read and write of g while the next consumer can absorb it for
  free (NAFBlock folds it into the following 1×1 convolution's weights, per sample). Backward: one pass.
- simplified_channel_attention: two passes (the mean must be complete before any output can be scaled);
  backward two passes (Σ_hw dy·x, then dx = dy·s + Aᵀ(Σ_hw dy·x)/HW) against eager's four or five.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU
path). Module layout (the op framework's skeleton, pydpm/ops/_framework.py): references → argument checks →
layouts → backends → registration (differentiable ops, public ops) → sample inputs and registry entries.
"""
from __future__ import annotations

import math

import torch

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, Backend, BadInput, Differentiable, Entry, Op, acc_dtype,
                                  check_no_alias, check_out, check_param, check_tensor, fail, fail_type, no_output,
                                  register, sample_maker, sample_tensor, tensor_mutations, triton_reasons)


# --------------------------------------------------------------------------------------------------
# References (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def simple_gate_reference(x, *, compute_dtype=None):
    """NAFNet's SimpleGate: split the channels in two halves and multiply them."""
    x1, x2 = x.to(compute_dtype or acc_dtype(x.dtype)).chunk(2, dim=1)
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
    xa = x.to(compute_dtype or acc_dtype(x.dtype))
    return (xa * _per_channel(_sca_scale(xa, weight, bias), xa)).to(x.dtype)


def simple_gate_sca_reference(x, weight, bias=None, *, compute_dtype=None):
    """(g, s) with g = SimpleGate(x) and s = conv1x1(avgpool(g)) [B, C]: SCA(SimpleGate(x)) = g·s[..., None, None]."""
    x1, x2 = x.to(compute_dtype or acc_dtype(x.dtype)).chunk(2, dim=1)
    g = x1 * x2
    return g.to(x.dtype), _sca_scale(g, weight, bias).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Arguments: checked at the boundary, then handed to a backend
# --------------------------------------------------------------------------------------------------

class GateArgs:
    """A checked call of one stage of the family (see the backends' stage list). `weight` is the 1×1
    convolution's [C, C] view; `x` is the forward input in every stage."""

    __slots__ = ("stage", "x", "out", "weight", "bias", "grad", "scale", "shift", "need_dx")

    def __init__(self, stage, x, out=None, weight=None, bias=None, grad=None, scale=None, shift=None, need_dx=True):
        self.stage, self.x, self.out, self.weight, self.bias = stage, x, out, weight, bias
        self.grad, self.scale, self.shift, self.need_dx = grad, scale, shift, need_dx


def _half_channels(op: str, x: torch.Tensor) -> int:
    if x.shape[1] % 2:
        fail(op, f"x has {x.shape[1]} channels (shape {tuple(x.shape)}); SimpleGate splits dim 1 in two halves, "
                  f"so it must be even")
    return x.shape[1] // 2


def _sca_params(op: str, weight, bias, C: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    hint = "the 1×1 convolution over the pooled channels: [C, C, 1, 1] as nn.Conv2d(C, C, 1) holds it, or [C, C]"
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        check_param(op, "weight", weight, (C, C, 1, 1), x, hint)
    else:
        check_param(op, "weight", weight, (C, C), x, hint)
    if bias is not None:
        check_param(op, "bias", bias, (C,), x, "the 1×1 convolution's bias; pass None for none")
    return weight.reshape(C, C), bias


def _out_shape(x: torch.Tensor, channels: int) -> tuple[int, ...]:
    return (x.shape[0], channels) + tuple(x.shape[2:])


def check_simple_gate(x, *, out=None) -> GateArgs:
    op = "simple_gate"
    check_tensor(op, "x", x, min_dims=2, what="[B, 2C, ...]")
    C = _half_channels(op, x)
    if out is not None:
        check_out(op, "out", out, _out_shape(x, C), x.dtype, x)
        check_no_alias(op, (("out", out),), (("x", x),))
    return GateArgs("simple_gate", x, out)


def check_simplified_channel_attention(x, weight, bias=None, *, out=None) -> GateArgs:
    op = "simplified_channel_attention"
    check_tensor(op, "x", x, min_dims=2, what="[B, C, ...]")
    w, b = _sca_params(op, weight, bias, x.shape[1], x)
    if out is not None:
        check_out(op, "out", out, x.shape, x.dtype, x)
        check_no_alias(op, (("out", out),), (("x", x), ("weight", weight), ("bias", bias)), same_ok=("x",))
    return GateArgs("simplified_channel_attention", x, out, weight=w, bias=b)


def check_simple_gate_sca(x, weight, bias=None, *, out=None) -> GateArgs:
    op = "simple_gate_sca"
    check_tensor(op, "x", x, min_dims=2, what="[B, 2C, ...]")
    C = _half_channels(op, x)
    w, b = _sca_params(op, weight, bias, C, x)
    if out is not None:
        if not isinstance(out, (tuple, list)):
            fail_type(op, f"out must be a pair (g [B, C, ...], scale [B, C]) of tensors, got {type(out).__name__}")
        if len(out) != 2:
            fail(op, f"out must be a pair (g [B, C, ...], scale [B, C]) of tensors, got {len(out)} items")
        check_out(op, "out[0] (g)", out[0], _out_shape(x, C), x.dtype, x)
        check_out(op, "out[1] (scale)", out[1], (x.shape[0], C), x.dtype, x)
        check_no_alias(op, (("out[0] (g)", out[0]), ("out[1] (scale)", out[1])),
                       (("x", x), ("weight", weight), ("bias", bias)))
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
    if t is None or _backend.kernels("naf").bcs_strides(t) is not None:
        return t
    return t.contiguous()


def _write_into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    if out.data_ptr() != result.data_ptr() or out.stride() != result.stride():
        out.copy_(result)
    return out


def _target(out: torch.Tensor | None, x: torch.Tensor, channels: int) -> torch.Tensor:
    """Where a kernel writes: `out` when it can take the kernel's writes directly, else a fresh tensor."""
    if out is not None and _backend.kernels("naf").bcs_strides(out) is not None:
        return out
    return _alloc(x, channels)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
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


def _run_triton(args: GateArgs):
    k = _backend.kernels("naf")
    x = _viewable(args.x)
    S = _spatial(x)  # (0 gives NaN means, as avgpool does)
    acc = acc_dtype(x.dtype)
    stage = args.stage
    if stage == "simple_gate":
        out = _target(args.out, x, x.shape[1] // 2)
        k.simple_gate_fwd(x, out)
        return _write_into(out, args.out)
    if stage == "simple_gate_backward":
        dx = _alloc(x, x.shape[1])
        k.simple_gate_bwd(_viewable(args.grad), dx, x=x, shift=args.shift)
        return dx
    if stage == "simplified_channel_attention":
        mean = k.simple_gate_fwd(x, None, gate=False, pool=True) / S
        scale = _scale_of(mean, args)
        y = _target(args.out, x, x.shape[1])
        k.simple_gate_bwd(x, y, scale=scale)
        return _write_into(y, args.out), scale, mean
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
        return _write_into(g, out[0]), out[1].copy_(scale), mean
    raise AssertionError(stage)


def _run_reference(args: GateArgs):
    x, stage = args.x, args.stage
    acc = acc_dtype(x.dtype)
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
        return _write_into(y, args.out), scale, mean
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

BACKENDS = (Backend("triton", _run_triton, lambda args: triton_reasons(args.x.device)),
            Backend("reference", _run_reference, lambda args: []))


def _dispatch_key(args) -> tuple:
    return args.stage, args.x.is_cuda, args.x.is_cpu, args.x.dtype


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable ops
# --------------------------------------------------------------------------------------------------
# Outputs that only feed the backward (the pooled means, SCA's fp32 scale) are returned by the forward ops,
# marked non-differentiable, and never materialised as zero gradients.

def _gate_forward(x: torch.Tensor) -> torch.Tensor:
    return SIMPLE_GATE_OP(check_simple_gate(x))


def _gate_fake(x):
    return _alloc(x, x.shape[1] // 2)


def _gate_backward(grad: torch.Tensor | None, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """dx of SimpleGate (and of simple_gate_sca): [(grad + shift)·x2, (grad + shift)·x1]."""
    return SIMPLE_GATE_OP(GateArgs("simple_gate_backward", x, grad=grad, shift=shift))


def _gate_backward_fake(grad, x, shift):
    return _alloc(x, x.shape[1])


def _gate_save(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _gate_grads(ctx, backward, dg):
    (x,) = ctx.saved_tensors
    return (backward(dg, x, None),)


def _sca_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return SCA_OP(check_simplified_channel_attention(x, weight, bias))


def _sca_fake(x, weight, bias):
    acc = acc_dtype(x.dtype)
    return _alloc(x, x.shape[1]), x.new_empty((x.shape[0], x.shape[1]), dtype=acc), \
        x.new_empty((x.shape[0], x.shape[1]), dtype=acc)


def _sca_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[1]
    dx, t = SCA_OP(GateArgs("simplified_channel_attention_backward", x, weight=weight.reshape(C, C), grad=grad,
                            scale=scale, need_dx=need_dx))
    return (dx if need_dx else no_output(x, x.dtype)), t


def _sca_backward_fake(grad, x, weight, scale, need_dx):
    return (_alloc(x, x.shape[1]) if need_dx else no_output(x, x.dtype)), \
        x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


def _sca_save(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _param_grads(ctx, ds: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor):
    """∂weight = dsᵀ·mean (in weight's shape) and ∂bias = Σ_b ds for s = weight·mean + bias."""
    dw = (ds.t() @ mean).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = ds.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dw, db


def _sca_grads(ctx, backward, dy, _scale, _mean):
    x, weight, scale, mean = ctx.saved_tensors
    if dy is None:
        return None, None, None
    dx, t = backward(dy, x, weight, scale, ctx.needs_input_grad[0])
    dw, db = _param_grads(ctx, t, mean, weight)
    return (dx if ctx.needs_input_grad[0] else None), dw, db


def _gate_sca_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return GATE_SCA_OP(check_simple_gate_sca(x, weight, bias))


def _gate_sca_fake(x, weight, bias):
    C = x.shape[1] // 2
    return _alloc(x, C), x.new_empty((x.shape[0], C)), x.new_empty((x.shape[0], C), dtype=acc_dtype(x.dtype))


def _gate_sca_save(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[2])
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _gate_sca_grads(ctx, backward, dg, dscale, _mean):
    x, weight, mean = ctx.saved_tensors
    C = x.shape[1] // 2
    shift = dw = db = dx = None
    if dscale is not None:
        ds = dscale.to(mean.dtype)
        shift = (ds @ weight.reshape(C, C).to(mean.dtype)) / _spatial(x)
        dw, db = _param_grads(ctx, ds, mean, weight)
    if ctx.needs_input_grad[0] and (dg is not None or shift is not None):
        dx = backward(dg, x, shift)
    return dx, dw, db


GATE_GRAD = Differentiable("simple_gate", forward=_gate_forward, forward_fake=_gate_fake, backward=_gate_backward,
                           backward_fake=_gate_backward_fake, save=_gate_save, grads=_gate_grads)
SCA_GRAD = Differentiable("simplified_channel_attention", forward=_sca_forward, forward_fake=_sca_fake,
                          backward=_sca_backward, backward_fake=_sca_backward_fake, save=_sca_save, grads=_sca_grads)
GATE_SCA_GRAD = Differentiable("simple_gate_sca", forward=_gate_sca_forward, forward_fake=_gate_sca_fake,
                               backward=_gate_backward, backward_fake=_gate_backward_fake, save=_gate_sca_save,
                               grads=_gate_sca_grads)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------

def simple_gate(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """NAFNet's SimpleGate: x [B, 2C, ...] → x[:, :C] · x[:, C:] [B, C, ...]. One pass; the backward (both
    halves of dx) is one pass. Contiguous and channels-last layouts run as they are. Unfused equivalent:
    `simple_gate_reference` (x.chunk(2, dim=1) then a product).

    Aliasing: `out` must not share memory with x (not even x[:, :C]) nor within itself (an expand()ed view);
    such calls raise."""
    return _GATE(x, out=out)


def simplified_channel_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                                 out: torch.Tensor | None = None) -> torch.Tensor:
    """NAFNet's simplified channel attention: y = x · conv1x1(avgpool(x)) = x · (A·mean_hw(x) + b).

    Args:
        x: [B, C, ...] (the mean is over every dim after the channels).
        weight: A, the 1×1 convolution's weight [C, C, 1, 1] (nn.Conv2d's) or [C, C].
        bias: b [C] or None.

    Two passes (the spatial mean, then the scaled write), mean and scale in fp32; backward: two passes
    (Σ_hw dy·x, then dx = dy·s + Aᵀ(Σ_hw dy·x)/HW). Unfused equivalent: `simplified_channel_attention_reference`.

    Aliasing: out=x (the same tensor) scales x in place (the mean is complete before any element is
    written); any other out that shares memory with x, weight or bias, or within itself (an expand()ed view),
    raises.
    """
    return _SCA(x, weight, bias, out=out)


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

    Aliasing: g and s must not share memory with x, weight, bias, each other, or within themselves (an
    expand()ed view); such calls raise.
    """
    return _GATE_SCA(x, weight, bias, out=out)


# --------------------------------------------------------------------------------------------------
# Sample inputs and registry entries
# --------------------------------------------------------------------------------------------------

def _gate_shapes(small: bool, factor: int):
    """(B, channels, spatial...) with C = 1, 3, 7 (times `factor` in the channel dim), H ≠ W, 1×1 and 2×2
    maps, batch 1, and 2-D / 3-D inputs."""
    shapes = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 3, 4, 6), (2, 4, 8, 8), (3, 3), (2, 3, 9)]
    if not small:
        shapes += [(2, 32, 32, 32), (1, 16, 33, 31)]
    return [(s[0], s[1] * factor) + s[2:] for s in shapes]


def _gate_layouts(device, dtype, gen, factor: int):
    B, C, H, W = 2, 3 * factor, 6, 10
    yield "non-contiguous", sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3)
    yield "channels-last", sample_tensor((B, C, H, W), device, dtype, gen).contiguous(memory_format=torch.channels_last)
    yield "channel-slice", sample_tensor((B, C + 2, H, W), device, dtype, gen)[:, 1:C + 1]


def _simple_gate_samples(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    for shape in _gate_shapes(small, 2):
        yield "x".join(map(str, shape)), dict(x=sample_tensor(shape, device, dtype, gen))
    for name, x in _gate_layouts(device, dtype, gen, 2):
        yield name, dict(x=x)


def _sca_params_sample(C, device, dtype, gen, conv_shape: bool, with_bias: bool):
    w = sample_tensor((C, C, 1, 1) if conv_shape else (C, C), device, dtype, gen) / math.sqrt(C)
    return dict(weight=w, bias=sample_tensor((C,), device, dtype, gen) if with_bias else None)


def _sca_samples(factor: int):
    def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
        device, gen = torch.device(device), torch.Generator().manual_seed(seed)
        for i, shape in enumerate(_gate_shapes(small, factor)):
            C = shape[1] // factor
            params = _sca_params_sample(C, device, dtype, gen, conv_shape=i % 2 == 0, with_bias=i % 3 != 2)
            yield "x".join(map(str, shape)), dict(x=sample_tensor(shape, device, dtype, gen), **params)
        for name, x in _gate_layouts(device, dtype, gen, factor):
            yield name, dict(x=x, **_sca_params_sample(x.shape[1] // factor, device, dtype, gen, True, True))
    return sample_inputs


def _poisoned(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=like.dtype, device=like.device)


def _requiring_grad(*ts):
    return tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in ts)


def _bad_inputs(stage: str):
    """The bad-input axis of one op of the family (BadInput: what must be refused, what has a defined result)."""
    def bad_inputs(device):
        device = torch.device(device)
        r = sample_maker(device)

        B, C, H, W = 2, 3, 4, 5
        gate = stage != "simplified_channel_attention"
        Cx = 2 * C if gate else C
        oshape = (B, C, H, W)
        if stage == "simple_gate":
            def base():
                return dict(x=r(B, Cx, H, W))
            yield from tensor_mutations(base, ("x",), anchor="x")
        else:
            def base():
                return dict(x=r(B, Cx, H, W), weight=r(C, C), bias=r(C))
            yield from tensor_mutations(base, ("x", "weight", "bias"), ranks={"weight": 2, "bias": 1},
                                        optional=("bias",), anchor="x")
            yield BadInput("weight-shape", dict(x=r(B, Cx, H, W), weight=r(C + 1, C + 1)), ValueError, "weight")
            yield BadInput("weight-conv-shape", dict(x=r(B, Cx, H, W), weight=r(C, C, 3, 3)), ValueError, "weight")
            yield BadInput("bias-shape", dict(x=r(B, Cx, H, W), weight=r(C, C), bias=r(C + 1)), ValueError, "bias")
            yield BadInput("no-bias", dict(x=r(B, Cx, H, W), weight=r(C, C, 1, 1), bias=None), None)
        params = {} if stage == "simple_gate" else dict(weight=r(C, C), bias=r(C))
        yield BadInput("x-rank-1", dict(x=r(Cx), **params), ValueError, "x")
        if gate:
            yield BadInput("x-odd-channels", dict(x=r(B, 5, H, W), **({} if stage == "simple_gate" else dict(
                weight=r(2, 2)))), ValueError, "x")
        yield BadInput("empty-batch", dict(x=r(0, Cx, H, W), **params), None)
        yield BadInput("empty-channels", dict(x=r(B, 0, H, W), **({} if stage == "simple_gate" else dict(
            weight=r(0, 0)))), None)
        if stage == "simple_gate_sca":
            def outs(g=None, s=None):
                return (r(*oshape) if g is None else g, r(B, C) if s is None else s)
            yield BadInput("out-a-tensor", dict(x=r(B, Cx, H, W), **params, out=r(*oshape)), TypeError, "out")
            yield BadInput("out-three", dict(x=r(B, Cx, H, W), **params, out=outs() + (r(B, C),)), ValueError, "out")
            yield BadInput("out0-none", dict(x=r(B, Cx, H, W), **params, out=(None, r(B, C))), TypeError, "out[0]")
            yield BadInput("out1-shape", dict(x=r(B, Cx, H, W), **params, out=outs(s=r(B, C, 1))), ValueError, "out[1]")
            yield BadInput("out0-expanded", dict(x=r(B, Cx, H, W), **params, out=outs(g=r(1, C, H, W).expand(oshape))),
                           ValueError, "out[0]")
            yield BadInput("out1-expanded", dict(x=r(B, Cx, H, W), **params, out=outs(s=r(1, C).expand(B, C))),
                           ValueError, "out[1]")
            g = r(B * C * H * W)
            shared = outs(g=g.view(oshape), s=g[3:3 + B * C].view(B, C))
            yield BadInput("outs-share-memory", dict(x=r(B, Cx, H, W), **params, out=shared), ValueError, "out[0]")
            x = r(B, Cx, H, W)
            yield BadInput("out0-is-x-half", dict(x=x, **params, out=outs(g=x[:, :C])), ValueError, "out[0]")
            w = r(C * C + B * C)
            yield BadInput("out1-overlaps-weight", dict(x=r(B, Cx, H, W), weight=w[:C * C].view(C, C), bias=r(C),
                                                        out=outs(s=w[C * C - 1:-1].view(B, C))), ValueError, "out[1]")
            return
        yield BadInput("out-list", dict(x=r(B, Cx, H, W), **params, out=[1.0]), TypeError, "out")
        yield BadInput("out-shape", dict(x=r(B, Cx, H, W), **params, out=r(B, Cx + 1, H, W)), ValueError, "out")
        yield BadInput("out-dtype", dict(x=r(B, Cx, H, W), **params, out=r(*oshape).double()), ValueError, "out")
        yield BadInput("out-meta", dict(x=r(B, Cx, H, W), **params, out=r(*oshape).to("meta")), ValueError, "out")
        yield BadInput("out-expanded", dict(x=r(B, Cx, H, W), **params, out=r(B, C, 1, W).expand(oshape)), ValueError,
                       "out")
        buf = r(B * Cx * H * W + 1)
        yield BadInput("out-overlaps-x", dict(x=buf[:-1].view(B, Cx, H, W), **params,
                                              out=buf[1:1 + B * C * H * W].view(oshape)), ValueError, "out")
        if stage == "simple_gate":
            x = r(B, Cx, H, W)
            yield BadInput("out-is-x-half", dict(x=x, out=x[:, :C]), ValueError, "out")
        else:
            x = r(B, Cx, H, W)
            yield BadInput("out-is-x", dict(x=x, **params, out=x), None)  # allowed: scales x in place
            xt = r(B, Cx, W, H).transpose(2, 3)
            yield BadInput("out-is-x-non-contiguous", dict(x=xt, **params, out=xt), None)
            x = r(B, Cx, H, H)
            yield BadInput("out-is-x-transposed", dict(x=x, **params, out=x.transpose(2, 3)), ValueError, "out")
            w = r(C * C + B * C * H * W)
            yield BadInput("out-overlaps-weight", dict(x=r(B, Cx, H, W), weight=w[:C * C].view(C, C), bias=r(C),
                                                       out=w[C * C - 1:-1].view(oshape)), ValueError, "out")
    return bad_inputs


SIMPLE_GATE_OP = register(Op(
    name="simple_gate", fn=simple_gate, backends=BACKENDS, reference=simple_gate_reference,
    check=check_simple_gate, tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=_simple_gate_samples,
    dispatch_key=_dispatch_key, eager=lambda **kw: simple_gate_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=GATE_GRAD.overload, library_args=lambda x: _requiring_grad(x),
    make_out=lambda kw: _poisoned(_out_shape(kw["x"], kw["x"].shape[1] // 2), kw["x"]),
    bad_inputs=_bad_inputs("simple_gate"),
))

SCA_OP = register(Op(
    name="simplified_channel_attention", fn=simplified_channel_attention, backends=BACKENDS,
    reference=simplified_channel_attention_reference, check=check_simplified_channel_attention,
    tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=_sca_samples(1), dispatch_key=_dispatch_key,
    eager=lambda **kw: simplified_channel_attention_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=SCA_GRAD.overload, library_args=lambda x, weight, bias=None: _requiring_grad(x, weight, bias),
    make_out=lambda kw: _poisoned(kw["x"].shape, kw["x"]),
    bad_inputs=_bad_inputs("simplified_channel_attention"),
))

GATE_SCA_OP = register(Op(
    name="simple_gate_sca", fn=simple_gate_sca, backends=BACKENDS, reference=simple_gate_sca_reference,
    check=check_simple_gate_sca, tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=_sca_samples(2),
    dispatch_key=_dispatch_key, eager=lambda **kw: simple_gate_sca_reference(**kw, compute_dtype=kw["x"].dtype),
    library_op=GATE_SCA_GRAD.overload,
    library_args=lambda x, weight, bias=None: _requiring_grad(x, weight, bias),
    make_out=lambda kw: (_poisoned(_out_shape(kw["x"], kw["x"].shape[1] // 2), kw["x"]),
                         _poisoned((kw["x"].shape[0], kw["x"].shape[1] // 2), kw["x"])),
    bad_inputs=_bad_inputs("simple_gate_sca"),
))

_GATE = Entry(SIMPLE_GATE_OP, grad=GATE_GRAD)
_SCA = Entry(SCA_OP, grad=SCA_GRAD, visible=lambda result: result[0])
_GATE_SCA = Entry(GATE_SCA_OP, grad=GATE_SCA_GRAD, visible=lambda result: result[:2])
