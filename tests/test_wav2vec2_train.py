"""CTC fine-tuning of wav2vec2 models through the trainer: waveform data, freezing, layer-wise
learning rates, init_from (fairseq / Hugging Face), resume, and decoding the saved model."""

from __future__ import annotations

import json

import pytest
import torch

from allinone.cli import main as cli
from allinone.data.dataset import WaveformConfig, collate, extract_features
from allinone.data.kaldi import read_data_dir
from allinone.train.config import load_config
from allinone.train.trainer import build_model, param_groups, train
from tests.test_train import digits  # noqa: F401  (the shared digits fixture)
from tests.test_wav2vec2_fairseq import _to_fairseq_name

pytestmark = pytest.mark.usefixtures("one_thread")

# 7 convolutions with the published strides (a 20 ms hop), narrow and shallow.
TINY_W2V = {"extractor_conv_layer_config": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
            "encoder_embed_dim": 32, "encoder_num_layers": 2, "encoder_num_heads": 2,
            "encoder_ff_interm_features": 64, "encoder_pos_conv_kernel": 16, "encoder_pos_conv_groups": 4,
            "encoder_projection_dropout": 0.0, "encoder_attention_dropout": 0.0, "encoder_dropout": 0.0,
            "encoder_layer_drop": 0.0}


def w2v_config(digits, exp_dir, model: dict, **train):
    overrides = [f"exp_dir={exp_dir}", f"data.train={digits}/train", f"data.valid={digits}/test",
                 f"data.feat_cache_dir={digits}/feats", "data.num_workers=1", "tokenizer.kind=char",
                 "train.device=cpu", "train.max_samples=200000", "train.log_every=1", "optim.warmup_steps=5",
                 "optim.lr=2e-3", "train.keep_best=2"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(None, overrides)
    cfg.model = {"kind": "wav2vec2", **model}
    return cfg


def _batch(digits, n: int = 4):
    """The first ``n`` training utterances as a padded waveform batch, with char tokens."""
    from allinone.data.tokenizer import CharTokenizer

    utts = read_data_dir(digits / "train")[:n]
    waves = extract_features(utts, WaveformConfig(), progress=False)
    tok = CharTokenizer.train([u.text for u in read_data_dir(digits / "train")])
    items = [(u.utt_id, waves[u.utt_id], torch.tensor(tok.encode(u.text))) for u in utts]
    return collate(items), tok.vocab_size


def test_waveform_front_end(digits, tmp_path):
    from allinone.data.audio import load_audio

    utts = read_data_dir(digits / "test")[:3]
    cache = tmp_path / "wav.pt"
    waves = extract_features(utts, WaveformConfig(), cache_path=cache, progress=False)
    assert cache.is_file()
    for u in utts:
        torch.testing.assert_close(waves[u.utt_id], load_audio(u.path), atol=0, rtol=0)
    assert extract_features(utts, WaveformConfig(), cache_path=cache, progress=False).keys() == waves.keys()
    normed = extract_features(utts, WaveformConfig(normalize=True), cache_path=cache, progress=False)
    for w in normed.values():  # a different setting: recomputed, not the cached raw waveforms
        assert abs(float(w.mean())) < 1e-4 and abs(float(w.std(unbiased=False)) - 1) < 1e-3
    batch = collate([(k, w, torch.tensor([1])) for k, w in waves.items()])
    assert batch["feats"].shape == (3, max(w.numel() for w in waves.values()))
    assert batch["feat_lens"].tolist() == [w.numel() for w in waves.values()]


def test_memorises_a_repeated_batch(digits, tmp_path):
    """The loss falls past the all-blank plateau (~15 here) until greedy decoding gives the labels."""
    from allinone.eval.ctc_decode import ctc_greedy_batch

    batch, vocab = _batch(digits, 2)
    wider = {**TINY_W2V, "encoder_embed_dim": 64, "encoder_ff_interm_features": 128}
    cfg = w2v_config(digits, tmp_path, {"wav2vec2": wider, "freeze_feature_extractor": False})
    torch.manual_seed(0)
    model = build_model(cfg, vocab, None).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        out = model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.02 * losses[0], losses[::10]
    model.eval()
    with torch.no_grad():
        enc, enc_lens = model.encode(batch["feats"], batch["feat_lens"])
        hyps = ctc_greedy_batch(model.ctc_log_probs(enc), enc_lens)
    assert hyps == [t[:n].tolist() for t, n in zip(batch["tokens"], batch["token_lens"])]


def test_frozen_extractor_and_layer_lr_decay(digits, tmp_path):
    batch, vocab = _batch(digits, 2)
    cfg = w2v_config(digits, tmp_path, {"wav2vec2": TINY_W2V, "layer_lr_decay": 0.5})
    model = build_model(cfg, vocab, None)
    out = model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("feature_extractor."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name
    groups = param_groups(model, cfg)
    in_groups = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    scale = {name: in_groups.get(id(p)) for name, p in model.named_parameters()}
    assert scale["feature_extractor.conv_layers.0.conv.weight"] is None  # not given to the optimizer
    assert scale["aux.weight"] == 1.0
    assert scale["encoder.transformer.layers.1.attention.q_proj.weight"] == 0.5
    assert scale["encoder.transformer.layers.0.feed_forward.output_dense.bias"] == 0.25
    assert scale["encoder.feature_projection.projection.weight"] == 0.125
    assert scale["encoder.transformer.layer_norm.weight"] == 0.125  # post-LN: right after the embedding
    assert {g["weight_decay"] for g in groups if all(p.ndim < 2 for p in g["params"])} == {0.0}


def _fairseq_pretraining_checkpoint(path, vocab_size_unused=None):
    """A fairseq wav2vec2 pretraining checkpoint of a random TINY_W2V model."""
    from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

    torch.manual_seed(3)
    model = Wav2Vec2CTCModel(Wav2Vec2Config.from_dict({**TINY_W2V, "vocab_size": 5}))
    state = {_to_fairseq_name(k, "base"): v for k, v in model.state_dict().items() if not k.startswith("aux.")}
    state["mask_emb"] = torch.randn(32)
    conv = " + ".join(f"[({c}, {k}, {s})]" for c, k, s in TINY_W2V["extractor_conv_layer_config"])
    cfg = {"_name": "wav2vec2", "extractor_mode": "default", "conv_feature_layers": conv, "encoder_layers": 2,
           "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2, "conv_pos": 16,
           "conv_pos_groups": 4, "layer_norm_first": False}
    torch.save({"cfg": {"model": cfg, "task": {"normalize": False}}, "model": state}, path)
    return model


def test_train_from_fairseq_resume_and_decode(digits, tmp_path):
    pretrained = _fairseq_pretraining_checkpoint(tmp_path / "pre.pt")
    model_section = {"init_from": str(tmp_path / "pre.pt"), "wav2vec2": {"encoder_layer_drop": 0.0}}
    exp = tmp_path / "exp"
    final = train(w2v_config(digits, exp, model_section, max_epochs=2))
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["valid_loss"] < history[0]["valid_loss"]
    config = json.loads((final / "config.json").read_text())
    assert config["arch"] == "wav2vec2_ctc" and config["waveform"] == {"sample_rate": 16000, "normalize": False}

    from allinone.models.saved import load_model_dir

    trained = load_model_dir(final).model
    before, after = pretrained.state_dict(), trained.state_dict()
    for k, v in after.items():
        if k.startswith("feature_extractor."):  # frozen: exactly the checkpoint's weights
            assert torch.equal(v, before[k]), k
    assert not torch.equal(after["encoder.transformer.layers.1.feed_forward.output_dense.weight"],
                           before["encoder.transformer.layers.1.feed_forward.output_dense.weight"])

    # --resume continues: epochs 1-2 are not trained again.
    with pytest.raises(ValueError, match="--resume"):
        train(w2v_config(digits, exp, model_section, max_epochs=3))
    train(w2v_config(digits, exp, model_section, max_epochs=3), resume=True)
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[2]["step"] > history[1]["step"]

    from allinone.eval.wer import score

    refs = {u.utt_id: u.text for u in read_data_dir(digits / "test")}
    for beam in (1, 4):
        out = tmp_path / f"decode{beam}"
        assert cli(["decode", str(final), "--data", str(digits / "test"), "--out", str(out), "--num-workers", "1",
                    "--beam", str(beam)]) == 0
        wer = json.loads((out / "wer.json").read_text())
        hyps = dict(line.split(" ", 1) if " " in line else (line, "")
                    for line in (out / "text").read_text().splitlines())
        assert hyps.keys() == refs.keys()
        assert wer["errors"] == score(refs, hyps).errors


def test_fairseq_pretraining_masking_follows_the_run(digits, tmp_path):
    """A pretraining checkpoint fine-tunes without masking unless the run sets mask_time_prob;
    when it does, the masking vector is the checkpoint's ``mask_emb``, not a new one."""
    _fairseq_pretraining_checkpoint(tmp_path / "pre.pt")
    mask_emb = torch.load(tmp_path / "pre.pt", weights_only=True)["model"]["mask_emb"]
    plain = build_model(w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "pre.pt")}), 5, None)
    assert plain.config.mask_time_prob == 0.0
    masked = build_model(w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "pre.pt"),
                                                       "wav2vec2": {"mask_time_prob": 0.05}}), 5, None)
    assert masked.config.mask_time_prob == 0.05
    torch.testing.assert_close(masked.encoder.time_masking.mask_emb.detach(), mask_emb, rtol=0, atol=0)


def test_init_from_hugging_face(tmp_path, digits):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4))
    hf.save_pretrained(tmp_path / "hf")
    cfg = w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "hf"), "freeze_feature_extractor": False,
                                        "wav2vec2": {"final_dropout": 0.2}})
    model = build_model(cfg, 13, None)
    assert model.aux.out_features == 13 and model.config.final_dropout == 0.2
    torch.testing.assert_close(model.encoder.transformer.layers[1].attention.k_proj.weight,
                               hf.wav2vec2.encoder.layers[1].attention.k_proj.weight)
    assert all(p.requires_grad for p in model.feature_extractor.parameters())
    # Time masking asked for by the run: the checkpoint's masked_spec_embed (saved by
    # transformers for its feature masking) becomes the vector, not a new one.
    torch.manual_seed(1)
    hf2 = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, mask_time_prob=0.0, mask_feature_prob=0.1))
    hf2.save_pretrained(tmp_path / "hf2")
    masked = build_model(w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "hf2"),
                                                       "wav2vec2": {"mask_time_prob": 0.05}}), 13, None)
    torch.testing.assert_close(masked.encoder.time_masking.mask_emb.detach(),
                               hf2.wav2vec2.masked_spec_embed.detach(), rtol=0, atol=0)


def test_config_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="no_such_option"):
        build_model(w2v_config(digits, tmp_path, {"no_such_option": 1}), 5, None)
    with pytest.raises(ValueError, match="vocab_size is set by the tokenizer"):
        build_model(w2v_config(digits, tmp_path, {"wav2vec2": {**TINY_W2V, "vocab_size": 5}}), 5, None)
    with pytest.raises(ValueError, match="unknown Wav2Vec2Config fields: \\['encoder_width'\\]"):
        build_model(w2v_config(digits, tmp_path, {"wav2vec2": {"encoder_width": 5}}), 5, None)
    _fairseq_pretraining_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(ValueError, match="encoder_num_layers.*architecture is the checkpoint's"):
        build_model(w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "pre.pt"),
                                                  "wav2vec2": {"encoder_num_layers": 1}}), 5, None)
    with pytest.raises(ValueError, match="neither a Hugging Face directory nor a fairseq checkpoint"):
        build_model(w2v_config(digits, tmp_path, {"init_from": str(tmp_path / "nope.pt")}), 5, None)
    with pytest.raises(ValueError, match="layer_lr_decay"):
        build_model(w2v_config(digits, tmp_path, {"wav2vec2": TINY_W2V, "layer_lr_decay": 0.0}), 5, None)
    cfg = w2v_config(digits, tmp_path, {"wav2vec2": TINY_W2V})
    cfg.supernet = {"space": {"depth": [2], "ffn": [64], "heads": [2], "bits": [32, 8]}, "quant": {"bits": [8]},
                    "extractor_bits": 4}
    with pytest.raises(ValueError, match="extractor_bits=4 needs a quant section with that bit-width"):
        build_model(cfg, 5, None)  # (supernets themselves: tests/test_wav2vec2_supernet_train.py)
    cfg.model = {"encoder": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 2}}
    with pytest.raises(ValueError, match="extractor_bits is for wav2vec2 models"):
        build_model(cfg, 5, None)
    cfg = w2v_config(digits, tmp_path, {})
    cfg.model = {"kind": "transducer"}
    with pytest.raises(ValueError, match="model.kind='transducer'"):
        build_model(cfg, 5, None)


def test_wav2vec2_section_errors_before_any_data(digits, tmp_path):
    """A bad model.wav2vec2 section stops `train` before data preparation and before exp_dir."""
    from allinone.train.trainer import check_model_config

    cases = [({"wav2vec2": {**TINY_W2V, "encoder_num_layerz": 2}}, r"unknown Wav2Vec2Config fields: \['encoder_num_layerz'\]"),
             ({"wav2vec2": {**TINY_W2V, "vocab_size": 9}}, "vocab_size is set by the tokenizer"),
             ({"init_from": str(tmp_path / "nope")}, r"model.init_from .*nope: not found"),
             ({"init_from": str(tmp_path), "wav2vec2": {"encoder_num_layers": 2}},
              r"with model.init_from the architecture is the checkpoint's")]
    for i, (model, message) in enumerate(cases):
        exp = tmp_path / f"exp{i}"
        cfg = w2v_config(digits, exp, model)
        cfg.data.feat_cache_dir = str(tmp_path / f"cache{i}")
        with pytest.raises(ValueError, match=message):
            train(cfg)
        assert not exp.exists() and not (tmp_path / f"cache{i}").exists()
    check_model_config(w2v_config(digits, tmp_path / "ok", {"wav2vec2": TINY_W2V}))  # a good one passes
