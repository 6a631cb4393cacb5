"""Training strategies: what one training step does with a batch.

A strategy runs forward and backward (possibly several times, one subnet after another,
so activation memory stays at one subnet's) and returns detached loss tensors for logging.
The trainer owns the optimizer step. ``skips_parameters`` tells DDP whether some
parameters may receive no gradient in a step (a shallow subnet skips whole layers).

Supernet strategies (docs/supernet.md), chosen by the ``supernet`` config section:

- ``sandwich``: the largest subnet on the labels (the teacher), then the smallest (of the
  space, or with ``ends: sample_from`` of the grid) and
  ``num_random`` random subnets on ``label_weight * labels + kl_weight * KL(teacher || subnet)``;
- ``targets``: a fixed list of subnets every step, the highest precision first as teacher
  (labels only), the others as above, then ``num_random`` random subnets (default 0; with
  ``sample_from``, systems of the grid other than the targets) as the others: the published
  recipe trains its target systems every step, and the random ones keep the systems between
  them trained;
- ``random``: ``num_random`` random subnets on the labels.

Random subnets come from the whole space, or with ``sample_from`` (a grid: a YAML file or a
list of subnet strings, as ``allinone bench --grid`` takes) uniformly from that list: the
systems one means to deploy.  With bits per block in the space, a random subnet is almost
never a *uniform* low-bit system (probability 4^-depth for 2 bits of 4 choices), so
without it the grid's uniform systems are trained only through mixed neighbours.

Mixed precision (docs/mixed_precision.md):

- ``mixed_precision``: one-stage search: per-group bit-width logits trained with the
  weights; loss ``label_weight * labels + kl_weight * KL(float teacher || model) +
  size_weight * penalty(expected bits - target_bits)``; ``finalize`` writes the argmax
  allocation (``allocation.json``);
- ``fixed``: one fixed subnet (a uniform precision, or an allocation from stage 1 or
  from the search) trained on ``label_weight * labels + kl_weight * KL(float teacher || subnet)``:
  the uniform-precision baselines, stage 2 of the two-stage baselines and the optional
  fine-tune ("pass 2") of a learned allocation.

Both distil from the *frozen float starting model* (a copy taken when the strategy is
built, after ``init_from`` was loaded), not from a subnet of the model being trained.

Each subnet's loss is divided by the number of subnets in the step (the gradient is their
average).  Random subnets come from a ``torch.Generator`` seeded with (seed, step), so
every DDP rank trains the same subnets.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from allinone.elastic.space import SearchSpace
from allinone.elastic.subnet import SubnetConfig

__all__ = ["PlainStrategy", "SupernetOptions", "SupernetStrategy", "MixedPrecisionStrategy",
           "FixedSubnetStrategy", "build_strategy", "ctc_kl", "grad_sync_context"]

logger = logging.getLogger("allinone")

STRATEGIES = ("sandwich", "targets", "random", "mixed_precision", "fixed")
# label_weight when the config leaves it out: non-teacher subnets of a supernet share the
# loss with the KL term; the mixed-precision strategies train one system on full labels.
DEFAULT_LABEL_WEIGHT = {"sandwich": 0.5, "targets": 0.5, "random": 0.5, "mixed_precision": 1.0, "fixed": 1.0}
# num_random when the config leaves it out: targets alone train only their targets.
DEFAULT_NUM_RANDOM = {"sandwich": 2, "targets": 0, "random": 2}


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

    def validation_subnet(self, model) -> SubnetConfig | None:
        """The system the trainer validates (and ranks epochs by): the whole model."""
        return None


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
    num_random: random subnets per step (default 2 for sandwich and random, 0 for targets);
    sample_from: a grid (YAML file or list of subnet strings) the random subnets are drawn
    from instead of the whole space;
    ends (sandwich): ``space`` (its largest and smallest subnets are the space's) or
    ``sample_from`` (the grid's; random draws then leave them out);
    targets: subnet strings
    (targets); label_weight / kl_weight: loss of non-teacher subnets; quant: the model's
    ``QuantConfig`` dict (bits, per_channel, learn_scale, method, mode); extractor_bits
    (wav2vec2 only): fixed bit-width of the CNN feature extractor in every subnet (32 =
    float, else one of quant.bits); init_from: a trained allinone model dir, ESPnet
    experiment or (wav2vec2) Hugging Face CTC directory to start from; reorder: sort FFN
    units / heads of ``init_from`` by importance; seed: subnet sampling seed (default:
    train.seed).  label_weight defaults to 0.5 (supernet strategies) or 1.0
    (mixed_precision, fixed).

    Mixed precision (docs/mixed_precision.md): candidate_bits: bit-widths to choose from;
    target_bits: average-bit budget; granularity: layer | block | kind; tau0, tau_min,
    anneal_steps: Gumbel-softmax temperature schedule; hard: straight-through one-hot
    samples; size_weight, size_penalty (square | abs | hinge): the size term; size_of:
    ``expected`` (under softmax(logits)) or ``sample`` (of this step's Gumbel-softmax sample);
    logit_lr: peak learning rate of the logits; logit_schedule: ``shared`` (the logits follow
    the weights' warmup / decay) or ``constant`` (``logit_lr`` from the first step);
    search_steps: after this many steps fix the argmax allocation and fine-tune it (pass 2; 0 = search to the end);
    freeze_weights: train only the logits, model in eval mode (the two-stage baseline's
    search on the frozen float model); enforce_budget: lower the final argmax until it fits target_bits;
    allocation_method: greedy | knapsack (stage 1 of the two-stage baselines).
    subnet (strategy fixed): a subnet string or an allocation.json (file or run dir).
    """

    space: Any = None
    strategy: str = "sandwich"
    num_random: int | None = None
    sample_from: Any = None
    ends: str = "space"
    targets: list[str] = field(default_factory=list)
    label_weight: float | None = None
    kl_weight: float = 1.0
    quant: dict | None = None
    extractor_bits: int = 32
    init_from: str | None = None
    reorder: bool = True
    seed: int | None = None
    # mixed_precision (and stage 1 of the two-stage baselines)
    candidate_bits: list[int] = field(default_factory=lambda: [8, 4, 2])
    target_bits: float = 4.0
    granularity: str = "layer"
    tau0: float = 5.0
    tau_min: float = 0.5
    anneal_steps: int = 2000
    hard: bool = False
    size_weight: float = 1.0
    size_penalty: str = "square"
    logit_lr: float = 0.01
    logit_schedule: str = "shared"
    size_of: str = "expected"
    search_steps: int = 0
    freeze_weights: bool = False
    enforce_budget: bool = True
    allocation_method: str = "knapsack"
    # fixed
    subnet: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SupernetOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown supernet option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        opts = cls(**d)
        if opts.strategy in DEFAULT_LABEL_WEIGHT and opts.label_weight is None:
            opts.label_weight = DEFAULT_LABEL_WEIGHT[opts.strategy]
        if opts.num_random is None:
            opts.num_random = DEFAULT_NUM_RANDOM.get(opts.strategy, 0)
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
        if (opts.ends not in ("space", "sample_from")
                or opts.ends == "sample_from" and (opts.sample_from is None or opts.strategy != "sandwich")):
            raise ValueError(f"supernet.ends={opts.ends!r}: 'space' (the sandwich's largest and smallest are "
                             "the space's) or 'sample_from' (the grid's; for strategy sandwich with "
                             "supernet.sample_from)")
        if opts.strategy == "fixed" and not opts.subnet:
            raise ValueError("supernet.strategy=fixed needs supernet.subnet (a subnet string or an allocation.json)")
        if opts.strategy == "mixed_precision":
            from allinone.elastic.mixed_precision import GRANULARITIES

            cands = [int(b) for b in opts.candidate_bits]
            if len(set(cands)) < 2 or any(not 1 <= b <= 8 for b in cands):
                raise ValueError(f"supernet.candidate_bits={list(opts.candidate_bits)}: need at least two "
                                 "integer bit-widths in 1..8")
            if not min(cands) <= opts.target_bits <= max(cands):
                raise ValueError(f"supernet.target_bits={opts.target_bits} is outside the candidates' range "
                                 f"{min(cands)}..{max(cands)}")
            if opts.granularity not in GRANULARITIES:
                raise ValueError(f"supernet.granularity={opts.granularity!r}; expected one of "
                                 f"{', '.join(GRANULARITIES)}")
            if not 0 < opts.tau_min <= opts.tau0:
                raise ValueError(f"supernet.tau0={opts.tau0}, tau_min={opts.tau_min}: need 0 < tau_min <= tau0")
            if opts.size_weight < 0 or opts.logit_lr <= 0 or opts.search_steps < 0:
                raise ValueError("supernet.size_weight must be >= 0, logit_lr > 0, search_steps >= 0")
            if opts.size_of not in ("expected", "sample"):
                raise ValueError(f"supernet.size_of {opts.size_of!r}; expected expected or sample")
            if opts.logit_schedule not in ("shared", "constant"):
                raise ValueError(f"supernet.logit_schedule {opts.logit_schedule!r}; expected shared or constant")
            if opts.size_penalty not in ("square", "abs", "hinge"):
                raise ValueError(f"supernet.size_penalty={opts.size_penalty!r}; expected square, abs or hinge")
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
        self.targets = sorted((space.parse(t) for t in opts.targets), reverse=True, key=_size_key)
        self.calls = 0  # micro-batches seen; with the seed it fixes each step's random subnets
        self.pool = None if opts.sample_from is None else _sample_pool(opts.sample_from, space)
        # the sandwich's ends: the space's, or (ends: sample_from) the grid's largest and smallest
        ranked = sorted(self.pool, key=_size_key) if opts.ends == "sample_from" else None
        self.largest, self.smallest = (ranked[-1], ranked[0]) if ranked else (space.largest(), space.smallest())
        if ranked and self.largest == self.smallest:
            raise ValueError("supernet.ends=sample_from needs a grid of at least two systems")
        # (ends: sample_from is the sandwich's only)
        every_step = self.targets if opts.strategy == "targets" else [self.largest, self.smallest] if ranked else []
        if self.pool is not None and every_step and opts.num_random:
            # the random systems are the others: one trained every step drawn again would train twice
            self.pool = [s for s in self.pool if s not in every_step]
            if not self.pool:
                raise ValueError("supernet.sample_from lists only systems trained every step: no other to draw")

    def _sample(self, g: torch.Generator) -> SubnetConfig:
        if self.pool is None:
            return self.space.sample(g)
        return self.pool[int(torch.randint(len(self.pool), (1,), generator=g))]

    def subnets(self, step: int) -> list[tuple[SubnetConfig, bool]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        randoms = [self._sample(g) for _ in range(self.opts.num_random)]
        if self.opts.strategy == "sandwich":
            return [(self.largest, True), (self.smallest, False)] + [(s, False) for s in randoms]
        if self.opts.strategy == "targets":
            return [(s, i == 0) for i, s in enumerate(self.targets)] + [(s, False) for s in randoms]
        return [(s, False) for s in randoms]

    def validation_subnet(self, model) -> SubnetConfig | None:
        """The teacher: the whole float model (None), or with ``ends: sample_from`` the grid's largest."""
        return self.largest if self.opts.ends == "sample_from" else None

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
            key = f"loss/{self.space.format(subnet)}"
            if key in logs:  # the same subnet twice in a step (random draws from the whole space)
                key = f"{key}#{i}"
            logs[key] = loss.detach()
        return logs


def _size_key(s: SubnetConfig) -> tuple:
    """Orders subnets by precision, then depth, then width (the largest last)."""
    return s.average_bits(), s.depth, sum(c.ffn + c.heads for c in s.layers)


def _sample_pool(source, space: SearchSpace) -> list[SubnetConfig]:
    """The subnets of ``supernet.sample_from``, each validated against the space."""
    from allinone.eval.bench import resolve_grid

    if not isinstance(source, (str, list, tuple)):
        source = list(source)  # an omegaconf ListConfig
    try:
        pool = resolve_grid(source if isinstance(source, str) else [str(x) for x in source], space)
    except ValueError as e:
        raise ValueError(f"supernet.sample_from: {e}") from None
    if not pool:
        raise ValueError("supernet.sample_from lists no subnet")
    return pool


def _frozen_teacher(model):
    """A frozen copy of ``model`` (eval mode, no gradients): the float teacher of the
    mixed-precision strategies, run with ``subnet=None``."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _teacher_log_probs(teacher, batch: dict, use_bf16: bool) -> torch.Tensor:
    """[B, T', V] CTC log-probabilities of the float teacher (no gradient)."""
    with torch.no_grad(), torch.autocast(batch["feats"].device.type, dtype=torch.bfloat16, enabled=use_bf16):
        enc, _ = teacher.encode(batch["feats"], batch["feat_lens"])
        return teacher.ctc_log_probs(enc).detach()


class _DistilledSingleSystem:
    """Shared parts of ``MixedPrecisionStrategy`` and ``FixedSubnetStrategy``: the frozen
    float teacher, the distilled loss of one forward, the timing record."""

    skips_parameters = True  # unused scales of other bit-widths; logits during pass 2

    def __init__(self, model, opts: SupernetOptions):
        self.opts = opts
        self.space = model.search_space
        self.teacher = _frozen_teacher(model) if opts.kl_weight > 0 else None
        self.started = time.time()

    def _loss(self, ddp_model, batch: dict, use_bf16: bool, subnet: SubnetConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distil = self.teacher is not None
        out = _forward(ddp_model, batch, use_bf16, subnet=subnet, return_ctc_log_probs=distil)
        loss = self.opts.label_weight * out["loss"]
        logs = {"loss_asr": out["loss"].detach()}
        if distil:
            kl = ctc_kl(_teacher_log_probs(self.teacher, batch, use_bf16), out["ctc_log_probs"], out["enc_lens"])
            loss = loss + self.opts.kl_weight * kl
            logs["kl"] = kl.detach()
        return loss, logs


class MixedPrecisionStrategy(_DistilledSingleSystem):
    """One-stage mixed precision (``allinone.elastic.mixed_precision``).

    Building it attaches the search to ``model`` (``model.bit_search``: logits as model
    Parameters, so build it before the optimizer).  Each step: temperature
    ``tau(step)``, one Gumbel-softmax sample per group (generator seeded with
    (seed, step): every DDP rank draws the same), forward of the mixed subnet, loss
    ``label_weight * labels + kl_weight * KL(teacher || model) + size_weight * penalty``.
    After ``search_steps`` steps (if > 0) the argmax allocation is fixed and trained
    alone (pass 2).  ``finalize`` writes ``allocation.json`` and ``timing.json`` and
    detaches the search, so the saved model is a plain supernet.

    base_lr: the trainer's ``optim.lr``; the logits' learning rate is ``logit_lr`` through
    ``logit_scale = logit_lr / base_lr`` (see the mixed_precision module docstring);
    None: ``logit_scale = 1`` (the optimizer's own learning rate).
    """

    def __init__(self, model, opts: SupernetOptions, seed: int = 0, base_lr: float | None = None):
        from allinone.elastic import mixed_precision as mp

        space = model.search_space
        template = space.largest()
        mp.check_space_expresses(space, opts.granularity, opts.candidate_bits)
        super().__init__(model, opts)  # the teacher is the float model before any search
        self.seed = opts.seed if opts.seed is not None else seed
        scale = opts.logit_lr / base_lr if base_lr else 1.0
        self.search = mp.attach_mixed_precision(model, template, opts.granularity, opts.candidate_bits,
                                                opts.target_bits, scale)
        self.mixed = mp.mixed_subnet(template)
        self.fixed: SubnetConfig | None = None  # the allocation of pass 2, once fixed
        if opts.freeze_weights:
            # Stage 1 of a two-stage baseline: search on the frozen float model, logits only.
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("bit_search."))

    def step(self, ddp_model, model, batch: dict, use_bf16: bool, loss_scale: float,
             sync_grads: bool) -> dict[str, torch.Tensor]:
        from allinone.elastic.mixed_precision import final_allocation, temperature

        o, search = self.opts, self.search
        if o.freeze_weights:
            # The frozen float model as deployed: no dropout, BatchNorm statistics unchanged.
            model.eval()
        step = int(search.steps)
        search.steps += 1
        searching = not (o.search_steps and step >= o.search_steps)
        if not searching and self.fixed is None:
            self.fixed = final_allocation(model, o.enforce_budget)
            logger.info("mixed precision: allocation fixed after %d steps: %s", step, self.space_format(self.fixed))
        with grad_sync_context(ddp_model, sync_grads):
            if searching:
                tau = temperature(step, o.tau0, o.tau_min, o.anneal_steps)
                sample = search.sample(tau, o.hard, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
            loss, logs = self._loss(ddp_model, batch, use_bf16, self.mixed if searching else self.fixed)
            if searching:
                penalty = search.size_penalty(o.size_penalty, sample if o.size_of == "sample" else None)
                loss = loss + o.size_weight * penalty
                logs["penalty"] = penalty.detach()
                logs["tau"] = torch.tensor(tau)
            (loss * loss_scale).backward()
        with torch.no_grad():
            logs["exp_bits"] = search.expected_bits().detach()
        return {"loss": loss.detach(), **logs}

    def validation_subnet(self, model) -> SubnetConfig:
        """The allocation the run would end with now: the fixed one in pass 2, else the argmax
        (budget enforced), so that epochs are ranked by the system that is extracted."""
        from allinone.elastic.mixed_precision import final_allocation

        return self.fixed if self.fixed is not None else final_allocation(model, self.opts.enforce_budget)

    def space_format(self, subnet: SubnetConfig) -> str:
        from allinone.elastic.mixed_precision import add_to_space

        return add_to_space(self.space, subnet).format(subnet)

    def finalize(self, model, exp_dir: str | Path, train_seconds: float | None = None,
                 world_size: int = 1) -> dict:
        """Write ``allocation.json`` (argmax allocation, achieved and expected average bits,
        per-layer bits, probabilities) and ``timing.json`` into ``exp_dir``; detach the
        search from ``model``.  Returns the allocation report."""
        from allinone.elastic import mixed_precision as mp

        subnet = self.validation_subnet(model)
        seconds = train_seconds if train_seconds is not None else time.time() - self.started
        method = "search_frozen" if self.opts.freeze_weights else "one_stage"
        timing = mp.write_timing(Path(exp_dir) / mp.TIMING_FILE, method, seconds, world_size)
        report = mp.allocation_report(model, subnet, method, pass2_from_step=self.opts.search_steps or None,
                                      timing=timing)
        mp.detach_mixed_precision(model)
        if self.opts.freeze_weights:
            for p in model.parameters():
                p.requires_grad_(True)
        mp.write_allocation(Path(exp_dir) / mp.ALLOCATION_FILE, report)
        logger.info("mixed precision: %s, %.3f average bits (target %.2f) -> %s", report["subnet"],
                    report["average_bits"], self.opts.target_bits, Path(exp_dir) / mp.ALLOCATION_FILE)
        return report


class FixedSubnetStrategy(_DistilledSingleSystem):
    """One fixed subnet every step (``supernet.subnet``: a string, or an ``allocation.json``).

    Loss ``label_weight * labels + kl_weight * KL(float teacher || subnet)``.  ``finalize``
    writes ``allocation.json`` (the subnet and its average bits) and ``timing.json``,
    whose stages include those recorded in the allocation file it came from (stage 1).
    """

    def __init__(self, model, opts: SupernetOptions):
        from allinone.elastic.mixed_precision import parse_into_space, read_allocation

        super().__init__(model, opts)
        self.source: dict | None = None
        text = opts.subnet
        if text.endswith(".json") or Path(text).is_dir():
            self.source = read_allocation(text)
            text = self.source["subnet"]
        # A learned allocation may mix bits per block / kind where the space does not: the
        # space is widened for it (and saved with the model, so the string extracts).
        self.subnet, self.space = parse_into_space(model.search_space, text, model.config)
        model.search_space = self.space

    def validation_subnet(self, model) -> SubnetConfig:
        """The trained subnet."""
        return self.subnet

    def step(self, ddp_model, model, batch: dict, use_bf16: bool, loss_scale: float,
             sync_grads: bool) -> dict[str, torch.Tensor]:
        with grad_sync_context(ddp_model, sync_grads):
            loss, logs = self._loss(ddp_model, batch, use_bf16, self.subnet)
            (loss * loss_scale).backward()
        return {"loss": loss.detach(), **logs}

    def finalize(self, model, exp_dir: str | Path, train_seconds: float | None = None,
                 world_size: int = 1) -> dict:
        from allinone.elastic import mixed_precision as mp

        seconds = train_seconds if train_seconds is not None else time.time() - self.started
        previous = (self.source or {}).get("timing", {}).get("stages", [])
        method = "qat_fixed" if self.source is None else f"qat_fixed after {self.source.get('method', '?')}"
        timing = mp.write_timing(Path(exp_dir) / mp.TIMING_FILE, "qat_fixed", seconds, world_size, previous)
        report = mp.allocation_report(model, self.subnet, method, timing=timing,
                                      source=None if self.source is None else self.opts.subnet)
        mp.write_allocation(Path(exp_dir) / mp.ALLOCATION_FILE, report)
        return report


def build_strategy(supernet_cfg: dict | None, model, seed: int = 0, base_lr: float | None = None):
    """The plain strategy without a supernet section; otherwise the one ``supernet.strategy`` names.

    ``model`` must already be a supernet (``init_supernet`` attached its search space).
    Build the strategy before the optimizer: ``mixed_precision`` adds the logits to the
    model.  base_lr: the trainer's ``optim.lr`` (sets the logits' learning rate).
    """
    if not supernet_cfg:
        return PlainStrategy()
    opts = SupernetOptions.from_dict(dict(supernet_cfg))
    space = getattr(model, "search_space", None)
    if space is None:
        raise ValueError("the model is not a supernet: build it with trainer.build_model from the same config")
    if opts.kl_weight > 0 and model.ctc is None and opts.strategy != "random":
        raise ValueError("supernet.kl_weight > 0 distils CTC posteriors, but the model has no CTC head")
    if opts.strategy == "mixed_precision":
        return MixedPrecisionStrategy(model, opts, seed, base_lr)
    if opts.strategy == "fixed":
        return FixedSubnetStrategy(model, opts)
    return SupernetStrategy(space, opts, seed)
