"""Attention for diffusion models: o = softmax(q·kᵀ·scale)·v without mask or dropout (the semantics of
torch.nn.functional.scaled_dot_product_attention), forward and backward, self- and cross-attention, any
head dimension, layouts [B, H, N, D] ('bhnd') and [B, N, H, D] ('bnhd', diffusers' processors) without
copies.

Backends: `triton` (flash attention: one pass over K/V with an online softmax, lse saved for the backward;
kernels/attention.py) and `reference` (PyTorch, in query chunks so that N×N is never materialised for
long sequences: the CPU path and the oracle). fp32 inputs multiply in TF32 on the GPU unless
precision='ieee'. Module layout: reference → checks → backends → torch.library ops with autograd →
public op → registry entry.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from pydpm import _backend
from pydpm.ops._registry import Backend, Op, Tolerance, _forced, forced_backend, register, use_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("bhnd", "bnhd")
PRECISIONS = ("tf32", "ieee")
MAX_HEAD_DIM = 256
_CHUNK = 1024  # query rows per step of the reference (bounds its memory to CHUNK × NK per head)


def _to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhnd" else t.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def dims(q: torch.Tensor, k: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """(B, H, NQ, NK, D) of a call in `layout`."""
    if layout == "bhnd":
        return q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    return q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3]


def _reference_forward(q, k, v, scale, layout, acc):
    """(o [B, H, NQ, D] in `acc`, lse₂ [B, H, NQ] float32 in base 2, as the Triton kernel saves it), query
    rows in chunks of 1024 so that memory stays CHUNK × NK per head."""
    qb, kb, vb = (_to_bhnd(t, layout).to(acc) for t in (q, k, v))
    o = torch.empty(qb.shape, dtype=acc, device=q.device)
    lse = torch.empty(qb.shape[:3], dtype=torch.float32, device=q.device)
    for start in range(0, qb.shape[2], _CHUNK):
        s = qb[:, :, start:start + _CHUNK] @ kb.transpose(-1, -2) * scale
        lse[:, :, start:start + _CHUNK] = (torch.logsumexp(s, dim=-1) / math.log(2)).float()
        o[:, :, start:start + _CHUNK] = torch.softmax(s, dim=-1) @ vb
    return o, lse


def attention_reference(q, k, v, *, scale=None, layout="bhnd", precision="tf32", compute_dtype=None):
    """softmax(q·kᵀ·scale)·v in `compute_dtype` (default float32, float64 for float64 inputs), query rows
    in chunks of 1024. Returns o in q's dtype and layout."""
    acc = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = _reference_forward(q, k, v, scale, layout, acc)[0].to(q.dtype)
    return o if layout == "bhnd" else o.transpose(1, 2)


def _reference_backward(do, q, k, v, scale, layout):
    """(dq, dk, dv) as contiguous [B, H, N, D], recomputing the probabilities chunk by chunk."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb, kb, vb, dob = (_to_bhnd(t, layout).to(acc) for t in (q, k, v, do))
    dq = torch.empty(qb.shape, dtype=acc, device=q.device)
    dk = torch.zeros(kb.shape, dtype=acc, device=q.device)
    dv = torch.zeros(vb.shape, dtype=acc, device=q.device)
    for start in range(0, qb.shape[2], _CHUNK):
        rows = slice(start, start + _CHUNK)
        p = torch.softmax(qb[:, :, rows] @ kb.transpose(-1, -2) * scale, dim=-1)     # [B, H, m, NK]
        dv += p.transpose(-1, -2) @ dob[:, :, rows]
        dp = dob[:, :, rows] @ vb.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[:, :, rows] = ds @ kb * scale
        dk += ds.transpose(-1, -2) @ qb[:, :, rows] * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AttentionArgs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    layout: str
    precision: str
    out: torch.Tensor | None = None


def _fail(msg: str) -> None:
    raise ValueError(f"attention: {msg}")


def check_args(q, k, v, *, scale=None, layout="bhnd", precision="tf32", out=None) -> AttentionArgs:
    if layout not in LAYOUTS:
        _fail(f"layout={layout!r}; use 'bhnd' ([B, H, N, D]) or 'bnhd' ([B, N, H, D], diffusers' layout)")
    if precision not in PRECISIONS:
        _fail(f"precision={precision!r}; use 'tf32' (tensor cores for fp32 inputs) or 'ieee' (exact fp32)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(f"{name} has shape {tuple(t.shape)}; expected 4 dims in layout {layout!r}")
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(f"{name} has dtype {t.dtype}; use float32, float16, bfloat16 (or float64 on the reference)")
        if t.dtype != q.dtype or t.device != q.device:
            _fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    h_dim = 1 if layout == "bhnd" else 2
    n_dim = 3 - h_dim
    B, H, D = q.shape[0], q.shape[h_dim], q.shape[3]
    if k.shape != v.shape:
        _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[h_dim] != H or k.shape[3] != D:
        _fail(f"k has shape {tuple(k.shape)}; it must share q's batch, heads and head dim ({B}, {H}, {D}) in "
              f"layout {layout!r}")
    if not 1 <= D <= MAX_HEAD_DIM:
        _fail(f"head dim {D}; supported 1..{MAX_HEAD_DIM}")
    if k.shape[n_dim] == 0:
        _fail("k and v have no tokens: softmax over an empty set is undefined")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        _fail(f"scale={scale} must be finite")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        _fail(f"out must be a {q.dtype} tensor shaped like q {tuple(q.shape)} on {q.device}")
    return AttentionArgs(q, k, v, scale, layout, precision, out)


# --------------------------------------------------------------------------------------------------
# Backends: run(args) -> (o, lse₂); the backward goes through _backward below
# --------------------------------------------------------------------------------------------------

def _triton_reasons(args) -> list[str]:
    reason = _backend.triton_reason(args.q.device, forced=forced_backend() == "triton")
    reasons = [reason] if reason else []
    if args.q.dtype == torch.float64:
        reasons.append("float64 runs on the reference backend")
    if args.q.shape[3] < 16 and args.q.device.type == "cuda":
        reasons.append("head dims below 16 run on the reference backend (tl.dot needs 16)")
    return reasons


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _run_triton(args: AttentionArgs):
    from pydpm.kernels.attention import attention_fwd

    q = args.q
    o = args.out if args.out is not None else torch.empty_like(q)
    B, H, NQ, _, _ = dims(q, args.k, args.layout)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    attention_fwd(q, args.k, args.v, o, lse, args.scale, args.layout, args.precision == "ieee", _interpreting(q))
    return o, lse


def _run_reference(args: AttentionArgs):
    acc = torch.float64 if args.q.dtype == torch.float64 else torch.float32
    o, lse = _reference_forward(args.q, args.k, args.v, args.scale, args.layout, acc)
    o = o.to(args.q.dtype)
    o = o if args.layout == "bhnd" else o.transpose(1, 2)
    if args.out is not None:
        return args.out.copy_(o), lse
    return o.contiguous() if args.layout == "bhnd" else o, lse


BACKENDS = (Backend("triton", _run_triton, _triton_reasons), Backend("reference", _run_reference, lambda a: []))


def _backward(do, q, k, v, o, lse, scale, layout, precision):
    args = AttentionArgs(q, k, v, scale, layout, precision)
    if OP.select(args).name == "triton":
        from pydpm.kernels.attention import attention_bwd

        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, scale, layout, precision == "ieee", _interpreting(q))
    else:
        dq, dk, dv = _reference_backward(do, q, k, v, scale, layout)
    if layout == "bnhd":
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# torch.library ops with autograd
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("pydpm::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layout: str,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = OP(check_args(q, k, v, scale=scale, layout=layout, precision=precision))
    return o.contiguous(), lse


@_attention_op.register_fake
def _(q, k, v, scale, layout, precision):
    B, H, NQ, _, _ = dims(q, k, layout)
    return q.new_empty(q.shape), q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("pydpm::attention_backward", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, scale: float, layout: str,
                      precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward(do, q, k, v, o, lse, scale, layout, precision)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, layout, precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, scale, layout, precision = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.layout, ctx.precision, ctx.backend = scale, layout, precision, _forced.get()
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    with use_backend(ctx.backend):  # autograd's CUDA thread does not see use_backend's ContextVar
        dq, dk, dv = torch.ops.pydpm.attention_backward(do.contiguous(), q, k, v, o, lse, ctx.scale, ctx.layout,
                                                        ctx.precision)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_setup)


class _Attention(torch.autograd.Function):
    """Eager autograd over the same forward and backward as the custom ops, without torch.library's
    dispatch (on the CPU of this project's H200 machine that dispatch cost more host time per training
    step than the kernels themselves); torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, args):
        o, lse = OP(args)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.layout, ctx.precision, ctx.backend = args.scale, args.layout, args.precision, _forced.get()
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        with use_backend(ctx.backend):  # autograd's CUDA thread does not see use_backend's ContextVar
            return (*_backward(do.contiguous(), q, k, v, o, lse, ctx.scale, ctx.layout, ctx.precision), None)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              layout: str = "bhnd", precision: str = "tf32", out: torch.Tensor | None = None) -> torch.Tensor:
    """o = softmax(q·kᵀ·scale)·v (scaled_dot_product_attention without mask or dropout).

    q [B, H, NQ, D] and k, v [B, H, NK, D] for layout 'bhnd', or [B, N, H, D] for 'bnhd' (read and
    written in place, no copies); NQ ≠ NK for cross-attention; D up to 256 (any value: 40, 72, 80, 160...);
    scale defaults to 1/√D. fp32/fp16/bf16 with fp32 accumulation; fp32 products in TF32 on the GPU
    unless precision='ieee'. Differentiable (flash-attention backward). Unfused equivalent:
    `attention_reference`."""
    args = check_args(q, k, v, scale=scale, layout=layout, precision=precision, out=out)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if out is not None:
        if grad:
            _fail("out= is not differentiable; drop out= to get gradients")
        return OP(args)[0]
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, args.scale, layout, precision)[0]
    if grad:
        return _Attention.apply(q, k, v, args)
    return OP(args)[0]


def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    cases = [((1, 1, 1, 16), 1), ((2, 3, 17, 40), 17), ((1, 2, 33, 72), 9), ((2, 1, 5, 16), 1), ((1, 2, 20, 24), 37)]
    if not small:
        cases += [((2, 4, 97, 80), 97), ((1, 2, 256, 64), 77)]
    for (B, H, NQ, D), NK in cases:
        tag = f"{B}x{H}x{NQ}x{D}-nk{NK}"
        yield f"bhnd-{tag}", dict(q=r(B, H, NQ, D), k=r(B, H, NK, D), v=r(B, H, NK, D))
        yield f"bnhd-{tag}", dict(q=r(B, NQ, H, D), k=r(B, NK, H, D), v=r(B, NK, H, D), layout="bnhd")
    yield "scale", dict(q=r(1, 2, 9, 16), k=r(1, 2, 12, 16), v=r(1, 2, 12, 16), scale=0.3)


OP = register(Op(
    name="attention", fn=attention, backends=BACKENDS, reference=attention_reference, check=check_args,
    # fp32 multiplies in TF32 on the GPU (≈ 1e-3 relative); fp16/bf16: DESIGN §3's 2×-eager rule applies.
    tolerances={torch.float64: Tolerance(1e-10, 1e-10), torch.float32: Tolerance(5e-3, 5e-3),
                torch.float16: Tolerance(5e-3, 5e-3), torch.bfloat16: Tolerance(3e-2, 3e-2)},
    sample_inputs=sample_inputs,
    dispatch_key=lambda a: (a.q.device.type, a.q.dtype, a.q.shape[3] < 16),
    library_op=torch.ops.pydpm.attention.default,
    library_args=lambda q, k, v, scale=None, layout="bhnd", precision="tf32": (
        q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, layout, precision),
    eager=lambda **kw: attention_reference(**kw, compute_dtype=kw["q"].dtype),
    make_out=lambda kw: torch.empty_like(kw["q"])))
