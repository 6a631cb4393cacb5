"""Training strategies: what one training step does with a batch.

A strategy runs forward and backward (possibly several times, one subnet after another,
so activation memory stays at one subnet's) and returns detached loss tensors for logging.
The trainer owns the optimizer step. ``skips_parameters`` tells DDP whether some
parameters may receive no gradient in a step (a shallow subnet skips whole layers).

Supernet strategies (docs/supernet.md), chosen by the ``supernet`` config section:

- ``sandwich``: the largest subnet on the labels (the teacher), then the smallest and
  ``num_random`` random subnets on ``label_weight * labels + kl_weight * KL(teacher || subnet)``;
- ``targets``: a fixed list of subnets every step, the highest precision first as teacher
  (labels only), the others as above;
- ``random``: ``num_random`` random subnets on the labels.

Each subnet's loss is divided by the number of subnets in the step (the gradient is their
average).  Random subnets come from a ``torch.Generator`` seeded with (seed, step), so
every DDP rank trains the same subnets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from allinone.elastic.space import SearchSpace
from allinone.elastic.subnet import SubnetConfig

__all__ = ["PlainStrategy", "SupernetOptions", "SupernetStrategy", "build_strategy", "ctc_kl",
           "grad_sync_context"]

STRATEGIES = ("sandwich", "targets", "random")


def grad_sync_context(ddp_model, sync: bool):
    """DDP all-reduces gradients on every backward unless told not to (accumulation)."""
    if isinstance(ddp_model, DistributedDataParallel) and not sync:
        return ddp_model.no_sync()
    return contextlib.nullcontext()


def _forward(ddp_model, batch: dict, use_bf16: bool, **kwargs) -> dict:
    with torch.autocast(batch["feats"].device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return ddp_model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"], **kwargs)


class PlainStrategy:
    """One forward/backward of the whole model on the labels."""

    skips_parameters = False

    def step(self, ddp_model, model, batch: dict, use_bf16: bool, loss_scale: float,
             sync_grads: bool) -> dict[str, torch.Tensor]:
        with grad_sync_context(ddp_model, sync_grads):
            out = _forward(ddp_model, batch, use_bf16)
            (out["loss"] * loss_scale).backward()
        return {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}


def ctc_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor,
           lengths: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of CTC posteriors, summed over valid frames, / batch size.

    Both [B, T', V] log-probabilities (the teacher's detached); lengths [B].  Normalised
    like the CTC loss (per-utterance sums averaged over the batch), so the two add up.
    """
    t, s = teacher_log_probs.float(), student_log_probs.float()
    per_frame = (t.exp() * (t - s)).sum(-1)  # [B, T']
    valid = torch.arange(per_frame.size(1), device=lengths.device)[None, :] < lengths[:, None]
    return per_frame.masked_fill(~valid, 0.0).sum() / per_frame.size(0)


@dataclass
class SupernetOptions:
    """The ``supernet`` section of an experiment config.

    space: search-space YAML path or inline dict; strategy: sandwich | targets | random;
    num_random: random subnets per step (sandwich, random); targets: subnet strings
    (targets); label_weight / kl_weight: loss of non-teacher subnets; quant: the model's
    ``QuantConfig`` dict (bits, per_channel, learn_scale, method, mode); init_from: a
    trained allinone model dir or ESPnet experiment to start from; reorder: sort FFN
    units / heads of ``init_from`` by importance; seed: subnet sampling seed (default:
    train.seed).
    """

    space: Any = None
    strategy: str = "sandwich"
    num_random: int = 2
    targets: list[str] = field(default_factory=list)
    label_weight: float = 0.5
    kl_weight: float = 1.0
    quant: dict | None = None
    init_from: str | None = None
    reorder: bool = True
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SupernetOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown supernet option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        opts = cls(**d)
        if opts.space is None:
            raise ValueError("supernet.space is required (a conf/space/*.yaml path or an inline mapping)")
        if opts.strategy not in STRATEGIES:
            raise ValueError(f"supernet.strategy={opts.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if opts.strategy == "targets" and not opts.targets:
            raise ValueError("supernet.strategy=targets needs supernet.targets (a list of subnet strings)")
        if opts.num_random < 0 or (opts.strategy == "random" and opts.num_random < 1):
            raise ValueError(f"supernet.num_random={opts.num_random} must be >= 0 (>= 1 for 'random')")
        if opts.label_weight < 0 or opts.kl_weight < 0 or opts.label_weight + opts.kl_weight == 0:
            raise ValueError("supernet.label_weight and kl_weight must be >= 0 and not both 0")
        return opts


class SupernetStrategy:
    """Trains several subnets per step (see the module docstring).

    ``subnets(step)`` is the list of (subnet, is_teacher) of a step; ``step`` runs them.
    """

    skips_parameters = True  # shallow / narrow subnets leave parameters without gradient

    def __init__(self, space: SearchSpace, opts: SupernetOptions, seed: int = 0):
        self.space, self.opts = space, opts
        self.seed = opts.seed if opts.seed is not None else seed
        # Highest precision first (then the widest): the first target is the teacher.
        self.targets = sorted((space.parse(t) for t in opts.targets), reverse=True,
                              key=lambda s: (s.average_bits(), s.depth, sum(c.ffn + c.heads for c in s.layers)))
        self.calls = 0  # micro-batches seen; with the seed it fixes each step's random subnets

    def subnets(self, step: int) -> list[tuple[SubnetConfig, bool]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        randoms = [self.space.sample(g) for _ in range(self.opts.num_random)]
        if self.opts.strategy == "sandwich":
            return [(self.space.largest(), True), (self.space.smallest(), False)] + [(s, False) for s in randoms]
        if self.opts.strategy == "targets":
            return [(s, i == 0) for i, s in enumerate(self.targets)]
        return [(s, False) for s in randoms]

    def step(self, ddp_model, model, batch: dict, use_bf16: bool, loss_scale: float,
             sync_grads: bool) -> dict[str, torch.Tensor]:
        plan = self.subnets(self.calls)
        self.calls += 1
        distil = self.opts.kl_weight > 0 and any(t for _, t in plan)
        scale = loss_scale / len(plan)
        teacher = None
        logs: dict[str, torch.Tensor] = {}
        for i, (subnet, is_teacher) in enumerate(plan):
            # Gradients are all-reduced only in the step's last backward (DDP no_sync before).
            with grad_sync_context(ddp_model, sync_grads and i == len(plan) - 1):
                out = _forward(ddp_model, batch, use_bf16, subnet=subnet, return_ctc_log_probs=distil)
                loss = out["loss"]
                if distil and not is_teacher:
                    kl = ctc_kl(teacher, out["ctc_log_probs"], out["enc_lens"])
                    loss = self.opts.label_weight * loss + self.opts.kl_weight * kl
                (loss * scale).backward()
            if distil and is_teacher:
                teacher = out["ctc_log_probs"].detach()
            logs[f"loss/{self.space.format(subnet)}"] = loss.detach()
        return logs


def build_strategy(supernet_cfg: dict | None, model, seed: int = 0):
    """The plain strategy without a supernet section; a ``SupernetStrategy`` otherwise.

    ``model`` must already be a supernet (``init_supernet`` attached its search space).
    """
    if not supernet_cfg:
        return PlainStrategy()
    opts = SupernetOptions.from_dict(dict(supernet_cfg))
    space = getattr(model, "search_space", None)
    if space is None:
        raise ValueError("the model is not a supernet: build it with trainer.build_model from the same config")
    if opts.kl_weight > 0 and model.ctc is None and opts.strategy != "random":
        raise ValueError("supernet.kl_weight > 0 distils CTC posteriors, but the model has no CTC head")
    return SupernetStrategy(space, opts, seed)
