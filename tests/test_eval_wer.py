"""WER scoring, sclite-style alignment and the files write_results produces."""

from __future__ import annotations

import json

import jiwer
import pytest

from allinone.eval.wer import align_words, score, write_results, write_trn


def ops(ref: str, hyp: str) -> str:
    return "".join(op for op, _, _ in align_words(ref.split(), hyp.split()))


def test_alignment_follows_sclite_costs_and_ties():
    assert ops("a b c", "a b c") == "CCC"
    assert ops("a b c", "a x c") == "CSC"
    assert ops("a b c", "a c") == "CDC"
    assert ops("a b c", "a b y c") == "CCIC"
    # Two substitutions (cost 8) lose to a deletion + insertion (cost 6) in sclite;
    # a unit-cost Levenshtein alignment calls this 2 substitutions.
    assert ops("a b", "b c") == "DCI"
    assert ops("", "x y") == "II"
    assert ops("x y", "") == "DD"
    assert ops("", "") == ""


def test_score_totals_and_alignments():
    refs = {"u1": "the cat sat on the mat", "u2": "hello world", "u3": "a b c"}
    hyps = {"u1": "the cat sat in the mat", "u2": "hello there world", "u3": "a b c"}
    r = score(refs, hyps)
    assert (r.substitutions, r.deletions, r.insertions, r.errors) == (1, 0, 1, 2)
    assert r.ref_words == 11 and r.hyp_words == 12
    assert r.wer == pytest.approx(100 * 2 / 11)
    assert (r.sentences, r.sentence_errors) == (3, 2)
    assert r.ser == pytest.approx(200 / 3)
    ali = r.alignments["u2"]
    assert ali.ref == ["hello", None, "world"] and ali.hyp == ["hello", "there", "world"]
    assert ali.ops == ["C", "I", "C"]
    # CER ignores spaces: "on"->"in" is 1 edit, "there" 5 insertions; 30 ref chars.
    assert r.ref_chars == len("thecatsatonthemat") + len("helloworld") + len("abc")
    assert r.char_errors == 6
    assert r.cer == pytest.approx(100 * 6 / 30)


def test_total_errors_agree_with_jiwer_on_ordinary_data():
    refs = {"u1": "one two three four five six", "u2": "seven eight nine", "u3": "ten"}
    hyps = {"u1": "one too three for five six seven", "u2": "eight nine", "u3": "ten ten"}
    r = score(refs, hyps)
    out = jiwer.process_words([refs[u] for u in sorted(refs)], [hyps[u] for u in sorted(refs)])
    assert r.errors == out.substitutions + out.deletions + out.insertions
    assert r.wer == pytest.approx(100 * out.wer)


def test_missing_and_extra_hypotheses_are_named():
    refs = {"u1": "a", "u2": "b", "u3": "c"}
    with pytest.raises(ValueError, match="u2"):
        score(refs, {"u1": "a", "u3": "c"})
    with pytest.raises(ValueError, match="extra9"):
        score(refs, {"u1": "a", "u2": "b", "u3": "c", "extra9": "d"})
    with pytest.raises(ValueError):
        score({}, {})
    with pytest.raises(ValueError, match="no words"):
        score({"u1": ""}, {"u1": "x"})


def test_write_trn_format(tmp_path):
    write_trn(tmp_path / "a.trn", {"u2": "  b   c ", "u1": "a", "u3": ""})
    assert (tmp_path / "a.trn").read_text() == "a (u1-u1)\nb c (u2-u2)\n(u3-u3)\n"
    write_trn(tmp_path / "b.trn", {"u1": "a"}, speaker_of={"u1": "spk7"})
    assert (tmp_path / "b.trn").read_text() == "a (spk7-u1)\n"
    write_trn(tmp_path / "c.trn", {"u1": "a"}, speaker_of=lambda u: "s" + u)
    assert (tmp_path / "c.trn").read_text() == "a (su1-u1)\n"
    with pytest.raises(ValueError, match="u1"):
        write_trn(tmp_path / "d.trn", {"u1": "a (b)"})
    with pytest.raises(ValueError, match="bad id"):
        write_trn(tmp_path / "d.trn", {"bad id": "a"})
    with pytest.raises(ValueError, match="no speaker"):
        write_trn(tmp_path / "d.trn", {"u1": "a"}, speaker_of={})
    assert not (tmp_path / "d.trn").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_results_files(tmp_path):
    refs = {"u1": "the cat sat", "u2": "hello world"}
    hyps = {"u1": "the bat sat down", "u2": "hello world"}
    r = write_results(tmp_path / "out", refs, hyps)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["alignments.txt", "hyp.trn", "ref.trn", "text", "wer.json"]
    assert (out / "text").read_text() == "u1 the bat sat down\nu2 hello world\n"
    assert (out / "hyp.trn").read_text() == "the bat sat down (u1-u1)\nhello world (u2-u2)\n"
    data = json.loads((out / "wer.json").read_text())
    assert data["wer"] == pytest.approx(40.0) and (data["sub"], data["del"], data["ins"]) == (1, 0, 1)
    assert (data["words"], data["sentences"], data["sentence_errors"], data["ser"]) == (5, 2, 1, 50.0)
    assert data["cer"] == pytest.approx(r.cer, abs=1e-4)
    text = (out / "alignments.txt").read_text()
    assert "id: u1  C=2 S=1 D=0 I=1\n" in text
    assert "REF: the cat sat ****\nHYP: the bat sat down\nOPS:     S       I\n" in text
