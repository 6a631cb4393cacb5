"""allinone.models against ESPnet's own classes (the independent reference).

Encoder: same state-dict keys, strict loading both ways, eval-mode outputs equal
(<= 1e-5) on padded batches for several configs.  GlobalMVN and the ASR losses are
compared with ESPnet's GlobalMVN and ESPnetASRModel holding the same weights.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from allinone.models import ASRModel, ASRModelConfig, ConformerConfig, ConformerEncoder, GlobalMVN
from allinone.models.asr import add_sos_eos

espnet_conformer = pytest.importorskip("espnet2.asr.encoder.conformer_encoder")

TOL = 1e-5


def tiny(**overrides) -> ConformerConfig:
    base = dict(input_size=40, output_size=32, attention_heads=4, linear_units=48, num_blocks=2,
                cnn_module_kernel=7)
    base.update(overrides)
    return ConformerConfig(**base)


def espnet_encoder(cfg: ConformerConfig):
    return espnet_conformer.ConformerEncoder(**cfg.espnet_kwargs())


def randomize_batchnorm(module: torch.nn.Module) -> None:
    """Non-trivial running stats, so eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


ENCODER_CONFIGS = {
    "default-tiny": tiny(),
    "2heads-no-macaron-conv2d6": tiny(attention_heads=2, linear_units=64, macaron_style=False,
                                      input_layer="conv2d6"),
    "conv2d8-no-cnn-zero-triu": tiny(input_layer="conv2d8", use_cnn_module=False, zero_triu=True),
    "8heads-3blocks-k5-relu": tiny(output_size=64, attention_heads=8, num_blocks=3, cnn_module_kernel=5,
                                   activation_type="relu"),
    "post-norm": tiny(normalize_before=False, cnn_module_kernel=3),
}


@pytest.mark.parametrize("name", list(ENCODER_CONFIGS))
def test_encoder_matches_espnet(name):
    cfg = ENCODER_CONFIGS[name]
    torch.manual_seed(0)
    ref = espnet_encoder(cfg)
    randomize_batchnorm(ref)
    ref.eval()
    ours = ConformerEncoder(cfg).eval()

    # Same keys in the same order, and strict loading in both directions.
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    espnet_encoder(cfg).load_state_dict(ours.state_dict(), strict=True)

    xs = torch.randn(3, 61, cfg.input_size)
    lens = torch.tensor([61, 40, 23])  # padded batch
    with torch.no_grad():
        want, want_lens, _ = ref(xs.clone(), lens)
        got, got_lens = ours(xs, lens)
    assert torch.equal(got_lens, want_lens)
    assert got.shape == want.shape
    # Padded output frames too: ESPnet computes them and so do we.
    assert (got - want).abs().max().item() <= TOL


def test_encoder_train_mode_backward_and_empty_utterance():
    cfg = tiny(dropout_rate=0.1, attention_dropout_rate=0.1)
    enc = ConformerEncoder(cfg).train()
    xs = torch.randn(2, 30, cfg.input_size, requires_grad=True)
    out, lens = enc(xs, torch.tensor([30, 0]))
    assert lens.tolist() == [6, 0]
    assert torch.isfinite(out).all()  # a fully padded row must not give NaN
    out[0].sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "encoders" in n)


def test_heads_follow_weight_width():
    """A supernet passes the first h heads' rows; the attention must run h heads."""
    cfg = tiny()
    att = ConformerEncoder(cfg).encoders[0].self_attn.eval()
    x = torch.randn(2, 9, cfg.output_size)
    pos = torch.randn(1, 17, cfg.output_size)
    h = 2
    width = h * att.d_k
    for name in ("linear_q", "linear_k", "linear_v", "linear_pos"):
        layer = getattr(att, name)
        layer.weight = torch.nn.Parameter(layer.weight[:width].detach().clone())
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(layer.bias[:width].detach().clone())
    att.linear_out.weight = torch.nn.Parameter(att.linear_out.weight[:, :width].detach().clone())
    assert att(x, pos).shape == (2, 9, cfg.output_size)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(input_layer="linear"), "input_layer"),
        (dict(rel_pos_type="legacy"), "rel_pos_type"),
        (dict(selfattention_layer_type="selfattn"), "selfattention_layer_type"),
        (dict(pos_enc_layer_type="abs_pos"), "pos_enc_layer_type"),
        (dict(positionwise_layer_type="conv1d"), "positionwise_layer_type"),
        (dict(activation_type="gelu"), "activation_type"),
        (dict(output_size=30, attention_heads=4), "divisible"),
        (dict(cnn_module_kernel=4), "odd"),
    ],
)
def test_config_rejects_unsupported(overrides, match):
    with pytest.raises(ValueError, match=match):
        ConformerEncoder(tiny(**overrides))


def test_too_short_input_raises():
    enc = ConformerEncoder(tiny(input_layer="conv2d8"))
    with pytest.raises(ValueError, match="at least 15"):
        enc(torch.randn(1, 10, 40), torch.tensor([10]))


# --------------------------------------------------------------------------- GlobalMVN


def write_stats(path, dim=40, seed=0):
    rng = np.random.default_rng(seed)
    count = 1000
    mean = rng.normal(size=dim) * 3
    var = rng.uniform(0.5, 4.0, size=dim)
    np.savez(path, count=np.array(count), sum=mean * count, sum_square=(var + mean**2) * count)
    return path


def test_global_mvn_matches_espnet(tmp_path):
    from espnet2.layers.global_mvn import GlobalMVN as EspnetGlobalMVN

    stats = write_stats(tmp_path / "feats_stats.npz")
    ref = EspnetGlobalMVN(stats)
    ours_path = GlobalMVN.from_stats(stats)
    loaded = dict(np.load(stats))
    ours_dict = GlobalMVN(40, stats={k: torch.from_numpy(v) for k, v in loaded.items()})
    ours_sd = GlobalMVN(40)
    ours_sd.load_state_dict(ref.state_dict(), strict=True)  # ESPnet buffer names

    x = torch.randn(3, 12, 40) * 3
    lens = torch.tensor([12, 7, 1])
    x_before = x.clone()
    want, _ = ref(x.clone(), lens)
    for ours in (ours_path, ours_dict, ours_sd):
        got, got_lens = ours(x, lens)
        assert torch.equal(got_lens, lens)
        assert (got - want).abs().max().item() <= 1e-6
        assert (got[1, 7:] == 0).all() and (got[2, 1:] == 0).all()
    assert torch.equal(x, x_before)  # ours does not normalise in place


def test_global_mvn_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        GlobalMVN.from_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="dimensions"):
        GlobalMVN(80, stats=write_stats(tmp_path / "s.npz", dim=40))


# --------------------------------------------------------------------------- ASR model

VOCAB = 12
def test_intermediate_outputs_match_espnet():
    """Intermediate CTC taps: the outputs after blocks 1 and 3 of 4, through the final norm."""
    cfg = tiny(num_blocks=4, interctc_layer_idx=[1, 3])
    torch.manual_seed(0)
    ref = espnet_encoder(cfg).eval()
    ours = ConformerEncoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    xs, lens = torch.randn(2, 49, cfg.input_size), torch.tensor([49, 30])
    with torch.no_grad():
        (want, want_inter), _, _ = ref(xs.clone(), lens)
        got, _, got_inter = ours(xs, lens, intermediate=True)
        assert torch.equal(ours(xs, lens)[0], got)  # the taps do not change the output
    assert [layer for layer, _ in want_inter] == [1, 3] and len(got_inter) == 2
    assert (got - want).abs().max().item() <= TOL
    for (_, w), g in zip(want_inter, got_inter):
        assert (g - w).abs().max().item() <= TOL
    # A subnet counts its own blocks: of taps 1 and 3, a 2- or 3-block subnet has only the
    # first (3 is past the first, and the last block of the other is its output anyway).
    from allinone.elastic.subnet import SubnetConfig

    for depth in (2, 3):
        with torch.no_grad():
            _, _, inter = ours(xs, lens, SubnetConfig.uniform(depth, 48, 4), intermediate=True)
        assert len(inter) == 1 and (inter[0] - got_inter[0]).abs().max().item() <= TOL
    for bad in ([0], [4], [1, 1], [1.5]):
        with pytest.raises(ValueError, match="interctc_layer_idx must list distinct blocks 1..3"):
            dataclasses.replace(cfg, interctc_layer_idx=bad).validate()


DECODER = dict(attention_heads=2, linear_units=32, num_blocks=1, dropout_rate=0.1,
               positional_dropout_rate=0.1, self_attention_dropout_rate=0.0, src_attention_dropout_rate=0.0)


def espnet_asr_model(cfg: ASRModelConfig, stats_file):
    """ESPnetASRModel built from ESPnet's classes with the same architecture."""
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.espnet_model import ESPnetASRModel
    from espnet2.layers.global_mvn import GlobalMVN as EspnetGlobalMVN

    enc = espnet_encoder(cfg.encoder)
    dec = (TransformerDecoder(cfg.vocab_size, cfg.encoder.output_size, **cfg.decoder)
           if cfg.decoder is not None else None)
    return ESPnetASRModel(
        vocab_size=cfg.vocab_size, token_list=[f"t{i}" for i in range(cfg.vocab_size)], frontend=None,
        specaug=None, normalize=EspnetGlobalMVN(stats_file), preencoder=None, encoder=enc,
        postencoder=None, decoder=dec, ctc=CTC(cfg.vocab_size, cfg.encoder.output_size), joint_network=None,
        ctc_weight=cfg.ctc_weight, lsm_weight=cfg.lsm_weight, interctc_weight=cfg.interctc_weight,
        report_cer=False, report_wer=False,
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 64, 40, generator=g) * 2 + 1
    feat_lens = torch.tensor([64, 50, 31])
    token_lens = torch.tensor([5, 3, 6])
    tokens = torch.randint(1, VOCAB - 1, (3, 6), generator=g)  # no blank, no <sos/eos>
    tokens[torch.arange(6)[None, :] >= token_lens[:, None]] = -1
    return feats, feat_lens, tokens, token_lens


@pytest.mark.parametrize("ctc_weight,interctc_weight,condition", [
    (0.3, 0.0, False), (1.0, 0.0, False), (0.0, 0.0, False), (1.0, 0.4, False), (0.3, 0.5, False),
    (1.0, 0.4, True), (0.3, 0.5, True),  # self-conditioned CTC
])
def test_asr_losses_match_espnet(tmp_path, ctc_weight, interctc_weight, condition):
    stats = write_stats(tmp_path / "feats_stats.npz")
    enc = tiny(num_blocks=3, interctc_layer_idx=[1, 2], interctc_use_conditioning=condition) \
        if interctc_weight else tiny()
    cfg = ASRModelConfig(encoder=enc, vocab_size=VOCAB, ctc_weight=ctc_weight,
                         decoder=DECODER if ctc_weight < 1.0 else None, lsm_weight=0.1,
                         interctc_weight=interctc_weight)
    torch.manual_seed(0)
    ref = espnet_asr_model(cfg, stats).eval()
    ours = ASRModel(cfg).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)

    feats, feat_lens, tokens, token_lens = batch()
    with torch.no_grad():
        _, stats_ref, _ = ref(feats.clone(), feat_lens, tokens.clone(), token_lens)
        out = ours(feats, feat_lens, tokens, token_lens)
    assert abs(out["loss"].item() - stats_ref["loss"].item()) <= 1e-4
    if ctc_weight > 0:
        assert abs(out["loss_ctc"].item() - stats_ref["loss_ctc"].item()) <= 1e-4
    else:
        assert out["loss_ctc"] is None and ours.ctc is None
    if interctc_weight:
        want = (stats_ref["loss_interctc_layer1"] + stats_ref["loss_interctc_layer2"]) / 2
        assert abs(out["loss_interctc"].item() - want.item()) <= 1e-4
    else:
        assert out["loss_interctc"] is None
    if ctc_weight < 1:
        assert abs(out["loss_att"].item() - stats_ref["loss_att"].item()) <= 1e-4
        assert abs(out["acc"].item() - stats_ref["acc"]) <= 1e-6
    else:
        assert out["loss_att"] is None and out["acc"] is None and ours.decoder is None

    if ctc_weight > 0:
        with torch.no_grad():
            enc_ref, lens_ref = ref.encode(feats.clone(), feat_lens)
            if interctc_weight:
                enc_ref = enc_ref[0]  # (ESPnet: (output, intermediate outputs))
            enc, lens = ours.encode(feats, feat_lens)
            assert torch.equal(lens, lens_ref)
            assert (enc - enc_ref).abs().max().item() <= TOL
            assert (ours.ctc_log_probs(enc) - ref.ctc.log_softmax(enc_ref)).abs().max().item() <= TOL


def test_asr_set_stats_and_backward(tmp_path):
    cfg = ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, ctc_weight=0.5, decoder=DECODER)
    model = ASRModel(cfg)
    model.set_normalize_stats(write_stats(tmp_path / "s.npz"))
    assert not torch.equal(model.normalize.mean, torch.zeros(40))
    out = model(*batch())
    out["loss"].backward()
    assert model.encoder.encoders[0].feed_forward.w_1.weight.grad is not None


def test_add_sos_eos():
    tokens = torch.tensor([[3, 4, 5], [6, -1, -1]])
    ys_in, ys_out = add_sos_eos(tokens, torch.tensor([3, 1]), sos=9, eos=9)
    assert ys_in.tolist() == [[9, 3, 4, 5], [9, 6, 9, 9]]
    assert ys_out.tolist() == [[3, 4, 5, 9], [6, 9, -1, -1]]


def test_asr_config_roundtrip_and_errors():
    cfg = ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, ctc_weight=0.3, decoder=DECODER)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ASRModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="needs an attention decoder"):
        ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, ctc_weight=0.5).validate()
    with pytest.raises(ValueError, match="never uses it"):
        ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, ctc_weight=1.0, decoder=DECODER).validate()
    with pytest.raises(ValueError, match="bogus"):
        ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, ctc_weight=0.5, decoder={"bogus": 1}).validate()
    with pytest.raises(ValueError, match="unknown ConformerConfig field"):
        ASRModelConfig.from_dict({**d, "encoder": {**d["encoder"], "concat_after": False}})
    with pytest.raises(ValueError, match=r"interctc_weight=0.3 needs a CTC head .*encoder.interctc_layer_idx"):
        ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, interctc_weight=0.3).validate()
    with pytest.raises(ValueError, match=r"interctc_weight=1.0 must be in \[0, 1\)"):
        ASRModelConfig(encoder=tiny(interctc_layer_idx=[1]), vocab_size=VOCAB, interctc_weight=1.0).validate()
    with_inter = ASRModelConfig(encoder=tiny(interctc_layer_idx=[1]), vocab_size=VOCAB, interctc_weight=0.3)
    assert ASRModelConfig.from_dict(json.loads(json.dumps(with_inter.to_dict()))) == with_inter
    with pytest.raises(ValueError, match="normalize=False"):
        ASRModel(ASRModelConfig(encoder=tiny(), vocab_size=VOCAB, normalize=False)).set_normalize_stats({})


@pytest.mark.parametrize("ctc_weight,interctc_weight,condition", [
    (1.0, 0.0, False), (0.3, 0.0, False), (1.0, 0.3, False), (1.0, 0.3, True)])
def test_asr_train_mode_gradients_match_espnet(tmp_path, ctc_weight, interctc_weight, condition):
    """Training mode (BatchNorm on batch statistics, dropout off): same loss and same
    gradient for every parameter as ESPnetASRModel, so a training run of ours is one of ESPnet's."""
    stats = write_stats(tmp_path / "feats_stats.npz")
    enc = tiny(dropout_rate=0.0, positional_dropout_rate=0.0, attention_dropout_rate=0.0,
               interctc_layer_idx=[1] if interctc_weight else [], interctc_use_conditioning=condition)
    dec = {**DECODER, "dropout_rate": 0.0, "positional_dropout_rate": 0.0}
    cfg = ASRModelConfig(encoder=enc, vocab_size=VOCAB, ctc_weight=ctc_weight,
                         decoder=dec if ctc_weight < 1.0 else None, lsm_weight=0.1, interctc_weight=interctc_weight)
    torch.manual_seed(0)
    ref = espnet_asr_model(cfg, stats).train()
    ours = ASRModel(cfg).train()
    ours.load_state_dict(ref.state_dict(), strict=True)

    feats, feat_lens, tokens, token_lens = batch(seed=3)
    loss_ref = ref(feats.clone(), feat_lens, tokens.clone(), token_lens)[0]
    loss = ours(feats, feat_lens, tokens, token_lens)["loss"]
    assert abs(loss.item() - loss_ref.item()) <= 1e-4
    loss_ref.backward()
    loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = grads_ref[name].grad
        assert p.grad is not None and g_ref is not None, name
        scale = g_ref.abs().max().item() + 1e-8
        assert (p.grad - g_ref).abs().max().item() <= 1e-4 * max(1.0, scale), name
