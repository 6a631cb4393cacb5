"""Search spaces and subnet strings: round trips, sampling, grids, and the errors users see."""

from __future__ import annotations

import pytest
import torch
import yaml

from allinone.elastic.space import SearchSpace, load_grid, load_space
from allinone.elastic.subnet import KINDS, SubnetConfig

from supernet_helpers import tiny_space

DEFAULT = {"depth": [12, 9, 6], "ffn": [2048, 1024, 512], "heads": [4, 2], "bits": [32, 8, 4, 2],
           "per_layer": ["bits", "ffn"], "per_kind_bits": True, "layers": {6: [0, 2, 4, 6, 8, 10]}}


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_dict(DEFAULT)


@pytest.mark.parametrize("text", [
    "L12_F2048_H4_B32",
    "L12_F2048_H4_B8",
    "L9_F1024_H2_B4",
    "L6_F512_H4_B2",
    "L6_F1024_H4_B8.8.4.4.2.2",
    "L6_F2048.1024.512.512.1024.2048_H2_B32.8.4.2.8.4",
    "L9_F1024_H4_BA8_BF4_BC8",
    "L6_F512_H4_BA8.8.8.4.4.4_BF4_BC2.2.2.2.2.32",
])
def test_parse_format_round_trip(space, text):
    subnet = space.parse(text)
    assert space.format(subnet) == text
    assert space.parse(space.format(subnet)) == subnet


def test_parse_values(space):
    s = space.parse("L6_F1024_H4_B8.8.4.4.2.2")
    assert s.layer_indices == (0, 2, 4, 6, 8, 10)  # explicit layers of depth 6
    assert [c.ffn for c in s.layers] == [1024] * 6 and [c.heads for c in s.layers] == [4] * 6
    assert [c.bits_ffn for c in s.layers] == [8, 8, 4, 4, 2, 2]
    assert all(c.bits_attn == c.bits_ffn == c.bits_conv for c in s.layers)
    s = space.parse("L9_F1024_H4_BA8_BF4_BC2")
    assert s.layer_indices == tuple(range(9))  # default: the first k blocks
    assert {(c.bits_attn, c.bits_ffn, c.bits_conv) for c in s.layers} == {(8, 4, 2)}


@pytest.mark.parametrize("text, canonical", [
    ("L12_F2048.2048.2048.2048.2048.2048.2048.2048.2048.2048.2048.2048_H4_B8", "L12_F2048_H4_B8"),
    ("L9_F1024_H4_BA8_BF8_BC8", "L9_F1024_H4_B8"),
    (" L6_F512_H2_B4 ", "L6_F512_H2_B4"),
])
def test_long_forms_become_canonical(space, text, canonical):
    assert space.canonical(text) == canonical


@pytest.mark.parametrize("text, match", [
    ("L12_F2048_H4_X8", r"unknown key 'X'.*L \(depth\).*BA"),
    ("L12_F2048_H4_B8_L12", "given twice"),
    ("L12_F2048_H4", "lacks B"),
    ("F2048_H4_B8", "lacks L"),
    ("L12_F2048_H4_B8_BA8_BF8_BC8", "either B"),
    ("L12_F2048_H4_BA8_BF8", "all of BA, BF and BC"),
    ("L16_F2048_H4_B8", r"depth 16 is beyond the model's 12 blocks; allowed depths: 12, 9, 6"),
    ("L7_F2048_H4_B8", r"depth 7 is not in the space; allowed: 12, 9, 6"),
    ("L12_F1000_H4_B8", r"F value 1000 is not in the space; allowed: 2048, 1024, 512"),
    ("L12_F2048_H3_B8", r"H value 3 is not in the space; allowed: 4, 2"),
    ("L12_F2048_H4_B3", r"B bit-width 3 is not in the space; allowed: 32, 8, 4, 2"),
    ("L12_F2048_H4_B16", r"bit-width 16 is not in the space"),
    ("L6_F1024_H4_B8.8.4", r"B has 3 per-layer values but depth is 6; give one value or 6"),
    ("L6_F1024_H4.2.4.2.4.2_B8", r"H differs between layers.*only for: bits, ffn"),
    ("L6_F1024_H4_B8x", r"B needs a number"),
    ("L6.9_F1024_H4_B8", r"L takes one number"),
    ("", "empty subnet string"),
])
def test_invalid_strings(space, text, match):
    with pytest.raises(ValueError, match=match):
        space.parse(text)


def test_space_rules_are_enforced():
    uniform = SearchSpace(depth=[4, 2], ffn=[8, 4], heads=[2, 1], bits=[32, 8, 4])
    with pytest.raises(ValueError, match="only for: nothing"):
        uniform.parse("L2_F8_H2_B8.4")
    with pytest.raises(ValueError, match="per_kind_bits: false"):
        uniform.parse("L2_F8_H2_BA8_BF4_BC8")
    with pytest.raises(ValueError, match="per_kind_bits: false"):
        uniform.format(SubnetConfig.uniform(2, 8, 2, {"attn": 8, "ffn": 4, "conv": 8}))
    with pytest.raises(ValueError, match="uses blocks"):
        uniform.format(SubnetConfig.uniform([0, 3], 8, 2, 8))


@pytest.mark.parametrize("bad, match", [
    ({"depth": [12, 6], "ffn": [8], "heads": [2], "bits": [32, 3.5]}, "positive ints"),
    ({"depth": [12], "ffn": [8], "heads": [2], "bits": [16]}, "not bit-widths"),
    ({"depth": [12], "ffn": [8], "heads": [2], "bits": [8], "per_layer": ["depth"]}, "can vary per block"),
    ({"depth": [12], "ffn": [8], "heads": [2], "bits": [8], "layerz": {}}, "unknown search space key"),
    ({"depth": [12], "ffn": [8], "heads": [2]}, "lacks bits"),
    ({"depth": [12, 6], "ffn": [8], "heads": [2], "bits": [8], "layers": {6: [0, 1, 2]}}, "6 increasing"),
    ({"depth": [12, 6], "ffn": [8], "heads": [2], "bits": [8], "layers": {5: [0, 1, 2, 3, 4]}}, "not among"),
])
def test_invalid_space(bad, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(bad)


def test_space_yaml_and_dict_round_trip(tmp_path, space):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(DEFAULT))
    loaded = load_space(path)
    assert loaded == space
    # JSON turns integer keys into strings; from_dict accepts both.
    import json
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_shipped_spaces_load():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parent.parent.glob("conf/space/*.yaml")):
        sp = load_space(path)
        assert sp.format(sp.largest()).startswith("L12_F2048_H4_B32")


def test_for_model_checks_the_model():
    from allinone.elastic.quant import QuantConfig
    from allinone.models import ASRModelConfig

    from supernet_helpers import tiny_encoder

    cfg = ASRModelConfig(encoder=tiny_encoder(), vocab_size=12, quant=QuantConfig(bits=[8, 4]))
    with pytest.raises(ValueError, match=r"bits \[2\] need quantizers.*8, 4"):
        tiny_space().for_model(cfg)
    with pytest.raises(ValueError, match="beyond the model's 4 blocks"):
        tiny_space(depth=[6, 2], num_blocks=6).for_model(cfg)
    with pytest.raises(ValueError, match="beyond the model's 48 FFN units"):
        tiny_space(ffn=[64], bits=[32, 8]).for_model(cfg)
    float_cfg = ASRModelConfig(encoder=tiny_encoder(), vocab_size=12)
    with pytest.raises(ValueError, match="no quant section"):
        tiny_space().for_model(float_cfg)
    assert tiny_space(bits=[32]).for_model(float_cfg).num_blocks == 4


def test_largest_smallest_enumerate(space):
    assert space.format(space.largest()) == "L12_F2048_H4_B32"
    assert space.format(space.smallest()) == "L6_F512_H2_B2"
    grid = space.enumerate()
    assert len(grid) == 3 * 3 * 2 * 4
    assert grid[0] == space.largest() and grid[-1] == space.smallest()
    assert len({space.format(s) for s in grid}) == len(grid)


def test_sample_is_seeded_and_in_space(space):
    draws = [space.sample(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same subnet: every DDP rank agrees
    g = torch.Generator().manual_seed(0)
    seen_mixed = False
    for _ in range(50):
        s = space.sample(g)
        assert space.parse(space.format(s)) == s
        assert len({c.heads for c in s.layers}) == 1  # heads are not per-layer in this space
        seen_mixed |= any(len({c.bits(k) for c in s.layers}) > 1 for k in KINDS)
    assert seen_mixed


def test_grid_files(tmp_path, space):
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump(["L12_F2048_H4_B8", {"depth": 6, "bits": 4}, "L12_F2048_H4_B8"]))
    got = [space.format(s) for s in load_grid(listed, space)]
    assert got == ["L12_F2048_H4_B8", "L6_F2048_H4_B4"]  # duplicates dropped, missing keys = largest
    product = tmp_path / "grid.yaml"
    product.write_text(yaml.safe_dump({"depth": [12, 6], "ffn": [1024], "bits": [8, 2]}))
    got = [space.format(s) for s in load_grid(product, space)]
    assert len(got) == 2 * 1 * 2 * 2  # heads: every choice of the space
    assert "L6_F1024_H2_B2" in got
    with pytest.raises(ValueError, match="unknown key"):
        load_grid({"depht": [12]}, space)
    with pytest.raises(ValueError, match="not in the space"):
        load_grid(["L12_F2048_H4_B3"], space)
