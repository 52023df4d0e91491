"""FF-Parser, the learnable frequency filter of MedSegDiff:

    ff_parser(x, w)     y = irfft2(rfft2(x, ortho) · w, ortho),  w: [C, H, W/2+1] complex

What is fused: both FFTs stay in cuFFT (torch.fft); everything between them is one pass: the complex multiply
with w and both ortho scalings (folded into one factor 1/(H·W), so torch.fft runs unnormalised and skips its
two scaling passes). For even W the fused stage also writes the spectrum *packed* for a half-length complex
inverse (kernels/ff_parser.py), so the inverse is a c2c FFT: torch copies the input of every c2r transform
first (cuFFT's c2r overwrites it), the c2c inverse needs no copy. Forward: rfft2, one fused pass, c2c inverse,
against eager's rfft2, scale, multiply, copy, c2r, scale. The backward is rfft2(dy), ONE pass that writes the
packed input-side spectrum dY·conj(w) and reduces the weight gradient Σ_b conj(X)·dY over the batch in
registers, and the c2c inverse; the forward's rfft2(x) is kept for it (the packed stage leaves it intact), so
the backward does no third FFT.

Backends: `triton` (CUDA; on CPU through the interpreter when forced) and `reference` (PyTorch, the CPU path).
Module layout (the op framework's skeleton, pydpm/ops/_framework.py): reference → argument check → backends →
registration (the differentiable op, the public op) → sample inputs and the registry entry.
"""
from __future__ import annotations

import torch

from pydpm import _backend
from pydpm.ops._framework import (ELEMENTWISE_TOLERANCES, Backend, BadInput, Differentiable, Entry, Op, acc_dtype,
                                  check_no_alias, check_out, check_param, check_tensor, fail, no_output, register,
                                  sample_maker, sample_tensor, tensor_mutations, triton_reasons)


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


# --------------------------------------------------------------------------------------------------
# Reference (the CPU path and the oracle every backend is tested against)
# --------------------------------------------------------------------------------------------------

def ff_parser_reference(x, weight, *, compute_dtype=None):
    """FF-Parser as written in MedSegDiff: rfft2 (ortho) → multiply by the complex per-channel map →
    irfft2 (ortho) back to x's size. `weight`: real [C, H, W//2+1, 2] (view_as_complex) or complex
    [C, H, W//2+1]. Computes in `compute_dtype` (default float32, float64 for float64 x)."""
    acc = compute_dtype or acc_dtype(x.dtype)
    if x.numel() == 0:  # torch.fft refuses empty batches; the filter of nothing is nothing
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    w = weight if weight.is_complex() else torch.view_as_complex(weight.to(acc).contiguous())
    spectrum = torch.fft.rfft2(x.to(acc), norm="ortho")
    y = torch.fft.irfft2(spectrum * w.to(spectrum.dtype), s=x.shape[-2:], norm="ortho")
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Argument check
# --------------------------------------------------------------------------------------------------

class FFArgs:
    """A checked ff_parser call. `weight` is the real view [C, H, W/2+1, 2]. In the backward stage `x` is dy
    (it decides dispatch: device and dtype), `spectrum` the forward's unnormalised rfft2(x) or None."""

    __slots__ = ("x", "weight", "out", "keep_spectrum", "backward", "spectrum", "need_dx")

    def __init__(self, x, weight, out=None, keep_spectrum=False, backward=False, spectrum=None, need_dx=True):
        self.x, self.weight, self.out, self.keep_spectrum = x, weight, out, keep_spectrum
        self.backward, self.spectrum, self.need_dx = backward, spectrum, need_dx


def real_weight(weight: torch.Tensor) -> torch.Tensor:
    """The real view [C, H, W/2+1, 2] of an FF-Parser weight given real or complex (differentiable)."""
    return torch.view_as_real(weight) if isinstance(weight, torch.Tensor) and weight.is_complex() else weight


def check_ff_parser(x, weight, *, out=None) -> FFArgs:
    """Validate a call of `ff_parser`. Messages name the argument, what was expected and the fix."""
    op = "ff_parser"
    check_tensor(op, "x", x, 4, what="[B, C, H, W]")
    B, C, H, W = x.shape
    if isinstance(weight, torch.Tensor) and weight.is_complex():
        if tuple(weight.shape) != (C, H, W // 2 + 1):
            fail(op, f"weight (complex) has shape {tuple(weight.shape)}; x of shape {tuple(x.shape)} needs "
                      f"[{C}, {H}, {W // 2 + 1}] = [C, H, W//2+1] (the half spectrum of rfft2)")
        if weight.device != x.device:
            fail(op, f"weight is on {weight.device} but x is on {x.device}; move it with .to(x.device)")
        weight = torch.view_as_real(weight)
    else:
        check_param(op, "weight", weight, (C, H, W // 2 + 1, 2), x,
                     "real and imaginary parts of the half-spectrum map, as torch.view_as_real gives; or pass "
                     "a complex [C, H, W//2+1] tensor")
    if out is not None:
        check_out(op, "out", out, x.shape, x.dtype, x)
        check_no_alias(op, (("out", out),), (("x", x), ("weight", weight)), same_ok=("x",))
    return FFArgs(x, weight, out)


# --------------------------------------------------------------------------------------------------
# Backends: torch.fft around one fused stage
# --------------------------------------------------------------------------------------------------

def _ff_multiply_reference(spec, weight, out, height, width):
    w = torch.view_as_complex(weight.to(spec.real.dtype).contiguous()) / (height * width)
    torch.mul(spec, w, out=out)


def _ff_grad_reference(dspec, spec, weight, dxspec, height, width):
    scale = 1.0 / (height * width)
    dw = None
    if spec is not None:
        wf = dspec.shape[-1]
        mirrored = torch.ones(wf, dtype=dspec.real.dtype, device=dspec.device)
        mirrored[1:width - wf + 1] = 2.0  # the columns irfft2 also reads as their mirror images
        dw = torch.view_as_real((spec.conj() * dspec).sum(0) * (mirrored * scale))
    if dxspec is not None:
        w = torch.view_as_complex(weight.to(dspec.real.dtype).contiguous())
        torch.mul(dspec, w.conj() * scale, out=dxspec)
    return dw


def _ff_multiply_triton(spec, weight, out, height, width):
    _backend.kernels("ff_parser").ff_parser_fwd(spec, weight.contiguous(), out, height, width)


def _ff_grad_triton(dspec, spec, weight, dxout, height, width):
    return _backend.kernels("ff_parser").ff_parser_bwd(dspec, spec, weight.contiguous(), dxout, height, width)


def _ff_run(args: FFArgs, multiply, grad_stage, packed: bool):
    """Forward: (y, spectrum or None). Backward (args.backward, args.x = dy): (dx or None, ∂weight or None).

    torch.fft runs unnormalised (rfft2 norm='backward', the inverse norm='forward'): the two ortho factors
    are one 1/(H·W) inside the fused stage, saving torch's two scaling passes. With `packed` (the Triton
    stage) and an even W, the stage writes the packed spectrum and the inverse is a c2c FFT over (H, W/2)
    (`pydpm.kernels.ff_parser.packed_inverse`), saving the copy torch makes before every c2r transform;
    the forward spectrum then survives the stage, so keeping it for ∂W costs nothing."""
    x = args.x
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:  # torch.fft refuses empty batches
        return _ff_empty(args)
    spec = torch.fft.rfft2(x.to(acc).contiguous(), norm="backward").contiguous()
    packed = packed and W % 2 == 0
    if packed:
        inverse = _backend.kernels("ff_parser").packed_inverse
    else:
        def inverse(y_spec):
            return torch.fft.irfft2(y_spec, s=(H, W), norm="forward")
    if not args.backward:
        if packed:
            stage_out = torch.empty((B, C, H, W), dtype=acc, device=x.device)
        else:
            stage_out = torch.empty_like(spec) if args.keep_spectrum else spec
        multiply(spec, args.weight, stage_out, H, W)
        y = inverse(stage_out)
        if args.out is not None:
            return args.out.copy_(y), None
        return y.to(x.dtype), spec if args.keep_spectrum else None
    stage_out = None
    if args.need_dx:
        stage_out = torch.empty((B, C, H, W), dtype=acc, device=x.device) if packed else spec
    dw = grad_stage(spec, args.spectrum, args.weight, stage_out, H, W)
    dx = inverse(stage_out).to(x.dtype) if args.need_dx else None
    return dx, dw


def _ff_empty(args: FFArgs):
    """The results of a call with no elements (an empty batch): empty outputs and a zero weight gradient."""
    x = args.x
    B, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not args.backward:
        spec = x.new_empty((B, C, H, W // 2 + 1), dtype=_complex(x.dtype)) if args.keep_spectrum else None
        return (y if args.out is None else args.out), spec
    dw = None
    if args.spectrum is not None:
        dw = torch.zeros(args.weight.shape, dtype=acc_dtype(x.dtype), device=x.device)
    return (y if args.need_dx else None), dw


def _ff_run_triton(args: FFArgs):
    return _ff_run(args, _ff_multiply_triton, _ff_grad_triton, packed=True)


def _ff_run_reference(args: FFArgs):
    return _ff_run(args, _ff_multiply_reference, _ff_grad_reference, packed=False)


BACKENDS = (Backend("triton", _ff_run_triton, lambda args: triton_reasons(args.x.device)),
            Backend("reference", _ff_run_reference, lambda args: []))


def _dispatch_key(args) -> tuple:
    return args.x.is_cuda, args.x.is_cpu, args.x.dtype


# --------------------------------------------------------------------------------------------------
# Registration: the differentiable op and the public op
# --------------------------------------------------------------------------------------------------
# The forward returns the spectrum its backward needs for ∂W (an empty tensor when W needs no gradient),
# marked non-differentiable and never materialised as a zero gradient.

def _forward(x: torch.Tensor, weight: torch.Tensor, keep_spectrum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_ff_parser(x, weight)
    args.keep_spectrum = keep_spectrum
    y, spec = OP(args)
    return y, spec if spec is not None else no_output(x, _complex(x.dtype))


def _forward_fake(x, weight, keep_spectrum):
    B, C, H, W = x.shape
    cdtype = _complex(x.dtype)
    spec = x.new_empty((B, C, H, W // 2 + 1), dtype=cdtype) if keep_spectrum else no_output(x, cdtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), spec


def _backward(dy: torch.Tensor, spectrum: torch.Tensor, weight: torch.Tensor, need_dx: bool,
              need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = OP(FFArgs(dy, weight, backward=True, spectrum=spectrum if need_dw else None, need_dx=need_dx))
    return ((dx if need_dx else no_output(dy, dy.dtype)),
            (dw.to(weight.dtype) if need_dw else no_output(dy, weight.dtype)))


def _backward_fake(dy, spectrum, weight, need_dx, need_dw):
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else no_output(dy, dy.dtype)
    dw = weight.new_empty(weight.shape) if need_dw else no_output(dy, weight.dtype)
    return dx, dw


def _save(ctx, inputs, output) -> None:
    x, weight, keep = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, output[1])
    ctx.keep = keep


def _grads(ctx, backward, dy, _spectrum):
    weight, spec = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.keep
    if dy is None or not (need_dx or need_dw):
        return None, None, None
    dx, dw = backward(dy, spec, weight, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


GRAD = Differentiable("ff_parser", forward=_forward, forward_fake=_forward_fake, backward=_backward,
                      backward_fake=_backward_fake, save=_save, grads=_grads)


def _inputs(x, weight):
    """The custom op's inputs: the real view of the weight, and whether its gradient needs the spectrum."""
    w = real_weight(weight)
    return x, w, bool(torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad)


def ff_parser(x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """FF-Parser (MedSegDiff): y = irfft2(rfft2(x, norm='ortho') · W, s=(H, W), norm='ortho').

    Args:
        x: [B, C, H, W], float32/float16/bfloat16/float64 (FFTs run in float32, float64 for float64).
        weight: the learnable per-channel complex map W: a real tensor [C, H, W//2+1, 2] holding real and
            imaginary parts (torch.view_as_complex's layout; `pydpm.nn.FFParser` stores it so), or a
            complex tensor [C, H, W//2+1]. Any floating dtype; read in float32.
        out: optional [B, C, H, W] tensor of x's dtype to write (not differentiable). out=x (the same tensor)
            filters x in place (the result is complete before it is written); any other out sharing memory with
            x or weight, or within itself (an expand()ed view), raises.

    cuFFT (torch.fft) does both FFTs, unnormalised; the complex multiply and both ortho scales are one
    fused pass between them, which for even W also packs the spectrum so that the inverse is a c2c FFT
    (no input copy, unlike torch's c2r). Backward: rfft2(dy), one fused pass giving the input-side spectrum
    and ∂W = Σ_b conj(X)·dY (m = 2 on mirrored columns), the inverse; the forward's spectrum is kept for ∂W
    when W requires grad. Channels-last x is copied to NCHW first; the output is contiguous (NCHW).
    Unfused equivalent: `ff_parser_reference`.
    """
    return _ENTRY(x, weight, out=out)


# --------------------------------------------------------------------------------------------------
# Sample inputs and the registry entry
# --------------------------------------------------------------------------------------------------

def sample_inputs(device="cpu", dtype=torch.float32, *, small=False, seed=0):
    """FF-Parser calls: C = 1, 3, 7; H ≠ W; odd and even W; 1×1 and 2×2 maps; batch 1; layouts; weight forms."""
    device, gen = torch.device(device), torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 2, 2), (3, 1, 4, 6), (2, 3, 8, 8)]
    if not small:
        shapes += [(2, 4, 32, 32), (1, 8, 33, 31)]

    def weight(C, H, W, wdtype=dtype):
        return sample_tensor((C, H, W // 2 + 1, 2), device, wdtype, gen)

    for shape in shapes:
        yield "x".join(map(str, shape)), dict(x=sample_tensor(shape, device, dtype, gen), weight=weight(*shape[1:]))
    B, C, H, W = 2, 3, 6, 10
    cl = torch.channels_last
    yield "non-contiguous", dict(x=sample_tensor((B, C, W, H), device, dtype, gen).transpose(2, 3),
                                 weight=weight(C, H, W))
    yield "channels-last", dict(x=sample_tensor((B, C, H, W), device, dtype, gen).contiguous(memory_format=cl),
                                weight=weight(C, H, W))
    yield "complex-weight", dict(x=sample_tensor((B, C, H, W), device, dtype, gen),
                                 weight=torch.view_as_complex(weight(C, H, W, torch.float64)).to(
                                     _complex(dtype if dtype == torch.float64 else torch.float32)))
    yield "fp32-weight", dict(x=sample_tensor((B, C, H, W), device, dtype, gen), weight=weight(C, H, W, torch.float32))


def bad_inputs(device):
    """The bad-input axis (BadInput: what must be refused, what has a defined result)."""
    device = torch.device(device)
    r = sample_maker(device)

    B, C, H, W = 2, 3, 4, 6
    shape, wshape = (B, C, H, W), (C, H, W // 2 + 1, 2)

    def base():
        return dict(x=r(*shape), weight=r(*wshape))
    yield from tensor_mutations(base, ("x", "weight"), ranks={"x": 4, "weight": 4}, anchor="x")
    yield BadInput("weight-shape", dict(x=r(*shape), weight=r(C, H, W, 2)), ValueError, "weight")
    yield BadInput("weight-channels", dict(x=r(*shape), weight=r(C + 1, H, W // 2 + 1, 2)), ValueError, "weight")
    yield BadInput("complex-weight-shape", dict(x=r(*shape), weight=torch.complex(r(C, H, W), r(C, H, W))),
                   ValueError, "weight")
    yield BadInput("complex-weight-meta", dict(x=r(*shape), weight=torch.complex(r(C, H, W // 2 + 1),
                                                                                 r(C, H, W // 2 + 1)).to("meta")),
                   ValueError, "weight")
    yield BadInput("empty-batch", dict(x=r(0, C, H, W), weight=r(*wshape)), None)
    yield BadInput("out-list", dict(x=r(*shape), weight=r(*wshape), out=[0.0]), TypeError, "out")
    yield BadInput("out-shape", dict(x=r(*shape), weight=r(*wshape), out=r(B, C, H, W + 1)), ValueError, "out")
    yield BadInput("out-dtype", dict(x=r(*shape), weight=r(*wshape), out=r(*shape).half()), ValueError, "out")
    yield BadInput("out-expanded", dict(x=r(*shape), weight=r(*wshape), out=r(1, C, H, W).expand(shape)), ValueError,
                   "out")
    buf = r(B * C * H * W + 1)
    yield BadInput("out-overlaps-x", dict(x=buf[:-1].view(shape), weight=r(*wshape), out=buf[1:].view(shape)),
                   ValueError, "out")
    nw = C * H * (W // 2 + 1) * 2
    wbuf = r(nw - 1 + B * C * H * W)
    yield BadInput("out-overlaps-weight", dict(x=r(*shape), weight=wbuf[:nw].view(wshape),
                                               out=wbuf[nw - 1:].view(shape)), ValueError, "out")
    x = r(*shape)
    yield BadInput("out-is-x", dict(x=x, weight=r(*wshape), out=x), None)  # allowed: filters x in place
    x = r(B, C, H, H)
    yield BadInput("out-is-x-transposed", dict(x=x, weight=r(C, H, H // 2 + 1, 2), out=x.transpose(2, 3)), ValueError,
                   "out")


def _library_args(x, weight):
    x, w = (t.detach().clone().requires_grad_() for t in (x, real_weight(weight).detach()))
    return x, w, True


OP = register(Op(
    name="ff_parser", fn=ff_parser, backends=BACKENDS, reference=ff_parser_reference, check=check_ff_parser,
    tolerances=ELEMENTWISE_TOLERANCES, sample_inputs=sample_inputs, dispatch_key=_dispatch_key,
    # torch.fft has no bfloat16 (and only power-of-two float16) transforms: the eager composition, as in
    # MedSegDiff, casts to float32, which is the reference.
    eager=lambda **kw: ff_parser_reference(**kw),
    library_op=GRAD.overload, library_args=_library_args,
    make_out=lambda kw: torch.full(kw["x"].shape, float("nan"), dtype=kw["x"].dtype, device=kw["x"].device),
    bad_inputs=bad_inputs,
))
_ENTRY = Entry(OP, grad=GRAD, inputs=_inputs, visible=lambda result: result[0])
