"""Attention for diffusion models: o = softmax(q·kᵀ·scale)·v without mask or dropout (the semantics of
torch.nn.functional.scaled_dot_product_attention), forward and backward, self- and cross-attention, any
head dimension, layouts [B, H, N, D] ('bhnd') and [B, N, H, D] ('bnhd', diffusers' processors) without
copies.

Backends:
- `triton`: flash attention (one pass over K/V with an online softmax, lse saved for the backward;
  kernels/attention.py); fp32 inputs multiply in TF32 unless precision='ieee'.
- `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`: torch's scaled-dot-product kernels (cuDNN's,
  FlashAttention-2's, and the memory-efficient one, which also runs fp32), called directly (no SDPA selection
  on the host), on CUDA, head dims a multiple of 8; they carry torch's own autograd, so a training call that
  dispatch sends there runs torch's backward too.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention itself, torch's own choice among those kernels and
  its math path (any device and dtype): what diffusers' processors call, so a drop-in that dispatch sends
  there costs what diffusers' own call costs.
- `reference`: PyTorch in query chunks, so that N×N is never materialised for long sequences: the CPU path and
  the oracle.

The automatic choice between them comes from a measured table (`DISPATCH_TABLE`): per head-dim class, dtype
class, key-length class and direction (inference, or training: forward and backward), the backend that was
fastest as a model sees it (eager wall time per call) on an H200. Our kernel runs fp32 (long keys) and head
dims torch's kernels refuse; cuDNN's runs fp16/bf16; torch's SDPA runs fp16/bf16 in diffusers' layout (inference
and training), and everything on the CPU (the reference stays the oracle, `use_backend("reference")`). Module layout (the op framework's skeleton,
pydpm/ops/_framework.py): reference → argument check → backends and the dispatch table → registration (the
differentiable op, the public op) → sample inputs and the registry entry.
"""
from __future__ import annotations

import math

import torch

from pydpm import _backend
from pydpm.ops._framework import (Backend, BadInput, Differentiable, Entry, Op, Tolerance, acc_dtype, check_no_alias,
                                  check_real, fail, fail_type, register, sample_maker, tensor_mutations,
                                  triton_reasons)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("bhnd", "bnhd")
PRECISIONS = ("tf32", "ieee")
MAX_HEAD_DIM = 256
_CHUNK = 1024  # query rows per step of the reference (bounds its memory to CHUNK × NK per head)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def _to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, H, N, D] view of a tensor in `layout` (the same view maps it back)."""
    return t if layout == "bhnd" else t.transpose(1, 2)


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
    acc = compute_dtype or acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = _reference_forward(q, k, v, scale, layout, acc)[0].to(q.dtype)
    return o if layout == "bhnd" else o.transpose(1, 2)


def _reference_backward(do, q, k, v, scale, layout):
    """(dq, dk, dv) as contiguous [B, H, N, D], recomputing the probabilities chunk by chunk."""
    acc = acc_dtype(q.dtype)
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
# Argument check
# --------------------------------------------------------------------------------------------------

class AttentionArgs:
    """A checked call. `train`: autograd records it (the dispatch table's direction); `own`: it runs inside
    pydpm's autograd function or custom op, whose backward is pydpm's, so torch's kernels (which carry their own
    autograd) are not eligible."""

    __slots__ = ("q", "k", "v", "scale", "layout", "precision", "out", "train", "own")

    def __init__(self, q, k, v, scale, layout, precision, out=None, train=False, own=False):
        self.q, self.k, self.v, self.scale, self.layout, self.precision = q, k, v, scale, layout, precision
        self.out, self.train, self.own = out, train, own


_DTYPES = frozenset(SUPPORTED_DTYPES)


def _explain(q, k, v, layout, precision) -> None:
    """Raise the message naming the argument (and the fix) that check_args' fast test rejected."""
    op = "attention"
    if layout not in LAYOUTS:
        raiser = fail if isinstance(layout, str) else fail_type
        raiser(op, f"layout={layout!r}; use 'bhnd' ([B, H, N, D]) or 'bnhd' ([B, N, H, D], diffusers' layout)")
    if precision not in PRECISIONS:
        raiser = fail if isinstance(precision, str) else fail_type
        raiser(op, f"precision={precision!r}; use 'tf32' (tensor cores for fp32 inputs) or 'ieee' (exact fp32)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            fail_type(op, f"{name} must be a torch.Tensor in layout {layout!r}, got {type(t).__name__}")
        if t.dim() != 4:
            fail(op, f"{name} has shape {tuple(t.shape)}; expected 4 dims in layout {layout!r}")
        if t.dtype not in SUPPORTED_DTYPES:
            fail(op, f"{name} has dtype {t.dtype}; use float32, float16, bfloat16 (or float64 on the reference)")
        if t.dtype != q.dtype or t.device != q.device:
            fail(op, f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; use .to(q)")
    h_dim = 1 if layout == "bhnd" else 2
    n_dim = 3 - h_dim
    B, H, D = q.shape[0], q.shape[h_dim], q.shape[3]
    if k.shape != v.shape:
        fail(op, f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[h_dim] != H or k.shape[3] != D:
        fail(op, f"k has shape {tuple(k.shape)}; it must share q's batch, heads and head dim ({B}, {H}, {D}) in "
                 f"layout {layout!r}")
    if not 1 <= D <= MAX_HEAD_DIM:
        fail(op, f"q has head dim {D}; supported 1..{MAX_HEAD_DIM} (split larger heads)")
    if k.shape[n_dim] == 0:
        fail(op, "k and v have no tokens: softmax over an empty set is undefined")
    fail(op, f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not form a call in layout {layout!r}")


def _check_out(q, k, v, out) -> None:
    op = "attention"
    if not isinstance(out, torch.Tensor):
        fail_type(op, f"out must be a {q.dtype} tensor shaped like q {tuple(q.shape)}, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype is not q.dtype or out.device != q.device:
        fail(op, f"out must be a {q.dtype} tensor shaped like q {tuple(q.shape)} on {q.device}, got {out.dtype} "
                 f"{tuple(out.shape)} on {out.device}")
    check_no_alias(op, (("out", out),), (("q", q), ("k", k), ("v", v)))


def check_args(q, k, v, scale=None, layout="bhnd", precision="tf32", out=None) -> AttentionArgs:
    """Validate a call of `attention`: a fast test of every condition first; `_explain` names what failed."""
    try:
        dtype, shape = q.dtype, q.shape
        ks = k.shape
        h_dim = 1 if layout == "bhnd" else 2
        ok = (dtype in _DTYPES and len(shape) == 4 and k.dtype is dtype and v.dtype is dtype and ks == v.shape
              and len(ks) == 4 and ks[0] == shape[0] and ks[h_dim] == shape[h_dim] and ks[3] == shape[3]
              and ks[3 - h_dim] > 0 and 1 <= shape[3] <= MAX_HEAD_DIM and (layout == "bhnd" or layout == "bnhd")
              and (precision == "tf32" or precision == "ieee") and k.device == q.device and v.device == q.device)
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        _explain(q, k, v, layout, precision)
    if scale is None:
        scale = 1.0 / math.sqrt(shape[3])
    elif type(scale) is not float or not math.isfinite(scale):
        scale = check_real("attention", "scale", scale)
    if out is not None:
        _check_out(q, k, v, out)
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return AttentionArgs(q, k, v, scale, layout, precision, out, train)


# --------------------------------------------------------------------------------------------------
# Backends: run(args) -> (o, lse₂ or None); the backward goes through _backward below
# --------------------------------------------------------------------------------------------------

def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _triton_reasons(args) -> list[str]:
    reasons = triton_reasons(args.q.device)
    if args.q.dtype == torch.float64:
        reasons.append("float64 runs on the reference backend")
    if args.q.shape[3] < 16 and args.q.is_cuda:
        reasons.append("head dims below 16 run on the reference backend (tl.dot needs 16)")
    return reasons


def _run_triton(args: AttentionArgs):
    q = args.q
    o = args.out if args.out is not None else torch.empty_like(q)
    B, H, NQ, _, _ = dims(q, args.k, args.layout)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    _backend.kernels("attention").attention_fwd(q, args.k, args.v, o, lse, args.scale, args.layout,
                                                args.precision == "ieee", _interpreting(q))
    return o, lse


def _run_reference(args: AttentionArgs):
    acc = acc_dtype(args.q.dtype)
    o, lse = _reference_forward(args.q, args.k, args.v, args.scale, args.layout, acc)
    o = o.to(args.q.dtype)
    o = o if args.layout == "bhnd" else o.transpose(1, 2)
    if args.out is not None:
        return args.out.copy_(o), lse
    return o.contiguous() if args.layout == "bhnd" else o, lse


def _torch_refuses(kernel: str, args: AttentionArgs) -> bool:
    """torch's own test of whether its `kernel` runs these inputs (what F.scaled_dot_product_attention asks
    before it calls the kernel; dispatch asks once per call class)."""
    can_use = getattr(torch.backends.cuda, f"can_use_{kernel}_attention", None)
    params_type = getattr(torch.backends.cuda, "SDPAParams", None)
    if can_use is None or params_type is None:
        return False
    q, k, v = (_to_bhnd(t, args.layout) for t in (args.q, args.k, args.v))
    try:
        try:
            params = params_type(q, k, v, None, 0.0, False, False)
        except TypeError:  # torch before enable_gqa
            params = params_type(q, k, v, None, 0.0, False)
        return not can_use(params, False)
    except (TypeError, RuntimeError):  # a torch whose test takes other arguments: do not use its kernel
        return True


def _sdpa_reasons(kernel: str):
    """Why torch's `kernel` ('cudnn', 'flash' or 'efficient' scaled-dot-product attention) cannot run a call."""
    fn = getattr(torch, f"_scaled_dot_product_{kernel}_attention", None)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if kernel == "efficient" else (torch.float16,
                                                                                           torch.bfloat16)

    def reasons(args: AttentionArgs) -> list[str]:
        q = args.q
        r = []
        if fn is None:
            r.append(f"this torch ({torch.__version__}) has no torch._scaled_dot_product_{kernel}_attention")
        if not q.is_cuda:
            r.append(f"torch's {kernel} attention runs on CUDA tensors")
        if q.dtype not in dtypes:
            r.append(f"torch's {kernel} attention does not run {q.dtype} (pydpm's triton backend does)")
        if kernel == "efficient" and args.train and args.layout == "bnhd":
            r.append("torch's efficient attention's backward rejects the 'bnhd' layout (its logsumexp stride)")
        if q.shape[3] % 8:
            r.append(f"head dim {q.shape[3]} is not a multiple of 8, which torch's {kernel} attention needs")
        if q.stride(3) != 1 or args.k.stride(3) != 1 or args.v.stride(3) != 1:
            r.append(f"torch's {kernel} attention needs a contiguous head dim")
        if args.own:
            r.append("a call inside pydpm's autograd function or custom op, whose backward is pydpm's")
        if not r and _torch_refuses(kernel, args):
            r.append(f"torch refuses these inputs for its {kernel} kernel (torch.backends.cuda.can_use_{kernel}"
                     f"_attention)")
        return r
    return reasons


def _sdpa_run(kernel: str):
    """Run torch's `kernel` attention on [B, H, N, D] views; it records its own autograd graph."""
    def run(args: AttentionArgs):
        q, k, v = args.q, args.k, args.v
        if args.layout == "bnhd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kernel == "cudnn":
            o = torch._scaled_dot_product_cudnn_attention(q, k, v, None, args.train, 0.0, False, False,
                                                          scale=args.scale)[0]
        elif kernel == "flash":
            o = torch._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=args.scale)[0]
        else:
            o = torch._scaled_dot_product_efficient_attention(q, k, v, None, args.train, 0.0, False,
                                                              scale=args.scale)[0]
        if args.layout == "bnhd":
            o = o.transpose(1, 2)
        if args.out is not None:
            return args.out.copy_(o), None
        return o, None
    return run


def _sdpa_default_reasons(args: AttentionArgs) -> list[str]:
    if args.own:
        return ["a call inside pydpm's autograd function or custom op, whose backward is pydpm's"]
    return []


def _run_sdpa_default(args: AttentionArgs):
    """torch's scaled_dot_product_attention on [B, H, N, D] views, its own kernel choice and autograd."""
    q, k, v = args.q, args.k, args.v
    if args.layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=args.scale)
    if args.layout == "bnhd":
        o = o.transpose(1, 2)
    if args.out is not None:
        return args.out.copy_(o), None
    return o, None


BACKENDS = (Backend("triton", _run_triton, _triton_reasons),
            Backend("sdpa-cudnn", _sdpa_run("cudnn"), _sdpa_reasons("cudnn"), autograd=True),
            Backend("sdpa-flash", _sdpa_run("flash"), _sdpa_reasons("flash"), autograd=True),
            Backend("sdpa-efficient", _sdpa_run("efficient"), _sdpa_reasons("efficient"), autograd=True),
            Backend("sdpa", _run_sdpa_default, _sdpa_default_reasons, autograd=True),
            Backend("reference", _run_reference, lambda a: []))

# The automatic choice, from eager wall time per call (back-to-back calls, host and device: what a model pays)
# and device time measured side by side on an H200 (torch 2.11, triton 3.6; bench/results/
# h200-2026-12-02-823c551-attention.md): (head-dim class, dtype class, keys, direction) -> the faster backend.
# Head-dim classes: 32 (D ≤ 32), 64, 128, 256; dtype class: "16" (fp16, bf16) or "32"; keys: "short" (NK ≤ 128:
# text conditioning) or "long"; direction: "infer" (forward) or "train" (forward and backward); layout.
#   fp16/bf16: cuDNN. On device pydpm's kernel is 0.84-0.93x cuDNN on long keys and 1.2-1.4x on D ≤ 32 and on
#     short-key training, but its eager host cost (the backward's four launches and allocations) loses those
#     cases as a model sees them: 77-key training 0.36x cuDNN's wall time, 77-key forward 0.34x.
#   fp32: pydpm's kernel, 1.9-3.0x SDPA's best per call on long keys; short-key forward: torch's efficient
#     kernel (75 us against our 118 us per call at (2,8,4096,64) x 77, a host-bound shape).
#   fp16/bf16 inference in diffusers' layout, measured in whole models (h200-2026-12-02-f22c043-models.md):
#     cuDNN's kernel called on [B, N, H, D] views cost far more host time than diffusers' own SDPA call (SD1.5
#     UNet forward 0.64x, pydpm's kernel 0.89x; DiT-XL/2 0.91x and 0.84x), so that class runs the very call
#     diffusers makes, torch's SDPA.
#   fp16/bf16 training in diffusers' layout, likewise: SD1.5's bf16 training step at batch 2 is host-bound (36.5 ms
#     of device time, 107 ms of host time per step), and cuDNN's kernel through pydpm's front door added 10.6 ms
#     of host time per step at batch 2 and 25 ms at batch 8 (h200-2026-12-03-b456eaf-train-profile.txt).
# The 256 class was not measured and keeps pydpm's kernel, except in the class above.
DISPATCH_TABLE = {
    **{(d, "16", keys, direction, layout): "sdpa-cudnn" for d in (32, 64, 128) for keys in ("short", "long")
       for direction in ("infer", "train") for layout in ("bhnd", "bnhd")},
    **{(d, "32", "short", "infer", layout): "sdpa-efficient" for d in (32, 64, 128) for layout in ("bhnd", "bnhd")},
    **{(d, "16", keys, direction, "bnhd"): "sdpa" for d in (32, 64, 128, 256) for keys in ("short", "long")
       for direction in ("infer", "train")},
}
SHORT_KEYS = 128
_ORDERS: dict[str, tuple[str, ...]] = {
    "triton": ("triton", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa", "reference"),
    "sdpa-cudnn": ("sdpa-cudnn", "triton", "sdpa-flash", "sdpa-efficient", "sdpa", "reference"),
    "sdpa-efficient": ("sdpa-efficient", "triton", "sdpa-cudnn", "sdpa-flash", "sdpa", "reference"),
    "sdpa": ("sdpa", "triton", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "reference"),
}


def table_choice(head_dim: int, dtype: torch.dtype, keys: int, train: bool, layout: str) -> str:
    """The backend DISPATCH_TABLE names for a call's class (head-dim class, dtype class, keys, direction,
    layout), or pydpm's kernel where it names none."""
    d_class = 32 if head_dim <= 32 else 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    key = (d_class, "32" if dtype in (torch.float32, torch.float64) else "16",
           "short" if keys <= SHORT_KEYS else "long", "train" if train else "infer", layout)
    return DISPATCH_TABLE.get(key, "triton")


def _priority(args: AttentionArgs):
    q, layout = args.q, args.layout
    return _ORDERS[table_choice(q.shape[3], q.dtype, args.k.shape[2 if layout == "bhnd" else 1], args.train, layout)]


def _dispatch_key(args: AttentionArgs):
    """Everything the backends' reasons and the table read: device, dtype, head dim, key count (the shapes),
    layout, direction, own, and whether the head dims are contiguous."""
    q, k, v = args.q, args.k, args.v
    return (q.is_cuda, q.is_cpu, q.dtype, q.shape, k.shape, args.layout, args.train, args.own,
            q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1)


def _backward(do, q, k, v, o, lse, scale, layout, precision):
    """(dq, dk, dv) in q's layout: pydpm's Triton backward, or the reference's."""
    args = AttentionArgs(q, k, v, scale, layout, precision, own=True)
    if OP.select(args).name == "triton":
        dq, dk, dv = _backend.kernels("attention").attention_bwd(do, q, k, v, o, lse, scale, layout,
                                                                 precision == "ieee", _interpreting(q))
    else:
        dq, dk, dv = _reference_backward(do, q, k, v, scale, layout)
    if layout == "bnhd":
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable op and the public op
# --------------------------------------------------------------------------------------------------

def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, layout: str,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_args(q, k, v, scale, layout, precision)
    args.own = True
    o, lse = OP(args)
    return o.contiguous(), lse


def _forward_fake(q, k, v, scale, layout, precision):
    B, H, NQ, _, _ = dims(q, k, layout)
    return q.new_empty(q.shape), q.new_empty((B, H, NQ), dtype=torch.float32)


def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, scale: float | None, layout: str,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, scale, layout, precision)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _backward_fake(do, q, k, v, o, lse, scale, layout, precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, inputs, output) -> None:
    q, k, v, scale, layout, precision = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.layout, ctx.precision = scale, layout, precision
    ctx.mark_non_differentiable(lse)


def _grads(ctx, backward, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = backward(do, q, k, v, o, lse, ctx.scale, ctx.layout, ctx.precision)
    return dq, dk, dv, None, None, None


GRAD = Differentiable("attention", forward=_forward, forward_fake=_forward_fake, backward=_backward_op,
                      backward_fake=_backward_fake, save=_save, grads=_grads)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              layout: str = "bhnd", precision: str = "tf32", out: torch.Tensor | None = None) -> torch.Tensor:
    """o = softmax(q·kᵀ·scale)·v (scaled_dot_product_attention without mask or dropout).

    q [B, H, NQ, D] and k, v [B, H, NK, D] for layout 'bhnd', or [B, N, H, D] for 'bnhd' (read and
    written in place, no copies); NQ ≠ NK for cross-attention; D up to 256 (any value: 40, 72, 80, 160...);
    scale defaults to 1/√D. fp32/fp16/bf16 with fp32 accumulation; fp32 products in TF32 on the GPU
    unless precision='ieee' (torch's kernels, where dispatch picks them, compute exact fp32). Differentiable.
    Dispatch runs pydpm's flash-attention kernels or one of torch's, whichever was measured faster for the
    call's class (`DISPATCH_TABLE`; `pydpm info` lists it).
    Unfused equivalent: `attention_reference`.

    Aliasing: `out` (shaped like q) must not share memory with q, k or v (not even out=q), nor within itself
    (an expand()ed view); such calls raise. q, k and v may share memory (they are only read)."""
    return _ENTRY(q, k, v, scale, layout, precision, out=out)


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


def bad_inputs(device):
    """The bad-input axis (BadInput: what must be refused, what has a defined result)."""
    device = torch.device(device)
    r = sample_maker(device)

    B, H, NQ, NK, D = 1, 2, 5, 3, 16

    def base():
        return dict(q=r(B, H, NQ, D), k=r(B, H, NK, D), v=r(B, H, NK, D))
    yield from tensor_mutations(base, ("q", "k", "v"), ranks={"q": 4, "k": 4, "v": 4}, anchor="q")
    yield BadInput("v-shape", dict(q=r(B, H, NQ, D), k=r(B, H, NK, D), v=r(B, H, NK + 1, D)), ValueError, "v")
    yield BadInput("k-heads", dict(q=r(B, H, NQ, D), k=r(B, H + 1, NK, D), v=r(B, H + 1, NK, D)), ValueError, "k")
    yield BadInput("k-head-dim", dict(q=r(B, H, NQ, D), k=r(B, H, NK, 8), v=r(B, H, NK, 8)), ValueError, "k")
    yield BadInput("k-bnhd-heads", dict(q=r(B, NQ, H, D), k=r(B, NK, H + 1, D), v=r(B, NK, H + 1, D), layout="bnhd"),
                   ValueError, "k")
    yield BadInput("v-dtype", dict(q=r(B, H, NQ, D), k=r(B, H, NK, D), v=r(B, H, NK, D).half()), ValueError, "v")
    yield BadInput("head-dim-300", dict(q=r(1, 1, 2, 300), k=r(1, 1, 2, 300), v=r(1, 1, 2, 300)), ValueError, "q")
    yield BadInput("k-no-tokens", dict(q=r(B, H, NQ, D), k=r(B, H, 0, D), v=r(B, H, 0, D)), ValueError, "k")
    yield BadInput("layout-unknown", dict(**base(), layout="nhd"), ValueError, "layout")
    yield BadInput("layout-none", dict(**base(), layout=None), TypeError, "layout")
    yield BadInput("precision-unknown", dict(**base(), precision="fp8"), ValueError, "precision")
    yield BadInput("scale-nan", dict(**base(), scale=math.nan), ValueError, "scale")
    yield BadInput("scale-inf", dict(**base(), scale=-math.inf), ValueError, "scale")
    yield BadInput("scale-str", dict(**base(), scale="0.5"), TypeError, "scale")
    yield BadInput("scale-bool", dict(**base(), scale=True), TypeError, "scale")
    yield BadInput("scale-tensor", dict(**base(), scale=torch.tensor(0.25)), None)
    yield BadInput("empty-batch", dict(q=r(0, H, NQ, D), k=r(0, H, NK, D), v=r(0, H, NK, D)), None)
    yield BadInput("empty-queries", dict(q=r(B, H, 0, D), k=r(B, H, NK, D), v=r(B, H, NK, D)), None)
    yield BadInput("out-list", dict(**base(), out=[0.0]), TypeError, "out")
    yield BadInput("out-shape", dict(**base(), out=r(B, H, NK, D)), ValueError, "out")
    yield BadInput("out-dtype", dict(**base(), out=r(B, H, NQ, D).double()), ValueError, "out")
    yield BadInput("out-meta", dict(**base(), out=r(B, H, NQ, D).to("meta")), ValueError, "out")
    yield BadInput("out-expanded", dict(**base(), out=r(B, 1, NQ, D).expand(B, H, NQ, D)), ValueError, "out")
    kw = dict(q=r(B, H, NK, D), k=r(B, H, NK, D), v=r(B, H, NK, D))
    yield BadInput("out-is-k", dict(**kw, out=kw["k"]), ValueError, "out")
    kw = base()
    yield BadInput("out-is-q", dict(**kw, out=kw["q"]), ValueError, "out")
    buf = r(B * H * NQ * D + B * H * NK * D - 1)
    yield BadInput("out-overlaps-v", dict(q=r(B, H, NQ, D), k=r(B, H, NK, D), v=buf[:B * H * NK * D].view(B, H, NK, D),
                                          out=buf[B * H * NK * D - 1:].view(B, H, NQ, D)), ValueError, "out")
    qkv = r(B, NQ, 3, H, D)
    yield BadInput("qkv-views-share-memory", dict(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2], layout="bnhd"),
                   None)


OP = register(Op(
    name="attention", fn=attention, backends=BACKENDS, reference=attention_reference, check=check_args,
    # fp32 multiplies in TF32 on the GPU (≈ 1e-3 relative); fp16/bf16: the 2×-eager rule applies.
    tolerances={torch.float64: Tolerance(1e-10, 1e-10), torch.float32: Tolerance(5e-3, 5e-3),
                torch.float16: Tolerance(5e-3, 5e-3), torch.bfloat16: Tolerance(3e-2, 3e-2)},
    sample_inputs=sample_inputs, dispatch_key=_dispatch_key, priority=_priority,
    library_op=GRAD.overload,
    library_args=lambda q, k, v, scale=None, layout="bhnd", precision="tf32": (q, k, v, scale, layout, precision),
    eager=lambda **kw: attention_reference(**kw, compute_dtype=kw["q"].dtype),
    make_out=lambda kw: torch.empty_like(kw["q"]), bad_inputs=bad_inputs))
_ENTRY = Entry(OP, grad=GRAD, visible=lambda result: result[0])
