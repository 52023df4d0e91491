"""GEGLU, the gated feed-forward activation of Stable Diffusion's transformer blocks (Shazeer, "GLU Variants
Improve Transformer", 2020; diffusers' `GEGLU` after its projection):

    geglu(h, approximate)   y = a · gelu(b, approximate),  (a, b) = h.chunk(2, dim=-1)

What is fused (one pass = one read of the inputs and one write of the outputs): the split, the GELU and the
product, forward in one pass (eager: a GELU pass and a product pass, with an intermediate written and read
back); the backward dh = [dy · gelu(b), dy · a · gelu'(b)] in one pass (eager autograd: four or five).
Arithmetic is fp32 (fp64 for fp64), cast once at the store. `approximate`: "none" (the exact GELU, erf) or
"tanh" (its tanh approximation), as torch.nn.functional.gelu.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU
path). Module layout (the op framework's skeleton, pydpm/ops/_framework.py): reference → argument check →
layouts → backends → registration → public op → sample and bad inputs.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, FLOAT_DTYPES, Backend, BadInput, Differentiable, Entry,
                                  Op, acc_dtype, check_no_alias, check_out, check_tensor, fail, fail_type, register,
                                  sample_maker, sample_tensor, tensor_mutations, triton_reasons)

APPROXIMATIONS = ("none", "tanh")


# --------------------------------------------------------------------------------------------------
# Reference (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def _halves(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): the value and the gate, the first and second halves of h's last dim (h.chunk(2, dim=-1))."""
    D = h.shape[-1] // 2
    return h[..., :D], h[..., D:]


def geglu_reference(h, *, approximate="none", compute_dtype=None):
    """diffusers' GEGLU after its projection: a · gelu(b) with (a, b) = h.chunk(2, dim=-1); computed in
    `compute_dtype` (default: float32, float64 for float64)."""
    a, b = _halves(h.to(compute_dtype or acc_dtype(h.dtype)))
    return (a * F.gelu(b, approximate=approximate)).to(h.dtype)


# --------------------------------------------------------------------------------------------------
# Arguments: checked at the boundary, then handed to a backend
# --------------------------------------------------------------------------------------------------

class GegluArgs:
    """A checked call: stage "forward" (h, approximate, out or None) or "backward" (grad = dy as well)."""

    __slots__ = ("stage", "h", "approximate", "out", "grad")

    def __init__(self, stage: str, h: torch.Tensor, approximate: str, out: torch.Tensor | None = None,
                 grad: torch.Tensor | None = None):
        self.stage, self.h, self.approximate, self.out, self.grad = stage, h, approximate, out, grad


def _out_shape(h: torch.Tensor) -> tuple[int, ...]:
    return tuple(h.shape[:-1]) + (h.shape[-1] // 2,)


def check_geglu(h, *, approximate="none", out=None) -> GegluArgs:
    """Validate a call of `geglu`: a few attribute reads when it is valid; `_explain` names what is not."""
    try:
        ok = (h.dtype in FLOAT_DTYPES and h.dim() > 0 and h.shape[-1] % 2 == 0 and type(approximate) is str
              and approximate in APPROXIMATIONS)
    except AttributeError:
        ok = False
    if not ok:
        _explain(h, approximate)
    if out is not None:
        check_out("geglu", "out", out, _out_shape(h), h.dtype, h, anchor="h")
        check_no_alias("geglu", (("out", out),), (("h", h),))
    return GegluArgs("forward", h, approximate, out)


def _explain(h, approximate) -> None:
    op = "geglu"
    check_tensor(op, "h", h, min_dims=1, what="[..., 2D] (the projection's output, value and gate halves)")
    if h.shape[-1] % 2:
        fail(op, f"h has shape {tuple(h.shape)}; its last dim ({h.shape[-1]}) must be even: GEGLU splits it into "
                 f"the value and the gate halves (the projection has 2·D outputs)")
    if not isinstance(approximate, str):
        fail_type(op, f"approximate must be a string, 'none' or 'tanh' (as torch.nn.functional.gelu), got "
                      f"{type(approximate).__name__} {approximate!r}")
    fail(op, f"approximate is {approximate!r}; pass 'none' (the exact, erf GELU) or 'tanh' (its tanh approximation), "
             f"as torch.nn.functional.gelu takes")


# --------------------------------------------------------------------------------------------------
# Layouts: the kernels see rows [R, N] with one row stride and any column stride; others are copied once
# --------------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, kernels) -> torch.Tensor:
    """t itself when the kernels can walk it as rows, else a contiguous copy (one extra pass)."""
    return t if kernels.row_strides(t) is not None else t.contiguous()


def _alloc(h: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous output (the fakes promise the same strides)."""
    return torch.empty(shape, dtype=h.dtype, device=h.device)


# --------------------------------------------------------------------------------------------------
# Backends: "forward" returns y (written into out when given), "backward" returns dh
# --------------------------------------------------------------------------------------------------

def _run_triton(args: GegluArgs) -> torch.Tensor:
    k = _backend.kernels("geglu")
    h, out, tanh = _rows(args.h, k), args.out, args.approximate == "tanh"
    if args.stage == "backward":
        dh = _alloc(h, h.shape)
        k.geglu_bwd(_rows(cast(torch.Tensor, args.grad), k), h, dh, tanh=tanh)
        return dh
    y = out if out is not None and k.row_strides(out) is not None else _alloc(h, _out_shape(h))
    k.geglu_fwd(h, y, tanh=tanh)
    return y if out is None or y is out else out.copy_(y)


def _run_reference(args: GegluArgs) -> torch.Tensor:
    h, approximate = args.h, args.approximate
    if args.stage == "backward":
        a, b = _halves(h.to(acc_dtype(h.dtype)))
        g = cast(torch.Tensor, args.grad).to(a.dtype)
        dh = _alloc(h, h.shape)
        dh[..., :a.shape[-1]] = g * F.gelu(b, approximate=approximate)
        dh[..., a.shape[-1]:] = torch.ops.aten.gelu_backward(g * a, b, approximate=approximate)  # g·a·gelu'(b)
        return dh
    out = args.out if args.out is not None else _alloc(h, _out_shape(h))
    return out.copy_(geglu_reference(h, approximate=approximate))


BACKENDS = (Backend("triton", _run_triton, lambda args: triton_reasons(args.h.device)),
            Backend("reference", _run_reference, lambda args: []))


def _dispatch_key(args: GegluArgs) -> tuple:
    return args.stage, args.h.is_cuda, args.h.is_cpu, args.h.dtype


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable op
# --------------------------------------------------------------------------------------------------

def _forward(h: torch.Tensor, approximate: str) -> torch.Tensor:
    return OP(check_geglu(h, approximate=approximate))


def _forward_fake(h, approximate):
    return _alloc(h, _out_shape(h))


def _backward(grad: torch.Tensor, h: torch.Tensor, approximate: str) -> torch.Tensor:
    """dh = [dy · gelu(b), dy · a · gelu'(b)]."""
    return OP(GegluArgs("backward", h, approximate, grad=grad))


def _backward_fake(grad, h, approximate):
    return _alloc(h, h.shape)


def _save(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.approximate = inputs[1]


def _grads(ctx, backward, dy):
    (h,) = ctx.saved_tensors
    return backward(dy, h, ctx.approximate), None


GRAD = Differentiable("geglu", forward=_forward, forward_fake=_forward_fake, backward=_backward,
                      backward_fake=_backward_fake, save=_save, grads=_grads)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------

def geglu(h: torch.Tensor, *, approximate: str = "none", out: torch.Tensor | None = None) -> torch.Tensor:
    """GEGLU: h [..., 2D] → a · gelu(b, approximate) [..., D], with (a, b) = h.chunk(2, dim=-1) (the value
    first, the gate second, as diffusers' `GEGLU` splits its projection's output).

    Args:
        h: [..., 2D], any floating dtype; rows (the leading dims flattened) with one stride run as they are,
            other layouts are copied once.
        approximate: "none" (the exact, erf GELU) or "tanh", as torch.nn.functional.gelu.
        out: optional [..., D] of h's dtype and device (not differentiable).

    One pass forward, one pass backward (dh = [dy·gelu(b), dy·a·gelu'(b)]), fp32 arithmetic (fp64 for fp64).
    Unfused equivalent: `geglu_reference`.

    Aliasing: `out` must not share memory with h (not even h's value half) nor within itself (an expand()ed
    view); such calls raise.
    """
    return _ENTRY(h, approximate=approximate, out=out)


# --------------------------------------------------------------------------------------------------
# Sample inputs, bad inputs and the registry entry
# --------------------------------------------------------------------------------------------------

def _sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """Odd and prime D, batch 1, 2-D to 5-D h, both approximations; then the layouts: rows with a stride other
    than 2D (a slice of wider rows), a column stride, transposed leading dims and an expanded h (copied)."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)

    def r(*shape):
        return sample_tensor(shape, device, dtype, gen)

    shapes = [((1, 2), "none"), ((3, 14), "tanh"), ((2, 13, 34), "none"), ((2, 13, 34), "tanh"),
              ((1, 7, 22), "none"), ((2, 3, 5, 12), "tanh"), ((2, 1, 3, 2, 6), "none")]
    if not small:
        shapes += [((2, 64, 640), "none"), ((1, 77, 2 * 331), "tanh")]
    for shape, approximate in shapes:
        yield f"{'x'.join(map(str, shape))}-{approximate}", dict(h=r(*shape), approximate=approximate)
    yield "row-stride", dict(h=r(3, 5, 19)[..., 2:16], approximate="tanh")
    yield "column-stride", dict(h=r(4, 10, 2)[..., 1], approximate="none")
    yield "transposed", dict(h=r(5, 3, 12).transpose(0, 1), approximate="none")
    yield "expanded", dict(h=r(1, 5, 6).expand(4, 5, 6), approximate="tanh")


def _bad_inputs(device):
    device = torch.device(device)
    r = sample_maker(device)
    D = 4
    oshape = (2, 3, D)

    def base():
        return dict(h=r(2, 3, 2 * D))

    yield from tensor_mutations(base, ("h",), anchor="h")
    yield BadInput("h-0-dim", dict(h=r()), ValueError, "h")
    yield BadInput("h-odd-last-dim", dict(h=r(2, 3, 2 * D + 1)), ValueError, "h")
    yield BadInput("h-int32", dict(h=torch.ones(2, 2 * D, dtype=torch.int32, device=device)), ValueError, "h")
    yield BadInput("approximate-unknown", dict(h=r(2, 3, 2 * D), approximate="erf"), ValueError, "approximate")
    yield BadInput("approximate-none", dict(h=r(2, 3, 2 * D), approximate=None), TypeError, "approximate")
    yield BadInput("approximate-bool", dict(h=r(2, 3, 2 * D), approximate=True), TypeError, "approximate")
    yield BadInput("out-list", dict(h=r(2, 3, 2 * D), out=[1.0]), TypeError, "out")
    yield BadInput("out-shape", dict(h=r(2, 3, 2 * D), out=r(2, 3, 2 * D)), ValueError, "out")
    yield BadInput("out-dtype", dict(h=r(2, 3, 2 * D), out=r(*oshape).double()), ValueError, "out")
    yield BadInput("out-meta", dict(h=r(2, 3, 2 * D), out=r(*oshape).to("meta")), ValueError, "out")
    yield BadInput("out-expanded", dict(h=r(2, 3, 2 * D), out=r(2, 1, D).expand(oshape)), ValueError, "out")
    buf = r(2 * 3 * 2 * D + 1)
    yield BadInput("out-overlaps-h", dict(h=buf[:-1].view(2, 3, 2 * D), out=buf[1:1 + 2 * 3 * D].view(oshape)),
                   ValueError, "out")
    h = r(2, 3, 2 * D)
    yield BadInput("out-is-h-value-half", dict(h=h, out=h[..., :D]), ValueError, "out")
    h = r(2, 3, 2 * D)
    yield BadInput("out-is-h-gate-half", dict(h=h, out=h[..., D:], approximate="tanh"), ValueError, "out")
    yield BadInput("empty-rows", dict(h=r(0, 3, 2 * D)), None)
    yield BadInput("empty-last-dim", dict(h=r(2, 3, 0), approximate="tanh"), None)
    yield BadInput("empty-rows-out", dict(h=r(2, 0, 2 * D), out=r(2, 0, D)), None)


def _poisoned(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=like.dtype, device=like.device)


OP = register(Op(
    name="geglu", fn=geglu, backends=BACKENDS, reference=geglu_reference, check=check_geglu,
    tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=_sample_inputs, dispatch_key=_dispatch_key,
    eager=lambda **kw: geglu_reference(**kw, compute_dtype=kw["h"].dtype),
    library_op=GRAD.overload,
    library_args=lambda h, approximate="none": (h.detach().clone().requires_grad_(), approximate),
    make_out=lambda kw: _poisoned(_out_shape(kw["h"]), kw["h"]),
    bad_inputs=_bad_inputs,
))

_ENTRY = Entry(OP, grad=GRAD, inputs=lambda h, approximate="none": (h, approximate))
