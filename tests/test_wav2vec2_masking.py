"""wav2vec2 fine-tuning time masking (``TimeMasking``) and its checkpoint vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allinone.models.wav2vec2 import TimeMasking, Wav2Vec2Config, Wav2Vec2CTCModel

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
