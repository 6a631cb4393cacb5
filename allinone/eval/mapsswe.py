"""NIST Matched Pairs Sentence-Segment Word Error test (MAPSSWE).

Gillick & Cox (ICASSP 1989), as implemented by NIST ``sc_stats -t mapsswe``.
The method notes (``docs/method.md`` section 2) call a compressed system
*lossless* when this test finds no significant WER increase at alpha = 0.05.

How it works
------------
1. Align each system's hypothesis to the reference (``wer.align_words``, the
   sclite alignment), giving a sequence of ``C S D I`` per system.
2. Walk both sequences in step over the reference words and cut each utterance
   into *segments*: stretches that contain errors of either system, bounded by
   at least ``min_good`` (sc_stats: 2) consecutive reference words that both
   systems got right.  The ``min_good`` correct words on each side belong to the
   segment (and may be shared by two neighbouring segments); a segment may also
   end at the end of the utterance.  Segments where neither system errs are
   dropped.
3. For segment i, Z_i = N_a,i - N_b,i, the difference in error counts
   (substitutions + deletions + insertions).
4. W = mean(Z) / (std(Z) / sqrt(n)), std with the n - 1 divisor; under the null
   hypothesis W is standard normal, and the two-tailed p-value is
   ``erfc(|W| / sqrt(2))``.

sc_stats details we reproduce (it is the reference; SCTK 2.4.x ``mtchprs.c``)
-----------------------------------------------------------------------------
* The walk runs over system a's alignment; whatever is left at the end (an open
  segment, or trailing insertions of system b) forms one last segment that runs
  to the end of both alignments.
* A segment's reference-word count is the mean of the two systems' counts
  (integer division); the ``min_good`` boundary words count in both
  neighbouring segments.  These counts only feed the printed percentages.
* When all differences are equal (zero variance) sc_stats sets W = 0; so do we
  (p = 1).
* sc_stats prints its p-value from a normal table, apparently |W| rounded down
  to 0.01 (so up to ~0.008 larger than the exact value), and calls a difference
  significant when |W| > 1.960.  We compute the exact normal p-value and call
  the difference significant when p < alpha; the two agree except for |W|
  within rounding of 1.96.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from allinone.eval.wer import CORRECT, INS, align_utterance, check_same_ids

#: sc_stats' default minimum number of correct words that bound a segment.
MIN_GOOD = 2


@dataclass(frozen=True)
class Segment:
    """One MAPSSWE segment: its utterance, errors of each system, reference words.

    ``ref_words`` is sc_stats' count (mean of the two systems' non-insertion
    positions, integer division), which includes the boundary words.
    """

    utt_id: str
    errors_a: int
    errors_b: int
    ref_words: int


@dataclass
class MapsswResult:
    """Result of :func:`mapsswe`.

    ``mean_diff`` / ``std_diff`` are the mean and sample standard deviation of
    Z_i = errors_a,i - errors_b,i over segments; ``statistic`` is W; ``better``
    names the system with fewer errors when the difference is significant.
    ``errors_a`` / ``errors_b`` total the errors inside segments, which equals
    each system's word errors.
    """

    num_segments: int
    mean_diff: float
    std_diff: float
    statistic: float
    p_value: float
    significant: bool
    better: str | None
    errors_a: int
    errors_b: int
    alpha: float = 0.05
    min_good: int = MIN_GOOD
    segments: list[Segment] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the segment list)."""
        return {
            "test": "MAPSSWE",
            "num_segments": self.num_segments,
            "mean_diff": self.mean_diff,
            "std_diff": self.std_diff,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "significant": self.significant,
            "better": self.better,
            "errors_a": self.errors_a,
            "errors_b": self.errors_b,
            "min_good": self.min_good,
        }


# States of the segmentation walk (sc_stats' 'b', 'e', 'g').
_BETWEEN = "between"    # no open segment: every word so far correct for both
_IN_ERROR = "in_error"  # inside a segment, last position had an error
_GOOD_RUN = "good_run"  # inside a segment, counting correct words to close it


def segment_errors(ops_a: list[str], ops_b: list[str], min_good: int = MIN_GOOD
                   ) -> list[tuple[int, int, int]]:
    """Cut one utterance into MAPSSWE segments; return ``[(errors_a, errors_b, ref_words)]``.

    ``ops_a`` / ``ops_b`` are the two systems' alignment operations against the
    same reference.  This follows sc_stats' ``test_comp_sents`` state machine
    (see the module docstring).
    """
    if min_good < 1:
        raise ValueError(f"min_good must be >= 1, got {min_good}")
    segments: list[tuple[int, int, int]] = []
    na, nb = len(ops_a), len(ops_b)
    ia = ib = 0
    # Positions of the last correct-for-both word before the open segment: the
    # segment starts min_good - 1 positions earlier, taking in the run of
    # correct words that precedes the errors.
    good_a = good_b = 0
    state, num_good = _BETWEEN, 0

    def close(end_a: int, end_b: int) -> None:
        start_a, start_b = max(good_a - (min_good - 1), 0), max(good_b - (min_good - 1), 0)
        err_a, ref_a = _count(ops_a, start_a, end_a)
        err_b, ref_b = _count(ops_b, start_b, end_b)
        if err_a or err_b:  # sc_stats drops error-free segments
            segments.append((err_a, err_b, (ref_a + ref_b) // 2))

    while ia < na:
        # Insertions are errors that consume no reference word: they open or
        # extend a segment.
        while ia < na and ops_a[ia] == INS:
            ia, state = ia + 1, _IN_ERROR
        while ib < nb and ops_b[ib] == INS:
            ib, state = ib + 1, _IN_ERROR
        both_correct = ia < na and ib < nb and ops_a[ia] == CORRECT and ops_b[ib] == CORRECT
        if state == _BETWEEN:
            if both_correct:
                good_a, good_b = ia, ib
            else:
                state = _IN_ERROR
        elif both_correct:
            num_good = 1 if state == _IN_ERROR else num_good + 1
            if num_good == min_good:
                close(ia, ib)
                good_a, good_b, state = ia, ib, _BETWEEN
            else:
                state = _GOOD_RUN
        else:
            state = _IN_ERROR
        if ia < na:
            ia += 1
        if ib < nb:
            ib += 1
    # The end of the utterance closes an open segment; system b's trailing
    # insertions (the walk above stops with system a) also end up here.
    if state != _BETWEEN or ib < nb:
        close(na - 1, nb - 1)
    return segments


def _count(ops: list[str], start: int, end: int) -> tuple[int, int]:
    """Errors and reference words among ``ops[start..end]`` (inclusive)."""
    span = ops[start:end + 1]
    return sum(1 for o in span if o != CORRECT), sum(1 for o in span if o != INS)


def matched_pairs_statistic(diffs: list[int]) -> tuple[float, float, float]:
    """Mean, sample std (n - 1) and W = mean / (std / sqrt(n)) of the differences.

    Zero segments or zero variance give W = 0, as in sc_stats.
    """
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(diffs) / n
    ss = sum((d - mean) ** 2 for d in diffs)
    if ss == 0.0:
        return mean, 0.0, 0.0
    std = math.sqrt(ss / (n - 1))
    return mean, std, mean / (std / math.sqrt(n))


def two_tailed_p(z: float) -> float:
    """P(|N(0,1)| >= |z|)."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def mapsswe(refs: Mapping[str, str], hyps_a: Mapping[str, str], hyps_b: Mapping[str, str],
            alpha: float = 0.05, min_good: int = MIN_GOOD) -> MapsswResult:
    """Compare two systems' hypotheses (``{utt_id: text}``) on the same references.

    Each hypothesis is aligned to its reference as ``wer.score`` does.  A positive
    ``mean_diff`` / ``statistic`` means system a makes more errors.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_same_ids(refs, hyps_a, "system a hypothesis")
    check_same_ids(refs, hyps_b, "system b hypothesis")
    segments: list[Segment] = []
    for u in sorted(refs):
        ops_a = align_utterance(u, refs[u], hyps_a[u]).ops
        ops_b = align_utterance(u, refs[u], hyps_b[u]).ops
        segments.extend(Segment(u, ea, eb, nr) for ea, eb, nr in segment_errors(ops_a, ops_b, min_good))
    diffs = [s.errors_a - s.errors_b for s in segments]
    mean, std, w = matched_pairs_statistic(diffs)
    p = two_tailed_p(w)
    significant = p < alpha
    better = None
    if significant:
        better = "b" if mean > 0 else "a"
    return MapsswResult(
        num_segments=len(segments),
        mean_diff=mean,
        std_diff=std,
        statistic=w,
        p_value=p,
        significant=significant,
        better=better,
        errors_a=sum(s.errors_a for s in segments),
        errors_b=sum(s.errors_b for s in segments),
        alpha=alpha,
        min_good=min_good,
        segments=segments,
    )


def read_transcripts(path: str | os.PathLike, what: str, allow_empty: bool = False) -> dict[str, str]:
    """The Kaldi ``text`` of a data dir or decode dir (``<dir>/text``), or a ``text`` file itself."""
    from allinone.data.kaldi import read_text

    path = Path(path)
    text = path / "text" if path.is_dir() else path
    if not text.is_file():
        raise ValueError(f"{what} {path}: no Kaldi text file there (looked for {text})")
    return read_text(text, allow_empty)


def compare_transcripts(ref: str | os.PathLike, system_a: str | os.PathLike, system_b: str | os.PathLike,
                        alpha: float = 0.05) -> MapsswResult:
    """MAPSSWE of two systems' hypotheses (decode dirs or ``text`` files) on the references of
    ``ref`` (a data dir or a ``text`` file): the ``allinone mapsswe`` command."""
    refs = read_transcripts(ref, "references")
    return mapsswe(refs, read_transcripts(system_a, "system a", allow_empty=True),
                   read_transcripts(system_b, "system b", allow_empty=True), alpha=alpha)


__all__ = ["MIN_GOOD", "MapsswResult", "Segment", "mapsswe", "matched_pairs_statistic",
           "segment_errors", "two_tailed_p", "read_transcripts", "compare_transcripts"]
