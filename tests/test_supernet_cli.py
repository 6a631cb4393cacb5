"""A saved supernet loads through load_model_dir; ``allinone extract`` writes standalone models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from allinone.cli import main
from allinone.data.features import FbankConfig
from allinone.data.tokenizer import CharTokenizer
from allinone.models.saved import FLOAT_WEIGHTS, PACKED_WEIGHTS, load_model_dir, save_model_dir

from supernet_helpers import tiny_batch, tiny_space, tiny_supernet


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory):
    model = tiny_supernet(seed=5).eval()
    model.search_space = tiny_space().for_model(model.config)
    tok = CharTokenizer(["<blank>", "<unk>"] + list("abcdefghi") + ["<sos/eos>"])
    out = tmp_path_factory.mktemp("sup") / "final"
    save_model_dir(out, model, FbankConfig(n_mels=40), tok)
    return out, model


def test_supernet_dir_round_trip(supernet_dir):
    path, model = supernet_dir
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model"]["quant"]["bits"] == [8, 4, 2] and cfg["search_space"]["depth"] == [4, 2]
    loaded = load_model_dir(path)
    assert loaded.model.search_space == model.search_space
    b = tiny_batch()
    sub = model.search_space.parse("L2_F24_H2_B4")
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(b["feats"], b["feat_lens"], sub)[0],
                           model.encode(b["feats"], b["feat_lens"], sub)[0])


def test_extract_one_and_many(supernet_dir, tmp_path, capsys):
    path, model = supernet_dir
    assert main(["extract", str(path), "--subnet", "L2_F24_H2_B4", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / PACKED_WEIGHTS).is_file() and not (tmp_path / "one" / FLOAT_WEIGHTS).exists()
    assert "L2_F24_H2_B4:" in capsys.readouterr().out

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(["L4_F48_H4_B8", "L2_F24.48_H4_BA8.2_BF4_BC2"]))
    rc = main(["extract", str(path), "--subnet", "L4_F48_H4_B32", str(grid), "--out", str(tmp_path / "many")])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert names == sorted(["L4_F48_H4_B32", "L4_F48_H4_B8", "L2_F24.48_H4_BA8.2_BF4_BC2"])
    b = tiny_batch(seed=3)
    for name in names:
        loaded = load_model_dir(tmp_path / "many" / name)
        assert loaded.info["subnet"] == name and loaded.model.config.quant is None
        with torch.no_grad():
            want = model.encode(b["feats"], b["feat_lens"], model.search_space.parse(name))[0]
            got = loaded.model.encode(b["feats"], b["feat_lens"])[0]
        assert (got - want).abs().max().item() <= 1e-5


def test_extract_errors(supernet_dir, tmp_path, capsys):
    path, _ = supernet_dir
    assert main(["extract", str(path), "--subnet", "L3_F24_H2_B4", "--out", str(tmp_path / "x")]) == 2
    assert "depth 3 is not in the space; allowed: 4, 2" in capsys.readouterr().err
    assert main(["extract", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to extract" in capsys.readouterr().err
