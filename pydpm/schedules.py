"""Noise schedules, timestep spacings and model wrapping, in the conventions of the DPM-Solver authors'
reference code (names, arguments and results match, so code migrates by changing an import).

A schedule defines x_t = α_t·x₀ + σ_t·ε for t ∈ [0, T], with λ_t = log α_t − log σ_t (half log-SNR):
`marginal_log_mean_coeff(t)` = log α_t, `marginal_alpha`, `marginal_std` = σ_t, `marginal_lambda` = λ_t,
`inverse_lambda(λ)` = t. Every method takes and returns tensors (any shape), like the reference.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Callable

import torch

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras")
MODEL_TYPES = ("noise", "x_start", "v", "score", "flow")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free")


def interpolate_fn(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through the keypoints (xp, yp) (xp increasing), extended linearly beyond
    both ends by the outermost segments. x, xp, yp: 1-D."""
    k = xp.numel()
    idx = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, k - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def _check_dtype(name: str, dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}: dtype={dtype!r} must be a floating torch.dtype (the dtype of the times the model "
                        f"receives): torch.float32 (the default) or torch.float64")
    return dtype


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}") from None


def _table(name: str, values: Any) -> torch.Tensor:
    """A discrete schedule's table (betas, alphas_cumprod) as a 1-D float64 CPU tensor of at least two floats."""
    dtype = getattr(values, "dtype", None)
    if dtype is not None and (isinstance(dtype, torch.dtype) and not dtype.is_floating_point
                              or not isinstance(dtype, torch.dtype) and getattr(dtype, "kind", "f") not in "f"):
        raise TypeError(f"NoiseScheduleVP: {name} has dtype {dtype}; pass floats (e.g. diffusers' scheduler.{name}, "
                        f"a float32 or float64 tensor)")
    try:
        t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"NoiseScheduleVP: {name} must be a 1-D tensor or sequence of floats, got "
                        f"{type(values).__name__}") from None
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"NoiseScheduleVP: {name} has shape {tuple(t.shape)}; it must be 1-D with one entry per "
                         f"training step (at least 2)")
    if not bool(torch.isfinite(t).all()):
        i = int((~torch.isfinite(t)).nonzero()[0])
        raise ValueError(f"NoiseScheduleVP: {name}[{i}] = {float(t[i])}; every entry must be finite")
    return t


class _Schedule:
    """Methods every schedule derives from `marginal_log_mean_coeff` and `marginal_std`."""

    schedule: str
    T: float
    total_N: int

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        return self.marginal_log_mean_coeff(t) - torch.log(self.marginal_std(t))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time label a model trained on this schedule takes (`model_wrapper` feeds it)."""
        return t


class NoiseScheduleVP(_Schedule):
    """Variance-preserving schedule (σ_t² = 1 − α_t²).

    `schedule='discrete'`: from `betas` or `alphas_cumprod` of a model trained on n = 0 … N−1, placed at
    t_n = (n + 1)/N with log α interpolated piecewise-linearly; entries whose λ falls below −5.1 are
    dropped (the DPM-Solver authors' fix for cosine-like schedules), which shortens N. Models take the
    label 1000·(t − 1/N).
    `schedule='linear'`: the continuous VP-SDE, log α_t = −¼t²(β₁ − β₀) − ½tβ₀.
    `schedule='cosine'`: the continuous cosine schedule of Nichol & Dhariwal (s = 0.008, T = 0.9946).
    """

    def __init__(self, schedule: str = "discrete", betas: torch.Tensor | None = None,
                 alphas_cumprod: torch.Tensor | None = None, continuous_beta_0: float = 0.1,
                 continuous_beta_1: float = 20.0, dtype: torch.dtype = torch.float32):
        if schedule not in ("discrete", "linear", "cosine"):
            raise ValueError(f"NoiseScheduleVP: schedule={schedule!r}; use 'discrete' (with betas or alphas_cumprod), "
                             f"'linear' or 'cosine' (or NoiseScheduleFlow for flow matching)")
        self.schedule = schedule
        self.dtype = _check_dtype("NoiseScheduleVP", dtype)
        self.T = 1.0
        if schedule == "discrete":
            if (betas is None) == (alphas_cumprod is None):
                raise ValueError("NoiseScheduleVP('discrete') needs exactly one of betas or alphas_cumprod")
            if betas is not None:
                betas = _table("betas", betas)
                bad = ~((betas > 0) & (betas < 1))
                if bool(bad.any()):
                    i = int(bad.nonzero()[0])
                    raise ValueError(f"NoiseScheduleVP: betas[{i}] = {float(betas[i])}; every beta must lie in the open "
                                     f"interval (0, 1) (diffusers' scheduler.betas, e.g. torch.linspace(1e-4, 0.02, "
                                     f"1000))")
                log_alphas = 0.5 * torch.log1p(-betas).cumsum(0)
            else:
                ac = _table("alphas_cumprod", alphas_cumprod)
                bad = ~((ac > 0) & (ac <= 1))
                if bool(bad.any()):
                    i = int(bad.nonzero()[0])
                    zero = " (a zero terminal SNR schedule: drop its last entry)" if float(ac[i]) == 0 else ""
                    raise ValueError(f"NoiseScheduleVP: alphas_cumprod[{i}] = {float(ac[i])}; every entry must lie in "
                                     f"(0, 1]{zero}")
                rise = ~(ac.diff() < 0)
                if bool(rise.any()):
                    i = int(rise.nonzero()[0])
                    raise ValueError(f"NoiseScheduleVP: alphas_cumprod must be strictly decreasing (ᾱ_n = Π(1 − β_k) "
                                     f"with β in (0, 1)), but alphas_cumprod[{i + 1}] = {float(ac[i + 1])} >= "
                                     f"alphas_cumprod[{i}] = {float(ac[i])}; pass the model's alphas_cumprod (or its "
                                     f"betas)")
                log_alphas = 0.5 * torch.log(ac)
            log_alphas = self._clip_lambda(log_alphas)
            arg = "betas" if betas is not None else "alphas_cumprod"
            if log_alphas.numel() < 2:
                raise ValueError(f"NoiseScheduleVP: {arg} keeps {log_alphas.numel()} entries with λ >= -5.1 (the "
                                 f"entries past it are dropped); a discrete schedule needs at least 2: pass the "
                                 f"model's whole {arg}")
            self.total_N = log_alphas.numel()
            self.log_alpha_array = log_alphas.to(dtype)
            if not bool((self.log_alpha_array.diff() < 0).all()):
                raise ValueError(f"NoiseScheduleVP: {arg} has steps too small to resolve in dtype={dtype} (log α repeats "
                                 f"after rounding, which breaks inverse_lambda); use dtype=torch.float64")
            self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=torch.float64)[1:].to(dtype)
        elif schedule == "linear":
            self.total_N = 1000
            b0, b1 = (_real(f"NoiseScheduleVP('linear'): {name}", v) for name, v in (("continuous_beta_0", continuous_beta_0),
                                                       ("continuous_beta_1", continuous_beta_1)))
            if not (math.isfinite(b0) and b0 >= 0):
                raise ValueError(f"NoiseScheduleVP('linear'): continuous_beta_0={b0} must be a finite number >= 0 "
                                 f"(β(t) = β₀ + t·(β₁ − β₀); the usual value is 0.1)")
            if not (math.isfinite(b1) and b1 > 0):
                raise ValueError(f"NoiseScheduleVP('linear'): continuous_beta_1={b1} must be a finite number > 0 "
                                 f"(β(t) = β₀ + t·(β₁ − β₀); the usual value is 20)")
            self.beta_0, self.beta_1 = b0, b1
        else:
            self.total_N = 1000
            self.cosine_s = 0.008
            self.cosine_beta_max = 999.0
            self.T = 0.9946
            self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))

    @staticmethod
    def _clip_lambda(log_alphas: torch.Tensor, clipped_lambda: float = -5.1) -> torch.Tensor:
        lambs = log_alphas - 0.5 * torch.log(-torch.expm1(2.0 * log_alphas))
        idx = int(torch.searchsorted(torch.flip(lambs, [0]), clipped_lambda))
        return log_alphas[:-idx] if idx > 0 else log_alphas

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "discrete":
            shape = t.shape
            xp, yp = self.t_array.to(t.device, t.dtype), self.log_alpha_array.to(t.device, t.dtype)
            return interpolate_fn(t.reshape(-1), xp, yp).reshape(shape)
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1.0 + s) * math.pi / 2.0)) - self.cosine_log_alpha_0

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        if self.schedule == "linear":
            if self.beta_1 == self.beta_0:  # a constant β: −2·log α = β·t
                return torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb)) / self.beta_0
            tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
            delta = self.beta_0 ** 2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        if self.schedule == "discrete":
            xp = torch.flip(self.log_alpha_array.to(lamb.device, lamb.dtype), [0])
            yp = torch.flip(self.t_array.to(lamb.device, lamb.dtype), [0])
            return interpolate_fn(log_alpha.reshape(-1), xp, yp).reshape(lamb.shape)
        s = self.cosine_s
        return torch.arccos(torch.exp(log_alpha + self.cosine_log_alpha_0)) * 2.0 * (1.0 + s) / math.pi - s

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "discrete":
            return (t - 1.0 / self.total_N) * 1000.0
        return t


class NoiseScheduleFlow(_Schedule):
    """Flow-matching (rectified-flow) path x_t = (1 − t)·x₀ + t·ε: α_t = 1 − t, σ_t = t, T = 1.

    Models take the continuous t (scale it inside the model if it was trained on 1000·t). At t = 1,
    α = 0 and λ = −∞: the data-prediction solvers (DPM-Solver++, UniPC with data prediction, DDIM) start
    there exactly; noise-prediction solvers need t_start < 1.
    """

    schedule = "flow"

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = _check_dtype("NoiseScheduleFlow", dtype)
        self.T = 1.0
        self.total_N = 1000

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-lamb)


def time_steps(noise_schedule: _Schedule, skip_type: str, t_T: float, t_0: float, N: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """N + 1 times from t_T down to t_0, float64.

    'time_uniform': uniform in t.  'logSNR': uniform in λ.  'time_quadratic': uniform in √t (DDIM's
    quadratic spacing).  'karras': EDM's ρ = 7 spacing of σ/α = e^{−λ} (Karras et al. 2022).
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type={skip_type!r}; use one of {', '.join(map(repr, SKIP_TYPES))}")
    for attr in ("marginal_lambda", "inverse_lambda", "T"):
        if not hasattr(noise_schedule, attr):
            raise TypeError(f"time_steps: noise_schedule lacks {attr}; pass a pydpm.schedules.NoiseScheduleVP or "
                            f"NoiseScheduleFlow")
    if isinstance(N, bool) or not isinstance(N, numbers.Integral):
        raise TypeError(f"time_steps: N={N!r} (the number of steps) must be an int, got {type(N).__name__}")
    if N < 1:
        raise ValueError(f"time_steps: N={N!r} (the number of steps) must be >= 1")
    N = int(N)
    T = float(noise_schedule.T)
    t_T, t_0 = (_real(f"time_steps: {name}", v) for name, v in (("t_T", t_T), ("t_0", t_0)))
    for name, v in (("t_T", t_T), ("t_0", t_0)):
        if not (math.isfinite(v) and 0 <= v <= T + 1e-12):
            raise ValueError(f"time_steps: {name}={v} must be a finite time in [0, T = {T}]")
    if skip_type in ("logSNR", "karras"):
        for name, v in (("t_T", t_T), ("t_0", t_0)):
            lam = float(noise_schedule.marginal_lambda(torch.tensor(v, dtype=torch.float64)))
            if not math.isfinite(lam):
                raise ValueError(f"time_steps: skip_type={skip_type!r} spaces the steps in λ, which is {lam} at "
                                 f"{name}={v}; use 'time_uniform' or 'time_quadratic', or a {name} inside (0, T) "
                                 f"where λ is finite")
    f64 = dict(dtype=torch.float64)
    if skip_type == "time_uniform":
        ts = torch.linspace(t_T, t_0, N + 1, **f64)
    elif skip_type == "time_quadratic":
        ts = torch.linspace(t_T ** 0.5, t_0 ** 0.5, N + 1, **f64) ** 2
    else:
        lam_T, lam_0 = (float(noise_schedule.marginal_lambda(torch.tensor(v, **f64))) for v in (t_T, t_0))
        if skip_type == "logSNR":
            lams = torch.linspace(lam_T, lam_0, N + 1, **f64)
        else:
            rho = 7.0
            s_max, s_min = math.exp(-lam_T / rho), math.exp(-lam_0 / rho)
            lams = -rho * torch.log(torch.linspace(s_max, s_min, N + 1, **f64))
        ts = noise_schedule.inverse_lambda(lams)
        ts[0], ts[-1] = t_T, t_0
    return ts.to(device)


# --------------------------------------------------------------------------------------------------
# Model wrapping
# --------------------------------------------------------------------------------------------------

def conversion(model_type: str, alpha: float, sigma: float, target: str) -> tuple[float, float]:
    """(a, b) with target = a·x + b·output for a model of `model_type` at a point (α, σ) of the schedule;
    `target` is 'noise' (ε) or 'data' (x₀). Every parameterisation is linear in (x, output)."""
    if model_type == "noise":
        eps = (0.0, 1.0)
    elif model_type == "x_start":
        eps = (1.0 / sigma, -alpha / sigma)
    elif model_type == "v":
        eps = (sigma, alpha)
    elif model_type == "score":
        eps = (0.0, -sigma)
    elif model_type == "flow":  # v = ε − x₀ on α = 1 − t, σ = t: x₀ = x − σ·v, ε = x + α·v
        return (1.0, alpha) if target == "noise" else (1.0, -sigma)
    else:
        raise ValueError(f"model_type={model_type!r}; use one of {', '.join(map(repr, MODEL_TYPES))}")
    if target == "noise":
        return eps
    return ((1.0 - sigma * eps[0]) / alpha, -sigma * eps[1] / alpha)  # x₀ = (x − σ·ε)/α


def is_diffusers_model(obj: Any) -> bool:
    """Whether `obj` is a diffusers model (`diffusers.ModelMixin`): such models take the training timestep
    and return an output object (`.sample`). Never imports diffusers: if it is not imported, obj is not one."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(obj, diffusers.ModelMixin)


def fused_wrapper(model_fn: Any) -> bool:
    """Whether `model_fn` is a `model_wrapper` model whose raw output(s) a sampler converts itself (its model-type
    conversion and classifier-free guidance folded into the fused step): every one but classifier guidance."""
    return isinstance(model_fn, WrappedModel) and model_fn.fusable


class WrappedModel:
    """The continuous-time model `model_wrapper` returns: call it as `model_fn(x, t)` for the noise
    prediction (the reference's behaviour). The samplers instead call `outputs(x, t_input)` and fold
    the model-type conversion and classifier-free guidance into the fused step: the raw output, or the
    (cond, uncond) pair, reaches `pydpm.ops.solver_step` untouched."""

    def __init__(self, model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                 unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs):
        self.model, self.noise_schedule = model, noise_schedule
        self.model_type, self.guidance_type = model_type, guidance_type
        self.model_kwargs, self.classifier_kwargs = dict(model_kwargs or {}), dict(classifier_kwargs or {})
        self.condition, self.unconditional_condition = condition, unconditional_condition
        self.guidance_scale, self.classifier_fn = float(guidance_scale), classifier_fn

    @property
    def fusable(self) -> bool:
        """True when the output is linear in the raw model output(s): everything but classifier guidance."""
        return self.guidance_type != "classifier"

    @property
    def pair(self) -> bool:
        """True when `outputs` returns a (cond, uncond) pair combined with `guidance_scale`."""
        return (self.guidance_type == "classifier-free" and self.guidance_scale != 1.0
                and self.unconditional_condition is not None)

    def _call(self, x, t_input, cond=None):
        if cond is None:
            return self.model(x, t_input, **self.model_kwargs)
        return self.model(x, t_input, cond, **self.model_kwargs)

    def outputs(self, x: torch.Tensor, t_input: torch.Tensor):
        """Raw model output at model time `t_input` [B]: one tensor, or (cond, uncond) when `pair`.
        Classifier-free pairs run as one batch of 2B, as the reference does."""
        if self.guidance_type == "uncond":
            return self._call(x, t_input)
        if not self.pair:
            return self._call(x, t_input, self.condition)
        x_in, t_in = torch.cat([x, x]), torch.cat([t_input, t_input])
        c_in = torch.cat([self.unconditional_condition, self.condition])
        uncond, cond = self._call(x_in, t_in, c_in).chunk(2)
        return cond, uncond

    def __call__(self, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        ns = self.noise_schedule
        t_continuous = t_continuous.expand(x.shape[0]) if t_continuous.dim() <= 1 else t_continuous
        t_input = ns.model_time(t_continuous)
        dims = (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma = ns.marginal_alpha(t_continuous).reshape(dims), ns.marginal_std(t_continuous).reshape(dims)

        def to_noise(out):
            if self.model_type == "noise":
                return out
            if self.model_type == "x_start":
                return (x - alpha * out) / sigma
            if self.model_type == "v":
                return alpha * out + sigma * x
            if self.model_type == "score":
                return -sigma * out
            return x + alpha * out

        if self.guidance_type == "classifier":
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_prob = self.classifier_fn(x_in, t_input, self.condition, **self.classifier_kwargs)
                grad = torch.autograd.grad(log_prob.sum(), x_in)[0]
            return to_noise(self._call(x, t_input)) - self.guidance_scale * sigma * grad
        out = self.outputs(x, t_input)
        if self.pair:
            cond, uncond = (to_noise(o) for o in out)
            return uncond + self.guidance_scale * (cond - uncond)
        return to_noise(out)


def model_wrapper(model: Callable[..., torch.Tensor], noise_schedule: _Schedule, model_type: str = "noise",
                  model_kwargs: dict[str, Any] | None = None, guidance_type: str = "uncond", condition=None,
                  unconditional_condition=None, guidance_scale: float = 1.0,
                  classifier_fn: Callable[..., torch.Tensor] | None = None,
                  classifier_kwargs: dict[str, Any] | None = None) -> WrappedModel:
    """Wrap a noise / x_start / v / score / flow-velocity model into the continuous-time
    noise-prediction function the solvers take (the DPM-Solver authors' `model_wrapper`).

    model(x, t_input, **model_kwargs) (or model(x, t_input, cond, **model_kwargs) for classifier-free
    guidance) with t_input = 1000·(t − 1/N) for discrete schedules, t otherwise.
    guidance_type 'classifier' adds −guidance_scale·σ_t·∇ₓ log p(cond | x_t) from `classifier_fn(x,
    t_input, cond, **classifier_kwargs)` (needs autograd: not fused). 'classifier-free' evaluates
    (unconditional_condition, condition) as one batch; the pair is combined inside the fused step.
    A diffusers model returns an output object: pass `lambda x, t: net(x, t).sample` (the model itself is
    refused with that call).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_wrapper: model_type={model_type!r}; use one of {', '.join(map(repr, MODEL_TYPES))}")
    if not callable(model):
        raise TypeError(f"model_wrapper: model={model!r} must be callable, the network as model(x, t_input, "
                        f"**model_kwargs) (model(x, t_input, cond, ...) for classifier-free guidance)")
    for attr in ("marginal_log_mean_coeff", "marginal_std", "model_time", "schedule"):
        if not hasattr(noise_schedule, attr):
            raise TypeError(f"model_wrapper: noise_schedule lacks {attr}; pass a pydpm.schedules.NoiseScheduleVP or "
                            f"NoiseScheduleFlow, got {type(noise_schedule).__name__}")
    if is_diffusers_model(model):
        fn = "lambda x, t, c: net(x, t, c).sample" if guidance_type == "classifier-free" else \
            "lambda x, t: net(x, t).sample"
        raise TypeError(f"model_wrapper: model is a diffusers {type(model).__name__}, which returns an output object; "
                        f"wrap a function that returns its tensor: model_wrapper({fn}, noise_schedule, "
                        f"model_type={model_type!r}, ...)")
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"model_wrapper: guidance_type={guidance_type!r}; use one of "
                         f"{', '.join(map(repr, GUIDANCE_TYPES))}")
    if model_type == "flow" and noise_schedule.schedule != "flow":
        raise ValueError("model_wrapper: model_type='flow' (velocity ε − x₀) needs NoiseScheduleFlow, got a "
                         f"{noise_schedule.schedule!r} schedule")
    if guidance_type == "classifier" and classifier_fn is None:
        raise ValueError("model_wrapper: guidance_type='classifier' needs classifier_fn")
    if guidance_type == "classifier-free" and condition is None:
        raise ValueError("model_wrapper: guidance_type='classifier-free' needs condition (and "
                         "unconditional_condition to guide)")
    if guidance_type == "classifier" and not callable(classifier_fn):
        raise TypeError(f"model_wrapper: classifier_fn={classifier_fn!r} must be callable, "
                        f"classifier_fn(x, t_input, cond, **classifier_kwargs) -> log p(cond | x)")
    if not math.isfinite(_real("model_wrapper: guidance_scale", guidance_scale)):
        raise ValueError(f"model_wrapper: guidance_scale={guidance_scale} must be finite")
    return WrappedModel(model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                        unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs)
