"""Size accounting: what a deployed model costs in bytes, counting every parameter.

Definitions (docs/quantization.md, "Size accounting"):

- a quantized tensor of ``n`` weights at ``b`` bits costs ``ceil(n * b / 8)`` bytes of codes
  plus 4 bytes per float32 scale (1 per tensor, or 1 per output channel);
- every other tensor stays floating point at 4 bytes per value (a non-float buffer, e.g.
  an int64 counter, at its own element size when a tensor is given);
- fp32 bytes = the same tensors all at 4 bytes per value (the 32-bit model);
- compression ratio = fp32 bytes / packed bytes (method.md section 2);
- average bits = sum(n_i * b_i) / sum(n_i) over the quantized tensors (scales excluded);
- weight bytes = the packed bytes of the *quantizable* weights alone (those the precision
  dimension applies to, ``default_quantizable``: codes + scales, or 4 bytes per value where a
  system keeps them float), and weight fp32 bytes the same weights at 32 bits. Their ratio is
  the compression of the encoder's weights, without the parts every system keeps float (front
  end, norms, biases, CTC layer): the published ratios read as this one (12.8x = 32 / 2.5 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

from .pack import packed_nbytes
from .quantizer import FLOAT_BITS, check_bits

ShapeOrTensor = Union[torch.Tensor, Sequence[int], torch.Size]

DEFAULT_QUANT_PREFIXES = ("encoder.encoders.",)
# Where each saved architecture's quantizable weights live (models/saved.py's arch names): the
# Conformer's blocks; wav2vec2's transformer layers (its feature extractor's convolutions, when
# a model quantizes them, count through their quantized tensors).
ARCH_QUANT_PREFIXES = {"conformer_asr": DEFAULT_QUANT_PREFIXES, "wav2vec2_ctc": ("encoder.transformer.layers.",)}

# What stays floating point, by name. Checked in order: a prefix category wins over
# the generic "norm" / "bias" ones (a decoder bias counts as decoder).
FLOAT_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("front-end", ("embed.", "frontend.", "feature_extractor.", "encoder.embed.",
                   "encoder.feature_extractor.", "encoder.feature_projection.")),
    ("normalisation stats", ("normalize.", "global_mvn.", "mvn.")),
    ("CTC output layer", ("ctc.",)),
    ("decoder", ("decoder.",)),
)


def _shape(x: ShapeOrTensor) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(int(n) for n in x)


def _numel(x: ShapeOrTensor) -> int:
    return math.prod(_shape(x))


def _is_norm(name: str) -> bool:
    parts = name.lower().split(".")
    return any("norm" in p or p in ("ln", "bn") for p in parts[:-1])


def float_category(name: str) -> str:
    """Why a tensor stays float: 'front-end', 'normalisation stats', 'CTC output layer',
    'decoder', 'norms', 'biases', or 'other float'."""
    for category, prefixes in FLOAT_CATEGORIES:
        if any(name.startswith(p) for p in prefixes):
            return category
    if _is_norm(name):
        return "norms"
    last = name.rsplit(".", 1)[-1]
    if last == "bias" or last.startswith("pos_bias"):  # pos_bias_u/v: relative-position attention biases
        return "biases"
    return "other float"


def default_quantizable(name: str, tensor: ShapeOrTensor,
                        prefixes: Sequence[str] = DEFAULT_QUANT_PREFIXES) -> bool:
    """True for Linear / Conv1d weights inside the encoder blocks (method.md "what stays float").

    name: state_dict key; tensor: the tensor or its shape. Quantizable means: the name
    starts with one of ``prefixes`` (default ``encoder.encoders.``, the Conformer blocks;
    wav2vec2 would pass its layer prefix), ends in ``.weight``, is 2-D (Linear) or 3-D
    (Conv1d, depthwise included), and is not a norm. Front-end / subsampling, norms,
    biases, the CTC layer and the decoder therefore stay float.
    """
    return (any(name.startswith(p) for p in prefixes) and name.endswith(".weight")
            and len(_shape(tensor)) in (2, 3) and not _is_norm(name))


@dataclass
class TensorSize:
    """One tensor's line in a size report (bits 32 = stays float)."""

    name: str
    shape: tuple[int, ...]
    bits: int
    code_bytes: int
    scale_bytes: int
    category: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


@dataclass
class SizeReport:
    """Sizes of a model with per-tensor bit-widths (see the module docstring)."""

    total_params: int
    quantized_params: int
    float_params: int
    code_bytes: int      # packed codes of quantized tensors
    scale_bytes: int     # their float32 scales
    float_bytes: int     # tensors that stay float
    fp32_bytes: int      # every tensor at 32 bits
    tensors: list[TensorSize] = field(default_factory=list)
    weight_bytes: int = 0       # the quantizable weights as stored (codes + scales, or float)
    weight_fp32_bytes: int = 0  # the same weights at 32 bits
    weight_names: tuple[str, ...] = ()  # which tensors those are

    @property
    def packed_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.float_bytes

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else float("nan")

    @property
    def average_bits(self) -> float:
        """Mean bit-width over quantized weights (nan if nothing is quantized)."""
        n = sum(t.numel for t in self.tensors if t.bits != FLOAT_BITS)
        nb = sum(t.numel * t.bits for t in self.tensors if t.bits != FLOAT_BITS)
        return nb / n if n else float("nan")

    @property
    def weight_ratio(self) -> float:
        """Compression of the quantizable weights alone (fp32 / stored; see the module docstring)."""
        return self.weight_fp32_bytes / self.weight_bytes if self.weight_bytes else float("nan")

    def float_by_category(self) -> dict[str, tuple[int, int, int]]:
        """category -> (number of tensors, parameters, bytes) of what stays float."""
        out: dict[str, tuple[int, int, int]] = {}
        for t in self.tensors:
            if t.bits == FLOAT_BITS:
                k, n, b = out.get(t.category, (0, 0, 0))
                out[t.category] = (k + 1, n + t.numel, b + t.bytes)
        return out

    def summary(self) -> str:
        """A few lines for logs and ``allinone info``."""
        mib = 2 ** 20
        return "\n".join([
            f"parameters: {self.total_params:,} ({self.quantized_params:,} quantized, "
            f"{self.float_params:,} float)",
            f"average bits of quantized weights: {self.average_bits:.2f}",
            f"packed size: {self.packed_bytes:,} bytes ({self.packed_bytes / mib:.2f} MiB): codes "
            f"{self.code_bytes:,} + scales {self.scale_bytes:,} + float {self.float_bytes:,}",
            f"fp32 size: {self.fp32_bytes:,} bytes ({self.fp32_bytes / mib:.2f} MiB)",
            f"compression ratio (fp32 / packed, all parameters and scales): {self.compression_ratio:.2f}x",
            f"compression ratio of the quantizable weights alone (as published ratios count): "
            f"{self.weight_ratio:.2f}x",
        ])


def _float_elem_bytes(x: ShapeOrTensor) -> int:
    """4 for anything floating (deployed as float32); a non-float tensor's own element size."""
    if isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
        return x.element_size()
    return 4


def size_report(named_tensors: Mapping[str, ShapeOrTensor], bits: Mapping[str, int],
                per_channel: bool | Mapping[str, bool] = False,
                scale_counts: Mapping[str, int] | None = None,
                quant_prefixes: Sequence[str] = DEFAULT_QUANT_PREFIXES) -> SizeReport:
    """Account for every tensor of a model.

    named_tensors: name -> tensor or shape, ALL tensors of the deployed model.
    bits: name -> bit-width; names missing or at 32 stay float.
    per_channel: whether quantized tensors have one scale per output channel (bool, or a
        name -> bool mapping); ``scale_counts`` (name -> number of scales) overrides it.
    quant_prefixes: where the quantizable weights live (a model's ``quant_prefixes``), for
        ``weight_bytes``: the quantized tensors and the float ones ``default_quantizable`` picks.
    """
    unknown = set(bits) - set(named_tensors)
    if unknown:
        raise ValueError(f"bits given for tensors that are not in the model: {sorted(unknown)[:5]}")
    rows: list[TensorSize] = []
    for name, x in named_tensors.items():
        shape, n = _shape(x), _numel(x)
        b = check_bits(int(bits.get(name, FLOAT_BITS)))
        if b == FLOAT_BITS:
            rows.append(TensorSize(name, shape, b, n * _float_elem_bytes(x), 0, float_category(name)))
            continue
        if scale_counts is not None and name in scale_counts:
            n_scales = int(scale_counts[name])
        else:
            pc = per_channel.get(name, False) if isinstance(per_channel, Mapping) else per_channel
            n_scales = shape[0] if pc and shape else 1
        rows.append(TensorSize(name, shape, b, packed_nbytes(n, b), 4 * n_scales, "quantized"))
    q = [r for r in rows if r.bits != FLOAT_BITS]
    f = [r for r in rows if r.bits == FLOAT_BITS]
    weights = q + [r for r in f if default_quantizable(r.name, r.shape, quant_prefixes)]
    fp32 = sum(r.numel * (4 if r.bits != FLOAT_BITS else _float_elem_bytes(named_tensors[r.name]))
               for r in rows)
    return SizeReport(
        total_params=sum(r.numel for r in rows),
        quantized_params=sum(r.numel for r in q),
        float_params=sum(r.numel for r in f),
        code_bytes=sum(r.code_bytes for r in q),
        scale_bytes=sum(r.scale_bytes for r in q),
        float_bytes=sum(r.code_bytes for r in f),
        fp32_bytes=fp32,
        tensors=rows,
        weight_bytes=sum(r.bytes for r in weights),
        weight_fp32_bytes=4 * sum(r.numel for r in weights),
        weight_names=tuple(r.name for r in weights),
    )
