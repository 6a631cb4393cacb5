"""``allinone search``: sizes without extraction, search == exhaustive, budgets and errors."""

from __future__ import annotations

import pytest

from allinone.cli import main
from allinone.elastic.extract import extract, extracted_size
from allinone.elastic.space import SearchSpace
from allinone.eval.search import (Budget, ProxyEvaluator, SearchOptions, _sample_batches, all_subnets,
                                  count_subnets, run_search, search_subnet, subnet_size, weight_bits)
from allinone.models.saved import load_model_dir

from bench_helpers import SMALL_SPACE, make_digits, make_supernet_dir
from supernet_helpers import tiny_space, tiny_supernet

MIB = 2 ** 20


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    dev = make_digits(data_root, root / "dev", num_utts=4, seed=2)
    model = make_supernet_dir(root / "sup" / "final")
    loaded = load_model_dir(model)
    batches, refs, feats = _sample_batches(dev, loaded, 4, 0, 1)
    # One evaluator (its score cache) for the hand-made answer and the searches: the proxy is
    # deterministic, and what is tested here is which subnets the search picks.
    proxy = ProxyEvaluator(loaded.model, loaded.model.search_space, batches, refs, loaded.tokenizer)
    return {"model": model, "dev": dev, "loaded": loaded, "batches": batches, "refs": refs, "root": root,
            "proxy": proxy}


@pytest.mark.parametrize("s", ["L4_F48_H4_B32", "L4_F48_H4_B8", "L2_F24.48_H4_BA8.2_BF4_BC2",
                               "L2_F48_H2.4_B32.2", "L4_F24_H2_B4"])
def test_subnet_size_equals_extracted(s):
    model = tiny_supernet(seed=1)
    space = tiny_space().for_model(model.config)
    sub = space.parse(s)
    got, want = subnet_size(model, sub), extracted_size(*extract(model, sub))
    assert (got.total_params, got.packed_bytes, got.fp32_bytes, got.code_bytes, got.scale_bytes) == \
           (want.total_params, want.packed_bytes, want.fp32_bytes, want.code_bytes, want.scale_bytes)


def test_weight_bits_and_counts():
    model = tiny_supernet(seed=1)
    space = tiny_space().for_model(model.config)
    assert weight_bits(subnet_size(model, space.parse("L4_F48_H4_B8"))) == 8.0
    assert weight_bits(subnet_size(model, space.parse("L4_F48_H4_B32"))) == 32.0
    mixed = weight_bits(subnet_size(model, space.parse("L2_F48_H4_BA8_BF2_BC32")))
    assert 2.0 < mixed < 32.0
    small = SearchSpace(depth=[2, 1], ffn=[48, 24], heads=[4], bits=[8, 2], per_layer=["bits"], num_blocks=4)
    subs = all_subnets(small)
    assert count_subnets(small) == len(subs) == 2 * (2 ** 2 + 2 ** 1) and len(set(subs)) == len(subs)
    assert all(small.format(s) for s in subs)  # every one is a member of the space
    assert count_subnets(SearchSpace(**SMALL_SPACE)) == 24


@pytest.fixture(scope="module")
def want(setup):
    """(proxy score, packed bytes, subnet) of the best subnet of at most 0.13 MiB, found by hand."""
    return _exhaustive_best(setup, 0.13 * MIB)


def _exhaustive_best(setup, budget_bytes: float):
    """Reference answer: score every subnet of the space that fits, by hand."""
    model, proxy = setup["loaded"].model, setup["proxy"]
    scored = []
    for s in model.search_space.enumerate():  # SMALL_SPACE has no per-block choices: these are all
        size = extracted_size(*extract(model, s)).packed_bytes
        if size <= budget_bytes:
            scored.append((proxy(s), size, model.search_space.format(s)))
    return min(scored)


@pytest.mark.parametrize("strategy", ["auto", "evolution"])
def test_search_equals_exhaustive(setup, want, strategy):
    model = setup["loaded"].model
    budget = Budget(max_mb=0.13)
    proxy = setup["proxy"]
    opts = SearchOptions(strategy=strategy, population=8, generations=8, seed=3)
    res = search_subnet(model, model.search_space, budget, proxy, opts)
    assert res.strategy == ("exhaustive" if strategy == "auto" else "evolution")
    assert (res.best.score, res.best.packed_bytes, res.best.subnet) == want
    assert all(c.packed_bytes <= 0.13 * MIB for c in res.evaluated)


def test_budgets_hold(setup):
    model = setup["loaded"].model
    res = search_subnet(model, model.search_space, Budget(max_bits=8, max_params=60_000), setup["proxy"],
                        SearchOptions())
    assert res.evaluated and all(c.bits <= 8 and c.params <= 60_000 for c in res.evaluated)
    assert len(res.evaluated) == 10  # 4 depth-2 systems and L4_F24_H2 (58,272 params), at 8 and 2 bits
    grid = [model.search_space.parse(s) for s in ("L2_F24_H2_B32", "L4_F48_H4_B32")]
    proxy = ProxyEvaluator(model, model.search_space, setup["batches"], setup["refs"], setup["loaded"].tokenizer,
                           proxy="wer")
    res = search_subnet(model, model.search_space, Budget(max_latency_ms=1e6), proxy, SearchOptions(),
                        candidates=grid, latency_feats=[setup["batches"][0]["feats"][0, :50]])
    assert all(c.latency_ms > 0 for c in res.evaluated) and res.proxy == "wer"
    assert all(0 <= c.score for c in res.evaluated)
    with pytest.raises(ValueError, match="give a budget"):
        Budget()


def test_cli_search_and_extract(setup, want, tmp_path, capsys):
    out = tmp_path / "best"
    rc = main(["search", str(setup["model"]), "--max-mb", "0.13", "--data", str(setup["dev"]),
               "--sample", "4", "--num-workers", "1", "--extract-to", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    lines = text.splitlines()
    assert "exhaustive search" in lines[0] and lines[1] == want[2]
    assert f"packed {want[1] / MIB:.3f} MiB" in lines[2] and f"proxy {want[0]:.4f}" in lines[2]
    assert load_model_dir(out).info["subnet"] == want[2]


def test_infeasible_budget(setup, capsys):
    rc = main(["search", str(setup["model"]), "--max-mb", "0.01", "--data", str(setup["dev"]),
               "--sample", "2", "--num-workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no subnet fits the budget (packed size <= 0.01 MiB)" in err
    assert "L2_F24_H2_B2" in err  # the smallest candidate and its size are named
    with pytest.raises(ValueError, match="no subnet fits"):
        run_search(setup["model"], Budget(max_params=1000), setup["dev"],
                   SearchOptions(sample=2, strategy="evolution", num_workers=1), progress=False)
