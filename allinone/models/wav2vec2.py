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

As in ``allinone.models.conformer``, every transformer layer computes with its weights
through ``F.linear`` on ``self.<layer>.weight`` (via ``SelfAttention.linear`` /
``FeedForward.linear``), and the number of attention heads is read from the projected
width (``width // head_dim``), so a later supernet can slice or fake-quantize weights by
overriding one small method.  Nothing elastic is built here.

Tensors are batch-first: waveforms ``[batch, sample]``, features ``[batch, frame,
feature]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
    """Architecture of a wav2vec2 / HuBERT CTC model: plain numbers and strings only.

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

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_num_heads

    def validate(self) -> "Wav2Vec2Config":
        """Raise ``ValueError`` naming the first unsupported or inconsistent field."""
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
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(f"Wav2Vec2Config.encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_num_heads={self.encoder_num_heads}")
        if self.encoder_embed_dim % self.encoder_pos_conv_groups:
            raise ValueError(f"Wav2Vec2Config.encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_pos_conv_groups={self.encoder_pos_conv_groups}")
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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, C_in, T_in], lengths: [B] or None -> ([B, C_out, T_out], [B] or None)."""
        x = self.conv(x)
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

    def forward(self, waveforms: torch.Tensor,
                lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """waveforms: [B, S], lengths: [B] or None -> (features [B, T, C], lengths [B] or None)."""
        if waveforms.ndim != 2:
            raise ValueError(f"expected waveforms of shape [batch, sample], got {list(waveforms.shape)}")
        x = waveforms.unsqueeze(1)
        for block in self.conv_layers:
            x, lengths = block(x, lengths)
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
    """Multi-head self-attention; heads = projected width // ``head_dim``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with ``layer``'s weight and bias: the hook a supernet overrides."""
        return F.linear(x, layer.weight, layer.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool (True = valid frame) or None -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = (self.linear(layer, x) for layer in (self.q_proj, self.k_proj, self.v_proj))
        heads = q.shape[-1] // self.head_dim
        q, k, v = (z.view(b, t, heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, heads * self.head_dim)
        return self.linear(self.out_proj, y)


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, io_features: int, intermediate_features: int, intermediate_dropout: float,
                 output_dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(io_features, intermediate_features)
        self.intermediate_dropout = nn.Dropout(intermediate_dropout)
        self.output_dense = nn.Linear(intermediate_features, io_features)
        self.output_dropout = nn.Dropout(output_dropout)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with ``layer``'s weight and bias: the hook a supernet overrides."""
        return F.linear(x, layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        h = self.intermediate_dropout(F.gelu(self.linear(self.intermediate_dense, x)))  # [B, T, FFN]
        return self.output_dropout(self.linear(self.output_dense, h))


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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool or None -> [B, T, D]."""
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x = residual + self.dropout(self.attention(x, key_mask))
        if self.layer_norm_first:
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x)
        return self.final_layer_norm(x + self.feed_forward(x))


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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D], key_mask: [B, T] bool or None -> [B, T, D]."""
        x = x + self.pos_conv_embed(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        for layer in self.layers:
            if self.training and self.layer_drop > 0 and torch.rand(()).item() < self.layer_drop:
                continue
            x = layer(x, key_mask)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class Encoder(nn.Module):
    """Feature projection, zeroing of padded frames, then the transformer."""

    def __init__(self, feature_projection: FeatureProjection, transformer: Transformer):
        super().__init__()
        self.feature_projection = feature_projection
        self.transformer = transformer

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """features: [B, T, C], lengths: [B] frames or None -> [B, T, D]."""
        x = self.feature_projection(features)
        key_mask = None
        if lengths is not None:
            key_mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # [B, T]
            x = x.masked_fill(~key_mask[..., None], 0.0)
        return self.transformer(x, key_mask)


class Wav2Vec2CTCModel(nn.Module):
    """wav2vec2 / HuBERT encoder with a linear CTC head (``aux``, torchaudio's name)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        config.validate()
        self.config = config
        d = config.encoder_embed_dim
        self.feature_extractor = FeatureExtractor(config)
        layers = nn.ModuleList(
            EncoderLayer(
                SelfAttention(d, config.encoder_num_heads, config.encoder_attention_dropout),
                FeedForward(d, config.encoder_ff_interm_features, config.encoder_ff_interm_dropout,
                            config.encoder_dropout),
                config.encoder_dropout, config.encoder_layer_norm_first, config.layer_norm_eps)
            for _ in range(config.encoder_num_layers))
        transformer = Transformer(
            ConvolutionalPositionalEmbedding(d, config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups),
            config.encoder_dropout, layers, config.encoder_layer_norm_first, config.encoder_layer_drop,
            config.layer_norm_eps)
        projection = FeatureProjection(config.extractor_conv_layer_config[-1][0], d,
                                       config.encoder_projection_dropout, config.feature_projection_layer_norm,
                                       config.layer_norm_eps)
        self.encoder = Encoder(projection, transformer)
        self.final_dropout = nn.Dropout(config.final_dropout)
        self.aux = nn.Linear(d, config.vocab_size)

    def forward(self, waveforms: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """waveforms: [B, S], lengths: [B] valid samples or None ->
        (logits [B, T, V], out_lengths [B] valid frames, or None when ``lengths`` is None)."""
        features, out_lengths = self.feature_extractor(waveforms, lengths)  # [B, T, C]
        x = self.encoder(features, out_lengths)  # [B, T, D]
        logits = F.linear(self.final_dropout(x), self.aux.weight, self.aux.bias)
        return logits, out_lengths
