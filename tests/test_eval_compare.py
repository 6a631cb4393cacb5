"""allinone.eval.compare: separately trained compression runs against one float reference."""

from __future__ import annotations

import json
import math
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from allinone.data.features import FbankConfig
from allinone.data.kaldi import read_data_dir
from allinone.data.tokenizer import CharTokenizer
from allinone.eval.bench import read_hyps
from allinone.eval.compare import (compare_runs, format_markdown, format_nested, lossless_ratios, nested_twins,
                                    parse_run)
from allinone.eval.mapsswe import mapsswe
from allinone.eval.report import reference_warning
from allinone.eval.wer import score
from allinone.models.saved import PACKED_WEIGHTS, save_model_dir
from allinone.quant.packed_file import load_packed
from supernet_helpers import tiny_space, tiny_supernet

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEMS = {"uniform/b8": "L4_F48_H4_B8", "uniform/b2": "L4_F48_H4_B2", "one_stage/b5": "L4_F48_H4_B8.8.4.2"}


def _data_dir(root, n: int = 6):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    scp, text = [], []
    for i in range(n):
        sf.write(root / f"u{i}.wav", (rng.standard_normal(4000 + 400 * i) * 0.1).astype(np.float32), 16000)
        scp.append(f"u{i} u{i}.wav")
        text.append(f"u{i} {'ab'[i % 2]} {'cd'[i % 2]} e")
    (root / "wav.scp").write_text("\n".join(scp) + "\n")
    (root / "text").write_text("\n".join(text) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = tiny_supernet(seed=3).eval()
    model.search_space = tiny_space().for_model(model.config)
    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    fbank = FbankConfig(n_mels=40)
    reference = save_model_dir(root / "float", model, fbank, tok)  # subnet=None: the float model
    runs = []
    for name, subnet in SYSTEMS.items():
        run_dir = root / name.replace("/", "_")
        save_model_dir(run_dir / "final", model, fbank, tok)
        (run_dir / "allocation.json").write_text(json.dumps({"subnet": subnet, "method": name.split("/")[0]}))
        (run_dir / "timing.json").write_text(json.dumps(
            {"stages": [{"stage": "qat", "seconds": 12.0, "gpu_seconds": 24.0, "device": "cuda"}],
             "total_seconds": 12.0, "total_gpu_seconds": 24.0}))
        runs.append(f"{name}={run_dir}")
    data = _data_dir(root / "test")
    out = root / "out"
    results = compare_runs(reference, [parse_run(r) for r in runs], [data], out, num_workers=1)
    return {"root": root, "data": data, "out": out, "results": results, "runs": runs, "reference": reference}


def test_each_system_is_its_allocation_decoded_and_tested(setup):
    res, out, data = setup["results"], setup["out"], setup["data"]
    refs = {u.utt_id: u.text for u in read_data_dir(data)}
    ref_hyps = read_hyps(out / "reference" / "test")
    assert res["reference_wer"]["test"] == pytest.approx(score(refs, ref_hyps).wer, abs=1e-4)
    rows = {f"{r['method']}/{r['label']}": r for r in res["systems"]}
    assert list(rows) == list(SYSTEMS)
    for name, subnet in SYSTEMS.items():
        r, sys_dir = rows[name], out / "systems" / name
        assert r["subnet"] == subnet
        packed = load_packed(sys_dir / "model" / PACKED_WEIGHTS)
        report = packed.size_report()
        assert r["packed_bytes"] == report.packed_bytes and r["average_bits"] == pytest.approx(report.average_bits)
        assert r["ratio_vs_ref"] == pytest.approx(res["reference_fp32_bytes"] / report.packed_bytes)
        # the quantizable weights alone: every block weight is quantized here, so codes + scales
        # against those weights' 4 bytes each
        stored = sum(math.ceil(q.codes.numel() * q.bits / 8) + 4 * q.scale.numel() for q in packed.quantized.values())
        assert r["weights_ratio_vs_ref"] == pytest.approx(
            4 * sum(q.codes.numel() for q in packed.quantized.values()) / stored)
        hyps = read_hyps(sys_dir / "test")
        assert r["sets"]["test"]["wer"] == pytest.approx(score(refs, hyps).wer, abs=1e-4)
        test = mapsswe(refs, hyps, ref_hyps)
        assert r["sets"]["test"]["p_value"] == pytest.approx(test.p_value)
        assert r["sets"]["test"]["worse"] == (test.significant and test.better == "b")
        assert r["sets"]["test"]["better"] == (test.significant and test.better == "a")
        assert r["compression_seconds"] == 12.0 and r["compression_gpu_seconds"] == 24.0
    assert rows["uniform/b8"]["average_bits"] == 8.0 and rows["uniform/b2"]["average_bits"] == 2.0
    assert 2.0 < rows["one_stage/b5"]["average_bits"] < 8.0
    assert rows["uniform/b2"]["ratio_vs_ref"] > rows["one_stage/b5"]["ratio_vs_ref"] > rows["uniform/b8"]["ratio_vs_ref"]
    md = (out / "results.md").read_text()
    assert md == format_markdown(json.loads((out / "results.json").read_text()))
    assert "| uniform | b8 | L4_F48_H4_B8 | 8.00 |" in md


def test_reference_that_recognises_nothing_is_flagged(setup, tmp_path, capsys):
    from allinone.cli import main

    model = tiny_supernet(seed=3).eval()
    with torch.no_grad():
        model.ctc.ctc_lo.bias[0] = 1e4  # decodes to nothing, like a model stuck at the blank
    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    mute = save_model_dir(tmp_path / "mute", model, FbankConfig(n_mels=40), tok)
    out = tmp_path / "out"
    assert main(["compare", str(mute), setup["runs"][0], "--data", str(setup["data"]), "--out", str(out),
                 "--num-workers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["reference_wer"]["test"] == 100.0
    assert res["reference_warning"].startswith("the reference recognises no word of test (")
    assert f"warning: {res['reference_warning']}" in capsys.readouterr().err
    assert f"**Warning:** {res['reference_warning']}." in (out / "results.md").read_text()
    # the setup's reference: the warning follows its own decode
    ref_wer = json.loads((setup["out"] / "reference" / "test" / "wer.json").read_text())
    assert setup["results"]["reference_warning"] == reference_warning({"test": ref_wer})


def test_verdict_follows_the_systems_place_in_the_test():
    from allinone.eval.compare import verdict

    refs = {f"u{i}": "a b c d e" for i in range(30)}
    right = dict(refs)
    wrong = {u: " ".join(["x"] * (i % 3 + 1) + "a b c d e".split()[i % 3 + 1:]) for i, u in enumerate(refs)}  # 1-3 errors
    test = mapsswe(refs, right, wrong)
    assert test.significant
    assert verdict(test, "a") == {"worse": False, "better": True}   # the right system, in place a
    assert verdict(test, "b") == {"worse": True, "better": False}   # the wrong one, in place b
    same = mapsswe(refs, right, right)
    assert verdict(same, "a") == verdict(same, "b") == {"worse": False, "better": False}


def test_lossless_ratio_is_the_largest_not_worse_system():
    rows = [{"method": "u", "label": "b8", "subnet": "x8", "ratio_vs_ref": 3.0, "lossless": True},
            {"method": "u", "label": "b2", "subnet": "x2", "ratio_vs_ref": 9.0, "lossless": False},
            {"method": "u", "label": "b4", "subnet": "x4", "ratio_vs_ref": 5.0, "lossless": True},
            {"method": "m", "label": "b3", "subnet": "y", "ratio_vs_ref": 7.0, "lossless": False}]
    best = lossless_ratios(rows)
    assert best["u"]["label"] == "b4" and best["m"] is None


def test_rerun_reuses_decodes(setup):
    again = compare_runs(setup["reference"], [parse_run(r) for r in setup["runs"]], [setup["data"]], setup["out"])
    assert again["systems"] == setup["results"]["systems"]


def test_another_decoding_decodes_again_and_is_recorded(setup, tmp_path):
    """A saved decode is reused only when it was made the same way: with an LM (another beam,
    weight) every system is decoded again, as ``allinone decode`` would with those options."""
    import shutil

    from allinone.eval.decode import DecodeOptions, decode_data_dir
    from allinone.eval.ngram_lm import train_kneser_ney

    lm = tmp_path / "lm.arpa"
    train_kneser_ney([list("a<e"), list("bd")] * 3, 2, vocab=list("abcdefghi")).write_arpa(lm)
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    res = compare_runs(setup["reference"], [parse_run(r) for r in setup["runs"]], [setup["data"]], out,
                       num_workers=1, beam=3, lm=str(lm), lm_weight=3.0)
    assert res["beam"] == 3 and res["lm_weight"] == 3.0
    want = decode_data_dir(setup["reference"], setup["data"], tmp_path / "dec",
                           DecodeOptions(beam=3, lm=str(lm), lm_weight=3.0, num_workers=1))
    assert read_hyps(out / "reference" / "test") == read_hyps(tmp_path / "dec")
    assert read_hyps(tmp_path / "dec") != read_hyps(setup["out"] / "reference" / "test")  # not the greedy ones
    assert res["reference_wer"]["test"] == want["wer"]
    info = json.loads((out / "reference" / "test" / "decode.json").read_text())
    assert info["beam"] == 3 and info["lm_weight"] == 3.0


def test_bad_inputs_fail_before_any_work(setup, tmp_path):
    with pytest.raises(ValueError, match="expected METHOD/LABEL=RUN_DIR"):
        parse_run("one_stage=exp/x")
    broken = tmp_path / "broken"
    (broken / "final").mkdir(parents=True)
    (broken / "timing.json").write_text("{}")
    with pytest.raises(ValueError, match=f"run two_stage/b3: allocation not found: {broken / 'allocation.json'}"):
        compare_runs(setup["reference"], [parse_run(f"two_stage/b3={broken}")], [setup["data"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="reference model not found"):
        compare_runs(tmp_path / "nope", [parse_run(setup["runs"][0])], [setup["data"]], tmp_path / "out")
    with pytest.raises(ValueError, match="run names must be unique"):
        compare_runs(setup["reference"], [parse_run(setup["runs"][0])] * 2, [setup["data"]], tmp_path / "out")
    with pytest.raises(ValueError, match="not a data directory"):
        compare_runs(setup["reference"], [parse_run(setup["runs"][0])], [tmp_path], tmp_path / "out")


def test_cli(setup, capsys):
    from allinone.cli import main

    rc = main(["compare", str(setup["reference"]), *setup["runs"], "--data", str(setup["data"]),
               "--out", str(setup["out"]), "--num-workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 systems against" in out and "lossless compression ratio of uniform:" in out
    rc = main(["compare", str(setup["reference"]), "bad-run", "--data", str(setup["data"]), "--out", str(setup["out"])])
    assert rc != 0 and "expected METHOD/LABEL=RUN_DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- nested systems vs their twins


def _levenshtein(ref: list[str], hyp: list[str]) -> int:
    """Word edit distance, a plain dynamic program (independent of allinone.eval.wer)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def _brute_wer(refs: dict[str, str], hyps: dict[str, str]) -> float:
    errors = sum(_levenshtein(refs[u].split(), hyps[u].split()) for u in refs)
    return 100.0 * errors / sum(len(refs[u].split()) for u in refs)


NESTED_REFS = {f"u{i:02d}": f"w{i} alpha beta gamma delta epsilon zeta eta" for i in range(24)}


def _spoil(text: str, k: int) -> str:
    """The first ``k`` words substituted (k = 8: an empty hypothesis, all deleted)."""
    words = text.split()
    return " ".join(["x"] * k + words[k:]) if k < len(words) else ""


PERFECT = dict(NESTED_REFS)
# 1-3 errors per utterance (varying, so MAPSSWE's differences have a variance), one utterance empty.
BAD = {u: _spoil(t, 8 if i == 5 else 1 + i % 3) for i, (u, t) in enumerate(NESTED_REFS.items())}
# A few errors, spread out; identical in both systems of a pair.
SOME = {u: _spoil(t, 1) if i % 4 == 0 else t for i, (u, t) in enumerate(NESTED_REFS.items())}


def _write_text(path, hyps: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.joinpath("text").write_text("".join(f"{u} {h}".rstrip() + "\n" for u, h in hyps.items()))


def _fake_bench(root, nested: dict[str, dict[str, dict[str, str]]], ref: str = "REF", ref_bytes: int = 4000,
                train_seconds: float | None = 100.0, sets=("dev", "test")):
    """An `allinone bench` output: results.json, systems/<name>/<set>/text, and the supernet's config.json."""
    model = root / "supernet_final"
    model.mkdir(parents=True)
    config = {"encoder": {}} if train_seconds is None else {"encoder": {}, "train_seconds": train_seconds}
    (model / "config.json").write_text(json.dumps(config))
    systems = [{"system": name, "fp32_bytes": ref_bytes if name == ref else 1000 + i, "packed_bytes": 500}
               for i, name in enumerate(nested)]
    bench = root / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({
        "model": str(model), "reference": ref, "reference_fp32_bytes": ref_bytes, "systems": systems,
        "test_sets": [{"name": s, "path": f"/data/{s}", "utterances": len(NESTED_REFS)} for s in sets]}))
    for name, per_set in nested.items():
        for s, hyps in per_set.items():
            _write_text(bench / "systems" / name / s, hyps)
    return bench


@pytest.fixture
def fake(tmp_path):
    nested = {
        "REF": {"dev": SOME, "test": PERFECT},
        "A": {"dev": BAD, "test": SOME},         # much worse than its twin on dev, identical on test
        "B": {"dev": SOME, "test": SOME},        # identical to its twin
        "C": {"dev": PERFECT, "test": PERFECT},  # better than its twin
        "D": {"dev": PERFECT, "test": PERFECT},  # benchmarked, no twin
    }
    twins = {"A": {"dev": PERFECT, "test": SOME}, "B": {"dev": SOME, "test": SOME},
             "C": {"dev": BAD, "test": BAD}, "Z": {"dev": BAD, "test": BAD}}  # Z: a run with no nested system
    return {"bench": _fake_bench(tmp_path, nested), "nested": nested, "twins": twins,
            "seconds": {"A": 30.0, "B": 50.0, "C": 40.0}, "refs_of": {"dev": NESTED_REFS, "test": NESTED_REFS},
            "reference": ({"dev": SOME, "test": PERFECT}, 4000)}


def test_nested_twins_significance_and_wer(fake):
    res = nested_twins(fake["bench"], fake["twins"], fake["seconds"], fake["refs_of"], 0.05,
                       reference=fake["reference"])
    pairs = {p["system"]: p for p in res["pairs"]}
    assert set(pairs) == {"REF", "A", "B", "C"}  # D has no twin, Z no nested system
    a, b, c = pairs["A"], pairs["B"], pairs["C"]
    assert a["worse"] is True and a["sets"]["dev"]["worse"] is True and a["sets"]["dev"]["p_value"] < 1e-3
    assert a["sets"]["test"]["worse"] is False and a["sets"]["test"]["p_value"] == 1.0
    assert b["worse"] is False and all(x["p_value"] == 1.0 and x["worse"] is False for x in b["sets"].values())
    # significantly *better* than its twin: not worse
    assert c["worse"] is False and c["sets"]["dev"]["p_value"] < 0.05 and not c["sets"]["dev"]["worse"]
    assert c["sets"]["dev"]["better"] is True and not a["sets"]["dev"]["better"] and not b["sets"]["dev"]["better"]
    assert pairs["REF"]["worse"] is False and pairs["REF"]["twin_seconds"] is None
    assert a["twin_seconds"] == 30.0 and c["twin_seconds"] == 40.0
    for name, p in pairs.items():
        twin = fake["reference"][0] if name == "REF" else fake["twins"][name]
        for s in ("dev", "test"):
            x = p["sets"][s]
            assert x["nested_wer"] == pytest.approx(_brute_wer(NESTED_REFS, fake["nested"][name][s]))
            assert x["twin_wer"] == pytest.approx(_brute_wer(NESTED_REFS, twin[s]))
            assert x["p_value"] == pytest.approx(mapsswe(NESTED_REFS, twin[s], fake["nested"][name][s]).p_value)
    assert a["sets"]["dev"]["nested_wer"] == pytest.approx(100.0 * (8 * 1 + 8 * 2 + 8 * 3 - 3 + 8) / (24 * 8))
    assert b["sets"]["dev"]["twin_wer"] == pytest.approx(100.0 * 6 / (24 * 8))
    md = "\n".join(format_nested(res, ["dev", "test"]))
    assert "| A | " in md and "▲" in md and "(float model)" in md and "| D |" not in md
    line = next(x for x in md.splitlines() if x.startswith("| C | "))
    assert " ▼ / " in line and "▲" not in line  # C is significantly better than its twin on dev


def test_nested_twins_reference_pair_needs_equal_fp32_bytes(fake, caplog):
    with caplog.at_level(logging.WARNING, logger="allinone"):
        res = nested_twins(fake["bench"], fake["twins"], fake["seconds"], fake["refs_of"], 0.05,
                           reference=fake["reference"])
    assert "REF" in {p["system"] for p in res["pairs"]} and not caplog.records
    with caplog.at_level(logging.WARNING, logger="allinone"):
        res = nested_twins(fake["bench"], fake["twins"], fake["seconds"], fake["refs_of"], 0.05,
                           reference=(fake["reference"][0], 4001))
    assert {p["system"] for p in res["pairs"]} == {"A", "B", "C"}
    assert any("4001" in r.getMessage() and "REF" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    res = nested_twins(fake["bench"], fake["twins"], fake["seconds"], fake["refs_of"], 0.05)  # no reference
    assert {p["system"] for p in res["pairs"]} == {"A", "B", "C"}


def test_nested_twins_training_time(fake, tmp_path):
    # the reference twin (the float model) has no seconds; Z is no twin of a benchmarked system
    seconds = {**fake["seconds"], "Z": 1000.0}
    for reference in (fake["reference"], None):
        t = nested_twins(fake["bench"], fake["twins"], seconds, fake["refs_of"], 0.05, reference=reference)["time"]
        assert t["supernet_seconds"] == 100.0 and t["twin_seconds_mean"] == pytest.approx(40.0)
        assert t["systems_alone"] == 4  # 5 benchmarked systems, less the reference
        assert t["alone_seconds"] == pytest.approx(160.0) and t["speedup"] == pytest.approx(1.6)
    res = nested_twins(fake["bench"], fake["twins"], seconds, fake["refs_of"], 0.05)
    assert "4 systems x 40 s (mean twin) = 160 s alone: 1.60x less" in "\n".join(format_nested(res, ["dev", "test"]))
    # without the supernet's train_seconds there is no speedup (and no line for it)
    other = tmp_path / "no_seconds"
    bench = _fake_bench(other, fake["nested"], train_seconds=None)
    res = nested_twins(bench, fake["twins"], seconds, fake["refs_of"], 0.05)
    assert res["time"]["supernet_seconds"] is None and res["time"]["speedup"] is None
    assert not any("Training time" in line for line in format_nested(res, ["dev", "test"]))


def test_nested_twins_needs_the_same_test_sets(fake, tmp_path):
    with pytest.raises(ValueError, match=r"\['dev', 'test'\].*\['dev', 'eval'\]"):
        nested_twins(fake["bench"], fake["twins"], fake["seconds"], {"dev": NESTED_REFS, "eval": NESTED_REFS}, 0.05)
    with pytest.raises(ValueError, match="bench results"):
        nested_twins(tmp_path / "nope", fake["twins"], fake["seconds"], fake["refs_of"], 0.05)


@pytest.fixture(scope="module")
def nested_setup(setup):
    """`allinone bench` of the runs' supernet (with its train_seconds) and its largest float subnet
    extracted as a plain float reference model (the bench reference's twin)."""
    from allinone.elastic.extract import extract_to_dirs
    from allinone.eval.bench import BenchOptions, run_bench
    from allinone.models.saved import load_model_dir

    root = setup["root"]
    loaded = load_model_dir(setup["reference"])
    supernet = save_model_dir(root / "supernet_final", loaded.model, loaded.fbank, loaded.tokenizer,
                              extra={"train_seconds": 30.0})
    grid = [*SYSTEMS.values(), "L2_F24_H2_B4"]  # the last one has no twin
    bench = run_bench(supernet, grid, [setup["data"]], root / "bench", BenchOptions(latency=False, num_workers=1),
                      progress=False)
    float_ref = root / "float_plain"
    extract_to_dirs(supernet, [bench["reference"]], float_ref)
    return {"bench": root / "bench", "bench_results": bench, "float_ref": float_ref}


def test_compare_runs_nested_end_to_end(setup, nested_setup, tmp_path, capsys):
    from allinone.cli import main

    bench_dir, bench = nested_setup["bench"], nested_setup["bench_results"]
    out = tmp_path / "out"
    res = compare_runs(nested_setup["float_ref"], [parse_run(r) for r in setup["runs"]], [setup["data"]], out,
                       num_workers=1, nested=bench_dir)
    assert res["reference_fp32_bytes"] == bench["reference_fp32_bytes"]  # so the reference pair is made
    nested = res["nested"]
    pairs = {p["system"]: p for p in nested["pairs"]}
    assert set(pairs) == {bench["reference"], *SYSTEMS.values()}
    refs = {u.utt_id: u.text for u in read_data_dir(setup["data"])}
    for name, p in pairs.items():
        twin_dir = out / "reference" if name == bench["reference"] else \
            out / "systems" / next(k for k, v in SYSTEMS.items() if v == name)
        twin, mine = read_hyps(twin_dir / "test"), read_hyps(bench_dir / "systems" / name / "test")
        x = p["sets"]["test"]
        assert x["nested_wer"] == pytest.approx(_brute_wer(refs, mine))
        assert x["twin_wer"] == pytest.approx(_brute_wer(refs, twin))
        test = mapsswe(refs, twin, mine)
        assert x["p_value"] == pytest.approx(test.p_value) and x["worse"] == (test.significant and test.better == "a")
        assert p["twin_seconds"] == (None if name == bench["reference"] else 12.0)
    # twins and nested systems are the same weights here: nothing is significantly worse
    assert not any(p["worse"] for p in pairs.values())
    t = nested["time"]
    assert t["supernet_seconds"] == 30.0 and t["twin_seconds_mean"] == 12.0
    assert t["systems_alone"] == len(bench["systems"]) - 1 == 4
    assert t["speedup"] == pytest.approx(12.0 * 4 / 30.0)
    assert json.loads((out / "results.json").read_text())["nested"] == nested
    md = (out / "results.md").read_text()
    assert "against their individually trained twins" in md and "1.60x less" in md
    # the supernet itself as the reference: its fp32 bytes (quantizer scales included) are not the
    # bench reference's, so there is no reference pair
    res = compare_runs(setup["reference"], [parse_run(r) for r in setup["runs"]], [setup["data"]],
                       tmp_path / "out_supernet_ref", num_workers=1, nested=bench_dir)
    assert {p["system"] for p in res["nested"]["pairs"]} == set(SYSTEMS.values())
    rc = main(["compare", str(nested_setup["float_ref"]), *setup["runs"], "--data", str(setup["data"]),
               "--out", str(out), "--num-workers", "1", "--nested", str(bench_dir)])
    assert rc == 0 and "4 nested systems against their twins; significantly worse: none" in capsys.readouterr().out


def test_compare_runs_nested_bad_bench_fails_before_any_work(setup, nested_setup, tmp_path):
    runs = [parse_run(r) for r in setup["runs"]]
    with pytest.raises(ValueError, match="no results.json"):
        compare_runs(setup["reference"], runs, [setup["data"]], tmp_path / "out", nested=tmp_path)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="decode both the same way"):  # the bench decoded greedily
        compare_runs(setup["reference"], runs, [setup["data"]], tmp_path / "out", nested=nested_setup["bench"],
                     beam=4)
    assert not (tmp_path / "out").exists()
    other = _data_dir(tmp_path / "other")  # a test set the bench did not decode
    with pytest.raises(ValueError, match=r"benchmarked on test sets \['test'\].*\['other'\]"):
        compare_runs(setup["reference"], runs, [other], tmp_path / "out", nested=nested_setup["bench"])
    assert not (tmp_path / "out").exists()


def test_reference_weight_bytes_count_what_the_system_counts():
    """A system that quantizes tensors the float reference does not count (a wav2vec2 extractor at
    ``extractor_bits``) has them counted at 32 bits on the reference's side too."""
    from types import SimpleNamespace

    from allinone.eval.compare import reference_weight_bytes
    from allinone.quant.accounting import size_report
    from allinone.quant.quantizer import QuantizedTensor

    layer, conv = "encoder.transformer.layers.0.fc1.weight", "feature_extractor.conv_layers.0.conv.weight"
    ref = size_report({layer: (4, 4), conv: (2, 1, 3)}, {}, quant_prefixes=("encoder.transformer.layers.",))
    assert ref.weight_fp32_bytes == 4 * 16  # the float reference counts its layers only

    def q(shape):
        return QuantizedTensor(torch.zeros(shape, dtype=torch.int8), torch.ones([1] * len(shape)), 4, "per_tensor")

    assert reference_weight_bytes(ref, SimpleNamespace(quantized={layer: q((4, 4))})) == 4 * 16
    assert reference_weight_bytes(ref, SimpleNamespace(quantized={layer: q((4, 4)), conv: q((2, 1, 3))})) == 4 * 22
