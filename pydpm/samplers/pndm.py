"""PNDM (Liu et al., ICLR 2022): pseudo numerical methods on the DDIM transfer φ.

'plms': pseudo improved Euler first step, then pseudo linear multistep of growing order (2, 3, 4) —
the PLMS of latent diffusion and diffusers. 's-pndm': improved Euler first step, then the 2-step
formula. 'f-pndm': three pseudo Runge–Kutta (4-stage) steps, then the 4-step formula.
"""
from __future__ import annotations

from pydpm.samplers._common import Solver, after_step, check_choice
from pydpm.samplers._program import Point
from pydpm.schedules import SKIP_TYPES

VARIANTS = ("plms", "s-pndm", "f-pndm")
# Adams–Bashforth weights, newest first.
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer(x, eps, s: Point, t: Point):
    """φ(x, ε, s, t): the DDIM step from s to t with noise estimate ε."""
    return (t.alpha / s.alpha) * x + (t.sigma - t.alpha * s.sigma / s.alpha) * eps


def pseudo_improved_euler(tr, x, s: Point, t: Point):
    e1 = tr.model(x, s)
    e2 = tr.model(transfer(x, e1, s, t), t)
    return transfer(x, 0.5 * (e1 + e2), s, t), e1


def pseudo_runge_kutta(tr, x, s: Point, t: Point):
    mid = tr.point(0.5 * (s.t + t.t))
    e1 = tr.model(x, s)
    e2 = tr.model(transfer(x, e1, s, mid), mid)
    e3 = tr.model(transfer(x, e2, s, mid), mid)
    e4 = tr.model(transfer(x, e3, s, t), t)
    return transfer(x, (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0, s, t), e1


def pseudo_linear_multistep(tr, x, s: Point, t: Point, history, n: int):
    """Adams–Bashforth with the newest n noise estimates (the model at s joins the history)."""
    history = history + [tr.model(x, s)]
    eps = sum(w * e for w, e in zip(AB_WEIGHTS[n], reversed(history[-n:])))
    return transfer(x, eps, s, t), history[-1]


def pndm(tr, x, ts: list[Point], variant: str, hooks):
    history = []
    for i in range(len(ts) - 1):
        s, t = ts[i], ts[i + 1]
        if variant == "f-pndm" and i < 3:
            x, e = pseudo_runge_kutta(tr, x, s, t)
        elif i == 0 and variant != "f-pndm":
            x, e = pseudo_improved_euler(tr, x, s, t)
        else:
            n = 2 if variant == "s-pndm" else min(len(history) + 1, 4)
            x, e = pseudo_linear_multistep(tr, x, s, t, history, n)
        history = (history + [e])[-3:]
        x = hooks(x, t, i)
    return x


class PNDM(Solver):
    """PNDM sampler: variant 'plms' (NFE = steps + 1), 's-pndm' (steps + 1) or 'f-pndm' (steps + 9)."""

    algorithm_types = {"noise_prediction": "noise"}

    def __init__(self, model_fn, noise_schedule, variant: str = "plms", correcting_xt_fn=None):
        check_choice("variant", variant, VARIANTS)
        super().__init__(model_fn, noise_schedule, "noise_prediction", None, correcting_xt_fn, 1.0, 0.995)
        self.variant = variant

    def sample(self, x, steps=20, t_start=None, t_end=None, skip_type="time_uniform", return_intermediate=False,
               cuda_graph=False, progress=False):
        steps = self.check_steps(steps)
        check_choice("skip_type", skip_type, SKIP_TYPES)
        t_T, t_0 = self.time_range(t_start, t_end)
        key = ("pndm", steps, t_T, t_0, skip_type, bool(return_intermediate))

        def program(tr, x):
            hooks = after_step(tr, self.correcting_xt_fn, return_intermediate)
            return pndm(tr, x, tr.points(self.grid(skip_type, t_T, t_0, steps)), self.variant, hooks)

        return self.run_traced(x, key, program, return_intermediate, cuda_graph, progress)
