"""What the contract tests cannot know about the normalisation blocks (pydpm.ops.norm): independent oracles
(torch's own GroupNorm / LayerNorm modules), gradients of every input through every backend, statistics that
survive a large mean, the split GroupNorm launch, the forced backend reaching the backward."""
from __future__ import annotations

import pytest
import torch

from pydpm import _backend
from pydpm.ops import group_norm, layer_norm_modulate, use_backend
from pydpm.ops.norm import group_norm_reference, layer_norm_modulate_reference
from _support import HAS_CUDA, TRITON_ON_CPU, randn

BACKENDS = ["reference", TRITON_ON_CPU]



@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_equals_torch_modules(backend, gen):
    """nn.GroupNorm, then diffusers' `h * (1 + scale) + shift`, then nn.SiLU: an oracle written by others."""
    x, temb = randn(2, 12, 5, 7, gen=gen), randn(2, 24, 1, 1, gen=gen)
    norm = torch.nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        norm.weight.copy_(randn(12, gen=gen))
        norm.bias.copy_(randn(12, gen=gen))
        scale, shift = temb.chunk(2, dim=1)
        want = torch.nn.SiLU()(norm(x) * (1 + scale) + shift)
        with use_backend(backend):
            got = group_norm(x, 4, norm.weight, norm.bias, norm.eps, "silu", (scale, shift))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_modulate_equals_torch_modules(backend, gen):
    x, table = randn(2, 9, 24, gen=gen), randn(2, 6, 24, gen=gen)
    norm = torch.nn.LayerNorm(24, elementwise_affine=False, eps=1e-6).double()
    shift, scale = table[:, 0], table[:, 1]
    want = norm(x) * (1 + scale[:, None]) + shift[:, None]
    with torch.no_grad(), use_backend(backend):
        got = layer_norm_modulate(x, None, None, shift, scale, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "silu", "scale-shift-silu", "no-affine-scale-shift", "channels-last"])
def test_group_norm_gradients(backend, variant, gen):
    """torch.autograd.gradcheck in float64: x, weight, bias, scale and shift (chunks of one temb)."""
    x = randn(2, 6, 2, 3, gen=gen)
    if variant == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = randn(6, gen=gen).requires_grad_(), randn(6, gen=gen).requires_grad_()
    temb = randn(2, 12, 1, 1, gen=gen).requires_grad_()
    silu = None if variant == "plain" else "silu"
    affine = variant != "no-affine-scale-shift"
    modulated = "scale-shift" in variant or variant == "channels-last"

    def f(x, w, b, temb):
        return group_norm(x, 3, w if affine else None, b if affine else None, 1e-5, silu,
                          temb.chunk(2, dim=1) if modulated else None)

    with use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, b, temb), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_modulate_gradients(backend, affine, gen):
    x = randn(2, 3, 7, gen=gen).requires_grad_()
    table = randn(2, 6, 7, gen=gen).requires_grad_()
    w, b = randn(7, gen=gen).requires_grad_(), randn(7, gen=gen).requires_grad_()

    def f(x, table, w, b):
        return layer_norm_modulate(x, w if affine else None, b if affine else None, table[:, 0:1], table[:, 1:2],
                                   1e-6)

    with use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, table, w, b), fast_mode=True)


def test_the_backward_runs_on_the_forced_backend(monkeypatch, gen):
    """A backward re-enters the backend forced for its forward (autograd may run it on another thread)."""
    from pydpm.ops import norm

    x = randn(2, 4, 3, 3, gen=gen).requires_grad_()
    with use_backend("reference"):
        y = group_norm(x, 2, activation="silu")
    calls = []
    real = norm.GROUP_NORM_OP.select

    def spy(args):
        backend = real(args)
        calls.append((args.stage, backend.name))
        return backend
    monkeypatch.setattr(norm.GROUP_NORM_OP, "select", spy)
    y.sum().backward()
    assert calls == [("group_norm_backward", "reference")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_survive_a_large_mean(backend, gen):
    """float32 inputs with mean 1e4 and standard deviation 1: E[x²] − E[x]² would lose every digit of the
    variance (1e8 against 1, float32 keeps 7); the merged statistics keep the error at the float32 rounding of
    the inputs' mean (≈ 1e4 · 2⁻²⁴ / σ ≈ 6e-4)."""
    x = (randn(2, 8, 16, 16, gen=gen) + 1e4).float()
    x64 = x.double()
    want = group_norm_reference(x64, 2)
    with torch.no_grad(), use_backend(backend):
        got = group_norm(x, 2).double()
        got_nhwc = group_norm(x.contiguous(memory_format=torch.channels_last), 2).double()
    err = max((got - want).abs().max().item(), (got_nhwc - want).abs().max().item())
    naive_var = (x.reshape(2, 2, -1).square().mean(-1) - x.reshape(2, 2, -1).mean(-1).square())
    true_var = x64.reshape(2, 2, -1).var(-1, unbiased=False)
    assert (naive_var.double() - true_var).abs().max().item() > 0.1  # the test would catch the naive formula
    assert err < 2e-3, err
    xl = (randn(2, 5, 64, gen=gen) + 1e4).float()
    shift, scale = torch.zeros(2, 64), torch.zeros(2, 64)
    with torch.no_grad(), use_backend(backend):
        got = layer_norm_modulate(xl, None, None, shift, scale, 1e-6).double()
    assert (got - layer_norm_modulate_reference(xl.double(), None, None, shift.double(), scale.double(), 1e-6)
            ).abs().max().item() < 2e-3


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_the_split_group_norm_launch(splits, gen):
    """Groups shared by several programs (statistics merged across the shares, then each share's output):
    equal to the reference, with and without the statistics the backward keeps."""
    if not (HAS_CUDA or _backend.triton_interpreting()):
        pytest.skip("the triton launchers run on CUDA, or on CPU through the interpreter (TRITON_INTERPRET=1)")
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    k = _backend.kernels("norm")
    # channels-last: three launches over tiles of 64 adjacent channels (130 channels: a partial third block)
    for layout, C, G in ((torch.contiguous_format, 6, 3), (torch.channels_last, 6, 3), (torch.channels_last, 130, 13)):
        x = randn(2, C, 9, 11, gen=gen, device=device).contiguous(memory_format=layout) + 3
        w, b = randn(C, gen=gen, device=device), randn(C, gen=gen, device=device)
        scale, shift = randn(2, C, gen=gen, device=device), randn(2, C, gen=gen, device=device)
        out = torch.full_like(x, float("nan"))
        stats = k.group_norm_fwd(x, out, G, w, b, scale, shift, 1e-5, True, True, splits=splits)
        want = group_norm_reference(x.cpu(), G, w.cpu(), b.cpu(), 1e-5, "silu", (scale.cpu(), shift.cpu()))
        assert out.stride() == x.stride()
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)
        plain = torch.full_like(x, float("nan"))  # without the statistics the backward keeps
        assert k.group_norm_fwd(x, plain, G, w, b, scale, shift, 1e-5, True, False, splits=splits) is None
        torch.testing.assert_close(plain.cpu(), want, rtol=1e-12, atol=1e-12)
        xg = x.cpu().reshape(2, G, -1)
        torch.testing.assert_close(stats.cpu()[..., 0], xg.mean(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.cpu()[..., 1], torch.rsqrt(xg.var(-1, unbiased=False) + 1e-5), rtol=1e-12,
                                   atol=1e-12)
