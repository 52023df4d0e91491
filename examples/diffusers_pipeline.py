"""pydpm's fused schedulers in diffusers pipelines: the images match diffusers' own schedulers.

    python examples/diffusers_pipeline.py [--steps 10] [--device cuda]

Builds a small randomly initialised `UNet2DModel` (32×32, 3 channels), then for each scheduler runs the
pipeline twice from the same generator: with diffusers' scheduler and with pydpm's, made by
`from_config(pipe.scheduler.config)`, and prints the largest pixel difference (images in [0, 1]).

* DDPMPipeline + DPM-Solver++ (2M and 3M, Karras sigmas)
* DDIMPipeline + DDIM (eta = 0, and eta = 0.5 with the pipeline's seeded generator)
* UniPC through the same denoising loop written out (DDPMPipeline passes `generator=` to step(), which
  diffusers' UniPC does not accept)
"""
from __future__ import annotations

import argparse

import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel,
                       UniPCMultistepScheduler)

from pydpm.integrations import diffusers as fused


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return unet.eval()


def images(pipe, steps: int, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        out = pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="pt", **kwargs)
    return out.images


def unipc_loop(unet: UNet2DModel, scheduler, steps: int, device) -> torch.Tensor:
    """The denoising loop of DDPMPipeline, without `generator=` in step()."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn((2, 3, 32, 32), generator=generator).to(device)
    scheduler.set_timesteps(steps, device=device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def main(steps: int = 10, device: str = "cpu", verbose: bool = True) -> dict[str, float]:
    unet = tiny_unet().to(device)
    diffs = {}

    ddpm = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler()).to(device)
    ddpm.set_progress_bar_config(disable=True)
    config = ddpm.scheduler.config
    for name, options in (("dpm++2m", {}), ("dpm++3m-karras", dict(solver_order=3, use_karras_sigmas=True))):
        ddpm.scheduler = DPMSolverMultistepScheduler.from_config(config, **options)
        reference = images(ddpm, steps)
        ddpm.scheduler = fused.DPMSolverMultistepScheduler.from_config(config, **options)
        diffs[f"DDPMPipeline/{name}"] = (images(ddpm, steps) - reference).abs().max().item()

    ddim = DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).to(device)
    ddim.set_progress_bar_config(disable=True)
    reference_scheduler = ddim.scheduler
    for eta in (0.0, 0.5):
        ddim.scheduler = reference_scheduler
        reference = images(ddim, steps, eta=eta)
        ddim.scheduler = fused.DDIMScheduler.from_config(reference_scheduler.config)
        diffs[f"DDIMPipeline/eta={eta}"] = (images(ddim, steps, eta=eta) - reference).abs().max().item()

    config = ddim.scheduler.config  # another class's config converts as with diffusers' own classes
    reference = unipc_loop(unet, UniPCMultistepScheduler.from_config(config, solver_order=3), steps, device)
    ours = unipc_loop(unet, fused.UniPCMultistepScheduler.from_config(config, solver_order=3), steps, device)
    diffs["loop/unipc-3"] = (ours - reference).abs().max().item()

    if verbose:
        for name, d in diffs.items():
            print(f"{name:28s} max |pydpm - diffusers| = {d:.2e}")
    return diffs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    diffs = main(args.steps, args.device)
    worst = max(diffs.values())
    assert worst <= 1e-3, f"images differ by {worst}"
    print("images match")
