"""Normalisation blocks of diffusion networks, each one kernel launch forward and one backward:

    group_norm(x, G, w, b, eps, activation=, scale_shift=)
        y = act(GN(x)·(1 + scale) + shift),  GN(x) = (x − μ_g)/√(σ²_g + eps)·w + b
        diffusers' ResnetBlock2D: norm1 → SiLU, and norm2 → the time embedding's scale/shift → SiLU
        (time_embedding_norm="scale_shift"); the Transformer2DModel's GroupNorm (no activation)
    layer_norm_modulate(x, w, b, shift, scale, eps)
        y = LN(x)·(1 + scale) + shift, per sample: the AdaLN(-Zero) modulate of DiT and PixArt

What is fused: the statistics, the normalisation, the affine, the per-sample modulation and the activation
(eager diffusers: group_norm's two kernels, then a kernel each for SiLU, 1 + scale, the product and the sum).
Statistics are fp32 (fp64 for fp64): GroupNorm merges tile statistics with Chan's formula and LayerNorm
subtracts the row mean before squaring, so a large mean costs no precision (no E[x²] − E[x]²). Backwards:
one kernel for dx, which also reduces the per-channel sums the weight, bias, scale and shift gradients are
computed from (GroupNorm per sample; LayerNorm per block of rows, added in a fixed order).

Layouts: GroupNorm reads NCHW and channels-last (any [B, C, S] strides) in place, and writes its output in x's
layout; LayerNorm reads [B, N, C] through any strides. The per-sample operands are [B, C] views of any strides
(diffusers' `temb.chunk(2, dim=1)` halves, PixArt's `[B, 6, C]` table chunks), never copied.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU
path). Module layout (the op framework's skeleton, pydpm/ops/_framework.py): references → argument checks →
backends → registration (differentiable ops, public ops) → sample inputs and registry entries.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, Backend, BadInput, Differentiable, Entry, Op, acc_dtype,
                                  check_floating, check_no_alias, check_out, check_param, check_real, check_tensor,
                                  fail, fail_type, register, sample_maker, sample_tensor, tensor_mutations,
                                  triton_reasons)

ACTIVATIONS = (None, "silu")
# The triton LayerNorm kernels hold a row in registers: the widest they take (wider rows run on the reference)
LN_MAX_CHANNELS = 16384


# --------------------------------------------------------------------------------------------------
# References (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B, C] (or [B, C, 1, ...]) per-sample operand shaped to broadcast over x [B, C, ...]."""
    return t.reshape(t.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale_shift=None, *,
                         compute_dtype=None):
    """GroupNorm over x [B, C, ...] in `num_groups` groups of channels, then `·(1 + scale) + shift` per sample
    and channel (scale_shift: a pair of [B, C] or [B, C, 1, ...] tensors), then the activation."""
    dt = compute_dtype or acc_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    xg = x.to(dt).reshape(B, num_groups, C // num_groups * math.prod(x.shape[2:]))
    mean = xg.mean(dim=2, keepdim=True)
    var = (xg - mean).square().mean(dim=2, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(dt).reshape(channel)
    if bias is not None:
        y = y + bias.to(dt).reshape(channel)
    if scale_shift is not None:
        scale, shift = scale_shift
        y = y * (1 + _per_sample(scale.to(dt), x)) + _per_sample(shift.to(dt), x)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)


def layer_norm_modulate_reference(x, weight, bias, shift, scale, eps=1e-6, *, compute_dtype=None):
    """LayerNorm over the last dim of x [B, N, C] (affine weight and bias [C], or None), then
    `·(1 + scale) + shift` per sample (shift, scale: [B, C] or [B, 1, C])."""
    dt = compute_dtype or acc_dtype(x.dtype)
    xa = x.to(dt)
    mean = xa.mean(dim=-1, keepdim=True)
    y = (xa - mean) / torch.sqrt((xa - mean).square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    B, C = x.shape[0], x.shape[-1]
    return (y * (1 + scale.to(dt).reshape(B, 1, C)) + shift.to(dt).reshape(B, 1, C)).to(x.dtype)


def group_norm_eager(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale_shift=None):
    """What diffusers runs, op by op in x's dtype: the unfused peer of `group_norm` (torch.group_norm: F.group_norm
    also refuses a single value per channel, which nn.GroupNorm's statistics over a group do not need)."""
    y = torch.group_norm(x, num_groups, weight, bias, eps)
    if scale_shift is not None:
        scale, shift = scale_shift
        y = y * (1 + _per_sample(scale, x)) + _per_sample(shift, x)
    return F.silu(y) if activation == "silu" else y


def layer_norm_modulate_eager(x, weight, bias, shift, scale, eps=1e-6):
    """What DiT's AdaLayerNormZero runs, op by op in x's dtype: the unfused peer of `layer_norm_modulate`."""
    B, C = x.shape[0], x.shape[-1]
    return F.layer_norm(x, (C,), weight, bias, eps) * (1 + scale.reshape(B, 1, C)) + shift.reshape(B, 1, C)


# --------------------------------------------------------------------------------------------------
# Arguments: checked at the boundary, then handed to a backend
# --------------------------------------------------------------------------------------------------

class NormArgs:
    """A checked call of one stage (see the backends' stage list). scale and shift are [B, C] views; `stats`
    the forward's (mean, 1/σ) per group or row; `grad` the output's gradient in the backward stages."""

    __slots__ = ("stage", "x", "out", "weight", "bias", "scale", "shift", "eps", "groups", "silu", "grad", "stats",
                 "keep_stats")

    def __init__(self, stage, x, out, weight, bias, scale, shift, eps, groups=1, silu=False, grad=None, stats=None):
        self.stage, self.x, self.out, self.weight, self.bias = stage, x, out, weight, bias
        self.scale, self.shift, self.eps, self.groups, self.silu = scale, shift, eps, groups, silu
        self.grad, self.stats = grad, stats
        self.keep_stats = False  # the forward's statistics, which only the differentiable forward returns


def _eps(op: str, eps) -> float:
    e = check_real(op, "eps", eps)
    if e < 0:
        fail(op, f"eps is {e}; it must be ≥ 0 (it is added to the variance; torch's default is 1e-5)")
    return e


def _num_groups(op: str, num_groups, C: int) -> int:
    if type(num_groups) is not int and (isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)):
        fail_type(op, f"num_groups must be an int, got {type(num_groups).__name__} {num_groups!r}")
    G = int(num_groups)
    if G < 1 or C % G:
        fail(op, f"num_groups is {G}; it must be ≥ 1 and divide the {C} channels of x (as nn.GroupNorm's)")
    return G


def _silu(op: str, activation) -> bool:
    if activation not in ACTIVATIONS:
        fail(op, f"activation is {activation!r}; pass None or 'silu'")
    return activation == "silu"


def _sample_operand(op: str, name: str, t, x: torch.Tensor, B: int, C: int, shapes: tuple) -> torch.Tensor:
    """A per-sample operand: one of `shapes`, on x's device, floating point -> its [B, C] view."""
    check_floating(op, name, t, x, str(list(shapes[0])))
    if tuple(t.shape) not in shapes:
        fail(op, f"{name} has shape {tuple(t.shape)}; x of shape {tuple(x.shape)} needs one of "
                 f"{' or '.join(str(list(s)) for s in shapes)} (one value per sample and channel)")
    return t if t.dim() == 2 else t.reshape(B, C)


def _pair(op: str, scale_shift) -> tuple:
    """scale_shift as the two tensors the custom op takes (None, None for None); a malformed pair raises the
    check's own message."""
    if scale_shift is None:
        return None, None
    if not isinstance(scale_shift, (tuple, list)) or len(scale_shift) != 2:
        fail_type(op, f"scale_shift must be a pair (scale, shift) of [B, C] tensors (e.g. temb.chunk(2, dim=1)) or "
                      f"None, got {type(scale_shift).__name__}")
    return scale_shift[0], scale_shift[1]


def _scale_shift(op: str, scale_shift, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if scale_shift is None:
        return None, None
    scale, shift = _pair(op, scale_shift)
    B, C = x.shape[0], x.shape[1]
    shapes = ((B, C), (B, C) + (1,) * (x.dim() - 2))
    return (_sample_operand(op, "scale_shift[0] (scale)", scale, x, B, C, shapes),
            _sample_operand(op, "scale_shift[1] (shift)", shift, x, B, C, shapes))


def check_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale_shift=None, *,
                     out=None) -> NormArgs:
    op = "group_norm"
    check_tensor(op, "x", x, min_dims=2, what="[B, C, ...]")
    C = x.shape[1]
    groups = _num_groups(op, num_groups, C)
    if weight is not None:
        check_param(op, "weight", weight, (C,), x, "the per-channel weight; None for none")
    if bias is not None:
        check_param(op, "bias", bias, (C,), x, "the per-channel bias; None for none")
    scale, shift = _scale_shift(op, scale_shift, x)
    args = NormArgs("group_norm", x, out, weight, bias, scale, shift, _eps(op, eps), groups, _silu(op, activation))
    if out is not None:
        check_out(op, "out", out, x.shape, x.dtype, x)
        check_no_alias(op, (("out", out),), (("x", x), ("weight", weight), ("bias", bias), ("scale", scale),
                                             ("shift", shift)), same_ok=("x",))
    return args


def check_layer_norm_modulate(x, weight, bias, shift, scale, eps=1e-6, *, out=None) -> NormArgs:
    op = "layer_norm_modulate"
    check_tensor(op, "x", x, 3, what="[B, N, C] (batch, tokens, channels)")
    B, C = x.shape[0], x.shape[2]
    if weight is not None:
        check_param(op, "weight", weight, (C,), x, "LayerNorm's per-channel weight; None for none")
    if bias is not None:
        check_param(op, "bias", bias, (C,), x, "LayerNorm's per-channel bias; None for none")
    shapes = ((B, C), (B, 1, C))
    args = NormArgs("layer_norm_modulate", x, out, weight, bias, _sample_operand(op, "scale", scale, x, B, C, shapes),
                    _sample_operand(op, "shift", shift, x, B, C, shapes), _eps(op, eps))
    if out is not None:
        check_out(op, "out", out, x.shape, x.dtype, x)
        check_no_alias(op, (("out", out),), (("x", x), ("weight", weight), ("bias", bias), ("shift", shift),
                                             ("scale", scale)), same_ok=("x",))
    return args


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
# Stages (NormArgs.stage) and what they return:
#   group_norm / layer_norm_modulate       (y, stats): stats [B, G, 2] / [B, N, 2] = (mean, 1/σ), or None
#                                          unless args.keep_stats (the differentiable forward sets it)
#   ..._backward                           (dx, sums): sums [B, 2, C] = (Σ du, Σ du·x̂) per sample and channel,
#                                          du the gradient before the activation (GroupNorm: over the spatial
#                                          positions; LayerNorm: over the tokens)

def _kernels():
    return _backend.kernels("norm")


def _viewable(t: torch.Tensor) -> torch.Tensor:
    """t itself when the GroupNorm kernels can walk it as [B, C, S], else a contiguous copy (one extra pass)."""
    return t if _kernels().bcs_strides(t) is not None else t.contiguous()


def _output(args: NormArgs) -> torch.Tensor:
    """The tensor the op returns: the caller's out, or a new one in x's layout (what the fakes promise)."""
    return args.out if args.out is not None else torch.empty_like(args.x)


def _run_group_norm_triton(args: NormArgs):
    k = _kernels()
    if args.stage == "group_norm":
        x, y = _viewable(args.x), _output(args)
        target = y if k.bcs_strides(y) is not None else torch.empty_like(x)
        stats = k.group_norm_fwd(x, target, args.groups, args.weight, args.bias, args.scale, args.shift, args.eps,
                                 args.silu, args.keep_stats)
        return (y if target is y else y.copy_(target)), stats
    x, dy = _viewable(args.x), _viewable(args.grad)
    dx = torch.empty_like(args.x)
    target = dx if k.bcs_strides(dx) is not None else torch.empty_like(x)
    sums = k.group_norm_bwd(dy, x, target, args.groups, args.weight, args.bias, args.scale, args.shift, args.stats,
                            args.silu)
    return (dx if target is dx else dx.copy_(target)), sums


def _run_layer_norm_triton(args: NormArgs):
    k = _kernels()
    if args.stage == "layer_norm_modulate":
        y = _output(args)
        return y, k.layer_norm_fwd(args.x, y, args.weight, args.bias, args.scale, args.shift, args.eps,
                                   args.keep_stats)
    dx = torch.empty_like(args.x)
    return dx, k.layer_norm_bwd(args.grad, args.x, dx, args.weight, args.scale, args.stats)


def _channel_terms(args: NormArgs, C: int, dt: torch.dtype):
    """(k, q) [B or 1, C] with u = x̂·k + q: k = w·(1 + scale), q = b·(1 + scale) + shift."""
    w = args.weight.to(dt) if args.weight is not None else torch.ones(C, dtype=dt, device=args.x.device)
    b = args.bias.to(dt) if args.bias is not None else torch.zeros(C, dtype=dt, device=args.x.device)
    k, q = w[None], b[None]
    if args.scale is not None:
        one_plus = 1 + args.scale.to(dt)
        k, q = k * one_plus, q * one_plus
    if args.shift is not None:
        q = q + args.shift.to(dt)
    return k, q


def _moments(t: torch.Tensor, eps: float) -> torch.Tensor:
    """The statistics the kernels keep, over t's last dim: [..., 2] = (mean, 1/√(variance + eps))."""
    mean = t.mean(dim=-1)
    return torch.stack([mean, torch.rsqrt((t - mean[..., None]).square().mean(dim=-1) + eps)], dim=-1)


def _run_group_norm_reference(args: NormArgs):
    x = args.x
    dt = acc_dtype(x.dtype)
    B, C, G = x.shape[0], x.shape[1], args.groups
    S = math.prod(x.shape[2:])
    xg = x.to(dt).reshape(B, G, C // G * S)
    stats = _moments(xg, args.eps) if args.stage == "group_norm" else args.stats
    xhat = ((xg - stats[..., 0:1]) * stats[..., 1:2]).reshape(B, C, S)
    k, q = _channel_terms(args, C, dt)
    u = xhat * k[..., None] + q[..., None]
    if args.stage == "group_norm":
        y = u * torch.sigmoid(u) if args.silu else u
        out = _output(args)
        return out.copy_(y.reshape(x.shape)), stats
    du = args.grad.to(dt).reshape(B, C, S)
    if args.silu:
        sig = torch.sigmoid(u)
        du = du * sig * (1 + u * (1 - sig))
    sums = torch.stack([du.sum(dim=2), (du * xhat).sum(dim=2)], dim=1)
    dxhat = (du * k[..., None]).reshape(B, G, C // G * S)
    xh = xhat.reshape(B, G, C // G * S)
    dx = stats[..., 1:2] * (dxhat - dxhat.mean(dim=2, keepdim=True) - xh * (dxhat * xh).mean(dim=2, keepdim=True))
    return torch.empty_like(x).copy_(dx.reshape(x.shape)), sums


def _run_layer_norm_reference(args: NormArgs):
    x = args.x
    dt = acc_dtype(x.dtype)
    xa = x.to(dt)
    stats = _moments(xa, args.eps) if args.stage == "layer_norm_modulate" else args.stats
    xhat = (xa - stats[..., 0:1]) * stats[..., 1:2]
    k, q = _channel_terms(args, x.shape[2], dt)
    if args.stage == "layer_norm_modulate":
        return _output(args).copy_(xhat * k[:, None] + q[:, None]), stats
    du = args.grad.to(dt)
    dxhat = du * k[:, None]
    dx = stats[..., 1:2] * (dxhat - dxhat.mean(dim=2, keepdim=True)
                            - xhat * (dxhat * xhat).mean(dim=2, keepdim=True))
    sums = torch.stack([du.sum(dim=1), (du * xhat).sum(dim=1)], dim=1)
    return torch.empty_like(x).copy_(dx), sums


def _layer_norm_triton_reasons(args: NormArgs) -> list[str]:
    reasons = triton_reasons(args.x.device)
    if args.x.shape[2] > LN_MAX_CHANNELS:
        reasons.append(f"x has {args.x.shape[2]} channels; the triton kernels hold a row in registers "
                       f"(at most {LN_MAX_CHANNELS})")
    return reasons


GN_BACKENDS = (Backend("triton", _run_group_norm_triton, lambda args: triton_reasons(args.x.device)),
               Backend("reference", _run_group_norm_reference, lambda args: []))
LN_BACKENDS = (Backend("triton", _run_layer_norm_triton, _layer_norm_triton_reasons),
               Backend("reference", _run_layer_norm_reference, lambda args: []))


def _gn_dispatch_key(args) -> tuple:
    return args.x.is_cuda, args.x.is_cpu, args.x.dtype


def _ln_dispatch_key(args) -> tuple:
    return args.x.is_cuda, args.x.is_cpu, args.x.dtype, args.x.shape[2] > LN_MAX_CHANNELS


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable ops
# --------------------------------------------------------------------------------------------------
# The forward ops also return the statistics (marked non-differentiable), the backward ops the per-channel
# sums; the parameter, scale and shift gradients are [C] / [B, C] products of those sums, computed here.

def _gn_library_inputs(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale_shift=None):
    """The public arguments as the custom op's: tensors first, then num_groups, eps and the SiLU flag (the
    forward's check validates num_groups against x)."""
    op = "group_norm"
    groups = num_groups  # an Integral other than int made an int; anything else left for the check to name
    if type(groups) is not int and isinstance(groups, numbers.Integral) and not isinstance(groups, bool):
        groups = int(groups)
    return (x, weight, bias, *_pair(op, scale_shift), groups, _eps(op, eps), _silu(op, activation))


def _gn_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, num_groups: int, eps: float, silu: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    pair = None if scale is None and shift is None else (scale, shift)
    args = check_group_norm(x, num_groups, weight, bias, eps, "silu" if silu else None, pair)
    args.keep_stats = True
    return GROUP_NORM_OP(args)


def _gn_fake(x, weight, bias, scale, shift, num_groups, eps, silu):
    return torch.empty_like(x), x.new_empty((x.shape[0], num_groups, 2), dtype=acc_dtype(x.dtype))


def _gn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 scale: torch.Tensor | None, shift: torch.Tensor | None, stats: torch.Tensor, num_groups: int,
                 silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = x.shape[0], x.shape[1]
    args = NormArgs("group_norm_backward", x, None, weight, bias, None if scale is None else scale.reshape(B, C),
                    None if shift is None else shift.reshape(B, C), 0.0, num_groups, silu, grad=grad, stats=stats)
    return GROUP_NORM_OP(args)


def _gn_backward_fake(grad, x, weight, bias, scale, shift, stats, num_groups, silu):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2, x.shape[1]), dtype=acc_dtype(x.dtype))


def _save(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    tensors: list[torch.Tensor | None] = []
    options: list = []
    for t in inputs:
        (tensors if t is None or isinstance(t, torch.Tensor) else options).append(t)
    ctx.save_for_backward(*tensors, output[1])
    ctx.options = tuple(options)


def _operand_grads(ctx, sums, weight, bias, scale, shift, scale_at: int, shift_at: int):
    """(∂weight, ∂bias, ∂scale, ∂shift) from the backward's per-sample sums A = Σ du, Ax = Σ du·x̂ [B, C]:
    ∂weight = Σ_b (1 + scale)·Ax, ∂bias = Σ_b (1 + scale)·A, ∂scale = w·Ax + b·A, ∂shift = A."""
    a, a_x = sums[:, 0], sums[:, 1]
    need = ctx.needs_input_grad
    one_plus = 1 + scale.reshape(a.shape).to(a.dtype) if scale is not None else None
    dw = db = ds = dt = None
    if (weight is not None and need[1]) or (bias is not None and need[2]):  # [2, C]: one reduction for both
        total = (sums if one_plus is None else sums * one_plus[:, None]).sum(0)
        if weight is not None and need[1]:
            dw = total[1].to(weight.dtype)
        if bias is not None and need[2]:
            db = total[0].to(bias.dtype)
    if scale is not None and need[scale_at]:
        ds = a_x * weight.to(a.dtype) if weight is not None else a_x
        ds = (ds + a * bias.to(a.dtype) if bias is not None else ds).reshape(scale.shape).to(scale.dtype)
    if shift is not None and need[shift_at]:
        dt = a.reshape(shift.shape).to(shift.dtype)
    return dw, db, ds, dt


def _gn_grads(ctx, backward, dy, _dstats):
    x, weight, bias, scale, shift, stats = ctx.saved_tensors
    num_groups, _eps_value, silu = ctx.options
    dx, sums = backward(dy, x, weight, bias, scale, shift, stats, num_groups, silu)
    dw, db, ds, dt = _operand_grads(ctx, sums, weight, bias, scale, shift, 3, 4)
    return (dx if ctx.needs_input_grad[0] else None), dw, db, ds, dt, None, None, None


def _ln_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor,
                scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_layer_norm_modulate(x, weight, bias, shift, scale, eps)
    args.keep_stats = True
    return LAYER_NORM_OP(args)


def _ln_fake(x, weight, bias, shift, scale, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[1], 2), dtype=acc_dtype(x.dtype))


def _ln_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                 stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = x.shape[0], x.shape[2]
    args = NormArgs("layer_norm_modulate_backward", x, None, weight, None, scale.reshape(B, C), None, 0.0,
                    grad=grad, stats=stats)
    return LAYER_NORM_OP(args)


def _ln_backward_fake(grad, x, weight, scale, stats):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2, x.shape[2]), dtype=acc_dtype(x.dtype))


def _ln_grads(ctx, backward, dy, _dstats):
    x, weight, bias, shift, scale, stats = ctx.saved_tensors
    dx, sums = backward(dy, x, weight, scale, stats)
    dw, db, ds, dt = _operand_grads(ctx, sums, weight, bias, scale, shift, 4, 3)
    return (dx if ctx.needs_input_grad[0] else None), dw, db, dt, ds, None


GN_GRAD = Differentiable("group_norm", forward=_gn_forward, forward_fake=_gn_fake, backward=_gn_backward,
                         backward_fake=_gn_backward_fake, save=_save, grads=_gn_grads)
LN_GRAD = Differentiable("layer_norm_modulate", forward=_ln_forward, forward_fake=_ln_fake, backward=_ln_backward,
                         backward_fake=_ln_backward_fake, save=_save, grads=_ln_grads)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------

def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, activation: str | None = None,
               scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm, then an optional per-sample modulation, then an optional SiLU, in one kernel:

        y = act((x − μ_g)/√(σ²_g + eps)·weight + bias) · (1 + scale) + shift)

    Args:
        x: [B, C, ...] (NCHW or channels-last; read in place, the output has x's layout).
        num_groups: groups of C / num_groups adjacent channels (nn.GroupNorm's).
        weight, bias: the affine [C] (nn.GroupNorm's), or None.
        eps: added to the variance.
        activation: None or "silu", applied last (after the modulation, as diffusers' ResnetBlock2D does).
        scale_shift: None or (scale, shift), each [B, C] or [B, C, 1, ...]: diffusers'
            `time_embedding_norm="scale_shift"` (`temb.chunk(2, dim=1)`; views are read in place).

    Statistics in fp32 without cancellation; backward: one kernel (dx and the per-channel sums of every other
    gradient). Unfused equivalent: `group_norm_eager` (torch.group_norm, the modulation, F.silu); float64 oracle:
    `group_norm_reference`.

    Aliasing: out=x normalises x in place; any other out that shares memory with an input, or within itself
    (an expand()ed view), raises.
    """
    return _GROUP_NORM(x, num_groups, weight, bias, eps, activation, scale_shift, out=out)


def layer_norm_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """AdaLN modulate: LayerNorm over the channels, then a per-sample scale and shift, in one kernel:

        y = ((x − μ)/√(σ² + eps)·weight + bias)·(1 + scale[b]) + shift[b]

    Args:
        x: [B, N, C] (batch, tokens, channels; any strides).
        weight, bias: LayerNorm's affine [C], or None (DiT and PixArt use none).
        shift, scale: [B, C] or [B, 1, C] (views are read in place: PixArt's chunks of its [B, 6, C] table,
            AdaLayerNormZero's chunks of its embedding).
        eps: added to the variance (DiT's 1e-6).

    Rows of up to 16384 channels run in registers (wider: the reference backend). Backward: one kernel (dx,
    and per-channel partial sums for the other gradients). Unfused equivalent: `layer_norm_modulate_eager`
    (F.layer_norm, then the modulation); float64 oracle: `layer_norm_modulate_reference`.

    Aliasing: out=x in place; any other out that shares memory with an input, or within itself, raises.
    """
    return _LAYER_NORM(x, weight, bias, shift, scale, eps, out=out)


# --------------------------------------------------------------------------------------------------
# Sample inputs and registry entries
# --------------------------------------------------------------------------------------------------

def _gn_samples(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Minimal, prime, single-channel groups, 2-D and 3-D inputs, batch 1, an offset mean, non-contiguous,
    channels-last and channel-slice layouts, scale/shift as [B, C], [B, C, 1, 1] and chunked views."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)

    def r(*shape):
        return sample_tensor(shape, device, dtype, gen)

    def params(C, affine=True, silu=False, ss=None, B=2, dims=4):
        kw = dict(weight=r(C), bias=r(C)) if affine else {}
        if ss == "flat":
            kw["scale_shift"] = (r(B, C) * 0.5, r(B, C))
        elif ss == "chunk":
            temb = r(B, 2 * C, *([1] * (dims - 2)))
            kw["scale_shift"] = temb.chunk(2, dim=1)
        return dict(kw, activation="silu" if silu else None)

    yield "1x1x1x1-g1", dict(x=r(1, 1, 1, 1), num_groups=1, **params(1))
    yield "2x6x5x7-g3-silu", dict(x=r(2, 6, 5, 7), num_groups=3, **params(6, silu=True))
    yield "2x6x5x7-g3-chunked-scale-shift-silu", dict(x=r(2, 6, 5, 7), num_groups=3,
                                                     **params(6, silu=True, ss="chunk"))
    yield "1x4x3-g2-no-affine-scale-shift", dict(x=r(1, 4, 3), num_groups=2, **params(4, False, ss="flat", B=1))
    yield "3x12x4x6-g4-weight-only", dict(x=r(3, 12, 4, 6), num_groups=4, weight=r(12), activation="silu")
    yield "2x5-g5", dict(x=r(2, 5), num_groups=5, **params(5, silu=True))
    yield "1x15x9x11-g5-eps0.1", dict(x=r(1, 15, 9, 11), num_groups=5, eps=0.1, **params(15, ss="flat", B=1))
    yield "offset-mean", dict(x=r(2, 4, 6, 6) + 4, num_groups=2, **params(4, silu=True, ss="flat"))
    yield "non-contiguous", dict(x=r(2, 6, 7, 5).transpose(2, 3), num_groups=2, **params(6, silu=True, ss="chunk"))
    yield "channels-last", dict(x=r(2, 8, 5, 6).contiguous(memory_format=torch.channels_last), num_groups=4,
                                **params(8, silu=True, ss="chunk"))
    yield "channel-slice", dict(x=r(2, 8, 4, 5)[:, 1:7], num_groups=3, **params(6, silu=True))
    if not small:
        yield "2x64x32x32-g32", dict(x=r(2, 64, 32, 32), num_groups=32, **params(64, silu=True, ss="chunk"))
        yield "1x96x33x31-g32-channels-last", dict(
            x=r(1, 96, 33, 31).contiguous(memory_format=torch.channels_last), num_groups=32,
            **params(96, silu=True, B=1))


def _ln_samples(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Minimal, odd and prime widths, one token, an offset mean, non-contiguous rows and channels, shift and
    scale as [B, C] and as chunked [B, 1, C] views of a [B, 6, C] table."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)

    def r(*shape):
        return sample_tensor(shape, device, dtype, gen)

    def mods(B, C, table=False):
        if table:
            chunks = r(B, 6, C).chunk(6, dim=1)
            return dict(shift=chunks[0], scale=chunks[1] * 0.5)
        return dict(shift=r(B, C), scale=r(B, C) * 0.5)

    yield "1x1x1", dict(x=r(1, 1, 1), weight=r(1), bias=r(1), **mods(1, 1))
    yield "2x5x7", dict(x=r(2, 5, 7), weight=None, bias=None, **mods(2, 7))
    yield "3x1x17-table", dict(x=r(3, 1, 17), weight=r(17), bias=None, **mods(3, 17, table=True))
    yield "2x13x64-affine-table", dict(x=r(2, 13, 64), weight=r(64), bias=r(64), **mods(2, 64, table=True))
    yield "1x4x33-eps1e-3", dict(x=r(1, 4, 33), weight=None, bias=r(33), eps=1e-3, **mods(1, 33))
    yield "offset-mean", dict(x=r(2, 3, 24) + 4, weight=None, bias=None, **mods(2, 24))
    yield "non-contiguous", dict(x=r(2, 24, 5).transpose(1, 2), weight=r(24), bias=r(24), **mods(2, 24, table=True))
    yield "token-slice", dict(x=r(2, 9, 16)[:, 2:], weight=None, bias=None, **mods(2, 16))
    if not small:
        yield "2x256x1152-table", dict(x=r(2, 256, 1152), weight=None, bias=None, **mods(2, 1152, table=True))


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, math.nan)


def _requiring_grad(*ts):
    return tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in ts)


def _gn_bad_inputs(device):
    device = torch.device(device)
    r = sample_maker(device)
    B, C, H, W = 2, 6, 4, 5

    def base():
        return dict(x=r(B, C, H, W), num_groups=3, weight=r(C), bias=r(C))
    yield from tensor_mutations(base, ("x", "weight", "bias"), ranks={"weight": 1, "bias": 1},
                                optional=("weight", "bias"), anchor="x")
    yield BadInput("x-rank-1", dict(x=r(C), num_groups=3), ValueError, "x")
    yield BadInput("groups-not-dividing", dict(x=r(B, C, H, W), num_groups=4), ValueError, "num_groups")
    yield BadInput("groups-zero", dict(x=r(B, C, H, W), num_groups=0), ValueError, "num_groups")
    yield BadInput("groups-float", dict(x=r(B, C, H, W), num_groups=3.0), TypeError, "num_groups")
    yield BadInput("groups-bool", dict(x=r(B, C, H, W), num_groups=True), TypeError, "num_groups")
    yield BadInput("weight-shape", dict(x=r(B, C, H, W), num_groups=3, weight=r(C + 1)), ValueError, "weight")
    yield BadInput("eps-negative", dict(x=r(B, C, H, W), num_groups=3, eps=-1e-5), ValueError, "eps")
    yield BadInput("eps-nan", dict(x=r(B, C, H, W), num_groups=3, eps=math.nan), ValueError, "eps")
    yield BadInput("eps-string", dict(x=r(B, C, H, W), num_groups=3, eps="1e-5"), TypeError, "eps")
    yield BadInput("activation-gelu", dict(x=r(B, C, H, W), num_groups=3, activation="gelu"), ValueError,
                   "activation")
    yield BadInput("scale-shift-tensor", dict(x=r(B, C, H, W), num_groups=3, scale_shift=r(B, 2 * C)), TypeError,
                   "scale_shift")
    yield BadInput("scale-shift-three", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(r(B, C),) * 3), TypeError,
                   "scale_shift")
    yield BadInput("scale-none", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(None, r(B, C))), TypeError,
                   "scale")
    yield BadInput("scale-shape", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(r(B, C, H, W), r(B, C))),
                   ValueError, "scale")
    yield BadInput("shift-batch", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(r(B, C), r(1, C))), ValueError,
                   "shift")
    yield BadInput("shift-int", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(r(B, C), r(B, C).long())),
                   ValueError, "shift")
    yield BadInput("shift-meta", dict(x=r(B, C, H, W), num_groups=3, scale_shift=(r(B, C), r(B, C).to("meta"))),
                   ValueError, "shift")
    yield BadInput("empty-batch", dict(x=r(0, C, H, W), num_groups=3, weight=r(C), activation="silu"), None)
    yield BadInput("empty-spatial", dict(x=r(B, C, 0, W), num_groups=3, scale_shift=(r(B, C), r(B, C))), None)
    yield from _out_cases("group_norm", lambda x: dict(x=x, num_groups=3, weight=r(C)), r, (B, C, H, W))


def _ln_bad_inputs(device):
    device = torch.device(device)
    r = sample_maker(device)
    B, N, C = 2, 5, 6

    def base():
        return dict(x=r(B, N, C), weight=r(C), bias=r(C), shift=r(B, C), scale=r(B, C))
    yield from tensor_mutations(base, ("x", "weight", "bias", "shift", "scale"), ranks={"x": 3, "weight": 1},
                                optional=("weight", "bias"), anchor="x")
    yield BadInput("weight-shape", dict(base(), weight=r(C + 1)), ValueError, "weight")
    yield BadInput("shift-tokens", dict(base(), shift=r(B, N, C)), ValueError, "shift")
    yield BadInput("scale-batch", dict(base(), scale=r(1, C)), ValueError, "scale")
    yield BadInput("eps-negative", dict(base(), eps=-1.0), ValueError, "eps")
    yield BadInput("eps-inf", dict(base(), eps=math.inf), ValueError, "eps")
    yield BadInput("empty-tokens", dict(base(), x=r(B, 0, C)), None)
    yield BadInput("empty-batch", dict(x=r(0, N, C), weight=None, bias=None, shift=r(0, C), scale=r(0, C)), None)
    yield from _out_cases("layer_norm_modulate", lambda x: dict(base(), x=x), r, (B, N, C))


def _out_cases(op: str, call, r, shape):
    """The out= axis both ops share: wrong type, shape, dtype, device, an expanded view, overlap with x, and the
    allowed out=x."""
    yield BadInput("out-list", dict(call(r(*shape)), out=[1.0]), TypeError, "out")
    yield BadInput("out-shape", dict(call(r(*shape)), out=r(*shape[:-1], shape[-1] + 1)), ValueError, "out")
    yield BadInput("out-dtype", dict(call(r(*shape)), out=r(*shape).double()), ValueError, "out")
    yield BadInput("out-meta", dict(call(r(*shape)), out=r(*shape).to("meta")), ValueError, "out")
    yield BadInput("out-expanded", dict(call(r(*shape)), out=r(1, *shape[1:]).expand(shape)), ValueError, "out")
    buf = r(math.prod(shape) + 1)
    yield BadInput("out-overlaps-x", dict(call(buf[:-1].view(shape)), out=buf[1:].view(shape)), ValueError, "out")
    x = r(*shape)
    yield BadInput("out-is-x", dict(call(x), out=x), None)


GROUP_NORM_OP = register(Op(
    name="group_norm", fn=group_norm, backends=GN_BACKENDS, reference=group_norm_reference, check=check_group_norm,
    tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=_gn_samples, dispatch_key=_gn_dispatch_key,
    eager=group_norm_eager, library_op=GN_GRAD.overload,
    library_args=lambda x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale_shift=None:
        _requiring_grad(*_gn_library_inputs(x, num_groups, weight, bias, eps, activation, scale_shift)),
    make_out=lambda kw: _poisoned(kw["x"]), bad_inputs=_gn_bad_inputs,
))

LAYER_NORM_OP = register(Op(
    name="layer_norm_modulate", fn=layer_norm_modulate, backends=LN_BACKENDS,
    reference=layer_norm_modulate_reference, check=check_layer_norm_modulate, tolerances=ELEMENTWISE_TOLERANCES,
    sample_inputs=_ln_samples, dispatch_key=_ln_dispatch_key, eager=layer_norm_modulate_eager,
    library_op=LN_GRAD.overload,
    library_args=lambda x, weight, bias, shift, scale, eps=1e-6: _requiring_grad(x, weight, bias, shift, scale, eps),
    make_out=lambda kw: _poisoned(kw["x"]), bad_inputs=_ln_bad_inputs,
))

_GROUP_NORM = Entry(GROUP_NORM_OP, grad=GN_GRAD, inputs=_gn_library_inputs, visible=lambda result: result[0])
_LAYER_NORM = Entry(LAYER_NORM_OP, grad=LN_GRAD, visible=lambda result: result[0])
