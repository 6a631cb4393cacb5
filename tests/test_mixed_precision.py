"""One-stage mixed precision: Gumbel-softmax sampling and annealing, the size penalty, the
strategy, the final allocation (extraction and size accounting), fusion with the supernet."""

from __future__ import annotations

import json
import math

import pytest
import torch

from allinone.data.features import FbankConfig
from allinone.data.tokenizer import CharTokenizer
from allinone.elastic import mixed_precision as mp
from allinone.elastic.extract import extract, extracted_size
from allinone.elastic.quant import quantizable_layers
from allinone.elastic.mixed_budget import allocate_greedy, allocate_knapsack, average_bits
from allinone.elastic.subnet import KINDS
from allinone.models.saved import PACKED_WEIGHTS, save_extracted
from allinone.quant.accounting import size_report
from allinone.quant.packed_file import load_packed
from allinone.train.strategies import FixedSubnetStrategy, MixedPrecisionStrategy, build_strategy

from supernet_helpers import tiny_batch, tiny_space, tiny_supernet


pytestmark = pytest.mark.usefixtures("one_thread")


def searchable(seed: int = 0, blocks: int = 4, **kw) -> tuple[torch.nn.Module, MixedPrecisionStrategy]:
    """A tiny supernet (``blocks`` blocks) with the mixed_precision strategy of ``kw``."""
    base_lr = kw.pop("base_lr", None)
    model = tiny_supernet(seed=seed, num_blocks=blocks)
    model.search_space = tiny_space(depth=[blocks], num_blocks=blocks).for_model(model.config)
    cfg = {"space": model.search_space.to_dict(), "strategy": "mixed_precision", **kw}
    return model, build_strategy(cfg, model, seed=0, base_lr=base_lr)


# ----------------------------------------------------------------------------- sampling


def test_gumbel_softmax_sums_to_one_and_hard_is_one_hot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, requires_grad=True)
    soft = mp.gumbel_softmax(logits, tau=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft.sum(-1), torch.ones(5)) and (soft > 0).all() and (soft < 1).all()
    hard = mp.gumbel_softmax(logits, tau=0.7, hard=True, generator=torch.Generator().manual_seed(1))
    assert set(hard.detach().flatten().tolist()) <= {0.0, 1.0} and torch.equal(hard.detach().sum(-1), torch.ones(5))
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))  # same noise, same choice
    hard.mul(torch.arange(3.0)).sum().backward()  # straight-through: the soft sample's gradient
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Samples follow softmax(logits): the argmax frequency of many draws.
    lg = torch.tensor([1.0, 0.0, -1.0])
    draws = mp.gumbel_softmax(lg.expand(20000, 3), tau=1.0, hard=True, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(draws.mean(0), torch.softmax(lg, -1), atol=0.015)


def test_temperature_schedule():
    assert mp.temperature(0, 5.0, 0.5, 100) == 5.0
    assert math.isclose(mp.temperature(50, 5.0, 0.5, 100), 5.0 * 0.1 ** 0.5)
    assert math.isclose(mp.temperature(100, 5.0, 0.5, 100), 0.5)
    assert mp.temperature(10_000, 5.0, 0.5, 100) == 0.5
    assert mp.temperature(3, 5.0, 0.5, 0) == 0.5
    taus = [mp.temperature(s, 2.0, 0.2, 10) for s in range(12)]
    assert all(a > b for a, b in zip(taus[:10], taus[1:11]))


# ----------------------------------------------------------------------------- groups, mixture


def test_groups_and_mixture_forward():
    model, strat = searchable()
    search = model.bit_search
    assert len(search.groups) == 4 * len(KINDS) and search.groups["b2_ffn"] == [(2, "ffn")]
    assert len(mp.group_cells(model.search_space.largest(), "kind")) == 3
    assert list(mp.group_cells(model.search_space.largest(), "block")) == ["b0", "b1", "b2", "b3"]
    numel = mp.cell_numel(model, model.search_space.largest())
    assert numel[(0, "ffn")] == 2 * 2 * 32 * 48  # macaron + main FFN, w_1 and w_2
    b = tiny_batch()
    # A one-hot mixture is exactly that bit-width.
    for q in (q for qs in search.members.values() for q in qs):
        q.mix_probs = torch.tensor([0.0, 1.0, 0.0])  # candidates (8, 4, 2): 4 bits
    model.eval()
    with torch.no_grad():
        mixed = model.encode(b["feats"], b["feat_lens"], strat.mixed)[0]
        four = model.encode(b["feats"], b["feat_lens"], model.search_space.parse("L4_F48_H4_B4"))[0]
    assert torch.equal(mixed, four)
    mp.detach_mixed_precision(model)
    assert not hasattr(model, "bit_search")
    assert not any(".bit_search" in k or k.startswith("bit_search") for k in model.state_dict())
    assert type(model.encoder.encoders[0].self_attn.linear_q.quantizer).__name__ == "MultiPrecisionQuantizer"


def test_bad_search_setups():
    model = tiny_supernet()
    model.search_space = tiny_space(per_kind_bits=False).for_model(model.config)
    with pytest.raises(ValueError, match="per module kind"):
        build_strategy({"space": model.search_space.to_dict(), "strategy": "mixed_precision"}, model)
    with pytest.raises(ValueError, match="outside the candidates"):
        build_strategy({"space": "x", "strategy": "mixed_precision", "target_bits": 9}, model)
    model.search_space = tiny_space().for_model(model.config)
    with pytest.raises(ValueError, match="not in the space"):
        build_strategy({"space": "x", "strategy": "mixed_precision", "candidate_bits": [8, 3]}, model)


# ----------------------------------------------------------------------------- size penalty, strategy


def test_size_penalty_moves_expected_bits_to_target():
    """Logits only, size penalty only: expected bits go from 4.67 (uniform) to the target."""
    model, _ = searchable(target_bits=3.0)
    search = model.bit_search
    assert math.isclose(float(search.expected_bits().detach()), (8 + 4 + 2) / 3, rel_tol=1e-6)
    opt = torch.optim.Adam(search.parameters(), lr=0.05)
    for _ in range(60):
        search.size_penalty().backward()
        opt.step()
        opt.zero_grad()
    assert abs(float(search.expected_bits().detach()) - 3.0) < 0.1
    # Large layers move more: the gradient of a group's logits scales with its weights.
    model2, _ = searchable(target_bits=6.0)
    s2 = model2.bit_search
    s2.size_penalty().backward()
    g = {k: p.grad.norm().item() for k, p in s2.logits.items()}
    assert g["b0_ffn"] > g["b0_attn"] > 0


def test_sample_size_penalty_makes_undecided_groups_decide():
    """Flat logits whose expectation already meets the target: the expected-size penalty is
    zero with zero gradient, the penalty on Gumbel-softmax samples is not, and descending it
    makes each group's choice sharper while the expected size stays at the target."""
    model, _ = searchable(target_bits=14 / 3)  # uniform probabilities over (8, 4, 2) meet it exactly
    search = model.bit_search
    assert float(search.size_penalty()) < 1e-10
    total = sum(search.numel.values())

    def decided() -> float:  # weight-averaged probability of each group's top choice
        return sum(float(p.max()) * search.numel[g] / total for g, p in search.probabilities().items())

    expected_only = searchable(target_bits=14 / 3)[0].bit_search
    expected_only.size_penalty().backward()
    assert all(float(p.grad.abs().max()) < 1e-6 for p in expected_only.parameters())
    opt = torch.optim.Adam(search.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    start = decided()
    for _ in range(300):
        search.size_penalty("square", search.sample(tau=1.0, generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    assert start < 0.34 and decided() > 0.7
    assert abs(float(search.expected_bits().detach()) - 14 / 3) < 0.5


def test_unknown_size_of_is_refused():
    with pytest.raises(ValueError, match="size_of"):
        searchable(blocks=2, size_of="mode")


def test_strategy_lowers_loss_and_reaches_the_budget():
    torch.manual_seed(0)
    model, strat = searchable(blocks=2, target_bits=3.0, size_weight=20.0, kl_weight=1.0, tau0=2.0, tau_min=0.5,
                              anneal_steps=10, logit_lr=0.1, base_lr=3e-3)
    assert math.isclose(model.bit_search.logit_scale, 0.1 / 3e-3)
    b = tiny_batch(batch=2, frames=40)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        logs = strat.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
        optim.step()
        optim.zero_grad()
        first = first if first is not None else float(logs["loss_asr"])
    assert {"loss", "loss_asr", "kl", "penalty", "tau", "exp_bits"} <= set(logs)
    assert float(logs["loss_asr"]) < 0.7 * first
    assert abs(float(logs["exp_bits"]) - 3.0) < 0.1
    assert int(model.bit_search.steps) == 15
    sub = mp.final_allocation(model)
    avg = mp.allocation_average_bits(sub, mp.cell_numel(model, sub))
    assert 2.9 - 1e-9 <= avg <= 3.0 + 1e-9


def test_pass2_fixes_the_allocation_and_freeze_trains_only_logits():
    model, strat = searchable(blocks=2, search_steps=2, kl_weight=0.0)
    b = tiny_batch()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(4):
        logs = strat.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
        if i >= 2:  # pass 2: no sampling, logits receive no gradient
            assert "tau" not in logs and all(p.grad is None for p in model.bit_search.parameters())
        optim.step()
        optim.zero_grad(set_to_none=True)
    assert strat.fixed == mp.final_allocation(model)

    model, strat = searchable(blocks=2, freeze_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "bit_search" not in k}
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    strat.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
    optim.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(p.abs().sum() > 0 for p in model.bit_search.logits.values())


# ----------------------------------------------------------------------------- allocation


def test_final_allocation_extracts_to_a_packed_model_of_the_accounted_size(tmp_path):
    model, strat = searchable(target_bits=4.0)
    search = model.bit_search
    with torch.no_grad():  # a definite allocation: 8 bits for attention, 2 for FFN, 4 for conv
        for g, p in search.logits.items():
            p.copy_(torch.tensor({"attn": [3.0, 0, 0], "ffn": [0, 0, 3.0], "conv": [0, 3.0, 0]}[g.split("_")[1]]))
    sub = mp.final_allocation(model, enforce_budget=False)
    assert strat.space_format(sub) == "L4_F48_H4_BA8_BF2_BC4"
    report = strat.finalize(model, tmp_path, train_seconds=12.5)
    saved = json.loads((tmp_path / "allocation.json").read_text())
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["total_seconds"] == 12.5 and saved["subnet"] == report["subnet"]
    assert saved["per_layer"][0] == {"block": 0, "attn": 8, "ffn": 2, "conv": 4}
    # Within [target - 0.1, target]: the argmax (2 bits for the large FFNs) was below the
    # window, so the most probable allocation inside it was taken.
    assert 3.9 <= saved["average_bits"] <= 4.0 and saved["argmax_subnet"] == "L4_F48_H4_BA8_BF2_BC4"
    assert not hasattr(model, "bit_search")  # detached: a plain supernet again
    subnet = model.search_space.parse(saved["subnet"])
    small, quantized = extract(model, subnet)
    report_x = extracted_size(small, quantized)
    assert math.isclose(report_x.average_bits, saved["average_bits"], rel_tol=1e-9)
    assert report_x.quantized_params == saved["quantized_params"]
    # The size predicted from the allocation alone (shapes and bits) equals the extracted one.
    numel_bits = {}
    for name, _, kind in quantizable_layers(small):
        block = int(name.split(".")[2])
        numel_bits[name] = subnet.layers[block].bits(kind)
    predicted = size_report(small.state_dict(), numel_bits, per_channel=True)
    assert predicted.packed_bytes == report_x.packed_bytes
    # And the packed file holds that many tensor bytes (within 1%).
    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    out = save_extracted(tmp_path / "x", small, quantized, FbankConfig(n_mels=40), tok)
    packed = load_packed(out / PACKED_WEIGHTS)
    assert packed.size_report().packed_bytes == report_x.packed_bytes
    assert abs(packed.file_bytes - packed.header_bytes - report_x.packed_bytes) <= 0.01 * report_x.packed_bytes


def test_budget_allocators():
    numel = {"a": 100, "b": 300, "c": 600}
    # c is cheap to quantize, a is expensive.
    scores = {"a": {8: 0.0, 4: 5.0, 2: 50.0}, "b": {8: 0.0, 4: 1.0, 2: 4.0}, "c": {8: 0.0, 4: 0.1, 2: 0.2}}
    for alloc in (allocate_greedy, allocate_knapsack):
        bits = alloc(scores, numel, [8, 4, 2], 4.0)
        assert average_bits(bits, numel) <= 4.0 and bits["a"] >= bits["c"]
    best = allocate_knapsack(scores, numel, [8, 4, 2], 4.0)
    brute = min(((x, y, z) for x in (8, 4, 2) for y in (8, 4, 2) for z in (8, 4, 2)
                 if 100 * x + 300 * y + 600 * z <= 4000),
                key=lambda t: scores["a"][t[0]] + scores["b"][t[1]] + scores["c"][t[2]])
    assert tuple(best[g] for g in "abc") == brute
    window = allocate_knapsack({g: {8: 0.0, 4: 0.0, 2: 0.0} for g in "abc"}, numel, [8, 4, 2], 4.0, min_bits=3.9)
    assert 3.9 <= average_bits(window, numel) <= 4.0
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_greedy(scores, numel, [8, 4, 2], 1.5)


# ----------------------------------------------------------------------------- fusion, fixed strategy


def test_learned_allocation_joins_the_supernet_and_trains_as_a_target(tmp_path):
    model = tiny_supernet()
    narrow = tiny_space(per_kind_bits=False, per_layer=["ffn", "heads"], bits=[32, 8, 2])
    model.search_space = narrow.for_model(model.config)
    learned = "L4_F48_H4_BA8.8.4.4_BF2_BC4"
    with pytest.raises(ValueError):
        model.search_space.parse(learned)
    subnet, wider = mp.parse_into_space(model.search_space, learned, model.config)
    assert wider.format(subnet) == learned and wider.per_kind_bits and 4 in wider.bits
    assert mp.add_to_space(wider, subnet) == wider  # idempotent
    # The widened space trains the learned allocation next to the supernet's own targets.
    model.search_space = wider
    strat = build_strategy({"space": wider.to_dict(), "strategy": "targets",
                            "targets": ["L4_F48_H4_B32", learned]}, model)
    assert learned in [wider.format(s) for s, _ in strat.subnets(0)]
    b = tiny_batch(batch=2, frames=40)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        logs = strat.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
        losses.append(float(logs[f"loss/{learned}"]))
        optim.step()
        optim.zero_grad()
    assert losses[-1] < losses[0]
    # The fixed strategy reads an allocation.json (stage 2 / pass 2) and widens the space itself.
    (tmp_path / "allocation.json").write_text(json.dumps(
        {"subnet": learned, "method": "two_stage_kl", "timing": {"stages": [{"stage": "stage1_kl", "seconds": 3.0,
                                                                           "gpu_seconds": 3.0}]}}))
    model2 = tiny_supernet()
    model2.search_space = narrow.for_model(model2.config)
    fixed = build_strategy({"space": "x", "strategy": "fixed", "subnet": str(tmp_path)}, model2)
    assert isinstance(fixed, FixedSubnetStrategy) and fixed.opts.label_weight == 1.0
    assert model2.search_space.format(fixed.subnet) == learned
    fixed.step(model2, model2, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
    fixed.finalize(model2, tmp_path / "run", train_seconds=10.0)
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert [s["stage"] for s in timing["stages"]] == ["stage1_kl", "qat_fixed"] and timing["total_seconds"] == 13.0
    uniform3 = tiny_supernet(quant={"bits": [8, 4, 3, 2]})
    uniform3.search_space = tiny_space(bits=[32, 8, 4, 3, 2]).for_model(uniform3.config)
    s3 = build_strategy({"space": "x", "strategy": "fixed", "subnet": "L4_F48_H4_B3"}, uniform3)
    assert s3.subnet.max_bits() == 3


@pytest.mark.parametrize("schedule", ["shared", "constant"])
def test_logit_schedule_constant_gives_the_logits_their_peak_lr_from_the_first_step(schedule):
    from allinone.train.config import load_config
    from allinone.train.trainer import param_groups, set_learning_rates, warmup_lr

    model, _ = searchable(blocks=2, target_bits=3.0, logit_lr=0.05, base_lr=1e-3, logit_schedule=schedule)
    cfg = load_config(None, ["optim.lr=1e-3", "optim.warmup_steps=100"])
    cfg.supernet = {"logit_schedule": schedule}
    optim = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr)
    logit_ids = {id(p) for p in model.bit_search.parameters()}
    assert logit_ids
    set_learning_rates(optim, cfg.optim.lr, warmup_lr(1, cfg.optim.warmup_steps))
    for g in optim.param_groups:
        ids = {id(p) for p in g["params"]}
        if schedule == "constant":  # the logits' group holds nothing else
            assert not ids & logit_ids or ids <= logit_ids
        constant = schedule == "constant" and ids <= logit_ids
        assert math.isclose(g["lr"], 1e-3 if constant else 1e-3 * warmup_lr(1, 100))
    # Stored logits are raw * logit_lr / optim.lr: one Adam step moves them ~logit_lr at the peak lr.
    before = {k: v.detach().clone() for k, v in model.bit_search.logits.items()}
    for p in model.bit_search.parameters():
        p.grad = torch.ones_like(p)
    optim.step()
    moved = max(float(((model.bit_search.logits[k] - before[k]) * model.bit_search.logit_scale).abs().max())
                for k in before)
    assert math.isclose(moved, 0.05 if schedule == "constant" else 0.05 * warmup_lr(1, 100), rel_tol=0.05)


def test_unknown_logit_schedule_is_refused():
    with pytest.raises(ValueError, match="logit_schedule"):
        searchable(blocks=2, logit_schedule="cosine")


def test_the_trainer_validates_the_system_each_strategy_trains():
    """Epochs are ranked (train.select_by) by the system the run produces: the fixed
    strategy's subnet; the search's current allocation, the fixed one in pass 2."""
    from allinone.train.trainer import validate

    model, strat = searchable(blocks=2, search_steps=2, kl_weight=0.0)
    assert strat.validation_subnet(model) == mp.final_allocation(model)
    b = tiny_batch()
    for _ in range(3):
        strat.step(model, model, b, use_bf16=False, loss_scale=1.0, sync_grads=True)
    assert strat.validation_subnet(model) is strat.fixed

    model2 = tiny_supernet()
    model2.search_space = tiny_space().for_model(model2.config)
    fixed = build_strategy({"space": "x", "strategy": "fixed", "subnet": "L4_F48_H4_B2"}, model2)
    assert fixed.validation_subnet(model2) == fixed.subnet
    with torch.no_grad():
        model2.eval()
        two_bit = float(model2(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"], subnet=fixed.subnet)["loss"])
        whole = float(model2(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"])["loss"])
    got = validate(model2, [b], torch.device("cpu"), False, subnet=fixed.validation_subnet(model2))["valid_loss"]
    assert got == pytest.approx(two_bit, rel=1e-5) and got != pytest.approx(whole, rel=1e-3)
