"""Benchmark cases of pydpm dropped into real diffusers models: published configurations, random weights,
nothing downloaded (they need diffusers only).

Cases:
  unet-sd15        Stable Diffusion 1.5's UNet2DConditionModel (block widths 320/640/1280/1280, two layers per
                   block, cross-attention on 77 CLIP tokens of width 768, 8 heads), one forward at batch 2 (a
                   classifier-free-guidance pair) on 64×64 latents, fp16
  unet-sd15-train  the same UNet, one training step at batch 2 in bf16: forward, a mean-square loss, backward
                   into every parameter (no optimizer step)
  dit-xl2          DiT-XL/2 at 256 px (DiTTransformer2DModel: 28 layers, 16 heads of 72, patch 2 on 32×32
                   latents, class-conditional), one forward at batch 8, fp16

Implementations: `diffusers` (its own attention processors: torch's scaled_dot_product_attention), `pydpm`
(`pydpm.integrations.diffusers.use_pydpm_attention(model)`: every attention block through pydpm.ops.attention,
whose dispatch picks pydpm's kernel or one of torch's per call class), `pydpm[triton]` (the same with
pydpm's kernel forced everywhere), `accelerate` (`pydpm.integrations.diffusers.accelerate(model)`: pydpm's
attention and the forward replayed from a CUDA graph; inference cases only) and, without --quick, `torch.compile` of the diffusers model. The model is
built once per case and shared; each implementation sets the processors it needs before its calls (their eager
loops take turns, bench/harness.py `eager_loops`). Outputs are checked against
the same model in float32 (the loss, for the training step). Flops come from torch's FlopCounterMode.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from .harness import Case, Impl, Inputs, NeedsCUDA, Row, dtype_str, shape_str

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=(
    "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
DIT_XL2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def _attention_blocks(model):
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


@functools.lru_cache(maxsize=None)
def _diffusers_processor():
    """One processor object, so that a compiled model's guards on its processors hold when the implementations
    of a case take turns on the shared model."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _use_diffusers(model) -> None:
    from pydpm.integrations.diffusers import restore

    restore(model)
    processor = _diffusers_processor()
    for block in _attention_blocks(model):
        block.set_processor(processor)


def _use_pydpm(model) -> None:
    from pydpm.integrations.diffusers import restore, use_pydpm_attention

    restore(model)
    use_pydpm_attention(model)


def _use_accelerate(model) -> None:
    from pydpm.integrations.diffusers import accelerate

    _use_diffusers(model)
    accelerate(model)


class _Model:
    """The case's model in `dtype` (built once, on first use) and its float32 twin for the oracle."""

    def __init__(self, build: Callable[[], torch.nn.Module], dtype: torch.dtype, device: torch.device):
        self.build, self.dtype, self.device = build, dtype, device

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(self.device):
            return self.build().to(self.dtype)

    @functools.cached_property
    def model32(self) -> torch.nn.Module:
        model = self.build().to(self.device)
        model.load_state_dict(self.model.state_dict())
        _use_diffusers(model)
        return model.float()


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET)


def _dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_XL2_256)


def _forward(kind: str, model, t: Inputs) -> torch.Tensor:
    if kind == "unet":
        return model(t["x"], t["t"], encoder_hidden_states=t["ctx"]).sample
    return model(t["x"], timestep=t["t"], class_labels=t["y"]).sample


def _call(kind: str, train: bool, model, t: Inputs):
    if not train:
        with torch.no_grad():
            return _forward(kind, model, t)
    model.zero_grad(set_to_none=True)
    loss = _forward(kind, model, t).float().square().mean()
    loss.backward()
    return loss.detach()


def _impl(name: str, holder: _Model, kind: str, train: bool, setup: Callable, ours: bool,
          context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
          compiled: bool = False) -> Impl:
    def select():
        model = holder.model
        setup(model)
        model.train(train)
        model.requires_grad_(train)

    def make():
        select()
        target = torch.compile(holder.model) if compiled else holder.model
        return lambda t: _call(kind, train, target, t)
    return Impl(name, make, ours=ours, context=context, select=select)


def _flops(holder: _Model, kind: str, train: bool, t: Inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = holder.model
    _use_diffusers(model)
    model.requires_grad_(train)
    with FlopCounterMode(display=False) as counter:
        _call(kind, train, model, t)
    return counter.get_total_flops()


def model_case(name: str, kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               train: bool, quick: bool) -> Case:
    holder = _Model(_unet if kind == "unet" else _dit, dtype, device)
    B = shape[0]

    def inputs() -> Inputs:
        t = {"x": torch.randn(shape, dtype=dtype, device=device),
             "t": torch.randint(0, 1000, (B,), device=device)}
        if kind == "unet":
            t["ctx"] = torch.randn(B, 77, SD15_UNET["cross_attention_dim"], dtype=dtype, device=device)
        else:
            t["y"] = torch.randint(0, 1000, (B,), device=device)
        return t

    def oracle(t: Inputs) -> torch.Tensor:
        t32 = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
        model = holder.model32
        model.train(train)  # as the timed model: DiT's class-label dropout is off in eval mode
        model.requires_grad_(train)
        return _call(kind, train, model, t32).double()

    from pydpm.ops import use_backend

    impls = [_impl("diffusers", holder, kind, train, _use_diffusers, ours=False),
             _impl("pydpm", holder, kind, train, _use_pydpm, ours=True),
             _impl("pydpm[triton]", holder, kind, train, _use_pydpm, ours=True,
                   context=functools.partial(use_backend, "triton"))]
    if not train:
        impls.append(_impl("accelerate", holder, kind, train, _use_accelerate, ours=True))
    if not quick:
        impls.append(_impl("torch.compile", holder, kind, train, _use_diffusers, ours=False, compiled=True))
    case = Case("models", name, shape, dtype, device, inputs, oracle, impls)
    case.flops = _flops(holder, kind, train, inputs())
    return case


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        raise NeedsCUDA("full-size diffusers models")
    import diffusers  # noqa: F401 - without it the harness lists the family among the missing, once

    return [model_case("unet-sd15", "unet", (2, 4, 64, 64), torch.float16, device, False, quick),
            model_case("unet-sd15-train", "unet", (2, 4, 64, 64), torch.bfloat16, device, True, quick),
            model_case("dit-xl2", "dit", (8, 4, 32, 32), torch.float16, device, False, quick)]


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per model: pydpm against diffusers (and torch.compile) as a model sees it: eager wall time per call."""
    lines, worst = [], None
    for case, rows in results:
        by = {r.impl: r for r in rows if r.loop_us and not r.note}
        base = by.get("diffusers")
        if base is None:
            continue
        parts = []
        for impl in ("pydpm", "pydpm[triton]", "accelerate", "torch.compile"):
            r = by.get(impl)
            if r is not None:
                parts.append(f"{impl} {r.loop_us / 1e3:.2f} ms ({base.loop_us / r.loop_us:.2f}x)")
                if impl == "pydpm":
                    ratio = base.loop_us / r.loop_us
                    worst = ratio if worst is None else min(worst, ratio)
        lines.append(f"{case.name} {shape_str(case.shape)} {dtype_str(case.dtype)}: diffusers {base.loop_us / 1e3:.2f} "
                     f"ms per call; " + ", ".join(parts))
    if worst is not None:
        lines.append(f"use_pydpm_attention >= 1.0x diffusers' SDPA on every model: worst {worst:.2f}x "
                     f"({'met' if worst >= 1.0 else 'NOT met'})")
    return lines or ["model targets: not measured in this run (they need CUDA and diffusers)"]
