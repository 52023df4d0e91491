"""pydpm's samplers against an independent float64 oracle (tests/samplers_oracle.py, written from the papers'
formulas) on an analytic Gaussian mixture (tests/gaussian_mixture.py), whose exact noise prediction stands in
for a trained network.

Float64 on the CPU must agree to 1e-6 (relative, max-norm) for every method × order × variant × algorithm ×
skip type × model type × schedule; float32 runs agree loosely. Each case draws its own x_T, so the samples
differ across cases. The suite's time budget (CI, 2 CPU cores) is why not every product is run: the axes
that interact (method × order × solver type × algorithm) are crossed in full, the others rotate through them.
"""
from __future__ import annotations

import pytest
import torch

import pydpm
import samplers_oracle as O
from gaussian_mixture import GaussianMixture
from pydpm.samplers import DPMSolver, UniPC
from pydpm.schedules import NoiseScheduleFlow, NoiseScheduleVP, model_wrapper, time_steps

SHAPE = (3, 2, 3, 5)  # B = 3, D = 30
DIM = 30
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
RTOL = 1e-6
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras")
STEPS = (6, 7, 11, 12)  # below/above the authors' steps < 10 switch; every residue mod 2 and mod 3


class Case:
    """One schedule in both worlds (oracle and pydpm), the mixture on it and a starting noise x_T."""

    def __init__(self, schedule: str, dtype=torch.float64, seed: int = 0):
        if schedule == "discrete":
            self.osched, self.psched = O.VPDiscrete(betas=BETAS), NoiseScheduleVP("discrete", betas=BETAS, dtype=dtype)
        elif schedule == "linear":
            self.osched, self.psched = O.VPLinear(), NoiseScheduleVP("linear", dtype=dtype)
        else:
            self.osched, self.psched = O.Flow(), NoiseScheduleFlow(dtype=dtype)
        self.gm = GaussianMixture.random(self.osched, DIM, seed=seed + 1)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
        self.cond = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)

    def model(self, model_type: str = "noise", **wrapper_kwargs):
        """pydpm's wrapped model over the mixture's network in `model_type` parameterisation."""
        conditional = wrapper_kwargs.get("guidance_type") == "classifier-free"
        net = self.gm.model_fn(model_type, total_N=self.osched.total_N if self.osched.discrete else None,
                               conditional=conditional)
        return model_wrapper(net, self.psched, model_type=model_type, **wrapper_kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(expected).all(), "the oracle produced non-finite values"
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def assert_close(actual, expected, what: str, rtol: float = RTOL):
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def scalar(t) -> float:
    """A time argument handed to a user hook, whatever its shape ([], [1] or [B])."""
    return float(torch.as_tensor(t).reshape(-1)[0])


# --------------------------------------------------------------------------------------------------
# The ingredients: mixture, schedules, time grids
# --------------------------------------------------------------------------------------------------

def test_mixture_noise_is_minus_sigma_times_score():
    """ε*(x, t) = −σ_t ∇ log p_t(x) with p_t written out and differentiated by autograd; x0 = (x − σε)/α."""
    sched = O.VPLinear()
    gm = GaussianMixture.random(sched, DIM, seed=3)
    x = torch.randn(5, DIM, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    var = a ** 2 * gm.stds ** 2 + s ** 2
    d2 = (x[:, None, :] - a[:, :, None] * gm.means[None]).square().sum(-1)
    log_pt = torch.logsumexp(torch.log(gm.weights) - 0.5 * DIM * torch.log(2 * torch.pi * var) - 0.5 * d2 / var, 1)
    (score,) = torch.autograd.grad(log_pt.sum(), x)
    x = x.detach()
    torch.testing.assert_close(gm.eps(x, t), -s * score, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gm.x0(x, t), (x - s * gm.eps(x, t)) / a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_type", ["noise", "x_start", "v", "score"])
@pytest.mark.parametrize("schedule", ["discrete", "linear"])
def test_wrapped_model_types_give_the_exact_noise(schedule, model_type):
    """model_wrapper inverts each parameterisation of the mixture's network back to ε* (and feeds discrete
    schedules the label 1000·(t − 1/N), which the network maps back)."""
    case = Case(schedule)
    t = torch.tensor([0.9, 0.3, 0.002], dtype=torch.float64)
    assert_close(case.model(model_type)(case.x, t), case.gm.eps(case.x, t), f"{model_type} on {schedule}", 1e-12)


@pytest.mark.parametrize("schedule", ["discrete", "linear", "flow"])
def test_schedule_matches_oracle(schedule):
    case = Case(schedule)
    o, p = case.osched, case.psched
    t = torch.linspace(1e-3, 0.999, 97, dtype=torch.float64)
    torch.testing.assert_close(p.marginal_log_mean_coeff(t), o.log_alpha(t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.marginal_std(t), o.sigma(t), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(p.marginal_lambda(t), o.lam(t), rtol=1e-10, atol=1e-12)
    lam = o.lam(t)
    torch.testing.assert_close(p.inverse_lambda(lam), o.inverse_lambda(lam), rtol=1e-10, atol=1e-13)
    assert p.total_N == o.total_N and p.T == o.T


def test_discrete_inverse_lambda_agrees_with_plain_bisection():
    """The oracle's segment search for the discrete λ⁻¹ equals 64 halvings on log α (extrapolation included)."""
    sched = O.VPDiscrete(betas=BETAS)
    lam = torch.linspace(-6.0, 6.0, 301, dtype=torch.float64)
    torch.testing.assert_close(sched.inverse_lambda(lam), O.Schedule.inverse_lambda(sched, lam), rtol=0, atol=1e-15)


def test_lambda_truncation_drops_steps_below_minus_5_1():
    """A cosine-like schedule reaching λ < −5.1 loses those final steps (and N shrinks) in both worlds."""
    n = torch.arange(1001, dtype=torch.float64) / 1000
    ac = torch.cos((n + 0.008) / 1.008 * torch.pi / 2) ** 2
    ac = (ac[1:] / ac[0]).clamp_min(1e-12)
    o, p = O.VPDiscrete(alphas_cumprod=ac), NoiseScheduleVP("discrete", alphas_cumprod=ac, dtype=torch.float64)
    assert 900 < o.total_N < 1000 and p.total_N == o.total_N
    assert float(o.lam(torch.tensor(1.0, dtype=torch.float64))) >= O.VPDiscrete.LAMBDA_MIN


@pytest.mark.parametrize("schedule", ["discrete", "linear", "flow"])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
def test_time_steps_match_oracle(schedule, skip_type):
    case = Case(schedule)
    t_T = 1.0 if schedule != "flow" else 0.99
    for n in (1, 7, 20):
        expected = O.time_steps(case.osched, skip_type, t_T, 1e-3, n)
        torch.testing.assert_close(time_steps(case.psched, skip_type, t_T, 1e-3, n), expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# DPM-Solver(++) and UniPC: the full grid of solver options
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["discrete", "linear"])
@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("method", ["multistep", "singlestep", "singlestep_fixed"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_dpm_solver_matches_oracle(algorithm_type, method, order, solver_type, schedule):
    """Every skip type, with the steps (6, 7, 11, 12) and lower_order_final rotating across the grid."""
    case = Case(schedule, seed=order)
    solver = DPMSolver(case.model(), case.psched, algorithm_type=algorithm_type)
    rot = order + ("multistep", "singlestep", "singlestep_fixed").index(method)
    for i, skip_type in enumerate(SKIP_TYPES):
        steps, lof = STEPS[(i + rot) % 4], (i + rot) % 3 != 0
        kw = dict(steps=steps, order=order, skip_type=skip_type, method=method, solver_type=solver_type,
                  lower_order_final=lof)
        expected = O.dpm_solver(case.gm.eps, case.osched, case.x, algorithm_type=algorithm_type, **kw)
        assert_close(solver.sample(case.x, **kw), expected, f"{kw}")


@pytest.mark.parametrize("schedule", ["discrete", "linear"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
@pytest.mark.parametrize("variant", ["bh1", "bh2", "vary_coeff"])
def test_unipc_matches_oracle(variant, algorithm_type, order, schedule):
    case = Case(schedule, seed=10 + order)
    solver = UniPC(case.model(), case.psched, algorithm_type=algorithm_type, variant=variant)
    for i, skip_type in enumerate(SKIP_TYPES):
        steps, lof = STEPS[(i + order) % 4], (i + order) % 2 == 0
        kw = dict(steps=steps, order=order, skip_type=skip_type, lower_order_final=lof)
        expected = O.unipc(case.gm.eps, case.osched, case.x, algorithm_type=algorithm_type, variant=variant, **kw)
        assert_close(solver.sample(case.x, **kw), expected, f"{kw}")


# --------------------------------------------------------------------------------------------------
# pydpm.sample: every method
# --------------------------------------------------------------------------------------------------

SAMPLE_CASES = [  # (method, options); steps run: 1..3 (start-up edge cases) and 8, 13
    ("dpmsolver", dict(order=3)), ("dpmsolver", dict(order=2, solver_type="taylor", skip_type="logSNR")),
    ("dpmsolver++", dict(order=2)), ("dpmsolver++", dict(order=3, skip_type="karras", lower_order_final=False)),
    ("unipc", dict(order=2)), ("unipc", dict(order=3, variant="bh2", skip_type="logSNR")),
    ("unipc", dict(order=2, variant="vary_coeff", skip_type="time_quadratic")),
    ("ddim", dict()), ("ddim", dict(eta=0.5, seed=3, skip_type="logSNR")), ("ddpm", dict(seed=7)),
    ("plms", dict()), ("s-pndm", dict(skip_type="karras")), ("f-pndm", dict(skip_type="logSNR")),
    ("sde-dpmsolver++", dict(order=1, seed=1)), ("sde-dpmsolver++", dict(order=2, seed=2, skip_type="logSNR")),
]


@pytest.mark.parametrize("schedule", ["discrete", "linear"])
@pytest.mark.parametrize("method,opts", SAMPLE_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SAMPLE_CASES)])
def test_sample_matches_oracle(method, opts, schedule):
    case = Case(schedule, seed=20)
    model = case.model()
    for steps in (1, 2, 3, 8, 13):
        if steps < opts.get("order", 1) and method != "sde-dpmsolver++":
            continue
        expected = O.sample(case.gm.eps, case.osched, case.x, method, steps, **opts)
        assert_close(pydpm.sample(model, case.x, case.psched, method, steps, **opts), expected, f"steps={steps}")


def test_stochastic_samplers_use_their_seed():
    """Different seeds give different samples (the noise really enters), equal seeds equal ones."""
    case = Case("discrete")
    for method in ("ddpm", "sde-dpmsolver++"):
        a, b, c = (pydpm.sample(case.model(), case.x, case.psched, method, 6, seed=s) for s in (1, 1, 2))
        assert torch.equal(a, b) and rel_err(a, c) > 1e-2


# --------------------------------------------------------------------------------------------------
# Model parameterisations, flow matching, guidance
# --------------------------------------------------------------------------------------------------

def _representative_runs(case: Case, model):
    """(what, pydpm result, oracle result) for a spread of solvers over one model, from t_start = 0.99."""
    eps, o, x = case.gm.eps, case.osched, case.x
    runs = [
        ("dpm++ 2M", DPMSolver(model, case.psched).sample(x, steps=8, t_start=0.99),
         O.dpm_solver(eps, o, x, 8, t_start=0.99)),
        ("dpm 3S", DPMSolver(model, case.psched, algorithm_type="dpmsolver").sample(
            x, steps=9, order=3, skip_type="logSNR", method="singlestep", t_start=0.99),
         O.dpm_solver(eps, o, x, 9, order=3, skip_type="logSNR", method="singlestep", algorithm_type="dpmsolver",
                      t_start=0.99)),
        ("unipc bh2 noise", UniPC(model, case.psched, algorithm_type="noise_prediction", variant="bh2").sample(
            x, steps=7, order=3, skip_type="karras", t_start=0.99),
         O.unipc(eps, o, x, 7, order=3, skip_type="karras", algorithm_type="noise_prediction", variant="bh2",
                 t_start=0.99)),
        ("ddim", pydpm.sample(model, x, case.psched, "ddim", 6, skip_type="time_quadratic", t_start=0.99),
         O.ddim(eps, o, x, 6, skip_type="time_quadratic", t_start=0.99)),
        ("plms", pydpm.sample(model, x, case.psched, "plms", 6, t_start=0.99),
         O.pndm(eps, o, x, 6, t_start=0.99)),
    ]
    return runs


@pytest.mark.parametrize("model_type", ["noise", "x_start", "v", "score"])
@pytest.mark.parametrize("schedule", ["discrete", "linear"])
def test_model_types_match_oracle(schedule, model_type):
    case = Case(schedule, seed=30)
    model = case.model(model_type)
    for what, actual, expected in _representative_runs(case, model):
        assert_close(actual, expected, what)
    kw = dict(eta=0.5, seed=4, skip_type="time_quadratic")
    assert_close(pydpm.sample(model, case.x, case.psched, "ddim", 6, **kw),
                 O.ddim(case.gm.eps, case.osched, case.x, 6, **kw), "ddim eta")


@pytest.mark.parametrize("model_type", ["flow", "noise", "v"])
def test_flow_schedule_matches_oracle(model_type):
    """NoiseScheduleFlow (α = 1 − t, σ = t), from t_start < 1."""
    case = Case("flow", seed=40)
    model = case.model(model_type)
    for what, actual, expected in _representative_runs(case, model):
        assert_close(actual, expected, what)
    eps, o, x = case.gm.eps, case.osched, case.x
    assert_close(UniPC(model, case.psched).sample(x, steps=9, order=3, skip_type="logSNR", t_start=0.999),
                 O.unipc(eps, o, x, 9, order=3, skip_type="logSNR", t_start=0.999), "unipc from 0.999")
    assert_close(pydpm.sample(model, x, case.psched, "sde-dpmsolver++", 8, seed=5, t_start=0.999),
                 O.sde_dpm_solver_pp(eps, o, x, 8, seed=5, t_start=0.999), "sde-dpm++ from 0.999")


FROM_T1 = [  # (name, pydpm run, oracle run), both from the default t_start = T = 1 (α = 0, λ = −∞)
    pytest.param(lambda m, c: DPMSolver(m, c.psched).sample(c.x, steps=8),
                 lambda c, **k: O.dpm_solver(c.gm.eps, c.osched, c.x, 8, **k), id="dpm++ 2M"),
    pytest.param(lambda m, c: DPMSolver(m, c.psched).sample(c.x, steps=8, order=3, denoise_to_zero=True),
                 lambda c, **k: O.dpm_solver(c.gm.eps, c.osched, c.x, 8, order=3, denoise_to_zero=True, **k),
                 id="dpm++ 3M"),
    pytest.param(lambda m, c: UniPC(m, c.psched, variant="bh2").sample(c.x, steps=8, order=2),
                 lambda c, **k: O.unipc(c.gm.eps, c.osched, c.x, 8, order=2, variant="bh2", **k), id="unipc bh2"),
    pytest.param(lambda m, c: UniPC(m, c.psched, variant="vary_coeff").sample(c.x, steps=8, order=1),
                 lambda c, **k: O.unipc(c.gm.eps, c.osched, c.x, 8, order=1, variant="vary_coeff", **k),
                 id="unipc vary_coeff"),
    pytest.param(lambda m, c: pydpm.sample(m, c.x, c.psched, "ddim", 8),
                 lambda c, **k: O.ddim(c.gm.eps, c.osched, c.x, 8, **k), id="ddim"),
    pytest.param(lambda m, c: pydpm.sample(m, c.x, c.psched, "sde-dpmsolver++", 8, seed=5),
                 lambda c, **k: O.sde_dpm_solver_pp(c.gm.eps, c.osched, c.x, 8, seed=5, **k), id="sde-dpm++ 2M"),
]


@pytest.mark.parametrize("run,oracle", FROM_T1)
def test_flow_data_prediction_from_t_1_matches_oracle(run, oracle):
    """NoiseScheduleFlow from t = 1 itself, where a flow-velocity model still gives x0 = x − σ·v: the
    data-prediction updates have finite limits there (h = ∞: e^(−h) = 0). The oracle takes x0 as the exact
    posterior mean at α = 0."""
    case = Case("flow", seed=45)
    expected = oracle(case, x0_fn=case.gm.x0)
    assert torch.isfinite(expected).all()
    assert_close(run(case.model("flow"), case), expected, "from t = 1")


def test_undefined_updates_from_alpha_0_are_refused():
    """Where the update itself is undefined at λ = −∞ the sampler must refuse: ε alone does not give x0 at
    α = 0, and singlestep solvers place intermediate points at λ_s + r·h = −∞ + r·∞."""
    case = Case("flow")
    with pytest.raises(ValueError, match="data prediction"):
        DPMSolver(case.model("noise"), case.psched).sample(case.x, steps=6)
    with pytest.raises(ValueError):
        DPMSolver(case.model("flow"), case.psched).sample(case.x, steps=6, order=2, method="singlestep_fixed")


def test_unipc_bh1_from_alpha_0_is_refused():
    case = Case("flow")
    assert not torch.isfinite(O.unipc(case.gm.eps, case.osched, case.x, 2, variant="bh1", x0_fn=case.gm.x0)).all()
    with pytest.raises(ValueError):
        UniPC(case.model("flow"), case.psched, variant="bh1").sample(case.x, steps=2)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_flow_ddim_eta_matches_oracle(method):
    case = Case("flow", seed=47)
    kw = dict(eta=0.5, seed=4, skip_type="time_quadratic", t_start=0.99)
    expected = O.sample(case.gm.eps, case.osched, case.x, method, 6, **kw)
    assert_close(pydpm.sample(case.model("flow"), case.x, case.psched, method, 6, **kw), expected, method)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("model_type", ["noise", "v"])
def test_classifier_free_guidance_matches_oracle(model_type, guidance_scale):
    """model(x, t_input, cond): the mixture shifted by cond. Guided ε = ε(∅) + s·(ε(cond) − ε(∅))."""
    case = Case("discrete", seed=50)
    uncond = torch.zeros_like(case.cond)
    model = case.model(model_type, guidance_type="classifier-free", condition=case.cond,
                       unconditional_condition=uncond, guidance_scale=guidance_scale)

    def guided(x, t):
        e_u, e_c = case.gm.eps(x, t, shift=uncond), case.gm.eps(x, t, shift=case.cond)
        return e_u + guidance_scale * (e_c - e_u)

    o, x = case.osched, case.x
    assert rel_err(O.dpm_solver(guided, o, x, 8), O.dpm_solver(case.gm.eps, o, x, 8)) > 1e-2  # cond matters
    assert_close(DPMSolver(model, case.psched).sample(x, steps=8), O.dpm_solver(guided, o, x, 8), "dpm++ 2M")
    assert_close(UniPC(model, case.psched).sample(x, steps=8, order=3), O.unipc(guided, o, x, 8, order=3), "unipc")
    assert_close(pydpm.sample(model, x, case.psched, "sde-dpmsolver++", 7, seed=3),
                 O.sde_dpm_solver_pp(guided, o, x, 7, seed=3), "sde-dpm++")


def test_classifier_guidance_matches_oracle():
    """guidance_type='classifier': ε − s·σ_t·∇ₓ log p(cond | x), here log p = −½·k·|x − cond|²."""
    case = Case("linear", seed=60)
    k, scale = 0.3, 2.0

    def classifier(x, t_input, cond):
        return -0.5 * k * (x - cond).square().reshape(x.shape[0], -1).sum(1)

    model = case.model("noise", guidance_type="classifier", condition=case.cond, guidance_scale=scale,
                       classifier_fn=classifier)

    def guided(x, t):
        sigma = case.osched.sigma(t).reshape(-1, 1, 1, 1)
        return case.gm.eps(x, t) + scale * sigma * k * (x - case.cond)

    assert_close(DPMSolver(model, case.psched).sample(case.x, steps=8),
                 O.dpm_solver(guided, case.osched, case.x, 8), "dpm++ 2M")
    assert_close(UniPC(model, case.psched).sample(case.x, steps=8),
                 O.unipc(guided, case.osched, case.x, 8), "unipc")


# --------------------------------------------------------------------------------------------------
# Options: thresholding, denoise_to_zero, intermediates, user corrections
# --------------------------------------------------------------------------------------------------

THRESH = [(0.995, 1.0), (0.9, 1.5)]


@pytest.mark.parametrize("ratio,max_val", THRESH)
def test_dynamic_thresholding_matches_oracle(ratio, max_val):
    case = Case("discrete", seed=70)
    th = dict(correcting_x0_fn="dynamic_thresholding", thresholding_max_val=max_val, dynamic_thresholding_ratio=ratio)
    eps, o, x = case.gm.eps, case.osched, case.x
    assert rel_err(O.dpm_solver(eps, o, x, 8, **th), O.dpm_solver(eps, o, x, 8)) > 1e-2  # it bites
    for method, order in (("multistep", 2), ("multistep", 3), ("singlestep", 3), ("singlestep_fixed", 2)):
        kw = dict(steps=8, order=order, method=method, denoise_to_zero=order == 3)
        assert_close(DPMSolver(case.model(), case.psched, **th).sample(x, **kw),
                     O.dpm_solver(eps, o, x, **kw, **th), f"dpm++ {kw}")
    for variant in ("bh1", "vary_coeff"):
        kw = dict(steps=8, order=2, variant=variant)
        assert_close(UniPC(case.model(), case.psched, **th, variant=variant).sample(x, steps=8, order=2),
                     O.unipc(eps, o, x, **kw, **th), f"unipc {kw}")


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_denoise_to_zero_matches_oracle(algorithm_type):
    """The final x0 prediction at t_end (here 0.02, where it moves the sample by ~1%)."""
    case = Case("linear", seed=80)
    eps, o, x = case.gm.eps, case.osched, case.x
    solver = DPMSolver(case.model(), case.psched, algorithm_type=algorithm_type)
    for method in ("multistep", "singlestep", "singlestep_fixed"):
        kw = dict(steps=7, order=2, method=method, skip_type="logSNR", t_end=0.02)
        expected = O.dpm_solver(eps, o, x, algorithm_type=algorithm_type, denoise_to_zero=True, **kw)
        assert rel_err(expected, O.dpm_solver(eps, o, x, algorithm_type=algorithm_type, **kw)) > 1e-3
        assert_close(solver.sample(x, denoise_to_zero=True, **kw), expected, method)
    alg = "data_prediction" if algorithm_type == "dpmsolver++" else "noise_prediction"
    assert_close(UniPC(case.model(), case.psched, algorithm_type=alg).sample(x, steps=7, denoise_to_zero=True,
                                                                             t_end=0.02),
                 O.unipc(eps, o, x, 7, algorithm_type=alg, denoise_to_zero=True, t_end=0.02), "unipc")


def test_return_intermediate_matches_oracle():
    case = Case("discrete", seed=90)
    eps, o, x = case.gm.eps, case.osched, case.x
    runs = [
        (DPMSolver(case.model(), case.psched), dict(method="multistep", order=3, denoise_to_zero=True),
         lambda **kw: O.dpm_solver(eps, o, x, 7, **kw)),
        (DPMSolver(case.model(), case.psched, algorithm_type="dpmsolver"), dict(method="singlestep", order=3),
         lambda **kw: O.dpm_solver(eps, o, x, 7, algorithm_type="dpmsolver", **kw)),
        (UniPC(case.model(), case.psched), dict(order=2), lambda **kw: O.unipc(eps, o, x, 7, **kw)),
    ]
    for solver, kw, oracle in runs:
        x_end, inter = solver.sample(x, steps=7, return_intermediate=True, **kw)
        x_ref, inter_ref = oracle(return_intermediate=True, **kw)
        assert_close(x_end, x_ref, f"{kw} final")
        assert len(inter) == len(inter_ref), f"{kw}: {len(inter)} intermediates, the oracle has {len(inter_ref)}"
        for i, (a, b) in enumerate(zip(inter, inter_ref)):
            assert_close(a, b, f"{kw} intermediate {i}")


def _correct_xt(x, t, step):
    return x * (1.0 - 0.01 * step) + 0.05 * scalar(t)


def _correct_x0(x0, t):
    return 0.9 * x0 + 0.1 * torch.tanh(x0) * (1.0 + scalar(t))


def test_user_corrections_match_oracle():
    """correcting_xt_fn(x, t, step) after every step (and on x_T, after the first model call, as the authors
    do); correcting_x0_fn(x0, t) on every data prediction."""
    case = Case("linear", seed=100)
    eps, o, x = case.gm.eps, case.osched, case.x
    assert rel_err(O.dpm_solver(eps, o, x, 7, correcting_xt_fn=_correct_xt), O.dpm_solver(eps, o, x, 7)) > 1e-2
    assert rel_err(O.dpm_solver(eps, o, x, 7, correcting_x0_fn=_correct_x0), O.dpm_solver(eps, o, x, 7)) > 1e-3
    for method, denoise in (("multistep", True), ("singlestep", False), ("singlestep_fixed", True)):
        kw = dict(steps=7, order=3, method=method, denoise_to_zero=denoise)
        assert_close(DPMSolver(case.model(), case.psched, correcting_xt_fn=_correct_xt).sample(x, **kw),
                     O.dpm_solver(eps, o, x, correcting_xt_fn=_correct_xt, **kw), f"xt {kw}")
        assert_close(DPMSolver(case.model(), case.psched, correcting_x0_fn=_correct_x0).sample(x, **kw),
                     O.dpm_solver(eps, o, x, correcting_x0_fn=_correct_x0, **kw), f"x0 {kw}")
    for fixes in (dict(correcting_xt_fn=_correct_xt), dict(correcting_x0_fn=_correct_x0)):
        assert_close(UniPC(case.model(), case.psched, **fixes).sample(x, steps=7, order=3, denoise_to_zero=True),
                     O.unipc(eps, o, x, 7, order=3, denoise_to_zero=True, **fixes), f"unipc {list(fixes)}")


# --------------------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------------------

FLOAT32_RTOL = 1e-5  # measured: 1e-7 … 2.3e-6, within 3× of the oracle's own float32 runs


@pytest.mark.parametrize("schedule", ["discrete", "linear"])
def test_float32_close_to_float64_oracle(schedule):
    """The float32 samplers (float32 schedule, sample and network) against the float64 oracle, loosely: the
    network itself runs in float32, and x0 = (x − σε)/α near t_end magnifies its rounding."""
    case = Case(schedule, dtype=torch.float32, seed=110)
    eps, o, x64 = case.gm.eps, case.osched, case.x.double()
    model = case.model()
    runs = [
        ("dpm++ 2M", DPMSolver(model, case.psched).sample(case.x, steps=10), O.dpm_solver(eps, o, x64, 10)),
        ("dpm 3S", DPMSolver(model, case.psched, algorithm_type="dpmsolver").sample(
            case.x, steps=10, order=3, method="singlestep", skip_type="logSNR"),
         O.dpm_solver(eps, o, x64, 10, order=3, method="singlestep", skip_type="logSNR", algorithm_type="dpmsolver")),
        ("unipc", UniPC(model, case.psched).sample(case.x, steps=10, order=3), O.unipc(eps, o, x64, 10, order=3)),
        ("sde-dpm++", pydpm.sample(model, case.x, case.psched, "sde-dpmsolver++", 10, seed=1),
         O.sde_dpm_solver_pp(eps, o, x64, 10, seed=1)),
        ("plms", pydpm.sample(model, case.x, case.psched, "plms", 10), O.pndm(eps, o, x64, 10)),
    ]
    for what, actual, expected in runs:
        assert actual.dtype == torch.float32
        assert_close(actual, expected, what, FLOAT32_RTOL)
