"""MAPSSWE on cases small enough to count segments and errors by hand."""

from __future__ import annotations

import math

import pytest

from allinone.eval.mapsswe import mapsswe, matched_pairs_statistic, segment_errors, two_tailed_p

# Five utterances; the comments give each system's alignment and the segments.
REFS = {
    "u1": "a b c d e f g h",
    "u2": "p q r",
    "u3": "u v w",
    "u4": "s t",
    "u5": "m n o",
}
HYP_A = {
    "u1": "a b X d e f g h",  # C C S C C C C C
    "u2": "p q r",            # C C C
    "u3": "u v",              # C C D
    "u4": "s t",              # C C
    "u5": "m n o",            # C C C
}
HYP_B = {
    "u1": "a b c d e f Y h",  # C C C C C C S C
    "u2": "p z q r",          # C I C C
    "u3": "u v w x",          # C C C I
    "u4": "s t",              # C C
    "u5": "m n o k",          # C C C I
}
# (errors_a, errors_b, ref_words) per segment, counted by hand:
#  u1: errors at word 2 (a) and word 6 (b) are 3 correct words apart, so two
#      segments: words 0-4 (a b X d e, 5 ref words) and words 4-7 (e f Y h, 4);
#      the second ends with the utterance.
#  u2: b's insertion before q; the segment runs from p (the word before) to r,
#      where the second correct word closes it: 3 ref words.
#  u3: a deletes w, b inserts x after it; one segment from u to the end.
#  u4: no errors, no segment.
#  u5: only b's trailing insertion: a segment "n o" + x (2 ref words).
EXPECTED_SEGMENTS = [("u1", 1, 0, 5), ("u1", 0, 1, 4), ("u2", 0, 1, 3), ("u3", 1, 1, 3), ("u5", 0, 1, 2)]


def test_hand_counted_segments_and_statistic():
    r = mapsswe(REFS, HYP_A, HYP_B)
    assert [(s.utt_id, s.errors_a, s.errors_b, s.ref_words) for s in r.segments] == EXPECTED_SEGMENTS
    assert r.num_segments == 5
    assert (r.errors_a, r.errors_b) == (2, 4)
    # Z = 1, -1, -1, 0, -1: mean -0.4; squared deviations 1.96 + 3 * 0.36 + 0.16 = 3.2,
    # variance 3.2 / 4 = 0.8; W = -0.4 / (sqrt(0.8) / sqrt(5)) = -0.4 / 0.4 = -1.
    assert r.mean_diff == pytest.approx(-0.4)
    assert r.std_diff == pytest.approx(math.sqrt(0.8))
    assert r.statistic == pytest.approx(-1.0)
    assert r.p_value == pytest.approx(0.31731050786291415)  # P(|N(0,1)| >= 1)
    assert not r.significant and r.better is None


def test_swapping_systems_negates_the_statistic():
    r = mapsswe(REFS, HYP_B, HYP_A)
    assert r.num_segments == 5
    assert r.statistic == pytest.approx(1.0)
    assert (r.errors_a, r.errors_b) == (4, 2)


def test_significant_difference_names_the_better_system():
    # 25 utterances; b is perfect, a makes one error in 20 of them and
    # one error in 5 others where b also errs: Z = 1 (x20), 0 (x5).
    refs = {f"u{i:02d}": "one two three four five" for i in range(25)}
    hyp_a = {u: "one two THREE four five" for u in refs}
    hyp_b = dict(refs)
    for u in sorted(refs)[:5]:
        hyp_b[u] = "one two TREE four five"
    r = mapsswe(refs, hyp_a, hyp_b)
    assert r.num_segments == 25
    # mean 0.8, variance (20 * 0.04 + 5 * 0.64) / 24 = 1/6, W = 0.8 / (sqrt(1/6) / 5)
    assert r.mean_diff == pytest.approx(0.8)
    assert r.statistic == pytest.approx(0.8 / (math.sqrt(1 / 6) / 5))
    assert r.significant and r.better == "b"
    assert mapsswe(refs, hyp_b, hyp_a).better == "a"


def test_zero_variance_gives_zero_statistic_like_sc_stats():
    refs = {f"u{i}": "a b c d" for i in range(10)}
    hyp_a = {u: "a b X d" for u in refs}
    r = mapsswe(refs, hyp_a, refs)
    assert r.num_segments == 10 and r.mean_diff == 1.0
    assert (r.std_diff, r.statistic, r.p_value, r.significant) == (0.0, 0.0, 1.0, False)


def test_identical_systems_have_zero_differences():
    r = mapsswe(REFS, HYP_A, HYP_A)
    assert r.num_segments == 2  # u1 and u3, where both systems err alike
    assert all(s.errors_a == s.errors_b for s in r.segments)
    assert r.statistic == 0.0 and not r.significant


def test_both_perfect_gives_no_segment():
    r = mapsswe(REFS, REFS, REFS)
    assert r.num_segments == 0 and r.p_value == 1.0 and not r.significant


def test_segment_walk_directly():
    C, S, D, I = "C", "S", "D", "I"
    # Errors separated by a single correct word stay in one segment (min_good 2).
    assert segment_errors([C, S, C, S, C, C], [C, C, C, C, C, C]) == [(2, 0, 6)]
    # With min_good 1 they split; the shared boundary word counts in both.
    assert segment_errors([C, S, C, S, C, C], [C, C, C, C, C, C], min_good=1) == [(1, 0, 3), (1, 0, 3)]
    # Empty reference and empty a, b inserts two words.
    assert segment_errors([], [I, I]) == [(0, 2, 0)]
    # Leading insertion in a.
    assert segment_errors([I, C, C, C], [C, C, C]) == [(1, 0, 2)]
    assert segment_errors([D, C, C], [C, C, C]) == [(1, 0, 3)]
    with pytest.raises(ValueError):
        segment_errors([C], [C], min_good=0)


def test_statistic_helpers():
    assert matched_pairs_statistic([]) == (0.0, 0.0, 0.0)
    assert matched_pairs_statistic([3]) == (3.0, 0.0, 0.0)
    mean, std, w = matched_pairs_statistic([1, 2, 3, 4])
    assert (mean, std) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert w == pytest.approx(2.5 / (math.sqrt(5 / 3) / 2))
    assert two_tailed_p(1.959963984540054) == pytest.approx(0.05)
    assert two_tailed_p(-1.0) == two_tailed_p(1.0)


def test_mismatched_ids_are_named():
    with pytest.raises(ValueError, match="u5"):
        mapsswe(REFS, {k: v for k, v in HYP_A.items() if k != "u5"}, HYP_B)
    with pytest.raises(ValueError, match="zz"):
        mapsswe(REFS, HYP_A, {**HYP_B, "zz": "x"})
    with pytest.raises(ValueError):
        mapsswe(REFS, HYP_A, HYP_B, alpha=1.5)


def _write_text(path, texts):
    path.write_text("".join(f"{u} {t}".rstrip() + "\n" for u, t in texts.items()), encoding="utf-8")
    return path


def test_command_on_decode_dirs_and_text_files(tmp_path, capsys):
    """``allinone mapsswe A B --ref R``: the same result as ``mapsswe`` on the dicts, from decode
    dirs (their ``text``) or text files, an empty hypothesis included; --out writes it as JSON."""
    import json

    from allinone.cli import main

    refs = {f"u{i:02d}": "the cat sat on the mat today" for i in range(40)}
    hyp_a = {u: ("the cat sat on a mat today" if i % 2 else "the cat sat on the mat today") for i, u in enumerate(refs)}
    hyp_b = {u: ("a dog sat in a hat" if i % 3 else "the cat sat on the mat today") for i, u in enumerate(refs)}
    hyp_b["u05"] = ""  # nothing recognised: the Kaldi line holds the id alone
    (tmp_path / "data").mkdir(), (tmp_path / "dec_a").mkdir()
    _write_text(tmp_path / "data" / "text", refs)
    _write_text(tmp_path / "dec_a" / "text", hyp_a)
    b_file = _write_text(tmp_path / "b.txt", hyp_b)
    expected = mapsswe(refs, hyp_a, hyp_b)
    assert expected.significant and expected.better == "a"
    out = tmp_path / "res.json"
    assert main(["mapsswe", str(tmp_path / "dec_a"), str(b_file), "--ref", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"system a {expected.errors_a} errors, system b {expected.errors_b} errors; "
            f"W = {expected.statistic:.3f}, p = {expected.p_value:.3g}") in printed
    assert f"significantly better at alpha 0.05: system a ({tmp_path / 'dec_a'})" in printed
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in expected.to_dict()} == expected.to_dict()


def test_command_names_bad_input(tmp_path, capsys):
    from allinone.cli import main

    _write_text(tmp_path / "ref", {"u1": "a b", "u2": "c d"})
    _write_text(tmp_path / "a", {"u1": "a b", "u2": "c d"})
    _write_text(tmp_path / "b", {"u1": "a b"})
    assert main(["mapsswe", str(tmp_path / "a"), str(tmp_path / "missing"), "--ref", str(tmp_path / "ref")]) == 2
    assert f"system b {tmp_path / 'missing'}: no Kaldi text file there" in capsys.readouterr().err
    assert main(["mapsswe", str(tmp_path / "a"), str(tmp_path / "b"), "--ref", str(tmp_path / "ref")]) == 2
    assert "reference ids have no system b hypothesis: u2" in capsys.readouterr().err
    _write_text(tmp_path / "ref", {"u1": "a b", "u2": ""})  # a reference without words is malformed
    assert main(["mapsswe", str(tmp_path / "a"), str(tmp_path / "a"), "--ref", str(tmp_path / "ref")]) == 2
    assert "malformed line" in capsys.readouterr().err
