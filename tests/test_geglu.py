"""GEGLU (pydpm.ops.geglu).

The registry's contract tests (test_contract.py) cover forward values on every backend and dtype against the
float64 reference, poisoned outputs, the 2x-eager rule, opcheck, torch.compile and the bad-input axis. Here: an
independent oracle (diffusers' GEGLU module), gradients (gradcheck in float64 on every backend, Triton through
the interpreter on the CPU; autograd through the eager composition for awkward layouts and a broadcast dy; low
precision), both approximations against torch.nn.functional.gelu over a wide range, and the argument errors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydpm.ops import geglu, use_backend
from _support import HAS_CUDA, backend_device, randn

BACKENDS = ["reference", "triton"]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # triton runs on CUDA, or on the CPU through the interpreter
APPROXIMATIONS = ["none", "tanh"]




@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def eager_geglu(h, approximate="none"):
    """The composition diffusers' GEGLU runs after its projection."""
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate, approximate=approximate)


# --------------------------------------------------------------------------------------------------
# An independent oracle: diffusers' GEGLU module
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_diffusers_geglu_module(backend, gen):
    activations = pytest.importorskip("diffusers.models.activations",
                                      reason="diffusers is not installed (pip install diffusers)")
    torch.manual_seed(0)
    device = backend_device(backend)
    module = activations.GEGLU(24, 10).double().to(device)
    x = randn(2, 7, 24, device=device, gen=gen)
    with torch.no_grad():
        expected = module(x)
        with use_backend(backend):
            got = geglu(module.proj(x))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, approximate, gen):
    device = backend_device(backend)
    fast = backend == "triton" and not HAS_CUDA  # the interpreter: one random direction, not the full Jacobian
    inputs = [randn(3, 10, device=device, gen=gen),
              randn(2, 3, 2, 6, device=device, gen=gen),
              randn(3, 4, 9, device=device, gen=gen)[..., 1:7]]  # rows with a stride other than 2D
    with use_backend(backend):
        for h in inputs:
            h.requires_grad_()
            assert torch.autograd.gradcheck(lambda t: geglu(t, approximate=approximate), (h,), fast_mode=fast)


LAYOUTS = {
    "contiguous": lambda t: t,
    "row-stride": lambda t: torch.cat([t, t[..., :3]], dim=-1)[..., :t.shape[-1]],
    "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "column-stride": lambda t: torch.stack([t, t], dim=-1)[..., 0],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_match_eager_in_float64(backend, approximate, layout, gen):
    device = backend_device(backend)
    h = LAYOUTS[layout](randn(3, 5, 2 * 7, device=device, gen=gen)).requires_grad_()
    dy = randn(3, 5, 7, device=device, gen=gen)
    h_ref = h.detach().clone().requires_grad_()
    y_ref = eager_geglu(h_ref, approximate)
    (dh_ref,) = torch.autograd.grad(y_ref, h_ref, dy)
    with use_backend(backend):
        y = geglu(h, approximate=approximate)
        (dh,) = torch.autograd.grad(y, h, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dh, dh_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_of_a_sum_reads_the_broadcast_gradient(backend, gen):
    """y.sum().backward() hands the backward an expand()ed dy (every stride 0)."""
    h = randn(4, 6, device=backend_device(backend), gen=gen).requires_grad_()
    with use_backend(backend):
        geglu(h, approximate="tanh").sum().backward()
    h_ref = h.detach().clone().requires_grad_()
    eager_geglu(h_ref, "tanh").sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_forward_and_backward(backend, approximate, dtype, gen):
    device = backend_device(backend)
    h64, dy64 = randn(2, 9, 2 * 24, gen=gen), randn(2, 9, 24, gen=gen)
    h = h64.to(device, dtype).requires_grad_()
    with use_backend(backend):
        y = geglu(h, approximate=approximate)
        (dh,) = torch.autograd.grad(y, h, dy64.to(device, dtype))
    h_ref = h.detach().cpu().double().requires_grad_()  # the rounded inputs: only the op's own error counts
    y_ref = eager_geglu(h_ref, approximate)
    (dh_ref,) = torch.autograd.grad(y_ref, h_ref, dy64.to(dtype).double())
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    for name, got, expected in (("y", y, y_ref), ("dh", dh, dh_ref)):
        assert got.dtype == dtype
        err = ((got.cpu().double() - expected).abs().max() / expected.abs().max()).item()
        assert err < tol, (name, err)


def test_forced_backend_reaches_the_backward(gen, monkeypatch):
    """The backward runs the backend that was forced for the forward (autograd may run it on another thread)."""
    from pydpm.kernels import geglu as kernels

    calls = []
    original = kernels.geglu_bwd
    monkeypatch.setattr(kernels, "geglu_bwd", lambda *a, **k: (calls.append("geglu_bwd"), original(*a, **k))[1])
    h = randn(3, 8, device=DEVICE, gen=gen).requires_grad_()
    with use_backend("triton"):
        y = geglu(h)
    y.sum().backward()
    assert calls == ["geglu_bwd"]


# --------------------------------------------------------------------------------------------------
# Both approximations against torch.nn.functional.gelu
# --------------------------------------------------------------------------------------------------

def _wide_gate(device, dtype):
    """h = [1, b] per row, b over [-30, 30] and the special values: y = gelu(b)."""
    b = torch.cat([torch.linspace(-30, 30, 6001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4], dtype=torch.float64)])
    return torch.stack([torch.ones_like(b), b], dim=-1).to(device, dtype), b


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_matches_torch_over_a_wide_range(backend, approximate):
    """In float64 to rounding; in float32 within torch's own float32 error (the tanh form is computed through
    exp(-2|u|), which neither overflows nor cancels) plus half an ulp of the result; gradients alike."""
    device = backend_device(backend)
    for dtype, atol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        h, b = _wide_gate(device, dtype)
        h.requires_grad_()
        with use_backend(backend):
            y = geglu(h, approximate=approximate)
            (dh,) = torch.autograd.grad(y.sum(), h)
        bb = b.clone().requires_grad_()
        expected = F.gelu(bb, approximate=approximate)
        (slope,) = torch.autograd.grad(expected.sum(), bb)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y[:, 0].cpu().double(), expected.detach(), atol=atol, rtol=4 * eps)
        torch.testing.assert_close(dh[:, 0].cpu().double(), expected.detach(), atol=atol, rtol=4 * eps)
        torch.testing.assert_close(dh[:, 1].cpu().double(), slope, atol=atol, rtol=16 * eps)


def test_the_approximations_differ_and_default_to_erf(gen):
    h = randn(4, 2 * 16, gen=gen)
    exact, tanh = geglu(h), geglu(h, approximate="tanh")
    torch.testing.assert_close(exact, eager_geglu(h, "none"), atol=1e-15, rtol=1e-15)
    torch.testing.assert_close(tanh, eager_geglu(h, "tanh"), atol=1e-15, rtol=1e-15)
    assert (exact - tanh).abs().max() > 1e-5


# --------------------------------------------------------------------------------------------------
# Errors name the argument, what was expected and the fix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_error_messages(backend, gen):
    device = backend_device(backend)
    h = randn(2, 3, 8, device=device, gen=gen)
    cases = [
        (dict(h=randn(2, 7, device=device, gen=gen)), ValueError, r"geglu: h has shape \(2, 7\); its last dim \(7\) "
                                                                   r"must be even"),
        (dict(h=torch.tensor(1.0, device=device)), ValueError, r"geglu: h has shape \(\); it must be \[\.\.\., 2D\]"),
        (dict(h=h.to(torch.int32)), ValueError, r"geglu: h has dtype torch.int32; pass float32"),
        (dict(h=[1.0, 2.0]), TypeError, r"geglu: h must be a torch.Tensor"),
        (dict(h=h, approximate="gelu"), ValueError, r"geglu: approximate is 'gelu'; pass 'none' .* or 'tanh'"),
        (dict(h=h, approximate=None), TypeError, r"geglu: approximate must be a string, 'none' or 'tanh'"),
        (dict(h=h, out=torch.empty(2, 3, 8, device=device, dtype=h.dtype)), ValueError,
         r"geglu: out has shape \(2, 3, 8\); h of shape \(2, 3, 8\) gives \[2, 3, 4\]"),
        (dict(h=h, out=torch.empty(2, 3, 4, device=device, dtype=torch.float32)), ValueError,
         r"geglu: out has dtype torch.float32; it must be torch.float64 \(h's dtype\)"),
        (dict(h=h, out=torch.empty(2, 3, 4, device="meta", dtype=h.dtype)), ValueError, r"geglu: out is on meta"),
        (dict(h=h, out=h[..., 4:]), ValueError, r"geglu: out partially overlaps h"),
    ]
    for kwargs, error, match in cases:
        with use_backend(backend), pytest.raises(error, match=match):
            geglu(**kwargs)
    with use_backend(backend), pytest.raises(ValueError, match="geglu: out= is not differentiable"):
        geglu(h.clone().requires_grad_(), out=torch.empty(2, 3, 4, device=device, dtype=h.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_written_and_returned(backend, gen):
    device = backend_device(backend)
    h = randn(3, 5, 2 * 6, device=device, gen=gen)
    for out in (torch.empty(3, 5, 6, device=device, dtype=h.dtype),
                torch.empty(5, 3, 6, device=device, dtype=h.dtype).transpose(0, 1)):  # written through a copy
        with use_backend(backend):
            assert geglu(h, out=out) is out
        torch.testing.assert_close(out, eager_geglu(h), atol=1e-12, rtol=1e-12)
