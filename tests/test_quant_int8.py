"""Int8 Linear layers on integer kernels against the dequantized float reference.

Tolerance: the weight codes are used exactly, so the only difference from the float
reference ``x @ (codes * scale).T + b`` is the dynamic quantization of the activation.
Each activation value moves by at most one activation step ``delta`` (half a step from
rounding, up to another half from the rounded zero point / clamping), so output ``j``
moves by at most ``delta * sum_k |W[j, k]|``. We assert that bound, and a much tighter
one: equality (to float32 summation error) with the float product of the explicitly
quantize-dequantized activation.
"""

import pytest
import torch
from torch import nn

from allinone.quant.int8 import Int8Linear, convert_linears_to_int8
from allinone.quant.packed_file import load_packed, save_packed
from allinone.quant.quantizer import QuantizedTensor


def _layer(out_f, in_f, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    q = QuantizedTensor.from_weight(w, 8, per_channel=True)
    b = torch.randn(out_f, generator=g) if bias else None
    return q, b


@pytest.mark.parametrize("shape", [(64, 32), (48, 20), (10, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_matches_reference(shape, bias):
    q, b = _layer(*shape, bias=bias)
    lin = Int8Linear.from_quantized(q, b, backend="fbgemm")
    x = torch.randn(3, 11, shape[1]) * 2 + 0.3
    y = lin(x)
    w = q.dequantize()
    ref = x @ w.t() + (b if b is not None else 0)
    assert y.shape == (3, 11, shape[0]) and y.dtype == torch.float32
    reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")
    xq = torch.quantize_per_tensor_dynamic(x.reshape(-1, shape[1]), torch.quint8, reduce_range)
    delta = xq.q_scale()
    bound = delta * w.abs().sum(1) + 1e-4
    assert torch.all((y - ref).abs() <= bound)
    sim = (xq.dequantize() @ w.t() + (b if b is not None else 0)).reshape(y.shape)
    torch.testing.assert_close(y, sim, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_int_mm_backend_matches_reference():
    q, b = _layer(40, 24)  # K, N not multiples of 8 on purpose (padding path), M < 17
    lin = Int8Linear.from_quantized(q, b, backend="int_mm")
    x = torch.randn(5, 24)
    y = lin(x)
    w = q.dequantize()
    sx = x.abs().amax(1, keepdim=True) / 127
    sim = torch.round(x / sx) * sx @ w.t() + b
    torch.testing.assert_close(y, sim, rtol=1e-5, atol=1e-5)
    assert torch.all((y - (x @ w.t() + b)).abs() <= 0.5 * sx * w.abs().sum(1) + 1e-5)


def test_per_tensor_scale_and_errors():
    q = QuantizedTensor.from_weight(torch.randn(8, 8), 8, per_channel=False)
    lin = Int8Linear.from_quantized(q)
    assert torch.equal(lin.dequantized_weight(), q.dequantize())
    with pytest.raises(ValueError, match="8-bit"):
        Int8Linear.from_quantized(QuantizedTensor.from_weight(torch.randn(4, 4), 4))
    with pytest.raises(ValueError, match="backend"):
        Int8Linear(q.codes, q.scale, backend="cuda-magic")


def test_convert_model_from_packed_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sd = model.state_dict()
    quantized = {"0.weight": QuantizedTensor.from_weight(sd["0.weight"], 8, per_channel=True),
                 "2.weight": QuantizedTensor.from_weight(sd["2.weight"], 4, per_channel=True)}
    path = tmp_path / "m.safetensors"
    save_packed(path, "mlp", {}, {k: v for k, v in sd.items() if k not in quantized}, quantized)
    packed = load_packed(path, expected_arch="mlp")
    model.load_state_dict(packed.state_dict)
    x = torch.randn(20, 16)
    ref = model(x)
    converted = convert_linears_to_int8(model, packed.bits, packed.quantized)
    assert converted == ["0"]  # only the 8-bit layer
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], nn.Linear)
    assert torch.equal(model[0].codes, packed.quantized["0.weight"].codes)
    y = model(x)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    # Without codes, the float weight is quantized per channel on the fly.
    m2 = nn.Sequential(nn.Linear(16, 4))
    convert_linears_to_int8(m2, {"0.weight": 8})
    assert isinstance(m2[0], Int8Linear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int_mm_on_cuda():
    q, b = _layer(2048, 256)
    lin = Int8Linear.from_quantized(q, b).cuda()  # 'auto' picks int_mm on CUDA
    x = torch.randn(7, 256, device="cuda")
    y = lin(x)
    w = q.dequantize().cuda()
    sx = x.abs().amax(1, keepdim=True) / 127
    sim = torch.round(x / sx) * sx @ w.t() + b.cuda()
    torch.testing.assert_close(y, sim, rtol=1e-4, atol=1e-4)
