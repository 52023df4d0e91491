"""The fused solver step: the update every exponential-integrator / linear-multistep sampler performs.

    out = c[0]·x + Σₖ c[k+1]·models[k] (+ c[-1]·z)

optionally preceded, in the same launch, by the model-output stage of the current step:

    m   = model_output                                  (one tensor)
    m   = uncond + guidance_scale·(cond − uncond)        (model_output = (cond, uncond))
    d   = convert[0]·x + convert[1]·m                    (e.g. x₀ = (x − σ·ε)/α, or ε itself: [0, 1])
    d   = clamp(d, −s, s)/s,  s = clamp(quantile(|d_b|, ratio), min_scale, max_scale)   (threshold; a
          constant s = min_scale when min_scale == max_scale: diffusers' clip_sample, no quantile)
    save ← d                                             (the history slot the next step reads)
    out = c[0]·x + c[1]·d + Σₖ c[k+2]·models[k] (+ c[-1]·z)

`z` is a `noise` tensor or normals drawn inside the kernel from `PhiloxNoise(seed, offset)`. A model may hold
one sample, shape [1, *x.shape[1:]], that every sample reads (a constant term: broadcast over the batch, read
once per sample position instead of stored B times).
Module layout (the op framework's skeleton, pydpm/ops/_framework.py): reference → argument check →
backends → planned launches → registration and the public op → sample inputs.
"""
from __future__ import annotations

import ctypes
import math
import numbers
import operator
from typing import Any, NamedTuple, Sequence, TypeAlias

import torch

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, Backend, BadInput, Entry, Op, acc_dtype, check_no_alias,
                                  check_real, dense_layout, fail_type, register, sample_tensor, triton_reasons)

MAX_MODELS = 6  # csrc/common/solver_step.h kMaxModels
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class PhiloxNoise(NamedTuple):
    """Standard normal noise drawn inside the kernel: reproducible for a (seed, offset) pair.

    Element i is lane i % 4 of Philox4x32-10 with counter (i // 4, offset) and key seed, turned into normals
    by Box-Muller (csrc/common/philox.h). Use a new offset (e.g. the step index) for every step of one sampling
    run. i counts elements in x's memory order when x is contiguous or channels-last (its dense layouts), and
    in row-major order (the order of x.contiguous()) for any other x (a transposed or sliced view), on every
    backend and in `solver_step_reference`. seed and offset are ints in [0, 2**63) (integral numpy scalars
    are accepted; floats and bools are refused).
    """

    seed: int
    offset: int = 0


class Threshold(NamedTuple):
    """Dynamic thresholding (Imagen) of the data prediction d, per sample b:

        s_b = clamp(quantile(|d_b|, ratio), min_scale, max_scale);   d_b ← clamp(d_b, −s_b, s_b) / s_b

    diffusers: `Threshold(dynamic_thresholding_ratio, 1.0, sample_max_value)`; the DPM-Solver reference
    code: `Threshold(dynamic_thresholding_ratio, thresholding_max_val, math.inf)`. The quantile is
    torch.quantile's linear interpolation. A sample whose d holds a NaN gets s_b = NaN.

    With min_scale == max_scale the scale is that constant and no quantile is computed: d ← clamp(d, −r, r)/r
    with r = min_scale (diffusers' clip_sample is `Threshold(1.0, r, r)`, times r afterwards); a NaN element
    stays NaN and the rest of its sample is clamped. The kernels then fold the clamp into the one launch.
    """

    ratio: float = 0.995
    min_scale: float = 1.0
    max_scale: float = 1.0


# The argument types of `solver_step` and `solver_step_reference`.
Models: TypeAlias = "list[torch.Tensor] | tuple[torch.Tensor, ...]"
Coefficients: TypeAlias = "torch.Tensor | Sequence[float]"  # a table on x's device, or host values
ModelOutput: TypeAlias = "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]"  # m, or (cond, uncond)
Noise: TypeAlias = "torch.Tensor | PhiloxNoise"


# --------------------------------------------------------------------------------------------------
# Reference (the CPU fallback and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product of the constant a and uint32 values b, in int64 arithmetic."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo                      # < 2^48
    t = a * b_hi + (lo_part >> 16)          # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32_10(counter: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 words: 4 counter words -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return [c0, c1, c2, c3]


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float64, *, start: int = 0) -> torch.Tensor:
    """The `numel` normals that `PhiloxNoise(seed, offset)` gives a tensor of that size, in memory order;
    with `start`, elements start .. start + numel - 1 of that stream (a slice of a larger tensor's noise)."""
    if start < 0:
        raise ValueError(f"start={start} must be >= 0")
    group = torch.arange(start // 4, (start + numel + 3) // 4, dtype=torch.int64, device=device)
    counter = [group & _MASK32, group >> 32, torch.full_like(group, offset & _MASK32),
               torch.full_like(group, (offset >> 32) & _MASK32)]
    words = torch.stack(philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32)), dim=1)  # [groups, 4]
    u = ((words[:, 0::2] >> 8) + 1).to(torch.float64) * 2.0 ** -24    # (0, 1]
    v = (words[:, 1::2] >> 8).to(torch.float64) * 2.0 ** -24          # [0, 1)
    radius, angle = torch.sqrt(-2.0 * torch.log(u)), 2.0 * math.pi * v
    normals = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)  # [groups, 2, 2]
    return normals.reshape(-1)[start % 4:start % 4 + numel].to(dtype)


def _like(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a vector of x.numel() values with x's shape, in the element order the backends give x: x's memory
    order when x is contiguous or channels-last, else row-major (x.contiguous()'s order; see PhiloxNoise)."""
    return flat.as_strided(x.shape, x.stride()) if dense_layout(x) else flat.view(x.shape)


def _quantile_rows(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """torch.quantile(a, ratio, dim=1) (linear interpolation) for any row length, NaN rows giving NaN."""
    n = a.shape[1]
    pos = ratio * (n - 1)
    lo = min(int(pos), n - 1)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(a, lo + 1, dim=1).values
    v_hi = torch.kthvalue(a, hi + 1, dim=1).values
    q = v_lo + (pos - lo) * (v_hi - v_lo)
    return torch.where(torch.isnan(a).any(dim=1), torch.full_like(q, math.nan), q)


def solver_step_reference(x: torch.Tensor, models: Models, coeffs: Coefficients, *,
                          model_output: ModelOutput | None = None, convert: Coefficients | None = None,
                          guidance_scale: float | None = None, threshold: Threshold | None = None,
                          save: torch.Tensor | None = None, noise: Noise | None = None, out: torch.Tensor | None = None,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Readable PyTorch composition of `solver_step` (same arguments), computing in `compute_dtype`
    (default float32, float64 for float64 inputs). `coeffs`/`convert` are tensors or float sequences;
    `noise` a tensor or PhiloxNoise."""
    acc = compute_dtype or acc_dtype(x.dtype)
    batch = x.shape[0]

    def rows(c, n):
        c = torch.as_tensor(c, dtype=acc, device=x.device)
        c = c.expand(batch, n) if c.dim() == 1 else c
        return [c[:, i].reshape((batch,) + (1,) * (x.dim() - 1)) for i in range(n)]

    terms = [x.to(acc)]
    if model_output is not None:
        if isinstance(model_output, (tuple, list)):
            if guidance_scale is None:
                raise ValueError("solver_step_reference: model_output is a (cond, uncond) pair; pass guidance_scale")
            cond, uncond = (t.to(acc) for t in model_output)
            m = uncond + guidance_scale * (cond - uncond)
        else:
            m = model_output.to(acc)
        k = rows(convert, 2)
        d = k[0] * terms[0] + k[1] * m
        if threshold is not None and threshold.min_scale == threshold.max_scale:
            r = threshold.min_scale  # a constant scale: clamp, no quantile (NaN elements stay NaN)
            d = torch.where(d > r, r, torch.where(d < -r, -r, d)) / r
        elif threshold is not None:
            s = _quantile_rows(d.abs().reshape(batch, -1), threshold.ratio)
            s = s.clamp(threshold.min_scale, threshold.max_scale).reshape(k[0].shape)
            d = torch.maximum(torch.minimum(d, s), -s) / s
        terms.append(d)
    terms += [m_.to(acc) for m_ in models]
    if isinstance(noise, PhiloxNoise):
        terms.append(_like(philox_normal(noise.seed, noise.offset, x.numel(), x.device, acc), x))
    elif noise is not None:
        terms.append(noise.to(acc))
    c = rows(coeffs, len(terms))
    y = sum(ci * t for ci, t in zip(c, terms))
    if save is not None:  # written last: save and out may alias x or a model
        save.copy_(terms[1])
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


# --------------------------------------------------------------------------------------------------
# Argument check: once at the boundary; the hot path is a few attribute reads per tensor
# --------------------------------------------------------------------------------------------------

# csrc/common/solver_step.h ThresholdMode
NO_THRESHOLD, THRESHOLD_QUANTILE, THRESHOLD_CLAMP = 0, 1, 2
_DTYPES = frozenset(SUPPORTED_DTYPES)


class StepArgs:
    """A checked call. Coefficients come as a table on x's device (`coeffs`, `convert`) or as host values
    (`coef_values`, `convert_values`); exactly one of each pair is set (convert only with d). `result` is
    what the op returns: the caller's `out`, or the tensor allocated for it; `dense`: every tensor is
    contiguous (else the backends first give them x's dense layout); `broadcast`: bit k set when models[k]
    holds one sample ([1, *x.shape[1:]]) that every sample of a larger batch reads."""

    __slots__ = ("x", "models", "out", "coeffs", "coef_values", "cond", "uncond", "guidance", "convert",
                 "convert_values", "threshold", "save", "noise", "philox", "result", "dense", "broadcast")

    def __init__(self, x, models, out, cond, uncond, guidance, threshold, save, noise, philox, dense=False,
                 broadcast=0):
        self.x, self.models, self.out, self.result, self.broadcast = x, models, out, out, broadcast
        self.cond, self.uncond, self.guidance, self.threshold = cond, uncond, guidance, threshold
        self.save, self.noise, self.philox, self.dense = save, noise, philox, dense
        self.coeffs = self.coef_values = self.convert = self.convert_values = None

    @property
    def has_d(self) -> bool:
        return self.cond is not None

    @property
    def noise_mode(self) -> int:
        return 1 if self.noise is not None else 2 if self.philox is not None else 0

    @property
    def n_coefs(self) -> int:
        return 1 + (self.cond is not None) + len(self.models) + (self.noise is not None or self.philox is not None)

    @property
    def threshold_mode(self) -> int:
        t = self.threshold
        if t is None:
            return NO_THRESHOLD
        return THRESHOLD_CLAMP if t.min_scale == t.max_scale else THRESHOLD_QUANTILE

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the kernels read or write elementwise (they share x's layout)."""
        ts = [self.x, *self.models, self.out, self.cond, self.uncond, self.save, self.noise]
        return [t for t in ts if t is not None]


def _fail(msg: str) -> None:
    raise ValueError(f"solver_step: {msg}")


def _check_like(name: str, t, x: torch.Tensor, shared_ok: bool = False) -> None:
    """Raise the message for a tensor `name` that does not share x's device, dtype and shape (or, `shared_ok`,
    the shape of one of x's samples with a batch of 1)."""
    if not isinstance(t, torch.Tensor):
        hint = " or PhiloxNoise(seed, offset)" if name == "noise" else ""
        fail_type("solver_step", f"{name} must be a torch.Tensor shaped like x{hint}, got {type(t).__name__}")
    if t.device != x.device:
        _fail(f"{name} is on {t.device} but x is on {x.device}; move it with .to(x.device)")
    if t.dtype != x.dtype:
        _fail(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast it with .to(x.dtype)")
    if shared_ok and _shared(t.shape, x.shape):
        return
    if t.shape != x.shape:
        also = f", or be one sample {(1, *x.shape[1:])} that every sample reads" if shared_ok else ""
        _fail(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; every tensor of the step must "
              f"match x{also}")


def _shared(shape: torch.Size, x_shape: torch.Size) -> bool:
    """A model shape [1, *x.shape[1:]] with x's batch other than 1: one sample that every sample reads."""
    return len(shape) == len(x_shape) and shape[0] == 1 and x_shape[0] != 1 and shape[1:] == x_shape[1:]


def _like_x(t, shape, dtype, device: int, cpu: bool) -> bool:
    """A tensor with x's shape, dtype and device (`device` is x's get_device(): the CUDA index, or -1 for the
    CPU and other devices, told apart by `cpu`: x.is_cpu)."""
    return (isinstance(t, torch.Tensor) and t.dtype is dtype and t.shape == shape and t.get_device() == device
            and t.is_cpu is cpu)


def _term_names(n_models: int, has_d: bool, noise: bool) -> str:
    terms = ["x"] + (["d"] if has_d else []) + [f"models[{i}]" for i in range(n_models)]
    return ", ".join(terms + (["noise"] if noise else []))


def _coef_table(name: str, c, n: int, x: torch.Tensor, what: str, compiling: bool):
    """-> (device table or None, host values or None); `what` names the n entries for a message."""
    if isinstance(c, torch.Tensor):
        batch = x.shape[0]
        if c.dtype not in (torch.float32, torch.float64):
            _fail(f"{name} has dtype {c.dtype}; pass float32 or float64 coefficients")
        if c.dim() not in (1, 2) or c.shape[-1] != n or (c.dim() == 2 and c.shape[0] != batch):
            _fail(f"{name} has shape {tuple(c.shape)}; this call needs [{n}] or per-sample [{batch}, {n}] ({what})")
        if c.device == x.device or compiling:
            return (c if c.is_contiguous() else c.contiguous()), None
        if c.device.type != "cpu" or c.dim() == 2:
            _fail(f"{name} is on {c.device} but x is on {x.device}; keep coefficient tables on x's device "
                  f"(move them once, before the sampling loop) or pass a 1-D CPU tensor or a list of floats")
        c = c.tolist()
    if isinstance(c, (str, bytes, dict, set, frozenset)) or not hasattr(c, "__len__"):
        fail_type("solver_step", f"{name} must be a float tensor or a sequence of floats, got {type(c).__name__}")
    for i, v in enumerate(c):
        if isinstance(v, (str, bytes, bool)) or v is None:
            fail_type("solver_step", f"{name}[{i}] is {v!r}; coefficients must be numbers (a float tensor or a "
                                     f"sequence of floats)")
    try:
        values = tuple(map(float, c))
    except (TypeError, ValueError):
        fail_type("solver_step", f"{name} must be a float tensor or a sequence of floats, got {type(c).__name__}")
    if len(values) != n:
        _fail(f"{name} has {len(values)} entries; this call needs {n} ({what})")
    if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):
        i, v = next((i, v) for i, v in enumerate(values) if not math.isfinite(v))
        _fail(f"{name}[{i}] is {v}; coefficients must be finite")
    if compiling:
        return torch.tensor(values, dtype=torch.float64), None
    return None, values


def _philox(noise: PhiloxNoise) -> PhiloxNoise:
    """PhiloxNoise with int seed and offset: integral numpy (or other numbers.Integral) scalars are accepted,
    floats, bools and strings refused (a TypeError naming the field), the range checked by the caller."""
    values = []
    for name, v in zip(("seed", "offset"), noise):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            fail_type("solver_step", f"noise=PhiloxNoise(seed={noise[0]!r}, offset={noise[1]!r}): {name} must be an "
                                     f"int in [0, 2**63), got {type(v).__name__}")
        values.append(operator.index(v))
    return PhiloxNoise(*values)


def _check_threshold(threshold) -> None:
    if not isinstance(threshold, Threshold):
        fail_type("solver_step", f"threshold must be a pydpm.ops.Threshold(ratio, min_scale, max_scale), got "
                                 f"{type(threshold).__name__}")
    for field in Threshold._fields:
        check_real("solver_step", f"threshold.{field}", getattr(threshold, field), finite=False)
    if not 0.0 <= threshold.ratio <= 1.0:
        _fail(f"threshold.ratio is {threshold.ratio}; it must lie in [0, 1]")
    if not (threshold.min_scale > 0 and threshold.max_scale >= threshold.min_scale):
        _fail(f"threshold scales (threshold.min_scale={threshold.min_scale}, threshold.max_scale="
              f"{threshold.max_scale}) need 0 < min_scale <= max_scale")


def _explain(x, models, model_output, convert, guidance_scale, threshold, save, noise, out) -> None:
    """Raise the message naming the argument (and the fix) that check_args' fast test rejected."""
    if not isinstance(x, torch.Tensor):
        fail_type("solver_step", f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(f"x has dtype {x.dtype}; pass float32, float16 or bfloat16 (float64 runs on the CPU backends)")
    if x.dim() == 0:
        _fail("x is a scalar; it needs a leading batch dimension")
    if isinstance(models, torch.Tensor) or not isinstance(models, (list, tuple)):
        fail_type("solver_step", f"models must be a list or tuple of tensors (wrap a single tensor as [t]), got "
                                 f"{type(models).__name__}")
    if len(models) > MAX_MODELS:
        _fail(f"{len(models)} models given; at most {MAX_MODELS} are supported per step")
    for i, m in enumerate(models):
        _check_like(f"models[{i}]", m, x, shared_ok=True)
    if model_output is not None:
        if isinstance(model_output, (tuple, list)):
            if len(model_output) != 2:
                _fail(f"model_output must be one tensor or a (cond, uncond) pair, got {len(model_output)} items")
            _check_like("model_output[0] (cond)", model_output[0], x)
            _check_like("model_output[1] (uncond)", model_output[1], x)
            if guidance_scale is None:
                _fail("model_output is a (cond, uncond) pair; pass guidance_scale")
        else:
            _check_like("model_output", model_output, x)
            if guidance_scale is not None:
                _fail("guidance_scale needs model_output=(cond, uncond)")
        if convert is None:
            _fail("model_output needs convert=[a, b] (d = a·x + b·model_output; [0, 1] keeps it as is)")
    else:
        for name, value in (("convert", convert), ("guidance_scale", guidance_scale), ("threshold", threshold),
                            ("save", save)):
            if value is not None:
                _fail(f"{name} acts on the model output of this step; pass model_output too")
    if guidance_scale is not None:
        check_real("solver_step", "guidance_scale", guidance_scale)
    if threshold is not None:
        _check_threshold(threshold)
    for name, t in (("save", save), ("out", out)):
        if t is not None:
            _check_like(name, t, x)
    if isinstance(noise, PhiloxNoise):
        noise = _philox(noise)
        if not (0 <= noise.seed < 2 ** 63 and 0 <= noise.offset < 2 ** 63):
            _fail(f"PhiloxNoise{tuple(noise)}: seed and offset must lie in [0, 2**63)")
    elif noise is not None:
        _check_like("noise", noise, x)
    mo = model_output if isinstance(model_output, (tuple, list)) else (model_output,)
    named = [("x", x)] + [(f"models[{i}]", m) for i, m in enumerate(models)] + [("model_output", m) for m in mo] \
        + [("save", save), ("noise", noise), ("out", out)]
    grad = [name for name, t in named if isinstance(t, torch.Tensor) and t.requires_grad]
    if torch.is_grad_enabled() and grad:
        _fail(f"inputs require grad ({', '.join(grad)}); solver_step is a sampling op without a backward: run it "
              f"under torch.no_grad() (or use solver_step_reference to differentiate through the composition)")
    _fail("these arguments do not form a call (see solver_step's docstring)")


def _disjoint_dense(args: StepArgs, out: torch.Tensor | None, n: int) -> bool:
    """The fast aliasing test when every tensor of the call is contiguous and shaped like x, so that each
    covers [data_ptr, data_ptr + n bytes): the caller's `out` and `save` may each start where an input starts
    (then they are that input: an elementwise in-place use) but must not meet an input elsewhere, each other, or
    a coefficient table. False: the exact test decides (check_no_alias). About 0.1 µs per tensor."""
    x, save = args.x, args.save
    reads = [x.data_ptr()]
    for t in args.models:
        reads.append(t.data_ptr())
    if args.cond is not None:
        reads.append(args.cond.data_ptr())
        if args.uncond is not None:
            reads.append(args.uncond.data_ptr())
    if args.noise is not None:
        reads.append(args.noise.data_ptr())
    p_out = p_save = None
    if out is not None:
        p_out = reads[0] if out is x else out.data_ptr()
        for q in reads:
            if q != p_out and -n < q - p_out < n:
                return False
    if save is not None:
        p_save = save.data_ptr()
        for q in reads:
            if q != p_save and -n < q - p_save < n:
                return False
        if p_out is not None and -n < p_out - p_save < n:
            return False
    if args.coeffs is not None or args.convert is not None:
        for table in (args.coeffs, args.convert):  # device tables, read by the kernel
            if table is not None:
                q, m = table.data_ptr(), table.nbytes
                for p in (p_out, p_save):
                    if p is not None and q < p + n and p < q + m:
                        return False
    return True


def _check_aliasing(args: StepArgs, out_given: bool) -> None:
    """The exact aliasing test (framework.check_no_alias): out and save may be exactly an input, nothing else."""
    reads = [("x", args.x)] + [(f"models[{i}]", m) for i, m in enumerate(args.models)]
    if args.uncond is None:
        reads.append(("model_output", args.cond))
    else:
        reads += [("model_output[0] (cond)", args.cond), ("model_output[1] (uncond)", args.uncond)]
    reads.append(("noise", args.noise))
    # An exact alias is an in-place use, except of a shared model (one sample, read by every sample).
    shared = {f"models[{k}]" for k in range(len(args.models)) if args.broadcast >> k & 1}
    same_ok = {name for name, _ in reads} - shared
    reads += [("coeffs", args.coeffs), ("convert", args.convert)]
    check_no_alias("solver_step", (("out", args.out if out_given else None), ("save", args.save)), reads, same_ok)


def check_args(x, models, coeffs, model_output=None, convert=None, guidance_scale=None, threshold=None, save=None,
               noise=None, out=None, compiling=False) -> StepArgs:
    """Validate a call of `solver_step` and normalise it. A fast test of every condition first (a few
    attribute reads per tensor); when it fails, `_explain` names the argument and the fix."""
    cond = uncond = philox = None
    ok = True
    broadcast = 0
    try:
        dtype, shape, device, cpu = x.dtype, x.shape, x.get_device(), x.is_cpu
        if model_output is not None:
            if type(model_output) is tuple or type(model_output) is list:
                cond, uncond = model_output
                ok = guidance_scale is not None and cond is not None and uncond is not None
            else:
                cond = model_output
                ok = guidance_scale is None
            ok = ok and convert is not None
        else:
            ok = convert is None and guidance_scale is None and threshold is None and save is None
        if type(noise) is PhiloxNoise:
            philox, noise = noise, None
            if type(philox.seed) is not int or type(philox.offset) is not int:
                philox = _philox(philox)
            ok = ok and 0 <= philox.seed < 2 ** 63 and 0 <= philox.offset < 2 ** 63
        ok = ok and dtype in _DTYPES and len(shape) > 0 and (type(models) is list or type(models) is tuple) \
            and len(models) <= MAX_MODELS and (threshold is None or (
                type(threshold) is Threshold and bool not in map(type, threshold) and 0.0 <= threshold.ratio <= 1.0
                and threshold.min_scale > 0 and threshold.max_scale >= threshold.min_scale))
        grad = torch.is_grad_enabled()
        dense = x.is_contiguous()
        if grad and x.requires_grad:
            ok = False
        for k, t in enumerate(models):  # (a None model fails here, on t.dtype)
            if t.shape != shape:
                if not _shared(t.shape, shape):
                    ok = False
                    break
                broadcast |= 1 << k
            if not (t.dtype is dtype and t.get_device() == device and t.is_cpu is cpu
                    and not (grad and t.requires_grad)):
                ok = False
                break
            dense = dense and t.is_contiguous()
        for t in (cond, uncond, save, noise, out):
            if t is not None:
                if not (t.dtype is dtype and t.shape == shape and t.get_device() == device and t.is_cpu is cpu
                        and not (grad and t.requires_grad)):
                    ok = False
                    break
                dense = dense and t.is_contiguous()
        if guidance_scale is None:
            guidance = 1.0
        elif type(guidance_scale) is float:
            guidance = guidance_scale
        else:  # an int, a numpy or 0-dim tensor scalar; a string or a bool raises (and _explain names it)
            guidance = check_real("solver_step", "guidance_scale", guidance_scale, finite=False)
        ok = ok and math.isfinite(guidance)
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        _explain(x, models, model_output, convert, guidance_scale, threshold, save, noise if philox is None else
                 philox, out)
    out_given = out is not None
    if out is None:
        out = torch.empty_like(x)
    args = StepArgs(x, tuple(models), out, cond, uncond, guidance, threshold, save, noise, philox, dense, broadcast)
    n = 1 + (cond is not None) + len(models) + (noise is not None or philox is not None)
    what = None
    if type(coeffs) is list and len(coeffs) == n and not compiling and bool not in map(type, coeffs):
        try:  # sum() of the raw list: a TypeError for strings, which float() would parse
            total = sum(coeffs)
            values = tuple(map(float, coeffs))
            if math.isfinite(total) or all(map(math.isfinite, values)):
                args.coef_values = values
        except (TypeError, ValueError, OverflowError):
            pass
    if args.coef_values is None:
        what = _term_names(len(models), cond is not None, args.noise_mode != 0)
        args.coeffs, args.coef_values = _coef_table("coeffs", coeffs, n, x, what, compiling)
    if cond is not None:
        if type(convert) is list and len(convert) == 2 and not compiling and bool not in map(type, convert):
            try:
                total = 0.0 + convert[0] + convert[1]
                k0, k1 = float(convert[0]), float(convert[1])
                if math.isfinite(total) or (math.isfinite(k0) and math.isfinite(k1)):
                    args.convert_values = (k0, k1)
            except (TypeError, ValueError, OverflowError):
                pass
        if args.convert_values is None:
            args.convert, args.convert_values = _coef_table("convert", convert, 2, x, "x, model_output", compiling)
    if (out_given or save is not None) and not compiling:
        if broadcast or not (dense and _disjoint_dense(args, out if out_given else None, x.nbytes)):
            _check_aliasing(args, out_given)
    return args


def densify(args: StepArgs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give every tensor of the call x's dense layout (a channels-last x keeps its own, so that Philox noise
    follows x's memory order; any other non-contiguous x is made contiguous), copying where needed (documented
    cost: one extra pass per copied tensor). Returns (user tensor, temporary) pairs to copy back after the
    kernel."""
    tensors = args.tensors()
    if all(t.is_contiguous() for t in tensors):
        return []
    x = args.x
    fmt = torch.contiguous_format
    if not x.is_contiguous():
        if dense_layout(x):  # channels-last
            fmt = torch.channels_last
        else:
            x = args.x = x.contiguous()
    if all(t.is_contiguous(memory_format=fmt) for t in tensors[1:]):
        return []
    writeback = []

    def fix(t, written, like=x):
        if t is None or t.is_contiguous(memory_format=fmt):
            return t
        tmp = torch.empty_like(like)  # x's dense layout (empty_like keeps the strides of a dense x)
        if not written:
            return tmp.copy_(t)
        writeback.append((t, tmp))
        return tmp

    args.models = tuple(fix(m, False, x[:1] if args.broadcast >> k & 1 else x) for k, m in enumerate(args.models))
    args.cond, args.uncond, args.noise = fix(args.cond, False), fix(args.uncond, False), fix(args.noise, False)
    args.out, args.save = fix(args.out, True), fix(args.save, True)
    return writeback


def _runner(launch):
    """A backend's run(args): nothing for an empty x, x's dense layout for every tensor, launch, copy back."""
    def run(args: StepArgs) -> torch.Tensor:
        if args.dense:
            if args.x.numel():
                launch(args)
            return args.result
        if args.x.numel() == 0:
            return args.result
        writeback = densify(args)
        launch(args)
        for user, tmp in writeback:
            user.copy_(tmp)
        return args.result
    return run


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

# The compiled module and its parameter struct's ctypes view: no type stubs, fields known at run time.
_C: Any = _backend._C
_Params: Any = _backend.c_struct("SolverStepParams") if _C is not None else None
_cuda_stream, _DTYPE_CODES = _backend.cuda_stream, _backend.DTYPE_CODES


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _fill_row(row, table: torch.Tensor | None, values: Sequence[float] | None) -> None:
    """A CoefRow: the device table (shared [n] or per-sample [B, n]) or the host values."""
    if table is not None:
        row.ptr = table.data_ptr()
        row.dtype = _DTYPE_CODES[table.dtype]
        row.row_stride = table.shape[1] if table.dim() == 2 else 0
    elif values is not None:
        row.values[:len(values)] = values


def c_params(args: StepArgs):
    """The C parameter struct (csrc/common/solver_step.h SolverStepParams, through its ctypes view) of a
    checked call whose tensors share x's dense layout. Stream, device and workspace are the launcher's."""
    x, models = args.x, args.models
    p = _Params()
    p.numel = numel = x.numel()
    p.batch = batch = x.shape[0]
    p.per_sample = numel // batch if batch else 0
    p.dtype = _DTYPE_CODES[x.dtype]
    p.x = x.data_ptr()
    p.out = args.out.data_ptr()
    n = 1 + len(models)
    if models:
        p.n_models = len(models)
        p.models[:len(models)] = [m.data_ptr() for m in models]
        p.broadcast = args.broadcast
    if args.cond is not None:
        n += 1
        p.has_d, p.cond, p.guidance = 1, args.cond.data_ptr(), args.guidance
        if args.uncond is not None:
            p.uncond = args.uncond.data_ptr()
        if args.save is not None:
            p.save = args.save.data_ptr()
        _fill_row(p.conv, args.convert, args.convert_values)
        t = args.threshold
        if t is not None:
            p.threshold = args.threshold_mode
            p.ratio, p.min_scale, p.max_scale = t.ratio, t.min_scale, t.max_scale
    if args.noise is not None:
        n += 1
        p.noise_mode, p.noise = 1, args.noise.data_ptr()
    elif args.philox is not None:
        n += 1
        p.noise_mode, p.seed, p.offset = 2, args.philox.seed, args.philox.offset
    p.n_coefs = n
    _fill_row(p.coefs, args.coeffs, args.coef_values)
    return p


def _workspace(args: StepArgs) -> torch.Tensor | None:
    """Scratch for the CUDA kernels' per-sample quantile (dynamic thresholding), else None."""
    if args.threshold is None or args.threshold_mode != THRESHOLD_QUANTILE:
        return None
    nbytes = _C.solver_step_cuda_workspace_bytes(args.x.numel(), args.x.shape[0])
    return torch.empty(nbytes, dtype=torch.uint8, device=args.x.device)


def _launch_cuda(args: StepArgs) -> None:
    p = c_params(args)
    p.device = device = args.x.get_device()
    p.stream = _cuda_stream(device)
    # Held until the launches are enqueued: with PYTORCH_NO_CUDA_MEMORY_CACHING=1 a dropped tensor is freed at
    # once (cudaFree), and the memset and kernels would write into freed memory. Freeing it after the call is
    # stream-ordered (the caching allocator reuses it only after these kernels; cudaFree waits for them).
    workspace = _workspace(args) if args.threshold is not None else None
    p.workspace = _ptr(workspace)
    _C.solver_step_cuda(ctypes.addressof(p))


def _launch_cpu(args: StepArgs) -> None:
    p = c_params(args)  # held until the call returns: the launcher reads the struct at this address
    _C.solver_step_cpu(ctypes.addressof(p))


def _no_fp64(args: StepArgs) -> list[str]:
    return ["float64 runs on the cpu and reference backends"] if args.x.dtype == torch.float64 else []


def _cuda_reasons(args: StepArgs) -> list[str]:
    reason = _backend.c_cuda_reason()
    reasons = [reason] if reason else []
    if not args.x.is_cuda:
        reasons.append(f"tensors are on {args.x.device.type}, not cuda")
    return reasons + _no_fp64(args)


def _triton_reasons(args: StepArgs) -> list[str]:
    reasons = triton_reasons(args.x.device)
    if args.threshold_mode == THRESHOLD_QUANTILE:
        reasons.append("dynamic thresholding needs a per-sample selection the Triton kernel does not implement; "
                       "the cuda and cpu backends do")
    return reasons + _no_fp64(args)


def _launch_triton(args: StepArgs) -> None:
    philox = args.philox
    _backend.kernels("solver_step").solver_step_fwd(
        args.x, args.models, args.out, coefs=args.coeffs, coef_values=args.coef_values, cond=args.cond,
        uncond=args.uncond, guidance=args.guidance, conv=args.convert, conv_values=args.convert_values,
        save=args.save, noise=args.noise, philox=None if philox is None else (philox.seed, philox.offset),
        clamp=float(args.threshold.min_scale) if args.threshold_mode == THRESHOLD_CLAMP else 0.0,
        broadcast=args.broadcast)


def _cpu_reasons(args: StepArgs) -> list[str]:
    reason = _backend.c_cpu_reason()
    reasons = [reason] if reason else []
    if args.x.device.type != "cpu":
        reasons.append(f"tensors are on {args.x.device.type}, not cpu")
    return reasons


def _model_output(cond: torch.Tensor | None, uncond: torch.Tensor | None):
    """The public `model_output` argument back from its (cond, uncond) halves."""
    return None if cond is None else (cond if uncond is None else (cond, uncond))


def _launch_reference(args: StepArgs) -> None:
    solver_step_reference(
        args.x, args.models, args.coeffs if args.coeffs is not None else args.coef_values,
        model_output=_model_output(args.cond, args.uncond),
        convert=args.convert if args.convert is not None else args.convert_values,
        guidance_scale=args.guidance if args.uncond is not None else None, threshold=args.threshold, save=args.save,
        noise=args.noise if args.noise is not None else args.philox, out=args.out)


# Automatic choice between the cuda and triton backends (bench/results, H200): device times are equal up to
# 16 MB per tensor and from 268 MB Triton reaches 100% of copy bandwidth against CUDA's 94%; with Philox noise
# Triton's kernel is ~1.3x faster on the device (10.4 vs 8.0 µs, bench/NOTES.md); the CUDA binding's host
# cost per call is the lower. So: CUDA first, except where device time dominates (tensors from 128 MB) or
# the host cost vanishes (Philox noise captured in a CUDA graph).
TRITON_FIRST_BYTES = 128 << 20
_CUDA_FIRST = ("cuda", "triton", "cpu", "reference")
_TRITON_FIRST = ("triton", "cuda", "cpu", "reference")


def _triton_first(args: StepArgs) -> bool:
    x = args.x
    if not x.is_cuda:
        return False
    if x.numel() * x.element_size() >= TRITON_FIRST_BYTES:
        return True
    return args.philox is not None and torch.cuda.is_current_stream_capturing()


def _priority(args: StepArgs) -> Sequence[str]:
    return _TRITON_FIRST if _triton_first(args) else _CUDA_FIRST


def _dispatch_key(args: StepArgs):
    x = args.x
    return x.is_cuda, x.is_cpu, x.dtype, args.threshold_mode, _triton_first(args)


BACKENDS = (Backend("cuda", _runner(_launch_cuda), _cuda_reasons),
            Backend("triton", _runner(_launch_triton), _triton_reasons),
            Backend("cpu", _runner(_launch_cpu), _cpu_reasons),
            Backend("reference", _runner(_launch_reference), lambda args: []))


# --------------------------------------------------------------------------------------------------
# Planned launches: a sampler's step, checked once and re-launched with new pointers
# --------------------------------------------------------------------------------------------------

class PlannedStep:
    """A checked `solver_step` call re-launched many times with only x, the model output(s) and out
    changing (a sampler's step): the argument check, dispatch and the C parameter struct are made once,
    here; a call then writes the changed pointers into the struct by name and enters the C launcher
    (about 1 µs of host time on the dev VM instead of about 10 through the public op).

    Calls whose tensors do not share x's shape, dtype, device and strides fall back to the checked
    path, as do backends other than the C ones.
    """

    def __init__(self, args: StepArgs):
        self.args, self.params = args, None
        stride = args.x.stride()
        self.meta = (args.x.shape, args.x.dtype, args.x.get_device(), args.x.is_cpu, stride)
        if args.x.numel() == 0 or not (dense_layout(args.x) and all(t.stride() == stride for t in args.tensors())):
            return
        backend = OP.select(args)
        if backend.name not in ("cuda", "cpu"):
            return
        self.params = p = c_params(args)
        self.cuda = backend.name == "cuda"
        if self.cuda:
            self.device = args.x.get_device()
            self.workspace = _workspace(args)
            p.workspace, p.device = _ptr(self.workspace), self.device
            self.launch = _C.solver_step_cuda
        else:
            self.launch = _C.solver_step_cpu
        self.address = ctypes.addressof(p)

    def reseed(self, seed: int) -> None:
        """Draw this step's in-kernel noise from Philox(seed, its offset) from now on (a sampler's next run)."""
        a = self.args
        if a.philox is None:
            raise ValueError("reseed: this planned step draws no Philox noise")
        a.philox = PhiloxNoise(seed, a.philox.offset)
        if self.params is not None:
            self.params.seed = seed

    def launch_planned(self, x: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                       out: torch.Tensor) -> bool:
        """Launch with these tensors if x and the model output(s) match the plan (same presence, shape, dtype,
        device and strides as the planned x); return False, having done nothing, otherwise. `out` is the
        caller's buffer allocated like x (torch.empty_like(x), or the sampler's own slot)."""
        a, p = self.args, self.params
        if p is None or (cond is None) != (a.cond is None) or (uncond is None) != (a.uncond is None):
            return False
        shape, dtype, device, cpu, stride = self.meta
        for t in (x, cond, uncond):
            if t is not None and not (_like_x(t, shape, dtype, device, cpu) and t.stride() == stride):
                return False
        p.x, p.out = x.data_ptr(), out.data_ptr()
        if cond is not None:
            p.cond = cond.data_ptr()
            if uncond is not None:
                p.uncond = uncond.data_ptr()
        if self.cuda:
            p.stream = _cuda_stream(device)
        self.launch(self.address)
        return True

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        if self.launch_planned(x, cond, uncond, out):
            return
        a = self.args
        for name, t in (("model output", cond), ("unconditional model output", uncond)):
            if t is not None and not _like_x(t, a.x.shape, a.x.dtype, a.x.get_device(), a.x.is_cpu):
                _check_like(name, t, a.x)
        args = StepArgs(x, a.models, out, cond, uncond, a.guidance, a.threshold, a.save, a.noise, a.philox,
                        broadcast=a.broadcast)
        args.coeffs, args.coef_values, args.convert, args.convert_values = (a.coeffs, a.coef_values, a.convert,
                                                                           a.convert_values)
        OP(args)


# --------------------------------------------------------------------------------------------------
# torch.library registration (the path torch.compile traces) and the public op
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("pydpm::solver_step", mutates_args=("out", "save"))
def _solver_step_op(x: torch.Tensor, models: list[torch.Tensor], coeffs: torch.Tensor, out: torch.Tensor,
                    cond: torch.Tensor | None, uncond: torch.Tensor | None, convert: torch.Tensor | None,
                    guidance: float, threshold: list[float] | None, save: torch.Tensor | None,
                    noise: torch.Tensor | None, philox: list[int] | None) -> None:
    args = check_args(x, models, coeffs, model_output=_model_output(cond, uncond), convert=convert,
                      guidance_scale=None if uncond is None else guidance,
                      threshold=None if threshold is None else Threshold(*threshold), save=save,
                      noise=PhiloxNoise(*philox) if philox is not None else noise, out=out)
    OP(args)


@_solver_step_op.register_fake
def _(x, models, coeffs, out, cond, uncond, convert, guidance, threshold, save, noise, philox) -> None:
    return None


def library_args(args: StepArgs) -> tuple:
    """The arguments of torch.ops.pydpm.solver_step for a call checked with compiling=True."""
    return (args.x, list(args.models), args.coeffs, args.out, args.cond, args.uncond, args.convert, args.guidance,
            None if args.threshold is None else list(args.threshold), args.save, args.noise,
            None if args.philox is None else list(args.philox))


def _compiled(*inputs, out=None):
    """Under torch.compile: the checked call through the torch.library op (which mutates out and save)."""
    args = check_args(*inputs, out=out, compiling=True)
    torch.ops.pydpm.solver_step(*library_args(args))
    return args.result


def solver_step(x: torch.Tensor, models: Models, coeffs: Coefficients, *, model_output: ModelOutput | None = None,
                convert: Coefficients | None = None, guidance_scale: float | None = None,
                threshold: Threshold | None = None, save: torch.Tensor | None = None, noise: Noise | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One fused sampler update, one kernel launch (dynamic thresholding: a few, see below).

        out = c[0]·x + Σₖ c[k+1]·models[k] (+ c[-1]·z)

    With `model_output` the step first forms the model's converted output d (module docstring):
        m = model_output, or uncond + guidance_scale·(cond − uncond) for a (cond, uncond) pair
        d = convert[0]·x + convert[1]·m;  optionally thresholded;  written to `save` when given
        out = c[0]·x + c[1]·d + Σₖ c[k+2]·models[k] (+ c[-1]·z)

    Args:
        x: the current sample [B, ...], float32/float16/bfloat16 (float64 on the CPU).
        models: up to 6 tensors shaped like x (earlier model outputs / history); a model may also hold one
            sample, shape [1, *x.shape[1:]], that every sample reads (a constant term, e.g. DPM-Solver-v3's
            bias: read once per position rather than stored for each sample).
        coeffs: float32/float64, shape [n] or per-sample [B, n], n = 1 + (model_output given) +
            len(models) + (noise given). A list of floats or a 1-D CPU tensor is passed by value; a
            table on x's device is read by the kernel (no host sync: index a precomputed table).
        model_output, convert, guidance_scale: the fused model-output stage above.
        threshold: a `Threshold` applied to d. Imagen's dynamic thresholding is a per-sample quantile: on
            CUDA a radix select, 7 short launches instead of 1 (csrc/cuda/solver_step.cu); a constant
            clamp (min_scale == max_scale, diffusers' clip_sample) stays one launch.
        save: receives d (e.g. the history slot the next step reads).
        noise: a tensor shaped like x, or `PhiloxNoise(seed, offset)` to draw it inside the kernel (in x's
            memory order for contiguous and channels-last x, else row-major: see PhiloxNoise).
        out: where to write (may be x for an in-place update); allocated when None.

    Aliasing: `out` and `save` may each be exactly one of the inputs (x, a model, the model output, the
    noise tensor: the same tensor, or a view of the same elements in the same order): every element is read
    before it is written, so `out=x` updates x in place, exactly as out-of-place. Refused with a ValueError
    naming both: an out or save that partially overlaps an input or a coefficient table (e.g. a view of the
    same buffer shifted by one element, or x transposed), out and save sharing memory (save=out), an out or
    save whose elements share memory (an expand()ed view). Inputs may share memory with each other.

    Accumulates in float32 (float64 for float64). NaN/Inf in tensors propagate (no checks: they would
    need a host sync); host coefficients must be finite. Tensors that are neither contiguous nor all
    channels-last alike are copied first (one extra pass each). Not differentiable.
    Unfused equivalent: `solver_step_reference` with the same arguments.
    """
    return _ENTRY(x, models, coeffs, model_output, convert, guidance_scale, threshold, save, noise, out=out)



# --------------------------------------------------------------------------------------------------
# Sample inputs (the contract tests' cases) and the registry entry
# --------------------------------------------------------------------------------------------------

def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Yield (case name, solver_step kwargs) covering every feature and awkward shapes, drawn fresh
    from `seed` (never zeros). `small` keeps shapes interpreter-sized."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 3, 11, 13), (1, 4, 8, 8), (5, 17)]
    if not small:
        shapes += [(2, 4, 64, 64), (3, 16, 33, 31)]

    def r(shape):
        return sample_tensor(shape, device, dtype, gen)

    def coefs(n, batch, per_sample, where):
        c = torch.rand((batch, n) if per_sample else (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return c.tolist() if where == "list" else c.to(device=torch.device(where) if where == "cpu" else device)

    for shape in shapes:
        b = shape[0]
        tag = "x".join(map(str, shape))
        for n_models in (0, 1, 3, MAX_MODELS):
            yield f"plain-{n_models}m-{tag}", dict(x=r(shape), models=[r(shape) for _ in range(n_models)],
                                                   coeffs=coefs(1 + n_models, b, False, "list"))
        yield f"per-sample-table-{tag}", dict(x=r(shape), models=[r(shape), r(shape)], coeffs=coefs(3, b, True, "device"))
        yield f"shared-table-{tag}", dict(x=r(shape), models=[r(shape)], coeffs=coefs(2, b, False, "device"))
        yield f"cpu-tensor-coeffs-{tag}", dict(x=r(shape), models=[r(shape)], coeffs=coefs(2, b, False, "cpu"))
        yield f"noise-tensor-{tag}", dict(x=r(shape), models=[r(shape)], coeffs=coefs(3, b, True, "device"),
                                          noise=r(shape))
        yield f"philox-{tag}", dict(x=r(shape), models=[r(shape)], coeffs=coefs(3, b, False, "list"),
                                    noise=PhiloxNoise(seed=1234 + len(tag), offset=7))
        yield f"convert-save-{tag}", dict(x=r(shape), models=[r(shape)], coeffs=coefs(3, b, True, "device"),
                                          model_output=r(shape), convert=coefs(2, b, True, "device"),
                                          save=torch.full(shape, float("nan"), dtype=dtype, device=device))
        yield f"cfg-{tag}", dict(x=r(shape), models=[r(shape), r(shape)], coeffs=coefs(4, b, False, "list"),
                                 model_output=(r(shape), r(shape)), guidance_scale=7.5, convert=coefs(2, b, False, "list"))
        yield f"cfg-threshold-philox-{tag}", dict(
            x=r(shape), models=[r(shape)], coeffs=coefs(4, b, True, "device"), model_output=(r(shape), r(shape)),
            guidance_scale=3.0, convert=coefs(2, b, True, "device"), threshold=Threshold(0.9, 1.0, 2.5),
            save=torch.full(shape, float("nan"), dtype=dtype, device=device), noise=PhiloxNoise(seed=99, offset=3))
        yield f"clip-sample-{tag}", dict(
            x=r(shape), models=[], coeffs=coefs(2, b, False, "list"), model_output=r(shape) * 3,
            convert=coefs(2, b, True, "device"), threshold=Threshold(1.0, 1.5, 1.5),
            save=torch.full(shape, float("nan"), dtype=dtype, device=device))
        yield f"threshold-dpmsolver-{tag}", dict(
            x=r(shape), models=[], coeffs=coefs(2, b, False, "list"), model_output=r(shape) * 3,
            convert=[0.5, 1.5], threshold=Threshold(0.995, 1.0, math.inf))
        one = (1,) + shape[1:]
        yield f"shared-model-{tag}", dict(x=r(shape), models=[r(one), r(shape), r(one)],
                                          coeffs=coefs(5, b, True, "device"), model_output=r(shape),
                                          convert=coefs(2, b, False, "list"),
                                          save=torch.full(shape, float("nan"), dtype=dtype, device=device))
    shape = (2, 3, 10, 12)
    yield "non-contiguous", dict(x=r((2, 3, 12, 10)).transpose(2, 3), models=[r(shape)[..., ::1], r((2, 3, 10, 24))[..., ::2]],
                                 coeffs=coefs(4, 2, True, "device"), model_output=r(shape), convert=[1.0, -0.5],
                                 save=torch.empty((2, 3, 10, 24), dtype=dtype, device=device)[..., ::2])
    cl = torch.channels_last
    yield "channels-last", dict(x=r(shape).contiguous(memory_format=cl), models=[r(shape).contiguous(memory_format=cl)],
                                coeffs=coefs(3, 2, False, "list"), noise=PhiloxNoise(5, 1))
    one = (1,) + shape[1:]
    yield "shared-model-channels-last", dict(x=r(shape).contiguous(memory_format=cl),
                                             models=[r(one).contiguous(memory_format=cl), r(one)],
                                             coeffs=coefs(4, 2, True, "device"), noise=PhiloxNoise(5, 2))
    yield "shared-model-non-contiguous", dict(x=r(shape), models=[r((1, 3, 12, 10)).transpose(2, 3)],
                                              coeffs=coefs(2, 2, False, "list"))


def bad_inputs(device="cpu"):
    """The bad-input axis (BadInput: what must be refused, what has a defined result)."""
    import numpy as np

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 4)

    def r(*shp):
        return sample_tensor(shp or shape, device, torch.float32, gen)

    def call(**over):
        kwargs = dict(x=r(), models=[r()], coeffs=[0.5, 0.5])
        kwargs.update(over)
        return kwargs

    def step(**over):  # with a model output stage: coeffs (x, d, models[0])
        kwargs = dict(x=r(), models=[r()], coeffs=[0.5, 0.25, 0.25], model_output=r(), convert=[1.0, -0.5])
        kwargs.update(over)
        return kwargs

    B = BadInput
    yield B("x-none", call(x=None), TypeError, "x")
    yield B("x-list", call(x=[[1.0]]), TypeError, "x")
    yield B("x-int64", call(x=r().round().long(), models=[]), ValueError, "x")
    yield B("x-complex64", call(x=r().to(torch.complex64), models=[]), ValueError, "x")
    yield B("x-scalar", call(x=r(1)[0], models=[], coeffs=[1.0]), ValueError, "x")
    yield B("models-tensor", call(models=r()), TypeError, "models")
    yield B("models-none", call(models=None), TypeError, "models")
    yield B("models-7", call(models=[r()] * 7, coeffs=[0.1] * 8), ValueError, "models")
    yield B("models0-none", call(models=[None]), TypeError, "models[0]")
    yield B("models0-list", call(models=[[1.0]]), TypeError, "models[0]")
    yield B("models0-int64", call(models=[r().round().long()]), ValueError, "models[0]")
    yield B("models0-complex64", call(models=[r().to(torch.complex64)]), ValueError, "models[0]")
    yield B("models0-float64", call(models=[r().double()]), ValueError, "models[0]")
    yield B("models0-shape", call(models=[r(2, 3, 5)]), ValueError, "models[0]")
    yield B("models0-rank+1", call(models=[r().unsqueeze(0)]), ValueError, "models[0]")
    yield B("models0-meta", call(models=[r().to("meta")]), ValueError, "models[0]")
    yield B("models0-one-sample-other-shape", call(models=[r(1, 3, 5)]), ValueError, "models[0]")
    yield B("models0-one-sample-rank-1", call(models=[r(3, 4)]), ValueError, "models[0]")
    buf = r(2 * 3 * 4)
    yield B("out-overlaps-shared-model", call(models=[buf[:12].view(1, 3, 4)], out=buf.view(shape)), ValueError, "out")
    buf = r(2 * 3 * 4)
    yield B("save-overlaps-shared-model", step(models=[buf[12:].view(1, 3, 4)], save=buf.view(shape)), ValueError,
            "save")
    yield B("shared-model-empty-batch", call(x=r(0, 3), models=[r(1, 3)]), None)
    yield B("coeffs-str", call(coeffs="12"), TypeError, "coeffs")
    yield B("coeffs-str-items", call(coeffs=["1", "2"]), TypeError, "coeffs[0]")
    yield B("coeffs-none", call(coeffs=None), TypeError, "coeffs")
    yield B("coeffs-dict", call(coeffs={0.5: 1, 0.25: 2}), TypeError, "coeffs")
    yield B("coeffs-count", call(coeffs=[1.0]), ValueError, "coeffs")
    yield B("coeffs-nan", call(coeffs=[1.0, math.nan]), ValueError, "coeffs[1]")
    yield B("coeffs-inf-tuple", call(coeffs=(math.inf, 1.0)), ValueError, "coeffs[0]")
    yield B("coeffs-int-table", call(coeffs=torch.ones(2, dtype=torch.int32, device=device)), ValueError, "coeffs")
    yield B("coeffs-complex-table", call(coeffs=torch.ones(2, dtype=torch.complex64, device=device)), ValueError,
            "coeffs")
    yield B("coeffs-table-shape", call(coeffs=torch.ones(3, 2, device=device)), ValueError, "coeffs")
    yield B("coeffs-numpy", call(coeffs=np.array([0.5, 0.5])), None)
    yield B("coeffs-bool-items", call(coeffs=[0.5, True]), TypeError, "coeffs[1]")
    yield B("model-output-cond-none", step(model_output=(None, r()), guidance_scale=2.0), TypeError, "model_output[0]")
    yield B("model-output-uncond-none", step(model_output=(r(), None), guidance_scale=2.0), TypeError,
            "model_output[1]")
    yield B("model-output-triple", step(model_output=(r(), r(), r()), guidance_scale=2.0), ValueError, "model_output")
    yield B("model-output-numpy", step(model_output=np.zeros(shape, dtype=np.float32)), TypeError, "model_output")
    yield B("model-output-int64", step(model_output=r().round().long()), ValueError, "model_output")
    yield B("model-output-shape", step(model_output=r(2, 3)), ValueError, "model_output")
    yield B("model-output-meta", step(model_output=r().to("meta")), ValueError, "model_output")
    yield B("convert-missing", step(convert=None), ValueError, "convert")
    yield B("convert-str", step(convert="ab"), TypeError, "convert")
    yield B("convert-str-items", step(convert=["1", "0"]), TypeError, "convert[0]")
    yield B("convert-nan", step(convert=[math.nan, 1.0]), ValueError, "convert[0]")
    yield B("convert-count", step(convert=[1.0]), ValueError, "convert")
    yield B("convert-bool-items", step(convert=[False, 1.0]), TypeError, "convert[0]")
    yield B("convert-without-model-output", call(convert=[1.0, 0.0]), ValueError, "convert")
    yield B("guidance-nan", step(model_output=(r(), r()), guidance_scale=math.nan), ValueError, "guidance_scale")
    yield B("guidance-inf", step(model_output=(r(), r()), guidance_scale=-math.inf), ValueError, "guidance_scale")
    yield B("guidance-str", step(model_output=(r(), r()), guidance_scale="7.5"), TypeError, "guidance_scale")
    yield B("guidance-bool", step(model_output=(r(), r()), guidance_scale=True), TypeError, "guidance_scale")
    yield B("guidance-missing", step(model_output=(r(), r())), ValueError, "guidance_scale")
    yield B("guidance-without-pair", step(guidance_scale=2.0), ValueError, "guidance_scale")
    yield B("guidance-numpy", step(model_output=(r(), r()), guidance_scale=np.float32(2.5)), None)
    yield B("threshold-tuple", step(threshold=(0.9, 1.0, 1.0)), TypeError, "threshold")
    yield B("threshold-ratio-str", step(threshold=Threshold("0.9", 1.0, 1.0)), TypeError, "threshold.ratio")
    yield B("threshold-bool-scale", step(threshold=Threshold(0.9, True, 2.0)), TypeError, "threshold.min_scale")
    yield B("threshold-ratio-nan", step(threshold=Threshold(math.nan, 1.0, 2.0)), ValueError, "threshold.ratio")
    yield B("threshold-ratio-1.5", step(threshold=Threshold(1.5)), ValueError, "threshold.ratio")
    yield B("threshold-min-nan", step(threshold=Threshold(0.9, math.nan, 2.0)), ValueError, "threshold.min_scale")
    yield B("threshold-scales", step(threshold=Threshold(0.9, 2.0, 1.0)), ValueError, "threshold.max_scale")
    yield B("threshold-without-model-output", call(threshold=Threshold()), ValueError, "threshold")
    yield B("save-without-model-output", call(save=r()), ValueError, "save")
    yield B("philox-float-seed", call(noise=PhiloxNoise(1.5), coeffs=[0.5, 0.5, 1.0]), TypeError, "seed")
    yield B("philox-bool-seed", call(noise=PhiloxNoise(True), coeffs=[0.5, 0.5, 1.0]), TypeError, "seed")
    yield B("philox-str-seed", call(noise=PhiloxNoise("3"), coeffs=[0.5, 0.5, 1.0]), TypeError, "seed")
    yield B("philox-float-offset", call(noise=PhiloxNoise(3, 2.0), coeffs=[0.5, 0.5, 1.0]), TypeError, "offset")
    yield B("philox-negative", call(noise=PhiloxNoise(-1), coeffs=[0.5, 0.5, 1.0]), ValueError, "PhiloxNoise")
    yield B("philox-2**63", call(noise=PhiloxNoise(3, 2 ** 63), coeffs=[0.5, 0.5, 1.0]), ValueError, "PhiloxNoise")
    yield B("philox-numpy-seed", call(noise=PhiloxNoise(np.int64(3), np.uint32(5)), coeffs=[0.5, 0.5, 1.0]), None)
    yield B("noise-tuple", call(noise=(3, 1), coeffs=[0.5, 0.5, 1.0]), TypeError, "noise")
    yield B("noise-int64", call(noise=r().round().long(), coeffs=[0.5, 0.5, 1.0]), ValueError, "noise")
    yield B("noise-meta", call(noise=r().to("meta"), coeffs=[0.5, 0.5, 1.0]), ValueError, "noise")
    x = r(2, 3, 5, 4).transpose(2, 3)
    yield B("philox-transposed-x", call(x=x, models=[r(2, 3, 4, 5)], noise=PhiloxNoise(9, 1), coeffs=[0.5, 0.5, 1.0]),
            None)
    x = r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    yield B("philox-channels-last-x", call(x=x, models=[r(2, 3, 4, 5)], noise=PhiloxNoise(9, 1),
                                           coeffs=[0.5, 0.5, 1.0]), None)
    yield B("empty-batch", call(x=r(0, 3), models=[r(0, 3)]), None)
    yield B("empty-features", call(x=r(2, 0), models=[r(2, 0)], noise=PhiloxNoise(1), coeffs=[1.0, 1.0, 1.0]), None)
    yield B("empty-batch-table", call(x=r(0, 3), models=[r(0, 3)], coeffs=torch.ones(0, 2, device=device)), None)
    yield B("requires-grad", call(models=[r().requires_grad_()]), ValueError, "models[0]")
    yield B("out-list", call(out=[0.0]), TypeError, "out")
    yield B("out-dtype", call(out=r().half()), ValueError, "out")
    yield B("out-shape", call(out=r(2, 3, 5)), ValueError, "out")
    yield B("out-meta", call(out=r().to("meta")), ValueError, "out")
    yield B("out-expanded", call(out=r(1, 3, 4).expand(shape)), ValueError, "out")
    buf = r(2 * 3 * 4 + 1)
    yield B("out-x-shifted", call(x=buf[:-1].view(shape), out=buf[1:].view(shape)), ValueError, "out")
    x = r(2, 4, 4)
    yield B("out-x-transposed", call(x=x, models=[r(2, 4, 4)], out=x.transpose(1, 2)), ValueError, "out")
    buf = r(2 * 3 * 4 + 2)
    yield B("out-model-shifted", call(models=[buf[:-2].view(shape)], out=buf[2:].view(shape)), ValueError, "out")
    buf = r(2 * 3 * 4 + 1)
    yield B("save-model-output-shifted", step(model_output=buf[1:].view(shape), save=buf[:-1].view(shape)), ValueError,
            "save")
    buf = r(2 * 3 * 4 + 1)
    yield B("out-overlaps-coeffs-table", call(coeffs=buf[:2], out=buf[1:25].view(shape)), ValueError, "out")
    o = r()
    yield B("save-is-out", step(save=o, out=o), ValueError, "save")
    o = r(2 * 3 * 4 + 1)
    yield B("save-overlaps-out", step(save=o[1:].view(shape), out=o[:-1].view(shape)), ValueError, "save")
    x = r()
    yield B("out-is-x", call(x=x, out=x), None)
    x = r(2, 3, 5, 4).transpose(2, 3)
    yield B("out-is-x-non-contiguous", call(x=x, models=[r(2, 3, 4, 5)], out=x), None)
    x = r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    yield B("out-is-x-channels-last", call(x=x, models=[r(2, 3, 4, 5)], out=x, noise=PhiloxNoise(4),
                                           coeffs=[0.5, 0.5, 1.0]), None)
    m = r()
    yield B("out-is-model", call(models=[m], out=m), None)
    mo = r()
    yield B("save-is-model-output", step(model_output=mo, save=mo), None)
    m = r()
    yield B("save-is-model-out-is-x", step(models=[m], save=m, x=(x := r()), out=x), None)
    m = r()
    yield B("models-alias-each-other", call(x=m, models=[m, m[:]], coeffs=[0.5, 0.25, 0.25]), None)


OP = register(Op(
    name="solver_step",
    fn=solver_step,
    backends=BACKENDS,
    reference=solver_step_reference,
    check=check_args,
    dispatch_key=_dispatch_key,
    priority=_priority,
    library_op=torch.ops.pydpm.solver_step.default,
    library_args=lambda **kwargs: library_args(check_args(**kwargs, compiling=True)),
    tolerances=ELEMENTWISE_TOLERANCES,
    sample_inputs=sample_inputs,
    mutated=("save",),
    eager=lambda *a, **k: solver_step_reference(*a, compute_dtype=a[0].dtype if a else k["x"].dtype, **k),
    bad_inputs=bad_inputs,
))
_ENTRY = Entry(OP, compiled=_compiled)
