"""Search spaces and subnet strings.

A ``SearchSpace`` lists the choices of each dimension (depth, FFN units, heads, bits),
which dimensions may differ between blocks, and optional explicit block lists per depth.
It is read from YAML (``conf/space/*.yaml``)::

    depth: [12, 9, 6]          # number of blocks
    ffn: [2048, 1024, 512]     # FFN hidden units (both FFNs of a block)
    heads: [4, 2]              # attention heads
    bits: [32, 8, 4, 2]        # weight bit-widths (32 = float)
    per_layer: [bits]          # dimensions that may differ between blocks (ffn, heads, bits)
    per_kind_bits: false       # attention / FFN / convolution may take different bit-widths
    layers:                    # optional: which blocks a depth uses (default: the first k)
      6: [0, 2, 4, 6, 8, 10]

Subnet strings (the canonical name of a subnet), ``_``-separated ``KEY VALUE`` parts in
this order::

    L<depth> _ F<ffn> _ H<heads> _ B<bits>           e.g. L12_F2048_H4_B8
    L<depth> _ F<ffn> _ H<heads> _ BA<a>_BF<f>_BC<c>  bits per module kind: attention, FFN, conv

Each value of F, H, B, BA, BF, BC is one number (every block the same) or exactly
``depth`` numbers joined by ``.``, one per used block (``L4_F1024_H4_B8.8.4.2``).  The
canonical form writes one number when all blocks agree and ``B`` when the three kinds
agree in every block; ``parse`` accepts the long forms too and ``format(parse(s))`` gives
the canonical string.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from allinone.elastic.subnet import FLOAT_BITS, KINDS, LayerChoice, SubnetConfig
from allinone.utils import read_yaml

__all__ = ["SearchSpace", "load_space", "load_grid"]

PER_LAYER_DIMS = ("ffn", "heads", "bits")
KEYS = {"L": "depth", "F": "ffn", "H": "heads", "B": "bits",
        "BA": "bits of attention", "BF": "bits of FFN", "BC": "bits of convolution"}
KIND_KEYS = {"BA": "attn", "BF": "ffn", "BC": "conv"}
_SPACE_KEYS = {"depth", "ffn", "heads", "bits", "per_layer", "per_kind_bits", "layers", "num_blocks"}


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, (list, tuple)) or not values
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)):
        raise ValueError(f"search space '{name}' must be a non-empty list of positive ints, got {values!r}")
    return tuple(sorted(set(values), reverse=True))


def _allowed(values: Iterable[int]) -> str:
    return ", ".join(map(str, values))


@dataclass(frozen=True)
class SearchSpace:
    """Choices of a supernet's subnets (see the module docstring); choices sorted largest first.

    num_blocks: blocks of the supernet (default: the largest depth); set by ``for_model``.
    """

    depth: tuple[int, ...]
    ffn: tuple[int, ...]
    heads: tuple[int, ...]
    bits: tuple[int, ...]
    per_layer: tuple[str, ...] = ()
    per_kind_bits: bool = False
    layers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    num_blocks: int | None = None

    def __post_init__(self):
        for name in ("depth", "ffn", "heads", "bits"):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        bad = [b for b in self.bits if b not in (1, 2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)]
        if bad:
            raise ValueError(f"search space bits {bad} are not bit-widths; allowed: 1..8 and 32 (float)")
        per_layer = tuple(self.per_layer or ())
        unknown = [d for d in per_layer if d not in PER_LAYER_DIMS]
        if unknown:
            raise ValueError(f"search space per_layer has {unknown}; dimensions that can vary per block: "
                             f"{', '.join(PER_LAYER_DIMS)}")
        object.__setattr__(self, "per_layer", per_layer)
        nb = self.num_blocks if self.num_blocks is not None else max(self.depth)
        if max(self.depth) > nb:
            raise ValueError(f"search space depth {max(self.depth)} is beyond the model's {nb} blocks")
        object.__setattr__(self, "num_blocks", nb)
        layers = {}
        for k, idx in (self.layers or {}).items():
            k, idx = int(k), tuple(int(i) for i in idx)
            if k not in self.depth:
                raise ValueError(f"search space 'layers' names depth {k}, which is not among depth "
                                 f"choices {_allowed(self.depth)}")
            if len(idx) != k or any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= nb:
                raise ValueError(f"search space layers[{k}] = {list(idx)} must be {k} increasing block "
                                 f"indices in 0..{nb - 1}")
            layers[k] = idx
        object.__setattr__(self, "layers", layers)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        unknown = sorted(set(d) - _SPACE_KEYS)
        if unknown:
            raise ValueError(f"unknown search space key(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPACE_KEYS))}")
        missing = [k for k in ("depth", "ffn", "heads", "bits") if k not in d]
        if missing:
            raise ValueError(f"search space lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in d})

    def to_dict(self) -> dict:
        """Plain values (JSON/YAML-safe); ``from_dict`` inverts it."""
        return {"depth": list(self.depth), "ffn": list(self.ffn), "heads": list(self.heads),
                "bits": list(self.bits), "per_layer": list(self.per_layer),
                "per_kind_bits": self.per_kind_bits,
                "layers": {k: list(v) for k, v in self.layers.items()}, "num_blocks": self.num_blocks}

    def for_model(self, model_config) -> "SearchSpace":
        """This space checked against a model config (its blocks, widths, quantizer bits).

        model_config: an ``ASRModelConfig`` or a ``Wav2Vec2Config``; anything with
        ``elastic_limits() -> (blocks, fewest FFN units of a block, fewest heads of a block,
        quantizer bit-widths)``.
        """
        nb, units, heads, quant_bits = model_config.elastic_limits()
        if max(self.depth) > nb:
            raise ValueError(f"search space depth {max(self.depth)} is beyond the model's {nb} blocks")
        if max(self.ffn) > units:
            raise ValueError(f"search space ffn {max(self.ffn)} is beyond the model's {units} FFN units")
        if max(self.heads) > heads:
            raise ValueError(f"search space heads {max(self.heads)} is beyond the model's {heads} heads")
        int_bits = [b for b in self.bits if b != FLOAT_BITS]
        have = set(quant_bits)
        missing = [b for b in int_bits if b not in have]
        if missing:
            raise ValueError(f"search space bits {missing} need quantizers: the model's quant section has "
                             f"bits {sorted(have, reverse=True) or 'none (no quant section)'}")
        return replace(self, num_blocks=nb, layers=dict(self.layers))

    # ------------------------------------------------------------------ subnets

    def layers_for_depth(self, depth: int) -> tuple[int, ...]:
        """Block indices a subnet of ``depth`` uses: the space's explicit list or the first ``depth``."""
        return self.layers.get(depth, tuple(range(depth)))

    def _subnet(self, depth: int, ffn: Sequence[int], heads: Sequence[int], bits: dict[str, Sequence[int]]):
        return SubnetConfig.per_layer(self.layers_for_depth(depth), ffn, heads, bits)

    def _uniform(self, depth: int, ffn: int, heads: int, bits: int) -> SubnetConfig:
        return SubnetConfig.uniform(self.layers_for_depth(depth), ffn, heads, bits)

    def largest(self) -> SubnetConfig:
        """Deepest, widest, highest precision."""
        return self._uniform(self.depth[0], self.ffn[0], self.heads[0], self.bits[0])

    def smallest(self) -> SubnetConfig:
        """Shallowest, narrowest, lowest precision."""
        return self._uniform(self.depth[-1], self.ffn[-1], self.heads[-1], self.bits[-1])

    def sample(self, generator: torch.Generator) -> SubnetConfig:
        """A random subnet: each choice uniform, drawn from ``generator`` (not the global RNG,
        so that every DDP rank seeded alike draws the same subnet)."""

        def pick(choices: Sequence[int]) -> int:
            return choices[int(torch.randint(len(choices), (1,), generator=generator))]

        depth = pick(self.depth)

        def values(dim: str, choices: Sequence[int]) -> list[int]:
            return [pick(choices) for _ in range(depth)] if dim in self.per_layer else [pick(choices)] * depth

        ffn, heads = values("ffn", self.ffn), values("heads", self.heads)
        if self.per_kind_bits:
            bits = {k: values("bits", self.bits) for k in KINDS}
        else:
            b = values("bits", self.bits)
            bits = {k: b for k in KINDS}
        return self._subnet(depth, ffn, heads, bits)

    def enumerate(self) -> list[SubnetConfig]:
        """Every uniform subnet (same width and precision in all blocks), largest first.

        Per-block mixtures are too many to list (4 bit-widths over 12 blocks: 4^12); use
        ``sample`` or a grid file for those.
        """
        return [self._uniform(d, f, h, b)
                for d, f, h, b in itertools.product(self.depth, self.ffn, self.heads, self.bits)]

    # ------------------------------------------------------------------ strings

    def parse(self, text: str) -> SubnetConfig:
        """Subnet string -> ``SubnetConfig``; ``ValueError`` says what is wrong and what is allowed."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty subnet string; expected e.g. {self.format(self.largest())}")
        text = text.strip()
        parts: dict[str, list[int]] = {}
        for part in text.split("_"):
            m = re.fullmatch(r"([A-Za-z]+)(.*)", part)
            key = m.group(1) if m else part
            if key not in KEYS:
                raise ValueError(f"subnet {text!r}: unknown key {key!r}; keys are "
                                 + ", ".join(f"{k} ({v})" for k, v in KEYS.items()))
            if key in parts:
                raise ValueError(f"subnet {text!r}: key {key} is given twice")
            if not re.fullmatch(r"\d+(\.\d+)*", m.group(2)):
                raise ValueError(f"subnet {text!r}: {key} needs a number or '.'-separated numbers, "
                                 f"got {m.group(2)!r}")
            parts[key] = [int(v) for v in m.group(2).split(".")]
        kind_keys = [k for k in KIND_KEYS if k in parts]
        if "B" in parts and kind_keys:
            raise ValueError(f"subnet {text!r}: give either B (all module kinds) or BA, BF and BC, not both")
        if kind_keys and len(kind_keys) != 3:
            raise ValueError(f"subnet {text!r}: per-kind bits need all of BA, BF and BC; got {', '.join(kind_keys)}")
        missing = [k for k in ("L", "F", "H") if k not in parts] + ([] if kind_keys or "B" in parts else ["B"])
        if missing:
            raise ValueError(f"subnet {text!r} lacks {', '.join(missing)}; "
                             f"a full subnet string looks like {self.format(self.largest())}")

        if len(parts["L"]) != 1:
            raise ValueError(f"subnet {text!r}: L takes one number (the depth)")
        depth = parts["L"][0]
        if depth > self.num_blocks:
            raise ValueError(f"subnet {text!r}: depth {depth} is beyond the model's {self.num_blocks} blocks; "
                             f"allowed depths: {_allowed(self.depth)}")
        if depth not in self.depth:
            raise ValueError(f"subnet {text!r}: depth {depth} is not in the space; allowed: {_allowed(self.depth)}")

        def per_block(key: str, dim: str, choices: Sequence[int]) -> list[int]:
            vals = parts[key]
            if len(vals) not in (1, depth):
                raise ValueError(f"subnet {text!r}: {key} has {len(vals)} per-layer values but depth is {depth}; "
                                 f"give one value or {depth} '.'-separated values")
            if len(set(vals)) > 1 and dim not in self.per_layer:
                raise ValueError(f"subnet {text!r}: {key} differs between layers, but this space allows "
                                 f"per-layer values only for: {', '.join(self.per_layer) or 'nothing'}")
            bad = [v for v in vals if v not in choices]
            if bad:
                what = "bit-width" if dim == "bits" else "value"
                raise ValueError(f"subnet {text!r}: {key} {what} {bad[0]} is not in the space; "
                                 f"allowed: {_allowed(choices)}")
            return vals * depth if len(vals) == 1 else vals

        ffn = per_block("F", "ffn", self.ffn)
        heads = per_block("H", "heads", self.heads)
        if kind_keys:
            bits = {kind: per_block(key, "bits", self.bits) for key, kind in KIND_KEYS.items()}
            if not self.per_kind_bits and any(len({bits[k][j] for k in KINDS}) > 1 for j in range(depth)):
                raise ValueError(f"subnet {text!r}: attention, FFN and convolution bits differ, but this space "
                                 "has per_kind_bits: false; use one B value")
        else:
            b = per_block("B", "bits", self.bits)
            bits = {k: b for k in KINDS}
        return self._subnet(depth, ffn, heads, bits)

    def format(self, subnet: SubnetConfig) -> str:
        """``SubnetConfig`` -> canonical string; ``ValueError`` if the subnet is not in this space."""
        depth = subnet.depth
        if depth not in self.depth:
            raise ValueError(f"subnet depth {depth} is not in the space; allowed: {_allowed(self.depth)}")
        if subnet.layer_indices != self.layers_for_depth(depth):
            raise ValueError(f"subnet uses blocks {list(subnet.layer_indices)}, but depth {depth} of this space "
                             f"uses blocks {list(self.layers_for_depth(depth))}")

        def value(key: str, dim: str, vals: list[int], choices: Sequence[int]) -> str:
            bad = [v for v in vals if v not in choices]
            if bad:
                raise ValueError(f"subnet {key} value {bad[0]} is not in the space; allowed: {_allowed(choices)}")
            if len(set(vals)) == 1:
                return f"{key}{vals[0]}"
            if dim not in self.per_layer:
                raise ValueError(f"subnet {key} differs between layers, but this space allows per-layer values "
                                 f"only for: {', '.join(self.per_layer) or 'nothing'}")
            return key + ".".join(map(str, vals))

        out = [f"L{depth}",
               value("F", "ffn", [c.ffn for c in subnet.layers], self.ffn),
               value("H", "heads", [c.heads for c in subnet.layers], self.heads)]
        bits = {k: [c.bits(k) for c in subnet.layers] for k in KINDS}
        if bits["attn"] == bits["ffn"] == bits["conv"]:
            out.append(value("B", "bits", bits["attn"], self.bits))
        else:
            if not self.per_kind_bits:
                raise ValueError("subnet bits differ between module kinds, but this space has per_kind_bits: false")
            out += [value(key, "bits", bits[kind], self.bits) for key, kind in KIND_KEYS.items()]
        return "_".join(out)

    def canonical(self, text: str) -> str:
        return self.format(self.parse(text))


def load_space(source: str | os.PathLike | dict | SearchSpace) -> SearchSpace:
    """A ``SearchSpace`` from a YAML file path, a dict, or a space (returned as is)."""
    if isinstance(source, SearchSpace):
        return source
    if isinstance(source, dict):
        return SearchSpace.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"search space file not found: {path}")
    d = read_yaml(path, "search space file")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a search space is a YAML mapping (depth, ffn, heads, bits, ...)")
    try:
        return SearchSpace.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_grid(source: str | os.PathLike | list | dict, space: SearchSpace) -> list[SubnetConfig]:
    """Subnets listed in a grid (a YAML file, or its parsed content).

    A grid is either a list whose items are subnet strings or mappings of single choices
    (``{depth: 6, ffn: 1024, heads: 4, bits: 8}``, missing keys = the largest choice), or a
    mapping of choice lists (``{depth: [12, 6], bits: [8, 4]}``) meaning every uniform
    combination (missing keys = every choice of the space).  Duplicates are dropped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"grid file not found: {path}")
        source = read_yaml(path, "grid file")
    dims = ("depth", "ffn", "heads", "bits")
    if isinstance(source, dict):
        unknown = sorted(set(source) - set(dims))
        if unknown:
            raise ValueError(f"grid has unknown key(s) {', '.join(unknown)}; keys: {', '.join(dims)}")
        choices = [_int_tuple(d, source[d]) if d in source else getattr(space, d) for d in dims]
        items: list[Any] = [dict(zip(dims, c)) for c in itertools.product(*choices)]
    elif isinstance(source, list):
        items = source
    else:
        raise ValueError("a grid is a YAML list of subnet strings / choices, or a mapping of choice lists")
    subnets: list[SubnetConfig] = []
    for item in items:
        if isinstance(item, str):
            s = space.parse(item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(dims))
            if unknown:
                raise ValueError(f"grid entry {item} has unknown key(s) {', '.join(unknown)}; keys: {', '.join(dims)}")
            d, f, h, b = (int(item.get(k, getattr(space, k)[0])) for k in dims)
            s = space.parse(f"L{d}_F{f}_H{h}_B{b}")  # validated like a string
        else:
            raise ValueError(f"grid entry {item!r} is neither a subnet string nor a mapping of choices")
        if s not in subnets:
            subnets.append(s)
    return subnets
