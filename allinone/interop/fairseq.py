"""Load a local fairseq wav2vec 2.0 / HuBERT checkpoint (``.pt``) without fairseq.

A fairseq checkpoint is a ``torch.save``d dict with the weights under ``model`` and the
configuration under ``cfg`` (a nested dict: ``cfg["model"]``, ``cfg["task"]``, ...;
fairseq >= 0.10) or, in older files, ``args`` (an ``argparse.Namespace``).  Four model
kinds are read (``cfg["model"]["_name"]``, or ``args.arch``):

* ``wav2vec2`` / ``hubert``: pretraining checkpoints.  The architecture fields
  (``extractor_mode``, ``conv_feature_layers``, ``encoder_layers``, ...) are in the model
  config; there is no CTC head, so the caller gives ``vocab_size`` and gets a freshly
  initialised one.  Pretraining-only weights (``quantizer``, ``project_q``,
  ``final_proj``, HuBERT's ``label_embs_concat``, ...) are ignored and listed in
  ``info["ignored_keys"]``.
* ``wav2vec_ctc`` / ``hubert_ctc``: fine-tuned CTC checkpoints.  Weights are
  ``w2v_encoder.w2v_model.<pretraining name>`` plus the head ``w2v_encoder.proj``; the
  pretraining config is embedded as ``w2v_args`` (or, when that is empty, read from the
  local file ``w2v_path``).  Dropout and layer-drop settings of the fine-tuning config
  override the embedded ones, as fairseq does when it builds the model.

Time masking (training only) is read as fairseq fine-tunes the encoder: with a
fine-tuned checkpoint's own fine-tuning config (fairseq passes its ``mask_prob`` /
``mask_length`` ... as overrides to the pretrained model), and no masking at all unless
its ``apply_mask`` is true.  A pretraining checkpoint loaded as a CTC model starts a
fine-tuning (its head is new), so it gets fairseq's fine-tuning defaults: no masking;
its pretraining ``mask_prob`` (0.65 by default) is not applied.  ``mask_time_prob=``
overrides the probability either way (the trainer's ``model.wav2vec2.mask_time_prob``).
The result becomes ``mask_time_prob`` / ``mask_time_length`` (``mask_time_min_masks`` =
2, which fairseq hard-codes), and ``mask_emb`` loads into
``encoder.time_masking.mask_emb``; with ``mask_time_prob`` 0 the vector is ignored.
Channel masking is read the same way (fine-tuning config, only with ``apply_mask``):
``mask_channel_prob`` / ``mask_channel_length`` become ``mask_feature_prob`` /
``mask_feature_length`` (``mask_feature_min_masks`` = 0, as fairseq calls it).
Masking that ours draws differently (``mask_selection`` / ``mask_channel_selection``
other than ``static``, ``no_mask_overlap`` / ``no_mask_channel_overlap``,
``mask_dropout``, ``mask_channel_before`` with time masking on) is loaded with a warning
saying how, also listed in ``info["masking"]["differences"]``: inference is unaffected,
only training differs.

Weight names map to ``Wav2Vec2CTCModel``'s (torchaudio's).  Whatever we cannot compute
the same way (another activation, a conformer or multi-layer positional convolution,
quantized inputs, ...) raises ``ValueError`` naming the field; so do a missing file, a
file that is not a fairseq checkpoint, an unknown model kind, missing or unexpected
weights (named) and weights of the wrong shape (named with both shapes).

Checkpoints are read with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``
for old ``args``): nothing in the file is executed.  Checkpoints written by fairseq's
trainer usually also pickle Python objects (meters, omegaconf nodes) that this refuses;
``trust_pickle=True`` loads those with full unpickling, which runs code from the file
and needs the classes it names to be importable: only for files you trust.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from allinone.interop.keymap import apply_rename, load_checked
from allinone.models.wav2vec2 import Wav2Vec2CTCModel, Wav2Vec2Config

__all__ = ["load_fairseq_ctc", "read_fairseq_checkpoint", "fairseq_to_config", "fairseq_masking",
           "map_fairseq_state_dict", "parse_conv_layers", "FAIRSEQ_MODELS", "FAIRSEQ_DEFAULTS",
           "FAIRSEQ_MASK_DEFAULTS", "FAIRSEQ_FINETUNE_MASK_DEFAULTS"]

logger = logging.getLogger("allinone")

# model name (cfg.model._name / args.arch) -> (family, fine-tuned with a CTC head?)
FAIRSEQ_MODELS: dict[str, tuple[str, bool]] = {
    "wav2vec2": ("wav2vec2", False),
    "hubert": ("hubert", False),
    "wav2vec_ctc": ("wav2vec2", True),
    "hubert_ctc": ("hubert", True),
}

# fairseq's Wav2Vec2Config / HubertConfig defaults for the fields we read, used when a
# config leaves one out (fairseq 0.12; the two agree on these).
FAIRSEQ_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
    "quantize_input": False,
}

# fairseq's masking defaults: pretraining configs (Wav2Vec2Config / HubertConfig) and the
# fine-tuning ones (Wav2Vec2AsrConfig / HubertCtcConfig), whose values fairseq passes to the
# pretrained model as overrides and applies only with ``apply_mask``.  ``mask_min_space``,
# ``mask_channel_min_space`` and ``mask_dropout`` are not overridden (the last goes in as
# ``pct_holes``, no pretraining field): the pretraining values apply.  ``mask_channel_before``
# (wav2vec2 only; HuBERT always masks channels after time) is one of the overrides.
FAIRSEQ_MASK_DEFAULTS: dict[str, Any] = {
    "mask_prob": 0.65, "mask_length": 10, "mask_selection": "static", "mask_other": 0.0,
    "no_mask_overlap": False, "mask_min_space": 1, "mask_dropout": 0.0,
    "mask_channel_prob": 0.0, "mask_channel_length": 10, "mask_channel_selection": "static",
    "mask_channel_other": 0.0, "no_mask_channel_overlap": False, "mask_channel_min_space": 1,
    "mask_channel_before": False,
}
FAIRSEQ_FINETUNE_MASK_DEFAULTS: dict[str, Any] = {
    "apply_mask": False, "mask_prob": 0.5, "mask_length": 10, "mask_selection": "static", "mask_other": 0.0,
    "no_mask_overlap": False, "mask_channel_prob": 0.0, "mask_channel_length": 10,
    "mask_channel_selection": "static", "mask_channel_other": 0.0, "no_mask_channel_overlap": False,
    "mask_channel_before": False,
}
# fairseq's Wav2Vec2Model / HubertModel call compute_mask_indices with min_masks=2 for time
# masking and with its default min_masks=0 for channel masking.
_FAIRSEQ_MIN_MASKS = 2
_FAIRSEQ_CHANNEL_MIN_MASKS = 0

# Fine-tuning config field -> pretraining field it overrides (fairseq's Wav2VecEncoder
# passes these as arg_overrides when it rebuilds the pretrained model).
_FINETUNE_OVERRIDES = {"dropout": "dropout", "attention_dropout": "attention_dropout",
                       "activation_dropout": "activation_dropout", "dropout_input": "dropout_input",
                       "layerdrop": "encoder_layerdrop"}

_EXTRACTOR_MODES = {"default": "group_norm", "group_norm": "group_norm", "layer_norm": "layer_norm"}

_FT_ENCODER, _FT_HEAD = "w2v_encoder.w2v_model.", "w2v_encoder.proj."

# Weights the CTC model does not use: pretraining heads and targets.
_PRETRAINING_ONLY = re.compile(r"^(label_embs_concat|quantizer\.|project_q\.|final_proj\.|target_glu\.)")

_MASK_EMB = "encoder.time_masking.mask_emb"

# fairseq pretraining weight names -> ours, first match wins.  In the extractor each
# convolution is a Sequential (conv, dropout, norm, GELU): index 0 is the convolution,
# index 2 the GroupNorm (group_norm mode, first layer only) or, in layer_norm mode, a
# Sequential (transpose, LayerNorm, transpose) whose LayerNorm is ``2.1``.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(?:1\.)?(weight|bias)$",
     r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"encoder.feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"encoder.feature_projection.projection.\1"),
    (r"^encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)$",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)$",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.pos_conv\.0\.bias$", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.transformer.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$",
     r"encoder.transformer.layers.\1.attention.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.transformer.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$",
     r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$",
     r"encoder.transformer.layers.\1.final_layer_norm.\2"),
    (r"^mask_emb$", _MASK_EMB),  # kept only when time masking is on (read_fairseq_checkpoint)
)

_PROJECTION = "encoder.feature_projection.projection."


# --------------------------------------------------------------------------- config


def parse_conv_layers(spec: str | list) -> list[list[int]]:
    """fairseq's ``conv_feature_layers`` (a Python expression such as
    ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``) -> ``[[channels, kernel, stride], ...]``.

    fairseq ``eval``s the string; we evaluate only list/tuple literals of ints joined by
    ``+`` and ``*``, so nothing else in it can run.
    """
    if isinstance(spec, (list, tuple)):
        value = spec
    else:
        def ev(node):
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, (ast.List, ast.Tuple)):
                return [ev(e) for e in node.elts]
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                left, right = ev(node.left), ev(node.right)
                return left + right if isinstance(node.op, ast.Add) else left * right
            raise ValueError(f"unsupported element {ast.dump(node)}")

        try:
            value = ev(ast.parse(str(spec), mode="eval"))
        except (SyntaxError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read conv_feature_layers={spec!r}: {e}") from None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(c, (list, tuple)) and len(c) == 3 for c in value)):
        raise ValueError(f"conv_feature_layers={spec!r} is not a list of (channels, kernel, stride)")
    return [[int(v) for v in c] for c in value]


def _as_dict(obj: Any) -> dict | None:
    """A config node (dict, ``argparse.Namespace`` or omegaconf container) as a plain dict."""
    if obj is None:
        return None
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    try:  # omegaconf DictConfig, only present when the checkpoint was loaded with trust_pickle
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    raise ValueError(f"unexpected config node of type {type(obj).__name__}")


def _model_and_task_cfg(ckpt: Mapping[str, Any]) -> tuple[dict, dict]:
    """(model config, task config) of a checkpoint, from ``cfg`` or legacy ``args``."""
    cfg = _as_dict(ckpt.get("cfg"))
    if cfg and cfg.get("model") is not None:
        return _as_dict(cfg["model"]), _as_dict(cfg.get("task")) or {}
    args = _as_dict(ckpt.get("args"))
    if args:
        # Legacy: one flat namespace for everything; the model name is ``arch``.
        return {**args, "_name": args.get("_name") or args.get("arch")}, args
    raise ValueError("checkpoint has neither cfg['model'] nor args: not a fairseq checkpoint")


def _pretraining_cfg(model_cfg: dict, fine_tuned: bool, trust_pickle: bool) -> tuple[dict, dict]:
    """(pretraining model config with fine-tuning overrides applied, its task config)."""
    if not fine_tuned:
        return model_cfg, {}
    w2v = _as_dict(model_cfg.get("w2v_args"))
    if not w2v:
        w2v_path = model_cfg.get("w2v_path")
        if not w2v_path or not Path(w2v_path).is_file():
            raise ValueError(f"fine-tuned checkpoint has no w2v_args and its w2v_path {w2v_path!r} is not a local "
                             "file: the pretraining architecture is unknown")
        pre_model, pre_task = _model_and_task_cfg(_load(Path(w2v_path), trust_pickle))
    elif w2v.get("model") is not None:  # fairseq >= 0.10: a whole FairseqConfig
        pre_model, pre_task = _as_dict(w2v["model"]), _as_dict(w2v.get("task")) or {}
    else:  # legacy: a Namespace
        pre_model, pre_task = w2v, w2v
    overrides = {ours: model_cfg[ft] for ft, ours in _FINETUNE_OVERRIDES.items() if model_cfg.get(ft) is not None}
    return {**pre_model, **overrides}, pre_task


def fairseq_masking(pre: Mapping[str, Any], finetune: Mapping[str, Any] | None = None,
                    mask_time_prob: float | None = None) -> dict[str, Any]:
    """The time and channel masking fairseq's fine-tuning applies to the encoder, and how ours differs.

    pre: the pretraining model config; finetune: a fine-tuned checkpoint's own model
    config (``wav2vec_ctc`` / ``hubert_ctc``), or None for a pretraining checkpoint.  The
    fine-tuning config's values are used (missing ones, and all of them for a pretraining
    checkpoint: fairseq's fine-tuning defaults), and masking is on only when its
    ``apply_mask`` is true (default false).  A pretraining checkpoint thus loads without
    masking: loading it as a CTC model starts a fine-tuning, and fairseq's fine-tuning
    overrides the pretraining ``mask_prob`` (kept as ``pretraining_mask_prob``, with a
    ``note`` saying why it is not applied).  mask_time_prob: when not None, the masking
    probability instead (``override``).  Channel masking is read the same way (fine-tuning
    config, only with ``apply_mask``; ``mask_time_prob`` does not override it): its
    ``mask_channel_prob`` / ``mask_channel_length`` become ``mask_feature_prob`` /
    ``mask_feature_length`` (``mask_feature_min_masks`` = 0, fairseq's default for channels).
    Returns ``{"source", "apply_mask", <fairseq fields>, "mask_time_prob",
    "mask_time_length", "mask_time_min_masks", "mask_feature_prob", "mask_feature_length",
    "mask_feature_min_masks", "differences"}`` (plus ``override`` / ``pretraining_mask_prob``
    / ``note`` as above): the ``mask_time_*`` / ``mask_feature_*`` are ours, ``differences``
    says (one line each) where our masking would train differently from fairseq's.
    """
    ft = finetune if finetune is not None else {}

    def pick(key):
        if key in FAIRSEQ_FINETUNE_MASK_DEFAULTS:
            value = ft.get(key)
            return FAIRSEQ_FINETUNE_MASK_DEFAULTS[key] if value is None else value
        value = pre.get(key)
        return FAIRSEQ_MASK_DEFAULTS[key] if value is None else value

    out: dict[str, Any] = {"source": "fine-tuning config" if finetune is not None else "fine-tuning defaults",
                           "apply_mask": bool(pick("apply_mask"))}
    out.update({key: pick(key) for key in FAIRSEQ_MASK_DEFAULTS})
    if finetune is None:
        pre_prob = pre.get("mask_prob")
        out["pretraining_mask_prob"] = FAIRSEQ_MASK_DEFAULTS["mask_prob"] if pre_prob is None else pre_prob
        out["note"] = (f"the pretraining config's mask_prob={out['pretraining_mask_prob']!r} is not applied: a "
                       "pretraining checkpoint loaded as a CTC model starts a fine-tuning, which fairseq masks "
                       "with its fine-tuning config (apply_mask defaults to false)"
                       + ("" if mask_time_prob is not None else "; set mask_time_prob to mask"))
    prob = float(out["mask_prob"]) if out["apply_mask"] else 0.0
    if mask_time_prob is not None:
        prob = out["override"] = float(mask_time_prob)
    out.update(mask_time_prob=prob, mask_time_length=int(out["mask_length"]), mask_time_min_masks=_FAIRSEQ_MIN_MASKS)
    # Channel masking: gated by apply_mask too (fairseq masks nothing without it); not overridden.
    feature_prob = float(out["mask_channel_prob"] or 0.0) if out["apply_mask"] else 0.0
    out.update(mask_feature_prob=feature_prob, mask_feature_length=int(out["mask_channel_length"]),
               mask_feature_min_masks=_FAIRSEQ_CHANNEL_MIN_MASKS)
    differences = []
    if prob > 0.0:
        if out["mask_selection"] != "static":
            differences.append(f"mask_selection={out['mask_selection']!r} (mask_other={out['mask_other']!r}) draws "
                               f"random span lengths; ours are all mask_length={out['mask_time_length']}")
        if out["no_mask_overlap"]:
            differences.append(f"no_mask_overlap=True keeps spans apart (mask_min_space={out['mask_min_space']!r}); "
                               "ours may overlap, so fewer frames are masked")
        if float(out["mask_dropout"] or 0.0) > 0.0:
            differences.append(f"mask_dropout={out['mask_dropout']!r} leaves that share of the masked frames "
                               "unmasked; ours does not")
    if feature_prob > 0.0:
        if out["mask_channel_selection"] != "static":
            differences.append(f"mask_channel_selection={out['mask_channel_selection']!r} (mask_channel_other="
                               f"{out['mask_channel_other']!r}) draws random channel span lengths; ours are all "
                               f"mask_feature_length={out['mask_feature_length']}")
        if out["no_mask_channel_overlap"]:
            differences.append(f"no_mask_channel_overlap=True keeps channel spans apart (mask_channel_min_space="
                               f"{out['mask_channel_min_space']!r}); ours may overlap, so fewer channels are masked")
        if out["mask_channel_before"] and prob > 0.0:
            differences.append("mask_channel_before=True zeroes channels before time masking (masked frames are "
                               "all mask_emb); ours zeroes them after it, as transformers and fairseq's default "
                               "do, so masked frames have those channels 0 too")
    out["differences"] = differences
    return out


def fairseq_to_config(pre: Mapping[str, Any], vocab_size: int, final_dropout: float = 0.0,
                      masking: Mapping[str, Any] | None = None) -> Wav2Vec2Config:
    """``Wav2Vec2Config`` of a fairseq wav2vec2 / HuBERT pretraining model config dict.

    masking: ``fairseq_masking``'s result for the masking fields; None is
    ``fairseq_masking(pre)``, a pretraining checkpoint's (no masking).  ``ValueError``
    names any field we cannot represent.
    """
    if masking is None:
        masking = fairseq_masking(pre)

    def get(key):
        value = pre.get(key)
        return FAIRSEQ_DEFAULTS[key] if value is None else value

    for key, allowed in (("activation_fn", "gelu"), ("layer_type", "transformer"), ("pos_conv_depth", 1),
                         ("quantize_input", False)):
        if get(key) != allowed:
            raise ValueError(f"fairseq model config {key}={get(key)!r} is not supported (only {allowed!r})")
    mode = get("extractor_mode")
    if mode not in _EXTRACTOR_MODES:
        raise ValueError(f"fairseq model config extractor_mode={mode!r} is not supported; "
                         f"supported: 'default', 'layer_norm'")
    config = Wav2Vec2Config(
        extractor_mode=_EXTRACTOR_MODES[mode],
        extractor_conv_layer_config=parse_conv_layers(get("conv_feature_layers")),
        extractor_conv_bias=bool(get("conv_bias")),
        encoder_embed_dim=int(get("encoder_embed_dim")),
        encoder_projection_dropout=float(get("dropout_input")),
        encoder_pos_conv_kernel=int(get("conv_pos")),
        encoder_pos_conv_groups=int(get("conv_pos_groups")),
        encoder_num_layers=int(get("encoder_layers")),
        encoder_num_heads=int(get("encoder_attention_heads")),
        encoder_attention_dropout=float(get("attention_dropout")),
        encoder_ff_interm_features=int(get("encoder_ffn_embed_dim")),
        encoder_ff_interm_dropout=float(get("activation_dropout")),
        encoder_dropout=float(get("dropout")),
        encoder_layer_norm_first=bool(get("layer_norm_first")),
        encoder_layer_drop=float(get("encoder_layerdrop")),
        vocab_size=int(vocab_size),
        final_dropout=float(final_dropout),
        feature_projection_layer_norm=True,  # fairseq always normalises the extractor output
        mask_time_prob=float(masking["mask_time_prob"]),
        mask_time_length=int(masking["mask_time_length"]),
        mask_time_min_masks=int(masking["mask_time_min_masks"]),
        mask_feature_prob=float(masking.get("mask_feature_prob", 0.0)),
        mask_feature_length=int(masking.get("mask_feature_length", 10)),
        mask_feature_min_masks=int(masking.get("mask_feature_min_masks", _FAIRSEQ_CHANNEL_MIN_MASKS)),
    )
    try:
        return config.validate()
    except ValueError as e:
        raise ValueError(f"fairseq config does not give a valid model: {e}") from None


# --------------------------------------------------------------------------- weights


def map_fairseq_state_dict(state: Mapping[str, torch.Tensor],
                           fine_tuned: bool) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Rename a fairseq state dict to ``Wav2Vec2CTCModel``'s names.

    Returns (mapped state dict, ignored fairseq keys, our key -> fairseq key).  Keys that
    are neither mapped nor known pretraining-only weights raise ``ValueError`` naming them.
    """
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if fine_tuned:
            if key in (_FT_HEAD + "weight", _FT_HEAD + "bias"):
                out["aux." + key[len(_FT_HEAD):]] = value
                sources["aux." + key[len(_FT_HEAD):]] = key
                continue
            if not key.startswith(_FT_ENCODER):
                unknown.append(key)
                continue
            rest = key[len(_FT_ENCODER):]
        else:
            rest = key
        if _PRETRAINING_ONLY.match(rest):
            ignored.append(key)
            continue
        if not apply_rename(_RENAMES, rest, key, value, out, sources):
            unknown.append(key)
    if unknown:
        raise ValueError(f"checkpoint has weights this model does not have: {sorted(unknown)}")
    return out, ignored, sources


# --------------------------------------------------------------------------- loading


def _load(path: Path, trust_pickle: bool) -> dict:
    """``torch.load`` a checkpoint as safely as its contents allow (see the module docstring)."""
    if not path.is_file():
        raise ValueError(f"fairseq checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            first_line = str(e).splitlines()[0] if str(e) else repr(e)
            raise ValueError(f"{path} is not a PyTorch checkpoint: {first_line}") from None
        if not trust_pickle:
            detail = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise ValueError(f"{path} pickles Python objects that a weights-only load refuses ({detail.strip()}); "
                             "pass trust_pickle=True to unpickle it in full (this runs code from the file: only "
                             "for files you trust)") from None
        logger.warning("loading %s with full unpickling (trust_pickle=True)", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e:
            raise ValueError(f"{path} pickles objects of module {e.name!r}, which is not installed") from None
    except Exception as e:  # torch raises many kinds (KeyError, RuntimeError, EOFError, ...) for non-checkpoints
        raise ValueError(f"{path} is not a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{path} is not a fairseq checkpoint: expected a dict with a 'model' state dict")
    return dict(ckpt)


def read_fairseq_checkpoint(path: str | os.PathLike, vocab_size: int | None = None, trust_pickle: bool = False,
                            mask_time_prob: float | None = None,
                            ) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """Config, mapped weights and info of a fairseq checkpoint, without building a model.

    vocab_size: None keeps the checkpoint's CTC head (an error for a pretraining
    checkpoint, which has none); a number drops any head from the weights and sizes the
    config's head for a new vocabulary.  mask_time_prob: see ``load_fairseq_ctc``.
    Returns (config, state dict in our names, info); see ``load_fairseq_ctc`` for ``info``.
    """
    path = Path(path)
    ckpt = _load(path, trust_pickle)
    model_cfg, task_cfg = _model_and_task_cfg(ckpt)
    name = model_cfg.get("_name")
    if name not in FAIRSEQ_MODELS:
        raise ValueError(f"unsupported fairseq model {name!r}; supported: {', '.join(map(repr, FAIRSEQ_MODELS))}")
    family, fine_tuned = FAIRSEQ_MODELS[name]
    pre, pre_task = _pretraining_cfg(model_cfg, fine_tuned, trust_pickle)

    state = {k: v for k, v in ckpt["model"].items()}
    mapped, ignored, sources = map_fairseq_state_dict(state, fine_tuned)
    head = mapped.get("aux.weight")
    if vocab_size is None:
        if head is None:
            raise ValueError(f"{path} is a pretraining checkpoint ({name!r}) without a CTC head: give vocab_size "
                             "for a new one")
        vocab_size = int(head.shape[0])
    elif head is not None:  # a new vocabulary: the old head goes
        ignored += [sources.pop(k) for k in ("aux.weight", "aux.bias") if k in mapped]
        mapped.pop("aux.weight", None)
        mapped.pop("aux.bias", None)
    final_dropout = float(model_cfg.get("final_dropout") or 0.0) if fine_tuned else 0.0
    masking = fairseq_masking(pre, model_cfg if fine_tuned else None, mask_time_prob)
    config = fairseq_to_config(pre, vocab_size, final_dropout, masking)
    if config.mask_time_prob == 0.0 and _MASK_EMB in mapped:  # no time masking: the vector is unused
        mapped.pop(_MASK_EMB)
        ignored.append(sources.pop(_MASK_EMB))
    elif config.mask_time_prob > 0.0 and _MASK_EMB not in mapped:
        masking["differences"].append("the checkpoint has no mask_emb: the masking vector starts new (uniform)")
    if "note" in masking and "override" not in masking:
        logger.info("%s: time masking off, as fairseq fine-tunes it: %s", path.name, masking["note"])
    if masking["differences"]:
        logger.warning("%s: fairseq's masking (%s) is loaded as mask_time_prob=%s, mask_time_length=%s, "
                       "mask_feature_prob=%s, mask_feature_length=%s, but training with it differs from "
                       "fairseq's: %s", path.name, masking["source"], config.mask_time_prob,
                       config.mask_time_length, config.mask_feature_prob, config.mask_feature_length,
                       "; ".join(masking["differences"]))

    if _PROJECTION + "weight" not in mapped:
        # fairseq builds post_extract_proj only when the extractor's channels differ from
        # the model width; without it the projection is the identity.
        channels = config.extractor_conv_layer_config[-1][0]
        if channels == config.encoder_embed_dim and _PROJECTION + "bias" not in mapped:
            mapped[_PROJECTION + "weight"] = torch.eye(channels)
            mapped[_PROJECTION + "bias"] = torch.zeros(channels)
            sources[_PROJECTION + "weight"] = sources[_PROJECTION + "bias"] = "(identity: no post_extract_proj)"
    info = {"model_name": name, "family": family, "fine_tuned": fine_tuned, "weights": str(path),
            "has_head": "aux.weight" in mapped, "ignored_keys": sorted(ignored),
            "normalize": bool(task_cfg.get("normalize", pre_task.get("normalize", False))), "sources": sources,
            "masking": masking}
    return config, mapped, info


def load_fairseq_ctc(path: str | os.PathLike, vocab_size: int | None = None, trust_pickle: bool = False,
                     mask_time_prob: float | None = None) -> tuple[Wav2Vec2CTCModel, dict[str, Any]]:
    """Build a ``Wav2Vec2CTCModel`` from a local fairseq wav2vec2 / HuBERT checkpoint.

    vocab_size: None keeps a fine-tuned checkpoint's CTC head; a number gives a new,
    randomly initialised head of that size (required for pretraining checkpoints).
    mask_time_prob: None masks as fairseq fine-tunes this checkpoint (a fine-tuned one
    with its ``apply_mask`` / ``mask_prob``, a pretraining one not at all); a number is
    the masking probability instead.  With masking on, the checkpoint's ``mask_emb`` is
    the masking vector: pass the probability you will train with here rather than
    setting it on the loaded config, which would start from a new vector.
    Returns ``(model, info)`` with the model in eval mode; ``info`` has ``model_name``
    (``wav2vec_ctc``, ``hubert``, ...), ``family``, ``fine_tuned``, ``weights``,
    ``has_head`` (whether ``aux`` came from the checkpoint), ``ignored_keys`` (weights
    the CTC forward does not use, and a dropped head), ``normalize`` (whether the model
    was trained on per-utterance normalised waveforms: do the same to its inputs),
    ``sources`` (our key -> fairseq key) and ``masking`` (``fairseq_masking``'s result:
    the fairseq fields read, from which config, any ``override``, for a pretraining
    checkpoint a ``note`` on its unapplied ``mask_prob``, and ``differences`` from our
    masking).
    """
    config, mapped, info = read_fairseq_checkpoint(path, vocab_size, trust_pickle, mask_time_prob)
    sources = info["sources"]
    name = Path(path).name
    model = Wav2Vec2CTCModel(config)
    optional = set() if info["has_head"] else {"aux.weight", "aux.bias"}
    if _MASK_EMB not in mapped:  # masking on for a checkpoint without mask_emb: a new vector (warned above)
        optional.add(_MASK_EMB)
    load_checked(model, mapped, sources, name, optional=frozenset(optional))
    model.eval()
    if info["ignored_keys"]:
        logger.info("%s: ignored %d weights the CTC model does not use (%s%s)", name, len(info["ignored_keys"]),
                    ", ".join(info["ignored_keys"][:4]), " ..." if len(info["ignored_keys"]) > 4 else "")
    return model, info
