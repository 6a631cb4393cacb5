"""Per-group quantization sensitivity: stage 1 of the two-stage mixed-precision baselines.

Two measures, both computed on a few batches of training data with the float model
(docs/mixed_precision.md, "Baselines"):

- ``kl_sensitivity``: KL(float || quantized) of the CTC posteriors when only one group
  is quantized to ``b`` bits and everything else stays float (per utterance, as
  ``ctc_kl``);
- ``hessian_sensitivity``: HAWQ-v2 style ``sum_W tr(H_W) / n_W * ||Q_b(W) - W||^2`` over
  the weights ``W`` of a group, with the trace of each weight's Hessian block estimated
  by Hutchinson's method, ``tr(H) = E_v[v^T H v]`` for Rademacher ``v``
  (``hutchinson_traces``).  The loss whose Hessian is taken is, by default, the KL of the
  CTC posteriors to the float model's own (zero with zero gradient at the float weights,
  so its Hessian there is positive semi-definite; see ``hessian_traces``), or the ASR
  training loss.  PyTorch has no second derivative of the CTC loss, so ``H v`` is a
  central difference of gradients, ``(grad L(w + e v) - grad L(w - e v)) / 2e`` (exact
  for a quadratic loss, error ``O(e^2)`` otherwise), by default in float64 on a copy of
  the model.

Groups are lists of (block, kind) cells (``allinone.elastic.mixed_precision.group_cells``);
quantization uses the model's own quantizers (their scales for each bit-width), i.e. the
quantizers stage 2 starts from.  ``allinone.elastic.mixed_budget.allocate`` turns the
scores into bit-widths under an average-bit budget.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["kl_sensitivity", "hutchinson_traces", "hessian_traces", "quantization_errors",
           "hessian_sensitivity", "SENSITIVITIES", "HESSIAN_LOSSES"]


def _batch_to(batch: dict, device=None, dtype=None) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device) if device is not None else v
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


@torch.no_grad()
def kl_sensitivity(model, batches: Sequence[dict], template, groups: Mapping[str, Sequence[tuple[int, str]]],
                   candidate_bits: Sequence[int]) -> dict[str, dict[int, float]]:
    """group -> {bits: mean per-utterance KL(float || only this group at bits)}.

    model: a supernet (quantizers with every candidate bit-width); batches: dicts with
    ``feats`` [B, T, F] and ``feat_lens`` [B] on the model's device; template: the
    subnet whose blocks and widths are used (the full model); groups: name -> cells.
    Cost: one forward per batch, group and bit-width.
    """
    from allinone.elastic.mixed_precision import subnet_with_bits
    from allinone.train.strategies import ctc_kl

    was_training = model.training
    model.eval()
    float_subnet = subnet_with_bits(template, {})
    refs = []
    for b in batches:
        enc, lens = model.encode(b["feats"], b["feat_lens"], float_subnet)
        refs.append((model.ctc_log_probs(enc), lens))
    n_utts = sum(int(b["feats"].shape[0]) for b in batches)
    scores: dict[str, dict[int, float]] = {}
    for g, cells in groups.items():
        scores[g] = {}
        for bits in candidate_bits:
            subnet = subnet_with_bits(template, {cell: bits for cell in cells})
            total = 0.0
            for b, (ref, lens) in zip(batches, refs):
                enc, _ = model.encode(b["feats"], b["feat_lens"], subnet)
                # ctc_kl divides by the batch size; weight back to a per-utterance mean.
                total += float(ctc_kl(ref, model.ctc_log_probs(enc), lens)) * b["feats"].shape[0]
            scores[g][int(bits)] = total / n_utts
    model.train(was_training)
    return scores


def hutchinson_traces(grad_fn: Callable[[], Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
                      n_samples: int = 8, eps: float = 1e-3, generator: torch.Generator | None = None
                      ) -> list[float]:
    """Hutchinson estimates of the Hessian trace of each tensor's diagonal block.

    grad_fn(): the loss's gradients w.r.t. ``params`` at their current values (one per
    param); params: leaf tensors, modified in place during the call and restored.
    For each sample, ``v`` is Rademacher (+-1) per element, every tensor is moved by
    ``e * v`` with ``e = eps * rms(all params)`` and ``(grad(w + e v) - grad(w - e v)) / 2e``
    approximates ``H v``; ``v_t . [H v]_t`` is an unbiased estimate of ``tr(H_tt)`` (the
    cross terms with other elements have mean zero).  One step size for all tensors:
    per-tensor steps would multiply the cross terms by step ratios and with them the
    variance.  Returns the mean over ``n_samples`` per tensor.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    saved = [p.detach().clone() for p in params]
    numel = sum(s.numel() for s in saved)
    rms = (sum(float(s.double().pow(2).sum()) for s in saved) / max(numel, 1)) ** 0.5
    steps = [eps * max(rms, 1e-12)] * len(saved)
    sums = [0.0 for _ in params]
    try:
        for _ in range(n_samples):
            vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
            with torch.no_grad():
                for p, s, v, e in zip(params, saved, vs, steps):
                    p.copy_(s + e * v)
            plus = [g.detach().clone() for g in grad_fn()]
            with torch.no_grad():
                for p, s, v, e in zip(params, saved, vs, steps):
                    p.copy_(s - e * v)
            minus = [g.detach() for g in grad_fn()]
            for i, (v, e) in enumerate(zip(vs, steps)):
                sums[i] += float((v * (plus[i] - minus[i])).sum()) / (2.0 * e)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [x / n_samples for x in sums]


def _group_weights(model, template, groups) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """group -> [(weight name, layer)] of the quantizable weights in its cells."""
    from allinone.elastic.mixed_precision import weight_cell
    from allinone.elastic.quant import quantizable_layers

    group_of = {cell: g for g, cells in groups.items() for cell in cells}
    out: dict[str, list] = {g: [] for g in groups}
    for name, layer, kind in quantizable_layers(model):
        g = group_of.get(weight_cell(name, kind))
        if g is not None:
            out[g].append((name, layer))
    return out


HESSIAN_LOSSES = ("kl", "asr")


def hessian_traces(model, batches: Sequence[dict], template, groups: Mapping[str, Sequence[tuple[int, str]]],
                   n_samples: int = 8, eps: float = 1e-3, seed: int = 0, loss: str = "kl",
                   dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """weight name -> Hutchinson estimate of the Hessian trace of its diagonal block.

    Every quantizable weight in ``groups``' cells is estimated (one perturbation of all of
    them per sample).  loss: ``kl`` (default) = KL(float posteriors || model posteriors)
    per utterance, whose value and gradient are zero at the float weights, so its Hessian
    there is the Fisher information of the CTC posteriors (positive semi-definite: every
    sample ``v^T H v >= 0``) and ``1/2 dW^T H dW`` is the second-order KL of a quantization
    ``dW`` -- the local model of the ``kl`` sensitivity; ``asr`` = the training loss (labels),
    whose Hessian is indefinite away from a minimum.  Averaged over ``batches``, eval mode
    (no dropout), on a ``dtype`` copy of the model (float64 by default, so that the
    central differences are not lost to rounding).
    """
    from allinone.train.strategies import ctc_kl

    if loss not in HESSIAN_LOSSES:
        raise ValueError(f"hessian loss {loss!r}; expected one of {', '.join(HESSIAN_LOSSES)}")
    work = copy.deepcopy(model).to(dtype).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    names, params = [], []
    for members in _group_weights(work, template, groups).values():
        for name, layer in members:
            layer.weight.requires_grad_(True)
            names.append(name)
            params.append(layer.weight)
    device = params[0].device
    data = [_batch_to(b, device, dtype) for b in batches]
    n_utts = sum(int(b["feats"].shape[0]) for b in data)
    if loss == "kl":
        with torch.no_grad():
            refs = [work.ctc_log_probs(work.encode(b["feats"], b["feat_lens"])[0]) for b in data]

    def grad_fn():
        grads = [torch.zeros_like(p) for p in params]
        for i, b in enumerate(data):
            if loss == "kl":
                enc, lens = work.encode(b["feats"], b["feat_lens"])
                value = ctc_kl(refs[i], work.ctc_log_probs(enc), lens)
            else:
                value = work(b["feats"], b["feat_lens"], b["tokens"], b["token_lens"])["loss"]
            for acc, g in zip(grads, torch.autograd.grad(value * (b["feats"].shape[0] / n_utts), params)):
                acc += g
        return grads

    traces = hutchinson_traces(grad_fn, params, n_samples, eps, torch.Generator().manual_seed(seed))
    return dict(zip(names, traces))


@torch.no_grad()
def quantization_errors(model, template, groups, candidate_bits: Sequence[int]) -> dict[str, dict[int, float]]:
    """weight name -> {bits: ||Q_b(W) - W||^2} for the quantizable weights in ``groups``
    (the model's quantizers, i.e. the scales stage 2 starts from)."""
    out: dict[str, dict[int, float]] = {}
    for members in _group_weights(model, template, groups).values():
        for name, layer in members:
            w = layer.weight.detach()
            out[name] = {int(b): float((layer.quantizer(w, int(b)) - w).double().pow(2).sum())
                         for b in candidate_bits}
    return out


def hessian_sensitivity(model, batches: Sequence[dict], template, groups, candidate_bits: Sequence[int],
                        n_samples: int = 8, eps: float = 1e-3, seed: int = 0, loss: str = "kl",
                        dtype: torch.dtype = torch.float64) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """(group -> {bits: sum over its weights W of tr(H_W)/n_W * ||Q_b(W) - W||^2}, weight -> trace).

    HAWQ-v2's criterion, per weight tensor (a layer's average curvature times its squared
    quantization error), summed over the group.  Negative trace estimates (the ``asr``
    loss away from a minimum, or estimator noise) are clamped to 0: the second-order
    model then predicts no harm.  Arguments as ``hessian_traces``.
    """
    traces = hessian_traces(model, batches, template, groups, n_samples, eps, seed, loss, dtype)
    errors = quantization_errors(model, template, groups, candidate_bits)
    scores: dict[str, dict[int, float]] = {}
    for g, members in _group_weights(model, template, groups).items():
        scores[g] = {int(b): sum(max(traces[n], 0.0) / layer.weight.numel() * errors[n][int(b)]
                                 for n, layer in members) for b in candidate_bits}
    return scores, traces


SENSITIVITIES = ("kl", "hessian")
