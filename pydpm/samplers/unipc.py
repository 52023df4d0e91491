"""UniPC (Zhao et al., NeurIPS 2023): the unified predictor–corrector, variants B(h) = h ('bh1'),
B(h) = e^h − 1 ('bh2') and 'vary_coeff', any order, data or noise prediction.

Traced, the corrected sample is never materialised: the corrector of step i and the predictor of step
i + 1 are one linear combination of the predicted sample and the stored predictions, so each step is
one model call and one fused launch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from pydpm.samplers._common import Solver, after_step, check_choice, check_int
from pydpm.samplers._program import Point
from pydpm.schedules import SKIP_TYPES, NoiseScheduleFlow, NoiseScheduleVP
from pydpm.samplers.dpm_solver import METHODS as _DPM_METHODS

VARIANTS = ("bh1", "bh2", "vary_coeff")


def _transfer(x, m0, p0: Point, t: Point, predict: str):
    """x_t_ = the first-order (DDIM) part of the update, and the scale multiplying every residual."""
    h = t.lam - p0.lam
    if predict == "data":
        return (t.sigma / p0.sigma) * x - (t.alpha * math.expm1(-h)) * m0, t.alpha
    return math.exp(t.log_alpha - p0.log_alpha) * x - (t.sigma * math.expm1(h)) * m0, t.sigma


def _differences(ms, ps, t: Point, order: int):
    """rks and D1s: the scaled differences of the older predictions from the newest."""
    p0, m0 = ps[-1], ms[-1]
    h = t.lam - p0.lam
    rks, D1s = [], []
    for i in range(1, order):
        rk = (ps[-(i + 1)].lam - p0.lam) / h
        rks.append(rk)
        D1s.append((ms[-(i + 1)] - m0) / rk)
    return rks + [1.0], D1s


def bh_update(tr, x, ms, ps, t: Point, order: int, use_corrector: bool, variant: str):
    """UniPC-p with B(h) from ps[-1] to t: predictor UniP, then (if use_corrector) the model at the
    prediction and corrector UniC. Returns (x_t, model_t or None)."""
    predict = tr.predict
    p0, m0 = ps[-1], ms[-1]
    h = t.lam - p0.lam
    hh = -h if predict == "data" else h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    rks, D1s = _differences(ms, ps, t, order)
    R, b = [], []
    h_phi_k, factorial_i = h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i
    R, b = np.array(R), np.array(b)
    x_t_, scale = _transfer(x, m0, p0, t, predict)
    x_t = x_t_
    if D1s:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_t = x_t_ - (scale * B_h) * sum(rho * d for rho, d in zip(rhos_p, D1s))
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    model_t = tr.model(x_t, t)
    corr = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (model_t - m0)
    return x_t_ - (scale * B_h) * corr, model_t


def vary_coeff_update(tr, x, ms, ps, t: Point, order: int, use_corrector: bool):
    """UniPC with varying coefficients (the paper's UniPC_v): the φ_k expansion with C⁻¹ weights."""
    predict = tr.predict
    p0, m0 = ps[-1], ms[-1]
    h = t.lam - p0.lam
    hh = -h if predict == "data" else h
    rks, D1s = _differences(ms, ps, t, order)
    K = len(rks)
    C, col = [], np.ones(K)
    for k in range(1, K + 1):
        C.append(col)
        col = col * np.array(rks) / (k + 1)
    C = np.stack(C, axis=1)
    h_phi_ks, h_phi_k, factorial_k = [], math.expm1(hh), 1
    for k in range(1, K + 2):
        h_phi_ks.append(h_phi_k)
        h_phi_k = h_phi_k / hh - 1.0 / factorial_k
        factorial_k *= k + 1
    x_t_, scale = _transfer(x, m0, p0, t, predict)
    x_t = x_t_
    if D1s:
        A_p = np.linalg.inv(C[:-1, :-1])
        for k in range(K - 1):
            x_t = x_t - (scale * h_phi_ks[k + 1]) * sum(a * d for a, d in zip(A_p[k].tolist(), D1s))
    if not use_corrector:
        return x_t, None
    A_c = np.linalg.inv(C)
    model_t = tr.model(x_t, t)
    x_t, k = x_t_, 0
    for k in range(K - 1):
        x_t = x_t - (scale * h_phi_ks[k + 1]) * sum(a * d for a, d in zip(A_c[k][:-1].tolist(), D1s))
    # As in the authors' code, the last term takes the row k left by the loop (k = 0 when K = 1).
    return x_t - (scale * h_phi_ks[K]) * (float(A_c[k][-1]) * (model_t - m0)), model_t


def unipc_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The authors' order of each step: 1, 2, … while the history builds up, then `order`, lowered at the
    end when lower_order_final."""
    return [step if step < order else (min(order, steps + 1 - step) if lower_order_final else order)
            for step in range(1, steps + 1)]


def unipc_multistep(tr, x, ts: list[Point], orders: list[int], correctors: list[bool], variant: str, hooks):
    """Multistep UniPC over the times ts: step i + 1 predicts with order orders[i] and, if correctors[i],
    evaluates the model there and corrects (the model value is reused as history)."""
    update = (lambda *a: vary_coeff_update(tr, *a)) if variant == "vary_coeff" else \
        (lambda *a: bh_update(tr, *a, variant))
    steps, keep = len(ts) - 1, max(orders)
    ms, ps = [tr.model(x, ts[0])], [ts[0]]
    x = hooks(x, ts[0], 0)
    for step in range(1, steps + 1):
        x, model_x = update(x, ms, ps, ts[step], orders[step - 1], correctors[step - 1])
        x = hooks(x, ts[step], step)
        ps = (ps + [ts[step]])[-keep:]
        if step < steps:
            if model_x is None:  # as the authors: the corrector's model call is reused even after correcting_xt_fn
                model_x = tr.model(x, ts[step])
            ms = (ms + [model_x])[-keep:]
    return x


class UniPC(Solver):
    """UniPC with the arguments, defaults and results of the authors' `UniPC` class.

    Each model call is followed by one fused `solver_step` launch: the corrector of a step and the
    predictor of the next are one linear combination. Coefficients are computed once per (steps, times,
    order) in float64 and kept on the device; the plan is reused by later `sample` calls with the same
    arguments.

    Args:
        model_fn: the model as a function of (x, t) with t the continuous time ([B] tensor), returning the
            noise prediction: normally `pydpm.schedules.model_wrapper(net, noise_schedule, model_type=...)`,
            whose conversion and classifier-free guidance fuse into the step. A diffusers model is refused
            and a bare `torch.nn.Module` under a discrete schedule warns (both name the `model_wrapper` call).
        noise_schedule: a `pydpm.schedules.NoiseScheduleVP` or `NoiseScheduleFlow`.
        algorithm_type: 'data_prediction' (UniPC on x̂₀; the choice for guided sampling) or
            'noise_prediction'.
        correcting_x0_fn: None; 'dynamic_thresholding' (every data prediction x̂₀ is clamped to [−s, s] and
            divided by s, s = max(quantile(|x̂₀|, dynamic_thresholding_ratio), thresholding_max_val) per
            sample, fused into the step); or a function (x0, t) -> x0 applied to every data prediction
            (unfused: one extra launch per model call).
        correcting_xt_fn: None, or a function (x_t, t, step) -> x_t applied to the sample after every step.
        thresholding_max_val: the smallest s of dynamic thresholding (> 0).
        dynamic_thresholding_ratio: the quantile of |x̂₀| dynamic thresholding takes, in [0, 1].
        variant: 'bh1' (B(h) = h), 'bh2' (B(h) = e^h − 1; diffusers' default) or 'vary_coeff' (the
            paper's UniPC_v; first order for order >= 2, see docs/samplers.md).
    """

    algorithm_types = {"data_prediction": "data", "noise_prediction": "noise"}
    default_algorithm = "data_prediction"

    def __init__(self, model_fn: Callable[..., torch.Tensor], noise_schedule: NoiseScheduleVP | NoiseScheduleFlow,
                 algorithm_type: str = "data_prediction",
                 correcting_x0_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 correcting_xt_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                 thresholding_max_val: float = 1.0, dynamic_thresholding_ratio: float = 0.995,
                 variant: str = "bh1") -> None:
        check_choice("variant", variant, VARIANTS)
        super().__init__(model_fn, noise_schedule, algorithm_type, correcting_x0_fn, correcting_xt_fn,
                         thresholding_max_val, dynamic_thresholding_ratio)
        self.variant = variant

    def sample(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
               lower_order_final: bool = True, denoise_to_zero: bool = False, atol: float = 0.0078,
               rtol: float = 0.05, return_intermediate: bool = False, cuda_graph: bool = False,
               progress: bool = False, times: Sequence[float] | torch.Tensor | None = None,
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample from x at t_start to t_end with `steps` model evaluations (+1 with denoise_to_zero); every
        step but the last is corrected.

        Args:
            x: the starting sample (noise at t_start): float32, float16 or bfloat16 (float64 on the CPU), any
                shape with a leading batch dimension; not modified.
            steps: the number of steps and of model evaluations (>= order).
            t_start: the start time (default: the schedule's T).
            t_end: the end time (default 1/N). 0 ends on the data itself (σ = 0, diffusers'
                final_sigmas_type='zero'), with a first-order last step; 'data_prediction' only.
            order: the order, a positive int (1 … 3 in practice).
            skip_type: the time spacing: 'time_uniform', 'logSNR' (uniform in λ), 'time_quadratic' or
                'karras' (EDM's ρ = 7 spacing).
            method: 'multistep', the only method UniPC has (the argument mirrors `DPMSolver.sample`).
            lower_order_final: lower the orders of the last steps to the steps left (at any step count).
            denoise_to_zero: end with one more model evaluation at t_end and return its data prediction.
            atol: accepted for signature compatibility with `DPMSolver.sample`; unused.
            rtol: accepted for signature compatibility with `DPMSolver.sample`; unused.
            return_intermediate: also return the list of samples: the start, then the sample after every
                step (and the denoise_to_zero result).
            cuda_graph: capture the whole loop (model included) in a CUDA graph on first use per input layout
                and replay it afterwards (CUDA tensors and a capturable model).
            progress: show a progress bar over model evaluations (tqdm when installed, else a counter on
                stderr); not with cuda_graph=True.
            times: an explicit time grid instead of steps, t_start, t_end and skip_type: len(times) − 1 steps
                from times[0] to times[-1], strictly decreasing (docs/samplers.md builds diffusers' grids
                with it).

        Returns:
            The sample at t_end in x's dtype; with return_intermediate, (sample, list of samples).
        """
        if method != "multistep":
            check_choice("method", method, _DPM_METHODS)
            raise ValueError(f"UniPC implements method='multistep' only, got {method!r}")
        order = check_int("order", order, 1, " (the solver order, 1 … 3 in practice)")
        if times is None:
            steps = self.check_steps(steps)
        if times is not None:
            grid = self.explicit_times(times, t_start, t_end)
            t_T, t_0, steps = float(grid[0]), float(grid[-1]), grid.numel() - 1
        else:
            grid = None
            t_T, t_0 = self.time_range(t_start, t_end)
        if steps < order:
            raise ValueError(f"UniPC needs steps >= order, got steps={steps}, order={order}")
        check_choice("skip_type", skip_type, SKIP_TYPES)
        if t_0 == 0 and (denoise_to_zero or self.predict == "noise"):
            raise ValueError("t_end=0 (σ = 0) needs algorithm_type='data_prediction' (the noise-prediction update "
                             "has σ_t·(e^h − 1) = 0·∞ there) and no denoise_to_zero (it already ends at the data)")
        spacing = skip_type if grid is None else tuple(grid.tolist())
        key = ("unipc", steps, t_T, t_0, order, spacing, bool(lower_order_final), bool(denoise_to_zero),
               bool(return_intermediate))

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            ts = tr.points(self.grid(skip_type, t_T, t_0, steps) if grid is None else grid)
            x = unipc_multistep(tr, x, ts, self.zero_end(unipc_orders(steps, order, lower_order_final), t_0),
                                [s < steps for s in range(1, steps + 1)],
                                self.variant, hooks)
            if denoise_to_zero:
                p = tr.point(t_0)
                x = hooks(tr.model(x, p, predict="data"), p, steps + 1)
            return x

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress)
