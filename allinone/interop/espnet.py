"""Import an ESPnet2 ASR experiment (``config.yaml`` + ``*.pth``) as an ``ASRModel``.

ESPnet's training writes the full argument namespace to ``<exp>/config.yaml`` and
model weights to ``<exp>/valid.acc.ave.pth`` (or ``valid.acc.best.pth``,
``<N>epoch.pth``, ...).  We map the parts of that config we can represent to an
``ASRModelConfig``, refuse (``ValueError``) what would compute something else, and
note what only matters for training (SpecAugment, intermediate CTC, ...).

Written against espnet 202511; ``ESPNET_CONFORMER_DEFAULTS`` records the encoder
defaults of that version (``config.yaml`` only lists the values a recipe changed,
and ESPnet's defaults differ from ours: e.g. ``macaron_style=False``,
``rel_pos_type='legacy'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig

__all__ = [
    "load_espnet_asr",
    "espnet_to_config",
    "find_checkpoint",
    "ESPNET_CONFORMER_DEFAULTS",
    "CONFIG_NAME",
]

CONFIG_NAME = "config.yaml"
PREFERRED_CHECKPOINTS = ("valid.acc.ave.pth", "valid.acc.best.pth")

# espnet2.asr.encoder.conformer_encoder.ConformerEncoder defaults (espnet 202511),
# for the arguments our ConformerConfig has.
ESPNET_CONFORMER_DEFAULTS: dict[str, Any] = {
    "output_size": 256,
    "attention_heads": 4,
    "linear_units": 2048,
    "num_blocks": 6,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.0,
    "input_layer": "conv2d",
    "normalize_before": True,
    "positionwise_layer_type": "linear",
    "macaron_style": False,
    "rel_pos_type": "legacy",
    "pos_enc_layer_type": "rel_pos",
    "selfattention_layer_type": "rel_selfattn",
    "activation_type": "swish",
    "use_cnn_module": True,
    "zero_triu": False,
    "cnn_module_kernel": 31,
}

# ESPnet encoder options we have no field for, with the only value we compute.
_ENCODER_FIXED = {"concat_after": False, "interctc_use_conditioning": False, "ctc_trim": False, "qk_norm": False}
# Options that change training only; any value is accepted, non-defaults are noted.
_ENCODER_TRAINING_ONLY = {"stochastic_depth_rate": 0.0, "layer_drop_rate": 0.0, "interctc_layer_idx": []}
# Options without effect for the configurations we accept.
_ENCODER_IRRELEVANT = {"max_pos_emb_len", "use_flash_attn", "padding_idx", "positionwise_conv_kernel_size"}

# DefaultFrontend arguments besides the five fbank settings, with ESPnet's defaults.
_FRONTEND_OTHER_DEFAULTS = {
    "window": "hann", "center": True, "normalized": False, "onesided": True,
    "fmin": None, "fmax": None, "htk": False, "apply_stft": True,
}


def _parse_size(value: int | float | str) -> int:
    """ESPnet allows ``fs: 16k``; humanfriendly reads k as 1000."""
    if isinstance(value, str):
        v = value.strip().lower()
        mult = 1
        if v.endswith("k"):
            v, mult = v[:-1], 1000
        return int(float(v) * mult)
    return int(value)


def _read_token_list(token_list: Any, base: Path | None) -> list[str]:
    if isinstance(token_list, (list, tuple)):
        return [str(t) for t in token_list]
    if isinstance(token_list, str):
        path = Path(token_list)
        if not path.is_absolute() and not path.is_file() and base is not None:
            path = base / token_list
        if not path.is_file():
            raise ValueError(f"config token_list file not found: {token_list}")
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    raise ValueError(f"config token_list must be a list or a file path, got {type(token_list).__name__}")


def espnet_to_config(cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None
                     ) -> tuple[ASRModelConfig, dict[str, Any]]:
    """Map an ESPnet2 ASR ``config.yaml`` dict to an ``ASRModelConfig``.

    Returns ``(config, info)``; ``info`` has ``token_list``, ``fbank`` (sample_rate,
    n_fft, win_length, hop_length, n_mels; None when the experiment fed features
    directly), ``stats_file`` (from normalize_conf, may be None) and ``notes``
    (what was ignored and why).  Raises ``ValueError`` for anything we would compute
    differently from ESPnet.
    """
    base = Path(base_dir) if base_dir is not None else None
    notes: list[str] = []
    conf = lambda key: dict(cfg.get(key) or {})  # noqa: E731  (ESPnet writes null for empty confs)

    if "token_list" not in cfg:
        raise ValueError("config has no token_list")
    token_list = _read_token_list(cfg["token_list"], base)
    vocab_size = len(token_list)
    model_conf = conf("model_conf")
    blank = model_conf.get("sym_blank", "<blank>")
    if blank in token_list and token_list.index(blank) != 0:
        raise ValueError(f"token_list has {blank!r} at index {token_list.index(blank)}; we need the blank at 0")
    for key in ("sym_sos", "sym_eos"):
        sym = model_conf.get(key, "<sos/eos>")
        if sym in token_list and token_list.index(sym) != vocab_size - 1:
            raise ValueError(
                f"token_list has {sym!r} at index {token_list.index(sym)}; we need <sos/eos> last ({vocab_size - 1})"
            )

    model_type = cfg.get("model", "espnet")
    if model_type not in (None, "espnet"):
        raise ValueError(f"model: {model_type!r} is not supported; only the standard 'espnet' ASR model")

    # --- front end -> fbank settings
    fbank = None
    if cfg.get("input_size") is not None:
        input_size = int(cfg["input_size"])
        notes.append(f"input_size={input_size}: the experiment read features directly (no frontend)")
    else:
        frontend = cfg.get("frontend", "default")
        if frontend != "default":
            raise ValueError(f"frontend: {frontend!r} is not supported; only 'default' (STFT log-mel fbank)")
        fc = conf("frontend_conf")
        n_fft = int(fc.get("n_fft", 512))
        fbank = {
            "sample_rate": _parse_size(fc.get("fs", 16000)),
            "n_fft": n_fft,
            "win_length": int(fc["win_length"]) if fc.get("win_length") is not None else n_fft,
            "hop_length": int(fc.get("hop_length", 128)),
            "n_mels": int(fc.get("n_mels", 80)),
        }
        for key, default in _FRONTEND_OTHER_DEFAULTS.items():
            if key in fc and fc[key] != default:
                fbank[key] = fc[key]
                notes.append(f"frontend_conf.{key}={fc[key]!r} differs from the default; kept in info['fbank']")
        if fc.get("frontend_conf") is not None:
            raise ValueError("frontend_conf.frontend_conf (WPE / beamforming front end) is not supported")
        input_size = fbank["n_mels"]

    # --- blocks we cannot represent
    if cfg.get("specaug") is not None:
        notes.append(f"specaug: {cfg['specaug']!r} ignored (training-only data augmentation)")
    for key in ("preencoder", "postencoder"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key}: {cfg[key]!r} is not supported; only models without a {key}")

    # --- normalisation
    normalize = cfg.get("normalize")
    stats_file = None
    if normalize is None:
        use_normalize = False
    elif normalize == "global_mvn":
        use_normalize = True
        nc = conf("normalize_conf")
        for flag in ("norm_means", "norm_vars"):
            if not nc.get(flag, True):
                raise ValueError(f"normalize_conf.{flag}=False is not supported; only full mean/variance normalisation")
        if float(nc.get("eps", 1.0e-20)) != 1.0e-20:
            notes.append(f"normalize_conf.eps={nc['eps']} only matters when recomputing std from a stats file")
        stats_file = nc.get("stats_file")
    else:
        raise ValueError(f"normalize: {normalize!r} is not supported; only 'global_mvn' or none")

    # --- encoder
    encoder = cfg.get("encoder")
    if encoder != "conformer":
        raise ValueError(f"encoder: {encoder!r} is not supported; only 'conformer' can be imported")
    ec = conf("encoder_conf")
    enc_args = dict(ESPNET_CONFORMER_DEFAULTS)
    for key, value in ec.items():
        if key in ESPNET_CONFORMER_DEFAULTS:
            enc_args[key] = value
        elif key in _ENCODER_FIXED:
            if value != _ENCODER_FIXED[key]:
                raise ValueError(f"encoder_conf.{key}={value!r} is not supported; only {_ENCODER_FIXED[key]!r}")
        elif key in _ENCODER_TRAINING_ONLY:
            if value != _ENCODER_TRAINING_ONLY[key]:
                notes.append(f"encoder_conf.{key}={value!r} ignored (training-only)")
        elif key in _ENCODER_IRRELEVANT:
            pass
        else:
            raise ValueError(f"encoder_conf.{key} is not a ConformerEncoder option we know")
    try:
        encoder_config = ConformerConfig(input_size=input_size, **enc_args).validate()
    except ValueError as e:
        raise ValueError(f"encoder_conf: {e}") from None

    # --- losses and decoder
    ctc_weight = float(model_conf.get("ctc_weight", 0.5))  # ESPnet's default
    lsm_weight = float(model_conf.get("lsm_weight", 0.0))
    if int(model_conf.get("ignore_id", -1)) != -1:
        raise ValueError(f"model_conf.ignore_id={model_conf['ignore_id']} is not supported; only -1")
    for key, default in (("length_normalized_loss", False), ("interctc_weight", 0.0)):
        if model_conf.get(key, default) != default:
            notes.append(f"model_conf.{key}={model_conf[key]!r} ignored (training loss only)")
    for key in ("aux_ctc", "transducer_multi_blank_durations"):
        if model_conf.get(key):
            raise ValueError(f"model_conf.{key} is not supported")
    if model_conf.get("lang_token_id", -1) != -1:
        raise ValueError("model_conf.lang_token_id is not supported")
    cc = conf("ctc_conf")
    for key, default in (("ctc_type", "builtin"), ("dropout_rate", 0.0), ("zero_infinity", True),
                         ("reduce", True), ("ignore_nan_grad", None)):
        if cc.get(key, default) != default:
            notes.append(f"ctc_conf.{key}={cc[key]!r} ignored (training loss only; we use {default!r})")

    decoder = cfg.get("decoder")
    decoder_conf = None
    if decoder in (None, "none"):
        pass
    elif decoder == "transformer":
        if ctc_weight == 1.0:
            notes.append("decoder ignored: ctc_weight=1.0, so ESPnet dropped it from the model")
        else:
            decoder_conf = conf("decoder_conf")
    else:
        raise ValueError(f"decoder: {decoder!r} is not supported; only 'transformer' or none")

    try:
        config = ASRModelConfig(
            encoder=encoder_config, vocab_size=vocab_size, ctc_weight=ctc_weight,
            decoder=decoder_conf, lsm_weight=lsm_weight, normalize=use_normalize,
        ).validate()
    except ValueError as e:
        raise ValueError(f"config maps to an invalid model: {e}") from None
    info = {"token_list": token_list, "fbank": fbank, "stats_file": stats_file, "notes": notes}
    return config, info


def find_checkpoint(exp_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """The weights file to load from ``exp_dir``.

    ``checkpoint`` (absolute, or relative to the cwd or to ``exp_dir``) wins;
    otherwise ``valid.acc.ave.pth``, then ``valid.acc.best.pth``, then the newest
    ``*.pth`` (``checkpoint.pth``, the training-resume file, only as a last resort).
    """
    exp_dir = Path(exp_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file() and not path.is_absolute():
            path = exp_dir / checkpoint
        if not path.is_file():
            raise ValueError(f"checkpoint not found: {checkpoint} (also looked in {exp_dir})")
        return path
    for name in PREFERRED_CHECKPOINTS:
        if (exp_dir / name).is_file():
            return exp_dir / name
    found = sorted(exp_dir.glob("*.pth"), key=lambda p: (p.name != "checkpoint.pth", p.stat().st_mtime))
    if not found:
        raise ValueError(f"no checkpoint (*.pth) in {exp_dir}")
    return found[-1]


def _load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes = []
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        notes.append(f"{path.name} is a training checkpoint; used its 'model' entry")
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor)")
    return dict(obj), notes


def _check_fit(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], ckpt: Path) -> None:
    """Raise ``ValueError`` naming the first missing / unexpected / mis-shaped keys."""
    problems = []
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [f"{k}: checkpoint {tuple(theirs[k].shape)} vs config {tuple(v.shape)}"
              for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ValueError(f"checkpoint {ckpt} does not fit its config.yaml; " + "; ".join(problems))


def load_espnet_asr(
    exp_dir_or_config: str | os.PathLike | Mapping[str, Any],
    checkpoint: str | os.PathLike | None = None,
) -> tuple[ASRModel, dict[str, Any]]:
    """Build an ``ASRModel`` from an ESPnet2 ASR experiment and load its weights strictly.

    Args:
        exp_dir_or_config: the experiment directory (holding ``config.yaml``), a path to
            the ``config.yaml``, or the already-parsed config dict (then ``checkpoint``
            is required, relative paths resolve against the cwd).
        checkpoint: weights file; default: see ``find_checkpoint``.
    Returns:
        ``(model, info)``; the model is in eval mode.  ``info`` holds ``config``
        (the ``ASRModelConfig``), ``token_list``, ``fbank`` (settings to compute
        matching features), ``checkpoint``, ``ignored_keys`` (checkpoint entries that
        are not ours, e.g. the front end's mel matrix), ``notes``.
    """
    if isinstance(exp_dir_or_config, Mapping):
        cfg, exp_dir = dict(exp_dir_or_config), Path.cwd()
        if checkpoint is None:
            raise ValueError("load_espnet_asr: a config dict needs an explicit checkpoint")
    else:
        path = Path(exp_dir_or_config)
        config_path = path / CONFIG_NAME if path.is_dir() else path
        if not config_path.is_file():
            raise ValueError(f"ESPnet config not found: {config_path}")
        exp_dir = config_path.parent
        with open(config_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"{config_path}: expected a YAML mapping")
    config, info = espnet_to_config(cfg, exp_dir)
    ckpt = find_checkpoint(exp_dir, checkpoint)
    state, load_notes = _load_state_dict(ckpt)
    info["notes"].extend(load_notes)

    model = ASRModel(config)
    # The front end has no parameters, only buffers we recompute (e.g. the mel matrix).
    ignored = [k for k in state if k.startswith(("frontend.", "specaug."))]
    state = {k: v for k, v in state.items() if k not in ignored}
    ours = model.state_dict()
    norm_keys = [k for k in ours if k.startswith("normalize.")]
    stats_from_file = bool(norm_keys) and not any(k in state for k in norm_keys)
    if stats_from_file:
        if info["stats_file"] is None:
            raise ValueError(f"checkpoint {ckpt} has no normalize.mean/std and normalize_conf has no stats_file")
        # ESPnet writes stats paths relative to the recipe directory (<recipe>/exp/<exp>).
        stats_path = Path(info["stats_file"])
        for base in (exp_dir, exp_dir.parent.parent):
            if not stats_path.is_file() and not stats_path.is_absolute() and (base / stats_path).is_file():
                stats_path = base / stats_path
        model.set_normalize_stats(stats_path)  # raises ValueError if missing
        info["notes"].append(f"normalize stats read from {stats_path} (not in the checkpoint)")
        ours = {k: v for k, v in ours.items() if k not in norm_keys}
    _check_fit(ours, state, ckpt)
    model.load_state_dict(state, strict=not stats_from_file)
    model.eval()
    info.update(config=config, checkpoint=str(ckpt), ignored_keys=ignored)
    return model, info
