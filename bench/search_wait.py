"""How long a beam-search decode waits on its slowest searches, per batch or queued (decoding).

``allinone decode`` / ``allinone bench`` run the CTC prefix beam searches in worker
processes (``--num-workers``). Waiting for each batch's searches before encoding the next
batch leaves workers idle behind the batch's slowest utterance; queuing every batch's
searches and collecting them at the end (``recognize_batches``) does not. A machine with few
cores cannot show the difference, so this script measures each utterance's search time here
(one process) and computes the search wall time for W workers both ways (greedy list
scheduling: each search goes to the least loaded worker, longest first), the encoder's time
excluded (it runs on a GPU in the benchmarks).

Run:  python bench/search_wait.py MODEL_DIR DATA_DIR [--lm LM.arpa --lm-weight W --length-bonus B]
          [--beam 10] [--max-frames 30000] [--workers 2 16 64]
"""

from __future__ import annotations

import argparse
import time

import torch


def schedule(times: list[float], workers: int) -> float:
    """Wall time of ``times`` spread over ``workers`` (longest first, to the least loaded)."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def main() -> None:
    from allinone.data.dataset import ASRDataset, BucketBatchSampler, collate, extract_features
    from allinone.data.kaldi import read_data_dir
    from allinone.eval.ctc_decode import ctc_prefix_beam_search
    from allinone.eval.decode import load_lm_scorer
    from allinone.models.saved import load_model_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--lm", default=None)
    p.add_argument("--lm-weight", type=float, default=1.5)
    p.add_argument("--length-bonus", type=float, default=1.5)
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--max-frames", type=int, default=30000, help="padded frames per batch (bench's default)")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 16, 64])
    args = p.parse_args()

    loaded = load_model_dir(args.model)
    lm = load_lm_scorer(args.lm, loaded.tokenizer) if args.lm else None
    utts = read_data_dir(args.data)
    ds = ASRDataset(extract_features(utts, loaded.fbank, 1, progress=False), utts, loaded.tokenizer)
    batches = [collate([ds[i] for i in idx]) for idx in BucketBatchSampler(ds.lengths, args.max_frames, shuffle=False)]
    per_batch = []
    with torch.no_grad():
        for b in batches:
            enc, lens = loaded.model.encode(b["feats"], b["feat_lens"])
            log_probs = loaded.model.ctc_log_probs(enc).float()
            times = []
            for i in range(log_probs.shape[0]):
                t = time.perf_counter()
                ctc_prefix_beam_search(log_probs[i, : int(lens[i])].double(), beam=args.beam, lm=lm,
                                       lm_weight=args.lm_weight, length_bonus=args.length_bonus)
                times.append(time.perf_counter() - t)
            per_batch.append(times)
    everything = [t for times in per_batch for t in times]
    print(f"{len(batches)} batches, {len(everything)} utterances, {sum(everything):.1f} s of search in one process")
    for w in args.workers:
        waited = sum(schedule(times, w) for times in per_batch)
        print(f"{w} workers: {waited:.2f} s waiting batch by batch, {schedule(everything, w):.2f} s queued")


if __name__ == "__main__":
    main()
