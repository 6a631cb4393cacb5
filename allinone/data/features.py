"""Log-mel filterbank features, identical to ESPnet's ``DefaultFrontend``, and CMVN statistics.

ESPnet's front end is: ``torch.stft`` (hann window of ``win_length`` centred in ``n_fft``,
``center=True`` with reflect padding) -> power spectrum -> librosa's Slaney mel filterbank ->
``log(max(x, 1e-10))``. Reproducing it exactly means an ESPnet model imported into allinone
sees the very features it was trained on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from allinone.data.kaldi import DataError
from allinone.utils import atomic_open

# ESPnet's LogMel clamps the mel energies before the log.
_LOG_FLOOR = 1e-10


@dataclass
class FbankConfig:
    """Front-end settings; the defaults give 25 ms windows every 10 ms at 16 kHz, 80 mel bins."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (``center=True``): ``samples // hop + 1``."""
        return num_samples // self.hop_length + 1


# ---------------------------------------------------------------------------------------------
# Slaney mel filterbank (the librosa default, ``htk=False, norm="slaney"``)
# ---------------------------------------------------------------------------------------------

# The Slaney scale is linear below 1 kHz and logarithmic above.
_SLANEY_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_HZ_PER_MEL  # 15 mels
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_LINEAR_HZ_PER_MEL
    log = _SLANEY_BREAK_MEL + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_BREAK_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_LINEAR_HZ_PER_MEL
    log = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return np.where(mel >= _SLANEY_BREAK_MEL, log, linear)


def mel_filterbank(cfg: FbankConfig) -> torch.Tensor:
    """Slaney-style triangular mel filters with area normalisation.

    Returns:
        ``[n_fft // 2 + 1, n_mels]`` float32, so that ``power @ filters`` gives mel energies.
    """
    fmax = cfg.sample_rate / 2 if cfg.fmax is None else cfg.fmax
    fft_hz = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(fmax), cfg.n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_freq]
    # Slaney normalisation: every filter has the same area, whatever its width.
    weights *= (2.0 / (upper - lower))
    return torch.from_numpy(weights.T.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Filterbank
# ---------------------------------------------------------------------------------------------


def _power_spectrum(waves: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """``[batch, samples]`` -> ``[batch, frames, n_fft // 2 + 1]`` power spectrum, as ESPnet's Stft."""
    window = torch.hann_window(cfg.win_length, dtype=torch.float32, device=waves.device)
    spec = torch.stft(waves.float(), n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=window, center=True, normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec).transpose(1, 2)  # [batch, frames, freq, 2]
    return spec[..., 0] ** 2 + spec[..., 1] ** 2


def _log_mel(power: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """``[..., freq]`` power -> ``[..., n_mels]`` natural-log mel energies."""
    mel = torch.matmul(power, mel_filterbank(cfg).to(power.device))
    return torch.clamp(mel, min=_LOG_FLOOR).log()


def compute_fbank(wave: torch.Tensor, cfg: FbankConfig | None = None) -> torch.Tensor:
    """Log-mel filterbank of one utterance, as ESPnet's ``DefaultFrontend`` on a batch of one.

    Args:
        wave: ``[samples]`` float waveform at ``cfg.sample_rate``.
    Returns:
        feats: ``[frames, n_mels]`` float32, ``frames = samples // hop_length + 1``.
    """
    cfg = cfg or FbankConfig()
    if wave.dim() != 1:
        raise ValueError(f"compute_fbank expects a 1-D wave [samples], got shape {tuple(wave.shape)}")
    if wave.numel() <= cfg.n_fft // 2:
        # torch.stft's reflect padding needs more samples than half a window.
        raise DataError(f"wave of {wave.numel()} samples is too short for n_fft={cfg.n_fft}")
    return _log_mel(_power_spectrum(wave[None], cfg), cfg)[0]


def compute_fbank_batch(
    waves: torch.Tensor, lengths: torch.Tensor, cfg: FbankConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel filterbank of a zero-padded batch, exactly as ESPnet's ``DefaultFrontend.forward``.

    Note that for a padded utterance the last frames see the zero padding rather than the
    reflection of the signal, so they differ slightly from ``compute_fbank`` on that utterance
    alone (as they do in ESPnet).

    Args:
        waves: ``[batch, samples]``, zero-padded.
        lengths: ``[batch]`` valid samples per utterance.
    Returns:
        ``(feats [batch, frames, n_mels], feat_lens [batch])``; frames beyond ``feat_lens`` are 0.
    """
    cfg = cfg or FbankConfig()
    feats = _log_mel(_power_spectrum(waves, cfg), cfg)
    feat_lens = torch.div(lengths, cfg.hop_length, rounding_mode="trunc") + 1
    pad = torch.arange(feats.size(1), device=feats.device)[None, :] >= feat_lens[:, None]
    return feats.masked_fill(pad[..., None], 0.0), feat_lens


# ---------------------------------------------------------------------------------------------
# CMVN statistics in ESPnet's feats_stats.npz format
# ---------------------------------------------------------------------------------------------


def compute_cmvn_stats(feats: Iterable[torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Accumulate global mean/variance statistics, as ESPnet's ``collect_stats``.

    Args:
        feats: iterable of ``[frames, dim]`` features (unpadded).
    Returns:
        ``{"count": int64 scalar array, "sum": [dim] float64, "sum_square": [dim] float64}``.
    """
    count = 0
    total = total_sq = None
    for x in feats:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"compute_cmvn_stats expects [frames, dim] arrays, got shape {x.shape}")
        x = x.astype(np.float64)
        if total is None:
            total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        elif x.shape[1] != total.shape[0]:
            raise ValueError(f"feature dim changed from {total.shape[0]} to {x.shape[1]}")
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError("compute_cmvn_stats got no frames")
    return {"count": np.asarray(count, dtype=np.int64), "sum": total, "sum_square": total_sq}


def save_cmvn_stats(path: str | os.PathLike, stats: dict[str, np.ndarray]) -> None:
    """Write stats as ESPnet's ``feats_stats.npz`` (keys ``count``, ``sum``, ``sum_square``)."""
    missing = {"count", "sum", "sum_square"} - set(stats)
    if missing:
        raise ValueError(f"CMVN stats lack key(s) {sorted(missing)}")
    with atomic_open(path, "wb") as f:
        np.savez(f, count=np.asarray(stats["count"]), sum=np.asarray(stats["sum"], dtype=np.float64),
                 sum_square=np.asarray(stats["sum_square"], dtype=np.float64))


def load_cmvn_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``feats_stats.npz`` written by ESPnet or by ``save_cmvn_stats``."""
    try:
        with np.load(path) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read CMVN stats {path}: {e}") from None
    missing = {"count", "sum", "sum_square"} - set(stats)
    if missing:
        raise DataError(f"CMVN stats {path} lack key(s) {sorted(missing)}")
    return stats
