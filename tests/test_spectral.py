"""Spectral losses beyond the registry contract: gradients against float64 autograd through the references,
Parseval (alpha = 0 is the spatial loss), the Hermitian-symmetric part of a weight, parity with the official
focal frequency loss, the spectral distillation term, and argument errors."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pydpm.ops import (focal_frequency_loss, frequency_weighted_mse, spectral_distill_loss, spectrum_weight,
                       use_backend)
from pydpm.ops.spectral import (focal_frequency_loss_reference, frequency_weighted_mse_reference,
                                spectrum_weight_reference)
from _support import HAS_CUDA

# triton: the GPU, or the interpreter on CPU tensors (CI); reference: the CPU path in float64 too.
BACKENDS = ["reference", "triton"]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _oracle_grads(loss_fn, pred, target, **kwargs):
    """The loss and its gradients in float64 through torch's autograd of the reference on CPU copies."""
    p, t = (x.detach().cpu().double().requires_grad_() for x in (pred, target))
    k = {n: (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    loss = loss_fn(p, t, **k)
    g = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return loss, g, torch.autograd.grad(loss, (p, t), g)


def _ours(fn, backend, pred, target, g, **kwargs):
    p, t = (x.detach().clone().requires_grad_() for x in (pred, target))
    with use_backend(backend):
        loss = fn(p, t, **kwargs)
        loss.backward(g.to(device=loss.device, dtype=loss.dtype))
    return loss, p.grad, t.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "per_sample"])
@pytest.mark.parametrize("shape, wshape", [((2, 3, 6, 9), (1, 3, 6, 9)), ((1, 1, 1, 1), (1, 1)),
                                           ((3, 2, 7, 5), (3, 1, 7, 5)), ((2, 4, 8, 8), (8, 8))])
def test_fwmse_value_and_gradients_equal_float64_autograd(backend, reduction, shape, wshape):
    gen = torch.Generator().manual_seed(sum(shape))
    pred, target = _rand(*shape, gen=gen), _rand(*shape, gen=gen)
    weight = _rand(*wshape, gen=gen).abs() + 0.1  # not Hermitian-symmetric: only its symmetric part counts
    expected, g, (gp, gt) = _oracle_grads(frequency_weighted_mse_reference, pred, target, weight=weight,
                                          reduction=reduction)
    loss, dp, dt = _ours(frequency_weighted_mse, backend, pred, target, g, weight=weight, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=2e-5, atol=1e-6)
    scale = gp.abs().max().item()
    torch.testing.assert_close(dp.cpu().double(), gp, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(dt.cpu().double(), gt, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(alpha=2.0), dict(alpha=0.5, log_matrix=True),
                                     dict(batch_matrix=True), dict(ave_spectrum=True), dict(alpha=0.0),
                                     dict(patch_factor=2), dict(patch_factor=3, alpha=1.5, ave_spectrum=True,
                                                                log_matrix=True, batch_matrix=True)])
def test_focal_value_and_gradients_equal_float64_autograd(backend, options):
    gen = torch.Generator().manual_seed(3)
    pred, target = _rand(2, 3, 6, 12, gen=gen), _rand(2, 3, 6, 12, gen=gen)
    expected, g, (gp, gt) = _oracle_grads(focal_frequency_loss_reference, pred, target, **options)
    loss, dp, dt = _ours(focal_frequency_loss, backend, pred, target, g, **options)
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=2e-5, atol=1e-6)
    scale = gp.abs().max().item()
    torch.testing.assert_close(dp.cpu().double(), gp, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(dt.cpu().double(), gt, rtol=1e-4, atol=1e-5 * scale)


def test_gradcheck_in_float64():
    """torch.autograd.gradcheck of both losses on the reference backend (float64 runs there)."""
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(2, 1, 4, 5, dtype=torch.float64, generator=gen) + 0.1
    assert torch.autograd.gradcheck(lambda p, t: frequency_weighted_mse(p, t, weight, reduction="per_sample"),
                                    (pred, target))
    # The focal weight is detached (as in the official code), so only alpha = 0 (ω = 1) has the true derivative.
    assert torch.autograd.gradcheck(lambda p, t: focal_frequency_loss(p, t, alpha=0.0),
                                    (pred, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_weight_is_the_spatial_mse(backend):
    """Parseval with the orthonormal DFT: ω = 1 (alpha = 0 in spectrum_weight) gives F.mse_loss exactly."""
    gen = torch.Generator().manual_seed(5)
    pred, target, x0 = _rand(3, 4, 10, 7, gen=gen), _rand(3, 4, 10, 7, gen=gen), _rand(3, 3, 20, 14, gen=gen)
    with use_backend(backend):
        ones = spectrum_weight(x0, (10, 7), alpha=0.0)
        loss = spectral_distill_loss(pred, target, weight=ones)
        per_sample = frequency_weighted_mse(pred, target, ones, reduction="per_sample")
    assert torch.equal(ones.cpu(), torch.ones(3, 1, 10, 7))
    torch.testing.assert_close(loss, F.mse_loss(pred, target), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_sample, F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_symmetric_part_of_a_weight_counts(backend):
    gen = torch.Generator().manual_seed(6)
    pred, target = _rand(2, 3, 6, 9, gen=gen), _rand(2, 3, 6, 9, gen=gen)
    w = _rand(6, 9, gen=gen).abs()
    mirrored = torch.roll(torch.flip(w, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # w[-i, -j]
    with use_backend(backend):
        a = frequency_weighted_mse(pred, target, w)
        b = frequency_weighted_mse(pred, target, (w + mirrored) / 2)
        c = frequency_weighted_mse(pred, target, mirrored)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_loss_equals_the_official_package(backend):
    """Parity with `focal_frequency_loss.FocalFrequencyLoss` (the official code), loss and gradients, for every
    option; and ours synchronises nowhere (the official code calls .item() in an assert)."""
    official = pytest.importorskip("focal_frequency_loss")
    gen = torch.Generator().manual_seed(7)
    for options in (dict(), dict(alpha=2.0, patch_factor=2), dict(log_matrix=True, batch_matrix=True),
                    dict(ave_spectrum=True, alpha=0.5)):
        pred, target = _rand(2, 3, 8, 8, gen=gen), _rand(2, 3, 8, 8, gen=gen)
        p1, t1 = (x.clone().requires_grad_() for x in (pred, target))
        expected = official.FocalFrequencyLoss(**options)(p1, t1)
        expected.backward()
        p2, t2 = (x.clone().requires_grad_() for x in (pred, target))
        with use_backend(backend):
            loss = focal_frequency_loss(p2, t2, **options)
            loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(t2.grad, t1.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectrum_weight_definition(backend):
    """ω from its definition written out: x0 resized, |fft2| averaged over channels, clamped, powered; the
    eps clamp keeps a constant image's zero bins finite under alpha = -1."""
    gen = torch.Generator().manual_seed(8)
    x0 = _rand(2, 3, 16, 12, gen=gen)
    with use_backend(backend):
        w = spectrum_weight(x0, (8, 6))
        flat = spectrum_weight(torch.full((1, 3, 4, 4), 2.0, device=DEVICE), eps=0.01)
    small = F.interpolate(x0.cpu().double(), size=(8, 6), mode="bilinear", antialias=True, align_corners=False)
    magnitude = torch.stack([torch.fft.fft2(small[:, c], norm="ortho").abs() for c in range(3)], 1).mean(1, True)
    torch.testing.assert_close(w.cpu().double(), 1.0 / magnitude.clamp_min(1e-3), rtol=1e-5, atol=0)
    expected_flat = torch.full((1, 1, 4, 4), 100.0, dtype=torch.float64)
    expected_flat[0, 0, 0, 0] = 1.0 / 8.0  # the DC bin of a constant 2 over 4×4, ortho: 2·16/4 = 8
    torch.testing.assert_close(flat.cpu().double(), expected_flat, rtol=1e-5, atol=0)
    assert not w.requires_grad


def test_spectral_distill_loss_shares_one_weight_per_scale():
    """x0 gives the weight at the student's size; passing that weight gives the same loss; a frozen teacher."""
    gen = torch.Generator().manual_seed(9)
    student = _rand(2, 8, 8, 8, gen=gen).requires_grad_()
    teacher, x0 = _rand(2, 8, 8, 8, gen=gen), _rand(2, 3, 32, 32, gen=gen)
    a = spectral_distill_loss(student, teacher, x0)
    b = spectral_distill_loss(student, teacher, weight=spectrum_weight(x0, (8, 8)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = frequency_weighted_mse_reference(student.detach().cpu().double(), teacher.cpu().double(),
                                                spectrum_weight_reference(x0.cpu().double(), (8, 8)))
    torch.testing.assert_close(a.detach().cpu().double(), expected, rtol=1e-5, atol=0)
    a.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of x0"),
    (dict(x0="x0", weight="w"), "exactly one of x0"),
    (dict(x0=torch.randn(3, 3, 8, 8)), "x0 has batch 3 but student has 2"),
    (dict(x0=torch.randn(2, 3, 8)), "x0 has shape"),
])
def test_spectral_distill_loss_errors_name_the_argument(kwargs, match):
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    if kwargs.get("x0") == "x0":
        kwargs = dict(x0=torch.randn(2, 3, 8, 8), weight=torch.ones(8, 8))
    with pytest.raises(ValueError, match=match):
        spectral_distill_loss(student, teacher, **kwargs)


def test_mismatched_pair_and_weight_that_requires_grad():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="target has shape"):
        frequency_weighted_mse(pred, torch.randn(2, 4, 8, 9), torch.ones(8, 8))
    with pytest.raises(ValueError, match="weight requires grad"):
        frequency_weighted_mse(pred, torch.randn(2, 4, 8, 8), torch.ones(8, 8, requires_grad=True))
    with torch.no_grad():  # no gradient is recorded: a weight that requires grad is harmless there
        frequency_weighted_mse(pred, torch.randn(2, 4, 8, 8), torch.ones(8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="patch_factor is 3"):
        focal_frequency_loss(pred, pred.detach(), patch_factor=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_the_inputs_gives_a_nan_loss(backend):
    """A NaN is never averaged away: in x0 it reaches the weight of that sample, in pred the loss."""
    x0 = torch.randn(2, 3, 8, 8, device=DEVICE)
    x0[1, 0, 2, 3] = math.nan
    pred, target = torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(2, 3, 8, 8, device=DEVICE)
    with use_backend(backend):
        w = spectrum_weight(x0)
        assert torch.isfinite(w[0]).all() and torch.isnan(w[1]).all()
        assert torch.isnan(frequency_weighted_mse(pred, target, w))
        pred[0, 1, 1, 1] = math.nan
        assert torch.isnan(focal_frequency_loss(pred, target))


_COMPILE = """if True:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from pydpm.kernels import spectral as K

    f32, i32 = "*fp32", "i32"
    strides = dict(P=i32, H=i32, W=i32, Wf=i32, sb=i32, sc=i32, sh=i32, sw=i32, max_stride=i32)
    scalars = dict(scale="fp32", norm="fp32", alpha="fp32")
    kernels = [
        (K._ENERGY, dict(spec=f32, weight="*bf16", wmax=f32, partial=f32, **strides, **scalars, n_chunks=i32),
         dict(MODE=K.EXPLICIT, KIND=2, LOG=False)),
        (K._GRAD, dict(spec=f32, weight=f32, wmax=f32, grad=f32, out=f32, **strides, g_stride=i32, **scalars),
         dict(MODE=K.FOCAL, KIND=2, LOG=True)),
        (K._MAX, dict(spec=f32, out=f32, n_plane=i32, norm="fp32", alpha="fp32"), dict(KIND=2, LOG=True)),
        (K._WEIGHT, dict(spec=f32, out=f32, C=i32, H=i32, W=i32, Wf=i32, inv_norm="fp32", eps="fp32",
                         alpha="fp32"), dict(KIND=3)),
    ]
    for kernel, signature, constants in kernels:
        constants = dict(constants, BLOCK=1024)
        signature = dict(signature, **{k: "constexpr" for k in constants})
        compiled = triton_compile(ASTSource(kernel.fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn
    print("compiled")
"""


def test_the_kernels_compile_for_hopper():
    """CI has no GPU and runs Triton through its interpreter, which accepts code the compiler refuses: compile one
    variant of every kernel of the family for sm_90 (both ω modes, the general exponent, log) in a process
    where the interpreter is off (it wraps the kernels at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-3000:]
