"""Kaldi data directories: reading the shipped corpus, every bad-data case, writing."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from allinone.data import DataError, Utterance, parse_wav_entry, read_data_dir, write_data_dir


def _wav(path: Path, seconds: float = 0.2, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.float32) + 0.1, rate)
    return path


def _data_dir(root: Path, wav_scp: str, text: str, utt2spk: str | None = None, segments: str | None = None) -> Path:
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wav.scp").write_text(wav_scp)
    (d / "text").write_text(text)
    if utt2spk is not None:
        (d / "utt2spk").write_text(utt2spk)
    if segments is not None:
        (d / "segments").write_text(segments)
    return d


@pytest.fixture
def two_wavs(tmp_path):
    _wav(tmp_path / "data" / "a.wav")
    _wav(tmp_path / "data" / "b.wav")
    return tmp_path


# --- the shipped corpus --------------------------------------------------------------------------

@pytest.mark.parametrize("split,count", [("train", 2500), ("dev", 500), ("test", 1200)])
def test_speechocean762_dirs(data_root, split, count):
    utts = read_data_dir(data_root / "speechocean762" / split)
    assert len(utts) == count and utts.skipped == []
    assert [u.utt_id for u in utts] == sorted(u.utt_id for u in utts)
    # wav.scp paths are relative to the corpus root (the data dir's parent).
    assert all(Path(u.path).is_file() and u.path.endswith(".opus") for u in utts[:50])
    assert all(u.speaker == u.utt_id[1:5] for u in utts)  # ids are 0<speaker><utt>
    assert all(u.text and u.text == u.text.upper() for u in utts)


# --- good inputs ---------------------------------------------------------------------------------

def test_minimal_dir_speaker_defaults_to_utt_id(two_wavs):
    d = _data_dir(two_wavs, "b b.wav\na a.wav\n", "a HELLO  WORLD\nb BYE\n")
    utts = read_data_dir(d)
    assert [u.utt_id for u in utts] == ["a", "b"]
    assert utts[0].speaker == "a" and utts[0].text == "HELLO WORLD"
    assert Path(utts[0].path) == d / "a.wav"


def test_segments_and_round_trip(tmp_path):
    rec = _wav(tmp_path / "audio" / "rec.wav", seconds=2.0)
    d = _data_dir(tmp_path, f"rec {rec}\n", "s1 ONE\ns2 TWO\n", "s1 spk\ns2 spk\n",
                  "s1 rec 0.0 0.5\ns2 rec 0.5 -1\n")
    utts = read_data_dir(d)
    assert [(u.utt_id, u.start, u.end) for u in utts] == [("s1", 0.0, 0.5), ("s2", 0.5, None)]
    out = tmp_path / "out"
    write_data_dir(utts, out)
    assert (out / "segments").is_file() and (out / "spk2utt").read_text() == "spk s1 s2\n"
    assert [(u.utt_id, u.path, u.start, u.end) for u in read_data_dir(out)] == \
        [(u.utt_id, u.path, u.start, u.end) for u in utts]


def test_write_sorts_and_round_trips_channels(tmp_path):
    a = _wav(tmp_path / "x" / "a.wav")
    utts = [Utterance("u2", str(a), "TWO", "s"), Utterance("u1", str(a), "ONE", "s", channel=1)]
    write_data_dir(utts, tmp_path / "out")
    assert (tmp_path / "out" / "text").read_text() == "u1 ONE\nu2 TWO\n"
    back = read_data_dir(tmp_path / "out")
    assert [(u.utt_id, u.channel) for u in back] == [("u1", 1), ("u2", None)]


@pytest.mark.parametrize("value,expected", [
    ("/d/a.sph", ("/d/a.sph", None)),
    ("sph2pipe -f wav -p -c 2 /d/a.sph |", ("/d/a.sph", 1)),
    ("/usr/bin/sph2pipe -f wav -p -c 1 /d/a.sph |", ("/d/a.sph", 0)),
    ("flac -c -d -s /d/a.flac |", ("/d/a.flac", None)),
])
def test_parse_wav_entry(value, expected):
    assert parse_wav_entry(value) == expected


def test_unknown_pipe_is_rejected_not_run():
    with pytest.raises(DataError, match="unsupported pipe"):
        parse_wav_entry("rm -rf / |")


def test_sph2pipe_line_in_data_dir(tmp_path):
    sph = tmp_path / "audio" / "a.sph"
    sph.parent.mkdir()
    sf.write(sph, np.zeros((1600, 2), dtype=np.float32), 8000, format="NIST", subtype="PCM_16")
    d = _data_dir(tmp_path, f"a sph2pipe -f wav -p -c 2 {sph} |\n", "a HI\n")
    (u,) = read_data_dir(d)
    assert u.path == str(sph) and u.channel == 1


# --- bad inputs ----------------------------------------------------------------------------------

def test_missing_dir_and_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_data_dir(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no wav.scp"):
        read_data_dir(tmp_path / "d")
    (tmp_path / "d" / "wav.scp").write_text("a a.wav\n")
    with pytest.raises(DataError, match="no text"):
        read_data_dir(tmp_path / "d")


def test_id_in_text_but_not_wav_scp(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\n", "a HI\nb BYE\n")
    with pytest.raises(DataError, match=r"'b' is in .*text but not in .*wav.scp"):
        read_data_dir(d)


def test_id_in_wav_scp_but_not_text(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\nb b.wav\n", "a HI\n")
    with pytest.raises(DataError, match=r"'b' is in .*wav.scp but not in .*text"):
        read_data_dir(d)


def test_empty_transcript(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\nb b.wav\n", "a HI\nb\n")
    with pytest.raises(DataError, match="'b' has an empty transcript"):
        read_data_dir(d)


def test_missing_audio_file(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\nc gone.wav\n", "a HI\nc BYE\n")
    with pytest.raises(DataError, match="'c': audio file not found: .*gone.wav"):
        read_data_dir(d)


def test_missing_speaker(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\nb b.wav\n", "a HI\nb BYE\n", "a s1\n")
    with pytest.raises(DataError, match="'b' has no speaker"):
        read_data_dir(d)


@pytest.mark.parametrize("wav_scp,segments,where", [
    ("a a.wav\nb\n", None, r"wav.scp:2: malformed line"),
    ("a a.wav\na b.wav\n", None, r"wav.scp:2: duplicate id 'a'"),
    ("rec a.wav\n", "a rec 0 x\n", r"segments:1: malformed line"),
    ("rec a.wav\n", "a rec 0.0\n", r"segments:1: malformed line"),
    ("rec a.wav\n", "a rec 1.0 0.5\n", r"segments:1: segment 'a'"),
])
def test_malformed_lines_name_file_and_line(two_wavs, wav_scp, segments, where):
    d = _data_dir(two_wavs, wav_scp, "a HI\n", segments=segments)
    with pytest.raises(DataError, match=where):
        read_data_dir(d, skip_bad=True)  # malformed files raise even with skip_bad


def test_skip_bad_logs_and_records(two_wavs, caplog):
    d = _data_dir(two_wavs, "a a.wav\nb b.wav\nc gone.wav\nd a.wav\n", "a HI\nb\nc BYE\ne LOST\n")
    with caplog.at_level(logging.WARNING, logger="allinone"):
        utts = read_data_dir(d, skip_bad=True)
    assert [u.utt_id for u in utts] == ["a"]
    reasons = dict(utts.skipped)
    assert sorted(reasons) == ["b", "c", "d", "e"]
    assert "empty transcript" in reasons["b"] and "not found" in reasons["c"]
    assert "not in" in reasons["d"] and "not in" in reasons["e"]
    for utt_id in "bcde":
        assert any(f"skipping utterance {utt_id}" in r.getMessage() for r in caplog.records)


def test_error_lists_every_problem_count(two_wavs):
    d = _data_dir(two_wavs, "a a.wav\nb b.wav\n", "a\nb\n")
    with pytest.raises(DataError, match="2 bad utterance"):
        read_data_dir(d)
