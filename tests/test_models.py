"""pydpm.models: the slim wavelet-gated UNet (shapes, conditioning, gradients, feature points, argument errors)
and count_macs (hand formulas for a convolution and for pydpm's attention; the student preset's MAC budget).
Tiny configurations, except the presets' MAC count (one forward each at 1×3×32×32)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pydpm
from pydpm.models import SlimUNet, count_macs
from pydpm.nn import Attention

TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), heads=2, groups=4,
            sample_size=8)


def tiny(**overrides) -> SlimUNet:
    torch.manual_seed(0)
    return SlimUNet(**{**TINY, **overrides})


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_lazy_import():
    assert pydpm.models.SlimUNet is SlimUNet


@pytest.mark.parametrize("gates", [True, False], ids=["wavelet", "plain"])
@pytest.mark.parametrize("in_ch, out_ch", [(3, None), (4, 8)])
def test_forward_shapes(in_ch, out_ch, gates):
    model = tiny(in_channels=in_ch, out_channels=out_ch, wavelet_gates=gates)
    assert sum(isinstance(m, pydpm.nn.WaveletGateDown) for m in model.modules()) == (1 if gates else 0)
    with torch.no_grad():
        y = model(rand(2, in_ch, 8, 8), torch.tensor([3, 500]))
        assert y.shape == (2, out_ch or in_ch, 8, 8)
        assert model(rand(1, in_ch, 16, 24), torch.tensor([7])).shape == (1, out_ch or in_ch, 16, 24)


def test_timesteps_int_float_scalar():
    model = tiny()
    x = rand(2, 4, 8, 8)
    with torch.no_grad():
        ints = model(x, torch.tensor([10, 10]))
        torch.testing.assert_close(model(x, torch.tensor([10.0, 10.0])), ints)
        torch.testing.assert_close(model(x, torch.tensor(10)), ints)
        torch.testing.assert_close(model(x, 10), ints)
        torch.testing.assert_close(model(x, 10.0), ints)
        assert not torch.allclose(model(x, torch.tensor([10, 900])), ints)


def test_class_and_cross_attention_conditioning():
    model = tiny(num_classes=5, context_dim=12)
    x, t = rand(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        y = model(x, t, class_labels=torch.tensor([0, 4]), context=rand(2, 7, 12, seed=1))
        assert y.shape == x.shape
        assert not torch.allclose(y, model(x, t, class_labels=torch.tensor([1, 4]), context=rand(2, 7, 12, seed=1)))
        assert not torch.allclose(y, model(x, t, class_labels=torch.tensor([0, 4]), context=rand(2, 3, 12, seed=2)))


def test_gradients_reach_every_parameter():
    model = tiny(num_classes=3, context_dim=8, dropout=0.1)
    model(rand(2, 4, 8, 8), torch.tensor([5, 50]), class_labels=torch.tensor([0, 2]),
          context=rand(2, 3, 8, seed=1)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    nonzero = [n for n in dict(model.named_parameters())
               if ".gates.fc" in n or ".gates.temb" in n or ".to_q" in n or ".to_k" in n or ".to_v" in n]
    assert any("downsample" in n for n in nonzero) and any("upsample" in n for n in nonzero)
    assert any(".cross.to_k" in n for n in nonzero) and any(".attn.to_q" in n for n in nonzero)
    for name in nonzero:
        assert model.get_parameter(name).grad.abs().max() > 0, name


# --------------------------------------------------------------------------------------------------
# count_macs
# --------------------------------------------------------------------------------------------------

def test_count_macs_conv():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    assert count_macs(conv, rand(2, 6, 9, 7)) == 2 * 10 * 5 * 4 * 6 * 3 * 3
    grouped = nn.Conv2d(6, 4, 1, groups=2)
    assert count_macs(grouped, rand(1, 6, 5, 5)) == 25 * 4 * 3


@pytest.mark.parametrize("context_dim", [None, 24])
def test_count_macs_attention_counts_pydpm_attention(context_dim):
    """Projections + QKᵀ + AV: pydpm's attention op is counted (it runs as matmuls on the reference backend)."""
    B, N, M, dim, heads, dim_head = 2, 10, 7, 32, 2, 12
    attn = Attention(dim, heads=heads, dim_head=dim_head, context_dim=context_dim)
    inner, kv_dim, kv_len = heads * dim_head, context_dim or dim, M if context_dim else N
    context = rand(B, M, context_dim, seed=1) if context_dim else None
    projections = B * (N * dim * inner + 2 * kv_len * kv_dim * inner + N * inner * dim)
    products = 2 * B * heads * N * kv_len * dim_head                    # QKᵀ and AV
    assert count_macs(attn, rand(B, N, dim), context) == projections + products


def test_student_preset_costs_at_most_an_eighth_of_the_teacher():
    x, t = rand(1, 3, 32, 32), torch.tensor([100])
    macs = {name: count_macs(SlimUNet.preset(name, in_channels=3, sample_size=32), x, t)
            for name in ("teacher", "student")}
    assert macs["student"] > 0
    assert macs["student"] / macs["teacher"] <= 1 / 8, macs


# --------------------------------------------------------------------------------------------------
# Feature points
# --------------------------------------------------------------------------------------------------

def features(model: SlimUNet, x: torch.Tensor) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, out.shape))
             for name, module in model.feature_points().items()]
    with torch.no_grad():
        model(x, torch.tensor([3]))
    for hook in hooks:
        hook.remove()
    return shapes


def test_feature_points_pair_teacher_and_student():
    """The presets at a small size (base widths shrunk so the test stays fast): the same names, the same
    spatial sizes, and the channels feature_channels() announces."""
    x = rand(1, 3, 16, 16)
    shapes = {}
    for name, base, groups in (("teacher", 32, 8), ("student", 16, 4)):
        model = SlimUNet.preset(name, in_channels=3, sample_size=16, base_channels=base, groups=groups)
        assert list(model.feature_points()) == list(model.feature_channels()) == [
            "down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3", "out"]
        shapes[name] = features(model, x)
        assert {k: s[1] for k, s in shapes[name].items()} == model.feature_channels()
    teacher, student = shapes["teacher"], shapes["student"]
    for name in teacher:
        assert teacher[name][2:] == student[name][2:], name
    assert teacher["down2"][2:] == teacher["up2"][2:] == (4, 4) and teacher["out"][2:] == (16, 16)
    assert teacher["down1"][1] != student["down1"][1]


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: tiny(groups=32), r"SlimUNet: groups=32 does not divide the widths \[16\] \(base_channels=16"),
    (lambda: tiny(base_channels=40, channel_mult=(1, 2, 4), groups=32, sample_size=16),
     r"groups=32 does not divide the widths \[40, 80\] .*e\.g\. groups=20"),
    (lambda: tiny(sample_size=6, channel_mult=(1, 2, 2)), r"SlimUNet: sample_size=6 must be divisible by .* = 4"),
    (lambda: tiny(attention_resolutions=(16,)), r"SlimUNet: attention_resolutions=\(16,\) names \[16\]"),
    (lambda: tiny(heads=3, groups=2), r"SlimUNet: heads=3 does not divide the width 32 of level 1"),
    (lambda: tiny(channel_mult=()), r"SlimUNet: channel_mult=\(\) has no levels"),
    (lambda: tiny(base_channels=0), r"SlimUNet: base_channels=0 must be a positive int"),
    (lambda: tiny(dropout=1.0), r"SlimUNet: dropout=1.0 must lie in"),
    (lambda: SlimUNet.preset("tiny"), r"SlimUNet.preset: unknown preset 'tiny'.*\['student', 'teacher'\]"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_input_errors():
    model = tiny(num_classes=3)
    x, t, labels = rand(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    cases = [
        ((rand(2, 3, 8, 8), t, labels), r"SlimUNet: x has 3 channels .* built for 4"),
        ((rand(4, 8, 8), t, labels), r"SlimUNet: x has shape \(4, 8, 8\)"),
        ((rand(2, 4, 8, 9), t, labels), r"SlimUNet: x has shape \(2, 4, 8, 9\); H and W must be divisible by 2"),
        ((x, torch.tensor([1, 2, 3]), labels), r"SlimUNet: t has shape \(3,\) but x has batch 2"),
        ((x, t, None), r"SlimUNet: built with num_classes=3: pass class_labels"),
        ((x, t, torch.tensor([0.0, 1.0])), r"SlimUNet: class_labels is torch.float32 \(2,\); pass an int64"),
        ((x, t, torch.tensor([0])), r"SlimUNet: class_labels is torch.int64 \(1,\); .*\[B=2\]"),
    ]
    with torch.no_grad():
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                model(*args)
        with pytest.raises(ValueError, match="SlimUNet: class_labels given but the model was built without "
                                             "num_classes"):
            tiny()(x, t, class_labels=labels)
        with pytest.raises(ValueError, match="SlimUNet: context given but the model was built without context_dim"):
            tiny()(x, t, context=rand(2, 3, 8))
        cross = tiny(context_dim=8)
        with pytest.raises(ValueError, match=r"SlimUNet: built with context_dim=8: pass context \[B, M, 8\]"):
            cross(x, t)
        with pytest.raises(ValueError, match=r"SlimUNet: context has 6 features .* built for 8"):
            cross(x, t, context=rand(2, 3, 6))
        with pytest.raises(ValueError, match=r"SlimUNet: context has shape \(1, 3, 8\); it takes \[B=2"):
            cross(x, t, context=rand(1, 3, 8))
