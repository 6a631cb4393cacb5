"""Character and SentencePiece tokenizers with ESPnet's token-list convention.

The token list (what the model's output layer indexes) is::

    0: <blank>   1: <unk>   2..V-2: tokens   V-1: <sos/eos>

Characters use ``<space>`` for a space, as ESPnet's ``CharTokenizer`` does. A saved tokenizer is a
directory with ``tokens.txt`` (one token per line, ESPnet's ``token_list``), ``tokenizer.json``
(the kind) and, for SentencePiece, ``sentencepiece.model``.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from allinone.utils import atomic_open

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
SPACE = "<space>"
_SPECIALS = (BLANK, UNK, SOS_EOS)

TOKENS_FILE = "tokens.txt"
META_FILE = "tokenizer.json"
SPM_FILE = "sentencepiece.model"


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``token_list``, ``vocab_size``, ``save``, ``load``."""

    kind: str = ""

    def __init__(self, token_list: Sequence[str]):
        _check_token_list(token_list)
        self.token_list = list(token_list)
        self.token_to_id = {t: i for i, t in enumerate(self.token_list)}
        self.unk_id = self.token_to_id[UNK]

    @property
    def vocab_size(self) -> int:
        """Size of the model's output layer, ``<blank>`` and ``<sos/eos>`` included."""
        return len(self.token_list)

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def sos_eos_id(self) -> int:
        return len(self.token_list) - 1

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (unknown tokens -> ``<unk>``)."""
        return [self.token_to_id.get(t, self.unk_id) for t in self.text_to_tokens(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. ``<blank>``, ``<sos/eos>`` and padding (negative ids) are dropped."""
        last = self.sos_eos_id
        tokens = [self.token_list[i] for i in (int(i) for i in ids) if 0 < i < last]
        return self.tokens_to_text(tokens)

    def text_to_tokens(self, text: str) -> list[str]:
        raise NotImplementedError

    def tokens_to_text(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write ``tokens.txt`` and ``tokenizer.json`` (and the kind's own files) to ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_dir / TOKENS_FILE, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in self.token_list))
        with atomic_open(out_dir / META_FILE, "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "vocab_size": self.vocab_size}, f, indent=2)

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer saved by ``save``; same as ``load_tokenizer``."""
        return load_tokenizer(in_dir)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _check_token_list(token_list: Sequence[str]) -> None:
    """Enforce ESPnet's layout: ``<blank>`` first, ``<unk>`` second, ``<sos/eos>`` last, no duplicates."""
    if len(token_list) < 3 or token_list[0] != BLANK or token_list[1] != UNK or token_list[-1] != SOS_EOS:
        raise ValueError(f"token list must start with {BLANK!r}, {UNK!r} and end with {SOS_EOS!r}; "
                         f"got {list(token_list[:3])} ... {list(token_list[-1:])}")
    seen = set()
    for t in token_list:
        if t in seen:
            raise ValueError(f"token list has duplicate token {t!r}")
        seen.add(t)


class CharTokenizer(Tokenizer):
    """One token per character; a space is the token ``<space>``."""

    kind = "char"

    def text_to_tokens(self, text: str) -> list[str]:
        return [SPACE if c == " " else c for c in text]

    def tokens_to_text(self, tokens: list[str]) -> str:
        return "".join(" " if t == SPACE else t for t in tokens)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        """Build the character list from ``texts``, most frequent first (ESPnet's order).

        Ties keep the order of first appearance. ``vocab_size`` (specials included) caps the list.
        """
        counts: Counter = Counter()
        for text in texts:
            counts.update(SPACE if c == " " else c for c in text)
        chars = [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if c not in _SPECIALS]
        if vocab_size is not None:
            if vocab_size < len(_SPECIALS) + 1:
                raise ValueError(f"vocab_size must be at least {len(_SPECIALS) + 1}, got {vocab_size}")
            chars = chars[: vocab_size - len(_SPECIALS)]
        if not chars:
            raise ValueError("cannot train a character tokenizer on empty texts")
        return cls([BLANK, UNK, *chars, SOS_EOS])


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece (unigram or BPE) pieces mapped onto an ESPnet token list.

    Args:
        model_proto: the serialized SentencePiece model (bytes of ``*.model``).
        token_list: optional explicit list (e.g. an ESPnet ``tokens.txt`` paired with its
            ``bpe.model``). By default it is ``<blank>, <unk>``, every piece in SentencePiece id
            order except its ``<unk>``/control pieces, then ``<sos/eos>``.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, token_list: Sequence[str] | None = None):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if token_list is None:
            pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                      if not (self.sp.is_unknown(i) or self.sp.is_control(i))]
            token_list = [BLANK, UNK, *(p for p in pieces if p not in _SPECIALS), SOS_EOS]
        super().__init__(token_list)

    def text_to_tokens(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def tokens_to_text(self, tokens: list[str]) -> str:
        # Map pieces to SentencePiece ids so that its own detokenisation handles "▁" and <unk>.
        return self.sp.decode([self.sp.piece_to_id(t) for t in tokens])

    def save(self, out_dir: str | os.PathLike) -> None:
        super().save(out_dir)
        with atomic_open(Path(out_dir) / SPM_FILE, "wb") as f:
            f.write(self.model_proto)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "unigram") -> "SentencePieceTokenizer":
        """Train SentencePiece deterministically (one thread, no sampling, no shuffling) and quietly.

        ``vocab_size`` is the final token-list size: SentencePiece learns ``vocab_size - 2``
        pieces (its ``<unk>`` becomes ours; ``<blank>`` and ``<sos/eos>`` are added).
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"unknown SentencePiece model type {model_type!r}: expected 'unigram' or 'bpe'")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train a SentencePiece tokenizer on empty texts")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size - 2,
                model_type=model_type, character_coverage=1.0,
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, unk_piece=UNK,
                # Determinism: use every sentence in the given order on one thread.
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
                minloglevel=2,  # only errors
            )
        except RuntimeError as e:
            # e.g. "Vocabulary size too high (500). Please set it to a value <= 123."
            raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size} "
                             f"({vocab_size - 2} pieces): {e}") from None
        return cls(model.getvalue())


_KINDS = ("char", "bpe", "unigram")


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int | None, out_dir: str | os.PathLike | None = None
                    ) -> Tokenizer:
    """Train a tokenizer of ``kind`` ('char', 'bpe' or 'unigram') and save it to ``out_dir`` if given.

    ``vocab_size`` counts every entry of the token list (``<blank>``, ``<unk>``, ``<sos/eos>``
    included); for 'char' it is an optional cap.
    """
    if kind == "char":
        tok: Tokenizer = CharTokenizer.train(texts, vocab_size)
    elif kind in ("bpe", "unigram"):
        if vocab_size is None:
            raise ValueError(f"a {kind} tokenizer needs a vocab_size")
        tok = SentencePieceTokenizer.train(texts, vocab_size, model_type=kind)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(_KINDS)}")
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def load_tokenizer(in_dir: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory written by ``Tokenizer.save``, detecting its kind."""
    in_dir = Path(in_dir)
    if not (in_dir / TOKENS_FILE).is_file():
        raise ValueError(f"{in_dir} is not a tokenizer directory: no {TOKENS_FILE}")
    token_list = (in_dir / TOKENS_FILE).read_text(encoding="utf-8").splitlines()
    if (in_dir / META_FILE).is_file():
        kind = json.loads((in_dir / META_FILE).read_text(encoding="utf-8")).get("kind")
    else:
        # A bare ESPnet token list: SentencePiece if a model file sits next to it.
        kind = "sentencepiece" if (in_dir / SPM_FILE).is_file() else "char"
    if kind == "char":
        return CharTokenizer(token_list)
    if kind == "sentencepiece":
        if not (in_dir / SPM_FILE).is_file():
            raise ValueError(f"tokenizer directory {in_dir} has no {SPM_FILE}")
        return SentencePieceTokenizer((in_dir / SPM_FILE).read_bytes(), token_list)
    raise ValueError(f"{in_dir / META_FILE}: unknown tokenizer kind {kind!r}")
