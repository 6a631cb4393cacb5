"""The one place where a supernet's weights become a subnet's: slice, then fake-quantize.

Shared by every elastic model (the Conformer's blocks, the wav2vec2 / HuBERT transformer
layers and, when configured, the wav2vec2 feature extractor): a layer computes with
``F.linear(x, *subnet_weight(layer, bits, rows, cols))`` (or ``F.conv1d``).  Slicing is
always "the first k" output channels / input features, so nested subnets share weights.
No model dependency, so the models can import it.
"""

from __future__ import annotations

import torch
from torch import nn

from allinone.elastic.subnet import FLOAT_BITS

__all__ = ["subnet_weight"]


def subnet_weight(
    layer: nn.Linear | nn.Conv1d, bits: int = FLOAT_BITS, rows: int | None = None, cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of ``layer`` as a subnet computes with them.

    rows: keep the first ``rows`` output channels (weight rows and bias entries);
    cols: keep the first ``cols`` input features (weight columns).  Both are views of
    the full Parameters, so gradients flow into the shared weights.  ``bits`` < 32
    fake-quantizes the sliced weight with ``layer.quantizer`` (a
    ``MultiPrecisionQuantizer`` / ``NestedQuantizer``, whose per-channel scales are
    sliced with the rows).  With no slicing and 32 bits this returns the Parameters
    themselves: the plain model.
    """
    weight, bias = layer.weight, layer.bias
    # A "slice" of every row / column is skipped: it would only add a view and, in the
    # backward, a slice_backward (zeros + copy) per weight and per bias.
    if rows is not None and rows != weight.shape[0]:
        weight = weight[:rows]
        bias = None if bias is None else bias[:rows]
    if cols is not None and cols != weight.shape[1]:
        weight = weight[:, :cols]
    if bits != FLOAT_BITS:
        quantizer = getattr(layer, "quantizer", None)
        if quantizer is None:
            raise ValueError(f"bit-width {bits} needs a model built with a 'quant' section "
                             "(this model's weights have no quantizers)")
        weight = quantizer(weight, bits)
    return weight, bias
