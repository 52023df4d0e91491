"""Benchmark cases of the normalisation blocks at the shapes of Stable Diffusion 1.5's ResNet blocks and of
DiT-XL/2 / PixArt-α's AdaLN, forward and forward+backward, on every pydpm backend against the eager
composition diffusers runs and torch.compile of it.

Cases (N = the elements of x; bytes are the floor of one fused call: every input read once, every output
written once; the [C] and [B, C] operands are negligible):

  gn+silu          y = silu(GroupNorm(x))                         (ResnetBlock2D: norm1, nonlinearity)
  gn+ss+silu       y = silu(GroupNorm(x)·(1 + scale) + shift)     (norm2 with time_embedding_norm="scale_shift")
  gn+silu+bwd      y, dx (and dweight, dbias) given dy            bytes: 2N forward, 3N backward
  ln-modulate      y = LayerNorm(x)·(1 + scale) + shift           (DiT / PixArt AdaLN; scale, shift chunks of a
                                                                   [B, 6, C] table)
  ln-modulate+bwd  y, dx, dscale, dshift given dy

Shapes: SD 1.5 at batch 2 (classifier-free guidance) on 64×64 latents, 32 groups: (2,320,64,64),
(2,640,32,32), (2,1280,16,16) fp16, one channels-last, and the bf16 training backward at (2,320,64,64);
DiT-XL/2-256 at batch 8: (8,256,1152) bf16; PixArt-α-1024 at batch 2: (2,4096,1152) fp16. CUDA `--quick`: the
first GroupNorm shape, the modulated one, the DiT shape and the two backwards. CPU: small fp32 shapes.

Implementations:
  pydpm[triton], pydpm[reference]   the pydpm op forced onto each backend (forward rows under no_grad;
                   +bwd rows through autograd).
  eager            diffusers' composition: torch.group_norm (F.group_norm's kernel), the modulation, F.silu;
                   F.layer_norm, then `· (1 + scale) + shift`.
  torch.compile(eager)  the same function under torch.compile (default mode).

Checks: every row against the float64 oracle (the eager composition in float64).
"""
from __future__ import annotations

import math

import torch

from pydpm.ops import group_norm, layer_norm_modulate
from pydpm.ops.norm import (GROUP_NORM_OP, LAYER_NORM_OP, check_group_norm, check_layer_norm_modulate,
                            group_norm_eager, layer_norm_modulate_eager)

from .frequency import COMPILED, EAGER, _randn, oracle_of, timed
from .harness import Case, Impl, Inputs, Row, backend_impls, op_targets

GROUPS = 32
SD15_SHAPES = ((2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16))
DIT_SHAPE, PIXART_SHAPE = (8, 256, 1152), (2, 4096, 1152)

OURS = "pydpm[triton]"
BANDWIDTH_TARGET = 0.70   # of the measured copy bandwidth
SPEEDUP_TARGET = 3.0      # device time against eager


def gn_case(shape, dtype, device, *, scale_shift: bool, backward: bool, channels_last: bool = False) -> Case:
    B, C = shape[:2]
    wrt = ("x",) if backward else ()
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def inputs() -> Inputs:
        t = {"x": _randn(shape, device, dtype).contiguous(memory_format=fmt).requires_grad_(backward),
             "weight": _randn((C,), device, dtype), "bias": _randn((C,), device, dtype)}
        if scale_shift:
            t["temb"] = _randn((B, 2 * C, 1, 1), device, dtype)
        if backward:
            t["dy"] = _randn(shape, device, dtype)
        return t

    def pair(t):
        return t["temb"].chunk(2, dim=1) if scale_shift else None

    def ours(t):
        return group_norm(t["x"], GROUPS, t["weight"], t["bias"], 1e-5, "silu", pair(t))

    def eager(t):
        return group_norm_eager(t["x"], GROUPS, t["weight"], t["bias"], 1e-5, "silu", pair(t))

    def check(t):
        return check_group_norm(t["x"], GROUPS, t["weight"], t["bias"], 1e-5, "silu", pair(t))

    name = "gn" + ("+ss" if scale_shift else "") + "+silu" + ("+bwd" if backward else "") + \
        ("[channels-last]" if channels_last else "")
    impls = backend_impls(GROUP_NORM_OP, check, timed(ours, wrt, 1, (1.0,))) + [
        Impl(EAGER, lambda: timed(eager, wrt, 1, (1.0,))),
        Impl(COMPILED, lambda: timed(torch.compile(eager), wrt, 1, (1.0,)))]
    n = math.prod(shape) * dtype.itemsize
    return Case("norm", name, shape, dtype, device, inputs, oracle_of(eager, wrt, 1, (1.0,)), impls,
                nbytes=5 * n if backward else 2 * n)


def ln_case(shape, dtype, device, *, backward: bool) -> Case:
    B, N, C = shape
    wrt = ("x", "table") if backward else ()
    scales = (1.0, 1.0)

    def inputs() -> Inputs:
        t = {"x": _randn(shape, device, dtype, grad=backward),
             "table": _randn((B, 6, C), device, dtype, grad=backward)}
        if backward:
            t["dy"] = _randn(shape, device, dtype)
        return t

    def ours(t):
        shift, scale = t["table"][:, 0:1], t["table"][:, 1:2]
        return layer_norm_modulate(t["x"], None, None, shift, scale, 1e-6)

    def eager(t):
        shift, scale = t["table"][:, 0:1], t["table"][:, 1:2]
        return layer_norm_modulate_eager(t["x"], None, None, shift, scale, 1e-6)

    def check(t):
        return check_layer_norm_modulate(t["x"], None, None, t["table"][:, 0:1], t["table"][:, 1:2], 1e-6)

    impls = backend_impls(LAYER_NORM_OP, check, timed(ours, wrt, 2, scales)) + [
        Impl(EAGER, lambda: timed(eager, wrt, 2, scales)),
        Impl(COMPILED, lambda: timed(torch.compile(eager), wrt, 2, scales))]
    n = math.prod(shape) * dtype.itemsize
    return Case("norm", "ln-modulate+bwd" if backward else "ln-modulate", shape, dtype, device, inputs,
                oracle_of(eager, wrt, 2, scales), impls, nbytes=5 * n if backward else 2 * n)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return [gn_case((2, 64, 16, 16), torch.float32, device, scale_shift=True, backward=False),
                gn_case((2, 64, 16, 16), torch.float32, device, scale_shift=False, backward=True),
                ln_case((2, 64, 96), torch.float32, device, backward=False),
                ln_case((2, 64, 96), torch.float32, device, backward=True)]
    shapes = SD15_SHAPES[:1] if quick else SD15_SHAPES
    out = [gn_case(s, torch.float16, device, scale_shift=False, backward=False) for s in shapes]
    out.append(gn_case(SD15_SHAPES[0], torch.float16, device, scale_shift=True, backward=False))
    if not quick:  # the layout accelerate gives a graphed UNet
        out += [gn_case(s, torch.float16, device, scale_shift=False, backward=False, channels_last=True)
                for s in shapes]
        out.append(gn_case(SD15_SHAPES[0], torch.float16, device, scale_shift=True, backward=False,
                           channels_last=True))
    out.append(gn_case(SD15_SHAPES[0], torch.bfloat16, device, scale_shift=False, backward=True))
    out.append(ln_case(DIT_SHAPE, torch.bfloat16, device, backward=False))
    if not quick:
        out.append(ln_case(PIXART_SHAPE, torch.float16, device, backward=False))
    out.append(ln_case(DIT_SHAPE, torch.bfloat16, device, backward=True))
    return out


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The targets, each read off pydpm[triton]'s rows (the worst case, and every case's value): >= 70% of
    copy bandwidth, >= 3x eager and >= torch.compile(eager) in device time, host cost per call <= eager's."""
    return op_targets(results, "norm", OURS, EAGER, COMPILED, BANDWIDTH_TARGET, SPEEDUP_TARGET)
