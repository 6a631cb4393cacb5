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


def test_fbgemm_repacks_when_its_buffers_are_replaced():
    """The prepacked weight is a cache of the codes: loading others (in place) must not reuse it."""
    (qa, ba), (qb, bb) = _layer(16, 12, bias=True), _layer(16, 12, bias=True, seed=5)
    lin = Int8Linear.from_quantized(qa, ba, backend="fbgemm")
    x = torch.randn(4, 12)
    assert (lin(x) - (x @ qa.dequantize().t() + ba)).abs().max() < 0.05
    lin.load_state_dict(Int8Linear.from_quantized(qb, bb).state_dict())
    assert (lin(x) - (x @ qb.dequantize().t() + bb)).abs().max() < 0.05


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


# ----------------------------------------------------------------- Conv2d + ReLU (front end)

def _conv(in_ch, out_ch, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, 3, 2, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(2.0)
    return conv


@pytest.mark.parametrize("in_ch", [1, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_conv2d_relu_matches_reference(in_ch, bias):
    """Equal, to one output step, to the float convolution of the quantize-dequantized input
    with the dequantized weight, ReLU, then rounded to the output grid; within the bound
    (input step x sum |W| + half an output step) of the float convolution itself."""
    from allinone.quant.int8 import Int8Conv2dReLU

    conv = _conv(in_ch, 16, bias)
    x = torch.randn(2, in_ch, 23, 17) + (0.5 if in_ch > 1 else 0.0)
    exact = torch.relu(conv(x)).detach()
    out_max = float(exact.max())
    m = Int8Conv2dReLU.from_conv(conv, out_max)
    y = m(x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    w = m.dequantized_weight()
    reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")
    xq = torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range)
    step_out = out_max / 255
    sim = torch.relu(nn.functional.conv2d(xq.dequantize(), w, m.bias, 2))
    sim = torch.clamp(torch.round(sim / step_out), 0, 255) * step_out
    assert (y - sim).abs().max() <= step_out * 1.001
    ref = torch.relu(nn.functional.conv2d(x, w, m.bias, 2))
    bound = xq.q_scale() * w.abs().sum((1, 2, 3))[None, :, None, None] + step_out / 2 + 1e-5
    assert torch.all((y - ref).abs() <= bound)


def test_int8_conv2d_relu_saturates_and_rejects_bad_input():
    from allinone.quant.int8 import Int8Conv2dReLU

    conv = _conv(1, 8)
    x = torch.randn(1, 1, 15, 15)
    exact = torch.relu(conv(x)).detach()
    cap = float(exact.max()) / 2
    y = Int8Conv2dReLU.from_conv(conv, cap)(x)
    assert y.max() <= cap * 1.0001 and torch.all(y[exact > cap * 1.01] >= cap * 0.99)
    # the same layer handing its output on as a quantized tensor saturates there too, and on
    # engines whose inputs must be 7-bit (x86, fbgemm) its codes stay below 128
    m = Int8Conv2dReLU.from_conv(conv, cap)
    m.quantized_output = True
    q = m(x)
    assert q.is_quantized and q.dtype == torch.quint8
    assert q.dequantize().max() <= cap * 1.0001
    if torch.backends.quantized.engine in ("x86", "fbgemm"):
        assert int(q.int_repr().max()) <= 127
    with pytest.raises(ValueError, match="float or quint8 input"):
        m(torch.quantize_per_tensor(x, 0.1, 0, torch.qint8))
    with pytest.raises(ValueError, match="output_max must be positive"):
        Int8Conv2dReLU.from_conv(conv, 0.0)
    with pytest.raises(ValueError, match="unpadded"):
        Int8Conv2dReLU.from_conv(nn.Conv2d(1, 4, 3, 1, padding=1), 1.0)
    with pytest.raises(ValueError, match="int8 codes"):
        Int8Conv2dReLU(torch.zeros(4, 1, 3, 3), torch.ones(4), None, 2, 1.0)


def _tiny_asr():
    from allinone.models.asr import ASRModel, ASRModelConfig
    from allinone.models.conformer import ConformerConfig

    torch.manual_seed(0)
    enc = ConformerConfig(input_size=40, output_size=32, attention_heads=4, linear_units=64, num_blocks=2,
                          cnn_module_kernel=5)
    return ASRModel(ASRModelConfig(encoder=enc, vocab_size=12)).eval()


def test_front_end_to_int8_calibrates_and_stays_close():
    import copy

    from allinone.eval.latency import front_end_ranges, front_end_to_int8
    from allinone.quant.int8 import Int8Conv2dReLU

    model = _tiny_asr()
    calib = [torch.randn(45, 40) * 1.5, torch.randn(60, 40)]  # the larger peaks first
    peaks = []
    hooks = [mod.register_forward_hook(lambda m, i, o: peaks.append(float(o.max())))
             for mod in model.encoder.embed.conv if isinstance(mod, nn.ReLU)]
    with torch.no_grad():
        for f in calib:
            model.encode(f[None], torch.tensor([f.shape[0]]))
    for h in hooks:
        h.remove()
    m = copy.deepcopy(model)
    ranges = front_end_ranges(m, calib)
    # each layer's range is its largest ReLU output over the calibration utterances
    assert ranges == pytest.approx([max(peaks[0::2]), max(peaks[1::2])])
    names = front_end_to_int8(m, ranges)
    assert names == ["encoder.embed.conv.0", "encoder.embed.conv.2", "encoder.embed.out.0"]
    convs = [mod for mod in m.encoder.embed.conv if isinstance(mod, Int8Conv2dReLU)]
    assert [c.output_max for c in convs] == pytest.approx(ranges)
    assert isinstance(m.encoder.embed.out[0], Int8Linear)
    x = torch.randn(1, 80, 40)
    with torch.no_grad():
        want = model.encode(x, torch.tensor([80]))[0]
        got = m.encode(x, torch.tensor([80]))[0]
    assert 0 < (got - want).abs().max() <= 0.05 * want.abs().max()
    with pytest.raises(ValueError, match="at least one utterance"):
        front_end_ranges(model, [])
    with pytest.raises(ValueError, match="1 output ranges for a front end of 2"):
        front_end_to_int8(copy.deepcopy(model), ranges[:1])
    not_conformer = nn.Module()
    not_conformer.encoder = nn.Module()
    with pytest.raises(ValueError, match="Conformer's Conv2d subsampling front end"):
        front_end_ranges(not_conformer, calib)


def test_latency_with_int8_front_end():
    from allinone.eval.latency import front_end_ranges, measure_latency

    model = _tiny_asr()
    codes = {f"{n}.weight": QuantizedTensor.from_weight(mod.weight.detach(), 8, per_channel=True)
             for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith("encoder.encoders.")}
    feats = [torch.randn(50, 40)]
    ranges = front_end_ranges(model, feats)
    res = measure_latency(model, codes, feats, "cpu-int8-fe", repeats=1, front_end_ranges=ranges)
    assert res.ms_per_utt > 0 and res.backend == "cpu-int8-fe"
    assert isinstance(model.encoder.embed.conv[0], nn.Conv2d)  # the original is left as it is
    for backend, r in (("cpu-int8", ranges), ("cpu-fp32", ranges), ("cpu-int8-fe", None)):
        with pytest.raises(ValueError, match="cpu-int8-fe backend needs front_end_ranges"):
            measure_latency(model, codes, feats, backend, repeats=1, front_end_ranges=r)
