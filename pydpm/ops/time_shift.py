"""The time-shift pick: the per-sample decision of the time-shift sampler (Li et al., ICLR 2024;
`pydpm.samplers.time_shift`) in one launch. For each sample b of x [B, ...] and candidates promised [K]:

    v_b   = Σᵢ (x_bi − mean_b)² / (N − 1)               the sample's variance over its N elements (NaN if N < 2)
    k_b   = the first j minimising |v_b − promised_j|    a NaN distance counts as +inf; all +inf: k_b = 0
    out_b = (row_b mod modulus)·K + k_b                  floor modulo; without row: out_b = k_b

`promised_j` is the variance the sampler's candidate time j promises (+inf: a candidate it may not take). The
optional `row` chains picks into one mixed-radix index: a multistep update that reads the picks of its last few
model calls gathers its per-sample coefficients from a table row numbered this way, and keeping the last
picks (row mod modulus) and appending the new one is this op's last line.

What is fused: the variance (two passes over the sample, fp32 accumulation, fp64 for fp64 x), the distance
to every candidate (float64), the argmin and the index arithmetic: one launch and one int64 written per
sample. The eager composition is eight launches (a variance reduction, a cast, a subtraction, an abs, an
argmin, then a multiply and an add). For a caller that picks on the result of a solver step every time (the
time-shift sampler), `PlannedPick(..., step=)` makes that step in the pick's own launch (`after_step`): the
step and the pick whose unfused composition is `solver_step` then this op.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU
path). Module layout (the op framework's skeleton, pydpm/ops/_framework.py): reference → argument check →
backends → registration → public op → sample and bad inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from pydpm import _backend
from pydpm.ops._framework import (FLOAT_DTYPES, Backend, BadInput, Entry, Op, Tolerance, acc_dtype, check_no_alias,
                                  check_out, check_tensor, dense_layout, fail, fail_type, register, sample_maker,
                                  sample_tensor, tensor_mutations, triton_reasons)
from pydpm.ops.solver_step import StepArgs

MAX_INDEX = 1 << 62     # modulus · K must stay below this (int64 rows with room to spare)


# --------------------------------------------------------------------------------------------------
# Reference (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def time_shift_pick_reference(x, promised, row=None, modulus=1, *, compute_dtype=None):
    """The module docstring's formula in plain PyTorch; the variance in `compute_dtype` (default float32,
    float64 for float64 x), the distances in float64."""
    B, n = x.shape[0], math.prod(x.shape[1:])
    v = x.reshape(B, n).to(compute_dtype or acc_dtype(x.dtype))
    var = (v - v.mean(dim=1, keepdim=True)).square().sum(dim=1) / max(n - 1, 1)
    if n < 2:
        var = torch.full_like(var, math.nan)
    dist = (var.double()[:, None] - promised.double()[None, :]).abs()
    pick = torch.nan_to_num(dist, nan=math.inf).argmin(dim=1)  # the first minimum; all +inf: 0
    if row is None:
        return pick
    return torch.remainder(row, modulus) * promised.numel() + pick


# --------------------------------------------------------------------------------------------------
# Arguments: checked at the boundary, then handed to a backend
# --------------------------------------------------------------------------------------------------

class PickArgs:
    """A checked call: x, promised [K], row [B] or None, modulus, out [B] (int64) or None."""

    __slots__ = ("x", "promised", "row", "modulus", "out")

    def __init__(self, x, promised, row, modulus, out):
        self.x, self.promised, self.row, self.modulus, self.out = x, promised, row, modulus, out


def check_pick(x, promised, row=None, modulus=1, out=None) -> PickArgs:
    """Validate a call of `time_shift_pick`: a few attribute reads when it is valid; `_explain` names what is
    not."""
    try:
        ok = (x.dtype in FLOAT_DTYPES and x.dim() >= 1 and promised.dtype in (torch.float32, torch.float64)
              and promised.dim() == 1 and promised.numel() > 0 and promised.device == x.device
              and type(modulus) is int and 0 < modulus and modulus * promised.numel() < MAX_INDEX
              and (row is None or (row.dtype == torch.int64 and row.shape == x.shape[:1] and row.device == x.device)))
    except AttributeError:
        ok = False
    if not ok:
        _explain(x, promised, row, modulus)
    if out is not None:
        check_out("time_shift_pick", "out", out, x.shape[:1], torch.int64, x)
        check_no_alias("time_shift_pick", (("out", out),), (("x", x), ("promised", promised), ("row", row)),
                       same_ok=("row",))
    return PickArgs(x, promised, row, modulus, out)


def _explain(x, promised, row, modulus) -> None:
    op = "time_shift_pick"
    check_tensor(op, "x", x, min_dims=1, what="[B, ...] (a batch of samples)")
    if not isinstance(promised, torch.Tensor):
        fail_type(op, f"promised must be a torch.Tensor [K] of candidate variances, got {type(promised).__name__}")
    if promised.dtype not in (torch.float32, torch.float64):
        fail(op, f"promised has dtype {promised.dtype}; pass float64 (or float32) candidate variances")
    if promised.dim() != 1 or promised.numel() == 0:
        fail(op, f"promised has shape {tuple(promised.shape)}; it must be [K] with K >= 1 candidate variances")
    if promised.device != x.device:
        fail(op, f"promised is on {promised.device} but x is on {x.device}; keep it on x's device (move it once, "
                 f"before the sampling loop)")
    if isinstance(modulus, bool) or not isinstance(modulus, numbers.Integral):
        fail_type(op, f"modulus must be an int >= 1, got {type(modulus).__name__} {modulus!r}")
    if modulus < 1:
        fail(op, f"modulus is {modulus}; it must be >= 1 (row mod modulus keeps the earlier picks)")
    if type(modulus) is not int:
        fail_type(op, f"modulus must be a Python int, got {type(modulus).__name__} {modulus!r}; pass int(modulus)")
    if modulus * promised.numel() >= MAX_INDEX:
        fail(op, f"modulus · K = {modulus} · {promised.numel()} reaches 2**62; the combined index would overflow "
                 f"int64 rows")
    if row is not None:
        if not isinstance(row, torch.Tensor):
            fail_type(op, f"row must be a torch.Tensor [B] of int64 indices or None, got {type(row).__name__}")
        if row.dtype != torch.int64:
            fail(op, f"row has dtype {row.dtype}; it must be int64 (an earlier pick, e.g. this op's output)")
        if row.shape != x.shape[:1]:
            fail(op, f"row has shape {tuple(row.shape)}; x of shape {tuple(x.shape)} needs [{x.shape[0]}]")
        if row.device != x.device:
            fail(op, f"row is on {row.device} but x is on {x.device}; keep it on x's device")


# --------------------------------------------------------------------------------------------------
# Backends: each returns out (the int64 [B] pick, written into the caller's out= when given)
# --------------------------------------------------------------------------------------------------

def _run_triton(args: PickArgs) -> torch.Tensor:
    x, promised = args.x if dense_layout(args.x) else args.x.contiguous(), args.promised
    out = args.out if args.out is not None else torch.empty(x.shape[:1], dtype=torch.int64, device=x.device)
    _backend.kernels("time_shift").time_shift_pick(x, promised if promised.is_contiguous() else promised.contiguous(),
                                                  args.row, args.modulus, out)
    return out


def _run_reference(args: PickArgs) -> torch.Tensor:
    result = time_shift_pick_reference(args.x, args.promised, args.row, args.modulus)
    return result if args.out is None else args.out.copy_(result)


BACKENDS = (Backend("triton", _run_triton, lambda args: triton_reasons(args.x.device)),
            Backend("reference", _run_reference, lambda args: []))


def _dispatch_key(args: PickArgs) -> tuple:
    return args.x.is_cuda, args.x.is_cpu, args.x.dtype


# --------------------------------------------------------------------------------------------------
# torch.library registration (the path torch.compile traces) and the public op
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("pydpm::time_shift_pick", mutates_args=())
def _pick_op(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int) -> torch.Tensor:
    return OP(check_pick(x, promised, row, modulus))


@_pick_op.register_fake
def _(x, promised, row, modulus):
    return x.new_empty(x.shape[:1], dtype=torch.int64)


def _compiled(x, promised, row=None, modulus=1, out=None):
    """Under torch.compile: the checked call through the torch.library op, copied into out when given."""
    check_pick(x, promised, row, modulus, out)
    result = torch.ops.pydpm.time_shift_pick(x, promised, row, modulus)
    return result if out is None else out.copy_(result)


def time_shift_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None = None, modulus: int = 1, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: the candidate whose promised variance is nearest the sample's own (module docstring).

    Args:
        x: [B, ...], any floating dtype; each sample's variance is over its other dims. Contiguous and
            channels-last x run as they are; other layouts are copied once.
        promised: [K] float64 (or float32) on x's device, K >= 1: each candidate's variance; +inf marks a
            candidate never to pick (unless every distance is +inf or NaN: then candidate 0).
        row: optional [B] int64 on x's device: earlier picks combined by this op; the result is then
            (row mod modulus)·K + pick.
        modulus: int >= 1, with modulus·K < 2**62.
        out: optional [B] int64 on x's device (may be `row` itself).

    Returns: [B] int64. One launch on CUDA; no host synchronisation (CUDA-graph capturable).
    Unfused equivalent: `time_shift_pick_reference`.
    """
    return _ENTRY(x, promised, row, modulus, out=out)


class PlannedPick:
    """A checked `time_shift_pick` call re-launched many times with only x changing (the time-shift sampler's
    pick at one model call), followed by row gathers `dest[b] ← table[out[b]]` for each (table, dest) pair of
    `gathers`: the argument check, the dispatch, the chunked launch's scratch and the kernel's arguments are made
    once, here (a `Prepared` launch of the Triton kernel, which makes the gathers, at most three, in the pick's own
    launch); a call then launches with x's pointer alone. An x of another shape, dtype, device or strides, and
    backends other than Triton, take the public op and one `index_select` per gather.

    `step`: the checked `solver_step` call (`check_args`) whose result the pick reads, i.e. the sampler's update
    before this model call; where the kernel can make it (an ODE step with a model output, up to two older
    predictions, no noise or thresholding, every tensor in x's layout, not float64; Triton), `after_step` makes that
    update and the pick in one launch."""

    def __init__(self, x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor | None, modulus: int,
                 out: torch.Tensor, gathers: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                 step: StepArgs | None = None):
        self.args = args = check_pick(x, promised, row, modulus, out)
        rows = promised.numel() * (modulus if row is not None else 1)
        for i, (table, dest) in enumerate(gathers):
            if not (table.is_contiguous() and dest.is_contiguous() and table.dtype == dest.dtype
                    and table.device == dest.device == x.device and table.shape[0] >= rows
                    and tuple(dest.shape) == (x.shape[0], *table.shape[1:])):
                fail("PlannedPick", f"gathers[{i}]: table {tuple(table.shape)} {table.dtype} on {table.device}, dest "
                                    f"{tuple(dest.shape)} {dest.dtype} on {dest.device}; both contiguous, of one "
                                    f"dtype, on x's device, the table with >= {rows} rows (every pick), dest "
                                    f"[{x.shape[0]}, *table.shape[1:]]")
        self.gathers = tuple(gathers)
        self.meta = (x.shape, x.dtype, x.device, x.stride())
        self.launch = self.fused = None
        self.scratch = None
        self.guided = step is not None and step.uncond is not None
        if OP.select(args).name == "triton" and dense_layout(x):
            kernels = _backend.kernels("time_shift")
            if len(self.gathers) <= kernels.MAX_GATHERS:
                self.scratch = kernels.make_scratch(x)
                promised = promised.contiguous()
                self.launch = kernels.prepare(x, promised, row, modulus, out, self.scratch, self.gathers)
                update = _update(kernels, step, x) if step is not None else None
                if update is not None:
                    self.fused = kernels.prepare(x, promised, row, modulus, out, self.scratch, self.gathers, update)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The pick for x into the planned out (returned), and the gathers."""
        a = self.args
        if self.launch is not None and (x.shape, x.dtype, x.device, x.stride()) == self.meta:
            self.launch(x)
            return a.out
        time_shift_pick(x, a.promised, a.row, a.modulus, out=a.out)
        for table, dest in self.gathers:
            torch.index_select(table, 0, a.out, out=dest)
        return a.out

    def after_step(self, x_in: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                   x: torch.Tensor) -> bool:
        """The planned step, x ← solver_step(x_in, older, coefs, model_output=cond or (cond, uncond), ...), and
        then the pick of x with its gathers, in one launch; False, having done nothing, where this plan has no
        such launch or a tensor is not of x's planned shape, dtype, device and strides."""
        if self.fused is None or (uncond is not None) != self.guided:
            return False
        for t in (x, x_in, cond, uncond):
            if t is not None and (t.shape, t.dtype, t.device, t.stride()) != self.meta:
                return False
        if uncond is None:
            self.fused(x, x_in, cond)
        else:
            self.fused(x, x_in, cond, uncond)
        return True


def _update(kernels, step: StepArgs, x: torch.Tensor):
    """The kernel's `Update` for a checked step whose result is x, or None where the kernel cannot make it as
    `solver_step` would: the kernel computes in float32, as solver_step's CUDA and Triton kernels, so a float64
    step (which solver_step computes in float64, on its reference backend) is not made here. The step's tensors
    stand for the layout (its x_in and model outputs are replaced at each call); host coefficients become float32
    rows on x's device once (the step's kernels compute with float32 coefficients)."""
    if not (step.cond is not None and step.noise is None and step.philox is None and step.threshold is None
            and step.broadcast == 0 and len(step.models) <= kernels.MAX_OLDER and step.x.dtype == x.dtype
            and x.dtype != torch.float64
            and all(t.shape == x.shape and t.stride() == x.stride() and t.dtype == x.dtype and t.device == x.device
                    for t in step.tensors())):
        return None

    def rows(table, values):
        return table if table is not None else torch.tensor(values, dtype=torch.float32, device=x.device)

    return kernels.Update(step.x, step.cond, step.uncond, step.guidance, tuple(step.models), step.save,
                          rows(step.coeffs, step.coef_values), rows(step.convert, step.convert_values))


# --------------------------------------------------------------------------------------------------
# Sample inputs, bad inputs and the registry entry
# --------------------------------------------------------------------------------------------------

def _candidates(k: int, device, gen: torch.Generator, forbidden: int = 0) -> torch.Tensor:
    """K candidate variances spread around 1 (the variance of the normal samples), `forbidden` of them +inf."""
    p = 0.6 + 0.8 * torch.rand(k, generator=gen, dtype=torch.float64)
    p[torch.randperm(k, generator=gen)[:forbidden]] = math.inf
    return p.to(device)


def _sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Batch 1, odd and prime sample sizes, K = 1 and K past one candidate block, +inf candidates, chained rows
    (negative ones too: floor modulo), float32 candidates, samples large enough to be split into chunks on a GPU;
    the layouts: channels-last (run as is), transposed and batch-strided x (copied), a strided row."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)

    def r(*shape):
        return sample_tensor(shape, device, dtype, gen) * (0.8 + 0.4 * torch.rand(shape[:1] + (1,) * (len(shape) - 1),
                                                                                generator=gen)).to(device, dtype)

    def rows(b, hi):
        return torch.randint(-hi, 4 * hi, (b,), generator=gen).to(device)

    yield "batch1-k1", dict(x=r(1, 37), promised=_candidates(1, device, gen))
    yield "odd-k21", dict(x=r(5, 3, 7), promised=_candidates(21, device, gen, forbidden=4))
    yield "prime-k67-row", dict(x=r(3, 2, 41), promised=_candidates(67, device, gen, forbidden=9),
                                row=rows(3, 21), modulus=21)
    yield "k2-row-modulus1", dict(x=r(7, 4, 4), promised=_candidates(2, device, gen), row=rows(7, 5), modulus=1)
    yield "float32-candidates", dict(x=r(4, 53), promised=_candidates(9, device, gen).float(), row=rows(4, 9),
                                     modulus=81)
    yield "large-sample", dict(x=r(2, 4, 16, 16 if small else 64), promised=_candidates(21, device, gen, forbidden=6))
    yield "chunked-sample", dict(x=r(2, 3, 3001), promised=_candidates(21, device, gen, forbidden=6), row=rows(2, 21),
                                 modulus=21)  # on a GPU each sample's variance is split into chunks
    yield "channels-last", dict(x=r(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
                                promised=_candidates(11, device, gen))
    yield "transposed", dict(x=r(3, 6, 5).transpose(1, 2), promised=_candidates(13, device, gen), row=rows(3, 13),
                             modulus=13)
    yield "batch-strided", dict(x=r(8, 3, 9)[::2], promised=_candidates(7, device, gen),
                                row=rows(8, 7)[::2], modulus=49)


def _bad_inputs(device):
    device = torch.device(device)
    r = sample_maker(device)

    def p(k=5):
        return torch.linspace(0.5, 1.5, k, dtype=torch.float64, device=device)

    def base():
        return dict(x=r(3, 8), promised=p())

    def idx(*shape):
        return torch.arange(math.prod(shape), device=device).reshape(shape)

    yield from tensor_mutations(base, ("x", "promised"), ranks={"promised": 1}, anchor="x")
    yield BadInput("x-0-dim", dict(x=r(), promised=p()), ValueError, "x")
    yield BadInput("promised-empty", dict(x=r(3, 8), promised=p(0)), ValueError, "promised")
    yield BadInput("promised-float16", dict(x=r(3, 8), promised=p().half()), ValueError, "promised")
    yield BadInput("row-list", dict(x=r(3, 8), promised=p(), row=[0, 1, 2]), TypeError, "row")
    yield BadInput("row-float", dict(x=r(3, 8), promised=p(), row=idx(3).double()), ValueError, "row")
    yield BadInput("row-int32", dict(x=r(3, 8), promised=p(), row=idx(3).int()), ValueError, "row")
    yield BadInput("row-shape", dict(x=r(3, 8), promised=p(), row=idx(4)), ValueError, "row")
    yield BadInput("row-2d", dict(x=r(3, 8), promised=p(), row=idx(3, 1)), ValueError, "row")
    yield BadInput("row-meta", dict(x=r(3, 8), promised=p(), row=idx(3).to("meta")), ValueError, "row")
    yield BadInput("modulus-0", dict(x=r(3, 8), promised=p(), row=idx(3), modulus=0), ValueError, "modulus")
    yield BadInput("modulus-float", dict(x=r(3, 8), promised=p(), row=idx(3), modulus=2.0), TypeError, "modulus")
    yield BadInput("modulus-bool", dict(x=r(3, 8), promised=p(), row=idx(3), modulus=True), TypeError, "modulus")
    yield BadInput("modulus-overflow", dict(x=r(3, 8), promised=p(), row=idx(3), modulus=1 << 61), ValueError,
                   "modulus")
    yield BadInput("out-list", dict(x=r(3, 8), promised=p(), out=[0]), TypeError, "out")
    yield BadInput("out-float", dict(x=r(3, 8), promised=p(), out=r(3)), ValueError, "out")
    yield BadInput("out-shape", dict(x=r(3, 8), promised=p(), out=idx(4)), ValueError, "out")
    yield BadInput("out-meta", dict(x=r(3, 8), promised=p(), out=idx(3).to("meta")), ValueError, "out")
    yield BadInput("out-expanded", dict(x=r(3, 8), promised=p(), out=idx(1).expand(3)), ValueError, "out")
    buf = idx(4)
    yield BadInput("out-overlaps-row", dict(x=r(3, 8), promised=p(), row=buf[:3], modulus=2, out=buf[1:]),
                   ValueError, "out")
    row = idx(3)
    yield BadInput("out-is-row", dict(x=r(3, 8), promised=p(), row=row, modulus=3, out=row), None)
    yield BadInput("empty-batch", dict(x=r(0, 8), promised=p()), None)
    yield BadInput("empty-samples", dict(x=r(3, 0), promised=p(), row=idx(3), modulus=2), None)
    yield BadInput("single-element-samples", dict(x=r(4, 1), promised=p()), None)
    nan_x = r(3, 8)
    nan_x[1, 2] = math.nan
    yield BadInput("nan-sample", dict(x=nan_x, promised=p()), None)
    every_inf = p()
    every_inf[:] = math.inf
    yield BadInput("every-candidate-inf", dict(x=r(3, 8), promised=every_inf), None)
    nan_p = p()
    nan_p[0] = math.nan
    yield BadInput("nan-candidate", dict(x=r(3, 8), promised=nan_p), None)


EXACT = {dtype: Tolerance(0.0, 0.0) for dtype in FLOAT_DTYPES}   # an index: the same as the float64 reference's

OP = register(Op(
    name="time_shift_pick", fn=time_shift_pick, backends=BACKENDS, reference=time_shift_pick_reference,
    check=check_pick, tolerances=EXACT, sample_inputs=_sample_inputs, dispatch_key=_dispatch_key,
    library_op=torch.ops.pydpm.time_shift_pick.default,
    library_args=lambda x, promised, row=None, modulus=1: (x, promised, row, modulus),
    make_out=lambda kw: torch.empty(kw["x"].shape[:1], dtype=torch.int64, device=kw["x"].device),
    bad_inputs=_bad_inputs,
))

_ENTRY = Entry(OP, compiled=_compiled)
