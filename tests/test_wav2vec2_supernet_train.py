"""The wav2vec2 supernet through the command line: ``allinone train`` with a supernet section
(sandwich with distillation; a pretrained start sorted by importance), one-stage mixed
precision and the fixed / two-stage strategies, ``extract``, ``decode``, ``bench`` and
``search`` -- on the tiny digits data of tests/test_wav2vec2_train.py."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from allinone.cli import main as cli
from allinone.data.dataset import ASRDataset, WaveformConfig, collate, extract_features
from allinone.data.kaldi import read_data_dir
from allinone.elastic import mixed_precision as mp
from allinone.elastic.extract import extract, extracted_size
from allinone.elastic.importance import ffn_importance, head_importance
from allinone.eval.decode import DecodeOptions, recognize_batch
from allinone.models.saved import load_model_dir
from allinone.train.config import config_to_yaml
from allinone.train.trainer import build_model
from tests.test_train import digits  # noqa: F401  (the shared digits fixture)
from tests.test_wav2vec2_train import TINY_W2V, _fairseq_pretraining_checkpoint, w2v_config

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY_W2V: 2 layers, 2 heads of 16, FFN 64.
SPACE = {"depth": [2, 1], "ffn": [64, 32], "heads": [2, 1], "bits": [32, 8, 4, 2],
         "per_layer": ["ffn", "heads", "bits"], "per_kind_bits": True}
LARGEST, SMALLEST = "L2_F64_H2_B32", "L1_F32_H1_B2"


def _write_config(cfg, path):
    path.write_text(config_to_yaml(cfg))
    return str(path)


def _test_batch(digits, tokenizer):
    utts = read_data_dir(digits / "test")
    ds = ASRDataset(extract_features(utts, WaveformConfig(), progress=False), utts, tokenizer)
    return collate([ds[i] for i in range(len(ds))])


def _subnet_losses(model, batch, texts):
    model.eval()
    with torch.no_grad():
        return [float(model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"],
                            subnet=model.search_space.parse(t))["loss"]) for t in texts]


@pytest.fixture(scope="module")
def sandwich(digits, tmp_path_factory):
    """A tiny wav2vec2 supernet trained with the sandwich rule (+ KL) through ``allinone train``,
    and the losses of its largest and smallest subnets before training (same seed, same init)."""
    root = tmp_path_factory.mktemp("w2v_sandwich")
    cfg = w2v_config(digits, root / "exp", {"wav2vec2": TINY_W2V, "freeze_feature_extractor": False},
                     max_epochs=4, max_samples=100000)
    cfg.supernet = {"space": SPACE, "strategy": "sandwich", "num_random": 1, "quant": {"bits": [8, 4, 2]}}
    conf = _write_config(cfg, root / "conf.yaml")
    # The untrained supernet (train builds it after seeding with train.seed) on the test batch.
    from allinone.data.tokenizer import train_tokenizer
    from allinone.train.trainer import seed_everything

    tok = train_tokenizer([u.text for u in read_data_dir(digits / "train")], "char", 300, root / "tok")
    seed_everything(cfg.train.seed)
    untrained = build_model(cfg, tok.vocab_size, None)
    batch = _test_batch(digits, tok)
    before = _subnet_losses(untrained, batch, [LARGEST, SMALLEST])
    assert cli(["train", conf]) == 0
    return {"root": root, "final": root / "exp" / "final", "before": before, "batch": batch, "cfg": cfg}


def test_sandwich_training_lowers_largest_and_smallest(sandwich):
    loaded = load_model_dir(sandwich["final"])
    model = loaded.model
    assert model.config.quant is not None and model.search_space.format(model.search_space.largest()) == LARGEST
    after = _subnet_losses(model, sandwich["batch"], [LARGEST, SMALLEST])
    assert all(a < 0.5 * b for a, b in zip(after, sandwich["before"])), (sandwich["before"], after)
    log = (sandwich["root"] / "exp" / "train.log").read_text()
    assert f"loss/{LARGEST}=" in log and f"loss/{SMALLEST}=" in log  # both trained every step
    history = json.loads((sandwich["root"] / "exp" / "history.json").read_text())
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]


@pytest.mark.parametrize("subnet", ["L1_F32_H1_B2", "L2_F64.32_H2.1_BA8.4_BF4.2_BC8.4"])
def test_extracted_subnet_decodes_as_the_supernet_runs_it(sandwich, digits, tmp_path, subnet):
    out = tmp_path / "x"
    assert cli(["extract", str(sandwich["final"]), "--subnet", subnet, "--out", str(out)]) == 0
    small = load_model_dir(out)
    sup = load_model_dir(sandwich["final"])
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "wav2vec2_ctc" and config["subnet"] == subnet
    sub = sup.model.search_space.parse(subnet)
    batch = sandwich["batch"]
    with torch.no_grad():
        enc_sup, lens = sup.model.encode(batch["feats"], batch["feat_lens"], sub)
        enc_small, lens_small = small.model.encode(batch["feats"], batch["feat_lens"])
    assert torch.equal(lens, lens_small)
    torch.testing.assert_close(enc_small, enc_sup, atol=1e-4, rtol=1e-4)
    # The extracted model, decoded from its directory, gives what the supernet gives for the subnet.
    assert cli(["decode", str(out), "--data", str(digits / "test"), "--out", str(tmp_path / "dec"),
                "--num-workers", "1"]) == 0
    got = dict(line.split(" ", 1) if " " in line else (line, "")
               for line in (tmp_path / "dec" / "text").read_text().splitlines())
    ids = recognize_batch(sup.model, batch["feats"], batch["feat_lens"], DecodeOptions(), sub)
    want = {u: sup.tokenizer.decode(t) for u, t in zip(batch["utt_ids"], ids)}
    assert got == {u: w.strip() for u, w in want.items()}
    # This briefly trained supernet still emits blanks only (the CTC plateau), so also compare
    # the best non-blank token of every valid frame: the decisions a trained model would make.
    with torch.no_grad():
        best_sup = sup.model.ctc_log_probs(enc_sup)[..., 1:].argmax(-1)
        best_small = small.model.ctc_log_probs(enc_small)[..., 1:].argmax(-1)
    valid = torch.arange(best_sup.shape[1])[None, :] < lens[:, None]
    assert (best_sup == best_small)[valid].float().mean() > 0.99
    # A different subnet would not decode the same (so the comparison can fail).
    other = sup.model.search_space.parse(LARGEST if subnet != LARGEST else SMALLEST)
    with torch.no_grad():
        enc_other, _ = sup.model.encode(batch["feats"], batch["feat_lens"], other)
    assert not torch.allclose(enc_other, enc_sup, atol=1e-3)


def test_pretrained_start_is_sorted_and_keeps_the_float_model(digits, tmp_path):
    """model.init_from + supernet: quantizer keys are set (not loaded), FFN units and heads are
    sorted by importance, and the float model computes what the checkpoint's does."""
    _fairseq_pretraining_checkpoint(tmp_path / "pre.pt")
    section = {"init_from": str(tmp_path / "pre.pt"), "wav2vec2": {"encoder_layer_drop": 0.0}}
    plain = build_model(w2v_config(digits, tmp_path, section), 9, None).eval()
    cfg = w2v_config(digits, tmp_path, section)
    cfg.supernet = {"space": SPACE, "quant": {"bits": [8, 4, 2]}, "extractor_bits": 8}
    sup = build_model(cfg, 9, None).eval()
    assert sup.config.extractor_bits == 8 and sup.search_space is not None
    assert all(bool(q.initialized) for q in (m.quantizer for m in sup.modules() if hasattr(m, "quantizer")))
    for layer in sup.encoder.transformer.layers:
        f, h = ffn_importance(layer.feed_forward), head_importance(layer.attention)
        assert torch.equal(f, f.sort(descending=True).values) and torch.equal(h, h.sort(descending=True).values)
    unsorted = plain.encoder.transformer.layers[0].feed_forward
    assert not torch.equal(ffn_importance(unsorted), ffn_importance(unsorted).sort(descending=True).values)
    x = torch.randn(2, 8000)
    lens = torch.tensor([8000, 6000])
    with torch.no_grad():
        want, _ = plain.encode(x, lens)
        got, _ = sup.encode(x, lens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both given"):
        cfg.supernet = {**cfg.supernet, "init_from": str(tmp_path)}
        build_model(cfg, 9, None)
    cfg = w2v_config(digits, tmp_path, {"wav2vec2": {**TINY_W2V, "quant": {"bits": [8]}}})
    cfg.supernet = {"space": SPACE, "quant": {"bits": [8, 4, 2]}}
    with pytest.raises(ValueError, match="supernet.quant"):
        build_model(cfg, 9, None)


# ----------------------------------------------------------------------------- mixed precision


@pytest.fixture(scope="module")
def mixed(digits, tmp_path_factory):
    """One-stage mixed precision (layer granularity, 8-bit extractor) through ``allinone train``."""
    root = tmp_path_factory.mktemp("w2v_mixed")
    cfg = w2v_config(digits, root / "one", {"wav2vec2": TINY_W2V}, max_epochs=1, max_steps=4,
                     max_samples=100000)
    cfg.supernet = {"space": SPACE, "strategy": "mixed_precision", "quant": {"bits": [8, 4, 2]},
                    "extractor_bits": 8, "target_bits": 4.0, "anneal_steps": 4, "size_weight": 5.0}
    conf = _write_config(cfg, root / "mixed.yaml")
    assert cli(["train", conf]) == 0
    return {"root": root, "conf": conf, "final": root / "one" / "final",
            "alloc": json.loads((root / "one" / "allocation.json").read_text())}


def test_one_stage_allocation_respects_the_budget_and_extracts_to_its_size(mixed, tmp_path):
    alloc = mixed["alloc"]
    assert alloc["method"] == "one_stage" and alloc["granularity"] == "layer"
    assert 3.9 - 1e-9 <= alloc["average_bits"] <= 4.0 + 1e-9
    assert sorted(alloc["groups"]) == ["b0_attn", "b0_ffn", "b1_attn", "b1_ffn"]  # no conv kind
    assert all(set(row) == {"block", "attn", "ffn"} for row in alloc["per_layer"])
    assert alloc["extractor_bits"] == 8 and alloc["extractor_params"] > 0
    assert json.loads((mixed["root"] / "one" / "timing.json").read_text())["total_seconds"] > 0
    saved = json.loads((mixed["final"] / "config.json").read_text())
    assert saved["model"]["quant"] is not None and "bit_search" not in json.dumps(saved)
    # Extracted by its string, the packed model has exactly the allocation's bits.
    out = tmp_path / "x"
    assert cli(["extract", str(mixed["final"]), "--subnet", alloc["subnet"], "--out", str(out)]) == 0
    sup = load_model_dir(mixed["final"]).model
    subnet = sup.search_space.parse(alloc["subnet"])
    small, quantized = extract(sup, subnet)
    report = extracted_size(small, quantized)
    assert report.quantized_params == alloc["quantized_params"]
    assert math.isclose(report.average_bits, alloc["average_bits_with_extractor"], rel_tol=1e-9)
    block = [(t.numel, t.bits) for t in report.tensors if t.name.startswith("encoder.transformer.layers.")
             and t.bits != 32]
    assert math.isclose(sum(n * b for n, b in block) / sum(n for n, _ in block), alloc["average_bits"],
                        rel_tol=1e-9)
    from allinone.quant.packed_file import load_packed

    assert load_packed(out / "model.packed.safetensors").size_report().packed_bytes == report.packed_bytes


def test_fixed_and_two_stage_runs(mixed, tmp_path):
    conf, alloc = mixed["conf"], mixed["alloc"]
    # Pass 2 / stage 2: the learned allocation trained fixed.
    assert cli(["train", conf, f"exp_dir={tmp_path / 'fixed'}", "supernet.strategy=fixed",
                f"supernet.subnet={mixed['root'] / 'one' / 'allocation.json'}", "train.max_steps=2"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "allocation.json").read_text())
    assert fixed["subnet"] == alloc["subnet"] and math.isclose(fixed["average_bits"], alloc["average_bits"])
    timing = json.loads((tmp_path / "fixed" / "timing.json").read_text())
    assert [s["stage"] for s in timing["stages"]] == ["one_stage", "qat_fixed"]
    # Stage 1 of the two-stage baseline (KL sensitivity) under the same budget.
    assert cli(["allocate", conf, "--method", "kl", "--out", str(tmp_path / "s1"), "--num-batches", "1",
                "--device", "cpu"]) == 0
    s1 = json.loads((tmp_path / "s1" / "allocation.json").read_text())
    assert s1["method"] == "two_stage_kl" and s1["average_bits"] <= 4.0 + 1e-9
    assert sorted(s1["scores"]) == ["b0_attn", "b0_ffn", "b1_attn", "b1_ffn"]


def test_mixed_precision_cells_of_a_wav2vec2_model(mixed):
    model = load_model_dir(mixed["final"]).model
    assert mp.model_kinds(model) == ("attn", "ffn")
    template = model.search_space.largest()
    numel = mp.cell_numel(model, template)
    assert numel == {(i, k): 4 * 32 * 32 if k == "attn" else 2 * 32 * 64 for i in (0, 1) for k in ("attn", "ffn")}
    assert list(mp.group_cells(template, "block", mp.model_kinds(model))) == ["b0", "b1"]
    assert list(mp.group_cells(template, "kind", mp.model_kinds(model))) == ["attn", "ffn"]
    assert mp.weight_cell("feature_extractor.conv_layers.0.conv.weight", "extractor") is None
    assert mp.weight_cell("encoder.transformer.layers.1.attention.q_proj.weight", "attn") == (1, "attn")
    assert mp.weight_cell("encoder.encoders.3.feed_forward.w_1.weight", "ffn") == (3, "ffn")
    sub = mp.subnet_with_bits(template, {(0, "attn"): 8, (0, "ffn"): 8, (1, "attn"): 4, (1, "ffn"): 2},
                              kinds=("attn", "ffn"))
    assert mp.allocation_space(model, sub).format(sub) == "L2_F64_H2_BA8.4_BF8.2_BC8.4"


# ----------------------------------------------------------------------------- bench, search


def test_bench_a_wav2vec2_supernet(sandwich, digits, tmp_path):
    out = tmp_path / "bench"
    grid = "L2_F64_H2_B8,L1_F32_H1_B2"
    assert cli(["bench", str(sandwich["final"]), "--grid", grid, "--data", str(digits / "test"), "--out", str(out),
                "--threads", "1", "--latency-repeats", "1", "--latency-utts", "2", "--num-workers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {s["system"] for s in res["systems"]} == {LARGEST, "L2_F64_H2_B8", "L1_F32_H1_B2"}
    assert res["reference"] == LARGEST and (out / "report.md").is_file()
    loaded = load_model_dir(sandwich["final"])
    for name in (LARGEST, "L2_F64_H2_B8", "L1_F32_H1_B2"):
        s = json.loads((out / "systems" / name / "system.json").read_text())
        small, quantized = extract(loaded.model, loaded.model.search_space.parse(name))
        assert s["size"]["packed_bytes"] == extracted_size(small, quantized).packed_bytes
        wer = s["wer"]["test"]
        assert wer["words"] == sum(len(u.text.split()) for u in read_data_dir(digits / "test"))
        lat = s["latency"]
        assert lat["cpu-fp32"]["ms_per_utt"] > 0
        # RTF over seconds of audio: samples / 16 kHz
        assert 0.1 < lat["cpu-fp32"]["audio_seconds"] < 10
        assert ("cpu-int8" in lat) == name.endswith("_B8")
    # The reference decodes as the supernet's largest float subnet does.
    hyps = (out / "systems" / LARGEST / "test" / "text").read_text()
    assert len(hyps.splitlines()) == 8
    # an 8-bit Conv2d front end is a Conformer's: asked of a wav2vec2 model, refused before any work
    assert cli(["bench", str(sandwich["final"]), "--grid", grid, "--data", str(digits / "test"),
                "--out", str(tmp_path / "fe"), "--int8-front-end-calib", str(digits / "test")]) == 2
    assert not (tmp_path / "fe").exists()


def test_int8_routing_of_a_wav2vec2_model(sandwich):
    from allinone.eval.latency import int8_model
    from allinone.quant.int8 import Int8Linear

    loaded = load_model_dir(sandwich["final"])
    small, quantized = extract(loaded.model, loaded.model.search_space.parse("L2_F64_H2_B8"))
    m = copy.deepcopy(small)
    routed = int8_model(m, quantized)
    assert len(routed) == 2 * 6  # q, k, v, out_proj + intermediate / output dense, per layer
    calls = []
    hooks = [mod.register_forward_hook(lambda *a: calls.append(1)) for mod in m.modules()
             if isinstance(mod, Int8Linear)]
    batch = sandwich["batch"]
    with torch.no_grad():
        want = small.encode(batch["feats"], batch["feat_lens"])[0]
        got = m.encode(batch["feats"], batch["feat_lens"])[0]
    for h in hooks:
        h.remove()
    assert len(calls) == len(routed)  # every routed Linear ran on the integer kernel, once
    assert 0 < (got - want).abs().max() <= 0.1 * want.abs().max()


@pytest.mark.parametrize("which, s", [("sandwich", "L1_F32_H1_B2"), ("sandwich", "L2_F64.32_H2.1_BA8.4_BF4.2_BC8.4"),
                                      ("mixed", "L2_F64_H2_B4"), ("mixed", "L1_F32_H2_B32")])
def test_subnet_size_equals_extracted(sandwich, mixed, which, s):
    from allinone.eval.search import subnet_size

    model = load_model_dir({"sandwich": sandwich, "mixed": mixed}[which]["final"]).model
    sub = model.search_space.parse(s)
    got, want = subnet_size(model, sub), extracted_size(*extract(model, sub))
    assert (got.total_params, got.packed_bytes, got.quantized_params) == \
        (want.total_params, want.packed_bytes, want.quantized_params)


def test_search_a_wav2vec2_supernet(sandwich, digits, tmp_path, capsys):
    from allinone.eval.search import Budget, SearchOptions, run_search, subnet_size, weight_bits

    final = sandwich["final"]
    res = run_search(final, Budget(max_bits=5.0), digits / "test", SearchOptions(sample=4, num_workers=1),
                     grid="L2_F64_H2_B8,L2_F64_H2_B4,L1_F32_H1_B2,L2_F32_H2_B2", progress=False)
    assert res.strategy == "exhaustive"
    assert {c.subnet for c in res.evaluated} == {"L2_F64_H2_B4", "L1_F32_H1_B2", "L2_F32_H2_B2"}  # B8 is over
    assert all(c.bits <= 5.0 for c in res.evaluated)
    model = load_model_dir(final).model
    assert weight_bits(subnet_size(model, model.search_space.parse("L2_F64_H2_B32")),
                       model.quant_prefixes) == 32.0
    scores = [c.score for c in res.evaluated]
    assert scores == sorted(scores) and all(s > 0 for s in scores)
    # A wav2vec2 layer has no conv module: subnets that differ only in BC are one candidate.
    res = run_search(final, Budget(max_bits=8.0), digits / "test", SearchOptions(sample=2, num_workers=1),
                     grid="L2_F64_H2_B4,L2_F64_H2_BA4_BF4_BC2,L2_F64_H2_BA8_BF4_BC2", progress=False)
    assert sorted(c.subnet for c in res.evaluated) == ["L2_F64_H2_B4", "L2_F64_H2_BA8_BF4_BC8"]
    # The CLI, with a latency budget (timed on the waveform) and extraction of the winner.
    out = tmp_path / "best"
    assert cli(["search", str(final), "--data", str(digits / "test"), "--max-latency-ms", "10000",
                "--max-mb", "1", "--sample", "4", "--proxy", "wer", "--grid", "L1_F32_H1_B2,L2_F64_H2_B8",
                "--threads", "1", "--num-workers", "1", "--extract-to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best subnet" in printed and "ms/utt" in printed
    assert json.loads((out / "config.json").read_text())["arch"] == "wav2vec2_ctc"
