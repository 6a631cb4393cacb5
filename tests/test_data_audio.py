"""Audio loading: formats, resampling, channels, segments, and every bad-file case."""

import numpy as np
import pytest
import soundfile as sf
import torch

from allinone.data import DataError, load_audio, speed_perturb


def test_opus_from_speechocean762(data_root):
    path = data_root / "speechocean762" / "audio" / "SPEAKER0001" / "000010011.opus"
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() / 16000 - 2.58) < 0.05  # utt2dur says 2.580 s
    assert 0 < wave.abs().max() <= 1.0


def test_fsdd_8k_is_resampled(data_root):
    path = data_root / "fsdd" / "recordings" / "0_george_0.wav"
    native = load_audio(path, sample_rate=8000)
    assert native.numel() == 2384  # manifest.tsv num_samples
    up = load_audio(path)
    assert up.numel() == 2 * 2384
    # Resampling keeps the signal: energy per second is about the same.
    assert torch.allclose(native.pow(2).mean(), up.pow(2).mean(), rtol=0.1)


def test_flac(data_root):
    path = next((data_root / "librispeech_samples").rglob("*.flac"))
    assert load_audio(path).numel() > 16000


def test_sphere_and_channels(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), np.full_like(t, 0.25)], axis=1)
    path = tmp_path / "x.sph"
    sf.write(path, stereo, 8000, format="NIST", subtype="PCM_16")
    left = load_audio(path, channel=0, sample_rate=8000)
    right = load_audio(path, channel=1, sample_rate=8000)
    mixed = load_audio(path, sample_rate=8000)
    assert torch.allclose(left, torch.tensor(stereo[:, 0], dtype=torch.float32), atol=1e-4)
    assert torch.allclose(right, torch.full((8000,), 0.25), atol=1e-4)
    assert torch.allclose(mixed, (left + right) / 2, atol=1e-6)
    with pytest.raises(DataError, match="channel 2 requested but the file has 2"):
        load_audio(path, channel=2)


def test_segment(tmp_path):
    path = tmp_path / "ramp.wav"
    sf.write(path, np.linspace(-1, 1, 16000, dtype=np.float32), 16000, subtype="FLOAT")
    seg = load_audio(path, start=0.25, end=0.5)
    assert seg.numel() == 4000
    assert seg[0].item() == pytest.approx(-1 + 2 * 4000 / 15999, abs=1e-6)
    assert load_audio(path, start=0.9, end=5.0).numel() == 1600  # end clamped to the file


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256)))
    with pytest.raises(DataError, match="cannot read audio file .*bad.wav"):
        load_audio(path)


def test_truncated_opus(tmp_path, data_root):
    src = data_root / "speechocean762" / "audio" / "SPEAKER0001" / "000010011.opus"
    path = tmp_path / "cut.opus"
    path.write_bytes(src.read_bytes()[:60])  # header only partly there
    with pytest.raises(DataError, match="cut.opus"):
        load_audio(path)


def test_empty_file_and_empty_segment(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match="empty.wav.*(empty|0.000 s)"):
        load_audio(path)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(DataError, match="segment of .*short.wav is empty"):
        load_audio(short, start=0.2, end=0.3)


def test_speed_perturb_changes_length():
    wave = torch.randn(16000)
    assert speed_perturb(wave, 1.0) is wave
    assert abs(speed_perturb(wave, 0.9).numel() - 16000 / 0.9) <= 1
    assert abs(speed_perturb(wave, 1.1).numel() - 16000 / 1.1) <= 1
