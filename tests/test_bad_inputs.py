"""Bad inputs and aliasing: regression tests for what used to be silently wrong or raised a generic error, the
pydpm.nn modules' argument checks, and property tests (hypothesis) of solver_step and the Haar transform
over shapes, strides and storage offsets against the reference. The registry-wide axis (every op × backend ×
its declared bad inputs) is in test_contract.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydpm.nn as pnn
from pydpm.ops import (PhiloxNoise, Threshold, attention, attention_reference, haar_dwt2, haar_idwt2,
                       haar_wavedec2, haar_waverec2, simple_gate, simplified_channel_attention, solver_step,
                       solver_step_reference, use_backend, wavelet_gate_down)
from pydpm.ops.wavelet import haar_dwt2_reference, haar_idwt2_reference
from _support import HAS_CUDA, TRITON_ON_CPU

BACKENDS = ("reference", "cpu", TRITON_ON_CPU)  # solver_step's backends that run on CPU tensors here
GATE_BACKENDS = ("reference", TRITON_ON_CPU)     # the other families'


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def refused(match, cls=ValueError):
    return pytest.raises(cls, match=match)


# --------------------------------------------------------------------------------------------------
# Aliasing: refused where the result would depend on the write order, exact where allowed
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_out_shifted_by_one_element_is_refused(backend):
    buf = rand(2 * 64 * 64 + 1)
    x, out = buf[:-1].view(2, 64, 64), buf[1:].view(2, 64, 64)
    with use_backend(backend), refused(r"solver_step: out partially overlaps x"):
        solver_step(x, [], [0.5], out=out)
    with use_backend(backend), refused(r"solver_step: out partially overlaps x"):
        solver_step(out, [], [0.5], out=x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_save_overlapping_model_output_is_refused(backend):
    x, m = rand(2, 3, 8, seed=1), rand(2, 3, 8, seed=2)
    buf = rand(2 * 3 * 8 + 1, seed=3)
    with use_backend(backend), refused(r"save partially overlaps model_output"):
        solver_step(x, [m], [0.5, 0.3, 0.2], model_output=buf[1:].view(2, 3, 8), convert=[1.0, -0.5],
                    save=buf[:-1].view(2, 3, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_save_equal_to_out_is_refused(backend):
    o = torch.empty(2, 3)
    with use_backend(backend), refused("out and save share memory"):
        solver_step(rand(2, 3), [], [1.0, 1.0], model_output=rand(2, 3, seed=1), convert=[0.0, 1.0], save=o, out=o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "transposed"])
def test_solver_step_in_place_uses_are_exact(backend, layout):
    """out=x, out=models[k], save=model_output: the same bits as out of place, on every backend and layout."""
    def t(seed):
        if layout == "contiguous":
            return rand(2, 3, 4, 5, seed=seed)
        if layout == "channels-last":
            return rand(2, 3, 4, 5, seed=seed).contiguous(memory_format=torch.channels_last)
        return rand(2, 3, 5, 4, seed=seed).transpose(2, 3)

    kwargs = dict(model_output=t(3), convert=[1.0, -0.7], noise=PhiloxNoise(11, 2))
    coeffs = [0.3, 0.5, -0.2, 0.1]
    x, m = t(1), t(2)
    with use_backend(backend):
        expected = solver_step(x, [m], coeffs, **kwargs)
        save = torch.empty_like(x)
        solver_step(x, [m], coeffs, **kwargs, save=save)
        x1, m1, mo1 = x.clone(), m.clone(), kwargs["model_output"].clone()
        assert solver_step(x1, [m], coeffs, **kwargs, out=x1) is x1
        assert solver_step(x, [m1], coeffs, **kwargs, out=m1) is m1
        solver_step(x, [m], coeffs, **dict(kwargs, model_output=mo1), save=mo1)
    assert torch.equal(x1, expected) and torch.equal(m1, expected) and torch.equal(mo1, save)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_views_do_not_overlap(backend):
    """x[..., ::2] and out = x[..., 1::2] share a buffer but no element: allowed, and correct."""
    buf = rand(2, 3, 16)
    x, out = buf[..., ::2], buf[..., 1::2]
    expected = solver_step_reference(x.clone(), [], [2.0])
    with use_backend(backend):
        solver_step(x, [], [2.0], out=out)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_attention_out_aliasing_k_is_refused(backend):
    q, k, v = rand(1, 2, 4, 16, seed=1), rand(1, 2, 4, 16, seed=2), rand(1, 2, 4, 16, seed=3)
    with use_backend(backend), refused("attention: out is k"):
        attention(q, k, v, out=k)
    with use_backend(backend), refused("attention: out is q"):
        attention(q, k, v, out=q)


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_expanded_out_is_refused(backend):
    x = rand(2, 3, 4, 6)
    with use_backend(backend), refused(r"haar_dwt2: out\[0\] \(ll\) has elements that share memory"):
        haar_dwt2(x, out=(torch.empty(1, 3, 2, 3).expand(2, 3, 2, 3), torch.empty(2, 3, 3, 2, 3)))
    with use_backend(backend), refused("simple_gate: out has elements that share memory"):
        simple_gate(rand(2, 4, 3), out=torch.empty(1, 2, 3).expand(2, 2, 3))
    q = rand(1, 2, 4, 16)
    with use_backend(backend), refused("attention: out has elements that share memory"):
        attention(q, rand(1, 2, 4, 16, seed=1), rand(1, 2, 4, 16, seed=2),
                  out=torch.empty(1, 1, 4, 16).expand(1, 2, 4, 16))


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_idwt_out_sharing_high_is_refused(backend):
    ll, high = haar_dwt2(rand(2, 3, 4, 4))
    buf = torch.empty(high.numel() + 100)
    high2 = buf[:high.numel()].view(high.shape).copy_(high)
    with use_backend(backend), refused("haar_idwt2: out partially overlaps high"):
        haar_idwt2(ll, high2, out=buf[8:8 + 2 * 3 * 16].view(2, 3, 4, 4))


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_sca_in_place_is_exact(backend):
    x, w, b = rand(2, 3, 5, 4, seed=1), rand(3, 3, seed=2), rand(3, seed=3)
    with use_backend(backend):
        expected = simplified_channel_attention(x, w, b)
        assert simplified_channel_attention(x, w, b, out=x) is x
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_overlap_helper():
    from pydpm.ops._framework import NO_OVERLAP, PARTIAL_OVERLAP, SAME_MEMORY, internal_overlap, overlap

    a = torch.zeros(4, 6)
    assert overlap(a, a) == SAME_MEMORY and overlap(a, a.view(4, 6)) == SAME_MEMORY
    assert overlap(a[:, ::2], a[:, 1::2]) == NO_OVERLAP
    assert overlap(a[:, ::2], a[:, 2::2]) == PARTIAL_OVERLAP
    assert overlap(a[:2], a[2:]) == NO_OVERLAP and overlap(a[:3], a[2:]) == PARTIAL_OVERLAP
    assert overlap(a, a.t().contiguous().t()) == NO_OVERLAP
    assert overlap(a.view(-1)[:8].view(2, 4), a.view(-1)[:8].view(4, 2)) == PARTIAL_OVERLAP  # same bytes, other shape
    assert overlap(a.view(torch.int32), a) == SAME_MEMORY and overlap(a.view(torch.int16), a) == PARTIAL_OVERLAP
    assert overlap(a[0], torch.zeros(6)) == NO_OVERLAP
    assert overlap(a.view(torch.int16)[:, 1::2], a.view(torch.int16)[:, ::2]) == NO_OVERLAP
    assert overlap(a[:0], a) == NO_OVERLAP
    assert overlap(torch.zeros(2, device="meta"), torch.zeros(2, device="meta")) == NO_OVERLAP
    assert internal_overlap(a[:1].expand(4, 6)) and not internal_overlap(a[:, ::2])
    assert internal_overlap(a.as_strided((3, 3), (2, 1))) and not internal_overlap(a.as_strided((3, 2), (2, 1)))


# --------------------------------------------------------------------------------------------------
# Errors that used to be generic (AttributeError, pybind "incompatible function arguments", InterpreterError)
# or inputs that used to be accepted wrongly
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_none_to_the_haar_ops_is_a_type_error_naming_it(backend):
    g = rand(1, 1, 2, 2).requires_grad_()
    with use_backend(backend):
        with refused("haar_dwt2: x must be a torch.Tensor", TypeError):
            haar_dwt2(None)
        with refused("haar_idwt2: high must be a torch.Tensor", TypeError):
            haar_idwt2(g, None)
        with refused("haar_idwt2: ll must be a torch.Tensor", TypeError):
            haar_idwt2(None, rand(1, 1, 3, 2, 2).requires_grad_())
        with refused("wavelet_gate_down: gates must be a torch.Tensor", TypeError):
            wavelet_gate_down(g, None)
        with refused("haar_wavedec2: x must be a torch.Tensor", TypeError):
            haar_wavedec2(None, 1)
        with refused("haar_wavedec2: levels must be a positive int", TypeError):
            haar_wavedec2(rand(1, 1, 4, 4), 1.0)
        with refused("haar_waverec2: coeffs must be a list", TypeError):
            haar_waverec2(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise, field", [(PhiloxNoise(1.5), "seed"), (PhiloxNoise(True), "seed"),
                                          (PhiloxNoise(3, 2.0), "offset"), (PhiloxNoise(np.float64(3.0)), "seed")])
def test_philox_refuses_non_integral_seeds(backend, noise, field):
    with use_backend(backend), refused(rf"solver_step: noise=PhiloxNoise.*{field} must be an int", TypeError):
        solver_step(rand(2, 3), [], [1.0, 1.0], noise=noise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_accepts_integral_numpy_seeds(backend):
    x = rand(2, 3, 5)
    with use_backend(backend):
        expected = solver_step(x, [], [0.5, 1.0], noise=PhiloxNoise(3, 5))
        got = solver_step(x, [], [0.5, 1.0], noise=PhiloxNoise(np.int64(3), np.uint32(5)))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels-last-x-contiguous-model"])
def test_philox_noise_agrees_with_the_reference_on_any_layout(backend, layout):
    if layout == "transposed":
        x, m = rand(2, 3, 5, 4).transpose(2, 3), rand(2, 3, 4, 5, seed=1)
    elif layout == "sliced":
        x, m = rand(2, 3, 4, 10)[..., ::2], rand(2, 3, 4, 5, seed=1)
    else:
        x, m = rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), rand(2, 3, 4, 5, seed=1)
    expected = solver_step_reference(x, [m], [0.0, 0.0, 1.0], noise=PhiloxNoise(9, 4))
    with use_backend(backend):
        got = solver_step(x, [m], [0.0, 0.0, 1.0], noise=PhiloxNoise(9, 4))
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("kwargs, match, cls", [
    (dict(coeffs="12"), "coeffs must be a float tensor or a sequence of floats, got str", TypeError),
    (dict(coeffs=["1", "2"]), r"coeffs\[0\] is '1'", TypeError),
    (dict(models=[None]), r"models\[0\] must be a torch.Tensor", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], model_output=(None, rand(2, 3)), convert=[0.0, 1.0], guidance_scale=2.0),
     r"model_output\[0\] \(cond\) must be a torch.Tensor", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], model_output=(rand(2, 3), None), convert=[0.0, 1.0], guidance_scale=2.0),
     r"model_output\[1\] \(uncond\) must be a torch.Tensor", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], model_output=(rand(2, 3), rand(2, 3)), convert=[0.0, 1.0], guidance_scale="7"),
     "guidance_scale must be a real number", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], model_output=rand(2, 3), convert=["0", "1"]), r"convert\[0\] is '0'", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], model_output=rand(2, 3), convert=[0.0, 1.0], threshold=Threshold("a")),
     "threshold.ratio must be a real number", TypeError),
    (dict(coeffs=[1.0, 1.0, 1.0], noise=(3, 1)), r"noise must be a torch.Tensor shaped like x or PhiloxNoise",
     TypeError),
])
def test_solver_step_refuses_what_it_used_to_accept_or_garble(kwargs, match, cls):
    call = dict(x=rand(2, 3), models=[rand(2, 3, seed=1)], coeffs=[1.0, 1.0])
    call.update(kwargs)
    for backend in ("reference", "cpu") + (("triton",) if not HAS_CUDA else ()):  # CPU tensors
        with use_backend(backend), refused(f"solver_step: .*{match}", cls):
            solver_step(**call)


def test_type_errors_are_still_value_errors():
    """Wrong types raise a TypeError that is also a ValueError (the ops' documented error class)."""
    with pytest.raises(ValueError):
        haar_dwt2(None)
    with pytest.raises(ValueError):
        solver_step(rand(2, 3), [], "1")


# --------------------------------------------------------------------------------------------------
# pydpm.nn: the module's name and what it was built for, at construction and at forward
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match, cls", [
    (lambda: pnn.Attention(16, heads=0), "Attention: heads=0 must be a positive int", ValueError),
    (lambda: pnn.Attention(16, heads=2.0), "Attention: heads must be a positive int", TypeError),
    (lambda: pnn.Attention(0), "Attention: dim=0 must be a positive int", ValueError),
    (lambda: pnn.Attention(16, dim_head=-1), "Attention: dim_head=-1", ValueError),
    (lambda: pnn.Attention(16, context_dim=0), "Attention: context_dim=0", ValueError),
    (lambda: pnn.Attention(4, heads=8), "leaves no head dimension", ValueError),
    (lambda: pnn.FFParser(3, 0, 4), "FFParser: height=0", ValueError),
    (lambda: pnn.FFParser("3", 4, 4), "FFParser: channels must be a positive int", TypeError),
    (lambda: pnn.FFParser(3, 4, 4, init="zeros"), "FFParser: init='zeros'", ValueError),
    (lambda: pnn.LayerNorm2d(0), "LayerNorm2d: channels=0", ValueError),
    (lambda: pnn.LayerNorm2d(4, eps=0.0), r"LayerNorm2d: eps=0.0 must lie in \(0.0, inf\)", ValueError),
    (lambda: pnn.LayerNorm2d(4, eps=math.nan), "LayerNorm2d: eps=nan", ValueError),
    (lambda: pnn.SimplifiedChannelAttention(-2), "SimplifiedChannelAttention: channels=-2", ValueError),
    (lambda: pnn.NAFBlock(0), "NAFBlock: c=0", ValueError),
    (lambda: pnn.NAFBlock(4, dw_expand=0), "NAFBlock: dw_expand=0", ValueError),
    (lambda: pnn.NAFBlock(4, drop=1.0), r"NAFBlock: drop=1.0 must lie in \[0.0, 1.0\)", ValueError),
    (lambda: pnn.NAFBlock(3, dw_expand=1), "must be even", ValueError),
    (lambda: pnn.WaveletGateDown(0), "WaveletGateDown: channels=0", ValueError),
    (lambda: pnn.WaveletGateDown(4, reduction=0), "WaveletGateDown: reduction=0", ValueError),
    (lambda: pnn.WaveletGateUp(4, temb_dim=0), "WaveletGateUp: temb_dim=0", ValueError),
    (lambda: pnn.WaveletGateUp(True), "WaveletGateUp: channels must be a positive int", TypeError),
])
def test_module_constructors_refuse_bad_arguments(make, match, cls):
    with refused(match, cls):
        make()


@pytest.mark.parametrize("module, x, match", [
    (lambda: pnn.Attention(16, heads=2), rand(1, 3, 8), r"Attention: x has 8 features .* built for 16"),
    (lambda: pnn.Attention(16, heads=2), rand(3, 16), r"Attention: x has shape \(3, 16\); this module takes \[B, N"),
    (lambda: pnn.FFParser(3, 4, 4), rand(1, 2, 4, 4), r"FFParser: x has 2 channels .* built for 3"),
    (lambda: pnn.LayerNorm2d(4), rand(1, 3, 2, 2), r"LayerNorm2d: x has 3 channels .* built for 4"),
    (lambda: pnn.LayerNorm2d(4), rand(4, 2, 2), r"LayerNorm2d: x has shape \(4, 2, 2\)"),
    (lambda: pnn.SimplifiedChannelAttention(3), rand(1, 4, 2, 2), r"SimplifiedChannelAttention: x has 4 channels"),
    (lambda: pnn.NAFBlock(4), rand(1, 3, 4, 4), r"NAFBlock: inp has 3 channels .* built for 4"),
    (lambda: pnn.NAFBlock(4), rand(4, 4, 4), r"NAFBlock: inp has shape \(4, 4, 4\)"),
    (lambda: pnn.WaveletGateDown(4), rand(1, 3, 4, 4), r"WaveletGateDown: x has 3 channels .* built for 4"),
    (lambda: pnn.WaveletGateUp(4), rand(1, 3, 4, 4), r"WaveletGateUp: x has 3 channels .* built for 4"),
    (lambda: pnn.WaveletGateUp(4), rand(4, 4, 4), r"WaveletGateUp: x has shape \(4, 4, 4\)"),
])
def test_module_forward_names_the_module_and_its_channels(module, x, match):
    with torch.no_grad(), refused(match):
        module()(x)


def test_module_forward_refuses_non_tensors_and_bad_context():
    with refused("NAFBlock: inp must be a torch.Tensor", TypeError):
        pnn.NAFBlock(4)(None)
    attn = pnn.Attention(16, heads=2, context_dim=8)
    with refused(r"Attention: context has 16 features .* built for 8"):
        attn(rand(1, 3, 16), rand(1, 5, 16))
    with refused("Attention: context has batch 2 but x has 1"):
        attn(rand(1, 3, 16), rand(2, 5, 8))
    gate = pnn.WaveletGateDown(4, temb_dim=6)
    with refused(r"WaveletGateDown: temb has 5 features .* built for 6"):
        gate(rand(2, 4, 4, 4), rand(2, 5))
    with refused(r"WaveletGateDown: built with temb_dim=6: pass temb"):
        gate(rand(2, 4, 4, 4))
    with refused("WaveletGateUp: temb given but the module was built without temb_dim"):
        pnn.WaveletGateUp(4)(rand(2, 4, 2, 2), rand(2, 3))


# --------------------------------------------------------------------------------------------------
# Property tests: shapes, strides and storage offsets against the reference
# --------------------------------------------------------------------------------------------------

@st.composite
def laid_out(draw, shape, seed):
    """A float32 tensor of `shape` with a drawn layout: dims permuted in memory, every dim sliced with step 1
    or 2, a storage offset of 0-3 elements (contiguous and channels-last among them)."""
    n = len(shape)
    perm = draw(st.permutations(range(n)))
    steps = [draw(st.sampled_from((1, 1, 2))) for _ in range(n)]
    offset = draw(st.integers(0, 3))
    mem_shape = [shape[p] * steps[p] for p in perm]
    base = rand(offset + math.prod(mem_shape), seed=seed)
    t = base[offset:].view(mem_shape)[tuple(slice(None, None, steps[p]) for p in perm)]
    return t.permute([perm.index(d) for d in range(n)])


SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])


def _clone(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_solver_step_property_layouts(backend, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4), label="shape"))
    B = shape[0]
    x = data.draw(laid_out(shape, 1), label="x")
    models = [data.draw(laid_out(shape, 10 + i), label=f"models[{i}]") for i in range(data.draw(st.integers(0, 2)))]
    kwargs = {}
    n = 1 + len(models)
    if data.draw(st.booleans(), label="model_output"):
        kwargs.update(model_output=data.draw(laid_out(shape, 20), label="model_output"), convert=[0.8, -0.6])
        n += 1
        if data.draw(st.booleans(), label="save"):
            kwargs["save"] = data.draw(laid_out(shape, 21), label="save")
    noise = data.draw(st.sampled_from(["none", "tensor", "philox"]), label="noise")
    if noise == "tensor":
        kwargs["noise"] = data.draw(laid_out(shape, 30), label="noise")
    elif noise == "philox":
        kwargs["noise"] = PhiloxNoise(data.draw(st.integers(0, 2 ** 40)), data.draw(st.integers(0, 100)))
    n += noise != "none"
    coeffs = [round(0.3 * i - 0.5, 2) for i in range(n)]
    if data.draw(st.booleans(), label="per-sample table"):
        coeffs = torch.tensor(coeffs).repeat(B, 1) * torch.linspace(0.5, 1.5, B).unsqueeze(1)
    where = data.draw(st.sampled_from(["new", "x", "strided"] + (["models[0]"] if models else [])), label="out")
    expected_save = None
    ref = dict(kwargs, model_output=_clone(kwargs.get("model_output")), save=_clone(kwargs.get("save")))
    # x's copy keeps its strides: Philox noise follows x's layout, and clone() makes some non-dense views dense
    x_copy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)
    expected = solver_step_reference(x_copy, [m.clone() for m in models], coeffs, **ref)
    if "save" in kwargs:
        expected_save = ref["save"]
    out = {"new": None, "x": x, "strided": data.draw(laid_out(shape, 40), label="out buffer"),
           "models[0]": models[0] if models else None}[where]
    with use_backend(backend):
        got = solver_step(x, models, coeffs, **kwargs, out=out)
    if out is not None:
        assert got is out
    torch.testing.assert_close(got, expected, atol=3e-6, rtol=3e-6)
    if expected_save is not None:
        torch.testing.assert_close(kwargs["save"], expected_save, atol=3e-6, rtol=3e-6)


@pytest.mark.parametrize("backend", GATE_BACKENDS)
@SETTINGS
@given(data=st.data())
def test_haar_property_layouts(backend, data):
    B, C = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 3), label="C")
    h, w = data.draw(st.integers(1, 4), label="h"), data.draw(st.integers(1, 4), label="w")
    x = data.draw(laid_out((B, C, 2 * h, 2 * w), 1), label="x")
    ll_ref, high_ref = haar_dwt2_reference(x.clone())
    out = None
    if data.draw(st.booleans(), label="out"):
        out = (data.draw(laid_out((B, C, h, w), 2), label="out ll"), data.draw(laid_out((B, C, 3, h, w), 3),
                                                                               label="out high"))
    with use_backend(backend):
        ll, high = haar_dwt2(x, out=out)
    torch.testing.assert_close(ll, ll_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(high, high_ref, atol=1e-5, rtol=1e-5)

    ll_in = data.draw(laid_out((B, C, h, w), 4), label="ll")
    high_in = data.draw(laid_out((B, C, 3, h, w), 5), label="high")
    expected = haar_idwt2_reference(ll_in.clone(), high_in.clone())
    out = data.draw(laid_out((B, C, 2 * h, 2 * w), 6), label="out") if data.draw(st.booleans()) else None
    with use_backend(backend):
        y = haar_idwt2(ll_in, high_in, out=out)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(haar_idwt2_reference(ll, high), x, atol=1e-5, rtol=1e-5)  # the round trip


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_attention_reference_agrees_with_qkv_sharing_memory(backend):
    """q, k and v may be views of one packed buffer (they are only read)."""
    qkv = rand(2, 7, 3, 2, 16)
    q, k, v = qkv.unbind(2)
    expected = attention_reference(q.clone(), k.clone(), v.clone(), layout="bnhd")
    with use_backend(backend):
        got = attention(q, k, v, layout="bnhd")
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)
