"""Bit packing: hand-worked layouts, exact byte counts, round trips for every width (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from allinone.quant.pack import pack_codes, packed_nbytes, unpack_codes
from allinone.quant.quantizer import quant_levels


def test_layout_by_hand():
    # 3-bit: codes -3, 0, 3 -> fields 0, 3, 6 -> stream bits (LSB first) 000 110 011
    # -> byte 0 = bits 3, 4, 7 set = 8 + 16 + 128 = 152, byte 1 = bit 0 = 1.
    assert pack_codes(torch.tensor([-3, 0, 3]), 3).tolist() == [152, 1]
    # 1-bit: -1 -> 0, +1 -> 1.
    assert pack_codes(torch.tensor([-1, 1, 1, -1, 1, -1, -1, -1, 1]), 1).tolist() == [22, 1]
    # 8-bit: one byte per code, code + 127.
    assert pack_codes(torch.tensor([-127, 0, 127]), 8).tolist() == [0, 127, 254]
    # 2-bit (ternary): fields 0, 1, 2, 1 -> 0b01_10_01_00 = 100.
    assert pack_codes(torch.tensor([-1, 0, 1, 0]), 2).tolist() == [100]


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    if bits == 1:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
    L = quant_levels(bits)
    return torch.randint(-L, L + 1, shape, generator=g, dtype=torch.int8)


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       bits=st.integers(1, 8), seed=st.integers(0, 2 ** 31 - 1))
def test_round_trip_every_width(shape, bits, seed):
    codes = _codes(shape, bits, seed)
    packed = pack_codes(codes, bits)
    n = math.prod(shape)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    assert packed_nbytes(n, bits) == packed.numel()
    back = unpack_codes(packed, bits, shape)
    assert back.dtype == torch.int8 and torch.equal(back, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_large_tensor(bits):
    L = quant_levels(bits)
    codes = _codes((257, 33), bits, bits)
    codes[0, :2] = torch.tensor([-L, L] if bits > 1 else [-1, 1])
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape), codes)


def test_errors():
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="must be -1 or"):
        pack_codes(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, (5,))
    with pytest.raises(ValueError, match="not a valid 2-bit code"):
        unpack_codes(torch.tensor([3], dtype=torch.uint8), 2, (1,))  # field 0b11 is unused
    with pytest.raises(ValueError, match="padding bits"):
        unpack_codes(torch.tensor([0b10000000], dtype=torch.uint8), 3, (2,))
