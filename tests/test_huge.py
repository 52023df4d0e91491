"""Tensors of more than 2³¹ elements on the GPU: every kernel indexes them with 64-bit offsets.

A 32-bit offset wraps past element 2³¹, so a kernel with one writes the tail of the output over its head (or
outside the buffer) and leaves the tail unwritten. Each case fills the output with NaN first and compares all
of it, chunk by chunk, with the op's reference run on the matching slice of the input (the ops are elementwise
or local to 2×2 blocks, so a slice of the input gives the same slice of the output). Shapes: many planes whose
total passes 2³¹ (batch and channel offsets), a channel offset alone past 2³¹, one plane of more than 2³¹
elements, channels-last, and a batch of two samples of 2³⁰ + 3 elements; the time-shift pick's variance over one
sample of more than 2³¹ elements and over many samples whose total passes it.

These need ~40 GB of free GPU memory and take about a minute; they run only with PYDPM_HUGE_TESTS=1, one at a
time (scripts/gpu_run.sh --huge), never beside other GPU tests. The last section (grids of more than 65535
programs along an axis that allows no more) uses small inputs and runs in the regular GPU suite.
"""
from __future__ import annotations

import os

import pytest
import torch

from pydpm.ops import (PhiloxNoise, haar_dwt2, haar_idwt2, philox_normal, simple_gate, solver_step, time_shift_pick,
                       use_backend, wavelet_gate_down, wavelet_gate_up)
from pydpm.ops.wavelet import (haar_dwt2_reference, haar_idwt2_reference, wavelet_gate_down_reference,
                               wavelet_gate_up_reference)

huge = pytest.mark.skipif(not (torch.cuda.is_available() and os.environ.get("PYDPM_HUGE_TESTS") == "1"),
                          reason="needs CUDA and PYDPM_HUGE_TESTS=1 (~40 GB of GPU memory, run alone)")

BIG = 2 ** 31
F16 = torch.float16


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def randn(*shape, seed=0, channels_last=False):
    g = torch.Generator("cuda").manual_seed(seed)
    t = torch.empty(shape, dtype=F16, device="cuda", memory_format=torch.channels_last if channels_last
                    else torch.contiguous_format)
    return t.normal_(generator=g)


def poisoned_like(t):
    return torch.full_like(t, float("nan"))


def row_chunks(h: int, rows: int = 2048):
    """Even row ranges [r0, r1) covering h rows (Haar blocks never straddle two ranges)."""
    return [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]


def assert_close_chunked(got, chunks, part, expected):
    """got has no NaN left, and part(got, chunk) equals expected(chunk) for every chunk."""
    assert not got.isnan().any(), "elements left unwritten (the NaN poison survived)"
    for chunk in chunks:
        torch.testing.assert_close(part(got, chunk).float(), expected(chunk).float(), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ solver_step

@huge
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1, BIG + 4099), (2, 2 ** 30 + 3)], ids=["one-sample", "two-samples"])
def test_solver_step_past_two_to_the_31(backend, shape):
    x, m = randn(*shape, seed=1), randn(*shape, seed=2)
    out = poisoned_like(x)
    with use_backend(backend):
        solver_step(x, [m], [0.75, -0.5], out=out)
    xs, ms = x.view(-1), m.view(-1)
    step = 2 ** 28
    slices = [slice(i, i + step) for i in range(0, xs.numel(), step)]
    assert_close_chunked(out.view(-1), slices, lambda t, sl: t[sl],
                         lambda sl: (0.75 * xs[sl].float() - 0.5 * ms[sl].float()).half())


@huge
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_philox_noise_does_not_wrap_past_two_to_the_31(backend):
    """Noise element i must be Philox draw i: with a 32-bit index, element 2³¹ + j would repeat element j."""
    x = torch.zeros(1, BIG + 4099, dtype=F16, device="cuda")
    with use_backend(backend):
        z = solver_step(x, [], [0.0, 1.0], noise=PhiloxNoise(7, 3)).view(-1)
    assert not z.isnan().any()
    for first in (0, BIG - 4097, x.numel() - 8195):
        expected = philox_normal(7, 3, 8195, "cuda", start=first).half()
        torch.testing.assert_close(z[first:first + 8195], expected, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ Haar ops

HAAR_SHAPES = {
    "planes": (1, 2, 32770, 32768),          # 2 planes of 2³⁰ + 2¹⁶: channel offsets past 2³¹
    "one-plane": (1, 1, 46342, 46342),       # one plane of 2³¹ + 9,000 elements
}


def plane_chunks(B: int, C: int, h: int):
    """(b, c, r0, r1): row ranges of every plane of a [B, C, h, ...] result."""
    return [(b, c, r0, r1) for b in range(B) for c in range(C) for r0, r1 in row_chunks(h)]


def rows(t, chunk, scale=1):
    """Plane (b, c) of t ([B, C, ..., rows, cols]), rows scale·r0 .. scale·r1."""
    b, c, r0, r1 = chunk
    return t[b:b + 1, c:c + 1][..., scale * r0:scale * r1, :]


@huge
@pytest.mark.parametrize("case", HAAR_SHAPES)
def test_haar_dwt2_and_idwt2_past_two_to_the_31(case):
    B, C, H, W = HAAR_SHAPES[case]
    x = randn(B, C, H, W, seed=3)
    ll, high = torch.full((B, C, H // 2, W // 2), float("nan"), dtype=F16, device="cuda"), \
        torch.full((B, C, 3, H // 2, W // 2), float("nan"), dtype=F16, device="cuda")
    haar_dwt2(x, out=(ll, high))
    chunks = plane_chunks(B, C, H // 2)
    assert_close_chunked(ll, chunks, rows, lambda ch: haar_dwt2_reference(rows(x, ch, 2))[0])
    assert_close_chunked(high, chunks, rows, lambda ch: haar_dwt2_reference(rows(x, ch, 2))[1])
    back = poisoned_like(x)
    haar_idwt2(ll, high, out=back)
    assert_close_chunked(back, chunks, lambda t, ch: rows(t, ch, 2),
                         lambda ch: haar_idwt2_reference(rows(ll, ch), rows(high, ch)))


@huge
@pytest.mark.parametrize("case", HAAR_SHAPES)
def test_wavelet_gates_past_two_to_the_31(case):
    B, C, H, W = HAAR_SHAPES[case]
    x = randn(B, C, H, W, seed=4)
    gates = torch.rand(B, 4, C, device="cuda", dtype=F16) + 0.5
    y = torch.full((B, C, H // 2, W // 2), float("nan"), dtype=F16, device="cuda")
    wavelet_gate_down(x, gates, out=y)
    chunks = plane_chunks(B, C, H // 2)

    def gates_of(chunk):
        b, c = chunk[:2]
        return gates[b:b + 1, :, c:c + 1]

    assert_close_chunked(y, chunks, rows, lambda ch: wavelet_gate_down_reference(rows(x, ch, 2), gates_of(ch)))
    # WG-Up: [B, 4C, h, w] -> [B, C, 2h, 2w]; band i of channel c is input channel i·C + c.
    u = randn(B, 4 * C, H // 2, W // 2, seed=5)
    up = torch.full((B, C, H, W), float("nan"), dtype=F16, device="cuda")
    wavelet_gate_up(u, gates, out=up)

    def up_expected(chunk):
        b, c, r0, r1 = chunk
        return wavelet_gate_up_reference(u[b:b + 1, c::C, r0:r1], gates_of(chunk))

    assert_close_chunked(up, chunks, lambda t, ch: rows(t, ch, 2), up_expected)


# ------------------------------------------------------------------------------------------------ NAF gate

@huge
@pytest.mark.parametrize("shape,channels_last", [((1, 20, 16384, 16386), False), ((1, 2, 32770, 32768), True)],
                         ids=["channel-offsets", "channels-last"])
def test_simple_gate_past_two_to_the_31(shape, channels_last):
    """NCHW: channel c starts at c·H·W, past 2³¹ from c = 9; channels-last: the spatial offset s·C passes 2³¹."""
    x = randn(*shape, seed=6, channels_last=channels_last)
    B, C2, H, W = shape
    out = torch.full((B, C2 // 2, H, W), float("nan"), dtype=F16, device="cuda")
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    simple_gate(x, out=out)

    def expected(chunk):
        b, c, r0, r1 = chunk
        return rows(x, chunk).float() * rows(x, (b, C2 // 2 + c, r0, r1)).float()

    assert_close_chunked(out, plane_chunks(B, C2 // 2, H), rows, expected)


# ------------------------------------------------------------------------------------------------ time-shift pick

@huge
@pytest.mark.parametrize("shape", [(1, BIG + 7), (70_000, 32_768)], ids=["one-sample", "many-samples"])
def test_time_shift_pick_past_two_to_the_31(shape):
    """One sample of more than 2³¹ elements (split into chunks: chunk offsets past 2³¹), and many samples whose
    total passes 2³¹ (one program each: sample offsets past 2³¹). Elements ±1 (variance 1 + O(1/√N)) or ±2
    (variance 4) by sample, so each sample's pick is known without a float64 copy of x."""
    B, N = shape
    g = torch.Generator("cuda").manual_seed(7)
    x = torch.empty(shape, dtype=F16, device="cuda").bernoulli_(0.5, generator=g).mul_(2).sub_(1)
    scale = (torch.arange(B, device="cuda") % 3 == 1).to(F16) + 1          # samples 1, 4, 7, ... take ±2
    x.mul_(scale[:, None])
    promised = torch.tensor([0.5, 1.0, 1.5, 4.0, 9.0], dtype=torch.float64, device="cuda")
    row = torch.arange(B, device="cuda")
    out = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    with use_backend("triton"):
        time_shift_pick(x, promised, row, 5, out=out)
    expected = (row % 5) * 5 + torch.where(scale == 2, 3, 1)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------ huge grids
# CUDA takes at most 65535 programs along grid axes 1 and 2. These inputs are small (< 1 GB) but put more
# programs than that on those axes; a launch that passed them on failed with "invalid argument". They run in
# the regular GPU suite.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_attention_with_more_than_65535_batch_heads(layout):
    """Temporal attention folds the pixels into the batch: 16,385 × 4 heads = 65,540 (batch, head) pairs."""
    from pydpm.ops import attention
    g = torch.Generator("cuda").manual_seed(7)
    shape = (16385, 4, 8, 16) if layout == "bhnd" else (16385, 8, 4, 16)
    q, k, v = (torch.randn(shape, device="cuda", generator=g, dtype=F16).requires_grad_() for _ in range(3))
    with use_backend("triton"):
        o = attention(q, k, v, layout=layout)
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    perm = (lambda t: t) if layout == "bhnd" else (lambda t: t.transpose(1, 2))
    o_ref = perm(torch.nn.functional.scaled_dot_product_attention(*(perm(t) for t in ref)))
    grads = torch.autograd.grad(o_ref, ref, do.float())
    torch.testing.assert_close(o.float(), o_ref, rtol=1e-2, atol=1e-2)
    for got, want in zip((dq, dk, dv), grads):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_simple_gate_with_more_than_65535_spatial_tiles(channels_last):
    x = randn(1, 2, 6000, 6001, seed=8, channels_last=channels_last).requires_grad_()
    with use_backend("triton"):
        y = simple_gate(x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x1, x2 = x.detach().float()[:, :1], x.detach().float()[:, 1:]
    torch.testing.assert_close(y.float(), x1 * x2, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dx.float(), torch.cat([dy.float() * x2, dy.float() * x1], 1), rtol=2e-3, atol=2e-3)


@needs_cuda
def test_haar_ops_with_more_than_65535_tiles_per_plane():
    x = randn(1, 1, 16386, 16386, seed=9)
    gates = torch.rand(1, 4, 1, device="cuda", dtype=F16) + 0.5
    ll, high = haar_dwt2(x)
    ref_ll, ref_high = haar_dwt2_reference(x)
    torch.testing.assert_close(ll, ref_ll, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(high, ref_high, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(haar_idwt2(ll, high), haar_idwt2_reference(ll, high), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(wavelet_gate_down(x, gates), wavelet_gate_down_reference(x, gates), rtol=2e-3,
                               atol=2e-3)
