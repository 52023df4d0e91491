"""`pydpm.integrations.diffusers.accelerate` / `restore` on tiny random diffusers models and pipelines (SD UNets,
DiT, PixArt, SD3, Flux): what it swaps and what it reports it left, outputs against the untouched eager model,
restore puts every part back, bad arguments are named; on CUDA, the graphed forward against eager (re-capture on
a new signature, the cache bound, weight changes, training steps replayed with their backward)."""
from __future__ import annotations

import os
import warnings
import weakref

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

from pydpm.integrations import diffusers as pd  # noqa: E402

CUDA = torch.cuda.is_available()


def unet2d_condition(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8).eval().to(device, dtype)


def unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8).eval()


def processors(model) -> dict:
    return {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}


def inputs(device="cpu", dtype=torch.float32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g).to(device, dtype), torch.tensor([500] * batch, device=device),
            torch.randn(batch, 5, 24, generator=g).to(device, dtype))


def test_a_model_on_cpu_gets_pydpm_attention_and_blocks_and_no_graph():
    model = unet2d_condition()
    x, t, ctx = inputs()
    with torch.no_grad():
        want = model(x, t, encoder_hidden_states=ctx).sample
    before = processors(model)
    report = pd.accelerate(model, blocks=True)
    resnets = [m for m in model.modules() if isinstance(m, diffusers.models.resnet.ResnetBlock2D)]
    gegl = [m for m in model.modules() if isinstance(m, diffusers.models.activations.GEGLU)]
    assert report.swapped == {"attention": f"PydpmAttnProcessor on {len(before)} blocks",
                              "blocks": f"GEGLU ×{len(gegl)}, GroupNorm ×4, ResnetBlock2D (GroupNorm+SiLU) ×{len(resnets)}, "
                                        f"conv_norm_out (GroupNorm+SiLU) ×1"}
    assert report.graph is None and "nothing is captured" in report.left["cuda_graph"]
    assert "forward" not in model.__dict__ and all("forward" in m.__dict__ for m in resnets + gegl)
    assert type(model.conv_act) is torch.nn.Identity
    assert all(isinstance(p, pd.PydpmAttnProcessor) for p in processors(model).values())
    with torch.no_grad():
        got = model(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert pd.restore(model) is True and pd.restore(model) is False
    assert processors(model) == before
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert type(model.conv_act) is torch.nn.SiLU


def _tiny(kind: str):
    """Small random models of the other families accelerate swaps blocks of (float64: the swapped forwards
    must compute what diffusers' do, to rounding)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if kind == "unet2d-scale-shift":
        model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                      block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                      attention_head_dim=8, resnet_time_scale_shift="scale_shift")
        args, kwargs = (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 900])), {}
    elif kind == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                num_embeds_ada_norm=10, norm_type="ada_norm_zero")
        args = (torch.randn(2, 4, 8, 8, generator=g),)
        kwargs = {"timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7])}
    elif kind == "sd3":
        model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
                                                pos_embed_max_size=16)
        args = (torch.randn(2, 4, 8, 8, generator=g),)
        kwargs = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
                  "pooled_projections": torch.randn(2, 12, generator=g), "timestep": torch.tensor([3.0, 700.0])}
    elif kind == "flux":
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                                 pooled_projection_dim=12, guidance_embeds=False,
                                                 axes_dims_rope=(2, 2, 4))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        args = (torch.randn(2, 16, 16, generator=g),)
        kwargs = {"encoder_hidden_states": torch.randn(2, 5, 24, generator=g),
                  "pooled_projections": torch.randn(2, 12, generator=g), "timestep": torch.tensor([0.1, 0.9]),
                  "img_ids": ids.reshape(16, 3), "txt_ids": torch.zeros(5, 3)}
    else:
        model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                   cross_attention_dim=16, caption_channels=12, norm_type="ada_norm_single")
        args = (torch.randn(2, 4, 8, 8, generator=g),)
        kwargs = {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g), "timestep": torch.tensor([3, 700]),
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    double = lambda v: v.double() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return model.eval().double(), tuple(map(double, args)), {k: double(v) for k, v in kwargs.items()}


def test_blocks_are_swapped_by_default_only_where_the_forward_is_graphed():
    model = unet2d()
    report = pd.accelerate(model)
    assert "blocks" not in report.swapped and "host time" in report.left["blocks"]
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    pd.restore(model)


@pytest.mark.parametrize("kind, swapped", [
    ("unet2d-scale-shift", "GroupNorm ×3, ResnetBlock2D (GroupNorm+SiLU) ×8, conv_norm_out (GroupNorm+SiLU) ×1"),
    ("dit", "AdaLayerNormZero (LayerNorm+modulate) ×2, BasicTransformerBlock (AdaLN modulate) ×2"),
    ("pixart", "BasicTransformerBlock (AdaLN modulate) ×2"),
    ("sd3", "AdaLayerNormZero (LayerNorm+modulate) ×3"),
    ("flux", "AdaLayerNormZero (LayerNorm+modulate) ×2"),
])
def test_the_swapped_blocks_compute_what_diffusers_does(kind, swapped):
    model, args, kwargs = _tiny(kind)
    with torch.no_grad():
        want = model(*args, **kwargs).sample
    report = pd.accelerate(model, attention=False, blocks=True)
    assert report.swapped.get("blocks") == swapped
    with torch.no_grad():
        got = model(*args, **kwargs).sample
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pd.restore(model)


@pytest.mark.parametrize("kind", ["unet2d-scale-shift", "dit", "pixart", "sd3", "flux"])
def test_training_through_the_swapped_blocks_gives_diffusers_gradients(kind):
    """The fused ops' backwards inside a real model: every parameter's gradient (GroupNorm weights and biases,
    the time embedding through scale/shift and the AdaLN tables, the layers before the norms) equals eager
    autograd's."""
    model, args, kwargs = _tiny(kind)
    model.train()
    if kind == "dit":
        model.eval()  # DiT drops class labels at random in training mode

    def grads():
        model.zero_grad(set_to_none=True)
        model(*args, **kwargs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want = grads()
    pd.accelerate(model, attention=False, blocks=True)
    got = grads()
    pd.restore(model)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind, processor", [("sd3", "JointAttnProcessor2_0"), ("flux", "FluxAttnProcessor")])
def test_sd3_and_flux_keep_their_joint_attention_and_say_so(kind, processor):
    """SD3's and Flux's transformers: their joint attention (a processor pydpm's does not reproduce) is left on
    every block and named in the report, with no "attention" entry among the swapped parts; their AdaLN-Zero
    norms are swapped, and the outputs and the processors are diffusers' own after restore."""
    model, args, kwargs = _tiny(kind)
    before = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        want = model(*args, **kwargs).sample
    report = pd.accelerate(model, blocks=True)
    assert "attention" not in report.swapped and "blocks" in report.swapped
    left = {name.removeprefix("attention "): reason for name, reason in report.left.items()
            if name.startswith("attention ")}
    assert set(left) == set(before) and len(left) >= 2
    assert all(reason.startswith(f"keeps {processor}:") for reason in left.values())
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs).sample, want, rtol=1e-12, atol=1e-12)
    pd.restore(model)
    after = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    assert all(after[name] is p for name, p in before.items())


@pytest.mark.parametrize("linear_projection", [False, True])
def test_channels_last_computes_what_diffusers_does_and_restore_gives_the_weights_back(linear_projection):
    """The model in channels-last memory (float64, with the fused blocks): the same outputs and gradients as the
    NCHW model, outputs in the input's layout, the same Parameter objects converted in place and back."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=linear_projection).double()
    x, t, ctx = (v.double() if v.is_floating_point() else v for v in inputs())
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())

    def run(sample):
        model.zero_grad(set_to_none=True)
        out = model(sample, t, encoder_hidden_states=ctx).sample
        out.square().mean().backward()
        return out.detach(), {name: p.grad for name, p in model.named_parameters()}

    want, want_grads = run(x)
    report = pd.accelerate(model, channels_last=True, blocks=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert report.swapped["channels_last"].startswith("4-D weights in channels-last ×")
    transformers = [m for m in model.modules() if type(m) is diffusers.Transformer2DModel]
    assert f"Transformer2DModel output in the residual's layout ×{len(transformers)}" in report.swapped["channels_last"]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in convs)
    got, got_grads = run(x)
    assert got.is_contiguous()  # an NCHW sample gets an NCHW output
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    nhwc, _ = run(x.contiguous(memory_format=torch.channels_last))
    assert not nhwc.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, want, rtol=1e-12, atol=1e-12)
    pd.restore(model)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for name, p in model.named_parameters():
        assert p.is_contiguous() and p.stride() == weights[name].stride(), name
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=0)
    assert not [name for name, m in model.named_modules() if "_get_output_for_continuous_inputs" in m.__dict__]
    assert not model._forward_hooks


def test_channels_last_by_default_only_for_graphed_convolutional_networks():
    model, args, kwargs = _tiny("dit")
    assert "not replayed from CUDA graphs" in pd.accelerate(model).left["channels_last"]
    report = pd.accelerate(model, channels_last=True)
    assert report.swapped["channels_last"] == "4-D weights in channels-last ×1"  # the patch embedding
    pd.restore(model)
    assert model.pos_embed.proj.weight.is_contiguous()


def test_a_swapped_transformer_block_hands_what_it_does_not_cover_to_diffusers():
    """Feed-forward chunking set after the swap: the block runs diffusers' own forward, with the same result."""
    model, args, kwargs = _tiny("pixart")
    pd.accelerate(model, attention=False, blocks=True)
    with torch.no_grad():
        fused = model(*args, **kwargs).sample
    for block in model.transformer_blocks:
        block.set_chunk_feed_forward(2, dim=1)
    with torch.no_grad():
        chunked = model(*args, **kwargs).sample
    pd.restore(model)
    with torch.no_grad():
        want = model(*args, **kwargs).sample
    torch.testing.assert_close(chunked, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)


def test_transformer_blocks_it_cannot_fuse_are_left_with_the_reason():
    from diffusers.models.attention import BasicTransformerBlock

    from pydpm.integrations._blocks import swap_blocks

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "positional": BasicTransformerBlock(16, 2, 8, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
                                            positional_embeddings="sinusoidal", num_positional_embeddings=8),
        "plain": BasicTransformerBlock(16, 2, 8, norm_type="layer_norm")})
    swaps = swap_blocks(model)
    assert swaps.left == {"positional": "a positional embedding inside the block"}
    assert swaps.swapped == {"AdaLayerNormZero (LayerNorm+modulate)": 1, "GEGLU": 2}  # its norm1 on its own
    swaps.undo()


def test_blocks_it_cannot_fuse_are_left_with_the_reason():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, act_fn="mish")
    report = pd.accelerate(model, attention=False, blocks=True)
    left = {k: v for k, v in report.left.items() if k.startswith("blocks ")}
    assert len(left) == 8 and all(v == "activation Mish: pydpm fuses SiLU" for v in left.values())
    # the ResNet blocks' own norms run fused on their own; UNet2DModel's output activation is SiLU whatever act_fn
    assert report.swapped["blocks"] == "GroupNorm ×17, conv_norm_out (GroupNorm+SiLU) ×1"
    pd.restore(model)


def test_a_pipeline_gets_the_fused_scheduler_and_restore_puts_the_old_one_back():
    unet = unet2d()
    original = diffusers.DPMSolverMultistepScheduler()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=original)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    report = pd.accelerate(pipe)
    assert type(pipe.scheduler) is pd.DPMSolverMultistepScheduler
    assert report.swapped["scheduler"] == "pydpm.integrations.diffusers.DPMSolverMultistepScheduler"
    assert report.swapped["attention"] == f"PydpmAttnProcessor on {len(processors(unet))} blocks"
    got = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert abs(got - want).max() < 1e-4
    assert "scheduler" in str(report) and "cuda_graph" in str(report)
    pd.restore(pipe)
    assert pipe.scheduler is original


def test_accelerate_twice_starts_over_and_a_pipeline_and_its_model_do_not_stack():
    pipe = diffusers.DDPMPipeline(unet=unet2d(), scheduler=diffusers.DDIMScheduler())
    first = processors(pipe.unet)
    pd.accelerate(pipe)
    pd.accelerate(pipe)
    assert type(pipe.scheduler) is pd.DDIMScheduler
    pd.accelerate(pipe.unet)  # the model on its own: the pipeline's acceleration is undone first
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    pd.restore(pipe.unet)
    assert processors(pipe.unet) == first


def test_what_it_cannot_swap_is_left_and_reported():
    euler = diffusers.DDPMPipeline(unet=unet2d(), scheduler=diffusers.EulerDiscreteScheduler())
    report = pd.accelerate(euler)
    assert "fused drop-ins for DPMSolverMultistepScheduler" in report.left["scheduler"]
    assert type(euler.scheduler) is diffusers.EulerDiscreteScheduler
    refused = diffusers.DDPMPipeline(unet=unet2d(), scheduler=diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++"))
    try:
        pd.DPMSolverMultistepScheduler.from_config(refused.scheduler.config)
        pytest.skip("the drop-in takes this configuration now; pick another it refuses")
    except (ValueError, NotImplementedError) as e:
        reason = str(e)
    report = pd.accelerate(refused)
    assert report.left["scheduler"] == f"DPMSolverMultistepScheduler kept: {reason}"
    off = pd.accelerate(diffusers.DDPMPipeline(unet=unet2d(), scheduler=diffusers.DDIMScheduler()),
                        attention=False, blocks=False, channels_last=False, scheduler=False, cuda_graph=False)
    assert off.swapped == {} and off.left == {"cuda_graph": "cuda_graph=False"}


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(obj="unet"), TypeError, "obj is a str"),
    (dict(max_graphs=0), ValueError, "max_graphs"),
    (dict(max_graphs=2.5), ValueError, "max_graphs"),
    (dict(cuda_graph="yes"), TypeError, "cuda_graph"),
    (dict(attention=None), TypeError, "attention"),
    (dict(blocks=1), TypeError, "blocks"),
    (dict(channels_last="auto"), TypeError, "channels_last"),
])
def test_bad_arguments_are_named(kwargs, exc, names):
    args = {"obj": unet2d(), **kwargs}
    with pytest.raises(exc, match=names):
        pd.accelerate(args.pop("obj"), **args)


needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_graphed_forward_equals_eager_and_recaptures_per_signature(dtype):
    model = unet2d_condition("cuda", dtype)
    x, t, ctx = inputs("cuda", dtype)
    report = pd.accelerate(model, max_graphs=2)
    graph = report.graph
    with torch.no_grad():
        eager = graph.eager(x, t, encoder_hidden_states=ctx).sample
        first = model(x, t, encoder_hidden_states=ctx).sample
        again = model(x * 2, t - 100, encoder_hidden_states=ctx).sample  # same signature: a replay
        eager2 = graph.eager(x * 2, t - 100, encoder_hidden_states=ctx).sample
        scalar = model(x, 500, encoder_hidden_states=ctx).sample  # a Python timestep: one more graph
        scalar2 = model(x, 321, encoder_hidden_states=ctx).sample  # ... that serves every timestep
        eager3 = graph.eager(x, 321, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager2, rtol=0, atol=0)
    torch.testing.assert_close(scalar, eager, rtol=0, atol=0)
    torch.testing.assert_close(scalar2, eager3, rtol=0, atol=0)
    assert graph.captures == 2 and graph.replays == 4
    assert first.data_ptr() != again.data_ptr()  # outputs are copies: the next replay does not overwrite them
    x3, t3, ctx3 = inputs("cuda", dtype, batch=3)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        third = model(x3, t3, encoder_hidden_states=ctx3).sample  # over the bound of 2: eager, one warning
        model(x3, t3, encoder_hidden_states=ctx3)
        want3 = graph.eager(x3, t3, encoder_hidden_states=ctx3).sample
    assert sum("max_graphs=2" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(third, want3, rtol=0, atol=0)
    assert graph.captures == 2 and graph.eager_calls == 2
    pd.restore(model)
    assert "forward" not in model.__dict__


@needs_cuda
@pytest.mark.parametrize("kind", ["dit", "pixart", "sd3", "flux"])
def test_the_transformers_graphed_forward_equals_their_eager_forward(kind):
    """DiT, PixArt, SD3 and Flux (their keyword inputs: class labels, added conditions, pooled projections,
    Flux's position ids) replay from one graph what the same accelerated model computes eagerly."""
    model, args, kwargs = _tiny(kind)
    cuda = lambda v: v.float().cuda() if torch.is_tensor(v) and v.is_floating_point() else (  # noqa: E731
        v.cuda() if torch.is_tensor(v) else v)
    model = model.float().cuda()
    args, kwargs = tuple(map(cuda, args)), {k: cuda(v) for k, v in kwargs.items()}
    graph = pd.accelerate(model).graph
    with torch.no_grad():
        first = model(*args, **kwargs).sample
        second = model(*(a * 2 if a.is_floating_point() else a for a in args), **kwargs).sample
        want = graph.eager(*args, **kwargs).sample
        want2 = graph.eager(*(a * 2 if a.is_floating_point() else a for a in args), **kwargs).sample
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want2, rtol=0, atol=0)
    assert graph.captures == 1 and graph.replays == 2
    pd.restore(model)


def _masked(kind: str):
    """A tiny model of `kind` ("pixart" or "unet") in float64 with its call's arguments and an
    `encoder_attention_mask` [B, T] that hides different text tokens per sample."""
    if kind == "pixart":
        model, args, kwargs = _tiny("pixart")
    else:
        model = unet2d_condition(dtype=torch.float64)
        x, t, ctx = inputs(dtype=torch.float64)
        args, kwargs = (x, t), {"encoder_hidden_states": ctx}
    tokens = kwargs["encoder_hidden_states"].shape[1]
    mask = torch.ones(2, tokens, dtype=torch.float64)
    mask[0, -2:], mask[1, 1] = 0, 0
    return model, args, kwargs, mask


@pytest.mark.parametrize("kind", ["pixart", "unet"])
def test_masked_attention_goes_to_sdpa_and_computes_what_diffusers_does(kind):
    """An encoder attention mask (PixArt's pipelines pass one) reaches every cross-attention block: the pydpm
    processor hands those calls to torch's SDPA with the mask (its own kernel has none) and counts them; the
    output equals the untouched model's with the mask, which differs from its output without."""
    model, args, kwargs, mask = _masked(kind)
    with torch.no_grad():
        want = model(*args, **kwargs, encoder_attention_mask=mask).sample
        unmasked = model(*args, **kwargs).sample
    assert (want - unmasked).abs().max() > 1e-6  # the mask matters
    pd.accelerate(model)
    processor = next(p for p in processors(model).values() if isinstance(p, pd.PydpmAttnProcessor))
    with torch.no_grad():
        got = model(*args, **kwargs, encoder_attention_mask=mask).sample
    assert processor.fallbacks > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pd.restore(model)


@needs_cuda
@pytest.mark.parametrize("kind", ["pixart", "unet"])
def test_a_graphed_forward_replays_with_each_calls_mask(kind):
    """The mask is an input of the graph like any tensor: calls with other masks of the same shape replay
    the one graph, each equal to the eager forward with its own mask."""
    model, args, kwargs, mask = _masked(kind)
    cuda = lambda v: v.float().cuda() if torch.is_tensor(v) and v.is_floating_point() else (  # noqa: E731
        v.cuda() if torch.is_tensor(v) else v)
    model = model.float().cuda()
    args, kwargs = tuple(map(cuda, args)), {k: cuda(v) for k, v in kwargs.items()}
    masks = [cuda(mask), cuda(mask.flip(0)), torch.ones_like(cuda(mask))]
    graph = pd.accelerate(model).graph
    with torch.no_grad():
        got = [model(*args, **kwargs, encoder_attention_mask=m).sample for m in masks]
        want = [graph.eager(*args, **kwargs, encoder_attention_mask=m).sample for m in masks]
    assert graph.captures == 1 and graph.replays == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert (want[0] - want[2]).abs().max() > 1e-4
    pd.restore(model)


@needs_cuda
def test_weight_changes_reach_the_graph():
    model = unet2d_condition("cuda")
    x, t, ctx = inputs("cuda")
    graph = pd.accelerate(model).graph
    conv = model.conv_out
    with torch.no_grad():
        model(x, t, encoder_hidden_states=ctx)
        conv.weight.mul_(2)  # in place: the graph reads it
        in_place = model(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(in_place, graph.eager(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=0)
        assert graph.captures == 1
        conv.weight.data = conv.weight.data * 0.5  # a new tensor: every graph dropped, captured again
        replaced = model(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(replaced, graph.eager(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=0)
        assert graph.captures == 2
        model.conv_out = torch.nn.Sequential(conv, torch.nn.Identity()).cuda()  # a module registered
        model(x, t, encoder_hidden_states=ctx)
        assert graph.captures == 3
        model.train()  # the mode flag is part of the signature
        model(x, t, encoder_hidden_states=ctx)
        assert graph.captures == 4
    pd.restore(model)


def _loss(forward, sample, t, ctx):
    return forward(sample, t, encoder_hidden_states=ctx).sample.float().square().mean()


def _step(forward, sample, t, ctx) -> torch.Tensor:
    """One training step's loss (detached: no autograd graph outlives the step, as a capture needs)."""
    loss = _loss(forward, sample, t, ctx)
    loss.backward()
    return loss.detach()


def _grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name}: {m}")


class _Replayed:
    """A stand-in for a captured CUDA graph: `replay()` runs `fn` (on the CPU)."""

    def __init__(self, fn):
        self.replay = fn


def test_a_training_replay_hands_gradients_to_autograd_without_copies_and_never_changes_them_later():
    """The autograd side of a replayed training step, with stand-in graphs on the CPU (y = w·x, dL/dw = x·dL/dy;
    the forward scribbles on the static gradient, as a forward replay writes the pool where the gradients
    live): a .grad that was None becomes the graph's static gradient itself (no copy); gradients accumulate
    into .grad over steps as eagerly, with or without zero_grad(set_to_none=False), a .grad still holding the
    static gradient at the next forward keeping its tensor object and values in memory of its own; a gradient
    handed out earlier and referenced outside .grad (kept past zero_grad, from torch.autograd.grad, a view) is
    seen (`held_elsewhere`: such steps run eagerly); outputs are copies, and a step is pending until its
    backward runs or its autograd graph is dropped."""
    from torch.utils import _pytree as pytree

    from pydpm.integrations._graph import _TENSOR, _Step, _TrainGraph, _TrainReplay

    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    x, y, gy, gw = (torch.full((3,), float("nan"), dtype=torch.float64) for _ in range(4))
    forward = _Replayed(lambda: (gw.fill_(float("nan")), y.copy_(x * w.detach())))
    backward = _Replayed(lambda: gw.copy_(gy * x))
    _, spec = pytree.tree_flatten(torch.zeros(1))
    entry = _TrainGraph(forward, backward, [x], [y], [_TENSOR], spec, [gy], (w,), (gw,))

    def replay(sample):
        x.copy_(sample)
        token = _Step()
        (out,) = _TrainReplay.apply(entry, token, w)
        entry.step = weakref.ref(token)
        assert entry.pending() and out.data_ptr() != y.data_ptr()
        return out

    def step(sample, upstream):
        out = replay(sample)
        (out * upstream).sum().backward()
        assert not entry.pending()
        return out.detach()

    xs, us = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    exact = dict(rtol=1e-15, atol=0)
    out1 = step(xs[0], us[0])
    torch.testing.assert_close(out1, xs[0] * w.detach())
    assert w.grad.data_ptr() == gw.data_ptr()  # the buffer itself: no copy
    first = w.grad
    step(xs[1], us[1])  # no zero_grad: accumulated, into the same tensor, moved out of the buffer
    assert w.grad is first and w.grad.data_ptr() != gw.data_ptr()
    torch.testing.assert_close(w.grad, xs[0] * us[0] + xs[1] * us[1], **exact)
    torch.testing.assert_close(out1, xs[0] * w.detach())  # the second replay left the first output alone

    w.grad.zero_()  # zero_grad(set_to_none=False), on memory of its own
    step(xs[2], us[2])
    torch.testing.assert_close(w.grad, xs[2] * us[2], **exact)
    w.grad = None
    step(xs[3], us[3])
    assert w.grad.data_ptr() == gw.data_ptr()
    kept = w.grad
    kept.zero_()  # zero_grad(set_to_none=False) on the buffer, .grad held as well: both see the accumulation
    step(xs[4], us[4])
    assert kept is w.grad and not entry.held_elsewhere()
    torch.testing.assert_close(kept, xs[4] * us[4], **exact)

    w.grad = None
    step(xs[3], us[3])
    kept = w.grad
    w.grad = None  # zero_grad(set_to_none=True) with the gradient kept: the next replay would change it
    assert entry.held_elsewhere()
    kept = kept.clone()
    assert not entry.held_elsewhere()
    step(xs[3], us[3])
    torch.testing.assert_close(w.grad, xs[3] * us[3], **exact)

    w.grad = torch.ones(3, dtype=torch.float64)  # a .grad of its own: the buffer is added into it
    step(xs[4], us[4])
    torch.testing.assert_close(w.grad, 1 + xs[4] * us[4], **exact)
    assert w.grad.data_ptr() != gw.data_ptr() and not entry.held_elsewhere()

    w.grad = None
    (got,) = torch.autograd.grad((replay(xs[5]) * us[5]).sum(), w)
    torch.testing.assert_close(got, xs[5] * us[5], **exact)
    assert got.data_ptr() == gw.data_ptr() and entry.held_elsewhere()
    got = got.clone()
    assert not entry.held_elsewhere()
    w.grad = gw.detach()  # .grad an alias of the buffer: not "elsewhere"
    assert not entry.held_elsewhere()
    view = w.grad.view(3)
    assert entry.held_elsewhere()
    del view
    assert not entry.held_elsewhere()

    x.copy_(xs[0])
    token = _Step()
    (dropped,) = _TrainReplay.apply(entry, token, w)
    entry.step = weakref.ref(token)
    del token
    assert entry.pending()
    del dropped  # the step's autograd graph goes: nothing is pending any more
    assert not entry.pending()


def test_gradients_a_backward_returns_as_views_of_one_tensor_are_not_held_elsewhere_when_in_grad():
    """A backward can return several parameters' gradients as views of one tensor (pydpm's norms reduce ∂weight
    and ∂bias together): those views in their parameters' .grad are the graph's own, any other reference to
    that memory is held elsewhere."""
    from torch.utils import _pytree as pytree

    from pydpm.integrations._graph import _TENSOR, _TrainGraph

    w, b = (torch.nn.Parameter(torch.randn(3)) for _ in range(2))
    both = torch.randn(2, 3)
    statics = (both[0], both[1], torch.randn(0))
    del both
    unused = torch.nn.Parameter(torch.randn(0))
    _, spec = pytree.tree_flatten(torch.zeros(1))
    entry = _TrainGraph(None, None, [], [torch.zeros(1)], [_TENSOR], spec, [None], (w, b, unused), statics)
    assert not entry.held_elsewhere()
    w.grad, b.grad = statics[0].detach(), statics[1].detach()  # what autograd takes from `hand_over`
    assert not entry.held_elsewhere()
    kept = b.grad
    b.grad = None
    assert entry.held_elsewhere()
    b.grad = kept
    del kept
    assert not entry.held_elsewhere()
    view = w.grad.view(-1)
    assert entry.held_elsewhere()
    del view
    assert not entry.held_elsewhere()


@needs_cuda
def test_training_steps_replay_a_forward_and_a_backward_graph():
    """With autograd recording, the accelerated UNet replays its forward and backward from graphs: losses and
    every parameter's gradient equal the same model's eager steps, over two steps accumulated into .grad
    (no zero_grad between them: .grad, the graph's gradient buffer after the first, gets the second added); two
    forwards before one backward run the second eagerly; which parameters require grad is part of the
    signature."""
    model = unet2d_condition("cuda").train()
    x, t, ctx = inputs("cuda")
    x2 = torch.randn_like(x)
    graph = pd.accelerate(model).graph
    tol = dict(rtol=1e-4, atol=1e-6)  # the same kernels; cuDNN's weight gradients may sum in another order

    want1 = _step(graph.eager, x, t, ctx)
    g1 = _grads(model)
    want2 = _step(graph.eager, x2, t, ctx)
    g12 = _grads(model)
    model.zero_grad(set_to_none=True)

    got1 = _step(model, x, t, ctx)
    assert graph.captures == 1 and graph.replays == 1 and graph.eager_calls == 0
    _assert_grads(_grads(model), g1, **tol)
    got2 = _step(model, x2, t, ctx)
    assert graph.captures == 1 and graph.replays == 2
    torch.testing.assert_close(torch.stack([got1, got2]), torch.stack([want1, want2]), **tol)
    _assert_grads(_grads(model), g12, **tol)

    model.zero_grad(set_to_none=True)
    first, second = _loss(model, x, t, ctx), _loss(model, x2, t, ctx)  # the second: eager, the first pending
    (first + second).backward()
    del first, second  # their autograd graph: alive, it would stop the capture below (see _graph's docstring)
    assert graph.replays == 3 and graph.eager_calls == 1
    _assert_grads(_grads(model), g12, **tol)

    model.conv_in.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    _step(model, x, t, ctx)
    assert graph.captures == 2 and model.conv_in.weight.grad is None
    _assert_grads(_grads(model), {k: v for k, v in g1.items() if not k.startswith("conv_in.")}, **tol)
    pd.restore(model)


@needs_cuda
def test_a_replayed_step_leaves_its_gradient_buffers_in_grad_and_never_overwrites_a_kept_one():
    """After a replayed step every .grad is the graph's own gradient buffer (no copy, no memory added); a
    gradient kept past zero_grad(set_to_none=True) makes the next step run eagerly, with one warning, so that it
    keeps its values; once it is dropped, steps replay again."""
    model = unet2d_condition("cuda").train()
    x, t, ctx = inputs("cuda")
    graph = pd.accelerate(model).graph
    _step(model, x, t, ctx)
    (entry,) = graph.graphs.values()
    assert all(p.grad.data_ptr() == g.data_ptr() for p, g in zip(entry.params, entry.grads) if g is not None)
    held = model.conv_in.weight.grad
    want = held.clone()
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="still referenced outside .grad"):
        _step(model, torch.randn_like(x), t, ctx)
    assert graph.replays == 1 and graph.eager_calls == 1
    torch.testing.assert_close(held, want, rtol=0, atol=0)
    del held
    model.zero_grad(set_to_none=True)
    _step(model, x, t, ctx)
    assert graph.replays == 2 and graph.eager_calls == 1
    pd.restore(model)


def test_captures_turn_expandable_segments_on_only_where_the_user_chose_nothing(monkeypatch):
    """`_expandable_segments` (around every capture) with torch's allocator settings stood in for on the CPU:
    with no setting it turns expandable segments on inside and off after, and the next capture does so again
    (torch then reports the string the last capture left); a user's own setting, `expandable_segments:False`
    included, is left alone, as is another allocator backend."""
    from pydpm.integrations import _graph

    calls: list[str] = []
    settings = [""]
    monkeypatch.setattr(_graph, "_left_behind", None)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: settings[0], raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings",
                        lambda v: (calls.append(v), settings.__setitem__(0, v)), raising=False)
    backend = ["native"]
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: backend[0])
    for _ in range(2):
        with _graph._expandable_segments():
            assert calls[-1] == "expandable_segments:True"
        assert calls[-1] == "expandable_segments:False"
    assert len(calls) == 4
    for user in ("expandable_segments:False", "expandable_segments:True,max_split_size_mb:64"):
        monkeypatch.setattr(_graph, "_left_behind", None)
        settings[0] = user
        with _graph._expandable_segments():
            pass
        assert len(calls) == 4 and settings[0] == user
    settings[0], backend[0] = "", "cudaMallocAsync"
    with _graph._expandable_segments():
        pass
    assert len(calls) == 4


@needs_cuda
def test_captures_take_expandable_segments_and_leave_the_allocator_as_it_was():
    """The graphs' private pools are captured in expandable segments (a capture's pool cannot merge plain
    segments, which then reserve far more than it allocated); memory allocated after a capture is in plain
    segments again, as the user's allocator settings (none here) say."""
    settings = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments" in settings:
        pytest.skip("the allocator settings of this process choose expandable segments themselves")
    model = unet2d_condition("cuda").train()
    x, t, ctx = inputs("cuda")
    graph = pd.accelerate(model).graph
    _step(model, x, t, ctx)
    with torch.no_grad():
        model(x, t, encoder_hidden_states=ctx)
    assert graph.captures == 2
    after = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    segments = torch.cuda.memory_snapshot()
    pooled = [s for s in segments if tuple(s["segment_pool_id"]) != (0, 0)]
    assert pooled and all(s["is_expandable"] for s in pooled)
    (mine,) = (s for s in segments if s["address"] <= after.data_ptr() < s["address"] + s["total_size"])
    assert not mine["is_expandable"]
    pd.restore(model)


@needs_cuda
def test_a_training_step_under_autocast_replays_graphs():
    """Under autocast (bf16) the training graph is captured with autocast's cast cache off and replays what
    the eager step computes; the autocast state is part of the signature (an fp32 step captures again)."""
    model = unet2d_condition("cuda").train()
    x, t, ctx = inputs("cuda")
    graph = pd.accelerate(model).graph
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _step(graph.eager, x, t, ctx)
        g = _grads(model)
        model.zero_grad(set_to_none=True)
        got = _step(model, x, t, ctx)
    assert graph.captures == 1 and graph.replays == 1
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4)
    _assert_grads(_grads(model), g, rtol=2e-2, atol=1e-3)
    _step(model, x, t, ctx)
    assert graph.captures == 2
    pd.restore(model)


@needs_cuda
def test_a_failed_training_capture_warns_and_runs_eagerly():
    """An autograd graph of an earlier step still alive (a loss kept after its backward) stops the capture
    (its gradient accumulators belong to another stream): one warning that says so, the step runs eagerly
    with the right gradients, and `reset()` tries again."""
    model = unet2d_condition("cuda").train()
    x, t, ctx = inputs("cuda")
    graph = pd.accelerate(model).graph
    kept = _loss(graph.eager, x, t, ctx)
    kept.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="could not be captured"):
        _step(model, x, t, ctx)
    assert graph.captures == 0 and graph.eager_calls == 1
    _assert_grads(_grads(model), want, rtol=1e-5, atol=1e-7)
    del kept
    graph.reset()
    model.zero_grad(set_to_none=True)
    _step(model, x, t, ctx)
    assert graph.captures == 1
    _assert_grads(_grads(model), want, rtol=1e-4, atol=1e-6)
    pd.restore(model)


def test_the_example_runs():
    """examples/accelerate_pipeline.py at its small size on the CPU: the accelerated pipeline's images equal
    the eager ones. (On CUDA an fp32 model's attention runs pydpm's kernel in TF32, so the images differ by
    more; the example reports by how much.)"""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "accelerate_pipeline.py"
    spec = importlib.util.spec_from_file_location("accelerate_pipeline_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main("small", steps=4, device="cpu", verbose=False)
    assert result["max_abs_diff"] < 1e-4


@needs_cuda
@pytest.mark.parametrize("kind", ["unet-sd15", "dit-xl2"])
def test_full_size_models_keep_the_low_precision_rule(kind):
    """SD1.5's UNet and DiT-XL/2 at full size, random weights, fp16: the accelerated forward's error against the
    float32 model is at most twice the eager fp16 forward's (the rule for low-precision outputs)."""
    from pydpm.bench.models import DIT_XL2_256, SD15_UNET

    torch.manual_seed(0)
    if kind == "unet-sd15":
        model32 = diffusers.UNet2DConditionModel(**SD15_UNET).cuda().eval()
        g = torch.Generator(device="cuda").manual_seed(0)
        args = (torch.randn(2, 4, 64, 64, device="cuda", generator=g), torch.tensor([999, 999], device="cuda"))
        kwargs = {"encoder_hidden_states": torch.randn(2, 77, 768, device="cuda", generator=g)}
    else:
        model32 = diffusers.DiTTransformer2DModel(**DIT_XL2_256).cuda().eval()
        g = torch.Generator(device="cuda").manual_seed(0)
        args = (torch.randn(8, 4, 32, 32, device="cuda", generator=g),)
        kwargs = {"timestep": torch.randint(0, 1000, (8,), device="cuda", generator=g),
                  "class_labels": torch.randint(0, 1000, (8,), device="cuda", generator=g)}
    half = lambda v: v.half() if v.is_floating_point() else v  # noqa: E731
    args16, kwargs16 = tuple(map(half, args)), {k: half(v) for k, v in kwargs.items()}
    with torch.no_grad():
        want = model32(*args, **kwargs).sample.double()
        model16 = model32.half()
        eager = model16(*args16, **kwargs16).sample.double()
        report = pd.accelerate(model16)
        model16(*args16, **kwargs16)  # captures, then replays
        fast = model16(*args16, **kwargs16).sample.double()
    assert report.graph.captures == 1 and report.graph.replays == 2
    eager_err, fast_err = (eager - want).abs().max().item(), (fast - want).abs().max().item()
    print(f"{kind}: max error against float32: eager fp16 {eager_err:.3e}, accelerated fp16 {fast_err:.3e}")
    assert fast_err <= 2 * eager_err, (fast_err, eager_err)
    pd.restore(model16)
