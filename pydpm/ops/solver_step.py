"""The fused solver step: the update every exponential-integrator / linear-multistep sampler performs.

    out = c[0]·x + Σₖ c[k+1]·models[k] (+ c[-1]·z)

optionally preceded, in the same launch, by the model-output stage of the current step:

    m   = model_output                                  (one tensor)
    m   = uncond + guidance_scale·(cond − uncond)        (model_output = (cond, uncond))
    d   = convert[0]·x + convert[1]·m                    (e.g. x₀ = (x − σ·ε)/α, or ε itself: [0, 1])
    d   = clamp(d, −s, s)/s,  s = clamp(quantile(|d_b|, ratio), min_scale, max_scale)   (threshold)
    save ← d                                             (the history slot the next step reads)
    out = c[0]·x + c[1]·d + Σₖ c[k+2]·models[k] (+ c[-1]·z)

`z` is a `noise` tensor or normals drawn inside the kernel from `PhiloxNoise(seed, offset)`.
Module layout: reference → argument checks → backends → torch.library registration → public op.
"""
from __future__ import annotations

import math
import dataclasses
from typing import NamedTuple, Sequence

import torch

from pydpm import _backend
from pydpm.ops._registry import Backend, Op, Tolerance, forced_backend, register

MAX_MODELS = 6  # csrc/common/solver_step.h kMaxModels
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class PhiloxNoise(NamedTuple):
    """Standard normal noise drawn inside the kernel: reproducible for a (seed, offset) pair.

    Element i (in memory order) is lane i % 4 of Philox4x32-10 with counter (i // 4, offset) and key
    seed, turned into normals by Box-Muller (csrc/common/philox.h). Use a new offset (e.g. the step
    index) for every step of one sampling run.
    """

    seed: int
    offset: int = 0


class Threshold(NamedTuple):
    """Dynamic thresholding (Imagen) of the data prediction d, per sample b:

        s_b = clamp(quantile(|d_b|, ratio), min_scale, max_scale);   d_b ← clamp(d_b, −s_b, s_b) / s_b

    diffusers: `Threshold(dynamic_thresholding_ratio, 1.0, sample_max_value)`; the DPM-Solver reference
    code: `Threshold(dynamic_thresholding_ratio, thresholding_max_val, math.inf)`. The quantile is
    torch.quantile's linear interpolation. A sample whose d holds a NaN gets s_b = NaN.
    """

    ratio: float = 0.995
    min_scale: float = 1.0
    max_scale: float = 1.0


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
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The `numel` normals that `PhiloxNoise(seed, offset)` gives a tensor of that size, in memory order."""
    group = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    counter = [group & _MASK32, group >> 32, torch.full_like(group, offset & _MASK32),
               torch.full_like(group, (offset >> 32) & _MASK32)]
    words = torch.stack(philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32)), dim=1)  # [groups, 4]
    u = ((words[:, 0::2] >> 8) + 1).to(torch.float64) * 2.0 ** -24    # (0, 1]
    v = (words[:, 1::2] >> 8).to(torch.float64) * 2.0 ** -24          # [0, 1)
    radius, angle = torch.sqrt(-2.0 * torch.log(u)), 2.0 * math.pi * v
    normals = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)  # [groups, 2, 2]
    return normals.reshape(-1)[:numel].to(dtype)


def _like(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a memory-order vector with x's shape and (dense) strides."""
    return flat.as_strided(x.shape, x.stride())


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


def solver_step_reference(x, models, coeffs, *, model_output=None, convert=None, guidance_scale=None,
                          threshold=None, save=None, noise=None, out=None, compute_dtype=None):
    """Readable PyTorch composition of `solver_step` (same arguments), computing in `compute_dtype`
    (default float32, float64 for float64 inputs). `coeffs`/`convert` are tensors or float sequences;
    `noise` a tensor or PhiloxNoise."""
    acc = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    batch = x.shape[0]

    def rows(c, n):
        c = torch.as_tensor(c, dtype=acc, device=x.device)
        c = c.expand(batch, n) if c.dim() == 1 else c
        return [c[:, i].reshape((batch,) + (1,) * (x.dim() - 1)) for i in range(n)]

    terms = [x.to(acc)]
    if model_output is not None:
        if isinstance(model_output, (tuple, list)):
            cond, uncond = (t.to(acc) for t in model_output)
            m = uncond + guidance_scale * (cond - uncond)
        else:
            m = model_output.to(acc)
        k = rows(convert, 2)
        d = k[0] * terms[0] + k[1] * m
        if threshold is not None:
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
# Arguments: checked once at the boundary, then handed to a backend as one StepArgs
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class StepArgs:
    """A checked call. Coefficients come as a table on x's device (`coeffs`, `convert`) or as host
    values (`coef_values`, `convert_values`); exactly one of each pair is set (convert only with d)."""

    x: torch.Tensor
    models: tuple[torch.Tensor, ...]
    out: torch.Tensor
    coeffs: torch.Tensor | None = None
    coef_values: tuple[float, ...] | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    guidance: float = 1.0
    convert: torch.Tensor | None = None
    convert_values: tuple[float, ...] | None = None
    threshold: Threshold | None = None
    save: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    philox: PhiloxNoise | None = None

    @property
    def has_d(self) -> bool:
        return self.cond is not None

    @property
    def noise_mode(self) -> int:
        return 1 if self.noise is not None else 2 if self.philox is not None else 0

    @property
    def n_coefs(self) -> int:
        return 1 + self.has_d + len(self.models) + (self.noise_mode != 0)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the kernels read or write elementwise (they share x's layout)."""
        ts = [self.x, *self.models, self.out, self.cond, self.uncond, self.save, self.noise]
        return [t for t in ts if t is not None]


def _fail(msg: str) -> None:
    raise ValueError(f"solver_step: {msg}")


def _check_like(name, t, x: torch.Tensor) -> None:
    """t must be a tensor with x's device, dtype and shape. `name` is a string or a callable making it
    (so the hot path formats no strings)."""
    if isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device:
        return
    name = name() if callable(name) else name
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor shaped like x, got {type(t).__name__}")
    if t.device != x.device:
        _fail(f"{name} is on {t.device} but x is on {x.device}; move it with .to(x.device)")
    if t.dtype != x.dtype:
        _fail(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast it with .to(x.dtype)")
    if t.shape != x.shape:
        _fail(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; every tensor of the step must "
              f"match x")


def _coef_table(name: str, c, n: int, x: torch.Tensor, what: str, compiling: bool):
    """-> (device table or None, host values or None). `what()` names the entries for the message."""
    batch = x.shape[0]
    if isinstance(c, torch.Tensor):
        if c.dtype not in (torch.float32, torch.float64):
            _fail(f"{name} has dtype {c.dtype}; pass float32 or float64 coefficients")
        if c.dim() not in (1, 2) or c.shape[-1] != n or (c.dim() == 2 and c.shape[0] != batch):
            _fail(f"{name} has shape {tuple(c.shape)}; this call needs [{n}] or per-sample [{batch}, {n}] "
                  f"({what()})")
        if c.device == x.device or compiling:
            return c.contiguous(), None
        if c.device.type != "cpu" or c.dim() == 2:
            _fail(f"{name} is on {c.device} but x is on {x.device}; keep coefficient tables on x's device "
                  f"(move them once, before the sampling loop) or pass a 1-D CPU tensor or a list of floats")
        c = c.tolist()
    try:
        values = tuple(map(float, c))
    except (TypeError, ValueError):
        _fail(f"{name} must be a float tensor or a sequence of floats, got {type(c).__name__}")
    if len(values) != n:
        _fail(f"{name} has {len(values)} entries; this call needs {n} ({what()})")
    if not all(map(math.isfinite, values)):
        i, v = next((i, v) for i, v in enumerate(values) if not math.isfinite(v))
        _fail(f"{name}[{i}] is {v}; coefficients must be finite")
    if compiling:
        return torch.tensor(values, dtype=torch.float64), None
    return None, values


def check_args(x, models, coeffs, *, model_output=None, convert=None, guidance_scale=None, threshold=None,
               save=None, noise=None, out=None, compiling=False) -> StepArgs:
    """Validate a call of `solver_step` and normalise it. Messages name the argument and the fix."""
    if not isinstance(x, torch.Tensor):
        _fail(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(f"x has dtype {x.dtype}; pass float32, float16 or bfloat16 (float64 runs on the CPU backends)")
    if x.dim() == 0:
        _fail("x is a scalar; it needs a leading batch dimension")
    if isinstance(models, torch.Tensor):
        _fail("models must be a sequence of tensors (wrap a single tensor as [t])")
    models = tuple(models)
    if len(models) > MAX_MODELS:
        _fail(f"{len(models)} models given; at most {MAX_MODELS} are supported per step")
    for i, m in enumerate(models):
        _check_like(lambda: f"models[{i}]", m, x)
    cond = uncond = None
    if model_output is not None:
        if isinstance(model_output, (tuple, list)):
            if len(model_output) != 2:
                _fail("model_output must be one tensor or a (cond, uncond) pair")
            cond, uncond = model_output
            _check_like("model_output[0] (cond)", cond, x)
            _check_like("model_output[1] (uncond)", uncond, x)
            if guidance_scale is None:
                _fail("model_output is a (cond, uncond) pair; pass guidance_scale")
        else:
            cond = model_output
            _check_like("model_output", cond, x)
            if guidance_scale is not None:
                _fail("guidance_scale needs model_output=(cond, uncond)")
        if convert is None:
            _fail("model_output needs convert=[a, b] (d = a·x + b·model_output; [0, 1] keeps it as is)")
    else:
        for name, value in (("convert", convert), ("guidance_scale", guidance_scale), ("threshold", threshold),
                            ("save", save)):
            if value is not None:
                _fail(f"{name} acts on the model output of this step; pass model_output too")
    if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
        _fail(f"guidance_scale is {guidance_scale}; it must be finite")
    if threshold is not None:
        if not isinstance(threshold, Threshold):
            _fail("threshold must be a pydpm.ops.Threshold(ratio, min_scale, max_scale)")
        if not 0.0 <= threshold.ratio <= 1.0:
            _fail(f"threshold.ratio is {threshold.ratio}; it must lie in [0, 1]")
        if not (threshold.min_scale > 0 and threshold.max_scale >= threshold.min_scale):
            _fail(f"threshold scales ({threshold.min_scale}, {threshold.max_scale}) need 0 < min_scale <= max_scale")
    if save is not None:
        _check_like("save", save, x)
    philox = None
    if isinstance(noise, PhiloxNoise):
        if not (0 <= noise.seed < 2 ** 63 and 0 <= noise.offset < 2 ** 63):
            _fail(f"PhiloxNoise{tuple(noise)}: seed and offset must lie in [0, 2**63)")
        philox, noise = noise, None
    elif noise is not None:
        _check_like("noise", noise, x)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_like("out", out, x)
    args = StepArgs(x=x, models=models, out=out, cond=cond, uncond=uncond,
                    guidance=1.0 if guidance_scale is None else float(guidance_scale),
                    threshold=threshold, save=save, noise=noise, philox=philox)
    def names():
        terms = ["x"] + (["d"] if cond is not None else []) + [f"models[{i}]" for i in range(len(models))]
        return ", ".join(terms + (["noise"] if args.noise_mode else []))

    args.coeffs, args.coef_values = _coef_table("coeffs", coeffs, args.n_coefs, x, names, compiling)
    if cond is not None:
        args.convert, args.convert_values = _coef_table("convert", convert, 2, x, lambda: "x, model_output",
                                                        compiling)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args.tensors()):
        _fail("inputs require grad; solver_step is a sampling op without a backward: run it under "
              "torch.no_grad() (or use solver_step_reference to differentiate through the composition)")
    return args


def _dense(x: torch.Tensor) -> bool:
    """True when the kernels can walk x in memory order: dense, batch outermost."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def densify(args: StepArgs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give every tensor of the call x's dense layout, copying where needed (documented cost: one extra
    pass per copied tensor). Returns (user tensor, temporary) pairs to copy back after the kernel."""
    tensors = args.tensors()
    if all(t.is_contiguous() for t in tensors):
        return []
    stride = args.x.stride()
    if _dense(args.x) and all(t.stride() == stride for t in tensors):
        return []
    writeback = []
    x = args.x = args.x.contiguous()

    def fix(t, written):
        if t is None or t.is_contiguous():
            return t
        if not written:
            return t.contiguous()
        tmp = torch.empty_like(x)
        writeback.append((t, tmp))
        return tmp

    args.models = tuple(fix(m, False) for m in args.models)
    args.cond, args.uncond, args.noise = fix(args.cond, False), fix(args.uncond, False), fix(args.noise, False)
    args.out, args.save = fix(args.out, True), fix(args.save, True)
    return writeback


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def pack(args: StepArgs, workspace: int = 0, stream: int = 0, device: int = 0) -> tuple:
    """The positional arguments of `_C.solver_step_cpu/_cuda` (csrc/bindings.cpp), in that order."""
    x = args.x
    batch = x.shape[0]
    numel = x.numel()

    def row(table, values):
        if table is None:
            return 0, 0, 0, list(values)
        return table.data_ptr(), _backend.DTYPE_CODES[table.dtype], (table.shape[1] if table.dim() == 2 else 0), []

    return (numel, batch, numel // batch if batch else 0, _backend.DTYPE_CODES[x.dtype], x.data_ptr(),
            [m.data_ptr() for m in args.models], args.out.data_ptr(), args.n_coefs,
            *row(args.coeffs, args.coef_values),
            args.noise_mode, _ptr(args.noise), args.philox.seed if args.philox else 0,
            args.philox.offset if args.philox else 0,
            args.has_d, _ptr(args.cond), _ptr(args.uncond), args.guidance,
            *row(args.convert, args.convert_values or ()),
            _ptr(args.save), args.threshold is not None,
            *(tuple(args.threshold) if args.threshold is not None else (0.0, 1.0, 1.0)),
            workspace, stream, device)


def _no_fp64(args: StepArgs) -> list[str]:
    return ["float64 runs on the cpu and reference backends"] if args.x.dtype == torch.float64 else []


def _cuda_reasons(args: StepArgs) -> list[str]:
    reason = _backend.c_cuda_reason()
    reasons = [reason] if reason else []
    if args.x.device.type != "cuda":
        reasons.append(f"tensors are on {args.x.device.type}, not cuda")
    return reasons + _no_fp64(args)


def _run_cuda(args: StepArgs) -> None:
    device = args.x.device
    workspace = None
    if args.threshold is not None:
        nbytes = _backend._C.solver_step_cuda_workspace_bytes(args.x.numel(), args.x.shape[0])
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _backend._C.solver_step_cuda(*pack(args, _ptr(workspace), _backend.cuda_stream(device), device.index or 0))


def _triton_reasons(args: StepArgs) -> list[str]:
    reason = _backend.triton_reason(args.x.device, forced=forced_backend() == "triton")
    reasons = [reason] if reason else []
    if args.threshold is not None:
        reasons.append("dynamic thresholding needs a per-sample selection the Triton kernel does not implement; "
                       "the cuda and cpu backends do")
    return reasons + _no_fp64(args)


def _run_triton(args: StepArgs) -> None:
    from pydpm.kernels.solver_step import solver_step_triton

    solver_step_triton(args)


def _cpu_reasons(args: StepArgs) -> list[str]:
    reason = _backend.c_cpu_reason()
    reasons = [reason] if reason else []
    if args.x.device.type != "cpu":
        reasons.append(f"tensors are on {args.x.device.type}, not cpu")
    return reasons


def _run_cpu(args: StepArgs) -> None:
    _backend._C.solver_step_cpu(*pack(args))


def _model_output(cond: torch.Tensor | None, uncond: torch.Tensor | None):
    """The public `model_output` argument back from its (cond, uncond) halves."""
    return None if cond is None else (cond if uncond is None else (cond, uncond))


def _run_reference(args: StepArgs) -> None:
    solver_step_reference(
        args.x, args.models, args.coeffs if args.coeffs is not None else args.coef_values,
        model_output=_model_output(args.cond, args.uncond),
        convert=args.convert if args.convert is not None else args.convert_values,
        guidance_scale=args.guidance if args.uncond is not None else None, threshold=args.threshold, save=args.save,
        noise=args.noise if args.noise is not None else args.philox, out=args.out)


def _rand(shape, device, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# Automatic choice between the cuda and triton backends, from bench/results/h200-2026-11-26-*.md: per-call
# host cost is ~20 µs through the CUDA binding and ~60-90 µs through Triton's launcher, device times are
# equal up to 16 MB per tensor, and from 268 MB Triton reaches 100% of copy bandwidth against CUDA's 94%;
# with Philox noise Triton's kernel is ~1.3x faster on the device (10.4 vs 8.0 µs, bench/NOTES.md).
# So: CUDA first, except where device time dominates (tensors from 128 MB) or the host cost vanishes
# (Philox noise captured in a CUDA graph).
TRITON_FIRST_BYTES = 128 << 20
_CUDA_FIRST = ("cuda", "triton", "cpu", "reference")
_TRITON_FIRST = ("triton", "cuda", "cpu", "reference")


def _triton_first(args: StepArgs) -> bool:
    if not args.x.is_cuda:
        return False
    if args.x.numel() * args.x.element_size() >= TRITON_FIRST_BYTES:
        return True
    return args.philox is not None and torch.cuda.is_current_stream_capturing()


def _priority(args: StepArgs) -> Sequence[str]:
    return _TRITON_FIRST if _triton_first(args) else _CUDA_FIRST


def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Yield (case name, solver_step kwargs) covering every feature and awkward shapes, drawn fresh
    from `seed` (never zeros). `small` keeps shapes interpreter-sized."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 3, 11, 13), (1, 4, 8, 8), (5, 17)]
    if not small:
        shapes += [(2, 4, 64, 64), (3, 16, 33, 31)]

    def r(shape):
        return _rand(shape, device, dtype, gen)

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
        yield f"threshold-dpmsolver-{tag}", dict(
            x=r(shape), models=[], coeffs=coefs(2, b, False, "list"), model_output=r(shape) * 3,
            convert=[0.5, 1.5], threshold=Threshold(0.995, 1.0, math.inf))
    shape = (2, 3, 10, 12)
    yield "non-contiguous", dict(x=r((2, 3, 12, 10)).transpose(2, 3), models=[r(shape)[..., ::1], r((2, 3, 10, 24))[..., ::2]],
                                 coeffs=coefs(4, 2, True, "device"), model_output=r(shape), convert=[1.0, -0.5],
                                 save=torch.empty((2, 3, 10, 24), dtype=dtype, device=device)[..., ::2])
    cl = torch.channels_last
    yield "channels-last", dict(x=r(shape).contiguous(memory_format=cl), models=[r(shape).contiguous(memory_format=cl)],
                                coeffs=coefs(3, 2, False, "list"), noise=PhiloxNoise(5, 1))




# --------------------------------------------------------------------------------------------------
# torch.library registration (the path torch.compile traces) and the public op
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("pydpm::solver_step", mutates_args=("out", "save"))
def _solver_step_op(x: torch.Tensor, models: list[torch.Tensor], coeffs: torch.Tensor, out: torch.Tensor,
                    cond: torch.Tensor | None, uncond: torch.Tensor | None, convert: torch.Tensor | None,
                    guidance: float, threshold: list[float] | None, save: torch.Tensor | None,
                    noise: torch.Tensor | None, philox: list[int] | None) -> None:
    _execute(check_args(x, models, coeffs, model_output=_model_output(cond, uncond), convert=convert,
                        guidance_scale=None if uncond is None else guidance,
                        threshold=None if threshold is None else Threshold(*threshold), save=save,
                        noise=PhiloxNoise(*philox) if philox is not None else noise, out=out))


@_solver_step_op.register_fake
def _(x, models, coeffs, out, cond, uncond, convert, guidance, threshold, save, noise, philox) -> None:
    return None


def library_args(args: StepArgs) -> tuple:
    """The arguments of torch.ops.pydpm.solver_step for a call checked with compiling=True."""
    return (args.x, list(args.models), args.coeffs, args.out, args.cond, args.uncond, args.convert, args.guidance,
            None if args.threshold is None else list(args.threshold), args.save, args.noise,
            None if args.philox is None else list(args.philox))


def _execute(args: StepArgs) -> None:
    if args.x.numel() == 0:
        return
    writeback = densify(args)
    OP(args)
    for user, tmp in writeback:
        user.copy_(tmp)


# Positions in pack()'s tuple of the pointers a planned step replaces per call.
_X, _OUT, _COND, _UNCOND, _STREAM = 4, 6, 17, 18, 30


class PlannedStep:
    """A checked `solver_step` call re-launched many times with only x, the model output(s) and out
    changing (a sampler's step): the argument check, dispatch and packing happen once, here; a call
    then swaps three pointers and enters the C launcher (~1-2 µs of host time instead of ~15-20).

    Calls whose tensors do not share x's shape, dtype, device and strides fall back to the checked
    path (`_execute`), as do backends other than the C ones.
    """

    def __init__(self, args: StepArgs):
        self.args, self.packed, self.launch = args, None, None
        stride = args.x.stride()
        if args.x.numel() == 0 or not (_dense(args.x) and all(t.stride() == stride for t in args.tensors())):
            return
        backend = OP.select(args)
        if backend.name not in ("cuda", "cpu"):
            return
        device = args.x.device
        self.workspace = None
        if backend.name == "cuda":
            if args.threshold is not None:
                nbytes = _backend._C.solver_step_cuda_workspace_bytes(args.x.numel(), args.x.shape[0])
                self.workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.launch = _backend._C.solver_step_cuda
        else:
            self.launch = _backend._C.solver_step_cpu
        self.packed = list(pack(args, _ptr(self.workspace), 0, device.index or 0))
        self.cuda = backend.name == "cuda"
        self.meta = (args.x.shape, args.x.dtype, args.x.device, args.x.stride())

    def launch_planned(self, x: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                       out: torch.Tensor) -> bool:
        """Launch with these tensors if they match the plan (same presence, shape, dtype, device and
        strides as x); return False, having done nothing, otherwise."""
        a, meta = self.args, self.meta
        if self.packed is None or (cond is None) != (a.cond is None) or (uncond is None) != (a.uncond is None):
            return False
        for t in (x, cond, uncond, out):
            if t is not None and (not isinstance(t, torch.Tensor) or t.stride() != meta[3] or t.shape != meta[0]
                                  or t.dtype != meta[1] or t.device != meta[2]):
                return False
        p = self.packed
        p[_X], p[_OUT], p[_COND], p[_UNCOND] = x.data_ptr(), out.data_ptr(), _ptr(cond), _ptr(uncond)
        if self.cuda:
            p[_STREAM] = _backend.cuda_stream(x.device)
        self.launch(*p)
        return True

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None, uncond: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        if self.launch_planned(x, cond, uncond, out):
            return
        for name, t in (("model output", cond), ("unconditional model output", uncond)):
            if t is not None:
                _check_like(name, t, self.args.x)
        _execute(dataclasses.replace(self.args, x=x, cond=cond, uncond=uncond, out=out))


def solver_step(x, models, coeffs, *, model_output=None, convert=None, guidance_scale=None, threshold=None,
                save=None, noise=None, out=None):
    """One fused sampler update, one kernel launch (dynamic thresholding: a few, see below).

        out = c[0]·x + Σₖ c[k+1]·models[k] (+ c[-1]·z)

    With `model_output` the step first forms the model's converted output d (module docstring):
        m = model_output, or uncond + guidance_scale·(cond − uncond) for a (cond, uncond) pair
        d = convert[0]·x + convert[1]·m;  optionally thresholded;  written to `save` when given
        out = c[0]·x + c[1]·d + Σₖ c[k+2]·models[k] (+ c[-1]·z)

    Args:
        x: the current sample [B, ...], float32/float16/bfloat16 (float64 on the CPU).
        models: up to 6 tensors shaped like x (earlier model outputs / history).
        coeffs: float32/float64, shape [n] or per-sample [B, n], n = 1 + (model_output given) +
            len(models) + (noise given). A list of floats or a 1-D CPU tensor is passed by value; a
            table on x's device is read by the kernel (no host sync: index a precomputed table).
        model_output, convert, guidance_scale: the fused model-output stage above.
        threshold: a `Threshold` applied to d (Imagen's dynamic thresholding). On CUDA this is a
            radix select: 7 short launches instead of 1 (csrc/cuda/solver_step.cu).
        save: receives d (e.g. the history slot the next step reads).
        noise: a tensor shaped like x, or `PhiloxNoise(seed, offset)` to draw it inside the kernel.
        out: where to write (may be x for an in-place update); allocated when None.

    Accumulates in float32 (float64 for float64). NaN/Inf in tensors propagate (no checks: they would
    need a host sync); host coefficients must be finite. Tensors that are neither contiguous nor all
    channels-last alike are copied first (one extra pass each). Not differentiable.
    Unfused equivalent: `solver_step_reference` with the same arguments.
    """
    compiling = torch.compiler.is_compiling()
    args = check_args(x, models, coeffs, model_output=model_output, convert=convert, guidance_scale=guidance_scale,
                      threshold=threshold, save=save, noise=noise, out=out, compiling=compiling)
    out = args.out  # densify() may swap args.out for a contiguous temporary
    if compiling:
        torch.ops.pydpm.solver_step(*library_args(args))
    else:
        _execute(args)
    return out


OP = register(Op(
    name="solver_step",
    fn=solver_step,
    backends=(Backend("cuda", _run_cuda, _cuda_reasons), Backend("triton", _run_triton, _triton_reasons),
              Backend("cpu", _run_cpu, _cpu_reasons), Backend("reference", _run_reference, lambda args: [])),
    reference=solver_step_reference,
    check=check_args,
    dispatch_key=lambda args: (args.x.device.type, args.x.dtype, args.threshold is None, _triton_first(args)),
    priority=_priority,
    library_op=torch.ops.pydpm.solver_step.default,
    library_args=lambda **kwargs: library_args(check_args(**kwargs, compiling=True)),
    # Rule of DESIGN.md §3: fused error <= 2x the eager composition's error in the same dtype; these bound
    # the error against the float64 reference for unit-scale inputs and coefficients.
    tolerances={torch.float64: Tolerance(1e-12, 1e-12), torch.float32: Tolerance(1e-5, 1e-5),
                torch.float16: Tolerance(2e-3, 2e-3), torch.bfloat16: Tolerance(1.6e-2, 1.6e-2)},
    sample_inputs=sample_inputs,
    mutated=("save",),
    eager=lambda *a, **k: solver_step_reference(*a, compute_dtype=a[0].dtype if a else k["x"].dtype, **k),
))
