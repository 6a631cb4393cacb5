"""Our WER and MAPSSWE against NIST SCTK (sclite, sc_stats) on realistic data.

Hypotheses are real speechocean762 dev transcripts corrupted with seeded random
substitutions, deletions and insertions.  The tests skip when SCTK is missing
(``make sctk`` / ``apt-get install sctk`` installs it; Debian puts the tools in
/usr/lib/sctk/bin, which we also look in).
"""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from allinone.eval.mapsswe import mapsswe
from allinone.eval.wer import score, write_trn

DEV_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speechocean762" / "dev" / "text"
DEBIAN_SCTK = "/usr/lib/sctk/bin"


def sctk_tool(name: str) -> str:
    """Path of an SCTK program, or skip the test."""
    found = shutil.which(name) or shutil.which(name, path=DEBIAN_SCTK)
    if not found:
        pytest.skip(f"NIST SCTK '{name}' not found on PATH or in {DEBIAN_SCTK} (run `make sctk`)")
    return found


def load_refs(limit: int | None = None) -> dict[str, str]:
    if not DEV_TEXT.is_file():
        pytest.skip(f"speechocean762 dev transcripts not found at {DEV_TEXT}")
    refs = {}
    for line in DEV_TEXT.read_text(encoding="utf-8").splitlines():
        utt, *words = line.split()
        refs[utt] = " ".join(words)
    ids = sorted(refs)[:limit] if limit else sorted(refs)
    return {u: refs[u] for u in ids}


def corrupt(refs: dict[str, str], seed: int, p_sub: float, p_del: float, p_ins: float) -> dict[str, str]:
    """Seeded random word errors; an insertion may come before the first word and after any word."""
    rng = random.Random(seed)
    vocab = sorted({w for t in refs.values() for w in t.split()})
    hyps = {}
    for u in sorted(refs):
        out = [rng.choice(vocab)] if rng.random() < p_ins else []
        for w in refs[u].split():
            r = rng.random()
            if r < p_sub:
                out.append(rng.choice(vocab))
            elif r >= p_sub + p_del:
                out.append(w)
            if rng.random() < p_ins:
                out.append(rng.choice(vocab))
        hyps[u] = " ".join(out)
    return hyps


def run_sclite(workdir: Path, name: str, outputs: str) -> str:
    """Score ``workdir/<name>.trn`` against ``workdir/ref.trn``; return stdout."""
    cmd = [sctk_tool("sclite"), "-r", "ref.trn", "trn", "-h", f"{name}.trn", "trn", name,
           "-i", "rm", "-s", "-O", str(workdir), "-n", name, "-o", *outputs.split()]
    return subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True).stdout


def sclite_totals(workdir: Path, name: str) -> dict[str, int]:
    """#C #S #D #I summed over sclite's per-utterance 'Scores:' lines (pralign report)."""
    run_sclite(workdir, name, "pralign")
    totals = dict.fromkeys("CSDI", 0)
    for m in re.finditer(r"Scores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)",
                         (workdir / f"{name}.pra").read_text()):
        for k, v in zip("CSDI", m.groups()):
            totals[k] += int(v)
    return totals


def sclite_sum_line(stdout: str) -> list[float]:
    """The numbers of the 'Sum/Avg' row of sclite's sum report."""
    line = next(l for l in stdout.splitlines() if "Sum/Avg" in l)
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line)]


def run_sc_stats(workdir: Path, names: tuple[str, str]) -> dict:
    """Run ``sc_stats -t mapsswe`` on two systems' sgml alignments and parse its report."""
    for n in names:
        run_sclite(workdir, n, "sgml")
    sgml = "".join((workdir / f"{n}.sgml").read_text() for n in names)
    # -v writes the detailed report (segments, mean, std, Z) to <name>.stats.mapsswe;
    # -u the unified matrix with the p-value to <name>.stats.unified (and then no details).
    for flag, name in (("-v", "detail"), ("-u", "unified")):
        subprocess.run([sctk_tool("sc_stats"), "-p", "-t", "mapsswe", flag, "-O", str(workdir), "-n", name],
                       input=sgml, cwd=workdir, check=True, capture_output=True, text=True)
    detail = (workdir / "detail.stats.mapsswe").read_text()
    unified = (workdir / "unified.stats.unified").read_text()
    m = re.search(r"\(# segs: (\d+)\).*\(mean: (\S+)\) \(std dev: (\S+)\) \(Z Stat: (\S+)\) \(Stat Diff: (\w+)\)",
                  detail)
    totals = re.search(r"Totals\s+(\d+)\s+(\d+)\s+(\d+)", detail)
    # Unified matrix cell: "<winner or ~>  <p-value>  [*]"
    cell = re.search(r"\|\|\s+\S+\s+\|\s+\|\s+(\S+)\s+(<?\d\.\d+)", unified)
    return {
        "segments": int(m.group(1)), "mean": float(m.group(2)), "std": float(m.group(3)),
        "z": float(m.group(4)), "significant": m.group(5) == "Yes",
        "ref_words": int(totals.group(1)), "errors_a": int(totals.group(2)), "errors_b": int(totals.group(3)),
        "winner": cell.group(1), "p": cell.group(2),  # "0.032" or "<0.001"
    }


def sctk_table_p(z: float) -> float:
    """sc_stats' printed p-value: the normal table entry at |z| rounded down to 0.01."""
    zt = math.floor(abs(z) * 100 + 1e-9) / 100
    return math.erfc(zt / math.sqrt(2.0))


# ----------------------------------------------------------------------------- WER

@pytest.mark.parametrize("seed,rates", [(11, (0.05, 0.03, 0.03)), (12, (0.25, 0.15, 0.2)), (13, (0.5, 0.2, 0.4))])
def test_wer_matches_sclite(tmp_path, seed, rates):
    refs = load_refs()
    hyps = corrupt(refs, seed, *rates)
    # A few edge cases: empty hypothesis, hypothesis of insertions only, swapped words.
    ids = sorted(refs)
    hyps[ids[0]] = ""
    hyps[ids[1]] = refs[ids[1]] + " EXTRA WORDS HERE"
    hyps[ids[2]] = " ".join(reversed(refs[ids[2]].split()))
    write_trn(tmp_path / "ref.trn", refs)
    write_trn(tmp_path / "hyp.trn", hyps)
    ours = score(refs, hyps)
    theirs = sclite_totals(tmp_path, "hyp")
    assert (ours.substitutions, ours.deletions, ours.insertions) == (theirs["S"], theirs["D"], theirs["I"])
    assert ours.ref_words == theirs["C"] + theirs["S"] + theirs["D"]
    # Per-utterance ops too: sclite's sgml gives C/S/D/I per aligned word.
    run_sclite(tmp_path, "hyp", "sgml")
    sgml = (tmp_path / "hyp.sgml").read_text()
    for m in re.finditer(r'<PATH id="\(([^)]*)\)"[^>]*>\n(.*?)\n?</PATH>', sgml, re.S):
        utt = m.group(1).split("-", 1)[1]
        ops = [tok.split(",", 1)[0] for tok in m.group(2).split(":")] if m.group(2).strip() else []
        assert ours.alignments[utt].ops == ops, utt
    # Sum/Avg row: #Snt #Wrd Corr Sub Del Ins Err S.Err (percentages rounded to 0.1).
    row = sclite_sum_line(run_sclite(tmp_path, "hyp", "sum stdout"))
    assert row[0] == ours.sentences and row[1] == ours.ref_words
    assert row[6] == pytest.approx(ours.wer, abs=0.051)
    assert row[7] == pytest.approx(ours.ser, abs=0.051)


# ----------------------------------------------------------------------------- MAPSSWE

PAIRS = {
    # a has ~10% fewer errors than b: the brief's "close systems" case
    "close": ((1, (0.06, 0.03, 0.03)), (2, (0.066, 0.033, 0.033))),
    "different": ((3, (0.05, 0.02, 0.02)), (4, (0.12, 0.05, 0.05))),
    "b_better": ((5, (0.10, 0.05, 0.06)), (6, (0.08, 0.04, 0.05))),
    "heavy": ((7, (0.3, 0.1, 0.2)), (8, (0.3, 0.12, 0.25))),
    "same_rates": ((9, (0.08, 0.04, 0.04)), (10, (0.08, 0.04, 0.04))),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_mapsswe_matches_sc_stats(tmp_path, pair):
    refs = load_refs(300)
    (seed_a, rates_a), (seed_b, rates_b) = PAIRS[pair]
    hyp_a, hyp_b = corrupt(refs, seed_a, *rates_a), corrupt(refs, seed_b, *rates_b)
    write_trn(tmp_path / "ref.trn", refs)
    write_trn(tmp_path / "sysa.trn", hyp_a)
    write_trn(tmp_path / "sysb.trn", hyp_b)
    theirs = run_sc_stats(tmp_path, ("sysa", "sysb"))
    ours = mapsswe(refs, hyp_a, hyp_b)

    assert ours.num_segments == theirs["segments"]
    assert (ours.errors_a, ours.errors_b) == (theirs["errors_a"], theirs["errors_b"])
    assert sum(s.ref_words for s in ours.segments) == theirs["ref_words"]
    # sc_stats prints 3 decimals.
    assert ours.mean_diff == pytest.approx(theirs["mean"], abs=5e-4 + 1e-9)
    assert ours.std_diff == pytest.approx(theirs["std"], abs=5e-4 + 1e-9)
    assert ours.statistic == pytest.approx(theirs["z"], abs=5e-4 + 1e-9)
    assert ours.statistic == pytest.approx(theirs["z"], rel=1e-3)
    # sc_stats' p comes from a 0.01-step normal table: equal to 1e-3 once we use
    # the same table, and within the table's step of our exact value.
    if theirs["p"].startswith("<"):
        assert ours.p_value < float(theirs["p"][1:])
    else:
        assert sctk_table_p(ours.statistic) == pytest.approx(float(theirs["p"]), abs=1e-3)
        assert ours.p_value == pytest.approx(float(theirs["p"]), abs=1e-2)
    assert ours.significant == theirs["significant"]
    if ours.significant:
        assert theirs["winner"] == {"a": "sysa", "b": "sysb"}[ours.better]
    else:
        assert theirs["winner"] == "~"


def test_mapsswe_swapped_systems_match_sc_stats(tmp_path):
    """Order matters in sc_stats' walk (system b's trailing insertions); check b-vs-a too."""
    refs = load_refs(300)
    hyp_a, hyp_b = corrupt(refs, 21, 0.1, 0.05, 0.15), corrupt(refs, 22, 0.1, 0.05, 0.1)
    write_trn(tmp_path / "ref.trn", refs)
    write_trn(tmp_path / "sysa.trn", hyp_a)
    write_trn(tmp_path / "sysb.trn", hyp_b)
    theirs = run_sc_stats(tmp_path, ("sysb", "sysa"))
    ours = mapsswe(refs, hyp_b, hyp_a)
    assert ours.num_segments == theirs["segments"]
    assert (ours.errors_a, ours.errors_b) == (theirs["errors_a"], theirs["errors_b"])
    assert ours.statistic == pytest.approx(theirs["z"], abs=5e-4 + 1e-9)
    assert ours.significant == theirs["significant"]


def test_hand_counted_case_matches_sc_stats(tmp_path):
    """The hand-counted example of test_eval_mapsswe.py, checked against sc_stats itself."""
    from test_eval_mapsswe import EXPECTED_SEGMENTS, HYP_A, HYP_B, REFS

    write_trn(tmp_path / "ref.trn", REFS)
    write_trn(tmp_path / "sysa.trn", HYP_A)
    write_trn(tmp_path / "sysb.trn", HYP_B)
    theirs = run_sc_stats(tmp_path, ("sysa", "sysb"))
    assert theirs["segments"] == len(EXPECTED_SEGMENTS)
    assert (theirs["errors_a"], theirs["errors_b"]) == (2, 4)
    assert theirs["ref_words"] == sum(s[3] for s in EXPECTED_SEGMENTS)
    assert (theirs["mean"], theirs["std"], theirs["z"]) == (-0.4, 0.894, -1.0)
