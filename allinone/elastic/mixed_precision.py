"""One-stage mixed precision: per-layer bit-widths learned together with the quantized weights.

Method (docs/mixed_precision.md; ../shared/docs/method.md section 1, second result):

- Every quantizable weight belongs to a *group* (``granularity``): ``layer`` = one block's
  module kind (``attn`` / ``ffn`` / ``conv`` of block i, the finest precision a subnet
  string can express), ``block`` = all kinds of one block, ``kind`` = one module kind
  across the model.  Blocks are a Conformer's ``encoder.encoders.<i>`` or a wav2vec2 /
  HuBERT model's ``encoder.transformer.layers.<i>`` (``BLOCK_PREFIXES``); only the kinds
  the model's blocks have form cells (``model_kinds``: a wav2vec2 layer has no ``conv``,
  and its subnet strings give that absent kind the block's highest bit-width, so a
  uniform block reads ``B8``).  A wav2vec2 feature extractor quantized at a fixed
  ``extractor_bits`` is not searched (it is in no cell).  Each group has architecture
  logits over candidate bit-widths (default 8, 4, 2).
- The candidates share the latent float weight and the per-bit-width scales of the
  layer's ``MultiPrecisionQuantizer`` (or ``NestedQuantizer``).  Each step draws
  ``p = gumbel_softmax(logits, tau)`` per group (temperature annealed, ``temperature``)
  and the layer computes with ``sum_b p_b * fake_quant_b(w)``; with ``hard`` the forward
  uses the one-hot sample and the backward the soft one (straight-through).
- Expected size: ``sum_g sum_b softmax(logits_g)_b * b * numel_g / sum_g numel_g`` bits
  per weight; a penalty pulls it towards ``target_bits``.  With ``size_of: sample`` the
  penalty is on the same sum over this step's Gumbel-softmax sample instead, which also
  penalises undecided groups (see ``MixedPrecisionSearch.size_penalty``).
- At the end each group keeps its argmax bit-width (``final_allocation``), optionally
  lowered greedily until the average fits the target; the result is an ordinary
  ``SubnetConfig`` with a subnet string, extractable with ``allinone.elastic.extract``.

How the mixture enters the model without touching its forward code: the search subnet
(``mixed_subnet``) gives every quantizable layer the bit-width ``MIXED_BITS`` (0), so
``allinone.elastic.slicing.subnet_weight`` calls ``layer.quantizer(weight, 0)``; ``attach_mixed_precision``
switched each quantizer's class to a subclass (``_BitMixture``) whose forward answers 0
with the mixture of its group's current probabilities and every other bit-width as
before.  (Reassigning ``__class__`` keeps every Parameter and state-dict key; it is what
``torch.nn.utils.parametrize`` does too.)  ``detach_mixed_precision`` undoes it, so the
saved model is a plain supernet.

The logits are Parameters of the model (``model.bit_search.logits.<group>``), so the
trainer's optimizer (AdamW, one learning rate) updates them.  To give them their own
learning rate without a separate optimizer, the stored Parameter is ``raw`` and the
logits are ``raw * logit_scale`` with ``logit_scale = logit_lr / optim.lr``: Adam's step
is invariant to the gradient's scale, so ``raw`` moves by about ``optim.lr`` per step
and the logits by about ``logit_lr`` (the trainer's warmup / decay applies to both).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allinone.elastic.mixed_budget import allocate_knapsack, average_bits
from allinone.elastic.quant import quantizable_layers
from allinone.elastic.subnet import FLOAT_BITS, KINDS, LayerChoice, SubnetConfig
from allinone.quant.quantizer import MultiPrecisionQuantizer, NestedQuantizer, fake_quant_mixture
from allinone.utils import atomic_open

__all__ = [
    "MIXED_BITS", "GRANULARITIES", "ALLOCATION_FILE", "TIMING_FILE", "BLOCK_PREFIXES",
    "temperature", "gumbel_softmax", "group_cells", "cell_numel", "weight_cell", "model_kinds",
    "MixedPrecisionSearch", "attach_mixed_precision", "detach_mixed_precision",
    "mixed_subnet", "subnet_with_bits", "subnet_cells", "final_allocation",
    "allocation_average_bits", "allocation_report", "allocation_space",
    "write_allocation", "read_allocation", "write_timing", "add_to_space", "parse_into_space",
    "check_space_expresses",
]

# The bit-width that means "the mixture of my group's candidates" in a search subnet.
MIXED_BITS = 0
GRANULARITIES = ("layer", "block", "kind")
ALLOCATION_FILE = "allocation.json"
TIMING_FILE = "timing.json"

Cell = tuple[int, str]  # (block index, module kind): the unit a subnet string can give bits to


# --------------------------------------------------------------------------- sampling


def temperature(step: int, tau0: float, tau_min: float, anneal_steps: int) -> float:
    """Exponential annealing: ``tau0`` at step 0, ``tau_min`` at ``anneal_steps``, then constant.

    ``tau(s) = tau0 * (tau_min / tau0) ** (s / anneal_steps)``; ``anneal_steps <= 0`` keeps
    ``tau_min`` from the start.
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(tau_min)
    return float(tau0 * (tau_min / tau0) ** (step / anneal_steps))


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gumbel-softmax sample over the last dimension.

    logits: [..., n]; returns [..., n] summing to 1.  ``softmax((logits + g) / tau)`` with
    ``g = -log(-log(u))``, ``u ~ U(0, 1)`` drawn from ``generator`` (on the CPU, then moved,
    so that every DDP rank seeded alike draws the same sample).  ``hard``: the forward
    value is the one-hot argmax, the gradient that of the soft sample (straight-through).
    """
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    g = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12))).to(logits.device, logits.dtype)
    soft = F.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft.dtype)
    return one_hot - soft.detach() + soft


# --------------------------------------------------------------------------- groups


def subnet_cells(subnet: SubnetConfig, kinds: Sequence[str] = KINDS) -> list[Cell]:
    """Every (block, kind) cell of ``subnet``, blocks in order, kinds in ``KINDS`` order
    (only ``kinds``: those the model's blocks have, ``model_kinds``)."""
    return [(c.index, k) for c in subnet.layers for k in KINDS if k in kinds]


def group_cells(template: SubnetConfig, granularity: str, kinds: Sequence[str] = KINDS) -> dict[str, list[Cell]]:
    """Groups of (block, kind) cells that share one bit-width, in a fixed order.

    Names (also the logits' keys): ``layer`` -> ``b3_ffn``; ``block`` -> ``b3``;
    ``kind`` -> ``ffn``.  kinds: the module kinds the model's blocks have (``model_kinds``;
    default all of ``KINDS``, a Conformer's).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {', '.join(GRANULARITIES)} "
                         "(layer = a block's module kind, block = all kinds of a block, "
                         "kind = a module kind across the model)")
    groups: dict[str, list[Cell]] = {}
    for block, kind in subnet_cells(template, kinds):
        name = {"layer": f"b{block}_{kind}", "block": f"b{block}", "kind": kind}[granularity]
        groups.setdefault(name, []).append((block, kind))
    return groups


# State-dict prefixes of the elastic blocks: Conformer blocks, wav2vec2 / HuBERT transformer layers.
BLOCK_PREFIXES = ("encoder.encoders.", "encoder.transformer.layers.")
_BLOCK_RE = re.compile("^(?:" + "|".join(re.escape(p) for p in BLOCK_PREFIXES) + r")(\d+)\.")


def weight_cell(name: str, kind: str) -> Cell | None:
    """(block, kind) of a quantizable weight, from its name ``encoder.encoders.<i>. ...`` or
    ``encoder.transformer.layers.<i>. ...``; None for a weight outside the blocks (a wav2vec2
    feature extractor at its fixed bit-width)."""
    m = _BLOCK_RE.match(name)
    return None if m is None else (int(m.group(1)), kind)


def model_kinds(model) -> tuple[str, ...]:
    """The module kinds (of ``KINDS``) that the quantizable weights of ``model``'s blocks have:
    all three for a Conformer, ``attn`` and ``ffn`` for a wav2vec2 / HuBERT model."""
    present = {kind for name, _, kind in quantizable_layers(model) if weight_cell(name, kind) is not None}
    return tuple(k for k in KINDS if k in present)


def _subnet_model(model, subnet: SubnetConfig):
    """The model ``extract(model, subnet)`` gives, built on the meta device (shapes only)."""
    from allinone.elastic.extract import subnet_model_config

    with torch.device("meta"):
        return type(model)(subnet_model_config(model.config, subnet))


def cell_numel(model, template: SubnetConfig) -> dict[Cell, int]:
    """Quantized weights per (block, kind) cell of ``template`` as the subnet slices them.

    Counted on the extracted model's config (built on the meta device: shapes only), so
    it is exactly what ``extract`` will quantize.  Works for any model class whose
    ``type(model)(config)`` builds it (``ASRModel``, ``Wav2Vec2CTCModel``).
    """
    small = _subnet_model(model, template)
    counts: dict[Cell, int] = {}
    for name, layer, kind in quantizable_layers(small):
        cell = weight_cell(name, kind)
        if cell is None:
            continue  # outside the blocks (the extracted config keeps no quantized extractor anyway)
        j = cell[0]  # block j of the extracted model = the j-th used block
        cell = (template.layers[j].index, kind)
        counts[cell] = counts.get(cell, 0) + layer.weight.numel()
    return counts


def fixed_quantized(model) -> dict[str, tuple[int, int]]:
    """Quantized weights outside the blocks, at a bit-width no subnet chooses: weight name ->
    (bits, numel).  A wav2vec2 feature extractor with ``extractor_bits`` < 32; else empty."""
    bits = getattr(model.config, "extractor_bits", FLOAT_BITS)
    if bits == FLOAT_BITS:
        return {}
    return {name: (bits, layer.weight.numel()) for name, layer, kind in quantizable_layers(model)
            if weight_cell(name, kind) is None}


def subnet_with_bits(template: SubnetConfig, bits: Mapping[Cell, int], default: int = FLOAT_BITS,
                     kinds: Sequence[str] = KINDS) -> SubnetConfig:
    """``template``'s blocks and widths with the given per-cell bit-widths (others ``default``).

    kinds: the module kinds the model's blocks have; a kind they lack (a wav2vec2 layer's
    ``conv``) gets the block's highest bit-width among ``kinds``, which changes nothing it
    computes and keeps subnet strings short (``B8``, not ``BA8_BF8_BC32``).
    """
    layers = []
    for c in template.layers:
        b = {k: int(bits.get((c.index, k), default)) for k in KINDS if k in kinds}
        fill = max(b.values()) if b else default
        b = {k: b.get(k, fill) for k in KINDS}
        layers.append(LayerChoice(c.index, c.ffn, c.heads, b["attn"], b["ffn"], b["conv"]))
    return SubnetConfig(tuple(layers))


def mixed_subnet(template: SubnetConfig) -> SubnetConfig:
    """``template`` with every cell at ``MIXED_BITS``: the subnet the search trains."""
    return subnet_with_bits(template, {}, default=MIXED_BITS)


# --------------------------------------------------------------------------- quantizer mixture


class _BitMixture:
    """Mixin: ``forward(weight, MIXED_BITS)`` = ``sum_b p_b * fake_quant_b(weight)``.

    ``mix_bits`` (the candidates) and ``mix_probs`` ([len(mix_bits)], set each step by
    ``MixedPrecisionSearch.sample``) are plain attributes, not state.  Any other
    bit-width is the base quantizer's.
    """

    mix_bits: tuple[int, ...] = ()
    mix_probs: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        if bits != MIXED_BITS:
            return super().forward(weight, bits)
        if self.mix_probs is None:
            raise RuntimeError("mixed-precision search: no sample drawn; call MixedPrecisionSearch.sample first")
        return self.mixture(weight)

    def mixture(self, weight: torch.Tensor) -> torch.Tensor:
        """The mixture as a loop over the candidates (each through the base quantizer)."""
        out = 0
        for p, b in zip(self.mix_probs, self.mix_bits):
            # Every candidate is computed even when p_b is 0 (hard samples): the logits'
            # gradient d loss / d p_b = <grad, fake_quant_b(w)> needs all of them.
            out = out + p.to(weight.dtype) * super().forward(weight, b)
        return out


class MixedMultiPrecisionQuantizer(_BitMixture, MultiPrecisionQuantizer):
    """A ``MultiPrecisionQuantizer`` that also answers ``MIXED_BITS`` (see ``_BitMixture``).

    Independent scales make the candidates one stacked computation
    (``allinone.quant.quantizer.fake_quant_mixture``): the same values and gradients as the
    loop with a third of its kernel launches at three candidates.
    """

    def mixture(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_slice(weight)
        scales = [self._sliced_scale(b, weight) for b in self.mix_bits]
        return fake_quant_mixture(weight, scales, self.mix_bits, self.mix_probs, self.learn_scale)


class MixedNestedQuantizer(_BitMixture, NestedQuantizer):
    """A ``NestedQuantizer`` that also answers ``MIXED_BITS`` (see ``_BitMixture``): the loop,
    since a lower bit-width's codes derive from the top bit-width's."""


_MIXED_CLASS = {MultiPrecisionQuantizer: MixedMultiPrecisionQuantizer, NestedQuantizer: MixedNestedQuantizer}
_BASE_CLASS = {v: k for k, v in _MIXED_CLASS.items()}


# --------------------------------------------------------------------------- search module


class MixedPrecisionSearch(nn.Module):
    """Architecture logits of the groups, the sampling step and the expected size.

    Attached to the model as ``model.bit_search`` (so its Parameters train with the model
    and are checkpointed): ``logits.<group>`` [len(candidate_bits)] (stored unscaled, see
    the module docstring) and the buffer ``steps`` (search steps taken; drives the
    temperature and survives ``--resume``).

    Args:
        groups: group name -> its (block, kind) cells (``group_cells``).
        numel: group name -> quantized weights in it.
        candidate_bits: bit-widths to choose from (sorted high to low here).
        target_bits: the average bit-width the size penalty aims at.
        logit_scale: logits = stored Parameter * logit_scale (``logit_lr / optim.lr``).
        template: the subnet whose blocks / widths the allocation keeps (full model).
        granularity: how the groups were formed (recorded in reports).
        kinds: the module kinds of the model's blocks (``model_kinds``).
    """

    def __init__(self, groups: Mapping[str, Sequence[Cell]], numel: Mapping[str, int],
                 candidate_bits: Sequence[int], target_bits: float, logit_scale: float,
                 template: SubnetConfig, granularity: str, kinds: Sequence[str] = KINDS):
        super().__init__()
        self.kinds = tuple(kinds)
        self.candidate_bits = tuple(sorted(set(int(b) for b in candidate_bits), reverse=True))
        self.groups = {g: list(cells) for g, cells in groups.items()}
        self.numel = {g: int(numel[g]) for g in self.groups}
        self.target_bits = float(target_bits)
        self.logit_scale = float(logit_scale)
        self.template = template
        self.granularity = granularity
        self.logits = nn.ParameterDict({g: nn.Parameter(torch.zeros(len(self.candidate_bits)))
                                        for g in self.groups})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("bits_tensor", torch.tensor(self.candidate_bits, dtype=torch.float32),
                             persistent=False)
        total = sum(self.numel.values())
        self.register_buffer("numel_share", torch.tensor([self.numel[g] / total for g in self.groups]),
                             persistent=False)  # [G]: each group's share of the quantized weights
        # Quantizers of each group (plain list, not submodules: they belong to their layers).
        self.members: dict[str, list[nn.Module]] = {g: [] for g in self.groups}
        self.last_tau: float | None = None

    def group_logits(self, group: str) -> torch.Tensor:
        """[len(candidate_bits)] logits of ``group`` (stored Parameter * logit_scale)."""
        return self.logits[group] * self.logit_scale

    def stacked_logits(self) -> torch.Tensor:
        """[G, len(candidate_bits)]: every group's logits, in ``groups`` order (one tensor, so
        that sampling and the size terms are a few operations for any number of groups)."""
        return torch.stack([self.logits[g] for g in self.groups]) * self.logit_scale

    def probabilities(self) -> dict[str, torch.Tensor]:
        """group -> softmax(logits) (no noise), [len(candidate_bits)]."""
        return dict(zip(self.groups, F.softmax(self.stacked_logits(), -1).unbind(0)))

    def expected_bits(self, probs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Scalar, differentiable: numel-weighted average bit-width under ``probs`` (every group ->
        [len(candidate_bits)]; default softmax(logits), i.e. the expected average)."""
        p = F.softmax(self.stacked_logits(), -1) if probs is None else torch.stack([probs[g] for g in self.groups])
        # Elementwise products and sums, not matmuls: autocast would run those in bf16.
        return ((p * self.bits_tensor).sum(-1) * self.numel_share).sum()

    def size_penalty(self, kind: str = "square", probs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(bits - target)^2`` (``square``), ``|bits - target|`` (``abs``) or
        ``max(0, bits - target)^2`` (``hinge``: only above the target), where ``bits`` is
        ``expected_bits(probs)``: the expected average under softmax(logits) by default, or
        the average of one Gumbel-softmax sample when ``probs`` is that sample.  Penalising
        the sample's size (as FBNet penalises the sampled latency) penalises its spread too,
        ``E[(S - t)^2] = (E[S] - t)^2 + Var[S]``: flat probabilities whose mean meets the
        target while their argmax does not are pushed to decide."""
        d = self.expected_bits(probs) - self.target_bits
        if kind == "square":
            return d * d
        if kind == "abs":
            return d.abs()
        if kind == "hinge":
            return F.relu(d) ** 2
        raise ValueError(f"size penalty {kind!r}; expected square, abs or hinge")

    def sample(self, tau: float, hard: bool = False, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Draw one Gumbel-softmax sample per group and hand it to the group's quantizers."""
        self.last_tau = tau
        probs = dict(zip(self.groups, gumbel_softmax(self.stacked_logits(), tau, hard, generator).unbind(0)))
        for g, qs in self.members.items():
            for q in qs:
                q.mix_probs = probs[g]
        return probs

    def argmax_bits(self) -> dict[str, int]:
        """group -> its most probable bit-width."""
        return {g: self.candidate_bits[int(self.group_logits(g).argmax())] for g in self.groups}

    @torch.no_grad()
    def allocation(self, enforce_budget: bool = True, tolerance: float = 0.1) -> dict[str, int]:
        """group -> bits: each group's argmax bit-width.

        With ``enforce_budget``, when the argmax's numel-weighted average is outside
        ``[target_bits - tolerance, target_bits]`` (softmax(logits) can meet the target in
        expectation while its mode does not), the most probable allocation inside that
        window instead: the one maximising ``sum_g log p_g(b_g)`` (an exact knapsack,
        ``mixed_budget.allocate_knapsack`` with scores ``-log p``); if the window holds
        none, the most probable one within ``target_bits``.
        """
        bits = self.argmax_bits()
        if not enforce_budget:
            return bits
        avg = average_bits(bits, self.numel)
        if self.target_bits - tolerance <= avg <= self.target_bits + 1e-9:
            return bits
        scores = {g: {b: -float(torch.log(p[i].clamp_min(1e-30))) for i, b in enumerate(self.candidate_bits)}
                  for g, p in self.probabilities().items()}
        try:
            return allocate_knapsack(scores, self.numel, self.candidate_bits, self.target_bits,
                                     min_bits=self.target_bits - tolerance)
        except ValueError:
            return allocate_knapsack(scores, self.numel, self.candidate_bits, self.target_bits)

    def cell_bits(self, group_bits: Mapping[str, int]) -> dict[Cell, int]:
        return {cell: group_bits[g] for g, cells in self.groups.items() for cell in cells}

    def extra_repr(self) -> str:
        return (f"groups={len(self.groups)} ({self.granularity}), candidate_bits={self.candidate_bits}, "
                f"target_bits={self.target_bits}, logit_scale={self.logit_scale:g}")


def attach_mixed_precision(model, template: SubnetConfig, granularity: str = "layer",
                           candidate_bits: Sequence[int] = (8, 4, 2), target_bits: float = 4.0,
                           logit_scale: float = 1.0) -> MixedPrecisionSearch:
    """Make ``model`` (a supernet with quantizers) searchable; returns ``model.bit_search``.

    Every quantizable layer of ``template``'s blocks gets a quantizer class that answers
    ``MIXED_BITS`` with the mixture of its group; ``model.bit_search`` holds the logits.
    Raises ``ValueError`` when a quantizer lacks a candidate bit-width.
    """
    if getattr(model, "bit_search", None) is not None:
        raise ValueError("the model already has a mixed-precision search attached")
    cands = sorted(set(int(b) for b in candidate_bits), reverse=True)
    if not cands or any(b == FLOAT_BITS or not 1 <= b <= 8 for b in cands):
        raise ValueError(f"candidate_bits {list(candidate_bits)} must be integer bit-widths 1..8")
    kinds = model_kinds(model)
    groups = group_cells(template, granularity, kinds)
    counts = cell_numel(model, template)
    numel = {g: sum(counts.get(c, 0) for c in cells) for g, cells in groups.items()}
    search = MixedPrecisionSearch(groups, numel, cands, target_bits, logit_scale, template, granularity, kinds)
    if not min(cands) <= target_bits <= max(cands):
        raise ValueError(f"target_bits={target_bits} is outside the candidates' range {min(cands)}..{max(cands)}")
    group_of = {cell: g for g, cells in groups.items() for cell in cells}
    for name, layer, kind in quantizable_layers(model):
        cell = weight_cell(name, kind)
        if cell not in group_of:
            continue  # a block the template does not use, or a weight outside the blocks
        q = getattr(layer, "quantizer", None)
        if q is None or type(q) not in _MIXED_CLASS:
            raise ValueError(f"{name} has no MultiPrecisionQuantizer / NestedQuantizer: build the supernet "
                             "with a 'quant' section (supernet.quant) before the mixed-precision search")
        missing = [b for b in cands if b not in q.bits]
        if missing:
            raise ValueError(f"{name}: candidate bit-width(s) {missing} are not among the quantizer's "
                             f"{list(q.bits)}; add them to supernet.quant.bits")
        q.__class__ = _MIXED_CLASS[type(q)]
        q.mix_bits = tuple(cands)
        q.mix_probs = None
        search.members[group_of[cell]].append(q)
    search.to(next(model.parameters()).device)
    model.bit_search = search
    return search


def detach_mixed_precision(model) -> MixedPrecisionSearch | None:
    """Undo ``attach_mixed_precision``: plain quantizers, no ``bit_search``; returns the search."""
    search = getattr(model, "bit_search", None)
    for _, layer, _ in quantizable_layers(model):
        q = getattr(layer, "quantizer", None)
        if q is not None and type(q) in _BASE_CLASS:
            q.__class__ = _BASE_CLASS[type(q)]
            for attr in ("mix_bits", "mix_probs"):
                q.__dict__.pop(attr, None)
    if search is not None:
        del model.bit_search
    return search


# --------------------------------------------------------------------------- allocation


def final_allocation(model, enforce_budget: bool = True) -> SubnetConfig:
    """The learned allocation as a subnet: each group's argmax bit-width (``MixedPrecisionSearch.allocation``)
    on the template's blocks and widths."""
    search = getattr(model, "bit_search", None)
    if search is None:
        raise ValueError("the model has no mixed-precision search (attach_mixed_precision)")
    return subnet_with_bits(search.template, search.cell_bits(search.allocation(enforce_budget)),
                            kinds=search.kinds)


def allocation_average_bits(subnet: SubnetConfig, numel: Mapping[Cell, int]) -> float:
    """Numel-weighted average bit-width of the quantized cells of ``subnet`` (float cells excluded)."""
    pairs = [(numel[(c.index, k)], c.bits(k)) for c in subnet.layers for k in KINDS
             if c.bits(k) != FLOAT_BITS and numel.get((c.index, k), 0)]
    n = sum(p[0] for p in pairs)
    return sum(a * b for a, b in pairs) / n if n else float("nan")


def allocation_space(model, subnet: SubnetConfig):
    """A search space that can write ``subnet`` as a string: the model's space widened with
    per-block, per-kind bits and ``subnet``'s bit-widths (or one made from the model's config)."""
    from allinone.elastic.space import SearchSpace

    space = getattr(model, "search_space", None)
    if space is None:
        cfg = model.config
        if hasattr(cfg, "encoder"):  # ASRModelConfig
            n, ffn, heads = cfg.encoder.num_blocks, cfg.encoder.linear_units, cfg.encoder.attention_heads
        else:  # Wav2Vec2Config
            n, ffn, heads = cfg.encoder_num_layers, cfg.encoder_ff_interm_features, cfg.encoder_num_heads
        space = SearchSpace(depth=[n], ffn=[ffn], heads=[heads], bits=[FLOAT_BITS], num_blocks=n)
    return add_to_space(space, subnet)


def add_to_space(space, subnet: SubnetConfig):
    """Fusion with the supernet: ``space`` widened so that ``subnet`` (e.g. a learned
    allocation) is one of its subnets: its bit-widths added, bits per block and per kind
    allowed.  Depth / width choices must already be in the space."""
    from dataclasses import replace

    bits = sorted(set(space.bits) | {c.bits(k) for c in subnet.layers for k in KINDS}, reverse=True)
    per_layer = tuple(space.per_layer) + (() if "bits" in space.per_layer else ("bits",))
    per_kind = space.per_kind_bits or any(len({c.bits(k) for k in KINDS}) > 1 for c in subnet.layers)
    return replace(space, bits=tuple(bits), per_layer=per_layer, per_kind_bits=per_kind,
                   layers=dict(space.layers))


def parse_into_space(space, text: str, model_config=None):
    """Parse ``text`` (e.g. a learned allocation) into ``(subnet, space')``: ``space`` itself
    when it already holds the subnet, else ``space`` widened by ``add_to_space`` (checked
    against ``model_config``'s quantizers when given).  Depth and widths must be the space's."""
    from dataclasses import replace

    try:
        return space.parse(text), space
    except ValueError:
        pass
    permissive = replace(space, bits=(FLOAT_BITS, 8, 7, 6, 5, 4, 3, 2, 1),
                         per_layer=tuple(space.per_layer) + (() if "bits" in space.per_layer else ("bits",)),
                         per_kind_bits=True, layers=dict(space.layers))
    subnet = permissive.parse(text)
    wider = add_to_space(space, subnet)
    if model_config is not None:
        wider = wider.for_model(model_config)
    return subnet, wider


def allocation_report(model, subnet: SubnetConfig, method: str, **extra) -> dict:
    """What ``allocation.json`` holds: the subnet string, achieved average bits, per-block bits.

    Keys: ``subnet``, ``average_bits`` (numel-weighted over the quantized weights, as
    ``SizeReport.average_bits`` of the extracted model), ``quantized_params``,
    ``per_layer`` ([{block, attn, ffn, conv}]; only the kinds the blocks have), ``method``,
    plus ``extra``; with a search attached also ``target_bits``, ``expected_bits``,
    ``candidate_bits``, ``granularity``, ``groups`` (group -> bits) and ``probabilities``.
    A wav2vec2 feature extractor quantized at a fixed bit-width is outside the allocation
    (``average_bits`` covers the blocks, as the budget does); it adds ``extractor_bits``,
    ``extractor_params`` and ``average_bits_with_extractor`` (what ``SizeReport.average_bits``
    of the extracted model then is), and its weights count in ``quantized_params``.
    """
    numel = cell_numel(model, subnet)
    kinds = model_kinds(model)
    block_params = sum(n for cell, n in numel.items() if subnet_bits_of(subnet, cell) != FLOAT_BITS)
    report = {
        "subnet": allocation_space(model, subnet).format(subnet),
        "average_bits": allocation_average_bits(subnet, numel),
        "quantized_params": block_params,
        "method": method,
        "per_layer": [{"block": c.index, **{k: c.bits(k) for k in KINDS if k in kinds}} for c in subnet.layers],
    }
    fixed = fixed_quantized(model)
    if fixed:
        n_fixed = sum(n for _, n in fixed.values())
        bit_sum = sum(b * n for b, n in fixed.values())
        if block_params:
            bit_sum += report["average_bits"] * block_params
        report.update({"extractor_bits": next(iter(fixed.values()))[0], "extractor_params": n_fixed,
                       "quantized_params": block_params + n_fixed,
                       "average_bits_with_extractor": bit_sum / (block_params + n_fixed)})
    search = getattr(model, "bit_search", None)
    if search is not None:
        with torch.no_grad():
            probs = search.probabilities()
            report.update({
                "target_bits": search.target_bits,
                "expected_bits": float(search.expected_bits()),
                "candidate_bits": list(search.candidate_bits),
                "granularity": search.granularity,
                "groups": {g: subnet_bits_of(subnet, cells[0]) for g, cells in search.groups.items()},
                "probabilities": {g: [round(float(x), 4) for x in p] for g, p in probs.items()},
                "search_steps": int(search.steps),
            })
            argmax = subnet_with_bits(search.template, search.cell_bits(search.argmax_bits()), kinds=search.kinds)
            report["argmax_subnet"] = allocation_space(model, argmax).format(argmax)
            report["argmax_average_bits"] = allocation_average_bits(argmax, numel)
    report.update(extra)
    return report


def subnet_bits_of(subnet: SubnetConfig, cell: Cell) -> int:
    block, kind = cell
    for c in subnet.layers:
        if c.index == block:
            return c.bits(kind)
    raise ValueError(f"block {block} is not in the subnet")


def write_allocation(path: str | Path, report: dict) -> Path:
    """Write an allocation report (``allocation_report``) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        json.dump(report, f, indent=1)
    return path


def read_allocation(path: str | Path) -> dict:
    """An ``allocation.json`` (a file, or a directory holding one); needs a ``subnet`` key."""
    path = Path(path)
    if path.is_dir():
        path = path / ALLOCATION_FILE
    if not path.is_file():
        raise ValueError(f"allocation file not found: {path}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("subnet"), str):
        raise ValueError(f"{path}: an allocation file is a JSON object with a 'subnet' string")
    return report


def write_timing(path: str | Path, stage: str, seconds: float, world_size: int = 1,
                 previous: Iterable[dict] = (), device: str | None = None) -> dict:
    """Record a method's compression time: this stage plus earlier ones (e.g. stage 1's).

    Writes ``{"stages": [{"stage", "seconds", "gpu_seconds", "world_size", "device"}, ...],
    "total_seconds", "total_gpu_seconds"}`` (gpu_seconds = seconds * processes) and returns it.
    """
    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stages = [dict(s) for s in previous] + [{
        "stage": stage, "seconds": round(float(seconds), 3),
        "gpu_seconds": round(float(seconds) * world_size, 3), "world_size": int(world_size), "device": device,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }]
    timing = {"stages": stages,
              "total_seconds": round(sum(s["seconds"] for s in stages), 3),
              "total_gpu_seconds": round(sum(s["gpu_seconds"] for s in stages), 3)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        json.dump(timing, f, indent=1)
    return timing


def check_space_expresses(space, granularity: str, candidate_bits: Sequence[int]) -> None:
    """Raise ``ValueError`` unless allocations of ``granularity`` over ``candidate_bits`` are
    subnets of ``space`` (so the result has a subnet string and extracts)."""
    missing = [b for b in candidate_bits if b not in space.bits]
    problems = []
    if missing:
        problems.append(f"bits {missing} are not in the space's bits {list(space.bits)}")
    if granularity in ("layer", "block") and "bits" not in space.per_layer:
        problems.append("bits must be allowed per block (per_layer: [bits])")
    if granularity in ("layer", "kind") and not space.per_kind_bits:
        problems.append("bits must be allowed per module kind (per_kind_bits: true)")
    if problems:
        raise ValueError(f"the search space cannot express {granularity}-granularity allocations: "
                         + "; ".join(problems))
