"""Triton backend of the spectral losses (`pydpm.ops.spectral`). The FFTs stay in cuFFT (torch.fft, unnormalised
half spectra D = rfft2(d) [S, P, H, W/2+1] of the difference d = pred − target); these kernels are the passes
around them, each one read of the spectrum:

`_weighted_energy_kernel`  Σ m·ω·|D|² per sample and block of entries (partial sums, no atomics; the launcher
                           adds them), m = 2 on the columns rfft2 stores once for two bins of the full grid
`_weighted_grad_kernel`    G = s·g·ω·D, the half spectrum whose irfft2 is the gradient with respect to d
`_plane_max_kernel`        the focal weight's normaliser: max over each plane of v = (|D|/√(H·W))^α (log(1 + v))
`_spectrum_weight_kernel`  ω = max(mean_c |X_c| / √(H·W), eps)^α on the full grid, from the half spectrum X

ω is either an explicit weight (a strided [.., H, W] tensor on the full grid; only its Hermitian-symmetric part
½(ω[i, j] + ω[−i, −j]) counts for a real signal, so both are read and averaged) or the focal-frequency weight
computed from |D| itself (clamp(v / max, 0, 1), NaN → 0). Spectra are complex64 (float64 inputs run on the
reference backend: these kernels take their scalars in float32); accumulation is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv
from ._launch import Kernel

_NUM_WARPS = 4
_BLOCK = 1024           # spectrum entries per program
EXPLICIT, FOCAL = 0, 1  # where ω comes from


def alpha_kind(alpha: float) -> int:
    """The exponent's special cases compiled apart: 0 (ω = 1), 1 (ω = v), -1 (ω = 1/v), else exp2(α·log2 v)."""
    return {0.0: 0, 1.0: 1, -1.0: 3}.get(float(alpha), 2)


@triton.jit
def _power(v, alpha, KIND: tl.constexpr):
    """v^alpha for v ≥ 0 (0^0 = 1, as torch.pow)."""
    if KIND == 0:
        return tl.full(v.shape, 1.0, v.dtype)
    elif KIND == 1:
        return v
    elif KIND == 3:
        return 1.0 / v
    else:
        return tl.exp2(alpha * tl.log2(v))


@triton.jit
def _focal(re, im, norm, alpha, KIND: tl.constexpr, LOG: tl.constexpr):
    """The focal weight's v of the unnormalised entries: |D|·norm (the ortho magnitude) to the alpha."""
    v = _power(tl.sqrt(re * re + im * im) * norm, alpha, KIND)
    if LOG:
        v = tl.log(v + 1.0)
    return v


@triton.jit
def _omega(spec_re, spec_im, weight, wmax, s, plane, i, j, valid, H, W, sb, sc, sh, sw, max_stride, P, norm, alpha,
           MODE: tl.constexpr, KIND: tl.constexpr, LOG: tl.constexpr):
    if MODE == 0:
        base = weight + s.to(tl.int64) * sb + plane * sc
        i_m = tl.where(i == 0, 0, H - i)
        j_m = tl.where(j == 0, 0, W - j)
        w1 = tl.load(base + i * sh + j * sw, mask=valid, other=0.0).to(tl.float32)
        w2 = tl.load(base + i_m * sh + j_m * sw, mask=valid, other=0.0).to(tl.float32)
        return 0.5 * (w1 + w2)
    else:
        mx = tl.load(wmax + (s.to(tl.int64) * P + plane) * max_stride, mask=valid, other=1.0).to(tl.float32)
        w = _focal(spec_re, spec_im, norm, alpha, KIND, LOG) / mx
        w = tl.where(w != w, 0.0, w)
        return tl.minimum(tl.maximum(w, 0.0), 1.0)


@triton.jit
def _entries(spec, weight, wmax, chunk, s, P, H, W, Wf, sb, sc, sh, sw, max_stride, norm, alpha, MODE: tl.constexpr,
             KIND: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """Block `chunk` of sample s's P·H·Wf half-spectrum entries: their element offsets (re; im at + 1), the mask,
    re, im, ω and the column j."""
    n = P * H * Wf
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = e < n
    plane = e // (H * Wf)
    i = (e // Wf) % H
    j = e % Wf
    off = (s.to(tl.int64) * n + e) * 2
    re = tl.load(spec + off, mask=valid, other=0.0).to(tl.float32)
    im = tl.load(spec + off + 1, mask=valid, other=0.0).to(tl.float32)
    w = _omega(re, im, weight, wmax, s, plane, i, j, valid, H, W, sb, sc, sh, sw, max_stride, P, norm, alpha,
               MODE, KIND, LOG)
    return off, valid, re, im, w, j


@triton.jit(do_not_specialize=["P", "H", "W", "Wf", "sb", "sc", "sh", "sw", "max_stride", "n_chunks"])
def _weighted_energy_kernel(spec, weight, wmax, partial, P, H, W, Wf, sb, sc, sh, sw, max_stride, scale, norm, alpha,
                            n_chunks, MODE: tl.constexpr, KIND: tl.constexpr, LOG: tl.constexpr,
                            BLOCK: tl.constexpr):
    """partial[s, chunk] = scale · Σ m·ω·|D|² over this block of sample s's P·H·Wf entries."""
    chunk, s = tl.program_id(0), tl.program_id(1)
    off, valid, re, im, w, j = _entries(spec, weight, wmax, chunk, s, P, H, W, Wf, sb, sc, sh, sw, max_stride, norm,
                                        alpha, MODE, KIND, LOG, BLOCK)
    m = tl.where((j == 0) | (2 * j == W), 1.0, 2.0)
    energy = tl.where(valid, m * w * (re * re + im * im), 0.0)
    tl.store(partial + s.to(tl.int64) * n_chunks + chunk, tl.sum(energy, axis=0) * scale)


@triton.jit(do_not_specialize=["P", "H", "W", "Wf", "sb", "sc", "sh", "sw", "max_stride", "g_stride"])
def _weighted_grad_kernel(spec, weight, wmax, grad, out, P, H, W, Wf, sb, sc, sh, sw, max_stride, g_stride, scale,
                          norm, alpha, MODE: tl.constexpr, KIND: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = scale · grad[s·g_stride] · ω · D[s]: the half spectrum of ∂loss/∂d (before irfft2)."""
    chunk, s = tl.program_id(0), tl.program_id(1)
    off, valid, re, im, w, j = _entries(spec, weight, wmax, chunk, s, P, H, W, Wf, sb, sc, sh, sw, max_stride, norm,
                                        alpha, MODE, KIND, LOG, BLOCK)
    f = w * tl.load(grad + s.to(tl.int64) * g_stride).to(tl.float32) * scale
    tl.store(out + off, (re * f).to(out.dtype.element_ty), mask=valid)
    tl.store(out + off + 1, (im * f).to(out.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["n_plane"])
def _plane_max_kernel(spec, out, n_plane, norm, alpha, KIND: tl.constexpr, LOG: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out[plane] = max over the plane's entries of |D|^α (then log(1 + ·) with LOG)."""
    plane = tl.program_id(0).to(tl.int64)
    best = tl.full((BLOCK,), 0.0, tl.float32)
    for start in range(0, n_plane, BLOCK):
        e = start + tl.arange(0, BLOCK)
        valid = e < n_plane
        off = (plane * n_plane + e) * 2
        re = tl.load(spec + off, mask=valid, other=0.0).to(tl.float32)
        im = tl.load(spec + off + 1, mask=valid, other=0.0).to(tl.float32)
        v = _focal(re, im, norm, alpha, KIND, LOG)
        best = tl.maximum(best, tl.where(valid, v, 0.0))
    tl.store(out + plane, tl.max(best, axis=0))


@triton.jit(do_not_specialize=["C", "H", "W", "Wf"])
def _spectrum_weight_kernel(spec, out, C, H, W, Wf, inv_norm, eps, alpha, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, 0, i, j] = max(mean_c |X[b, c, i, j]| · inv_norm, eps)^α over the full grid; the columns rfft2
    does not store are read as their mirror images X[−i, W − j] (the same magnitude)."""
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    valid = q < H * W
    i = q // W
    j = q % W
    mirror = j >= Wf
    si = tl.where(mirror, tl.where(i == 0, 0, H - i), i)
    sj = tl.where(mirror, W - j, j)
    total = tl.zeros((BLOCK,), tl.float32)
    for c in range(0, C):
        off = (((b * C + c) * H + si) * Wf + sj) * 2
        re = tl.load(spec + off, mask=valid, other=0.0).to(tl.float32)
        im = tl.load(spec + off + 1, mask=valid, other=0.0).to(tl.float32)
        total += tl.sqrt(re * re + im * im)
    v = total * (inv_norm / C)
    v = tl.where(v != v, v, tl.maximum(v, eps))  # a NaN stays NaN (maximum would drop it), as torch.clamp_min
    tl.store(out + b * H * W + q, _power(v, alpha, KIND).to(out.dtype.element_ty), mask=valid)


_ENERGY = Kernel(_weighted_energy_kernel)
_GRAD = Kernel(_weighted_grad_kernel)
_MAX = Kernel(_plane_max_kernel)
_WEIGHT = Kernel(_spectrum_weight_kernel)


def _real(spec: torch.Tensor) -> torch.Tensor:
    assert spec.is_complex() and spec.is_contiguous() and spec.dim() == 4, "a contiguous [S, P, H, Wf] spectrum"
    assert spec[0].numel() < 2 ** 31, "one sample's spectrum must hold fewer than 2^31 entries"
    return torch.view_as_real(spec)


def _omega_args(weight: torch.Tensor | None, plane_max: torch.Tensor | None, spec: torch.Tensor):
    """(weight, wmax, sb, sc, sh, sw, max_stride), the mode and the dtype naming ω's source in the launch key:
    the explicit weight with its strides over [S, P, H, W] (a dimension of size 1 broadcasts: stride 0), or
    the focal normaliser (one value per plane, or one for all: stride 0)."""
    if plane_max is None:
        sb, sc, sh, sw = (0 if n == 1 else st for n, st in zip(weight.shape, weight.stride()))
        return [weight, spec, sb, sc, sh, sw, 0], EXPLICIT, weight.dtype
    return [spec, plane_max, 0, 0, 0, 0, 0 if plane_max.numel() == 1 else 1], FOCAL, plane_max.dtype


def weighted_energy(spec: torch.Tensor, width: int, scale: float, *, weight: torch.Tensor | None = None,
                    plane_max: torch.Tensor | None = None, alpha: float = 1.0, log: bool = False,
                    per_sample: bool = True) -> torch.Tensor:
    """[S] = scale · Σ_full-grid ω·|D|² per sample of the unnormalised half spectrum `spec` [S, P, H, Wf] of
    signals of width `width` (with `per_sample=False` their sum, 0-dim: one reduction of the partial sums, not
    two): ω from `weight` (4-D, broadcasting over [S, P, H, width]) or, with `plane_max` ([S·P] or one value),
    the focal weight clamp(v/max, 0, 1), v = |D|^alpha (log(1 + v) with `log`)."""
    S, P, H, Wf = spec.shape
    real = _real(spec)
    chunks = cdiv(P * H * Wf, _BLOCK)
    partial = torch.empty((S, chunks), dtype=real.dtype, device=spec.device)
    (w, wmax, sb, sc, sh, sw, max_stride), mode, wdtype = _omega_args(weight, plane_max, real)
    kind = alpha_kind(alpha)
    _ENERGY((chunks, S), [real, w, wmax, partial, P, H, width, Wf, sb, sc, sh, sw, max_stride, float(scale),
                          (H * width) ** -0.5, float(alpha), chunks],
            (mode, kind, log, wdtype), dict(MODE=mode, KIND=kind, LOG=log, BLOCK=_BLOCK),
            num_warps=_NUM_WARPS)
    if not per_sample:
        return partial.sum()
    return partial[:, 0] if chunks == 1 else partial.sum(1)


def weighted_grad(spec: torch.Tensor, width: int, scale: float, grad: torch.Tensor, *,
                  weight: torch.Tensor | None = None, plane_max: torch.Tensor | None = None, alpha: float = 1.0,
                  log: bool = False) -> torch.Tensor:
    """G = scale · grad[s] · ω · D as a new half spectrum like `spec` (ω as in `weighted_energy`); `grad` holds
    one value per sample or one for all (a device tensor, any floating dtype: no host synchronisation)."""
    S, P, H, Wf = spec.shape
    real = _real(spec)
    out = torch.empty_like(spec)
    chunks = cdiv(P * H * Wf, _BLOCK)
    (w, wmax, sb, sc, sh, sw, max_stride), mode, wdtype = _omega_args(weight, plane_max, real)
    kind = alpha_kind(alpha)
    if grad.dtype != real.dtype:
        grad = grad.to(real.dtype)
    g_stride = 0 if grad.numel() == 1 else grad.stride(0)  # autograd may hand an expanded gradient (stride 0)
    _GRAD((chunks, S), [real, w, wmax, grad, torch.view_as_real(out), P, H, width, Wf, sb, sc, sh, sw, max_stride,
                        g_stride, float(scale), (H * width) ** -0.5, float(alpha)],
          (mode, kind, log, wdtype, grad.dtype), dict(MODE=mode, KIND=kind, LOG=log, BLOCK=_BLOCK),
          num_warps=_NUM_WARPS)
    return out


def plane_max(spec: torch.Tensor, width: int, alpha: float, log: bool) -> torch.Tensor:
    """[S·P]: the max over each [H, Wf] plane of (|D|/√(H·width))^alpha (log(1 + ·) with `log`). A NaN entry
    may or may not win; either way its own energy is NaN, so the loss is NaN, as in the composition."""
    S, P, H, Wf = spec.shape
    real = _real(spec)
    out = torch.empty(S * P, dtype=real.dtype, device=spec.device)
    kind = alpha_kind(alpha)
    _MAX((S * P,), [real, out, H * Wf, (H * width) ** -0.5, float(alpha)], (kind, log),
         dict(KIND=kind, LOG=log, BLOCK=_BLOCK), num_warps=_NUM_WARPS)
    return out


def spectrum_weight(spec: torch.Tensor, height: int, width: int, alpha: float, eps: float) -> torch.Tensor:
    """[B, 1, height, width] = max(mean_c |X_c| / √(height·width), eps)^alpha from the unnormalised half
    spectrum `spec` [B, C, height, width/2+1] (the ortho magnitude, channel-averaged, on the full grid)."""
    B, C, H, Wf = spec.shape
    real = _real(spec)
    out = torch.empty((B, 1, height, width), dtype=real.dtype, device=spec.device)
    kind = alpha_kind(alpha)
    _WEIGHT((cdiv(height * width, _BLOCK), B), [real, out, C, H, width, Wf, (height * width) ** -0.5,
                                                       float(eps), float(alpha)],
            (kind,), dict(KIND=kind, BLOCK=_BLOCK), num_warps=_NUM_WARPS)
    return out
