"""diffusers schedulers whose `step()` is one fused `pydpm.ops.solver_step` launch.

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class subclasses the diffusers scheduler of the same name, so the configuration, `set_timesteps`
(spacings, Karras / exponential / beta / flow sigmas, custom timesteps), `scale_model_input`,
`add_noise`, `init_noise_sigma`, `order` and the step-index bookkeeping (`step_index`, `begin_index`,
`set_begin_index`) are diffusers' own. Only `step()` changes:

* DPM-Solver(++) and UniPC: at the first `step()` after `set_timesteps` (when the start index is known:
  img2img pipelines start mid-schedule) the rest of the schedule is traced once with pydpm's sampler
  programs (`dpm_solver_multistep`, `unipc_multistep`) at the orders diffusers' `step()` would pick,
  compiled to float64 coefficients, and driven one model call at a time by a `Stepper`. Each `step()`
  is then one fused launch: model-output conversion, thresholding and the multistep update together;
  UniPC's corrector and the next predictor share that launch.
* DDIM: one `solver_step` per call, its coefficients read from a per-timestep table (per eta).

One scheduler object serves one sampling loop at a time, as in diffusers (step() keeps the loop's position and
history): a step() from another thread than the one that began the run, or with a host timestep other than
timesteps[step_index] (two loops interleaved), raises RuntimeError; use one scheduler per loop.

A pipeline saved with these schedulers (`save_pretrained`) loads back with them (`from_pretrained`) in a
process that has imported this module: model_index.json names the scheduler
["pydpm.integrations.diffusers", class name], and diffusers 0.42 resolves only modules already imported.

`PydpmAttnProcessor` runs diffusers' attention blocks through `pydpm.ops.attention`; `use_pydpm_attention`
puts it on a model's blocks whose processor it reproduces and `restore_attention` takes it off again.

Tested with diffusers 0.42.1; the test and bench extras of pyproject.toml require diffusers>=0.42 (the
schedulers read diffusers internals; 0.30.3 failed 21 of the diffusers tests). Differences from diffusers are
listed in docs/diffusers.md.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import threading
import warnings
import weakref
from typing import Any

import diffusers
import numpy as np
import torch
# diffusers' pipeline loader finds a saved component's loading method by looking base-class names up in the
# module model_index.json names: without SchedulerMixin here, from_pretrained cannot load these schedulers.
from diffusers import SchedulerMixin  # noqa: F401
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from pydpm._cache import BoundedCache
from pydpm.integrations._blocks import BlockSwaps, swap_blocks, swap_layout
from pydpm.integrations._graph import GraphedForward
from pydpm.ops import PhiloxNoise, Threshold, solver_step
from pydpm.ops._framework import forced_backend
from pydpm.ops.attention import OP as _ATTENTION, attention, check_args as _check_attention
from pydpm.samplers._program import Options, Point, Stepper, Tracer, compile_plan
from pydpm.samplers.dpm_solver import dpm_solver_multistep
from pydpm.samplers.unipc import unipc_multistep
from pydpm.schedules import conversion

# diffusers' prediction_type -> pydpm's model type (pydpm.schedules.conversion)
MODEL_TYPES = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v", "flow_prediction": "flow"}
# diffusers' DPM-Solver solver_type -> pydpm's
_DPM_SOLVER_TYPES = {"midpoint": "dpmsolver", "heun": "taylor"}
# A noise-prediction update to σ = 0 is 0·∞ in closed form; its limit is taken at λ_prev + this (e^-60 ≈ 1e-26).
_LIMIT_DLAM = 60.0
# Cache sizes: plans per scheduler (one per timestep table and start), attention call classes per processor.
_MAX_PLANS = 8
_MAX_ROUTES = 256


def _no_hooks(x, point, step):
    return x


class _StepTimes:
    """The Stepper's schedule: the caller evaluates the model, so model times are never read."""

    dtype = torch.float32

    @staticmethod
    def model_time(t: torch.Tensor) -> torch.Tensor:
        return t


def _points(scheduler) -> list[Point]:
    """Points of diffusers' `sigmas` in float64 through the scheduler's own `_sigma_to_alpha_sigma_t`
    (σ_d = σ/α for VP schedules, σ itself with flow sigmas). σ_d = 0 gives α = 1, σ = 0, λ = +∞."""
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas.detach().to("cpu", torch.float64))
    pts = []
    for i, (a, s) in enumerate(zip(alpha.tolist(), sigma.tolist())):
        log_alpha = math.log(a) if a > 0 else -math.inf
        pts.append(Point(float(i), log_alpha, s, log_alpha - math.log(s) if s > 0 else math.inf))
    return pts


def _threshold(config) -> Threshold | None:
    """diffusers' dynamic thresholding: s = clamp(quantile(|x̂₀|, ratio), min=1, max=sample_max_value)
    (torch.clamp lets max win when sample_max_value < 1)."""
    if not config.thresholding:
        return None
    top = float(config.sample_max_value)
    return Threshold(float(config.dynamic_thresholding_ratio), min(1.0, top), top)


def _check_common(name: str, config) -> None:
    if config.prediction_type not in MODEL_TYPES:
        raise ValueError(f"{name}: prediction_type={config.prediction_type!r}; use one of "
                         f"{', '.join(map(repr, MODEL_TYPES))}")
    if config.thresholding:
        if not 0.0 <= config.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"{name}: dynamic_thresholding_ratio={config.dynamic_thresholding_ratio} must lie in "
                             f"[0, 1]")
        if not config.sample_max_value > 0:
            raise ValueError(f"{name}: sample_max_value={config.sample_max_value} must be positive")
    if getattr(config, "use_flow_sigmas", False) and config.prediction_type == "v_prediction":
        raise NotImplementedError(f"{name}: prediction_type='v_prediction' with use_flow_sigmas=True is not "
                                  f"supported: pydpm's v conversion assumes α² + σ² = 1, which flow sigmas break")


def _check_tensors(model_output, sample) -> None:
    for arg, t in (("model_output", model_output), ("sample", sample)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")


def _host_value(timestep) -> float | None:
    """The timestep as a float when reading it costs no device synchronisation (a number or a CPU tensor)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(())) if timestep.is_cpu and timestep.numel() == 1 else None
    if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
        return float(timestep)
    if isinstance(timestep, np.ndarray) and timestep.size == 1:
        return float(timestep.reshape(()))
    return None


def _check_timestep(scheduler, timestep, host_timesteps: list) -> None:
    """Refuse a step() whose timestep is not the one at the scheduler's step index: the sign of two sampling loops
    interleaved on one scheduler object (each moves step_index for the other). Checked where it is free: a
    timestep on a CUDA device is not read (that would synchronise every step). `host_timesteps` caches the
    run's timesteps on the host (filled at the first check)."""
    v = _host_value(timestep)
    if v is None:
        return
    if not host_timesteps:
        host_timesteps.append(scheduler.timesteps.detach().cpu().tolist())
    expected = host_timesteps[0][scheduler._step_index]
    if abs(v - expected) > 1e-4 * max(1.0, abs(expected)):
        raise RuntimeError(
            f"{type(scheduler).__name__}.step: timestep={v:g}, but this scheduler's loop is at step index "
            f"{scheduler._step_index} (timestep {expected:g}). One scheduler object serves one sampling loop at a time "
            f"(step() keeps the loop's position and history): use one scheduler per loop (e.g. "
            f"{type(scheduler).__name__}.from_config(scheduler.config)), pass the timesteps in the order of "
            f"scheduler.timesteps, or call set_timesteps to start again")


class _FusedMultistep:
    """What the DPM-Solver and UniPC schedulers share: a plan per (schedule, start index), traced and
    compiled at the first step() and driven one model call per step() by a `Stepper`."""

    def _fused_init(self) -> None:
        self._fused_plans = BoundedCache(_MAX_PLANS)
        self._fused_run = None
        self._fused_check_config()

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_check_config()
        self._fused_run = None

    # Subclasses define these.
    def _fused_check_config(self) -> None:
        raise NotImplementedError

    def _fused_predict(self) -> str:
        raise NotImplementedError

    def _fused_program(self, tr: Tracer, start: int):
        raise NotImplementedError

    def _fused_stepper(self, start: int) -> Stepper:
        key = (start, len(self.timesteps), self.sigmas.detach().cpu().numpy().tobytes())
        stepper = self._fused_plans.get(key)
        if stepper is None:
            tr = Tracer(self._fused_predict(), None)
            tr.output(self._fused_program(tr, start))
            opts = Options(None, _StepTimes(), threshold=_threshold(self.config),
                           model_type=MODEL_TYPES[self.config.prediction_type])
            stepper = self._fused_plans.put(key, Stepper(compile_plan(tr), opts))
        return stepper

    def _model_mean(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return model_output

    @staticmethod
    def _result_dtype(model_dtype: torch.dtype, sample_dtype: torch.dtype) -> torch.dtype:
        """The dtype diffusers' step() returns for these inputs (0.42.1: DPM-Solver promotes, UniPC keeps the
        sample's)."""
        return torch.promote_types(model_dtype, sample_dtype)

    def _fused_points(self, start: int) -> tuple[list[Point], bool]:
        """The schedule's points from `start` on, and whether the last step has zero length (Karras or
        flow sigmas with final_sigmas_type='sigma_min' repeat the last σ: diffusers' step there is the
        identity, up to UniPC's corrector of the step before)."""
        pts = _points(self)[start:]
        for i in range(len(pts) - 2):
            if pts[i + 1].lam == pts[i].lam:
                raise ValueError(f"{type(self).__name__}: σ repeats at step index {start + i} of the schedule; a "
                                 f"zero-length step is supported only as the last one")
        return pts, len(pts) >= 2 and pts[-1].lam == pts[-2].lam

    def _fused_step(self, model_output, timestep, sample) -> torch.Tensor:
        run = self._fused_run
        if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)):
            _check_tensors(model_output, sample)
        if run is None or self._step_index is None:
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                                 "creating the scheduler")
            _check_tensors(model_output, sample)
            if self._step_index is None:
                self._init_step_index(timestep)
            if run is None:
                stepper = self._fused_stepper(self._step_index)
                stepper.start()
                # The run computes in one dtype (its history slots hold it): the first step's promotion. It
                # belongs to this thread; the interleaving check reads its timesteps on the host once, when needed.
                run = self._fused_run = (self._step_index, stepper, torch.promote_types(model_output.dtype,
                                                                                       sample.dtype),
                                         threading.get_ident(), [])
        start, stepper, common, thread, host_timesteps = run
        if thread != threading.get_ident():
            raise RuntimeError(f"{type(self).__name__}: this scheduler's sampling run was started by another thread; "
                               f"one scheduler object serves one sampling loop at a time (its step() keeps the "
                               f"loop's history): give each thread its own scheduler (e.g. "
                               f"{type(self).__name__}.from_config(scheduler.config))")
        if stepper.done:
            raise ValueError(f"all {len(self.timesteps) - start} steps from step index {start} have run; call "
                             f"set_timesteps before sampling again")
        if self._step_index - start != stepper.k:
            raise RuntimeError(f"step_index is {self._step_index}, but the fused run that started at step index "
                               f"{start} has made {stepper.k} steps: the index was changed outside step(); call "
                               f"set_timesteps (and set_begin_index) again to restart")
        if stepper.k > 0:
            _check_timestep(self, timestep, host_timesteps)
        model_output = self._model_mean(model_output, sample)
        if model_output.dtype is common and sample.dtype is common:
            prev = stepper.step(sample, model_output)
        else:
            _check_tensors(model_output, sample)
            dtype = self._result_dtype(model_output.dtype, sample.dtype)
            prev = stepper.step(sample.to(common), model_output.to(common)).to(dtype)
        if prev is sample:  # a lone zero-length step: no launch, but the caller gets a new tensor
            prev = sample.clone()
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev


class DPMSolverMultistepScheduler(_FusedMultistep, diffusers.DPMSolverMultistepScheduler):
    """diffusers' `DPMSolverMultistepScheduler` with each `step()` one fused launch (pydpm's multistep
    DPM-Solver(++) program at diffusers' per-step orders).

    Supported: algorithm_type 'dpmsolver++' / 'dpmsolver'; solver_order 1-3; solver_type 'midpoint' /
    'heun'; every prediction_type; every sigma option of `set_timesteps`; thresholding; lower_order_final,
    euler_at_final, final_sigmas_type; variance_type 'learned'/'learned_range' (the first half of the
    channels is used). Not supported: 'sde-dpmsolver(++)' (NotImplementedError, see docs/diffusers.md).
    """

    @functools.wraps(diffusers.DPMSolverMultistepScheduler.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_init()

    def _fused_check_config(self) -> None:
        cfg, name = self.config, type(self).__name__
        if cfg.algorithm_type not in ("dpmsolver++", "dpmsolver"):
            raise NotImplementedError(
                f"{name}: algorithm_type={cfg.algorithm_type!r} is not supported. pydpm draws SDE noise inside the "
                f"fused kernel (Philox), so it cannot reproduce the noise of a torch `generator` that diffusers' "
                f"step() receives; use algorithm_type 'dpmsolver++' or 'dpmsolver', diffusers' own scheduler, or "
                f"pydpm.samplers.SDEDPMSolverPP")
        if cfg.solver_type not in _DPM_SOLVER_TYPES:
            raise ValueError(f"{name}: solver_type={cfg.solver_type!r}; use 'midpoint' or 'heun'")
        order = cfg.solver_order
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"{name}: solver_order={cfg.solver_order!r} must be 1, 2 or 3")
        if cfg.algorithm_type == "dpmsolver" and cfg.prediction_type == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs algorithm_type='dpmsolver++' (as in "
                             f"diffusers)")
        if cfg.algorithm_type == "dpmsolver" and cfg.thresholding:
            raise NotImplementedError(
                f"{name}: thresholding with algorithm_type='dpmsolver' is not supported. diffusers thresholds x̂₀ and "
                f"keeps ε = (x − α·x̂₀)/σ as history, a per-step mix of the sample and the thresholded prediction that "
                f"the fused step cannot store (it saves the thresholded x̂₀ only); use algorithm_type='dpmsolver++', "
                f"where thresholding is part of the fused step")
        _check_common(name, cfg)

    def _fused_predict(self) -> str:
        return "data" if self.config.algorithm_type == "dpmsolver++" else "noise"

    def _orders(self, start: int) -> list[int]:
        """The order diffusers' step() uses at each step index from `start` on."""
        cfg, n = self.config, len(self.timesteps)
        orders = []
        for k in range(start, n):
            warm = min(k - start, cfg.solver_order)  # diffusers' lower_order_nums
            final = k == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                    or cfg.final_sigmas_type == "zero")
            second = k == n - 2 and cfg.lower_order_final and n < 15
            if cfg.solver_order == 1 or warm < 1 or final:
                orders.append(1)
            elif cfg.solver_order == 2 or warm < 2 or second:
                orders.append(2)
            else:
                orders.append(3)
        return orders

    def _fused_program(self, tr: Tracer, start: int):
        pts, zero_last = self._fused_points(start)
        orders, solver_type = self._orders(start), _DPM_SOLVER_TYPES[self.config.solver_type]
        if not zero_last:
            return dpm_solver_multistep(tr, tr.x, pts, orders, solver_type, _no_hooks)
        x = dpm_solver_multistep(tr, tr.x, pts[:-1], orders[:-1], solver_type, _no_hooks) if len(pts) > 2 else tr.x
        tr.model(x, pts[-2])  # the pipeline evaluates the model at the last step; a zero-length step ignores it
        return x

    def _model_mean(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        channels = sample.shape[1] if sample.dim() > 1 else None
        if (self.config.variance_type in ("learned", "learned_range") and channels is not None
                and model_output.dim() > 1 and model_output.shape[1] == 2 * channels):
            return model_output[:, :channels]
        return model_output

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise=None, return_dict: bool = True):
        """One multistep DPM-Solver(++) step: one fused launch. `generator` and `variance_noise` are
        accepted for signature compatibility and unused (as in diffusers for the ODE solvers)."""
        prev = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class UniPCMultistepScheduler(_FusedMultistep, diffusers.UniPCMultistepScheduler):
    """diffusers' `UniPCMultistepScheduler` with each `step()` one fused launch: the corrector of the
    previous step and the predictor of this one are one linear combination (the corrected sample is never
    materialised).

    Supported: solver_type 'bh1' / 'bh2'; solver_order 1-3; predict_x0 True / False; every
    prediction_type; disable_corrector; lower_order_final; every sigma option; thresholding. Not
    supported: solver_p. Differences: the corrector folds into the launch, so an edit of `sample` between
    steps is scaled into the result rather than ignored (docs/diffusers.md); the final step to σ = 0
    is finite where diffusers' bh1 and noise-prediction variants return NaN.
    """

    @functools.wraps(diffusers.UniPCMultistepScheduler.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_init()

    def _fused_check_config(self) -> None:
        cfg, name = self.config, type(self).__name__
        if self.solver_p is not None:
            raise NotImplementedError(f"{name}: solver_p (another scheduler as predictor) is not supported by the "
                                      f"fused step")
        if cfg.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"{name}: solver_type={cfg.solver_type!r}; use 'bh1' or 'bh2'")
        if not cfg.predict_x0 and cfg.prediction_type == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs predict_x0=True (as in diffusers)")
        if not isinstance(cfg.solver_order, int) or cfg.solver_order < 1:
            raise ValueError(f"{name}: solver_order={cfg.solver_order!r} must be a positive int")
        _check_common(name, cfg)

    def _fused_predict(self) -> str:
        return "data" if self.config.predict_x0 else "noise"

    @staticmethod
    def _result_dtype(model_dtype: torch.dtype, sample_dtype: torch.dtype) -> torch.dtype:
        return sample_dtype

    def _fused_program(self, tr: Tracer, start: int):
        cfg, n = self.config, len(self.timesteps)
        disabled = set(cfg.disable_corrector or ())
        orders, correctors = [], []
        for k in range(start, n):
            order = min(cfg.solver_order, n - k) if cfg.lower_order_final else cfg.solver_order
            orders.append(min(order, min(k - start, cfg.solver_order) + 1))
            # diffusers corrects at step k + 1 the prediction made at step k, unless k is disabled
            correctors.append(k + 1 < n and k not in disabled)
        pts, zero_last = self._fused_points(start)
        if zero_last:
            # The last predictor has zero length (the identity); the model call of the last step still feeds
            # the corrector of the step before, unless that is disabled.
            if len(pts) == 2:
                tr.model(tr.x, pts[0])
                return tr.x
            x = unipc_multistep(tr, tr.x, pts[:-1], orders[:-1], correctors[:-1], cfg.solver_type, _no_hooks)
            if not correctors[-2]:
                tr.model(x, pts[-2])
            return x
        last = pts[-1]
        if last.sigma == 0.0:
            if orders[-1] > 1:
                raise ValueError(
                    f"{type(self).__name__}: lower_order_final=False with final_sigmas_type='zero' makes the last "
                    f"step (to σ = 0) of order {orders[-1]}, whose coefficients diverge (diffusers returns inf/NaN "
                    f"there); use lower_order_final=True or final_sigmas_type='sigma_min'")
            if tr.predict == "noise":
                # The ε-form of the first-order step to σ = 0 is 0·∞ in closed form; at λ_prev + 60 it equals
                # its limit, x̂₀ = (x − σ_s·ε)/α_s, to float64 precision.
                lam = pts[-2].lam + _LIMIT_DLAM
                pts[-1] = Point(last.t, 0.0, math.exp(-lam), lam)
        return unipc_multistep(tr, tr.x, pts, orders, correctors, cfg.solver_type, _no_hooks)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step (corrector of the previous step + predictor): one fused launch."""
        prev = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class _DDIMTable:
    """DDIM coefficients for every training timestep t (rows), for one (eta, use_clipped, noisy) choice:
    [coefficients of solver_step..., convert[0], convert[1]]; `width` coefficients, then convert."""

    def __init__(self, rows: np.ndarray, width: int, mixed: bool):
        self.rows, self.width, self.mixed = rows, width, mixed
        self.on_device: dict[torch.device, torch.Tensor] = {}

    def device_rows(self, device: torch.device) -> torch.Tensor:
        table = self.on_device.get(device)
        if table is None:
            table = self.on_device[device] = torch.from_numpy(self.rows).to(device)
        return table


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' `DDIMScheduler` with each `step()` one fused launch (plus a row gather when the timestep
    is a device tensor):

        x_prev = √ᾱ'·x̂₀ + √(1 − ᾱ' − σ̃²)·ε̂ + σ̃·z

    with x̂₀ converted from the model output, clipped (clip_sample) or thresholded inside the launch and
    written to `pred_original_sample`. With clipping and use_clipped_model_output=False, ε̂ is the raw
    model's ε (the raw output is a second operand). Noise for eta > 0: `variance_noise` as given, or drawn
    with `generator` exactly as diffusers does; with neither, in-kernel Philox normals (not torch's RNG).
    """

    @functools.wraps(diffusers.DDIMScheduler.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_config()
        self._tables: dict = {}
        self._philox_seed: int | None = None
        self._philox_offset = 0
        self._used_timesteps = None
        self._own_timesteps = None

    def _check_config(self) -> None:
        cfg, name = self.config, type(self).__name__
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"{name}: prediction_type={cfg.prediction_type!r}; use 'epsilon', 'sample' or "
                             f"'v_prediction'")
        _check_common(name, cfg)
        if cfg.clip_sample and not cfg.thresholding and not cfg.clip_sample_range > 0:
            raise ValueError(f"{name}: clip_sample_range={cfg.clip_sample_range} must be positive")

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._check_config()
        self._tables = {}
        self._philox_seed, self._philox_offset = None, 0
        self._used_timesteps = self.timesteps.detach().cpu().numpy()
        n = self.config.num_train_timesteps
        ts = self.timesteps
        in_range = bool(((self._used_timesteps >= 0) & (self._used_timesteps < n)).all())
        # Held (not just its address), so that its memory cannot be reused by another tensor.
        self._own_timesteps = (ts, ts._version) if in_range else None

    def _clip_scale(self) -> float:
        """x̂₀ = scale·d: clipping runs as Threshold(1, r, r), which divides by r."""
        cfg = self.config
        return float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else 1.0

    def _table(self, eta: float, use_clipped: bool, noisy: bool) -> _DDIMTable:
        key = (eta, use_clipped, noisy)
        table = self._tables.get(key)
        if table is not None:
            return table
        cfg = self.config
        n_train, model_type = cfg.num_train_timesteps, MODEL_TYPES[cfg.prediction_type]
        ac = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
        final = float(self.final_alpha_cumprod)
        scale = self._clip_scale()
        mixed = (cfg.thresholding or cfg.clip_sample) and not use_clipped
        width = 2 + mixed + noisy
        rows = np.full((n_train, width + 2), np.nan)
        stride = n_train // self.num_inference_steps
        for t in range(n_train):
            a_t = ac[t]
            a_p = ac[t - stride] if t - stride >= 0 else final
            std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            rest = 1 - a_p - std * std
            if rest < 0:
                continue  # eta too large here: the row stays NaN
            alpha, sigma = math.sqrt(a_t), math.sqrt(1 - a_t)
            direction = math.sqrt(rest)
            if mixed:  # x_prev = √ᾱ'·r·d + direction·ε_raw,  ε_raw = e_x·x + e_m·raw
                e_x, e_m = conversion(model_type, alpha, sigma, "noise")
                coefs = [direction * e_x, math.sqrt(a_p) * scale, direction * e_m]
            else:      # ε = (x − α·x̂₀)/σ with x̂₀ = r·d
                coefs = [direction / sigma, (math.sqrt(a_p) - direction * alpha / sigma) * scale]
            if noisy:
                coefs.append(std)
            rows[t] = coefs + list(conversion(model_type, alpha, sigma, "data"))
        used = self._used_timesteps if self._used_timesteps is not None else ()
        bad = [int(t) for t in used if 0 <= t < n_train and not np.isfinite(rows[t]).all()]
        if bad:
            raise ValueError(f"eta={eta} makes 1 − ᾱ_prev − σ_t² negative at timesteps {bad[:5]} (diffusers returns "
                             f"NaN there); use 0 <= eta <= 1")
        table = self._tables[key] = _DDIMTable(rows, width, mixed)
        return table

    def _coefficients(self, table: _DDIMTable, timestep, device: torch.device):
        """(coeffs, convert) for `timestep`: a row gathered from the table on the sample's device when the
        timestep is a tensor there (no host synchronisation), host values otherwise. A device timestep is
        checked on the host unless it is an element of the `timesteps` this scheduler's set_timesteps made
        (all checked there): a timestep from elsewhere costs one synchronisation per step."""
        if isinstance(timestep, torch.Tensor) and timestep.device == device:
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got shape {tuple(timestep.shape)}")
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"timestep must be an integer or float tensor, got {timestep.dtype}")
            if not self._is_own_timestep(timestep):
                self._host_row(table, timestep)  # raises for a timestep out of range or a NaN row
            row = table.device_rows(device).index_select(0, timestep.reshape(1).long())[0]
            return row[:table.width], row[table.width:]
        row = self._host_row(table, timestep)
        return row[:table.width].tolist(), row[table.width:].tolist()

    def _host_row(self, table: _DDIMTable, timestep) -> np.ndarray:
        if isinstance(timestep, bool) or not isinstance(timestep, (numbers.Real, torch.Tensor, np.ndarray)):
            raise TypeError(f"timestep={timestep!r} must be a number or a one-element tensor (an entry of "
                            f"scheduler.timesteps), got {type(timestep).__name__}")
        if isinstance(timestep, (torch.Tensor, np.ndarray)):
            if (timestep.numel() if isinstance(timestep, torch.Tensor) else timestep.size) != 1:
                raise ValueError(f"timestep must be a single value, got shape {tuple(timestep.shape)}")
            v = float(timestep.reshape(()))
        else:
            v = float(timestep)
        n = self.config.num_train_timesteps
        if not (math.isfinite(v) and 0 <= v and int(v) < n):
            raise ValueError(f"timestep={v:g} lies outside [0, {n}) (num_train_timesteps={n}); pass an entry of "
                             f"scheduler.timesteps")
        t = int(v)
        row = table.rows[t]
        if not np.isfinite(row).all():
            raise ValueError(f"eta makes 1 − ᾱ_prev − σ_t² negative at timestep {t} (diffusers returns NaN there); "
                             f"use 0 <= eta <= 1")
        return row

    def _is_own_timestep(self, timestep: torch.Tensor) -> bool:
        """Whether `timestep` is (a view of) the `timesteps` tensor set_timesteps made, unmodified since: its
        entries were range-checked there, so the device gather needs no host check."""
        own = self._own_timesteps
        if own is None:
            return False
        ts, version = own
        return (timestep.dtype == ts.dtype and ts._version == version
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr())

    def _threshold(self) -> Threshold | None:
        cfg = self.config
        if cfg.thresholding:
            return _threshold(cfg)
        if cfg.clip_sample:
            r = float(cfg.clip_sample_range)
            return Threshold(1.0, r, r)  # s = clamp(max|x̂₀|, r, r) = r: clamp to [−r, r], then divide by r
        return None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True):
        """One DDIM step: one fused launch. Returns prev_sample and pred_original_sample as diffusers."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        _check_tensors(model_output, sample)
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"eta={eta!r} must be a finite number >= 0") from None
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta={eta!r} must be a finite number >= 0")
        common = torch.promote_types(model_output.dtype, sample.dtype)
        model_output, sample = model_output.to(common), sample.to(common)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            if variance_noise is not None:
                if not isinstance(variance_noise, torch.Tensor) or variance_noise.shape != sample.shape:
                    raise ValueError(f"variance_noise must be a tensor shaped like sample {tuple(sample.shape)}")
                noise = variance_noise.to(device=sample.device, dtype=sample.dtype)
            elif generator is not None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
            else:
                if self._philox_seed is None:  # drawn once per set_timesteps from torch's CPU RNG (no sync)
                    self._philox_seed = int(torch.randint(0, 2 ** 62, (1,)).item())
                noise = PhiloxNoise(self._philox_seed, self._philox_offset)
                self._philox_offset += 1
        table = self._table(eta, bool(use_clipped_model_output), noise is not None)
        coeffs, convert = self._coefficients(table, timestep, sample.device)
        x0 = torch.empty_like(sample)
        prev = solver_step(sample, [model_output] if table.mixed else [], coeffs, model_output=model_output,
                           convert=convert, threshold=self._threshold(), save=x0, noise=noise)
        scale = self._clip_scale()
        if scale != 1.0:
            x0.mul_(scale)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class PydpmAttnProcessor:
    """A diffusers attention processor running `pydpm.ops.attention`: the steps of diffusers'
    `AttnProcessor2_0` (spatial/group norms, q/k/v projections, q/k norms, output projection, residual,
    rescale) with the heads read in place as [B, N, H, D] views instead of transposed copies. Calls with
    an attention mask go to torch's scaled_dot_product_attention (pydpm's op has no mask); `fallbacks`
    counts them. `use_pydpm_attention` fills `skipped` (block name -> the processor class it kept) and
    records each block's previous processor for `restore_attention`.

    Where pydpm's dispatch sends a call class to torch's SDPA (fp16/bf16 inference: the call diffusers' own
    processor makes), the processor makes that call itself after the class's first call, without pydpm's
    per-call checks: a class is q/k/v's shapes, strides, dtype and device, whether autograd records and the
    forced backend (`pydpm.ops.use_backend`), so a drop-in costs what diffusers' processor costs there."""

    def __init__(self):
        self.fallbacks = 0
        self.skipped: dict[str, str] = {}
        self._previous: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> its processor before
        self._routes = BoundedCache(_MAX_ROUTES)  # call class -> dispatch picks torch's SDPA

    def _attend(self, q, k, v):
        """o = attention(q, k, v) in [B, N, H, D]."""
        if torch.compiler.is_compiling():
            return attention(q, k, v, layout="bnhd")
        train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, train,
               forced_backend())
        sdpa = self._routes.get(key)
        if sdpa is None:
            sdpa = self._routes.put(key, _ATTENTION.select(_check_attention(q, k, v, layout="bnhd")).name == "sdpa")
        if sdpa:
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return attention(q, k, v, layout="bnhd")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_keys = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # self-attention reads its keys and values from the normalised states, as diffusers' processor does
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim)
        k = key.view(batch, -1, attn.heads, head_dim)
        v = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:   # diffusers normalises the [B, H, N, D] view over D: the same per head
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attention_mask is not None:
            self.fallbacks += 1
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask).transpose(1, 2)
        else:
            out = self._attend(q, k, v)
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _reproduces(block) -> bool:
    """Whether `PydpmAttnProcessor` computes what `block`'s current processor computes: diffusers'
    AttnProcessor2_0 (which ignores `attn.scale` and any added k/v projections, as pydpm's does), or its
    classic AttnProcessor where that one agrees (it skips norm_q / norm_k and scales by `attn.scale`)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    if not isinstance(block, Attention):
        return False
    processor = block.processor
    if type(processor) in (AttnProcessor2_0, PydpmAttnProcessor):
        return True
    return (type(processor) is AttnProcessor and block.norm_q is None and block.norm_k is None
            and block.scale == (block.inner_dim // block.heads) ** -0.5)


def use_pydpm_attention(model) -> PydpmAttnProcessor:
    """Route the attention blocks of a diffusers model (UNet, DiT, ...) through pydpm's attention with one
    call; returns the processor (`fallbacks` counts masked calls sent to SDPA, `skipped` names the blocks
    left alone). A `diffusers.models.attention_processor.Attention` block is taken when its processor is
    one pydpm's reproduces exactly: diffusers' `AttnProcessor2_0`, or `AttnProcessor` with the default
    scale and no q/k norms (models such as DiTTransformer2DModel have no `set_attn_processor`, so blocks
    are set one by one). Every other block keeps its processor and is listed in `skipped` with a warning:
    SD3's joint attention (`JointAttnProcessor2_0`, with add_q_proj and added k/v projections), added-KV,
    IP-Adapter, xformers or sliced processors, and the attention classes of diffusers' newer
    AttentionModuleMixin family (Flux, ...). `restore_attention(model)` puts the previous processors back."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"use_pydpm_attention: model is a {type(model).__name__}; pass a diffusers model")
    blocks = [(name, m) for name, m in model.named_modules()
              if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if not blocks:
        raise TypeError(f"use_pydpm_attention: {type(model).__name__} has no diffusers Attention blocks "
                        f"(modules with set_processor, such as diffusers.models.attention_processor.Attention)")
    processor = PydpmAttnProcessor()
    for name, block in blocks:
        previous = block.processor
        if not _reproduces(block):
            processor.skipped[name] = type(previous).__name__
            continue
        if isinstance(previous, PydpmAttnProcessor):  # a second call keeps the record of the first
            previous = previous._previous.get(block, previous)
        processor._previous[block] = previous
        block.set_processor(processor)
    if processor.skipped:
        kinds = collections.Counter(processor.skipped.values())
        warnings.warn(f"use_pydpm_attention: {len(processor.skipped)} of {len(blocks)} attention blocks of "
                      f"{type(model).__name__} keep their processors ("
                      f"{', '.join(f'{k} ×{n}' for k, n in sorted(kinds.items()))}): pydpm's processor reproduces "
                      f"diffusers' AttnProcessor2_0 / AttnProcessor only; the returned processor's `skipped` names "
                      f"them", stacklevel=2)
    return processor


def restore_attention(model) -> int:
    """Undo `use_pydpm_attention(model)`: every block that holds pydpm's processor gets back the processor it
    had before (after which diffusers' `model.set_default_attn_processor()` works again: it accepts only the
    processor classes of its own lists, which pydpm's is not). Returns the number of blocks restored; blocks
    pydpm's processor was never put on by `use_pydpm_attention` are left as they are."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"restore_attention: model is a {type(model).__name__}; pass the diffusers model given to "
                        f"use_pydpm_attention")
    restored = 0
    for block in model.modules():
        processor = getattr(block, "processor", None)
        if isinstance(processor, PydpmAttnProcessor) and block in processor._previous:
            block.set_processor(processor._previous.pop(block))
            restored += 1
    return restored


_DROP_INS = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler, "UniPCMultistepScheduler":
             UniPCMultistepScheduler, "DDIMScheduler": DDIMScheduler}


@dataclasses.dataclass
class Acceleration:
    """What `accelerate` did: `swapped` (part -> what it runs now), `left` (part -> why it was left as it was),
    `graph` (the `GraphedForward` replaying the denoiser: its `captures`, `replays`, `eager_calls`, `reset()`;
    None when nothing is captured)."""

    swapped: dict[str, str]
    left: dict[str, str]
    graph: GraphedForward | None

    def __str__(self) -> str:
        lines = [f"swapped  {k}: {v}" for k, v in self.swapped.items()]
        return "\n".join(lines + [f"left     {k}: {v}" for k, v in self.left.items()])


class _Accelerated:
    """What `restore` needs to undo an `accelerate` call."""

    def __init__(self, denoiser, report: Acceleration):
        self.denoiser, self.report = denoiser, report
        self.scheduler: Any = None
        self.blocks: BlockSwaps | None = None
        self.layout: BlockSwaps | None = None


_ACCELERATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _denoiser(obj):
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, diffusers.DiffusionPipeline):
        for name in ("unet", "transformer"):
            model = getattr(obj, name, None)
            if isinstance(model, torch.nn.Module):
                return model
        raise TypeError(f"accelerate: the {type(obj).__name__} has no `unet` or `transformer` model to accelerate")
    raise TypeError(f"accelerate: obj is a {type(obj).__name__}; pass a diffusers pipeline (DiffusionPipeline) or "
                    f"a diffusers model (torch.nn.Module such as UNet2DConditionModel or DiTTransformer2DModel)")


def accelerate(obj, *, cuda_graph: bool = True, attention: bool = True, blocks: bool | None = None,
               channels_last: bool | None = None, scheduler: bool = True, max_graphs: int = 8) -> Acceleration:
    """Make a diffusers pipeline or model faster in place; `restore(obj)` undoes it.

    - attention: every attention block whose processor pydpm's reproduces runs `PydpmAttnProcessor`
      (`use_pydpm_attention`); the others are listed in the report's `left`;
    - blocks: diffusers' ResnetBlock2D (GroupNorm → modulation → SiLU), the UNet's output GroupNorm + SiLU,
      every other nn.GroupNorm, GEGLU, AdaLayerNormZero and DiT's and PixArt's modulated LayerNorms
      (BasicTransformerBlock) run pydpm's fused block ops (`group_norm`, `geglu`, `layer_norm_modulate`:
      `pydpm.integrations._blocks`); other classes are listed in `left`.
      None (the default) swaps them where they pay: when the forward is replayed from CUDA graphs, where
      their fewer, faster kernels are all that counts. Called eagerly each block op costs more host time than
      the one or two torch ops it replaces, which a host-bound model pays (an SD1.5 UNet at batch 2 is one);
      True swaps them anyway (training with their fused backwards, CPU models on their reference paths);
    - channels_last: the model in channels-last memory (`pydpm.integrations._blocks.swap_layout`): cuDNN's
      half-precision convolutions compute in NHWC and convert every NCHW input first. None (the default):
      convolutional networks (more than one nn.Conv2d: the UNets, not the transformers, whose only convolution
      is the patch embedding) whose forward is replayed from CUDA graphs. Called eagerly the model is
      host-bound and gains nothing measurable (SD1.5's bf16 training step on an H200: 36.9 -> 29.9 ms of device
      time at batch 2, 85.6 -> 84.6 ms at batch 8, while the host took 107 ms per step eagerly); True
      converts anyway. The outputs keep the input's layout either way;
    - scheduler (pipelines): a `DPMSolverMultistepScheduler`, `UniPCMultistepScheduler` or `DDIMScheduler` is
      replaced by pydpm's fused drop-in of the same class built from its config (one fused launch per step);
      a configuration the drop-in refuses, or another class, is left, with the reason;
    - cuda_graph: on CUDA the denoiser's forward is replayed from CUDA graphs, one per input signature
      (shapes, dtypes, arguments), at most `max_graphs`, captured on first use; with autograd recording (a
      training step) the forward and its backward into the parameters are replayed from a pair of graphs, and
      the gradients reach `.grad` as they would eagerly (see `pydpm.integrations._graph` for what runs eagerly,
      what a weight change does, and the one-step-at-a-time rule of training graphs). On CPU nothing is
      captured.

    The pipeline's own `__call__` runs unchanged. Calling `accelerate` again on the same object starts over
    (the graphs are captured afresh). Returns an `Acceleration` report."""
    for name, flag in (("cuda_graph", cuda_graph), ("attention", attention), ("blocks", blocks),
                       ("channels_last", channels_last), ("scheduler", scheduler)):
        optional = name in ("blocks", "channels_last")
        if not isinstance(flag, bool) and not (optional and flag is None):
            raise TypeError(f"accelerate: {name}={flag!r}; pass True or False{' (or None)' if optional else ''}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, numbers.Integral) or max_graphs < 1:
        raise ValueError(f"accelerate: max_graphs={max_graphs!r} must be an int >= 1 (graphs kept per model)")
    model = _denoiser(obj)
    for other, state in list(_ACCELERATED.items()):  # this object, or a pipeline around the same model
        if other is obj or state.denoiser is model:
            restore(other)
    report = Acceleration({}, {}, None)
    state = _Accelerated(model, report)
    if attention:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the report lists the blocks left
                processor = use_pydpm_attention(model)
            if processor._previous:
                report.swapped["attention"] = f"PydpmAttnProcessor on {len(processor._previous)} blocks"
            for name, kind in processor.skipped.items():
                report.left[f"attention {name}"] = (f"keeps {kind}: pydpm's processor reproduces diffusers' "
                                                    f"AttnProcessor2_0 / AttnProcessor only")
        except TypeError as e:
            report.left["attention"] = str(e)
    device = next(iter(model.parameters()), torch.empty(0)).device
    graphed = cuda_graph and device.type == "cuda"
    if blocks is None and not graphed:
        report.left["blocks"] = ("called eagerly (no CUDA graph), pydpm's block ops cost more host time than the torch "
                                 "ops they replace; blocks=True swaps them anyway")
    elif blocks or blocks is None:
        state.blocks = swap_blocks(model)
        if state.blocks.swapped:
            report.swapped["blocks"] = state.blocks.summary()
        report.left.update({f"blocks {name}": reason for name, reason in state.blocks.left.items()})
    if channels_last is None:
        convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) if graphed else 0
        channels_last = graphed and convolutions >= 2
        if not graphed:
            report.left["channels_last"] = ("the forward is not replayed from CUDA graphs: an eager model is host-bound "
                                            "and gains nothing measurable from it; channels_last=True converts it "
                                            "anyway")
        elif not channels_last:
            report.left["channels_last"] = (f"{convolutions} nn.Conv2d: not a convolutional network; "
                                            f"channels_last=True converts it anyway")
    if channels_last:
        state.layout = swap_layout(model)
        report.swapped["channels_last"] = state.layout.summary()
    if scheduler and not isinstance(obj, torch.nn.Module):
        current = getattr(obj, "scheduler", None)
        name = type(current).__name__
        drop_in = _DROP_INS.get(name)
        if isinstance(current, tuple(_DROP_INS.values())):
            report.left["scheduler"] = f"{name} is pydpm's already"
        elif drop_in is None or type(current) is not getattr(diffusers, name, None):
            report.left["scheduler"] = (f"{name}: pydpm has fused drop-ins for {', '.join(_DROP_INS)} only")
        else:
            try:
                obj.scheduler = drop_in.from_config(current.config)
                state.scheduler = current
                report.swapped["scheduler"] = f"pydpm.integrations.diffusers.{name}"
            except (ValueError, NotImplementedError) as e:  # a configuration the drop-in refuses, named
                report.left["scheduler"] = f"{name} kept: {e}"
    if not cuda_graph:
        report.left["cuda_graph"] = "cuda_graph=False"
    elif device.type != "cuda":
        report.left["cuda_graph"] = f"the model is on {device}: CUDA graphs need CUDA, so nothing is captured"
    else:
        try:
            report.graph = GraphedForward(model, max_graphs=max_graphs)
            report.swapped["cuda_graph"] = (f"{type(model).__name__}.forward replayed from CUDA graphs "
                                            f"(at most {max_graphs} input signatures)")
        except ValueError as e:
            report.left["cuda_graph"] = str(e)
    _ACCELERATED[obj] = state
    return report


def restore(obj) -> bool:
    """Undo `accelerate(obj)`: the denoiser's forward, its attention processors, its blocks, its memory layout
    and the pipeline's scheduler as they were (the scheduler object itself, with its state). Returns whether
    there was anything to undo."""
    state = _ACCELERATED.pop(obj, None)
    if state is None:
        return False
    if state.report.graph is not None:
        state.report.graph.remove()
    if "attention" in state.report.swapped:
        restore_attention(state.denoiser)
    for swaps in (state.blocks, state.layout):
        if swaps is not None:
            swaps.undo()
    if state.scheduler is not None:
        obj.scheduler = state.scheduler
    return True


__all__ = ["Acceleration", "DDIMScheduler", "DPMSolverMultistepScheduler", "MODEL_TYPES", "PydpmAttnProcessor",
           "UniPCMultistepScheduler", "accelerate", "restore", "restore_attention", "use_pydpm_attention"]
