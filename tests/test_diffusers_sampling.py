"""pydpm's samplers with diffusers models: the recipe of docs/samplers.md reproduces diffusers'
DPM-Solver++(2M) time grid (the block runs as written), and a diffusers model passed where a
continuous-time model function belongs is refused with the wrapping call."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import pydpm
from pydpm.samplers import DPMSolver, UniPC
from pydpm.schedules import NoiseScheduleVP, model_wrapper

diffusers = pytest.importorskip("diffusers")

SAMPLERS_MD = pathlib.Path(__file__).resolve().parents[1] / "docs" / "samplers.md"


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def recipe() -> str:
    section = SAMPLERS_MD.read_text().split("### diffusers' DPM-Solver++(2M) time grid", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.parametrize("steps,spacing", [(5, "linspace"), (12, "linspace"), (20, "linspace"), (7, "leading"),
                                           (20, "trailing")])
def test_samplers_md_recipe_reproduces_diffusers_dpm_solver_pp_2m(steps, spacing):
    """The documented block calls the UNet at diffusers' timesteps (float labels within float32 rounding)
    and its sample matches diffusers' DPMSolverMultistepScheduler loop to float32 precision; pydpm's own
    time_uniform grid of as many steps does not."""
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler(
        timestep_spacing=spacing, steps_offset=int(spacing == "leading")))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = []
    unet.register_forward_pre_hook(lambda module, args: labels.append(float(args[1].reshape(-1)[0])))
    block = recipe().replace("diffusers_times(scheduler, 20)", f"diffusers_times(scheduler, {steps})")
    scope = {"pipe": pipe, "unet": unet, "noise": noise}
    with torch.no_grad():
        exec(compile(block, str(SAMPLERS_MD), "exec"), scope)
    got, pydpm_labels = scope["sample"], labels[:]

    reference = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in reference.timesteps:
            x = reference.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(torch.tensor(pydpm_labels), reference.timesteps.float(), atol=1e-3, rtol=0)
    scale = x.abs().max()
    assert (got - x).abs().max() / scale < 2e-6

    ns = scope["ns"]
    with torch.no_grad():
        uniform = DPMSolver(scope["model_fn"], ns).sample(noise, steps=steps, order=2)
    assert (uniform - x).abs().max() / scale > 1e-5


def test_the_grid_serves_unipc_as_diffusers_defaults():
    """diffusers_times of the recipe with UniPC(variant='bh2') follows diffusers' UniPCMultistepScheduler."""
    unet = tiny_unet()
    scope = {"pipe": diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler()),
             "unet": unet, "noise": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        exec(compile(recipe(), str(SAMPLERS_MD), "exec"), scope)
        reference = diffusers.UniPCMultistepScheduler()
        times = scope["diffusers_times"](reference, 10)
        got = UniPC(scope["model_fn"], scope["ns"], variant="bh2").sample(scope["noise"], times=times, order=2)
        x = scope["noise"].clone()
        for t in reference.timesteps:
            x = reference.step(unet(x, t).sample, t, x).prev_sample
    assert (got - x).abs().max() / x.abs().max() < 2e-6


def test_diffusers_model_is_refused_with_the_wrapping_call():
    unet = tiny_unet()
    ns = NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000))
    x = torch.randn(1, 3, 8, 8)
    wrap = re.escape("model_wrapper(lambda x, t: net(x, t).sample, noise_schedule, model_type='noise')")
    for call in (lambda: pydpm.sample(unet, x, ns), lambda: DPMSolver(unet, ns), lambda: UniPC(unet, ns)):
        with pytest.raises(TypeError, match=f"model_fn is a diffusers UNet2DModel.*{wrap}"):
            call()
    with pytest.raises(TypeError, match="model_wrapper: model is a diffusers UNet2DModel.*" + re.escape(
            "model_wrapper(lambda x, t, c: net(x, t, c).sample, noise_schedule, model_type='v'")):
        model_wrapper(unet, ns, model_type="v", guidance_type="classifier-free", condition=torch.zeros(1))
    with pytest.raises(ValueError, match=r"returned a UNet2DOutput.*net\(x, t\)\.sample"):
        pydpm.sample(model_wrapper(lambda x, t: unet(x, t), ns), x, ns, steps=2)
    with torch.no_grad():
        y = pydpm.sample(model_wrapper(lambda x, t: unet(x, t).sample, ns), x, ns, steps=2)
    assert y.shape == x.shape and torch.isfinite(y).all()
