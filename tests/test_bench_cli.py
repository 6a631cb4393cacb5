"""``allinone bench``: every output file, consistent numbers, validation before work, resume."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import pytest
import torch
import yaml

import allinone.eval.bench as bench
from allinone.cli import main
from allinone.elastic.extract import extract_to_dirs
from allinone.eval.bench import BenchOptions, read_hyps, resolve_grid, run_bench
from allinone.eval.decode import DecodeOptions, decode_data_dir
from allinone.eval.latency import int8_model
from allinone.eval.mapsswe import mapsswe
from allinone.eval.report import LATENCY_FIELDS, csv_value, pareto_front, reference_warning
from allinone.models.saved import PACKED_WEIGHTS, load_model_dir
from allinone.quant.packed_file import describe_packed, load_packed

from bench_helpers import SMALL_SPACE, make_digits, make_supernet_dir
from supernet_helpers import tiny_batch

GRID = ["L4_F48_H4_B8", "L2_F24_H2_B2", "L4_F24_H4_B8"]  # + the reference L4_F48_H4_B32, added by bench
FILES = ["results.csv", "results.json", "results.md", "pareto.png", "report.md"]


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    d1 = make_digits(data_root, root / "test_a", num_utts=5, seed=0)
    d2 = make_digits(data_root, root / "test_b", num_utts=3, seed=1)
    model = make_supernet_dir(root / "sup" / "final")  # untrained: hypotheses differ between subnets
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    out = root / "out"
    argv = ["bench", str(model), "--grid", str(grid), "--data", str(d1), str(d2), "--out", str(out),
            "--threads", "1", "--latency-repeats", "1", "--latency-utts", "2", "--num-workers", "1",
            "--int8-front-end-calib", str(d2)]
    assert main(argv) == 0
    return {"model": model, "data": [d1, d2], "grid": grid, "out": out, "root": root}


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_every_output_file(setup):
    out = setup["out"]
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _results(out)
    names = [s["system"] for s in res["systems"]]
    assert names == ["L4_F48_H4_B32"] + GRID and res["reference"] == "L4_F48_H4_B32"
    for name in names:
        for t in ("test_a", "test_b"):
            d = out / "systems" / name / t
            assert (d / "hyp.trn").is_file() and (d / "ref.trn").is_file() and (d / "wer.json").is_file()
    md = (out / "results.md").read_text()
    assert all(f"| {n} |" in md or f"**{n}**" in md for n in names)
    report = (out / "report.md").read_text()
    assert "![WER against packed size](pareto.png)" in report
    assert f"Lossless compression ratio: {res['lossless_compression_ratio']:.2f}x" in report
    assert (f"Lossless compression ratio {res['lossless_compression_ratio']:.2f}x ({res['lossless_system']}); "
            f"of the quantizable weights alone") in md
    assert f"allinone bench {setup['model']} --grid {setup['grid']}" in report
    assert f"torch {torch.__version__}" in report and "Best system per size bracket" in report


def test_reference_that_recognises_nothing_is_flagged(setup, tmp_path, capsys):
    # A model that decodes to nothing ties every system at 100% WER: all come out "lossless".
    # bench must say that its lossless ratio then means nothing (stderr, results, both reports).
    model = make_supernet_dir(tmp_path / "mute", mute=True)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(["L2_F24_H2_B2"]))
    out = tmp_path / "out"
    assert main(["bench", str(model), "--grid", str(grid), "--data", str(setup["data"][1]), "--out", str(out),
                 "--threads", "1", "--no-latency", "--num-workers", "1"]) == 0
    err = capsys.readouterr().err
    res = _results(out)
    assert all(s["pooled_wer"] == 100.0 and s["lossless"] for s in res["systems"])
    assert res["reference_warning"].startswith("the reference recognises no word of test_b")
    assert f"warning: {res['reference_warning']}" in err
    for f in ("results.md", "report.md"):
        assert f"**Warning:** {res['reference_warning']}." in (out / f).read_text()


def test_reference_warning_needs_a_set_without_a_correct_word():
    assert reference_warning({"a": {"words": 10, "sub": 2, "del": 7}, "b": {"words": 5, "sub": 0, "del": 4}}) is None
    warning = reference_warning({"a": {"words": 10, "sub": 3, "del": 7}, "b": {"words": 5, "sub": 0, "del": 4}})
    assert warning.startswith("the reference recognises no word of a (")
    assert reference_warning({"a": {"words": 0, "sub": 0, "del": 0}}) is None  # no words: nothing to recognise
    assert reference_warning({"a": {"words": 4, "sub": 4, "del": 0}}, "the float model").startswith(
        "the float model recognises no word of a (")


def test_reference_row_and_significance(setup):
    out = setup["out"]
    res = _results(out)
    refs = {}
    for row in res["rows"]:
        if row["reference"]:
            assert row["p_value"] == 1.0 and not row["significant"] and row["ratio_vs_ref"] == 1.0
    # p-values and verdicts recomputed from the written hypothesis files
    from allinone.data.kaldi import read_data_dir

    for t, d in zip(("test_a", "test_b"), setup["data"]):
        refs = {u.utt_id: u.text for u in read_data_dir(d)}
        ref_hyps = read_hyps(out / "systems" / "L4_F48_H4_B32" / t)
        for row in (r for r in res["rows"] if r["data"] == t):
            m = mapsswe(refs, ref_hyps, read_hyps(out / "systems" / row["system"] / t))
            assert row["p_value"] == m.p_value and row["statistic"] == m.statistic
            assert row["worse"] == (m.significant and m.better == "a")
            w = json.loads((out / "systems" / row["system"] / t / "wer.json").read_text())
            assert (row["wer"], row["sub"], row["del"], row["ins"]) == (w["wer"], w["sub"], w["del"], w["ins"])
    # lossless: not worse on every test set; the ratio is the largest such ratio_vs_ref
    for s in res["systems"]:
        assert s["lossless"] == all(not s["test_sets"][t]["worse"] for t in ("test_a", "test_b"))
    best = max(s["ratio_vs_ref"] for s in res["systems"] if s["lossless"])
    assert res["lossless_compression_ratio"] == best
    assert res["lossless_weights_ratio"] == max(s["weights_ratio_vs_ref"] for s in res["systems"] if s["lossless"])


def test_sizes_equal_extracted_files(setup, tmp_path):
    res = _results(setup["out"])
    ref_fp32 = res["reference_fp32_bytes"]
    for s in res["systems"]:
        path = extract_to_dirs(setup["model"], [s["system"]], tmp_path / s["system"])[0].out_dir
        report = load_packed(path / PACKED_WEIGHTS).size_report()
        assert (s["params"], s["packed_bytes"], s["fp32_bytes"]) == (
            report.total_params, report.packed_bytes, report.fp32_bytes)
        assert f"packed parameter bytes: {s['packed_bytes']:,}" in describe_packed(path / PACKED_WEIGHTS)
        assert s["ratio"] == pytest.approx(report.compression_ratio)
        assert s["ratio_vs_ref"] == pytest.approx(ref_fp32 / report.packed_bytes)
        # the quantizable weights alone, from the packed file's own tensors: codes + scales of the
        # quantized ones (all block weights here), against the reference's block weights at 4 bytes
        packed = load_packed(path / PACKED_WEIGHTS)
        stored = sum(q.scale.numel() * 4 + math.ceil(q.codes.numel() * q.bits / 8) for q in packed.quantized.values())
        if not packed.quantized:  # a float system keeps its block weights at 4 bytes
            stored = 4 * sum(t.numel() for k, t in packed.state_dict.items()
                             if k.startswith("encoder.encoders.") and k.endswith(".weight") and t.dim() in (2, 3)
                             and "norm" not in k)
        assert s["weight_bytes"] == stored
        assert s["weights_ratio_vs_ref"] == pytest.approx(res["systems"][0]["weight_bytes"] / stored)
    # decoding the supernet with the subnet active == decoding the extracted model
    name = "L2_F24_H2_B2"
    summary = decode_data_dir(tmp_path / name, setup["data"][0], tmp_path / "dec",
                              DecodeOptions(num_workers=1))
    row = next(r for r in res["rows"] if r["system"] == name and r["data"] == "test_a")
    assert (summary["wer"], summary["sub"], summary["del"], summary["ins"]) == (
        row["wer"], row["sub"], row["del"], row["ins"])
    assert read_hyps(tmp_path / "dec") == read_hyps(setup["out"] / "systems" / name / "test_a")


def test_csv_equals_json(setup):
    res = _results(setup["out"])
    with open(setup["out"] / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == res["row_fields"] and len(rows) == len(res["rows"]) == 4 * 2
    for c, j in zip(rows, res["rows"]):
        for k in res["row_fields"]:
            assert c[k] == csv_value(j.get(k)), k
            if isinstance(j.get(k), (int, float)) and not isinstance(j[k], bool):
                assert float(c[k]) == j[k]


def test_latency_columns(setup):
    res = _results(setup["out"])
    assert {"cpu-fp32", "cpu-int8", "cpu-int8-fe"} <= set(res["backends"])
    assert "cpu-int8-fe ms/utt (RTF)" in (setup["out"] / "results.md").read_text()
    for s in res["systems"]:
        lat = s["latency"]
        assert lat["cpu-fp32"]["ms_per_utt"] > 0 and lat["cpu-fp32"]["rtf"] > 0
        assert lat["cpu-fp32"]["threads"] == 1 and lat["cpu-fp32"]["utterances"] == 2
        # the int8 path only where every quantized weight is 8-bit
        assert ("cpu-int8" in lat) == ("cpu-int8-fe" in lat) == s["system"].endswith("_B8")
        assert set(LATENCY_FIELDS) <= set(lat["cpu-fp32"])


def test_int8_model_runs_integer_kernels(setup):
    from allinone.elastic.extract import extract
    from allinone.quant.int8 import Int8Linear

    loaded = load_model_dir(setup["model"])
    small, quantized = extract(loaded.model, loaded.model.search_space.parse("L4_F48_H4_B8"))
    import copy

    m = copy.deepcopy(small)
    routed = int8_model(m, quantized)
    # q, k, v, out, pos + two FFNs x (w_1, w_2) + the conv module's two pointwise convs, per block
    assert len(routed) == 4 * 11
    assert sum(n.endswith(("pointwise_conv1", "pointwise_conv2")) for n in routed) == 4 * 2
    calls = []
    hook = [mod.register_forward_hook(lambda *a: calls.append(1)) for mod in m.modules()
            if isinstance(mod, Int8Linear)]
    b = tiny_batch()
    with torch.no_grad():
        want = small.encode(b["feats"], b["feat_lens"])[0]
        got = m.encode(b["feats"], b["feat_lens"])[0]
    assert len(calls) == len(routed)
    # a pointwise layer called any other way (here unbatched) stays on its float kernel
    pw = m.encoder.encoders[0].conv_module.pointwise_conv1
    x = torch.randn(pw.in_channels, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.conv1d(x, pw.weight, pw.bias),
                                   torch.nn.functional.conv1d(x, pw.weight.as_subclass(torch.Tensor), pw.bias))
    # only the activations are rounded (7-bit dynamic): close, not equal
    assert 0 < (got - want).abs().max() <= 0.05 * want.abs().max()
    for h in hook:
        h.remove()


def test_bad_grid_rejected_before_any_work(setup, tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("work started before the grid was validated")

    monkeypatch.setattr(bench, "load_test_set", no_work)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(["L4_F48_H4_B8", "L3_F48_H4_B8", "L2_F24_H2_B4", "L2_F24_H2_B2"]))
    out = tmp_path / "out"
    rc = main(["bench", str(setup["model"]), "--grid", str(bad), "--data", str(setup["data"][0]),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "2 grid entries are not in the model's search space" in err
    assert "'L3_F48_H4_B8'" in err and "depth 3 is not in the space" in err
    assert "'L2_F24_H2_B4'" in err and "bit-width 4 is not in the space" in err
    assert not out.exists()
    rc = main(["bench", str(setup["model"]), "--grid", "L4_F48_H4_B8,L4_F64_H4_B8", "--data",
               str(setup["data"][0]), "--out", str(out), "--reference", "L4_F48_H4_B8"])
    assert rc == 2 and "F value 64 is not in the space" in capsys.readouterr().err
    rc = main(["bench", str(setup["model"]), "--grid", "all", "--data", str(setup["data"][0]),
               "--out", str(out), "--reference", "L4_F48_H3_B32"])
    assert rc == 2 and "H value 3" in capsys.readouterr().err and not out.exists()
    rc = main(["bench", str(setup["model"]), "--grid", "L4_F48_H4_B8", "--data", str(setup["data"][0]),
               "--out", str(out), "--int8-front-end-calib", str(tmp_path / "no_such_dir")])
    assert rc == 2 and "front-end calibration data directory not found" in capsys.readouterr().err
    assert not out.exists()


def test_resume_skips_finished_systems(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    (out / "systems" / "L2_F24_H2_B2" / "system.json").unlink()  # as if interrupted there
    # a record saved before the weights-only sizes existed gets them without being decoded again
    old = out / "systems" / "L4_F24_H4_B8" / "system.json"
    record = json.loads(old.read_text())
    saved_size = dict(record["size"])
    del record["size"]["weight_bytes"], record["size"]["weight_fp32_bytes"]
    old.write_text(json.dumps(record))
    done = []
    real = bench._bench_system
    monkeypatch.setattr(bench, "_bench_system", lambda name, *a, **k: done.append(name) or real(name, *a, **k))
    opts = BenchOptions(threads=1, latency_repeats=1, latency_utts=2, num_workers=1,
                        front_end_calib=str(setup["data"][1]))
    res = run_bench(setup["model"], setup["grid"], setup["data"], out, opts, progress=False)
    assert done == ["L2_F24_H2_B2"] and res["resumed_systems"] == 3
    assert json.loads(old.read_text())["size"] == saved_size
    before = _results(setup["out"])
    for a, b in zip(res["rows"], before["rows"]):
        assert {k: a[k] for k in ("system", "data", "wer", "p_value", "packed_bytes")} == \
               {k: b[k] for k in ("system", "data", "wer", "p_value", "packed_bytes")}
    # other settings (the front end's calibration, the beam) invalidate saved systems
    done.clear()
    opts.front_end_calib = None
    run_bench(setup["model"], ["L2_F24_H2_B2"], setup["data"], out, opts, progress=False)
    assert done == ["L4_F48_H4_B32", "L2_F24_H2_B2"]
    done.clear()
    opts.beam, opts.latency = 2, False
    run_bench(setup["model"], ["L2_F24_H2_B2"], setup["data"][:1], out, opts, progress=False)
    assert done == ["L4_F48_H4_B32", "L2_F24_H2_B2"]


def test_lm_fusion_equals_decode_of_the_extracted_model(setup, tmp_path, monkeypatch):
    """``bench --lm`` decodes each system as ``allinone decode --lm`` decodes its extracted
    model; another LM weight decodes the systems again."""
    from allinone.data.tokenizer import load_tokenizer
    from allinone.eval.ngram_lm import train_token_lm

    lm = tmp_path / "lm.arpa"
    train_token_lm([setup["data"][1] / "text"], load_tokenizer(setup["model"] / "tokenizer"), 3, lm)
    name, data = "L2_F24_H2_B2", setup["data"][0]
    opts = BenchOptions(beam=3, lm=str(lm), lm_weight=2.0, latency=False, num_workers=2)  # a search pool
    out = tmp_path / "out"
    run_bench(setup["model"], [name], [data], out, opts, progress=False)
    path = extract_to_dirs(setup["model"], [name], tmp_path / "x")[0].out_dir
    decode_data_dir(path, data, tmp_path / "dec", DecodeOptions(beam=3, lm=str(lm), lm_weight=2.0, num_workers=1))
    assert read_hyps(tmp_path / "dec") == read_hyps(out / "systems" / name / data.name)
    plain = tmp_path / "plain"
    decode_data_dir(path, data, plain, DecodeOptions(beam=3, num_workers=1))
    assert read_hyps(plain) != read_hyps(tmp_path / "dec")  # the LM changed something
    # the beam searches spread over worker processes (each with its LM) give the same output
    pooled = tmp_path / "pooled"
    decode_data_dir(path, data, pooled, DecodeOptions(beam=3, lm=str(lm), lm_weight=2.0, num_workers=2))
    assert read_hyps(pooled) == read_hyps(tmp_path / "dec")
    done = []
    real = bench._bench_system
    monkeypatch.setattr(bench, "_bench_system", lambda n, *a, **k: done.append(n) or real(n, *a, **k))
    opts.lm_weight = 1.0
    run_bench(setup["model"], [name], [data], out, opts, progress=False)
    assert done == ["L4_F48_H4_B32", name]


def test_resolve_grid_forms(tmp_path):
    from allinone.elastic.space import SearchSpace

    space = SearchSpace(**SMALL_SPACE)
    assert len(resolve_grid("all", space)) == 24
    assert [space.format(s) for s in resolve_grid("L4_F48_H4_B8, L2_F24_H2_B2", space)] == \
           ["L4_F48_H4_B8", "L2_F24_H2_B2"]
    choices = tmp_path / "choices.yaml"
    choices.write_text(yaml.safe_dump({"depth": [2], "bits": [8, 2]}))
    assert len(resolve_grid(choices, space)) == 1 * 2 * 2 * 2
    with pytest.raises(ValueError, match="grid file not found"):
        resolve_grid(tmp_path / "missing.yaml", space)


def test_pareto_front():
    pts = [("a", 10, 5.0), ("b", 5, 6.0), ("c", 6, 7.0), ("d", 2, 9.0), ("e", 10, 4.0)]
    assert pareto_front(pts) == ["d", "b", "e"]


def test_int4_model_runs_the_weight_only_kernel(setup):
    """int4_model (the cuda-int4 backend's routing) sends every 4-bit Linear and pointwise conv
    of a shape the kernel takes to Int4WeightOnlyLinear, leaves the rest float, and computes
    what the dequantized model computes (on the CPU kernel here; the GPU test below on tinygemm)."""
    import copy

    from allinone.elastic.extract import extract
    from allinone.eval.latency import int4_model
    from allinone.quant.int4 import Int4WeightOnlyLinear, int4_supported_shape

    loaded = load_model_dir(setup["model"])
    small, quantized = extract(loaded.model, loaded.model.search_space.parse("L4_F48_H4_B2"))
    m = copy.deepcopy(small)
    routed = int4_model(m, quantized)
    # a 2-bit system's codes are 4-bit codes too: every Linear and pointwise conv the kernel takes
    layers = {n.rsplit(".", 1)[0]: q.codes for n, q in quantized.items()}
    takes = [n for n, codes in layers.items()
             if (isinstance(m.get_submodule(n), torch.nn.Linear) or codes.shape[-1:] == (1,) and codes.dim() == 3)
             and int4_supported_shape(codes.shape[0], codes[..., 0].shape[1] if codes.dim() == 3 else codes.shape[1])]
    assert routed and sorted(routed) == sorted(takes) and len(takes) < len(layers)
    calls = []
    hooks = [mod.register_forward_hook(lambda *a: calls.append(1)) for mod in m.modules()
             if isinstance(mod, Int4WeightOnlyLinear)]
    b = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = small.encode(b["feats"], b["feat_lens"])[0].float()
        got = m.encode(b["feats"], b["feat_lens"])[0].float()
    for h in hooks:
        h.remove()
    assert len(calls) == len(routed)  # every routed layer ran on the int4 kernel, once
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_backend_list_and_unknown_backend(setup):
    from allinone.eval.latency import BACKENDS, backends_for, measure_latency

    cpu_only = not torch.cuda.is_available()
    assert backends_for({"w": 8}) == ["cpu-fp32", "cpu-int8"] + ([] if cpu_only else
                                                                   ["cuda-fp32", "cuda-bf16", "cuda-int8"])
    assert backends_for({"w": 8, "v": 4})[:1] == ["cpu-fp32"] and "cpu-int8" not in backends_for({"v": 4})
    assert set(backends_for({"w": 8})) <= set(BACKENDS)
    assert backends_for({"w": 4, "v": 2}) == ["cpu-fp32"] + ([] if cpu_only else ["cuda-fp32", "cuda-bf16", "cuda-int4"])
    assert "cuda-int4" not in backends_for({"w": 4, "v": 8})
    loaded = load_model_dir(setup["model"])
    with pytest.raises(ValueError, match="unknown latency backend 'tpu-int4'"):
        measure_latency(loaded.model, {}, [tiny_batch()["feats"][0]], "tpu-int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_backends_agree_with_cpu(setup):
    """cuda-int8 routes every 8-bit Linear to torch._int_mm and stays close to the float model."""
    from allinone.elastic.extract import extract
    from allinone.eval.latency import _backend_model, measure_latency
    from allinone.quant.int8 import Int8Linear

    loaded = load_model_dir(setup["model"])
    small, quantized = extract(loaded.model, loaded.model.search_space.parse("L4_F48_H4_B8"))
    m = _backend_model(small, "cuda-int8", quantized)
    assert sum(isinstance(x, Int8Linear) for x in m.modules()) == 4 * 9
    b = tiny_batch()
    with torch.no_grad():
        want = small.encode(b["feats"], b["feat_lens"])[0]
        got = m.encode(b["feats"].cuda(), b["feat_lens"].cuda())[0].cpu()
    assert 0 < (got - want).abs().max() <= 0.05 * want.abs().max()
    for backend in ("cuda-fp32", "cuda-bf16", "cuda-int8"):
        r = measure_latency(small, quantized, [b["feats"][0]], backend, repeats=1)
        assert r.ms_per_utt > 0 and r.threads is None and r.peak_mem_mb > 0
    # cuda-int4: tinygemm on a 2-bit system (its codes are 4-bit codes), close to the dequantized model
    small4, quantized4 = extract(loaded.model, loaded.model.search_space.parse("L4_F48_H4_B2"))
    m4 = _backend_model(small4, "cuda-int4", quantized4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = small4.cuda().encode(b["feats"].cuda(), b["feat_lens"].cuda())[0].float().cpu()
        got = m4.encode(b["feats"].cuda(), b["feat_lens"].cuda())[0].float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    r = measure_latency(small4.cpu(), quantized4, [b["feats"][0]], "cuda-int4", repeats=1)
    assert r.ms_per_utt > 0


def test_float_model_is_what_significance_is_judged_against(setup, tmp_path, capsys, monkeypatch):
    """``--float-model``: the separately trained float model is decoded as ``allinone decode``
    decodes it, and every system's p-value and lossless verdict are against its hypotheses
    (the reference subnet's row too); sizes stay relative to the reference subnet."""
    from allinone.data.kaldi import read_data_dir

    # another model, trained a little: other hypotheses, with words right where the supernet has none
    float_model = make_supernet_dir(tmp_path / "float", seed=11, train_steps=200, data_dir=setup["data"][0])
    out = tmp_path / "out"
    assert main(["bench", str(setup["model"]), "--grid", str(setup["grid"]), "--data", *map(str, setup["data"]),
                 "--out", str(out), "--no-latency", "--num-workers", "1", "--float-model", str(float_model)]) == 0
    printed = capsys.readouterr().out
    res = _results(out)
    assert res["significance_reference"] == "float model" and res["float_model"]["path"] == str(float_model)
    assert f"(against the float model {float_model}, MAPSSWE alpha 0.05)" in printed
    for t, d in zip(("test_a", "test_b"), setup["data"]):
        decode_data_dir(float_model, d, tmp_path / "dec" / t, DecodeOptions(num_workers=1))
        float_hyps = read_hyps(tmp_path / "dec" / t)
        assert read_hyps(out / "float_model" / t) == float_hyps
        wer = json.loads((tmp_path / "dec" / t / "wer.json").read_text())["wer"]
        assert res["float_model"]["wer"][t] == wer
        refs = {u.utt_id: u.text for u in read_data_dir(d)}
        for row in (r for r in res["rows"] if r["data"] == t):
            m = mapsswe(refs, float_hyps, read_hyps(out / "systems" / row["system"] / t))
            assert row["p_value"] == m.p_value and row["worse"] == (m.significant and m.better == "a")
            if row["reference"]:  # judged too, against other hypotheses than its own
                assert row["ratio_vs_ref"] == 1.0
                assert float_hyps != read_hyps(out / "systems" / row["system"] / t)
    # (not the verdicts against the reference subnet: the test would pass without the option)
    assert [r["p_value"] for r in res["rows"]] != [r["p_value"] for r in _results(setup["out"])["rows"]]
    lossless = [s for s in res["systems"] if s["lossless"]]
    assert res["lossless_compression_ratio"] == (max(s["ratio_vs_ref"] for s in lossless) if lossless else None)
    assert f"than the float model {float_model}" in (out / "report.md").read_text()
    md = (out / "results.md").read_text()
    assert "▲ = significantly worse than the float model" in md and "▼ = significantly better" in md

    # Re-run: nothing is decoded again, the float model's record is resumed too.
    opts = BenchOptions(latency=False, num_workers=1, float_model=str(float_model))
    monkeypatch.setattr(bench, "_bench_system", lambda *a, **k: pytest.fail("a system decoded again"))
    real_float = bench._bench_float_model
    monkeypatch.setattr(bench, "_bench_float_model", lambda *a, **k: pytest.fail("the float model decoded again"))
    res2 = run_bench(setup["model"], setup["grid"], setup["data"], out, opts, progress=False)
    assert res2["resumed_systems"] == len(res["systems"]) and res2["rows"] == res["rows"]
    # Another model saved at the same path is decoded again (recipes copy models into place).
    decoded = []
    monkeypatch.setattr(bench, "_bench_float_model", lambda *a, **k: decoded.append(1) or real_float(*a, **k))
    make_supernet_dir(float_model, seed=12)
    run_bench(setup["model"], setup["grid"], setup["data"], out, opts, progress=False)
    assert decoded == [1]
    # A bench made without --float-model keeps its systems: adding the option decodes the float model alone.
    shared = tmp_path / "shared"
    shutil.copytree(setup["out"], shared)
    decoded.clear()
    res3 = run_bench(setup["model"], setup["grid"], setup["data"], shared,
                     BenchOptions(threads=1, latency_repeats=1, latency_utts=2, num_workers=1,
                                  front_end_calib=str(setup["data"][1]), float_model=str(float_model)),
                     progress=False)
    assert decoded == [1] and res3["resumed_systems"] == len(res["systems"])


def test_float_model_that_does_not_fit_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    from allinone.data.features import FbankConfig
    from allinone.data.tokenizer import CharTokenizer
    from allinone.models.saved import save_model_dir

    from bench_helpers import TOKENS
    from supernet_helpers import tiny_supernet

    monkeypatch.setattr(bench, "_bench_system", lambda *a, **k: pytest.fail("decoded before checking"))
    monkeypatch.setattr(bench, "_bench_float_model", lambda *a, **k: pytest.fail("decoded before checking"))
    cases = {"not a model directory (no config.json)": tmp_path / "nothing"}
    other_tokens = save_model_dir(tmp_path / "tok", tiny_supernet(seed=1).eval(), FbankConfig(n_mels=40),
                                  CharTokenizer(TOKENS[:3] + ["A"] + TOKENS[4:]))
    cases["its tokenizer is not the supernet's (12 against 12 units; unit 3 differs first)"] = other_tokens
    other_fbank = save_model_dir(tmp_path / "fb", tiny_supernet(seed=1).eval(), FbankConfig(n_mels=40, fmin=20.0),
                                 CharTokenizer(TOKENS))
    cases["its front end"] = other_fbank
    for message, path in cases.items():
        with pytest.raises(ValueError, match=f"--float-model {path}: {message}".replace("(", r"\(").replace(")", r"\)")):
            run_bench(setup["model"], setup["grid"], setup["data"], tmp_path / "out",
                      BenchOptions(latency=False, num_workers=1, float_model=str(path)), progress=False)


def test_no_lossless_system_is_reported_as_such(setup, tmp_path):
    """Against a float model every system (the reference subnet too) can be significantly
    worse: then there is no lossless ratio, and every output says so instead of failing."""
    from allinone.eval.report import build_results, write_outputs

    res = _results(setup["out"])
    names = [s["system"] for s in res["systems"]]
    records = [json.loads((setup["out"] / "systems" / n / "system.json").read_text()) for n in names]
    worse = {"significant": True, "better": "a", "p_value": 0.001, "statistic": 3.3}
    significance = {n: {t: worse for t in ("test_a", "test_b")} for n in names}
    wer = {t: records[0]["wer"][t] for t in ("test_a", "test_b")}
    results = build_results(records, significance, names[0], res["test_sets"], "sup", BenchOptions(), None,
                            float_model={"path": "float/final", "wer": wer})
    assert results["lossless_compression_ratio"] is None and results["lossless_system"] is None
    assert not any(b["lossless"] for b in results["size_brackets"])
    write_outputs(results, tmp_path)
    rows = {re.match(r"\| \**([\w.]+)", line).group(1): line
            for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")}
    assert all(" ▲ (" in rows[n] and " ▼ (" not in rows[n] for n in names)
    # a system significantly better than the float model is marked so (and is lossless)
    significance[names[1]] = {t: {**worse, "better": "b"} for t in ("test_a", "test_b")}
    better = build_results(records, significance, names[0], res["test_sets"], "sup", BenchOptions(), None,
                           float_model={"path": "float/final", "wer": wer})
    write_outputs(better, tmp_path / "better")
    line = next(x for x in (tmp_path / "better" / "results.md").read_text().splitlines() if f"| {names[1]} |" in x)
    assert " ▼ (" in line and " ▲ (" not in line and better["lossless_system"] == names[1]
    assert "**No system is lossless**: every one is significantly worse than the float model float/final" \
        in (tmp_path / "report.md").read_text()
    assert "No system is lossless (against the float model float/final)." in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["lossless_compression_ratio"] is None
    assert (tmp_path / "pareto.png").stat().st_size > 0
