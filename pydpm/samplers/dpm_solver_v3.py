"""DPM-Solver-v3 (Zheng, Lu, Bao, Zhu; NeurIPS 2023): a multistep ODE solver re-parameterised by the model's
empirical statistics (EMS, `pydpm.samplers.ems`), with a pseudo-order predictor and corrector that cost no
extra model calls.

With f = (σ·ε − l·x)/α the ODE integrates exactly to

    x_t = (α_t/α_s)·e^{L_s − L_t}·x_s − α_t·e^{−L_t}·∫_s^t e^{L(λ)}·f(λ) dλ,      L = ∫ l dλ, S = ∫ s dλ,

and g = e^{−S}·f − B (B = ∫ e^{−S}·b) changes slowly in λ when the statistics fit the model. A step
approximates g by a polynomial through g at the last few points (order n uses n points): the
interpolating polynomial, or with `pseudo` the Taylor form whose k-th derivative is k!·g[λ_0 … λ_k] (the
k-th divided difference of the k + 1 newest points; the paper's pseudo-order). Every coefficient is then
one integral of e^{L+S} times a polynomial (Gauss-Legendre between the statistics' grid points, exact to
rounding), the b terms one constant tensor per step: a step is one fused `solver_step` launch.

The corrector redoes the last step with the new point included; f at that point is kept (f is the model's
output less its linear part, which the EMS make nearly independent of x), so it needs no model call.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from pydpm.samplers._common import Solver, after_step, check_choice, check_order
from pydpm.samplers._program import Point
from pydpm.samplers.ems import EMS, Integrals, guidance_of
from pydpm.schedules import SKIP_TYPES, NoiseScheduleFlow, NoiseScheduleVP


def basis(lams: list[float], nodes: torch.Tensor, pseudo: bool) -> torch.Tensor:
    """[n, Q]: the weight of g at each point λ_j (j = 0 the step's start) in the polynomial that approximates g,
    at the nodes. Interpolation: the Lagrange basis. Pseudo: Σ_k (λ − λ_0)^k·g[λ_0 … λ_k], the divided
    difference written as Σ_{j≤k} g_j / Π_{m≤k, m≠j} (λ_j − λ_m)."""
    n = len(lams)
    rows = []
    for j in range(n):
        if not pseudo:
            phi = torch.ones_like(nodes)
            for m in range(n):
                if m != j:
                    phi = phi * (nodes - lams[m]) / (lams[j] - lams[m])
        else:
            phi = torch.zeros_like(nodes)
            for k in range(j, n):
                den = math.prod(lams[j] - lams[m] for m in range(k + 1) if m != j)
                phi = phi + (nodes - lams[0]) ** k / den
        rows.append(phi)
    return torch.stack(rows)


def v3_update(tr, integ: Integrals, x, ps: list[Point], fs: list, t: Point, pseudo: bool):
    """One DPM-Solver-v3 step from ps[0] to t with f at the points ps (ps[0] the start, then in the order the
    polynomial takes them)."""
    s = ps[0]
    lams = [p.lam for p in ps]
    lam = torch.tensor([*lams, t.lam], dtype=torch.float64)
    L, S = integ.integral("l", lam), integ.integral("s", lam)
    L_s, L_t = float(L[0]), float(L[-1])
    nodes, weights = integ.quadrature(s.lam, t.lam)
    kernel = weights * torch.exp(integ.integral("l", nodes) - L_t + integ.integral("s", nodes))
    W = basis(lams, nodes, pseudo) @ kernel
    y = (t.alpha / s.alpha * math.exp(L_s - L_t)) * x
    for j, f in enumerate(fs):
        y = y + (-t.alpha * math.exp(-float(S[j])) * float(W[j])) * f
    if integ.ems.has_b:
        b_nodes = integ.b_integral(s.lam, nodes)
        b_points = integ.b_integral(s.lam, lam[:-1])
        kappa = -t.alpha * (kernel @ b_nodes - W @ b_points)
        y = y + tr.constant((kappa @ integ.b).reshape(integ.ems.sample_shape))
    return y


def v3_orders(steps: int, order: int | Sequence[int], lower_order_final: bool) -> list[int]:
    """The predictor's order at each step: 1, 2, … while the history builds; with lower_order_final also
    at most the steps left (the authors' rule, at any step count). A sequence is each step's order, as given."""
    if not isinstance(order, int):
        return list(order)
    out = []
    for step in range(1, steps + 1):
        o = min(step, order)
        out.append(min(o, steps + 1 - step) if lower_order_final else o)
    return out


def dpm_solver_v3(tr, integ: Integrals, x, ts: list[Point], orders: list[int], p_pseudo: bool,
                  correctors: list[bool], c_pseudo: bool, hooks):
    """DPM-Solver-v3 over the times ts; step i + 1 predicts at orders[i]; where correctors[i], the corrector
    (order of that step's predictor, + 1 with c_pseudo) redoes step i + 1 once the model has been called at its
    end (len(ts) − 2 entries: the last step's end is never evaluated)."""
    def model(x, p: Point):
        l_p = float(integ.hat(torch.tensor([p.lam], dtype=torch.float64)) @ integ.ems.l)
        return tr.model(x, p, affine=(-l_p / p.alpha, p.sigma / p.alpha))

    steps = len(ts) - 1
    fs, x_prev = [model(x, ts[0])], None
    x = hooks(x, ts[0], 0)
    for step in range(1, steps + 1):
        if step > 1 and correctors[step - 2]:
            c_order = orders[step - 2] + (1 if c_pseudo else 0)
            if c_order > 1:  # points: the step's start, its end (just evaluated), then older ones
                idx = [step - 2, step - 1] + [step - 3 - k for k in range(c_order - 2)]
                x = v3_update(tr, integ, x_prev, [ts[i] for i in idx], [fs[i] for i in idx], ts[step - 1], c_pseudo)
        o = orders[step - 1]
        idx = [step - 1 - k for k in range(o)]
        x_prev = x
        x = v3_update(tr, integ, x, [ts[i] for i in idx], [fs[i] for i in idx], ts[step], p_pseudo)
        x = hooks(x, ts[step], step)
        if step < steps:
            fs.append(model(x, ts[step]))
    return x


def _per_step(value) -> bool:
    """Whether an order / use_corrector argument is given per step (a list or tuple; a string is neither)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _step_orders(order: Sequence, steps: int) -> tuple[int, ...]:
    """Per-step predictor orders, checked: `steps` of them, step i (from 1) of order 1 to min(3, i)."""
    if len(order) != steps:
        raise ValueError(f"order has {len(order)} entries for {steps} steps: give one order per step (or one int)")
    out = []
    for i, o in enumerate(order, 1):
        if isinstance(o, bool) or not isinstance(o, numbers.Integral):
            raise TypeError(f"order[{i - 1}]={o!r} must be an int, 1-3")
        if not 1 <= o <= min(3, i):
            raise ValueError(f"order[{i - 1}]={o}: step {i} has {i} point(s) to use; its order must be in "
                             f"1..{min(3, i)}")
        out.append(int(o))
    return tuple(out)


def _step_correctors(use_corrector: Sequence, steps: int) -> list[bool]:
    """Per-step corrector use, checked: `steps` − 1 bools (the last step is never corrected)."""
    if len(use_corrector) != steps - 1:
        raise ValueError(f"use_corrector has {len(use_corrector)} entries for {steps} steps: give one bool per step "
                         f"but the last ({steps - 1}; its end is never evaluated), or one bool")
    for i, c in enumerate(use_corrector):
        if not isinstance(c, bool):
            raise TypeError(f"use_corrector[{i}]={c!r} must be a bool")
    return list(use_corrector)


class DPMSolverV3(Solver):
    """DPM-Solver-v3 with statistics `ems` (`pydpm.samplers.compute_ems`), one fused launch per model call.

    Args:
        model_fn: the model function (x, t) -> ε (normally `pydpm.schedules.model_wrapper(...)`), the one the
            EMS were computed for (the same guidance scale).
        noise_schedule: the schedule the EMS belong to.
        ems: an `EMS`; None with degenerated=True.
        degenerated: use l = 1, s = 0, b = 0 instead of EMS: the method is then DPM-Solver++ in its Taylor form
            (order 2: solver_type='taylor'; order 3: third_order='corrected'), plus the corrector if used.
        correcting_xt_fn: None, or a function (x_t, t, step) -> x_t applied after every step.
    """

    algorithm_types = {"dpmsolver-v3": "noise"}
    default_algorithm = "dpmsolver-v3"

    def __init__(self, model_fn: Callable[..., torch.Tensor], noise_schedule: NoiseScheduleVP | NoiseScheduleFlow,
                 ems: EMS | None = None, *, degenerated: bool = False,
                 correcting_xt_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None) -> None:
        super().__init__(model_fn, noise_schedule, "dpmsolver-v3", None, correcting_xt_fn, 1.0, 0.995)
        if not isinstance(degenerated, bool):
            raise TypeError(f"degenerated={degenerated!r} must be a bool")
        if degenerated:
            if ems is not None:
                raise ValueError("DPMSolverV3: degenerated=True replaces the EMS by l = 1, s = 0, b = 0; pass ems=None")
        elif not isinstance(ems, EMS):
            raise TypeError(f"DPMSolverV3: ems must be the statistics of the model (an EMS from "
                            f"pydpm.samplers.compute_ems(model_fn, noise_schedule, data) or EMS.load(path)), got "
                            f"{type(ems).__name__}; degenerated=True runs without them (DPM-Solver++)")
        else:
            ems.check(noise_schedule, guidance_of(model_fn), "DPMSolverV3")
        self.ems = ems

    def sample(self, x: torch.Tensor, steps: int = 10, t_start: float | None = None, t_end: float | None = None,
               order: int | Sequence[int] = 3, skip_type: str = "time_uniform", p_pseudo: bool = False,
               use_corrector: bool | Sequence[bool] = True, c_pseudo: bool = True, lower_order_final: bool = True,
               return_intermediate: bool = False, cuda_graph: bool = False, progress: bool = False,
               times: Sequence[float] | torch.Tensor | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample from x at t_start to t_end with `steps` model calls (defaults: the authors' for unguided
        sampling; they turn the corrector off for guided sampling).

        Args:
            x: the starting sample: float32, float16 or bfloat16 (float64 on the CPU), [B, *sample_shape] with the
                EMS's sample shape; not modified.
            steps: model calls.
            t_start, t_end: the interval (default T and 1/N), inside the EMS's (t_end > 0).
            order: the predictor's order, 1-3; or each step's order, a sequence of `steps` ints with step i
                (from 1) of order at most i (the points it has; lower_order_final does not apply to it).
            skip_type: 'time_uniform', 'logSNR', 'time_quadratic' or 'karras'.
            p_pseudo, c_pseudo: pseudo-order (divided differences of the newest points) for the predictor /
                corrector; c_pseudo also raises the corrector's order by one.
            use_corrector: correct each step once its end has been evaluated (no extra model call); or, per
                step, a sequence of `steps` − 1 bools (the last step's end is never evaluated).
            lower_order_final: cap the order at the steps left.
            return_intermediate: also return the samples after every step (predicted, before correction).
            cuda_graph: capture the whole loop in a CUDA graph.
            progress: a progress bar over model calls.
            times: an explicit decreasing time grid instead of steps, t_start, t_end and skip_type.
        """
        per_step_orders = _per_step(order)
        if not per_step_orders:
            order = check_order(order, (1, 2, 3))
        per_step_correctors = _per_step(use_corrector)
        for name, v in (("p_pseudo", p_pseudo), ("c_pseudo", c_pseudo), ("lower_order_final", lower_order_final),
                        *((("use_corrector", use_corrector),) if not per_step_correctors else ())):
            if not isinstance(v, bool):
                raise TypeError(f"{name}={v!r} must be a bool")
        if times is not None:
            grid = self.explicit_times(times, t_start, t_end)
            if not bool((grid.diff() < 0).all()):
                raise ValueError("DPMSolverV3: times must decrease (the solver samples; it does not invert)")
            t_T, t_0, steps = float(grid[0]), float(grid[-1]), grid.numel() - 1
        else:
            grid = None
            steps = self.check_steps(steps)
            check_choice("skip_type", skip_type, SKIP_TYPES)
            t_T, t_0 = self.time_range(t_start, t_end)
            if t_T < t_0:
                raise ValueError("DPMSolverV3 samples from t_start down to t_end (t_start > t_end)")
        if per_step_orders:
            order = _step_orders(order, steps)
        correctors = (_step_correctors(use_corrector, steps) if per_step_correctors
                      else [bool(use_corrector)] * (steps - 1))
        if t_0 == 0:
            raise ValueError("DPMSolverV3: t_end=0 (σ = 0) has λ = ∞, outside any EMS grid; use t_end > 0")
        if (self.ems is not None and self.ems.has_b and isinstance(x, torch.Tensor)
                and tuple(x.shape[1:]) != self.ems.sample_shape):  # b adds a constant of one sample's shape
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])}, the EMS {self.ems.sample_shape}: the "
                             f"statistics belong to samples of that shape")
        spacing = skip_type if grid is None else tuple(grid.tolist())
        key = ("v3", steps, t_T, t_0, order, spacing, p_pseudo, tuple(correctors), c_pseudo, lower_order_final,
               return_intermediate)

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            ts = tr.points(self.grid(skip_type, t_T, t_0, steps) if grid is None else grid)
            lams = [p.lam for p in ts]
            if self.ems is None:
                ems = EMS.degenerated(torch.tensor([min(lams), max(lams)], dtype=torch.float64))
            else:
                ems = self.ems
            integ = Integrals(ems)
            integ.check_range(lams, "DPMSolverV3")
            orders = v3_orders(steps, order, lower_order_final)
            return dpm_solver_v3(tr, integ, x, ts, orders, p_pseudo, correctors, c_pseudo, hooks)

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress)
