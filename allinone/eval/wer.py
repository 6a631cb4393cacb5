"""Word / character error rates, sclite ``trn`` files and readable alignments.

Word alignment follows NIST sclite exactly (see ``docs/scoring.md``): a dynamic
programme with costs correct 0, insertion 3, deletion 3, substitution 4, and
sclite's tie-breaking (substitution/correct first, then deletion, then insertion).
A plain unit-cost Levenshtein alignment (e.g. jiwer's) has the same number of
errors in almost every case but splits ties differently: for REF ``a b`` /
HYP ``b c`` it reports 2 substitutions where sclite reports 1 deletion +
1 insertion.  Because the MAPSSWE significance test (``mapsswe.py``) is defined on
sclite's alignments, we align words the way sclite does, so that our S/D/I,
our WER and our MAPSSWE segments are the numbers sclite / sc_stats print.

Character error rate (CER) uses jiwer's character-level edit distance on the
text with all whitespace removed (as ESPnet's CER does).

Words are whitespace-separated tokens compared case-sensitively (sclite ``-s``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import jiwer

from allinone.utils import atomic_open

# Edit operations, as sclite's sgml / pralign reports spell them.
CORRECT, SUB, DEL, INS = "C", "S", "D", "I"

# sclite's default word-to-word distances (word.c: wwd_WORD).
COST_SUB = 4
COST_INS = 3
COST_DEL = 3

# Characters that sclite's trn reader gives a special meaning: "(word)" is an
# optionally deletable word, "{ a / b }" an alternation, a lone "@" a null word.
_TRN_SPECIAL = set("(){}")


@dataclass
class UttAlignment:
    """Alignment of one hypothesis against its reference.

    ``ref`` / ``hyp`` hold the aligned words, ``None`` where the other side has a
    word and this side has none (an insertion leaves ``ref`` empty, a deletion
    ``hyp``); ``ops`` holds one of ``C S D I`` per aligned position.
    """

    utt_id: str
    ref: list[str | None]
    hyp: list[str | None]
    ops: list[str]

    def count(self, op: str) -> int:
        return sum(1 for o in self.ops if o == op)

    @property
    def substitutions(self) -> int:
        return self.count(SUB)

    @property
    def deletions(self) -> int:
        return self.count(DEL)

    @property
    def insertions(self) -> int:
        return self.count(INS)

    @property
    def errors(self) -> int:
        return sum(1 for o in self.ops if o != CORRECT)

    @property
    def ref_words(self) -> int:
        return sum(1 for o in self.ops if o != INS)


@dataclass
class WERResult:
    """Corpus totals plus the per-utterance alignments.

    ``wer``, ``cer`` and ``ser`` are percentages.  ``sentence_errors`` counts
    utterances with at least one word error (sclite's "S.Err").
    """

    wer: float
    errors: int
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    hyp_words: int
    sentences: int
    sentence_errors: int
    ser: float
    cer: float
    char_errors: int
    ref_chars: int
    alignments: dict[str, UttAlignment] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """Totals as a JSON-ready dict (the content of ``wer.json``)."""
        return {
            "wer": round(self.wer, 4),
            "cer": round(self.cer, 4),
            "sub": self.substitutions,
            "del": self.deletions,
            "ins": self.insertions,
            "errors": self.errors,
            "words": self.ref_words,
            "hyp_words": self.hyp_words,
            "sentences": self.sentences,
            "sentence_errors": self.sentence_errors,
            "ser": round(self.ser, 4),
            "char_errors": self.char_errors,
            "chars": self.ref_chars,
        }


# --------------------------------------------------------------------------- #
# alignment
# --------------------------------------------------------------------------- #

def align_words(ref: list[str], hyp: list[str]) -> list[tuple[str, str | None, str | None]]:
    """Align two word lists the way sclite does; return ``[(op, ref_word, hyp_word)]``.

    Cell ``(i, j)`` holds the cheapest cost of aligning ``ref[:i]`` with ``hyp[:j]``.
    Ties are broken as in sclite's ``net_dp.c``: the diagonal move (correct or
    substitution) wins when it is no worse than both others, otherwise a deletion
    wins when strictly cheaper than an insertion, otherwise an insertion.
    """
    n, m = len(ref), len(hyp)
    # cost[i][j] and the move that reached it: "d" diagonal, "u" up (deletion),
    # "l" left (insertion).
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[""] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        cost[0][j] = cost[0][j - 1] + COST_INS
        move[0][j] = "l"
    for i in range(1, n + 1):
        cost[i][0] = cost[i - 1][0] + COST_DEL
        move[i][0] = "u"
    for i in range(1, n + 1):
        row, prev = cost[i], cost[i - 1]
        mrow = move[i]
        r = ref[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (0 if r == hyp[j - 1] else COST_SUB)
            up = prev[j] + COST_DEL
            left = row[j - 1] + COST_INS
            if diag <= up and diag <= left:
                row[j], mrow[j] = diag, "d"
            elif up < left:
                row[j], mrow[j] = up, "u"
            else:
                row[j], mrow[j] = left, "l"
    # Trace back from the bottom-right corner.
    out: list[tuple[str, str | None, str | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        mv = move[i][j]
        if mv == "d":
            op = CORRECT if ref[i - 1] == hyp[j - 1] else SUB
            out.append((op, ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif mv == "u":
            out.append((DEL, ref[i - 1], None))
            i -= 1
        else:
            out.append((INS, None, hyp[j - 1]))
            j -= 1
    out.reverse()
    return out


def align_utterance(utt_id: str, ref_text: str, hyp_text: str) -> UttAlignment:
    """Split both texts on whitespace and align them (see :func:`align_words`)."""
    triples = align_words(ref_text.split(), hyp_text.split())
    return UttAlignment(
        utt_id=utt_id,
        ref=[r for _, r, _ in triples],
        hyp=[h for _, _, h in triples],
        ops=[op for op, _, _ in triples],
    )


def check_same_ids(refs: Mapping[str, str], hyps: Mapping[str, str], what: str = "hypothesis") -> None:
    """Raise ``ValueError`` naming the ids missing from, or extra in, ``hyps``."""
    if not refs:
        raise ValueError("no reference utterances given")
    missing = sorted(set(refs) - set(hyps))
    extra = sorted(set(hyps) - set(refs))
    parts = []
    if missing:
        parts.append(f"{len(missing)} reference ids have no {what}: {_show(missing)}")
    if extra:
        parts.append(f"{len(extra)} {what} ids have no reference: {_show(extra)}")
    if parts:
        raise ValueError("; ".join(parts))


def _show(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #

def score(refs: Mapping[str, str], hyps: Mapping[str, str]) -> WERResult:
    """Score hypotheses against references, both ``{utt_id: text}``.

    Every reference id needs exactly one hypothesis and vice versa (``ValueError``
    naming the ids otherwise).  An empty hypothesis string is fine (all
    deletions).  Returns totals and per-utterance alignments.
    """
    check_same_ids(refs, hyps)
    alignments = {u: align_utterance(u, refs[u], hyps[u]) for u in sorted(refs)}
    sub = sum(a.substitutions for a in alignments.values())
    dele = sum(a.deletions for a in alignments.values())
    ins = sum(a.insertions for a in alignments.values())
    n_ref = sum(a.ref_words for a in alignments.values())
    if n_ref == 0:
        raise ValueError("the references contain no words; WER is undefined")
    errors = sub + dele + ins
    sent_err = sum(1 for a in alignments.values() if a.errors > 0)
    char_errors, ref_chars = _char_errors(refs, hyps, list(alignments))
    return WERResult(
        wer=100.0 * errors / n_ref,
        errors=errors,
        substitutions=sub,
        deletions=dele,
        insertions=ins,
        ref_words=n_ref,
        hyp_words=sum(len(hyps[u].split()) for u in alignments),
        sentences=len(alignments),
        sentence_errors=sent_err,
        ser=100.0 * sent_err / len(alignments),
        cer=100.0 * char_errors / ref_chars if ref_chars else 0.0,
        char_errors=char_errors,
        ref_chars=ref_chars,
        alignments=alignments,
    )


def _char_errors(refs: Mapping[str, str], hyps: Mapping[str, str], ids: list[str]) -> tuple[int, int]:
    """Character edit distance summed over utterances, whitespace removed (ESPnet's CER)."""
    ref_c = ["".join(refs[u].split()) for u in ids]
    hyp_c = ["".join(hyps[u].split()) for u in ids]
    n_chars = sum(len(r) for r in ref_c)
    if n_chars == 0:
        return sum(len(h) for h in hyp_c), 0
    out = jiwer.process_characters(ref_c, hyp_c)
    return out.substitutions + out.deletions + out.insertions, n_chars


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #

SpeakerOf = Mapping[str, str] | Callable[[str], str] | None


def trn_id(utt_id: str, speaker_of: SpeakerOf = None) -> str:
    """The ``SPK-UTTID`` label sclite reads with ``-i rm`` (speaker = text before the first ``-`` or ``_``).

    Without ``speaker_of`` the utterance id is its own speaker (``UTT-UTT``), so
    sclite's per-speaker grouping uses the utterance id's own leading field.
    """
    _check_token(utt_id, "utterance id", utt_id)
    if speaker_of is None:
        spk = utt_id
    elif callable(speaker_of):
        spk = speaker_of(utt_id)
    else:
        if utt_id not in speaker_of:
            raise ValueError(f"utterance {utt_id!r} has no speaker in speaker_of")
        spk = speaker_of[utt_id]
    _check_token(spk, "speaker id", utt_id)
    return f"{spk}-{utt_id}"


def _check_token(tok: str, what: str, utt_id: str) -> None:
    if not tok or any(c.isspace() for c in tok) or "(" in tok or ")" in tok:
        raise ValueError(f"{what} {tok!r} of utterance {utt_id!r} must be non-empty, "
                         "without whitespace or parentheses (sclite trn format)")


def _check_trn_words(utt_id: str, text: str) -> None:
    for w in text.split():
        if w == "@" or _TRN_SPECIAL.intersection(w):
            raise ValueError(f"utterance {utt_id!r}: word {w!r} has a meaning of its own in sclite trn "
                             "files ('@', parentheses, braces); normalise the text before scoring")


def write_trn(path: str | os.PathLike, texts: Mapping[str, str], speaker_of: SpeakerOf = None) -> None:
    """Write ``{utt_id: text}`` as an sclite ``trn`` file, one ``WORDS (SPK-UTTID)`` line each.

    Lines are sorted by utterance id; the file is written atomically.  Score it with
    ``sclite -r ref.trn trn -h hyp.trn trn -i rm -s`` (see ``docs/scoring.md``).
    """
    lines = []
    for u in sorted(texts):
        _check_trn_words(u, texts[u])
        words = " ".join(texts[u].split())
        lines.append(f"{words} ({trn_id(u, speaker_of)})\n" if words else f"({trn_id(u, speaker_of)})\n")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def write_text(path: str | os.PathLike, texts: Mapping[str, str]) -> None:
    """Write a Kaldi ``text`` file (``uttid words``), sorted by id, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for u in sorted(texts):
            _check_token(u, "utterance id", u)
            words = " ".join(texts[u].split())
            f.write(f"{u} {words}\n" if words else f"{u}\n")


def format_alignment(ali: UttAlignment) -> str:
    """Three aligned lines, ``REF:``, ``HYP:``, ``OPS:``; ``*`` marks a missing word."""
    ref_cells, hyp_cells, op_cells = [], [], []
    for r, h, op in zip(ali.ref, ali.hyp, ali.ops):
        width = max(len(r or ""), len(h or ""), 1)
        ref_cells.append((r if r is not None else "*" * width).ljust(width))
        hyp_cells.append((h if h is not None else "*" * width).ljust(width))
        op_cells.append(("" if op == CORRECT else op).ljust(width))
    return ("REF: " + " ".join(ref_cells)).rstrip() + "\n" + \
           ("HYP: " + " ".join(hyp_cells)).rstrip() + "\n" + \
           ("OPS: " + " ".join(op_cells)).rstrip() + "\n"


def write_alignments(path: str | os.PathLike, result: WERResult) -> None:
    """Write every utterance's alignment as a readable block, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for u, ali in result.alignments.items():
            f.write(f"id: {u}  C={ali.count(CORRECT)} S={ali.substitutions} "
                    f"D={ali.deletions} I={ali.insertions}\n")
            f.write(format_alignment(ali))
            f.write("\n")


def write_results(out_dir: str | os.PathLike, refs: Mapping[str, str], hyps: Mapping[str, str],
                  speaker_of: SpeakerOf = None) -> WERResult:
    """Score and write ``ref.trn``, ``hyp.trn``, ``text`` (hypotheses, Kaldi form),
    ``wer.json`` and ``alignments.txt`` into ``out_dir``; return the result."""
    result = score(refs, hyps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_trn(out / "ref.trn", refs, speaker_of)
    write_trn(out / "hyp.trn", hyps, speaker_of)
    write_text(out / "text", hyps)
    with atomic_open(out / "wer.json", "w", encoding="utf-8") as f:
        json.dump(result.to_dict(), f, indent=2)
        f.write("\n")
    write_alignments(out / "alignments.txt", result)
    return result


__all__ = [
    "CORRECT", "SUB", "DEL", "INS", "UttAlignment", "WERResult", "align_words", "align_utterance",
    "score", "write_trn", "write_text", "write_results", "write_alignments", "format_alignment",
    "trn_id", "check_same_ids",
]
