"""The op framework: the one skeleton every op family is built on.

An op family module (`pydpm/ops/<family>.py`) writes, top to bottom:

1. **references**: readable PyTorch, correct in float64: the CPU path and the oracle of every test;
2. **a check**: `check(*inputs, out=None, **options) -> Args`, the public arguments validated into one slotted
   object (messages name the argument, what was expected and the fix);
3. **backends**: `Backend(name, run, reasons)`; `reasons(args)` says why it cannot run these inputs (empty: it
   can), `run(args)` computes and returns the op's full result (a launcher of `kernels/<family>.py`, the
   reference, or a wrapped torch op);
4. **registration**: `Op(...)` (what dispatch and the contract tests read), `Differentiable(...)` when the op
   has a backward, and the front door `Entry(...)` that the public function is.

What the framework owns, so that no family repeats it:

- dispatch: backends in priority order (or an order measured per input class), the first with no reasons
  runs; the choice is cached per `dispatch_key` and forced backend, so a call pays one dict lookup;
  `PYDPM_BACKEND=<name>` (read at import) or `use_backend(name)` forces one, which raises with its reasons
  when it cannot run these inputs;
- the front door (`Entry.__call__`): under torch.compile the torch.library custom op; with autograd recording
  the eager `torch.autograd.Function`; otherwise check -> dispatch -> run, nothing else;
- differentiable ops (`Differentiable`): forward and backward registered once as torch.library custom ops
  with fakes and the autograd formula between them (what torch.compile traces and `opcheck` checks), and
  the same pair as one `torch.autograd.Function` for eager calls (torch.library's dispatch costs more host
  time than the kernels); both backwards re-enter the backend that was forced when the forward ran
  (autograd runs CUDA backwards on its own thread, where `use_backend`'s context variable is unset);
- argument-check helpers every family's messages are built from (`fail`, `fail_type`, `check_tensor`,
  `check_param`, `check_out`, `check_no_alias`), and the tolerances of the elementwise families
  (`ELEMENTWISE_TOLERANCES`);
- the bad-input axis of the contract tests: each `Op` declares `bad_inputs(device)`, calls that must be refused
  (`BadInput`: the exception class and the argument the message names) or that have a defined result (empty
  tensors, the in-place uses the op allows), built with `tensor_mutations`;
- the small pieces every family's backends, registration and sample inputs share: `acc_dtype` (the
  accumulation dtype), `triton_reasons` (whether Triton runs on a device), `no_output` (the placeholder a
  custom op returns for an output it did not compute) and `sample_tensor` (a sample input drawn from a seed).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import os
from typing import Any, Callable, Collection, Hashable, Iterator, Sequence

import torch

from pydpm import _backend
from pydpm._cache import BoundedCache

# Every backend name an op may declare. Families with a wrapped torch implementation add theirs (attention:
# torch's SDPA kernels); `use_backend` accepts any name some op declares.
BACKEND_NAMES = ["cuda", "triton", "cpu", "reference"]

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pydpm_backend", default=None)
# Dispatch choices kept per op: keys that include shapes (attention's) would otherwise grow without bound.
DISPATCH_CACHE_SIZE = 512
_ENV_BACKEND = os.environ.get("PYDPM_BACKEND") or None  # read once: os.environ costs ~1-2 µs per lookup


class BackendUnavailable(RuntimeError):
    """Raised when no backend (or the forced one) can run the given inputs."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op: `reasons(args)` lists why it cannot run these inputs (empty: it can);
    `run(args)` computes and returns the op's full result. `autograd`: a wrapped torch implementation that
    records torch's own autograd graph (the front door then calls it directly for a training call)."""

    name: str
    run: Callable[[Any], Any]
    reasons: Callable[[Any], list[str]]
    autograd: bool = False


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# --------------------------------------------------------------------------------------------------
# Argument checks: messages that name the argument, what was expected and the fix
# --------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (None or a list where a tensor goes, a string for numbers, a float seed).
    A TypeError, and a ValueError too, so that code catching the ops' documented ValueError still does."""


def fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def fail_type(op: str, msg: str) -> None:
    raise ArgumentTypeError(f"{op}: {msg}")


def check_real(op: str, name: str, v, *, finite: bool = True) -> float:
    """A real number (int, float, a numpy or 0-dim tensor scalar; not a bool or a string) -> float."""
    if type(v) is float or type(v) is int:  # the usual case, without the ABC checks below (µs each)
        f = float(v)
    elif isinstance(v, bool) or not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1
                                                                      and not v.dtype.is_complex)):
        fail_type(op, f"{name} must be a real number, got {type(v).__name__} {v!r}")
    else:
        f = float(v)
    if finite and not math.isfinite(f):
        fail(op, f"{name} is {f}; it must be finite")
    return f


def check_tensor(op: str, name: str, t, dims: int | None = None, *, min_dims: int = 0, what: str = "") -> None:
    """t is a float tensor with `dims` dimensions (or at least `min_dims`); `what` describes the layout."""
    if not isinstance(t, torch.Tensor):
        fail_type(op, f"{name} must be a torch.Tensor{' ' + what if what else ''}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} has dtype {t.dtype}; pass float32, float16, bfloat16 or float64 (cast with .float())")
    if (dims is not None and t.dim() != dims) or t.dim() < min_dims:
        expected = what or f"expected {dims} dimensions"
        fail(op, f"{name} has shape {tuple(t.shape)}; {'it must be ' + what if what else expected}")


def check_floating(op: str, name: str, t, x: torch.Tensor, expected: str) -> None:
    """An operand that must be a floating-point tensor on x's device; `expected` describes its shape (for the
    message when it is no tensor at all)."""
    if not isinstance(t, torch.Tensor):
        fail_type(op, f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.device != x.device:
        fail(op, f"{name} is on {t.device} but x is on {x.device}; move it with .to(x.device)")
    if not t.is_floating_point():
        fail(op, f"{name} has dtype {t.dtype}; it must be a floating-point tensor")


def check_param(op: str, name: str, t, shape: Sequence[int], x: torch.Tensor, hint: str) -> None:
    """A parameter tensor (weight, bias) of `shape` on x's device, any floating dtype."""
    check_floating(op, name, t, x, f"{list(shape)} ({hint})")
    if tuple(t.shape) != tuple(shape):
        fail(op, f"{name} has shape {tuple(t.shape)}; x of shape {tuple(x.shape)} needs {list(shape)} ({hint})")


def check_out(op: str, name: str, out, shape: Sequence[int], dtype: torch.dtype, x: torch.Tensor,
              anchor: str = "x") -> None:
    """A caller's out= tensor: `shape` and `dtype` on the device of x (the input named `anchor`)."""
    if not isinstance(out, torch.Tensor):
        fail_type(op, f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(out).__name__}")
    if out.device != x.device:
        fail(op, f"{name} is on {out.device} but {anchor} is on {x.device}; allocate it on {anchor}'s device")
    if out.dtype != dtype:
        whose = f" ({anchor}'s dtype)" if dtype == x.dtype else ""
        fail(op, f"{name} has dtype {out.dtype}; it must be {dtype}{whose}")
    if tuple(out.shape) != tuple(shape):
        fail(op, f"{name} has shape {tuple(out.shape)}; {anchor} of shape {tuple(x.shape)} gives {list(shape)}")


# --------------------------------------------------------------------------------------------------
# Aliasing: outputs that share memory with inputs or with each other
# --------------------------------------------------------------------------------------------------
# The kernels read and write memory directly, so an out= that partially overlaps an input (a view shifted by one
# element), another output, or itself (an expand()ed view, stride 0) gives results that depend on the order in
# which blocks run. Ops refuse them, as torch refuses them (torch's assert_no_internal_overlap and
# assert_no_partial_overlap); each op's docstring says which exact aliases (out=x) it allows. The checks run only
# when the caller passes an output, and cost a few attribute reads when nothing overlaps.

NO_OVERLAP, SAME_MEMORY, PARTIAL_OVERLAP = 0, 1, 2


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory t's elements occupy; (0, 0) when empty or not addressable
    (fake tensors: torch.compile's tracing; meta tensors all start at 0, which `overlap` tells apart)."""
    try:
        lo = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # FakeTensor / functional tensors have no memory
        return 0, 0
    size = t.nbytes
    if not size:
        return 0, 0
    if t.is_contiguous():
        return lo, lo + size
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # torch strides are never negative
    return lo, lo + span * t.element_size()


def _addresses(t: torch.Tensor) -> torch.Tensor:
    """The first byte address of every element of t (int64, CPU): the exact test behind the cheap ones."""
    idx = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return idx.reshape(-1) * t.element_size() + t.data_ptr()


def overlap(a: torch.Tensor, b: torch.Tensor) -> int:
    """NO_OVERLAP, SAME_MEMORY (the same elements: same start, shape, strides and element size) or
    PARTIAL_OVERLAP (some bytes shared, anything else)."""
    a_lo, a_hi = _extent(a)
    b_lo, b_hi = _extent(b)
    if a_hi <= b_lo or b_hi <= a_lo or a.device != b.device or a.device.type == "meta":
        return NO_OVERLAP
    if a_lo == b_lo and a.shape == b.shape and a.stride() == b.stride() and a.element_size() == b.element_size():
        return SAME_MEMORY
    if a.numel() * a.element_size() == a_hi - a_lo and b.numel() * b.element_size() == b_hi - b_lo:
        return PARTIAL_OVERLAP  # both cover their extents densely, and the extents meet
    ea, eb = _addresses(a), _addresses(b)  # interleaved views (x[..., ::2] and x[..., 1::2]) may not share a byte
    if a.element_size() == b.element_size() and (a_lo - b_lo) % a.element_size() == 0:
        return PARTIAL_OVERLAP if bool(torch.isin(ea, eb).any()) else NO_OVERLAP
    ba = (ea.unsqueeze(1) + torch.arange(a.element_size())).reshape(-1)
    bb = (eb.unsqueeze(1) + torch.arange(b.element_size())).reshape(-1)
    return PARTIAL_OVERLAP if bool(torch.isin(ba, bb).any()) else NO_OVERLAP


def internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (an expand()ed or broadcast view: a stride 0)."""
    if t.is_contiguous() or t.numel() <= 1 or t.device.type == "meta":
        return False
    status = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard for torch's quick test
    if status != 2:
        return status == 1
    try:
        e = _addresses(t)
    except (RuntimeError, NotImplementedError):
        return False
    return e.unique().numel() < e.numel()


def check_no_alias(op: str, writes: Sequence[tuple[str, Any]], reads: Sequence[tuple[str, Any]],
                   same_ok: Collection[str] = ()) -> None:
    """Refuse an output (`writes`: (name, tensor or None)) whose elements share memory with each other, that
    shares memory with another output, or that overlaps an input (`reads`) — except an exact alias (the same
    elements in the same order) of an input named in `same_ok` (an elementwise op's in-place use)."""
    for i, (w, o) in enumerate(writes):
        if o is None:
            continue
        if internal_overlap(o):
            fail(op, f"{w} has elements that share memory (strides {tuple(o.stride())}, shape {tuple(o.shape)}: "
                     f"an expand()ed or broadcast view); results written there would be lost: pass a tensor that "
                     f"owns its memory, e.g. {w.split(' ')[0]}.clone() or torch.empty({tuple(o.shape)})")
        for w2, o2 in writes[i + 1:]:
            if o2 is not None and overlap(o, o2) != NO_OVERLAP:
                fail(op, f"{w} and {w2} share memory; pass separate tensors (the op writes both)")
        lo, hi = _extent(o)
        for r, t in reads:
            if t is None:
                continue
            t_lo, t_hi = _extent(t)
            if hi <= t_lo or t_hi <= lo:  # the usual case, decided here: disjoint extents
                continue
            status = overlap(o, t)
            if status == SAME_MEMORY and r in same_ok:
                continue
            if status == SAME_MEMORY:
                fail(op, f"{w} is {r} (the same memory); {op} cannot write {r} in place: pass a separate "
                         f"tensor, or none (out=None allocates one)")
            if status == PARTIAL_OVERLAP:
                allowed = f" (exactly {w.split(' ')[0]}={r} is allowed)" if r in same_ok else ""
                fail(op, f"{w} partially overlaps {r} in memory (views of one buffer, e.g. shifted by an element); "
                         f"the result would depend on the order the kernel writes in: pass a separate tensor"
                         f"{allowed}")


# Elementwise families (one pass, fp32 accumulation), against the float64 reference for unit-scale inputs.
# Low precision also obeys the rule the contract tests check: the fused error is at most twice the error of
# the eager composition computed in the same dtype.
ELEMENTWISE_TOLERANCES = {torch.float64: Tolerance(1e-12, 1e-12), torch.float32: Tolerance(1e-5, 1e-5),
                          torch.float16: Tolerance(2e-3, 2e-3), torch.bfloat16: Tolerance(1.6e-2, 1.6e-2)}


# --------------------------------------------------------------------------------------------------
# Pieces the families' backends, registrations and sample inputs share
# --------------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of inputs of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_reasons(device: torch.device) -> list[str]:
    """Why the triton backend cannot run on `device` (a new list a family may extend with its own reasons).
    CPU tensors run only through Triton's interpreter, and only when the triton backend is forced."""
    reason = _backend.triton_reason(device, forced=forced_backend() == "triton")
    return [reason] if reason else []


def dense_layout(x: torch.Tensor) -> bool:
    """True when kernels can walk x in memory order with the batch outermost, each sample one dense block:
    contiguous x, or a 4-D channels-last one."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def no_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a custom op returns for an output it did not compute (its schema has no optional tensors): an empty
    tensor on x's device."""
    return x.new_empty((0,), dtype=dtype)


def sample_tensor(shape, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A sample input: standard normals drawn in float64 from `gen` (the same values on every device and dtype),
    then cast."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def sample_maker(device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Callable[..., torch.Tensor]:
    """`r(*shape)`: `sample_tensor`s on `device` from one generator seeded with `seed` (the bad-input axes)."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    return lambda *shape: sample_tensor(shape, device, dtype, gen)


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One case of an op's bad-input axis (`Op.bad_inputs`): fn(**kwargs) must raise `error` (ValueError or
    TypeError) with a message that starts with the op's name and names `argument`; or, with error=None, it has a
    defined result: fn's return value equals the reference on copies of the inputs (empty tensors, the in-place
    uses an op allows)."""

    name: str
    kwargs: dict
    error: type[Exception] | None
    argument: str = ""


def tensor_mutations(base: Callable[[], dict], names: Sequence[str], *, ranks: dict[str, int] | None = None,
                     optional: Collection[str] = (), complex_ok: Collection[str] = (),
                     anchor: str | None = None) -> Iterator[BadInput]:
    """The generic bad inputs of the tensor arguments `names` of a valid call (`base()`: fresh kwargs each time):
    None (unless `optional`), a nested list, int64 and complex64 dtypes (unless `complex_ok`), one dimension
    more and one fewer (for the fixed ranks in `ranks`), and the meta device (every argument but `anchor`, the
    one the others are compared with)."""
    def case(tag, name, value, error):
        kwargs = base()
        kwargs[name] = value(kwargs[name])
        return BadInput(f"{name}-{tag}", kwargs, error, name)

    for name in names:
        if name not in optional:
            yield case("none", name, lambda t: None, TypeError)
        yield case("list", name, lambda t: t.tolist(), TypeError)
        yield case("int64", name, lambda t: t.round().to(torch.int64), ValueError)
        if name not in complex_ok:
            yield case("complex64", name, lambda t: t.to(torch.complex64), ValueError)
        if ranks and name in ranks:
            yield case("rank+1", name, lambda t: t.unsqueeze(0), ValueError)
            yield case("rank-1", name, lambda t: t[0], ValueError)
        if name != anchor:
            yield case("meta", name, lambda t: t.to("meta"), ValueError)


@dataclasses.dataclass
class Op:
    """An op's metadata, from which dispatch works and the contract tests are generated: the public op,
    backends in priority order, the reference, the argument check, tolerances, sample inputs, in-place
    outputs, the torch.library registration."""

    name: str
    fn: Callable[..., Any]                       # the public op
    backends: Sequence[Backend]
    reference: Callable[..., Any]                # same arguments as fn; computes in fp32 (fp64 for fp64)
    check: Callable[..., Any]                    # fn's arguments -> the checked args every backend takes
    tolerances: dict[torch.dtype, Tolerance]
    sample_inputs: Callable[..., Iterator[tuple[str, dict]]]  # (device, dtype, small=) -> (name, kwargs)
    mutated: tuple[str, ...] = ()                # keyword arguments fn writes in place
    eager: Callable[..., Any] | None = None      # the unfused composition in the inputs' own dtype
    # What backend reasons depend on (device, dtype, features): the choice is cached per key and forced
    # backend, so a call pays one dict lookup. Required: every op dispatches on the hot path.
    dispatch_key: Callable[[Any], Hashable] = lambda args: None
    # The automatic choice's order of backend names where it depends on the inputs (a measured table);
    # None: the order of `backends`. Whatever it depends on must be part of dispatch_key.
    priority: Callable[[Any], Sequence[str]] | None = None
    # torch.library registration: the op overload and fn's keyword arguments -> its arguments (opcheck).
    library_op: Any = None
    library_args: Callable[..., tuple] | None = None
    # fn's keyword arguments -> the output(s) fn accepts as out= (None: one tensor like kwargs["x"]).
    make_out: Callable[[dict], Any] | None = None
    # device -> the bad-input axis of the contract tests (`BadInput`s): wrong types, dtypes, ranks, shapes,
    # devices, None, empty tensors, NaN parameters, aliased outputs. Required of every registered op.
    bad_inputs: Callable[[torch.device], Iterator[BadInput]] | None = None
    _chosen: BoundedCache = dataclasses.field(default_factory=lambda: BoundedCache(DISPATCH_CACHE_SIZE), init=False,
                                              repr=False)

    def __post_init__(self):
        for b in self.backends:
            if b.name not in BACKEND_NAMES:
                BACKEND_NAMES.append(b.name)
        self.autograd_backends = any(b.autograd for b in self.backends)

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"op {self.name} has no backend {name!r}; it has {[b.name for b in self.backends]}")

    def not_supported_reasons(self, args: Any) -> dict[str, list[str]]:
        """For every backend, why it cannot run `args` (an empty list: it can)."""
        return {b.name: b.reasons(args) for b in self.backends}

    def select(self, args: Any) -> Backend:
        forced = _forced.get() or _ENV_BACKEND
        key = (forced, self.dispatch_key(args))
        backend = self._chosen.get(key)
        if backend is None:
            backend = self._chosen.put(key, self._select(args, forced))
        return backend

    def _select(self, args: Any, forced: str | None) -> Backend:
        if forced is not None:
            if forced not in BACKEND_NAMES:
                raise BackendUnavailable(f"PYDPM_BACKEND={forced!r} is not a backend; choose one of {BACKEND_NAMES}")
            if forced not in {b.name for b in self.backends}:
                raise BackendUnavailable(
                    f"{self.name}: backend {forced!r} was forced (PYDPM_BACKEND or pydpm.ops.use_backend) but this op "
                    f"has no {forced} backend; it has {[b.name for b in self.backends]}")
            backend = self.backend(forced)
            reasons = backend.reasons(args)
            if reasons:
                raise BackendUnavailable(
                    f"{self.name}: backend {forced!r} was forced (PYDPM_BACKEND or pydpm.ops.use_backend) but cannot "
                    f"run these inputs: {'; '.join(reasons)}")
            return backend
        order = self.backends if self.priority is None else [self.backend(n) for n in self.priority(args)]
        for backend in order:
            if not backend.reasons(args):
                return backend
        detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in self.not_supported_reasons(args).items())
        raise BackendUnavailable(f"{self.name}: no backend can run these inputs ({detail})")

    def __call__(self, args: Any) -> Any:
        return self.select(args).run(args)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name} is registered twice")
    REGISTRY[op.name] = op
    return op


def forced_backend() -> str | None:
    """The backend forced by `use_backend` (innermost wins) or else by PYDPM_BACKEND (read at import), or None."""
    name = _forced.get() or _ENV_BACKEND
    if name is not None and name not in BACKEND_NAMES:
        raise BackendUnavailable(f"PYDPM_BACKEND={name!r} is not a backend; choose one of {BACKEND_NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every pydpm op inside the block onto backend `name` (None: automatic choice)."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"use_backend: {name!r} is not a backend; choose one of {BACKEND_NAMES}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _in_backend(backend: str | None, fn: Callable[..., Any], *args) -> Any:
    """fn(*args) with `backend` forced as it was when the forward ran (nothing to do when it already is)."""
    if _forced.get() == backend:
        return fn(*args)
    token = _forced.set(backend)
    try:
        return fn(*args)
    finally:
        _forced.reset(token)


# --------------------------------------------------------------------------------------------------
# Differentiable ops
# --------------------------------------------------------------------------------------------------

class Differentiable:
    """A differentiable op's forward and backward, registered once for both ways of calling them.

    - `forward(*inputs) -> outputs` and `backward(*bwd_inputs) -> grads`: typed Python functions (their
      annotations give the torch.library schemas `pydpm::<name>` and `pydpm::<name>_backward`) that check,
      dispatch and run; `forward_fake` / `backward_fake` give the outputs' metadata;
    - `save(ctx, inputs, outputs)`: what the backward needs (ctx.save_for_backward, attributes, marks);
    - `grads(ctx, backward, *grad_outputs) -> one gradient (or None) per input`: the formula, calling
      `backward`, which is the backward custom op under torch.compile and the plain function eagerly.

    `library` is the forward custom op (autograd registered on it), `overload` its torch.ops handle;
    `function` the eager torch.autograd.Function over the same two functions. Both re-enter the forced backend in the backward.
    """

    def __init__(self, name: str, *, forward: Callable, forward_fake: Callable, backward: Callable,
                 backward_fake: Callable, save: Callable, grads: Callable):
        self.name = name
        self.library = torch.library.custom_op(f"pydpm::{name}", forward, mutates_args=())
        self.overload = getattr(torch.ops.pydpm, name).default  # what opcheck and the registry name
        self.library.register_fake(forward_fake)
        self.library_backward = torch.library.custom_op(f"pydpm::{name}_backward", backward, mutates_args=())
        self.library_backward.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            ctx.backend = _forced.get()
            save(ctx, inputs, output)

        def library_grads(ctx, *grad_outputs):
            return _in_backend(ctx.backend, grads, ctx, self.library_backward, *grad_outputs)

        self.library.register_autograd(library_grads, setup_context=setup_context)

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                output = forward(*inputs)
                setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grad_outputs):
                return _in_backend(ctx.backend, grads, ctx, backward, *grad_outputs)

        Function.__name__ = Function.__qualname__ = f"{name}_function"
        self.function = Function


def _deliver(result: Any, out: Any) -> Any:
    """Copy a result computed elsewhere into the caller's out= (a tensor or a tuple of them)."""
    if out is None:
        return result
    if isinstance(out, torch.Tensor):
        return out.copy_(result)
    for o, r in zip(out, result):
        o.copy_(r)
    return out


def _requires_grad(inputs: tuple | list) -> bool:
    """Whether a tensor among the inputs (or in a tuple or list among them: a pair of operands) requires grad."""
    for t in inputs:
        if isinstance(t, torch.Tensor):
            if t.requires_grad:
                return True
        elif isinstance(t, (tuple, list)) and _requires_grad(t):
            return True
    return False


class Entry:
    """The front door of one public op: `public(*inputs, out=None, **options)`.

    - compiling (torch.compile): `compiled(*inputs, out=out, **options)`, by default the Differentiable's
      custom op on `inputs(*inputs, **options)`, its result (through `visible`) copied into out;
    - autograd recording (some tensor input requires grad, grad mode on): the Differentiable's
      torch.autograd.Function, or the backend dispatch picks when that is a torch implementation with its
      own autograd (`Backend.autograd`); out= is refused (it is not differentiable, as in torch);
    - otherwise: `op.check(*inputs, out=out, **options)`, dispatch, `run`: nothing else on the host (the
      backend writes a given out=, which the call returns).

    `visible(result)` picks what the public op returns from a backend's full result (e.g. attention's
    output without the log-sum-exp its backward needs)."""

    def __init__(self, op: Op, *, grad: Differentiable | None = None,
                 inputs: Callable[..., tuple] | None = None, visible: Callable[[Any], Any] | None = None,
                 compiled: Callable[..., Any] | None = None):
        self.op, self.grad, self.visible = op, grad, visible
        self.inputs = inputs or (lambda *a: a)
        self.compiled = compiled or self._compiled

    def _show(self, result):
        return result if self.visible is None else self.visible(result)

    def _compiled(self, *inputs, out=None, **options):
        return _deliver(self._show(self.grad.library(*self.inputs(*inputs, **options))), out)

    def __call__(self, *inputs, out=None, **options):
        if torch.compiler.is_compiling():
            return self.compiled(*inputs, out=out, **options)
        if self.grad is not None and torch.is_grad_enabled() and _requires_grad(inputs):
            if out is not None:
                raise ValueError(f"{self.op.name}: out= is not differentiable (like torch's out= arguments); drop "
                                 f"out= to get gradients, or run under torch.no_grad()")
            if self.op.autograd_backends:  # dispatch may pick a torch implementation with its own autograd
                args = self.op.check(*inputs, **options)
                backend = self.op.select(args)
                if backend.autograd:
                    return self._show(backend.run(args))
            return self._show(self.grad.function.apply(*self.inputs(*inputs, **options)))
        op = self.op
        args = op.check(*inputs, out=out, **options)
        result = op.select(args).run(args)
        if out is not None:  # the backend wrote it: out= returns out, as in torch
            return out
        return result if self.visible is None else self.visible(result)
