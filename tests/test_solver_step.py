"""solver_step beyond the registry contract: independent oracles (numpy, torch.quantile, Philox known-answer
vectors), argument errors, aliasing, torch.library (opcheck, torch.compile fullgraph)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from pydpm.ops import PhiloxNoise, Threshold, philox_normal, solver_step, use_backend
from pydpm.ops.solver_step import OP, philox4x32_10
from _support import HAS_CUDA, backend_device, backend_params

LOW = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-14}


def _available(backend, args):
    if backend not in {b.name for b in OP.backends}:
        pytest.skip(f"solver_step has no {backend} backend")
    with use_backend(backend):
        reasons = OP.backend(backend).reasons(args)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_plain_combination_equals_numpy_float64(backend, dtype, per_sample):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(11)
    shape = (3, 4, 9, 7)
    x, m1, m2 = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    c = torch.randn((3, 3) if per_sample else (3,), generator=gen, dtype=torch.float64)
    coeffs = c.to(device) if per_sample else c.tolist()
    if backend != "reference":
        _available(backend, OP.check(x, [m1, m2], coeffs))
    with use_backend(backend):
        y = solver_step(x, [m1, m2], coeffs)
    xs = [t.cpu().double().numpy() for t in (x, m1, m2)]
    cs = np.broadcast_to(c.numpy(), (3, 3)).reshape(3, 3, 1, 1, 1)
    expected = cs[:, 0] * xs[0] + cs[:, 1] * xs[1] + cs[:, 2] * xs[2]
    err = np.abs(y.cpu().double().numpy() - expected).max()
    assert err <= LOW[dtype] * max(1.0, np.abs(expected).max()), err


@pytest.mark.parametrize("per_sample", [(4, 9, 8), (3, 5, 7)], ids=["vector", "scalar"])  # CUDA: 16-byte path or not
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_a_model_of_one_sample_is_read_by_every_sample(backend, dtype, per_sample):
    """models[k] of shape [1, *x.shape[1:]] is added to every sample (numpy's broadcasting, float64), beside a
    model of x's shape and the fused model-output stage, with per-sample coefficients; save and out poisoned."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    shape = (5,) + per_sample
    x, m, mo = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    shared = torch.randn((1,) + per_sample, generator=gen).to(device, dtype)
    c = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    kw = dict(model_output=mo, convert=[0.4, -1.3], save=torch.full(shape, math.nan, dtype=dtype, device=device),
              out=torch.full(shape, math.nan, dtype=dtype, device=device))
    if backend != "reference":
        _available(backend, OP.check(x, [shared, m], c.to(device), **kw))
    with use_backend(backend):
        y = solver_step(x, [shared, m], c.to(device), **kw)
    xs, ms, mos, ss = (t.cpu().double().numpy() for t in (x, m, mo, shared))
    d = 0.4 * xs - 1.3 * mos
    cs = c.numpy().reshape(5, 4, 1, 1, 1)
    expected = cs[:, 0] * xs + cs[:, 1] * d + cs[:, 2] * ss + cs[:, 3] * ms
    tol = LOW[dtype] * 10
    assert np.abs(y.cpu().double().numpy() - expected).max() <= tol * max(1.0, np.abs(expected).max())
    assert np.abs(kw["save"].cpu().double().numpy() - d).max() <= tol * max(1.0, np.abs(d).max())


def test_philox_known_answer_vectors():
    """Random123's published Philox4x32-10 vectors."""
    def words(counter, key):
        return [int(w) for w in philox4x32_10([torch.tensor([c]) for c in counter], key)]
    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_philox_normals_are_standard_normal_and_reproducible():
    z = philox_normal(seed=2024, offset=0, numel=1 << 20)
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert abs((z ** 4).mean().item() - 3) < 0.05  # kurtosis of a normal
    assert torch.equal(z[:1000], philox_normal(2024, 0, 1000))
    assert not torch.allclose(z[:1000], philox_normal(2024, 1, 1000))
    assert not torch.allclose(z[:1000], philox_normal(2025, 0, 1000))
    big = philox_normal(seed=2**40 + 3, offset=2**33 + 1, numel=9)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("start,numel", [(0, 7), (1, 6), (37, 500), (4, 4), (3, 1), (999, 0)])
def test_philox_normal_start_is_a_slice_of_the_stream(start, numel):
    torch.testing.assert_close(philox_normal(5, 2, numel, start=start), philox_normal(5, 2, 1000)[start:start + numel],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="start=-1"):
        philox_normal(5, 2, 4, start=-1)


@pytest.mark.parametrize("backend", backend_params())
def test_in_kernel_noise_equals_reference_normals(backend):
    device = backend_device(backend)
    x = torch.randn(2, 3, 5, 7, device=device)
    args = OP.check(x, [], [0.0, 1.0], noise=PhiloxNoise(77, 5))
    _available(backend, args)
    with use_backend(backend):
        z = solver_step(x, [], [0.0, 1.0], noise=PhiloxNoise(77, 5))
    torch.testing.assert_close(z.cpu().double(), philox_normal(77, 5, x.numel()).view(x.shape), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_threshold_equals_torch_quantile(backend, ratio):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 16, 16, generator=gen) * 2).to(device)
    eps = torch.randn(4, 3, 16, 16, generator=gen).to(device)
    th = Threshold(ratio, 1.0, 3.0)
    args = OP.check(x, [], [0.0, 1.0], model_output=eps, convert=[1.0, 0.5], threshold=th)
    _available(backend, args)
    with use_backend(backend):
        d = solver_step(x, [], [0.0, 1.0], model_output=eps, convert=[1.0, 0.5], threshold=th)
    d0 = (x + 0.5 * eps).cpu().double()
    s = torch.quantile(d0.abs().reshape(4, -1), ratio, dim=1).clamp(1.0, 3.0).view(4, 1, 1, 1)
    torch.testing.assert_close(d.cpu().double(), d0.clamp(-s, s) / s, atol=1e-6, rtol=1e-6)
    assert d.abs().max() <= 1.0 + 1e-6


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA kernels' workspace")
@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
                    reason="this process runs without the caching allocator already (gpu_run.sh --sanitize): the "
                           "threshold tests above check it in-process, and a child under the sanitizer is slow")
@pytest.mark.gpu
def test_threshold_workspace_outlives_the_launch_without_the_caching_allocator():
    """With PYTORCH_NO_CUDA_MEMORY_CACHING=1 a dropped tensor is cudaFree'd at once: the thresholding workspace
    must be held until its memset and kernels are enqueued (it was not: 'invalid argument', found by
    compute-sanitizer), and a failed call must not leave its error for the next launch to report."""
    code = """if True:
        import torch
        from pydpm.ops import Threshold, solver_step, use_backend
        g = torch.Generator().manual_seed(7)
        x, eps = (torch.randn(3, 4, 9, 11, generator=g) for _ in range(2))
        d0 = (x + 0.5 * eps).double()
        s = torch.quantile(d0.abs().reshape(3, -1), 0.9, dim=1).clamp(1.0, 3.0).view(3, 1, 1, 1)
        with use_backend("cuda"):
            for _ in range(3):
                d = solver_step(x.cuda(), [], [0.0, 1.0], model_output=eps.cuda(), convert=[1.0, 0.5],
                                threshold=Threshold(0.9, 1.0, 3.0))
                torch.testing.assert_close(d.cpu().double(), d0.clamp(-s, s) / s, atol=1e-6, rtol=1e-6)
                y = solver_step(x.cuda(), [eps.cuda()], [0.5, 2.0])
                torch.testing.assert_close(y.cpu(), 0.5 * x + 2.0 * eps)
        print("ok")
    """
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("backend", backend_params())
def test_threshold_nan_poisons_only_its_sample(backend):
    device = backend_device(backend)
    x = torch.randn(3, 2, 8, 8, device=device)
    eps = torch.randn(3, 2, 8, 8, device=device)
    eps[1, 0, 3, 4] = float("nan")
    kwargs = dict(model_output=eps, convert=[1.0, 1.0], threshold=Threshold(0.9, 1.0, math.inf))
    _available(backend, OP.check(x, [], [0.0, 1.0], **kwargs))
    with use_backend(backend):
        d = solver_step(x, [], [0.0, 1.0], **kwargs).cpu()
    assert torch.isnan(d[1]).all()
    assert torch.isfinite(d[0]).all() and torch.isfinite(d[2]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_in_place_update_and_history_slot_aliasing(backend):
    """out=x (in-place) and save into the history slot that this step also reads."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    x, eps, h = (torch.randn(2, 4, 6, 6, generator=gen).to(device) for _ in range(3))
    x0, h0 = x.clone(), h.clone()
    coeffs, convert = [0.7, 0.2, -0.1], [1.3, -0.4]
    _available(backend, OP.check(x, [h], coeffs, model_output=eps, convert=convert, save=h, out=x))
    with use_backend(backend):
        y = solver_step(x, [h], coeffs, model_output=eps, convert=convert, save=h, out=x)
    d = 1.3 * x0 - 0.4 * eps
    assert y is x
    torch.testing.assert_close(x, 0.7 * x0 + 0.2 * d - 0.1 * h0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, d, atol=1e-6, rtol=1e-6)


def test_empty_tensor_is_a_no_op():
    x = torch.empty(0, 4, 8, 8)
    assert solver_step(x, [x.clone()], [1.0, 2.0]).shape == x.shape


def test_non_contiguous_out_is_written_back():
    x = torch.randn(2, 3, 4, 5)
    out = torch.full((2, 3, 4, 10), float("nan"))[..., ::2]
    solver_step(x, [], [2.0], out=out)
    torch.testing.assert_close(out, 2 * x)


def _bad(**over):
    x = torch.randn(2, 3, 4, 4)
    kwargs = dict(x=x, models=[torch.randn_like(x)], coeffs=[1.0, 0.5])
    kwargs.update(over)
    return kwargs


@pytest.mark.parametrize("kwargs, pattern", [
    (_bad(x=torch.ones(2, 3, dtype=torch.int64), models=[]), "x has dtype torch.int64"),
    (_bad(x=torch.tensor(1.0), models=[], coeffs=[1.0]), "leading batch dimension"),
    (_bad(models=torch.randn(2, 3, 4, 4)), r"wrap a single tensor as \[t\]"),
    (_bad(models=[torch.randn(2, 3, 4, 5)]), r"models\[0\] has shape \(2, 3, 4, 5\) but x has \(2, 3, 4, 4\)"),
    (_bad(models=[torch.randn(2, 3, 4, 4, dtype=torch.float64)]), r"models\[0\] has dtype torch.float64.*\.to\(x.dtype\)"),
    (_bad(models=[torch.randn(2, 3, 4, 4)] * 7, coeffs=[1.0] * 8), "at most 6"),
    (_bad(coeffs=[1.0]), r"coeffs has 1 entries; this call needs 2 \(x, models\[0\]\)"),
    (_bad(coeffs=torch.ones(3, 2)), r"per-sample \[2, 2\]"),
    (_bad(coeffs=torch.ones(2, dtype=torch.int32)), "float32 or float64 coefficients"),
    (_bad(coeffs=[1.0, float("nan")]), r"coeffs\[1\] is nan"),
    (_bad(coeffs="ab"), "sequence of floats"),
    (_bad(model_output=torch.randn(2, 3, 4, 4), coeffs=[1.0, 1.0, 1.0]), "needs convert"),
    (_bad(model_output=(torch.randn(2, 3, 4, 4),) * 2, convert=[1.0, 1.0], coeffs=[1.0, 1.0, 1.0]), "pass guidance_scale"),
    (_bad(model_output=torch.randn(2, 3, 4, 4), convert=[1.0, 1.0], coeffs=[1.0, 1.0, 1.0], guidance_scale=2.0),
     r"guidance_scale needs model_output=\(cond, uncond\)"),
    (_bad(threshold=Threshold()), "pass model_output too"),
    (_bad(save=torch.randn(2, 3, 4, 4)), "pass model_output too"),
    (_bad(model_output=torch.randn(2, 3, 4, 4), convert=[1.0, 1.0], coeffs=[1.0, 1.0, 1.0],
          threshold=Threshold(1.5)), r"ratio is 1.5"),
    (_bad(model_output=torch.randn(2, 3, 4, 4), convert=[1.0, 1.0], coeffs=[1.0, 1.0, 1.0],
          threshold=Threshold(0.9, 2.0, 1.0)), "min_scale <= max_scale"),
    (_bad(noise=torch.randn(2, 3, 4, 4), coeffs=[1.0, 1.0]), r"this call needs 3 \(x, models\[0\], noise\)"),
    (_bad(noise=PhiloxNoise(-1), coeffs=[1.0, 1.0, 1.0]), r"\[0, 2\*\*63\)"),
    (_bad(out=torch.empty(2, 3, 4, 4, dtype=torch.float16)), "out has dtype torch.float16"),
])
def test_bad_arguments_are_named_with_a_fix(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        solver_step(**kwargs)


def test_device_mismatch_and_host_tables_are_refused():
    x = torch.randn(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"models\[0\] is on cpu but x is on meta; move it with \.to\(x\.device\)"):
        solver_step(x, [torch.randn(2, 3, 4, 4)], [1.0, 1.0])
    with pytest.raises(ValueError, match="keep coefficient tables on x's device"):
        solver_step(x, [], torch.ones(2, 1))


def test_requires_grad_is_refused_with_the_way_out():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="torch.no_grad"):
        solver_step(x, [], [1.0])
    with torch.no_grad():
        solver_step(x, [], [1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_automatic_choice_follows_the_measured_speeds():
    """CUDA for ordinary sizes; Triton from TRITON_FIRST_BYTES and for Philox noise inside a CUDA graph."""
    from pydpm.ops.solver_step import TRITON_FIRST_BYTES, check_args

    small = torch.randn(16, 4, 128, 128, device="cuda")
    assert OP.select(check_args(small, [small], [1.0, 1.0])).name == "cuda"
    big = torch.empty(TRITON_FIRST_BYTES // 4, device="cuda").view(1, -1)
    assert OP.select(check_args(big, [], [1.0])).name == "triton"
    args = check_args(small, [], [1.0, 1.0], noise=PhiloxNoise(1, 2))
    assert OP.select(args).name == "cuda"
    graph = torch.cuda.CUDAGraph()
    out = torch.empty_like(small)
    with use_backend("triton"):  # compile the kernel outside the capture
        solver_step(small, [], [1.0, 1.0], noise=PhiloxNoise(1, 2), out=out)
    with torch.cuda.graph(graph):
        assert OP.select(args).name == "triton"
        solver_step(small, [], [1.0, 1.0], noise=PhiloxNoise(1, 2), out=out)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out.cpu().double(), small.cpu().double() + philox_normal(1, 2, small.numel()).view(small.shape),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), n_models=st.integers(0, 6),
       per_sample=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31))
def test_property_cpu_kernel_matches_numpy(shape, n_models, per_sample, dtype, seed):
    """Any shape (rank 1 to 4, sizes 1..9), any number of models, shared or per-sample coefficients."""
    gen = torch.Generator().manual_seed(seed)
    x, *models = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(1 + n_models))
    c = torch.randn((shape[0], 1 + n_models) if per_sample else (1 + n_models,), generator=gen, dtype=torch.float64)
    with use_backend("cpu"):
        y = solver_step(x, models, c if per_sample else c.tolist())
    cols = np.broadcast_to(c.numpy(), (shape[0], 1 + n_models)).reshape((shape[0], 1 + n_models) + (1,) * (len(shape) - 1))
    expected = sum(cols[:, i] * t.double().numpy() for i, t in enumerate([x, *models]))
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=LOW[dtype] * 10, atol=LOW[dtype] * 10)


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
@pytest.mark.parametrize("case", ["plain", "cfg-threshold-philox", "convert-save", "shared-model"])
def test_planned_step_equals_checked_call(backend, case):
    """PlannedStep (a sampler's pre-checked launch) gives the checked op's result when only x, the model
    outputs and out change, and falls back to the checked path for tensors of another layout."""
    from pydpm.ops.solver_step import PlannedStep, check_args
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    dev = torch.device(backend)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 5, 7)

    def r():
        return torch.randn(shape, generator=gen).to(dev)
    kw = {"plain": dict(models=[r(), r()], coeffs=[0.3, -0.2, 0.5]),
          "cfg-threshold-philox": dict(models=[r()], coeffs=[0.9, 0.4, -0.1, 0.05], model_output=(r(), r()),
                                       guidance_scale=3.0, convert=[0.5, -0.7], threshold=Threshold(0.9, 1.0, 2.0),
                                       noise=PhiloxNoise(7, 2)),
          "convert-save": dict(models=[r()], coeffs=torch.tensor([0.9, 0.4, -0.1], device=dev),
                               model_output=r(), convert=torch.tensor([0.5, -0.7], dtype=torch.float64, device=dev),
                               save=torch.empty(shape, device=dev)),
          "shared-model": dict(models=[torch.randn((1,) + shape[1:], generator=gen).to(dev), r()],
                               coeffs=[0.9, -0.3, 0.2])}[case]
    placeholder = kw.get("model_output")
    planned = PlannedStep(check_args(torch.empty(shape, device=dev), out=torch.empty(shape, device=dev), **kw))
    assert planned.params is not None
    for trial in range(3):
        x = r()
        mo = None if placeholder is None else ((r(), r()) if isinstance(placeholder, tuple) else r())
        cond, uncond = (mo if isinstance(mo, tuple) else (mo, None))
        if trial == 2 and cond is not None:  # a model output in another layout: the checked path runs
            cond = torch.empty(shape[:-1] + (2 * shape[-1],), device=dev)[..., ::2].copy_(cond)
        out = torch.full(shape, float("nan"), device=dev)
        save = kw.get("save")
        planned(x, cond, uncond, out)
        got_save = None if save is None else save.clone()
        ref_kw = dict(kw, model_output=None if mo is None else (cond if uncond is None else (cond, uncond)))
        if save is not None:
            ref_kw["save"] = torch.empty(shape, device=dev)
        expect = solver_step(x, **ref_kw)
        torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
        if save is not None:
            torch.testing.assert_close(got_save, ref_kw["save"], rtol=1e-6, atol=1e-6)
    if case == "convert-save":
        with pytest.raises(ValueError, match=r"model output has shape \(1,\)"):
            planned(r(), torch.empty(1, device=dev), None, torch.empty(shape, device=dev))
