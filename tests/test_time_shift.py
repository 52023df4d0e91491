"""The time-shift sampler (`DPMSolver.sample(..., time_shift=TimeShift(...))`).

- with the window or the cut-off switching it off it is the plain multistep solver, to rounding;
- it equals an independent float64 implementation (one sample at a time: the shifted time by brute force over
  the window, DPM-Solver++ multistep updates written out from the paper);
- a sample whose variance is that of a known time in the window is relabelled with exactly that time, per sample;
- every sample's times keep decreasing; samples do not influence each other; bad settings are refused by name;
  the plan refuses a sequence of orders its row numbering cannot follow.

And its fused op, `pydpm.ops.time_shift_pick` (the registry's contract tests cover it against its reference on
every backend, dtype and layout): against an oracle written with Python's statistics module; the first of equal
candidates wins, within and across the kernel's candidate blocks; the variance of samples far from zero and
larger than the kernel's block; the sampler with every op forced onto Triton equals it on the reference ops.
"""
from __future__ import annotations

import math
import os
import statistics

import pytest
import torch

import samplers_oracle as O
from _support import backend_device
from gaussian_mixture import GaussianMixture
from pydpm.ops import solver_step_reference, time_shift_pick, use_backend
from pydpm.samplers import DPMSolver, TimeShift
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP, model_wrapper

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1000


@pytest.fixture(scope="module")
def mixture():
    """(schedule, oracle schedule, mixture, its exact ε-model, starting noise [6, 16])."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    osched = O.VPLinear()
    gm = GaussianMixture.random(osched, 16, seed=4, spread=0.7)
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return ns, osched, gm, model_wrapper(gm.model_fn("noise"), ns), x


class Recorder:
    """A model that remembers the times it was called at."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t):
        self.times.append(t.detach().clone())
        return self.fn(x, t)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order,solver_type,third", [(1, "dpmsolver", "authors"), (2, "dpmsolver", "authors"),
                                                     (2, "taylor", "authors"), (3, "dpmsolver", "authors"),
                                                     (3, "dpmsolver", "corrected")])
@pytest.mark.parametrize("off", [TimeShift(window=0), TimeShift(window=8, cutoff=1.0)])
def test_switched_off_it_is_the_plain_solver(mixture, algorithm, order, solver_type, third, off):
    ns, _, _, model, x = mixture
    solver = DPMSolver(model, ns, algorithm_type=algorithm)
    kw = dict(steps=7, order=order, solver_type=solver_type, third_order=third, skip_type="logSNR")
    torch.testing.assert_close(solver.sample(x, time_shift=off, **kw), solver.sample(x, **kw), rtol=1e-12, atol=1e-12)


def oracle(osched, gm, x, ts, shift, order, corrected):
    """DPM-Solver++ multistep (solver_type 'dpmsolver'; lower_order_final as the authors) with TS-DPM's shifted
    times, one sample at a time in float64."""
    steps = len(ts) - 1
    orders = [min(k, order) for k in range(1, steps + 1)]
    if steps < 10:
        orders = [min(o, steps + 1 - k) for k, o in zip(range(1, steps + 1), orders)]
    lam = lambda t: float(osched.lam(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    alpha = lambda t: float(osched.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    sigma = lambda t: float(osched.sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731

    def relabel(i, xi):
        t = ts[i]
        if shift.window == 0 or t <= shift.cutoff:
            return t
        low = 0.5 * (ts[i] + ts[i + 1])
        high = 1.0 if i == 0 else 0.5 * (ts[i - 1] + ts[i])
        var = float(xi.var())
        best = None
        for k in range(-shift.window, shift.window + 1):
            tau = t + k / N
            if k != 0 and not low < tau <= high:
                continue
            cost = abs(var - (alpha(tau) ** 2 * shift.data_variance + sigma(tau) ** 2))
            if best is None or cost < best[0]:
                best = (cost, tau)
        return best[1]

    out = []
    for xi in x:
        xi = xi.clone()
        ps, ds = [], []
        for i in range(steps):
            t_i = relabel(i, xi)
            d = (xi - sigma(t_i) * gm.eps(xi[None], torch.tensor([t_i], dtype=torch.float64))[0]) / alpha(t_i)
            ps, ds = (ps + [t_i])[-3:], (ds + [d])[-3:]
            t = ts[i + 1]
            h = lam(t) - lam(ps[-1])
            phi_1 = math.expm1(-h)
            xi_new = sigma(t) / sigma(ps[-1]) * xi - alpha(t) * phi_1 * ds[-1]
            if orders[i] == 2:
                r0 = (lam(ps[-1]) - lam(ps[-2])) / h
                xi_new = xi_new - 0.5 * alpha(t) * phi_1 * (ds[-1] - ds[-2]) / r0
            elif orders[i] == 3:
                h0, h1 = lam(ps[-1]) - lam(ps[-2]), lam(ps[-2]) - lam(ps[-3])
                r0, r1 = h0 / h, h1 / h
                d1_0, d1_1 = (ds[-1] - ds[-2]) / r0, (ds[-2] - ds[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (2.0 if corrected else 1.0) / (r0 + r1) * (d1_0 - d1_1)
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                xi_new = xi_new + alpha(t) * phi_2 * d1 - alpha(t) * phi_3 * d2
            xi = xi_new
        out.append(xi)
    return torch.stack(out)


@pytest.mark.parametrize("order,third", [(1, "authors"), (2, "authors"), (3, "authors"), (3, "corrected")])
@pytest.mark.parametrize("shift", [TimeShift(window=6, cutoff=0.3), TimeShift(window=20, cutoff=0.05,
                                                                            data_variance=0.4)])
def test_equals_an_independent_implementation(mixture, order, third, shift):
    ns, osched, gm, model, x = mixture
    rec = Recorder(model)
    y = DPMSolver(rec, ns).sample(x, steps=8, order=order, third_order=third, time_shift=shift)
    ts = DPMSolver(model, ns).grid("time_uniform", 1.0, 1e-3, 8).tolist()
    torch.testing.assert_close(y, oracle(osched, gm, x, ts, shift, order, third == "corrected"), rtol=1e-10,
                               atol=1e-10)
    called = torch.stack(rec.times)                       # [steps, batch]
    nominal = torch.tensor(ts[:-1], dtype=torch.float64)[:, None]
    assert bool((called != nominal).any()), "the test must exercise shifted times"
    assert bool((called[:, 1:] != called[:, :1]).any()), "the test must exercise times that differ per sample"


def test_model_types_and_guidance_convert_like_the_noise_model(mixture):
    """A model_wrapper model's raw output (x₀, v, a classifier-free pair) is converted inside the loop at each
    sample's own time: the same samples as through the wrapper's own noise prediction (a plain function)."""
    ns, _, gm, _, x = mixture
    raw = gm.model_fn("noise", conditional=True)
    cond = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)[None]

    def net(x, t_input, c):  # the wrapper stacks [uncond; cond] for [x; x]
        return raw(x, t_input, c.repeat_interleave(x.shape[0] // c.shape[0], 0))

    shift = TimeShift(window=6, cutoff=0.3)
    for model in (model_wrapper(gm.model_fn("x_start"), ns, model_type="x_start"),
                  model_wrapper(gm.model_fn("v"), ns, model_type="v"),
                  model_wrapper(net, ns, guidance_type="classifier-free", condition=cond,
                                unconditional_condition=torch.zeros_like(cond), guidance_scale=3.0)):
        for algorithm in ("dpmsolver++", "dpmsolver"):
            fused = DPMSolver(model, ns, algorithm_type=algorithm).sample(x, steps=6, time_shift=shift)
            plain = DPMSolver(lambda x, t: model(x, t), ns, algorithm_type=algorithm).sample(x, steps=6,
                                                                                           time_shift=shift)
            torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)


def test_picks_the_time_whose_variance_matches(mixture):
    """x scaled to the variance σ_τ² of a chosen τ in the window is called at exactly that τ."""
    ns = mixture[0]
    t0, targets = 0.5, [3, -2, 0, 5]
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in targets:
        z = torch.randn(4096, dtype=torch.float64, generator=g)
        z = (z - z.mean()) / z.std()                        # unbiased variance exactly 1
        rows.append(z * ns.marginal_std(torch.tensor([t0 + k / N], dtype=torch.float64)))
    rec = Recorder(lambda x, t: 0.5 * x)
    DPMSolver(rec, ns).sample(torch.stack(rows), steps=3, t_start=t0, time_shift=TimeShift(window=5, cutoff=0.1))
    expected = torch.tensor([t0 + k / N for k in targets], dtype=torch.float64)
    torch.testing.assert_close(rec.times[0], expected, rtol=0, atol=1e-12)


def test_times_decrease_and_samples_are_independent(mixture):
    ns, _, _, model, x = mixture
    rec = Recorder(model)
    shift = TimeShift(window=300, cutoff=0.0)              # a window wider than the steps: the midpoints bound it
    solver = DPMSolver(rec, ns)
    y = solver.sample(x, steps=10, order=2, time_shift=shift)
    called = torch.stack(rec.times)
    assert bool((called.diff(dim=0) < 0).all())
    assert bool((called[:, :, None] != called[:, None, :]).any())
    alone = torch.cat([DPMSolver(model, ns).sample(x[i:i + 1], steps=10, order=2, time_shift=shift)
                       for i in range(x.shape[0])])
    torch.testing.assert_close(y, alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="smaller TimeShift window"):  # ~165³ combinations at order 3
        solver.sample(x, steps=6, order=3, time_shift=shift)


def test_return_intermediate_and_denoise_to_zero(mixture):
    ns, _, _, model, x = mixture
    shift = TimeShift(window=6, cutoff=0.3)
    solver = DPMSolver(model, ns)
    y, inter = solver.sample(x, steps=5, time_shift=shift, return_intermediate=True)
    assert len(inter) == 6 and torch.equal(inter[-1], y) and torch.equal(inter[0], x)
    z, inter = solver.sample(x, steps=5, time_shift=shift, return_intermediate=True, denoise_to_zero=True)
    assert len(inter) == 7 and torch.equal(inter[-1], z) and not torch.equal(z, y)


def test_low_precision_and_layouts(mixture):
    ns, _, _, _, _ = mixture

    def eps(x, t):                                          # analytic, any dtype
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    x = torch.randn(3, 2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shift = TimeShift(window=10, cutoff=0.2)
    expected = DPMSolver(eps, ns).sample(x, steps=6, order=3, time_shift=shift)
    got = DPMSolver(eps, ns).sample(x.float(), steps=6, order=3, time_shift=shift)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    view = x.transpose(2, 3).contiguous().transpose(2, 3)   # non-contiguous, same values
    torch.testing.assert_close(DPMSolver(eps, ns).sample(view, steps=6, order=3, time_shift=shift), expected,
                               rtol=1e-12, atol=1e-12)


def test_the_workspace_plans_every_step_and_follows_layouts(mixture, monkeypatch):
    """Eagerly, every update is a planned launch on the workspace's buffers (the checked op is never entered),
    for the plain model and a classifier-free pair, with and without denoise_to_zero; one solver object kept
    across batch sizes and layouts gives what a fresh one gives, to the bit, and never writes its input."""
    import pydpm.samplers.time_shift as ts_module
    ns, _, gm, model, x = mixture
    shift = TimeShift(window=6, cutoff=0.3)
    cond = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)[None]
    raw = gm.model_fn("noise", conditional=True)
    guided = model_wrapper(lambda x, t, c: raw(x, t, c.repeat_interleave(x.shape[0] // c.shape[0], 0)), ns,
                           guidance_type="classifier-free", condition=cond,
                           unconditional_condition=torch.zeros_like(cond), guidance_scale=2.5)
    wide = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    strided = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).t()
    for fn in (model, guided):
        fresh = {(name, z): DPMSolver(fn, ns).sample(v, steps=6, order=3, time_shift=shift, denoise_to_zero=z)
                 for name, v in (("x", x), ("wide", wide), ("strided", strided)) for z in (False, True)}
        kept = DPMSolver(fn, ns)
        with monkeypatch.context() as m:
            m.setattr(ts_module, "solver_step", lambda *a, **k: pytest.fail("a step left the planned launch"))
            for name, v in (("x", x), ("wide", wide), ("x", x), ("wide", wide)):
                before = v.clone()
                for z in (False, True):
                    assert torch.equal(kept.sample(v, steps=6, order=3, time_shift=shift, denoise_to_zero=z),
                                       fresh[(name, z)])
                assert torch.equal(v, before)
        # a transposed x is planned for its own strides, or stepped by the checked op: the same values either way
        assert torch.equal(kept.sample(strided, steps=6, order=3, time_shift=shift), fresh[("strided", False)])


def test_bad_settings_are_refused(mixture):
    ns, _, _, model, x = mixture
    for bad, match in [(dict(window=-1), "window"), (dict(window=2.5), "window"), (dict(window=True), "window"),
                       (dict(cutoff=-0.1), "cutoff"), (dict(cutoff=math.nan), "cutoff"),
                       (dict(data_variance=-1.0), "data_variance")]:
        with pytest.raises(ValueError, match=match):
            TimeShift(**bad)
    solver = DPMSolver(model, ns)
    shift = TimeShift()
    with pytest.raises(TypeError, match="time_shift"):
        solver.sample(x, time_shift="on")
    for kw, match in [(dict(method="singlestep"), "method='singlestep'"), (dict(cuda_graph=True), "cuda_graph"),
                      (dict(progress=True), "progress"), (dict(times=[1e-3, 0.5, 1.0]), "inversion")]:
        with pytest.raises(ValueError, match=match):
            solver.sample(x, time_shift=shift, **kw)
    with pytest.raises(ValueError, match="correcting_x0_fn"):
        DPMSolver(model, ns, correcting_x0_fn="dynamic_thresholding").sample(x, time_shift=shift)
    with pytest.raises(ValueError, match="correcting_xt_fn"):
        DPMSolver(model, ns, correcting_xt_fn=lambda x, t, i: x).sample(x, time_shift=shift)
    flow = NoiseScheduleFlow()
    with pytest.raises(ValueError, match="flow schedule"):
        DPMSolver(lambda x, t: x, flow).sample(x.float(), time_shift=shift)
    # samples of one element have no variance: every pick was the farthest shift, silently
    scalar = DPMSolver(model_wrapper(lambda x_, t: 0.3 * x_ + 0.1 * t.reshape(-1, *[1] * (x_.dim() - 1)), ns), ns)
    for one in (x[:, :1], x[:, 0]):
        with pytest.raises(ValueError, match="samples have 1 element"):
            scalar.sample(one, time_shift=shift)
        torch.testing.assert_close(scalar.sample(one, time_shift=TimeShift(window=0)), scalar.sample(one))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("verify", [False, True])
def test_on_cuda(dtype, verify, monkeypatch):
    """On the GPU (per-sample tables on the device) it equals the float64 CPU run; with the picks' prepared
    launches on their driver path, and with every launch checked against Triton's JIT (PYDPM_VERIFY_LAUNCHES,
    which the GPU test runs set, and which keeps them on `Kernel`'s path)."""
    from pydpm.kernels import _launch
    monkeypatch.setattr(_launch, "_VERIFY", verify)
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def eps(x, t):
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = TimeShift(window=10, cutoff=0.2)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    cond = torch.full((1, 3, 8, 8), 0.2, dtype=torch.float64)

    def net(x, t, c):  # the wrapper stacks [uncond; cond] for [x; x]
        return eps(x, t) + c.repeat_interleave(x.shape[0] // c.shape[0], 0).to(x)

    guided = model_wrapper(net, ns, model_type="x_start", guidance_type="classifier-free", condition=cond,
                           unconditional_condition=-cond, guidance_scale=2.0)  # per-sample convert and a pair
    for model in (eps, guided):
        expected = DPMSolver(model, ns).sample(x, steps=6, order=3, time_shift=shift)
        y = DPMSolver(model, ns).sample(x.to("cuda", dtype), steps=6, order=3, time_shift=shift)
        torch.testing.assert_close(y.double().cpu(), expected, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("denoise_to_zero", [False, True])
@pytest.mark.parametrize("verify", [False, True])
def test_in_a_cuda_graph(denoise_to_zero, verify, monkeypatch):
    """cuda_graph=True replays the eager loop's launches: the same result and intermediates to the bit, on the
    input it was captured with and on fresh input (whose samples pick other times); with the picks' prepared
    launches on their driver path (captured as such) and on `Kernel`'s checked path (PYDPM_VERIFY_LAUNCHES)."""
    from pydpm.kernels import _launch
    monkeypatch.setattr(_launch, "_VERIFY", verify)
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def eps(x, t):
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    solver = DPMSolver(eps, ns)
    shift = TimeShift(window=10, cutoff=0.2)
    kw = dict(steps=6, order=3, time_shift=shift, denoise_to_zero=denoise_to_zero, return_intermediate=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for scale in (1.0, 1.05, 0.9):  # the first call captures; the others replay with other variances
        x = scale * torch.randn(8, 3, 8, 8, generator=gen, device="cuda")
        y, inter = solver.sample(x, cuda_graph=True, **kw)
        y_eager, inter_eager = solver.sample(x, **kw)
        torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
        assert len(inter) == len(inter_eager) == 7 + denoise_to_zero
        for a, b in zip(inter, inter_eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_launch_per_model_call():
    """Kernels counted by torch.profiler over an eager loop whose model launches none (it returns a fixed tensor):
    the plain DPM-Solver++(2M) loop launches one kernel per model call, and the time-shifted one, every call
    shifting, one more: the first call's pick, then each update with the next call's pick, then the last update."""
    from torch.profiler import ProfilerActivity, profile
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=gen, device="cuda")
    fixed = 0.5 * torch.randn(2, 4, 32, 32, generator=gen, device="cuda")
    solver = DPMSolver(lambda x, t: fixed, ns)

    def kernels(**kw) -> list[str]:
        solver.sample(x, steps=6, order=2, **kw)  # compiles and plans
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            solver.sample(x, steps=6, order=2, **kw)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memcpy", "Memset"))]

    plain = kernels()
    assert len(plain) == 6, plain
    shifted = kernels(time_shift=TimeShift(window=5, cutoff=0.0))
    assert len(shifted) == 7 and sum("_pick_kernel" in name for name in shifted) == 6, shifted


# --------------------------------------------------------------------------------------------------
# The fused pick
# --------------------------------------------------------------------------------------------------

PICK_BACKENDS = ["reference", "triton"]  # triton on CUDA, or through the interpreter on the CPU (CI)


def pick_oracle(x, promised, row=None, modulus=1):
    """Python floats and ints, one sample at a time: statistics.variance, the first nearest candidate, floor
    modulo."""
    out = []
    for b in range(x.shape[0]):
        values = x[b].reshape(-1).tolist()
        var = statistics.variance(values) if len(values) > 1 else math.nan
        dist = [abs(var - p) for p in promised.tolist()]
        dist = [math.inf if math.isnan(d) else d for d in dist]
        k = min(range(len(dist)), key=lambda j: (dist[j], j))
        out.append(k if row is None else (int(row[b]) % modulus) * len(dist) + k)
    return out


@pytest.mark.parametrize("backend", PICK_BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_pick_equals_the_python_oracle(backend, seed):
    g = torch.Generator().manual_seed(seed)
    B, shape, K = 5 + seed, (3, 11 + 4 * seed), 3 + 29 * seed
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(B, 1, 1, generator=g,
                                                                                     dtype=torch.float64))
    promised = 0.2 + 1.5 * torch.rand(K, generator=g, dtype=torch.float64)
    promised[torch.randperm(K, generator=g)[:K // 3]] = math.inf
    row = torch.randint(-50, 500, (B,), generator=g)
    d = backend_device(backend)
    with use_backend(backend):
        assert time_shift_pick(x.to(d), promised.to(d)).tolist() == pick_oracle(x, promised)
        assert time_shift_pick(x.to(d), promised.to(d), row.to(d), 7).tolist() == pick_oracle(x, promised, row, 7)
        assert time_shift_pick(x.to(d).float(), promised.to(d)).tolist() == pick_oracle(x, promised)


def _gather_pairs(rows, batch, d, g):
    """Tables of the three kinds the sampler gathers (a model time, an output conversion, a step's coefficients),
    random and distinct per row, with poisoned destinations."""
    tables = (torch.rand(rows, generator=g).to(d), torch.randn(rows, 2, generator=g, dtype=torch.float64).to(d),
              torch.randn(rows, 3, generator=g, dtype=torch.float64).to(d))
    return [(t, torch.full((batch, *t.shape[1:]), math.nan, dtype=t.dtype, device=d)) for t in tables]


@pytest.mark.parametrize("backend", PICK_BACKENDS)
def test_planned_pick_equals_the_op_and_falls_back_on_other_layouts(backend):
    """PlannedPick (the sampler's pre-checked pick) gives the op's result on fresh x of its planned layout, and
    gathers each table's row of every sample's pick: on Triton by launching the kernel itself, gathers included
    (on CUDA, a large sample in a batch of 1 is chunked, on the scratch it keeps), elsewhere through the public op
    and `index_select`; with row = out it chains picks as the op does; an x of another layout takes the public
    op."""
    from pydpm.ops.time_shift import PlannedPick, time_shift_pick_reference
    d, g = backend_device(backend), torch.Generator().manual_seed(8)
    for shape in ((1, 4, 64, 64), (5, 3, 7)):
        promised = (0.3 + 1.4 * torch.rand(21, generator=g, dtype=torch.float64)).to(d)
        row = torch.full(shape[:1], -1, dtype=torch.int64, device=d)
        gathers = _gather_pairs(21 * 5, shape[0], d, g)
        with use_backend(backend):
            first = PlannedPick(torch.empty(shape, device=d), promised, None, 1, row)
            chained = PlannedPick(torch.empty(shape, device=d), promised, row, 5, row, gathers=gathers)
            assert (first.launch is not None) == (chained.launch is not None) == (backend == "triton")
            assert (first.scratch is not None) == (backend == "triton" and d.type == "cuda" and shape[0] == 1)
            for trial in range(3):
                xs = [torch.randn(shape, generator=g) * (0.5 + trial) for _ in range(2)]
                if trial == 2:  # another layout: the public op
                    xs = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in xs]
                expected = time_shift_pick_reference(xs[0].double(), promised.cpu())
                assert first(xs[0].to(d)) is row and row.tolist() == expected.tolist()
                expected = time_shift_pick_reference(xs[1].double(), promised.cpu(), expected, 5)
                assert chained(xs[1].to(d)) is row and row.tolist() == expected.tolist()
                for table, dest in gathers:
                    assert torch.equal(dest.cpu(), table.cpu()[expected])


@pytest.mark.parametrize("backend", PICK_BACKENDS)
def test_planned_pick_with_more_gathers_than_the_kernel_takes(backend):
    """Four gathers (the kernel makes three): the public op, then one `index_select` per gather."""
    from pydpm.ops.time_shift import PlannedPick, time_shift_pick_reference
    d, g = backend_device(backend), torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 5, generator=g)
    promised = (0.3 + 1.4 * torch.rand(9, generator=g, dtype=torch.float64)).to(d)
    out = torch.full((6,), -1, dtype=torch.int64, device=d)
    gathers = _gather_pairs(9, 6, d, g) + _gather_pairs(9, 6, d, g)[:1]
    with use_backend(backend):
        planned = PlannedPick(x.to(d), promised, None, 1, out, gathers=gathers)
        assert planned.launch is None
        planned(x.to(d))
    expected = time_shift_pick_reference(x.double(), promised.cpu())
    assert out.tolist() == expected.tolist()
    for table, dest in gathers:
        assert torch.equal(dest.cpu(), table.cpu()[expected])


def test_planned_pick_refuses_gathers_it_cannot_make():
    """A table that does not cover every pick, a destination of the wrong shape or dtype, a strided table: named."""
    from pydpm.ops.time_shift import PlannedPick
    x, promised, row = torch.randn(4, 9), torch.linspace(0.5, 1.5, 7, dtype=torch.float64), torch.zeros(4).long()
    good = torch.randn(21, 2, dtype=torch.float64)
    bad = {"rows": (good[:20], torch.empty(4, 2, dtype=torch.float64)),
           "dest-shape": (good, torch.empty(4, 3, dtype=torch.float64)),
           "dest-dtype": (good, torch.empty(4, 2)),
           "strided": (torch.randn(21, 4, dtype=torch.float64)[:, ::2], torch.empty(4, 2, dtype=torch.float64))}
    PlannedPick(x, promised, row, 3, row, gathers=[(good, torch.empty(4, 2, dtype=torch.float64))])
    for name, pair in bad.items():
        with pytest.raises(ValueError, match=r"gathers\[1\]"):
            PlannedPick(x, promised, row, 3, row, gathers=[(good, torch.empty(4, 2, dtype=torch.float64)), pair])


@pytest.mark.parametrize("backend", PICK_BACKENDS)
def test_pick_takes_the_first_of_equal_candidates(backend):
    """Duplicated candidates: the lowest index, in the first candidate block and across blocks (64 per block)."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = x.var(dim=1)
    promised = torch.full((150,), 50.0, dtype=torch.float64)
    for j in (5, 9, 70, 149):
        promised[j] = float(var[0])
    promised[100] = promised[130] = float(var[1])
    promised[3] = promised[66] = float(var[2]) + 1e-3
    promised[140] = float(var[2]) + 2e-3
    d = backend_device(backend)
    with use_backend(backend):
        assert time_shift_pick(x.to(d), promised.to(d)).tolist() == [5, 100, 3]


@pytest.mark.parametrize("backend", PICK_BACKENDS)
def test_pick_variance_far_from_zero_and_past_one_block(backend):
    """Samples with mean 1000 and 3000 elements (past the kernel's 1024-element block): the two-pass variance
    tells a candidate 5e-4 nearer from one 2e-3 away, in float32 too."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3000, generator=g, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)       # variance exactly 1
    scales = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64)
    x = 1000 + z * scales[:, None].sqrt()
    promised = torch.tensor([0.8985, 0.902, 0.9985, 1.002, 1.098, 1.1015, 1.198, 1.2015], dtype=torch.float64)
    d = backend_device(backend)
    with use_backend(backend):
        assert time_shift_pick(x.to(d), promised.to(d)).tolist() == [0, 2, 5, 7]
        assert time_shift_pick(x.to(d).float(), promised.to(d)).tolist() == [0, 2, 5, 7]


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_pick_kernel_merges_chunked_samples(splits):
    """The Triton launcher with each sample's variance split into chunks (what it does on a GPU for large samples
    and small batches): the chunk that counts itself last merges every chunk's (count, mean, M2), whose means
    differ (a trend along the sample), by Chan's update, picks what the oracle picks, with a row, and makes the
    gathers; launched again on the same scratch (its counters back at zero) with other samples, it picks theirs;
    likewise on the scratch the launcher keeps when the caller passes none."""
    kernels = pytest.importorskip("pydpm.kernels.time_shift")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs CUDA or the interpreter")
    d = backend_device("triton")
    g = torch.Generator().manual_seed(splits)
    trend = torch.linspace(-1, 1, 5 * 1001, dtype=torch.float64).reshape(5, 1001)  # chunk means differ
    promised = 0.5 + 1.9 * torch.rand(40, generator=g, dtype=torch.float64)
    row = torch.randint(0, 100, (3,), generator=g)
    gathers = _gather_pairs(40 * 11, 3, d, g)
    for dtype in (torch.float64, torch.float32):
        scratch = kernels.make_scratch(torch.empty(3, 5, 1001, dtype=dtype, device=d), splits)
        assert scratch is not None and scratch.stats.numel() == 3 * splits * 3
        for scale in ((0.7, 1.0, 1.3), (1.25, 0.75, 0.95)):
            scale = torch.tensor(scale, dtype=torch.float64)[:, None, None]
            x = 3 + trend + torch.randn(3, 5, 1001, generator=g, dtype=torch.float64) * scale
            expected = pick_oracle(x, promised, row, 11)
            for kept in (scratch, None):  # None: the launcher's own, kept per stream
                out = torch.full((3,), -1, dtype=torch.int64, device=d)
                kernels.time_shift_pick(x.to(d, dtype), promised.to(d), row.to(d), 11, out, splits=splits,
                                        scratch=kept, gathers=gathers)
                assert out.tolist() == expected
                for table, dest in gathers:
                    assert torch.equal(dest.cpu(), table.cpu()[expected])
                    dest.fill_(math.nan)
            assert scratch.counts.tolist() == [0, 0, 0]


def _step_inputs(shape, n_older, guided, per_sample_rows, dtype, d, g):
    """A solver step's tensors (x_in, cond, uncond or None, older) and coefficient rows (x, d, older...; conv):
    per sample in float64 or one row in float32."""
    def r(*sh):
        return torch.randn(sh, generator=g, dtype=torch.float64).to(d, dtype)

    B, n = shape[0], 2 + n_older
    coefs = (0.5 + torch.rand(B, n, generator=g, dtype=torch.float64)) if per_sample_rows else \
        (0.5 + torch.rand(n, generator=g)).float()
    conv = (torch.rand(B, 2, generator=g, dtype=torch.float64) - 0.5) if per_sample_rows else \
        (torch.rand(2, generator=g) - 0.5).float()
    return (r(*shape), r(*shape), r(*shape) if guided else None, tuple(r(*shape) for _ in range(n_older)),
            coefs.to(d), conv.to(d))


def _step_reference(x_in, cond, uncond, guidance, older, coefs, conv):
    """solver_step's float64 reference of the step: (result, d)."""
    save = torch.empty(x_in.shape, dtype=torch.float64)
    out = solver_step_reference(x_in.cpu().double(), [o.cpu().double() for o in older], coefs.cpu().double(),
                                model_output=cond.cpu().double() if uncond is None else
                                (cond.cpu().double(), uncond.cpu().double()),
                                convert=conv.cpu().double(), guidance_scale=None if uncond is None else guidance,
                                save=save)
    return out, save


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("verify", [False, True])
def test_public_pick_keeps_one_launch_per_layout(verify, monkeypatch):
    """On CUDA the public op prepares its launch once per layout (shape, strides, dtype, K, row, modulus, stream)
    and re-launches it with each call's tensors: fresh inputs equal the Python oracle call after call, with the
    kept launches on their driver path and on `Kernel`'s checked path (PYDPM_VERIFY_LAUNCHES); a kept launch
    holds none of the caller's tensors; another stream gets its own; a chunked call captured in a CUDA graph
    (its own scratch) replays right on new data."""
    import weakref

    from pydpm.kernels import _launch, time_shift as kernels
    monkeypatch.setattr(_launch, "_VERIFY", verify)
    kernels._PREPARED.clear()
    g = torch.Generator().manual_seed(3)
    promised = 0.2 + 1.5 * torch.rand(23, generator=g, dtype=torch.float64)
    pd = promised.cuda()

    def draw(shape, dtype=torch.float32):
        scale = 0.5 + torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64)
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    # chunked (B·S programs), one program per sample, chunked channels-last, two elements per sample
    layouts = [((2, 4, 32, 32), torch.float32, False), ((8, 3, 17, 19), torch.float16, False),
               ((2, 8, 24, 24), torch.bfloat16, True), ((5, 2), torch.float32, False)]
    for shape, dtype, channels_last in layouts:
        for _ in range(3):
            x, row = draw(shape, dtype), torch.randint(-50, 500, shape[:1], generator=g)
            xd = x.cuda().contiguous(memory_format=torch.channels_last) if channels_last else x.cuda()
            assert time_shift_pick(xd, pd).tolist() == pick_oracle(x.double(), promised)
            rd = row.cuda()
            assert time_shift_pick(xd, pd, rd, 5).tolist() == pick_oracle(x.double(), promised, row, 5)
            assert time_shift_pick(xd, pd, rd, 7, out=rd).tolist() == pick_oracle(x.double(), promised, row, 7)
    entries = 3 * len(layouts)  # without a row, with modulus 5, with modulus 7
    assert len(kernels._PREPARED) == entries
    assert all((launch.fast is not None) != verify for launch, _ in kernels._PREPARED.values())

    x = torch.randn(4, 2048, device="cuda")
    kept = weakref.ref(x)
    time_shift_pick(x, pd)
    del x
    assert kept() is None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    x = draw((2, 4, 32, 32))
    with torch.cuda.stream(side):
        picked = time_shift_pick(x.cuda(), pd)
    side.synchronize()
    assert picked.tolist() == pick_oracle(x.double(), promised)
    assert len(kernels._PREPARED) == entries + 2  # the (4, 2048) layout, then the side stream's

    xd, out = torch.empty(2, 4, 32, 32, device="cuda"), torch.empty(2, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        time_shift_pick(xd, pd, out=out)
    assert len(kernels._PREPARED) == entries + 2
    for _ in range(2):
        x = draw((2, 4, 32, 32))
        xd.copy_(x)
        graph.replay()
        assert out.tolist() == pick_oracle(x.double(), promised)


# (dtype, older predictions, guided, per-sample rows, save): each of the update's variants at least once
UPDATE_CASES = [(torch.float32, 2, False, True, True), (torch.float32, 0, True, False, False),
                (torch.float64, 1, True, True, True), (torch.float16, 2, True, False, True),
                (torch.bfloat16, 1, False, True, True)]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype,n_older,guided,per_sample_rows,saved", UPDATE_CASES)
def test_pick_kernel_makes_the_update_before_it(splits, dtype, n_older, guided, per_sample_rows, saved):
    """The pick kernel with `update`: it writes solver_step's result (and d to save) to x, poisoned before, as the
    float64 reference does, and picks (and gathers) what the oracle picks on what it wrote; in one program per
    sample and in chunks (the last chunk picks)."""
    kernels = pytest.importorskip("pydpm.kernels.time_shift")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs CUDA or the interpreter")
    d, g = backend_device("triton"), torch.Generator().manual_seed(splits + 10 * n_older)
    shape = (3, 5, 301)
    promised = 0.2 + 3.0 * torch.rand(40, generator=g, dtype=torch.float64)
    row = torch.randint(0, 100, (3,), generator=g)
    gathers = _gather_pairs(40 * 11, 3, d, g)
    x_in, cond, uncond, older, coefs, conv = _step_inputs(shape, n_older, guided, per_sample_rows, dtype, d, g)
    x = torch.full(shape, math.nan, dtype=dtype, device=d)
    save = torch.full(shape, math.nan, dtype=dtype, device=d) if saved else None
    out = torch.full((3,), -1, dtype=torch.int64, device=d)
    update = kernels.Update(x_in, cond, uncond, 1.7, older, save, coefs, conv)
    kernels.time_shift_pick(x, promised.to(d), row.to(d), 11, out, splits=splits, gathers=gathers, update=update)
    expected, d_expected = _step_reference(x_in, cond, uncond, 1.7, older, coefs, conv)
    tol = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}.get(
        dtype, dict(rtol=1e-5, atol=1e-5))
    torch.testing.assert_close(x.cpu().double(), expected, **tol)
    if saved:
        torch.testing.assert_close(save.cpu().double(), d_expected, **tol)
    picks = pick_oracle(x.cpu().double(), promised, row, 11)
    assert out.tolist() == picks and len(set(p % 40 for p in picks)) > 1
    for table, dest in gathers:
        assert torch.equal(dest.cpu(), table.cpu()[picks])


@pytest.mark.parametrize("backend", PICK_BACKENDS)
def test_planned_pick_after_step_equals_the_step_then_the_pick(backend):
    """PlannedPick planned with the step before it: on Triton `after_step` makes the step and the pick in one launch,
    with the result of `solver_step` then the pick; it declines (False, nothing done) on tensors of another layout
    or a missing or extra uncond, and plans no fused launch for steps the kernel does not make (noise, three older
    predictions, tensors of other layouts, float64); elsewhere it always declines."""
    from pydpm.ops import PhiloxNoise, solver_step
    from pydpm.ops.solver_step import check_args
    from pydpm.ops.time_shift import PlannedPick
    d, g = backend_device(backend), torch.Generator().manual_seed(2)
    shape = (4, 3, 7)
    promised = (0.2 + 3.0 * torch.rand(21, generator=g, dtype=torch.float64)).to(d)
    x_in, cond, uncond, older, coefs, conv = _step_inputs(shape, 2, True, True, torch.float32, d, g)
    save = torch.empty(shape, device=d)

    def plan(out, **kw):
        args = dict(older=older, coefs=coefs, model_output=(torch.empty_like(x_in),) * 2, convert=conv,
                    guidance_scale=1.5, save=save)
        args.update(kw)
        step = check_args(torch.empty_like(x_in), list(args.pop("older")), args.pop("coefs"),
                          out=torch.empty_like(x_in), **args)
        return PlannedPick(torch.empty_like(x_in), promised, None, 1, out, step=step)

    with use_backend(backend):
        out = torch.full(shape[:1], -1, dtype=torch.int64, device=d)
        planned = plan(out)
        assert (planned.fused is not None) == (backend == "triton")
        x = torch.full(shape, math.nan, device=d)
        if backend != "triton":
            assert not planned.after_step(x_in, cond, uncond, x) and x.isnan().all() and out.tolist() == [-1] * 4
            return
        assert not planned.after_step(x_in, cond, None, x)
        assert not planned.after_step(x_in, cond.transpose(1, 2).contiguous().transpose(1, 2), uncond, x)
        assert x.isnan().all() and out.tolist() == [-1] * 4
        assert planned.after_step(x_in, cond, uncond, x)
        expected = solver_step(x_in, list(older), coefs, model_output=(cond, uncond), convert=conv, guidance_scale=1.5)
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
        assert out.tolist() == time_shift_pick(x, promised).tolist()
        assert plan(out, noise=PhiloxNoise(1, 0), coefs=torch.cat([coefs, coefs[:, :1]], 1)).fused is None
        assert plan(out, older=older + older[:1], coefs=torch.cat([coefs, coefs[:, :1]], 1)).fused is None
        assert plan(out, save=torch.empty(shape[0], shape[2], shape[1], device=d).transpose(1, 2)).fused is None
        assert plan(out).launch is not None
        x64 = x_in.double()  # solver_step computes float64 in float64; the kernel would in float32
        step = check_args(x64, [o.double() for o in older], coefs, model_output=x64, convert=conv, out=x64.clone())
        assert PlannedPick(x64, promised, None, 1, out, step=step).fused is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton on CPU tensors needs the interpreter (CI); on CUDA "
                                                   "test_on_cuda and test_in_a_cuda_graph run it")
@pytest.mark.parametrize("transposed", [False, True])
def test_sampler_with_the_triton_pick_equals_the_reference(mixture, monkeypatch, transposed):
    """The whole time-shifted loop (float32: Triton's solver_step) with every op forced onto Triton (the
    interpreter) against the reference ops; the samples are called at different times. Every shifted call after
    the first makes its update in the pick's launch; with a model whose output has other strides than x
    (`transposed`), none does (the update, then the pick), and the result is the same."""
    ns = mixture[0]

    def eps(x, t):
        out = 0.3 * x + 0.1 * t.reshape(-1, 1, 1).to(x.dtype)
        return out.transpose(1, 2).contiguous().transpose(1, 2) if transposed else out

    rec = Recorder(eps)
    z = torch.randn(6, 4, 9, generator=torch.Generator().manual_seed(5))
    z = (z - z.mean((1, 2), keepdim=True)) / z.std((1, 2), keepdim=True)
    x = z * (0.604 + torch.linspace(-0.015, 0.015, 6)[:, None, None]).sqrt()  # around σ² at t = 0.3: ±6/N
    kw = dict(steps=6, order=3, t_start=0.3, time_shift=TimeShift(window=6, cutoff=0.1), denoise_to_zero=True)
    with use_backend("reference"):
        expected = DPMSolver(rec, ns).sample(x, **kw)
    from pydpm.ops.time_shift import PlannedPick
    fused = []
    after_step = PlannedPick.after_step
    monkeypatch.setattr(PlannedPick, "after_step", lambda self, *a: fused.append(after_step(self, *a)) or fused[-1])
    with use_backend("triton"):
        got = DPMSolver(rec, ns).sample(x, **kw)
    assert fused and all(f != transposed for f in fused)
    calls = len(rec.times) // 2
    for a, b in zip(rec.times[:calls], rec.times[calls:]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert len(set(rec.times[0].tolist())) > 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_plan_refuses_orders_that_rise_by_more_than_one(mixture):
    """A step's row carries the digits of the shifted points the step before read; an order that rises by two
    would need a digit that row never had (no multistep schedule of orders does this; the plan says so if one
    did)."""
    from pydpm.samplers.dpm_solver import multistep_update
    from pydpm.samplers.time_shift import plan

    ns, _, _, model, _ = mixture
    ts = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)

    def update(x, ms, ps, t, order):
        return multistep_update(x, ms, ps, t, order, "data", "dpmsolver")

    shift = TimeShift(window=3, cutoff=0.0)
    assert len(plan(model, ns, ts, shift, torch.device("cpu"), [1, 2, 3, 3], "data", update).steps) == 4
    with pytest.raises(ValueError, match="orders may rise by at most one per step"):
        plan(model, ns, ts, shift, torch.device("cpu"), [1, 1, 3, 3], "data", update)
