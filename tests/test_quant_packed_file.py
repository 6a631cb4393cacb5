"""Packed model files: bit-identical round trip, clear errors for damaged or foreign files."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from allinone.quant.accounting import default_quantizable
from allinone.quant.packed_file import (PackedFileError, QuantizedTensor, describe_packed, load_packed,
                                        save_packed)
from allinone.quant.quantizer import MultiPrecisionQuantizer, fake_quant

CONFIG = {"input_size": 80, "output_size": 16, "num_blocks": 1, "linear_units": 24, "vocab_size": 10}


def tiny_state_dict():
    g = torch.Generator().manual_seed(0)
    shapes = {
        "encoder.embed.conv.0.weight": (4, 1, 3, 3), "encoder.embed.conv.0.bias": (4,),
        "encoder.encoders.0.feed_forward.w_1.weight": (24, 16), "encoder.encoders.0.feed_forward.w_1.bias": (24,),
        "encoder.encoders.0.feed_forward.w_2.weight": (16, 24),
        "encoder.encoders.0.self_attn.linear_q.weight": (16, 16),
        "encoder.encoders.0.conv_module.depthwise_conv.weight": (16, 1, 5),
        "encoder.encoders.0.norm_ff.weight": (16,), "encoder.encoders.0.norm_ff.bias": (16,),
        "ctc.ctc_lo.weight": (10, 16), "ctc.ctc_lo.bias": (10,),
        "decoder.embed.0.weight": (10, 16),
    }
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["normalize.mean"] = torch.randn(80, generator=g).half()  # kept in its own dtype
    sd["encoder.encoders.0.conv_module.norm.num_batches_tracked"] = torch.tensor(7)
    return sd


BITS = {"encoder.encoders.0.feed_forward.w_1.weight": 2, "encoder.encoders.0.feed_forward.w_2.weight": 3,
        "encoder.encoders.0.self_attn.linear_q.weight": 8,
        "encoder.encoders.0.conv_module.depthwise_conv.weight": 1}


def quantize_tiny(sd):
    """Fake-quantized reference weights and QuantizedTensors, via the training-time quantizer."""
    fq, quantized = {}, {}
    for i, (name, b) in enumerate(BITS.items()):
        q = MultiPrecisionQuantizer((32, b), sd[name].shape, per_channel=bool(i % 2), method="mse")
        fq[name] = q(sd[name], b).detach()
        quantized[name] = q.quantize(sd[name], b)
    return fq, quantized


@pytest.fixture
def packed(tmp_path):
    sd = tiny_state_dict()
    fq, quantized = quantize_tiny(sd)
    floats = {k: v for k, v in sd.items() if k not in quantized}
    path = tmp_path / "model.safetensors"
    save_packed(path, "conformer_asr", CONFIG, floats, quantized)
    return path, sd, fq


def test_round_trip_bit_identical(packed):
    path, sd, fq = packed
    m = load_packed(path, expected_arch="conformer_asr")
    assert m.arch == "conformer_asr" and m.config == CONFIG
    assert set(m.state_dict) == set(sd)
    for name, ref in fq.items():
        got = m.state_dict[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), name  # bit for bit
        assert m.bits[name] == BITS[name]
    for name in set(sd) - set(fq):
        assert m.bits[name] == 32 and m.state_dict[name].dtype == sd[name].dtype
        assert torch.equal(m.state_dict[name], sd[name])
    assert m.info["encoder.encoders.0.feed_forward.w_2.weight"]["mode"] == "per_channel"
    assert m.file_bytes == os.path.getsize(path)
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]  # no temporary left
    # Loadable with the plain safetensors reader (no code execution needed).
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["quantized"])  # metadata is JSON
    # Also bit-identical with a direct fake_quant of the same weight / scale / bits.
    q = m.quantized["encoder.encoders.0.self_attn.linear_q.weight"]
    w = sd["encoder.encoders.0.self_attn.linear_q.weight"]
    assert torch.equal(fake_quant(w, q.scale, 8), m.state_dict["encoder.encoders.0.self_attn.linear_q.weight"])


def test_quantizable_selection_matches_bits():
    sd = tiny_state_dict()
    chosen = {k for k, v in sd.items() if default_quantizable(k, v)}
    assert chosen == set(BITS)


def test_missing_and_not_safetensors(tmp_path):
    with pytest.raises(ValueError, match="no such packed model file"):
        load_packed(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ValueError, match="not a safetensors file|not a valid safetensors"):
        load_packed(bad)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(st_save({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="without metadata"):
        load_packed(plain)


def test_truncated(packed, tmp_path):
    path, _, _ = packed
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    for cut in (0, 4, 8, 8 + header_len // 2, 8 + header_len + 10, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|corrupt|not a safetensors"):
            load_packed(p)


def test_flipped_bytes(packed, tmp_path):
    path, _, _ = packed
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    positions = list(range(0, 8)) + list(range(8, header_end, max(1, header_end // 40))) + [
        header_end, header_end + 5, len(data) - 1]
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        p = tmp_path / "flip.safetensors"
        p.write_bytes(bytes(damaged))
        with pytest.raises(PackedFileError):
            load_packed(p)


def _rewrite(path, out, **meta_changes):
    """Copy a packed file with some metadata entries replaced (tensors unchanged)."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(meta_changes)
    out.write_bytes(st_save(tensors, metadata=meta))
    return meta


def test_version_arch_and_inconsistent_metadata(packed, tmp_path):
    path, _, _ = packed
    with pytest.raises(ValueError, match="file holds arch 'conformer_asr', expected 'wav2vec2_asr'"):
        load_packed(path, expected_arch="wav2vec2_asr")
    p = tmp_path / "v2.safetensors"
    _rewrite(path, p, format_version="2")
    with pytest.raises(ValueError, match="format version '2' is not supported"):
        load_packed(p)
    _rewrite(path, p, format="something-else")
    with pytest.raises(ValueError, match="format is 'something-else'"):
        load_packed(p)
    meta = _rewrite(path, p)
    entries = json.loads(meta["quantized"])
    name = "encoder.encoders.0.feed_forward.w_1.weight"
    for change in ({"bits": 3}, {"shape": [24, 17]}, {"scale_shape": [24, 1]}, {"mode": "per_group"}):
        bad = {**entries, name: {**entries[name], **change}}
        _rewrite(path, p, quantized=json.dumps(bad))
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_packed(p)
    missing = {k: v for k, v in entries.items() if k != name}
    _rewrite(path, p, quantized=json.dumps(missing))
    with pytest.raises(ValueError, match="has no metadata entry"):
        load_packed(p)
    _rewrite(path, p, config="{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_packed(p)


def test_save_rejects_bad_input_and_writes_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    q = QuantizedTensor(torch.zeros(4, 3, dtype=torch.int8), torch.ones(1, 1), 4, "per_channel")
    with pytest.raises(ValueError, match="does not fit mode"):
        save_packed(path, "conformer_asr", {}, {}, {"w": q})
    q = QuantizedTensor(torch.full((4, 3), 9, dtype=torch.int8), torch.ones(1, 1), 4, "per_tensor")
    with pytest.raises(ValueError, match="must lie in"):
        save_packed(path, "conformer_asr", {}, {}, {"w": q})
    assert os.listdir(tmp_path) == []


def test_describe(packed):
    path, sd, _ = packed
    text = describe_packed(path)
    assert "architecture: conformer_asr" in text
    assert "| encoder.encoders.0.feed_forward.w_1.weight | 24x16 | 2 | per_tensor |" in text
    assert "compression ratio" in text and "front-end" in text and "CTC output layer" in text
    assert f"parameters: {sum(t.numel() for t in sd.values()):,}" in text
    # every block weight of this model is quantized: their fp32 bytes over codes + scales
    q = load_packed(path).quantized
    stored = sum(math.ceil(t.codes.numel() * t.bits / 8) + 4 * t.scale.numel() for t in q.values())
    ratio = 4 * sum(t.codes.numel() for t in q.values()) / stored
    assert f"compression ratio of the quantizable weights alone (as published ratios count): {ratio:.2f}x" in text
