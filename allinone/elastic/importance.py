"""Importance ordering: permute FFN units and attention heads so "the first k" are the best k.

Width nesting slices the first k FFN units / heads, so before supernet training starts
from a trained model we sort them, most important first.  A permutation of hidden units
(or of whole heads) changes nothing the full model computes; only the order of the
summands, so outputs agree to float rounding.

Importance (default choices, documented in docs/supernet.md):

- FFN unit j: ``||w_in[j, :]||_1 * ||w_out[:, j]||_1`` (what flows in times what flows out);
- head h: the L1 norm of its rows of the query, key and value projections plus its
  columns of the output projection.

The same code serves the Conformer (``w_1`` / ``w_2``; ``linear_q/k/v/out``, and
``linear_pos``, ``pos_bias_u/v`` permuted along) and wav2vec2 / HuBERT
(``intermediate_dense`` / ``output_dense``; ``q/k/v_proj``, ``out_proj``): ``_ffn_layers``
and ``_attention_layout`` name each model's layers.

Quantizer scales follow their weight rows (per-channel scales are permuted with them), so
reordering after the scales were set keeps the supernet's quantized outputs too.
"""

from __future__ import annotations

import torch
from torch import nn

from allinone.models import wav2vec2
from allinone.models.conformer import ConformerBlock, FeedForward, RelPositionSelfAttention

__all__ = ["ffn_importance", "head_importance", "reorder_ffn", "reorder_heads", "reorder_by_importance"]


def _ffn_layers(ffn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(the Linear that makes the hidden units, the Linear that reads them) of an FFN."""
    if isinstance(ffn, FeedForward):
        return ffn.w_1, ffn.w_2
    if isinstance(ffn, wav2vec2.FeedForward):
        return ffn.intermediate_dense, ffn.output_dense
    raise TypeError(f"not a feed-forward module: {type(ffn).__name__}")


def _attention_layout(att: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear], nn.Linear,
                                              list[nn.Parameter], int]:
    """(scored row layers, every row layer, output layer, per-head [H, d] Parameters, head width)."""
    if isinstance(att, RelPositionSelfAttention):
        qkv = [att.linear_q, att.linear_k, att.linear_v]
        return qkv, qkv + [att.linear_pos], att.linear_out, [att.pos_bias_u, att.pos_bias_v], att.d_k
    if isinstance(att, wav2vec2.SelfAttention):
        qkv = [att.q_proj, att.k_proj, att.v_proj]
        return qkv, qkv, att.out_proj, [], att.head_dim
    raise TypeError(f"not a self-attention module: {type(att).__name__}")


def ffn_importance(ffn: nn.Module) -> torch.Tensor:
    """[units]: L1 norm of each unit's input-layer row times its output-layer column."""
    w_in, w_out = _ffn_layers(ffn)
    return w_in.weight.detach().abs().sum(1) * w_out.weight.detach().abs().sum(0)


def head_importance(att: nn.Module) -> torch.Tensor:
    """[heads]: L1 norm of each head's q/k/v rows and output-projection columns."""
    scored, _, out, _, d_k = _attention_layout(att)
    score = sum(layer.weight.detach().abs().sum(1) for layer in scored)
    score = score + out.weight.detach().abs().sum(0)
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
def reorder_ffn(ffn: nn.Module) -> torch.Tensor:
    """Sort the hidden units of ``ffn`` by importance, in place; returns the permutation."""
    order = torch.argsort(ffn_importance(ffn), descending=True, stable=True)
    w_in, w_out = _ffn_layers(ffn)
    _permute_rows(w_in, order)
    _permute_cols(w_out, order)
    return order


@torch.no_grad()
def reorder_heads(att: nn.Module) -> torch.Tensor:
    """Sort the heads of ``att`` by importance, in place; returns the head permutation."""
    order = torch.argsort(head_importance(att), descending=True, stable=True)
    _, row_layers, out, per_head, d_k = _attention_layout(att)
    rows = (order[:, None] * d_k + torch.arange(d_k)[None, :]).reshape(-1)  # every row of each head
    for layer in row_layers:
        _permute_rows(layer, rows)
    for p in per_head:
        p.copy_(p[order])
    _permute_cols(out, rows)
    return order


@torch.no_grad()
def reorder_by_importance(model: nn.Module) -> None:
    """Reorder FFN units and heads of every block of ``model`` (an ``ASRModel``: macaron and main
    FFN separately; or a ``Wav2Vec2CTCModel``: every transformer layer)."""
    for block in model.modules():
        if isinstance(block, ConformerBlock):
            reorder_ffn(block.feed_forward)
            if block.feed_forward_macaron is not None:
                reorder_ffn(block.feed_forward_macaron)
            reorder_heads(block.self_attn)
        elif isinstance(block, wav2vec2.EncoderLayer):
            reorder_ffn(block.feed_forward)
            reorder_heads(block.attention)
