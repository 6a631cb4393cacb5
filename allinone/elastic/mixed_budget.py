"""Bit allocation under an average-bit budget: greedy descent and an exact knapsack.

Used by the two-stage baselines (stage 1: per-group sensitivity scores -> bit-widths) and
by the one-stage search to repair an argmax allocation that overshoots its budget.

A *group* is whatever shares one bit-width (a block's module kind, a whole block, or a
module kind across the model; see ``allinone.elastic.mixed_precision``).  Inputs:

- ``scores[g][b]``: the cost of giving group ``g`` ``b`` bits (lower is better: a
  sensitivity such as the KL divergence when only ``g`` is quantized to ``b`` bits);
- ``numel[g]``: quantized weights in ``g``;
- the budget: numel-weighted average bits ``sum_g numel[g] * b_g / sum_g numel[g]`` must
  not exceed ``target_bits``.

The total cost is assumed additive over groups (the usual assumption of sensitivity-based
mixed precision; interactions between groups are ignored).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Mapping, Sequence

import numpy as np

__all__ = ["average_bits", "allocate_greedy", "allocate_knapsack", "allocate", "ALLOCATORS"]

# The exact knapsack runs on integer weight units; beyond this many units of budget the
# costs are rounded *up* to coarser units (the result stays within budget, possibly a
# little under it).
_MAX_UNITS = 200_000


def average_bits(bits: Mapping[str, int], numel: Mapping[str, int]) -> float:
    """Numel-weighted average bit-width of an allocation (group -> bits)."""
    total = sum(numel[g] for g in bits)
    return sum(numel[g] * b for g, b in bits.items()) / total


def _check(scores: Mapping[str, Mapping[int, float]], numel: Mapping[str, int],
           candidate_bits: Sequence[int], target_bits: float) -> list[int]:
    cands = sorted(set(int(b) for b in candidate_bits))
    if not cands:
        raise ValueError("no candidate bit-widths")
    missing = [g for g in scores if g not in numel]
    if missing:
        raise ValueError(f"groups without a weight count: {missing[:5]}")
    for g, s in scores.items():
        lacking = [b for b in cands if b not in s]
        if lacking:
            raise ValueError(f"group {g!r} has no score for bit-width(s) {lacking}")
    if target_bits < cands[0] - 1e-9:
        raise ValueError(f"target of {target_bits} average bits is below the smallest candidate "
                         f"bit-width {cands[0]}: no allocation fits")
    return cands


def allocate_greedy(scores: Mapping[str, Mapping[int, float]], numel: Mapping[str, int],
                    candidate_bits: Sequence[int], target_bits: float,
                    start: Mapping[str, int] | None = None) -> dict[str, int]:
    """Greedy: lower bit-widths where it costs least per saved bit, then spend what is left.

    From ``start`` (default: every group at the highest candidate), repeatedly move one
    group down to its next lower candidate, choosing the move with the smallest score
    increase per saved weight-bit, until the average fits ``target_bits``.  Then, while
    the budget allows, move groups up where that lowers the score most per spent
    weight-bit (the descent may have undershot).  Returns group -> bits.
    """
    cands = _check(scores, numel, candidate_bits, target_bits)
    bits = {g: (start[g] if start is not None else cands[-1]) for g in scores}
    total = sum(numel[g] for g in scores)
    budget = target_bits * total + 1e-6 * total
    used = sum(numel[g] * b for g, b in bits.items())
    while used > budget:
        best = None
        for g, b in bits.items():
            i = cands.index(b)
            if i == 0:
                continue
            lower = cands[i - 1]
            saved = numel[g] * (b - lower)
            rate = (scores[g][lower] - scores[g][b]) / saved
            if best is None or rate < best[0]:
                best = (rate, g, lower)
        if best is None:  # everything at the lowest candidate (cannot happen after _check)
            break
        _, g, lower = best
        used -= numel[g] * (bits[g] - lower)
        bits[g] = lower
    while True:  # spend the rest of the budget where it helps most
        best = None
        for g, b in bits.items():
            i = cands.index(b)
            if i == len(cands) - 1:
                continue
            higher = cands[i + 1]
            spent = numel[g] * (higher - b)
            gain = scores[g][b] - scores[g][higher]
            if used + spent <= budget and gain > 0 and (best is None or gain / spent > best[0]):
                best = (gain / spent, g, higher)
        if best is None:
            break
        _, g, higher = best
        used += numel[g] * (higher - bits[g])
        bits[g] = higher
    return bits


def allocate_knapsack(scores: Mapping[str, Mapping[int, float]], numel: Mapping[str, int],
                      candidate_bits: Sequence[int], target_bits: float,
                      min_bits: float | None = None) -> dict[str, int]:
    """Exact minimum of the summed scores under the budget (multiple-choice knapsack).

    Dynamic programming over the budget in integer units: each group's cost above the
    lowest candidate is ``numel * (b - b_min)``, divided by the gcd of all such costs
    (exact); if that leaves more than 200,000 units, costs are rounded up to coarser
    units, which keeps the answer within budget.  ``min_bits``: also require an average
    of at least this many bits (``ValueError`` when no allocation lies in the window).
    Returns group -> bits.
    """
    cands = _check(scores, numel, candidate_bits, target_bits)
    groups = list(scores)
    b0 = cands[0]
    extra = {(g, b): numel[g] * (b - b0) for g in groups for b in cands}
    total = sum(numel[g] for g in groups)
    capacity = int(math.floor(target_bits * total + 1e-6 * total)) - b0 * total  # extra weight-bits allowed
    unit = reduce(math.gcd, [e for e in extra.values() if e > 0], 0) or 1
    units = capacity // unit
    if units > _MAX_UNITS:
        unit = math.ceil(capacity / _MAX_UNITS)
        units = capacity // unit
    cost = {k: -(-e // unit) for k, e in extra.items()}  # ceil: never over budget
    low = 0 if min_bits is None else max(0, math.ceil((min_bits - b0) * total / unit - 1e-9))
    inf = float("inf")
    # exact[c]: least summed score of the groups so far whose extra cost is exactly c units.
    exact = np.full(units + 1, inf)
    exact[0] = 0.0
    choice = np.zeros((len(groups), units + 1), dtype=np.int8)
    for gi, g in enumerate(groups):
        new = np.full(units + 1, inf)
        for ci, b in enumerate(cands):
            c = cost[(g, b)]
            if c > units:
                continue
            cand = np.full(units + 1, inf)
            cand[c:] = exact[: units + 1 - c] + scores[g][b]
            better = cand < new
            new[better] = cand[better]
            choice[gi, better] = ci
        exact = new
    if low > units or not np.isfinite(exact[low:]).any():
        window = f"between {min_bits} and {target_bits}" if min_bits is not None else f"within {target_bits}"
        raise ValueError(f"no allocation of these groups averages {window} bits")
    c = low + int(np.argmin(exact[low:]))
    bits = {}
    for gi in range(len(groups) - 1, -1, -1):
        b = cands[int(choice[gi, c])]
        bits[groups[gi]] = b
        c -= cost[(groups[gi], b)]
    return {g: bits[g] for g in groups}


ALLOCATORS = {"greedy": allocate_greedy, "knapsack": allocate_knapsack}


def allocate(scores: Mapping[str, Mapping[int, float]], numel: Mapping[str, int],
             candidate_bits: Sequence[int], target_bits: float, method: str = "knapsack") -> dict[str, int]:
    """``allocate_greedy`` or ``allocate_knapsack`` by name."""
    if method not in ALLOCATORS:
        raise ValueError(f"allocation method {method!r}; expected one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[method](scores, numel, candidate_bits, target_bits)
