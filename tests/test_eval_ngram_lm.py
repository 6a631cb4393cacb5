"""Token n-gram LM (interpolated Kneser-Ney, ARPA) and its shallow fusion in CTC prefix beam
search: the back-off model against a direct recursive formula, proper distributions, ARPA
round trip and bad files, and the fused beam search against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch

from allinone.cli import main as cli
from allinone.data.tokenizer import CharTokenizer, load_tokenizer
from allinone.eval.ctc_decode import ctc_prefix_beam_search
from allinone.eval.decode import DecodeOptions, load_lm_scorer
from allinone.eval.ngram_lm import BOS, EOS, UNK, NgramLM, TokenLMScorer, train_kneser_ney

from test_eval_ctc import brute_force, random_log_probs


def corpus(seed: int = 0, n: int = 40) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice("abc") for _ in range(rng.randint(1, 7))] for _ in range(n)]


def direct_kneser_ney(sentences, order: int, vocab: set[str]):
    """p(w | h) of interpolated Kneser-Ney straight from the counts, by recursion over orders
    (no back-off representation): raw counts at the top order and for n-grams that start with
    <s>, continuation counts below, Ney's discount per order, uniform below the unigrams."""
    seqs = [[BOS, *s, EOS] for s in sentences]
    raw = {n: Counter(tuple(q[i:i + n]) for q in seqs for i in range(1 if n == 1 else 0, len(q) - n + 1))
           for n in range(1, order + 1)}
    cont = {n: Counter() for n in range(1, order + 1)}
    for n in range(1, order + 1):
        if n == order:
            cont[n] = raw[n]
            continue
        for ng in raw[n + 1]:
            cont[n][ng[1:]] += 1
        for ng, c in raw[n].items():
            if ng[0] == BOS:
                cont[n][ng] = c

    def discount(n):
        cc = Counter(cont[n].values())
        return min(max(cc[1] / (cc[1] + 2 * cc[2]), 0.1), 0.9) if cc[1] else 0.5

    ds = {n: discount(n) for n in cont}

    def p(w, h):
        n = len(h) + 1
        if n == 1:
            total = sum(cont[1].values())
            return max(cont[1][(w,)] - ds[1], 0) / total + ds[1] * len(cont[1]) / total / len(vocab)
        followers = {ng[-1]: c for ng, c in cont[n].items() if ng[:-1] == h}
        if not followers:
            return p(w, h[1:])
        c_h = sum(followers.values())
        return max(followers.get(w, 0) - ds[n], 0) / c_h + ds[n] * len(followers) / c_h * p(w, h[1:])

    return p


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_equals_the_direct_formula_and_sums_to_one(order):
    sents = corpus(order)
    lm = train_kneser_ney(sents, order, vocab=["d"])
    vocab = sorted(lm.vocab - {BOS})
    assert set(vocab) == {"a", "b", "c", "d", EOS, UNK}
    p = direct_kneser_ney(sents, order, set(vocab))
    # every context of the top order over the vocabulary (seen or not), <s> first or not
    contexts = [c for k in range(order) for c in itertools.product(["a", "b", "c", "d"], repeat=k)]
    contexts += [(BOS, *c)[: order - 1] for c in contexts if len(c) < order - 1]
    for h in contexts:
        h = tuple(h)[-(order - 1):] if order > 1 else ()
        probs = [math.exp(lm.score(h, w)) for w in vocab]
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-12), h
        for w, q in zip(vocab, probs):
            assert q == pytest.approx(p(w, h), rel=1e-9), (h, w)
    # a token the model has never seen scores as <unk>; a sentence is the sum of its tokens
    assert lm.score([BOS], "z") == lm.score([BOS], UNK)
    assert lm.sentence_logp(["a", "b"]) == pytest.approx(
        lm.score([BOS], "a") + lm.score([BOS, "a"], "b") + lm.score([BOS, "a", "b"], EOS))


def test_arpa_round_trip_and_bad_files(tmp_path):
    lm = train_kneser_ney(corpus(), 3)
    path = tmp_path / "lm.arpa"
    lm.write_arpa(path)
    again = NgramLM.read_arpa(path)
    assert again.order == 3 and again.vocab == lm.vocab
    for h in [(BOS,), ("a",), ("a", "b"), ("c", "c"), (BOS, "b")]:
        for w in sorted(lm.vocab - {BOS}):
            assert again.score(h, w) == pytest.approx(lm.score(h, w), abs=1e-6)
    text = path.read_text()
    assert text.startswith("\\data\\\nngram 1=") and text.rstrip().endswith("\\end\\")

    with pytest.raises(ValueError, match="does not exist"):
        NgramLM.read_arpa(tmp_path / "missing.arpa")
    (tmp_path / "words.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="not an ARPA file"):
        NgramLM.read_arpa(tmp_path / "words.txt")
    truncated = tmp_path / "cut.arpa"
    truncated.write_text(text[: text.index("\\3-grams:") + 30])
    with pytest.raises(ValueError, match="declares .* 3-grams, the file has"):
        NgramLM.read_arpa(truncated)
    with pytest.raises(ValueError, match="whitespace"):
        train_kneser_ney([["a", " ", "b"]], 2)
    with pytest.raises(ValueError, match="no training sentences"):
        train_kneser_ney([], 2)


def test_fused_beam_search_equals_brute_force():
    """With a beam that never prunes, the fused search returns every label sequence with
    CTC log-prob + lm_weight * LM log-prob (with </s>) + length_bonus * length, best first."""
    tokens = ["<blank>", "a", "b", "<sos/eos>"]
    lm = train_kneser_ney([["a", "b"], ["a", "a", "b"], ["b"]], 2)
    scorer = TokenLMScorer(lm, tokens)
    for seed, (weight, bonus) in enumerate([(0.5, 0.0), (1.0, 0.7), (2.0, -0.3)]):
        lp = random_log_probs(5, 3, seed, sharp=1.5)  # labels 0 (blank), 1, 2: sequences of up to 5
        exact = {lab: s + weight * lm.sentence_logp([tokens[i] for i in lab]) + bonus * len(lab)
                 for lab, s in brute_force(lp).items()}
        nbest = ctc_prefix_beam_search(lp, beam=1000, lm=scorer, lm_weight=weight, length_bonus=bonus)
        assert len(nbest) == len(exact)
        for toks, score in nbest:
            assert score == pytest.approx(exact[tuple(toks)], abs=1e-9)
        assert tuple(nbest[0][0]) == max(exact, key=exact.get)
    # a cache that is emptied every few entries changes nothing
    small = TokenLMScorer(lm, tokens, max_cache=3)
    lp = random_log_probs(5, 3, 7, sharp=1.5)
    assert ctc_prefix_beam_search(lp, beam=1000, lm=small, lm_weight=1.0) == \
        ctc_prefix_beam_search(lp, beam=1000, lm=scorer, lm_weight=1.0)
    assert len(small._cache) <= 3
    # weight 0 and no bonus: the plain search, whatever the LM
    lp = random_log_probs(6, 3, 9)
    assert ctc_prefix_beam_search(lp, beam=4, lm=scorer, lm_weight=0.0) == ctc_prefix_beam_search(lp, beam=4)


def test_a_strong_lm_moves_a_narrow_beam_to_its_sentence():
    """Frames that mildly prefer "b a" while the LM has only ever seen "a b": fused with a
    large weight, the narrow search returns "a b"."""
    tokens = ["<blank>", "a", "b", "<sos/eos>"]
    scorer = TokenLMScorer(train_kneser_ney([["a", "b"]] * 20, 3), tokens)
    probs = torch.tensor([[0.1, 0.4, 0.5], [0.8, 0.1, 0.1], [0.1, 0.5, 0.4]])
    lp = probs.log()
    assert ctc_prefix_beam_search(lp, beam=3)[0][0] == [2, 1]
    assert ctc_prefix_beam_search(lp, beam=3, lm=scorer, lm_weight=2.0)[0][0] == [1, 2]


def test_lm_command_and_decode_options(tmp_path, capsys):
    text = tmp_path / "text"
    text.write_text("u1 AB BA\nu2 ABBA\nu3 \n")  # an empty transcript line is skipped
    tok_dir = tmp_path / "model" / "tokenizer"
    CharTokenizer.train(["AB BA", "ABBA C"]).save(tok_dir)
    out = tmp_path / "lm.arpa"
    assert cli(["lm", str(text), "--tokenizer", str(tmp_path / "model"), "--order", "3", "--out", str(out)]) == 0
    assert "3-gram Kneser-Ney LM" in capsys.readouterr().out
    lm = NgramLM.read_arpa(out)
    tokenizer = load_tokenizer(tok_dir)
    assert {"A", "B", "<space>", "C"} <= lm.vocab  # C: a unit of the tokenizer, unseen in the text
    assert lm.score([BOS, "A"], "B") > lm.score([BOS, "A"], "C")
    scorer = load_lm_scorer(out, tokenizer)
    assert scorer.step(scorer.initial_state(), tokenizer.encode("A")[0])[0] == lm.score([BOS], "A")

    other = tmp_path / "other.arpa"
    train_kneser_ney([["x", "y"]], 2).write_arpa(other)
    with pytest.raises(ValueError, match="knows none of the model's"):
        load_lm_scorer(other, tokenizer)
    with pytest.raises(ValueError, match="beam > 1"):
        DecodeOptions(beam=1, lm=str(out))
    with pytest.raises(ValueError, match="lm_weight"):
        DecodeOptions(beam=4, lm=str(out), lm_weight=-1.0)
    assert cli(["lm", str(tmp_path / "nope"), "--tokenizer", str(tmp_path / "model"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
