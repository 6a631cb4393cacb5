"""Fbank against ESPnet's DefaultFrontend on real audio; CMVN stats against numpy and ESPnet."""

import numpy as np
import pytest
import torch

from allinone.data import (
    FbankConfig, compute_cmvn_stats, compute_fbank, compute_fbank_batch, load_audio, load_cmvn_stats,
    mel_filterbank, save_cmvn_stats,
)

espnet_frontend = pytest.importorskip("espnet2.asr.frontend.default")


def _frontend(cfg: FbankConfig):
    return espnet_frontend.DefaultFrontend(fs=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                                           hop_length=cfg.hop_length, n_mels=cfg.n_mels).eval()


@pytest.fixture(scope="module")
def waves(data_root):
    paths = [data_root / "speechocean762" / "audio" / "SPEAKER0001" / "000010011.opus",
             data_root / "fsdd" / "recordings" / "3_theo_7.wav",
             next((data_root / "librispeech_samples").rglob("*.flac"))]
    return [load_audio(p) for p in paths]


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    cfg = FbankConfig()
    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=0.0, fmax=8000.0)
    assert np.abs(mel_filterbank(cfg).numpy() - ref.T).max() < 1e-6


@pytest.mark.parametrize("cfg", [FbankConfig(), FbankConfig(n_fft=400, win_length=400, hop_length=160, n_mels=40)])
def test_single_utterance_matches_espnet(waves, cfg):
    fe = _frontend(cfg)
    for wave in waves:
        with torch.no_grad():
            ref, ref_lens = fe(wave[None], torch.tensor([wave.numel()]))
        ours = compute_fbank(wave, cfg)
        assert ours.shape == (cfg.num_frames(wave.numel()), cfg.n_mels) == ref[0].shape
        assert (ours - ref[0]).abs().max().item() <= 1e-3


def test_padded_batch_matches_espnet(waves):
    cfg = FbankConfig()
    lengths = torch.tensor([w.numel() for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for b, w in enumerate(waves):
        batch[b, : w.numel()] = w
    with torch.no_grad():
        ref, ref_lens = _frontend(cfg)(batch, lengths)
    ours, lens = compute_fbank_batch(batch, lengths, cfg)
    assert torch.equal(lens, ref_lens) and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3
    # Away from its end, a padded utterance has the same features as on its own.
    short = int(lengths.argmin())
    alone = compute_fbank(waves[short], cfg)
    assert (ours[short, : lens[short] - 3] - alone[:-3]).abs().max().item() <= 1e-3
    assert ours[short, lens[short]:].abs().sum() == 0


def test_cmvn_stats_match_numpy_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 5)).astype(np.float32) for n in (7, 13, 1)]
    stats = compute_cmvn_stats(torch.from_numpy(f) for f in feats)
    allf = np.concatenate(feats).astype(np.float64)
    assert int(stats["count"]) == 21
    np.testing.assert_allclose(stats["sum"], allf.sum(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sum_square"], (allf ** 2).sum(0), rtol=1e-12)
    assert stats["sum"].dtype == np.float64
    path = tmp_path / "feats_stats.npz"
    save_cmvn_stats(path, stats)
    back = load_cmvn_stats(path)
    assert sorted(back) == ["count", "sum", "sum_square"]
    np.testing.assert_array_equal(back["sum"], stats["sum"])


def test_cmvn_file_loads_in_espnet_global_mvn(tmp_path):
    global_mvn = pytest.importorskip("espnet2.layers.global_mvn")
    rng = np.random.default_rng(1)
    feats = [rng.normal(3.0, 2.0, size=(50, 4)) for _ in range(3)]
    path = tmp_path / "feats_stats.npz"
    save_cmvn_stats(path, compute_cmvn_stats(feats))
    mvn = global_mvn.GlobalMVN(str(path))
    allf = np.concatenate(feats)
    np.testing.assert_allclose(mvn.mean.numpy(), allf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(mvn.std.numpy(), allf.std(0), rtol=1e-4)


def test_cmvn_errors(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        compute_cmvn_stats([])
    with pytest.raises(ValueError, match="feature dim changed"):
        compute_cmvn_stats([np.zeros((2, 3)), np.zeros((2, 4))])
    np.savez(tmp_path / "x.npz", count=1)
    with pytest.raises(ValueError, match="lack key"):
        load_cmvn_stats(tmp_path / "x.npz")
