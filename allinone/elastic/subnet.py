"""The active subnet of a supernet: which blocks run, how wide, and at which precision.

A ``SubnetConfig`` is plain data passed explicitly to ``ASRModel.encode/forward`` and
``ConformerEncoder.forward`` (there is no "current subnet" stored in the model).
``subnet=None`` means the whole float network.

Slicing is always "the first k": the first ``ffn`` hidden units of both FFNs of a block
(rows of ``w_1``/``b_1``, columns of ``w_2``), the first ``heads`` attention heads (rows
of ``linear_q/k/v/pos`` and their biases, rows of ``pos_bias_u/v``, columns of
``linear_out``).  Precision is chosen per block and per module kind (``KINDS``).

This module has no dependency on the models, so the models can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["KINDS", "FLOAT_BITS", "EXTRACTOR_KIND", "LayerChoice", "SubnetConfig", "module_kind",
           "check_fits"]

FLOAT_BITS = 32
# Module kinds whose weights may take their own bit-width: self-attention
# (linear_q/k/v/out/pos), the feed-forward modules (macaron and main), the convolution module.
# wav2vec2 / HuBERT layers have attention (q/k/v/out_proj) and FFN only: their 'conv' bits
# are unused.
KINDS = ("attn", "ffn", "conv")
# The wav2vec2 CNN feature extractor, when quantized: one fixed bit-width for every subnet
# (``Wav2Vec2Config.extractor_bits``), not a per-block choice.
EXTRACTOR_KIND = "extractor"


def module_kind(name: str) -> str:
    """Kind of a quantizable weight from its name, e.g. ``encoder.encoders.3.feed_forward.w_1.weight``
    -> 'ffn', ``encoder.transformer.layers.0.attention.q_proj.weight`` -> 'attn',
    ``feature_extractor.conv_layers.0.conv.weight`` -> 'extractor'."""
    parts = name.split(".")
    if "self_attn" in parts or "attention" in parts:
        return "attn"
    if "feed_forward" in parts or "feed_forward_macaron" in parts:
        return "ffn"
    if "conv_module" in parts:
        return "conv"
    if "feature_extractor" in parts:
        return EXTRACTOR_KIND
    raise ValueError(f"{name!r} is not a weight of an attention, feed-forward or convolution module")


@dataclass(frozen=True)
class LayerChoice:
    """What one used block of the supernet computes with.

    index: which block of the supernet (0-based); ffn: hidden units of both FFNs;
    heads: attention heads; bits_attn / bits_ffn / bits_conv: weight bit-width of each
    module kind (32 = float).
    """

    index: int
    ffn: int
    heads: int
    bits_attn: int = FLOAT_BITS
    bits_ffn: int = FLOAT_BITS
    bits_conv: int = FLOAT_BITS

    def bits(self, kind: str) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown module kind {kind!r}; kinds are {', '.join(KINDS)}")
        return getattr(self, f"bits_{kind}")


@dataclass(frozen=True)
class SubnetConfig:
    """A subnet: the used blocks, in order, each with its width and precision."""

    layers: tuple[LayerChoice, ...]

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a subnet needs at least one block")
        idx = [c.index for c in self.layers]
        if any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0:
            raise ValueError(f"subnet block indices must be increasing and >= 0, got {idx}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.layers)

    @classmethod
    def uniform(cls, layers: int | Iterable[int], ffn: int, heads: int,
                bits: int | dict[str, int] = FLOAT_BITS) -> "SubnetConfig":
        """Same width and precision in every block. ``layers``: a depth k (the first k
        blocks) or explicit block indices; ``bits``: one value or ``{kind: bits}``."""
        indices = range(layers) if isinstance(layers, int) else layers
        b = bits if isinstance(bits, dict) else {k: bits for k in KINDS}
        return cls(tuple(LayerChoice(i, ffn, heads, b["attn"], b["ffn"], b["conv"]) for i in indices))

    @classmethod
    def per_layer(cls, layers: Sequence[int], ffn: Sequence[int], heads: Sequence[int],
                  bits: dict[str, Sequence[int]]) -> "SubnetConfig":
        """Per-block values (all sequences as long as ``layers``)."""
        n = len(layers)
        for name, seq in [("ffn", ffn), ("heads", heads)] + [(f"bits[{k}]", bits[k]) for k in KINDS]:
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} blocks")
        return cls(tuple(LayerChoice(i, f, h, bits["attn"][j], bits["ffn"][j], bits["conv"][j])
                         for j, (i, f, h) in enumerate(zip(layers, ffn, heads))))

    def max_bits(self) -> int:
        return max(c.bits(k) for c in self.layers for k in KINDS)

    def average_bits(self) -> float:
        """Unweighted mean bit-width over blocks and kinds (for ordering teachers)."""
        vals = [c.bits(k) for c in self.layers for k in KINDS]
        return sum(vals) / len(vals)


def check_fits(subnet: SubnetConfig, num_layers: int, units_of, heads_of, unit: str, whole: str) -> None:
    """Raise ``ValueError`` if ``subnet`` asks for layers or widths a model lacks.

    num_layers: the model's layers (blocks); units_of(i) / heads_of(i): FFN units / heads of
    layer i; unit: what a layer is called ("block", "layer"); whole: the model's layer count
    in words, for the message ("the encoder has 12 blocks").
    """
    for c in subnet.layers:
        if not 0 <= c.index < num_layers:
            raise ValueError(f"subnet uses {unit} {c.index}, but {whole}")
        units, heads = units_of(c.index), heads_of(c.index)
        if not 1 <= c.ffn <= units:
            raise ValueError(f"subnet asks {unit} {c.index} for {c.ffn} FFN units; it has 1..{units}")
        if not 1 <= c.heads <= heads:
            raise ValueError(f"subnet asks {unit} {c.index} for {c.heads} heads; it has 1..{heads}")
