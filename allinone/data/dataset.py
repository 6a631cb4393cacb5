"""Feature extraction, the ASR dataset, length-bucketed batching and collation.

Features are computed once (in worker processes, one thread each) and kept in memory as a
``{utt_id: [frames, n_mels]}`` dict, optionally cached to a single file. Training then only
indexes tensors: no audio decoding in the training loop.

Waveform models (wav2vec2 / HuBERT) take the signal itself: with a ``WaveformConfig`` in
place of the ``FbankConfig`` the same machinery yields ``{utt_id: [samples]}`` (float32,
about twice the memory of 80-dim fbank at a 10 ms hop), and ``collate`` pads those to
``[batch, samples]``; lengths are then counted in samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from allinone.data.audio import load_audio, speed_perturb
from allinone.data.features import FbankConfig, compute_fbank
from allinone.data.kaldi import DataError, Utterance
from allinone.data.tokenizer import Tokenizer
from allinone.utils import atomic_torch_save

logger = logging.getLogger("allinone")

# Bump when the feature computation changes, so old caches are not reused.
_CACHE_VERSION = 1
# Thread-count variables of the math libraries a worker may load (torch, numpy, MKL, OpenBLAS).
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class WaveformConfig:
    """Front end of waveform models: the raw signal at ``sample_rate``, no features.

    normalize: scale each utterance to zero mean and unit variance (``(x - mean) /
    sqrt(var + 1e-7)``, as transformers' ``do_normalize``), for models pretrained on
    normalised audio (fairseq's ``task.normalize``: the "large"/lv60 wav2vec2 models).
    """

    sample_rate: int = 16000
    normalize: bool = False


class FeatureDict(dict):
    """``dict[utt_id -> Tensor [frames, n_mels]]`` that also records skipped utterances.

    ``skipped`` holds ``(utt_id, reason)`` for each utterance dropped with ``skip_bad=True``.
    """

    def __init__(self, feats=(), skipped=()):
        super().__init__(feats)
        self.skipped: list[tuple[str, str]] = list(skipped)


# ---------------------------------------------------------------------------------------------
# Speed perturbation
# ---------------------------------------------------------------------------------------------


def speed_prefix(factor: float) -> str:
    """ESPnet's id prefix for a speed-perturbed copy: ``sp0.9-`` (empty for 1.0)."""
    return "" if factor == 1.0 else f"sp{factor:g}-"


def speed_perturb_utts(utts: Sequence[Utterance], factors: Sequence[float]) -> list[Utterance]:
    """Copies of ``utts`` for each speed factor, ids and speakers prefixed as ESPnet does.

    Factor 1.0 keeps the original ids. Use the result as the ``utts`` of ``ASRDataset`` when the
    features were extracted with the same ``speed_factors``.
    """
    out = []
    for factor in factors:
        p = speed_prefix(factor)
        out += [dataclasses.replace(u, utt_id=p + u.utt_id, speaker=p + u.speaker) for u in utts]
    return out


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------


def _features_of(job: tuple[Utterance, float, FbankConfig | WaveformConfig]) -> tuple[str, object, str | None]:
    """Worker body: ``(utt, factor, cfg) -> (utt_id, feats as numpy or None, error)``.

    feats: ``[frames, n_mels]`` for an ``FbankConfig``, ``[samples]`` for a ``WaveformConfig``.
    """
    utt, factor, cfg = job
    out_id = speed_prefix(factor) + utt.utt_id
    try:
        wave = load_audio(utt.path, utt.start, utt.end, utt.channel, sample_rate=cfg.sample_rate)
        wave = speed_perturb(wave, factor, cfg.sample_rate)
        if isinstance(cfg, WaveformConfig):
            feats = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7) if cfg.normalize else wave
        else:
            feats = compute_fbank(wave, cfg)
    except DataError as e:
        return out_id, None, f"utterance {utt.utt_id!r}: {e}"
    # numpy pickles compactly; torch tensors would go through shared-memory file descriptors.
    return out_id, feats.numpy(), None


def _init_worker() -> None:
    """Limit a worker to one thread: N workers x N threads oversubscribes the CPU badly."""
    for var in _THREAD_ENV_VARS:
        os.environ[var] = "1"
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed once parallel work started; intra-op threads are what matter


@contextmanager
def _single_thread_env():
    """Set the thread variables to 1 while worker processes start (they read them at import)."""
    saved = {v: os.environ.get(v) for v in _THREAD_ENV_VARS}
    os.environ.update({v: "1" for v in _THREAD_ENV_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _cache_key(utts: Sequence[Utterance], cfg: FbankConfig | WaveformConfig, factors: Sequence[float]) -> str:
    """Hash of everything the features depend on, file sizes and times included (to catch edits)."""
    h = hashlib.sha256()
    head = {"version": _CACHE_VERSION, "cfg": dataclasses.asdict(cfg), "factors": list(factors)}
    if isinstance(cfg, WaveformConfig):  # (fbank keys stay as they were: existing caches remain valid)
        head["front_end"] = "waveform"
    h.update(json.dumps(head, sort_keys=True).encode())
    for u in utts:
        try:
            st = os.stat(u.path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        h.update(json.dumps([u.utt_id, u.path, u.start, u.end, u.channel, stamp]).encode())
    return h.hexdigest()


def _load_cache(cache_path: Path, key: str) -> FeatureDict | None:
    if not cache_path.is_file():
        return None
    try:
        blob = torch.load(cache_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cache is disposable: any problem means recompute
        logger.warning("ignoring unreadable feature cache %s: %s", cache_path, e)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        logger.info("feature cache %s is for other utterances or settings; recomputing", cache_path)
        return None
    logger.info("loaded %d utterances' features from cache %s", len(blob["feats"]), cache_path)
    return FeatureDict(blob["feats"], [tuple(s) for s in blob["skipped"]])


def extract_features(
    utts: Sequence[Utterance],
    fbank_cfg: FbankConfig | WaveformConfig | None = None,
    num_workers: int = 1,
    cache_path: str | os.PathLike | None = None,
    skip_bad: bool = False,
    speed_factors: Sequence[float] = (1.0,),
    progress: bool = True,
) -> FeatureDict:
    """Compute log-mel features (or load waveforms) for every utterance and speed factor.

    Args:
        utts: utterances, e.g. from ``read_data_dir``.
        fbank_cfg: front-end settings (default ``FbankConfig()``); a ``WaveformConfig``
            gives the waveforms themselves.
        num_workers: worker processes, each limited to one thread; 0 or 1 computes in this process.
        cache_path: optional file. If it holds features for the same utterances, files and
            settings they are loaded; otherwise they are computed and written there atomically.
        skip_bad: log and skip unreadable/empty audio instead of raising; see ``.skipped``.
        speed_factors: e.g. ``(0.9, 1.0, 1.1)``; copies other than 1.0 get ids ``sp0.9-<id>``.
        progress: show a tqdm progress bar.

    Returns:
        ``FeatureDict``: ``{utt_id: Tensor [frames, n_mels] float32}`` (``[samples]`` for a
        ``WaveformConfig``) plus ``.skipped``.

    Raises:
        DataError: naming the utterance, for a corrupt/empty/missing recording (without skip_bad).
    """
    cfg = fbank_cfg or FbankConfig()
    factors = [float(f) for f in speed_factors]
    if any(f <= 0 for f in factors) or len(set(factors)) != len(factors):
        raise ValueError(f"speed_factors must be distinct positive numbers, got {list(speed_factors)}")
    key = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        key = _cache_key(utts, cfg, factors)
        cached = _load_cache(cache_path, key)
        if cached is not None:
            return cached

    jobs = [(u, f, cfg) for f in factors for u in utts]
    feats: dict[str, torch.Tensor] = {}
    problems: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc="wave" if isinstance(cfg, WaveformConfig) else "fbank", unit="utt",
               disable=not progress, leave=False)
    for out_id, array, error in _run_jobs(jobs, num_workers):
        bar.update()
        if error is None:
            feats[out_id] = torch.from_numpy(array)
        elif not skip_bad:
            bar.close()
            raise DataError(error + " (allinone decode --skip-bad, or skip_bad=True in Python, "
                                    "logs and skips bad utterances)")
        else:
            logger.warning("skipping %s", error)
            problems[out_id] = error
    bar.close()
    if problems:
        logger.warning("skipped %d of %d utterances while extracting features", len(problems), len(jobs))

    result = FeatureDict(sorted(feats.items()), sorted(problems.items()))
    if cache_path is not None:
        atomic_torch_save({"key": key, "feats": dict(result), "skipped": [list(s) for s in result.skipped]},
                          cache_path)
    return result


def _run_jobs(jobs: list, num_workers: int) -> Iterator[tuple[str, object, str | None]]:
    """Run ``_features_of`` over ``jobs``, in a process pool when ``num_workers > 1``."""
    if num_workers <= 1 or len(jobs) <= 1:
        yield from map(_features_of, jobs)
        return
    # "spawn" gives clean workers: forking a process whose OpenMP pool is running can deadlock.
    ctx = mp.get_context("spawn")
    with _single_thread_env():
        pool = ctx.Pool(min(num_workers, len(jobs)), initializer=_init_worker)
    try:
        # Small chunks keep the progress bar moving; imap_unordered lets fast jobs overtake slow ones.
        yield from pool.imap_unordered(_features_of, jobs, chunksize=max(1, min(16, len(jobs) // (8 * num_workers))))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class ASRDataset(Dataset):
    """Utterances with precomputed features and tokenized transcripts.

    Args:
        feats: ``{utt_id: [frames, n_mels]}`` from ``extract_features``.
        utts: utterances (their ``text`` is tokenized once here). Utterances without features
            (e.g. skipped as bad) are left out with a warning that names them.
        tokenizer: any ``Tokenizer``.

    Item ``i`` is ``(utt_id, feats [frames, n_mels] (or waveform [samples]), tokens [num_tokens] long)``.
    """

    def __init__(self, feats: dict[str, torch.Tensor], utts: Sequence[Utterance], tokenizer: Tokenizer):
        missing = [u.utt_id for u in utts if u.utt_id not in feats]
        if missing:
            logger.warning("%d utterance(s) have no features and are left out: %s%s", len(missing),
                           ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
        self.utts = [u for u in utts if u.utt_id in feats]
        if not self.utts:
            raise DataError("ASRDataset: no utterance has features (do the ids of feats and utts match?)")
        self.feats = feats
        self.tokens = [torch.tensor(tokenizer.encode(u.text), dtype=torch.long) for u in self.utts]
        empty = [u.utt_id for u, t in zip(self.utts, self.tokens) if t.numel() == 0]
        if empty:
            raise DataError(f"utterance(s) with an empty token sequence: {', '.join(empty[:5])}")

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        utt_id = self.utts[i].utt_id
        return utt_id, self.feats[utt_id], self.tokens[i]

    @property
    def lengths(self) -> list[int]:
        """Frames (samples, for waveforms) per item, for ``BucketBatchSampler``."""
        return [self.feats[u.utt_id].shape[0] for u in self.utts]


def collate(items: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> dict:
    """Pad a list of dataset items into a batch.

    Returns:
        ``utt_ids: list[str]``, ``feats: [B, T, F]`` zero-padded (``[B, S]`` for waveforms),
        ``feat_lens: [B]`` long,
        ``tokens: [B, U]`` padded with -1 (ESPnet's ignore_id), ``token_lens: [B]`` long.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    utt_ids = [it[0] for it in items]
    feat_lens = torch.tensor([it[1].shape[0] for it in items], dtype=torch.long)
    token_lens = torch.tensor([it[2].numel() for it in items], dtype=torch.long)
    feats = items[0][1].new_zeros(len(items), int(feat_lens.max()), *items[0][1].shape[1:])
    tokens = torch.full((len(items), max(int(token_lens.max()), 1)), -1, dtype=torch.long)
    for b, (_, f, t) in enumerate(items):
        feats[b, : f.shape[0]] = f
        tokens[b, : t.numel()] = t
    return {"utt_ids": utt_ids, "feats": feats, "feat_lens": feat_lens, "tokens": tokens, "token_lens": token_lens}


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances under a padded-frame budget.

    Utterances are sorted by length and cut greedily into batches whose padded size
    ``max_len * batch_size`` stays <= ``max_frames`` (an utterance longer than ``max_frames`` gets
    a batch of its own, with a warning). The batches are fixed; their order is shuffled each
    epoch (``set_epoch``) from ``seed + epoch``, the same on every rank, except in the first
    ``sorted_epochs`` epochs (0-based epoch < sorted_epochs), which go shortest first (SortaGrad).

    With ``num_replicas > 1`` (DDP), the largest batches are split in two until the batch count
    divides evenly, then rank ``r`` takes every ``num_replicas``-th batch of the shuffled order:
    all ranks get the same number of batches, no two ranks share an utterance, and every
    utterance is used exactly once per epoch.
    """

    def __init__(self, lengths: Sequence[int], max_frames: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, sorted_epochs: int = 0):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if len(lengths) < num_replicas:
            raise ValueError(f"{len(lengths)} utterances cannot be shared by {num_replicas} replicas")
        self.lengths = list(lengths)
        self.max_frames = max_frames
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.sorted_epochs = sorted_epochs
        self.epoch = 0
        self.batches = self._split_for_replicas(self._make_batches())

    def _make_batches(self) -> list[list[int]]:
        # Sort by length, ties by index, so the batches depend only on the lengths.
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        too_long = 0
        for i in order:
            # Sorted ascending, so this utterance is the longest of the batch if added.
            if current and self.lengths[i] * (len(current) + 1) > self.max_frames:
                batches.append(current)
                current = []
            current.append(i)
            too_long += self.lengths[i] > self.max_frames
        if current:
            batches.append(current)
        if too_long:
            logger.warning("%d utterance(s) are longer than max_frames=%d and get a batch of their own",
                           too_long, self.max_frames)
        return batches

    def _split_for_replicas(self, batches: list[list[int]]) -> list[list[int]]:
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda k: (len(batches[k]), -k))
            batch = batches.pop(largest)
            if len(batch) < 2:  # every batch is a single utterance already
                raise ValueError(f"cannot share {len(batches) + 1} single-utterance batches equally among "
                                 f"{self.num_replicas} replicas; raise max_frames (now {self.max_frames})")
            half = len(batch) // 2
            batches[largest:largest] = [batch[:half], batch[half:]]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))  # shortest first: _make_batches sorts by length
        if self.shuffle and self.epoch >= self.sorted_epochs:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.batches), generator=g).tolist()
        for k in order[self.rank :: self.num_replicas]:
            yield list(self.batches[k])

    def __len__(self) -> int:
        return len(self.batches) // self.num_replicas
