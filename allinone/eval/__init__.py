"""Evaluation: WER / CER and sclite files, MAPSSWE significance test, CTC decoding."""

from allinone.eval.ctc_decode import (
    ctc_greedy,
    ctc_greedy_batch,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_batch,
    rescore,
)
from allinone.eval.mapsswe import MapsswResult, mapsswe
from allinone.eval.wer import WERResult, score, write_results, write_trn

__all__ = [
    "MapsswResult", "WERResult", "ctc_greedy", "ctc_greedy_batch", "ctc_prefix_beam_search",
    "ctc_prefix_beam_search_batch", "mapsswe", "rescore", "score", "write_results", "write_trn",
]
