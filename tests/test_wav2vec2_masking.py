"""wav2vec2 fine-tuning time masking (``TimeMasking``) and its checkpoint vector, and feature
(channel) masking (``FeatureMasking``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allinone.models.wav2vec2 import FeatureMasking, TimeMasking, Wav2Vec2Config, Wav2Vec2CTCModel, span_mask

TINY = dict(extractor_conv_layer_config=[[16, 10, 5], [16, 3, 2]], encoder_embed_dim=32, encoder_num_layers=2,
            encoder_num_heads=2, encoder_ff_interm_features=64, encoder_pos_conv_kernel=16,
            encoder_pos_conv_groups=4, encoder_layer_drop=0.0, vocab_size=7)


def test_off_by_default_and_identity_in_eval():
    plain = Wav2Vec2CTCModel(Wav2Vec2Config(**TINY))
    assert not any("time_masking" in k for k in plain.state_dict())  # torchaudio's keys when off
    masked = Wav2Vec2CTCModel(Wav2Vec2Config(**TINY, mask_time_prob=0.5, mask_time_length=2))
    state = plain.state_dict()
    masked.load_state_dict({**state, "encoder.time_masking.mask_emb": torch.randn(32)})
    wav = torch.randn(2, 8000)
    lens = torch.tensor([8000, 5000])
    plain.eval(), masked.eval()
    torch.testing.assert_close(masked(wav, lens)[0], plain(wav, lens)[0], rtol=0, atol=0)
    masked.train(), plain.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = masked.encode(wav, lens)[0]
    torch.manual_seed(0)
    with torch.no_grad():
        b = plain.encode(wav, lens)[0]
    assert not torch.allclose(a, b)  # training mode masks


def test_masked_frames_are_the_vector_inside_each_utterance():
    tm = TimeMasking(8, prob=0.3, length=4, min_masks=2).train()
    x = torch.randn(3, 50, 8) + 5.0
    lengths = torch.tensor([50, 30, 3])
    torch.manual_seed(1)
    out = tm(x, lengths)
    changed = (out != x).any(-1)
    for b, n in enumerate(lengths.tolist()):
        assert not changed[b, n:].any()  # never past the utterance
        torch.testing.assert_close(out[b][changed[b]], tm.mask_emb.expand(int(changed[b].sum()), 8))
    assert changed[0].sum() >= 2 * 4 - 3 and changed[1].any()  # at least min_masks spans (may overlap)
    assert not changed[2].any()  # shorter than one span
    out.sum().backward()
    assert tm.mask_emb.grad is not None and tm.mask_emb.grad.abs().sum() > 0
    tm.eval()
    assert tm(x, lengths) is x


def test_masked_fraction_matches_transformers():
    """Same expected share of masked frames as transformers' _compute_mask_indices (the reference)."""
    modeling = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    tm = TimeMasking(4, prob=0.05, length=10, min_masks=2)
    g = torch.Generator().manual_seed(0)
    np.random.seed(0)
    for frames in (60, 249, 800):
        ours = np.mean([tm.span_mask(frames, [frames] * 8, g).float().mean().item() for _ in range(200)])
        ref = np.mean([modeling._compute_mask_indices((8, frames), 0.05, 10, min_masks=2).mean()
                       for _ in range(200)])
        assert abs(ours - ref) <= 0.1 * ref, (frames, ours, ref)


def test_short_batches_cap_the_spans_as_transformers():
    """At most padded_frames // length spans: 15 frames, spans of 10, min_masks 2 -> one span
    (10 frames), as transformers' _compute_mask_indices gives, not two overlapping ones."""
    modeling = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    tm = TimeMasking(4, prob=0.05, length=10, min_masks=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert tm.span_mask(15, [15, 15], g).sum(1).tolist() == [10, 10]
    assert modeling._compute_mask_indices((2, 15), 0.05, 10, min_masks=2).sum(1).tolist() == [10, 10]


def test_hugging_face_vector_loads_or_is_ignored(tmp_path):
    transformers = pytest.importorskip("transformers")
    from allinone.interop.huggingface import load_hf_ctc

    small = dict(vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**small, mask_time_prob=0.1, mask_time_length=3))
    hf.save_pretrained(tmp_path / "a")
    model, info = load_hf_ctc(tmp_path / "a")
    assert (model.config.mask_time_prob, model.config.mask_time_length) == (0.1, 3)
    torch.testing.assert_close(model.encoder.time_masking.mask_emb, hf.wav2vec2.masked_spec_embed)
    # feature masking only: transformers keeps the vector, our model has no use for it
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**small, mask_time_prob=0.0, mask_feature_prob=0.1))
    hf.save_pretrained(tmp_path / "b")
    model, info = load_hf_ctc(tmp_path / "b")
    assert model.encoder.time_masking is None and info["ignored_keys"] == ["wav2vec2.masked_spec_embed"]


# ------------------------------------------------------------------ feature (channel) masking

NO_DROPOUT = dict(encoder_projection_dropout=0.0, encoder_attention_dropout=0.0, encoder_dropout=0.0,
                  encoder_ff_interm_dropout=0.0, final_dropout=0.0)


def _zeroed_channels(out: torch.Tensor, n: int) -> torch.Tensor:
    """[D] bool: channels that are 0 in every one of the first ``n`` frames of ``out`` [T, D]."""
    return (out[:n] == 0).all(0)


def _runs(channels: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a [D] bool vector."""
    runs, run = [], 0
    for v in channels.tolist() + [False]:
        if v:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    return runs


def test_feature_masking_zeros_whole_channels_of_each_utterance():
    fm = FeatureMasking(prob=0.3, length=4, min_masks=1).train()
    x = torch.rand(6, 20, 32) + 1.0  # no zero anywhere
    torch.manual_seed(0)
    out = fm(x)
    zero = out == 0
    masks = []
    for b in range(6):
        channels = _zeroed_channels(out[b], 20)
        masks.append(channels)
        # zeros are exactly the chosen channels, in every frame; everything else is untouched
        assert torch.equal(zero[b], channels.expand(20, 32))
        torch.testing.assert_close(out[b][:, ~channels], x[b][:, ~channels], rtol=0, atol=0)
        assert channels.sum() >= 4 and all(r >= 4 for r in _runs(channels))  # whole spans of 4
    assert len({tuple(m.tolist()) for m in masks}) > 1  # drawn per utterance
    fm.eval()
    assert fm(x) is x


def test_feature_masking_in_the_model_after_time_masking():
    """In the encoder, transformers' order: time-masked frames get the vector, then the
    feature-masked channels are 0 in every valid frame, the time-masked ones included."""
    config = Wav2Vec2Config(**{**TINY, **NO_DROPOUT}, mask_time_prob=0.4, mask_time_length=2,
                            mask_feature_prob=0.3, mask_feature_length=4, mask_feature_min_masks=1)
    model = Wav2Vec2CTCModel(config).train()
    assert isinstance(model.encoder.feature_masking, FeatureMasking)
    seen = {}
    model.encoder.transformer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    wav = torch.randn(2, 8000)
    lens = torch.tensor([8000, 5000])
    torch.manual_seed(3)
    with torch.no_grad():
        features, frames = model.feature_extractor(wav, lens)
        projected = model.encoder.feature_projection(features)
        model.encoder(features, frames)
    x, emb = seen["x"], model.encoder.time_masking.mask_emb.detach()
    time_masked_frames = 0
    for b, n in enumerate(frames.tolist()):
        channels = _zeroed_channels(x[b], n)
        assert channels.sum() >= 4 and not channels.all()
        assert (x[b, n:] == 0).all()  # padding stays zero
        keep = ~channels
        is_emb = (x[b, :n][:, keep] == emb[keep]).all(-1)
        is_proj = (x[b, :n][:, keep] == projected[b, :n][:, keep]).all(-1)
        assert (is_emb | is_proj).all()  # every valid frame is either masked or kept, on kept channels
        time_masked_frames += int(is_emb.sum())
        assert (x[b, :n][is_emb][:, channels] == 0).all()  # channel masking after time masking
    assert time_masked_frames > 0


def test_feature_masking_off_and_eval_are_identity():
    plain = Wav2Vec2CTCModel(Wav2Vec2Config(**TINY))
    off = Wav2Vec2CTCModel(Wav2Vec2Config(**TINY, mask_feature_prob=0.0, mask_feature_length=4,
                                          mask_feature_min_masks=3))
    on = Wav2Vec2CTCModel(Wav2Vec2Config(**TINY, mask_feature_prob=0.5, mask_feature_length=4))
    assert off.encoder.feature_masking is None
    # no parameters or buffers: torchaudio's keys whether it is on or off
    assert list(off.state_dict()) == list(plain.state_dict()) == list(on.state_dict())
    state = plain.state_dict()
    off.load_state_dict(state), on.load_state_dict(state)
    wav = torch.randn(2, 8000)
    lens = torch.tensor([8000, 5000])
    for m in (plain, off, on):
        m.eval()
    with torch.no_grad():
        ref = plain(wav, lens)[0]
        torch.testing.assert_close(off(wav, lens)[0], ref, rtol=0, atol=0)
        torch.testing.assert_close(on(wav, lens)[0], ref, rtol=0, atol=0)  # eval: no masking
    for m in (plain, off, on):
        m.train()
    outs = []
    for m in (plain, off, on):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m.encode(wav, lens)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # prob 0: same draws, same output
    assert not torch.allclose(outs[2], outs[0])  # training mode masks


@pytest.mark.parametrize("channels,prob,length,min_masks", [
    (768, 0.05, 10, 0),   # wav2vec2-base width, a typical fine-tuning setting
    (32, 0.3, 4, 0),
    (64, 0.5, 10, 2),
    (32, 0.1, 10, 4),     # min_masks capped to channels // length spans, as transformers does
])
def test_feature_masked_fraction_matches_transformers(channels, prob, length, min_masks):
    """Same expected share of zeroed channels as transformers' _compute_mask_indices((B, hidden_size), ...)."""
    modeling = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    fm = FeatureMasking(prob, length, min_masks)
    g = torch.Generator().manual_seed(0)
    np.random.seed(0)
    ours = np.mean([fm.span_mask(channels, 8, g).float().mean().item() for _ in range(300)])
    ref = np.mean([modeling._compute_mask_indices((8, channels), prob, length, min_masks=min_masks).mean()
                   for _ in range(300)])
    assert abs(ours - ref) <= 0.1 * ref, (ours, ref)


def test_span_mask_helper_keeps_time_masking_draws():
    """TimeMasking draws through the shared helper: same generator, same mask."""
    tm = TimeMasking(4, prob=0.2, length=3, min_masks=2)
    a = tm.span_mask(40, [40, 25, 2], torch.Generator().manual_seed(5))
    b = span_mask(40, [40, 25, 2], 0.2, 3, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a[0].any() and not a[1, 25:].any() and not a[2].any()
    capped = span_mask(32, [32] * 50, 0.1, 10, 4, torch.Generator().manual_seed(0), max_spans=3)
    assert capped.sum(1).max() <= 30


def test_feature_masking_config_validation_and_round_trip(tmp_path):
    import json

    from allinone.data.dataset import WaveformConfig
    from allinone.data.tokenizer import CharTokenizer
    from allinone.models.saved import load_model_dir, save_model_dir

    for bad in (dict(mask_feature_prob=1.0), dict(mask_feature_prob=-0.1), dict(mask_feature_length=0),
                dict(mask_feature_min_masks=-1), dict(mask_feature_length=2.5), dict(mask_feature_prob="0.1")):
        with pytest.raises(ValueError, match="Wav2Vec2Config feature masking"):
            Wav2Vec2Config(**TINY, **bad).validate()
    with pytest.raises(ValueError, match="mask_feature_length=40 exceeds encoder_embed_dim=32"):
        Wav2Vec2Config(**TINY, mask_feature_prob=0.1, mask_feature_length=40).validate()
    Wav2Vec2Config(**TINY, mask_feature_prob=0.0, mask_feature_length=40).validate()  # off: unused

    config = Wav2Vec2Config(**TINY, mask_feature_prob=0.2, mask_feature_length=4, mask_feature_min_masks=1)
    d = json.loads(json.dumps(config.to_dict()))
    assert (d["mask_feature_prob"], d["mask_feature_length"], d["mask_feature_min_masks"]) == (0.2, 4, 1)
    assert Wav2Vec2Config.from_dict(d) == config
    old = {k: v for k, v in d.items() if not k.startswith("mask_feature_")}  # a config.json from before
    assert Wav2Vec2Config.from_dict(old) == Wav2Vec2Config(**TINY)
    tok = CharTokenizer.train(["ab c"])
    save_model_dir(tmp_path / "m", Wav2Vec2CTCModel(config), WaveformConfig(), tok)
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.model.config == config and isinstance(loaded.model.encoder.feature_masking, FeatureMasking)


def test_hugging_face_feature_masking_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from allinone.interop.huggingface import load_hf_ctc

    small = dict(vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**small, mask_feature_prob=0.2,
                                                                 mask_feature_length=4))
    hf.save_pretrained(tmp_path / "a")
    model, _ = load_hf_ctc(tmp_path / "a")
    c = model.config
    assert (c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks) == (0.2, 4, 0)
    assert (model.encoder.feature_masking.prob, model.encoder.feature_masking.length) == (0.2, 4)
    hf = transformers.HubertForCTC(transformers.HubertConfig(**small, mask_feature_prob=0.1, mask_feature_length=3,
                                                             mask_feature_min_masks=2))
    hf.save_pretrained(tmp_path / "b")
    c = load_hf_ctc(tmp_path / "b")[0].config
    assert (c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks) == (0.1, 3, 2)
    # apply_spec_augment=False: transformers masks nothing at all
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**small, apply_spec_augment=False,
                                                                 mask_time_prob=0.1, mask_feature_prob=0.2))
    hf.save_pretrained(tmp_path / "c")
    model, info = load_hf_ctc(tmp_path / "c")
    assert (model.config.mask_time_prob, model.config.mask_feature_prob) == (0.0, 0.0)
    assert model.encoder.time_masking is None and model.encoder.feature_masking is None
    assert info["ignored_keys"] == ["wav2vec2.masked_spec_embed"]


@pytest.mark.parametrize("legacy", [False, True])
def test_fairseq_channel_masking_maps(tmp_path, caplog, legacy):
    pytest.importorskip("torchaudio.models")
    import logging

    from allinone.interop.fairseq import load_fairseq_ctc
    from tests.test_wav2vec2_fairseq import _save_finetuned

    path = tmp_path / "ft.pt"
    # The fine-tuning config's values win over the pretraining ones, as fairseq overrides them.
    _save_finetuned(path, "base", legacy=legacy, pre_extra={"mask_channel_prob": 0.5, "mask_channel_length": 2},
                    ft_extra={"apply_mask": True, "mask_prob": 0.0, "mask_channel_prob": 0.25,
                              "mask_channel_length": 6})
    with caplog.at_level(logging.WARNING, logger="allinone"):
        ours, info = load_fairseq_ctc(path)
    c = ours.config
    assert (c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks) == (0.25, 6, 0)
    assert c.mask_time_prob == 0.0 and ours.encoder.time_masking is None
    assert isinstance(ours.encoder.feature_masking, FeatureMasking)
    m = info["masking"]
    assert (m["mask_feature_prob"], m["mask_feature_length"], m["differences"]) == (0.25, 6, [])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Without apply_mask fairseq masks no channels either; the time override leaves channels alone.
    _save_finetuned(path, "base", legacy=legacy, ft_extra={"apply_mask": False, "mask_channel_prob": 0.25})
    assert load_fairseq_ctc(path)[0].config.mask_feature_prob == 0.0
    assert load_fairseq_ctc(path, mask_time_prob=0.1)[0].config.mask_feature_prob == 0.0
    # mask_channel_before only matters with time masking on; a non-default min space only with no overlap.
    _save_finetuned(path, "base", legacy=legacy, pre_extra={"mask_channel_min_space": 3},
                    ft_extra={"apply_mask": True, "mask_prob": 0.0, "mask_channel_prob": 0.25,
                              "mask_channel_before": True})
    assert load_fairseq_ctc(path)[1]["masking"]["differences"] == []
    _save_finetuned(path, "base", legacy=legacy, pre_extra={"mask_channel_min_space": 3},
                    ft_extra={"apply_mask": True, "mask_prob": 0.0, "mask_channel_prob": 0.25,
                              "no_mask_channel_overlap": True})
    differences = load_fairseq_ctc(path)[1]["masking"]["differences"]
    assert len(differences) == 1 and "mask_channel_min_space=3" in differences[0]


def test_fairseq_pretraining_checkpoint_has_no_channel_masking(tmp_path):
    pytest.importorskip("torchaudio.models")
    from allinone.interop.fairseq import load_fairseq_ctc
    from tests.test_wav2vec2_fairseq import _save_pretraining

    _save_pretraining(tmp_path / "pre.pt", "wav2vec2", mask_channel_prob=0.2, mask_channel_length=4)
    ours, info = load_fairseq_ctc(tmp_path / "pre.pt", vocab_size=5)
    assert ours.config.mask_feature_prob == 0.0 and ours.encoder.feature_masking is None
    assert info["masking"]["differences"] == []


def test_trainer_init_from_sets_feature_masking(tmp_path):
    transformers = pytest.importorskip("transformers")
    from allinone.train.config import load_config
    from allinone.train.trainer import build_wav2vec2

    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4))
    hf.save_pretrained(tmp_path / "hf")
    cfg = load_config(None, [])
    cfg.model = {"kind": "wav2vec2", "init_from": str(tmp_path / "hf"),
                 "wav2vec2": {"mask_feature_prob": 0.15, "mask_feature_length": 5, "mask_feature_min_masks": 1}}
    model = build_wav2vec2(cfg, 9)
    c = model.config
    assert (c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks) == (0.15, 5, 1)
    assert model.encoder.feature_masking.prob == 0.15
    torch.testing.assert_close(model.encoder.transformer.layers[0].attention.q_proj.weight,
                               hf.wav2vec2.encoder.layers[0].attention.q_proj.weight)
    cfg.model["wav2vec2"] = {"mask_feature_length": 40, "mask_feature_prob": 0.1}
    with pytest.raises(ValueError, match="mask_feature_length=40"):
        build_wav2vec2(cfg, 9)
