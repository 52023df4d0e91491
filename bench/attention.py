"""Benchmark cases of `pydpm.ops.attention`: forward and forward+backward on diffusion shapes,
every SDPA backend side by side in the same run.

Shapes (B, H, N, D): (2,8,4096,40), (2,8,4096,64), (2,10,1024,64), (32,16,256,72), (1,24,4608,128),
(64,4,256,32), and a cross-attention (2,8,4096,64) × 77 keys; fp16, bf16, fp32. `--quick`: the first
two and the cross-attention. On the CPU: one small shape, fp32.

Implementations: pydpm[auto] (the op as users call it: dispatch picks pydpm's kernel or torch's cuDNN
attention from the measured table `pydpm.ops.attention.DISPATCH_TABLE`), pydpm[triton] (our kernel alone) and
pydpm[reference] (forced), and torch's scaled_dot_product_attention as users call it (`sdpa[default]`) and
under each backend (`torch.nn.attention.sdpa_kernel`, entered once around the timing: FLASH_ATTENTION,
CUDNN_ATTENTION, EFFICIENT_ATTENTION, MATH). cuDNN and efficient attention run on CUDA only (listed once as
such among the missing peers on the CPU); a backend that refuses a case (flash and cuDNN take no fp32, some
head dims are refused) is listed there with the cases it failed on, and torch's warning saying why among the
warnings. Flops: 4·B·H·NQ·NK·D forward (two matmuls), 3.5× that for forward+backward (FlashAttention's
convention: the backward's five matmuls count 2.5× the forward). Every output (forward+backward: o and dq, dk,
dv) is checked against float64 SDPA on the same inputs.

Targets: pydpm[auto] ≥ 0.98× the best SDPA backend on every case as a model sees it (eager wall time per
call); pydpm[triton] alone against cuDNN and flash (device time), fp32 forward+backward ≥ 2× SDPA's best.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from pydpm.ops import attention
from pydpm.ops.attention import OP, check_args

from . import harness
from .harness import Case, Impl, Inputs, Outputs, Row, backend_impls, dtype_str, shape_str

SHAPES = [((2, 8, 4096, 40), 4096), ((2, 8, 4096, 64), 4096), ((2, 10, 1024, 64), 1024), ((32, 16, 256, 72), 256),
          ((1, 24, 4608, 128), 4608), ((64, 4, 256, 32), 256), ((2, 8, 4096, 64), 77)]
CPU_SHAPE = ((1, 2, 256, 64), 256)
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
CUDA_ONLY = ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]


def shapes(device: torch.device, quick: bool):
    if device.type != "cuda":
        return [CPU_SHAPE]
    return [SHAPES[0], SHAPES[1], SHAPES[-1]] if quick else SHAPES


def _sdpa_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(getattr(SDPBackend, name))
    return context


def _grads(fn, backward: bool):
    """The timed callable: fn(q, k, v) only, or with the backward of a fixed cotangent (outputs o, dq, dk, dv)."""
    def call(t: Inputs):
        if not backward:
            with torch.no_grad():
                return fn(t["q"], t["k"], t["v"])
        q, k, v = (t[n].detach().requires_grad_() for n in ("q", "k", "v"))
        o = fn(q, k, v)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), t["do"])
        return Outputs(o, dq, dk, dv)
    return call


def attention_case(shape, nk: int, dtype, device, backward: bool) -> Case:
    B, H, NQ, D = shape

    def inputs() -> Inputs:
        t = {"q": torch.randn(B, H, NQ, D, dtype=dtype, device=device),
             "k": torch.randn(B, H, nk, D, dtype=dtype, device=device),
             "v": torch.randn(B, H, nk, D, dtype=dtype, device=device)}
        if backward:
            t["do"] = torch.randn(B, H, NQ, D, dtype=dtype, device=device)
        return t

    def oracle(t: Inputs):
        q, k, v = (t[n].double().requires_grad_(backward) for n in ("q", "k", "v"))
        with torch.enable_grad():
            o = F.scaled_dot_product_attention(q, k, v)
            if not backward:
                return o.detach()
            dq, dk, dv = torch.autograd.grad(o, (q, k, v), t["do"].double())
        return Outputs(o.detach(), dq, dk, dv).double()

    def ours(t: Inputs):
        return _grads(lambda q, k, v: attention(q, k, v), backward)(t)

    impls = backend_impls(OP, lambda t: check_args(t["q"], t["k"], t["v"]), ours, auto=True)
    impls.append(Impl("sdpa[default]", make=lambda: _grads(F.scaled_dot_product_attention, backward)))
    for name in SDPA_BACKENDS:
        impls.append(Impl(f"sdpa[{name.split('_')[0].lower()}]",
                          make=lambda: _grads(F.scaled_dot_product_attention, backward),
                          context=_sdpa_context(name), needs_cuda=name in CUDA_ONLY))
    flops = 4 * B * H * NQ * nk * D * (3.5 if backward else 1)
    tag = f"x{nk}" if nk != NQ else ""
    # fp32 on the GPU multiplies in TF32, fp16's 10-bit mantissa: the check takes fp16's tolerance
    tf32 = dtype == torch.float32 and device.type == "cuda"
    return Case("attention", ("attn+bwd" if backward else "attn") + tag, shape, dtype, device, inputs, oracle, impls,
                flops=int(flops), tolerance=harness.CHECK_TOLERANCE[torch.float16] if tf32 else None)


def cases(device: torch.device, quick: bool) -> list[Case]:
    return [attention_case(shape, nk, dtype, device, backward) for dtype in dtypes(device)
            for shape, nk in shapes(device, quick) for backward in (False, True)]


def _best(rows: list[Row], prefix: str, field: str) -> Row | None:
    ok = [r for r in rows if r.impl.startswith(prefix) and getattr(r, field) and not r.note]
    return min(ok, key=lambda r: getattr(r, field)) if ok else None


def _row(rows: list[Row], impl: str) -> Row | None:
    return next((r for r in rows if r.impl == impl and r.median_ms and not r.note), None)


def auto_choice(case: Case) -> str:
    """The backend pydpm[auto] runs for a case: the op's dispatch on an input set of the case (the dispatch
    table's entry on CUDA, where that backend can run it)."""
    t = case.inputs()
    with torch.enable_grad():
        q, k, v = (t[n].requires_grad_("bwd" in case.name) for n in ("q", "k", "v"))
        return OP.select(check_args(q, k, v)).name


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per case: pydpm[auto] (what users call) against the best SDPA backend as a model sees it (eager wall time
    per call), and pydpm[triton] alone against cuDNN and flash on device time."""
    lines, worst = [], None
    for case, rows in results:
        auto, best = _row(rows, "pydpm[auto]"), _best(rows, "sdpa[", "loop_us")
        if auto is None or best is None or not auto.loop_us:
            continue
        ratio = best.loop_us / auto.loop_us
        worst = ratio if worst is None else min(worst, ratio)
        line = (f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)}: pydpm[auto → {auto_choice(case)}] "
                f"{auto.loop_us:.1f} us per call vs best SDPA ({best.impl}) {best.loop_us:.1f} us: {ratio:.2f}x")
        ours, cudnn, flash = _row(rows, "pydpm[triton]"), _row(rows, "sdpa[cudnn]"), _row(rows, "sdpa[flash]")
        if ours is not None:
            line += f"; pydpm[triton] alone {ours.throughput:.0f} TFLOP/s on device"
            for name, peer in (("cuDNN", cudnn), ("flash", flash)):
                if peer is not None:
                    line += f", {ours.throughput / peer.throughput:.2f}x {name}"
        lines.append(line)
    if worst is not None:
        lines.append(f"pydpm[auto] >= 0.98x the best SDPA backend on every case, eager: worst {worst:.2f}x "
                     f"({'met' if worst >= 0.98 else 'NOT met'})")
    return lines or ["attention targets: not measured in this run (the fast backends need CUDA)"]
