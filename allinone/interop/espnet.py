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
from allinone.utils import read_yaml

__all__ = [
    "load_espnet_asr",
    "espnet_to_config",
    "export_espnet_asr",
    "EXPORT_CHECKPOINT",
    "find_checkpoint",
    "ESPNET_CONFORMER_DEFAULTS",
    "CONFIG_NAME",
]

CONFIG_NAME = "config.yaml"
PREFERRED_CHECKPOINTS = ("valid.acc.ave.pth", "valid.acc.best.pth")
EXPORT_CHECKPOINT = PREFERRED_CHECKPOINTS[0]
EXPORT_STATS = "feats_stats.npz"
EXPORT_BPEMODEL = "bpe.model"

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
    "interctc_layer_idx": [],
    "interctc_use_conditioning": False,
}

# ESPnet encoder options we have no field for, with the only value we compute.
_ENCODER_FIXED = {"concat_after": False, "ctc_trim": False, "qk_norm": False}
# Options that change training only; any value is accepted, non-defaults are noted.
_ENCODER_TRAINING_ONLY = {"stochastic_depth_rate": 0.0, "layer_drop_rate": 0.0}
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
    interctc_weight = float(model_conf.get("interctc_weight", 0.0))
    if interctc_weight and not (encoder_config.interctc_layer_idx and ctc_weight > 0.0):
        # ESPnet accepts the weight without taps (or without a CTC head) and computes nothing.
        notes.append(f"model_conf.interctc_weight={interctc_weight} ignored: no encoder_conf.interctc_layer_idx "
                     "or no CTC head, so ESPnet computes no intermediate CTC either")
        interctc_weight = 0.0
    if model_conf.get("length_normalized_loss", False):
        notes.append(f"model_conf.length_normalized_loss={model_conf['length_normalized_loss']!r} ignored "
                     "(training loss only)")
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
            decoder=decoder_conf, lsm_weight=lsm_weight, interctc_weight=interctc_weight, normalize=use_normalize,
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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:  # truncated or not a torch file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from None
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
        (the ``ASRModelConfig``), ``espnet_config`` (the parsed config.yaml), ``token_list``, ``fbank`` (settings to compute
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
        cfg = read_yaml(config_path, "ESPnet config")
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
    info.update(config=config, espnet_config=cfg, checkpoint=str(ckpt), ignored_keys=ignored)
    return model, info


# ---------------------------------------------------------------------------------------------
# Export: allinone model (or a float subnet of a supernet) -> ESPnet2 experiment directory
# ---------------------------------------------------------------------------------------------


def _export_source(model_dir_or_model, tokenizer, fbank):
    """(model, tokenizer, fbank, packed_quantized_names) from a model dir, LoadedModel or ASRModel."""
    from allinone.models.saved import LoadedModel, PACKED_WEIGHTS, load_model_dir

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model_dir = Path(model_dir_or_model)
        loaded = load_model_dir(model_dir)
        packed = model_dir / PACKED_WEIGHTS
        quantized = []
        if packed.is_file():
            from allinone.quant.packed_file import load_packed

            quantized = sorted(load_packed(packed).quantized)
        return loaded.model, loaded.tokenizer, loaded.fbank, quantized
    if isinstance(model_dir_or_model, LoadedModel):
        m = model_dir_or_model
        return m.model, tokenizer or m.tokenizer, fbank or m.fbank, []
    if isinstance(model_dir_or_model, ASRModel):
        if tokenizer is None:
            raise ValueError("export_espnet_asr: a bare ASRModel needs tokenizer=... (its token_list)")
        if fbank is None:
            from allinone.data.features import FbankConfig

            fbank = FbankConfig(n_mels=model_dir_or_model.config.encoder.input_size)
        return model_dir_or_model, tokenizer, fbank, []
    raise ValueError(f"export_espnet_asr: expected a model directory, LoadedModel or ASRModel, "
                     f"got {type(model_dir_or_model).__name__}")


def _export_subnet(model: ASRModel, subnet):
    """The float standalone model of ``subnet`` (a string needs the model's search space)."""
    from allinone.elastic.extract import extract
    from allinone.elastic.subnet import FLOAT_BITS, KINDS, SubnetConfig

    if isinstance(subnet, str):
        if model.search_space is None:
            raise ValueError("a subnet string needs the supernet's search space; this model has none "
                             "(pass a SubnetConfig instead)")
        name, subnet = subnet, model.search_space.parse(subnet)
    elif isinstance(subnet, SubnetConfig):
        name = model.search_space.format(subnet) if model.search_space is not None else str(subnet)
    else:
        raise ValueError(f"subnet must be a string or SubnetConfig, got {type(subnet).__name__}")
    low = sorted({c.bits(k) for c in subnet.layers for k in KINDS if c.bits(k) != FLOAT_BITS})
    if low:
        raise ValueError(f"subnet {name} is quantized ({'/'.join(map(str, low))}-bit weights); ESPnet has no "
                         f"low-bit weights, so only float subnets (bits {FLOAT_BITS}) can be exported")
    small, quantized = extract(model, subnet)
    assert not quantized  # float subnet
    return small


def _stats_from_buffers(mean: torch.Tensor, std: torch.Tensor) -> dict:
    """feats_stats.npz contents (count 1) from which ESPnet's GlobalMVN recomputes mean and std."""
    import numpy as np

    m = mean.detach().double().cpu().numpy()
    s = std.detach().double().cpu().numpy()
    return {"count": np.asarray(1, dtype=np.int64), "sum": m, "sum_square": s * s + m * m}


def export_espnet_asr(
    model_dir_or_model,
    out_dir: str | os.PathLike,
    subnet=None,
    *,
    tokenizer=None,
    fbank=None,
) -> Path:
    """Write an allinone model as an ESPnet2 ASR experiment directory.

    ``out_dir`` gets ``config.yaml`` (what ESPnet's ``ASRTask`` / ``Speech2Text`` read),
    ``valid.acc.ave.pth`` (a state dict with ESPnet's keys: ours, the front end's mel
    matrix added, quantizer entries dropped), ``feats_stats.npz`` (ESPnet's
    ``global_mvn`` stats, reproducing our normalisation buffers; only with
    normalisation) and, for a SentencePiece tokenizer, ``bpe.model``.  The config names
    those files by absolute path (ESPnet resolves them against the cwd).  Every file is
    written atomically, ``config.yaml`` last.

    Args:
        model_dir_or_model: an allinone model directory, a ``LoadedModel``, or an
            ``ASRModel`` (then ``tokenizer`` is required; ``fbank`` defaults to
            ``FbankConfig`` with the encoder's ``input_size`` mel bins).
        out_dir: the experiment directory to write.
        subnet: a float subnet of a supernet (string in the model's search space, or a
            ``SubnetConfig``); None = the model itself (a supernet's full float network).
    Raises:
        ValueError: quantized weights (a subnet with bits < 32, or a packed model with
            low-bit tensors), per-block widths or a reduced head width (ESPnet's
            ``ConformerEncoder`` is uniform, head width ``output_size / heads``), a
            front end ESPnet's ``DefaultFrontend`` cannot express.
    Intermediate CTC (``interctc_weight``, ``encoder.interctc_layer_idx``) is training only and
    is not exported (ESPnet's ``Speech2Text`` would decode every tap on each call), unless the
    model is self-conditioned (``interctc_use_conditioning``), whose output depends on its taps.
    Returns:
        ``out_dir`` as a ``Path``.
    """
    from allinone.data.features import mel_filterbank, save_cmvn_stats
    from allinone.utils import atomic_open, atomic_torch_save

    model, tokenizer, fbank, packed_quantized = _export_source(model_dir_or_model, tokenizer, fbank)
    if packed_quantized:
        raise ValueError(f"the model holds quantized weights ({packed_quantized[0]}, ...); ESPnet has no low-bit "
                         "weights, so only float models can be exported")
    if subnet is not None:
        model = _export_subnet(model, subnet)
    config = model.config
    try:
        encoder_conf = config.encoder.espnet_kwargs()
    except ValueError as e:
        raise ValueError(f"this model cannot be expressed as ESPnet's ConformerEncoder: {e}") from None
    input_size = encoder_conf.pop("input_size")  # ASRTask passes the front end's output size itself
    # Intermediate CTC is training only, and with taps ESPnet's Speech2Text returns
    # (n-best, decodes of every tap) instead of the n-best list: the export leaves it out,
    # unless the taps condition the model (self-conditioned CTC changes its output).
    if not encoder_conf.get("interctc_use_conditioning"):
        encoder_conf.pop("interctc_layer_idx", None)
        encoder_conf.pop("interctc_use_conditioning", None)
    if fbank.n_mels != input_size:
        raise ValueError(f"front end has n_mels={fbank.n_mels} but the encoder expects input_size={input_size}")
    token_list = list(tokenizer.token_list)
    if len(token_list) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(token_list)} tokens, the model {config.vocab_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frontend_conf = {"fs": int(fbank.sample_rate), "n_fft": int(fbank.n_fft), "win_length": int(fbank.win_length),
                     "hop_length": int(fbank.hop_length), "n_mels": int(fbank.n_mels)}
    if fbank.fmin not in (None, 0, 0.0):
        frontend_conf["fmin"] = float(fbank.fmin)
    if fbank.fmax is not None:
        frontend_conf["fmax"] = float(fbank.fmax)

    if tokenizer.kind == "char":
        token_type, bpemodel = "char", None
    elif tokenizer.kind == "sentencepiece":
        token_type, bpemodel = "bpe", (out_dir / EXPORT_BPEMODEL).resolve()
        with atomic_open(bpemodel, "wb") as f:
            f.write(tokenizer.model_proto)
    else:
        raise ValueError(f"tokenizer kind {tokenizer.kind!r} has no ESPnet token_type")

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".quantizer." not in k
             and not k.endswith(".quantizer")}
    normalize_conf = None
    if model.normalize is not None:
        stats_path = (out_dir / EXPORT_STATS).resolve()
        save_cmvn_stats(stats_path, _stats_from_buffers(model.normalize.mean, model.normalize.std))
        normalize_conf = {"stats_file": str(stats_path)}
    # ESPnet's checkpoints carry the front end's mel matrix (a buffer, [n_fft/2+1, n_mels]).
    state = {"frontend.logmel.melmat": mel_filterbank(fbank), **state}

    cfg = {
        "token_list": token_list,
        "token_type": token_type,
        "bpemodel": str(bpemodel) if bpemodel is not None else None,
        "non_linguistic_symbols": None, "cleaner": None, "g2p": None,
        "input_size": None,
        "init": None,
        "frontend": "default",
        "frontend_conf": frontend_conf,
        "specaug": None, "specaug_conf": {},
        "normalize": "global_mvn" if normalize_conf is not None else None,
        "normalize_conf": normalize_conf or {},
        "preencoder": None, "preencoder_conf": {},
        "encoder": "conformer",
        "encoder_conf": encoder_conf,
        "postencoder": None, "postencoder_conf": {},
        "decoder": "transformer" if config.decoder is not None else None,
        "decoder_conf": dict(config.decoder or {}),
        "ctc_conf": {},
        "model": "espnet",
        "model_conf": {"ctc_weight": float(config.ctc_weight), "lsm_weight": float(config.lsm_weight),
                       "length_normalized_loss": False},
    }
    atomic_torch_save(state, out_dir / EXPORT_CHECKPOINT)
    with atomic_open(out_dir / CONFIG_NAME, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    return out_dir
