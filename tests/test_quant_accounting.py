"""Size accounting: hand-computed reports, quantizable selection, agreement with file bytes."""

import math
import os

import pytest
import torch

from allinone.quant.accounting import default_quantizable, float_category, size_report
from allinone.quant.packed_file import load_packed, save_packed
from allinone.quant.quantizer import QuantizedTensor


def test_default_quantizable():
    yes = ["encoder.encoders.3.feed_forward.w_1.weight", "encoder.encoders.0.self_attn.linear_out.weight",
           "encoder.encoders.11.conv_module.pointwise_conv1.weight"]
    no = ["encoder.encoders.3.feed_forward.w_1.bias", "encoder.encoders.0.norm_mha.weight",
          "encoder.embed.conv.0.weight", "ctc.ctc_lo.weight", "decoder.decoders.0.src_attn.linear_q.weight",
          "encoder.after_norm.weight", "encoder.encoders.0.conv_module.norm.weight"]
    for n in yes:
        shape = (16, 8, 1) if "conv" in n else (16, 8)
        assert default_quantizable(n, shape), n
    for n in no:
        assert not default_quantizable(n, (16, 8)), n
    assert not default_quantizable("encoder.encoders.0.conv_module.norm.running_mean", (16,))
    assert default_quantizable("encoder.layers.0.attention.k_proj.weight", (8, 8), prefixes=("encoder.layers.",))


def test_float_categories():
    assert float_category("encoder.embed.conv.0.weight") == "front-end"
    assert float_category("ctc.ctc_lo.bias") == "CTC output layer"
    assert float_category("decoder.decoders.0.norm1.weight") == "decoder"
    assert float_category("normalize.mean") == "normalisation stats"
    assert float_category("encoder.encoders.0.norm_ff.weight") == "norms"
    assert float_category("encoder.encoders.0.feed_forward.w_1.bias") == "biases"
    assert float_category("encoder.encoders.0.self_attn.pos_bias_u") == "biases"
    assert float_category("encoder.encoders.0.self_attn.weird") == "other float"


def test_report_by_hand():
    tensors = {"a.weight": (10, 20), "b.weight": (7, 3), "a.bias": (10,)}
    r = size_report(tensors, {"a.weight": 3, "b.weight": 32}, per_channel=True)
    # a: ceil(200 * 3 / 8) = 75 code bytes + 10 scales * 4; b and bias float.
    assert (r.code_bytes, r.scale_bytes, r.float_bytes) == (75, 40, 4 * 21 + 40)
    assert r.total_params == 231 and r.quantized_params == 200 and r.float_params == 31
    assert r.fp32_bytes == 4 * 231
    assert r.packed_bytes == 75 + 40 + 124
    assert r.compression_ratio == pytest.approx(924 / 239)
    assert r.average_bits == 3
    per_tensor = size_report(tensors, {"a.weight": 3}, per_channel=False)
    assert per_tensor.scale_bytes == 4
    mixed = size_report({"x.weight": (8, 8), "y.weight": (8, 24)}, {"x.weight": 2, "y.weight": 6})
    assert mixed.average_bits == pytest.approx((64 * 2 + 192 * 6) / 256)
    all_float = size_report(tensors, {})
    assert all_float.compression_ratio == 1.0 and math.isnan(all_float.average_bits)
    with pytest.raises(ValueError, match="not in the model"):
        size_report(tensors, {"c.weight": 4})
    with pytest.raises(ValueError, match="bit-width 9"):
        size_report(tensors, {"a.weight": 9})


def test_weight_bytes_by_hand():
    """The quantizable weights' own bytes: quantized ones as stored, block weights kept float at
    4 bytes; the front end, norms and biases never count."""
    tensors = {"encoder.encoders.0.ff.weight": (8, 16), "encoder.encoders.0.conv.weight": (4, 1, 3),
               "encoder.encoders.0.norm_ff.weight": (8,), "encoder.encoders.0.ff.bias": (8,),
               "encoder.embed.conv.0.weight": (4, 1, 3, 3), "ctc.ctc_lo.weight": (5, 8)}
    r = size_report(tensors, {"encoder.encoders.0.ff.weight": 2}, per_channel=True)
    # ff: ceil(128 * 2 / 8) = 32 code bytes + 8 scales * 4; conv: 12 float values * 4
    assert r.weight_bytes == 32 + 32 + 48
    assert r.weight_fp32_bytes == 4 * (128 + 12)
    assert r.weight_ratio == pytest.approx(560 / 112)
    float_model = size_report(tensors, {})
    assert float_model.weight_bytes == float_model.weight_fp32_bytes == 560
    # other prefixes: wav2vec2's layers are the quantizable ones there
    w2v = size_report({"encoder.transformer.layers.0.fc1.weight": (6, 4), "encoder.encoders.0.ff.weight": (8, 16)},
                      {}, quant_prefixes=("encoder.transformer.layers.",))
    assert w2v.weight_bytes == 4 * 24


def test_report_matches_file_bytes(tmp_path):
    """A Conformer-like block: report bytes = tensor bytes the file holds (file size - header)."""
    g = torch.Generator().manual_seed(0)
    d, ff = 64, 256
    shapes = {"encoder.embed.out.0.weight": (d, 128), "encoder.embed.out.0.bias": (d,)}
    for i in range(2):
        p = f"encoder.encoders.{i}."
        shapes.update({p + "feed_forward.w_1.weight": (ff, d), p + "feed_forward.w_1.bias": (ff,),
                       p + "feed_forward.w_2.weight": (d, ff), p + "feed_forward.w_2.bias": (d,),
                       p + "self_attn.linear_q.weight": (d, d), p + "self_attn.linear_q.bias": (d,),
                       p + "conv_module.depthwise_conv.weight": (d, 1, 15),
                       p + "norm_ff.weight": (d,), p + "norm_ff.bias": (d,)})
    shapes["ctc.ctc_lo.weight"] = (50, d)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    bit_choices = [2, 3, 4, 5, 8, 1, 6, 7]
    quantized, bits = {}, {}
    for i, name in enumerate(k for k, v in sd.items() if default_quantizable(k, v)):
        bits[name] = bit_choices[i % len(bit_choices)]
        quantized[name] = QuantizedTensor.from_weight(sd[name], bits[name], per_channel=bool(i % 2))
    path = tmp_path / "m.safetensors"
    save_packed(path, "conformer_asr", {"d": d}, {k: v for k, v in sd.items() if k not in bits}, quantized)
    m = load_packed(path)
    report = size_report(sd, bits, scale_counts={k: q.scale.numel() for k, q in quantized.items()})
    data_bytes = os.path.getsize(path) - m.header_bytes
    assert report.packed_bytes == pytest.approx(data_bytes, rel=0.01)
    assert m.size_report().packed_bytes == report.packed_bytes
    assert report.fp32_bytes == 4 * sum(v.numel() for v in sd.values())
