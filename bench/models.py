"""Benchmark cases of pydpm in real diffusers models (`pydpm bench --models`, also in the full suite): published
configurations, random weights, nothing downloaded (they need diffusers only). CUDA only.

Cases (fp16 unless said; B: the batch the model sees, B2 being a classifier-free-guidance pair):
  unet-sd15        Stable Diffusion 1.5's UNet2DConditionModel (block widths 320/640/1280/1280, two layers per
                   block, cross-attention on 77 CLIP tokens of width 768, 8 heads), one forward on 64×64 latents
                   at B1 and at B2
  unet-sd15-cfg20  the same UNet sampling: StableDiffusionPipeline's denoising loop for one prompt (`cfg_loop`):
                   20 steps of DPM-Solver++ (2M, as SD pipelines configure DPMSolverMultistepScheduler), the UNet
                   at B2 and guidance 7.5 at every step; the shape is the latents'
  unet-sd15-train  the same UNet, one training step at B2 in bf16: forward, a mean-square loss, backward into
                   every parameter (no optimizer step)
  dit-xl2          DiT-XL/2 at 256 px (DiTTransformer2DModel: 28 layers, 16 heads of 72, patch 2 on 32×32
                   latents, class-conditional), one forward at B2
  unet-sdxl        SDXL base's UNet (widths 320/640/1280, 1/2/10 transformer layers per level, 77 tokens of
                   width 2048, the pooled text embedding and six size/crop ids), one forward on 128×128 latents
                   (1024 px) at B2
  pixart-1024      PixArt-α XL-2-1024-MS's transformer (PixArtTransformer2DModel: 28 layers, 16 heads of 72,
                   patch 2 on 128×128 latents, cross-attention on 120 T5 tokens of width 4096, the resolution and
                   aspect-ratio conditions), one forward at B2 without the prompt's attention mask (pipelines
                   pass one; pydpm's processor hands masked calls to SDPA)

Implementations:
  diffusers                    eager, diffusers' own attention processors (torch's scaled_dot_product_attention)
  accelerate[no graph]         `pydpm.integrations.diffusers.accelerate(obj, cuda_graph=False)`: on a bare model
                               exactly `use_pydpm_attention`; in the sampling loop also pydpm's fused
                               DPMSolverMultistepScheduler, swapped in by accelerate as on a pipeline
  accelerate                   the same with the forward replayed from CUDA graphs (in the training step the
                               forward and the backward, from a pair of graphs)
  torch.compile                `torch.compile(model)` of the diffusers model (the loop compiles the UNet and
                               keeps diffusers' scheduler, as diffusers' docs do)
  torch.compile[max-autotune]  `mode="max-autotune"` (Triton GEMM autotuning and CUDA graphs); without --quick and
                               not in the training step: it compiles for minutes per model
The earlier attention-only rows (`pydpm`, `pydpm[triton]`) are gone: `pydpm` is `accelerate[no graph]` on a
bare model, and the attention family times pydpm's kernel against SDPA. Compilation is most of a run's time:
--quick leaves out its slowest part (max-autotune); the whole family takes longer than one 10-minute GPU call, so
`--cases REGEX` runs part of the family (`--cases 'sdxl|pixart'`) and `--impls REGEX` part of a case's rows
(`--cases cfg20 --impls 'diffusers|^accelerate$|max-autotune'`: the loop's max-autotune compile alone takes
minutes).

A case's model is built on first use and shared by its implementations (and by the next case of the same model
and dtype); each implementation puts its processors (or accelerate) back before its calls, as the harness's
eager loops take turns (bench/harness.py `eager_loops`). Outputs are checked against the same weights in float32
without TF32 (the loss, for the training step), whose run also counts the flops (torch's FlopCounterMode). Each
row records its error against that oracle and its peak device memory (harness Row.error, Row.peak_mib); the
footer lists them per case with the speed-ups over diffusers eager and reads the targets off the rows.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import re
from typing import Any, Callable

import torch

from .harness import Case, Impl, Inputs, NeedsCUDA, Row

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=(
    "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
DIT_XL2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json (use_additional_conditions: what diffusers derives
# from sample_size 128)
PIXART_1024 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                   norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=True)
# name -> (diffusers class, its configuration)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet-sd15": ("UNet2DConditionModel", SD15_UNET),
    "unet-sdxl": ("UNet2DConditionModel", SDXL_UNET),
    "dit-xl2": ("DiTTransformer2DModel", DIT_XL2_256),
    "pixart-1024": ("PixArtTransformer2DModel", PIXART_1024),
}
# The sampling loop: SD1.5's scheduler_config.json (PNDM's betas and offset) as DPMSolverMultistepScheduler's
# from_config reads it, DPM-Solver++ of order 2 (its defaults, what SD pipelines are given).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
CFG_STEPS, CFG_SCALE = 20, 7.5
TOKENS = {"UNet2DConditionModel": 77, "PixArtTransformer2DModel": 120}  # text tokens: CLIP's, T5's in PixArt
SDXL_TIME_IDS = 6  # original size, crop corner, target size

KINDS = ("forward", "loop", "train")
COMPILE_MODES = {"torch.compile": None, "torch.compile[max-autotune]": "max-autotune"}
# Targets (footer): what `accelerate` reaches over diffusers eager per case kind, against torch.compile's best
# mode in the loop, the share of the matmul peak in a forward, and the peak memory over diffusers'.
LOOP_VS_EAGER, LOOP_VS_COMPILE, FORWARD_VS_EAGER, TRAIN_VS_EAGER = 3.0, 1.2, 3.0, 1.3
FORWARD_OF_PEAK, MEMORY_OVER_EAGER = 0.40, 0.15
FORWARD_TARGET_MODELS = ("dit-xl2", "pixart-1024", "unet-sdxl")


def build(name: str) -> torch.nn.Module:
    """`name`'s diffusers model (MODELS), randomly initialised on the current default device."""
    import diffusers

    cls, config = MODELS[name]
    return getattr(diffusers, cls)(**config)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` through torch.nn.Module.to: diffusers 0.42's ModelMixin.to logs a warning on every
    dtype cast (about modules to keep in float32, of which these models have none)."""
    return torch.nn.Module.to(model, dtype)


def model_inputs(name: str, batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """One forward's inputs as diffusers' pipelines pass them: latents `x` and timesteps `t`, and per model the
    text states `ctx` (SDXL also `text_embeds` and `time_ids`, PixArt at sample size 128 `resolution` and
    `aspect_ratio`) or DiT's class labels `y`."""
    cls, config = MODELS[name]
    size = config["sample_size"]
    t = {"x": torch.randn(batch, config["in_channels"], size, size, dtype=dtype, device=device),
         "t": torch.randint(0, 1000, (batch,), device=device)}
    if cls == "DiTTransformer2DModel":
        t["y"] = torch.randint(0, config["num_embeds_ada_norm"], (batch,), device=device)
        return t
    width = config["caption_channels"] if cls == "PixArtTransformer2DModel" else config["cross_attention_dim"]
    t["ctx"] = torch.randn(batch, TOKENS[cls], width, dtype=dtype, device=device)
    pixels = 8 * size  # the VAE's factor
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * config["addition_time_embed_dim"]
        t["text_embeds"] = torch.randn(batch, pooled, dtype=dtype, device=device)
        t["time_ids"] = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=dtype,
                                     device=device).repeat(batch, 1)
    if config.get("use_additional_conditions"):
        t["resolution"] = torch.tensor([pixels, pixels], dtype=dtype, device=device).repeat(batch, 1)
        t["aspect_ratio"] = torch.ones(batch, 1, dtype=dtype, device=device)
    return t


def loop_inputs(name: str, dtype: torch.dtype, device: torch.device) -> Inputs:
    """The sampling loop's inputs for one prompt: initial `latents`, the prompt's text states `ctx` and the
    empty prompt's `uncond`."""
    t = model_inputs(name, 1, dtype, device)
    return {"latents": t["x"], "ctx": t["ctx"], "uncond": torch.randn_like(t["ctx"])}


def forward(name: str, model: Callable[..., Any], t: Inputs) -> torch.Tensor:
    """`model`'s output on the inputs `t` of `model_inputs(name, ...)`."""
    cls = MODELS[name][0]
    if cls == "DiTTransformer2DModel":
        return model(t["x"], timestep=t["t"], class_labels=t["y"]).sample
    if cls == "PixArtTransformer2DModel":
        added = {"resolution": t.get("resolution"), "aspect_ratio": t.get("aspect_ratio")}
        return model(t["x"], encoder_hidden_states=t["ctx"], timestep=t["t"], added_cond_kwargs=added).sample
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "time_ids" in t else None
    return model(t["x"], t["t"], encoder_hidden_states=t["ctx"], added_cond_kwargs=added).sample


def cfg_loop(unet: Callable[..., Any], scheduler, t: Inputs, steps: int = CFG_STEPS,
             guidance: float = CFG_SCALE) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop (diffusers 0.42, pipeline_stable_diffusion.py) for one prompt
    of `loop_inputs`, from set_timesteps to the last step's latents (no text encoder, no VAE): per step the
    latents doubled, scaled by the scheduler, the UNet on both halves (empty prompt first), guidance, and the
    scheduler's step."""
    scheduler.set_timesteps(steps, device=t["latents"].device)
    latents = t["latents"] * scheduler.init_noise_sigma
    prompt_embeds = torch.cat([t["uncond"], t["ctx"]])
    for step in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), step)
        noise_pred = unet(model_input, step, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        uncond, text = noise_pred.chunk(2)
        latents = scheduler.step(uncond + guidance * (text - uncond), step, latents, return_dict=False)[0]
    return latents


def sd15_scheduler():
    """diffusers' DPMSolverMultistepScheduler as SD1.5 pipelines are given it."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SD15_SCHEDULER)


@functools.lru_cache(maxsize=None)
def _pipeline_class() -> type:
    from diffusers import DiffusionPipeline

    class CFGPipeline(DiffusionPipeline):
        """What `accelerate` acts on in the sampling loop: a UNet and a scheduler registered as
        StableDiffusionPipeline registers them, so that accelerate treats it as it treats that pipeline (the
        UNet accelerated, the scheduler swapped for pydpm's drop-in built from its config) and `restore` undoes
        it; `cfg_loop` runs with its `unet` and `scheduler`."""

        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    return CFGPipeline


class _Shared:
    """The one model the cases keep on the device, with the pipeline around it (built on first use): the next
    case of the same model and dtype reuses it, another model releases it (accelerate undone, memory returned),
    so that one case's peak memory does not hold another's weights."""

    def __init__(self):
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None
        self.pipeline: Any = None

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        if self.key != (name, dtype, device) or self.model is None:
            self.release()
            torch.manual_seed(0)
            with torch.device(device):
                self.model = _cast(build(name), dtype)
            self.key = (name, dtype, device)
        return self.model

    def pipe(self, name: str, dtype: torch.dtype, device: torch.device):
        model = self.get(name, dtype, device)
        if self.pipeline is None:
            self.pipeline = _pipeline_class()(model, sd15_scheduler())
        return self.pipeline

    def release(self) -> None:
        from pydpm.integrations.diffusers import restore

        for obj in (self.pipeline, self.model):
            if obj is not None:
                restore(obj)
        device = self.key[2] if self.key else None
        self.key = self.model = self.pipeline = None
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


_SHARED = _Shared()


def _attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


@functools.lru_cache(maxsize=None)
def _diffusers_processor():
    """One processor object, so that a compiled model's guards on its processors hold when the implementations
    of a case take turns on the shared model."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


@contextlib.contextmanager
def _no_tf32():
    """float32 convolutions and matmuls in full precision (cuDNN computes convolutions in TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _Subject:
    """What a case times: model `name` in `dtype` called as `kind` ("forward" at batch `batch`, "loop":
    `cfg_loop` of `steps` steps for one prompt, "train": a training step at batch `batch`), on the shared model;
    `target` is what accelerate and restore act on (the pipeline in the loop, else the model)."""

    def __init__(self, name: str, kind: str, batch: int, dtype: torch.dtype, device: torch.device, steps: int):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; use one of {KINDS}")
        self.name, self.kind, self.batch, self.dtype, self.device, self.steps = name, kind, batch, dtype, device, steps

    @property
    def model(self) -> torch.nn.Module:
        return _SHARED.get(self.name, self.dtype, self.device)

    @property
    def target(self):
        return _SHARED.pipe(self.name, self.dtype, self.device) if self.kind == "loop" else self.model

    @property
    def shape(self) -> tuple[int, ...]:
        """The latents' shape (the loop's initial latents)."""
        config = MODELS[self.name][1]
        size = config["sample_size"]
        return (1 if self.kind == "loop" else self.batch, config["in_channels"], size, size)

    def inputs(self) -> Inputs:
        if self.kind == "loop":
            return loop_inputs(self.name, self.dtype, self.device)
        return model_inputs(self.name, self.batch, self.dtype, self.device)

    def prepare(self, module: torch.nn.Module) -> None:
        train = self.kind == "train"
        module.train(train)  # DiT drops class labels in training mode only
        module.requires_grad_(train)

    def call(self, module: torch.nn.Module, model: Callable[..., Any], scheduler, t: Inputs) -> torch.Tensor:
        """One call of `model` (`module`, or torch.compile's wrapper of it) on the inputs `t`, with `scheduler`
        in the loop; the training step's result is its loss."""
        if self.kind == "train":
            module.zero_grad(set_to_none=True)
            loss = forward(self.name, model, t).float().square().mean()
            loss.backward()
            return loss.detach()
        with torch.no_grad():
            return cfg_loop(model, scheduler, t, self.steps) if self.kind == "loop" else forward(self.name, model, t)


def _use_diffusers(subject: _Subject) -> None:
    from pydpm.integrations.diffusers import restore

    restore(subject.target)
    processor = _diffusers_processor()
    for block in _attention_blocks(subject.model):
        block.set_processor(processor)


def _use_accelerate(cuda_graph: bool, subject: _Subject) -> None:
    from pydpm.integrations.diffusers import accelerate

    _use_diffusers(subject)
    accelerate(subject.target, cuda_graph=cuda_graph)


def _impl(name: str, subject: _Subject, setup: Callable[[_Subject], None], ours: bool,
          compiled: bool = False) -> Impl:
    """An implementation: `setup` puts its processors (or accelerate) on the shared model before its calls;
    `compiled`: the calls go through torch.compile's wrapper of the model in mode COMPILE_MODES[name] (the loop
    with a diffusers scheduler of its own)."""
    def select():
        setup(subject)
        subject.prepare(subject.model)

    def make():
        select()
        model, target = subject.model, subject.target
        if compiled:
            wrapper = torch.compile(model, mode=COMPILE_MODES[name])
            scheduler = sd15_scheduler() if subject.kind == "loop" else None
            return lambda t: subject.call(model, wrapper, scheduler, t)
        # in the loop the pipeline's scheduler at the time of the call: diffusers' own, or accelerate's drop-in
        return lambda t: subject.call(model, model, getattr(target, "scheduler", None), t)
    return Impl(name, make, ours=ours, select=select)


def model_case(name: str, kind: str, batch: int, dtype: torch.dtype, device: torch.device, quick: bool,
               steps: int = CFG_STEPS) -> Case:
    """The case of model `name` (MODELS) called as `kind` (KINDS) at batch `batch` (the loop: `steps` steps for
    one prompt, the UNet at batch 2), with the implementations of the module docstring."""
    subject = _Subject(name, kind, batch, dtype, device, steps)

    def oracle(t: Inputs) -> torch.Tensor:
        """The call in float32 on a float32 copy of the weights (built for the call, freed after it)."""
        from torch.utils.flop_counter import FlopCounterMode

        t32 = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
        with torch.device(device):
            model32 = build(name)
        model32.load_state_dict(subject.model.state_dict())
        subject.prepare(model32)
        try:
            with _no_tf32(), FlopCounterMode(display=False) as counter:
                out = subject.call(model32, model32, sd15_scheduler() if kind == "loop" else None, t32)
            case.flops = counter.get_total_flops()  # the timed models run the same ops
            return out.double()
        finally:
            del model32
            gc.collect()

    impls = [_impl("diffusers", subject, _use_diffusers, ours=False),
             _impl("accelerate[no graph]", subject, functools.partial(_use_accelerate, False), ours=True)]
    impls.append(_impl("accelerate", subject, functools.partial(_use_accelerate, True), ours=True))
    impls.append(_impl("torch.compile", subject, _use_diffusers, ours=False, compiled=True))
    if not quick and kind != "train":
        impls.append(_impl("torch.compile[max-autotune]", subject, _use_diffusers, ours=False, compiled=True))
    case_name = {"forward": name, "loop": f"{name}-cfg{steps}", "train": f"{name}-train"}[kind]
    case = Case("models", case_name, subject.shape, dtype, device, subject.inputs, oracle, impls, peak_memory=True)
    return case


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        raise NeedsCUDA("full-size diffusers models")
    import diffusers  # noqa: F401 - without it the harness lists the family among the missing, once

    fp16, bf16 = torch.float16, torch.bfloat16
    return [model_case("unet-sd15", "forward", 1, fp16, device, quick),
            model_case("unet-sd15", "forward", 2, fp16, device, quick),
            model_case("unet-sd15", "loop", 1, fp16, device, quick),
            model_case("unet-sd15", "train", 2, bf16, device, quick),
            model_case("dit-xl2", "forward", 2, fp16, device, quick),
            model_case("unet-sdxl", "forward", 2, fp16, device, quick),
            model_case("pixart-1024", "forward", 2, fp16, device, quick)]


def _kind(case: Case) -> str:
    """The case's kind (KINDS), from its name."""
    return "loop" if re.search(r"-cfg\d+$", case.name) else "train" if case.name.endswith("-train") else "forward"


def _target(what: str, measured: list[tuple[str, bool]]) -> str:
    """A target's line: each case measured (its figures and whether it meets the target), met when all do."""
    if not measured:
        return f"{what}: not measured in this run"
    verdict = "met" if all(ok for _, ok in measured) else "NOT met"
    return f"{what}: {'; '.join(text for text, _ in measured)} ({verdict})"


def _row_line(case: Case, row: Row, base: Row | None) -> str:
    """One implementation of a case: eager ms per call and its speed-up over diffusers eager, rate and share of
    the matmul peak (device time, as the table's rate), peak memory and error against the float32 oracle."""
    parts = [f"{row.loop_us / 1e3:.2f} ms per call"]
    if base is not None and base is not row:
        parts.append(f"{base.loop_us / row.loop_us:.2f}x diffusers eager")
    if row.throughput is not None and row.of_ceiling is not None:
        parts.append(f"{row.throughput:.1f} {row.unit} = {100 * row.of_ceiling:.1f}% of the matmul peak")
    if row.peak_mib is not None:
        memory = f"peak memory {row.peak_mib / 1024:.2f} GiB"
        if base is not None and base is not row and base.peak_mib:
            memory += f" ({row.peak_mib / base.peak_mib:.2f}x diffusers')"
        parts.append(memory)
    if row.error is not None:
        parts.append(f"error {row.error:.1e}")
    return f"{case.label} {row.impl}: " + ", ".join(parts)


def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """Per case and implementation the figures the table has no column for (speed-up over diffusers eager, peak
    memory, error), then the targets, met or not, read off the rows: `accelerate`'s eager wall time per call
    (`accelerate[no graph]`'s in the training step) against diffusers eager and, in the loop, against
    torch.compile's best mode; its share of the measured matmul peak in each forward (the harness's bf16
    torch.mm: fp16 and bf16 have one tensor-core rate); the peak memory of pydpm's rows against diffusers'."""
    if not results:
        return ["model targets: not measured in this run (they need CUDA and diffusers)"]
    lines: list[str] = []
    loop: list[tuple[str, bool]] = []
    forward_speed: list[tuple[str, bool]] = []
    forward_peak: list[tuple[str, bool]] = []
    train: list[tuple[str, bool]] = []
    train_graphed: list[tuple[str, bool]] = []
    memory: list[tuple[str, bool]] = []
    for case, rows in results:
        by = {r.impl: r for r in rows if r.loop_us and not r.note}
        base = by.get("diffusers")
        lines += [_row_line(case, r, base) for r in by.values()]
        kind = _kind(case)
        ours = by.get("accelerate[no graph]" if kind == "train" else "accelerate")
        if ours is not None and kind == "forward" and ours.of_ceiling is not None:
            forward_peak.append((f"{case.label} {100 * ours.of_ceiling:.1f}%", ours.of_ceiling >= FORWARD_OF_PEAK))
        if ours is None or base is None:
            continue
        speedup = base.loop_us / ours.loop_us
        if kind == "loop":
            best = min((r for name, r in by.items() if name in COMPILE_MODES), key=lambda r: r.loop_us, default=None)
            over = None if best is None else best.loop_us / ours.loop_us
            text = f"{case.label} {speedup:.2f}x eager, " + (
                "no torch.compile row" if best is None else f"{over:.2f}x its best, {best.impl}")
            loop.append((text, speedup >= LOOP_VS_EAGER and over is not None and over >= LOOP_VS_COMPILE))
        elif kind == "train":
            train.append((f"{case.label} {speedup:.2f}x", speedup >= TRAIN_VS_EAGER))
            graphed = by.get("accelerate")
            if graphed is not None:
                over = base.loop_us / graphed.loop_us
                train_graphed.append((f"{case.label} {over:.2f}x", over >= TRAIN_VS_EAGER))
        elif case.name in FORWARD_TARGET_MODELS:
            forward_speed.append((f"{case.label} {speedup:.2f}x", speedup >= FORWARD_VS_EAGER))
        for r in (by.get("accelerate[no graph]"), by.get("accelerate")):
            if r is not None and r.peak_mib and base.peak_mib:
                ratio = r.peak_mib / base.peak_mib
                memory.append((f"{case.label} {r.impl} {ratio:.2f}x", ratio <= 1 + MEMORY_OVER_EAGER))
    return lines + [
        _target(f"SD1.5 {CFG_STEPS}-step CFG loop: accelerate >= {LOOP_VS_EAGER:g}x diffusers eager and >= "
                f"{LOOP_VS_COMPILE:g}x torch.compile's best mode", loop),
        _target(f"DiT-XL/2, PixArt-sized and SDXL-sized forward: accelerate >= {FORWARD_VS_EAGER:g}x diffusers eager",
                forward_speed),
        _target(f"forward at >= {100 * FORWARD_OF_PEAK:.0f}% of the measured matmul peak (accelerate, device time)",
                forward_peak),
        _target(f"training step: accelerate[no graph] >= {TRAIN_VS_EAGER:g}x diffusers eager", train),
        _target(f"training step replayed from graphs: accelerate >= {TRAIN_VS_EAGER:g}x diffusers eager",
                train_graphed),
        _target(f"peak memory <= diffusers eager + {100 * MEMORY_OVER_EAGER:.0f}% (pydpm's rows)", memory),
    ]
