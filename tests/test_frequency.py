"""FF-Parser, SimpleGate, SCA and the NAF block (pydpm.ops.ff_parser, pydpm.ops.naf, pydpm.nn.frequency).

The registry's contract tests (test_contract.py) cover forward values on every backend and dtype, opcheck and
torch.compile. Here: gradients against autograd through the eager definitions in float64, gradcheck on both
backends (Triton through the interpreter on the CPU), awkward shapes (C = 1, 3, 7; H ≠ W; 1×1 and 2×2 maps;
batch 1), low-precision gradients, the modules against the papers' definitions, and the argument errors.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from pydpm import nn as pnn
from pydpm.ops import (BackendUnavailable, ff_parser, simple_gate, simple_gate_sca, simplified_channel_attention,
                       use_backend)
from _support import HAS_CUDA, backend_device, randn

ffp = importlib.import_module("pydpm.ops.ff_parser")  # the module (pydpm.ops.ff_parser is also the op's name)

BACKENDS = ["reference", "triton"]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # triton runs on CUDA, or on the CPU through the interpreter




@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------------------------------
# The eager definitions, as the papers' code writes them (float64 autograd is the gradient oracle)
# --------------------------------------------------------------------------------------------------

def eager_ff_parser(x, weight):
    """MedSegDiff's FFParser.forward: rfft2 ortho, times view_as_complex(weight), irfft2 ortho."""
    spectrum = torch.fft.rfft2(x, dim=(2, 3), norm="ortho")
    spectrum = spectrum * (weight if weight.is_complex() else torch.view_as_complex(weight))
    return torch.fft.irfft2(spectrum, s=x.shape[-2:], dim=(2, 3), norm="ortho")


def eager_simple_gate(x):
    x1, x2 = x.chunk(2, dim=1)
    return x1 * x2


def eager_sca(x, weight, bias):
    """NAFNet: x * Conv2d(C, C, 1)(AdaptiveAvgPool2d(1)(x)), for 4-D x."""
    w = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
    return x * F.conv2d(F.adaptive_avg_pool2d(x, 1), w, bias)


def _grads(fn, inputs, dy):
    y = fn(*inputs)
    return y, torch.autograd.grad(y, [t for t in inputs if t is not None and t.requires_grad], dy)


def _assert_all_close(got, expected, atol=1e-11, rtol=1e-9):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e.cpu(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# FF-Parser
# --------------------------------------------------------------------------------------------------

FF_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 1, 4, 6), (1, 3, 6, 4), (2, 2, 3, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ff_parser_matches_eager_forward_and_backward(backend, shape, gen):
    B, C, H, W = shape
    device = backend_device(backend)
    x = randn(*shape, device=device, gen=gen).requires_grad_()
    w = randn(C, H, W // 2 + 1, 2, device=device, gen=gen).requires_grad_()
    dy = randn(*shape, device=device, gen=gen)
    y_ref, g_ref = _grads(eager_ff_parser, (x, w), dy)
    with use_backend(backend):
        y, g = _grads(ff_parser, (x, w), dy)
    _assert_all_close([y, *g], [y_ref, *g_ref])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wants", ["x", "weight"])
def test_ff_parser_gradient_of_one_input(backend, wants, gen, monkeypatch):
    """Only the needed side is computed: no spectrum kept without a weight gradient, no dx without x's."""
    device = backend_device(backend)
    x = randn(2, 3, 5, 6, device=device, gen=gen).requires_grad_(wants == "x")
    w = randn(3, 5, 4, 2, device=device, gen=gen).requires_grad_(wants == "weight")
    dy = randn(2, 3, 5, 6, device=device, gen=gen)
    seen = []
    original = ffp._ff_run

    def spy(args, *rest, **kw):
        seen.append((args.backward, args.keep_spectrum, args.need_dx, args.spectrum is not None))
        return original(args, *rest, **kw)

    monkeypatch.setattr(ffp, "_ff_run", spy)
    y_ref, g_ref = _grads(eager_ff_parser, (x, w), dy)
    with use_backend(backend):
        y, g = _grads(ff_parser, (x, w), dy)
    _assert_all_close([y, *g], [y_ref, *g_ref])
    wants_w = wants == "weight"
    assert seen == [(False, wants_w, True, False), (True, False, not wants_w, wants_w)]


def test_ff_parser_complex_weight_and_module(gen):
    x = randn(2, 3, 4, 6, gen=gen).requires_grad_()
    wc = torch.view_as_complex(randn(3, 4, 4, 2, gen=gen)).requires_grad_()
    dy = randn(2, 3, 4, 6, gen=gen)
    y_ref, g_ref = _grads(eager_ff_parser, (x, wc), dy)
    y, g = _grads(ff_parser, (x, wc), dy)
    _assert_all_close([y, *g], [y_ref, *g_ref])
    assert g[1].is_complex()

    module = pnn.FFParser(3, 4, 6).double()
    torch.testing.assert_close(module(x), eager_ff_parser(x, module.complex_weight))
    identity = pnn.FFParser(3, 4, 6, init="identity").double()
    torch.testing.assert_close(identity(x), x)
    with pytest.raises(ValueError, match=r"filters \[B, 3, 4, 6\]"):
        module(x[..., :5])


def test_ff_parser_gradcheck_full_jacobian_triton(gen):
    """Every Jacobian column of the Triton path (packed spectrum, H odd) on a tiny shape."""
    x = randn(1, 1, 3, 4, device=DEVICE, gen=gen).requires_grad_()
    w = randn(1, 3, 3, 2, device=DEVICE, gen=gen).requires_grad_()
    with use_backend("triton"):
        assert torch.autograd.gradcheck(ff_parser, (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ff_parser_gradcheck(backend, gen):
    device = backend_device(backend)
    x = randn(2, 2, 3, 4, device=device, gen=gen).requires_grad_()
    w = randn(2, 3, 3, 2, device=device, gen=gen).requires_grad_()
    with use_backend(backend):  # fast mode under the interpreter: a few random projections, not every column
        assert torch.autograd.gradcheck(ff_parser, (x, w), fast_mode=backend == "triton" and not HAS_CUDA)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ff_parser_low_precision_gradients(backend, dtype, gen):
    """fp16/bf16 x with an fp32 weight (the mixed-precision setting): FFTs and accumulation in fp32."""
    device = backend_device(backend)
    x64 = randn(2, 3, 8, 8, gen=gen)
    w = randn(3, 8, 5, 2, gen=gen)
    dy64 = randn(2, 3, 8, 8, gen=gen)
    y_ref, g_ref = _grads(eager_ff_parser, (x64.requires_grad_(), w.clone().requires_grad_()), dy64)
    x = x64.detach().to(device, dtype).requires_grad_()
    w32 = w.to(device, torch.float32).requires_grad_()
    with use_backend(backend):
        y, (gx, gw) = _grads(ff_parser, (x, w32), dy64.to(device, dtype))
    assert y.dtype == gx.dtype == dtype and gw.dtype == torch.float32
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    for got, exp in zip((y, gx, gw), (y_ref, *g_ref)):
        err = (got.cpu().double() - exp).abs().max() / exp.abs().max()
        assert err < tol, err


def test_ff_parser_channels_last_and_expanded_grad(gen):
    x = randn(2, 3, 6, 10, gen=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = randn(3, 6, 6, 2, gen=gen).requires_grad_()
    ff_parser(x, w).sum().backward()  # dy is an expanded ones tensor
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    eager_ff_parser(x, w).sum().backward()
    _assert_all_close([gx, gw], [x.grad, w.grad])


# --------------------------------------------------------------------------------------------------
# SimpleGate, SCA, SimpleGate + SCA
# --------------------------------------------------------------------------------------------------

GATE_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 3, 4, 6)]


def _layout(x, layout):
    if layout == "channels-last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _sca_params(C, device, gen, bias=True):
    w = (randn(C, C, 1, 1, device=device, gen=gen) / math.sqrt(C)).requires_grad_()
    b = randn(C, device=device, gen=gen).requires_grad_() if bias else None
    return w, b


@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gate_ops_match_eager_forward_and_backward(backend, shape, layout, gen):
    B, C, H, W = shape
    device = backend_device(backend)
    xg = _layout(randn(B, 2 * C, H, W, device=device, gen=gen), layout).requires_grad_()
    x = _layout(randn(*shape, device=device, gen=gen), layout).requires_grad_()
    w, b = _sca_params(C, device, gen, bias=C != 3)
    dy = randn(*shape, device=device, gen=gen)
    ds = randn(B, C, device=device, gen=gen)

    def gate_sca_eager(x, w, b):
        g = eager_simple_gate(x)
        return g, F.conv2d(F.adaptive_avg_pool2d(g, 1), w, b).reshape(B, C)

    cases = [
        (eager_simple_gate, simple_gate, (xg,), dy),
        (eager_sca, simplified_channel_attention, (x, w, b), dy),
    ]
    for eager_fn, fn, inputs, grad in cases:
        y_ref, g_ref = _grads(eager_fn, inputs, grad)
        with use_backend(backend):
            y, g = _grads(fn, inputs, grad)
        _assert_all_close([y, *g], [y_ref, *g_ref])
    (g_ref, s_ref) = gate_sca_eager(xg, w, b)
    ref_grads = torch.autograd.grad((g_ref, s_ref), [t for t in (xg, w, b) if t is not None], (dy, ds))
    with use_backend(backend):
        g, s = simple_gate_sca(xg, w, b)
        grads = torch.autograd.grad((g, s), [t for t in (xg, w, b) if t is not None], (dy, ds))
        torch.testing.assert_close(g * s[..., None, None], simplified_channel_attention(g, w, b))
    _assert_all_close([g, s, *grads], [g_ref, s_ref, *ref_grads])
    if layout == "channels-last" and H * W > 1:
        assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_ops_other_ranks_and_partial_gradients(backend, gen):
    """[B, C] and [B, C, L] inputs; gradients of one input only; one output of simple_gate_sca unused."""
    device = backend_device(backend)
    for shape in [(3, 3), (2, 3, 9)]:
        B, C = shape[:2]
        x = randn(B, 2 * C, *shape[2:], device=device, gen=gen).requires_grad_()
        w = randn(C, C, device=device, gen=gen).requires_grad_()
        b = randn(C, device=device, gen=gen)
        with use_backend(backend):
            g, s = simple_gate_sca(x, w, b)
            gx, gw = torch.autograd.grad(s.sum(), (x, w))  # g unused: its gradient is None, not zeros
            y = simplified_channel_attention(x[:, :C].detach(), w, b)
            (gw_only,) = torch.autograd.grad(y.square().sum(), (w,))
        g_ref = eager_simple_gate(x)
        s_ref = g_ref.reshape(B, C, -1).mean(-1) @ w.t() + b
        _assert_all_close([g, s, *torch.autograd.grad(s_ref.sum(), (x, w))], [g_ref, s_ref, gx, gw])
        y_ref = x[:, :C].detach() * (x[:, :C].detach().reshape(B, C, -1).mean(-1) @ w.t() + b).reshape(
            (B, C) + (1,) * (len(shape) - 2))
        _assert_all_close([y, *torch.autograd.grad(y_ref.square().sum(), (w,))], [y_ref, gw_only])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_ops_gradcheck(backend, gen):
    device = backend_device(backend)
    xg = randn(2, 4, 2, 3, device=device, gen=gen).requires_grad_()
    x = randn(2, 3, 2, 3, device=device, gen=gen).requires_grad_()
    w, b = _sca_params(3, device, gen)
    w2, b2 = _sca_params(2, device, gen)
    fast = backend == "triton" and not HAS_CUDA
    with use_backend(backend):
        assert torch.autograd.gradcheck(simple_gate, (xg,), fast_mode=fast)
        assert torch.autograd.gradcheck(simplified_channel_attention, (x, w, b), fast_mode=fast)
        assert torch.autograd.gradcheck(simple_gate_sca, (xg, w2, b2), fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_ops_low_precision_gradients(backend, dtype, gen):
    device = backend_device(backend)
    x64 = randn(2, 6, 5, 7, gen=gen)
    w64, b64 = _sca_params(3, "cpu", gen)
    dy64, ds64 = randn(2, 3, 5, 7, gen=gen), randn(2, 3, gen=gen)
    x = x64.to(device, dtype).requires_grad_()
    w, b = (t.detach().to(device, dtype).requires_grad_() for t in (w64, b64))
    with use_backend(backend):
        g, s = simple_gate_sca(x, w, b)
        got = (g, s, *torch.autograd.grad((g, s), (x, w, b), (dy64.to(device, dtype), ds64.to(device, dtype))))
    xr = x64.clone().requires_grad_()
    gr = eager_simple_gate(xr)
    sr = F.conv2d(F.adaptive_avg_pool2d(gr, 1), w64, b64).reshape(2, 3)
    expected = (gr, sr, *torch.autograd.grad((gr, sr), (xr, w64, b64), (dy64, ds64)))
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for name, a, e in zip(("g", "s", "dx", "dw", "db"), got, expected):
        assert a.dtype == dtype
        err = ((a.cpu().double() - e).abs().max() / e.abs().max()).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("op_name, case", [("ff_parser", "3x1x4x6"), ("ff_parser", "2x3x5x7"),
                                           ("simple_gate_sca", "channels-last"),
                                           ("simplified_channel_attention", "2x3x5x7")])
def test_opcheck_on_the_triton_backend(op_name, case):
    """The contract's opcheck runs the automatic choice (the reference on the CPU); this runs Triton's path
    (packed FF-Parser spectrum for even W, plain for odd; fake strides, autograd, AOT dispatch)."""
    from pydpm.ops import REGISTRY

    op = REGISTRY[op_name]
    kwargs = dict(op.sample_inputs(DEVICE, torch.float32, small=True, seed=5))[case]
    with use_backend("triton"):
        torch.library.opcheck(op.library_op, op.library_args(**kwargs))


@pytest.mark.parametrize("op_name", ["ff_parser", "simple_gate", "simplified_channel_attention", "simple_gate_sca"])
def test_opcheck_layout_cases(op_name):
    """Fake strides match the real ones for every layout case (the contract samples every 5th case)."""
    from pydpm.ops import REGISTRY

    op = REGISTRY[op_name]
    for case, kwargs in op.sample_inputs("cpu", torch.float32, small=True, seed=9):
        if not case[0].isdigit():  # the named layout / weight-form cases
            torch.library.opcheck(op.library_op, op.library_args(**kwargs), test_utils=("test_faketensor",))


def test_forced_backend_reaches_the_backward(gen, monkeypatch):
    """The backward runs the backend that was forced for the forward (autograd may run it on another thread)."""
    from pydpm.kernels import ff_parser as ff_kernels, naf as naf_kernels

    calls = []
    for kernels, name in ((ff_kernels, "ff_parser_bwd"), (naf_kernels, "simple_gate_bwd")):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    x = randn(1, 2, 3, 4, device=DEVICE, gen=gen).requires_grad_()
    w = randn(2, 3, 3, 2, device=DEVICE, gen=gen).requires_grad_()
    with use_backend("triton"):
        y = simple_gate(ff_parser(x, w))
    y.sum().backward()
    assert calls == ["simple_gate_bwd", "ff_parser_bwd"]


# --------------------------------------------------------------------------------------------------
# NAF block
# --------------------------------------------------------------------------------------------------

def _naf_block(c, **kwargs):
    block = pnn.NAFBlock(c, **kwargs).double()
    with torch.no_grad():  # β, γ start at zero (the identity); the LayerNorms at (1, 0): randomise all
        for p in (block.beta, block.gamma, block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias):
            p.normal_()
    return block


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("c, size", [(1, (3, 7)), (3, (2, 2)), (4, (6, 5))])
def test_naf_block_matches_nafnet_definition(c, size, layout, fold, gen):
    torch.manual_seed(0)
    block = _naf_block(c, fold=fold)
    x = _layout(randn(2 if c != 3 else 1, c, *size, gen=gen), layout).requires_grad_()
    params = [x, *block.parameters()]
    y = block(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, dy)
    y_ref = pnn.naf_block_reference(block, x)
    _assert_all_close([y, *grads], [y_ref, *torch.autograd.grad(y_ref, params, dy)], atol=1e-10)


def test_naf_block_triton_path_and_dropout(gen):
    torch.manual_seed(0)
    block = _naf_block(4, dw_expand=2, ffn_expand=3).to(DEVICE)
    x = randn(2, 4, 5, 6, device=DEVICE, gen=gen).requires_grad_()
    with use_backend("triton"):
        y = block(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    y_ref = pnn.naf_block_reference(block, x)
    _assert_all_close([y, *grads], [y_ref, *torch.autograd.grad(y_ref.square().sum(), [x, *block.parameters()])],
                      atol=1e-10)

    dropped = _naf_block(4, drop=0.5).train()  # training with dropout: the unfolded path, same masks
    torch.manual_seed(7)
    y = dropped(x.cpu())
    torch.manual_seed(7)
    torch.testing.assert_close(y, pnn.naf_block_reference(dropped, x.cpu()))


def test_naf_block_starts_as_identity_and_loads_nafnet_keys():
    block = pnn.NAFBlock(4)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(block(x), x)
    expected = {f"{m}.{p}" for m in ("conv1", "conv2", "conv3", "conv4", "conv5", "sca.1", "norm1", "norm2")
                for p in ("weight", "bias")} | {"beta", "gamma"}
    assert set(block.state_dict()) == expected
    assert block.sca[1].weight.shape == (4, 4, 1, 1) and block.conv4.out_channels == 8


def test_modules_forward(gen):
    x = randn(2, 6, 3, 4, gen=gen)
    torch.testing.assert_close(pnn.SimpleGate()(x), eager_simple_gate(x))
    sca = pnn.SimplifiedChannelAttention(6).double()
    torch.testing.assert_close(sca(x), eager_sca(x, sca[1].weight, sca[1].bias))
    norm = pnn.LayerNorm2d(6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        y = norm(xx)
        torch.testing.assert_close(y, pnn.frequency._layer_norm2d_reference(xx, norm))
        assert y.stride() == xx.stride()


# --------------------------------------------------------------------------------------------------
# Argument checks: the message names the argument and the fix
# --------------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 6)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4, 3\).*\[3, 4, 4, 2\]"):
        ff_parser(x, torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"weight \(complex\) has shape .*W//2\+1"):
        ff_parser(x, torch.randn(3, 4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"x has shape \(3, 4, 6\); it must be \[B, C, H, W\]"):
        ff_parser(x[0], torch.randn(3, 4, 4, 2))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        simple_gate(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="3 channels .* must be even"):
        simple_gate(x)
    with pytest.raises(ValueError, match=r"weight has shape \(2, 2\); .*needs \[3, 3\]"):
        simplified_channel_attention(x, torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"bias has shape \(2,\)"):
        simplified_channel_attention(x, torch.randn(3, 3), torch.randn(2))
    with pytest.raises(ValueError, match=r"out\[1\] \(scale\) has shape"):
        simple_gate_sca(torch.randn(2, 6, 3, 3), torch.randn(3, 3), out=(torch.empty(2, 3, 3, 3), torch.empty(3)))
    with pytest.raises(ValueError, match="out has dtype torch.float64"):
        simple_gate(torch.randn(2, 4, 3), out=torch.empty(2, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="out= is not differentiable"):
        simple_gate(torch.randn(2, 4, 3, requires_grad=True), out=torch.empty(2, 2, 3))
    with pytest.raises(ValueError, match="must be even"):
        pnn.NAFBlock(3, dw_expand=1)
    if not HAS_CUDA:
        with use_backend("cuda"), pytest.raises(BackendUnavailable, match="has no cuda backend"):
            simple_gate(torch.randn(2, 4, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = backend_device(backend)
    x = torch.randn(0, 3, 4, 6, device=device, requires_grad=True)
    w = torch.randn(3, 4, 4, 2, device=device, requires_grad=True)
    xg = torch.randn(0, 6, 4, 6, device=device, requires_grad=True)
    a = torch.randn(3, 3, device=device, requires_grad=True)
    with use_backend(backend):
        y = ff_parser(x, w)
        g, s = simple_gate_sca(xg, a)
        (y.sum() + g.sum() + s.sum() + simplified_channel_attention(x, a).sum()).backward()
    assert y.shape == x.shape and g.shape == (0, 3, 4, 6) and s.shape == (0, 3) and xg.grad.shape == xg.shape
    assert w.grad.abs().sum() == 0 and a.grad.abs().sum() == 0


def test_out_is_written_and_returned(gen):
    x64 = randn(2, 4, 3, 5, gen=gen)
    w64 = randn(2, 2, gen=gen)
    for backend in BACKENDS:
        dev = DEVICE if backend == "triton" else torch.device("cpu")
        x, w = x64.to(dev), w64.to(dev)
        with use_backend(backend):
            out = torch.full((2, 2, 5, 3), math.nan, dtype=torch.float64, device=dev).transpose(2, 3)  # not [B, C, S]-viewable
            assert simple_gate(x, out=out) is out
            torch.testing.assert_close(out, eager_simple_gate(x))
            pair = (torch.empty(2, 2, 3, 5, dtype=torch.float64, device=dev),
                    torch.empty(2, 2, dtype=torch.float64, device=dev))
            assert simple_gate_sca(x, w, out=pair) is pair
            torch.testing.assert_close(pair[1], eager_simple_gate(x).mean((2, 3)) @ w.t())
