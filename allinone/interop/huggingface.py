"""Load a local Hugging Face ``Wav2Vec2ForCTC`` / ``HubertForCTC`` directory.

A directory written by transformers' ``save_pretrained`` holds ``config.json`` and
``model.safetensors`` (or ``pytorch_model.bin``).  ``load_hf_ctc`` maps the config to a
``Wav2Vec2Config`` and the weights to ``Wav2Vec2CTCModel``'s (torchaudio's) names,
without importing transformers and without any network access.  Whatever would compute
something else (another activation, adapters, HuBERT's batch-norm positional
convolution, ...) raises ``ValueError`` naming the field; so do missing files, missing
or unexpected weights, and weights of the wrong shape (naming the key).

Written against transformers 5.24 (also reads the ``weight_g`` / ``weight_v`` names of
the positional convolution's weight norm that older versions wrote).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from allinone.interop.keymap import apply_rename, load_checked
from allinone.models.wav2vec2 import Wav2Vec2CTCModel, Wav2Vec2Config

logger = logging.getLogger("allinone")

__all__ = ["load_hf_ctc", "hf_to_config", "map_hf_state_dict", "HF_ARCHITECTURES", "HF_DEFAULTS"]

# model_type -> (CTC architecture name, weight-name prefix of the base model)
HF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "wav2vec2": ("Wav2Vec2ForCTC", "wav2vec2."),
    "hubert": ("HubertForCTC", "hubert."),
}

# transformers' Wav2Vec2Config / HubertConfig defaults (5.24) for the fields we read, used
# when a config.json leaves one out.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "activation_dropout": 0.1,
    "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.1,
    "layerdrop": 0.1,
    "layer_norm_eps": 1e-5,
    "feat_extract_norm": "group",
    "feat_extract_activation": "gelu",
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_bias": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "do_stable_layer_norm": False,
    "feat_proj_layer_norm": True,
    "vocab_size": 32,
    "add_adapter": False,
    "adapter_attn_dim": None,
    "conv_pos_batch_norm": False,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "apply_spec_augment": True,
}

_EXTRACTOR_MODES = {"group": "group_norm", "layer": "layer_norm"}

# Weights of the HF model that our model has no place for (none at present).
_IGNORED: tuple[str, ...] = ()

# Base-model weight names (prefix stripped) -> ours, first match wins.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^masked_spec_embed$", r"encoder.time_masking.mask_emb"),  # only when mask_time_prob > 0
    (r"^feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)$",
     r"feature_extractor.conv_layers.\1.\2.\3"),
    (r"^feature_projection\.(layer_norm|projection)\.(weight|bias)$", r"encoder.feature_projection.\1.\2"),
    (r"^encoder\.pos_conv_embed\.conv\.(?:weight_g|parametrizations\.weight\.original0)$",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv_embed\.conv\.(?:weight_v|parametrizations\.weight\.original1)$",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.pos_conv_embed\.conv\.bias$", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.transformer.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$",
     r"encoder.transformer.layers.\1.attention.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.(layer_norm|final_layer_norm)\.(weight|bias)$",
     r"encoder.transformer.layers.\1.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)$",
     r"encoder.transformer.layers.\1.feed_forward.\2.\3"),
)


def _get(hf: Mapping[str, Any], key: str) -> Any:
    return hf.get(key, HF_DEFAULTS[key])


def _check_model_type(hf: Mapping[str, Any]) -> tuple[str, str, str]:
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: "
                         f"{', '.join(map(repr, HF_ARCHITECTURES))}")
    arch, prefix = HF_ARCHITECTURES[model_type]
    archs = hf.get("architectures") or [arch]
    if arch not in archs:
        raise ValueError(f"unsupported Hugging Face architecture {archs!r} for model_type {model_type!r}; "
                         f"only {arch!r} (a CTC model) can be loaded")
    return model_type, arch, prefix


def hf_to_config(hf: Mapping[str, Any]) -> Wav2Vec2Config:
    """``Wav2Vec2Config`` of a transformers ``config.json`` dict (``ValueError`` if not representable).

    Masking (training only) is read as transformers applies it: ``mask_time_*`` and
    ``mask_feature_*`` as they are, both probabilities 0 when ``apply_spec_augment`` is false.
    """
    _check_model_type(hf)
    for key, allowed in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if _get(hf, key) != allowed:
            raise ValueError(f"config.json {key}={_get(hf, key)!r} is not supported (only {allowed!r})")
    for key in ("add_adapter", "conv_pos_batch_norm"):
        if _get(hf, key):
            raise ValueError(f"config.json {key}={_get(hf, key)!r} is not supported")
    if _get(hf, "adapter_attn_dim") is not None:
        raise ValueError(f"config.json adapter_attn_dim={hf['adapter_attn_dim']!r} is not supported "
                         "(attention adapters)")
    norm = _get(hf, "feat_extract_norm")
    if norm not in _EXTRACTOR_MODES:
        raise ValueError(f"config.json feat_extract_norm={norm!r} is not supported; "
                         f"supported: {', '.join(map(repr, _EXTRACTOR_MODES))}")
    dims, kernels, strides = (list(_get(hf, k)) for k in ("conv_dim", "conv_kernel", "conv_stride"))
    if not len(dims) == len(kernels) == len(strides):
        raise ValueError(f"config.json conv_dim / conv_kernel / conv_stride differ in length: "
                         f"{len(dims)} / {len(kernels)} / {len(strides)}")
    if "num_feat_extract_layers" in hf and hf["num_feat_extract_layers"] != len(dims):
        raise ValueError(f"config.json num_feat_extract_layers={hf['num_feat_extract_layers']} but conv_dim "
                         f"has {len(dims)} entries")
    vocab = _get(hf, "vocab_size")
    if vocab is None:
        raise ValueError("config.json has vocab_size=None: not a CTC model")
    # transformers masks (time, then feature) only with apply_spec_augment (default true).
    spec_augment = bool(_get(hf, "apply_spec_augment"))
    config = Wav2Vec2Config(
        extractor_mode=_EXTRACTOR_MODES[norm],
        extractor_conv_layer_config=[[int(d), int(k), int(s)] for d, k, s in zip(dims, kernels, strides)],
        extractor_conv_bias=bool(_get(hf, "conv_bias")),
        encoder_embed_dim=_get(hf, "hidden_size"),
        encoder_projection_dropout=float(_get(hf, "feat_proj_dropout")),
        encoder_pos_conv_kernel=_get(hf, "num_conv_pos_embeddings"),
        encoder_pos_conv_groups=_get(hf, "num_conv_pos_embedding_groups"),
        encoder_num_layers=_get(hf, "num_hidden_layers"),
        encoder_num_heads=_get(hf, "num_attention_heads"),
        encoder_attention_dropout=float(_get(hf, "attention_dropout")),
        encoder_ff_interm_features=_get(hf, "intermediate_size"),
        encoder_ff_interm_dropout=float(_get(hf, "activation_dropout")),
        encoder_dropout=float(_get(hf, "hidden_dropout")),
        encoder_layer_norm_first=bool(_get(hf, "do_stable_layer_norm")),
        encoder_layer_drop=float(_get(hf, "layerdrop")),
        vocab_size=vocab,
        final_dropout=float(_get(hf, "final_dropout")),
        # wav2vec2 always has the projection LayerNorm; HuBERT makes it optional.
        feature_projection_layer_norm=bool(_get(hf, "feat_proj_layer_norm")) if hf.get("model_type") == "hubert"
        else True,
        layer_norm_eps=float(_get(hf, "layer_norm_eps")),
        mask_time_prob=float(_get(hf, "mask_time_prob") or 0.0) if spec_augment else 0.0,
        mask_time_length=int(_get(hf, "mask_time_length")),
        mask_time_min_masks=int(_get(hf, "mask_time_min_masks")),
        mask_feature_prob=float(_get(hf, "mask_feature_prob") or 0.0) if spec_augment else 0.0,
        mask_feature_length=int(_get(hf, "mask_feature_length")),
        mask_feature_min_masks=int(_get(hf, "mask_feature_min_masks")),
    )
    try:
        return config.validate()
    except ValueError as e:
        raise ValueError(f"config.json does not give a valid model: {e}") from None


def map_hf_state_dict(state: Mapping[str, torch.Tensor],
                      prefix: str) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Rename a HF CTC state dict to ``Wav2Vec2CTCModel``'s names.

    Returns (mapped state dict, ignored HF keys, our key -> HF key).  A key that is
    neither mapped nor known to be unused raises ``ValueError``.
    """
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith("lm_head.") and key[len("lm_head."):] in ("weight", "bias"):
            out["aux." + key[len("lm_head."):]] = value
            sources["aux." + key[len("lm_head."):]] = key
            continue
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        rest = key[len(prefix):]
        if rest in _IGNORED:
            ignored.append(key)
            continue
        if not apply_rename(_RENAMES, rest, key, value, out, sources):
            unknown.append(key)
    if unknown:
        raise ValueError(f"checkpoint has weights this model does not have: {sorted(unknown)}")
    return out, ignored, sources


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st), device="cpu"), st
    if pt.is_file():
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{pt} does not hold a state dict (got {type(state).__name__})")
        return dict(state), pt
    sharded = [n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (path / n).is_file()]
    if sharded:
        raise ValueError(f"{path} holds a sharded checkpoint ({sharded[0]}); sharded checkpoints are not supported")
    raise ValueError(f"no model.safetensors or pytorch_model.bin in {path}")


def load_hf_ctc(path: str | os.PathLike, mask_time_prob: float | None = None
                ) -> tuple[Wav2Vec2CTCModel, dict[str, Any]]:
    """Build a ``Wav2Vec2CTCModel`` from a local HF ``Wav2Vec2ForCTC`` / ``HubertForCTC`` directory.

    mask_time_prob: None masks as ``config.json`` says; a number is the masking probability
    instead, the checkpoint's ``masked_spec_embed`` the masking vector when it has one (a new
    uniform vector, with a warning, when it has none: transformers saves it only for a config
    that masks).  Returns ``(model, info)`` with the model in eval mode; ``info`` has ``model_type``,
    ``architecture``, ``weights`` (the file read), ``ignored_keys`` (HF weights the CTC
    forward does not use) and ``hf_config`` (the ``config.json`` dict).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {path}")
    with open(config_file) as f:
        hf = json.load(f)
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")
    model_type, arch, prefix = _check_model_type(hf)
    config = hf_to_config(hf)
    if mask_time_prob is not None:
        try:
            config = dataclasses.replace(config, mask_time_prob=float(mask_time_prob)).validate()
        except ValueError as e:
            raise ValueError(f"mask_time_prob={mask_time_prob}: {e}") from None
    state, weights_file = _read_weights(path)
    mapped, ignored, sources = map_hf_state_dict(state, prefix)
    emb = "encoder.time_masking.mask_emb"
    if config.mask_time_prob == 0.0 and emb in mapped:
        # transformers keeps the vector for feature masking too; without time masking it is unused.
        mapped.pop(emb)
        ignored.append(sources.pop(emb))
    model = Wav2Vec2CTCModel(config)
    if config.mask_time_prob > 0.0 and emb not in mapped:
        logger.warning("%s has no masked_spec_embed (its config does not mask): time masking at "
                       "mask_time_prob=%s starts from a new vector", path, config.mask_time_prob)
        mapped[emb], sources[emb] = model.state_dict()[emb], "(new masking vector)"
    load_checked(model, mapped, sources, weights_file.name)
    model.eval()
    info = {"model_type": model_type, "architecture": arch, "weights": str(weights_file),
            "ignored_keys": ignored, "hf_config": hf}
    return model, info
