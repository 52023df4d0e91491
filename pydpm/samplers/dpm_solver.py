"""DPM-Solver (Lu et al., NeurIPS 2022) and DPM-Solver++ (Lu et al., 2022), plus SDE-DPM-Solver++(2M).

Every update is written over "vectors" (`Lin` when traced, tensors when eager) exactly as in the papers:
`predict='noise'` is DPM-Solver (ε-prediction, e^{h} terms), `predict='data'` DPM-Solver++ (x₀-prediction,
e^{−h} terms). `p.t, p.alpha, p.sigma, p.lam` are the schedule at a `Point`. The multistep updates also take
points whose fields are per-sample tensors (the time-shift sampler): their coefficients are then tensors too.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from pydpm.samplers._common import Solver, after_step, check_choice, check_int, check_order, check_start
from pydpm.samplers._program import Point, exp, expm1
from pydpm.samplers.time_shift import Runner as TimeShiftRunner
from pydpm.samplers.time_shift import TimeShift
from pydpm.samplers.time_shift import plan as time_shift_plan
from pydpm.schedules import SKIP_TYPES, NoiseScheduleFlow, NoiseScheduleVP

SOLVER_TYPES = ("dpmsolver", "taylor")
THIRD_ORDER = ("authors", "corrected")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")


def first_update(x, s: Point, t: Point, m_s, predict: str):
    """DPM-Solver-1 (DDIM) from s to t."""
    h = t.lam - s.lam
    if predict == "data":
        return (t.sigma / s.sigma) * x - (t.alpha * expm1(-h)) * m_s
    return exp(t.log_alpha - s.log_alpha) * x - (t.sigma * expm1(h)) * m_s


def multistep_second_update(x, ms, ps, t: Point, predict: str, solver_type: str):
    """Multistep DPM-Solver-2 from ps[-1] to t with the last two predictions."""
    m1, m0 = ms[-2], ms[-1]
    p1, p0 = ps[-2], ps[-1]
    h_0, h = p0.lam - p1.lam, t.lam - p0.lam
    r0 = h_0 / h
    D1_0 = (1.0 / r0) * (m0 - m1)
    if predict == "data":
        phi_1 = expm1(-h)
        base = (t.sigma / p0.sigma) * x - (t.alpha * phi_1) * m0
        if solver_type == "dpmsolver":
            return base - 0.5 * (t.alpha * phi_1) * D1_0
        return base + (t.alpha * (phi_1 / h + 1.0)) * D1_0
    phi_1 = expm1(h)
    base = exp(t.log_alpha - p0.log_alpha) * x - (t.sigma * phi_1) * m0
    if solver_type == "dpmsolver":
        return base - 0.5 * (t.sigma * phi_1) * D1_0
    return base - (t.sigma * (phi_1 / h - 1.0)) * D1_0


def multistep_third_update(x, ms, ps, t: Point, predict: str, corrected: bool = False):
    """Multistep DPM-Solver-3 from ps[-1] to t with the last three predictions.

    With exact history, D1 estimates h·m' and D2 = (D1_0 − D1_1)/(r0 + r1) estimates h²·m''/2 (m: the model's
    prediction as a function of λ), while the φ3 weight of the exponential integrator multiplies h²·m'': the
    authors' update (and diffusers') is off by O(h³) per step, second order overall. `corrected` doubles D2,
    the Taylor-consistent estimate, and the method converges at order 3."""
    m2, m1, m0 = ms[-3:]
    p2, p1, p0 = ps[-3:]
    h_1, h_0, h = p1.lam - p2.lam, p0.lam - p1.lam, t.lam - p0.lam
    r0, r1 = h_0 / h, h_1 / h
    D1_0 = (1.0 / r0) * (m0 - m1)
    D1_1 = (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = ((2.0 if corrected else 1.0) / (r0 + r1)) * (D1_0 - D1_1)
    if predict == "data":
        phi_1 = expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return ((t.sigma / p0.sigma) * x - (t.alpha * phi_1) * m0 + (t.alpha * phi_2) * D1
                - (t.alpha * phi_3) * D2)
    phi_1 = expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return (exp(t.log_alpha - p0.log_alpha) * x - (t.sigma * phi_1) * m0 - (t.sigma * phi_2) * D1
            - (t.sigma * phi_3) * D2)


def multistep_update(x, ms, ps, t: Point, order: int, predict: str, solver_type: str, corrected: bool = False):
    if order == 1:
        return first_update(x, ps[-1], t, ms[-1], predict)
    if order == 2:
        return multistep_second_update(x, ms, ps, t, predict, solver_type)
    return multistep_third_update(x, ms, ps, t, predict, corrected)


def singlestep_second_update(tr, x, s: Point, t: Point, r1: float, predict: str, solver_type: str, ms=()):
    """Singlestep DPM-Solver-2 from s to t through λ_s + r1·h. `ms` reuses predictions already made at s.
    Returns (x_t, [m_s, m_s1])."""
    h = t.lam - s.lam
    s1 = tr.point_at_lambda(s.lam + r1 * h)
    m_s = ms[0] if ms else tr.model(x, s)
    if predict == "data":
        phi_11, phi_1 = math.expm1(-r1 * h), math.expm1(-h)
        x_s1 = (s1.sigma / s.sigma) * x - (s1.alpha * phi_11) * m_s
        m_s1 = tr.model(x_s1, s1)
        base = (t.sigma / s.sigma) * x - (t.alpha * phi_1) * m_s
        if solver_type == "dpmsolver":
            x_t = base - (0.5 / r1) * (t.alpha * phi_1) * (m_s1 - m_s)
        else:
            x_t = base + (1.0 / r1) * (t.alpha * (phi_1 / h + 1.0)) * (m_s1 - m_s)
    else:
        phi_11, phi_1 = math.expm1(r1 * h), math.expm1(h)
        x_s1 = math.exp(s1.log_alpha - s.log_alpha) * x - (s1.sigma * phi_11) * m_s
        m_s1 = tr.model(x_s1, s1)
        base = math.exp(t.log_alpha - s.log_alpha) * x - (t.sigma * phi_1) * m_s
        if solver_type == "dpmsolver":
            x_t = base - (0.5 / r1) * (t.sigma * phi_1) * (m_s1 - m_s)
        else:
            x_t = base - (1.0 / r1) * (t.sigma * (phi_1 / h - 1.0)) * (m_s1 - m_s)
    return x_t, [m_s, m_s1]


def singlestep_third_update(tr, x, s: Point, t: Point, r1: float, r2: float, predict: str, solver_type: str,
                            ms=()):
    """Singlestep DPM-Solver-3 from s to t through λ_s + r1·h and λ_s + r2·h. Returns (x_t, [m_s, m_s1, m_s2])."""
    h = t.lam - s.lam
    s1, s2 = tr.point_at_lambda(s.lam + r1 * h), tr.point_at_lambda(s.lam + r2 * h)
    m_s = ms[0] if len(ms) > 0 else tr.model(x, s)
    if predict == "data":
        phi_11, phi_12, phi_1 = math.expm1(-r1 * h), math.expm1(-r2 * h), math.expm1(-h)
        phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        m_s1 = ms[1] if len(ms) > 1 else tr.model((s1.sigma / s.sigma) * x - (s1.alpha * phi_11) * m_s, s1)
        x_s2 = ((s2.sigma / s.sigma) * x - (s2.alpha * phi_12) * m_s
                + r2 / r1 * (s2.alpha * phi_22) * (m_s1 - m_s))
        m_s2 = tr.model(x_s2, s2)
        base = (t.sigma / s.sigma) * x - (t.alpha * phi_1) * m_s
        if solver_type == "dpmsolver":
            x_t = base + (1.0 / r2) * (t.alpha * phi_2) * (m_s2 - m_s)
        else:
            D1_0, D1_1 = (1.0 / r1) * (m_s1 - m_s), (1.0 / r2) * (m_s2 - m_s)
            D1 = (r2 * D1_0 - r1 * D1_1) / (r2 - r1)
            D2 = 2.0 * (D1_1 - D1_0) / (r2 - r1)
            x_t = base + (t.alpha * phi_2) * D1 - (t.alpha * phi_3) * D2
    else:
        phi_11, phi_12, phi_1 = math.expm1(r1 * h), math.expm1(r2 * h), math.expm1(h)
        phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        m_s1 = ms[1] if len(ms) > 1 else tr.model(
            math.exp(s1.log_alpha - s.log_alpha) * x - (s1.sigma * phi_11) * m_s, s1)
        x_s2 = (math.exp(s2.log_alpha - s.log_alpha) * x - (s2.sigma * phi_12) * m_s
                - r2 / r1 * (s2.sigma * phi_22) * (m_s1 - m_s))
        m_s2 = tr.model(x_s2, s2)
        base = math.exp(t.log_alpha - s.log_alpha) * x - (t.sigma * phi_1) * m_s
        if solver_type == "dpmsolver":
            x_t = base - (1.0 / r2) * (t.sigma * phi_2) * (m_s2 - m_s)
        else:
            D1_0, D1_1 = (1.0 / r1) * (m_s1 - m_s), (1.0 / r2) * (m_s2 - m_s)
            D1 = (r2 * D1_0 - r1 * D1_1) / (r2 - r1)
            D2 = 2.0 * (D1_1 - D1_0) / (r2 - r1)
            x_t = base - (t.sigma * phi_2) * D1 - (t.sigma * phi_3) * D2
    return x_t, [m_s, m_s1, m_s2]


def multistep_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The authors' order of each step: 1, 2, … while the history builds up; lower orders at the end
    only when lower_order_final and steps < 10."""
    def one(step):
        if step < order:
            return step
        if lower_order_final and steps < 10:
            return min(order, steps + 1 - step)
        return order
    return [one(step) for step in range(1, steps + 1)]


def dpm_solver_multistep(tr, x, ts: list[Point], orders: list[int], solver_type: str, hooks,
                         third_order: str = "authors"):
    """Multistep DPM-Solver(++) over the times ts, step i + 1 of order orders[i] (one model call per step);
    third_order: 'authors' or 'corrected' (multistep_third_update)."""
    steps, keep = len(ts) - 1, max(orders)
    ms, ps = [tr.model(x, ts[0])], [ts[0]]
    x = hooks(x, ts[0], 0)
    for step in range(1, steps + 1):
        x = multistep_update(x, ms, ps, ts[step], orders[step - 1], tr.predict, solver_type,
                             third_order == "corrected")
        x = hooks(x, ts[step], step)
        ps = (ps + [ts[step]])[-keep:]
        if step < steps:
            ms = (ms + [tr.model(x, ts[step])])[-keep:]
    return x


def singlestep_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast: the order of each singlestep step using exactly `steps` model calls."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    if order == 2:
        return [2] * (steps // 2) + ([1] if steps % 2 else [])
    return [1] * steps


def dpm_solver_singlestep(tr, x, outer: list[Point], orders: list[int], inner_r, solver_type: str, hooks):
    """Singlestep DPM-Solver(++) over the outer times with the given order per step; inner_r(s, t, order)
    gives (r1, r2) as the authors derive them from the inner time grid."""
    for step, order in enumerate(orders):
        s, t = outer[step], outer[step + 1]
        r1, r2 = inner_r(s, t, order)
        if order == 1:
            x = first_update(x, s, t, tr.model(x, s), tr.predict)
        elif order == 2:
            x, _ = singlestep_second_update(tr, x, s, t, r1, tr.predict, solver_type)
        else:
            x, _ = singlestep_third_update(tr, x, s, t, r1, r2, tr.predict, solver_type)
        x = hooks(x, t, step)
    return x


def check_tolerances(atol, rtol) -> tuple[float, float]:
    """atol and rtol of method='adaptive': finite numbers >= 0, not both 0 (no step would ever be accepted)."""
    out = []
    for name, v in (("atol", atol), ("rtol", rtol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}={v!r} must be a number >= 0 (a tolerance of method='adaptive'), got "
                            f"{type(v).__name__}")
        v = float(v)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}={v} must be a finite number >= 0 (a tolerance of method='adaptive'; the "
                             f"defaults are atol=0.0078, rtol=0.05)")
        out.append(v)
    if out[0] == 0 and out[1] == 0:
        raise ValueError("atol=0 and rtol=0: method='adaptive' would never accept a step; give atol > 0 or rtol > 0 "
                         "(the defaults are atol=0.0078, rtol=0.05)")
    return out[0], out[1]


def dpm_solver_adaptive(tr, x, t_T: float, t_0: float, order: int, solver_type: str, atol: float, rtol: float,
                        h_init: float = 0.05, theta: float = 0.9, t_err: float = 1e-5, max_steps: int = 2000):
    """DPM-Solver-12 (order 2) / DPM-Solver-23 (order 3): singlestep pairs of orders (1, 2) or (2, 3)
    with the error-controlled step size of the paper. Eager only: accepting a step reads the error
    back to the host (one synchronisation per step). At most `max_steps` steps are tried (accepted or
    rejected); a non-finite error estimate (a model output or sample of NaN / inf) stops the run."""
    s = tr.point(t_T)
    lam_0 = tr.point(t_0).lam
    h, x_prev = h_init, x
    tried = accepted = 0
    while abs(s.t - t_0) > t_err:
        if tried >= max_steps:
            raise RuntimeError(
                f"method='adaptive' tried max_steps={max_steps} steps ({accepted} accepted) and reached t = {s.t:.6g} "
                f"of t_end = {t_0:.6g}: loosen atol={atol} / rtol={rtol}, raise max_steps, or use a fixed-step method")
        tried += 1
        t = tr.point_at_lambda(s.lam + h)
        if order == 2:
            m_s = tr.model(x, s)
            x_lower, ms = first_update(x, s, t, m_s, tr.predict), [m_s]
            x_higher, _ = singlestep_second_update(tr, x, s, t, 0.5, tr.predict, solver_type, ms=ms)
        else:
            x_lower, ms = singlestep_second_update(tr, x, s, t, 1.0 / 3.0, tr.predict, solver_type)
            x_higher, _ = singlestep_third_update(tr, x, s, t, 1.0 / 3.0, 2.0 / 3.0, tr.predict, solver_type, ms=ms)
        delta = torch.clamp(rtol * torch.maximum(x_lower.abs(), x_prev.abs()), min=atol)
        diff = x_higher - x_lower
        # atol = 0: an element that is 0 in both samples has delta = 0; it agrees exactly when diff = 0 there.
        ratio = diff / delta if atol > 0 else torch.where(diff == 0, torch.zeros_like(diff), diff / delta)
        err = ratio.reshape(x.shape[0], -1).square().mean(dim=1).sqrt().max().item()
        if not math.isfinite(err) and not bool(torch.isfinite(x_higher).all() and torch.isfinite(x_lower).all()):
            raise FloatingPointError(
                f"method='adaptive': the sample became non-finite (NaN or inf) at step {tried} ({accepted} accepted), "
                f"from t = {s.t:.6g} to t = {t.t:.6g}: the model returned NaN/inf there or the sample overflowed; "
                f"check the model at these times (and the starting x)")
        if math.isnan(err):
            raise FloatingPointError(
                f"method='adaptive': the error estimate is NaN at step {tried} ({accepted} accepted), from t = "
                f"{s.t:.6g} to t = {t.t:.6g} (atol={atol}, rtol={rtol}); check the model output at these times")
        if err <= 1.0:
            x, s, x_prev = x_higher, t, x_lower
            accepted += 1
        h = min(theta * h * err ** (-1.0 / order) if err > 0 else math.inf, lam_0 - s.lam)
        if not h > 0 and abs(s.t - t_0) > t_err:
            raise FloatingPointError(
                f"method='adaptive': the step size collapsed to h = {h} at step {tried} ({accepted} accepted), t = "
                f"{s.t:.6g} of t_end = {t_0:.6g} (error estimate {err:.3g}): loosen atol={atol} / rtol={rtol}, or use a "
                f"fixed-step method")
    return x


def sde_dpm_solver_pp_update(tr, x, ms, ps, t: Point, order: int):
    """SDE-DPM-Solver++ (1S / 2M midpoint) from ps[-1] to t: the data-prediction SDE step with fresh noise."""
    p0, m0 = ps[-1], ms[-1]
    h = t.lam - p0.lam
    decay = math.expm1(-2.0 * h)  # e^{−2h} − 1
    x_t = (t.sigma / p0.sigma * math.exp(-h)) * x - (t.alpha * decay) * m0
    if order == 2:
        r0 = (p0.lam - ps[-2].lam) / h
        x_t = x_t - 0.5 * (t.alpha * decay) * ((1.0 / r0) * (m0 - ms[-2]))
    return x_t + (t.sigma * math.sqrt(-decay)) * tr.noise()


def sde_dpm_solver_pp(tr, x, ts: list[Point], orders: list[int], hooks):
    """SDE-DPM-Solver++(2M) (order 2 steps) or (1S) (order 1), step i + 1 of order orders[i]."""
    steps, keep = len(ts) - 1, max(orders)
    ms, ps = [tr.model(x, ts[0])], [ts[0]]
    x = hooks(x, ts[0], 0)
    for step in range(1, steps + 1):
        x = sde_dpm_solver_pp_update(tr, x, ms, ps, ts[step], orders[step - 1])
        x = hooks(x, ts[step], step)
        ps = (ps + [ts[step]])[-keep:]
        if step < steps:
            ms = (ms + [tr.model(x, ts[step])])[-keep:]
    return x


class DPMSolver(Solver):
    """DPM-Solver / DPM-Solver++ with the arguments, defaults and results of the authors' `DPM_Solver`.

    Each model call is followed by one fused `solver_step` launch (conversion of the model output,
    classifier-free guidance and dynamic thresholding folded in); coefficients are computed once per
    (steps, times, order, method) in float64 and kept on the device, and the plan is reused by later
    `sample` calls with the same arguments.

    Args:
        model_fn: the model as a function of (x, t) with t the continuous time ([B] tensor), returning the
            noise prediction: normally `pydpm.schedules.model_wrapper(net, noise_schedule, model_type=...)`,
            whose conversion and classifier-free guidance fuse into the step. A diffusers model is refused
            and a bare `torch.nn.Module` under a discrete schedule warns (both name the `model_wrapper` call).
        noise_schedule: a `pydpm.schedules.NoiseScheduleVP` or `NoiseScheduleFlow`.
        algorithm_type: 'dpmsolver++' (data prediction; the choice for guided sampling) or 'dpmsolver'
            (noise prediction).
        correcting_x0_fn: None; 'dynamic_thresholding' (every data prediction x̂₀ is clamped to [−s, s] and
            divided by s, s = max(quantile(|x̂₀|, dynamic_thresholding_ratio), thresholding_max_val) per
            sample, fused into the step); or a function (x0, t) -> x0 applied to every data prediction
            (unfused: one extra launch per model call).
        correcting_xt_fn: None, or a function (x_t, t, step) -> x_t applied to the sample after every step.
        thresholding_max_val: the smallest s of dynamic thresholding (> 0).
        dynamic_thresholding_ratio: the quantile of |x̂₀| dynamic thresholding takes, in [0, 1].
    """

    algorithm_types = {"dpmsolver": "noise", "dpmsolver++": "data"}
    default_algorithm = "dpmsolver++"

    def __init__(self, model_fn: Callable[..., torch.Tensor], noise_schedule: NoiseScheduleVP | NoiseScheduleFlow,
                 algorithm_type: str = "dpmsolver++",
                 correcting_x0_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 correcting_xt_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                 thresholding_max_val: float = 1.0, dynamic_thresholding_ratio: float = 0.995) -> None:
        super().__init__(model_fn, noise_schedule, algorithm_type, correcting_x0_fn, correcting_xt_fn,
                         thresholding_max_val, dynamic_thresholding_ratio)

    def sample(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
               lower_order_final: bool = True, denoise_to_zero: bool = False, solver_type: str = "dpmsolver",
               atol: float = 0.0078, rtol: float = 0.05, return_intermediate: bool = False,
               cuda_graph: bool = False, progress: bool = False,
               times: Sequence[float] | torch.Tensor | None = None, max_steps: int = 2000,
               third_order: str = "authors", time_shift: TimeShift | None = None,
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample from x at t_start to t_end with `steps` model evaluations.

        Args:
            x: the starting sample (noise at t_start): float32, float16 or bfloat16 (float64 on the CPU), any
                shape with a leading batch dimension; not modified.
            steps: the number of model evaluations (+1 with denoise_to_zero; 'singlestep_fixed' rounds it
                down to a multiple of order; 'adaptive' chooses its own).
            t_start: the start time (default: the schedule's T).
            t_end: the end time (default 1/N). 0 ends on the data itself (σ = 0, diffusers'
                final_sigmas_type='zero'), with a first-order last step; 'dpmsolver++' and method='multistep'
                only.
            order: 1, 2 or 3 (2 or 3 for 'adaptive').
            skip_type: the time spacing: 'time_uniform', 'logSNR' (uniform in λ), 'time_quadratic' or
                'karras' (EDM's ρ = 7 spacing).
            method: 'multistep'; 'singlestep' (DPM-Solver-fast's order mix using exactly `steps`
                evaluations); 'singlestep_fixed' (`steps // order` steps of `order`); 'adaptive'
                (DPM-Solver-12/23 with step-size control by atol/rtol: eager, one host sync per step).
            lower_order_final: lower the orders of the last steps (the authors' rule: only when steps < 10).
            denoise_to_zero: end with one more model evaluation at t_end and return its data prediction.
            solver_type: 'dpmsolver' (diffusers' 'midpoint') or 'taylor' (diffusers' 'heun').
            atol: the absolute tolerance of method='adaptive': a finite number >= 0.
            rtol: the relative tolerance of method='adaptive': a finite number >= 0 (atol and rtol not both 0).
            return_intermediate: also return the list of samples after every step (multistep: the start
                first, then one per step and the denoise_to_zero result).
            cuda_graph: capture the whole loop (model included) in a CUDA graph on first use per input layout
                and replay it afterwards (CUDA tensors and a capturable model).
            progress: show a progress bar over model evaluations (tqdm when installed, else a counter on
                stderr); not with cuda_graph=True.
            times: an explicit time grid instead of steps, t_start, t_end and skip_type: len(times) − 1 steps
                from times[0] to times[-1], strictly decreasing (increasing to invert), method='multistep'
                only. docs/samplers.md builds diffusers' DPM-Solver++(2M) grid with it.
            max_steps: the most steps method='adaptive' tries, accepted or rejected (each costs order model
                evaluations), before it raises RuntimeError naming the time reached; a non-finite error estimate
                (the model returned NaN/inf, or the sample overflowed) raises FloatingPointError at once.
            third_order: the update of method='multistep' at order 3: 'authors' (the official code's and
                diffusers', which converges at order 2: its second-difference term is half what the φ3 weight
                needs) or 'corrected' (that term doubled: order 3, same cost). Other methods and orders ignore it.
            time_shift: a `TimeShift`: the time-shift sampler (per-sample shifted times against exposure bias,
                `pydpm.samplers.time_shift`); method='multistep' sampling on a VP schedule only, of samples of
                two elements or more, without progress, correcting_x0_fn or correcting_xt_fn. Each step is one
                fused launch with per-sample coefficients gathered from tables built once per grid and settings
                (plus, where times shift, a variance reduction and an argmin on the device); no host
                synchronisation, so cuda_graph=True captures the loop.

        Returns:
            The sample at t_end in x's dtype; with return_intermediate, (sample, list of samples).

        Raises:
            RuntimeError: this solver object is already sampling (in another thread, or from inside its own
                model): use one solver object per thread.
        """
        check_choice("method", method, METHODS)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("third_order", third_order, THIRD_ORDER)
        order = check_order(order, (1, 2, 3))
        if times is None and method != "adaptive":
            steps = self.check_steps(steps)
        if times is not None:
            if method != "multistep":
                raise ValueError(f"times= sets the grid of method='multistep'; method={method!r} builds its own grid "
                                 f"from steps and skip_type")
            grid = self.explicit_times(times, t_start, t_end)
            t_T, t_0, steps = float(grid[0]), float(grid[-1]), grid.numel() - 1
        else:
            grid = None
            t_T, t_0 = self.time_range(t_start, t_end)
        if method == "adaptive":
            if t_T < t_0:
                raise ValueError("method='adaptive' samples from t_start down to t_end only (t_start > t_end)")
            if order not in (2, 3):
                raise ValueError(f"method='adaptive' needs order 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order}")
            if return_intermediate or self.correcting_xt_fn is not None or cuda_graph:
                raise ValueError("method='adaptive' chooses its steps at run time: it supports neither "
                                 "return_intermediate, correcting_xt_fn nor cuda_graph")
            atol, rtol = check_tolerances(atol, rtol)
            max_steps = check_int("max_steps", max_steps, 1, " (the most steps method='adaptive' tries)")
            return self.run_eager(x, lambda tr, x: dpm_solver_adaptive(tr, x, t_T, t_0, order, solver_type, atol, rtol,
                                                                       max_steps=max_steps))
        if t_0 == 0 and (method != "multistep" or denoise_to_zero or self.predict == "noise"):
            raise ValueError("t_end=0 (σ = 0) is supported by algorithm_type='dpmsolver++' with method='multistep' "
                             "and no denoise_to_zero: the singlestep methods place model calls inside the last "
                             "interval, and the noise-prediction update has σ_t·(e^h − 1) = 0·∞ there")
        if method == "multistep" and steps < order:
            raise ValueError(f"method='multistep' needs steps >= order, got steps={steps}, order={order}")
        if method == "singlestep_fixed" and steps < order:
            raise ValueError(f"method='singlestep_fixed' needs steps >= order, got steps={steps}, order={order}")
        check_choice("skip_type", skip_type, SKIP_TYPES)
        if time_shift is not None:
            ts = grid if grid is not None else self.grid(skip_type, t_T, t_0, steps)
            return self._time_shifted(x, time_shift, ts, method, order, lower_order_final, denoise_to_zero,
                                      solver_type, third_order, return_intermediate, cuda_graph, progress)
        spacing = skip_type if grid is None else tuple(grid.tolist())
        key = ("dpm", steps, t_T, t_0, order, spacing, method, bool(lower_order_final), bool(denoise_to_zero),
               solver_type, bool(return_intermediate), third_order)

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            if method == "multistep":
                ts = tr.points(self.grid(skip_type, t_T, t_0, steps) if grid is None else grid)
                orders = self.zero_end(multistep_orders(steps, order, lower_order_final), t_0)
                x = dpm_solver_multistep(tr, x, ts, orders, solver_type, hooks, third_order)
                last_step = steps
            else:
                if method == "singlestep":
                    orders = singlestep_orders(steps, order)
                    if skip_type == "logSNR":
                        outer = self.grid(skip_type, t_T, t_0, len(orders))
                    else:
                        fine = self.grid(skip_type, t_T, t_0, steps)
                        idx = [0]
                        for o in orders:
                            idx.append(idx[-1] + o)
                        outer = fine[idx]
                else:
                    orders = [order] * (steps // order)
                    outer = self.grid(skip_type, t_T, t_0, len(orders))

                def inner_r(s, t, o):
                    if o == 1:
                        return None, None
                    lam = [p.lam for p in tr.points(self.grid(skip_type, s.t, t.t, o))]
                    h = lam[-1] - lam[0]
                    return (lam[1] - lam[0]) / h, ((lam[2] - lam[0]) / h if o == 3 else None)

                x = dpm_solver_singlestep(tr, x, tr.points(outer), orders, inner_r, solver_type, hooks)
                last_step = len(orders) - 1
            if denoise_to_zero:
                p = tr.point(t_0)
                x = hooks(tr.model(x, p, predict="data"), p, last_step + 1)
            return x

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress)

    def _time_shifted(self, x, shift: TimeShift, grid, method, order, lower_order_final, denoise_to_zero, solver_type,
                      third_order, return_intermediate, cuda_graph, progress):
        if not isinstance(shift, TimeShift):
            raise TypeError(f"time_shift must be a pydpm.samplers.TimeShift (or None), got {type(shift).__name__}")
        refused = [name for name, on in (("method=" + repr(method), method != "multistep"),
                                         ("a flow schedule", not isinstance(self.noise_schedule, NoiseScheduleVP)),
                                         ("an increasing time grid (inversion)", bool(grid[0] < grid[-1])),
                                         ("progress=True", progress),
                                         ("correcting_x0_fn", self.threshold is not None or self.correcting_x0_fn),
                                         ("correcting_xt_fn", self.correcting_xt_fn is not None)) if on]
        if refused:
            raise ValueError(f"time_shift samples with method='multistep' down a VP schedule: it does not support "
                             f"{', '.join(refused)}")
        check_start(x)
        if shift.window > 0 and x[0].numel() < 2:  # its variance would be NaN, and the pick the farthest shift
            raise ValueError(f"time_shift matches each sample's variance over its elements, and x's samples have "
                             f"{x[0].numel()} element (x {tuple(x.shape)}): sample without time_shift, or with "
                             f"TimeShift(window=0)")
        orders = multistep_orders(grid.numel() - 1, order, lower_order_final)

        def update(x, ms, ps, t, o):
            return multistep_update(x, ms, ps, t, o, self.predict, solver_type, third_order == "corrected")

        key = ("time-shift", tuple(grid.tolist()), shift, order, bool(lower_order_final), solver_type, third_order,
               x.device)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners.put(key, TimeShiftRunner(self.model_fn, self.noise_schedule, time_shift_plan(
                self.model_fn, self.noise_schedule, grid, shift, x.device, orders, self.predict, update), self.predict))
        with self.running(), torch.no_grad():
            out, inter = runner(x, denoise_to_zero, return_intermediate, cuda_graph)
        return (out, inter) if inter is not None else out

    def inverse(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
                order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
                lower_order_final: bool = True, denoise_to_zero: bool = False, solver_type: str = "dpmsolver",
                atol: float = 0.0078, rtol: float = 0.05, return_intermediate: bool = False,
                cuda_graph: bool = False, progress: bool = False,
                times: Sequence[float] | torch.Tensor | None = None, max_steps: int = 2000,
                third_order: str = "authors") -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the ODE forward, from data at t_start (default 1/N) to t_end (default T): DPM-Solver
        inversion (e.g. DDIM inversion with order=1). The arguments are those of `sample`; `times`, if given,
        increases."""
        if times is None:
            ns = self.noise_schedule
            t_start = 1.0 / ns.total_N if t_start is None else t_start
            t_end = ns.T if t_end is None else t_end
        return self.sample(x, steps=steps, t_start=t_start, t_end=t_end, order=order, skip_type=skip_type,
                           method=method, lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero,
                           solver_type=solver_type, atol=atol, rtol=rtol, return_intermediate=return_intermediate,
                           cuda_graph=cuda_graph, progress=progress, times=times, max_steps=max_steps,
                           third_order=third_order)


class SDEDPMSolverPP(Solver):
    """SDE-DPM-Solver++: order 2 is the 2M (midpoint) solver, order 1 the first-order SDE solver; the
    noise is drawn inside the fused step from Philox(seed, step)."""

    algorithm_types = {"dpmsolver++": "data"}

    def __init__(self, model_fn, noise_schedule, correcting_x0_fn=None, correcting_xt_fn=None,
                 thresholding_max_val=1.0, dynamic_thresholding_ratio=0.995):
        super().__init__(model_fn, noise_schedule, "dpmsolver++", correcting_x0_fn, correcting_xt_fn,
                         thresholding_max_val, dynamic_thresholding_ratio)

    def sample(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", lower_order_final=True,
               seed=0, return_intermediate=False, cuda_graph=False, progress=False):
        order = check_order(order, (1, 2))
        steps = self.check_steps(steps)
        check_choice("skip_type", skip_type, SKIP_TYPES)
        t_T, t_0 = self.time_range(t_start, t_end)
        key = ("sde-dpm++", steps, t_T, t_0, order, skip_type, bool(lower_order_final), bool(return_intermediate))

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            ts = tr.points(self.grid(skip_type, t_T, t_0, steps))
            orders = self.zero_end(multistep_orders(steps, order, lower_order_final), t_0)
            return sde_dpm_solver_pp(tr, x, ts, orders, hooks)

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress, seed=seed, stochastic=True)
