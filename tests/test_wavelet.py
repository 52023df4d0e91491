"""Haar wavelet family beyond the registry contract: PyWavelets (float64) oracles for the transforms,
gradients (gradcheck on the reference path; Triton's fused backward against float64 autograd), module
behaviour, argument errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pydpm.ops import (haar_dwt2, haar_idwt2, haar_wavedec2, haar_waverec2, use_backend, wavelet_gate_down,
                       wavelet_gate_up)
from pydpm.ops.wavelet import wavelet_gate_down_reference, wavelet_gate_up_reference
from _support import HAS_CUDA

pywt = pytest.importorskip("pywt")

SHAPES = [(1, 1, 2, 2), (2, 3, 4, 6), (1, 7, 10, 14), (2, 3, 6, 258)]
# Triton runs on the GPU when there is one, else through the interpreter (forced) on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dwt_idwt_equal_pywavelets(shape, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    x = rand(*shape, seed=1)
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "haar")
    with use_backend(backend):
        ll, high = haar_dwt2(x.to(TRITON_DEVICE if backend == "triton" else "cpu", dtype))
        back = haar_idwt2(ll, high)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(ll.cpu().double().numpy(), cA, atol=tol, rtol=tol)
    np.testing.assert_allclose(high.cpu().double().numpy(), np.stack([cH, cV, cD], axis=2), atol=tol, rtol=tol)
    np.testing.assert_allclose(back.cpu().double().numpy(), pywt.idwt2((cA, (cH, cV, cD)), "haar"), atol=tol,
                               rtol=tol)
    np.testing.assert_allclose(back.cpu().double().numpy(), x.numpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_wavedec_waverec_equal_pywavelets(levels):
    x = rand(2, 3, 16, 24, seed=2)
    coeffs = haar_wavedec2(x, levels)
    ref = pywt.wavedec2(x.numpy(), "haar", level=levels)
    assert len(coeffs) == len(ref) == levels + 1
    np.testing.assert_allclose(coeffs[0].numpy(), ref[0], atol=1e-12)
    for ours, theirs in zip(coeffs[1:], ref[1:]):
        np.testing.assert_allclose(ours.numpy(), np.stack(theirs, axis=2), atol=1e-12)
    torch.testing.assert_close(haar_waverec2(coeffs), x, atol=1e-12, rtol=1e-12)


def test_gates_reduce_to_the_transform():
    """Unit gates on one band select that band: WG-Down is a gated DWT, WG-Up a gated IDWT."""
    x = rand(2, 3, 8, 10, seed=3)
    ll, high = haar_dwt2(x)
    bands = [ll] + list(high.unbind(2))
    for i in range(4):
        gates = torch.zeros(2, 4, 3, dtype=torch.float64)
        gates[:, i] = 1
        torch.testing.assert_close(wavelet_gate_down(x, gates), bands[i])
    chunks = torch.cat(bands, dim=1)
    torch.testing.assert_close(wavelet_gate_up(chunks, torch.ones(2, 4, 3, dtype=torch.float64)), x)


@pytest.mark.parametrize("op", ["dwt", "idwt", "down", "up"])
def test_gradcheck_float64(op):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    gates = torch.rand(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    if op == "dwt":
        torch.autograd.gradcheck(haar_dwt2, (x,))
    elif op == "idwt":
        high = torch.randn(2, 3, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
        torch.autograd.gradcheck(haar_idwt2, (x, high))
    elif op == "down":
        torch.autograd.gradcheck(wavelet_gate_down, (x, gates))
    else:
        x12 = torch.randn(2, 12, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
        torch.autograd.gradcheck(wavelet_gate_up, (x12, gates))


@pytest.mark.parametrize("op", ["down", "up"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 6, 10), (1, 7, 4, 258)], ids=str)
def test_triton_fused_backward_equals_float64_autograd(op, shape):
    """dx and dgates from the one-pass Triton backward against autograd of the float64 composition."""
    B, C, H, W = shape
    x64 = rand(B, 4 * C, H // 2, W // 2, seed=5) if op == "up" else rand(*shape, seed=5)
    g64 = rand(B, 4, C, seed=6)
    ref_fn = wavelet_gate_up_reference if op == "up" else wavelet_gate_down_reference
    fn = wavelet_gate_up if op == "up" else wavelet_gate_down
    x_ref, g_ref = x64.clone().requires_grad_(), g64.clone().requires_grad_()
    y_ref = ref_fn(x_ref, g_ref)
    dy = rand(*y_ref.shape, seed=7)
    y_ref.backward(dy)
    x = x64.to(TRITON_DEVICE, torch.float32).requires_grad_()
    gates = g64.to(TRITON_DEVICE, torch.float32).requires_grad_()
    with use_backend("triton"):
        y = fn(x, gates)
        y.backward(dy.to(TRITON_DEVICE, torch.float32))
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gates.grad.cpu().double(), g_ref.grad, atol=1e-4, rtol=1e-4)


def test_dwt_backward_is_the_inverse_and_handles_unused_outputs():
    x = rand(2, 3, 4, 4, seed=8).requires_grad_()
    ll, _ = haar_dwt2(x)
    ll.sum().backward()  # high unused: its gradient is zero
    expected = haar_idwt2(torch.ones(2, 3, 2, 2, dtype=torch.float64), torch.zeros(2, 3, 3, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(x.grad, expected)


def test_torch_compile_backward():
    x = rand(2, 3, 4, 6, seed=9).float().requires_grad_()
    gates = rand(2, 4, 3, seed=10).float().requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda x, g: wavelet_gate_down(x, g).square().sum(), fullgraph=True)
    f(x, gates).backward()
    x2, g2 = x.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_()
    wavelet_gate_down_reference(x2, g2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates.grad, g2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: haar_dwt2(torch.zeros(1, 1, 3, 4)), r"spatial size 3×4.*pad"),
    (lambda: haar_dwt2(torch.zeros(1, 4, 4)), "4 dimensions"),
    (lambda: haar_dwt2(torch.zeros(1, 1, 4, 4, dtype=torch.int32)), "dtype torch.int32"),
    (lambda: haar_idwt2(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2)), r"high has shape"),
    (lambda: wavelet_gate_down(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3)), r"gates has shape \(2, 3, 3\)"),
    (lambda: wavelet_gate_up(torch.zeros(2, 6, 4, 4), torch.zeros(2, 4, 1)), "needs 4·C"),
    (lambda: wavelet_gate_down(torch.zeros(1, 1, 4, 4, requires_grad=True), torch.zeros(1, 4, 1),
                               out=torch.zeros(1, 1, 2, 2)), "out= is not differentiable"),
    (lambda: haar_dwt2(torch.zeros(1, 1, 4, 4), out=torch.zeros(1, 1, 2, 2)), "out must hold 2"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_band_means_equal_the_means_of_the_bands():
    from pydpm.nn.wavelet import band_means
    x = rand(2, 3, 8, 10, seed=11)
    ll, high = haar_dwt2(x)
    expected = torch.cat([ll.unsqueeze(2), high], dim=2).mean(dim=(-2, -1)).transpose(1, 2)
    torch.testing.assert_close(band_means(x), expected)


@pytest.mark.parametrize("temb", [False, True])
def test_wavelet_gate_modules(temb):
    """Shapes, gates in (0, 1), the module equals its eager definition, gradients reach every parameter."""
    from pydpm.nn.wavelet import WaveletGateDown, WaveletGateUp
    torch.manual_seed(0)
    x = rand(2, 8, 6, 10, seed=12, dtype=torch.float32)
    t = torch.randn(2, 16) if temb else None
    down = WaveletGateDown(8, temb_dim=16 if temb else None)
    up = WaveletGateUp(8, temb_dim=16 if temb else None)
    y = down(x, t)
    assert y.shape == (2, 8, 3, 5)
    z = up(y, t)
    assert z.shape == (2, 8, 6, 10)
    # eager definition of WG-Down: gates from the explicit bands
    ll, high = haar_dwt2(x)
    bands = torch.cat([ll.unsqueeze(2), high], dim=2)                     # [B, C, 4, h, w]
    g = down.gates(bands.mean(dim=(-2, -1)).transpose(1, 2), t)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(y, (bands * g.transpose(1, 2)[..., None, None]).sum(2), atol=1e-5, rtol=1e-5)
    (z.square().sum()).backward()
    for m in (down, up):
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match="even H, W"):
        down(torch.zeros(1, 8, 5, 4))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA backwards run on autograd's device thread only on a GPU")
def test_forced_backend_reaches_the_cuda_backward(monkeypatch):
    """use_backend is a ContextVar, which autograd's CUDA device thread does not see: the backward must
    re-enter the backend forced at the forward (here: reference; the Triton path is made to fail)."""
    import pydpm.ops.wavelet as W
    from pydpm._cache import BoundedCache
    from pydpm.ops._framework import Backend

    def fail(args):
        raise AssertionError(f"the triton backend ran {args.kind} although reference was forced")
    for op in (W.DWT_OP, W.IDWT_OP, W.DOWN_OP, W.UP_OP):
        monkeypatch.setattr(op, "backends", (Backend("triton", fail, W._triton_reasons), W.BACKENDS[1]))
        monkeypatch.setattr(op, "_chosen", BoundedCache(op._chosen.maxsize))
    x = rand(2, 3, 8, 8, dtype=torch.float32, device="cuda").requires_grad_()
    gates = rand(2, 4, 3, dtype=torch.float32, device="cuda").requires_grad_()
    with use_backend("reference"):
        y = wavelet_gate_down(x, gates)
        ll, high = haar_dwt2(y)
        (ll.sum() + high.square().sum()).backward()
    assert x.grad is not None and gates.grad is not None
