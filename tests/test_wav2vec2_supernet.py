"""The wav2vec2 / HuBERT supernet: the plain model's path, extraction, packed sizes, importance,
errors and one sandwich training step.

Tiny random models (2 convolutions, width 32, 4 layers of 4 heads of 8, FFN 48) in three
layouts: wav2vec2 base (post-LN, group-norm extractor), large (pre-LN, layer-norm
extractor) and HuBERT (a transformers ``HubertForCTC`` loaded through ``init_supernet``'s
Hugging Face path; skipped without transformers).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from allinone.elastic.extract import extract, extracted_size, subnet_model_config
from allinone.elastic.importance import ffn_importance, head_importance, reorder_by_importance
from allinone.elastic.quant import QuantConfig, init_quantizers
from allinone.elastic.subnet import FLOAT_BITS, SubnetConfig
from allinone.elastic.supernet import init_supernet
from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

from supernet_helpers import assert_largest_float_step_is_the_plain_step, tiny_space

TOL = 1e-5
VOCAB = 11
D, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 48, 4
CONV = [[16, 10, 5], [24, 3, 2]]
LAYOUTS = {
    "base": dict(extractor_mode="group_norm", extractor_conv_bias=False, encoder_layer_norm_first=False),
    "large": dict(extractor_mode="layer_norm", extractor_conv_bias=True, encoder_layer_norm_first=True),
}
SUBNETS = [
    "L2_F24_H2_B32",                           # fewer layers, FFN units and heads, float
    "L4_F48.24.48.24_H4.2.2.4_B8.4.2.32",      # per-layer widths and bits
    "L2_F24_H4_BA8_BF2_BC32",                  # attention and FFN bits differ (BC: no conv module)
    "L4_F24_H2_B4",
]


def tiny_config(layout: str = "base", quant: dict | None = None, **overrides) -> Wav2Vec2Config:
    cfg = dict(extractor_conv_layer_config=[list(c) for c in CONV], encoder_embed_dim=D,
               encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=LAYERS,
               encoder_num_heads=HEADS, encoder_ff_interm_features=FFN, vocab_size=VOCAB,
               encoder_projection_dropout=0.0, encoder_attention_dropout=0.0, encoder_dropout=0.0,
               encoder_layer_drop=0.0, quant=QuantConfig.from_dict(quant) if quant else None,
               **LAYOUTS[layout])
    cfg.update(overrides)
    return Wav2Vec2Config(**cfg)


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Norm weights start at 1 / 0: perturb them so they count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))


def supernet_of(plain: Wav2Vec2CTCModel, quant: dict | None = None, **overrides) -> Wav2Vec2CTCModel:
    """A supernet (quantizers, scales from the weights) holding ``plain``'s weights."""
    cfg = dataclasses.replace(plain.config, quant=QuantConfig.from_dict(quant or {"bits": [8, 4, 2]}), **overrides)
    model = Wav2Vec2CTCModel(cfg)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".quantizer." in k for k in missing)
    init_quantizers(model)
    return model.eval()


def plain_model(layout: str, seed: int = 0) -> Wav2Vec2CTCModel:
    torch.manual_seed(seed)
    model = Wav2Vec2CTCModel(tiny_config(layout))
    randomize_norms(model, seed + 1)
    return model.eval()


def hubert_pair(tmp_path) -> tuple[Wav2Vec2CTCModel, Wav2Vec2CTCModel]:
    """(plain, supernet) of a random transformers HubertForCTC; the supernet via init_supernet."""
    transformers = pytest.importorskip("transformers")
    from allinone.interop.huggingface import load_hf_ctc

    torch.manual_seed(0)
    hf = transformers.HubertForCTC(transformers.HubertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, conv_dim=tuple(c[0] for c in CONV), conv_kernel=tuple(c[1] for c in CONV),
        conv_stride=tuple(c[2] for c in CONV), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False, feat_proj_layer_norm=False))
    randomize_norms(hf)
    hf.save_pretrained(tmp_path)
    plain, _ = load_hf_ctc(tmp_path)
    supernet = Wav2Vec2CTCModel(dataclasses.replace(plain.config, quant=QuantConfig(bits=[8, 4, 2])))
    init_supernet(supernet, tiny_space(), init_from=tmp_path, reorder=False)
    return plain.eval(), supernet.eval()


@pytest.fixture(scope="module", params=["base", "large", "hubert"])
def pair(request, tmp_path_factory):
    if request.param == "hubert":
        return hubert_pair(tmp_path_factory.mktemp("hubert"))
    plain = plain_model(request.param)
    return plain, supernet_of(plain)


@pytest.fixture(scope="module")
def space():
    return tiny_space()  # depth 4/2, ffn 48/24, heads 4/2, bits 32/8/4/2, per layer and per kind


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1600, 1100])
    wav = torch.randn(2, 1600, generator=g)
    wav[1, 1100:] = 0.0
    tokens = torch.randint(1, VOCAB, (2, 5), generator=g)
    tokens[1, 4] = -1
    # The trainer's batch keys (its strategies call model(feats, feat_lens, tokens, token_lens)).
    return {"feats": wav, "feat_lens": lengths, "tokens": tokens, "token_lens": torch.tensor([5, 4])}


def test_no_subnet_and_largest_float_subnet_are_the_plain_model(pair, space):
    plain, supernet = pair
    sp = space.for_model(supernet.config)
    assert Wav2Vec2Config.from_dict(supernet.config.to_dict()) == supernet.config  # quant round-trips
    # Without a quant section the keys are the plain (torchaudio) ones.
    assert [k for k in supernet.state_dict() if ".quantizer." not in k] == list(plain.state_dict())
    b = batch()
    with torch.no_grad():
        want, want_lens = plain(b["feats"], b["feat_lens"])
        for subnet in (None, sp.largest()):
            got, got_lens = supernet(b["feats"], b["feat_lens"], subnet=subnet)
            assert torch.equal(got, want) and torch.equal(got_lens, want_lens)  # bit for bit
        loss_plain = plain(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"])["loss"]
        loss_sup = supernet(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"], subnet=sp.largest())["loss"]
        # Not the same system: a quantized subnet differs.
        quantized, _ = supernet(b["feats"], b["feat_lens"], subnet=sp.parse("L4_F48_H4_B2"))
    assert torch.equal(loss_plain, loss_sup) and torch.isfinite(loss_plain)
    assert not torch.allclose(quantized, want, atol=1e-3)


def test_largest_float_subnet_costs_the_plain_models_operators(pair, space):
    """A training step of the largest float subnet runs the plain model's ATen operators one for
    one (docs/benchmarks.md 7: the HuBERT-large supernet step timed 1.15x ours plain on a GPU)."""
    plain, supernet = pair
    sp = space.for_model(supernet.config)
    assert_largest_float_step_is_the_plain_step(plain, supernet, sp.largest(), sp.parse("L4_F48_H4_B8"), batch())


@pytest.mark.parametrize("text", SUBNETS)
def test_extracted_model_equals_the_supernet_subnet(pair, space, text):
    _, supernet = pair
    subnet = space.for_model(supernet.config).parse(text)
    small, quantized = extract(supernet, subnet)
    assert type(small) is Wav2Vec2CTCModel and small.config == subnet_model_config(supernet.config, subnet)
    assert small.config.quant is None and not any(".quantizer." in k for k in small.state_dict())
    assert small.config.encoder_num_layers == subnet.depth
    b = batch(seed=1)
    with torch.no_grad():
        want, want_lens = supernet(b["feats"], b["feat_lens"], subnet=subnet)
        got, got_lens = small(b["feats"], b["feat_lens"])
    assert torch.equal(got_lens, want_lens)
    assert (got - want).abs().max().item() <= TOL
    # Exactly the transformer weights the subnet quantizes, at its bits; the rest is float.
    expected = {}
    for j, c in enumerate(subnet.layers):
        for kind, names in (("attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
                            ("ffn", ("intermediate_dense", "output_dense"))):
            if c.bits(kind) != FLOAT_BITS:
                p = f"encoder.transformer.layers.{j}.{'attention' if kind == 'attn' else 'feed_forward'}"
                expected.update({f"{p}.{n}.weight": c.bits(kind) for n in names})
    assert {k: q.bits for k, q in quantized.items()} == expected


def test_uniform_float_extract_is_a_published_layout(pair):
    _, supernet = pair
    small, _ = extract(supernet, SubnetConfig.uniform(2, 24, HEADS, FLOAT_BITS))
    cfg = small.config
    assert (cfg.encoder_head_dim, cfg.encoder_layer_num_heads, cfg.encoder_layer_ff_interm_features) == (None,) * 3
    narrow, _ = extract(supernet, SubnetConfig.uniform(2, 24, 2, FLOAT_BITS))
    assert narrow.config.encoder_head_dim == HEAD_DIM and narrow.config.encoder_num_heads == 2


def _theoretical_bytes(small: Wav2Vec2CTCModel, subnet: SubnetConfig, extractor_bits: int) -> int:
    """Bytes of codes (ceil(n * b / 8)) + 4 per per-channel scale for the quantized weights,
    4 per value for every other tensor; the quantized shapes follow from the subnet alone."""
    weights = []  # (rows, cols, bits) of each quantized weight
    for c in subnet.layers:
        w = c.heads * HEAD_DIM
        if c.bits_attn != FLOAT_BITS:
            weights += [(w, D, c.bits_attn)] * 3 + [(D, w, c.bits_attn)]
        if c.bits_ffn != FLOAT_BITS:
            weights += [(c.ffn, D, c.bits_ffn), (D, c.ffn, c.bits_ffn)]
    if extractor_bits != FLOAT_BITS:
        in_ch = 1
        for out_ch, kernel, _ in CONV:
            weights.append((out_ch, in_ch * kernel, extractor_bits))
            in_ch = out_ch
    quantized_numel = sum(r * k for r, k, _ in weights)
    float_numel = sum(v.numel() for v in small.state_dict().values()) - quantized_numel
    return sum(math.ceil(r * k * b / 8) + 4 * r for r, k, b in weights) + 4 * float_numel


@pytest.mark.parametrize("extractor_bits", [FLOAT_BITS, 8])
@pytest.mark.parametrize("text", ["L4_F48.24.48.24_H4.2.2.4_B8.4.2.32", "L2_F24_H2_B2", "L3_F24_H2_B4"])
def test_packed_size_is_the_bit_count(extractor_bits, text, tmp_path):
    from allinone.quant.packed_file import load_packed, save_packed

    supernet = supernet_of(plain_model("base"), extractor_bits=extractor_bits)
    sp = tiny_space(depth=[4, 3, 2]).for_model(supernet.config)
    subnet = sp.parse(text)
    small, quantized = extract(supernet, subnet)
    report = extracted_size(small, quantized)
    assert report.packed_bytes == _theoretical_bytes(small, subnet, extractor_bits)
    assert report.total_params == sum(v.numel() for v in small.state_dict().values())
    extractor = {k for k in quantized if k.startswith("feature_extractor.")}
    assert len(extractor) == (len(CONV) if extractor_bits != FLOAT_BITS else 0)

    # The packed file: same accounting, tensor bytes within 1%, and it loads into the plain
    # model of the extracted config with the same logits as the supernet's subnet.
    path = tmp_path / "model.packed.safetensors"
    state = small.state_dict()
    save_packed(path, "wav2vec2_ctc", small.config.to_dict(),
                {k: v for k, v in state.items() if k not in quantized}, quantized)
    packed = load_packed(path)
    assert packed.size_report().packed_bytes == report.packed_bytes
    assert abs(packed.file_bytes - packed.header_bytes - report.packed_bytes) <= 0.01 * report.packed_bytes
    loaded = Wav2Vec2CTCModel(Wav2Vec2Config.from_dict(packed.config)).eval()
    loaded.load_state_dict(packed.state_dict, strict=True)
    b = batch(seed=2)
    with torch.no_grad():
        want, _ = supernet(b["feats"], b["feat_lens"], subnet=subnet)
        got, _ = loaded(b["feats"], b["feat_lens"])
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["base", "large"])
def test_importance_ordering_keeps_the_full_model(layout, space):
    model = supernet_of(plain_model(layout, seed=3))
    sp = space.for_model(model.config)
    with torch.no_grad():  # make importance non-trivial: scale up the last units / head
        for layer in model.encoder.transformer.layers:
            layer.feed_forward.intermediate_dense.weight[-5:] *= 4
            layer.attention.v_proj.weight[-HEAD_DIM:] *= 3
    b = batch()
    subnets = [None, sp.parse("L4_F48_H4_B8"), sp.parse("L4_F48_H4_B2")]
    narrow = sp.parse("L4_F24_H2_B32")
    with torch.no_grad():
        before = [model(b["feats"], b["feat_lens"], subnet=s)[0] for s in subnets]
        narrow_before = model(b["feats"], b["feat_lens"], subnet=narrow)[0]
    reorder_by_importance(model)
    with torch.no_grad():
        after = [model(b["feats"], b["feat_lens"], subnet=s)[0] for s in subnets]
        narrow_after = model(b["feats"], b["feat_lens"], subnet=narrow)[0]
    for x, y in zip(before, after):
        assert (x - y).abs().max().item() <= TOL  # full model, float and quantized: unchanged
    assert not torch.allclose(narrow_before, narrow_after)  # the first-k slices changed
    for layer in model.encoder.transformer.layers:
        for imp in (ffn_importance(layer.feed_forward), head_importance(layer.attention)):
            assert torch.all(imp[:-1] >= imp[1:])
        w = layer.feed_forward.intermediate_dense.weight
        assert w[:5].abs().mean() > w[5:].abs().mean()


def test_bad_subnets_and_spaces_are_refused(space):
    plain = plain_model("base")
    supernet = supernet_of(plain, quant={"bits": [8, 4]})
    b = batch()
    with pytest.raises(ValueError, match=r"bits \[2\] need quantizers.*8, 4"):
        space.for_model(supernet.config)
    with pytest.raises(ValueError, match="no quant section"):
        space.for_model(plain.config)
    with pytest.raises(ValueError, match="beyond the model's 48 FFN units"):
        tiny_space(ffn=[64], bits=[32, 8]).for_model(supernet.config)
    with pytest.raises(ValueError, match="beyond the model's 4 blocks"):
        tiny_space(depth=[6], num_blocks=6, bits=[32, 8]).for_model(supernet.config)
    sp = tiny_space(bits=[32, 8, 4]).for_model(supernet.config)
    with pytest.raises(ValueError, match="'L4_F48_H4_B3': B bit-width 3 is not in the space; allowed: 32, 8, 4"):
        sp.parse("L4_F48_H4_B3")
    with pytest.raises(ValueError, match="'L4_F48_H8_B8': H value 8 is not in the space"):
        sp.parse("L4_F48_H8_B8")
    with pytest.raises(ValueError, match="unknown key 'X'"):
        sp.parse("L4_X48_H4_B8")
    with pytest.raises(ValueError, match="64 FFN units"):
        supernet(b["feats"], b["feat_lens"], subnet=SubnetConfig.uniform(2, 64, 2, 8))
    with pytest.raises(ValueError, match="8 heads"):
        supernet(b["feats"], b["feat_lens"], subnet=SubnetConfig.uniform(2, 24, 8, 8))
    with pytest.raises(ValueError, match="layer 5"):
        supernet(b["feats"], b["feat_lens"], subnet=SubnetConfig.uniform([0, 5], 24, 2, 8))
    with pytest.raises(ValueError, match="not among this quantizer's bit-widths"):
        supernet(b["feats"], b["feat_lens"], subnet=SubnetConfig.uniform(2, 24, 2, 2))
    with pytest.raises(ValueError, match="'quant' section"):
        plain(b["feats"], b["feat_lens"], subnet=SubnetConfig.uniform(2, 24, 2, 8))
    with pytest.raises(ValueError, match="extractor_bits=2 needs a quant section with that bit-width"):
        tiny_config(quant={"bits": [8, 4]}, extractor_bits=2).validate()


def test_sandwich_step_updates_shared_weights():
    from allinone.train.strategies import build_strategy

    model = supernet_of(plain_model("base")).train()
    sp = tiny_space().for_model(model.config)
    model.search_space = sp
    strategy = build_strategy({"space": sp.to_dict(), "strategy": "sandwich", "num_random": 1}, model, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    logs = strategy.step(model, model, batch(), use_bf16=False, loss_scale=1.0, sync_grads=True)
    assert list(logs)[:2] == ["loss/L4_F48_H4_B32", "loss/L2_F24_H2_B2"]
    assert all(torch.isfinite(v) for v in logs.values())
    layers = "encoder.transformer.layers"
    grads = {k: p.grad for k, p in model.named_parameters()}
    # Layer 0 runs in every subnet, layer 3 only in the 4-layer ones; the 2-bit scale only in
    # the smallest subnet (and maybe a random one); the extractor stays float but trains.
    for name in (f"{layers}.0.attention.q_proj.weight", f"{layers}.3.feed_forward.output_dense.weight",
                 f"{layers}.0.feed_forward.intermediate_dense.quantizer.scales.b2",
                 "feature_extractor.conv_layers.0.conv.weight", "aux.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before[f"{layers}.0.attention.q_proj.weight"],
                           model.get_parameter(f"{layers}.0.attention.q_proj.weight"))


def test_sandwich_training_lowers_the_largest_and_smallest_loss():
    from allinone.train.strategies import build_strategy

    model = supernet_of(plain_model("large")).train()
    sp = tiny_space().for_model(model.config)
    model.search_space = sp
    strategy = build_strategy({"space": sp.to_dict(), "strategy": "sandwich", "num_random": 1}, model, seed=0)
    b = batch()

    def losses() -> list[float]:
        model.eval()
        with torch.no_grad():
            out = [model(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"], subnet=sp.parse(t))["loss"].item()
                   for t in ("L4_F48_H4_B32", "L2_F24_H2_B2")]
        model.train()
        return out

    before = losses()
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        strategy.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
        optim.step()
        optim.zero_grad()
    after = losses()
    assert all(a < 0.7 * x for a, x in zip(after, before)), (before, after)


@pytest.mark.parametrize("strategy", ["targets", "random"])
def test_targets_and_random_strategies_run(strategy):
    from allinone.train.strategies import build_strategy

    model = supernet_of(plain_model("base")).train()
    sp = tiny_space().for_model(model.config)
    model.search_space = sp
    targets = ["L2_F24_H2_B8", "L4_F48_H4_B32"]
    opts = {"space": sp.to_dict(), "strategy": strategy, "targets": targets}
    if strategy == "random":
        opts["num_random"] = 2
    strat = build_strategy(opts, model, seed=0)
    logs = strat.step(model, model, batch(), use_bf16=False, loss_scale=1.0, sync_grads=True)
    assert len(logs) == 2 and all(k.startswith("loss/L") and torch.isfinite(v) for k, v in logs.items())
    if strategy == "targets":
        assert list(logs) == ["loss/L4_F48_H4_B32", "loss/L2_F24_H2_B8"]  # float teacher first
    assert model.encoder.transformer.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


def test_shipped_spaces_fit_the_published_layouts():
    from pathlib import Path

    from allinone.elastic.space import load_space

    conf = Path(__file__).resolve().parent.parent / "conf" / "space" / "wav2vec2"
    quant = QuantConfig(bits=[8, 4, 2])
    base = Wav2Vec2Config(quant=quant)
    large = Wav2Vec2Config(encoder_embed_dim=1024, encoder_num_layers=24, encoder_num_heads=16,
                           encoder_ff_interm_features=4096, quant=quant)
    for name, cfg, largest in (("base", base, "L12_F3072_H12_B32"), ("large", large, "L24_F4096_H16_B32")):
        sp = load_space(conf / f"{name}.yaml").for_model(cfg)
        assert sp.format(sp.largest()) == largest
