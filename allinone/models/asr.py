"""ASR model: global MVN + Conformer encoder + CTC head + optional attention decoder.

Children are named like ESPnet2's ``ESPnetASRModel`` (``normalize``, ``encoder``,
``ctc.ctc_lo``, ``decoder``) so an ESPnet state dict maps onto it key for key
(minus the front end, whose features ``allinone.data`` computes).  The attention
decoder *is* ESPnet's ``TransformerDecoder``: it stays full precision and is never
sliced, so we reuse it rather than re-implement it.

Token conventions (ESPnet's): id 0 is the CTC blank, ``vocab_size - 1`` is
``<sos/eos>``, token targets are padded with -1.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allinone.elastic.quant import QuantConfig, add_quantizers
from allinone.elastic.subnet import SubnetConfig
from allinone.models.conformer import ConformerConfig, ConformerEncoder
from allinone.models.normalize import GlobalMVN, Stats

__all__ = ["ASRModelConfig", "ASRModel", "CTC", "ctc_loss", "add_sos_eos", "label_smoothing_loss", "IGNORE_ID"]

IGNORE_ID = -1


def _transformer_decoder_class():
    # Imported lazily: espnet's decoder module pulls in a lot, and CTC-only models
    # never need it.
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

    return TransformerDecoder


@dataclass
class ASRModelConfig:
    """Architecture and loss weights of an ``ASRModel``; nested plain values.

    Args:
        encoder: Conformer architecture.
        vocab_size: number of output tokens, blank (0) and ``<sos/eos>`` (last) included.
        ctc_weight: loss = ctc_weight * CTC + (1 - ctc_weight) * attention.
            1.0 = pure CTC (then ``decoder`` must be None); 0.0 = no CTC head (as ESPnet).
        decoder: keyword arguments of ESPnet's ``TransformerDecoder`` (attention_heads,
            linear_units, num_blocks, dropout_rate, positional_dropout_rate,
            self_attention_dropout_rate, src_attention_dropout_rate, ...), or None.
        lsm_weight: label smoothing of the attention loss.
        interctc_weight: intermediate CTC (ESPnet's): the CTC term becomes
            (1 - w) * CTC + w * mean of the CTC losses of the ``encoder.interctc_layer_idx``
            blocks' outputs, through the same CTC head; 0 = off.
        normalize: apply ``GlobalMVN`` to the input features.
        quant: weight quantization of the supernet (``allinone.elastic.quant.QuantConfig``);
            None = a plain float model whose state dict has exactly ESPnet's keys.
    """

    encoder: ConformerConfig
    vocab_size: int
    ctc_weight: float = 1.0
    decoder: dict[str, Any] | None = None
    lsm_weight: float = 0.1
    interctc_weight: float = 0.0
    normalize: bool = True
    quant: QuantConfig | None = None

    def validate(self) -> "ASRModelConfig":
        """Raise ``ValueError`` naming the first bad field."""
        self.encoder.validate()
        if self.quant is not None:
            self.quant.validate()
        if not isinstance(self.vocab_size, int) or self.vocab_size < 3:
            raise ValueError(
                f"ASRModelConfig.vocab_size={self.vocab_size!r}: need at least 3 tokens "
                "(blank, one symbol, <sos/eos>)"
            )
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ASRModelConfig.ctc_weight={self.ctc_weight} must be in [0, 1]")
        if not 0.0 <= self.interctc_weight < 1.0:
            raise ValueError(f"ASRModelConfig.interctc_weight={self.interctc_weight} must be in [0, 1)")
        if self.encoder.interctc_use_conditioning and self.ctc_weight == 0.0:
            raise ValueError("encoder.interctc_use_conditioning (self-conditioned CTC) needs a CTC head "
                             "(ctc_weight > 0)")
        if self.interctc_weight > 0.0 and (self.ctc_weight == 0.0 or not self.encoder.interctc_layer_idx):
            raise ValueError(f"ASRModelConfig.interctc_weight={self.interctc_weight} needs a CTC head (ctc_weight > 0) "
                             "and the blocks to tap (encoder.interctc_layer_idx, e.g. [6])")
        if not 0.0 <= self.lsm_weight < 1.0:
            raise ValueError(f"ASRModelConfig.lsm_weight={self.lsm_weight} must be in [0, 1)")
        if self.ctc_weight < 1.0 and self.decoder is None:
            raise ValueError(
                f"ASRModelConfig.ctc_weight={self.ctc_weight} < 1 needs an attention decoder; "
                "set decoder={...} or ctc_weight=1.0"
            )
        if self.ctc_weight == 1.0 and self.decoder is not None:
            raise ValueError(
                "ASRModelConfig.decoder is set but ctc_weight=1.0 never uses it "
                "(ESPnet drops it too); set decoder=None or ctc_weight < 1"
            )
        if self.decoder is not None:
            params = inspect.signature(_transformer_decoder_class().__init__).parameters
            allowed = set(params) - {"self", "vocab_size", "encoder_output_size"}
            unknown = sorted(set(self.decoder) - allowed)
            if unknown:
                raise ValueError(
                    f"ASRModelConfig.decoder has unknown TransformerDecoder argument(s) "
                    f"{', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
                )
        return self

    def elastic_limits(self) -> tuple[int, int, int, list[int]]:
        """(blocks, fewest FFN units of a block, fewest heads of a block, quantizer bit-widths):
        what ``SearchSpace.for_model`` checks a space against."""
        enc = self.encoder
        nb = enc.num_blocks
        return (nb, min(enc.block_linear_units(i) for i in range(nb)),
                min(enc.block_attention_heads(i) for i in range(nb)),
                self.quant.int_bits if self.quant is not None else [])

    def to_dict(self) -> dict:
        """Nested plain dict (JSON/YAML-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ASRModelConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ASRModelConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        enc = d.get("encoder")
        if isinstance(enc, dict):
            d["encoder"] = ConformerConfig.from_dict(enc)
        if d.get("decoder") is not None:
            d["decoder"] = dict(d["decoder"])
        if isinstance(d.get("quant"), dict):
            d["quant"] = QuantConfig.from_dict(d["quant"])
        return cls(**d)


class CTC(nn.Module):
    """CTC output layer ``ctc_lo`` (Linear D -> V) and ESPnet's CTC loss.

    Loss: ``torch.nn.functional.ctc_loss`` with blank 0, per-utterance sums added and
    divided by the batch size, ``zero_infinity=True`` (ESPnet's defaults).
    """

    def __init__(self, encoder_size: int, vocab_size: int, zero_infinity: bool = True):
        super().__init__()
        self.ctc_lo = nn.Linear(encoder_size, vocab_size)
        self.zero_infinity = zero_infinity

    def log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """enc: [batch, frame, D] -> log-probabilities [batch, frame, V]."""
        return F.log_softmax(F.linear(enc, self.ctc_lo.weight, self.ctc_lo.bias), dim=-1)

    def softmax(self, enc: torch.Tensor) -> torch.Tensor:
        """enc: [batch, frame, D] -> posteriors [batch, frame, V] (self-conditioned CTC)."""
        return F.softmax(F.linear(enc, self.ctc_lo.weight, self.ctc_lo.bias), dim=-1)

    def loss(
        self, enc: torch.Tensor, enc_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> torch.Tensor:
        """Scalar CTC loss. enc [B, T, D], enc_lens [B], tokens [B, U] (padded -1), token_lens [B]."""
        return ctc_loss(self.log_probs(enc), enc_lens, tokens, token_lens, self.zero_infinity).to(enc.dtype)


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor,
             zero_infinity: bool = True) -> torch.Tensor:
    """ESPnet's CTC loss (blank 0): per-utterance sums added and divided by the batch size.

    log_probs [B, T, V], lengths [B] valid frames, tokens [B, U] padded with -1,
    token_lens [B] -> float32 scalar.  Shared by ``CTC`` and the wav2vec2 model.
    """
    lp = log_probs.float().transpose(0, 1)  # [T, B, V] for ctc_loss
    # Concatenated targets: padding (-1) must never reach ctc_loss.
    valid = torch.arange(tokens.size(1), device=tokens.device)[None, :] < token_lens[:, None]
    targets = tokens[valid]
    loss = F.ctc_loss(lp, targets, lengths, token_lens, blank=0, reduction="none", zero_infinity=zero_infinity)
    return loss.sum() / log_probs.size(0)


def add_sos_eos(
    tokens: torch.Tensor, token_lens: torch.Tensor, sos: int, eos: int, ignore_id: int = IGNORE_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input and target sequences, as ESPnet's ``add_sos_eos``.

    tokens [B, U] (valid up to token_lens) ->
    ys_in [B, U+1] = ``<sos> y`` padded with eos, ys_out [B, U+1] = ``y <eos>`` padded
    with ``ignore_id``.
    """
    pos = torch.arange(tokens.size(1) + 1, device=tokens.device)[None, :]
    lens = token_lens[:, None]
    shifted_in = F.pad(tokens, (1, 0), value=sos)
    ys_in = torch.where(pos <= lens, shifted_in, torch.full_like(shifted_in, eos))
    shifted_out = F.pad(tokens, (0, 1), value=ignore_id)
    ys_out = torch.where(pos < lens, shifted_out, torch.full_like(shifted_out, ignore_id))
    ys_out = torch.where(pos == lens, torch.full_like(ys_out, eos), ys_out)
    return ys_in, ys_out


def label_smoothing_loss(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float, ignore_id: int = IGNORE_ID,
    normalize_length: bool = False,
) -> torch.Tensor:
    """ESPnet's ``LabelSmoothingLoss``: KL(smoothed one-hot || softmax(logits)).

    The target distribution puts ``1 - smoothing`` on the label and
    ``smoothing / (V - 1)`` on every other token.  Positions with ``ignore_id`` count
    0; the sum is divided by the batch size (or by the number of labels when
    ``normalize_length``).  logits [B, U, V], targets [B, U] -> scalar.
    """
    vocab = logits.size(-1)
    ignore = targets == ignore_id
    with torch.no_grad():
        true_dist = torch.full_like(logits, smoothing / (vocab - 1))
        true_dist.scatter_(-1, targets.masked_fill(ignore, 0).unsqueeze(-1), 1.0 - smoothing)
    log_probs = torch.log_softmax(logits, dim=-1)
    # KL per token: sum_v t log t - t log p  (xlogy makes 0 log 0 = 0 when smoothing = 0)
    kl = (torch.xlogy(true_dist, true_dist) - true_dist * log_probs).sum(-1)
    denom = (~ignore).sum() if normalize_length else logits.size(0)
    return kl.masked_fill(ignore, 0.0).sum() / denom


class ASRModel(nn.Module):
    """Encoder-CTC(-attention) ASR model built from an ``ASRModelConfig``.

    Children: ``normalize`` (``GlobalMVN`` or None), ``encoder`` (``ConformerEncoder``),
    ``ctc`` (``CTC``, None when ctc_weight = 0), ``decoder`` (ESPnet
    ``TransformerDecoder`` or None).

    With ``config.quant`` the encoder's quantizable layers get ``quantizer`` children and
    the model is a supernet: ``encode`` / ``forward`` take ``subnet`` (a
    ``SubnetConfig``; None = the whole float model).  ``search_space`` (an
    ``allinone.elastic.space.SearchSpace`` or None) is the space the supernet was trained
    on; ``save_model_dir`` writes it to ``config.json`` and ``load_model_dir`` restores it.
    """

    def __init__(self, config: ASRModelConfig):
        super().__init__()
        self.config = config.validate()
        enc = config.encoder
        self.normalize = GlobalMVN(enc.input_size) if config.normalize else None
        self.encoder = ConformerEncoder(enc)
        # decoder before ctc: ESPnet's order, so state-dict keys come out in the same order.
        self.decoder = (
            _transformer_decoder_class()(
                vocab_size=config.vocab_size, encoder_output_size=enc.output_size, **config.decoder
            )
            if config.decoder is not None
            else None
        )
        self.ctc = CTC(enc.output_size, config.vocab_size) if config.ctc_weight > 0.0 else None
        if enc.interctc_use_conditioning:  # (ESPnet's ESPnetASRModel does the same)
            self.encoder.conditioning_layer = nn.Linear(config.vocab_size, enc.output_size)
        self.sos = self.eos = config.vocab_size - 1
        if config.quant is not None:
            add_quantizers(self, config.quant)
        self.search_space = None

    def set_normalize_stats(self, stats: Stats) -> None:
        """Set the global MVN from a stats dict (count, sum, sum_square) or ``feats_stats.npz``."""
        if self.normalize is None:
            raise ValueError("this model has normalize=False; it has no GlobalMVN to set")
        self.normalize.set_stats(stats)

    def encode(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, subnet: SubnetConfig | None = None,
        intermediate: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Raw log-mel features [B, T, F] and lengths [B] -> (enc [B, T', D], enc_lens [B]).

        Frames past ``feat_lens.max()`` are dropped first, as ESPnet does.  ``subnet``:
        the encoder subnet to run (None = the whole float encoder).  ``intermediate``: a
        third item, the intermediate-CTC block outputs (``ConformerEncoder.forward``).
        """
        if not torch.compiler.is_compiling():
            # (Under torch.compile the batch must come padded to its longest utterance, as
            # the trainer's collation does: reading the maximum would be a host sync and a
            # graph break every step.)
            feats = feats[:, : int(feat_lens.max())]
        if self.normalize is not None:
            feats, feat_lens = self.normalize(feats, feat_lens)
        softmax = self.ctc.softmax if self.config.encoder.interctc_use_conditioning else None
        return self.encoder(feats, feat_lens, subnet, intermediate, softmax)

    def ctc_log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """enc [B, T', D] -> CTC log-probabilities [B, T', V]."""
        if self.ctc is None:
            raise ValueError("this model has no CTC head (ctc_weight=0)")
        return self.ctc.log_probs(enc)

    def attention_loss(
        self, enc: torch.Tensor, enc_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder loss (label smoothing) and token accuracy (detached scalar)."""
        ys_in, ys_out = add_sos_eos(tokens, token_lens, self.sos, self.eos)
        logits, _ = self.decoder(enc, enc_lens, ys_in, token_lens + 1)  # [B, U+1, V]
        loss = label_smoothing_loss(logits, ys_out, self.config.lsm_weight)
        with torch.no_grad():
            valid = ys_out != IGNORE_ID
            acc = (logits.argmax(-1)[valid] == ys_out[valid]).float().mean()
        return loss, acc

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor,
        subnet: SubnetConfig | None = None, return_ctc_log_probs: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Training loss.

        Args:
            feats: [B, T, F] raw log-mel; feat_lens: [B].
            tokens: [B, U] token ids padded with -1; token_lens: [B].
            subnet: the encoder subnet to train (None = the whole float model).
            return_ctc_log_probs: also return ``ctc_log_probs`` [B, T', V] and ``enc_lens``
                [B] (for distillation between subnets; they must be outputs of the
                forward so that DDP sees which parameters they used).
        Returns:
            dict with ``loss`` (ctc_weight * CTC + (1 - ctc_weight) * attention, where with
            intermediate CTC the CTC term is (1 - interctc_weight) * ``loss_ctc`` +
            interctc_weight * ``loss_interctc``, as ESPnet), ``loss_ctc`` (the last block's),
            ``loss_interctc`` (mean over the tapped blocks), ``loss_att`` and ``acc``
            (attention token accuracy, detached); the last four are None when their branch is off.
        """
        if not torch.compiler.is_compiling():  # (see encode)
            tokens = tokens[:, : int(token_lens.max())]
        w_inter = self.config.interctc_weight
        if w_inter > 0.0:
            enc, enc_lens, taps = self.encode(feats, feat_lens, subnet, intermediate=True)
        else:
            (enc, enc_lens), taps = self.encode(feats, feat_lens, subnet), []
        w = self.config.ctc_weight
        loss_ctc = self.ctc.loss(enc, enc_lens, tokens, token_lens) if w > 0.0 else None
        ctc_term, loss_interctc = loss_ctc, None
        if taps:  # (a subnet shallower than every tapped block has none)
            losses = [self.ctc.loss(h, enc_lens, tokens, token_lens) for h in taps]
            loss_interctc = sum(losses) / len(losses)
            ctc_term = (1.0 - w_inter) * loss_ctc + w_inter * loss_interctc
        loss_att = acc = None
        if w < 1.0:
            loss_att, acc = self.attention_loss(enc, enc_lens, tokens, token_lens)
        if loss_att is None:
            loss = ctc_term
        elif ctc_term is None:
            loss = loss_att
        else:
            loss = w * ctc_term + (1.0 - w) * loss_att
        out = {"loss": loss, "loss_ctc": loss_ctc, "loss_interctc": loss_interctc, "loss_att": loss_att, "acc": acc}
        if return_ctc_log_probs:
            out["ctc_log_probs"] = self.ctc_log_probs(enc)
            out["enc_lens"] = enc_lens
        return out
