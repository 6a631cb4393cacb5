"""wav2vec 2.0 / HuBERT encoder with a CTC head, built from a config of plain numbers.

The structure follows torchaudio's ``torchaudio.models.wav2vec2`` components
(``FeatureExtractor`` -> ``Encoder`` = ``FeatureProjection`` + ``Transformer`` of
``EncoderLayer``s, with a ``ConvolutionalPositionalEmbedding`` under weight norm) and
the state-dict names are torchaudio's (``feature_extractor.*``,
``encoder.feature_projection.*``, ``encoder.transformer.*``, ``aux.*``), so torchaudio
``wav2vec2_model`` weights load as they are.  Hugging Face ``Wav2Vec2ForCTC`` /
``HubertForCTC`` directories load through ``allinone.interop.huggingface.load_hf_ctc``.

Both layouts are covered:

* base (``encoder_layer_norm_first=False``, post-LN): ``group_norm`` extractor (a
  per-channel GroupNorm after the first convolution only), LayerNorm after the
  positional embedding, LayerNorm after the attention and after the FFN of each layer;
* large / "stable layer norm" (``encoder_layer_norm_first=True``, pre-LN):
  ``layer_norm`` extractor (LayerNorm after every convolution), LayerNorm before the
  attention and before the FFN of each layer, one LayerNorm after the last layer.

Supernet (docs/wav2vec2.md, "Supernet"), as in ``allinone.models.conformer``:

* Every transformer layer computes with its weights through
  ``allinone.elastic.slicing.subnet_weight`` (via ``SelfAttention.linear`` /
  ``FeedForward.linear``): the first rows / columns (views), fake-quantized when the layer
  has a ``quantizer`` child.  The number of attention heads is read from the projected
  width (``width // head_dim``), so the first ``h * head_dim`` rows run ``h`` heads.
* ``Wav2Vec2Config.quant`` gives the transformer layers' Linear weights quantizers (and the
  CNN extractor's convolutions when ``extractor_bits`` < 32); the model is then a supernet.
* A subnet (``allinone.elastic.subnet.SubnetConfig``: layers, FFN units, heads, bits per
  layer) is an argument of ``forward`` / ``encode``; ``subnet=None`` slices and quantizes
  nothing: the plain model.
* Extracted subnets are plain models of a config with ``encoder_head_dim`` and per-layer
  ``encoder_layer_ff_interm_features`` / ``encoder_layer_num_heads``.

Tensors are batch-first: waveforms ``[batch, sample]``, features ``[batch, frame,
feature]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from allinone.elastic.quant import QuantConfig, add_quantizers
from allinone.elastic.slicing import subnet_weight
from allinone.elastic.subnet import FLOAT_BITS, LayerChoice, SubnetConfig, check_fits
from allinone.models.asr import ctc_loss
from allinone.quant.accounting import ARCH_QUANT_PREFIXES

__all__ = [
    "Wav2Vec2Config",
    "Wav2Vec2CTCModel",
    "ConvLayerBlock",
    "FeatureExtractor",
    "FeatureProjection",
    "ConvolutionalPositionalEmbedding",
    "SelfAttention",
    "FeedForward",
    "EncoderLayer",
    "Transformer",
    "Encoder",
    "TimeMasking",
    "FeatureMasking",
    "span_mask",
    "EXTRACTOR_MODES",
    "WAV2VEC2_BASE_CONV_LAYERS",
]

EXTRACTOR_MODES = ("group_norm", "layer_norm")

# (out_channels, kernel, stride) of the 7 convolutions of every published wav2vec2 /
# HuBERT model: 400-sample receptive field, 320-sample (20 ms at 16 kHz) hop.
WAV2VEC2_BASE_CONV_LAYERS: list[list[int]] = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2

# Norms inside the convolutional feature extractor use torch's default eps in both
# torchaudio and transformers (``layer_norm_eps`` is not applied there).
_EXTRACTOR_NORM_EPS = 1e-5


@dataclass
class Wav2Vec2Config:
    """Architecture of a wav2vec2 / HuBERT CTC model: plain numbers and strings only
    (``quant``, for a supernet, is a ``QuantConfig`` of plain values).

    Field names are those of ``torchaudio.models.wav2vec2_model`` (``aux_num_out`` is
    ``vocab_size`` here); defaults are wav2vec2-base's.  The large layout is
    ``extractor_mode="layer_norm"``, ``extractor_conv_bias=True``,
    ``encoder_layer_norm_first=True``, 1024 / 24 layers / 16 heads / 4096.
    """

    extractor_mode: str = "group_norm"
    # One [out_channels, kernel, stride] per convolution, first to last.
    extractor_conv_layer_config: list[list[int]] = field(
        default_factory=lambda: [list(c) for c in WAV2VEC2_BASE_CONV_LAYERS])
    extractor_conv_bias: bool = False
    encoder_embed_dim: int = 768
    encoder_projection_dropout: float = 0.1
    encoder_pos_conv_kernel: int = 128
    encoder_pos_conv_groups: int = 16
    encoder_num_layers: int = 12
    encoder_num_heads: int = 12
    encoder_attention_dropout: float = 0.1
    encoder_ff_interm_features: int = 3072
    encoder_ff_interm_dropout: float = 0.0
    encoder_dropout: float = 0.1
    encoder_layer_norm_first: bool = False
    encoder_layer_drop: float = 0.05
    vocab_size: int = 32
    # Not in torchaudio's constructor: dropout before the CTC head (transformers'
    # ``final_dropout``), the LayerNorm before the feature projection (HuBERT's
    # ``feat_proj_layer_norm``; always on in wav2vec2) and the transformer's LayerNorm eps.
    final_dropout: float = 0.0
    feature_projection_layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    # allinone only (None = the uniform published layout): width of one attention head
    # (default encoder_embed_dim // encoder_num_heads) and per-layer FFN units / heads,
    # which extracted subnets need.
    encoder_head_dim: int | None = None
    encoder_layer_ff_interm_features: list[int] | None = None
    encoder_layer_num_heads: list[int] | None = None
    # Supernet: weight quantizers of the transformer layers (None = a plain float model whose
    # state dict has exactly torchaudio's keys), and the fixed bit-width of the CNN feature
    # extractor's convolutions in every subnet (32 = float, the default; else one of quant.bits).
    quant: QuantConfig | None = None
    extractor_bits: int = FLOAT_BITS
    # Fine-tuning regularisation (training mode only; 0 = off, the default): spans of
    # ``mask_time_length`` projected frames replaced by a learned vector, as transformers'
    # ``mask_time_prob`` / ``mask_time_length`` / ``mask_time_min_masks`` (fairseq's mask_prob).
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    # Fine-tuning feature (channel) masking (training only; 0 = off, the default): after time
    # masking, spans of ``mask_feature_length`` channels zeroed in every frame of an utterance,
    # as transformers' ``mask_feature_prob`` / ``mask_feature_length`` /
    # ``mask_feature_min_masks`` (fairseq's mask_channel_prob / mask_channel_length).
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``encoder_head_dim`` or ``embed_dim // num_heads``."""
        if self.encoder_head_dim is not None:
            return self.encoder_head_dim
        return self.encoder_embed_dim // self.encoder_num_heads

    def layer_ff_interm_features(self, i: int) -> int:
        """FFN hidden units of transformer layer ``i``."""
        per_layer = self.encoder_layer_ff_interm_features
        return per_layer[i] if per_layer is not None else self.encoder_ff_interm_features

    def layer_num_heads(self, i: int) -> int:
        """Attention heads of transformer layer ``i``."""
        return self.encoder_layer_num_heads[i] if self.encoder_layer_num_heads is not None else self.encoder_num_heads

    def elastic_limits(self) -> tuple[int, int, int, list[int]]:
        """(layers, fewest FFN units of a layer, fewest heads of a layer, quantizer bit-widths):
        what ``SearchSpace.for_model`` checks a space against."""
        n = self.encoder_num_layers
        return (n, min(self.layer_ff_interm_features(i) for i in range(n)),
                min(self.layer_num_heads(i) for i in range(n)), self.quant.int_bits if self.quant else [])

    def validate(self) -> "Wav2Vec2Config":
        """Raise ``ValueError`` naming the first unsupported or inconsistent field."""
        if not 0.0 <= self.mask_time_prob < 1.0 or self.mask_time_length < 1 or self.mask_time_min_masks < 0:
            raise ValueError(f"Wav2Vec2Config time masking: need 0 <= mask_time_prob < 1, mask_time_length >= 1, "
                             f"mask_time_min_masks >= 0; got {self.mask_time_prob}, {self.mask_time_length}, "
                             f"{self.mask_time_min_masks}")
        prob, length, min_masks = self.mask_feature_prob, self.mask_feature_length, self.mask_feature_min_masks
        if not (isinstance(prob, (int, float)) and not isinstance(prob, bool) and 0.0 <= prob < 1.0
                and isinstance(length, int) and not isinstance(length, bool) and length >= 1
                and isinstance(min_masks, int) and not isinstance(min_masks, bool) and min_masks >= 0):
            raise ValueError(f"Wav2Vec2Config feature masking: need 0 <= mask_feature_prob < 1, integer "
                             f"mask_feature_length >= 1, integer mask_feature_min_masks >= 0; got "
                             f"{self.mask_feature_prob!r}, {self.mask_feature_length!r}, "
                             f"{self.mask_feature_min_masks!r}")
        if self.extractor_mode not in EXTRACTOR_MODES:
            raise ValueError(f"Wav2Vec2Config.extractor_mode={self.extractor_mode!r} is not supported; "
                             f"supported: {', '.join(map(repr, EXTRACTOR_MODES))}")
        layers = self.extractor_conv_layer_config
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(isinstance(c, (list, tuple)) and len(c) == 3
                           and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c)
                           for c in layers)):
            raise ValueError("Wav2Vec2Config.extractor_conv_layer_config must be a non-empty list of "
                             f"[out_channels, kernel, stride] positive ints, got {layers!r}")
        for name in ("encoder_embed_dim", "encoder_pos_conv_kernel", "encoder_pos_conv_groups",
                     "encoder_num_layers", "encoder_num_heads", "encoder_ff_interm_features", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Wav2Vec2Config.{name} must be a positive int, got {value!r}")
        if self.encoder_head_dim is not None and (not isinstance(self.encoder_head_dim, int)
                                                  or self.encoder_head_dim < 1):
            raise ValueError(f"Wav2Vec2Config.encoder_head_dim must be None or a positive int, "
                             f"got {self.encoder_head_dim!r}")
        for name in ("encoder_layer_ff_interm_features", "encoder_layer_num_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != self.encoder_num_layers
                                      or not all(isinstance(v, int) and v >= 1 for v in value)):
                raise ValueError(f"Wav2Vec2Config.{name} must be None or {self.encoder_num_layers} positive ints "
                                 f"(one per layer), got {value!r}")
        if self.quant is not None:
            self.quant.validate()
        if self.extractor_bits != FLOAT_BITS and (self.quant is None or self.extractor_bits not in self.quant.int_bits):
            raise ValueError(f"Wav2Vec2Config.extractor_bits={self.extractor_bits} needs a quant section with "
                             f"that bit-width; quant.bits: {self.quant.int_bits if self.quant else 'none'}")
        if self.encoder_head_dim is None and self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(f"Wav2Vec2Config.encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_num_heads={self.encoder_num_heads}")
        if self.encoder_embed_dim % self.encoder_pos_conv_groups:
            raise ValueError(f"Wav2Vec2Config.encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_pos_conv_groups={self.encoder_pos_conv_groups}")
        if self.mask_feature_prob > 0.0 and self.mask_feature_length > self.encoder_embed_dim:
            raise ValueError(f"Wav2Vec2Config feature masking: mask_feature_length={self.mask_feature_length} "
                             f"exceeds encoder_embed_dim={self.encoder_embed_dim} (the channels it masks)")
        for name in ("encoder_projection_dropout", "encoder_attention_dropout", "encoder_ff_interm_dropout",
                     "encoder_dropout", "encoder_layer_drop", "final_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Wav2Vec2Config.{name}={value} must be in [0, 1)")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"Wav2Vec2Config.layer_norm_eps={self.layer_norm_eps} must be > 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Wav2Vec2Config":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Wav2Vec2Config fields: {unknown}")
        d = dict(d)
        if "extractor_conv_layer_config" in d:
            d["extractor_conv_layer_config"] = [list(c) for c in d["extractor_conv_layer_config"]]
        for name in ("encoder_layer_ff_interm_features", "encoder_layer_num_heads"):
            if d.get(name) is not None:
                d[name] = list(d[name])
        if isinstance(d.get("quant"), dict):
            d["quant"] = QuantConfig.from_dict(d["quant"])
        return cls(**d)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the feature extractor for ``lengths`` samples ([B] -> [B])."""
        for _, kernel, stride in self.extractor_conv_layer_config:
            lengths = torch.clamp(torch.div(lengths - kernel, stride, rounding_mode="floor") + 1, min=0)
        return lengths


# --------------------------------------------------------------------------- extractor


class ConvLayerBlock(nn.Module):
    """Conv1d -> optional norm -> GELU, one unit of the feature extractor.

    ``norm`` is ``"group"`` (GroupNorm with one group per channel: each channel is
    normalised over time), ``"layer"`` (LayerNorm over channels at each frame) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool, norm: str | None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        if norm == "group":
            self.layer_norm: nn.Module | None = nn.GroupNorm(out_channels, out_channels, eps=_EXTRACTOR_NORM_EPS)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_channels, eps=_EXTRACTOR_NORM_EPS)
        elif norm is None:
            self.layer_norm = None
        else:
            raise ValueError(f"unknown norm {norm!r}")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None,
                bits: int = FLOAT_BITS) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, C_in, T_in], lengths: [B] or None -> ([B, C_out, T_out], [B] or None).

        bits: weight bit-width of the convolution (32 = float; else its ``quantizer``).
        """
        x = F.conv1d(x, *subnet_weight(self.conv, bits), stride=self.stride)
        if isinstance(self.layer_norm, nn.LayerNorm):
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.layer_norm is not None:
            x = self.layer_norm(x)
        x = F.gelu(x)
        if lengths is not None:
            lengths = torch.clamp(torch.div(lengths - self.kernel_size, self.stride, rounding_mode="floor") + 1,
                                  min=0)
        return x, lengths


class FeatureExtractor(nn.Module):
    """Stack of ``ConvLayerBlock``s from the raw waveform.

    ``group_norm`` mode normalises after the first convolution only; ``layer_norm``
    mode after every convolution.
    """

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        blocks = []
        in_channels = 1
        for i, (out_channels, kernel, stride) in enumerate(config.extractor_conv_layer_config):
            if config.extractor_mode == "layer_norm":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            blocks.append(ConvLayerBlock(in_channels, out_channels, kernel, stride,
                                         config.extractor_conv_bias, norm))
            in_channels = out_channels
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None,
                bits: int = FLOAT_BITS) -> tuple[torch.Tensor, torch.Tensor | None]:
        """waveforms: [B, S], lengths: [B] or None -> (features [B, T, C], lengths [B] or None).

        bits: weight bit-width of every convolution (32 = float).
        """
        if waveforms.ndim != 2:
            raise ValueError(f"expected waveforms of shape [batch, sample], got {list(waveforms.shape)}")
        x = waveforms.unsqueeze(1)
        for block in self.conv_layers:
            x, lengths = block(x, lengths, bits)
        return x.transpose(1, 2), lengths


# --------------------------------------------------------------------------- encoder


class FeatureProjection(nn.Module):
    """(LayerNorm ->) Linear -> Dropout from the extractor's channels to the model width."""

    def __init__(self, in_features: int, out_features: int, dropout: float, layer_norm: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features, eps=eps) if layer_norm else None
        self.projection = nn.Linear(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C] -> [B, T, D]."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.dropout(F.linear(x, self.projection.weight, self.projection.bias))


class ConvolutionalPositionalEmbedding(nn.Module):
    """Grouped Conv1d over time (weight norm over the kernel axis, ``dim=2``) -> GELU.

    The convolution pads ``kernel // 2`` on both sides; for an even kernel that gives
    one extra frame, which is dropped from the end.
    """

    def __init__(self, embed_dim: int, kernel_size: int, groups: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D] (the embedding only; the caller adds it)."""
        y = self.conv(x.transpose(1, 2))
        if self.num_remove:
            y = y[..., :-self.num_remove]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention; heads = projected width // ``head_dim``.

    head_dim: width of one head (default embed_dim / num_heads; extracted subnets with
    fewer heads keep the supernet's, so num_heads * head_dim < embed_dim).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
            head_dim = embed_dim // num_heads
        self.embed_dim = embed_dim
        self.head_dim = head_dim
        self.dropout = dropout
        width = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, width)
        self.k_proj = nn.Linear(embed_dim, width)
        self.v_proj = nn.Linear(embed_dim, width)
        self.out_proj = nn.Linear(width, embed_dim)

    def linear(self, layer: nn.Linear, x: torch.Tensor, bits: int = FLOAT_BITS, rows: int | None = None,
               cols: int | None = None) -> torch.Tensor:
        """``F.linear`` with ``layer``'s first ``rows`` / ``cols`` at ``bits`` (``subnet_weight``)."""
        return F.linear(x, *subnet_weight(layer, bits, rows, cols))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, heads: int | None = None,
                bits: int = FLOAT_BITS) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool (True = valid frame) or None -> [B, T, D].

        heads: run only the first ``heads`` heads (None = all); bits: weight bit-width.
        """
        b, t, _ = x.shape
        width = None if heads is None else heads * self.head_dim
        q, k, v = (self.linear(layer, x, bits, rows=width) for layer in (self.q_proj, self.k_proj, self.v_proj))
        heads = q.shape[-1] // self.head_dim
        q, k, v = (z.view(b, t, heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, heads * self.head_dim)
        return self.linear(self.out_proj, y, bits, cols=width)


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, io_features: int, intermediate_features: int, intermediate_dropout: float,
                 output_dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(io_features, intermediate_features)
        self.intermediate_dropout = nn.Dropout(intermediate_dropout)
        self.output_dense = nn.Linear(intermediate_features, io_features)
        self.output_dropout = nn.Dropout(output_dropout)

    def linear(self, layer: nn.Linear, x: torch.Tensor, bits: int = FLOAT_BITS, rows: int | None = None,
               cols: int | None = None) -> torch.Tensor:
        """``F.linear`` with ``layer``'s first ``rows`` / ``cols`` at ``bits`` (``subnet_weight``)."""
        return F.linear(x, *subnet_weight(layer, bits, rows, cols))

    def forward(self, x: torch.Tensor, units: int | None = None, bits: int = FLOAT_BITS) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D], with the first ``units`` hidden units (None = all)."""
        h = self.linear(self.intermediate_dense, x, bits, rows=units)  # [B, T, units]
        h = self.intermediate_dropout(F.gelu(h))
        return self.output_dropout(self.linear(self.output_dense, h, bits, cols=units))


class EncoderLayer(nn.Module):
    """Attention and FFN with residuals; pre-LN (``layer_norm_first``) or post-LN."""

    def __init__(self, attention: SelfAttention, feed_forward: FeedForward, dropout: float,
                 layer_norm_first: bool, eps: float = 1e-5):
        super().__init__()
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(attention.embed_dim, eps=eps)
        self.layer_norm_first = layer_norm_first
        self.feed_forward = feed_forward
        self.final_layer_norm = nn.LayerNorm(attention.embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                choice: LayerChoice | None = None) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool or None -> [B, T, D].

        choice: FFN units, heads and attention / FFN bit-widths of this layer in a subnet
        (None = all, float).
        """
        units = heads = None
        bits_attn = bits_ffn = FLOAT_BITS
        if choice is not None:
            units, heads, bits_attn, bits_ffn = choice.ffn, choice.heads, choice.bits_attn, choice.bits_ffn
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x = residual + self.dropout(self.attention(x, key_mask, heads, bits_attn))
        if self.layer_norm_first:
            return x + self.feed_forward(self.final_layer_norm(x), units, bits_ffn)
        x = self.layer_norm(x)
        return self.final_layer_norm(x + self.feed_forward(x, units, bits_ffn))


class Transformer(nn.Module):
    """Positional embedding, then ``layers``; one LayerNorm before (post-LN layout) or
    after (pre-LN layout) the stack.  Layer drop skips whole layers in training."""

    def __init__(self, pos_conv_embed: ConvolutionalPositionalEmbedding, dropout: float, layers: nn.ModuleList,
                 layer_norm_first: bool, layer_drop: float, eps: float = 1e-5):
        super().__init__()
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = nn.LayerNorm(pos_conv_embed.embed_dim, eps=eps)
        self.layer_norm_first = layer_norm_first
        self.layer_drop = layer_drop
        self.dropout = nn.Dropout(dropout)
        self.layers = layers

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                subnet: SubnetConfig | None = None) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool or None -> [B, T, D].

        subnet: the layers (in order), widths and bit-widths to run (None = every layer, float).
        """
        x = x + self.pos_conv_embed(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        if subnet is None:
            plan = [(layer, None) for layer in self.layers]
        else:
            plan = [(self.layers[c.index], c) for c in subnet.layers]
        for layer, choice in plan:
            # Layer drop acts on the layers that run, subnet or not.
            if self.training and self.layer_drop > 0 and torch.rand(()).item() < self.layer_drop:
                continue
            x = layer(x, key_mask, choice)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


def span_mask(size: int, lengths: list[int], prob: float, length: int, min_masks: int,
              generator: torch.Generator | None = None, max_spans: int | None = None) -> torch.Tensor:
    """Boolean ``[len(lengths), size]`` of random spans, one row per utterance: wav2vec2's
    span masking along one axis (frames or channels), as transformers' ``_compute_mask_indices``.

    Row ``b`` covers its first ``n = lengths[b]`` positions only.  It gets
    ``max(min_masks, int(prob * n / length + u))`` span starts (``u`` uniform in [0, 1), drawn
    per row), at most ``max_spans`` (None: no such cap) and at most ``n - length + 1``, drawn
    without replacement from the first ``n - length + 1`` positions; each span masks
    ``length`` positions (spans may overlap).  A row shorter than ``length`` is not masked.
    """
    mask = torch.zeros(len(lengths), size, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n < length:
            continue  # too short for one span
        spans = int(prob * n / length + torch.rand((), generator=generator).item())
        spans = max(spans, min_masks)
        if max_spans is not None:
            spans = min(spans, max_spans)
        spans = min(spans, n - length + 1)
        for start in torch.randperm(n - length + 1, generator=generator)[:spans].tolist():
            mask[b, start:start + length] = True
    return mask


class TimeMasking(nn.Module):
    """wav2vec2's fine-tuning masking: random spans of frames replaced by a learned vector.

    Per utterance of ``n`` valid frames, ``max(min_masks, int(prob * n / length + u))`` span
    starts (``u`` uniform in [0, 1), as transformers' ``_compute_mask_indices``) are drawn
    without replacement from the first ``n - length + 1`` frames, at most ``T // length``
    of them for a batch padded to ``T`` frames (transformers' cap); each masks ``length``
    frames (spans may overlap, so about ``prob`` of the frames are masked). Identity in eval
    mode. ``mask_emb`` [D] is transformers' ``masked_spec_embed`` / fairseq's ``mask_emb``.
    """

    def __init__(self, embed_dim: int, prob: float, length: int, min_masks: int):
        super().__init__()
        self.prob, self.length, self.min_masks = prob, length, min_masks
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())

    def span_mask(self, frames: int, lengths: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Boolean ``[B, frames]``: True where a frame is masked (always inside its utterance)."""
        # At most frames // length spans (frames: the padded length), as transformers caps them.
        return span_mask(frames, lengths, self.prob, self.length, self.min_masks, generator,
                         max_spans=frames // self.length)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, D] projected features, lengths: [B] valid frames or None -> [B, T, D]."""
        if not self.training or self.prob == 0.0:
            return x
        n = lengths.tolist() if lengths is not None else [x.shape[1]] * x.shape[0]
        mask = self.span_mask(x.shape[1], n).to(x.device)
        return torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)


class FeatureMasking(nn.Module):
    """wav2vec2's fine-tuning feature (channel) masking: random spans of channels set to 0
    in every frame of an utterance (transformers' ``mask_feature_*``, fairseq's
    ``mask_channel_*``).

    Per utterance, ``max(min_masks, int(prob * D / length + u))`` spans of ``length``
    channels (at most ``D // length`` spans, as transformers caps them), drawn as
    ``TimeMasking``'s spans over the ``D`` channels: about ``prob`` of the channels are
    zeroed for all its frames. Identity in eval mode; no parameters.
    """

    def __init__(self, prob: float, length: int, min_masks: int):
        super().__init__()
        self.prob, self.length, self.min_masks = prob, length, min_masks

    def span_mask(self, channels: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Boolean ``[batch, channels]``: True where a channel is zeroed (in every frame)."""
        return span_mask(channels, [channels] * batch, self.prob, self.length, self.min_masks, generator,
                         max_spans=channels // self.length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] (time-masked) projected features -> [B, T, D]."""
        if not self.training or self.prob == 0.0:
            return x
        mask = self.span_mask(x.shape[2], x.shape[0]).to(x.device)
        return x.masked_fill(mask[:, None, :], 0.0)


class Encoder(nn.Module):
    """Feature projection, zeroing of padded frames, time masking then feature masking
    (training only, each when configured), then the transformer."""

    def __init__(self, feature_projection: FeatureProjection, transformer: Transformer,
                 time_masking: "TimeMasking | None" = None, feature_masking: "FeatureMasking | None" = None):
        super().__init__()
        self.feature_projection = feature_projection
        self.transformer = transformer
        self.time_masking = time_masking
        self.feature_masking = feature_masking

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None,
                subnet: SubnetConfig | None = None) -> torch.Tensor:
        """features: [B, T, C], lengths: [B] frames or None -> [B, T, D]; ``subnet`` as ``Transformer``."""
        x = self.feature_projection(features)
        key_mask = None
        if lengths is not None:
            key_mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # [B, T]
            x = x.masked_fill(~key_mask[..., None], 0.0)
        if self.time_masking is not None:
            x = self.time_masking(x, lengths)
        if self.feature_masking is not None:
            x = self.feature_masking(x)
        return self.transformer(x, key_mask, subnet)


class Wav2Vec2CTCModel(nn.Module):
    """wav2vec2 / HuBERT encoder with a linear CTC head (``aux``, torchaudio's name).

    Called like torchaudio's model for logits, ``model(waveforms, lengths)``, or like
    ``ASRModel`` for a training loss, ``model(waveforms, lengths, tokens, token_lens)``
    (so the trainer's strategies drive it); both take ``subnet``.  With ``config.quant``
    it is a supernet: its transformer layers' weights (and the extractor's, when
    ``extractor_bits`` < 32) have ``quantizer`` children.  ``search_space`` (a
    ``SearchSpace`` or None) is the space it was trained on, as on ``ASRModel``.
    """

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        config.validate()
        self.config = config
        d = config.encoder_embed_dim
        self.feature_extractor = FeatureExtractor(config)
        layers = nn.ModuleList(
            EncoderLayer(
                SelfAttention(d, config.layer_num_heads(i), config.encoder_attention_dropout,
                              head_dim=config.head_dim),
                FeedForward(d, config.layer_ff_interm_features(i), config.encoder_ff_interm_dropout,
                            config.encoder_dropout),
                config.encoder_dropout, config.encoder_layer_norm_first, config.layer_norm_eps)
            for i in range(config.encoder_num_layers))
        transformer = Transformer(
            ConvolutionalPositionalEmbedding(d, config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups),
            config.encoder_dropout, layers, config.encoder_layer_norm_first, config.encoder_layer_drop,
            config.layer_norm_eps)
        projection = FeatureProjection(config.extractor_conv_layer_config[-1][0], d,
                                       config.encoder_projection_dropout, config.feature_projection_layer_norm,
                                       config.layer_norm_eps)
        masking = (TimeMasking(d, config.mask_time_prob, config.mask_time_length, config.mask_time_min_masks)
                   if config.mask_time_prob > 0.0 else None)  # no parameter when off: torchaudio's keys
        feature_masking = (FeatureMasking(config.mask_feature_prob, config.mask_feature_length,
                                          config.mask_feature_min_masks)
                           if config.mask_feature_prob > 0.0 else None)  # no parameters either way
        self.encoder = Encoder(projection, transformer, masking, feature_masking)
        self.final_dropout = nn.Dropout(config.final_dropout)
        self.aux = nn.Linear(d, config.vocab_size)
        if config.quant is not None:
            add_quantizers(self, config.quant)
        self.search_space = None

    @property
    def quant_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the quantizable weights (``allinone.elastic.quant.quantizable_layers``):
        the transformer layers' Linears, plus the extractor's convolutions when ``extractor_bits`` < 32.
        The positional convolution, the feature projection and ``aux`` stay float."""
        prefixes = ARCH_QUANT_PREFIXES["wav2vec2_ctc"]
        if self.config.extractor_bits != FLOAT_BITS:
            prefixes += ("feature_extractor.conv_layers.",)
        return prefixes

    @property
    def ctc(self) -> nn.Linear:
        """The CTC output layer under ``ASRModel``'s name (the strategies check that it exists)."""
        return self.aux

    def check_subnet(self, subnet: SubnetConfig) -> None:
        """Raise ``ValueError`` if ``subnet`` asks for layers or widths this model lacks."""
        cfg = self.config
        n = cfg.encoder_num_layers
        check_fits(subnet, n, cfg.layer_ff_interm_features, cfg.layer_num_heads, "layer",
                   f"the model has {n} transformer layers")

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None,
               subnet: SubnetConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """waveforms [B, S], lengths [B] valid samples or None -> (enc [B, T, D], out_lengths [B] or None).

        subnet: the layers, widths and bit-widths to run (None = the whole float model); any
        subnet runs the extractor at ``config.extractor_bits``.
        """
        bits = FLOAT_BITS
        if subnet is not None:
            self.check_subnet(subnet)
            bits = self.config.extractor_bits
        features, out_lengths = self.feature_extractor(waveforms, lengths, bits)  # [B, T, C]
        return self.encoder(features, out_lengths, subnet), out_lengths

    def logits(self, enc: torch.Tensor) -> torch.Tensor:
        """enc [B, T, D] -> CTC logits [B, T, V] (after ``final_dropout``)."""
        return F.linear(self.final_dropout(enc), self.aux.weight, self.aux.bias)

    def ctc_log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """enc [B, T, D] -> CTC log-probabilities [B, T, V]."""
        return F.log_softmax(self.logits(enc), dim=-1)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, token_lens: torch.Tensor | None = None,
                subnet: SubnetConfig | None = None, return_ctc_log_probs: bool = False):
        """Logits, or (with ``tokens``) ``ASRModel``'s training-loss dict.

        Args:
            waveforms: [B, S]; lengths: [B] valid samples or None.
            tokens: [B, U] token ids padded with -1 (blank = 0), token_lens: [B]; None = no loss.
            subnet: the subnet to run (None = the whole float model).
            return_ctc_log_probs: with tokens, also return ``ctc_log_probs`` [B, T, V] and
                ``enc_lens`` [B] (for distillation between subnets).
        Returns:
            without tokens: (logits [B, T, V], out_lengths [B] valid frames, or None when
            ``lengths`` is None); with tokens: dict with ``loss`` (= ``loss_ctc``, ESPnet's
            CTC loss: utterance sums / batch size), ``loss_ctc``, ``loss_att`` = ``acc`` = None.
        """
        enc, out_lengths = self.encode(waveforms, lengths, subnet)
        if tokens is None:
            return self.logits(enc), out_lengths
        if lengths is None or token_lens is None:
            raise ValueError("a training loss needs lengths and token_lens")
        tokens = tokens[:, : int(token_lens.max())]
        log_probs = self.ctc_log_probs(enc)  # once: final_dropout must be the same in loss and KL
        loss = ctc_loss(log_probs, out_lengths, tokens, token_lens).to(enc.dtype)
        out = {"loss": loss, "loss_ctc": loss, "loss_att": None, "acc": None}
        if return_ctc_log_probs:
            out["ctc_log_probs"], out["enc_lens"] = log_probs, out_lengths
        return out
