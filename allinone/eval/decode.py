"""Batched decoding of a data directory with a saved model, then scoring.

CTC greedy search, or CTC prefix beam search whose n-best list is rescored with the
attention decoder when the model has one (ESPnet's "attention rescoring").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger("allinone")


@dataclass
class DecodeOptions:
    beam: int = 1  # 1 = greedy CTC
    ctc_weight: float = 0.3  # weight of the CTC score when rescoring with the decoder
    max_frames: int = 30000  # padded frames per batch
    max_samples: int = 1_600_000  # padded samples per batch (waveform models)
    num_workers: int = 2
    device: str = "cpu"
    skip_bad: bool = False
    lm: str | None = None  # ARPA n-gram LM over the model's units (allinone lm), for shallow fusion
    lm_weight: float = 0.5  # weight of its log-probabilities in the beam search's score
    length_bonus: float = 0.0  # added to the score per output token (beam search)

    def search_settings(self) -> dict:
        """What the hypotheses depend on besides the model and the data (``search_settings``)."""
        return search_settings(self.beam, self.lm, self.lm_weight, self.length_bonus)

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1 (1 = greedy CTC), got {self.beam}")
        if self.lm is not None and self.beam == 1:
            raise ValueError("a language model (lm) is used by the beam search only: give beam > 1")
        if self.lm_weight < 0.0:
            raise ValueError(f"lm_weight must be >= 0, got {self.lm_weight}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1], got {self.ctc_weight}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_device(self.device)


def search_settings(beam: int, lm: str | None = None, lm_weight: float | None = None,
                    length_bonus: float = 0.0) -> dict:
    """The search's part of a decode: beam, LM file (resolved), its weight (None without an
    LM) and the length bonus. ``decode.json`` records it; ``allinone compare`` reuses a saved
    decode, and ``--nested`` a bench, only when theirs is equal."""
    return {"beam": beam, "lm": str(Path(lm).resolve()) if lm else None, "lm_weight": lm_weight if lm else None,
            "length_bonus": length_bonus}


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, or a ``ValueError`` naming a device string torch does not know
    or a CUDA device this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no GPU")
    return dev


@torch.no_grad()
def attention_log_likelihood(model, enc: torch.Tensor, hyps: list[list[int]]) -> torch.Tensor:
    """Sum of decoder log-probabilities of each hypothesis followed by <sos/eos>.

    Args:
        enc: [1, T, D] encoder output of one utterance.
        hyps: N token sequences (no blank, no sos/eos).
    Returns:
        [N] log-likelihoods log p(y_1 .. y_U, eos | enc).
    """
    eos = model.config.vocab_size - 1
    n = len(hyps)
    lens = torch.tensor([len(h) + 1 for h in hyps], device=enc.device)
    u = int(lens.max())
    ys_in = torch.full((n, u), eos, dtype=torch.long, device=enc.device)  # padding value is masked anyway
    ys_out = torch.full((n, u), -1, dtype=torch.long, device=enc.device)
    for i, h in enumerate(hyps):
        h = torch.tensor(h, dtype=torch.long, device=enc.device)
        ys_in[i, 1: len(h) + 1] = h  # <sos> first; ESPnet uses the same id for sos and eos
        ys_out[i, : len(h)] = h
        ys_out[i, len(h)] = eos
    enc_n = enc.expand(n, -1, -1)
    enc_lens = torch.full((n,), enc.shape[1], dtype=torch.long, device=enc.device)
    logits, _ = model.decoder(enc_n, enc_lens, ys_in, lens)
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = ys_out >= 0
    tok = logp.gather(-1, ys_out.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


# Each beam-search worker process's options and LM scorer (set once by ``_init_search_worker``).
_WORKER_SEARCH: dict = {}


def _init_search_worker(opts: DecodeOptions, token_list: list[str]) -> None:
    from allinone.data.dataset import _init_worker
    from allinone.eval.ngram_lm import NgramLM, TokenLMScorer

    _init_worker()  # one thread per worker
    lm = TokenLMScorer(NgramLM.read_arpa(opts.lm), token_list) if opts.lm else None
    _WORKER_SEARCH.update(opts=opts, lm=lm)


def _search_in_worker(log_probs):
    from allinone.eval.ctc_decode import ctc_prefix_beam_search

    opts = _WORKER_SEARCH["opts"]
    return ctc_prefix_beam_search(torch.from_numpy(log_probs), beam=opts.beam, lm=_WORKER_SEARCH["lm"],
                                  lm_weight=opts.lm_weight, length_bonus=opts.length_bonus)


class BeamSearchPool:
    """CTC prefix beam searches (CPU-bound Python) of many utterances in ``workers`` spawned
    processes, each with its own copy of the LM. A context manager; ``search`` keeps the order.
    "spawn", not fork: forking a process whose OpenMP pool has run can deadlock."""

    def __init__(self, workers: int, opts: DecodeOptions, token_list: list[str]):
        import multiprocessing as mp

        from allinone.data.dataset import _single_thread_env

        with _single_thread_env():
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_search_worker,
                                                     initargs=(opts, list(token_list)))

    def search(self, log_probs: list[torch.Tensor]) -> list[list[tuple[list[int], float]]]:
        """n-best lists of [frames, vocab] log-probabilities, in the order given."""
        return self.submit(log_probs).get()

    def submit(self, log_probs: list[torch.Tensor]):
        """Queue the searches and return at once; ``.get()`` of the result gives ``search``'s lists."""
        return self.pool.map_async(_search_in_worker, [lp.detach().double().cpu().numpy() for lp in log_probs])

    def __enter__(self) -> "BeamSearchPool":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.terminate()
        self.pool.join()


def search_pool(opts: DecodeOptions, token_list: list[str], num_utts: int):
    """A ``BeamSearchPool`` of ``opts.num_workers`` processes when the beam search is worth
    spreading (beam > 1, several workers and utterances), else a context giving None."""
    import contextlib

    if opts.beam > 1 and opts.num_workers > 1 and num_utts > 1:
        return BeamSearchPool(min(opts.num_workers, num_utts), opts, token_list)
    return contextlib.nullcontext(None)


@torch.no_grad()
def recognize_batch(model, feats, feat_lens, opts: DecodeOptions, subnet=None, lm=None,
                    pool: BeamSearchPool | None = None) -> list[list[int]]:
    """Token ids of the best hypothesis for each utterance of a padded batch.

    feats: [B, T, F] (waveform models: [B, S]), feat_lens: [B]; subnet: the ``SubnetConfig`` a supernet runs
    (None = the whole model, the only choice for a plain or extracted model); lm: a token scorer
    (``load_lm_scorer``) fused into the beam search with ``opts.lm_weight``; pool: a
    ``BeamSearchPool`` that runs the beam searches instead (with its own copy of the LM).
    """
    from allinone.eval.ctc_decode import ctc_greedy_batch, ctc_prefix_beam_search

    enc, enc_lens = model.encode(feats, feat_lens, subnet)
    log_probs = model.ctc_log_probs(enc).float()
    if opts.beam <= 1:
        return ctc_greedy_batch(log_probs, enc_lens)
    utts = _per_utterance(log_probs, enc_lens)
    if pool is not None:
        nbests = pool.search(utts)
    else:
        nbests = [ctc_prefix_beam_search(lp, beam=opts.beam, lm=lm, lm_weight=opts.lm_weight,
                                         length_bonus=opts.length_bonus) for lp in utts]
    results = []
    for b, nbest in enumerate(nbests):
        t = int(enc_lens[b])
        if getattr(model, "decoder", None) is None or len(nbest) == 1:  # (wav2vec2 models have none)
            results.append(list(nbest[0][0]))
            continue
        hyps = [list(h) for h, _ in nbest]
        ctc_scores = torch.tensor([s for _, s in nbest], device=enc.device)
        att_scores = attention_log_likelihood(model, enc[b: b + 1, :t], hyps)
        total = opts.ctc_weight * ctc_scores + (1 - opts.ctc_weight) * att_scores
        results.append(hyps[int(total.argmax())])
    return results


def _per_utterance(log_probs: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, V] padded log-probabilities -> B tensors [T_b, V] without the padding."""
    return [log_probs[b, : int(lens[b])] for b in range(log_probs.shape[0])]


@torch.no_grad()
def recognize_batches(model, batches, opts: DecodeOptions, subnet=None, lm=None,
                      pool: BeamSearchPool | None = None, progress: bool = False) -> dict[str, list[int]]:
    """utt_id -> token ids of the best hypothesis, for every utterance of ``batches`` (collated
    dicts with ``feats``, ``feat_lens``, ``utt_ids``), as ``recognize_batch`` gives them.

    With a pool and a model without an attention decoder (CTC-only, wav2vec2), each batch's
    beam searches are queued as soon as its encoder has run and collected at the end, so the
    encoder never waits for a batch's slowest search and the workers never wait for the encoder.
    A model with an attention decoder rescores per batch, as before. progress: a bar over the
    collection of the queued searches.
    """
    device = torch.device(opts.device)
    queued = pool is not None and opts.beam > 1 and getattr(model, "decoder", None) is None
    hyps: dict[str, list[int]] = {}
    pending = []
    for batch in batches:
        feats, feat_lens = batch["feats"].to(device), batch["feat_lens"].to(device)
        if queued:
            enc, enc_lens = model.encode(feats, feat_lens, subnet)
            pending.append((batch["utt_ids"], pool.submit(_per_utterance(model.ctc_log_probs(enc).float(), enc_lens))))
            for _, result in pending:  # a worker's error surfaces now, not after every batch
                if result.ready() and not result.successful():
                    result.get()
        else:
            hyps.update(zip(batch["utt_ids"], recognize_batch(model, feats, feat_lens, opts, subnet, lm, pool)))
    for utt_ids, result in tqdm(pending, desc="search", leave=False, disable=not progress or not pending):
        hyps.update(zip(utt_ids, (list(nbest[0][0]) for nbest in result.get())))
    return hyps


def load_lm_scorer(path: str | Path, tokenizer):
    """The ARPA language model at ``path`` as a scorer over ``tokenizer``'s ids; a ``ValueError``
    when the model knows none of the tokenizer's units (an LM of other units)."""
    from allinone.eval.ngram_lm import UNK, NgramLM, TokenLMScorer

    lm = NgramLM.read_arpa(path)
    units = [t for i, t in enumerate(tokenizer.token_list)
             if i not in (tokenizer.blank_id, tokenizer.sos_eos_id) and t != UNK]
    missing = [t for t in units if t not in lm.vocab]
    if len(missing) == len(units):
        raise ValueError(f"language model {path} knows none of the model's {len(units)} output units "
                         f"(e.g. {units[:5]}): it was trained on other units")
    if missing:
        logger.warning("language model %s lacks %d of the model's units (scored as <unk>): %s",
                       path, len(missing), missing[:10])
    return TokenLMScorer(lm, tokenizer.token_list)


def decode_data_dir(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                    opts: DecodeOptions = DecodeOptions()) -> dict:
    """Decode every utterance of ``data_dir``; write hypotheses, trn files and wer.json.

    Returns the contents of ``wer.json`` plus timing.
    """
    from allinone.data.dataset import BucketBatchSampler, WaveformConfig, collate, extract_features, ASRDataset
    from allinone.data.kaldi import read_data_dir
    from allinone.eval.wer import write_results
    from allinone.models.saved import load_model_dir

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"output directory {out_dir} is an existing file")
    loaded = load_model_dir(model_dir, device=opts.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    lm = load_lm_scorer(opts.lm, tokenizer) if opts.lm else None
    utts = read_data_dir(data_dir, skip_bad=opts.skip_bad)
    feats = extract_features(utts, loaded.fbank, opts.num_workers, skip_bad=opts.skip_bad,
                             progress=False)
    dataset = ASRDataset(feats, utts, tokenizer)
    budget = opts.max_samples if isinstance(loaded.fbank, WaveformConfig) else opts.max_frames
    sampler = BucketBatchSampler(dataset.lengths, budget, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    start = time.time()
    with search_pool(opts, tokenizer.token_list, len(dataset)) as pool:
        # (the first bar counts encoder batches, the second the queued beam searches after them)
        ids = recognize_batches(model, tqdm(loader, desc="decode", leave=False), opts, lm=lm, pool=pool,
                                progress=True)
    hyps = {utt_id: tokenizer.decode(tokens) for utt_id, tokens in ids.items()}
    seconds = time.time() - start
    refs = {u.utt_id: u.text for u in utts if u.utt_id in hyps}
    result = write_results(out_dir, refs, hyps)
    summary = {**result.to_dict(), "decode_seconds": seconds,
               **opts.search_settings(), "model": str(model_dir), "data": str(data_dir)}
    logger.info("%s: WER %.2f%% on %d utterances -> %s", data_dir, summary.get("wer", float("nan")),
                len(refs), out_dir)
    from allinone.utils import atomic_open

    with atomic_open(Path(out_dir) / "decode.json") as f:  # allinone compare reads it to reuse a decode
        json.dump(summary, f, indent=2, default=str)
    return summary
