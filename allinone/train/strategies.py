"""Training strategies: what one training step does with a batch.

A strategy runs forward and backward (possibly several times, one subnet after another,
so activation memory stays at one subnet's) and returns detached loss tensors for logging.
The trainer owns the optimizer step. ``skips_parameters`` tells DDP whether some
parameters may receive no gradient in a step (a shallow subnet skips whole layers).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel


def grad_sync_context(ddp_model, sync: bool):
    """DDP all-reduces gradients on every backward unless told not to (accumulation)."""
    if isinstance(ddp_model, DistributedDataParallel) and not sync:
        return ddp_model.no_sync()
    return contextlib.nullcontext()


class PlainStrategy:
    """One forward/backward of the whole model on the labels."""

    skips_parameters = False

    def step(self, ddp_model, model, batch: dict, use_bf16: bool, loss_scale: float,
             sync_grads: bool) -> dict[str, torch.Tensor]:
        device_type = batch["feats"].device.type
        with grad_sync_context(ddp_model, sync_grads):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
                out = ddp_model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"])
            (out["loss"] * loss_scale).backward()
        return {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}


def build_strategy(supernet_cfg: dict | None, model):
    """The plain strategy without a supernet section; supernet strategies otherwise."""
    if not supernet_cfg:
        return PlainStrategy()
    raise ValueError("supernet training is not available yet: remove the 'supernet' section of the config")
