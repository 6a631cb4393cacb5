"""Weight-only 4-bit Linear (``allinone.quant.int4``) against the float product with the same
dequantized weight: torch's int4 kernels must compute with exactly our codes and scales."""

import pytest
import torch
import torch.nn.functional as F

from allinone.quant.int4 import Int4WeightOnlyLinear, int4_supported_shape
from allinone.quant.quantizer import QuantizedTensor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_features, in_features, per_channel, with_bias", [
    (2048, 256, True, True),    # the Switchboard encoder's FFN w_1 (groups of 256)
    (256, 2048, True, False),   # FFN w_2
    (64, 96, False, True),      # groups of 32, one scale for the tensor
])
def test_int4_linear_computes_with_our_codes(device, out_features, in_features, per_channel, with_bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g) if with_bias else None
    q = QuantizedTensor.from_weight(w, 4, per_channel=per_channel)
    layer = Int4WeightOnlyLinear(q.codes, q.scale, bias).to(device)
    x = torch.randn(3, 7, in_features, generator=g).to(device)
    got = layer(x)
    assert got.shape == (3, 7, out_features) and got.dtype == torch.bfloat16
    want = F.linear(x.float().cpu(), q.dequantize(), bias)
    # bf16 activations and scales: a few parts in a thousand, no more (a wrong nibble order or
    # offset would be off by the size of the weights themselves)
    assert _rel_err(got.cpu(), want) < 0.01
    # and it is the 4-bit weight that is used, not the float one it came from
    assert _rel_err(F.linear(x.float().cpu(), w, bias), want) > 2 * _rel_err(got.cpu(), want)
    torch.testing.assert_close(layer.dequantized_weight().cpu(), q.dequantize())


def test_int4_linear_refuses_what_the_kernels_cannot_take():
    assert int4_supported_shape(256, 2048) and not int4_supported_shape(256, 40) and not int4_supported_shape(24, 64)
    with pytest.raises(ValueError, match="cannot take a 24x64 weight"):
        Int4WeightOnlyLinear(torch.zeros(24, 64, dtype=torch.int8), torch.ones(24))
    with pytest.raises(ValueError, match=r"4-bit codes in \[-7, 7\]"):
        Int4WeightOnlyLinear(torch.full((32, 64), 9, dtype=torch.int8), torch.ones(32))


def test_int4_linear_repacks_when_its_buffers_are_replaced():
    """The packed weight is a cache of the codes: loading other codes must not reuse it."""
    g = torch.Generator().manual_seed(1)
    qa, qb = (QuantizedTensor.from_weight(torch.randn(32, 64, generator=g), 4, per_channel=True) for _ in range(2))
    layer = Int4WeightOnlyLinear(qa.codes, qa.scale)
    x = torch.randn(5, 64, generator=g)
    assert _rel_err(layer(x), F.linear(x, qa.dequantize())) < 0.01
    layer.load_state_dict(Int4WeightOnlyLinear(qb.codes, qb.scale).state_dict())
    assert _rel_err(layer(x), F.linear(x, qb.dequantize())) < 0.01
