"""egs/swbd/asr1/run.sh on a miniature corpus in the LDC layouts, built here: two-channel
mu-law SPHERE conversations made from shipped speech, ms98 transcripts with their markup,
an eval2000-style STM (with the quirks hubscr chokes on) and a GLM; plus the text rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from allinone.data.audio import load_audio
from allinone.data.kaldi import read_data_dir
from allinone.data.swbd import normalize_stm, normalize_swbd, scoring_filter

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "egs" / "swbd" / "asr1" / "run.sh"
SCTK = Path("/usr/lib/sctk/bin")
RATE = 8000


def test_swbd_normalisation_rules():
    assert normalize_swbd("[silence]") == ""
    assert normalize_swbd("[noise] [vocalized-noise] [laughter]") == ""
    assert normalize_swbd("um [laughter-yes] i [bocket/bucket] wh[at]- -[th]at") == "UM YES I BUCKET WH- -AT"
    assert normalize_swbd("{yuppiedom} <b_aside> okay_1 it's") == "YUPPIEDOM OKAY IT'S"
    assert normalize_stm("oh (%hesitation) <B_ASIDE> ((yeah)) (I-) uh right") == "OH YEAH RIGHT"
    assert scoring_filter("uh huh-  at&t um -at") == "AT&T"


def _conversation(utts, offset):
    """One channel: utterances placed from ``offset`` s with 0.4 s gaps -> (wave, [(start, end, utt)])."""
    pieces, segs, t = [np.zeros(int(offset * RATE), np.float32)], [], offset
    for u in utts:
        w = load_audio(u.path, sample_rate=RATE).numpy()
        segs.append((round(t, 2), round(t + len(w) / RATE, 2), u))
        pieces += [w, np.zeros(int(0.4 * RATE), np.float32)]
        t += len(w) / RATE + 0.4
    return np.concatenate(pieces), segs


def _write_sph(path: Path, a: np.ndarray, b: np.ndarray) -> None:
    n = max(len(a), len(b))
    x = np.zeros((n, 2), np.float32)
    x[: len(a), 0], x[: len(b), 1] = a, b
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(x, -1, 1), RATE, format="NIST", subtype="ULAW")


# ms98 markup added to the k-th segment of a side; the normalised text must be the plain words.
def _markup(words: list[str], k: int) -> str:
    w = [x.lower() for x in words]
    if k == 0:
        w = ["[noise]"] + w
    elif k == 1:
        w[0] = f"[laughter-{w[0]}]"
    elif k == 2:
        w = w + ["[vocalized-noise]"]
    return " ".join(w)


STM_HEADER = """;; CATEGORY "0" "" ""
;; LABEL "O" "Overall" "Overall"
;; CATEGORY "1" "Hub" ""
;; LABEL "sw" "Switchboard" ""
;; LABEL "en" "CALLHOME" ""
;; CATEGORY "2" "Speaker Sex" ""
;; LABEL "F" "Female" ""
;; LABEL "M" "Male" ""
"""

GLM = """;; miniature GLM in NIST's format
* name "mini hub5 glm"
* desc "for tests"
* format = 'NIST1'
* max_nrules = '2000'
* copy_no_hit = 'T'
* case_sensitive = 'F'
;;
it's => it is / [ ] __ [ ]
"""


def build_corpus(data_root: Path, root: Path) -> dict:
    utts = [u for u in read_data_dir(data_root / "speechocean762" / "dev")][:40]
    expected = {}
    # Switchboard-1: conversations 2001 and 2005, 3 segments per side.
    k = 0
    for conv in ("2001", "2005"):
        sides = {}
        for side, off in (("A", 0.5), ("B", 1.0)):
            wave, segs = _conversation(utts[k:k + 3], off)
            k += 3
            sides[side] = wave
            lines = [f"sw{conv}{side}-ms98-a-0001 0.000000 {off:.6f} [silence]"]
            for j, (s, e, u) in enumerate(segs):
                lines.append(f"sw{conv}{side}-ms98-a-{j + 2:04d} {s:.6f} {e:.6f} {_markup(u.text.split(), j)}")
                expected[f"sw0{conv}-{side}_{int(round(s * 100)):06d}-{int(round(e * 100)):06d}"] = u.text
            tdir = root / "LDC97S62" / "swb_ms98_transcriptions" / conv[:2] / conv
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"sw{conv}{side}-ms98-a-trans.text").write_text("\n".join(lines) + "\n")
        _write_sph(root / "LDC97S62" / "swb1_d1" / "data" / f"sw0{conv}.sph", sides["A"], sides["B"])
    # eval2000: one CallHome (en_) and one Switchboard (sw_) conversation, 2 segments per side.
    stm = [STM_HEADER.rstrip("\n")]
    for conv in ("en_4156", "sw_4390"):
        sides = {}
        for side, off in (("A", 0.3), ("B", 0.6)):
            wave, segs = _conversation(utts[k:k + 2], off)
            k += 2
            sides[side] = wave
            for j, (s, e, u) in enumerate(segs):
                words = u.text.lower().split()
                if j == 0:
                    words = ["(%hesitation)", f"(({words[0]}))"] + words[1:] + ["<B_ASIDE>"]
                stm.append(f"{conv} {side} {conv}_{side} {s:.2f} {e:.2f} <O,{conv[:2]},F> {' '.join(words)}")
            stm.append(f"{conv} {side} {conv}_{side} {segs[-1][1] + 0.1:.2f} {segs[-1][1] + 0.3:.2f} "
                       f"<O,{conv[:2]},F> IGNORE_TIME_SEGMENT_IN_SCORING")
        _write_sph(root / "LDC2002S09" / "hub5e_00" / "english" / f"{conv}.sph", sides["A"], sides["B"])
    ref = root / "LDC2002T43" / "reference"
    ref.mkdir(parents=True)
    (ref / "hub5e00.english.000405.stm").write_text("\n".join(stm) + "\n")
    (ref / "en20000405_hub5.glm").write_text(GLM)
    return expected


def run(args, tmp, timeout=300):
    dirs = ["--datadir", str(tmp / "data"), "--expdir", str(tmp / "exp"), "--dumpdir", str(tmp / "dump")]
    cmd = ["bash", str(RUN), "--config", "conf/train_tiny.yaml", "--beam", "1", "--nj", "1", "--device", "cpu",
           "--speed_perturb", "1.0", "--min_free_gb", "0", "--python", sys.executable, *dirs, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def corpus_args(root: Path) -> list:
    return ["--swbd", root / "LDC97S62", "--eval2000_speech", root / "LDC2002S09" / "hub5e_00",
            "--eval2000_transcripts", root / "LDC2002T43", "--dev_utts", 2]


@pytest.mark.skipif(not (SCTK / "hubscr.pl").is_file(), reason="NIST SCTK (hubscr.pl) not installed")
def test_end_to_end_with_hubscr(data_root, tmp_path):
    expected = build_corpus(data_root, tmp_path / "ldc")
    r = run(corpus_args(tmp_path / "ldc"), tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = tmp_path / "data"
    train, dev = read_data_dir(data / "train_nodup"), read_data_dir(data / "train_dev")
    assert len(train) + len(dev) == 12 and len(dev) == 2
    assert {u.utt_id: u.text for u in list(train) + list(dev)} == expected
    assert all(u.channel == (0 if "-A_" in u.utt_id else 1) and u.start is not None for u in train)
    wav = (data / "train_nodup" / "wav.scp").read_text()
    assert "sw02001-B sph2pipe -f wav -p -c 2 " in wav and wav.count("\n") == 4
    ev = read_data_dir(data / "eval2000")
    assert len(ev) == 8 and (data / "eval2000" / "glm").is_file()
    stm = (data / "eval2000" / "stm").read_text()
    assert "((" not in stm and "<B_ASIDE>" not in stm and "(%hesitation)" in stm
    score = tmp_path / "exp" / "asr_train_tiny" / "decode_beam1" / "eval2000" / "score_hubscr"
    results = json.loads((score / "results.json").read_text())
    assert set(results) == {"all", "swbd", "callhome"}
    assert results["swbd"]["sentences"] + results["callhome"]["sentences"] == results["all"]["sentences"]
    assert results["all"]["words"] == results["swbd"]["words"] + results["callhome"]["words"] > 0
    assert (score / "callhome" / "hyp.ctm.filt.dtl").is_file()
    assert "hubscr (NIST GLM) results" in r.stdout


def test_approximate_scoring_without_glm(data_root, tmp_path):
    build_corpus(data_root, tmp_path / "ldc")
    (tmp_path / "ldc" / "LDC2002T43" / "reference" / "en20000405_hub5.glm").unlink()
    r = run(corpus_args(tmp_path / "ldc") + ["--max_dup", 1], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no *.glm" in r.stdout and "APPROXIMATE scoring" in r.stdout
    dec = tmp_path / "exp" / "asr_train_tiny" / "decode_beam1" / "eval2000"
    res = json.loads((dec / "score_approx" / "results.json").read_text())
    assert set(res) == {"all", "swbd", "callhome"} and res["all"]["sentences"] == 8


def test_missing_transcripts(data_root, tmp_path):
    build_corpus(data_root, tmp_path / "ldc")
    for f in (tmp_path / "ldc" / "LDC97S62" / "swb_ms98_transcriptions").rglob("*.text"):
        f.unlink()
    r = run(corpus_args(tmp_path / "ldc") + ["--stop_stage", 1], tmp_path)
    assert r.returncode != 0
    assert "Switchboard transcript files not found: no *-ms98-a-trans.text under" in r.stderr


def test_missing_corpus(tmp_path):
    r = run(["--swbd", tmp_path / "nope", "--eval2000_speech", tmp_path, "--eval2000_transcripts", tmp_path,
             "--stop_stage", 1], tmp_path)
    assert r.returncode != 0 and f"Switchboard-1 audio (--swbd) not found: {tmp_path / 'nope'}" in r.stderr
    r = run(["--stop_stage", 1], tmp_path)
    assert r.returncode != 0 and "pass --swbd /path/to/LDC97S62" in r.stderr
