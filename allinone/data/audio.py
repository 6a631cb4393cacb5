"""Audio loading through libsndfile (``soundfile``): WAV, FLAC, Ogg/Opus, NIST SPHERE.

Every problem with a file (missing, unreadable, corrupt, empty) is raised as ``DataError``
naming the file, so a bad recording in a 100k-utterance corpus is easy to find.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from allinone.data.kaldi import DataError


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Return ``(sample_rate, num_frames, num_channels)`` of an audio file without decoding it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as e:
        raise DataError(f"cannot read audio file {path}: {e}") from None
    return info.samplerate, info.frames, info.channels


def load_audio(
    path: str | os.PathLike,
    start: float | None = None,
    end: float | None = None,
    channel: int | None = None,
    sample_rate: int = 16000,
) -> torch.Tensor:
    """Read (part of) an audio file as mono float32 at ``sample_rate``.

    Args:
        path: any file libsndfile reads (WAV, FLAC, Ogg/Opus, NIST SPHERE, ...).
        start, end: segment in seconds (``None``: from the start / to the end). An end past the
            end of the file is clamped, as Kaldi's ``extract-segments`` does.
        channel: 0-based channel to keep; ``None`` averages all channels.
        sample_rate: output rate; other rates are resampled with ``torchaudio.functional.resample``.

    Returns:
        wave: ``[samples]`` float32 in [-1, 1].

    Raises:
        DataError: the file is missing, unreadable or corrupt, the channel does not exist,
            or the audio (or the segment) is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            file_rate, num_frames, num_channels = f.samplerate, f.frames, f.channels
            first, last = _segment_frames(path, start, end, file_rate, num_frames)
            if channel is not None and not 0 <= channel < num_channels:
                raise DataError(f"{path}: channel {channel} requested but the file has {num_channels} channel(s)")
            if first > 0:
                f.seek(first)
            data = f.read(last - first, dtype="float32", always_2d=True)  # [samples, channels]
    except (sf.SoundFileError, RuntimeError) as e:
        # LibsndfileError (a RuntimeError) covers unknown formats, truncated and corrupt files.
        raise DataError(f"cannot read audio file {path}: {e}") from None

    if data.shape[0] == 0:
        raise DataError(f"audio file {path} is empty" + _describe_segment(start, end))
    mono = data[:, channel] if channel is not None else data.mean(axis=1)
    wave = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    if file_rate != sample_rate:
        wave = AF.resample(wave, file_rate, sample_rate)
    return wave


def _segment_frames(path: Path, start: float | None, end: float | None, rate: int, num_frames: int) -> tuple[int, int]:
    """Convert a segment in seconds into a ``[first, last)`` frame range inside the file."""
    first = 0 if start is None else int(round(start * rate))
    last = num_frames if end is None else min(num_frames, int(round(end * rate)))
    if first < 0 or (end is not None and start is not None and end <= start):
        raise DataError(f"{path}: invalid segment{_describe_segment(start, end)}")
    if first >= last:
        raise DataError(f"audio segment of {path} is empty{_describe_segment(start, end)} "
                        f"(file has {num_frames / rate:.3f} s)")
    return first, last


def _describe_segment(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return ""
    return f" (segment {start if start is not None else 0.0}-{end if end is not None else 'end'} s)"


def speed_perturb(wave: torch.Tensor, factor: float, sample_rate: int = 16000) -> torch.Tensor:
    """Kaldi/ESPnet-style speed perturbation (``sox speed``): tempo and pitch both change.

    The wave is treated as if it were sampled at ``sample_rate * factor`` and resampled back to
    ``sample_rate``, so factor 0.9 makes it 1/0.9 times longer and lower pitched.

    Args:
        wave: ``[samples]``.
    Returns:
        ``[round(samples / factor)]`` approximately.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    if factor == 1.0:
        return wave
    return AF.resample(wave, int(round(sample_rate * factor)), sample_rate)
