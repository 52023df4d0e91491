"""Robustness of the samplers, schedules and diffusers drop-in schedulers: nothing silently wrong, nothing hangs.

* method='adaptive' refuses tolerances it could never meet, stops on a non-finite error estimate and after
  max_steps tries (each of these spun forever before);
* a solver object refuses a second concurrent sample() (shared buffers returned garbage); a drop-in scheduler
  refuses a step from another thread or an interleaved second loop;
* invalid schedules and arguments raise at once, naming the argument (a table of bad inputs, one line each);
* awkward layouts of x (views, channels-last, 3-D / 5-D) sample exactly as x.contiguous() under every backend;
* DDIMScheduler's clip_sample keeps one NaN element one NaN element, as diffusers does.

Calls that used to hang run under `finishes_within`, so a regression fails instead of hanging the suite.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

import pydpm
from pydpm.ops import use_backend
from pydpm.samplers import DDIM, DDPM, METHODS, PNDM, DPMSolver, SDEDPMSolverPP, UniPC
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP, model_wrapper, time_steps
from _support import TRITON_ON_CPU

diffusers = pytest.importorskip("diffusers")
pd = pytest.importorskip("pydpm.integrations.diffusers")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

NAN = float("nan")


def schedule(dtype=torch.float32):
    return NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dtype=dtype)


def net(x, t):
    """A smooth nonlinear model that mixes elements along the last dimension (so a layout slip shows)."""
    w = torch.linspace(-0.4, 0.6, x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.tanh(0.7 * x + (x * w).sum(-1, keepdim=True) / x.shape[-1]) * (
        1 + t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) / 1000)


NS = schedule()
MF = model_wrapper(net, NS)


def start(shape=(2, 3, 4, 5), seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def finishes_within(fn, seconds=60.0):
    """fn() run in a daemon thread: its result, or its exception re-raised; AssertionError if it is still running
    after `seconds` (a hang fails the test instead of the suite)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------------------------------
# 1. Adaptive DPM-Solver never spins
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(atol=0, rtol=0), "atol=0 and rtol=0"),
    (dict(atol=0.0, rtol=0.0), "atol=0 and rtol=0"),
    (dict(atol=NAN), "atol=nan"),
    (dict(rtol=NAN), "rtol=nan"),
    (dict(atol=-1.0), "atol=-1.0"),
    (dict(rtol=-0.05), "rtol=-0.05"),
    (dict(atol=math.inf), "atol=inf"),
])
def test_adaptive_refuses_tolerances_it_cannot_meet(kw, match):
    solver = DPMSolver(MF, NS)
    with pytest.raises(ValueError, match=match):
        finishes_within(lambda: solver.sample(start(), method="adaptive", order=2, **kw), 30)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("bad", ["nan", "inf", "late_nan"])
def test_adaptive_stops_on_a_non_finite_model(order, bad):
    """A model that returns NaN / inf gave a NaN error estimate, which no step accepts and no step size follows:
    the loop spun forever. It now raises at once, naming the step and the times."""
    calls = []

    def broken(x, t):
        calls.append(1)
        if bad == "late_nan" and len(calls) < 6:
            return torch.tanh(x)
        return torch.full_like(x, math.inf if bad == "inf" else NAN)

    solver = DPMSolver(model_wrapper(broken, NS), NS)
    with pytest.raises(FloatingPointError, match=r"at step \d+ .*from t = [0-9.]+ to t = [0-9.]+"):
        finishes_within(lambda: solver.sample(start(), method="adaptive", order=order), 30)


def test_adaptive_nan_in_the_start_sample_is_named():
    x = start()
    x[0, 0, 0, 0] = NAN
    with pytest.raises(FloatingPointError, match="non-finite"):
        finishes_within(lambda: DPMSolver(MF, NS).sample(x, method="adaptive", order=2), 30)


def test_adaptive_stops_after_max_steps():
    assert inspect.signature(DPMSolver.sample).parameters["max_steps"].default >= 1000
    solver = DPMSolver(MF, NS)
    with pytest.raises(RuntimeError, match=r"max_steps=5 .*reached t = "):
        finishes_within(lambda: solver.sample(start(), method="adaptive", order=2, atol=1e-9, rtol=1e-9,
                                              max_steps=5), 30)
    for bad, exc in ((0, ValueError), (2.5, TypeError), (None, TypeError)):
        with pytest.raises(exc, match="max_steps"):
            solver.sample(start(), method="adaptive", max_steps=bad)


def test_adaptive_with_one_tolerance_zero_still_samples():
    ref = DPMSolver(MF, NS).sample(start(dtype=torch.float64), steps=200, order=3)
    for kw in (dict(atol=0.0, rtol=0.01), dict(atol=0.01, rtol=0.0)):
        y = finishes_within(lambda: DPMSolver(MF, NS).sample(start(dtype=torch.float64), method="adaptive",
                                                             order=2, **kw), 60)
        assert torch.isfinite(y).all()
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()


# --------------------------------------------------------------------------------------------------
# 2. One solver object, several threads
# --------------------------------------------------------------------------------------------------

SOLVERS = {
    "DPMSolver": lambda mf: DPMSolver(mf, NS),
    "UniPC": lambda mf: UniPC(mf, NS),
    "DDIM": lambda mf: DDIM(mf, NS, eta=0.5),
    "DDPM": lambda mf: DDPM(mf, NS),
    "PNDM": lambda mf: PNDM(mf, NS),
    "SDEDPMSolverPP": lambda mf: SDEDPMSolverPP(mf, NS),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_second_concurrent_sample_is_refused(name):
    """Thread A is inside sample() (its model blocks); a second sample() on the same object from another thread
    raises at once, and A's result is the one a lone run gives."""
    entered, release = threading.Event(), threading.Event()
    owner = {}

    def blocking(x, t):
        if threading.current_thread() is owner.get("thread"):
            entered.set()
            release.wait(30)
        return net(x, t)

    solver = SOLVERS[name](model_wrapper(blocking, NS))
    x = start()
    expected = SOLVERS[name](MF).sample(x, steps=6)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("y", solver.sample(x, steps=6)))
    owner["thread"] = th
    th.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match=f"this {name} is already sampling in another thread; use one "
                                               f"solver object per thread"):
            finishes_within(lambda: solver.sample(x, steps=6), 30)
    finally:
        release.set()
        th.join(30)
    torch.testing.assert_close(result["y"], expected, rtol=0, atol=0)
    torch.testing.assert_close(solver.sample(x, steps=6), expected, rtol=0, atol=0)  # the lock was released


def test_shared_solver_never_returns_garbage():
    """4 threads sharing one DPMSolver returned 24/24 wrong samples; each call now returns the right sample or
    raises the RuntimeError."""
    solver = DPMSolver(MF, NS)
    xs = [start(seed=i) for i in range(24)]
    expected = [DPMSolver(MF, NS).sample(x, steps=8) for x in xs]
    results: list = [None] * 24

    def work(k):
        for i in range(k, 24, 4):
            try:
                results[i] = solver.sample(xs[i], steps=8)
            except RuntimeError as err:
                assert "already sampling in another thread" in str(err)
                results[i] = "refused"

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    wrong = [i for i, (r, e) in enumerate(zip(results, expected)) if r != "refused" and not torch.equal(r, e)]
    assert not wrong, f"{len(wrong)}/24 wrong samples"


def test_one_solver_per_thread_is_correct():
    xs = [start(seed=i) for i in range(8)]
    expected = [DPMSolver(MF, NS).sample(x, steps=8) for x in xs]
    results: list = [None] * 8

    def work(k):
        solver = DPMSolver(MF, NS)
        for i in range(k, 8, 4):
            results[i] = solver.sample(xs[i], steps=8)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_nested_sample_on_the_same_solver_is_refused():
    holder = {}

    def nested(x, t):
        if "inner" not in holder:
            holder["inner"] = True
            holder["solver"].sample(x, steps=2)
        return net(x, t)

    solver = holder["solver"] = DPMSolver(model_wrapper(nested, NS), NS)
    with pytest.raises(RuntimeError, match="from inside its own run"):
        solver.sample(start(), steps=4)
    solver.sample(start(), steps=4)  # released after the error


def _drop_in(name):
    return getattr(pd, name)(solver_order=2) if name != "DDIMScheduler" else pd.DDIMScheduler()


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_drop_in_scheduler_refuses_a_step_from_another_thread(name):
    s = _drop_in(name)
    s.set_timesteps(6)
    x = start((2, 3, 4, 4))
    ts = s.timesteps
    th = threading.Thread(target=lambda: s.step(net(x, ts[:1].float()), ts[0], x))
    th.start()
    th.join(30)
    with pytest.raises(RuntimeError, match="started by another thread; one scheduler object serves one sampling "
                                           "loop at a time"):
        s.step(net(x, ts[1:2].float()), ts[1], x)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_drop_in_scheduler_refuses_interleaved_loops(name):
    """Two loops stepping one scheduler alternately: each moves step_index for the other, so both were silently
    wrong. The second loop's step passes timesteps[0] where the scheduler is at timesteps[1]."""
    s = _drop_in(name)
    s.set_timesteps(6)
    a, b = start((2, 3, 4, 4), seed=1), start((2, 3, 4, 4), seed=2)
    t0, t1 = s.timesteps[0], s.timesteps[1]
    a = s.step(net(a, t0.reshape(1).float()), t0, a).prev_sample
    with pytest.raises(RuntimeError, match=r"timestep=\d+, but this scheduler's loop is at step index 1"):
        s.step(net(b, t0.reshape(1).float()), t0, b)
    with pytest.raises(RuntimeError, match="step index 1"):
        s.step(net(b, t0.reshape(1).float()), int(t0), b)
    s.step(net(a, t1.reshape(1).float()), t1, a)  # the first loop goes on


# --------------------------------------------------------------------------------------------------
# 3./4. Bad inputs: one line each. (callable, expected exception, substring naming the argument)
# --------------------------------------------------------------------------------------------------

def _ddim_step(timestep, **kw):
    s = pd.DDIMScheduler()
    s.set_timesteps(10)
    x = start((2, 3, 4, 4))
    return s.step(x, timestep, x, **kw)


def _fused_step(name, **step):
    s = getattr(pd, name)()
    s.set_timesteps(5)
    x = start((2, 3, 4, 4))
    args = dict(model_output=x, timestep=s.timesteps[0], sample=x)
    args.update(step)
    return s.step(**args)


def _x():
    return start()


BAD_INPUTS = [
    # samplers: steps / order
    ("dpm steps=None", lambda: DPMSolver(MF, NS).sample(_x(), steps=None), TypeError, "steps=None"),
    ("dpm steps=2.0", lambda: DPMSolver(MF, NS).sample(_x(), steps=2.0), TypeError, "steps=2.0"),
    ("dpm steps=0", lambda: DPMSolver(MF, NS).sample(_x(), steps=0), ValueError, "steps=0"),
    ("dpm steps='5'", lambda: DPMSolver(MF, NS).sample(_x(), steps="5"), TypeError, "steps='5'"),
    ("dpm order=2.0", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, order=2.0), TypeError, "order=2.0"),
    ("dpm order=0", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, order=0), ValueError, "order=0"),
    ("dpm order=None", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, order=None), TypeError, "order=None"),
    ("dpm singlestep_fixed order=2.0",
     lambda: DPMSolver(MF, NS).sample(_x(), steps=4, order=2.0, method="singlestep_fixed"), TypeError, "order=2.0"),
    ("unipc steps=None", lambda: UniPC(MF, NS).sample(_x(), steps=None), TypeError, "steps=None"),
    ("unipc order=2.0", lambda: UniPC(MF, NS).sample(_x(), steps=5, order=2.0), TypeError, "order=2.0"),
    ("unipc order=0", lambda: UniPC(MF, NS).sample(_x(), steps=5, order=0), ValueError, "order=0"),
    ("ddim steps=None", lambda: DDIM(MF, NS).sample(_x(), steps=None), TypeError, "steps=None"),
    ("ddim steps=-1", lambda: DDIM(MF, NS).sample(_x(), steps=-1), ValueError, "steps=-1"),
    ("ddim eta=nan", lambda: DDIM(MF, NS, eta=NAN), ValueError, "eta=nan"),
    ("ddpm seed=None", lambda: DDPM(MF, NS).sample(_x(), steps=3, seed=None), TypeError, "seed=None"),
    ("ddpm seed=-1", lambda: DDPM(MF, NS).sample(_x(), steps=3, seed=-1), ValueError, "seed=-1"),
    ("pndm steps=2.0", lambda: PNDM(MF, NS).sample(_x(), steps=2.0), TypeError, "steps=2.0"),
    ("sde order=2.0", lambda: SDEDPMSolverPP(MF, NS).sample(_x(), steps=5, order=2.0), TypeError, "order=2.0"),
    ("sde order=3", lambda: SDEDPMSolverPP(MF, NS).sample(_x(), steps=5, order=3), ValueError, "order=3"),
    ("sample steps=None", lambda: pydpm.sample(MF, _x(), NS, steps=None), TypeError, "steps=None"),
    ("sample method", lambda: pydpm.sample(MF, _x(), NS, method="euler"), ValueError, "method='euler'"),
    ("dpm t_start=nan", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, t_start=NAN), ValueError, "t_start=nan"),
    ("dpm t_end=nan", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, t_end=NAN), ValueError, "t_end=nan"),
    ("dpm t_end before a discrete schedule", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, t_end=1e-9), ValueError,
     "times >= 1/N"),
    ("dpm t_start='1'", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, t_start="1"), TypeError, "t_start='1'"),
    ("dpm times nan", lambda: DPMSolver(MF, NS).sample(_x(), times=[1.0, NAN]), ValueError, "times"),
    ("dpm skip_type", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, skip_type="linear"), ValueError,
     "skip_type='linear'"),
    ("dpm third_order", lambda: DPMSolver(MF, NS).sample(_x(), steps=5, order=3, third_order="exact"), ValueError,
     "third_order='exact'"),
    ("empty batch", lambda: DPMSolver(MF, NS).sample(torch.randn(0, 3, 4, 4), steps=5), ValueError, "x has shape"),
    ("integer x", lambda: DPMSolver(MF, NS).sample(torch.ones(2, 3, dtype=torch.int64), steps=5), ValueError,
     "x has dtype"),
    ("adaptive atol=nan", lambda: DPMSolver(MF, NS).sample(_x(), method="adaptive", atol=NAN), ValueError, "atol"),
    ("adaptive atol=rtol=0", lambda: DPMSolver(MF, NS).sample(_x(), method="adaptive", atol=0, rtol=0), ValueError,
     "atol=0 and rtol=0"),
    ("adaptive rtol='x'", lambda: DPMSolver(MF, NS).sample(_x(), method="adaptive", rtol="x"), TypeError,
     "rtol='x'"),
    ("adaptive max_steps=0", lambda: DPMSolver(MF, NS).sample(_x(), method="adaptive", max_steps=0), ValueError,
     "max_steps=0"),
    # schedules
    ("linear beta_0=nan", lambda: NoiseScheduleVP("linear", continuous_beta_0=NAN), ValueError,
     "continuous_beta_0=nan"),
    ("linear beta_0<0", lambda: NoiseScheduleVP("linear", continuous_beta_0=-0.1), ValueError,
     "continuous_beta_0=-0.1"),
    ("linear beta_1=0", lambda: NoiseScheduleVP("linear", continuous_beta_0=0.0, continuous_beta_1=0.0), ValueError,
     "continuous_beta_1=0.0"),
    ("linear beta_1=inf", lambda: NoiseScheduleVP("linear", continuous_beta_1=math.inf), ValueError,
     "continuous_beta_1=inf"),
    ("betas >= 1", lambda: NoiseScheduleVP("discrete", betas=torch.tensor([0.1, 0.5, 1.0])), ValueError,
     "betas[2] = 1.0"),
    ("betas empty", lambda: NoiseScheduleVP("discrete", betas=torch.tensor([])), ValueError, "betas has shape (0,)"),
    ("betas zero", lambda: NoiseScheduleVP("discrete", betas=torch.tensor([0.0, 0.1])), ValueError, "betas[0]"),
    ("betas negative", lambda: NoiseScheduleVP("discrete", betas=[0.1, -0.2]), ValueError, "betas[1]"),
    ("betas nan", lambda: NoiseScheduleVP("discrete", betas=[0.1, NAN]), ValueError, "betas[1] = nan"),
    ("betas integer", lambda: NoiseScheduleVP("discrete", betas=torch.tensor([0, 1])), TypeError,
     "betas has dtype torch.int64"),
    ("alphas_cumprod rising", lambda: NoiseScheduleVP("discrete", alphas_cumprod=[0.9, 0.95, 0.5]), ValueError,
     "alphas_cumprod must be strictly decreasing"),
    ("alphas_cumprod flat", lambda: NoiseScheduleVP("discrete", alphas_cumprod=[0.9, 0.9, 0.5]), ValueError,
     "alphas_cumprod must be strictly decreasing"),
    ("alphas_cumprod zero", lambda: NoiseScheduleVP("discrete", alphas_cumprod=[0.9, 0.5, 0.0]), ValueError,
     "alphas_cumprod[2] = 0.0"),
    ("alphas_cumprod integer", lambda: NoiseScheduleVP("discrete", alphas_cumprod=torch.ones(4, dtype=torch.int32)),
     TypeError, "alphas_cumprod has dtype torch.int32"),
    ("vp dtype int", lambda: NoiseScheduleVP("linear", dtype=torch.int64), TypeError, "dtype=torch.int64"),
    ("flow dtype int", lambda: NoiseScheduleFlow(dtype=torch.int32), TypeError, "dtype=torch.int32"),
    ("time_steps t_T=nan", lambda: time_steps(NS, "logSNR", NAN, 1e-3, 10), ValueError, "t_T=nan"),
    ("time_steps logSNR t_0=0", lambda: time_steps(NS, "logSNR", 1.0, 0.0, 10), ValueError, "t_0=0.0"),
    ("time_steps karras t_0<0", lambda: time_steps(NS, "karras", 1.0, -0.1, 10), ValueError, "t_0=-0.1"),
    ("time_steps quadratic t_0<0", lambda: time_steps(NS, "time_quadratic", 1.0, -0.1, 10), ValueError, "t_0=-0.1"),
    ("time_steps logSNR flow t_T=1", lambda: time_steps(NoiseScheduleFlow(), "logSNR", 1.0, 1e-3, 10), ValueError,
     "t_T=1.0"),
    ("time_steps N=10.0", lambda: time_steps(NS, "time_uniform", 1.0, 1e-3, 10.0), TypeError, "N=10.0"),
    ("time_steps N=0", lambda: time_steps(NS, "time_uniform", 1.0, 1e-3, 0), ValueError, "N=0"),
    ("model_wrapper(None)", lambda: model_wrapper(None, NS), TypeError, "model=None"),
    ("model_wrapper schedule", lambda: model_wrapper(net, object()), TypeError, "noise_schedule"),
    ("model_wrapper guidance_scale", lambda: model_wrapper(net, NS, guidance_scale="7"), TypeError, "guidance_scale"),
    # diffusers drop-in schedulers
    ("DDIM tensor timestep 5000", lambda: _ddim_step(torch.tensor(5000)), ValueError, "timestep=5000"),
    ("DDIM tensor timestep -1", lambda: _ddim_step(torch.tensor(-1)), ValueError, "timestep=-1"),
    ("DDIM int timestep 1000", lambda: _ddim_step(1000), ValueError, "timestep=1000"),
    ("DDIM timestep None", lambda: _ddim_step(None), TypeError, "timestep=None"),
    ("DDIM timestep shape", lambda: _ddim_step(torch.tensor([1, 2])), ValueError, "timestep"),
    ("DDIM eta=nan", lambda: _ddim_step(1, eta=NAN), ValueError, "eta=nan"),
    ("DPM solver_order=0", lambda: pd.DPMSolverMultistepScheduler(solver_order=0), ValueError, "solver_order=0"),
    ("UniPC solver_order=0", lambda: pd.UniPCMultistepScheduler(solver_order=0), ValueError, "solver_order=0"),
    ("DPM prediction_type", lambda: pd.DPMSolverMultistepScheduler(prediction_type="eps"), ValueError,
     "prediction_type='eps'"),
    ("DPM step sample=None", lambda: _fused_step("DPMSolverMultistepScheduler", sample=None), TypeError, "sample"),
    ("UniPC step model_output list", lambda: _fused_step("UniPCMultistepScheduler", model_output=[1.0]), TypeError,
     "model_output"),
]


@pytest.mark.parametrize("call,exc,names", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_named_error(call, exc, names):
    with pytest.raises(exc) as info:
        finishes_within(call, 60)
    assert names in str(info.value), f"{type(info.value).__name__}: {info.value}"


def named_errors() -> tuple[int, list[str]]:
    """How many BAD_INPUTS raise the expected exception naming the argument (and the ids of the others)."""
    failing = []
    for name, call, exc, names in BAD_INPUTS:
        try:
            finishes_within(call, 60)
            failing.append(f"{name}: accepted")
        except exc as err:
            if names not in str(err):
                failing.append(f"{name}: {type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a generic error counts as unnamed
            failing.append(f"{name}: {type(err).__name__}: {err}")
    return len(BAD_INPUTS) - len(failing), failing


def test_bad_input_table_counts():
    assert len(BAD_INPUTS) >= 30
    named, failing = named_errors()
    print(f"\n{named}/{len(BAD_INPUTS)} bad inputs raise an error naming the argument")
    assert not failing, failing


def test_constant_beta_linear_schedule_inverts():
    """β₀ = β₁ divided 0 by 0 in inverse_lambda (NaN times)."""
    ns = NoiseScheduleVP("linear", continuous_beta_0=5.0, continuous_beta_1=5.0, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.3, 0.7, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ns.inverse_lambda(ns.marginal_lambda(t)), t)
    ts = time_steps(ns, "logSNR", 1.0, 1e-3, 8)
    assert torch.isfinite(ts).all() and bool((ts.diff() < 0).all())


def test_ddim_own_timesteps_skip_the_host_check(monkeypatch):
    """A timestep taken from scheduler.timesteps is gathered on the device without a host read (no sync per step);
    a foreign tensor is checked on the host."""
    s = pd.DDIMScheduler()
    s.set_timesteps(10)
    x = start((2, 3, 4, 4))
    reads = []
    real = pd.DDIMScheduler._host_row
    monkeypatch.setattr(pd.DDIMScheduler, "_host_row", lambda self, *a: (reads.append(1), real(self, *a))[1])
    for t in s.timesteps:
        s.step(net(x, t.reshape(1).float()), t, x)
    assert not reads
    s.step(x, s.timesteps[0].clone(), x)
    assert reads == [1]
    s.timesteps.add_(0)  # modified in place: no longer trusted
    s.step(x, s.timesteps[0], x)
    assert reads == [1, 1]


# --------------------------------------------------------------------------------------------------
# 5. Awkward layouts of x
# --------------------------------------------------------------------------------------------------

LAYOUTS = {
    "transposed": lambda: torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(3)).transpose(2, 3),
    "channels_last": lambda: start((2, 3, 4, 5)).contiguous(memory_format=torch.channels_last),
    "3d": lambda: start((2, 5, 7)),
    "5d": lambda: start((2, 3, 2, 4, 5)),
    "sliced": lambda: start((4, 3, 8, 8))[::2, :, 1:7, ::2],
    "expanded": lambda: start((1, 3, 4, 5)).expand(2, 3, 4, 5),
}


@pytest.mark.parametrize("backend", [None, "reference", TRITON_ON_CPU])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", METHODS)
def test_awkward_layouts_sample_as_contiguous(method, layout, backend):
    """Every method of pydpm.sample on a view / channels-last / 3-D / 5-D x equals the same x made contiguous
    (stochastic methods drew their noise in x's memory order: channels-last gave another sample)."""
    x = LAYOUTS[layout]()
    order = 1 if method == "sde-dpmsolver++" else 2
    with use_backend(backend) if backend else contextlib.nullcontext():
        y = pydpm.sample(MF, x, NS, method=method, steps=4, order=order, seed=7, eta=0.5)
        ref = pydpm.sample(MF, x.contiguous(), NS, method=method, steps=4, order=order, seed=7, eta=0.5)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_is_named(method):
    with pytest.raises(ValueError, match=r"x has shape \(0, 3, 4, 4\); it needs a non-empty leading batch"):
        pydpm.sample(MF, torch.randn(0, 3, 4, 4), NS, method=method, steps=4)


# --------------------------------------------------------------------------------------------------
# 6. DDIMScheduler with clip_sample: one NaN element stays one NaN element, as in diffusers
# --------------------------------------------------------------------------------------------------

def ddim_pair(**config):
    """pydpm's and diffusers' DDIMScheduler with `config` at 10 steps, a sample x, a model output m (3σ) and
    a generator for more draws."""
    ours, theirs = pd.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    return ours, theirs, torch.randn(2, 3, 8, 8, generator=g), 3 * torch.randn(2, 3, 8, 8, generator=g), g


@pytest.mark.parametrize("backend", [None, "reference", TRITON_ON_CPU])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.0, True), (0.6, False)])
@pytest.mark.parametrize("int_timestep", [False, True])
def test_ddim_clip_sample_keeps_a_nan_element_local(backend, prediction_type, eta, use_clipped, int_timestep):
    ours, theirs, x, m, g = ddim_pair(clip_sample=True, clip_sample_range=1.5, prediction_type=prediction_type)
    m[0, 1, 2, 3] = NAN
    noise = torch.randn(2, 3, 8, 8, generator=g) if eta else None
    t = theirs.timesteps[3]
    step = dict(eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise)
    expected = theirs.step(m, t, x, **step)
    with use_backend(backend) if backend else contextlib.nullcontext():
        got = ours.step(m, int(t) if int_timestep else t, x, **step)
    for a, b in ((got.prev_sample, expected.prev_sample), (got.pred_original_sample, expected.pred_original_sample)):
        assert int(b.isnan().sum()) == 1
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "reference", TRITON_ON_CPU])
def test_ddim_thresholding_pinned_to_one_keeps_a_nan_element_local(backend):
    """thresholding=True with sample_max_value=1 pins the dynamic scale to 1: the other elements of the sample
    are clamped to [-1, 1] as diffusers clamps them when the sample is finite; diffusers' quantile turns the
    sample holding a NaN into NaN (a documented difference), pydpm keeps the one NaN element."""
    ours, theirs, x, m, _ = ddim_pair(thresholding=True, sample_max_value=1.0, prediction_type="sample")
    t = theirs.timesteps[3]
    with use_backend(backend) if backend else contextlib.nullcontext():
        finite = ours.step(m, t, x).pred_original_sample
        torch.testing.assert_close(finite, theirs.step(m, t, x).pred_original_sample, rtol=1e-6, atol=1e-6)
        m[0, 1, 2, 3] = NAN
        got = ours.step(m, t, x).pred_original_sample
    assert theirs.step(m, t, x).pred_original_sample[0].isnan().all()
    assert int(got.isnan().sum()) == 1 and bool(got[0, 1, 2, 3].isnan())
    keep = ~got.isnan()
    torch.testing.assert_close(got[keep], finite[keep], rtol=0, atol=0)

# --------------------------------------------------------------------------------------------------
# Copies: a deep-copied solver or drop-in scheduler (mid-run) computes on its own buffers
# --------------------------------------------------------------------------------------------------

def test_a_deep_copied_solver_samples_correctly():
    """The copy's planned launches kept the original's buffer pointers: a used solver's deepcopy returned
    garbage (3e31)."""
    solver = DPMSolver(MF, NS)
    y = solver.sample(start(), steps=5)
    twin = copy.deepcopy(solver)
    del solver
    torch.testing.assert_close(twin.sample(start(), steps=5), y, rtol=0, atol=0)
    twin.sample(start(), steps=5)


_MID_RUN_COPY = """
import copy, sys, torch
sys.path.insert(0, {tests!r})
from test_robust_samplers import _drop_in, net, start
for name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
    s = _drop_in(name)
    s.set_timesteps(8)
    x = start((2, 3, 4, 4))
    ts = s.timesteps
    for t in ts[:3]:
        x = s.step(net(x, t.reshape(1).float()), t, x).prev_sample
    twin, y = copy.deepcopy(s), x.clone()
    for t in ts[3:]:
        x = s.step(net(x, t.reshape(1).float()), t, x).prev_sample
    del s
    for t in ts[3:]:
        y = twin.step(net(y, t.reshape(1).float()), t, y).prev_sample
    torch.testing.assert_close(y, x, rtol=0, atol=0)
"""


def test_a_drop_in_scheduler_deep_copied_mid_run_continues():
    """Deep-copying a scheduler mid-run and stepping the copy crashed the process (segmentation fault): run in a
    subprocess so that a regression fails this test, not the suite."""
    tests = str(pathlib.Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", _MID_RUN_COPY.format(tests=tests)], capture_output=True, text=True,
                          timeout=300, cwd=str(pathlib.Path(tests).parent))
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
