"""Turning a freshly built model into a supernet ready to train.

``init_supernet`` loads trained weights (optional), sorts FFN units and heads by
importance (optional), sets the quantizer scales from the final weights, and attaches the
search space (checked against the model).  The order matters: scales are computed from
the weights the supernet starts with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from allinone.elastic.importance import reorder_by_importance
from allinone.elastic.quant import init_quantizers
from allinone.elastic.space import SearchSpace, load_space

__all__ = ["load_init_weights", "init_supernet"]

logger = logging.getLogger("allinone")


def load_init_weights(model, source: str | Path) -> None:
    """Copy the weights of a trained model into ``model`` (quantizer scales excepted).

    source: an allinone model directory (``config.json``), an ESPnet2 experiment
    directory (``config.yaml`` + ``*.pth``) or, for a ``Wav2Vec2CTCModel``, a Hugging Face
    ``Wav2Vec2ForCTC`` / ``HubertForCTC`` directory (``config.json`` with ``model_type``).
    Shapes must match exactly.
    """
    source = Path(source)
    if _is_hf_dir(source):
        from allinone.interop.huggingface import load_hf_ctc

        state = load_hf_ctc(source)[0].state_dict()
    elif (source / "config.json").is_file():
        from allinone.models.saved import load_model_dir

        state = load_model_dir(source).model.state_dict()
    elif (source / "config.yaml").is_file():
        from allinone.interop.espnet import load_espnet_asr

        state = load_espnet_asr(source)[0].state_dict()
    else:
        raise ValueError(f"init_from={source}: neither an allinone model directory (config.json), "
                         "a Hugging Face CTC directory nor an ESPnet experiment (config.yaml)")
    ours = model.state_dict()
    unexpected = [k for k in state if k not in ours]
    missing = [k for k in ours if k not in state and ".quantizer." not in k]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items()
              if k in ours and v.shape != ours[k].shape]
    if unexpected or missing or shapes:
        raise ValueError(f"init_from={source} does not fit the supernet (same architecture and vocabulary "
                         f"needed; copy its tokenizer/ into the experiment): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            ours[k].copy_(v)


def _is_hf_dir(source: Path) -> bool:
    """A Hugging Face model directory: its ``config.json`` names a ``model_type``."""
    try:
        return "model_type" in json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return False


def init_supernet(model, space: str | dict | SearchSpace, init_from: str | Path | None = None,
                  reorder: bool = True) -> SearchSpace:
    """Prepare ``model`` (an ``ASRModel`` or a ``Wav2Vec2CTCModel`` with a ``quant`` section) for
    supernet training; returns its bound space.

    init_from: trained weights to start from (see ``load_init_weights``); reorder: sort FFN
    units and heads of those weights by importance (only with ``init_from``; random
    weights have no order worth keeping).
    """
    bound = load_space(space).for_model(model.config)
    if init_from:
        load_init_weights(model, init_from)
        logger.info("supernet initialised from %s", init_from)
        if reorder:
            reorder_by_importance(model)
    init_quantizers(model, force=True)
    model.search_space = bound
    return bound
