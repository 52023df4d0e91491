"""Spectral losses: frequency-weighted MSE, the spectrum weight of spectrum-aware distillation (Spectral
Diffusion, "Diffusion Probabilistic Model Made Slim", CVPR 2023) and the focal frequency loss (Jiang et al.,
ICCV 2021):

    frequency_weighted_mse(pred, target, weight)   Σ ω · |DFT(pred − target)|²          (DFT: 2-D, ortho)
    spectrum_weight(x0, size, alpha, eps)          ω = max(mean_c |DFT(x0 resized to size)|, eps)^alpha
    spectral_distill_loss(student, teacher, x0)    frequency_weighted_mse(student, teacher, spectrum_weight(x0))
    focal_frequency_loss(pred, target, ...)        mean(w · |DFT(pred − target)|²),  w = the focal weight of |DFT|

The DFT is linear, so a loss needs one FFT of the difference d = pred − target; for a real d the spectrum is
Hermitian (|D[i, j]| = |D[−i, −j]|), so cuFFT (torch.fft) computes the half spectrum rfft2(d) unnormalised, and one
fused pass (kernels/spectral.py) weights, squares and reduces it, counting the columns rfft2 stores once for two
bins twice and folding the ortho scale 1/(H·W) in. The backward is one fused pass G = c·g·ω·D over the same
half spectrum (kept from the forward) and one irfft2: ∂loss/∂d = 2c·irfft2(ω·D) (ω treated as a constant:
`spectrum_weight` is, and the focal weight is detached as in the official code).

Only the Hermitian-symmetric part of an explicit weight counts for a real signal: ω[i, j] and ω[−i, −j] weight
the same energy, so the loss equals the one with ½(ω[i, j] + ω[−i, −j]); `spectrum_weight` is symmetric.

Backends: `triton` (CUDA; on CPU through the interpreter when forced; float32, float16 and bfloat16 inputs) and
`reference` (PyTorch with full fft2: the CPU path, float64, and the oracle). Module layout (the op framework's
skeleton, pydpm/ops/_framework.py): references → argument checks → backends → registration → sample and bad
inputs.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

from pydpm import _backend
from pydpm.ops._framework import (Backend, BadInput, Differentiable, Entry, Op, Tolerance, acc_dtype, check_no_alias,
                                  check_out, check_real, check_tensor, fail, fail_type, no_output, register,
                                  sample_maker, sample_tensor, tensor_mutations, triton_reasons)

REDUCTIONS = ("mean", "sum", "per_sample")


# --------------------------------------------------------------------------------------------------
# References (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def _reduce(per_bin: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_bin.mean()
    if reduction == "sum":
        return per_bin.sum()
    return per_bin.flatten(1).mean(1)


def frequency_weighted_mse_reference(pred, target, weight, *, reduction="mean"):
    """Σ ω·|fft2(pred − target, ortho)|² reduced by `reduction` ('mean' over every bin of [B, C, H, W],
    'sum', 'per_sample': the mean per sample, [B]); computed in float32 (float64 for float64)."""
    acc = acc_dtype(pred.dtype)
    d = pred.to(acc) - target.to(acc)
    energy = torch.fft.fft2(d, norm="ortho").abs().square() if d.numel() else d
    return _reduce(weight.to(acc) * energy, reduction)


def spectrum_weight_reference(x0, size=None, *, alpha=-1.0, eps=1e-3):
    """max(mean over channels of |fft2(x0 resized to `size`, ortho)|, eps)^alpha as [B, 1, h, w]: x0 is resized
    with bilinear, antialiased interpolation (none when `size` is x0's own)."""
    acc = acc_dtype(x0.dtype)
    x = x0.to(acc)
    size = tuple(x.shape[-2:]) if size is None else tuple(size)
    if x.numel() == 0:
        return x.new_empty((x.shape[0], 1, *size))
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    magnitude = torch.fft.fft2(x, norm="ortho").abs().mean(1, keepdim=True)
    return magnitude.clamp_min(eps).pow(alpha)


def _patches(d: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C·p·p, H/p, W/p]: the p×p grid of patches of every channel (the focal frequency loss's
    patch_factor)."""
    if p == 1:
        return d
    B, C, H, W = d.shape
    return d.reshape(B, C, p, H // p, p, W // p).permute(0, 1, 2, 4, 3, 5).reshape(B, C * p * p, H // p, W // p)


def _unpatch(g: torch.Tensor, p: int, shape) -> torch.Tensor:
    if p == 1:
        return g
    B, C, H, W = shape
    return g.reshape(g.shape[0], C, p, p, H // p, W // p).permute(0, 1, 2, 4, 3, 5).reshape(g.shape[0], C, H, W)


def focal_weight(magnitude: torch.Tensor, alpha: float, log_matrix: bool, batch_matrix: bool) -> torch.Tensor:
    """The focal frequency loss's weight of spectrum magnitudes [N, P, H, W]: |D|^alpha (log(1 + ·) with
    log_matrix) over its max (per [H, W] plane, or over everything with batch_matrix), NaN -> 0, clamped to
    [0, 1]; a constant (detached)."""
    v = magnitude.detach() ** alpha
    if log_matrix:
        v = torch.log(v + 1.0)
    v = v / (v.amax() if batch_matrix else v.amax(dim=(-2, -1), keepdim=True))
    return torch.where(torch.isnan(v), torch.zeros_like(v), v).clamp(0.0, 1.0)


def focal_frequency_loss_reference(pred, target, *, alpha=1.0, patch_factor=1, ave_spectrum=False,
                                   log_matrix=False, batch_matrix=False):
    """The focal frequency loss as the official code computes it (patches, fft2 ortho of each, optional
    mini-batch average spectrum, the focal weight, the mean of weight·|D|²), in float32 (float64 for
    float64), without its host synchronisations."""
    acc = acc_dtype(pred.dtype)
    d = _patches(pred.to(acc) - target.to(acc), patch_factor)
    if d.numel() == 0:
        return d.sum() / 0.0
    if ave_spectrum:
        d = d.mean(0, keepdim=True)
    spectrum = torch.fft.fft2(d, norm="ortho")
    w = focal_weight(spectrum.abs(), alpha, log_matrix, batch_matrix)
    return (w * spectrum.abs().square()).mean()


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------

class SpectralArgs:
    """A checked call of one of the spectral ops (`kind`: "fwmse", "focal" or "weight"). In the backward stage
    `grad` is the loss's gradient, `spectrum` the forward's half spectrum (or None), `need` which of pred and
    target need a gradient."""

    __slots__ = ("kind", "pred", "target", "weight", "reduction", "alpha", "patch", "ave", "log", "batch", "eps",
                 "size", "out", "keep", "backward", "grad", "spectrum", "need")

    def __init__(self, kind, pred, target=None, weight=None, *, reduction="mean", alpha=1.0, patch=1, ave=False,
                 log=False, batch=False, eps=0.0, size=None, out=None):
        self.kind, self.pred, self.target, self.weight = kind, pred, target, weight
        self.reduction, self.alpha, self.patch = reduction, alpha, patch
        self.ave, self.log, self.batch = ave, log, batch
        self.eps, self.size, self.out = eps, size, out
        self.keep, self.backward, self.grad, self.spectrum, self.need = False, False, None, None, (True, True)


def _loss_shape(pred: torch.Tensor, reduction: str) -> tuple[int, ...]:
    return (pred.shape[0],) if reduction == "per_sample" else ()


def _check_pair(op: str, pred, target) -> None:
    check_tensor(op, "pred", pred, 4, what="[B, C, H, W]")
    check_tensor(op, "target", target, 4, what="[B, C, H, W]")
    if target.shape != pred.shape:
        fail(op, f"target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)}; they must match")
    if target.device != pred.device:
        fail(op, f"target is on {target.device} but pred is on {pred.device}; move it with .to(pred.device)")


def _check_loss_out(op: str, out, pred: torch.Tensor, reduction: str, reads) -> None:
    check_out(op, "out", out, _loss_shape(pred, reduction), acc_dtype(pred.dtype), pred)
    check_no_alias(op, (("out", out),), reads)


def check_frequency_weighted_mse(pred, target, weight, *, reduction="mean", out=None) -> SpectralArgs:
    """Validate a call of `frequency_weighted_mse`. Messages name the argument, what was expected and the fix."""
    op = "frequency_weighted_mse"
    _check_pair(op, pred, target)
    B, C, H, W = pred.shape
    if not isinstance(weight, torch.Tensor):
        fail_type(op, f"weight must be a torch.Tensor of shape [{H}, {W}] or [B|1, C|1, {H}, {W}], got "
                      f"{type(weight).__name__}")
    if not weight.is_floating_point():
        fail(op, f"weight has dtype {weight.dtype}; it must be a real floating-point tensor")
    if weight.device != pred.device:
        fail(op, f"weight is on {weight.device} but pred is on {pred.device}; move it with .to(pred.device)")
    shape = tuple(weight.shape)
    if weight.dim() == 2:
        weight = weight.view(1, 1, *shape)
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (H, W) or weight.shape[0] not in (1, B) \
            or weight.shape[1] not in (1, C):
        fail(op, f"weight has shape {shape}; pred of shape {tuple(pred.shape)} needs [{H}, {W}] or "
                 f"[B|1, C|1, {H}, {W}] = [{B} or 1, {C} or 1, H, W] (one weight per frequency bin of the full grid)")
    if reduction not in REDUCTIONS:
        fail(op, f"reduction is {reduction!r}; choose one of {REDUCTIONS}")
    if out is not None:
        _check_loss_out(op, out, pred, reduction, (("pred", pred), ("target", target), ("weight", weight)))
    return SpectralArgs("fwmse", pred, target, weight, reduction=reduction, out=out)


def _check_flag(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        fail_type(op, f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return v


def check_focal_frequency_loss(pred, target, *, alpha=1.0, patch_factor=1, ave_spectrum=False, log_matrix=False,
                               batch_matrix=False, out=None) -> SpectralArgs:
    """Validate a call of `focal_frequency_loss`."""
    op = "focal_frequency_loss"
    _check_pair(op, pred, target)
    alpha = check_real(op, "alpha", alpha)
    if isinstance(patch_factor, bool) or not isinstance(patch_factor, int):
        fail_type(op, f"patch_factor must be a positive int, got {type(patch_factor).__name__} {patch_factor!r}")
    H, W = pred.shape[-2:]
    if patch_factor < 1 or H % patch_factor or W % patch_factor:
        fail(op, f"patch_factor is {patch_factor}; it must be a positive int dividing H={H} and W={W}")
    flags = [_check_flag(op, n, v) for n, v in (("ave_spectrum", ave_spectrum), ("log_matrix", log_matrix),
                                                 ("batch_matrix", batch_matrix))]
    if out is not None:
        _check_loss_out(op, out, pred, "mean", (("pred", pred), ("target", target)))
    return SpectralArgs("focal", pred, target, alpha=alpha, patch=patch_factor, ave=flags[0], log=flags[1],
                        batch=flags[2], out=out)


def check_spectrum_weight(x0, size=None, *, alpha=-1.0, eps=1e-3, out=None) -> SpectralArgs:
    """Validate a call of `spectrum_weight`."""
    op = "spectrum_weight"
    check_tensor(op, "x0", x0, 4, what="[B, C, H, W] (the clean images or latents)")
    if size is None:
        size = tuple(x0.shape[-2:])
    elif isinstance(size, torch.Size) or (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in size)):
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            fail(op, f"size is {size}; both sides must be at least 1")
    else:
        fail_type(op, f"size must be None or (height, width), two positive ints, got {size!r}")
    alpha = check_real(op, "alpha", alpha)
    eps = check_real(op, "eps", eps)
    if not eps > 0:
        fail(op, f"eps is {eps}; it must be > 0 (the clamp keeps zero-magnitude bins finite under alpha < 0)")
    if out is not None:
        B = x0.shape[0]
        check_out(op, "out", out, (B, 1, *size), acc_dtype(x0.dtype), x0)
        check_no_alias(op, (("out", out),), (("x0", x0),))
    return SpectralArgs("weight", x0, alpha=alpha, eps=eps, size=size, out=out)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
# Forward: (loss, the half spectrum or None); backward (args.backward): (∂pred or None, ∂target or None).

def _difference(args: SpectralArgs) -> torch.Tensor:
    """d = pred − target in the accumulation dtype, as the [S, P, H, W] signals the FFT sees (patches, the
    mini-batch mean)."""
    pred, target = args.pred, args.target
    acc = acc_dtype(pred.dtype)
    # One op where the inputs are in the accumulation dtype; else pred is widened and target read widened by
    # the in-place subtraction (exact: the difference is taken in acc, as pred.to(acc) - target.to(acc)).
    d = pred - target if pred.dtype == acc and target.dtype == acc else pred.to(acc, copy=True).sub_(target)
    d = _patches(d, args.patch).contiguous()
    return d.mean(0, keepdim=True) if args.ave else d


def _scale(args: SpectralArgs, shape) -> float:
    """c in loss = c·Σ_full-grid ω·|D|² for the unnormalised D = rfft2(d) of d of `shape` [S, P, H, W] (the ortho
    factor 1/(H·W) and the reduction's divisor)."""
    S, P, H, W = shape
    if args.kind == "focal" or args.reduction == "mean":
        count = S * P * H * W
    else:
        count = P * H * W if args.reduction == "per_sample" else 1
    return 1.0 / (H * W * count)


def _focal_max(K, spec: torch.Tensor, args: SpectralArgs) -> torch.Tensor:
    m = K.plane_max(spec, args.pred.shape[-1] // args.patch, args.alpha, args.log)
    return m.amax().reshape(1) if args.batch else m


def _empty(args: SpectralArgs):
    pred = args.pred
    acc = acc_dtype(pred.dtype)
    if args.backward:
        zeros = torch.zeros(pred.shape, dtype=pred.dtype, device=pred.device)
        return (zeros if args.need[0] else None), (zeros.clone() if args.need[1] else None)
    loss = pred.new_zeros(_loss_shape(pred, args.reduction), dtype=acc)
    if args.kind == "focal" or args.reduction == "mean":
        loss = loss / 0.0  # the mean of nothing, as torch's
    return (loss if args.out is None else args.out.copy_(loss)), None


def _run_triton(args: SpectralArgs):
    K = _backend.kernels("spectral")
    if args.kind == "weight":
        return _weight_triton(K, args)
    if args.pred.numel() == 0:
        return _empty(args)
    pred = args.pred
    if args.backward:
        spec = args.spectrum if args.spectrum is not None else torch.fft.rfft2(_difference(args))
        S, P, H, Wf = spec.shape
        W = pred.shape[-1] // args.patch
        scale = _scale(args, (S, P, H, W))
        omega = _omega(K, spec, args)
        g = K.weighted_grad(spec, W, 2.0 * scale * H * W, args.grad, alpha=args.alpha, log=args.log, **omega)
        grad_d = _unpatch(torch.fft.irfft2(g, s=(H, W)), args.patch, pred.shape)
        if args.ave:
            grad_d = (grad_d / pred.shape[0]).expand(pred.shape)
        gp = _as(grad_d, pred.dtype) if args.need[0] else None
        gt = (-grad_d).to(args.target.dtype) if args.need[1] else None
        return gp, gt
    d = _difference(args)
    spec = torch.fft.rfft2(d)
    loss = K.weighted_energy(spec, d.shape[-1], _scale(args, d.shape), alpha=args.alpha, log=args.log,
                             per_sample=args.kind == "fwmse" and args.reduction == "per_sample",
                             **_omega(K, spec, args))
    if args.out is not None:
        loss = args.out.copy_(loss)
    return loss, (spec if args.keep else None)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _omega(K, spec: torch.Tensor, args: SpectralArgs) -> dict:
    if args.kind == "focal":
        return dict(plane_max=_focal_max(K, spec, args))
    return dict(weight=args.weight if args.weight.dim() == 4 else args.weight.view(1, 1, *args.weight.shape))


def _weight_triton(K, args: SpectralArgs):
    x = args.pred.to(acc_dtype(args.pred.dtype))
    if x.numel() == 0:
        result = x.new_empty((x.shape[0], 1, *args.size))
    else:
        if args.size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=args.size, mode="bilinear", antialias=True, align_corners=False)
        result = K.spectrum_weight(torch.fft.rfft2(x.contiguous()), *args.size, args.alpha, args.eps)
    return result if args.out is None else args.out.copy_(result)


def _run_reference(args: SpectralArgs):
    if args.kind == "weight":
        result = spectrum_weight_reference(args.pred, args.size, alpha=args.alpha, eps=args.eps)
        return result if args.out is None else args.out.copy_(result)
    if args.pred.numel() == 0:
        return _empty(args)
    if args.backward:
        return _grads_reference(args)
    loss = _loss_reference(args, args.pred, args.target)
    if args.out is not None:
        loss = args.out.copy_(loss)
    # The kept spectrum is part of the custom op's output (its shape may not depend on the backend), unused here.
    return loss, (torch.fft.rfft2(_difference(args)) if args.keep else None)


def _grads_reference(args: SpectralArgs):
    """∂loss/∂d = 2c·Re(ifft2(ω·fft2(d, ortho), ortho)) for loss = c·Σ ω·|fft2(d, ortho)|², ω a constant (the
    weight, or the focal weight of |D|); pred gets g·∂loss/∂d and target its negative. (The tests check it
    against torch's autograd through the reference losses.)"""
    pred = args.pred
    d = _difference(args)
    spectrum = torch.fft.fft2(d, norm="ortho")
    if args.kind == "fwmse":
        omega = args.weight.to(d.dtype)
        count = d[0].numel() if args.reduction == "per_sample" else (d.numel() if args.reduction == "mean" else 1)
    else:
        omega = focal_weight(spectrum.abs(), args.alpha, args.log, args.batch)
        count = d.numel()
    g = args.grad.to(d.dtype).reshape(-1, 1, 1, 1)
    grad_d = _unpatch(torch.fft.ifft2(omega * spectrum, norm="ortho").real * (2.0 / count) * g, args.patch,
                      pred.shape)
    if args.ave:
        grad_d = (grad_d / pred.shape[0]).expand(pred.shape)
    return ((grad_d.to(pred.dtype) if args.need[0] else None),
            ((-grad_d).to(args.target.dtype) if args.need[1] else None))


def _loss_reference(args: SpectralArgs, pred, target):
    if args.kind == "fwmse":
        return frequency_weighted_mse_reference(pred, target, args.weight, reduction=args.reduction)
    return focal_frequency_loss_reference(pred, target, alpha=args.alpha, patch_factor=args.patch,
                                          ave_spectrum=args.ave, log_matrix=args.log, batch_matrix=args.batch)


def _triton_reasons(args: SpectralArgs) -> list[str]:
    reasons = triton_reasons(args.pred.device)
    if args.pred.dtype == torch.float64:
        reasons.append("float64 inputs run on the reference backend (the kernels take their scalars in float32)")
    return reasons


BACKENDS = (Backend("triton", _run_triton, _triton_reasons),
            Backend("reference", _run_reference, lambda args: []))


def _dispatch_key(args) -> tuple:
    return args.pred.is_cuda, args.pred.is_cpu, args.pred.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable losses and the public ops
# --------------------------------------------------------------------------------------------------
# A loss's forward returns the half spectrum its backward needs (an empty tensor when nothing needs a gradient),
# marked non-differentiable.

def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _spectrum_or_none(args: SpectralArgs, spec):
    return spec if spec is not None else no_output(args.pred, _complex(args.pred.dtype))


def _fwmse_forward(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, reduction: str,
                   keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_frequency_weighted_mse(pred, target, weight, reduction=reduction)
    args.keep = keep
    loss, spec = FWMSE_OP(args)
    return loss, _spectrum_or_none(args, spec)


def _loss_fake(pred, reduction, keep):
    B, C, H, W = pred.shape
    spec = pred.new_empty((B, C, H, W // 2 + 1), dtype=_complex(pred.dtype)) if keep else \
        no_output(pred, _complex(pred.dtype))
    return pred.new_empty(_loss_shape(pred, reduction), dtype=acc_dtype(pred.dtype)), spec


def _fwmse_forward_fake(pred, target, weight, reduction, keep):
    return _loss_fake(pred, reduction, keep)


def _grads_out(args: SpectralArgs, grads):
    gp, gt = grads
    return (gp if gp is not None else no_output(args.pred, args.pred.dtype),
            gt if gt is not None else no_output(args.pred, args.target.dtype))


def _fwmse_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    spectrum: torch.Tensor, reduction: str, need_pred: bool,
                    need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = SpectralArgs("fwmse", pred, target, weight, reduction=reduction)
    args.backward, args.grad, args.need = True, grad, (need_pred, need_target)
    args.spectrum = spectrum if spectrum.numel() else None
    return _grads_out(args, FWMSE_OP(args))


def _backward_fake(grad, pred, target, *rest):
    need_pred, need_target = rest[-2:]
    return (torch.empty_like(pred) if need_pred else no_output(pred, pred.dtype),
            torch.empty_like(target) if need_target else no_output(pred, target.dtype))


def _save(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:3] if ctx.kind == "fwmse" else inputs[:2], output[1])
    ctx.options = inputs[3:-1] if ctx.kind == "fwmse" else inputs[2:-1]


def _fwmse_save(ctx, inputs, output) -> None:
    ctx.kind = "fwmse"
    _save(ctx, inputs, output)


def _fwmse_grads(ctx, backward, grad, _spectrum):
    pred, target, weight, spec = ctx.saved_tensors
    need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not any(need):
        return None, None, None, None, None
    gp, gt = backward(grad, pred, target, weight, spec, *ctx.options, *need)
    return (gp if need[0] else None), (gt if need[1] else None), None, None, None


FWMSE_GRAD = Differentiable("frequency_weighted_mse", forward=_fwmse_forward, forward_fake=_fwmse_forward_fake,
                            backward=_fwmse_backward, backward_fake=_backward_fake, save=_fwmse_save,
                            grads=_fwmse_grads)


def _focal_forward(pred: torch.Tensor, target: torch.Tensor, alpha: float, patch_factor: int, ave_spectrum: bool,
                   log_matrix: bool, batch_matrix: bool, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_focal_frequency_loss(pred, target, alpha=alpha, patch_factor=patch_factor,
                                      ave_spectrum=ave_spectrum, log_matrix=log_matrix, batch_matrix=batch_matrix)
    args.keep = keep
    loss, spec = FOCAL_OP(args)
    return loss, _spectrum_or_none(args, spec)


def _focal_forward_fake(pred, target, alpha, patch_factor, ave_spectrum, log_matrix, batch_matrix, keep):
    B, C, H, W = pred.shape
    p = patch_factor
    spec = pred.new_empty((1 if ave_spectrum else B, C * p * p, H // p, W // p // 2 + 1),
                          dtype=_complex(pred.dtype)) if keep else no_output(pred, _complex(pred.dtype))
    return pred.new_empty((), dtype=acc_dtype(pred.dtype)), spec


def _focal_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, spectrum: torch.Tensor,
                    alpha: float, patch_factor: int, ave_spectrum: bool, log_matrix: bool, batch_matrix: bool,
                    need_pred: bool, need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # The forward checked these arguments; the backward runs on them as they are (as _fwmse_backward does).
    args = SpectralArgs("focal", pred, target, alpha=float(alpha), patch=patch_factor, ave=ave_spectrum,
                        log=log_matrix, batch=batch_matrix)
    args.backward, args.grad, args.need = True, grad, (need_pred, need_target)
    args.spectrum = spectrum if spectrum.numel() else None
    return _grads_out(args, FOCAL_OP(args))


def _focal_save(ctx, inputs, output) -> None:
    ctx.kind = "focal"
    _save(ctx, inputs, output)


def _focal_grads(ctx, backward, grad, _spectrum):
    pred, target, spec = ctx.saved_tensors
    need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not any(need):
        return (None,) * 8
    gp, gt = backward(grad, pred, target, spec, *ctx.options, *need)
    return (gp if need[0] else None), (gt if need[1] else None), None, None, None, None, None, None


FOCAL_GRAD = Differentiable("focal_frequency_loss", forward=_focal_forward, forward_fake=_focal_forward_fake,
                            backward=_focal_backward, backward_fake=_backward_fake, save=_focal_save,
                            grads=_focal_grads)


def _keep(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _fwmse_inputs(pred, target, weight, *, reduction="mean"):
    """The custom op's inputs (the front door's autograd path, where grad mode is still on to be checked)."""
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        fail("frequency_weighted_mse", "weight requires grad, but the loss treats it as a constant (no gradient "
                                       "flows into it): pass weight.detach(), as spectrum_weight's result is")
    return pred, target, weight, reduction, _keep(pred, target)


def _focal_inputs(pred, target, *, alpha=1.0, patch_factor=1, ave_spectrum=False, log_matrix=False,
                  batch_matrix=False):
    return pred, target, alpha, patch_factor, ave_spectrum, log_matrix, batch_matrix, _keep(pred, target)


def frequency_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *,
                           reduction: str = "mean", out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ ω·|DFT(pred − target)|², the DFT two-dimensional and orthonormal (torch.fft.fft2(norm='ortho')), so
    that ω = 1 gives the plain squared error (Parseval).

    Args:
        pred, target: [B, C, H, W], float32/float16/bfloat16/float64, same shape and device; differentiable.
        weight: the real weight of every bin of the full frequency grid, [H, W] or [B|1, C|1, H, W] (broadcast),
            any floating dtype, a constant (a weight that requires grad is refused: detach it). Only its
            Hermitian-symmetric part counts (bins (i, j) and (−i, −j) carry the same energy of a real signal).
            Not checked for sign or finiteness (that would synchronise with the device).
        reduction: 'mean' (over the B·C·H·W bins; ω = 1 gives F.mse_loss), 'sum', or 'per_sample' ([B], the
            mean over each sample's C·H·W bins).
        out: optional tensor of the result's shape and dtype to write (not differentiable).

    Returns float32 (float64 for float64 inputs; torch's autocast also runs mse_loss in float32). cuFFT
    computes the half spectrum of d = pred − target, one fused pass weights and reduces it; the backward is one
    fused pass and one irfft2 (the forward's spectrum is kept when pred or target needs a gradient). Unfused
    equivalent: `frequency_weighted_mse_reference`.
    """
    return _FWMSE(pred, target, weight, out=out, reduction=reduction)


def focal_frequency_loss(pred: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, patch_factor: int = 1,
                         ave_spectrum: bool = False, log_matrix: bool = False, batch_matrix: bool = False,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The focal frequency loss (Jiang et al., ICCV 2021) with the semantics of its official code
    (`focal_frequency_loss.FocalFrequencyLoss(loss_weight=1, ...)(pred, target)`), without its host
    synchronisations: mean over bins of w·|D|², D = fft2(pred − target, ortho) of each patch, w = |D|^alpha
    (log(1 + ·) with log_matrix) divided by its max per patch and channel (over the whole batch with
    batch_matrix), NaN → 0, clamped to [0, 1] and detached.

    Args: pred, target [B, C, H, W] (same shape, differentiable); alpha (finite); patch_factor: a positive int
    dividing H and W (the loss of each of the patch_factor² patches); ave_spectrum: the mini-batch mean
    spectrum; log_matrix, batch_matrix as above; out: a 0-dim tensor to write. The official code's `matrix`
    argument (a given weight) is `frequency_weighted_mse`. Returns float32 (float64 for float64 inputs).
    """
    return _FOCAL(pred, target, out=out, alpha=alpha, patch_factor=patch_factor, ave_spectrum=ave_spectrum,
                  log_matrix=log_matrix, batch_matrix=batch_matrix)


def spectrum_weight(x0: torch.Tensor, size: tuple[int, int] | None = None, *, alpha: float = -1.0,
                    eps: float = 1e-3, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of spectrum-aware distillation: ω = max(mean_c |DFT(x0 resized to size)|, eps)^alpha,
    [B, 1, h, w] float32 (float64 for float64 x0), a constant (no gradient flows into x0).

    Args:
        x0: the clean data [B, C, H, W] (images or latents, usually 3-4 channels). The magnitude is averaged
            over x0's channels, so one ω [B, 1, h, w] serves features of any channel count at that scale.
        size: (h, w) of the features it weights (default: x0's own); x0 is resized by bilinear, antialiased
            interpolation first.
        alpha: the exponent; the paper's -1 gives low-magnitude (mostly high-frequency) bins more weight.
        eps: the magnitude is clamped to at least eps before the power: bins of zero magnitude would give an
            infinite weight under alpha < 0 (the DC bin dominates the spectrum, the others can be ~0).
        out: optional [B, 1, h, w] tensor to write.

    Compute it once per scale and batch, and pass it to every `frequency_weighted_mse` at that scale. One
    rfft2 and one fused pass (the channel mean, clamp and power, written on the full grid).
    """
    return _WEIGHT(x0, size, out=out, alpha=alpha, eps=eps)


def spectral_distill_loss(student: torch.Tensor, teacher: torch.Tensor, x0: torch.Tensor | None = None, *,
                          weight: torch.Tensor | None = None, alpha: float = -1.0, eps: float = 1e-3,
                          reduction: str = "mean") -> torch.Tensor:
    """The spectral term of spectrum-aware distillation for one same-scale pair: Σ ω·|DFT(teacher − student)|²
    with ω = spectrum_weight(x0, student's H×W, alpha, eps), or the `weight` given (computed once per scale and
    shared by every pair there). `student` is already aligned to the teacher's channels (a 1×1 convolution);
    pass `teacher.detach()` for a frozen teacher. Exactly one of `x0` and `weight`. Returns as
    `frequency_weighted_mse`."""
    op = "spectral_distill_loss"
    if (x0 is None) == (weight is None):
        fail(op, "pass exactly one of x0 (the clean data, from which the weight is computed) and weight (a "
                 "spectrum_weight computed once for this scale)")
    if x0 is not None:
        check_tensor(op, "x0", x0, 4, what="[B, C0, H0, W0] (the clean images or latents)")
        check_tensor(op, "student", student, 4, what="[B, C, H, W]")
        if x0.shape[0] != student.shape[0]:
            fail(op, f"x0 has batch {x0.shape[0]} but student has {student.shape[0]}; they must match")
        weight = spectrum_weight(x0, (student.shape[-2], student.shape[-1]), alpha=alpha, eps=eps)
    return frequency_weighted_mse(student, teacher, cast(torch.Tensor, weight), reduction=reduction)


# --------------------------------------------------------------------------------------------------
# Sample inputs, bad inputs and the registry entries
# --------------------------------------------------------------------------------------------------

# Long fp32 sums of squares and the FFT's own rounding (the inputs are exact in every dtype: the difference is
# taken in float32), against the float64 reference.
TOLERANCES = {torch.float64: Tolerance(1e-10, 1e-10), torch.float32: Tolerance(1e-5, 1e-4),
              torch.float16: Tolerance(1e-5, 1e-4), torch.bfloat16: Tolerance(1e-5, 1e-4)}

_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 8, 8), (3, 2, 6, 9), (2, 1, 1, 6), (2, 3, 16, 16)]


def _pairs(device, dtype, gen, small):
    for shape in _SHAPES + ([] if small else [(2, 8, 33, 31), (4, 3, 32, 32)]):
        yield "x".join(map(str, shape)), shape, sample_tensor(shape, device, dtype, gen), \
            sample_tensor(shape, device, dtype, gen)


def _positive(shape, device, gen, dtype=torch.float32):
    return sample_tensor(shape, device, torch.float64, gen).abs().add(0.1).to(dtype)


def fwmse_sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Shapes from 1×1 to odd/prime sizes; weights [H, W], per sample, per channel, full, not symmetric;
    every reduction; non-contiguous and channels-last inputs."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    reductions = REDUCTIONS * 3
    for k, (name, (B, C, H, W), pred, target) in enumerate(_pairs(device, dtype, gen, small)):
        shapes = [(H, W), (B, 1, H, W), (1, C, H, W), (B, C, H, W)]
        weight = _positive(shapes[k % 4], device, gen)
        yield f"{name}-{reductions[k]}", dict(pred=pred, target=target, weight=weight, reduction=reductions[k])
    B, C, H, W = 2, 3, 6, 10
    yield "non-contiguous", dict(pred=sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3),
                                 target=sample_tensor((B, C, H, W), device, dtype, gen),
                                 weight=_positive((W, H), device, gen).t(), reduction="mean")
    cl = torch.channels_last
    yield "channels-last", dict(pred=sample_tensor((B, C, H, W), device, dtype, gen).contiguous(memory_format=cl),
                                target=sample_tensor((B, C, H, W), device, dtype, gen).contiguous(memory_format=cl),
                                weight=_positive((B, 1, H, W), device, gen, torch.float64), reduction="per_sample")


def focal_sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """The official defaults and every option: alpha 0, 0.5, 1, 2; patches; mini-batch spectrum; log and batch
    matrices; odd sizes; non-contiguous inputs."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    options = [dict(), dict(alpha=2.0), dict(alpha=0.5, log_matrix=True), dict(batch_matrix=True),
               dict(ave_spectrum=True), dict(alpha=0.0)]
    for k, (name, shape, pred, target) in enumerate(_pairs(device, dtype, gen, small)):
        yield f"{name}-{k}", dict(pred=pred, target=target, **options[k % len(options)])
    B, C, H, W = 2, 3, 8, 12
    yield "patches-2", dict(pred=sample_tensor((B, C, H, W), device, dtype, gen),
                            target=sample_tensor((B, C, H, W), device, dtype, gen), patch_factor=2)
    yield "patches-4-all-options", dict(pred=sample_tensor((B, C, H, W), device, dtype, gen),
                                        target=sample_tensor((B, C, H, W), device, dtype, gen), patch_factor=4,
                                        alpha=1.5, ave_spectrum=True, log_matrix=True, batch_matrix=True)
    yield "non-contiguous", dict(pred=sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3),
                                 target=sample_tensor((B, C, H, W), device, dtype, gen))


def weight_sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Own size, down- and upsampled, 1×1, odd sizes; alpha -1, 0, 1, -0.5; an eps that bites."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    cases = [((2, 3, 8, 8), None, -1.0, 1e-3), ((2, 3, 16, 16), (8, 8), -1.0, 1e-3), ((1, 4, 8, 6), (5, 7), 0.5, 1e-3),
             ((2, 3, 5, 7), (10, 14), -1.0, 1e-3), ((3, 1, 1, 1), None, -1.0, 1e-3), ((2, 3, 9, 9), (1, 1), 1.0, 1e-3),
             ((2, 3, 8, 8), (4, 4), 0.0, 1e-3), ((1, 3, 6, 6), None, -1.0, 0.5)]
    for shape, size, alpha, eps in cases:
        name = "x".join(map(str, shape)) + (f"-to-{size[0]}x{size[1]}" if size else "") + f"-a{alpha}-e{eps}"
        yield name, dict(x0=sample_tensor(shape, device, dtype, gen), size=size, alpha=alpha, eps=eps)
    yield "non-contiguous", dict(x0=sample_tensor((2, 3, 6, 4), device, dtype, gen).transpose(2, 3), size=(3, 2))


def _loss_bad_inputs(device, extra: dict):
    r = sample_maker(device)
    B, C, H, W = 2, 3, 4, 6
    shape = (B, C, H, W)

    def base():
        return dict(pred=r(*shape), target=r(*shape), **{k: v() for k, v in extra.items()})
    yield from tensor_mutations(base, ("pred", "target", *extra), ranks={"pred": 4, "target": 4}, anchor="pred")
    yield BadInput("target-shape", dict(base(), target=r(B, C, H, W + 1)), ValueError, "target")
    yield BadInput("empty-batch", dict(base(), pred=r(0, C, H, W), target=r(0, C, H, W)), None)
    yield BadInput("out-list", dict(base(), out=[0.0]), TypeError, "out")
    yield BadInput("out-shape", dict(base(), out=r(2)), ValueError, "out")
    yield BadInput("out-dtype", dict(base(), out=r(1)[0].double()), ValueError, "out")
    buf = r(B * C * H * W)
    yield BadInput("out-overlaps-pred", dict(base(), pred=buf.view(shape), out=buf[5]), ValueError, "out")


def fwmse_bad_inputs(device):
    """The bad-input axis of frequency_weighted_mse."""
    device = torch.device(device)
    r = sample_maker(device)
    B, C, H, W = 2, 3, 4, 6
    shape = (B, C, H, W)
    yield from _loss_bad_inputs(device, dict(weight=lambda: r(H, W).abs()))
    yield BadInput("weight-shape", dict(pred=r(*shape), target=r(*shape), weight=r(H, W + 1)), ValueError, "weight")
    yield BadInput("weight-batch", dict(pred=r(*shape), target=r(*shape), weight=r(B + 1, 1, H, W)), ValueError,
                   "weight")
    yield BadInput("weight-rank-3", dict(pred=r(*shape), target=r(*shape), weight=r(C, H, W)), ValueError, "weight")
    yield BadInput("weight-requires-grad", dict(pred=r(*shape), target=r(*shape),
                                                weight=r(H, W).requires_grad_()), ValueError, "weight")
    yield BadInput("reduction", dict(pred=r(*shape), target=r(*shape), weight=r(H, W), reduction="none"), ValueError,
                   "reduction")
    yield BadInput("out-expanded", dict(pred=r(*shape), target=r(*shape), weight=r(H, W), reduction="per_sample",
                                        out=r(1).expand(B)), ValueError, "out")


def focal_bad_inputs(device):
    """The bad-input axis of focal_frequency_loss."""
    device = torch.device(device)
    r = sample_maker(device)
    B, C, H, W = 2, 3, 4, 6
    shape = (B, C, H, W)
    yield from _loss_bad_inputs(device, {})
    yield BadInput("patch_factor-divides", dict(pred=r(*shape), target=r(*shape), patch_factor=4), ValueError,
                   "patch_factor")
    yield BadInput("patch_factor-float", dict(pred=r(*shape), target=r(*shape), patch_factor=2.0), TypeError,
                   "patch_factor")
    yield BadInput("alpha-nan", dict(pred=r(*shape), target=r(*shape), alpha=math.nan), ValueError, "alpha")
    yield BadInput("log_matrix-int", dict(pred=r(*shape), target=r(*shape), log_matrix=1), TypeError, "log_matrix")
    yield BadInput("out-expanded", dict(pred=r(*shape), target=r(*shape), out=r(1).expand(2)), ValueError, "out")


def weight_bad_inputs(device):
    """The bad-input axis of spectrum_weight."""
    device = torch.device(device)
    r = sample_maker(device)
    B, C, H, W = 2, 3, 4, 6

    def base():
        return dict(x0=r(B, C, H, W))
    yield from tensor_mutations(base, ("x0",), ranks={"x0": 4}, anchor="x0")
    yield BadInput("size-three", dict(x0=r(B, C, H, W), size=(2, 2, 2)), TypeError, "size")
    yield BadInput("size-zero", dict(x0=r(B, C, H, W), size=(0, 2)), ValueError, "size")
    yield BadInput("eps-zero", dict(x0=r(B, C, H, W), eps=0.0), ValueError, "eps")
    yield BadInput("alpha-string", dict(x0=r(B, C, H, W), alpha="-1"), TypeError, "alpha")
    yield BadInput("empty-batch", dict(x0=r(0, C, H, W)), None)
    yield BadInput("out-list", dict(x0=r(B, C, H, W), out=[0.0]), TypeError, "out")
    yield BadInput("out-shape", dict(x0=r(B, C, H, W), out=r(B, 1, H, W + 1)), ValueError, "out")
    yield BadInput("out-expanded", dict(x0=r(B, C, H, W), out=r(1, 1, H, W).expand(B, 1, H, W)), ValueError, "out")
    buf = r(B * C * H * W)
    yield BadInput("out-overlaps-x0", dict(x0=buf.view(B, C, H, W), out=buf[:B * H * W].view(B, 1, H, W)),
                   ValueError, "out")


def _loss_out(kwargs):
    pred = kwargs["pred"]
    return torch.full(_loss_shape(pred, kwargs.get("reduction", "mean")), math.nan, dtype=acc_dtype(pred.dtype),
                      device=pred.device)


def _fwmse_library_args(pred, target, weight, reduction="mean"):
    p, t = (x.detach().clone().requires_grad_() for x in (pred, target))
    return p, t, weight, reduction, True


def _focal_library_args(pred, target, **options):
    p, t = (x.detach().clone().requires_grad_() for x in (pred, target))
    return (p, t, *_focal_inputs(p, t, **options)[2:-1], True)


FWMSE_OP = register(Op(
    name="frequency_weighted_mse", fn=frequency_weighted_mse, backends=BACKENDS,
    reference=frequency_weighted_mse_reference, check=check_frequency_weighted_mse, tolerances=TOLERANCES,
    sample_inputs=fwmse_sample_inputs, dispatch_key=_dispatch_key, library_op=FWMSE_GRAD.overload,
    library_args=_fwmse_library_args, make_out=_loss_out, bad_inputs=fwmse_bad_inputs,
))
FOCAL_OP = register(Op(
    name="focal_frequency_loss", fn=focal_frequency_loss, backends=BACKENDS,
    reference=focal_frequency_loss_reference, check=check_focal_frequency_loss, tolerances=TOLERANCES,
    sample_inputs=focal_sample_inputs, dispatch_key=_dispatch_key, library_op=FOCAL_GRAD.overload,
    library_args=_focal_library_args, make_out=_loss_out, bad_inputs=focal_bad_inputs,
))


@torch.library.custom_op("pydpm::spectrum_weight", mutates_args=())
def _weight_library(x0: torch.Tensor, height: int, width: int, alpha: float, eps: float) -> torch.Tensor:
    return WEIGHT_OP(check_spectrum_weight(x0, (height, width), alpha=alpha, eps=eps))


@_weight_library.register_fake
def _weight_fake(x0, height, width, alpha, eps):
    return x0.new_empty((x0.shape[0], 1, height, width), dtype=acc_dtype(x0.dtype))


def _weight_library_args(x0, size=None, *, alpha=-1.0, eps=1e-3):
    return (x0, *(size or x0.shape[-2:]), alpha, eps)


def _weight_compiled(x0, size=None, *, out=None, alpha=-1.0, eps=1e-3):
    """Under torch.compile: the checked call through the torch.library op."""
    args = check_spectrum_weight(x0, size, alpha=alpha, eps=eps, out=out)
    result = torch.ops.pydpm.spectrum_weight(x0, *args.size, args.alpha, args.eps)
    return result if out is None else out.copy_(result)


WEIGHT_OP = register(Op(
    name="spectrum_weight", fn=spectrum_weight, backends=BACKENDS, reference=spectrum_weight_reference,
    check=check_spectrum_weight, tolerances=TOLERANCES, sample_inputs=weight_sample_inputs,
    dispatch_key=_dispatch_key, library_op=torch.ops.pydpm.spectrum_weight.default,
    library_args=_weight_library_args,
    make_out=lambda kw: torch.full((kw["x0"].shape[0], 1, *(kw.get("size") or kw["x0"].shape[-2:])), math.nan,
                                   dtype=acc_dtype(kw["x0"].dtype), device=kw["x0"].device),
    bad_inputs=weight_bad_inputs,
))
_FWMSE = Entry(FWMSE_OP, grad=FWMSE_GRAD, inputs=_fwmse_inputs, visible=lambda result: result[0])
_FOCAL = Entry(FOCAL_OP, grad=FOCAL_GRAD, inputs=_focal_inputs, visible=lambda result: result[0])
_WEIGHT = Entry(WEIGHT_OP, compiled=_weight_compiled)
