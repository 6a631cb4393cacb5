"""CTC greedy and prefix beam search, checked against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from allinone.eval.ctc_decode import (
    collapse,
    ctc_greedy,
    ctc_greedy_batch,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_batch,
    rescore,
)


def brute_force(log_probs: torch.Tensor, blank: int = 0) -> dict[tuple[int, ...], float]:
    """log P(labels) for every label sequence: sum over all V**T alignments that collapse to it."""
    lp = log_probs.double().tolist()
    t, v = len(lp), len(lp[0])
    scores: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(v), repeat=t):
        s = sum(lp[i][k] for i, k in enumerate(path))
        scores.setdefault(tuple(collapse(path, blank)), []).append(s)
    return {lab: math.log(sum(math.exp(x) for x in xs)) for lab, xs in scores.items()}


def random_log_probs(t: int, v: int, seed: int, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(t, v, generator=g, dtype=torch.float64)).log_softmax(-1)


def test_collapse_and_greedy_by_hand():
    assert collapse([0, 1, 1, 0, 1, 2, 2, 0, 0, 3]) == [1, 1, 2, 3]
    assert collapse([], 0) == []
    assert collapse([2, 2, 2], blank=2) == []
    # frames: argmax 1 1 0 1 2 2 0  ->  1 1 2
    probs = torch.tensor([
        [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.1, 0.6, 0.3],
        [0.1, 0.2, 0.7], [0.2, 0.1, 0.7], [0.6, 0.2, 0.2],
    ])
    assert ctc_greedy(probs.log()) == [1, 1, 2]


def test_greedy_batch_respects_lengths():
    a, b = random_log_probs(6, 4, 0), random_log_probs(4, 4, 1)
    batch = torch.full((2, 6, 4), -1e4)
    batch[0], batch[1, :4] = a, b
    assert ctc_greedy_batch(batch, torch.tensor([6, 4])) == [ctc_greedy(a), ctc_greedy(b)]
    assert ctc_greedy_batch(batch[:1]) == [ctc_greedy(a)]
    with pytest.raises(ValueError):
        ctc_greedy_batch(batch, [7, 1])


@pytest.mark.parametrize("t,v,seed", [(1, 2, 0), (3, 2, 1), (4, 3, 2), (5, 3, 3), (5, 2, 4), (5, 3, 5)])
def test_prefix_beam_search_equals_brute_force(t, v, seed):
    lp = random_log_probs(t, v, seed, sharp=1.0 + seed % 3)
    exact = brute_force(lp)
    nbest = ctc_prefix_beam_search(lp, beam=1000)
    # With a beam that never prunes, every label sequence is found with its exact probability.
    assert len(nbest) == len(exact)
    for tokens, logp in nbest:
        assert logp == pytest.approx(exact[tuple(tokens)], abs=1e-9)
    best = max(exact, key=exact.get)
    assert tuple(nbest[0][0]) == best
    assert [x[1] for x in nbest] == sorted((x[1] for x in nbest), reverse=True)
    # Probabilities of all label sequences sum to one.
    assert math.fsum(math.exp(x) for _, x in nbest) == pytest.approx(1.0, abs=1e-9)


def test_repeated_labels_need_a_blank():
    # Two frames both certain of label 1: only "1" is possible, never "1 1".
    lp = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).clamp_min(1e-12).log()
    assert ctc_prefix_beam_search(lp, beam=5)[0][0] == [1]
    # 1, blank, 1 -> "1 1".
    lp = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).clamp_min(1e-12).log()
    assert ctc_prefix_beam_search(lp, beam=5)[0][0] == [1, 1]


def test_small_beams_are_sensible():
    for seed in range(5):
        lp = random_log_probs(20, 6, seed, sharp=3.0)
        one = ctc_prefix_beam_search(lp, beam=1)
        assert len(one) == 1
        wide = ctc_prefix_beam_search(lp, beam=16)
        # On these inputs a wider beam finds a best hypothesis at least as likely.
        assert wide[0][1] >= one[0][1] - 1e-9
        assert all(math.isfinite(x) for _, x in wide)
    # Where one alignment dominates, beam 1 finds the greedy answer.
    lp = random_log_probs(30, 5, 9, sharp=20.0)
    assert ctc_prefix_beam_search(lp, beam=1)[0][0] == ctc_greedy(lp)


def test_pruning_and_nbest_and_batch():
    lp = random_log_probs(12, 5, 3)
    full = ctc_prefix_beam_search(lp, beam=8)
    assert len(ctc_prefix_beam_search(lp, beam=8, nbest=3)) == 3
    assert ctc_prefix_beam_search(lp, beam=8, prune_logp=float("-inf")) == full
    pruned = ctc_prefix_beam_search(lp, beam=8, prune_logp=math.log(0.3))
    assert 1 <= len(pruned) <= 8 and all(math.isfinite(x) for _, x in pruned)
    # Pruning everything but the blank leaves only the empty hypothesis.
    assert ctc_prefix_beam_search(lp, beam=8, prune_logp=1.0) == [([], pytest.approx(lp[:, 0].sum().item()))]
    batch = torch.stack([lp, random_log_probs(12, 5, 4)])
    out = ctc_prefix_beam_search_batch(batch, torch.tensor([12, 7]), beam=8)
    assert out[0] == full
    assert out[1] == ctc_prefix_beam_search(batch[1, :7], beam=8)
    with pytest.raises(ValueError):
        ctc_prefix_beam_search(lp[None], beam=4)
    with pytest.raises(ValueError):
        ctc_prefix_beam_search(lp, beam=0)


def test_rescore_combines_scores():
    nbest = [([1, 2], -1.0), ([1], -1.5), ([2], -3.0)]
    att = {(1, 2): -5.0, (1,): -0.5, (2,): -0.1}
    out = rescore(nbest, lambda toks: att[tuple(toks)], ctc_weight=0.5)
    assert [o[0] for o in out] == [[1], [2], [1, 2]]
    assert out[0][1:] == (pytest.approx(-1.0), -1.5, -0.5)
    assert [o[0] for o in rescore(nbest, lambda toks: att[tuple(toks)], ctc_weight=1.0)] == [[1, 2], [1], [2]]
    with pytest.raises(ValueError):
        rescore(nbest, lambda toks: 0.0, ctc_weight=2.0)


@pytest.mark.parametrize("decoder", [False, True], ids=["ctc", "hybrid"])
def test_recognize_batches_with_a_pool_equals_batch_by_batch(decoder):
    """``recognize_batches`` queues every batch's beam searches to the worker pool (a CTC model)
    or rescores per batch (a model with an attention decoder); either way each utterance gets
    what ``recognize_batch`` without a pool gives it."""
    from allinone.eval.decode import BeamSearchPool, DecodeOptions, recognize_batch, recognize_batches
    from allinone.models import ASRModel, ASRModelConfig

    from supernet_helpers import VOCAB, tiny_batch, tiny_encoder

    dec = dict(attention_heads=2, linear_units=32, num_blocks=1) if decoder else None
    torch.manual_seed(0)
    model = ASRModel(ASRModelConfig(encoder=tiny_encoder(), vocab_size=VOCAB, decoder=dec,
                                    ctc_weight=0.3 if decoder else 1.0)).eval()
    batches = []
    for seed in range(3):
        b = tiny_batch(seed, batch=3, frames=57 + 10 * seed)
        batches.append({**b, "utt_ids": [f"u{seed}_{i}" for i in range(3)]})
    opts = DecodeOptions(beam=4, num_workers=2)
    expected = {}
    for b in batches:
        expected.update(zip(b["utt_ids"], recognize_batch(model, b["feats"], b["feat_lens"], opts)))
    with BeamSearchPool(2, opts, [str(i) for i in range(VOCAB)]) as pool:
        events = []
        real = pool.submit

        def submit(lps):
            result = real(lps)
            real_get = result.get
            events.append(f"submit {len(lps)}")
            result.get = lambda *a: events.append("get") or real_get(*a)
            return result

        pool.submit = submit
        got = recognize_batches(model, batches, opts, pool=pool)
    assert got == expected and len(set(map(tuple, got.values()))) == len(got)  # 9 distinct hypotheses
    # CTC: every batch queued before the first result is collected; hybrid: batch by batch
    assert events == (["submit 3", "get"] * 3 if decoder else ["submit 3"] * 3 + ["get"] * 3)
