"""Measured convergence order of every deterministic sampler, pydpm's and the oracle's, on the analytic
Gaussian mixture: the RMS distance to a near-exact solution of the probability-flow ODE (RK4 in λ, 1000
steps, error ≈ 2e-10), fitted as error ∝ NFE^(−p) over step counts in the asymptotic range.

Setting: linear VP schedule, logSNR time steps (uniform in λ, so no step-size variation muddies the order),
t: 1 → 1e-3, 64 starting points in D = 30 around a 3-component mixture of overlapping components.

Orders, as measured and as expected from the update formulas (not always the advertised ones):
  DDIM / DPM-Solver-1, UniPC-vary_coeff p ≥ 2 ...... 1
  multistep DPM-Solver(++)-2, singlestep-2 .......... 2
  multistep DPM-Solver(++)-3 ........................ 2  (the authors' 3M formula, see below)
  multistep DPM-Solver(++)-3, third_order='corrected' 3
  singlestep DPM-Solver(++)-3 ....................... 3
  UniPC-p (bh1, bh2), UniPC-1 vary_coeff ............ p + 1 (predictor p, corrector +1; lower_order_final off,
                                                      since a final first-order step would cap it at 2)
  PLMS, S-PNDM, F-PNDM .............................. 2  (their Adams–Bashforth weights assume equal steps in
                                                      σ/α; on any other grid they are second order)

DPM-Solver(++)-3M: the authors' code (and diffusers) uses D2 = (D1_0 − D1_1)/(r0 + r1), which estimates
h²·m''/2, with the weight φ3 that needs h²·m''; the update is therefore only second-order accurate
(test_multistep_third_order_update_is_second_order_accurate shows it on one step). pydpm reproduces the
authors' update, so its 3M converges at order 2; `third_order='corrected'` doubles D2 and converges at order 3.
Its oracle is written independently of the φ functions: the multistep exponential integrator that interpolates
the last three data predictions by a polynomial in λ and integrates ∫ e^λ q(λ) dλ by quadrature.

UniPC 'vary_coeff' with p ≥ 2: the authors' corrector weights the new model output only by g_K·A_c[k][-1],
k left over from a loop (K − 2), instead of summing over all rows of A_c = C⁻¹: the corrector is inconsistent
and the method first order (with the full sum it measures p + 1). pydpm reproduces the authors' code.

The stochastic samplers (DDPM, SDE-DPM-Solver++) draw fresh noise per step, so they have no pathwise
limit to converge to; test_stochastic_samplers_sample_the_mixture checks their distribution instead.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pydpm
import samplers_oracle as O
from gaussian_mixture import GaussianMixture
from pydpm.samplers import DPMSolver, UniPC
from pydpm.schedules import NoiseScheduleVP, model_wrapper

DIM, BATCH = 30, 64
T_START, T_END = 1.0, 1e-3
TOL = 0.3  # |measured order − expected order|
COARSE, FINE = (32, 64, 128), (64, 128, 256)


pytestmark = pytest.mark.usefixtures("one_thread")


class Problem:
    def __init__(self):
        self.osched = O.VPLinear()
        self.psched = NoiseScheduleVP("linear", dtype=torch.float64)
        self.gm = GaussianMixture.random(self.osched, DIM, seed=1, spread=0.3)
        self.x = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.model = model_wrapper(self.gm.model_fn("noise"), self.psched)
        self.exact = O.ode_solution(self.gm.eps, self.osched, self.x, T_START, T_END, n=1000)

    def error(self, x: torch.Tensor) -> float:
        return float((x - self.exact).square().mean().sqrt())


@pytest.fixture(scope="module")
def problem():
    return Problem()


def _dpm(algorithm_type, method, order, solver_type="dpmsolver"):
    kw = dict(order=order, method=method, solver_type=solver_type, skip_type="logSNR")
    return {
        "pydpm": lambda p, n: DPMSolver(p.model, p.psched, algorithm_type=algorithm_type).sample(p.x, steps=n, **kw),
        "oracle": lambda p, n: O.dpm_solver(p.gm.eps, p.osched, p.x, n, algorithm_type=algorithm_type, **kw),
    }


def _unipc(variant, order, algorithm_type="data_prediction"):
    kw = dict(order=order, skip_type="logSNR", lower_order_final=False)
    return {
        "pydpm": lambda p, n: UniPC(p.model, p.psched, algorithm_type=algorithm_type, variant=variant).sample(
            p.x, steps=n, **kw),
        "oracle": lambda p, n: O.unipc(p.gm.eps, p.osched, p.x, n, algorithm_type=algorithm_type, variant=variant,
                                       **kw),
    }


def interpolating_multistep(p, steps: int, order: int = 3, predict: str = "data") -> torch.Tensor:
    """The multistep exponential integrator from first principles: x_t = (σ_t/σ_s)·x_s + σ_t·∫_{λ_s}^{λ_t} e^λ q(λ) dλ
    with q the Lagrange polynomial in λ through the last min(order, step) data predictions (so the first steps
    are of lower order, as the authors' warm-up); with predict='noise', x_t = (α_t/α_s)·x_s − α_t·∫ e^−λ q(λ) dλ
    over the noise predictions. Integrated by 24-node Gauss–Legendre quadrature (exact to rounding for a
    polynomial times an exponential over these steps). On logSNR steps, float64."""
    sched, x = p.osched, p.x
    data = predict == "data"
    ts = O.time_steps(sched, "logSNR", T_START, T_END, steps)
    lams = [float(v) for v in sched.lam(ts)]
    nodes, weights = np.polynomial.legendre.leggauss(24)
    known: list[tuple[float, torch.Tensor]] = []
    for i in range(steps):
        known = (known + [(lams[i], p.gm.x0(x, ts[i]) if data else p.gm.eps(x, ts[i]))])[-order:]
        a, b = lams[i], lams[i + 1]
        integral = torch.zeros_like(x)
        for node, w in zip(nodes, weights):
            tau = 0.5 * (b - a) * node + 0.5 * (a + b)
            q = sum(m * math.prod((tau - lj) / (li - lj) for lj, _ in known if lj != li) for li, m in known)
            integral = integral + (w * 0.5 * (b - a) * math.exp(tau if data else -tau)) * q
        if data:
            x = (sched.sigma(ts[i + 1]) / sched.sigma(ts[i])) * x + sched.sigma(ts[i + 1]) * integral
        else:
            x = (sched.alpha(ts[i + 1]) / sched.alpha(ts[i])) * x - sched.alpha(ts[i + 1]) * integral
    return x


def _corrected(algorithm_type):
    kw = dict(order=3, method="multistep", solver_type="taylor", skip_type="logSNR", third_order="corrected")
    return {
        "pydpm": lambda p, n: DPMSolver(p.model, p.psched, algorithm_type=algorithm_type).sample(p.x, steps=n, **kw),
        "oracle": lambda p, n: interpolating_multistep(p, n, predict=DPMSolver.algorithm_types[algorithm_type]),
    }


def _sample(method):
    return {
        "pydpm": lambda p, n: pydpm.sample(p.model, p.x, p.psched, method, n, skip_type="logSNR"),
        "oracle": lambda p, n: O.sample(p.gm.eps, p.osched, p.x, method, n, skip_type="logSNR"),
    }


# id: (runs, expected order, step counts)
CASES = {
    "ddim": (_sample("ddim"), 1, COARSE),
    "dpm++-1M": (_dpm("dpmsolver++", "multistep", 1), 1, COARSE),
    "dpm-2M": (_dpm("dpmsolver", "multistep", 2), 2, COARSE),
    "dpm++-2M": (_dpm("dpmsolver++", "multistep", 2), 2, COARSE),
    "dpm++-2M-taylor": (_dpm("dpmsolver++", "multistep", 2, "taylor"), 2, COARSE),
    "dpm-3M": (_dpm("dpmsolver", "multistep", 3), 2, FINE),
    "dpm++-3M": (_dpm("dpmsolver++", "multistep", 3), 2, FINE),
    "dpm++-3M-corrected": (_corrected("dpmsolver++"), 3, FINE),
    "dpm-3M-corrected": (_corrected("dpmsolver"), 3, FINE),
    "dpm-2S": (_dpm("dpmsolver", "singlestep_fixed", 2), 2, COARSE),
    "dpm++-2S-taylor": (_dpm("dpmsolver++", "singlestep_fixed", 2, "taylor"), 2, COARSE),
    "dpm-3S": (_dpm("dpmsolver", "singlestep_fixed", 3), 3, (96, 192, 384)),
    "dpm++-3S": (_dpm("dpmsolver++", "singlestep_fixed", 3), 3, (96, 192, 384)),
    "dpm-3S-taylor": (_dpm("dpmsolver", "singlestep_fixed", 3, "taylor"), 3, (96, 192, 384)),
    "unipc-bh1-1": (_unipc("bh1", 1), 2, COARSE),
    "unipc-bh1-2": (_unipc("bh1", 2), 3, COARSE),
    "unipc-bh2-2": (_unipc("bh2", 2), 3, COARSE),
    "unipc-bh2-2-noise": (_unipc("bh2", 2, "noise_prediction"), 3, COARSE),
    "unipc-bh1-3": (_unipc("bh1", 3), 4, FINE),
    "unipc-vary-1": (_unipc("vary_coeff", 1), 2, COARSE),
    "unipc-vary-2": (_unipc("vary_coeff", 2), 1, FINE),
    "plms": (_sample("plms"), 2, COARSE),
    "s-pndm": (_sample("s-pndm"), 2, COARSE),
    "f-pndm": (_sample("f-pndm"), 2, COARSE),
}


def measured_order(errors, steps) -> float:
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("impl", ["pydpm", "oracle"])
@pytest.mark.parametrize("name", list(CASES))
def test_convergence_order(problem, name, impl):
    runs, expected, steps = CASES[name]
    errors = [problem.error(runs[impl](problem, n)) for n in steps]
    order = measured_order(errors, steps)
    table = ", ".join(f"{n}: {e:.2e}" for n, e in zip(steps, errors))
    assert errors[-1] > 2e-8, f"{name}: error {errors[-1]:.1e} too near the reference's own (2e-10): {table}"
    assert abs(order - expected) <= TOL, f"{name} ({impl}): measured order {order:.2f}, expected {expected}; {table}"


def test_reference_solution_is_converged(problem):
    """RK4 with 500 steps against 1000: the difference is 15× the 1000-step error (order 4), which must be far
    below the smallest error an order fit uses (2e-8)."""
    coarser = O.ode_solution(problem.gm.eps, problem.osched, problem.x, T_START, T_END, n=500)
    assert problem.error(coarser) / 15 < 1e-9


def test_multistep_third_order_update_is_second_order_accurate():
    """One DPM-Solver++-3M step with exact history for a data prediction m(λ) = λ² (x-independent), against
    the exact integral x_t/σ_t − x_s/σ_s = ∫ e^λ m dλ: the authors' update (which pydpm follows, see
    test_samplers_oracle) is off by O(h³) per step, i.e. second order; with the Taylor-consistent
    D2 = 2(D1_0 − D1_1)/(r0 + r1) it is exact for this quadratic."""
    sched = O.Flow()  # any schedule: the step is exact up to the m-approximation; flow has closed forms
    lam_t0 = 0.5

    def local_error(h):
        lams = torch.tensor([lam_t0 - 2 * h, lam_t0 - h, lam_t0, lam_t0 + h], dtype=torch.float64)
        ts = sched.inverse_lambda(lams)
        ms = [torch.full((1, 1), float(l) ** 2, dtype=torch.float64) for l in lams[:3]]
        model = O._Model(lambda x, t: None, sched, predict_x0=True)
        x_s = torch.zeros(1, 1, dtype=torch.float64)
        x_t = O.dpm_multistep_update(model, x_s, ms, list(ts[:3]), ts[3], 3)
        a, b = float(lams[2]), float(lams[3])
        integral = math.exp(b) * (b * b - 2 * b + 2) - math.exp(a) * (a * a - 2 * a + 2)  # ∫ e^λ λ² dλ
        return abs(float(x_t) / float(sched.sigma(ts[3])) - integral)

    e1, e2 = local_error(0.1), local_error(0.05)
    assert e1 > 1e-6, "exact for a quadratic: the update would be third order"
    assert abs(math.log2(e1 / e2) - 3.0) < 0.2  # local error O(h³): global order 2


def test_corrected_third_order_equals_the_interpolating_integrator(problem):
    """DPM-Solver(++)-3M with third_order='corrected' (and the exact φ2 weight of solver_type='taylor' in its
    second-order warm-up step) is the exponential integrator of the quadratic through the last three
    predictions: the same trajectory as the independent quadrature oracle, to rounding."""
    for algorithm_type, steps in (("dpmsolver++", 5), ("dpmsolver++", 12), ("dpmsolver", 7)):
        solver = DPMSolver(problem.model, problem.psched, algorithm_type=algorithm_type)
        ours = solver.sample(problem.x, steps=steps, order=3, skip_type="logSNR", solver_type="taylor",
                             third_order="corrected", lower_order_final=False, t_start=T_START, t_end=T_END)
        oracle = interpolating_multistep(problem, steps, predict=solver.algorithm_types[algorithm_type])
        torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-9)
        authors = solver.sample(problem.x, steps=steps, order=3, skip_type="logSNR", solver_type="taylor",
                                lower_order_final=False, t_start=T_START, t_end=T_END)
        assert (authors - oracle).abs().max() > 1e-6, "the authors' update must differ from the corrected one"


def test_stochastic_samplers_sample_the_mixture():
    """DDPM (200 steps) and SDE-DPM-Solver++(2M) (50 steps) from N(0, I) reproduce p0's mean and covariance
    in D = 2 with 20 000 samples. Measured: covariance off by 0.018 (DDPM, first order in distribution) and
    0.004; with the noise scaled by 0.9 or 1.1 these become 0.07–0.1."""
    sched = NoiseScheduleVP("linear", dtype=torch.float64)
    gm = GaussianMixture([0.3, 0.7], [[1.5, 0.0], [-0.5, 1.0]], [0.3, 0.5], O.VPLinear())
    model = model_wrapper(gm.model_fn("noise"), sched)
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = gm.sample(200000, generator=torch.Generator().manual_seed(1))
    mean, cov = data.mean(0), torch.cov(data.T)
    for method, steps in (("ddpm", 200), ("sde-dpmsolver++", 50)):
        y = pydpm.sample(model, x, sched, method, steps, seed=3, skip_type="logSNR")
        assert (y.mean(0) - mean).abs().max() < 0.03, method
        assert (torch.cov(y.T) - cov).abs().max() < 0.04, method


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_solver_meets_its_tolerance(problem, order):
    """DPM-Solver-12 / -23 (method='adaptive'): the error to the ODE solution follows atol = rtol (the data are
    O(1)), within a factor 3, and shrinks with it."""
    errors = []
    for tol in (1e-2, 1e-3, 1e-4):
        y = DPMSolver(problem.model, problem.psched).sample(problem.x, method="adaptive", order=order, atol=tol,
                                                            rtol=tol)
        errors.append(problem.error(y))
        assert errors[-1] < 3 * tol, f"order {order}, tol {tol}: error {errors[-1]:.2e}"
    assert errors[0] > errors[1] > errors[2]
