"""load_fairseq_ctc against torchaudio's wav2vec2 model and its own fairseq key mapping.

fairseq is not installed, so the tests write fairseq-format checkpoints themselves: a
random torchaudio ``wav2vec2_model``'s weights renamed to fairseq's names, with a
fairseq-style ``cfg`` (or legacy ``args``).  That the names are fairseq's is checked
with torchaudio's ``import_fairseq._convert_state_dict`` (its mapping from fairseq
names, independent of ours), and the loaded model must give torchaudio's logits.
"""

from __future__ import annotations

import argparse
import logging
import re

import pytest
import torch

from allinone.interop.fairseq import load_fairseq_ctc, parse_conv_layers

ta_models = pytest.importorskip("torchaudio.models")
ta_fairseq = pytest.importorskip("torchaudio.models.wav2vec2.utils.import_fairseq")

CONV = [(16, 10, 5), (24, 3, 2)]
CONV_SPEC = "[(16, 10, 5)] + [(24, 3, 2)]"
SMALL = dict(encoder_embed_dim=32, encoder_num_layers=2, encoder_num_heads=2, encoder_ff_interm_features=64,
             encoder_pos_conv_groups=4)
LAYOUTS = {  # torchaudio wav2vec2_model arguments of the base (post-LN) and large (pre-LN) layouts
    "base": dict(extractor_mode="group_norm", extractor_conv_bias=False, encoder_layer_norm_first=False,
                 encoder_pos_conv_kernel=16),
    "large": dict(extractor_mode="layer_norm", extractor_conv_bias=True, encoder_layer_norm_first=True,
                  encoder_pos_conv_kernel=15),
}
VOCAB = 11


def _torchaudio_model(layout: str, vocab: int | None, seed: int = 0):
    torch.manual_seed(seed)
    model = ta_models.wav2vec2_model(
        extractor_conv_layer_config=CONV, encoder_projection_dropout=0.0, encoder_attention_dropout=0.0,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_drop=0.0, aux_num_out=vocab,
        **SMALL, **LAYOUTS[layout]).eval()
    with torch.no_grad():  # norm affine params start at 1 / 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name and "pos_conv" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _to_fairseq_name(key: str, layout: str) -> str:
    """torchaudio name -> fairseq pretraining name (no ``w2v_model.`` prefix)."""
    norm = "2" if layout == "base" else "2.1"
    rules = [
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", rf"feature_extractor.conv_layers.\1.{norm}."),
        (r"encoder\.feature_projection\.layer_norm\.", "layer_norm."),
        (r"encoder\.feature_projection\.projection\.", "post_extract_proj."),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
         "encoder.pos_conv.0.weight_g"),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
         "encoder.pos_conv.0.weight_v"),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.transformer\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
        (r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
        (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
        (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
        (r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
        (r"encoder\.transformer\.layer_norm\.", "encoder.layer_norm."),
        (r"aux\.", "proj."),
    ]
    for pattern, repl in rules:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    raise AssertionError(f"no fairseq name for {key}")


def _pretrain_cfg(layout: str, family: str = "wav2vec2") -> dict:
    ta = LAYOUTS[layout]
    return {"_name": family, "extractor_mode": "default" if layout == "base" else "layer_norm",
            "conv_feature_layers": CONV_SPEC, "conv_bias": ta["extractor_conv_bias"],
            "encoder_layers": SMALL["encoder_num_layers"], "encoder_embed_dim": SMALL["encoder_embed_dim"],
            "encoder_ffn_embed_dim": SMALL["encoder_ff_interm_features"],
            "encoder_attention_heads": SMALL["encoder_num_heads"], "conv_pos": ta["encoder_pos_conv_kernel"],
            "conv_pos_groups": SMALL["encoder_pos_conv_groups"], "layer_norm_first": ta["encoder_layer_norm_first"],
            "activation_fn": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "encoder_layerdrop": 0.05,
            "final_dim": 8}


def _fairseq_state(ta_model, layout: str, fine_tuned: bool, family: str) -> dict[str, torch.Tensor]:
    """The state dict fairseq would save for ``ta_model``'s weights (extras included)."""
    ta_state = {k: v.clone() for k, v in ta_model.state_dict().items()}
    # torchaudio now keeps weight norm as a parametrization; fairseq saves weight_g / weight_v.
    plain = {_to_fairseq_name(k, layout): v for k, v in ta_state.items()}
    # Independent check of our fairseq names: torchaudio's importer maps them back.
    back = ta_fairseq._convert_state_dict({("proj." + k[5:] if k.startswith("proj.") else "w2v_model." + k): v
                                           for k, v in plain.items()})
    back = {k.replace("conv.weight_g", "conv.parametrizations.weight.original0")
            .replace("conv.weight_v", "conv.parametrizations.weight.original1"): v for k, v in back.items()}
    assert back.keys() == ta_state.keys()
    d = SMALL["encoder_embed_dim"]
    extras = {"mask_emb": torch.randn(d)}
    if family == "hubert":
        extras.update({"label_embs_concat": torch.randn(504, 8), "final_proj.weight": torch.randn(8, d),
                       "final_proj.bias": torch.randn(8)})
    else:
        extras.update({"quantizer.vars": torch.randn(1, 8, 4), "quantizer.weight_proj.weight": torch.randn(8, 24),
                       "project_q.weight": torch.randn(8, 4), "final_proj.weight": torch.randn(8, d)})
    if not fine_tuned:
        return {**plain, **extras}
    out = {("w2v_encoder." + k if k.startswith("proj.") else "w2v_encoder.w2v_model." + k): v
           for k, v in plain.items()}
    out["w2v_encoder.w2v_model.mask_emb"] = extras["mask_emb"]
    return out


def _save_finetuned(path, layout: str, family: str = "wav2vec2", legacy: bool = False, seed: int = 0,
                    ft_extra: dict | None = None, pre_extra: dict | None = None):
    """A fine-tuned checkpoint; ``ft_extra`` / ``pre_extra`` add fields to the fine-tuning /
    embedded pretraining model config."""
    ta = _torchaudio_model(layout, VOCAB, seed)
    state = _fairseq_state(ta, layout, fine_tuned=True, family=family)
    ctc = {"_name": f"{'wav2vec' if family == 'wav2vec2' else 'hubert'}_ctc", "w2v_path": "/nowhere/pretrained.pt",
           "final_dropout": 0.0, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
           "layerdrop": 0.0, "dropout_input": 0.0, "normalize": layout == "large", **(ft_extra or {})}
    pre = {**_pretrain_cfg(layout, family), **(pre_extra or {})}
    if legacy:  # fairseq < 0.10: argparse namespaces, the model name in ``arch``
        pre = {("arch" if k == "_name" else k): v for k, v in pre.items()}
        args = argparse.Namespace(**{("arch" if k == "_name" else k): v for k, v in ctc.items()},
                                  w2v_args=argparse.Namespace(**pre, normalize=layout == "large"))
        ckpt = {"args": args, "model": state}
    else:
        ckpt = {"cfg": {"model": {**ctc, "w2v_args": {"model": pre, "task": {"normalize": layout == "large"}}},
                        "task": {"_name": "audio_finetuning", "normalize": layout == "large"}},
                "model": state, "optimizer_history": [], "extra_state": {"epoch": 3}}
    torch.save(ckpt, path)
    return ta


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
@pytest.mark.parametrize("layout", ["base", "large"])
def test_finetuned_logits_equal_torchaudio(tmp_path, layout, family):
    path = tmp_path / "ft.pt"
    ta = _save_finetuned(path, layout, family)
    ours, info = load_fairseq_ctc(path)
    assert not ours.training and info["fine_tuned"] and info["has_head"] and info["family"] == family
    assert info["normalize"] == (layout == "large")
    # No apply_mask in the fine-tuning config: fairseq does not mask, the vector is unused.
    assert info["ignored_keys"] == ["w2v_encoder.w2v_model.mask_emb"]
    assert ours.config.mask_time_prob == 0.0 and ours.encoder.time_masking is None
    assert ours.config.encoder_layer_norm_first == (layout == "large")
    assert ours.config.encoder_layer_drop == 0.0  # the fine-tuning config's layerdrop overrides 0.05
    torch.manual_seed(1)
    wav = torch.randn(2, 1600)
    with torch.no_grad():
        ref, _ = ta(wav)
        logits, _ = ours(wav)
    assert logits.shape == ref.shape == (2, ref.shape[1], VOCAB)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_padded_batch_and_legacy_args(tmp_path):
    path = tmp_path / "legacy.pt"
    ta = _save_finetuned(path, "base", legacy=True)
    ours, info = load_fairseq_ctc(path)
    assert info["model_name"] == "wav2vec_ctc"
    lengths = torch.tensor([1600, 1100])
    wav = torch.randn(2, 1600)
    wav[1, 1100:] = 0.0
    with torch.no_grad():
        ref, ref_lengths = ta(wav, lengths)
        logits, out_lengths = ours(wav, lengths)
    assert out_lengths.tolist() == ref_lengths.tolist()
    for b, n in enumerate(out_lengths.tolist()):
        torch.testing.assert_close(logits[b, :n], ref[b, :n], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_pretraining_checkpoint(tmp_path, family):
    ta = _torchaudio_model("large", None)
    path = tmp_path / "pre.pt"
    torch.save({"cfg": {"model": _pretrain_cfg("large", family), "task": {"normalize": True}},
                "model": _fairseq_state(ta, "large", fine_tuned=False, family=family)}, path)
    with pytest.raises(ValueError, match="pretraining checkpoint .*vocab_size"):
        load_fairseq_ctc(path)
    ours, info = load_fairseq_ctc(path, vocab_size=7)
    assert not info["has_head"] and ours.aux.out_features == 7
    assert "final_proj.weight" in info["ignored_keys"]
    assert ("label_embs_concat" in info["ignored_keys"]) == (family == "hubert")
    # No mask_prob in the config (pretraining default 0.65): a pretraining checkpoint starts a
    # fine-tuning, whose default is no masking, so mask_emb is unused.
    assert "mask_emb" in info["ignored_keys"]
    assert ours.config.mask_time_prob == 0.0 and ours.encoder.time_masking is None
    masking = info["masking"]
    assert masking["source"] == "fine-tuning defaults" and not masking["apply_mask"]
    assert masking["pretraining_mask_prob"] == 0.65 and "mask_prob=0.65 is not applied" in masking["note"]
    wav = torch.randn(1, 1200)
    with torch.no_grad():
        ref, _ = ta(wav)  # no aux: the encoder output
        features, _ = ours.feature_extractor(wav, None)
        torch.testing.assert_close(ours.encoder(features), ref, atol=1e-4, rtol=0)


def test_new_vocabulary_drops_the_head(tmp_path):
    path = tmp_path / "ft.pt"
    ta = _save_finetuned(path, "base")
    ours, info = load_fairseq_ctc(path, vocab_size=5)
    assert ours.aux.out_features == 5 and not info["has_head"]
    assert "w2v_encoder.proj.weight" in info["ignored_keys"]
    torch.testing.assert_close(ours.encoder.transformer.layers[1].feed_forward.output_dense.weight,
                               ta.encoder.transformer.layers[1].feed_forward.output_dense.weight)


def test_parse_conv_layers():
    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2") == \
        [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    with pytest.raises(ValueError, match="conv_feature_layers"):
        parse_conv_layers("__import__('os').getcwd()")


# ------------------------------------------------------------------------ loader errors


def _edit(path, fn):
    ckpt = torch.load(path, weights_only=False)
    fn(ckpt)
    torch.save(ckpt, path)


def test_error_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_fairseq_ctc(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_fairseq_ctc(tmp_path / "text.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fairseq checkpoint"):
        load_fairseq_ctc(tmp_path / "other.pt")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match="neither cfg"):
        load_fairseq_ctc(tmp_path / "nocfg.pt")


def test_error_unknown_model_or_setting(tmp_path):
    path = tmp_path / "ft.pt"
    _save_finetuned(path, "base")
    _edit(path, lambda c: c["cfg"]["model"].update(_name="wav2vec_seq2seq"))
    with pytest.raises(ValueError, match="unsupported fairseq model 'wav2vec_seq2seq'"):
        load_fairseq_ctc(path)
    _edit(path, lambda c: c["cfg"]["model"].update(_name="wav2vec_ctc"))
    _edit(path, lambda c: c["cfg"]["model"]["w2v_args"]["model"].update(layer_type="conformer"))
    with pytest.raises(ValueError, match="layer_type='conformer'"):
        load_fairseq_ctc(path)
    _edit(path, lambda c: c["cfg"]["model"].update(w2v_args=None))
    with pytest.raises(ValueError, match="no w2v_args.*/nowhere/pretrained.pt"):
        load_fairseq_ctc(path)


def test_error_missing_unexpected_and_shape(tmp_path):
    path = tmp_path / "ft.pt"
    _save_finetuned(path, "base")
    _edit(path, lambda c: c["model"].pop("w2v_encoder.w2v_model.encoder.layers.1.fc2.bias"))
    with pytest.raises(ValueError,
                       match=r"lacks weights.*encoder\.transformer\.layers\.1\.feed_forward\.output_dense\.bias"):
        load_fairseq_ctc(path)
    _save_finetuned(path, "base")
    _edit(path, lambda c: c["model"].update({"w2v_encoder.w2v_model.adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"w2v_encoder\.w2v_model\.adapter\.weight"):
        load_fairseq_ctc(path)
    _save_finetuned(path, "base")
    _edit(path, lambda c: c["cfg"]["model"]["w2v_args"]["model"].update(encoder_ffn_embed_dim=48))
    with pytest.raises(ValueError, match=r"'w2v_encoder\.w2v_model\.encoder\.layers\.0\.fc1\.(weight|bias)'.*"
                                         r"shape \((64, 32|64)\).*needs \((48, 32|48)\)"):
        load_fairseq_ctc(path)
    _save_finetuned(path, "base")
    _edit(path, lambda c: c["cfg"]["model"]["w2v_args"]["model"].update(encoder_layers=3))
    with pytest.raises(ValueError, match=r"lacks weights.*layers\.2\."):
        load_fairseq_ctc(path)


def test_pickled_objects_need_trust(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "ft.pt"
    ta = _save_finetuned(path, "large")
    _edit(path, lambda c: c.update(cfg=OmegaConf.create(c["cfg"])))  # as fairseq's trainer may leave it
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_fairseq_ctc(path)
    ours, _ = load_fairseq_ctc(path, trust_pickle=True)
    wav = torch.randn(1, 1000)
    with torch.no_grad():
        torch.testing.assert_close(ours(wav)[0], ta(wav)[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ time masking


def _save_pretraining(path, family: str, **cfg_extra) -> dict[str, torch.Tensor]:
    ta = _torchaudio_model("base", None)
    state = _fairseq_state(ta, "base", fine_tuned=False, family=family)
    torch.save({"cfg": {"model": {**_pretrain_cfg("base", family), **cfg_extra}, "task": {"normalize": False}},
                "model": state}, path)
    return state


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_pretraining_masking_is_off_unless_asked(tmp_path, family, caplog):
    path = tmp_path / "pre.pt"
    state = _save_pretraining(path, family, mask_prob=0.3, mask_length=7, mask_channel_prob=0.2)
    # Its own mask_prob is pretraining's: fine-tuning it (fairseq's defaults) masks nothing.
    with caplog.at_level(logging.INFO, logger="allinone"):
        ours, info = load_fairseq_ctc(path, vocab_size=5)
    assert ours.config.mask_time_prob == 0.0 and ours.encoder.time_masking is None
    assert "mask_emb" in info["ignored_keys"] and "encoder.time_masking.mask_emb" not in info["sources"]
    masking = info["masking"]
    assert masking["source"] == "fine-tuning defaults" and not masking["apply_mask"] and "override" not in masking
    assert masking["pretraining_mask_prob"] == 0.3 and "mask_prob=0.3 is not applied" in masking["note"]
    assert masking["differences"] == []  # fairseq's fine-tuning would not channel-mask either
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("time masking off" in r.getMessage() and "pre.pt" in r.getMessage() for r in caplog.records)

    # Asked for (the trainer's model.wav2vec2.mask_time_prob): the checkpoint's own vector, not a new one.
    ours, info = load_fairseq_ctc(path, vocab_size=5, mask_time_prob=0.3)
    c = ours.config
    assert (c.mask_time_prob, c.mask_time_length, c.mask_time_min_masks) == (0.3, 10, 2)  # fine-tuning's length
    assert info["masking"]["override"] == 0.3 and info["masking"]["differences"] == []
    assert "mask_emb" not in info["ignored_keys"]
    assert info["sources"]["encoder.time_masking.mask_emb"] == "mask_emb"
    torch.testing.assert_close(ours.encoder.time_masking.mask_emb.detach(), state["mask_emb"], atol=0, rtol=0)
    # The masking runs in training mode, with the checkpoint's vector.
    ours.train()
    features = torch.randn(2, 60, SMALL["encoder_embed_dim"])
    masked = ours.encoder.time_masking(features, None)
    changed = (masked != features).any(-1)
    assert changed.any()
    torch.testing.assert_close(masked[changed], state["mask_emb"].expand(int(changed.sum()), -1))


def test_mask_time_prob_override_on_a_finetuned_checkpoint(tmp_path):
    path = tmp_path / "ft.pt"
    _save_finetuned(path, "base", ft_extra={"apply_mask": False, "mask_prob": 0.25, "mask_length": 5})
    vector = torch.load(path, weights_only=False)["model"]["w2v_encoder.w2v_model.mask_emb"]
    ours, info = load_fairseq_ctc(path, mask_time_prob=0.1)  # on, though fairseq would not mask
    assert (ours.config.mask_time_prob, ours.config.mask_time_length) == (0.1, 5)
    assert info["ignored_keys"] == [] and "note" not in info["masking"]
    torch.testing.assert_close(ours.encoder.time_masking.mask_emb.detach(), vector, atol=0, rtol=0)

    # And off, though fairseq would mask: the vector is unused.
    _save_finetuned(path, "base", ft_extra={"apply_mask": True, "mask_prob": 0.25})
    ours, info = load_fairseq_ctc(path, mask_time_prob=0.0)
    assert ours.config.mask_time_prob == 0.0 and ours.encoder.time_masking is None
    assert info["ignored_keys"] == ["w2v_encoder.w2v_model.mask_emb"] and info["masking"]["override"] == 0.0


@pytest.mark.parametrize("family,legacy", [("wav2vec2", False), ("hubert", False), ("wav2vec2", True)])
def test_finetuned_uses_finetuning_masking(tmp_path, family, legacy):
    path = tmp_path / "ft.pt"
    ta = _save_finetuned(path, "base", family, legacy=legacy, pre_extra={"mask_prob": 0.65, "mask_length": 10},
                         ft_extra={"apply_mask": True, "mask_prob": 0.25, "mask_length": 5})
    vector = torch.load(path, weights_only=False)["model"]["w2v_encoder.w2v_model.mask_emb"]
    ours, info = load_fairseq_ctc(path)
    assert (ours.config.mask_time_prob, ours.config.mask_time_length) == (0.25, 5)
    assert info["masking"]["source"] == "fine-tuning config" and info["masking"]["apply_mask"]
    assert info["ignored_keys"] == []
    torch.testing.assert_close(ours.encoder.time_masking.mask_emb.detach(), vector, atol=0, rtol=0)
    wav = torch.randn(1, 1600)  # eval mode: masking does not change the logits
    with torch.no_grad():
        torch.testing.assert_close(ours(wav)[0], ta(wav)[0], atol=1e-4, rtol=0)

    # Without apply_mask fairseq fine-tunes unmasked, whatever mask_prob says.
    _save_finetuned(path, "base", family, legacy=legacy, pre_extra={"mask_prob": 0.65},
                    ft_extra={"apply_mask": False, "mask_prob": 0.25})
    ours, info = load_fairseq_ctc(path)
    assert ours.config.mask_time_prob == 0.0 and info["ignored_keys"] == ["w2v_encoder.w2v_model.mask_emb"]


@pytest.mark.parametrize("extra,expected", [
    ({"mask_selection": "normal", "mask_other": 2.0}, "mask_selection='normal' (mask_other=2.0)"),
    ({"no_mask_overlap": True}, "no_mask_overlap=True"),
    ({"mask_channel_prob": 0.1, "mask_channel_selection": "normal", "mask_channel_other": 2.0},
     "mask_channel_selection='normal' (mask_channel_other=2.0)"),
    ({"mask_channel_prob": 0.1, "no_mask_channel_overlap": True}, "no_mask_channel_overlap=True"),
    ({"mask_channel_prob": 0.1, "mask_channel_before": True}, "mask_channel_before=True"),
])
def test_unsupported_masking_loads_with_a_warning(tmp_path, caplog, extra, expected):
    path = tmp_path / "ft.pt"
    _save_finetuned(path, "base", ft_extra={"apply_mask": True, "mask_prob": 0.5, **extra})
    with caplog.at_level(logging.WARNING, logger="allinone"):
        ours, info = load_fairseq_ctc(path)
    assert ours.config.mask_time_prob == 0.5  # loaded: our static, possibly overlapping spans
    assert [d for d in info["masking"]["differences"] if expected in d]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and expected in warnings[0] and "ft.pt" in warnings[0]

    # Nothing to warn about when fairseq would not mask, or for mask_other with static spans (unused).
    caplog.clear()
    _save_finetuned(path, "base", ft_extra={"apply_mask": False, "mask_prob": 0.5, **extra})
    _save_finetuned(tmp_path / "static.pt", "base",
                    ft_extra={"apply_mask": True, "mask_prob": 0.5, "mask_selection": "static", "mask_other": 3.0})
    with caplog.at_level(logging.WARNING, logger="allinone"):
        assert load_fairseq_ctc(path)[1]["masking"]["differences"] == []
        assert load_fairseq_ctc(tmp_path / "static.pt")[1]["masking"]["differences"] == []
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_masking_without_mask_emb_gets_a_new_vector(tmp_path, caplog):
    path = tmp_path / "pre.pt"
    _save_pretraining(path, "wav2vec2")
    _edit(path, lambda c: c["model"].pop("mask_emb"))
    with caplog.at_level(logging.WARNING, logger="allinone"):
        ours, info = load_fairseq_ctc(path, vocab_size=5, mask_time_prob=0.3)
    assert ours.config.mask_time_prob == 0.3 and ours.encoder.time_masking.mask_emb.shape == (32,)
    assert any("no mask_emb" in r.getMessage() for r in caplog.records)
