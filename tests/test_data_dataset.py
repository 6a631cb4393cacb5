"""Feature extraction (workers, cache, bad audio, speed perturbation), dataset, sampler, collate."""

import logging
import multiprocessing as mp
import os
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

import allinone.data.dataset as dataset_mod
from allinone.data import (
    ASRDataset, BucketBatchSampler, CharTokenizer, DataError, FbankConfig, Utterance, collate, compute_fbank,
    extract_features, load_audio, read_data_dir, speed_perturb_utts,
)


@pytest.fixture(scope="module")
def utts(data_root):
    return read_data_dir(data_root / "speechocean762" / "dev")[:6]


def _bad_utts(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"not audio at all" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    return [Utterance("good", str(good), "A", "s"), Utterance("corrupt", str(corrupt), "B", "s"),
            Utterance("empty", str(empty), "C", "s")]


# --- extraction ----------------------------------------------------------------------------------

def test_workers_match_direct_computation(utts):
    feats = extract_features(utts, FbankConfig(), num_workers=2, progress=False)
    assert list(feats) == sorted(u.utt_id for u in utts) and feats.skipped == []
    for u in utts[:2]:
        assert torch.equal(feats[u.utt_id], compute_fbank(load_audio(u.path)))
        assert feats[u.utt_id].shape[1] == 80 and feats[u.utt_id].dtype == torch.float32


def test_worker_uses_one_thread(monkeypatch):
    for var in dataset_mod._THREAD_ENV_VARS:
        monkeypatch.setenv(var, "8")  # restored after the test
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: calls.append(n))
    dataset_mod._init_worker()
    assert calls == [1, 1]
    assert all(os.environ[var] == "1" for var in dataset_mod._THREAD_ENV_VARS)


def test_real_worker_process_has_one_thread():
    ctx = mp.get_context("spawn")
    with dataset_mod._single_thread_env():
        pool = ctx.Pool(1, initializer=dataset_mod._init_worker)
    try:
        assert pool.apply(torch.get_num_threads) == 1
    finally:
        pool.terminate()
        pool.join()


def test_cache_is_reused_and_invalidated(utts, tmp_path, monkeypatch):
    cache = tmp_path / "feats.pt"
    first = extract_features(utts[:3], num_workers=0, cache_path=cache, progress=False)
    assert cache.is_file()

    def boom(job):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(dataset_mod, "_features_of", boom)
    second = extract_features(utts[:3], num_workers=0, cache_path=cache, progress=False)
    assert list(second) == list(first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Another utterance list or config must not reuse the cache.
    with pytest.raises(AssertionError, match="recomputed"):
        extract_features(utts[:2], num_workers=0, cache_path=cache, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):
        extract_features(utts[:3], FbankConfig(n_mels=40), num_workers=0, cache_path=cache, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_audio_raises_naming_utterance(tmp_path, num_workers):
    with pytest.raises(DataError, match="utterance '(corrupt|empty)'"):
        extract_features(_bad_utts(tmp_path), num_workers=num_workers, progress=False)


def test_bad_audio_skipped_and_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="allinone"):
        feats = extract_features(_bad_utts(tmp_path), num_workers=0, skip_bad=True, progress=False)
    assert list(feats) == ["good"]
    assert [k for k, _ in feats.skipped] == ["corrupt", "empty"]
    assert "empty" in dict(feats.skipped)["empty"]
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert any("skipped 2 of 3" in r.getMessage() for r in caplog.records)


def test_speed_perturbation(utts):
    feats = extract_features(utts[:2], num_workers=0, speed_factors=(0.9, 1.0, 1.1), progress=False)
    uid = utts[0].utt_id
    assert set(feats) == {p + u.utt_id for p in ("sp0.9-", "", "sp1.1-") for u in utts[:2]}
    n = feats[uid].shape[0]
    assert abs(feats[f"sp0.9-{uid}"].shape[0] - n / 0.9) < 3 and abs(feats[f"sp1.1-{uid}"].shape[0] - n / 1.1) < 3
    sp = speed_perturb_utts(utts[:2], (0.9, 1.0, 1.1))
    assert {u.utt_id for u in sp} == set(feats) and sp[0].speaker.startswith("sp0.9-")
    tok = CharTokenizer.train(u.text for u in utts)
    assert len(ASRDataset(feats, sp, tok)) == 6


# --- dataset and collate -------------------------------------------------------------------------

def test_dataset_and_collate(utts, caplog):
    tok = CharTokenizer.train(u.text for u in utts)
    feats = {u.utt_id: torch.randn(10 + i, 80) for i, u in enumerate(utts[:4])}
    with caplog.at_level(logging.WARNING, logger="allinone"):
        ds = ASRDataset(feats, utts, tok)
    assert len(ds) == 4 and any("have no features" in r.getMessage() for r in caplog.records)
    utt_id, f, t = ds[1]
    assert utt_id == utts[1].utt_id and f.shape == (11, 80) and tok.decode(t.tolist()) == utts[1].text
    assert ds.lengths == [10, 11, 12, 13]
    batch = collate([ds[0], ds[3]])
    assert batch["utt_ids"] == [utts[0].utt_id, utts[3].utt_id]
    assert batch["feats"].shape == (2, 13, 80) and batch["feat_lens"].tolist() == [10, 13]
    assert batch["feat_lens"].dtype == torch.long and batch["token_lens"].dtype == torch.long
    assert (batch["feats"][0, 10:] == 0).all() and torch.equal(batch["feats"][1], feats[utts[3].utt_id])
    n0 = int(batch["token_lens"][0])
    assert (batch["tokens"][0, n0:] == -1).all() and batch["tokens"][0, :n0].tolist() == ds[0][2].tolist()
    assert batch["tokens"].shape[1] == int(batch["token_lens"].max())


# --- sampler -------------------------------------------------------------------------------------

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(50, 800, size=203)]


@pytest.mark.parametrize("max_frames", [800, 3000, 20000])
def test_sampler_budget_and_coverage(max_frames):
    s = BucketBatchSampler(LENGTHS, max_frames, seed=1)
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert max(LENGTHS[i] for i in b) * len(b) <= max_frames
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))  # each exactly once


def test_sampler_epochs_and_seed():
    s = BucketBatchSampler(LENGTHS, 3000, seed=1)
    e0 = list(s)
    assert list(s) == e0  # same epoch, same order
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(map(tuple, e1)) == sorted(map(tuple, e0))
    assert list(BucketBatchSampler(LENGTHS, 3000, seed=1)) == e0
    assert list(BucketBatchSampler(LENGTHS, 3000, seed=2)) != e0
    unshuffled = list(BucketBatchSampler(LENGTHS, 3000, shuffle=False))
    firsts = [max(LENGTHS[i] for i in b) for b in unshuffled]
    assert firsts == sorted(firsts)


def test_sortagrad_epochs_go_shortest_first_then_shuffle():
    s = BucketBatchSampler(LENGTHS, 3000, seed=1, sorted_epochs=2)
    unshuffled = list(BucketBatchSampler(LENGTHS, 3000, shuffle=False))
    for epoch in (0, 1):
        s.set_epoch(epoch)
        assert list(s) == unshuffled
    s.set_epoch(2)  # from then on, what a sampler without SortaGrad gives
    plain = BucketBatchSampler(LENGTHS, 3000, seed=1)
    plain.set_epoch(2)
    assert list(s) == list(plain) != unshuffled
    # under DDP each rank takes its share of the sorted order
    ranks = [BucketBatchSampler(LENGTHS, 3000, seed=1, num_replicas=2, rank=r, sorted_epochs=1) for r in (0, 1)]
    both = [b for pair in zip(*map(list, ranks)) for b in pair]
    longest = [max(LENGTHS[i] for i in b) for b in both]
    assert longest == sorted(longest)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_sampler_ddp_ranks(replicas):
    samplers = [BucketBatchSampler(LENGTHS, 3000, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    for epoch in (0, 1):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
        used = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(used) == list(range(len(LENGTHS))) and set(used.values()) == {1}  # disjoint, complete
        for batches in per_rank:
            assert all(max(LENGTHS[i] for i in b) * len(b) <= 3000 for b in batches)


def test_sampler_errors_and_long_utterance(caplog):
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([10, 20], 100, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="replicas"):
        BucketBatchSampler([10], 100, num_replicas=2)
    with pytest.raises(ValueError, match="raise max_frames"):
        BucketBatchSampler([10, 10, 10], 10, num_replicas=2)
    with caplog.at_level(logging.WARNING, logger="allinone"):
        s = BucketBatchSampler([10, 500, 20], 100, shuffle=False)
    assert list(s) == [[0, 2], [1]] and any("longer than max_frames" in r.getMessage() for r in caplog.records)
