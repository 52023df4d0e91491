"""What every solver class shares: argument checks, time grids, plan caching, traced and eager runs."""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from pydpm._cache import BoundedCache
from pydpm.ops import Threshold
from pydpm.samplers._program import EagerTracer, Options, Runner, Tracer, compile_plan
from pydpm.schedules import WrappedModel, is_diffusers_model, time_steps

# Compiled plans kept per solver object, one per sampling configuration (steps, order, method, grid, ...).
MAX_RUNNERS = 16


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; use one of {', '.join(map(repr, choices))}")


def check_int(name: str, value: Any, minimum: int = 1, what: str = "") -> int:
    """`value` as an int >= minimum: a TypeError for what is no integer (floats, None, bools), a ValueError
    below the minimum. Both name the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int{what}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}{what}")
    return int(value)


def check_order(value: Any, choices: Sequence[int]) -> int:
    """A solver order: an int (TypeError for 2.0 or None), one of `choices` (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"order={value!r} must be an int, one of {', '.join(map(str, choices))}; got "
                        f"{type(value).__name__}")
    check_choice("order", int(value), choices)
    return int(value)


def check_time(name: str, value: Any) -> float:
    """A time argument (t_start, t_end) as a finite float."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}={value!r} must be a number (a time in [0, T]), got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}={value!r} must be a number (a time in [0, T]), got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}={v} must be a finite time in [0, T]")
    return v


def check_sample_input(x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (the starting sample), got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}; sample in float32, float16 or bfloat16 (float64 on the CPU)")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; it needs a non-empty leading batch dimension (x[0] is the "
                         f"first sample): pass at least one sample")


def check_start(x: Any) -> None:
    """x as the start of a sampling run: a valid sample (check_sample_input) that does not require grad."""
    check_sample_input(x)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("x requires grad; sampling is not differentiable: run under torch.no_grad()")


def check_model_fn(name: str, model_fn: Any, noise_schedule: Any) -> None:
    """Refuse what cannot be a continuous-time model function: a diffusers model (it takes the training
    timestep and returns an output object); warn on a bare torch module under a discrete schedule (it would
    receive t ∈ (0, 1] instead of the step label it was trained on)."""
    if not callable(model_fn):
        raise TypeError(f"{name}: model_fn must be callable (see pydpm.schedules.model_wrapper)")
    if isinstance(model_fn, WrappedModel):
        return
    if is_diffusers_model(model_fn):
        raise TypeError(
            f"{name}: model_fn is a diffusers {type(model_fn).__name__}, which takes the training timestep and "
            f"returns an output object; the solver calls model_fn(x, t) with the continuous time t and needs a "
            f"tensor. Wrap it: model_fn = pydpm.schedules.model_wrapper(lambda x, t: net(x, t).sample, "
            f"noise_schedule, model_type='noise') (model_type='v' for prediction_type 'v_prediction', 'x_start' "
            f"for 'sample')")
    if isinstance(model_fn, torch.nn.Module) and getattr(noise_schedule, "schedule", None) == "discrete":
        warnings.warn(
            f"{name}: model_fn is a {type(model_fn).__name__} (torch.nn.Module) called as model_fn(x, t) with the "
            f"continuous time t ∈ (0, 1], but a network of a discrete schedule takes the step label "
            f"1000·(t − 1/N) (0 … 999). Wrap it: model_fn = pydpm.schedules.model_wrapper(net, noise_schedule, "
            f"model_type='noise'), or pass a plain function of (x, t) if it does take the continuous t",
            stacklevel=4)


def after_step(tr, correcting_xt_fn: Callable | None, return_intermediate: bool):
    """The per-step tail of every solver loop: correct x_t with the user's function, keep intermediates."""
    def hooks(x, point, step):
        if correcting_xt_fn is not None:
            x = tr.hook(x, point, step, fn=True)
        if return_intermediate:
            tr.hook(x, point, step, fn=False)
        return x
    return hooks


class Solver:
    """Base of the solver classes: model, schedule, prediction type and corrections; plans cached per
    configuration; `run_traced` (fused, capturable) and `run_eager` (adaptive)."""

    algorithm_types: dict[str, str] = {}
    default_algorithm = ""
    # True: run the same programs on tensors, unfused (a debugging aid; the tests' check of the plans).
    eager = False

    def __init__(self, model_fn, noise_schedule, algorithm_type, correcting_x0_fn, correcting_xt_fn,
                 thresholding_max_val, dynamic_thresholding_ratio):
        name = type(self).__name__
        for attr in ("marginal_log_mean_coeff", "marginal_std", "marginal_lambda", "inverse_lambda", "T", "total_N"):
            if not hasattr(noise_schedule, attr):
                raise TypeError(f"{name}: noise_schedule lacks {attr}; pass a pydpm.schedules.NoiseScheduleVP or "
                                f"NoiseScheduleFlow")
        check_model_fn(name, model_fn, noise_schedule)
        check_choice("algorithm_type", algorithm_type, tuple(self.algorithm_types))
        if correcting_x0_fn is not None and correcting_x0_fn != "dynamic_thresholding" and not callable(correcting_x0_fn):
            raise ValueError("correcting_x0_fn must be None, 'dynamic_thresholding' or a function (x0, t) -> x0")
        if correcting_xt_fn is not None and not callable(correcting_xt_fn):
            raise ValueError("correcting_xt_fn must be None or a function (xt, t, step) -> xt")
        if not 0.0 <= dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio={dynamic_thresholding_ratio} must lie in [0, 1]")
        if not thresholding_max_val > 0:
            raise ValueError(f"thresholding_max_val={thresholding_max_val} must be positive")
        self.model_fn, self.noise_schedule = model_fn, noise_schedule
        self.algorithm_type = algorithm_type
        self.predict = self.algorithm_types[algorithm_type]
        self.correcting_xt_fn = correcting_xt_fn
        self.thresholding_max_val, self.dynamic_thresholding_ratio = thresholding_max_val, dynamic_thresholding_ratio
        dynamic = correcting_x0_fn == "dynamic_thresholding"
        self.correcting_x0_fn = None if dynamic else correcting_x0_fn
        # The authors' dynamic thresholding: s = max(quantile(|x0|, ratio), thresholding_max_val).
        self.threshold = Threshold(dynamic_thresholding_ratio, thresholding_max_val, math.inf) if dynamic else None
        self._runners = BoundedCache(MAX_RUNNERS)  # per sampling configuration (steps, order, method, ...)
        # A solver's plans reuse their buffers between sample() calls: one sampling run at a time (see `running`).
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the solver for one sample() call. Its plans keep their buffers (history slots, workspaces) between
        calls, so two runs at once would overwrite each other's: a second concurrent call is refused at once
        (one non-blocking acquire per call, nothing per step)."""
        if not self._lock.acquire(blocking=False):
            name = type(self).__name__
            if self._owner == threading.get_ident():
                raise RuntimeError(f"this {name} is already sampling: sample() was called again from inside its own "
                                   f"run (the model, correcting_x0_fn or correcting_xt_fn); use a second {name} "
                                   f"object for the nested run")
            raise RuntimeError(f"this {name} is already sampling in another thread; use one solver object per "
                               f"thread (its plans reuse their buffers between calls, so concurrent runs would "
                               f"overwrite each other's)")
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def __getstate__(self) -> dict[str, Any]:
        """Copies (copy.deepcopy, pickle) take the configuration; plans, buffers and CUDA graphs are caches that a
        copy rebuilds on first use (a BoundedCache copies empty), and the lock is the copy's own."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_owner"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def options(self, seed: int = 0, progress: bool = False) -> Options:
        return Options(self.model_fn, self.noise_schedule, self.threshold, self.correcting_x0_fn,
                       self.correcting_xt_fn, seed, progress)

    def time_range(self, t_start, t_end) -> tuple[float, float]:
        ns = self.noise_schedule
        t_0 = 1.0 / ns.total_N if t_end is None else check_time("t_end", t_end)
        t_T = ns.T if t_start is None else check_time("t_start", t_start)
        if not t_0 >= 0:
            raise ValueError(f"t_end={t_0} must be >= 0 (t_end=0 ends on the data itself, σ = 0)")
        if not t_T > 0:
            raise ValueError(f"t_start={t_T} must be > 0 (the ODE is singular at t = 0); for discrete-time models use "
                             f"times >= 1/N = {1.0 / ns.total_N}")
        for name, v in (("t_end", t_0), ("t_start", t_T)):
            if v > ns.T + 1e-12:
                raise ValueError(f"{name}={v} lies beyond the schedule's end T={ns.T}")
        if t_T == t_0:
            raise ValueError(f"t_start={t_T} equals t_end; sampling needs an interval (t_start > t_end samples, "
                             f"t_start < t_end inverts)")
        return t_T, t_0

    def explicit_times(self, times: Any, t_start: float | None, t_end: float | None) -> torch.Tensor:
        """`times` checked as a time grid: 1-D, at least two entries, strictly monotonic, its ends valid as
        t_start and t_end. Returns it as a float64 CPU tensor."""
        if t_start is not None or t_end is not None:
            raise ValueError("times= is the whole time grid, its ends included: leave t_start and t_end unset")
        try:
            ts = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"times must be a 1-D sequence or tensor of times, got {type(times).__name__}") from None
        if ts.dim() != 1 or ts.numel() < 2 or not bool(torch.isfinite(ts).all()):
            raise ValueError(f"times must be a 1-D sequence of at least two finite times, got shape "
                             f"{tuple(ts.shape)}")
        gaps = ts.diff()
        if not (bool((gaps < 0).all()) or bool((gaps > 0).all())):
            raise ValueError("times must be strictly decreasing (sampling) or strictly increasing (inversion)")
        self.time_range(float(ts[0]), float(ts[-1]))
        return ts

    @staticmethod
    def check_steps(steps) -> int:
        """The number of steps: a positive int (TypeError for None or 2.0, ValueError below 1)."""
        return check_int("steps", steps, 1, " (the number of steps)")

    def grid(self, skip_type: str, t_T: float, t_0: float, n: int) -> torch.Tensor:
        if t_0 == 0 and skip_type in ("logSNR", "karras"):
            raise ValueError(f"skip_type={skip_type!r} spaces the steps in λ, which is infinite at t_end=0; use "
                             f"'time_uniform' or 'time_quadratic', or t_end > 0")
        return time_steps(self.noise_schedule, skip_type, t_T, t_0, n)

    @staticmethod
    def zero_end(orders: list[int], t_0: float) -> list[int]:
        """A step that ends at σ = 0 (t_end = 0 on a flow schedule) is taken at first order: higher-order
        multistep terms scale with h = λ_t − λ_s = ∞ there (diffusers' final_sigmas_type='zero' does the
        same). The first-order step lands exactly on the data prediction."""
        return orders[:-1] + [1] if t_0 == 0 else orders

    def run_traced(self, x, key, program, return_intermediate: bool, cuda_graph: bool, progress: bool,
                   seed: int = 0, stochastic: bool = False):
        """Trace `program(tracer, x)` once per key, compile it to fused launches, run it (one run per solver
        object at a time). `stochastic`: the program draws noise, which the fused step draws in x's memory
        order; a non-contiguous x (channels-last, a transposed view) is then sampled as x.contiguous() so that
        the result does not depend on the layout, and handed back in x's layout."""
        check_start(x)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
            raise (ValueError if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else TypeError)(
                f"seed={seed!r} must be an int in [0, 2**63) (the Philox seed of the in-kernel noise)")
        seed = int(seed)
        with self.running():
            like = x
            if stochastic and not x.is_contiguous():
                x = x.contiguous()
            if self.eager:
                with torch.no_grad():
                    tr = EagerTracer(self.predict, self.options(seed), x)
                    out, inter = program(tr, x).to(x.dtype), tr.intermediates
            else:
                runner = self._runners.get(key)
                if runner is None:
                    tr = Tracer(self.predict, self.noise_schedule)
                    tr.output(program(tr, tr.x))
                    runner = self._runners.put(key, Runner(compile_plan(tr), self.options()))
                runner.opts.seed, runner.opts.progress = seed, progress
                with torch.no_grad():
                    out, inter = runner(x, cuda_graph=cuda_graph)
            if x is not like:
                out = torch.empty_like(like).copy_(out)
        return (out, inter) if return_intermediate else out

    def run_eager(self, x, program):
        check_sample_input(x)
        with self.running(), torch.no_grad():
            return program(EagerTracer(self.predict, self.options(), x), x).to(x.dtype)
