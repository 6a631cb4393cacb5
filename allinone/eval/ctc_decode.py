"""CTC decoding: greedy, prefix beam search, and attention rescoring of n-best lists.

Conventions (``docs/design.md``): token id 0 is the blank; inputs are per-frame
log-probabilities (``log_softmax`` output), batch-first.

Prefix beam search keeps, for every candidate label prefix, two log-probabilities:
the total probability of the alignments that produce this prefix and end in a
blank (``pb``), and of those ending in the prefix's last label (``pnb``).  The
split is what lets a repeated label be told apart from a genuine repetition:
"a a" collapses to "a" unless a blank separates the two "a" frames, so extending
prefix ``(..., a)`` with label ``a`` only creates ``(..., a, a)`` from ``pb``, while
``pnb`` stays on ``(..., a)``.  With a beam wide enough never to prune, the score of
each prefix is the exact CTC probability of that label sequence.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)), safe for -inf."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def _check_2d(log_probs: torch.Tensor) -> None:
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [frame, vocab], got shape {tuple(log_probs.shape)}")


def _check_batch(log_probs: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None) -> list[int]:
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [batch, frame, vocab], got shape {tuple(log_probs.shape)}")
    b, t = log_probs.shape[:2]
    if lengths is None:
        return [t] * b
    lens = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lens) != b or any(not 0 <= x <= t for x in lens):
        raise ValueError(f"lengths {lens} do not fit log_probs of shape {tuple(log_probs.shape)}")
    return lens


def collapse(frame_labels: Sequence[int], blank: int = 0) -> list[int]:
    """Merge runs of the same label, then drop blanks (the CTC many-to-one map)."""
    out: list[int] = []
    prev = None
    for k in frame_labels:
        if k != prev and k != blank:
            out.append(int(k))
        prev = k
    return out


def ctc_greedy(log_probs: torch.Tensor, blank: int = 0) -> list[int]:
    """Best-path decoding of one utterance: per-frame argmax, collapsed.

    log_probs: [frame, vocab].
    """
    _check_2d(log_probs)
    return collapse(log_probs.argmax(dim=-1).tolist(), blank)


def ctc_greedy_batch(log_probs: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
                     blank: int = 0) -> list[list[int]]:
    """Greedy decoding of a padded batch.

    log_probs: [batch, frame, vocab]; lengths: [batch] valid frames (all frames if None).
    """
    lens = _check_batch(log_probs, lengths)
    best = log_probs.argmax(dim=-1).tolist()  # one argmax for the whole batch
    return [collapse(row[:n], blank) for row, n in zip(best, lens)]


def ctc_prefix_beam_search(log_probs: torch.Tensor, beam: int = 10, blank: int = 0,
                           prune_logp: float | None = None, nbest: int | None = None,
                           lm=None, lm_weight: float = 0.0, length_bonus: float = 0.0
                           ) -> list[tuple[list[int], float]]:
    """CTC prefix beam search for one utterance, optionally with shallow fusion.

    log_probs: [frame, vocab] log-probabilities.  At each frame only the ``beam``
    most likely labels are expanded (all when ``beam >= vocab``), minus those
    below ``prune_logp`` when it is given; then the ``beam`` best prefixes are
    kept.  Returns up to ``nbest`` (default ``beam``) ``(tokens, score)``
    pairs, best first, where ``score`` is the prefix's CTC log-probability
    summed over all the alignments the search kept, plus
    ``lm_weight * log p_LM(tokens </s>) + length_bonus * len(tokens)``.

    lm: a token scorer (``allinone.eval.ngram_lm.TokenLMScorer``: ``initial_state()``,
    ``step(state, token) -> (logp, state)``, ``final(state) -> logp of </s>``); prefixes are
    ranked by the same combined score while the search runs, so the LM steers the pruning.
    """
    _check_2d(log_probs)
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    lp = log_probs.detach().to(torch.float64).cpu()
    n_vocab = lp.shape[1]
    if not 0 <= blank < n_vocab:
        raise ValueError(f"blank id {blank} is outside the vocabulary of size {n_vocab}")
    k = min(beam, n_vocab)
    top_lp, top_ids = lp.topk(k, dim=-1)
    top_lp, top_ids, frames = top_lp.tolist(), top_ids.tolist(), lp.tolist()

    # prefix -> [log p(ends in blank), log p(ends in last label)]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    # prefix -> (its LM log-probability so far, the LM state after it)
    lm_of: dict[tuple[int, ...], tuple[float, object]] = {}
    if lm is not None:
        lm_of[()] = (0.0, lm.initial_state())

    def extra(prefix: tuple[int, ...], final: bool = False) -> float:
        """The non-CTC part of a prefix's score (0 without LM and bonus); ``final``: the
        hypothesis ends here, so the LM's sentence end counts too."""
        score = length_bonus * len(prefix)
        if lm is not None:
            total, state = lm_of[prefix]
            score += lm_weight * (total + (lm.final(state) if final else 0.0))
        return score
    for t in range(len(frames)):
        p_blank = frames[t][blank]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], slot: int, value: float) -> None:
            if value == NEG_INF:
                return  # impossible (e.g. "a a" with no blank seen yet): no entry
            cell = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
            cell[slot] = _logaddexp(cell[slot], value)
            if lm is not None and prefix not in lm_of:  # a new label sequence: score its last label once
                total, state = lm_of[prefix[:-1]]
                lp, state = lm.step(state, prefix[-1])
                lm_of[prefix] = (total + lp, state)

        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            # A blank frame keeps the prefix unchanged.
            add(prefix, 0, total + p_blank)
            last = prefix[-1] if prefix else None
            for c, pc in zip(top_ids[t], top_lp[t]):
                if c == blank or (prune_logp is not None and pc < prune_logp):
                    continue  # the blank was handled above; pruned labels are skipped
                if c == last:
                    # "a" then "a" without blank: still the same prefix ...
                    add(prefix, 1, pnb + pc)
                    # ... only a blank in between makes a new "a".
                    add(prefix + (c,), 1, pb + pc)
                else:
                    add(prefix + (c,), 1, total + pc)
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]) + extra(kv[0]), reverse=True)
        beams = dict(ranked[:beam])
    hyps = [(list(p), _logaddexp(pb, pnb) + extra(p, final=True)) for p, (pb, pnb) in beams.items()]
    hyps.sort(key=lambda h: h[1], reverse=True)
    return hyps[: (nbest or beam)]


def ctc_prefix_beam_search_batch(log_probs: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
                                 beam: int = 10, blank: int = 0, prune_logp: float | None = None,
                                 nbest: int | None = None, lm=None, lm_weight: float = 0.0,
                                 length_bonus: float = 0.0) -> list[list[tuple[list[int], float]]]:
    """Prefix beam search over a padded batch; log_probs: [batch, frame, vocab], lengths: [batch]."""
    lens = _check_batch(log_probs, lengths)
    return [ctc_prefix_beam_search(log_probs[i, :n], beam, blank, prune_logp, nbest, lm, lm_weight, length_bonus)
            for i, n in enumerate(lens)]


def rescore(nbest: Sequence[tuple[Sequence[int], float]], score_fn: Callable[[list[int]], float],
            ctc_weight: float = 0.3) -> list[tuple[list[int], float, float, float]]:
    """Re-rank an n-best list with a second scorer (e.g. an attention decoder).

    ``score_fn(tokens)`` returns that hypothesis' log-probability under the
    other model.  The combined score is ``ctc_weight * ctc + (1 - ctc_weight) * att``
    (ESPnet's joint CTC/attention weighting).  Returns
    ``(tokens, combined, ctc_logp, att_logp)`` tuples, best first.
    """
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    out = []
    for tokens, ctc_lp in nbest:
        toks = list(tokens)
        att = float(score_fn(toks))
        out.append((toks, ctc_weight * ctc_lp + (1.0 - ctc_weight) * att, ctc_lp, att))
    out.sort(key=lambda h: h[1], reverse=True)
    return out


__all__ = ["collapse", "ctc_greedy", "ctc_greedy_batch", "ctc_prefix_beam_search",
           "ctc_prefix_beam_search_batch", "rescore"]
