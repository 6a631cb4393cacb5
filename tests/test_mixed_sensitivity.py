"""Two-stage baselines, stage 1: Hutchinson traces, sensitivity rankings on a constructed
case, and the stage-1 -> stage-2 -> allocation.json / timing.json pipeline end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from allinone.cli import main
from allinone.elastic import mixed_precision as mp
from allinone.elastic.quant import init_quantizers
from allinone.quant.sensitivity import hessian_sensitivity, hutchinson_traces, kl_sensitivity

from supernet_helpers import tiny_batch, tiny_space, tiny_supernet


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hutchinson_traces_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    ca, cb = torch.rand(3, 4, generator=g) + 0.5, torch.rand(5, generator=g) * 3
    m = torch.randn(5, 5, generator=g)
    hb = m @ m.T  # a full (non-diagonal) Hessian block for b

    def grad_fn(diagonal: bool):
        loss = 0.5 * (ca * a * a).sum() + (0.5 * (cb * b * b).sum() if diagonal else 0.5 * b @ hb @ b)
        loss = loss + 0.3 * a.sum() * b.sum()  # cross terms between the tensors: zero mean
        return torch.autograd.grad(loss, [a, b])

    a0 = a.detach().clone()
    ta, tb = hutchinson_traces(lambda: grad_fn(True), [a, b], n_samples=3, eps=1e-2,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.detach(), a0)  # restored
    # Diagonal blocks: v^T H v = tr(H) for every Rademacher v; the cross terms cancel only
    # on average, so a few samples are close but not exact.
    assert ta == pytest.approx(float(ca.sum()), rel=0.3) and tb == pytest.approx(float(cb.sum()), rel=0.3)
    _, tb_full = hutchinson_traces(lambda: grad_fn(False), [a, b], n_samples=400, eps=1e-2,
                                   generator=torch.Generator().manual_seed(2))
    assert tb_full == pytest.approx(float(hb.trace()), rel=0.1)


@pytest.fixture(scope="module")
def constructed():
    """Block 1's FFNs contribute almost nothing (w_2 scaled by 0.02), block 0's a lot (x3):
    quantizing block 0's FFN must hurt more."""
    model = tiny_supernet(seed=3)
    with torch.no_grad():
        for block, factor in ((0, 3.0), (1, 0.02)):
            for ffn in (model.encoder.encoders[block].feed_forward, model.encoder.encoders[block].feed_forward_macaron):
                ffn.w_2.weight.mul_(factor)
    init_quantizers(model, force=True)  # scales follow the new weights
    template = tiny_space().for_model(model.config).largest()
    groups = {g: c for g, c in mp.group_cells(template, "layer").items() if g in ("b0_ffn", "b1_ffn", "b2_attn")}
    return model, template, groups, [tiny_batch(seed=1, batch=2, frames=40)]


def test_kl_sensitivity_ranks_the_harmful_layer_first(constructed):
    model, template, groups, batches = constructed
    s = kl_sensitivity(model, batches, template, groups, [8, 4, 2])
    assert s["b0_ffn"][2] > 10 * s["b1_ffn"][2]
    assert s["b0_ffn"][2] > s["b0_ffn"][4] > s["b0_ffn"][8] >= 0  # fewer bits hurt more


def test_hessian_sensitivity_ranks_the_harmful_layer_first(constructed):
    model, template, groups, batches = constructed
    s, traces = hessian_sensitivity(model, batches, template, groups, [8, 4, 2], n_samples=3)
    assert sum(t for n, t in traces.items() if n.startswith("encoder.encoders.0.feed_forward")) > 0
    assert len(traces) == 4 + 4 + 5  # every weight of the three groups
    assert s["b0_ffn"][2] > 10 * s["b1_ffn"][2]
    assert s["b0_ffn"][2] > s["b0_ffn"][4] > s["b0_ffn"][8]


# ----------------------------------------------------------------------------- end to end


def _data_dir(root, n: int, seed: int):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    scp, text = [], []
    for i in range(n):
        path = root / f"u{i}.wav"
        sf.write(path, (rng.standard_normal(4000 + 400 * i) * 0.1).astype(np.float32), 16000)
        scp.append(f"u{i} {path}")
        text.append(f"u{i} {'ab'[i % 2]} {'cd'[i % 2]}")
    (root / "wav.scp").write_text("\n".join(scp) + "\n")
    (root / "text").write_text("\n".join(text) + "\n")
    return root


def test_stage1_stage2_and_one_stage_runs_write_allocation_and_timing(tmp_path):
    data = _data_dir(tmp_path / "data", 6, 0)
    space = {"depth": [2], "ffn": [32], "heads": [2], "bits": [32, 8, 4, 2], "per_layer": ["bits"],
             "per_kind_bits": True}
    cfg = {
        "exp_dir": str(tmp_path / "exp"),
        "data": {"train": str(data), "valid": str(data), "num_workers": 1, "feat_cache_dir": str(tmp_path / "feats")},
        "tokenizer": {"kind": "char"},
        "model": {"encoder": {"output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 2,
                              "cnn_module_kernel": 3}},
        "specaug": {"enabled": False},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {"max_epochs": 1, "max_frames": 400, "device": "cpu", "keep_best": 1, "max_steps": 2},
        "supernet": {"space": space, "strategy": "mixed_precision", "quant": {"bits": [8, 4, 2]},
                     "target_bits": 4.0, "anneal_steps": 2},
    }
    conf = tmp_path / "mixed.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    # One stage.
    assert main(["train", str(conf), f"exp_dir={tmp_path / 'one'}"]) == 0
    alloc = json.loads((tmp_path / "one" / "allocation.json").read_text())
    assert alloc["method"] == "one_stage" and 3.9 <= alloc["average_bits"] <= 4.0
    assert json.loads((tmp_path / "one" / "timing.json").read_text())["total_seconds"] > 0
    saved = json.loads((tmp_path / "one" / "final" / "config.json").read_text())
    assert saved["model"]["quant"] is not None  # a plain supernet: the search was detached
    # Two stage: stage 1 (KL sensitivity) writes the allocation, stage 2 trains it fixed.
    assert main(["allocate", str(conf), "--method", "kl", "--out", str(tmp_path / "s1"),
                 "--num-batches", "2", "--device", "cpu"]) == 0
    s1 = json.loads((tmp_path / "s1" / "allocation.json").read_text())
    assert s1["method"] == "two_stage_kl" and s1["average_bits"] <= 4.0
    assert main(["train", str(conf), f"exp_dir={tmp_path / 's2'}", "supernet.strategy=fixed",
                 f"supernet.subnet={tmp_path / 's1' / 'allocation.json'}"]) == 0
    s2 = json.loads((tmp_path / "s2" / "allocation.json").read_text())
    timing = json.loads((tmp_path / "s2" / "timing.json").read_text())
    assert s2["subnet"] == s1["subnet"] and [s["stage"] for s in timing["stages"]] == ["stage1_kl", "qat_fixed"]
    # The learned allocation extracts from the saved supernet by its string.
    assert main(["extract", str(tmp_path / "one" / "final"), "--subnet", alloc["subnet"],
                 "--out", str(tmp_path / "x")]) == 0
