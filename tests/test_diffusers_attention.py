"""use_pydpm_attention takes only the blocks whose processor pydpm's reproduces, reports the others, and
restore_attention puts every previous processor back (after which diffusers' set_default_attn_processor
works again). Tiny random models on the CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,  # noqa: E402
                                                  JointAttnProcessor2_0)

from pydpm.integrations.diffusers import PydpmAttnProcessor, restore_attention, use_pydpm_attention  # noqa: E402


def unet2d_condition():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8).eval()


def processors(model) -> dict:
    return {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}


def test_processor_name_differs_from_diffusers():
    assert PydpmAttnProcessor.__name__ != AttnProcessor.__name__


def test_sd3_joint_attention_is_left_alone_and_reported():
    """SD3's joint-attention blocks (added q/k/v projections, JointAttnProcessor2_0) are not what pydpm's
    processor computes: they keep their processors, the outputs are unchanged, and the skip is reported."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    x, ctx, pooled, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.randn(2, 6), torch.tensor([3.0, 7.0])
    before = processors(model)
    with torch.no_grad():
        expected = model(x, ctx, pooled, t).sample
        with pytest.warns(UserWarning, match=r"3 of 3 attention blocks .* \(JointAttnProcessor2_0 ×3\)"):
            processor = use_pydpm_attention(model)
        got = model(x, ctx, pooled, t).sample
    assert processor.skipped == {name: "JointAttnProcessor2_0" for name in before}
    assert processors(model) == before and all(type(p) is JointAttnProcessor2_0 for p in before.values())
    assert torch.equal(got, expected)
    assert restore_attention(model) == 0


def test_restore_attention_puts_the_previous_processors_back():
    """use_pydpm_attention takes every AttnProcessor2_0 block (diffusers' set_default_attn_processor then
    refuses the model, as documented); restore_attention gives each block its own previous processor object,
    also after a second use_pydpm_attention, and set_default_attn_processor works again."""
    unet = unet2d_condition()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    before = processors(unet)
    assert before and all(type(p) is AttnProcessor2_0 for p in before.values())
    with torch.no_grad():
        expected = unet(x, 10, ctx).sample
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            processor = use_pydpm_attention(unet)
        assert processor.skipped == {}
        assert all(p is processor for p in processors(unet).values())
        torch.testing.assert_close(unet(x, 10, ctx).sample, expected, atol=2e-5, rtol=2e-5)
        with pytest.raises(ValueError, match="set_default_attn_processor"):
            unet.set_default_attn_processor()
        second = use_pydpm_attention(unet)
        assert all(p is second for p in processors(unet).values())
        assert restore_attention(unet) == len(before)
        after = processors(unet)
        assert all(after[name] is before[name] for name in before)
        assert restore_attention(unet) == 0
        assert torch.equal(unet(x, 10, ctx).sample, expected)
        unet.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in processors(unet).values())


def test_self_attention_with_its_own_group_norm_reads_normalised_keys():
    """UNet2DModel's attention blocks normalise inside the Attention module (attn.group_norm): diffusers takes
    the keys and values of self-attention from the normalised states, and so must pydpm's processor (it once
    took them from the raw states: 0.17 off on outputs of size 1.3)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8).eval()
    blocks = [m for m in unet.modules() if isinstance(m, Attention)]
    assert blocks and all(m.group_norm is not None for m in blocks)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = unet(x, 500).sample
        use_pydpm_attention(unet)
        got = unet(x, 500).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_classic_attn_processor_taken_only_where_it_matches():
    """diffusers' AttnProcessor scales by attn.scale and ignores q/k norms: blocks where that agrees with
    pydpm's processor are taken (same outputs); one with scale_qk=False (scale 1) or with q/k norms is not."""
    unet = unet2d_condition()
    unet.set_default_attn_processor()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = unet(x, 10, ctx).sample
        assert use_pydpm_attention(unet).skipped == {}
        torch.testing.assert_close(unet(x, 10, ctx).sample, expected, atol=2e-5, rtol=2e-5)

    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({"unscaled": Attention(16, heads=2, dim_head=8, scale_qk=False),
                                  "normed": Attention(16, heads=2, dim_head=8, qk_norm="layer_norm"),
                                  "plain": Attention(16, heads=2, dim_head=8)}).eval()
    blocks["normed"].set_processor(AttnProcessor())
    blocks["plain"].set_processor(AttnProcessor())
    assert type(blocks["unscaled"].processor) is AttnProcessor
    h = torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = {k: b(h) for k, b in blocks.items()}
        with pytest.warns(UserWarning, match=r"2 of 3 attention blocks .*AttnProcessor ×2"):
            processor = use_pydpm_attention(blocks)
        got = {k: b(h) for k, b in blocks.items()}
    assert processor.skipped == {"unscaled": "AttnProcessor", "normed": "AttnProcessor"}
    assert isinstance(blocks["plain"].processor, PydpmAttnProcessor)
    for k in ("unscaled", "normed"):
        assert torch.equal(got[k], expected[k])
    torch.testing.assert_close(got["plain"], expected["plain"], atol=1e-5, rtol=1e-5)


def test_arguments_are_named():
    with pytest.raises(TypeError, match="use_pydpm_attention: model is a str"):
        use_pydpm_attention("unet")
    with pytest.raises(TypeError, match="restore_attention: model is a str"):
        restore_attention("unet")
    with pytest.raises(TypeError, match="no diffusers Attention blocks"):
        use_pydpm_attention(torch.nn.Linear(2, 2))
