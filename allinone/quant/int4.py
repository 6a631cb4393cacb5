"""Inference from packed weights: 4-bit Linear layers on torch's weight-only int4 kernels.

Our 4-bit codes are symmetric, c in [-7, 7], with one scale per output channel (or one per
tensor): ``weight = c * scale``. torch's weight-only int4 GEMMs take 4-bit weights packed in
their own tile layout with a scale and a zero point per group of input channels, computing
``(nibble - 8) * scale + zero`` inside the kernel, bf16 activations in and out:

- CUDA: ``aten._weight_int4pack_mm`` (tinygemm; Ampere or newer) with weights packed by
  ``aten._convert_weight_to_int4pack`` from two nibbles per byte;
- CPU: ``aten._weight_int4pack_mm_for_cpu`` with ``aten._convert_weight_to_int4pack_for_cpu``.

The codes map onto them exactly: nibble = c + 8, every group of a row gets the row's scale,
zero point 0. So the kernel computes with the very weights the packed file stores, and the
outputs differ from the float reference only by bf16 rounding of activations and scales
(tests bound it). Whether it is faster depends on the hardware and the number of rows: on an
H200 a whole encoder on tinygemm ran one utterance in 0.90x bf16's time in one measurement and
is 10-23x slower per Linear for 32 utterances (docs/benchmarks.md 6b); on the sandbox CPU the
CPU kernel is slower than fp32 (section 3). Codes of 2 or 3 bits are 4-bit codes too, so
``allinone bench`` times it as the ``cuda-int4`` backend of every system whose quantized
weights have at most 4 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from .int8 import _buffers_key

__all__ = ["Int4WeightOnlyLinear", "int4_supported_shape"]

GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the kernels take; the largest that divides K


def _group_size(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def _inner_k_tiles(in_features: int) -> int | None:
    """tinygemm's K tiling: K must be a multiple of inner_k_tiles * 16."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def int4_supported_shape(out_features: int, in_features: int) -> bool:
    """Whether the kernels take a [out, in] weight (K in groups of >= 32, N a multiple of 16)."""
    return _group_size(in_features) is not None and _inner_k_tiles(in_features) is not None and out_features % 16 == 0


class Int4WeightOnlyLinear(nn.Module):
    """``x @ (codes * scale).T + bias`` on a weight-only int4 kernel (CUDA or CPU).

    codes: [out, in] integers in [-7, 7] (4-bit codes, or 2- and 3-bit ones); scale: [out],
    [out, 1] or one value (per tensor); bias: [out] or None. ``forward(x [..., in]) -> [..., out]`` in bf16 (the kernels' type).
    The weight is packed for the device of the first call and kept while the device and the
    buffers stay the same (packing is device-specific).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = codes.shape
        if not int4_supported_shape(out_features, in_features):
            raise ValueError(f"int4 kernels cannot take a {out_features}x{in_features} weight "
                             "(input features a multiple of 32, output features a multiple of 16)")
        if codes.abs().max() > 7:
            raise ValueError("Int4WeightOnlyLinear needs 4-bit codes in [-7, 7]")
        self.out_features, self.in_features = out_features, in_features
        self.group = _group_size(in_features)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).expand(out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None  # (key, packed weight, scales and zeros), rebuilt when device or buffers change

    def dequantized_weight(self) -> torch.Tensor:
        """The float reference weight ``codes * scale``: [out, in]."""
        return self.codes.float() * self.scale[:, None]

    def _pack(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, _buffers_key(self))
        if self._packed is None or self._packed[0] != key:
            nibbles = (self.codes.to(device, torch.int32) + 8)  # [N, K] in [1, 15]
            if device.type == "cuda":
                pairs = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8)  # even column high
                packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(self.in_features))
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
            groups = self.in_features // self.group
            scale = self.scale.to(device)[None].expand(groups, self.out_features)
            scale_zero = torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16).contiguous()
            self._packed = (key, packed, scale_zero)  # [groups, out, (scale, zero)]
        return self._packed[1], self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        packed, scale_zero = self._pack(x.device)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, self.group, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group, scale_zero)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"
