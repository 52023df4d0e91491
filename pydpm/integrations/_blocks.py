"""The block swaps of `accelerate`: diffusers modules whose forward pydpm's fused block ops compute in fewer
launches, swapped in place (an instance `forward`) and swapped back by `BlockSwaps.undo`.

    ResnetBlock2D       norm1 → SiLU as one `group_norm(..., activation="silu")`; norm2 → (1 + scale, shift)
                        → SiLU as one `group_norm(..., activation="silu", scale_shift=temb.chunk(2, dim=1))`
                        (time_embedding_norm="scale_shift"), or `h + temb` then one GroupNorm+SiLU ("default")
    conv_norm_out       a UNet's last GroupNorm with the SiLU after it (`conv_act` becomes nn.Identity)
    GroupNorm           any other nn.GroupNorm (Transformer2DModel's input norm, attention group norms)
    GEGLU               the feed-forward's `proj → chunk → a·gelu(b)` as `geglu(proj(h))`
    AdaLayerNormZero    DiT's `LN(x)·(1 + scale) + shift` as one `layer_norm_modulate`
    BasicTransformerBlock   DiT's and PixArt's blocks (norm_type "ada_norm_zero", "ada_norm_single"): the
                        modulated LayerNorms the block computes inline (PixArt's two, DiT's second) as
                        `layer_norm_modulate`

Each swapped forward is diffusers' own, line for line, with the fused op where diffusers calls the modules
it replaces; a module of another class (a subclass included), another activation, a GroupNorm without affine
parameters in a ResNet block or another `time_embedding_norm` is left as it is, and named with the reason.

`swap_layout` is the other swap: a convolutional network in channels-last (NHWC) memory. cuDNN's fp16 and bf16
convolutions on Hopper compute in NHWC, and called on NCHW tensors each convolution converts its input first
(an SD1.5 UNet forward at batch 2 on an H200: 3.1 of its 11.9 ms of device time); channels-last weights make
every convolution's output channels-last, so the next one reads it as it is. The model's 4-D parameters and
buffers are converted in place (the same Parameter objects: optimizers keep them), Transformer2DModel's
output keeps the residual's layout (diffusers' `.contiguous()` there makes an NCHW copy that the next
convolution converts back), and the model's outputs are returned in the layout of its input (an NCHW sample
gets NCHW outputs, as from the untouched model: one small copy per call).
"""
from __future__ import annotations

import collections
import functools
import types
from typing import Callable

import torch
from torch import nn

from pydpm.ops import geglu, group_norm, layer_norm_modulate


def _gn(norm: nn.GroupNorm, x: torch.Tensor, activation=None, scale_shift=None) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation, scale_shift)


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward with its two GroupNorm → (modulation →) SiLU runs fused."""
    hidden_states = _gn(self.norm1, input_tensor, "silu")
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        hidden_states = _gn(self.norm2, hidden_states, "silu", temb.chunk(2, dim=1))
    else:
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _gn(self.norm2, hidden_states, "silu")
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def _group_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _gn(self, x)


def _group_norm_silu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _gn(self, x, "silu")


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward: proj, then hidden·gelu(gate) of its two halves, fused."""
    return geglu(self.proj(hidden_states))


def _ada_norm_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """diffusers' AdaLayerNormZero.forward with its LayerNorm and modulation fused."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    norm = self.norm
    x = layer_norm_modulate(x, norm.weight, norm.bias, shift_msa, scale_msa, norm.eps)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _modulated(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm_modulate(x, norm.weight, norm.bias, shift, scale, norm.eps)


def _ada_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                       added_cond_kwargs=None):
    """What BasicTransformerBlock computes for norm_type "ada_norm_single" (PixArt) and "ada_norm_zero" (DiT):
    x + gate_msa·attn1(modulated norm) [+ attn2(...)] + gate_mlp·ff(modulated norm), each modulated LayerNorm
    one `layer_norm_modulate`. Calls this does not cover (forward chunking, GLIGEN inputs, 4-D tokens) run the
    class's own forward."""
    kwargs = dict(cross_attention_kwargs or {})
    if self._chunk_size is not None or "gligen" in kwargs or hidden_states.dim() != 3:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    single = self.norm_type == "ada_norm_single"
    if single:
        table = self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
        h = _modulated(self.norm1, hidden_states, shift_msa, scale_msa)
    else:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, timestep, class_labels,
                                                                 hidden_dtype=hidden_states.dtype)
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
    context = encoder_hidden_states if self.only_cross_attention else None
    hidden_states = gate_msa * self.attn1(h, encoder_hidden_states=context, attention_mask=attention_mask,
                                          **kwargs) + hidden_states
    if self.attn2 is not None:
        h = hidden_states if single else self.norm2(hidden_states)  # PixArt's cross-attention takes no norm
        hidden_states = self.attn2(h, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=encoder_attention_mask, **kwargs) + hidden_states
    h = _modulated(self.norm2 if single else self.norm3, hidden_states, shift_mlp, scale_mlp)
    return gate_mlp * self.ff(h) + hidden_states


def _ada_block_reason(block) -> str | None:
    norms = (block.norm1, block.norm2) if block.norm_type == "ada_norm_single" else (block.norm3,)
    if not all(type(n) is nn.LayerNorm for n in norms):
        return f"norms {', '.join(type(n).__name__ for n in norms)}: pydpm fuses nn.LayerNorm"
    if block.pos_embed is not None:
        return "a positional embedding inside the block"
    if hasattr(block, "fuser"):
        return "GLIGEN's gated attention"
    return None


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _output_in_residual_layout(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """diffusers' Transformer2DModel._get_output_for_continuous_inputs, with the tokens put back in the residual's
    layout: in a channels-last UNet the permuted tokens are channels-last already, and no copy is made."""
    layout = torch.channels_last if _is_channels_last(residual) else torch.contiguous_format

    def image(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2).contiguous(memory_format=layout)

    if self.use_linear_projection:
        return image(self.proj_out(hidden_states)) + residual
    return self.proj_out(image(hidden_states)) + residual


def _affine_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm and m.affine


def _resnet_reason(block) -> str | None:
    if not (_affine_group_norm(block.norm1) and _affine_group_norm(block.norm2)):
        return f"norms {type(block.norm1).__name__} / {type(block.norm2).__name__}: pydpm fuses affine nn.GroupNorm"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"activation {type(block.nonlinearity).__name__}: pydpm fuses SiLU"
    if block.time_embedding_norm not in ("default", "scale_shift"):
        return f"time_embedding_norm={block.time_embedding_norm!r}: pydpm fuses 'default' and 'scale_shift'"
    return None


class BlockSwaps:
    """The swaps made on one model: `swapped` (class -> count), `left` (module name -> reason), `undo()`."""

    def __init__(self) -> None:
        self.swapped: collections.Counter[str] = collections.Counter()
        self.left: dict[str, str] = {}
        self._undo: list[Callable[[], None]] = []

    def _forward(self, module: nn.Module, forward: Callable, label: str, method: str = "forward") -> None:
        setattr(module, method, types.MethodType(forward, module))
        self._undo.append(lambda: module.__dict__.pop(method, None))
        self.swapped[label] += 1

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def summary(self) -> str:
        return ", ".join(f"{label} ×{n}" for label, n in sorted(self.swapped.items()))


def swap_blocks(model: nn.Module) -> BlockSwaps:
    """Swap every block of `model` that pydpm's fused ops compute (the module docstring's table)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.normalization import AdaLayerNormZero
    from diffusers.models.resnet import ResnetBlock2D

    swaps = BlockSwaps()
    taken: set[int] = set()  # GroupNorms a swapped forward calls through the fused op already
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            reason = _resnet_reason(m) if type(m) is ResnetBlock2D else f"{type(m).__name__} subclasses ResnetBlock2D"
            if reason is None:
                swaps._forward(m, _resnet_forward, "ResnetBlock2D (GroupNorm+SiLU)")
                taken.update((id(m.norm1), id(m.norm2)))
            else:
                swaps.left[name] = reason
        elif isinstance(m, GEGLU):
            if type(m) is GEGLU:
                swaps._forward(m, _geglu_forward, "GEGLU")
            else:
                swaps.left[name] = f"{type(m).__name__} subclasses GEGLU"
        elif isinstance(m, BasicTransformerBlock) and m.norm_type in ("ada_norm_zero", "ada_norm_single"):
            reason = _ada_block_reason(m) if type(m) is BasicTransformerBlock else \
                f"{type(m).__name__} subclasses BasicTransformerBlock"
            if reason is None:
                swaps._forward(m, _ada_block_forward, "BasicTransformerBlock (AdaLN modulate)")
            else:
                swaps.left[name] = reason
        elif isinstance(m, AdaLayerNormZero):
            if type(m) is AdaLayerNormZero and type(m.norm) is nn.LayerNorm:
                swaps._forward(m, _ada_norm_zero_forward, "AdaLayerNormZero (LayerNorm+modulate)")
            else:
                swaps.left[name] = f"{type(m).__name__} with {type(m.norm).__name__}: pydpm fuses nn.LayerNorm"
    norm_out, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if isinstance(norm_out, nn.GroupNorm) and _affine_group_norm(norm_out) and type(act) is nn.SiLU:
        swaps._forward(norm_out, _group_norm_silu_forward, "conv_norm_out (GroupNorm+SiLU)")
        model.conv_act = nn.Identity()
        swaps._undo.append(lambda: setattr(model, "conv_act", act))
        taken.add(id(norm_out))
    for m in model.modules():
        if type(m) is nn.GroupNorm and id(m) not in taken:
            swaps._forward(m, _group_norm_forward, "GroupNorm")
    return swaps


def _in_layout(output, layout: torch.memory_format):
    """output (a tensor, a tuple or a diffusers BaseOutput) with its 4-D tensors in `layout`."""
    if isinstance(output, torch.Tensor):
        return output.contiguous(memory_format=layout) if output.dim() == 4 else output
    if isinstance(output, tuple):
        return type(output)(_in_layout(o, layout) for o in output)
    from diffusers.utils import BaseOutput

    if isinstance(output, BaseOutput):
        return type(output)(**{k: _in_layout(v, layout) for k, v in output.items()})
    return output


def _outputs_like_input(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the model's outputs in the layout of its sample (the first positional argument, or
    `sample` / `hidden_states`); an NCHW sample gets NCHW outputs."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or _is_channels_last(sample):
        return None
    return _in_layout(output, torch.contiguous_format)


def _to_nchw(t: torch.Tensor) -> None:
    t.data = t.data.clone(memory_format=torch.contiguous_format)


def swap_layout(model: nn.Module) -> BlockSwaps:
    """Put `model` in channels-last memory (the module docstring's `swap_layout`): its 4-D parameters and
    buffers in NCHW layout converted in place (those already in another layout are kept), Transformer2DModel's
    output in the residual's layout, the model's outputs in its input's. `undo()` converts them back."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    swaps = BlockSwaps()
    for m in model.modules():
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is None or t.dim() != 4 or not t.is_contiguous():
                    continue
                nhwc = t.data.contiguous(memory_format=torch.channels_last)
                if nhwc.stride() != t.stride():  # what Module.to(memory_format=) converts
                    t.data = nhwc
                    swaps._undo.append(functools.partial(_to_nchw, t))
                    swaps.swapped["4-D weights in channels-last"] += 1
        if type(m) is Transformer2DModel:
            swaps._forward(m, _output_in_residual_layout, "Transformer2DModel output in the residual's layout",
                           "_get_output_for_continuous_inputs")
    handle = model.register_forward_hook(_outputs_like_input, with_kwargs=True)
    swaps._undo.append(handle.remove)
    return swaps
