"""allinone.eval.compare: separately trained compression runs against one float reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from allinone.data.features import FbankConfig
from allinone.data.kaldi import read_data_dir
from allinone.data.tokenizer import CharTokenizer
from allinone.eval.bench import read_hyps
from allinone.eval.compare import compare_runs, format_markdown, lossless_ratios, parse_run
from allinone.eval.mapsswe import mapsswe
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
        hyps = read_hyps(sys_dir / "test")
        assert r["sets"]["test"]["wer"] == pytest.approx(score(refs, hyps).wer, abs=1e-4)
        test = mapsswe(refs, hyps, ref_hyps)
        assert r["sets"]["test"]["p_value"] == pytest.approx(test.p_value)
        assert r["compression_seconds"] == 12.0 and r["compression_gpu_seconds"] == 24.0
    assert rows["uniform/b8"]["average_bits"] == 8.0 and rows["uniform/b2"]["average_bits"] == 2.0
    assert 2.0 < rows["one_stage/b5"]["average_bits"] < 8.0
    assert rows["uniform/b2"]["ratio_vs_ref"] > rows["one_stage/b5"]["ratio_vs_ref"] > rows["uniform/b8"]["ratio_vs_ref"]
    md = (out / "results.md").read_text()
    assert md == format_markdown(json.loads((out / "results.json").read_text()))
    assert "| uniform | b8 | L4_F48_H4_B8 | 8.00 |" in md


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
