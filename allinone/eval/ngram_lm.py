"""Token n-gram language model for shallow fusion in CTC prefix beam search.

The model counts n-grams of the ASR model's own output units (characters with ``<space>``,
or subword pieces) in training transcripts and smooths them with interpolated Kneser-Ney
(Chen & Goodman 1999; one discount per order, D = n1 / (n1 + 2 n2)):

    p(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * p(w | h')

where h' is h without its first token, c are raw counts at the highest order and
continuation counts (the number of distinct tokens seen before the n-gram) below it, and
the unigram distribution is interpolated with the uniform one over the vocabulary (which
includes ``</s>`` and ``<unk>``). For every context the probabilities of all tokens sum to 1.

It is stored as an ARPA file, the field's text format for back-off n-gram models, so the
file can be read by other tools (SRILM, KenLM's ``build_binary``) and an ARPA file of the same
units made elsewhere can be used here. Interpolated Kneser-Ney is written exactly in the
back-off form: a seen n-gram stores its interpolated probability, and a context h stores
the back-off weight D * N1+(h .) / c(h) that multiplies p(w | h') for the tokens not seen
after h.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10 = math.log(10.0)
ARPA_NO_PROB = -99.0  # the probability ARPA files give <s>, which is never predicted


class NgramLM:
    """A back-off n-gram model: natural-log probabilities and back-off weights.

    ``logp[ngram]`` is log p(last token | the others) for the n-grams stored;
    ``backoff[context]`` the log back-off weight of a context (0 when missing).
    Tokens are strings (the tokenizer's units).
    """

    def __init__(self, order: int, logp: dict[tuple[str, ...], float], backoff: dict[tuple[str, ...], float]):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if (UNK,) not in logp:
            raise ValueError(f"the language model has no {UNK} unigram: unseen tokens would have no probability")
        self.order = order
        self.logp = logp
        self.backoff = backoff
        self.vocab = {ng[0] for ng in logp if len(ng) == 1}

    def score(self, context: Sequence[str], token: str) -> float:
        """log p(token | context); the context is cut to the last ``order - 1`` tokens
        (``<s>`` first for the start of a sentence), unknown tokens score as ``<unk>``."""
        if token not in self.vocab:
            token = UNK
        h = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        total = 0.0
        while True:
            p = self.logp.get(h + (token,))
            if p is not None:
                return total + p
            total += self.backoff.get(h, 0.0)
            h = h[1:]  # the unigram (token,) is always found: every token maps into the vocabulary

    def sentence_logp(self, tokens: Sequence[str]) -> float:
        """log p(tokens </s>) of a whole sentence, starting from ``<s>``."""
        history = [BOS]
        total = 0.0
        for t in [*tokens, EOS]:
            total += self.score(history, t)
            history.append(t)
        return total

    # --- ARPA ---------------------------------------------------------------------------

    def write_arpa(self, path: str | os.PathLike) -> None:
        """Write the model as an ARPA file (log10 values), atomically."""
        from allinone.utils import atomic_open

        by_order: dict[int, list[tuple[str, ...]]] = defaultdict(list)
        for ng in self.logp:
            by_order[len(ng)].append(ng)
        with atomic_open(path, "w") as f:
            f.write("\\data\\\n")
            for n in range(1, self.order + 1):
                f.write(f"ngram {n}={len(by_order[n])}\n")
            for n in range(1, self.order + 1):
                f.write(f"\n\\{n}-grams:\n")
                for ng in sorted(by_order[n]):
                    p = self.logp[ng]
                    line = f"{ARPA_NO_PROB if p == -math.inf else p / LOG10:.7f}\t{' '.join(ng)}"
                    if n < self.order and ng in self.backoff:
                        line += f"\t{self.backoff[ng] / LOG10:.7f}"
                    f.write(line + "\n")
            f.write("\n\\end\\\n")

    @classmethod
    def read_arpa(cls, path: str | os.PathLike) -> "NgramLM":
        """Read an ARPA file; a clear ``ValueError`` names the line that is not ARPA."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"language model file {path} does not exist")
        logp: dict[tuple[str, ...], float] = {}
        backoff: dict[tuple[str, ...], float] = {}
        declared: dict[int, int] = {}
        section = None  # None: before \data\; 0: in \data\; n: in \n-grams:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                where = f"{path}:{lineno}"
                if line == "\\data\\":
                    section = 0
                elif line == "\\end\\":
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    try:
                        section = int(line[1:-len("-grams:")])
                    except ValueError:
                        raise ValueError(f"{where}: bad section header {line!r}") from None
                    if section not in declared:
                        raise ValueError(f"{where}: section {line!r} not declared in \\data\\")
                elif section == 0 and line.startswith("ngram "):
                    try:
                        n, count = line[len("ngram "):].split("=")
                        declared[int(n)] = int(count)
                    except ValueError:
                        raise ValueError(f"{where}: bad count line {line!r}") from None
                elif section:
                    fields = line.split()
                    n = section
                    if len(fields) not in (n + 1, n + 2):
                        raise ValueError(f"{where}: expected a log10 probability, {n} tokens and an optional "
                                         f"back-off weight, got {line!r}")
                    try:
                        values = [float(fields[0])] + ([float(fields[-1])] if len(fields) == n + 2 else [])
                    except ValueError:
                        raise ValueError(f"{where}: not a number in {line!r}") from None
                    ngram = tuple(fields[1: n + 1])
                    logp[ngram] = -math.inf if values[0] <= ARPA_NO_PROB else values[0] * LOG10
                    if len(values) == 2:
                        backoff[ngram] = values[1] * LOG10
                else:
                    raise ValueError(f"{where}: not an ARPA file (expected \\data\\ first), got {line!r}")
        if not declared:
            raise ValueError(f"{path}: no \\data\\ section: not an ARPA language model")
        for n, count in declared.items():
            found = sum(1 for ng in logp if len(ng) == n)
            if found != count:
                raise ValueError(f"{path}: \\data\\ declares {count} {n}-grams, the file has {found} "
                                 "(truncated or corrupt)")
        return cls(max(declared), logp, backoff)


def _discount(counts: Iterable[int]) -> float:
    """Ney's discount D = n1 / (n1 + 2 n2) from the counts of counts, kept in [0.1, 0.9]."""
    c = Counter(counts)
    n1, n2 = c.get(1, 0), c.get(2, 0)
    if n1 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.1), 0.9)


def train_kneser_ney(sentences: Iterable[Sequence[str]], order: int, vocab: Iterable[str] = ()) -> NgramLM:
    """Interpolated Kneser-Ney n-gram model of token sentences (module docstring).

    ``vocab``: tokens to give probability even if unseen (e.g. the tokenizer's units).
    """
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    raw: list[Counter] = [Counter() for _ in range(order + 1)]  # raw[n][ngram]
    n_sentences = 0
    for sent in sentences:
        n_sentences += 1
        for t in sent:
            if not t or any(ch.isspace() for ch in t):
                raise ValueError(f"language model token {t!r} is empty or holds whitespace, which an ARPA "
                                 "file cannot store (characters are tokenized with <space>)")
        seq = [BOS, *sent, EOS]
        for n in range(1, order + 1):
            for i in range(1 if n == 1 else 0, len(seq) - n + 1):  # <s> itself is never predicted
                raw[n][tuple(seq[i: i + n])] += 1
    if n_sentences == 0:
        raise ValueError("no training sentences for the language model")
    # counts[n]: raw counts at the highest order and for n-grams starting with <s> (they have
    # no left extension); continuation counts N1+(. ngram) otherwise.
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    counts[order] = raw[order]
    for n in range(1, order):
        for ng in raw[n + 1]:
            counts[n][ng[1:]] += 1
        for ng, c in raw[n].items():
            if ng[0] == BOS:
                counts[n][ng] = c
    vocab_set = {ng[0] for ng in raw[1]} | set(vocab) | {EOS, UNK}
    vocab_set.discard(BOS)

    # unigrams: interpolated with the uniform distribution
    d = _discount(counts[1].values())
    total = sum(counts[1].values())
    uniform_mass = d * len(counts[1]) / total
    logp = {(w,): math.log(max(counts[1].get((w,), 0) - d, 0.0) / total + uniform_mass / len(vocab_set))
            for w in vocab_set}
    logp[(BOS,)] = -math.inf  # never predicted; present so <s> can carry its back-off weight
    lm = NgramLM(order, logp, {})
    # Each order from the ones below it: the model's own back-off walk (``score``) gives the
    # lower-order probability, over the entries filled so far.
    for n in range(2, order + 1):
        d = _discount(counts[n].values())
        by_context: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
        for ng, c in counts[n].items():
            by_context[ng[:-1]].append((ng[-1], c))
        for h, followers in by_context.items():
            c_h = sum(c for _, c in followers)
            gamma = d * len(followers) / c_h
            lm.backoff[h] = math.log(gamma)
            for w, c in followers:
                lm.logp[h + (w,)] = math.log((c - d) / c_h + gamma * math.exp(lm.score(h[1:], w)))
    return lm


class TokenLMScorer:
    """Shallow-fusion scorer over a model's token ids: maps ids to the tokenizer's units and
    caches log p(token | last order-1 tokens). The state of a prefix is its LM context.
    The cache is emptied when it reaches ``max_cache`` entries (a long test set's beam search
    would otherwise grow it by millions)."""

    def __init__(self, lm: NgramLM, token_list: Sequence[str], max_cache: int = 500_000):
        self.lm = lm
        self.token_list = list(token_list)
        self._cache: dict[tuple[tuple[str, ...], str], float] = {}
        self.max_cache = max_cache
        self.keep = max(lm.order - 1, 1)

    def _score(self, state: tuple[str, ...], token: str) -> float:
        key = (state, token)
        lp = self._cache.get(key)
        if lp is None:
            if len(self._cache) >= self.max_cache:
                self._cache.clear()
            lp = self._cache[key] = self.lm.score(state, token)
        return lp

    def initial_state(self) -> tuple[str, ...]:
        return (BOS,)

    def step(self, state: tuple[str, ...], token_id: int) -> tuple[float, tuple[str, ...]]:
        """(log p(token | state), the new state)."""
        token = self.token_list[token_id]
        return self._score(state, token), (state + (token,))[-self.keep:]

    def final(self, state: tuple[str, ...]) -> float:
        """log p(</s> | state): the end of the sentence."""
        return self._score(state, EOS)


def read_text_sentences(path: str | os.PathLike) -> list[str]:
    """Transcripts of a Kaldi ``text`` file (``utt_id words...``), one per utterance (as
    ``read_data_dir`` reads them for training; lines with an id alone are skipped)."""
    from allinone.data.kaldi import read_text

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {path} does not exist")
    out = [t for t in read_text(path, allow_empty=True).values() if t]
    if not out:
        raise ValueError(f"{path} holds no transcript (expected Kaldi 'utt_id words...' lines)")
    return out


def train_token_lm(text_files: Sequence[str | os.PathLike], tokenizer, order: int,
                   out_path: str | os.PathLike) -> NgramLM:
    """Kneser-Ney LM of ``order`` over ``tokenizer``'s units of the transcripts in Kaldi
    ``text`` files, written to ``out_path`` as ARPA (the ``allinone lm`` command)."""
    sentences = [tokenizer.text_to_tokens(t) for path in text_files for t in read_text_sentences(path)]
    units = [t for i, t in enumerate(tokenizer.token_list) if i not in (tokenizer.blank_id, tokenizer.sos_eos_id)]
    lm = train_kneser_ney(sentences, order, vocab=[u for u in units if u != UNK])
    lm.write_arpa(out_path)
    return lm


__all__ = ["BOS", "EOS", "UNK", "NgramLM", "TokenLMScorer", "read_text_sentences", "train_kneser_ney",
           "train_token_lm"]
