"""The sampler engine: traced fused plans against the same programs run eagerly on tensors, plan shape
(one launch per model call, bounded history), argument errors, dtypes and layouts, CUDA graphs.

The published-algorithm oracle and convergence orders live in test_samplers_oracle.py and
test_samplers_convergence.py; diffusers parity in test_diffusers_schedulers.py.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import pydpm
from pydpm.samplers import DDIM, DPMSolver, PNDM, SDEDPMSolverPP, UniPC
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP, model_wrapper

HAS_CUDA = torch.cuda.is_available()
SHAPE = (3, 2, 4, 5)


def schedule(dtype=torch.float64):
    return NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dtype=dtype)


def raw_model(seed=0):
    """A smooth nonlinear model of (x, t): never linear, so a wrong coefficient cannot cancel."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.3

    def model(x, t, cond=None):
        out = torch.tanh(x @ w.to(x)) * (1 + t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) / 1000)
        return out if cond is None else out + cond.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return model


def start(dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def traced_and_eager(make, **kw):
    x = start()
    traced = make().sample(x, **kw)
    eager_solver = make()
    eager_solver.eager = True
    return traced, eager_solver.sample(x, **kw)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


DPM_CASES = list(itertools.product(["dpmsolver++", "dpmsolver"], ["multistep", "singlestep", "singlestep_fixed"],
                                   [1, 2, 3], ["dpmsolver", "taylor"]))


@pytest.mark.parametrize("model_type", ["noise", "x_start", "v", "score"])
@pytest.mark.parametrize("alg,method,order,solver_type", DPM_CASES)
def test_dpm_solver_plan_equals_eager(model_type, alg, method, order, solver_type):
    ns = schedule()
    mf = model_wrapper(raw_model(), ns, model_type=model_type)
    a, b = traced_and_eager(lambda: DPMSolver(mf, ns, algorithm_type=alg), steps=7, order=order, method=method,
                            solver_type=solver_type, skip_type="logSNR" if order == 2 else "time_uniform")
    assert rel(a, b) < 1e-10


@pytest.mark.parametrize("model_type", ["noise", "v"])
@pytest.mark.parametrize("alg,variant,order,lower_order_final",
                         list(itertools.product(["data_prediction", "noise_prediction"], ["bh1", "bh2", "vary_coeff"],
                                                [1, 2, 3, 4], [True, False])))
def test_unipc_plan_equals_eager(model_type, alg, variant, order, lower_order_final):
    ns = schedule()
    mf = model_wrapper(raw_model(), ns, model_type=model_type)
    a, b = traced_and_eager(lambda: UniPC(mf, ns, algorithm_type=alg, variant=variant), steps=8, order=order,
                            lower_order_final=lower_order_final)
    assert rel(a, b) < 1e-10


@pytest.mark.parametrize("make,kw", [
    (lambda mf, ns: DDIM(mf, ns, eta=0.0), {}),
    (lambda mf, ns: DDIM(mf, ns, eta=0.7), dict(seed=5)),
    (lambda mf, ns: PNDM(mf, ns, variant="plms"), {}),
    (lambda mf, ns: PNDM(mf, ns, variant="s-pndm"), {}),
    (lambda mf, ns: PNDM(mf, ns, variant="f-pndm"), {}),
    (lambda mf, ns: SDEDPMSolverPP(mf, ns), dict(order=1, seed=2)),
    (lambda mf, ns: SDEDPMSolverPP(mf, ns), dict(order=2, seed=2)),
], ids=["ddim", "ddim-eta", "plms", "s-pndm", "f-pndm", "sde-1", "sde-2m"])
def test_other_plans_equal_eager(make, kw):
    ns = schedule()
    mf = model_wrapper(raw_model(), ns, model_type="x_start")
    a, b = traced_and_eager(lambda: make(mf, ns), steps=9, **kw)
    assert rel(a, b) < 1e-10


def test_stochastic_methods_depend_on_seed():
    ns = schedule()
    mf = model_wrapper(raw_model(), ns)
    x = start()
    a = SDEDPMSolverPP(mf, ns).sample(x, steps=6, seed=1)
    assert torch.equal(a, SDEDPMSolverPP(mf, ns).sample(x, steps=6, seed=1))
    assert rel(a, SDEDPMSolverPP(mf, ns).sample(x, steps=6, seed=2)) > 1e-3


@pytest.mark.parametrize("kw", [dict(correcting_x0_fn="dynamic_thresholding", thresholding_max_val=0.5,
                                     dynamic_thresholding_ratio=0.9),
                                dict(correcting_x0_fn=lambda x0, t: x0.clamp(-0.5, 0.5)),
                                dict(correcting_xt_fn=lambda x, t, step: 0.9 * x + 0.01 * step)],
                         ids=["dynamic-thresholding", "x0-fn", "xt-fn"])
@pytest.mark.parametrize("cls", [DPMSolver, UniPC])
def test_corrections_plan_equals_eager(cls, kw):
    ns = schedule()
    mf = model_wrapper(raw_model(), ns)
    (a, ia), (b, ib) = traced_and_eager(lambda: cls(mf, ns, **kw), steps=8, order=3, denoise_to_zero=True,
                                        return_intermediate=True)
    assert len(ia) == len(ib) == 10
    for u, v in zip([a, *ia], [b, *ib]):
        assert rel(u, v) < 1e-10


@pytest.mark.parametrize("cls,order,max_models", [(DPMSolver, 2, 1), (DPMSolver, 3, 2), (UniPC, 2, 2), (UniPC, 3, 3)])
def test_one_fused_launch_per_model_call(cls, order, max_models):
    """Every model call is followed by exactly one launch reading at most `order` stored predictions:
    UniPC's corrector and the next predictor share it."""
    ns = schedule()
    solver = cls(model_wrapper(raw_model(), ns), ns)
    solver.sample(start(), steps=25, order=order)
    plan = next(iter(solver._runners.values())).plan
    launches = plan.launches
    assert plan.n_calls == 25 and len(launches) == 25
    assert all(l.call is not None for l in launches)
    assert max(len(l.models) for l in launches) == max_models
    assert plan.n_storage <= order + 2


def test_classifier_free_guidance_reaches_the_step_as_a_pair():
    ns = schedule()
    model = raw_model()
    cond, uncond = torch.full((3,), 0.3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    mf = model_wrapper(model, ns, guidance_type="classifier-free", condition=cond, unconditional_condition=uncond,
                       guidance_scale=4.0)
    assert mf.pair
    calls = []
    fused = DPMSolver(mf, ns)
    fused.sample(start(), steps=6)
    y = fused.sample(start(), steps=6)
    # The same sampler on the combined noise prediction (a plain callable: guidance applied eagerly).
    y_ref = DPMSolver(lambda x, t: (calls.append(1), mf(x, t))[1], ns).sample(start(), steps=6)
    assert calls and rel(y, y_ref) < 1e-10


def test_classifier_guidance_runs_unfused():
    ns = schedule()

    def classifier(x, t, cond):
        return -(x - cond.reshape(-1, 1, 1, 1)).square().sum(dim=(1, 2, 3))
    mf = model_wrapper(raw_model(), ns, guidance_type="classifier", classifier_fn=classifier,
                       condition=torch.ones(3, dtype=torch.float64), guidance_scale=2.0)
    a, b = traced_and_eager(lambda: DPMSolver(mf, ns), steps=5)
    assert torch.isfinite(a).all() and rel(a, b) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("cls", [DPMSolver, UniPC])
def test_low_precision_tracks_float64(cls, dtype, tol):
    ns = schedule(torch.float32)
    mf = model_wrapper(raw_model(), ns, model_type="noise")
    ref = cls(mf, ns).sample(start(), steps=10, order=2)
    y = cls(mf, ns).sample(start(dtype), steps=10, order=2)
    assert y.dtype == dtype
    assert rel(y.double(), ref) < tol


def test_layouts_and_input_untouched():
    ns = schedule()
    mf = model_wrapper(raw_model(), ns)
    x = start()
    ref = UniPC(mf, ns).sample(x.clone(), steps=6)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last)
    x_nc = torch.empty(3, 2, 4, 10, dtype=torch.float64)[..., ::2].copy_(x)
    for inp in (x_cl, x_nc):
        before = inp.clone()
        assert rel(UniPC(mf, ns).sample(inp, steps=6), ref) < 1e-12
        assert torch.equal(inp, before)


def test_flow_schedule_data_prediction_starts_at_t1():
    ns = NoiseScheduleFlow(dtype=torch.float64)
    model = model_wrapper(lambda x, t: 0.5 * x - 0.1, ns, model_type="flow")
    x = start()
    y = DPMSolver(model, ns).sample(x, steps=8, order=2)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="not finite|cannot be converted|non-finite"):
        DPMSolver(model, ns, algorithm_type="dpmsolver").sample(x, steps=8)


@pytest.mark.parametrize("method,order", [("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3),
                                          ("sde-dpmsolver++", 2), ("ddim", 1)])
def test_flow_sampling_to_sigma_zero_is_exact(method, order):
    """t_end=0 on a flow schedule (σ = 0): the last step is first order and lands exactly on the data
    prediction of the last model call, x₀ = x − σ·v, with no NaN (diffusers' UniPC bh1 gives NaN there)."""
    ns = NoiseScheduleFlow(dtype=torch.float64)
    calls = []

    def velocity(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.tanh(x) - 0.2 * t.reshape(-1, 1, 1, 1)
    mf = model_wrapper(velocity, ns, model_type="flow")
    solver = {"dpmsolver++": lambda: DPMSolver(mf, ns), "unipc": lambda: UniPC(mf, ns, variant="bh1"),
              "sde-dpmsolver++": lambda: SDEDPMSolverPP(mf, ns), "ddim": lambda: DDIM(mf, ns)}[method]()
    y = solver.sample(start(), steps=6, t_start=0.99, t_end=0.0, **({} if method == "ddim" else dict(order=order)))
    assert torch.isfinite(y).all()
    x_last, t_last = calls[-1]                          # the input of the last model call
    expect = x_last - t_last.reshape(-1, 1, 1, 1) * (torch.tanh(x_last) - 0.2 * t_last.reshape(-1, 1, 1, 1))
    assert rel(y, expect) < 1e-12


@pytest.mark.parametrize("kind", ["discrete", "linear"])
@pytest.mark.parametrize("method,order", [("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("ddim", 1)])
def test_vp_sampling_to_sigma_zero_is_exact(kind, method, order):
    """t_end=0 on a VP schedule is σ = 0 exactly (diffusers' final_sigmas_type='zero'), though a discrete
    schedule's table starts at 1/N: the last step is first order and lands on the data prediction of the
    last model call, x₀ = (x − σ·ε)/α."""
    ns = schedule() if kind == "discrete" else NoiseScheduleVP("linear", dtype=torch.float64)
    calls = []

    def noise(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.tanh(x) * 0.5
    mf = model_wrapper(noise, ns)
    solver = {"dpmsolver++": lambda: DPMSolver(mf, ns), "unipc": lambda: UniPC(mf, ns, variant="bh2"),
              "ddim": lambda: DDIM(mf, ns)}[method]()
    y = solver.sample(start(), steps=6, t_end=0.0, **({} if method == "ddim" else dict(order=order)))
    x_last, t_in = calls[-1]
    t = t_in / 1000 + 1 / ns.total_N if kind == "discrete" else t_in
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in (ns.marginal_alpha(t), ns.marginal_std(t)))
    assert rel(y, (x_last - sigma * torch.tanh(x_last) * 0.5) / alpha) < 1e-12


@pytest.mark.parametrize("cls,kw", [(DPMSolver, dict(order=3)), (DPMSolver, dict(order=2, solver_type="taylor")),
                                    (UniPC, dict(order=2))])
def test_explicit_times_are_the_grid(cls, kw):
    """times= runs the grid it is given: the logSNR grid passed explicitly gives what skip_type='logSNR' gives,
    an increasing grid inverts as `inverse` does, and another grid gives another result."""
    from pydpm.schedules import time_steps
    ns = schedule()
    solver = cls(model_wrapper(raw_model(), ns), ns)
    x = start()
    grid = time_steps(ns, "logSNR", 1.0, 1e-3, 7)
    expected = solver.sample(x, steps=7, skip_type="logSNR", **kw)
    assert torch.equal(solver.sample(x, times=grid, **kw), expected)
    assert torch.equal(solver.sample(x, times=grid.tolist(), **kw), expected)
    assert rel(solver.sample(x, times=time_steps(ns, "time_uniform", 1.0, 1e-3, 7), **kw), expected) > 1e-3
    if cls is DPMSolver:
        up = time_steps(ns, "time_uniform", 1e-3, 0.5, 6)
        assert torch.equal(solver.inverse(x, times=up, **kw), solver.inverse(x, steps=6, t_end=0.5, **kw))


@pytest.mark.parametrize("call,match", [
    (lambda s, x: s.sample(x, times=[1.0, 0.5, 0.7, 0.1]), "strictly decreasing"),
    (lambda s, x: s.sample(x, times=[1.0]), "at least two"),
    (lambda s, x: s.sample(x, times=[[1.0, 0.5]]), "at least two"),
    (lambda s, x: s.sample(x, times=[1.0, float("nan"), 0.1]), "finite"),
    (lambda s, x: s.sample(x, times="1.0, 0.5"), "times must be a 1-D sequence"),
    (lambda s, x: s.sample(x, times=[1.0, 0.5, -0.1]), "t_end=-0.1 must be >= 0"),
    (lambda s, x: s.sample(x, times=[1.5, 0.5, 0.1]), "beyond the schedule's end"),
    (lambda s, x: s.sample(x, times=[1.0, 0.5, 0.1], t_end=0.1), "leave t_start and t_end unset"),
    (lambda s, x: s.sample(x, times=[1.0, 0.5, 0.1], method="singlestep"), "method='singlestep' builds its own"),
    (lambda s, x: s.sample(x, times=[1.0, 0.1], order=2), "steps >= order"),
])
def test_explicit_times_errors(call, match):
    ns = schedule()
    with pytest.raises((ValueError, TypeError), match=match):
        call(DPMSolver(model_wrapper(raw_model(), ns), ns), start())


class _Net(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


def test_bare_module_under_a_discrete_schedule_warns_with_the_wrapper_call():
    """A torch module passed unwrapped with a discrete schedule would get t ∈ (0, 1] instead of the step
    label: a warning names model_wrapper. Wrapped, or on a continuous schedule, it is what the solver expects."""
    ns = schedule()
    for make in (lambda mf: pydpm.sample(mf, start(), ns, steps=2), lambda mf: DPMSolver(mf, ns),
                 lambda mf: UniPC(mf, ns), lambda mf: DDIM(mf, ns)):
        with pytest.warns(UserWarning, match=r"_Net \(torch.nn.Module\).*model_wrapper\(net, noise_schedule"):
            make(_Net())
    linear = NoiseScheduleVP("linear", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPMSolver(model_wrapper(_Net(), ns), ns)
        DPMSolver(_Net(), linear)


def test_sigma_zero_end_refused_where_it_cannot_be_exact():
    ns = NoiseScheduleFlow(dtype=torch.float64)
    mf = model_wrapper(lambda x, t: x, ns, model_type="flow")
    for call, match in [(lambda: DPMSolver(mf, ns).sample(start(), steps=4, t_start=0.9, t_end=0.0, method="singlestep"),
                         "t_end=0"),
                        (lambda: DPMSolver(mf, ns, algorithm_type="dpmsolver").sample(start(), steps=4, t_start=0.9,
                                                                                        t_end=0.0), "t_end=0"),
                        (lambda: UniPC(mf, ns).sample(start(), steps=4, t_start=0.9, t_end=0.0, skip_type="logSNR"),
                         "infinite at t_end=0"),
                        (lambda: DPMSolver(model_wrapper(lambda x, t: x, schedule()), schedule()).sample(
                            start(), steps=4, t_end=-0.5), "t_end=-0.5 must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("method", pydpm.samplers.METHODS)
def test_sample_front_end(method):
    ns = schedule()
    mf = model_wrapper(raw_model(), ns)
    y = pydpm.sample(mf, start(), ns, method=method, steps=6, eta=0.3)
    assert y.shape == SHAPE and torch.isfinite(y).all()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_inverse_round_trip(order):
    """DPM-Solver inversion (data -> noise) then sampling returns close to the start, closer with more steps."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    mf = model_wrapper(lambda x, t: 0.3 * torch.tanh(x), ns)
    x0 = start()
    errs = []
    for steps in (10, 40):
        solver = DPMSolver(mf, ns)
        back = solver.sample(solver.inverse(x0, steps=steps, order=order, t_end=0.5), steps=steps, order=order,
                             t_start=0.5)
        errs.append(rel(back, x0))
    assert errs[1] < errs[0] and errs[1] < 1e-2 / order


def test_progress(capsys):
    ns = schedule()
    DPMSolver(model_wrapper(raw_model(), ns), ns).sample(start(), steps=4, progress=True)
    assert "4" in capsys.readouterr().err


def test_adaptive_runs_and_is_more_accurate_with_tighter_tolerance():
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    mf = model_wrapper(raw_model(), ns)
    x = start()
    ref = DPMSolver(mf, ns).sample(x, steps=400, order=3, t_end=1e-3)
    loose = DPMSolver(mf, ns).sample(x, method="adaptive", order=3, t_end=1e-3, rtol=0.05)
    tight = DPMSolver(mf, ns).sample(x, method="adaptive", order=3, t_end=1e-3, rtol=0.005, atol=1e-4)
    assert rel(tight, ref) < rel(loose, ref) and rel(tight, ref) < 1e-3


# --------------------------------------------------------------------------------------------------
# Errors name the argument and the fix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda s, x: s.sample(x, steps=2, order=3), "steps >= order"),
    (lambda s, x: s.sample(x, steps=5, t_start=0.0), "t_start=0.0 must be > 0"),
    (lambda s, x: s.sample(x, steps=5, t_end=-1.0), "t_end=-1.0 must be >= 0"),
    (lambda s, x: s.sample(x, steps=5, t_start=0.2, t_end=0.2), "equals t_end"),
    (lambda s, x: s.sample(x, steps=5, t_start=0.1, t_end=0.5, method="adaptive"), "t_start > t_end"),
    (lambda s, x: s.sample(x, steps=5, t_start=1.5), "beyond the schedule's end"),
    (lambda s, x: s.sample(x, steps=5, method="rk45"), "method='rk45'"),
    (lambda s, x: s.sample(x, steps=5, skip_type="cosine"), "skip_type='cosine'"),
    (lambda s, x: s.sample(x, steps=5, solver_type="heun"), "solver_type='heun'"),
    (lambda s, x: s.sample(x, steps=0), "steps=0"),
    (lambda s, x: s.sample(x, steps=2.5), "steps=2.5"),
    (lambda s, x: s.sample(x, steps=5, order=4), "order=4"),
    (lambda s, x: s.sample(x.long(), steps=5), "dtype torch.int64"),
    (lambda s, x: s.sample([1.0], steps=5), "torch.Tensor"),
    (lambda s, x: s.sample(x, steps=5, method="adaptive", return_intermediate=True), "adaptive"),
])
def test_dpm_solver_errors(call, match):
    ns = schedule()
    with pytest.raises((ValueError, TypeError), match=match):
        call(DPMSolver(model_wrapper(raw_model(), ns), ns), start())


def test_model_output_mismatch_is_named():
    ns = schedule()
    solver = DPMSolver(model_wrapper(lambda x, t: x[:, :1], ns), ns)
    with pytest.raises(ValueError, match=r"the model returned shape \(3, 1, 4, 5\)"):
        solver.sample(start(), steps=3)


@pytest.mark.parametrize("make,match", [
    (lambda ns: UniPC(lambda x, t: x, ns, variant="bh3"), "variant='bh3'"),
    (lambda ns: DPMSolver(lambda x, t: x, ns, algorithm_type="ddim"), "algorithm_type='ddim'"),
    (lambda ns: DPMSolver(lambda x, t: x, ns, correcting_x0_fn="clip"), "correcting_x0_fn"),
    (lambda ns: DPMSolver(lambda x, t: x, object()), "noise_schedule lacks"),
    (lambda ns: DPMSolver(3, ns), "model_fn must be callable"),
    (lambda ns: DDIM(lambda x, t: x, ns, eta=-1), "eta=-1"),
    (lambda ns: PNDM(lambda x, t: x, ns, variant="pndm"), "variant='pndm'"),
    (lambda ns: model_wrapper(lambda x, t: x, ns, model_type="eps"), "model_type='eps'"),
    (lambda ns: model_wrapper(lambda x, t: x, ns, model_type="flow"), "NoiseScheduleFlow"),
    (lambda ns: model_wrapper(lambda x, t: x, ns, guidance_type="classifier"), "classifier_fn"),
    (lambda ns: NoiseScheduleVP("discrete"), "exactly one of betas or alphas_cumprod"),
    (lambda ns: NoiseScheduleVP("quadratic"), "schedule='quadratic'"),
    (lambda ns: UniPC(lambda x, t: x, ns).sample(start(), steps=5, method="singlestep"), "method='multistep' only"),
])
def test_construction_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(schedule())


# --------------------------------------------------------------------------------------------------
# GPU: no host synchronisation in the loop, CUDA graphs
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("cls", [DPMSolver, UniPC, SDEDPMSolverPP])
def test_no_host_sync_in_the_loop(cls):
    ns = schedule(torch.float32)
    mf = model_wrapper(lambda x, t: torch.tanh(x) * 0.5, ns)
    solver = cls(mf, ns)
    x = start(torch.float16, "cuda")
    solver.sample(x, steps=10)  # first call: plan, tables, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        solver.sample(x, steps=10)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("cls,kw", [(DPMSolver, dict(order=3)), (UniPC, dict(order=3)), (SDEDPMSolverPP, dict(seed=3))])
def test_cuda_graph_matches_eager(cls, kw):
    ns = schedule(torch.float32)
    mf = model_wrapper(lambda x, t: torch.tanh(x) * 0.5 + t.reshape(-1, 1, 1, 1) * 1e-4, ns)
    solver = cls(mf, ns)
    for seed in (1, 2):  # capture once, then replay on new inputs
        x = start(torch.float32, "cuda", seed=seed)
        eager = solver.sample(x, steps=12, **kw)
        graphed = solver.sample(x, steps=12, cuda_graph=True, **kw)
        assert rel(graphed, eager) < 1e-6


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_planned_launches_fall_back_for_other_layouts_and_backends(backend):
    """A sample the pre-checked launches cannot take (a transposed x) or a forced backend without a C
    launcher runs through the checked op, with the same result as a contiguous x on the automatic choice."""
    from pydpm.ops import use_backend

    ns = NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    fn = model_wrapper(lambda x, t: 0.1 * x + 0.01, ns, model_type="noise")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64).transpose(2, 3)
    expected = DPMSolver(fn, ns, algorithm_type="dpmsolver++").sample(x.contiguous(), steps=5)
    with use_backend(backend):
        got = DPMSolver(fn, ns, algorithm_type="dpmsolver++").sample(x, steps=5)
        got_unipc = UniPC(fn, ns).sample(x, steps=5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_unipc, UniPC(fn, ns).sample(x.contiguous(), steps=5), rtol=1e-12, atol=1e-12)
