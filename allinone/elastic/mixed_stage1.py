"""Stage 1 of the two-stage mixed-precision baselines: sensitivity -> allocation.json.

``run_stage1(cfg, method, out_dir)`` (``allinone allocate CONFIG --method kl|hessian``)
builds the supernet exactly as training would from the experiment config (``supernet``
section: quant, init_from, space, candidate_bits, target_bits, granularity,
allocation_method), measures each group's sensitivity on a few training batches, picks
bit-widths under the budget, and writes ``out_dir/allocation.json`` (subnet string,
average bits, scores) and ``out_dir/timing.json`` (stage-1 seconds).  Stage 2 is then an
ordinary training run with ``supernet.strategy=fixed supernet.subnet=out_dir/allocation.json``,
whose ``timing.json`` adds its own time to stage 1's.

The third stage-1 variant, the differentiable search on the frozen float model, is a
training run: ``supernet.strategy=mixed_precision supernet.freeze_weights=true``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from allinone.elastic import mixed_precision as mp
from allinone.elastic.mixed_budget import allocate

__all__ = ["run_stage1"]

logger = logging.getLogger("allinone")


def run_stage1(cfg, method: str, out_dir: str | Path, num_batches: int = 8, n_samples: int = 8,
               device: str = "auto") -> dict:
    """Stage 1 from an ``ExperimentConfig``; returns the allocation report (also written).

    method: ``kl`` or ``hessian`` (``allinone.quant.sensitivity``); num_batches: training
    batches (``train.max_frames`` each, ``train.max_samples`` for a wav2vec2 model;
    shuffled with ``train.seed``, no SpecAugment);
    n_samples: Hutchinson samples (hessian).  The timer starts after data preparation
    (cached features are shared by every method), as the trainer's does.
    """
    from allinone.quant.sensitivity import SENSITIVITIES, hessian_sensitivity, kl_sensitivity
    from allinone.train.config import model_kind
    from allinone.train.strategies import SupernetOptions
    from allinone.train.trainer import build_model, make_loader, pick_device, prepare_data, to_device

    if method not in SENSITIVITIES:
        raise ValueError(f"stage-1 method {method!r}; expected one of {', '.join(SENSITIVITIES)} "
                         "(the frozen-model search is a training run: supernet.freeze_weights=true)")
    if num_batches < 1 or n_samples < 1:
        raise ValueError(f"--num-batches and --samples must be >= 1, got {num_batches} and {n_samples}")
    if not cfg.supernet:
        raise ValueError("stage 1 needs the experiment's supernet section (quant, space, candidate_bits, ...)")
    opts = SupernetOptions.from_dict({**cfg.supernet, "strategy": "mixed_precision", "subnet": None})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    tokenizer, train_set, _, stats = prepare_data(cfg, out)
    start = time.time()
    model = build_model(cfg, tokenizer.vocab_size, stats).to(dev)
    template = model.search_space.largest()
    kinds = mp.model_kinds(model)  # a wav2vec2 layer has no conv kind
    groups = mp.group_cells(template, opts.granularity, kinds)
    counts = mp.cell_numel(model, template)
    numel = {g: sum(counts[c] for c in cells) for g, cells in groups.items()}
    waveforms = model_kind(cfg.model) == "wav2vec2"
    loader, _ = make_loader(train_set, cfg.train.max_samples if waveforms else cfg.train.max_frames, True,
                            cfg.train.seed)
    batches = []
    for b in loader:
        batches.append(to_device(b, dev))
        if len(batches) >= num_batches:
            break
    cands = sorted({int(b) for b in opts.candidate_bits}, reverse=True)
    extra: dict = {}
    if method == "kl":
        scores = kl_sensitivity(model, batches, template, groups, cands)
    else:
        scores, traces = hessian_sensitivity(model, batches, template, groups, cands, n_samples=n_samples,
                                             seed=cfg.train.seed)
        extra["hessian_traces"] = traces
    bits = allocate(scores, numel, cands, opts.target_bits, opts.allocation_method)
    subnet = mp.subnet_with_bits(template, {cell: bits[g] for g, cells in groups.items() for cell in cells},
                                 kinds=kinds)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.time() - start
    timing = mp.write_timing(out / mp.TIMING_FILE, f"stage1_{method}", seconds)
    report = mp.allocation_report(
        model, subnet, f"two_stage_{method}", target_bits=opts.target_bits, candidate_bits=cands,
        granularity=opts.granularity, allocation_method=opts.allocation_method, groups=bits,
        scores={g: {str(b): s for b, s in sc.items()} for g, sc in scores.items()},
        num_batches=len(batches), timing=timing, **extra)
    mp.write_allocation(out / mp.ALLOCATION_FILE, report)
    logger.info("stage 1 (%s): %s, %.3f average bits (target %.2f), %.1f s -> %s", method, report["subnet"],
                report["average_bits"], opts.target_bits, seconds, out / mp.ALLOCATION_FILE)
    return report
