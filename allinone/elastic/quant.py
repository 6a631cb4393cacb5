"""Weight quantizers of a supernet: one per quantizable encoder weight, one scale per bit-width.

A model whose ``ASRModelConfig.quant`` (or ``Wav2Vec2Config.quant``) is set gets a
``quantizer`` child on every quantizable layer (``allinone.quant.default_quantizable``: the
Linear / Conv1d weights under the model's ``quant_prefixes``, by default the Conformer's
encoder blocks).  ``allinone.elastic.slicing.subnet_weight`` calls it with the (sliced)
weight and the active bit-width.  The state-dict keys of those layers gain
``<layer>.quantizer.scales.b<bits>`` and ``<layer>.quantizer.initialized``; a model
without ``quant`` keeps exactly ESPnet's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from allinone.elastic.subnet import FLOAT_BITS, module_kind
from allinone.quant.accounting import DEFAULT_QUANT_PREFIXES, default_quantizable
from allinone.quant.quantizer import MultiPrecisionQuantizer, NestedQuantizer, check_bits

__all__ = ["QuantConfig", "add_quantizers", "init_quantizers", "quantizable_layers"]

MODES = {"independent": MultiPrecisionQuantizer, "nested": NestedQuantizer}
METHODS = ("max", "mse")


@dataclass
class QuantConfig:
    """How the supernet's weights are quantized (``ASRModelConfig.quant``).

    bits: integer bit-widths the weights can take (float, 32, is always available);
    per_channel: one scale per output channel (else per tensor);
    learn_scale: train the scales (LSQ gradient);
    method: scale initialisation, 'max' or 'mse';
    mode: 'independent' (one scale per bit-width, ``MultiPrecisionQuantizer``) or
        'nested' (lower bit-widths are the top codes shifted, ``NestedQuantizer``).
    """

    bits: list[int] = field(default_factory=lambda: [8, 4, 2])
    per_channel: bool = True
    learn_scale: bool = True
    method: str = "max"
    mode: str = "independent"

    def validate(self) -> "QuantConfig":
        if not isinstance(self.bits, (list, tuple)) or not self.bits:
            raise ValueError(f"quant.bits must be a non-empty list of bit-widths, got {self.bits!r}")
        for b in self.bits:
            check_bits(b)
        if all(b == FLOAT_BITS for b in self.bits):
            raise ValueError("quant.bits needs at least one integer bit-width (1..8)")
        if self.mode not in MODES:
            raise ValueError(f"quant.mode={self.mode!r}; expected one of {', '.join(MODES)}")
        if self.method not in METHODS:
            raise ValueError(f"quant.method={self.method!r}; expected one of {', '.join(METHODS)}")
        return self

    @property
    def int_bits(self) -> list[int]:
        return sorted({b for b in self.bits if b != FLOAT_BITS}, reverse=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {"bits", "per_channel", "learn_scale", "method", "mode"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quant option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if "bits" in d:
            d["bits"] = [int(b) for b in d["bits"]]
        return cls(**d).validate()


def quant_prefixes_of(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a model's quantizable weights: its ``quant_prefixes`` attribute
    (wav2vec2), else the Conformer blocks of an ``ASRModel``."""
    return tuple(getattr(model, "quant_prefixes", DEFAULT_QUANT_PREFIXES))


def quantizable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(weight name, layer, module kind) of every quantizable weight of a model.

    Names are state-dict keys, e.g. ``encoder.encoders.0.self_attn.linear_q.weight``.
    Which weights: those under ``model.quant_prefixes`` (a model attribute; default
    ``encoder.encoders.``, the Conformer blocks of an ``ASRModel``).
    """
    prefixes = quant_prefixes_of(model)
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Linear, nn.Conv1d))
                and default_quantizable(f"{name}.weight", module.weight, prefixes)):
            yield f"{name}.weight", module, module_kind(name)


def add_quantizers(model: nn.Module, config: QuantConfig) -> None:
    """Give every quantizable layer of ``model`` a ``quantizer`` child (scales not yet set)."""
    cls = MODES[config.mode]
    for _, layer, _ in list(quantizable_layers(model)):
        layer.quantizer = cls(config.int_bits + [FLOAT_BITS], tuple(layer.weight.shape),
                              per_channel=config.per_channel, learn_scale=config.learn_scale,
                              method=config.method)


def init_quantizers(model: nn.Module, force: bool = False) -> int:
    """Set the scales of every quantizer from its layer's current (full) weight.

    Only uninitialised quantizers unless ``force``.  Call it after the weights are final
    (loaded from a trained model, reordered by importance).  Returns how many were set.
    """
    n = 0
    for _, layer, _ in quantizable_layers(model):
        q = getattr(layer, "quantizer", None)
        if q is not None and (force or not bool(q.initialized)):
            q.init_scales(layer.weight.detach())
            n += 1
    return n
