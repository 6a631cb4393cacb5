"""Importance ordering: permute FFN units and attention heads so "the first k" are the best k.

Width nesting slices the first k FFN units / heads, so before supernet training starts
from a trained model we sort them, most important first.  A permutation of hidden units
(or of whole heads) changes nothing the full model computes; only the order of the
summands, so outputs agree to float rounding.

Importance (default choices, documented in docs/supernet.md):

- FFN unit j: ``||w_1[j, :]||_1 * ||w_2[:, j]||_1`` (what flows in times what flows out);
- head h: the L1 norm of its rows of ``linear_q``, ``linear_k``, ``linear_v`` plus its
  columns of ``linear_out``.

Quantizer scales follow their weight rows (per-channel scales are permuted with them), so
reordering after the scales were set keeps the supernet's quantized outputs too.
"""

from __future__ import annotations

import torch
from torch import nn

from allinone.models.conformer import ConformerBlock, FeedForward, RelPositionSelfAttention

__all__ = ["ffn_importance", "head_importance", "reorder_ffn", "reorder_heads", "reorder_by_importance"]


def ffn_importance(ffn: FeedForward) -> torch.Tensor:
    """[units]: L1 norm of each unit's ``w_1`` row times its ``w_2`` column."""
    return ffn.w_1.weight.detach().abs().sum(1) * ffn.w_2.weight.detach().abs().sum(0)


def head_importance(att: RelPositionSelfAttention) -> torch.Tensor:
    """[heads]: L1 norm of each head's q/k/v rows and linear_out columns."""
    d_k = att.d_k
    score = sum(getattr(att, n).weight.detach().abs().sum(1) for n in ("linear_q", "linear_k", "linear_v"))
    score = score + att.linear_out.weight.detach().abs().sum(0)
    return score.view(-1, d_k).sum(1)


def _permute_rows(layer: nn.Module, index: torch.Tensor) -> None:
    """Reorder the output channels of a Linear (weight rows, bias, per-channel quantizer scales)."""
    layer.weight.copy_(layer.weight[index])
    if getattr(layer, "bias", None) is not None:
        layer.bias.copy_(layer.bias[index])
    q = getattr(layer, "quantizer", None)
    if q is not None and q.per_channel:
        for scale in q.scales.values():
            scale.copy_(scale[index])


def _permute_cols(layer: nn.Linear, index: torch.Tensor) -> None:
    """Reorder the input features of a Linear (weight columns; scales are per output row: unchanged)."""
    layer.weight.copy_(layer.weight[:, index])


@torch.no_grad()
def reorder_ffn(ffn: FeedForward) -> torch.Tensor:
    """Sort the hidden units of ``ffn`` by importance, in place; returns the permutation."""
    order = torch.argsort(ffn_importance(ffn), descending=True, stable=True)
    _permute_rows(ffn.w_1, order)
    _permute_cols(ffn.w_2, order)
    return order


@torch.no_grad()
def reorder_heads(att: RelPositionSelfAttention) -> torch.Tensor:
    """Sort the heads of ``att`` by importance, in place; returns the head permutation."""
    order = torch.argsort(head_importance(att), descending=True, stable=True)
    d_k = att.d_k
    rows = (order[:, None] * d_k + torch.arange(d_k)[None, :]).reshape(-1)  # every row of each head
    for name in ("linear_q", "linear_k", "linear_v", "linear_pos"):
        _permute_rows(getattr(att, name), rows)
    att.pos_bias_u.copy_(att.pos_bias_u[order])
    att.pos_bias_v.copy_(att.pos_bias_v[order])
    _permute_cols(att.linear_out, rows)
    return order


@torch.no_grad()
def reorder_by_importance(model: nn.Module) -> None:
    """Reorder FFN units (macaron and main FFN separately) and heads of every block of ``model``."""
    for block in model.modules():
        if isinstance(block, ConformerBlock):
            reorder_ffn(block.feed_forward)
            if block.feed_forward_macaron is not None:
                reorder_ffn(block.feed_forward_macaron)
            reorder_heads(block.self_attn)
