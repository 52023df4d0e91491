"""pydpm.integrations.diffusers against diffusers' own schedulers, on the CPU.

Every configuration runs four times with the same deterministic nonlinear model of (sample, t):
diffusers and pydpm in float32, and both in float64 (diffusers with float64 sigmas and, for DPM-Solver,
without its float32 upcast: the oracle). pydpm in float64 must equal the oracle to 1e-9 (the same
formulas and step orders); pydpm in float32 must equal diffusers in float32 to 1e-5 of the sample scale,
or, where diffusers' own float32 error against the oracle is larger (ill-conditioned conversions such as
ε → x̂₀ at Karras' σ_max, α ≈ 0.006, or noise-prediction UniPC with 'sample'/'v' outputs), be within 3x
of diffusers' error (the fused conversion a·x + b·m rounds 157·x and 157·m where diffusers rounds
x − σ·m before dividing by α: up to about one bit more). Where diffusers returns NaN, pydpm must be
finite and equal the limit value.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import pathlib
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pd = pytest.importorskip("pydpm.integrations.diffusers")

# diffusers' deprecation notes (algorithm_type 'dpmsolver') and its numpy 2 copy= notice
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

EXACT = 1e-9     # float64 parity with the oracle, relative to the sample scale
FLOAT32 = 1e-5   # float32 parity with diffusers, relative to the sample scale
SHAPE = (2, 3, 4, 4)

_gen = torch.Generator().manual_seed(0)
_W = torch.randn(4, 4, generator=_gen, dtype=torch.float64) * 0.4 + torch.eye(4, dtype=torch.float64)
_X = torch.randn(SHAPE, generator=_gen, dtype=torch.float64)
_ALPHAS_CUMPROD = diffusers.DDPMScheduler().alphas_cumprod.double()


def make_model(prediction_type: str = "epsilon", flow: bool = False):
    """A deterministic nonlinear model of (x, t): a denoiser D(x, t) = tanh(...) turned into the requested
    prediction type at the (α, σ) the timestep t has in the default linear schedule (or t/1000 for flow)."""
    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = float(t)
        if flow:
            s = min(max(t / 1000, 1e-4), 1 - 1e-4)
            a = 1 - s
        else:
            ab = _ALPHAS_CUMPROD[min(max(int(round(t)), 0), 999)].item()
            a, s = math.sqrt(ab), math.sqrt(1 - ab)
        xd = x.double()
        d = torch.tanh(1.2 * (xd @ _W) * a / (a * a + s * s) + 0.1 * math.cos(t / 300))
        eps = (xd - a * d) / s
        outputs = {"epsilon": eps, "sample": d, "v_prediction": a * eps - s * d, "flow_prediction": eps - d}
        return outputs[prediction_type].to(x.dtype)
    return model


class _Torch64:
    """`torch` as diffusers' DPM-Solver module sees it in the oracle: its float32 upcast becomes float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def float64_diffusers():
    """Only around step(): construction must build the same float32 schedule as diffusers."""
    module = sys.modules[diffusers.DPMSolverMultistepScheduler.__module__]
    real, module.torch = module.torch, _Torch64()
    try:
        yield
    finally:
        module.torch = real


def run(scheduler, model, x, steps, begin=None, oracle=False, step_kwargs=None, edit=None):
    """Sample with `scheduler`; returns (final sample, the sample given to the last step)."""
    scheduler.set_timesteps(steps)
    if oracle:
        scheduler.sigmas = scheduler.sigmas.double()
    timesteps = scheduler.timesteps
    if begin is not None:
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
    last = x
    with float64_diffusers() if oracle else contextlib.nullcontext():
        for i, t in enumerate(timesteps):
            if edit is not None and i > 0:
                x = edit(x)
            last = x
            x = scheduler.step(model(x, t), t, x, **(step_kwargs or {})).prev_sample
    return x, last


def _rel(a, b, scale):
    return ((a.double() - b.double()).abs().max() / scale).item()


MAX_SEEN: dict[str, float] = {}


def check_parity(name: str, config: dict, steps: int, begin=None, x=_X, edit=None):
    """Run diffusers' and pydpm's `name` with `config` four ways (module docstring) and compare."""
    theirs_cls, ours_cls = getattr(diffusers, name), getattr(pd, name)
    model = make_model(config.get("prediction_type", "epsilon"), config.get("use_flow_sigmas", False))
    ours32, _ = run(ours_cls(**config), model, x.float(), steps, begin, edit=edit)
    ours64, _ = run(ours_cls(**config), model, x.clone(), steps, begin, edit=edit)
    theirs = theirs_cls(**config)
    theirs32, last32 = run(theirs, model, x.float(), steps, begin, edit=edit)
    oracle = theirs_cls(**config)
    oracle64, last64 = run(oracle, model, x.clone(), steps, begin, oracle=True, edit=edit)
    assert torch.isfinite(ours32).all() and torch.isfinite(ours64).all(), f"pydpm not finite: {config}, {steps}"
    what = f"{name} {config}, steps={steps}"
    if not torch.isfinite(theirs32).all():  # diffusers' NaN cases: pydpm gives the limit value
        compare(ours32, ours64, limit_value(theirs, last32), limit_value(oracle, last64), "limit of " + what)
        return "nan"
    diff = compare(ours32, ours64, theirs32, oracle64, what)
    MAX_SEEN[name] = max(MAX_SEEN.get(name, 0.0), diff)
    return diff


def compare(ours32, ours64, theirs32, oracle64, what: str) -> float:
    """The module docstring's criteria; returns |ours32 − theirs32| relative to the sample scale."""
    scale = max(1.0, oracle64.abs().max().item())
    exact, err_ours = _rel(ours64, oracle64, scale), _rel(ours32, oracle64, scale)
    err_theirs, diff = _rel(theirs32, oracle64, scale), _rel(ours32, theirs32, scale)
    assert exact <= EXACT, f"float64 result differs from diffusers' by {exact:.2e}: {what}"
    assert err_ours <= max(FLOAT32, 3 * err_theirs), (
        f"float32 error {err_ours:.2e} vs diffusers' {err_theirs:.2e}: {what}")
    assert diff <= max(FLOAT32, 4 * err_theirs), f"float32 difference {diff:.2e}: {what}"
    return diff


def limit_value(scheduler, last_input):
    """What diffusers' last step tends to where it returns NaN: the identity for a zero-length last step;
    the first-order step to σ = 0, x̂₀, otherwise (from the corrected sample for UniPC)."""
    sigmas = scheduler.sigmas
    x = scheduler.last_sample if isinstance(scheduler, diffusers.UniPCMultistepScheduler) else last_input
    if sigmas[-1] == sigmas[-2]:
        return x
    assert sigmas[-1] == 0
    m = scheduler.model_outputs[-1]
    data = getattr(scheduler, "predict_x0", scheduler.config.get("algorithm_type") == "dpmsolver++")
    if data:
        return m
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(sigmas[-2])
    return (x - sigma * m) / alpha


def _spread(main, secondary, per):
    """Every combination of the main axes, each with `per` of the secondary combinations (rotating)."""
    main, secondary = list(main), list(secondary)
    for i, m in enumerate(main):
        for j in range(per):
            yield m + secondary[(i * 7 + j * 11) % len(secondary)]


# --------------------------------------------------------------------------------------------------
# DPM-Solver(++)
# --------------------------------------------------------------------------------------------------

def _dpm_cases():
    main = itertools.product((1, 2, 3), ("dpmsolver++", "dpmsolver"), ("midpoint", "heun"),
                             ("epsilon", "v_prediction", "sample"))
    secondary = itertools.product((False, True), (False, True), (True, False), ("zero", "sigma_min"), (5, 10, 20, 25))
    for order, alg, solver, pred, karras, thr, lof, final, steps in _spread(main, secondary, 4):
        if alg == "dpmsolver":
            final, thr = "sigma_min", False  # diffusers refuses 'zero' here; pydpm refuses thresholding here
        config = dict(solver_order=order, algorithm_type=alg, solver_type=solver, prediction_type=pred,
                      use_karras_sigmas=karras, thresholding=thr, lower_order_final=lof, final_sigmas_type=final,
                      sample_max_value=1.5)
        yield pytest.param(config, steps, id="-".join(f"{v}" for v in (order, alg, solver, pred, karras and "karras",
                                                                       thr and "thr", lof and "lof", final, steps)))


@pytest.mark.parametrize("config,steps", list(_dpm_cases()))
def test_dpm_solver_matches_diffusers(config, steps):
    check_parity("DPMSolverMultistepScheduler", config, steps)


DPM_EXTRA = [
    dict(euler_at_final=True, solver_order=3, final_sigmas_type="sigma_min"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    dict(use_flow_sigmas=True, prediction_type="epsilon", solver_order=2),
    dict(use_lu_lambdas=True, solver_order=3),
    dict(use_exponential_sigmas=True, solver_order=2),
    dict(use_beta_sigmas=True, solver_order=2),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
         beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3),
    dict(thresholding=True, sample_max_value=0.8, dynamic_thresholding_ratio=0.9),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun", lower_order_final=False),
]


@pytest.mark.parametrize("config", DPM_EXTRA, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [7, 20])
def test_dpm_solver_schedule_options(config, steps):
    if config.get("use_beta_sigmas") and importlib.util.find_spec("scipy") is None:
        pytest.skip("beta sigmas need scipy")
    check_parity("DPMSolverMultistepScheduler", config, steps)


def test_dpm_solver_img2img_start_and_edits():
    """A run started mid-schedule (set_begin_index, as img2img pipelines do) and samples edited between
    steps (inpainting blends known pixels into them) follow diffusers."""
    config = dict(solver_order=3)
    check_parity("DPMSolverMultistepScheduler", config, 20, begin=8)
    known = (torch.arange(16).reshape(4, 4) % 3 == 0).double()
    blend = lambda x: x * (1 - known.to(x.dtype)) + 0.1 * known.to(x.dtype)
    check_parity("DPMSolverMultistepScheduler", config, 12, edit=blend)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_start_found_from_the_timestep(name):
    """Without set_begin_index the first step() finds its index from the timestep (diffusers'
    _init_step_index), as pipelines that slice `timesteps` do."""
    model = make_model()
    outs = []
    for module in (diffusers, pd):
        s = getattr(module, name)(solver_order=3)
        s.set_timesteps(15)
        x = _X.float() * 0.5
        for t in s.timesteps[5:]:
            x = s.step(model(x, t), t, x).prev_sample
        assert s.step_index == 15
        outs.append(x)
    assert _rel(outs[1], outs[0], max(1.0, outs[0].abs().max().item())) <= FLOAT32


def test_dpm_solver_learned_variance_uses_the_mean_channels():
    model = make_model()
    wide = lambda x, t: torch.cat([model(x, t), torch.full_like(x, 7.0)], dim=1)  # [mean, variance] channels
    results = []
    for module in (diffusers, pd):
        results.append(run(module.DPMSolverMultistepScheduler(variance_type="learned_range"), wide, _X.float(), 10)[0])
    assert _rel(results[1], results[0], 1.0) <= FLOAT32


def test_dpm_solver_half_precision():
    """float16 sample and model output: diffusers computes the update in float32 and rounds once; so does
    the fused step."""
    model = make_model()
    outs = [run(m.DPMSolverMultistepScheduler(solver_order=3), model, _X.half(), 10)[0] for m in (diffusers, pd)]
    assert outs[1].dtype == torch.float16
    assert _rel(outs[1], outs[0], max(1.0, outs[0].abs().max().item())) <= 4e-3


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_mixed_model_output_and_sample_dtypes(name, dtypes):
    """A pipeline whose model returns another dtype than its latent's, holding whatever step() returns: every
    step succeeds (the run computes in the dtype its first step promotes to), returns the dtype diffusers'
    step() returns, and the loop ends where diffusers' does."""
    model_dtype, sample_dtype = dtypes
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.1

    def loop(module):
        sched = getattr(module, name)()
        sched.set_timesteps(8)
        x, seen = _X.to(sample_dtype), []
        for t in sched.timesteps:
            eps = torch.einsum("bchw,wv->bchv", x.float(), w).to(model_dtype)
            x = sched.step(eps, t, x).prev_sample
            seen.append(x.dtype)
        return x.double(), seen

    (ours, our_dtypes), (theirs, their_dtypes) = loop(pd), loop(diffusers)
    assert our_dtypes == their_dtypes
    assert _rel(ours, theirs, max(1.0, theirs.abs().max().item())) <= 4e-3  # measured: 3e-7 to 1.1e-3


# --------------------------------------------------------------------------------------------------
# UniPC
# --------------------------------------------------------------------------------------------------

def _unipc_cases():
    main = itertools.product((1, 2, 3), ("bh1", "bh2"), (True, False), ("epsilon", "v_prediction", "sample"))
    secondary = itertools.product((False, True), (True, False), ("zero", "sigma_min"), ([], [1, 3]), (5, 10, 20, 25),
                                  (False, True))
    for order, variant, px0, pred, thr, lof, final, disabled, steps, karras in _spread(main, secondary, 4):
        if not lof and final == "zero" and order > 1:
            lof = True  # diverges at σ = 0 (pydpm raises: test_unipc_unsupported)
        config = dict(solver_order=order, solver_type=variant, predict_x0=px0, prediction_type=pred, thresholding=thr,
                      lower_order_final=lof, final_sigmas_type=final, disable_corrector=disabled,
                      use_karras_sigmas=karras, sample_max_value=1.5)
        yield pytest.param(config, steps, id="-".join(f"{v}" for v in (
            order, variant, px0 and "x0", pred, thr and "thr", lof and "lof", final, disabled and "nocorr", steps,
            karras and "karras")))


@pytest.mark.parametrize("config,steps", list(_unipc_cases()))
def test_unipc_matches_diffusers(config, steps):
    check_parity("UniPCMultistepScheduler", config, steps)


UNIPC_EXTRA = [
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    dict(use_flow_sigmas=True, use_karras_sigmas=True, prediction_type="flow_prediction",
         final_sigmas_type="sigma_min"),
    dict(use_exponential_sigmas=True, solver_order=3),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, solver_type="bh1", solver_order=3),
]


@pytest.mark.parametrize("config", UNIPC_EXTRA, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [7, 20])
def test_unipc_schedule_options(config, steps):
    check_parity("UniPCMultistepScheduler", config, steps)


def test_unipc_img2img_start():
    check_parity("UniPCMultistepScheduler", dict(solver_order=3), 20, begin=6)


def test_unipc_bh1_final_step_is_finite():
    """diffusers 0.42.1's bh1 step to σ = 0 computes B(h)·0 with B(h) = h = −∞: NaN. The fused step gives the
    limit, the final data prediction x̂₀."""
    model = make_model()
    theirs = diffusers.UniPCMultistepScheduler(solver_type="bh1", solver_order=2)
    out_theirs, _ = run(theirs, model, _X.float(), 10)
    assert torch.isnan(out_theirs).all()
    assert check_parity("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=2), 10) == "nan"
    ours = pd.UniPCMultistepScheduler(solver_type="bh1", solver_order=2)
    out, _ = run(ours, model, _X.float(), 10)
    assert torch.isfinite(out).all()
    assert _rel(out, theirs.model_outputs[-1], 1.0) <= FLOAT32  # = x̂₀ of the last model output


def test_unipc_edited_sample_difference():
    """The documented difference: diffusers' corrector recomputes from its stored last sample and ignores an
    edit of `sample` between steps; the fused launch folds the corrector into the next predictor, so the edit
    reaches the result (scaled). Without edits both agree (the parity tests); with a corrector-free run
    (disable_corrector at every step) edits agree too."""
    n = 8
    edit = lambda x: x + 0.05
    check_parity("UniPCMultistepScheduler", dict(disable_corrector=list(range(n))), n, edit=edit)
    model = make_model()
    outs = [run(m.UniPCMultistepScheduler(), model, _X.float(), n, edit=edit)[0] for m in (diffusers, pd)]
    assert _rel(outs[0], outs[1], 1.0) > 1e-4


# --------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------

def _ddim_run(scheduler, model, x, steps, eta, noises, use_clipped, oracle=False):
    scheduler.set_timesteps(steps)
    if oracle:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    x0s = []
    for i, t in enumerate(scheduler.timesteps):
        noise = noises[i].to(x.dtype) if eta > 0 else None
        out = scheduler.step(model(x, t), t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise)
        x = out.prev_sample
        x0s.append(out.pred_original_sample)
    return x, torch.stack(x0s)


def _ddim_cases():
    main = itertools.product(("epsilon", "v_prediction", "sample"), (0.0, 0.5, 1.0), ("clip", "clip2.5", "none", "thr"))
    secondary = itertools.product((True, False), (False, True), ("leading", "trailing", "linspace"), (5, 10, 20, 25))
    for pred, eta, clip, use_clipped, one, spacing, steps in _spread(main, secondary, 2):
        config = dict(prediction_type=pred, clip_sample=clip.startswith("clip"), set_alpha_to_one=one,
                      timestep_spacing=spacing, thresholding=clip == "thr", sample_max_value=1.5,
                      clip_sample_range=2.5 if clip == "clip2.5" else 1.0,
                      steps_offset=1 if spacing == "leading" else 0)
        case = f"{pred}-eta{eta}-{clip}-{use_clipped}-{one}-{spacing}-{steps}"
        yield pytest.param(config, steps, eta, use_clipped, id=case)


@pytest.mark.parametrize("config,steps,eta,use_clipped", list(_ddim_cases()))
def test_ddim_matches_diffusers(config, steps, eta, use_clipped):
    model = make_model(config["prediction_type"])
    gen = torch.Generator().manual_seed(1)
    noises = torch.randn((steps,) + SHAPE, generator=gen, dtype=torch.float64)
    ours32 = _ddim_run(pd.DDIMScheduler(**config), model, _X.float(), steps, eta, noises, use_clipped)
    ours64 = _ddim_run(pd.DDIMScheduler(**config), model, _X.clone(), steps, eta, noises, use_clipped)
    theirs32 = _ddim_run(diffusers.DDIMScheduler(**config), model, _X.float(), steps, eta, noises, use_clipped)
    oracle = _ddim_run(diffusers.DDIMScheduler(**config), model, _X.clone(), steps, eta, noises, use_clipped,
                       oracle=True)
    for i, what in enumerate(("prev_sample", "pred_original_sample")):
        diff = compare(ours32[i], ours64[i], theirs32[i], oracle[i], f"DDIM {what} {config}, eta={eta}, steps={steps}")
        MAX_SEEN["DDIMScheduler"] = max(MAX_SEEN.get("DDIMScheduler", 0.0), diff)


def test_ddim_timestep_forms_and_generator_noise():
    """An int timestep and a tensor timestep give the same step; with a generator the noise is drawn as
    diffusers draws it, so eta > 0 with a seeded generator matches diffusers."""
    model = make_model()
    x = _X.float()
    a, b = pd.DDIMScheduler(), pd.DDIMScheduler()
    a.set_timesteps(10), b.set_timesteps(10)
    t = a.timesteps[3]
    by_int, by_tensor = a.step(model(x, t), int(t), x).prev_sample, b.step(model(x, t), t, x).prev_sample
    assert _rel(by_int, by_tensor, 1.0) <= 1e-6
    outs = []
    for module in (diffusers, pd):
        s = module.DDIMScheduler()
        s.set_timesteps(10)
        gen, y = torch.Generator().manual_seed(5), x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, eta=0.7, generator=gen).prev_sample
        outs.append(y)
    assert _rel(outs[1], outs[0], 1.0) <= FLOAT32


def test_ddim_philox_noise():
    """eta > 0 without variance_noise or generator: in-kernel Philox normals, reproducible from torch's seed,
    fresh at each step, and of the right scale."""
    model = make_model()
    x = torch.zeros(8, 3, 8, 4)

    def once(seed):
        torch.manual_seed(seed)
        s = pd.DDIMScheduler(clip_sample=False)
        s.set_timesteps(10)
        t = s.timesteps[5]
        deterministic = s.step(model(x, t), t, x, eta=0.0).prev_sample
        return s.step(model(x, t), t, x, eta=1.0).prev_sample - deterministic, s

    first, s = once(3)
    again, _ = once(3)
    other, _ = once(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    t = s.timesteps[5].item()
    prev = t - 1000 // 10
    ac = s.alphas_cumprod.double()
    var = (1 - ac[prev]) / (1 - ac[t]) * (1 - ac[t] / ac[prev])
    z = first.double() / var.sqrt()
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


# --------------------------------------------------------------------------------------------------
# Configuration, errors, import hygiene
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"])
def test_from_config_round_trip(name, tmp_path):
    theirs = getattr(diffusers, name)(beta_schedule="scaled_linear", prediction_type="v_prediction")
    ours = getattr(pd, name).from_config(theirs.config)
    assert type(ours) is getattr(pd, name)
    assert _public(ours.config) == _public(theirs.config)
    again = getattr(pd, name).from_config(ours.config, solver_order=3)
    changed = {} if name == "DDIMScheduler" else {"solver_order": 3}
    assert _public(again.config) == dict(_public(ours.config), **changed)
    back = getattr(diffusers, name).from_config(ours.config)
    assert _public(back.config) == _public(ours.config)
    ours.save_config(tmp_path)
    loaded = getattr(pd, name).from_pretrained(tmp_path)
    assert type(loaded) is getattr(pd, name) and _public(loaded.config) == _public(ours.config)
    # a pipeline's scheduler config of another class converts as diffusers' own classes convert it
    ddim_config = diffusers.DDIMScheduler(clip_sample=False).config
    assert _public(getattr(pd, name).from_config(ddim_config).config) == _public(
        getattr(diffusers, name).from_config(ddim_config).config)


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("cls,config,match", [
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "sde-dpmsolver"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "Philox"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min"),
     "thresholding"),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="v_prediction"), "use_flow_sigmas"),
    ("UniPCMultistepScheduler", dict(solver_p=diffusers.DDIMScheduler()), "solver_p"),
])
def test_unsupported_configurations_raise(cls, config, match):
    with pytest.raises(NotImplementedError, match=match):
        getattr(pd, cls)(**config)


def test_unipc_unsupported():
    s = pd.UniPCMultistepScheduler(solver_order=2, lower_order_final=False, final_sigmas_type="zero")
    s.set_timesteps(5)
    x = _X.float()
    with pytest.raises(ValueError, match="lower_order_final"):
        s.step(make_model()(x, s.timesteps[0]), s.timesteps[0], x)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"])
def test_bad_inputs(name):
    s = getattr(pd, name)()
    x = _X.float()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(3)
    t = s.timesteps[0]
    with pytest.raises(TypeError, match="model_output"):
        s.step(x.numpy(), t, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :2], t, x)
    if name == "DDIMScheduler":
        with pytest.raises(ValueError, match="eta"):
            s.step(x, t, x, eta=-1.0)
        with pytest.raises(ValueError, match="eta"):
            s.step(x, t, x, eta=3.0, variance_noise=torch.randn_like(x))
        with pytest.raises(ValueError, match="generator"):
            s.step(x, t, x, eta=0.5, variance_noise=torch.randn_like(x), generator=torch.Generator())
        with pytest.raises(ValueError, match="timestep"):
            s.step(x, 5000, x)
        return
    x = s.step(make_model()(x, t), t, x).prev_sample  # the run begins with SHAPE
    t = s.timesteps[1]
    with pytest.raises(ValueError, match=r"this sampling run began with \(2, 3, 4, 4\) torch.float32"):
        s.step(make_model()(x[:1], t), t, x[:1].clone())
    for t in s.timesteps[1:]:
        x = s.step(make_model()(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, t, x)


def test_step_is_one_fused_launch(monkeypatch):
    """Every step() is exactly one launch of the fused kernel (DPM-Solver++ 3M, UniPC-3, DDIM with clipping)."""
    from pydpm import _backend
    if _backend.c_cpu_reason():
        pytest.skip(f"needs the C++ CPU backend: {_backend.c_cpu_reason()}")
    calls = []
    real = _backend._C.solver_step_cpu
    monkeypatch.setattr(_backend._C, "solver_step_cpu", lambda *args: (calls.append(1), real(*args))[1])
    model = make_model()
    for s in (pd.DPMSolverMultistepScheduler(solver_order=3), pd.UniPCMultistepScheduler(solver_order=3),
              pd.DDIMScheduler()):
        s.set_timesteps(12)
        x = _X.float()
        for t in s.timesteps:
            calls.clear()
            x = s.step(model(x, t), t, x).prev_sample
            assert len(calls) == 1, (type(s).__name__, len(calls))


def test_import_pydpm_does_not_import_diffusers():
    code = "import sys, pydpm, pydpm.integrations; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------------------------------
# A real pipeline
# --------------------------------------------------------------------------------------------------

def test_example_pipeline_runs():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "diffusers_pipeline.py"
    spec = importlib.util.spec_from_file_location("diffusers_pipeline_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    diffs = example.main(steps=4, verbose=False)
    assert diffs and all(d <= 1e-4 for d in diffs.values()), diffs
