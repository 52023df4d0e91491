"""diffusers round trips: a pipeline saved with a pydpm scheduler (`save_pretrained`) loads back
(`from_pretrained`) with that scheduler class, its configuration, and the same samples. Tiny pipelines built
here; nothing is downloaded."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fused = pytest.importorskip("pydpm.integrations.diffusers")

SCHEDULERS = [
    (fused.DPMSolverMultistepScheduler, dict(solver_order=3, use_karras_sigmas=True)),
    (fused.DPMSolverMultistepScheduler, dict(solver_type="heun", thresholding=True, final_sigmas_type="sigma_min")),
    (fused.UniPCMultistepScheduler, dict(solver_type="bh1", disable_corrector=[1])),
    (fused.DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing")),
]


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def denoise(pipe, steps: int = 6) -> torch.Tensor:
    """The pipelines' denoising loop written out (UniPC's step() takes no generator, which DDPMPipeline passes)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    return x


def user_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("cls,options", SCHEDULERS, ids=lambda v: getattr(v, "__name__", ""))
def test_pipeline_with_pydpm_scheduler_loads_back(tmp_path, cls, options):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=cls(**options))
    expected = denoise(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["pydpm.integrations.diffusers", cls.__name__]

    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is diffusers.DDPMPipeline and type(loaded.scheduler) is cls
    assert user_config(loaded.scheduler) == user_config(pipe.scheduler)
    assert torch.equal(denoise(loaded), expected)
    # the scheduler folder alone: pydpm's class, or diffusers' own under the same _class_name
    assert type(cls.from_pretrained(tmp_path, subfolder="scheduler")) is cls
    parent = getattr(diffusers, cls.__name__)
    plain = parent.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(plain) is parent and user_config(plain) == user_config(pipe.scheduler)


def test_ddpm_pipeline_call_after_the_round_trip(tmp_path):
    """The pipeline's own __call__ (its generator passed to step()) gives the same images once loaded back."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=fused.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)

    def images(p):
        with torch.no_grad():
            return p(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=5,
                     output_type="pt").images
    expected = images(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is fused.DPMSolverMultistepScheduler
    assert torch.equal(images(loaded), expected)


def test_ddim_pipeline_converts_its_scheduler_and_the_documented_swap_restores_it(tmp_path):
    """DDIMPipeline.__init__ turns any scheduler into diffusers' DDIMScheduler (diffusers' own rule), so a
    loaded DDIMPipeline holds diffusers' class; assigning pydpm's (docs/diffusers.md) brings back the images
    of the saved pipeline."""
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = fused.DDIMScheduler.from_config(pipe.scheduler.config)
    expected = denoise(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDIMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    loaded.scheduler = fused.DDIMScheduler.from_config(loaded.scheduler.config)
    assert torch.equal(denoise(loaded), expected)
