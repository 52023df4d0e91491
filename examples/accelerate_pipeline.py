"""`accelerate()` on a diffusers pipeline: the same images, sooner.

    python examples/accelerate_pipeline.py                         # small UNet, CPU: swaps, no graph
    python examples/accelerate_pipeline.py --size full --device cuda --dtype float16

Builds a randomly initialised `UNet2DModel` (small: 32×32; full: the DDPM 256×256 configuration of
google/ddpm-church-256, 6 levels of 128-512 channels with attention at 16×16) in a `DDPMPipeline` with
diffusers' DPM-Solver++(2M) scheduler, runs the pipeline eagerly, then `accelerate(pipe)` (pydpm's attention,
the fused scheduler and, on CUDA, the UNet replayed from CUDA graphs) and runs it again from the same
generator. Prints the report, the largest pixel difference (images in [0, 1]) and the wall time of each run
(after one warm-up run each: the accelerated warm-up captures the graphs); in float16 also each
run's largest difference to the same pipeline in float32.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

from pydpm.integrations.diffusers import accelerate, restore

CONFIGS = {
    "small": dict(sample_size=32, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "full": dict(sample_size=256, layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def run(pipe, steps: int, batch: int, device: str) -> tuple[torch.Tensor, float]:
    pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
         output_type="np")  # warm-up (the accelerated one captures its graphs here)
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    if device == "cuda":
        torch.cuda.synchronize()
    return torch.from_numpy(images), time.perf_counter() - began


def main(size: str = "small", steps: int = 20, batch: int = 2, device: str = "cpu", dtype: str = "float32",
         verbose: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=3, out_channels=3, **CONFIGS[size]).eval().to(device, getattr(torch, dtype))
    pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    exact = None
    if dtype != "float32":  # the same pipeline in float32, eagerly: how far each low-precision run is from it
        unet32 = UNet2DModel(in_channels=3, out_channels=3, **CONFIGS[size]).eval().to(device)
        unet32.load_state_dict(unet.state_dict())
        pipe32 = DDPMPipeline(unet=unet32, scheduler=DPMSolverMultistepScheduler())
        pipe32.set_progress_bar_config(disable=True)
        exact, _ = run(pipe32, steps, batch, device)
    eager, eager_s = run(pipe, steps, batch, device)
    report = accelerate(pipe)
    fast, fast_s = run(pipe, steps, batch, device)
    restore(pipe)
    result = {"max_abs_diff": float((fast - eager).abs().max()), "eager_s": eager_s, "accelerated_s": fast_s}
    if exact is not None:
        result["eager_vs_float32"] = float((eager - exact).abs().max())
        result["accelerated_vs_float32"] = float((fast - exact).abs().max())
    if verbose:
        print(report)
        print(f"{size} UNet2DModel, {steps} steps, batch {batch}, {dtype} on {device}: eager {eager_s * 1e3:.0f} ms, "
              f"accelerated {fast_s * 1e3:.0f} ms ({eager_s / fast_s:.2f}x); max |difference| "
              f"{result['max_abs_diff']:.2e}" + ("" if exact is None else
                                                f"; max |difference| to the float32 pipeline: eager "
                                                f"{result['eager_vs_float32']:.2e}, accelerated "
                                                f"{result['accelerated_vs_float32']:.2e}"))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")  # numpy has no bfloat16
    a = parser.parse_args()
    main(a.size, a.steps, a.batch, a.device, a.dtype)
