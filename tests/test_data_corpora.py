"""Corpus converters: LibriSpeech layout and synthetic FSDD connected digits."""

import soundfile as sf
import pytest

from allinone.data import DataError, fsdd_connected_digits, librispeech_to_data_dir, load_audio, read_data_dir


def test_librispeech(data_root, tmp_path):
    subset = data_root / "librispeech_samples" / "LibriSpeech" / "dev-clean"
    utts = librispeech_to_data_dir(subset, tmp_path / "ls")
    assert len(utts) == 10
    assert {u.speaker for u in utts} == {"1988", "2412", "3752"}
    back = read_data_dir(tmp_path / "ls")
    assert [(u.utt_id, u.text, u.path) for u in back] == [(u.utt_id, u.text, u.path) for u in utts]
    first = next(u for u in back if u.utt_id == "1988-24833-0000")
    assert first.text == "THE TWO STRAY KITTENS GRADUALLY MAKE THEMSELVES AT HOME"
    assert (tmp_path / "ls" / "spk2utt").read_text().startswith("1988 1988-24833-0000 ")


def test_librispeech_wrong_layout(data_root, tmp_path):
    with pytest.raises(DataError, match="not a LibriSpeech subset folder"):
        librispeech_to_data_dir(data_root / "librispeech_samples", tmp_path / "x")  # one level too high
    with pytest.raises(DataError, match="does not exist"):
        librispeech_to_data_dir(tmp_path / "nope", tmp_path / "x")


def test_librispeech_missing_flac(tmp_path):
    chapter = tmp_path / "sub" / "12" / "34"
    chapter.mkdir(parents=True)
    (chapter / "12-34.trans.txt").write_text("12-34-0000 HELLO\n")
    with pytest.raises(DataError, match="'12-34-0000': audio file not found"):
        librispeech_to_data_dir(tmp_path / "sub", tmp_path / "out")


def test_fsdd_connected_digits(data_root, tmp_path):
    fsdd = data_root / "fsdd"
    utts = fsdd_connected_digits(fsdd, tmp_path / "a", split="test", num_utts=4, min_digits=2, max_digits=4, seed=3)
    again = fsdd_connected_digits(fsdd, tmp_path / "b", split="test", num_utts=4, min_digits=2, max_digits=4, seed=3)
    assert [(u.utt_id, u.text) for u in utts] == [(u.utt_id, u.text) for u in again]
    for u, v in zip(utts, again):
        assert open(u.path, "rb").read() == open(v.path, "rb").read()
    back = read_data_dir(tmp_path / "a")
    assert sorted(u.utt_id for u in utts) == [u.utt_id for u in back]
    words = {"ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"}
    for u in back:
        assert 2 <= len(u.text.split()) <= 4 and set(u.text.split()) <= words
        assert u.utt_id.startswith(u.speaker + "-test-")
        assert sf.info(u.path).samplerate == 16000
        # Longer than its digits alone: silences were added.
        assert load_audio(u.path).numel() > 0.2 * 16000
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "SYNTHETIC" in readme and "CC BY-SA 4.0" in readme and "FSDD" in readme
    # wav.scp paths are relative, so the folder can be moved.
    assert (tmp_path / "a" / "wav.scp").read_text().split("\n")[0].split()[1].startswith("wav/")
    other = fsdd_connected_digits(fsdd, tmp_path / "c", split="test", num_utts=4, min_digits=2, max_digits=4, seed=4)
    assert [u.text for u in other] != [u.text for u in utts]


def test_fsdd_uses_official_split(data_root, tmp_path):
    import allinone.data.corpora as corpora
    test = corpora._fsdd_recordings(data_root / "fsdd", "test")
    train = corpora._fsdd_recordings(data_root / "fsdd", "train")
    assert sum(map(len, test.values())) == 300 and sum(map(len, train.values())) == 2700
    assert all(int(p.stem.split("_")[2]) < 5 for recs in test.values() for _, p in recs)


def test_fsdd_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        fsdd_connected_digits(tmp_path, tmp_path / "o", split="dev")
    with pytest.raises(DataError, match="not an FSDD folder"):
        fsdd_connected_digits(tmp_path, tmp_path / "o")
