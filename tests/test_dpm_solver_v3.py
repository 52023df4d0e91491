"""DPM-Solver-v3 and its empirical model statistics (EMS).

- degenerated=True (l = 1, s = 0, b = 0) is DPM-Solver++ in its Taylor form, to rounding;
- the fused solver equals an independent float64 implementation written from the paper in the authors' form
  (g relative to the step's start, cumulative integrals I, B, C on a fine grid by Simpson's rule, derivatives by
  a Vandermonde solve or divided differences, the corrector re-expressing ε so that σ·ε − l·x is kept), with
  random statistics, every predictor / corrector option and orders 1-3;
- compute_ems recovers the statistics of Gaussian data, which are known in closed form;
- with EMS computed from data samples it converges at its order and beats the best official solver at few steps.
"""
from __future__ import annotations

import math

import pytest
import torch

import samplers_oracle as O
from gaussian_mixture import GaussianMixture
from pydpm.samplers import DPMSolver, DPMSolverV3, EMS, UniPC, compute_ems
from pydpm.samplers.ems import estimate_statistics
from pydpm.schedules import NoiseScheduleVP, model_wrapper

pytestmark = pytest.mark.usefixtures("one_thread")

T_START, T_END = 1.0, 1e-3


def gaussian_mixture(dim, batch, seed, spread, x_seed):
    """(schedule, mixture, its exact noise-prediction model, starting noise [batch, dim]) on the linear VP schedule."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    gm = GaussianMixture.random(O.VPLinear(), dim, seed=seed, spread=spread)
    x = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(x_seed))
    return ns, gm, model_wrapper(gm.model_fn("noise"), ns), x


@pytest.fixture(scope="module")
def mixture():
    return gaussian_mixture(6, 8, seed=3, spread=0.5, x_seed=1)


def random_ems(ns, shape, seed=0, points=25):
    """Statistics with every term active: l and s vary over λ, b per element."""
    g = torch.Generator().manual_seed(seed)
    lam = ns.marginal_lambda(torch.tensor([T_START, T_END], dtype=torch.float64))
    lambdas = torch.linspace(float(lam[0]) - 0.1, float(lam[1]) + 0.1, points, dtype=torch.float64)
    u = (lambdas - lambdas[0]) / (lambdas[-1] - lambdas[0])
    l = 0.6 + 0.3 * torch.sin(5 * u) + 0.05 * torch.rand(points, generator=g, dtype=torch.float64)
    s = 0.4 * torch.cos(4 * u) - 0.2 + 0.05 * torch.rand(points, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(points, *shape, generator=g, dtype=torch.float64)
    return EMS(lambdas, l, s, b)


OPTIONS = [dict(p_pseudo=p, use_corrector=c, c_pseudo=cp) for p in (False, True) for c in (False, True)
           for cp in ((False, True) if c else (False,))]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
def test_matches_an_independent_implementation(mixture, order, opts):
    ns, gm, model, x = mixture
    ems = random_ems(ns, x.shape[1:])
    steps = 7
    ts = O.time_steps(O.VPLinear(), "time_quadratic", T_START, T_END, steps)
    times = torch.tensor([float(t) for t in ts], dtype=torch.float64)
    got = DPMSolverV3(model, ns, ems).sample(x, times=times, order=order, **opts)
    oracle = O.DPMSolverV3(ems.lambdas, ems.l, ems.s, ems.b, [float(O.VPLinear().lam(t)) for t in ts])
    want = oracle.sample(gm.eps, O.VPLinear(), x, ts, order, **opts)
    assert torch.isfinite(got).all()
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-8 * scale, float((got - want).abs().max())


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
def test_per_step_orders_and_correctors_match_the_independent_implementation(mixture, opts):
    ns, gm, model, x = mixture
    ems = random_ems(ns, x.shape[1:], seed=2)
    orders, correctors = [1, 2, 1, 3, 3, 2, 1], [True, False, False, True, True, False]
    ts = O.time_steps(O.VPLinear(), "logSNR", T_START, T_END, len(orders))
    times = torch.tensor([float(t) for t in ts], dtype=torch.float64)
    use_corrector = correctors if opts["use_corrector"] else [False] * 6
    got = DPMSolverV3(model, ns, ems).sample(x, times=times, order=orders, p_pseudo=opts["p_pseudo"],
                                             use_corrector=use_corrector, c_pseudo=opts["c_pseudo"])
    oracle = O.DPMSolverV3(ems.lambdas, ems.l, ems.s, ems.b, [float(O.VPLinear().lam(t)) for t in ts])
    want = oracle.sample(gm.eps, O.VPLinear(), x, ts, orders, opts["p_pseudo"], use_corrector, opts["c_pseudo"])
    assert float((got - want).abs().max()) <= 1e-8 * float(want.abs().max()), float((got - want).abs().max())
    # the per-step forms of the authors' schedule are that schedule
    uniform = DPMSolverV3(model, ns, ems).sample(x, times=times, order=3, **opts)
    spelled = DPMSolverV3(model, ns, ems).sample(x, times=times, order=[1, 2, 3, 3, 3, 2, 1], p_pseudo=opts["p_pseudo"],
                                                 use_corrector=[opts["use_corrector"]] * 6, c_pseudo=opts["c_pseudo"])
    assert torch.equal(uniform, spelled)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
def test_the_independent_implementation_takes_statistics_per_element(opts):
    """With l and s per element (the paper's form) and a model acting on each element alone, element j of the
    oracle's run is pydpm's fused solver on that element's one-dimensional problem with element j's statistics;
    and per-element statistics equal in every element are the scalar ones."""
    ns, dim = NoiseScheduleVP("linear", dtype=torch.float64), 5
    g = torch.Generator().manual_seed(11)
    gain = 0.5 + torch.rand(dim, generator=g, dtype=torch.float64)
    shift = torch.randn(dim, generator=g, dtype=torch.float64)

    def eps(x, t):  # elementwise in x, nonlinear
        t = t.reshape(-1, 1).to(x.dtype)
        return torch.tanh(gain * x) + 0.3 * t * shift

    ems = [random_ems(ns, (1,), seed=20 + j) for j in range(dim)]
    lambdas = ems[0].lambdas
    per_element = (torch.stack([e.l for e in ems], 1), torch.stack([e.s for e in ems], 1),
                   torch.cat([e.b for e in ems], 1))
    x = torch.randn(6, dim, generator=g, dtype=torch.float64)
    ts = O.time_steps(O.VPLinear(), "logSNR", T_START, T_END, 6)
    times = torch.tensor([float(t) for t in ts], dtype=torch.float64)
    lams = [float(O.VPLinear().lam(t)) for t in ts]
    got = O.DPMSolverV3(lambdas, *per_element, lams).sample(eps, O.VPLinear(), x, ts, 3, **opts)
    for j in range(dim):
        def eps_j(x_, t, j=j):
            return eps(torch.nn.functional.pad(x_, (j, dim - 1 - j)), t)[:, j:j + 1]

        want = DPMSolverV3(eps_j, ns, EMS(lambdas, ems[j].l, ems[j].s, ems[j].b)).sample(x[:, j:j + 1], times=times,
                                                                                        order=3, **opts)
        assert float((got[:, j:j + 1] - want).abs().max()) <= 1e-8 * float(want.abs().max()), j
    same = random_ems(ns, (dim,), seed=30)
    scalar = O.DPMSolverV3(same.lambdas, same.l, same.s, same.b, lams).sample(eps, O.VPLinear(), x, ts, 3, **opts)
    tiled = O.DPMSolverV3(same.lambdas, same.l[:, None].expand(-1, dim), same.s[:, None].expand(-1, dim), same.b,
                          lams).sample(eps, O.VPLinear(), x, ts, 3, **opts)
    assert float((scalar - tiled).abs().max()) <= 1e-12 * float(scalar.abs().max())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_degenerated_is_dpm_solver_pp(mixture, order):
    ns, _, model, x = mixture
    ref = DPMSolver(model, ns).sample(x, steps=6, order=order, solver_type="taylor", third_order="corrected",
                                      skip_type="logSNR")
    got = DPMSolverV3(model, ns, degenerated=True).sample(x, steps=6, order=order, use_corrector=False,
                                                          skip_type="logSNR")
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_eager_and_fused_runs_agree(mixture):
    ns, _, model, x = mixture
    ems = random_ems(ns, x.shape[1:], seed=4)
    fused = DPMSolverV3(model, ns, ems).sample(x, steps=6)
    eager_solver = DPMSolverV3(model, ns, ems)
    eager_solver.eager = True
    eager = eager_solver.sample(x, steps=6)
    assert float((fused - eager).abs().max()) <= 1e-12 * float(eager.abs().max())


def test_low_precision_and_layouts(mixture):
    ns, gm, _, x = mixture
    model32 = model_wrapper(lambda x_, t: gm.model_fn("noise")(x_.double(), t).to(x_.dtype), ns)
    ems = random_ems(ns, x.shape[1:], seed=5)
    ref = DPMSolverV3(model_wrapper(gm.model_fn("noise"), ns), ns, ems).sample(x, steps=5)
    solver = DPMSolverV3(model32, ns, ems)
    got = solver.sample(x.float(), steps=5)
    assert got.dtype == torch.float32
    assert float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    wide = torch.randn(8, 12, dtype=torch.float32)[:, ::2].copy_(x.float())  # non-contiguous x
    assert torch.equal(solver.sample(wide, steps=5), got)


# ---------------------------------------------------------------------------------------------------------------
# EMS

def gaussian_ems_closed_form(ns, mu, var, lambdas):
    """l, s, b of ε(x) = σ(x − αμ)/(α²v + σ²) for data N(μ, diag v) under a VP schedule, at each λ: f = k·x + m is
    linear in x, f' = P·x + Q along the ODE (dx/dλ = (σ² − c)·x + c·α·μ, c = σ²/(α²v + σ²)), so the least-squares
    fits are moments of x_λ ~ N(αμ, α²v + σ²). Derivatives in λ by autograd."""
    def parts(lam):
        a2, s2 = torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)
        c = s2 / (a2 * var + s2)
        k = (c - c.mean()) / a2.sqrt()
        return k, -c * mu

    out = {"l": [], "s": [], "b": []}
    for lam in lambdas:
        lam = lam.clone()
        a2, s2 = torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)
        a = a2.sqrt()
        c = s2 / (a2 * var + s2)
        k, m = parts(lam)
        dk, dm = torch.func.jacfwd(parts)(lam)
        P = dk + k * (s2 - c)
        Q = k * c * a * mu + dm
        mean, w = a * mu, a2 * var + s2
        s = float((P * k * w).sum() / (k * k * w).sum())
        out["l"].append(float(c.mean()))
        out["s"].append(s)
        out["b"].append(P * mean + Q - s * (k * mean + m))
    return (torch.tensor(out["l"], dtype=torch.float64), torch.tensor(out["s"], dtype=torch.float64),
            torch.stack(out["b"]))


def diagonal_gaussian(dim, n, seed):
    """(schedule, μ, v, the exact ε of data N(μ, diag v), n samples of the data) on the linear VP schedule."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    var = torch.linspace(0.05, 2.0, dim, dtype=torch.float64)

    def eps(x, t):
        a, s = ns.marginal_alpha(t)[:, None], ns.marginal_std(t)[:, None]
        return s * (x - a * mu) / (a * a * var + s * s)

    return ns, mu, var, eps, mu + var.sqrt() * torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_ems_of_gaussian_data_match_the_closed_form():
    ns, mu, var, eps, data = diagonal_gaussian(8, 40000, seed=0)
    ems = compute_ems(eps, ns, data, points=41, t_start=0.9, t_end=0.02, batch=40000, seed=1)
    l, s, b = gaussian_ems_closed_form(ns, mu, var, ems.lambdas)
    assert torch.allclose(ems.l, l, rtol=0, atol=2e-3 * float(l.max()))  # Hutchinson is exact for a diagonal Jacobian
    assert torch.allclose(ems.s, s, rtol=0, atol=0.03 * float(s.abs().max()))
    assert torch.allclose(ems.b, b, rtol=0, atol=0.03 * float(b.abs().max()))
    assert ems.info["samples"] == 40000 and ems.guidance_scale is None


def test_per_element_statistics_of_gaussian_data_match_the_closed_form():
    """The paper's per-element fits on data N(μ, diag v): l_j = c_j = σ²/(α²v_j + σ²) exactly (the Jacobian is
    diagonal), f_j = −c_j·μ_j does not depend on x, so s = 0 and b_j = −μ_j·dc_j/dλ; the pooled l is their mean
    over the elements, far from some of them."""
    dim = 6
    ns, mu, var, eps, data = diagonal_gaussian(dim, 2000, seed=1)

    def c_of(lam):
        a2, s2 = torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)
        return s2 / (a2 * var + s2)

    lambdas, l, s, b = estimate_statistics(eps, ns, data, points=81, t_start=0.9, t_end=0.02, batch=2000,
                                           per_element=True)
    assert l.shape == s.shape == b.shape == (81, dim)
    c = torch.stack([c_of(lam) for lam in lambdas])
    dc = torch.stack([torch.func.jacfwd(c_of)(lam) for lam in lambdas])
    torch.testing.assert_close(l, c, rtol=1e-12, atol=0)
    assert bool((s == 0).all())
    # b carries the error of dl/dλ (second-order differences on the grid) times the mean of x/α
    torch.testing.assert_close(b, -mu * dc, rtol=0, atol=5e-3 * float((mu * dc).abs().max()))
    pooled = estimate_statistics(eps, ns, data, points=81, t_start=0.9, t_end=0.02, batch=2000)
    torch.testing.assert_close(pooled[1], l.mean(1), rtol=1e-12, atol=0)
    assert float((pooled[1][:, None] - l).abs().max()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_element", [False, True])
def test_statistics_of_zero_mean_gaussian_data(dtype, per_element):
    """Data N(0, v·I): l = c = σ²/(α²v + σ²) takes all of ε, so f = (σε − l·x)/α is 0 but for round-off, and
    s = 0, not the regression of one round-off on another (which gave |s| ~ 1e16 and a solver whose
    coefficients overflowed); b is the small error of dl/dλ's differences. DPM-Solver-v3 with them follows the
    exact ODE solution, x scaled by √(α²v + σ²) from start to end, closely at 5 steps."""
    ns, v, dim = NoiseScheduleVP("linear", dtype=torch.float64), 0.7, 6

    def eps(x, t):
        a, s = ns.marginal_alpha(t)[:, None], ns.marginal_std(t)[:, None]
        return (s * x / (a * a * v + s * s)).to(x.dtype)

    g = torch.Generator().manual_seed(4)
    data = (math.sqrt(v) * torch.randn(512, dim, generator=g, dtype=torch.float64)).to(dtype)
    lambdas, l, s, b = estimate_statistics(eps, ns, data, points=61, t_start=0.9, t_end=0.02, per_element=per_element)
    c = torch.sigmoid(-2 * lambdas) / (torch.sigmoid(2 * lambdas) * v + torch.sigmoid(-2 * lambdas))
    torch.testing.assert_close(l, c[:, None].expand_as(l) if per_element else c, rtol=1e-5, atol=0)
    assert bool((s == 0).all()), float(s.abs().max())
    assert float(b.abs().max()) < 1e-3
    if not per_element:
        x = torch.randn(16, dim, generator=g, dtype=torch.float64).to(dtype)
        ems = compute_ems(eps, ns, data, points=61, t_start=0.9, t_end=0.02)
        out = DPMSolverV3(eps, ns, ems).sample(x, steps=5, t_start=0.9, t_end=0.02)
        scale = [float((ns.marginal_alpha(torch.tensor(t)) ** 2 * v + ns.marginal_std(torch.tensor(t)) ** 2).sqrt())
                 for t in (0.9, 0.02)]
        exact = x.double() * (scale[1] / scale[0])
        assert float((out.double() - exact).norm() / exact.norm()) < 5e-3


def test_ems_save_load_round_trip_and_checks(tmp_path, mixture):
    ns, gm, model, x = mixture
    data = gm.sample(64, generator=torch.Generator().manual_seed(2))
    ems = compute_ems(model, ns, data, points=9, t_end=T_END)
    path = tmp_path / "ems.pt"
    ems.save(path)
    back = EMS.load(path)
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(ems, name))
    assert back.schedule == ems.schedule and back.info == ems.info
    assert torch.equal(DPMSolverV3(model, ns, back).sample(x, steps=4), DPMSolverV3(model, ns, ems).sample(x, steps=4))
    with pytest.raises(ValueError, match="another noise schedule"):
        DPMSolverV3(model, NoiseScheduleVP("linear", continuous_beta_1=10.0, dtype=torch.float64), back)
    guided = model_wrapper(lambda x_, t, c: gm.model_fn("noise")(x_, t), ns, guidance_type="classifier-free",
                           condition=torch.zeros(1), unconditional_condition=torch.ones(1), guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance scale"):
        DPMSolverV3(guided, ns, back)
    with pytest.raises(ValueError, match="outside the λ range"):
        DPMSolverV3(model, ns, back).sample(x, steps=4, t_end=1e-4)
    with pytest.raises(ValueError, match="sample shape"):
        DPMSolverV3(model, ns, back).sample(torch.randn(2, 5, dtype=torch.float64), steps=4)
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    noise = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "text.pt").write_text("not a torch file")  # torch.load raises KeyError
    (tmp_path / "random.pt").write_bytes(bytes(noise))      # torch.load raises UnpicklingError
    for name in ("bad.pt", "text.pt", "random.pt"):
        with pytest.raises(ValueError, match="no statistics saved by pydpm"):
            EMS.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        EMS.load(tmp_path / "missing.pt")


def test_bad_arguments(mixture):
    ns, gm, model, x = mixture
    with pytest.raises(TypeError, match="compute_ems"):
        DPMSolverV3(model, ns)
    with pytest.raises(ValueError, match="pass ems=None"):
        DPMSolverV3(model, ns, random_ems(ns, (6,)), degenerated=True)
    solver = DPMSolverV3(model, ns, degenerated=True)
    with pytest.raises(ValueError, match="order"):
        solver.sample(x, order=4)
    with pytest.raises(TypeError, match="use_corrector"):
        solver.sample(x, use_corrector=1)
    with pytest.raises(ValueError, match="one order per step"):
        solver.sample(x, steps=4, order=[1, 2, 3])
    with pytest.raises(ValueError, match=r"order\[1\]=3: step 2 has 2 point"):
        solver.sample(x, steps=4, order=[1, 3, 3, 3])
    with pytest.raises(ValueError, match=r"order\[0\]=0"):
        solver.sample(x, steps=4, order=[0, 2, 3, 3])
    with pytest.raises(TypeError, match=r"order\[2\]=2.0"):
        solver.sample(x, steps=4, order=[1, 2, 2.0, 3])
    with pytest.raises(ValueError, match="one bool per step but the last"):
        solver.sample(x, steps=4, use_corrector=[True] * 4)
    with pytest.raises(TypeError, match=r"use_corrector\[1\]=1"):
        solver.sample(x, steps=4, use_corrector=[True, 1, False])
    with pytest.raises(TypeError, match="order='3' must be an int"):
        solver.sample(x, steps=4, order="3")
    with pytest.raises(TypeError, match="use_corrector='yes' must be a bool"):
        solver.sample(x, steps=4, use_corrector="yes")
    with pytest.raises(ValueError, match="t_end=0"):
        solver.sample(x, t_end=0)
    with pytest.raises(ValueError, match="must decrease"):
        solver.sample(x, times=[1e-3, 0.5, 1.0])
    with pytest.raises(ValueError, match="data must be"):
        compute_ems(model, ns, torch.randn(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        compute_ems(model, ns, torch.full((4, 6), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="t_start"):
        compute_ems(model, ns, gm.sample(4), t_start=1e-3, t_end=0.5)
    # a model whose output is not x's shape and dtype: no statistics (one column would broadcast over the
    # elements; an integer output has zero JVPs, so l = 0)
    for bad in (lambda x_, t: model(x_, t)[:, :1], lambda x_, t: model(x_, t).long(),
                lambda x_, t: torch.cat([model(x_, t)] * 2, 1), lambda x_, t: model(x_, t).float()):
        with pytest.raises(ValueError, match="compute_ems: model_fn returned .* shaped like x"):
            compute_ems(bad, ns, gm.sample(4), points=3)
    with pytest.raises(ValueError, match="EMS: l and s"):
        EMS(torch.linspace(0, 1, 3), torch.ones(2), torch.zeros(3), torch.zeros(3, 1))
    lam = ns.marginal_lambda(torch.tensor([T_START, T_END], dtype=torch.float64))
    grid = torch.linspace(float(lam[0]), float(lam[1]), 5, dtype=torch.float64)
    for name, l, s in (("s", torch.ones(5), torch.full((5,), 100.0)), ("l", torch.full((5,), -80.0), torch.zeros(5))):
        # before this check the solver failed at its first step, with a message about flow schedules
        with pytest.raises(ValueError, match=f"EMS: {name} integrates to"):
            EMS(grid, l, s, torch.zeros(5, 6))


# ---------------------------------------------------------------------------------------------------------------
# Accuracy with statistics computed from data

@pytest.fixture(scope="module")
def fitted():
    ns, gm, model, x = gaussian_mixture(16, 64, seed=1, spread=0.3, x_seed=0)
    exact = O.ode_solution(gm.eps, O.VPLinear(), x, T_START, T_END, n=1000)
    ems = compute_ems(model, ns, gm.sample(1024, generator=torch.Generator().manual_seed(7)), points=61,
                      t_end=T_END, batch=1024)
    return ns, model, x, exact, ems


def test_converges_at_its_order(fitted):
    """With l = 1 and s, b linear in λ. A multistep method's first steps are of lower order: their error scales
    with g' at t_start, which is large when l is far from the model's linear part (f then carries σ/α·ε); with
    l = 1 it is the data prediction's, nearly constant there. Between the grid points of piecewise-linear EMS g''
    jumps, so steps finer than the EMS grid converge at order 2 at most: the statistics here have two points."""
    ns, model, x, exact, _ = fitted
    r = random_ems(ns, x.shape[1:], seed=6, points=2)
    ems = EMS(r.lambdas, torch.ones(2, dtype=torch.float64), r.s, 0.1 * r.b)
    for order in (1, 2, 3):
        errs = [float((DPMSolverV3(model, ns, ems).sample(x, steps=n, order=order, use_corrector=False,
                                                          lower_order_final=False, skip_type="logSNR", t_end=T_END)
                       - exact).square().mean().sqrt()) for n in (40, 80)]
        assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3, (order, errs)


def test_beats_the_best_official_solver_at_5_and_10_steps(fitted):
    ns, model, x, exact, ems = fitted

    def err(y):
        return float((y - exact).square().mean().sqrt())

    for nfe in (5, 10):
        official = min(
            [err(DPMSolver(model, ns, algorithm_type=alg).sample(x, steps=nfe, order=o, skip_type=sk, t_end=T_END,
                                                                 solver_type=st))
             for alg in ("dpmsolver", "dpmsolver++") for o in (2, 3) for sk in ("time_uniform", "logSNR", "time_quadratic")
             for st in ("dpmsolver", "taylor")]
            + [err(UniPC(model, ns, variant=v).sample(x, steps=nfe, order=o, skip_type=sk, t_end=T_END))
               for v in ("bh1", "bh2") for o in (2, 3) for sk in ("time_uniform", "logSNR", "time_quadratic")])
        v3 = err(DPMSolverV3(model, ns, ems).sample(x, steps=nfe, skip_type="time_quadratic", t_end=T_END))
        assert v3 * 2 <= official, (nfe, v3, official)


def test_one_fused_launch_per_model_call(mixture):
    """Order 3 with the pseudo-order corrector: each model call is followed by one launch (the corrected sample is
    never materialised; the corrector and the next predictor are one update), reading at most three stored f's
    and the step's constant."""
    ns, _, model, x = mixture
    solver = DPMSolverV3(model, ns, random_ems(ns, x.shape[1:]))
    solver.sample(x, steps=12)
    plan = next(iter(solver._runners.values())).plan
    assert plan.n_calls == 12 and len(plan.launches) == 12
    assert all(launch.call is not None for launch in plan.launches)
    assert all(sum(plan.kind_of(s) == "c" for s in launch.models) == 1 for launch in plan.launches)
    assert max(len(launch.models) for launch in plan.launches) <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_and_in_a_cuda_graph(dtype):
    """On the GPU (constants in x's dtype on the device) it equals the float64 CPU run, eagerly and replayed from a
    CUDA graph, channels-last included."""
    ns = NoiseScheduleVP("linear", dtype=torch.float64)

    def eps(x, t):  # an analytic ε-model: any device, any dtype
        return 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    ems = random_ems(ns, (3, 8, 8), seed=2)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = DPMSolverV3(eps, ns, ems).sample(x, steps=6)
    solver = DPMSolverV3(eps, ns, ems)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    for graph in (False, True, True):  # capture, then replay
        y = solver.sample(x.to("cuda", dtype), steps=6, cuda_graph=graph)
        torch.testing.assert_close(y.double().cpu(), expected, **tol)
    cl = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(solver.sample(cl, steps=6).double().cpu(), expected, **tol)
    per_step = dict(order=[1, 2, 1, 3, 2, 1], use_corrector=[False, True, True, False, True])
    expected = DPMSolverV3(eps, ns, ems).sample(x, steps=6, **per_step)
    for graph in (False, True, True):
        y = solver.sample(x.to("cuda", dtype), steps=6, cuda_graph=graph, **per_step)
        torch.testing.assert_close(y.double().cpu(), expected, **tol)


def test_the_per_element_statistics_benchmark_runs(capsys):
    """bench/ems_per_element.py end to end at a toy size: a row per λ, and per-element least squares never
    leave more of f' unexplained than the one s per λ (which is one of the per-element choices)."""
    from pydpm.bench import ems_per_element

    assert ems_per_element.run(["--schedule", "linear", "--samples", "64", "--points", "3"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    rows = [cells for cells in table if cells[0].strip().lstrip("-").replace(".", "", 1).isdigit()]  # a λ
    assert len(rows) == 3
    for row in rows:
        scalar, per_element = (float(cell.strip().rstrip("%")) for cell in row[-2:])
        assert 0 <= per_element <= scalar <= 100


def test_the_per_element_solver_benchmark_runs(capsys):
    """bench/ems_per_element.py --solve at a toy size: a row per draw; pydpm's fused run of the best scalar
    configuration scores what the paper's implementation scored for it; each kind's best is the least of its 48."""
    from pydpm.bench import ems_per_element

    assert ems_per_element.run(["--solve", "--schedule", "linear", "--nfe", "3", "--eval", "16", "--samples", "128",
                                "--points", "9", "--eval-seeds", "0", "1"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| linear")]
    assert [cells[2].strip() for cells in table] == ["0", "1"]
    for cells in table:
        scalar, fused, elem, elem_same = (float(cells[i]) for i in (4, 5, 7, 8))
        assert math.isfinite(scalar) and abs(fused - scalar) <= 2e-3 * scalar
        assert elem <= elem_same
        assert float(cells[9].strip().rstrip("×")) == pytest.approx(scalar / elem, rel=5e-3)

