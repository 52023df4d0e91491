"""Benchmark cases of the frequency / NAF-block family: FF-Parser, SimpleGate + simplified channel
attention, and the NAF block, forward and forward+backward, on every pydpm backend against eager and
torch.compile compositions written from the papers' definitions.

Cases (shape = (B, C, H, W); N = B·C·H·W elements of the dtype; bytes are the floor of one fused call: every
input read once, every output written once):

  ff            y = irfft2(rfft2(x)·W) (ortho)              bytes: read x, write y, read W: 2N + |W|
  ff+bwd        (y, dx, dW) given dy                        bytes: 4N + 3|W|
  sg+sca        y = SCA(SimpleGate(x)), x [B, 2C, H, W]     bytes: read x 2N, write y N: 3N
  sg+sca+bwd    (y, dx) given dy (and dW, db, not checked)  bytes: 3N + read dy N, write dx 2N: 6N
  naf           the NAF block (NAFNet / EDiffSR's EANet) on x [B, C, H, W] with dw_expand = ffn_expand = 2
                                                            bytes: read x, write y: 2N (a floor no real
                                                            block reaches: its convolutions dominate)
  naf+bwd       (y, dx) given dy (parameter gradients computed, not checked): 4N

Shapes (16,256,64,64), (8,640,64,64), (2,320,128,128), (64,64,32,32); fp32 and bf16. CUDA `--quick`: the
first and the last shape. CPU: (2,16,32,32) fp32 only.

Implementations:
  pydpm[triton], pydpm[reference]   the public op forced onto each backend (FF-Parser; for sg+sca
                   `simple_gate_sca` then g·s). Forward-only rows run under torch.no_grad() (every row does),
                   forward+backward rows through autograd; the backward re-enters the forward's forced backend.
  pydpm sca(simple_gate)  sg+sca as the two unfused-with-each-other pydpm ops (automatic backend).
  pydpm NAFBlock          `pydpm.nn.NAFBlock` (SCA's scale, β and the residual folded into conv3's GEMM, γ and
                   the residual into conv5's); `(no fold)`: the same ops with eager convolutions and residuals.
  torch.compile(pydpm NAFBlock)  the module under torch.compile: Inductor fuses the LayerNorms and the rest
                   around pydpm's custom ops (CUDA only: on the CPU its compile time dwarfs the run).
  eager            the definition in PyTorch, as the papers' code writes it: MedSegDiff's FFParser (x cast to
                   float32 first: torch.fft has no bfloat16), NAFNet's SimpleGate / SCA / block
                   (`pydpm.nn.naf_block_reference`, the same parameters).
  torch.compile(eager)  the same function under torch.compile (default mode); in forward+backward rows the
                   forward is compiled (AOTAutograd compiles its backward) and autograd.grad runs outside.

Checks: every row against a float64 oracle (the same definitions in float64 on the device): forward rows
compare y; forward+backward rows compare y, dx and (FF-Parser) dW / √B, flattened together.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pydpm.nn import NAFBlock, naf_block_reference
from pydpm.ops import ff_parser, simple_gate, simple_gate_sca, simplified_channel_attention
from pydpm.ops.ff_parser import OP as FF_OP, check_ff_parser
from pydpm.ops.naf import GATE_SCA_OP, check_simple_gate_sca

from .harness import Case, Impl, Inputs, Outputs, Row, backend_impls, dtype_str, shape_str
from .wavelet import dtypes, shapes  # the wavelet cases' shape grid, shared

FF_TARGET = 1.5  # FF-Parser's target: >= 1.5x eager
EAGER, COMPILED = "eager", "torch.compile(eager)"


# --------------------------------------------------------------------------------------------------
# Timed calls and the float64 oracle
# --------------------------------------------------------------------------------------------------

def timed(forward: Callable[[Inputs], torch.Tensor], wrt: Sequence[str], checked: int, scales: Sequence[float],
          params: Callable[[], Sequence[torch.Tensor]] = lambda: ()) -> Callable[[Inputs], object]:
    """The timed callable: forward only under no_grad when `wrt` is empty; else the forward, then
    autograd.grad of y with inputs["dy"] wrt the named inputs and `params()`, checking y and the first
    `checked` gradients (times `scales`)."""
    if not wrt:
        def call(t: Inputs):
            with torch.no_grad():
                return forward(t)
        return call

    def call_grad(t: Inputs):
        y = forward(t)
        grads = torch.autograd.grad(y, [t[k] for k in wrt] + list(params()), t["dy"])
        return Outputs(y, *grads[:checked], scales=scales)
    return call_grad


def oracle_of(forward64: Callable[[Inputs], torch.Tensor], wrt: Sequence[str], checked: int,
              scales: Sequence[float]) -> Callable[[Inputs], torch.Tensor]:
    """`forward64` on the inputs in float64 (with `wrt`: float64 autograd), in `Outputs.double()`'s layout."""
    def oracle(t: Inputs) -> torch.Tensor:
        t64 = {k: v.detach().double().requires_grad_(k in wrt) for k, v in t.items()}
        with torch.enable_grad():
            y = timed(forward64, wrt, checked, scales)(t64)
        return y.double() if isinstance(y, Outputs) else y.double()
    return oracle


def _compiled(forward: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
    return torch.compile(forward)


def _randn(shape, device, dtype, scale=1.0, grad=False):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


# --------------------------------------------------------------------------------------------------
# FF-Parser
# --------------------------------------------------------------------------------------------------

def eager_ff_parser(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MedSegDiff's FFParser.forward (float16/bfloat16 x cast to float32 for torch.fft, the result cast back)."""
    H, W = x.shape[-2:]
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.rfft2(x.to(real), dim=(2, 3), norm="ortho")
    spectrum = spectrum * torch.view_as_complex(weight.to(real).contiguous())
    return torch.fft.irfft2(spectrum, s=(H, W), dim=(2, 3), norm="ortho").to(x.dtype)


def ff_case(shape, dtype, device, backward: bool) -> Case:
    B, C, H, W = shape
    wrt = ("x", "w") if backward else ()
    scales = (1.0, 1.0, 1.0 / math.sqrt(B))

    def inputs() -> Inputs:
        t = {"x": _randn(shape, device, dtype, grad=backward),
             "w": _randn((C, H, W // 2 + 1, 2), device, torch.float32, grad=backward)}  # an fp32 parameter
        if backward:
            t["dy"] = _randn(shape, device, dtype)
        return t

    def ours(t):
        return ff_parser(t["x"], t["w"])

    def eager(t):
        return eager_ff_parser(t["x"], t["w"])

    def make(fn):
        return timed(fn, wrt, 2, scales)

    impls = backend_impls(FF_OP, lambda t: check_ff_parser(t["x"], t["w"]), make(ours)) + [
        Impl(EAGER, lambda: make(eager)),
        Impl(COMPILED, lambda: make(_compiled(eager))),
    ]
    n, wbytes = math.prod(shape) * dtype.itemsize, C * H * (W // 2 + 1) * 2 * 4
    nbytes = 4 * n + 3 * wbytes if backward else 2 * n + wbytes
    return Case("frequency", "ff+bwd" if backward else "ff", shape, dtype, device, inputs,
                oracle_of(eager, wrt, 2, scales), impls, nbytes=nbytes)


# --------------------------------------------------------------------------------------------------
# SimpleGate + SCA
# --------------------------------------------------------------------------------------------------

def eager_sg_sca(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """NAFNet: x = SimpleGate(x); x = x * sca(x), sca = (AdaptiveAvgPool2d(1), Conv2d(C, C, 1))."""
    x1, x2 = x.chunk(2, dim=1)
    g = x1 * x2
    return g * F.conv2d(F.adaptive_avg_pool2d(g, 1), weight, bias)


def sg_sca_case(shape, dtype, device, backward: bool) -> Case:
    B, C, H, W = shape
    wrt = ("x", "w", "b") if backward else ()
    scales = (1.0, 1.0)

    def inputs() -> Inputs:
        t = {"x": _randn((B, 2 * C, H, W), device, dtype, grad=backward),
             "w": _randn((C, C, 1, 1), device, dtype, 1 / math.sqrt(C), grad=backward),
             "b": _randn((C,), device, dtype, grad=backward)}
        if backward:
            t["dy"] = _randn(shape, device, dtype)
        return t

    def fused(t):
        g, s = simple_gate_sca(t["x"], t["w"], t["b"])
        return g * s[:, :, None, None]

    def two_ops(t):
        return simplified_channel_attention(simple_gate(t["x"]), t["w"], t["b"])

    def eager(t):
        return eager_sg_sca(t["x"], t["w"], t["b"])

    def make(fn):
        return timed(fn, wrt, 1, scales)

    impls = backend_impls(GATE_SCA_OP, lambda t: check_simple_gate_sca(t["x"], t["w"], t["b"]), make(fused)) + [
        Impl("pydpm sca(simple_gate)", lambda: make(two_ops), ours=True),
        Impl(EAGER, lambda: make(eager)),
        Impl(COMPILED, lambda: make(_compiled(eager))),
    ]
    n = math.prod(shape) * dtype.itemsize
    return Case("frequency", "sg+sca+bwd" if backward else "sg+sca", shape, dtype, device, inputs,
                oracle_of(eager, wrt, 1, scales), impls, nbytes=6 * n if backward else 3 * n)


# --------------------------------------------------------------------------------------------------
# NAF block
# --------------------------------------------------------------------------------------------------

def naf_block(c: int, device, dtype, fold: bool = True) -> NAFBlock:
    """A NAF block with every parameter drawn (β, γ and the LayerNorms too: at their zero / unit init the
    block is the identity), seeded so every case of one width gets the same block."""
    torch.manual_seed(c)
    block = NAFBlock(c, fold=fold)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name in ("beta", "gamma") or name.startswith("norm"):
                p.normal_(0.0, 0.5 if name in ("beta", "gamma") else 1.0)
    return block.to(device=device, dtype=dtype)


def naf_case(shape, dtype, device, backward: bool) -> Case:
    B, C, H, W = shape
    wrt = ("x",) if backward else ()
    scales = (1.0, 1.0)
    block = naf_block(C, device, dtype)
    unfolded = copy.deepcopy(block)
    unfolded.fold = False
    block64 = copy.deepcopy(block).double()

    def inputs() -> Inputs:
        t = {"x": _randn(shape, device, dtype, grad=backward)}
        if backward:
            t["dy"] = _randn(shape, device, dtype)
        return t

    def make(module, fn, compiled=False):
        forward = (lambda t: fn(module, t["x"]))
        return timed(_compiled(forward) if compiled else forward, wrt, 1, scales, module.parameters)

    def call(module, x):
        return module(x)

    def no_cpu_compile(t: Inputs) -> list[str]:
        return [] if t["x"].is_cuda else ["torch.compile of the whole block: on the CPU compiling dwarfs the run"]

    impls = [
        Impl("pydpm NAFBlock", lambda: make(block, call), ours=True),
        Impl("pydpm NAFBlock (no fold)", lambda: make(unfolded, call), ours=True),
        Impl("torch.compile(pydpm NAFBlock)", lambda: make(block, call, compiled=True), ours=True,
             reasons=no_cpu_compile),
        Impl(EAGER, lambda: make(block, naf_block_reference)),
        Impl(COMPILED, lambda: make(block, naf_block_reference, compiled=True)),
    ]
    n = math.prod(shape) * dtype.itemsize
    # The block's 1×1 and depthwise convolutions go through cuDNN, which by torch's default
    # (torch.backends.cudnn.allow_tf32) computes fp32 convolutions in TF32: every implementation, peers
    # included, lands ~3e-4 from the float64 oracle, above the fp32 default of 1e-4.
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return Case("frequency", "naf+bwd" if backward else "naf", shape, dtype, device, inputs,
                oracle_of(lambda t: naf_block_reference(block64, t["x"]), wrt, 1, scales), impls,
                nbytes=4 * n if backward else 2 * n, tolerance=1e-3 if tf32 else None)


def cases(device: torch.device, quick: bool) -> list[Case]:
    found = []
    for make in (ff_case, sg_sca_case, naf_case):
        for dtype in dtypes(device):
            for shape in shapes(device, quick):
                found += [make(shape, dtype, device, backward=False), make(shape, dtype, device, backward=True)]
    return found


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The FF-Parser target (>= 1.5x eager, per direction and dtype: the worst shape), and the other
    cases' speed-ups over eager and torch.compile for the record."""
    lines = []

    def ratios(case_name: str, dtype: torch.dtype, impl: str, peer: str) -> list[tuple[float, str]]:
        found = []
        for case, rows in results:
            if case.name != case_name or case.dtype != dtype:
                continue
            mine = next((r.median_ms for r in rows if r.impl == impl and r.median_ms), None)
            theirs = next((r.median_ms for r in rows if r.impl == peer and r.median_ms), None)
            if mine and theirs:
                found.append((theirs / mine, shape_str(case.shape)))
        return found

    dtypes_seen = sorted({case.dtype for case, _ in results}, key=dtype_str)
    for name in ("ff", "ff+bwd"):
        for dtype in dtypes_seen:
            found = ratios(name, dtype, "pydpm[triton]", EAGER)
            if not found:
                lines.append(f"FF-Parser {name} {dtype_str(dtype)} >= {FF_TARGET}x eager: not measured in this run "
                             f"(pydpm[triton] needs CUDA)")
                continue
            worst = min(found)
            detail = ", ".join(f"{s} {r:.2f}x" for r, s in found)
            lines.append(f"FF-Parser {name} {dtype_str(dtype)} >= {FF_TARGET}x eager: worst {worst[0]:.2f}x at "
                         f"{worst[1]} ({'met' if worst[0] >= FF_TARGET else 'NOT met'}; {detail})")
    for name, impl in (("sg+sca", "pydpm[triton]"), ("sg+sca+bwd", "pydpm[triton]"),
                       ("naf", "pydpm NAFBlock"), ("naf+bwd", "pydpm NAFBlock")):
        for dtype in dtypes_seen:
            for peer in (EAGER, COMPILED):
                found = ratios(name, dtype, impl, peer)
                if found:
                    detail = ", ".join(f"{s} {r:.2f}x" for r, s in found)
                    lines.append(f"{name} {dtype_str(dtype)} {impl} vs {peer} (recorded, no target): {detail}")
    return lines
