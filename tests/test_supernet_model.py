"""The supernet's forward, extraction and importance ordering, against independent references.

Reference: ESPnet's own ConformerEncoder, cut down by hand to a subnet's shapes (fewer
blocks, per-block FFN units, fewer heads of the same width), holding weights sliced and
quantized here with numpy (symmetric per-channel max scales of the full weight, rows
sliced, round half to even).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from allinone.elastic.extract import extract, extracted_size, subnet_model_config
from allinone.elastic.importance import ffn_importance, head_importance, reorder_by_importance
from allinone.elastic.quant import quantizable_layers
from allinone.elastic.subnet import FLOAT_BITS, SubnetConfig, module_kind
from allinone.models import ASRModel, ASRModelConfig
from allinone.quant.accounting import default_quantizable

from supernet_helpers import VOCAB, assert_largest_float_step_is_the_plain_step, tiny_batch, tiny_encoder, tiny_space, tiny_supernet

espnet_conformer = pytest.importorskip("espnet2.asr.encoder.conformer_encoder")

TOL = 1e-5
SUBNETS = [
    "L4_F48_H4_B32",                               # largest, float
    "L2_F24_H2_B32",                               # depth, width, heads
    "L4_F48_H4_B8",
    "L2_F24_H2_B2",                                # smallest
    "L4_F48.24.48.24_H4.2.2.4_B8.4.2.32",           # mixed per layer
    "L2_F24_H4_BA8_BF4_BC2",                       # bits per module kind
    "L4_F24.48.24.48_H2.4.4.2_BA2.8.4.8_BF8.2.32.4_BC4.4.2.8",
]


def _block_source(name: str, subnet: SubnetConfig) -> str:
    parts = name.split(".")
    if parts[0] == "encoders":
        parts[1] = str(subnet.layers[int(parts[1])].index)
    return "encoder." + ".".join(parts)


def numpy_quantize(full: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Per-output-channel symmetric max-scale quantization of ``full``, then its leading slice."""
    levels = np.float32(2 ** (bits - 1) - 1)
    axes = tuple(range(1, full.ndim))
    scale = np.abs(full).max(axis=axes, keepdims=True) / levels
    sl = tuple(slice(0, n) for n in shape)
    codes = np.clip(np.round(full[sl] / scale[sl[:1]]), -levels, levels)
    return (codes * scale[sl[:1]]).astype(np.float32)


def espnet_reference(model: ASRModel, subnet: SubnetConfig) -> nn.Module:
    """ESPnet's ConformerEncoder reshaped to ``subnet`` with independently quantized weights."""
    enc = model.config.encoder
    ref = espnet_conformer.ConformerEncoder(**dataclasses.replace(enc, num_blocks=subnet.depth).espnet_kwargs())
    d, d_k = enc.output_size, enc.attention_head_dim
    for block, c in zip(ref.encoders, subnet.layers):
        att, w = block.self_attn, c.heads * d_k
        att.h = c.heads  # ESPnet's attention views with self.h and self.d_k: same width per head
        att.linear_q, att.linear_k, att.linear_v = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(d, w)
        att.linear_pos, att.linear_out = nn.Linear(d, w, bias=False), nn.Linear(w, d)
        att.pos_bias_u, att.pos_bias_v = nn.Parameter(torch.zeros(c.heads, d_k)), nn.Parameter(torch.zeros(c.heads, d_k))
        for ff in (block.feed_forward, block.feed_forward_macaron):
            ff.w_1, ff.w_2 = nn.Linear(d, c.ffn), nn.Linear(c.ffn, d)
    source = {k: v.detach() for k, v in model.state_dict().items()}
    state = {}
    for name, target in ref.state_dict().items():
        src_name = _block_source(name, subnet)
        full = source[src_name]
        bits = FLOAT_BITS
        if default_quantizable(src_name, full):
            bits = subnet.layers[int(name.split(".")[1])].bits(module_kind(src_name))
        if bits == FLOAT_BITS:
            state[name] = full[tuple(slice(0, n) for n in target.shape)]
        else:
            state[name] = torch.from_numpy(numpy_quantize(full.numpy(), tuple(target.shape), bits))
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def supernet():
    return tiny_supernet().eval()


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def test_largest_float_subnet_is_the_plain_model(supernet, space):
    plain = ASRModel(ASRModelConfig(encoder=tiny_encoder(), vocab_size=VOCAB)).eval()
    missing, unexpected = plain.load_state_dict(supernet.state_dict(), strict=False)
    assert not missing and all(".quantizer." in k for k in unexpected)
    # Without a quant section the keys are exactly ESPnet's (plus the ASR model's own).
    ref_keys = list(espnet_conformer.ConformerEncoder(**tiny_encoder().espnet_kwargs()).state_dict())
    assert [k[len("encoder."):] for k in plain.state_dict() if k.startswith("encoder.")] == ref_keys
    b = tiny_batch()
    with torch.no_grad():
        want, want_lens = plain.encode(b["feats"], b["feat_lens"])
        for subnet in (None, space.largest()):
            got, got_lens = supernet.encode(b["feats"], b["feat_lens"], subnet)
            assert torch.equal(got, want) and torch.equal(got_lens, want_lens)
        loss_plain = plain(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"])["loss"]
        loss_sup = supernet(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"], subnet=space.largest())["loss"]
    assert torch.equal(loss_plain, loss_sup)


def test_largest_float_subnet_costs_the_plain_models_operators(supernet, space):
    """A training step of the largest float subnet (None or spelled out) runs the plain model's
    ATen operators one for one, forward and backward: no slicing, copying or quantizer call is
    left in its path, so any time it takes beyond the plain step is not compute."""
    plain = ASRModel(ASRModelConfig(encoder=tiny_encoder(), vocab_size=VOCAB)).eval()
    plain.load_state_dict(supernet.state_dict(), strict=False)
    assert_largest_float_step_is_the_plain_step(plain, supernet, space.largest(), space.parse("L4_F48_H4_B8"),
                                                tiny_batch())


@pytest.mark.parametrize("text", SUBNETS)
def test_subnet_matches_espnet_reference(supernet, space, text):
    subnet = space.parse(text)
    b = tiny_batch(seed=1)
    with torch.no_grad():
        feats, lens = supernet.normalize(b["feats"], b["feat_lens"])
        got, got_lens = supernet.encoder(feats, lens, subnet)
        want, want_lens, _ = espnet_reference(supernet, subnet)(feats.clone(), lens)
    assert torch.equal(got_lens, want_lens)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("text", SUBNETS)
def test_extracted_equals_supernet_and_packed_file(supernet, space, text, tmp_path):
    from allinone.data.features import FbankConfig
    from allinone.data.tokenizer import CharTokenizer
    from allinone.models.saved import PACKED_WEIGHTS, load_model_dir, save_extracted
    from allinone.quant.packed_file import load_packed

    subnet = space.parse(text)
    small, quantized = extract(supernet, subnet)
    assert small.config == subnet_model_config(supernet.config, subnet)
    assert small.config.quant is None and not any(".quantizer." in k for k in small.state_dict())
    b = tiny_batch(seed=2)
    with torch.no_grad():
        want, _ = supernet.encode(b["feats"], b["feat_lens"], subnet)
        got, _ = small.encode(b["feats"], b["feat_lens"])
    assert (got - want).abs().max().item() <= TOL

    # The quantized weights are exactly what the supernet's fake quantization computes.
    expected_quantized = set()
    for name, layer, kind in quantizable_layers(small):
        j = int(name.split(".")[2])
        bits = subnet.layers[j].bits(kind)
        if bits != FLOAT_BITS:
            expected_quantized.add(name)
            assert quantized[name].bits == bits
    assert set(quantized) == expected_quantized

    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    out = save_extracted(tmp_path / "m", small, quantized, FbankConfig(n_mels=40), tok, extra={"subnet": text})
    loaded = load_model_dir(out)
    assert loaded.info["subnet"] == text
    for k, v in small.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k  # dequantized codes bit-identical
    with torch.no_grad():
        again, _ = loaded.model.encode(b["feats"], b["feat_lens"])
    assert (again - want).abs().max().item() <= TOL

    # Size: accounting == the packed file's own report == tensor bytes in the file (1%).
    report = extracted_size(small, quantized)
    packed = load_packed(out / PACKED_WEIGHTS)
    assert packed.size_report().packed_bytes == report.packed_bytes
    data_bytes = packed.file_bytes - packed.header_bytes
    assert abs(data_bytes - report.packed_bytes) <= 0.01 * report.packed_bytes
    assert report.total_params == sum(v.numel() for v in small.state_dict().values())


def test_sizes_shrink_with_the_subnet(supernet, space):
    sizes = {t: extracted_size(*extract(supernet, space.parse(t))).packed_bytes
             for t in ("L4_F48_H4_B32", "L4_F48_H4_B8", "L4_F48_H4_B4", "L4_F48_H4_B2", "L2_F48_H4_B2",
                       "L2_F24_H2_B2")}
    values = list(sizes.values())
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_nested_mode_extracts_bit_shifted_codes(space):
    from allinone.quant.quantizer import nested_codes

    model = tiny_supernet(quant={"bits": [8, 4, 2], "mode": "nested"}).eval()
    sub8, sub2 = space.parse("L2_F24_H2_B8"), space.parse("L2_F24_H2_B2")
    _, q8 = extract(model, sub8)
    small2, q2 = extract(model, sub2)
    for name in q2:
        assert torch.equal(q2[name].codes, nested_codes(q8[name].codes, 8, 2))
    b = tiny_batch()
    with torch.no_grad():
        want, _ = model.encode(b["feats"], b["feat_lens"], sub2)
        got, _ = small2.encode(b["feats"], b["feat_lens"])
    assert (got - want).abs().max().item() <= TOL


def test_uniform_float_extract_is_espnet_compatible(supernet, space):
    small, _ = extract(supernet, space.parse("L2_F24_H4_B32"))
    ref = espnet_conformer.ConformerEncoder(**small.config.encoder.espnet_kwargs()).eval()
    ref.load_state_dict(small.encoder.state_dict(), strict=True)
    with pytest.raises(ValueError, match="head width"):
        extract(supernet, space.parse("L2_F24_H2_B32"))[0].config.encoder.espnet_kwargs()
    with pytest.raises(ValueError, match="same width in every block"):
        extract(supernet, space.parse("L2_F24.48_H4_B32"))[0].config.encoder.espnet_kwargs()


def test_bad_subnets_are_refused(supernet):
    float_model = ASRModel(ASRModelConfig(encoder=tiny_encoder(), vocab_size=VOCAB)).eval()
    b = tiny_batch()
    with pytest.raises(ValueError, match="quant"):
        float_model.encode(b["feats"], b["feat_lens"], SubnetConfig.uniform(2, 24, 2, 8))
    with pytest.raises(ValueError, match="block 5"):
        supernet.encode(b["feats"], b["feat_lens"], SubnetConfig.uniform([0, 5], 24, 2, 8))
    with pytest.raises(ValueError, match="64 FFN units"):
        supernet.encode(b["feats"], b["feat_lens"], SubnetConfig.uniform(2, 64, 2, 8))
    with pytest.raises(ValueError, match="not among this quantizer's bit-widths"):
        supernet.encode(b["feats"], b["feat_lens"], SubnetConfig.uniform(2, 24, 2, 3))


def test_importance_ordering_keeps_outputs_and_sorts(space):
    model = tiny_supernet(seed=3).eval()
    # Make importance non-trivial: scale some units / heads up.
    with torch.no_grad():
        for block in model.encoder.encoders:
            block.feed_forward.w_1.weight[-5:] *= 4
            block.self_attn.linear_v.weight[-8:] *= 3  # the last head (d_k = 8)
    b = tiny_batch()
    subnets = [None, space.parse("L4_F48_H4_B8"), space.parse("L4_F48_H4_B2")]
    with torch.no_grad():
        before = [model.encode(b["feats"], b["feat_lens"], s)[0] for s in subnets]
        small_before = model.encode(b["feats"], b["feat_lens"], space.parse("L4_F24_H2_B32"))[0]
    reorder_by_importance(model)
    with torch.no_grad():
        after = [model.encode(b["feats"], b["feat_lens"], s)[0] for s in subnets]
        small_after = model.encode(b["feats"], b["feat_lens"], space.parse("L4_F24_H2_B32"))[0]
    for x, y in zip(before, after):
        assert (x - y).abs().max().item() <= TOL  # full model, float and quantized: unchanged
    assert not torch.allclose(small_before, small_after)  # but the first-k slices changed
    for block in model.encoder.encoders:
        for ffn in (block.feed_forward, block.feed_forward_macaron):
            imp = ffn_importance(ffn)
            assert torch.all(imp[:-1] >= imp[1:])
        imp = head_importance(block.self_attn)
        assert torch.all(imp[:-1] >= imp[1:])
        assert block.feed_forward.w_1.weight[:5].abs().mean() > block.feed_forward.w_1.weight[5:].abs().mean()


def test_extracted_config_keeps_the_intermediate_ctc_taps_it_has():
    """A supernet trained with intermediate CTC at blocks 1 and 3 of 4: a 2-block subnet keeps
    the tap at 1 (the one it trained with), and the weight goes when no tap is left."""
    import dataclasses

    from allinone.elastic.subnet import SubnetConfig

    model = tiny_supernet(interctc_layer_idx=[1, 3])
    config = dataclasses.replace(model.config, interctc_weight=0.3).validate()
    two = subnet_model_config(config, SubnetConfig.uniform(2, 48, 4, 8)).validate()
    assert two.encoder.interctc_layer_idx == [1] and two.interctc_weight == 0.3
    assert subnet_model_config(config, SubnetConfig.uniform(4, 48, 4, 8)).encoder.interctc_layer_idx == [1, 3]
    one = subnet_model_config(config, SubnetConfig.uniform(1, 48, 4, 8)).validate()
    assert one.encoder.interctc_layer_idx == [] and one.interctc_weight == 0.0


@pytest.mark.parametrize("taps, text, kept", [([1, 3], "L4_F24_H2_B4", [1, 3]), ([1, 3], "L2_F48_H4_B8", [1]),
                                              ([3], "L2_F24_H2_B2", [])])
def test_self_conditioned_subnets_extract_and_pack(taps, text, kept, tmp_path):
    """A self-conditioned supernet (CTC posteriors of each tap fed back through
    ``conditioning_layer``): a subnet conditions on the taps it has, and its extracted, packed
    model computes the same; one shallower than every tap is a plain encoder."""
    import dataclasses

    from allinone.data.features import FbankConfig
    from allinone.data.tokenizer import CharTokenizer
    from allinone.models.saved import load_model_dir, save_extracted

    model = tiny_supernet(interctc_layer_idx=taps, interctc_use_conditioning=True).eval()
    assert model.encoder.conditioning_layer.weight.shape == (model.config.encoder.output_size, model.config.vocab_size)
    space = tiny_space().for_model(model.config)
    model.search_space = space
    subnet = space.parse(text)
    b = tiny_batch(seed=4)
    with torch.no_grad():
        want, _ = model.encode(b["feats"], b["feat_lens"], subnet)
        # the conditioning is really applied: without it the subnet computes something else
        saved = {k: v.clone() for k, v in model.encoder.conditioning_layer.state_dict().items()}
        for p in model.encoder.conditioning_layer.parameters():
            p.zero_()
        plain, _ = model.encode(b["feats"], b["feat_lens"], subnet)
        model.encoder.conditioning_layer.load_state_dict(saved)
    assert torch.allclose(want, plain) == (not kept)
    small, quantized = extract(model, subnet)
    assert small.config.encoder.interctc_layer_idx == kept
    assert small.config.encoder.interctc_use_conditioning == bool(kept)
    assert (small.encoder.conditioning_layer is not None) == bool(kept)
    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    loaded = load_model_dir(save_extracted(tmp_path / "m", small, quantized, FbankConfig(n_mels=40), tok))
    with torch.no_grad():
        got, _ = small.encode(b["feats"], b["feat_lens"])
        again, _ = loaded.model.encode(b["feats"], b["feat_lens"])
    assert (got - want).abs().max().item() <= TOL and (again - want).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="interctc_use_conditioning needs the blocks"):
        dataclasses.replace(model.config.encoder, interctc_layer_idx=[]).validate()
