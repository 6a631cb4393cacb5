"""Supernet training strategies: losses go down for every trained subnet; DDP (gloo, 2 CPU
processes) runs a sandwich step and leaves both ranks with identical parameters."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from allinone.train.strategies import SupernetOptions, SupernetStrategy, build_strategy, ctc_kl

from supernet_helpers import tiny_batch, tiny_space, tiny_supernet

TARGETS = ["L4_F48_H4_B32", "L4_F24_H4_B4", "L2_F48_H2_B2"]


def make_strategy(model, strategy: str, **kw) -> SupernetStrategy:
    space = tiny_space().for_model(model.config)
    model.search_space = space
    cfg = {"space": space.to_dict(), "strategy": strategy, "targets": TARGETS, **kw}
    if strategy != "targets":  # (targets: its own default, no random subnets)
        cfg.setdefault("num_random", 2)
    return build_strategy(cfg, model, seed=0)


def subnet_losses(model, batch, texts) -> list[float]:
    model.eval()
    with torch.no_grad():
        out = [model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"],
                     subnet=model.search_space.parse(t))["loss"].item() for t in texts]
    model.train()
    return out


@pytest.mark.parametrize("strategy, trained", [
    ("sandwich", ["L4_F48_H4_B32", "L2_F24_H2_B2"]),
    ("targets", TARGETS),
    ("random", ["L4_F48_H4_B32", "L2_F24_H2_B2", "L4_F24_H4_B4"]),
])
def test_strategy_lowers_every_subnet_loss(strategy, trained):
    model = tiny_supernet()
    strat = make_strategy(model, strategy)
    batch = tiny_batch()
    before = subnet_losses(model, batch, trained)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        logs = strat.step(model, model, batch, use_bf16=False, loss_scale=1.0, sync_grads=True)
        optim.step()
        optim.zero_grad()
    after = subnet_losses(model, batch, trained)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    assert all(k.startswith("loss/L") and v.dim() == 0 for k, v in logs.items())
    if strategy == "targets":
        assert list(logs) == [f"loss/{t}" for t in TARGETS]  # highest precision (the teacher) first


def test_sandwich_trains_subnets_with_intermediate_ctc():
    """A float model with intermediate CTC (the speechocean762 recipe's) as a supernet: each
    subnet's label loss mixes its own taps (depth 2 keeps tap 1 of [1, 3]), as ESPnet's
    formula, and the sandwich lowers the loss of both ends."""
    model = tiny_supernet(interctc_layer_idx=[1, 3])
    model.config = dataclasses.replace(model.config, interctc_weight=0.3).validate()
    strat = make_strategy(model, "sandwich")
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        for text in ["L4_F48_H4_B32", "L2_F24_H2_B2"]:
            out = model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"],
                        subnet=model.search_space.parse(text))
            want = 0.7 * out["loss_ctc"] + 0.3 * out["loss_interctc"]
            torch.testing.assert_close(out["loss"], want)
            assert not torch.isclose(out["loss_interctc"], out["loss_ctc"]), text
    model.train()
    trained = ["L4_F48_H4_B32", "L2_F24_H2_B2"]
    before = subnet_losses(model, batch, trained)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        strat.step(model, model, batch, use_bf16=False, loss_scale=1.0, sync_grads=True)
        optim.step()
        optim.zero_grad()
    after = subnet_losses(model, batch, trained)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)


def test_plan_of_each_strategy():
    model = tiny_supernet()
    sandwich = make_strategy(model, "sandwich", num_random=3)
    plan = sandwich.subnets(5)
    space = sandwich.space
    assert [space.format(s) for s, _ in plan[:2]] == ["L4_F48_H4_B32", "L2_F24_H2_B2"]
    assert [t for _, t in plan] == [True, False, False, False, False]
    assert plan == sandwich.subnets(5)  # (seed, step) fixes the random subnets
    assert plan != sandwich.subnets(6)
    targets = make_strategy(model, "targets", targets=["L2_F48_H2_B2", "L4_F24_H4_B4", "L4_F48_H4_B8"])
    assert [space.format(s) for s, t in targets.subnets(0) if t] == ["L4_F48_H4_B8"]
    assert len(targets.subnets(0)) == 3  # targets alone by default


def test_targets_with_random_subnets_from_a_grid():
    """targets + num_random: every target every step (the teacher first), then that many random
    systems of the grid as students, never a target again; the random ones change with the
    step, the targets do not; one logged loss per subnet trained."""
    model = tiny_supernet()
    grid = ["L4_F24_H4_B4", "L2_F48_H2_B2", "L4_F48_H4_B8", "L2_F24_H2_B32", "L4_F48_H4_B32"]  # 2 targets
    strat = make_strategy(model, "targets", num_random=2, sample_from=grid)
    space = strat.space
    plans = [strat.subnets(step) for step in range(40)]
    for plan in plans:
        assert [space.format(s) for s, _ in plan[:3]] == TARGETS
        assert [t for _, t in plan] == [True, False, False, False, False]
    drawn = {space.format(s) for plan in plans for s, _ in plan[3:]}
    assert drawn == set(grid) - set(TARGETS)
    batch = tiny_batch()
    logs = strat.step(model, model, batch, use_bf16=False, loss_scale=1.0, sync_grads=True)
    assert list(logs)[:3] == [f"loss/{t}" for t in TARGETS] and len(logs) == len(plans[0])
    with pytest.raises(ValueError, match="only systems trained every step"):
        make_strategy(model, "targets", num_random=1, sample_from=TARGETS[:2])


def test_sandwich_ends_from_the_grid():
    """ends: sample_from: the sandwich's largest (the teacher) and smallest are the grid's (the
    systems one deploys), the random ones the grid's others, validation runs the grid's largest;
    the default keeps the space's ends."""
    model = tiny_supernet()
    grid = ["L4_F24_H4_B4", "L2_F48_H2_B8", "L2_F48_H2_B2", "L4_F48_H4_B8", "L2_F24_H2_B4"]  # not the space's ends
    strat = make_strategy(model, "sandwich", num_random=1, sample_from=grid, ends="sample_from")
    space = strat.space
    plans = [strat.subnets(step) for step in range(40)]
    assert {tuple((space.format(s), t) for s, t in p[:2]) for p in plans} == {
        (("L4_F48_H4_B8", True), ("L2_F48_H2_B2", False))}
    assert {space.format(p[2][0]) for p in plans} == set(grid) - {"L4_F48_H4_B8", "L2_F48_H2_B2"}
    assert space.format(strat.validation_subnet(model)) == "L4_F48_H4_B8"
    default = make_strategy(model, "sandwich", num_random=1, sample_from=grid)
    assert [space.format(s) for s, _ in default.subnets(0)[:2]] == ["L4_F48_H4_B32", "L2_F24_H2_B2"]
    assert default.validation_subnet(model) is None
    for kw, match in [({}, "for strategy sandwich with supernet.sample_from"),
                      ({"strategy": "random", "sample_from": grid}, "for strategy sandwich"),
                      ({"sample_from": grid[:1]}, "at least two systems")]:
        with pytest.raises(ValueError, match=match):
            make_strategy(model, kw.pop("strategy", "sandwich"), ends="sample_from", **kw)


def test_random_subnets_from_a_grid(tmp_path):
    """sample_from: the random subnets are the grid's (file or list), all of them over enough
    steps, the same for the same step; an entry outside the space is an error naming it."""
    model = tiny_supernet()
    grid = ["L4_F24_H4_B4", "L2_F48_H2_B2", "L4_F48_H4_B8"]
    (tmp_path / "grid.yaml").write_text("".join(f"- {g}\n" for g in grid))
    for source in (grid, str(tmp_path / "grid.yaml")):
        strat = make_strategy(model, "sandwich", num_random=2, sample_from=source)
        space = strat.space
        drawn = [space.format(s) for step in range(30) for s, _ in strat.subnets(step)[2:]]
        assert set(drawn) == set(grid)
        assert strat.subnets(7) == strat.subnets(7)
    # "all": every uniform subnet, so no random subnet mixes widths or bit-widths across blocks
    uniform = make_strategy(model, "random", num_random=4, sample_from="all")
    for step in range(10):
        for s, _ in uniform.subnets(step):
            assert len({(c.bits_attn, c.bits_ffn, c.bits_conv, c.ffn, c.heads) for c in s.layers}) == 1
    with pytest.raises(ValueError, match="(?s)sample_from.*L9_F24_H4_B4.*beyond"):
        make_strategy(model, "sandwich", sample_from=["L9_F24_H4_B4"])


def test_ctc_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    s = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    lens = torch.tensor([5, 3])
    want = sum(torch.nn.functional.kl_div(s[i, :n], t[i, :n], log_target=True, reduction="sum")
               for i, n in enumerate(lens.tolist())) / 2
    assert torch.allclose(ctc_kl(t, s, lens), want)
    assert ctc_kl(t, t, lens).abs().item() < 1e-6


@pytest.mark.parametrize("cfg, match", [
    ({"strategy": "bigbang"}, "strategy"),
    ({"strategy": "targets"}, "targets"),
    ({"nmu_random": 2}, "unknown supernet option"),
    ({"label_weight": 0.0, "kl_weight": 0.0}, "not both 0"),
])
def test_bad_options(cfg, match):
    with pytest.raises(ValueError, match=match):
        SupernetOptions.from_dict({"space": "x.yaml", **cfg})


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_supernet(seed=0)  # same initial weights on both ranks
        strat = make_strategy(model, "sandwich", num_random=2)
        ddp = DistributedDataParallel(model, find_unused_parameters=strat.skips_parameters)
        optim = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(2):
            batch = tiny_batch(seed=10 * rank + step)  # different data per rank
            strat.step(ddp, model, batch, use_bf16=False, loss_scale=1.0, sync_grads=True)
            optim.step()
            optim.zero_grad()
        # Parameters only: BatchNorm running stats are rank-local until DDP broadcasts them
        # from rank 0 at the next forward.
        torch.save({k: v.detach() for k, v in model.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_sandwich_step_keeps_ranks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    init = dict(tiny_supernet(seed=0).named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    changed = [k for k in a if not torch.equal(a[k], init[k])]
    assert any("encoders.3." in k for k in changed)  # the largest subnet's deep blocks trained
    assert any(".quantizer.scales.b2" in k for k in changed)  # the smallest's 2-bit scales trained
