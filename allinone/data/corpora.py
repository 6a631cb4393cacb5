"""Converters from corpus layouts to Kaldi data directories.

* ``librispeech_to_data_dir``: the original LibriSpeech layout
  (``<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` + ``*.flac``).
* ``speechocean762_data_dirs``: speechocean762 as we ship it (``train``/``dev``/``test`` Kaldi
  dirs + Ogg/Opus audio) or as its authors publish it (``WAVE/SPEAKERnnnn/*.WAV`` and Kaldi
  ``train``/``test`` dirs), giving the same train / dev / test splits either way.
* ``fsdd_connected_digits``: SYNTHETIC connected-digit utterances made by concatenating
  same-speaker recordings of the Free Spoken Digit Dataset (isolated digits, 8 kHz).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from allinone.data.audio import load_audio
from allinone.data.kaldi import DataError, Utterance, _read_table, read_data_dir, write_data_dir
from allinone.utils import atomic_open

logger = logging.getLogger("allinone")

# ---------------------------------------------------------------------------------------------
# LibriSpeech
# ---------------------------------------------------------------------------------------------


def librispeech_to_data_dir(subset_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Utterance]:
    """Write a Kaldi data dir for one LibriSpeech subset folder (e.g. ``LibriSpeech/dev-clean``).

    Speaker = the speaker folder; audio paths are written absolute (the FLAC files stay where they
    are). Returns the utterances, sorted by id.

    Raises:
        DataError: the folder is not in LibriSpeech layout, a transcript line is malformed, or a
            transcript names a FLAC file that does not exist.
    """
    subset_dir = Path(subset_dir)
    if not subset_dir.is_dir():
        raise DataError(f"LibriSpeech subset folder {subset_dir} does not exist")
    trans_files = sorted(subset_dir.glob("*/*/*-*.trans.txt"))
    if not trans_files:
        raise DataError(f"{subset_dir} is not a LibriSpeech subset folder: expected "
                        "<speaker>/<chapter>/<speaker>-<chapter>.trans.txt files (pass e.g. LibriSpeech/dev-clean)")
    utts = []
    for trans in trans_files:
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            raise DataError(f"{trans}: transcript file name does not match its folders {speaker}/{chapter}")
        utts += _read_librispeech_chapter(trans, speaker)
    write_data_dir(utts, out_dir)
    logger.info("wrote %d LibriSpeech utterances from %s to %s", len(utts), subset_dir, out_dir)
    return sorted(utts, key=lambda u: u.utt_id)


def _read_librispeech_chapter(trans: Path, speaker: str) -> list[Utterance]:
    utts = []
    with open(trans, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split(maxsplit=1)
            if not fields:
                continue
            if len(fields) < 2 or not fields[1].strip():
                raise DataError(f"{trans}:{lineno}: malformed line {line.strip()!r}: expected '<utt_id> <TEXT>'")
            utt_id, text = fields[0], " ".join(fields[1].split())
            flac = trans.parent / f"{utt_id}.flac"
            if not flac.is_file():
                raise DataError(f"{trans}:{lineno}: utterance {utt_id!r}: audio file not found: {flac}")
            utts.append(Utterance(utt_id, str(flac.absolute()), text, speaker))
    return utts


# ---------------------------------------------------------------------------------------------
# speechocean762
# ---------------------------------------------------------------------------------------------

# The shipped copy splits the corpus's test half by speaker into dev (25 speakers) and test
# (60 speakers); the other 40 test-half speakers are not used. The train half is train.
SPEECHOCEAN762_DEV_SPEAKERS = tuple("""
0093 0094 0113 0120 0765 1186 1293 1334 1408 2007 2014 2016 2030 2116 2488 2917 3014 5039 6902
8063 8153 9101 9612 9633 9635""".split())
SPEECHOCEAN762_TEST_SPEAKERS = tuple("""
0003 0049 0092 0096 0114 0133 0157 0563 0567 0811 0981 1037 1039 1046 1050 1076 1099 1135 1156
1181 1228 1292 1420 1422 1469 1501 1502 1503 2002 2327 2441 2538 2740 2892 2897 3007 3027 3060
3214 3412 5015 5017 5029 5072 5220 5406 5432 6067 8068 8581 9107 9118 9555 9610 9618 9622 9626
9629 9631 9647""".split())


def _evenly_spaced(utts: list[Utterance], n: int) -> list[Utterance]:
    """``n`` utterances spread over the sorted list (several speakers, not just the first)."""
    if n <= 0 or n >= len(utts):
        return utts
    return [utts[(k * len(utts)) // n] for k in range(n)]


def _speechocean762_original_half(root: Path, half: str) -> list[Utterance]:
    """One half (``train`` / ``test``) of the authors' layout: Kaldi ``text`` + ``utt2spk``,
    audio ``WAVE/SPEAKER<spk>/<utt>.WAV``."""
    kdir = root / half
    for name in ("text", "utt2spk"):
        if not (kdir / name).is_file():
            raise DataError(f"{root} is not the speechocean762 release layout: {kdir / name} is missing "
                            "(expected WAVE/ and Kaldi train/ and test/ folders)")
    texts, spk = _read_table(kdir / "text"), _read_table(kdir / "utt2spk")
    utts, missing = [], []
    for utt_id in sorted(texts):
        if utt_id not in spk:
            raise DataError(f"{kdir / 'utt2spk'}: utterance {utt_id!r} has no speaker")
        speaker = spk[utt_id]
        folder = root / "WAVE" / f"SPEAKER{speaker}"
        path = next((folder / f"{utt_id}{ext}" for ext in (".WAV", ".wav") if (folder / f"{utt_id}{ext}").is_file()),
                    None)
        if path is None:
            missing.append(str(folder / f"{utt_id}.WAV"))
            continue
        utts.append(Utterance(utt_id, str(path.absolute()), " ".join(texts[utt_id].upper().split()), speaker))
    if missing:
        raise DataError(f"{len(missing)} audio file(s) of {kdir} not found, e.g. {', '.join(missing[:3])}")
    return utts


def speechocean762_data_dirs(corpus_root: str | os.PathLike, out_dir: str | os.PathLike,
                             layout: str = "shipped", subset: int = 0) -> dict[str, int]:
    """Write ``out_dir/{train,dev,test}`` Kaldi dirs (absolute audio paths) for speechocean762.

    layout ``shipped``: the copy in ``shared/data/speechocean762`` (its ``train``/``dev``/``test``
    dirs); ``original``: the authors' release (``WAVE/``, ``train/``, ``test/``), where dev and
    test are the speakers of ``SPEECHOCEAN762_DEV_SPEAKERS`` / ``_TEST_SPEAKERS``, so both
    layouts give the same splits. subset > 0 keeps that many evenly spaced utterances per split
    (for tests). Returns utterance counts per split.
    """
    root = Path(corpus_root)
    if not root.is_dir():
        raise DataError(f"speechocean762 corpus root {root} does not exist")
    if layout == "shipped":
        splits = {}
        for split in ("train", "dev", "test"):
            if not (root / split / "wav.scp").is_file() or not (root / split / "text").is_file():
                hint = " (is it the authors' layout? pass layout 'original')" if (root / "WAVE").is_dir() else ""
                raise DataError(f"{root / split} has no wav.scp / text: not the shipped speechocean762 layout{hint}")
            splits[split] = list(read_data_dir(root / split))
    elif layout == "original":
        train = _speechocean762_original_half(root, "train")
        test_half = _speechocean762_original_half(root, "test")
        dev_spk, test_spk = set(SPEECHOCEAN762_DEV_SPEAKERS), set(SPEECHOCEAN762_TEST_SPEAKERS)
        splits = {"train": train,
                  "dev": [u for u in test_half if u.speaker in dev_spk],
                  "test": [u for u in test_half if u.speaker in test_spk]}
    else:
        raise ValueError(f"speechocean762 layout must be 'shipped' or 'original', got {layout!r}")
    counts = {}
    for split, utts in splits.items():
        if not utts:
            raise DataError(f"speechocean762 {split}: no utterances found under {root}")
        utts = _evenly_spaced(sorted(utts, key=lambda u: u.utt_id), subset)
        write_data_dir(utts, Path(out_dir) / split)
        counts[split] = len(utts)
    logger.info("speechocean762 (%s layout) %s -> %s", layout, counts, out_dir)
    return counts


# ---------------------------------------------------------------------------------------------
# FSDD connected digits (synthetic)
# ---------------------------------------------------------------------------------------------

_DIGIT_WORDS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
# FSDD's official split: recording indices 0-4 are test, 5-49 train.
_FSDD_TEST_INDICES = range(0, 5)
_OUT_RATE = 16000
# Silence (seconds) before, between and after the digits; gaps are drawn per utterance.
_LEAD_SILENCE = 0.1
_GAP_RANGE = (0.05, 0.25)

_FSDD_README = """\
# Synthetic connected digits from FSDD

THIS IS SYNTHETIC DATA: every utterance is a concatenation of isolated digit recordings of one
speaker from the Free Spoken Digit Dataset (FSDD), with short digital silences between them.
It is not natural, co-articulated connected speech.

* Source: Free Spoken Digit Dataset (`Jakobovski/free-spoken-digit-dataset`), split `{split}`
  (official split: recording index 0-4 test, 5-49 train).
* Made by `allinone.data.corpora.fsdd_connected_digits` with num_utts={num_utts},
  min_digits={min_digits}, max_digits={max_digits}, seed={seed}; resampled 8 kHz -> 16 kHz,
  16-bit PCM WAV in `wav/`, Kaldi data directory files next to this README.
* License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0), as FSDD;
  derived data carries the same license. Attribute FSDD when you use or share it.
"""


def _fsdd_recordings(fsdd_root: Path, split: str) -> dict[str, list[tuple[int, Path]]]:
    """``speaker -> [(digit, path), ...]`` of one split, sorted for determinism."""
    rec_dir = fsdd_root / "recordings"
    if not rec_dir.is_dir():
        raise DataError(f"{fsdd_root} is not an FSDD folder: no recordings/ directory")
    by_speaker: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in sorted(rec_dir.iterdir()):
        m = _FSDD_NAME.match(path.name)
        if m is None:
            continue
        digit, speaker, index = int(m.group(1)), m.group(2), int(m.group(3))
        is_test = index in _FSDD_TEST_INDICES
        if (split == "test") == is_test:
            by_speaker[speaker].append((digit, path))
    if not by_speaker:
        raise DataError(f"no FSDD recordings named <digit>_<speaker>_<index>.wav in {rec_dir}")
    return dict(sorted(by_speaker.items()))


def fsdd_connected_digits(
    fsdd_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "train",
    num_utts: int = 100,
    min_digits: int = 2,
    max_digits: int = 5,
    seed: int = 0,
) -> list[Utterance]:
    """Build SYNTHETIC connected-digit utterances by concatenating same-speaker FSDD digits.

    Each utterance: a random speaker, ``min_digits..max_digits`` random recordings of that speaker
    from ``split`` (official FSDD split), joined with 50-250 ms of silence (100 ms at both ends),
    resampled to 16 kHz. Writes ``out_dir/wav/<utt_id>.wav`` (16-bit PCM), a Kaldi data dir in
    ``out_dir`` (relative wav.scp paths, so the folder can be moved) and ``out_dir/README.md``
    stating that the data is synthetic and CC BY-SA 4.0. Deterministic for a seed.

    Utterance ids are ``<speaker>-<split>-<nnnnn>``; texts are digit words, e.g. ``THREE SEVEN``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"FSDD split must be 'train' or 'test', got {split!r}")
    if num_utts < 1 or not 1 <= min_digits <= max_digits:
        raise ValueError(f"need num_utts >= 1 and 1 <= min_digits <= max_digits, "
                         f"got {num_utts}, {min_digits}, {max_digits}")
    fsdd_root, out_dir = Path(fsdd_root), Path(out_dir)
    by_speaker = _fsdd_recordings(fsdd_root, split)
    speakers = list(by_speaker)
    rng = random.Random(seed)

    utts = []
    for n in range(num_utts):
        speaker = rng.choice(speakers)
        picks = [rng.choice(by_speaker[speaker]) for _ in range(rng.randint(min_digits, max_digits))]
        gaps = [rng.uniform(*_GAP_RANGE) for _ in range(len(picks) - 1)]
        utt_id = f"{speaker}-{split}-{n:05d}"
        wav_path = out_dir / "wav" / f"{utt_id}.wav"
        _write_wav(wav_path, _concatenate([p for _, p in picks], gaps))
        text = " ".join(_DIGIT_WORDS[d] for d, _ in picks)
        utts.append(Utterance(utt_id, str(wav_path), text, speaker))

    write_data_dir(utts, out_dir)
    with atomic_open(out_dir / "README.md", "w", encoding="utf-8") as f:
        f.write(_FSDD_README.format(split=split, num_utts=num_utts, min_digits=min_digits,
                                    max_digits=max_digits, seed=seed))
    logger.info("wrote %d synthetic FSDD connected-digit utterances to %s", len(utts), out_dir)
    return utts


def _silence(seconds: float) -> torch.Tensor:
    return torch.zeros(int(round(seconds * _OUT_RATE)))


def _concatenate(paths: list[Path], gaps: list[float]) -> torch.Tensor:
    """Digits at 16 kHz joined by ``gaps`` seconds of silence, with lead/trail silence: ``[samples]``."""
    pieces = [_silence(_LEAD_SILENCE)]
    for k, path in enumerate(paths):
        if k > 0:
            pieces.append(_silence(gaps[k - 1]))
        pieces.append(load_audio(path, sample_rate=_OUT_RATE))
    pieces.append(_silence(_LEAD_SILENCE))
    return torch.cat(pieces)


def _write_wav(path: Path, wave: torch.Tensor) -> None:
    """16-bit PCM WAV at 16 kHz, written atomically; clipped because resampling can overshoot 1.0."""
    data = np.clip(wave.numpy(), -1.0, 1.0)
    with atomic_open(path, "wb") as f:
        sf.write(f, data, _OUT_RATE, format="WAV", subtype="PCM_16")
