"""Dense bit packing of integer weight codes.

Layout (docs/quantization.md, "Packing"):

- each code becomes an unsigned field ``u`` of ``b`` bits (offset binary):
  ``b >= 2``: ``u = code + L`` with ``L = 2^(b-1) - 1``, so ``[-L, L] -> [0, 2^b - 2]``
  (``2^b - 1`` never occurs and is rejected on unpacking: a cheap corruption check);
  ``b == 1``: ``-1 -> 0``, ``+1 -> 1``;
- the codes of the flattened tensor (row-major, ``reshape(-1)``) are laid end to end:
  code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first;
- stream bit ``k`` is bit ``k % 8`` of byte ``k // 8`` (little-endian bit order), so the
  result has exactly ``ceil(n * b / 8)`` bytes; unused bits of the last byte are 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .quantizer import quant_levels

PACKABLE_BITS = range(1, 9)


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACKABLE_BITS:
        raise ValueError(f"bit-width {bits} cannot be packed; packing covers 1..8 bits")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_pack_bits(bits)
    return (numel * bits + 7) // 8


def _to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [n] (any int dtype) -> offset-binary fields [n] int16, after a range check."""
    c = codes.reshape(-1).to(torch.int16)
    levels = quant_levels(bits)
    if bits == 1:
        if c.numel() and not bool(((c == 1) | (c == -1)).all()):
            raise ValueError("1-bit codes must be -1 or +1")
        return (c + 1) // 2
    if c.numel() and (int(c.min()) < -levels or int(c.max()) > levels):
        raise ValueError(f"{bits}-bit codes must lie in [{-levels}, {levels}], "
                         f"got [{int(c.min())}, {int(c.max())}]")
    return c + levels


def _from_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset-binary fields [n] -> int8 codes [n]; the unused field value is rejected."""
    if bits == 1:
        return (2 * u - 1).to(torch.int8)
    levels = quant_levels(bits)
    if u.numel() and int(u.max()) > 2 * levels:
        raise ValueError(f"corrupt packed data: field value {int(u.max())} is not a valid {bits}-bit code")
    return (u - levels).to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in ``[-L, L]`` or {-1, +1} for 1-bit) densely.

    Returns a 1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes (on the CPU).
    Vectorised: the only Python loops run over the ``bits`` and 8 bit positions.
    """
    _check_pack_bits(bits)
    u = _to_unsigned(codes.detach().cpu(), bits).to(torch.uint8)  # [n], values < 2^bits
    n = u.numel()
    # Bit j of every field, laid out field after field: stream[i * bits + j].
    field_bits = torch.stack([(u >> j) & 1 for j in range(bits)], dim=1).reshape(-1)  # [n * bits]
    nbytes = packed_nbytes(n, bits)
    stream = torch.zeros(nbytes * 8, dtype=torch.uint8)
    stream[: n * bits] = field_bits
    stream = stream.view(nbytes, 8)
    packed = torch.zeros(nbytes, dtype=torch.uint8)
    for k in range(8):
        packed |= stream[:, k] << k
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Exact inverse of ``pack_codes``: 1-D uint8 bytes -> int8 codes of ``shape``.

    Raises ``ValueError`` when the byte count is not ``ceil(prod(shape) * bits / 8)``, when the
    padding bits are not zero, or when a field holds the unused value ``2^bits - 1``.
    """
    _check_pack_bits(bits)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    nbytes = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    if packed.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    p = packed.cpu()
    stream = torch.stack([(p >> k) & 1 for k in range(8)], dim=1).reshape(-1)  # [nbytes * 8]
    if bool(stream[n * bits:].any()):
        raise ValueError("corrupt packed data: padding bits after the last code are not zero")
    field_bits = stream[: n * bits].view(n, bits).to(torch.int16)
    u = torch.zeros(n, dtype=torch.int16)
    for j in range(bits):
        u |= field_bits[:, j] << j
    return _from_unsigned(u, bits).reshape(shape)
