"""Conformer encoder, numerically and name-for-name compatible with ESPnet2's.

The modules mirror ``espnet2.asr.encoder.conformer_encoder.ConformerEncoder`` so that
an ESPnet state dict loads with ``strict=True`` and gives the same output in eval
mode.  Our own structure on top of that:

* Every block computes with its weights through ``F.linear`` / ``F.conv1d`` on
  ``self.<layer>.weight`` (the ``nn.Linear`` / ``nn.Conv1d`` children exist for the
  parameter names), so a supernet can slice or fake-quantize a weight before use by
  overriding one small method, without copying the forward.
* The number of attention heads is read from the projected tensor's width
  (``width // head_dim``), so passing the first ``h * head_dim`` rows of the
  projections runs ``h`` heads with no other change.
* Blocks live in ``nn.ModuleList`` ``encoders``: depth is the first ``k`` of them.
* A supernet subnet (``allinone.elastic.subnet.SubnetConfig``) is passed explicitly to
  ``ConformerEncoder.forward``; every weight goes through ``subnet_weight``, which takes
  the first rows / columns (views, no copies) and, when the layer has a ``quantizer``
  child (models with a ``quant`` section), fake-quantizes it.  ``subnet=None`` takes
  neither step: it is the plain model.
* Extracted subnets are plain models of a config with ``head_dim`` and per-block
  ``layer_linear_units`` / ``layer_attention_heads``.

Tensors are batch-first: ``[batch, frame, feature]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allinone.elastic.slicing import subnet_weight  # shared with the wav2vec2 model; re-exported here
from allinone.elastic.subnet import FLOAT_BITS, LayerChoice, SubnetConfig, check_fits

__all__ = [
    "ConformerConfig",
    "ConformerEncoder",
    "ConformerBlock",
    "Conv2dSubsampling",
    "RelPositionalEncoding",
    "RelPositionSelfAttention",
    "PaddingMask",
    "FeedForward",
    "ConvolutionModule",
    "SUBSAMPLING_LAYERS",
    "subnet_weight",
]

# Each Conv2d of ESPnet's subsampling front ends as (kernel, stride); the output
# frame count follows from them (see ``Conv2dSubsampling.output_lengths``).
SUBSAMPLING_LAYERS: dict[str, tuple[tuple[int, int], ...]] = {
    "conv2d": ((3, 2), (3, 2)),  # 1/4
    "conv2d6": ((3, 2), (5, 3)),  # 1/6
    "conv2d8": ((3, 2), (3, 2), (3, 2)),  # 1/8
}

_ACTIVATIONS = {
    "swish": F.silu,  # ESPnet's Swish: x * sigmoid(x)
    "relu": F.relu,
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "selu": F.selu,
}

# Options whose value must be exactly one of these (ESPnet has more; we refuse them
# rather than silently computing something else).
_SUPPORTED_CHOICES = {
    "input_layer": tuple(SUBSAMPLING_LAYERS),
    "pos_enc_layer_type": ("rel_pos",),
    "selfattention_layer_type": ("rel_selfattn",),
    "rel_pos_type": ("latest",),
    "positionwise_layer_type": ("linear",),
    "activation_type": tuple(_ACTIVATIONS),
}

# ESPnet's LayerNorm uses eps=1e-12 (torch's default is 1e-5).
LAYER_NORM_EPS = 1e-12


@dataclass
class ConformerConfig:
    """Architecture of a Conformer encoder: plain numbers and strings only.

    Field names and meanings are those of ESPnet's ``ConformerEncoder`` arguments;
    defaults are the usual recipe values (12 blocks, macaron FFN, latest relative
    positional encoding), which differ from ESPnet's own constructor defaults.
    """

    input_size: int = 80
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 12
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    input_layer: str = "conv2d"
    normalize_before: bool = True
    macaron_style: bool = True
    pos_enc_layer_type: str = "rel_pos"
    selfattention_layer_type: str = "rel_selfattn"
    rel_pos_type: str = "latest"
    activation_type: str = "swish"
    use_cnn_module: bool = True
    cnn_module_kernel: int = 31
    zero_triu: bool = False
    positionwise_layer_type: str = "linear"
    # Intermediate CTC: the blocks (1-based, < num_blocks) whose outputs, after the final
    # norm, also feed the CTC loss (ASRModelConfig.interctc_weight); training only.
    interctc_layer_idx: list[int] = dataclasses.field(default_factory=list)
    # Self-conditioned CTC (ESPnet's; Nozaki & Komatsu 2021): at each tap the CTC posteriors
    # of the tapped output, through ``conditioning_layer`` (Linear V -> D, made by the ASR
    # model that owns the CTC head), are added to the block output the next block reads. It
    # changes the model function, in training and decoding alike.
    interctc_use_conditioning: bool = False
    # allinone only (None = ESPnet's uniform encoder): width of one attention head
    # (default output_size // attention_heads) and per-block FFN units / heads, which
    # extracted subnets need.
    head_dim: int | None = None
    layer_linear_units: list[int] | None = None
    layer_attention_heads: list[int] | None = None

    # Fields ESPnet's ConformerEncoder does not have.
    ALLINONE_ONLY = ("head_dim", "layer_linear_units", "layer_attention_heads")

    @property
    def attention_head_dim(self) -> int:
        """d_k: ``head_dim`` or ``output_size // attention_heads``."""
        return self.head_dim if self.head_dim is not None else self.output_size // self.attention_heads

    def block_linear_units(self, i: int) -> int:
        """FFN hidden units of block ``i``."""
        return self.layer_linear_units[i] if self.layer_linear_units is not None else self.linear_units

    def block_attention_heads(self, i: int) -> int:
        """Attention heads of block ``i``."""
        return self.layer_attention_heads[i] if self.layer_attention_heads is not None else self.attention_heads

    def espnet_kwargs(self) -> dict:
        """Arguments of ESPnet's ``ConformerEncoder`` for this config.

        Raises ``ValueError`` when the config is not expressible in ESPnet (blocks of
        different widths, or a head width other than ``output_size / heads``).
        """
        d = self.to_dict()
        for k in self.ALLINONE_ONLY:
            d.pop(k)
        units = {self.block_linear_units(i) for i in range(self.num_blocks)}
        heads = {self.block_attention_heads(i) for i in range(self.num_blocks)}
        if len(units) > 1 or len(heads) > 1:
            raise ValueError(f"ESPnet's ConformerEncoder needs the same width in every block; this config has "
                             f"FFN units {self.layer_linear_units} and heads {self.layer_attention_heads}")
        d["linear_units"], d["attention_heads"] = units.pop(), heads.pop()
        if d["attention_heads"] * self.attention_head_dim != self.output_size:
            raise ValueError(f"ESPnet's attention has head width output_size / heads = "
                             f"{self.output_size} / {d['attention_heads']}; this config has "
                             f"head_dim={self.attention_head_dim}")
        return d

    def validate(self) -> "ConformerConfig":
        """Raise ``ValueError`` naming the first unsupported or inconsistent field."""
        for name, allowed in _SUPPORTED_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"ConformerConfig.{name}={value!r} is not supported; "
                    f"supported: {', '.join(map(repr, allowed))}"
                )
        for name in ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConformerConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"ConformerConfig.head_dim must be None or a positive int, got {self.head_dim!r}")
        for name in ("layer_linear_units", "layer_attention_heads"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, (list, tuple)) or len(value) != self.num_blocks
                    or not all(isinstance(v, int) and v >= 1 for v in value)):
                raise ValueError(f"ConformerConfig.{name} must be None or {self.num_blocks} positive ints "
                                 f"(one per block), got {value!r}")
        idx = self.interctc_layer_idx
        if (not isinstance(idx, (list, tuple)) or len(set(idx)) != len(idx)
                or not all(isinstance(i, int) and 0 < i < self.num_blocks for i in idx)):
            raise ValueError(f"ConformerConfig.interctc_layer_idx must list distinct blocks 1..{self.num_blocks - 1} "
                             f"(the last block's output is the CTC input already), got {idx!r}")
        if self.interctc_use_conditioning and not idx:
            raise ValueError("ConformerConfig.interctc_use_conditioning needs the blocks to condition on "
                             "(interctc_layer_idx, e.g. [6])")
        if self.head_dim is None and self.output_size % self.attention_heads != 0:
            raise ValueError(
                f"ConformerConfig.output_size={self.output_size} must be divisible by "
                f"attention_heads={self.attention_heads}"
            )
        if self.use_cnn_module and (self.cnn_module_kernel < 1 or self.cnn_module_kernel % 2 == 0):
            raise ValueError(
                f"ConformerConfig.cnn_module_kernel={self.cnn_module_kernel} must be odd "
                "(same-length 'SAME' padding)"
            )
        for name in ("dropout_rate", "positional_dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ConformerConfig.{name}={value} must be in [0, 1)")
        if Conv2dSubsampling.output_feature_size(self.input_size, self.input_layer) < 1:
            raise ValueError(
                f"ConformerConfig.input_size={self.input_size} is too small for "
                f"input_layer={self.input_layer!r}"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConformerConfig":
        """Build from a plain dict; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ConformerConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        for name in ("layer_linear_units", "layer_attention_heads", "interctc_layer_idx"):
            if d.get(name) is not None:
                d[name] = list(d[name])
        return cls(**d)


# --------------------------------------------------------------------------- front end


class Conv2dSubsampling(nn.Module):
    """2-D convolutional subsampling (ESPnet ``Conv2dSubsampling{,6,8}``).

    Stays full precision (the method keeps the front end unquantized), so it calls its
    layers directly.  Parameter names follow ESPnet: ``conv.{0,2,4}`` and ``out.0``
    (``conv2d``/``conv2d6``, where ESPnet's ``out.1`` is the parameter-free positional
    encoding) or ``out`` (``conv2d8``).

    Args:
        input_size: feature dimension F of the input.
        output_size: model dimension D.
        input_layer: ``"conv2d"`` (1/4), ``"conv2d6"`` (1/6) or ``"conv2d8"`` (1/8).
    """

    def __init__(self, input_size: int, output_size: int, input_layer: str = "conv2d"):
        super().__init__()
        if input_layer not in SUBSAMPLING_LAYERS:
            raise ValueError(
                f"input_layer={input_layer!r} is not supported; supported: {', '.join(SUBSAMPLING_LAYERS)}"
            )
        self.layers = SUBSAMPLING_LAYERS[input_layer]
        convs: list[nn.Module] = []
        in_ch = 1
        for kernel, stride in self.layers:
            convs += [nn.Conv2d(in_ch, output_size, kernel, stride), nn.ReLU()]
            in_ch = output_size
        self.conv = nn.Sequential(*convs)
        linear = nn.Linear(output_size * self.output_feature_size(input_size, input_layer), output_size)
        # ESPnet puts the linear layer in a Sequential (key "out.0") except for conv2d8.
        self.out = linear if input_layer == "conv2d8" else nn.Sequential(linear)
        self.min_frames = self.min_input_frames(input_layer)

    @staticmethod
    def output_feature_size(input_size: int, input_layer: str) -> int:
        """Frequency bins left after the convolutions (valid convolution, no padding)."""
        f = input_size
        for kernel, stride in SUBSAMPLING_LAYERS[input_layer]:
            f = (f - kernel) // stride + 1
        return f

    @staticmethod
    def min_input_frames(input_layer: str) -> int:
        """Shortest padded input ESPnet accepts (``check_short_utt``): 7, 11 or 15 frames."""
        return {"conv2d": 7, "conv2d6": 11, "conv2d8": 15}[input_layer]

    def output_lengths(self, lengths: torch.Tensor, max_frames: int) -> torch.Tensor:
        """Valid output frames per utterance, as ESPnet derives them from its mask.

        ESPnet slices the frame mask ``mask[:, :-(kernel-1):stride]`` per convolution:
        output frame ``j`` is valid when its first input frame ``j*stride`` is valid.
        Args: lengths [batch], max_frames = padded input length T.  Returns [batch].
        """
        mask = torch.arange(max_frames, device=lengths.device)[None, :] < lengths[:, None]
        for kernel, stride in self.layers:
            mask = mask[:, : -(kernel - 1) : stride]
        return mask.sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, frame, feat] -> [batch, frame', output_size]."""
        x = self.conv(x.unsqueeze(1))  # [B, D, T', F']
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))


class RelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(D) and returns sinusoidal relative position embeddings.

    ESPnet's ``RelPositionalEncoding`` ("latest"): row ``k`` of the returned
    ``[1, 2T-1, D]`` tensor encodes relative position ``T-1-k`` (from ``T-1`` down to
    ``-(T-1)``).  Computed on the fly for each length (no buffer, so no state-dict key,
    exactly like ESPnet).
    """

    def __init__(self, d_model: int, dropout_rate: float):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout_rate)
        # (max length, embeddings [1, 2*max-1, D]) of the last device / dtype; a plain
        # attribute, not a buffer, so the state dict stays ESPnet's.
        self._cache: tuple[int, torch.Tensor] | None = None

    def cached_position_embeddings(self, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """``position_embeddings`` as a slice of a cached longer table (ESPnet's ``extend_pe``).

        Row ``k`` of the table for ``n >= length`` frames is position ``n-1-k``, so rows
        ``n-length .. n+length-2`` are exactly ``position_embeddings(length)`` (same
        float32 arithmetic per position): about a dozen small operations per forward
        become one view. Under ``torch.compile`` the table is computed in the graph.
        """
        if torch.compiler.is_compiling():
            return self.position_embeddings(length, device, dtype)
        cache = self._cache
        if (cache is None or cache[0] < length or cache[1].device != torch.device(device or "cpu")
                or cache[1].dtype != dtype):
            n = max(length, cache[0] if cache is not None else 0)
            # A normal tensor even when first made under inference_mode, so a later
            # training step may save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                cache = self._cache = (n, self.position_embeddings(n, device, dtype))
        n, table = cache
        return table[:, n - length: n + length - 1]

    def position_embeddings(self, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """[1, 2*length-1, D] for relative positions length-1, ..., -(length-1)."""
        # Same float32 arithmetic as ESPnet, so the values agree to the last bit or so.
        position = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
            * -(math.log(10000.0) / self.d_model)
        )
        pe = torch.zeros(2 * length - 1, self.d_model, device=device)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        return pe.unsqueeze(0).to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, frame, D] -> (x * sqrt(D) [batch, frame, D], pos_emb [1, 2*frame-1, D])."""
        pos_emb = self.cached_position_embeddings(x.size(1), x.device, x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


# --------------------------------------------------------------------------- block parts


class PaddingMask:
    """Key padding of one batch and what each attention layer derives from it, made once.

    The encoder builds one per forward and hands it to every block, so the additive mask
    and the "utterance has no valid frame" flags cost a few operations per forward rather
    than per layer.  ``RelPositionSelfAttention`` also accepts the plain bool mask.

    Args: key_padding_mask [batch, T] bool, True at padded frames.
    """

    def __init__(self, key_padding_mask: torch.Tensor):
        self.key_padding_mask = key_padding_mask
        self._bias: dict[torch.dtype, torch.Tensor] = {}
        self._empty: torch.Tensor | None = None

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """[batch, 1, 1, T] additive mask: 0 at valid keys, ``finfo(dtype).min`` at padded ones."""
        b = self._bias.get(dtype)
        if b is None:
            pad = self.key_padding_mask[:, None, None, :]
            b = self._bias[dtype] = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(
                pad, torch.finfo(dtype).min)
        return b

    def empty(self) -> torch.Tensor:
        """[batch, 1, 1, 1] bool: True for an utterance without any valid frame."""
        if self._empty is None:
            self._empty = self.key_padding_mask.all(dim=1)[:, None, None, None]
        return self._empty


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions.

    ESPnet's ``RelPositionMultiHeadedAttention``: scores are
    ``((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k)`` with learned per-head biases
    ``pos_bias_u``/``pos_bias_v`` [heads, d_k] and projected position embeddings p.

    The content term goes through ``F.scaled_dot_product_attention``; the position term
    and the key padding enter as its additive float mask.  Heads are counted from the
    projection width, so sliced weights run fewer heads.

    Args:
        n_head: heads H; n_feat: model dimension D; head_dim: d_k (default D / H;
            extracted subnets with fewer heads keep the supernet's d_k, so H * d_k < D).
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, zero_triu: bool = False,
                 head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if n_feat % n_head != 0:
                raise ValueError(f"attention size {n_feat} is not divisible by heads {n_head}")
            head_dim = n_feat // n_head
        self.d_k = head_dim
        self.dropout_rate = dropout_rate
        self.zero_triu = zero_triu
        width = n_head * head_dim
        self.linear_q = nn.Linear(n_feat, width)
        self.linear_k = nn.Linear(n_feat, width)
        self.linear_v = nn.Linear(n_feat, width)
        self.linear_out = nn.Linear(width, n_feat)
        self.linear_pos = nn.Linear(n_feat, width, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, time, heads*d_k] -> [batch, heads, time, d_k]."""
        b, t, width = x.shape
        return x.view(b, t, width // self.d_k, self.d_k).transpose(1, 2)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """Pick, for query i and key j, the column of relative position i-j.

        x: [batch, heads, T, 2T-1] whose column k belongs to relative position T-1-k.
        Returns [batch, heads, T, T] with out[..., i, j] = x[..., i, T-1-i+j].

        Views only (no gather, whose backward would be a scatter-add): in the flattened
        ``[T * (2T-1)]`` rows, element ``(i, j)`` sits at ``T-1 + i*(2T-2) + j``, so rows of
        ``2T-2`` starting at ``T-1`` hold the shifted rows in their first ``T`` columns.
        (Plain views rather than ``as_strided``, so ``torch.compile`` captures it too.)
        """
        t = x.size(-2)
        if x.size(-1) != 2 * t - 1:
            raise ValueError(f"rel_shift expects [..., T, 2T-1], got {tuple(x.shape)}")
        if t == 1:
            return x
        flat = x.reshape(*x.shape[:-2], t * (2 * t - 1))
        return flat[..., t - 1: t - 1 + t * (2 * t - 2)].unflatten(-1, (t, 2 * t - 2))[..., :t]

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_padding_mask: torch.Tensor | PaddingMask | None = None,
        heads: int | None = None, bits: int = FLOAT_BITS,
    ) -> torch.Tensor:
        """Self-attention over frames.

        Args:
            x: [batch, T, D] (already layer-normed).
            pos_emb: [1, 2T-1, D] from ``RelPositionalEncoding``.
            key_padding_mask: [batch, T] bool, True at padded frames (never attended to), or
                a ``PaddingMask`` of it (what the encoder passes).
            heads: run only the first ``heads`` heads (None = all); bits: weight bit-width.
        Returns:
            [batch, T, D]. Padded query frames are computed too (as ESPnet does).
        """
        width = None if heads is None else heads * self.d_k
        q = F.linear(x, *subnet_weight(self.linear_q, bits, rows=width))  # [B, T, H*d_k]
        heads = q.size(-1) // self.d_k
        # View [B, T, H, d_k] to add the per-head biases, then heads first.
        q = q.view(*q.shape[:2], heads, self.d_k)
        bias_u, bias_v = self.pos_bias_u, self.pos_bias_v
        if heads != bias_u.size(0):  # (no slice, and no slice_backward, with all heads)
            bias_u, bias_v = bias_u[:heads], bias_v[:heads]
        q_u = (q + bias_u).transpose(1, 2)  # [B, H, T, d_k]
        q_v = (q + bias_v).transpose(1, 2)
        k = self._heads(F.linear(x, *subnet_weight(self.linear_k, bits, rows=width)))
        v = self._heads(F.linear(x, *subnet_weight(self.linear_v, bits, rows=width)))
        p = self._heads(F.linear(pos_emb, *subnet_weight(self.linear_pos, bits, rows=width)))  # [1, H, 2T-1, d_k]

        scale = 1.0 / math.sqrt(self.d_k)
        pos_scores = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # [B, H, T, T]
        if self.zero_triu:
            # ESPnet's option: drop the position term for keys to the right (j > i).
            pos_scores = pos_scores.tril()
        if key_padding_mask is None:
            bias = pos_scores * scale
        else:
            if not isinstance(key_padding_mask, PaddingMask):
                key_padding_mask = PaddingMask(key_padding_mask)
            # pad + scale * pos_scores in one operation: 0 + exact product at valid keys;
            # at padded keys finfo.min (|scale * pos| is far below half an ulp of it), as
            # masked_fill gave.  finfo.min rather than -inf: softmax stays finite even for
            # a fully padded row (an empty utterance); that row is zeroed below as ESPnet does.
            bias = torch.add(key_padding_mask.bias(pos_scores.dtype), pos_scores, alpha=scale)
        context = F.scaled_dot_product_attention(
            q_u, k, v, attn_mask=bias,
            dropout_p=self.dropout_rate if self.training else 0.0, scale=scale,
        )  # [B, H, T, d_k]
        if key_padding_mask is not None:
            context = context.masked_fill(key_padding_mask.empty(), 0.0)
        b, _, t, _ = context.shape
        context = context.transpose(1, 2).reshape(b, t, heads * self.d_k)
        return F.linear(context, *subnet_weight(self.linear_out, bits, cols=width))


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``w_2(dropout(act(w_1(x))))`` (ESPnet ``PositionwiseFeedForward``).

    The hidden width is ``w_1.weight.size(0)``, so the first-k units of a supernet are
    the first k rows of ``w_1`` and columns of ``w_2``.
    """

    def __init__(self, size: int, hidden_units: int, dropout_rate: float, activation: str = "swish"):
        super().__init__()
        self.w_1 = nn.Linear(size, hidden_units)
        self.w_2 = nn.Linear(hidden_units, size)
        self.dropout = nn.Dropout(dropout_rate)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, units: int | None = None, bits: int = FLOAT_BITS) -> torch.Tensor:
        """x: [batch, T, D] -> [batch, T, D], with the first ``units`` hidden units (None = all)."""
        h = self.activation(F.linear(x, *subnet_weight(self.w_1, bits, rows=units)))
        return F.linear(self.dropout(h), *subnet_weight(self.w_2, bits, cols=units))


class ConvolutionModule(nn.Module):
    """Conformer convolution: pointwise conv + GLU, depthwise conv, BatchNorm, act, pointwise conv.

    As in ESPnet, padded frames are not masked here: they reach valid frames through the
    depthwise kernel, which is part of what "same output as ESPnet" means.
    """

    def __init__(self, channels: int, kernel_size: int, activation: str = "swish"):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"cnn_module_kernel={kernel_size} must be odd")
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels
        )
        self.norm = nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, bits: int = FLOAT_BITS) -> torch.Tensor:
        """x: [batch, T, D] -> [batch, T, D]; ``bits``: weight bit-width of the three convolutions."""
        x = x.transpose(1, 2)  # [B, D, T]: channels first for conv1d
        x = F.conv1d(x, *subnet_weight(self.pointwise_conv1, bits))
        x = F.glu(x, dim=1)  # [B, 2D, T] -> [B, D, T]
        dw = self.depthwise_conv
        x = F.conv1d(x, *subnet_weight(dw, bits), padding=dw.padding, groups=x.size(1))
        x = self.activation(self.norm(x))
        x = F.conv1d(x, *subnet_weight(self.pointwise_conv2, bits))
        return x.transpose(1, 2)


def _layer_norm(size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=LAYER_NORM_EPS)


class ConformerBlock(nn.Module):
    """One Conformer block (ESPnet ``EncoderLayer``), pre-norm or post-norm.

    ``x + 1/2 FFN(x)`` (macaron) -> ``+ MHSA`` -> ``+ Conv`` -> ``+ 1/2 FFN`` -> LayerNorm
    (``norm_final``, only with the conv module, as ESPnet).  Without macaron the
    final FFN has weight 1.

    Args: config, and ``index``, the block's position (for per-block widths).
    """

    def __init__(self, config: ConformerConfig, index: int = 0):
        super().__init__()
        d = config.output_size
        units = config.block_linear_units(index)
        self.normalize_before = config.normalize_before
        self.self_attn = RelPositionSelfAttention(
            config.block_attention_heads(index), d, config.attention_dropout_rate, config.zero_triu,
            head_dim=config.attention_head_dim,
        )
        self.feed_forward = FeedForward(d, units, config.dropout_rate, config.activation_type)
        self.feed_forward_macaron = (
            FeedForward(d, units, config.dropout_rate, config.activation_type)
            if config.macaron_style
            else None
        )
        self.conv_module = (
            ConvolutionModule(d, config.cnn_module_kernel, config.activation_type)
            if config.use_cnn_module
            else None
        )
        self.norm_ff = _layer_norm(d)
        self.norm_mha = _layer_norm(d)
        if self.feed_forward_macaron is not None:
            self.norm_ff_macaron = _layer_norm(d)
        if self.conv_module is not None:
            self.norm_conv = _layer_norm(d)
            self.norm_final = _layer_norm(d)
        self.ff_scale = 0.5 if config.macaron_style else 1.0
        self.dropout = nn.Dropout(config.dropout_rate)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, fn, scale: float = 1.0) -> torch.Tensor:
        """``x + scale * dropout(fn(norm(x)))`` (pre-norm) or ``norm(x + ...)`` (post-norm)."""
        y = self.dropout(fn(norm(x) if self.normalize_before else x))
        # One operation: x + y, or x + scale * y via add's alpha (exact for ESPnet's 0.5).
        x = x + y if scale == 1.0 else torch.add(x, y, alpha=scale)
        return x if self.normalize_before else norm(x)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_padding_mask: torch.Tensor | PaddingMask | None = None,
        choice: LayerChoice | None = None,
    ) -> torch.Tensor:
        """x: [batch, T, D], pos_emb: [1, 2T-1, D], key_padding_mask: [batch, T] bool or a
        ``PaddingMask`` -> [batch, T, D].

        ``choice``: FFN units, heads and bit-widths of this block in a subnet (None = all, float).
        """
        units = heads = None
        bits_attn = bits_ffn = bits_conv = FLOAT_BITS
        if choice is not None:
            units, heads = choice.ffn, choice.heads
            bits_attn, bits_ffn, bits_conv = choice.bits_attn, choice.bits_ffn, choice.bits_conv

        def ffn(module):
            return lambda h: module(h, units, bits_ffn)

        if self.feed_forward_macaron is not None:
            x = self._residual(x, self.norm_ff_macaron, ffn(self.feed_forward_macaron), self.ff_scale)
        x = self._residual(x, self.norm_mha,
                           lambda h: self.self_attn(h, pos_emb, key_padding_mask, heads, bits_attn))
        if self.conv_module is not None:
            x = self._residual(x, self.norm_conv, lambda h: self.conv_module(h, bits_conv))
        x = self._residual(x, self.norm_ff, ffn(self.feed_forward), self.ff_scale)
        if self.conv_module is not None:
            x = self.norm_final(x)
        return x


class ConformerEncoder(nn.Module):
    """Conformer encoder: subsampling, relative positions, ``num_blocks`` blocks, final norm.

    State-dict keys equal ESPnet2's ``ConformerEncoder`` for the same config
    (``embed.*``, ``encoders.N.*``, ``after_norm.*``).
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.config = config.validate()
        self.embed = Conv2dSubsampling(config.input_size, config.output_size, config.input_layer)
        self.pos_enc = RelPositionalEncoding(config.output_size, config.positional_dropout_rate)
        self.encoders = nn.ModuleList(ConformerBlock(config, i) for i in range(config.num_blocks))
        self.after_norm = _layer_norm(config.output_size) if config.normalize_before else None
        # Self-conditioned CTC: Linear(vocab, output_size), set by the model that owns the CTC
        # head (``ASRModel``), as ESPnet's ESPnetASRModel sets it.
        self.conditioning_layer: nn.Linear | None = None

    def output_size(self) -> int:
        return self.config.output_size

    def check_subnet(self, subnet: SubnetConfig) -> None:
        """Raise ``ValueError`` if ``subnet`` asks for blocks or widths this encoder lacks."""
        cfg = self.config
        check_fits(subnet, cfg.num_blocks, cfg.block_linear_units, cfg.block_attention_heads, "block",
                   f"the encoder has {cfg.num_blocks} blocks")

    def forward(
        self, xs: torch.Tensor, lengths: torch.Tensor, subnet: SubnetConfig | None = None,
        intermediate: bool = False, ctc_softmax=None,
    ) -> tuple[torch.Tensor, ...]:
        """Encode a padded batch.

        Args:
            xs: [batch, frame, input_size] (normalized features).
            lengths: [batch] valid frames per utterance.
            subnet: the blocks, widths and bit-widths to run (None = every block, float).
            intermediate: also return the outputs of the ``interctc_layer_idx`` blocks.
            ctc_softmax: [.., output_size] -> CTC posteriors [.., vocab]; needed (and only
                used) with ``interctc_use_conditioning``.
        Returns:
            (out [batch, frame', output_size], out_lengths [batch]); frame' is about
            frame/4 (conv2d), /6 or /8.  Values at padded output frames are not zero
            (ESPnet's are not either) and must be ignored via ``out_lengths``.
            With ``intermediate``, a third item: a list of [batch, frame', output_size],
            the output after the i-th block run (i in ``interctc_layer_idx``, counted along
            the subnet's blocks, ones at or past its depth left out), through the final norm
            as ESPnet does.
        """
        if xs.dim() != 3 or xs.size(-1) != self.config.input_size:
            raise ValueError(
                f"expected features [batch, frame, {self.config.input_size}], got {tuple(xs.shape)}"
            )
        if xs.size(1) < self.embed.min_frames:
            raise ValueError(
                f"input has {xs.size(1)} frames; input_layer={self.config.input_layer!r} "
                f"needs at least {self.embed.min_frames}"
            )
        out_lengths = self.embed.output_lengths(lengths, xs.size(1))
        x = self.embed(xs)
        x, pos_emb = self.pos_enc(x)
        key_padding_mask = PaddingMask(
            torch.arange(x.size(1), device=x.device)[None, :] >= out_lengths[:, None])
        if subnet is None:
            run = [(block, None) for block in self.encoders]
        else:
            self.check_subnet(subnet)
            run = [(self.encoders[choice.index], choice) for choice in subnet.layers]
        condition = self.config.interctc_use_conditioning
        if condition and (ctc_softmax is None or self.conditioning_layer is None):
            raise ValueError("this encoder is self-conditioned (interctc_use_conditioning): it needs the CTC "
                             "head's softmax (ctc_softmax) and its conditioning_layer, which ASRModel sets")
        taps = set(self.config.interctc_layer_idx) if intermediate or condition else set()
        inter = []
        for i, (block, choice) in enumerate(run, start=1):
            x = block(x, pos_emb, key_padding_mask, choice)
            if i in taps and i < len(run):
                inter.append(self._final_norm(x))
                if condition:
                    x = x + self.conditioning_layer(ctc_softmax(inter[-1]))
        x = self._final_norm(x)
        return (x, out_lengths, inter) if intermediate else (x, out_lengths)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.after_norm is None else self.after_norm(x)
