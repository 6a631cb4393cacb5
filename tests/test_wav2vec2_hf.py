"""Wav2Vec2CTCModel + load_hf_ctc against transformers' own Wav2Vec2ForCTC / HubertForCTC."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from allinone.interop.huggingface import load_hf_ctc  # noqa: E402
from allinone.models.wav2vec2 import Wav2Vec2CTCModel, Wav2Vec2Config  # noqa: E402

SMALL = dict(vocab_size=11, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             conv_dim=(16, 24), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4)

LAYOUTS = {
    "wav2vec2-base": ("Wav2Vec2", dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)),
    "wav2vec2-large": ("Wav2Vec2", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert-base": ("Hubert", dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)),
    "hubert-large": ("Hubert", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                    num_conv_pos_embeddings=15)),
}


def _save(tmp_path, layout: str, seed: int = 0, **overrides):
    family, extra = LAYOUTS[layout]
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCTC")
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**SMALL, **extra, **overrides})).eval()
    with torch.no_grad():  # LayerNorm / GroupNorm affine params start at 1 / 0: make them count
        for name, p in hf.named_parameters():
            if "norm" in name and "pos_conv" not in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_equal_transformers(tmp_path, layout):
    hf = _save(tmp_path, layout)
    ours, info = load_hf_ctc(tmp_path)
    assert not ours.training
    assert info["architecture"] == type(hf).__name__
    assert ours.config.encoder_layer_norm_first == hf.config.do_stable_layer_norm
    torch.manual_seed(1)
    wav = torch.randn(2, 1600)
    with torch.no_grad():
        ref = hf(wav).logits
        logits, out_lengths = ours(wav)
    assert out_lengths is None
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["wav2vec2-base", "hubert-large"])
def test_padded_batch_equal_transformers(tmp_path, layout):
    hf = _save(tmp_path, layout)
    ours, _ = load_hf_ctc(tmp_path)
    torch.manual_seed(2)
    lengths = torch.tensor([1600, 1100])
    wav = torch.randn(2, 1600)
    wav[1, 1100:] = 0.0
    attention_mask = (torch.arange(1600)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(wav, attention_mask=attention_mask).logits
        logits, out_lengths = ours(wav, lengths)
    expected = hf._get_feat_extract_output_lengths(lengths)
    assert out_lengths.tolist() == expected.tolist()
    for b, n in enumerate(out_lengths.tolist()):
        torch.testing.assert_close(logits[b, :n], ref[b, :n], atol=1e-4, rtol=0)


def test_pytorch_model_bin_and_old_weight_norm_names(tmp_path):
    hf = _save(tmp_path, "wav2vec2-base")
    (tmp_path / "model.safetensors").unlink()
    state = {}
    for k, v in hf.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                              "weight_v")
        state[k] = v.clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours, info = load_hf_ctc(tmp_path)
    assert info["weights"].endswith("pytorch_model.bin")
    wav = torch.randn(1, 1200)
    with torch.no_grad():
        torch.testing.assert_close(ours(wav)[0], hf(wav).logits, atol=1e-4, rtol=0)


def test_config_roundtrip_and_output_lengths():
    config = Wav2Vec2Config(extractor_conv_layer_config=[[8, 10, 5], [8, 3, 2]], encoder_embed_dim=16,
                            encoder_num_heads=2, encoder_num_layers=1, encoder_ff_interm_features=32,
                            encoder_pos_conv_kernel=4, encoder_pos_conv_groups=2, vocab_size=5)
    assert Wav2Vec2Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = Wav2Vec2CTCModel(config).eval()
    lengths = torch.tensor([400, 37])
    logits, out = model(torch.randn(2, 400), lengths)
    assert out.tolist() == config.output_lengths(lengths).tolist() == [39, 2]
    assert logits.shape == (2, 39, 5)
    with pytest.raises(ValueError, match="extractor_mode"):
        Wav2Vec2Config(extractor_mode="batch_norm").validate()


# ------------------------------------------------------------------------ loader errors


def _edit_config(tmp_path, **changes):
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_error_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_ctc(tmp_path)
    _save(tmp_path, "wav2vec2-base")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_ctc(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_ctc(tmp_path / "nope")


def test_error_unknown_model_type_or_architecture(tmp_path):
    _save(tmp_path, "wav2vec2-base")
    _edit_config(tmp_path, model_type="wavlm")
    with pytest.raises(ValueError, match="model_type 'wavlm'"):
        load_hf_ctc(tmp_path)
    _edit_config(tmp_path, model_type="wav2vec2", architectures=["Wav2Vec2ForPreTraining"])
    with pytest.raises(ValueError, match="Wav2Vec2ForPreTraining"):
        load_hf_ctc(tmp_path)
    _edit_config(tmp_path, architectures=["Wav2Vec2ForCTC"], hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_act"):
        load_hf_ctc(tmp_path)


def test_error_mismatched_shape_names_key(tmp_path):
    _save(tmp_path, "wav2vec2-base")
    _edit_config(tmp_path, intermediate_size=48)
    with pytest.raises(ValueError, match=r"wav2vec2\.encoder\.layers\.0\.feed_forward\.intermediate_dense\.(weight|bias)"):
        load_hf_ctc(tmp_path)


def test_error_layer_count_mismatch(tmp_path):
    _save(tmp_path, "hubert-base")
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"lacks weights.*layers\.2\."):
        load_hf_ctc(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"hubert\.encoder\.layers\.1\."):
        load_hf_ctc(tmp_path)


def test_mask_time_prob_override_keeps_or_makes_the_masking_vector(tmp_path, caplog):
    """mask_time_prob= overrides config.json's; the checkpoint's masked_spec_embed is the
    vector when there is one (here saved for feature masking only), a new one with a warning
    when transformers saved none."""
    hf = _save(tmp_path / "a", "wav2vec2-base", mask_time_prob=0.0, mask_feature_prob=0.1)
    plain, _ = load_hf_ctc(tmp_path / "a")
    assert plain.config.mask_time_prob == 0.0
    masked, info = load_hf_ctc(tmp_path / "a", mask_time_prob=0.05)
    assert masked.config.mask_time_prob == 0.05 and "masked_spec_embed" not in info["ignored_keys"]
    torch.testing.assert_close(masked.encoder.time_masking.mask_emb.detach(), hf.wav2vec2.masked_spec_embed.detach(),
                               rtol=0, atol=0)
    off, info = load_hf_ctc(tmp_path / "a", mask_time_prob=0.0)
    assert off.encoder.time_masking is None or off.config.mask_time_prob == 0.0
    assert "masked_spec_embed" in " ".join(info["ignored_keys"])

    _save(tmp_path / "b", "wav2vec2-base", mask_time_prob=0.0, mask_feature_prob=0.0)
    with caplog.at_level("WARNING", logger="allinone"):
        fresh, _ = load_hf_ctc(tmp_path / "b", mask_time_prob=0.05)
    assert fresh.config.mask_time_prob == 0.05 and "no masked_spec_embed" in caplog.text
    with pytest.raises(ValueError, match="mask_time_prob=1.5"):
        load_hf_ctc(tmp_path / "b", mask_time_prob=1.5)
