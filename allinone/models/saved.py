"""A saved model is a directory anyone can load in one call.

Layout::

    MODEL_DIR/
      config.json            ``arch`` (``conformer_asr``: ASRModelConfig; ``wav2vec2_ctc``:
                             Wav2Vec2Config), front end (``fbank``, or ``waveform`` for wav2vec2),
                             optional subnet string, optional search_space (supernets)
      model.safetensors      float weights                  (plain or extracted float model)
      model.packed.safetensors  packed low-bit weights     (extracted quantized model)
      tokenizer/             the tokenizer the model was trained with

Only one of the two weight files is present. Both load without executing code from the file.
A supernet (a model with a ``quant`` section) is saved like any model: its quantizer scales
are ordinary state-dict entries, and ``config.json`` carries its search space.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from allinone.utils import atomic_open

ARCH = "conformer_asr"
WAV2VEC2_ARCH = "wav2vec2_ctc"  # allinone.models.wav2vec2.Wav2Vec2CTCModel on raw waveforms
ARCHES = (ARCH, WAV2VEC2_ARCH)
FORMAT_VERSION = 1
FLOAT_WEIGHTS = "model.safetensors"
PACKED_WEIGHTS = "model.packed.safetensors"


@dataclass
class LoadedModel:
    model: Any  # allinone.models.asr.ASRModel or allinone.models.wav2vec2.Wav2Vec2CTCModel
    fbank: Any  # the front end: allinone.data.features.FbankConfig or allinone.data.dataset.WaveformConfig
    tokenizer: Any
    info: dict


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_arch(model) -> str:
    """``config.json``'s ``arch`` of a model: which class ``load_model_dir`` builds."""
    from allinone.models.wav2vec2 import Wav2Vec2CTCModel

    return WAV2VEC2_ARCH if isinstance(model, Wav2Vec2CTCModel) else ARCH


def _model_config_json(model, fbank, extra: dict | None) -> dict:
    from allinone.data.dataset import WaveformConfig

    config = {
        "format_version": FORMAT_VERSION,
        "arch": model_arch(model),
        "model": model.config.to_dict(),
        # The front end, under a key that says which kind it is.
        ("waveform" if isinstance(fbank, WaveformConfig) else "fbank"): asdict(fbank),
    }
    space = getattr(model, "search_space", None)
    if space is not None:
        config["search_space"] = space.to_dict()
    config.update(extra or {})
    return config


def _save_tokenizer(out_dir: Path, tokenizer) -> None:
    tok_dir = out_dir / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save(tok_dir)


def save_model_dir(out_dir: str | Path, model, fbank, tokenizer, extra: dict | None = None) -> Path:
    """Write ``model`` (float) with its front-end settings and tokenizer to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _model_config_json(model, fbank, extra)
    _save_tokenizer(out_dir, tokenizer)
    save_safetensors_atomic(model.state_dict(), out_dir / FLOAT_WEIGHTS)
    (out_dir / PACKED_WEIGHTS).unlink(missing_ok=True)
    with atomic_open(out_dir / "config.json") as f:
        json.dump(config, f, indent=2)
    return out_dir


def save_extracted(out_dir: str | Path, model, quantized: dict, fbank, tokenizer,
                   extra: dict | None = None) -> Path:
    """Write an extracted subnet: ``config.json``, ``model.packed.safetensors``, ``tokenizer/``.

    quantized: name -> ``QuantizedTensor`` (packed as codes + scale); every other tensor of
    ``model.state_dict()`` is stored as is.  ``extra`` (e.g. ``{"subnet": "L6_F1024_H4_B4"}``)
    goes into ``config.json``.
    """
    from allinone.quant.packed_file import save_packed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _model_config_json(model, fbank, extra)
    _save_tokenizer(out_dir, tokenizer)
    state = model.state_dict()
    unknown = sorted(set(quantized) - set(state))
    if unknown:
        raise ValueError(f"quantized tensors that are not in the model: {unknown[:5]}")
    save_packed(out_dir / PACKED_WEIGHTS, config["arch"], config["model"],
                {k: v for k, v in state.items() if k not in quantized}, quantized)
    (out_dir / FLOAT_WEIGHTS).unlink(missing_ok=True)
    with atomic_open(out_dir / "config.json") as f:
        json.dump(config, f, indent=2)
    return out_dir


def read_model_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ValueError(f"model directory not found: {model_dir}")
    if not cfg_path.is_file():
        raise ValueError(f"{model_dir} is not an allinone model directory: config.json is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("arch") not in ARCHES:
        raise ValueError(f"{cfg_path}: architecture {config.get('arch')!r} is not one of "
                         f"{', '.join(map(repr, ARCHES))}")
    return config


def load_model_dir(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a float or packed model directory written by allinone (train, extract)."""
    from allinone.data.dataset import WaveformConfig
    from allinone.data.features import FbankConfig
    from allinone.data.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if config["arch"] == WAV2VEC2_ARCH:
        from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

        model = Wav2Vec2CTCModel(Wav2Vec2Config.from_dict(config["model"]))
        front_end = WaveformConfig(**config["waveform"])
    else:
        from allinone.models.asr import ASRModel, ASRModelConfig

        model = ASRModel(ASRModelConfig.from_dict(config["model"]))
        front_end = FbankConfig(**config["fbank"])
    if (model_dir / PACKED_WEIGHTS).is_file():
        from allinone.quant.packed_file import load_packed

        packed = load_packed(model_dir / PACKED_WEIGHTS, expected_arch=config["arch"])
        state = packed.state_dict
    elif (model_dir / FLOAT_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(model_dir / FLOAT_WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{model_dir / FLOAT_WEIGHTS} is corrupt or truncated: {e}") from None
    else:
        raise ValueError(f"{model_dir} holds no weights ({FLOAT_WEIGHTS} or {PACKED_WEIGHTS})")
    ours = model.state_dict()
    misfit = [f"{k} {tuple(v.shape)} (config.json: {tuple(ours[k].shape)})"
              for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    if misfit:
        raise ValueError(f"weights in {model_dir} do not fit its config.json: {len(misfit)} tensor(s) of another "
                         f"shape, e.g. {'; '.join(misfit[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {model_dir} do not fit its config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if config.get("search_space") is not None:
        from allinone.elastic.space import SearchSpace

        model.search_space = SearchSpace.from_dict(config["search_space"]).for_model(model.config)
    model.to(device).eval()
    return LoadedModel(model, front_end, load_tokenizer(model_dir / "tokenizer"), config)
