"""Multi-head attention over the fused `pydpm.ops.attention` (flash attention on CUDA, any head dim)."""
from __future__ import annotations

import torch
from torch import nn

from pydpm.nn._checks import check_input, positive_int
from pydpm.ops.attention import attention


class Attention(nn.Module):
    """Multi-head self- or cross-attention: to_q, to_k, to_v projections, heads, to_out.

    Args: dim (query features), heads, dim_head (default dim // heads), context_dim (key/value features;
    default dim), bias (of the q/k/v projections), out_bias. forward(x [B, N, dim], context [B, M,
    context_dim] or None) -> [B, N, dim]. The heads are read in place ([B, N, H, D] views, layout 'bnhd'):
    no transposes or copies around the attention op. Bad constructor arguments and inputs of the wrong rank or
    feature count raise a ValueError (TypeError for a wrong type) naming the module and what it was built for."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, context_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True):
        super().__init__()
        dim = positive_int("Attention", "dim", dim)
        heads = positive_int("Attention", "heads", heads)
        dim_head = positive_int("Attention", "dim_head", dim_head, optional=True)
        context_dim = positive_int("Attention", "context_dim", context_dim, optional=True)
        dim_head = dim_head or dim // heads
        if dim_head < 1:
            raise ValueError(f"Attention: dim={dim} with heads={heads} leaves no head dimension; pass dim_head")
        inner = heads * dim_head
        self.dim, self.context_dim = dim, context_dim or dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input("Attention", "x", x, dims=3, channels=self.dim, channel_dim=2, unit="features",
                    layout=f"[B, N, dim={self.dim}]")
        if context is not None:
            check_input("Attention", "context", context, dims=3, channels=self.context_dim, channel_dim=2,
                        unit="features", layout=f"[B, M, context_dim={self.context_dim}]")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"Attention: context has batch {context.shape[0]} but x has {x.shape[0]}")
        context = x if context is None else context
        B, N = x.shape[:2]
        q = self.to_q(x).view(B, N, self.heads, self.dim_head)
        k = self.to_k(context).view(B, context.shape[1], self.heads, self.dim_head)
        v = self.to_v(context).view(B, context.shape[1], self.heads, self.dim_head)
        o = attention(q, k, v, layout="bnhd")
        return self.to_out(o.reshape(B, N, self.heads * self.dim_head))
