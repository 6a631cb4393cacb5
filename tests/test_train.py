"""The training loop, its config and the decode command, on a few real digit recordings."""

import json
import math

import pytest
import torch

from allinone.cli import main as cli
from allinone.train.config import load_config
from allinone.train.trainer import average_checkpoints, best_epochs, train, warmup_lr

TINY_MODEL = {"encoder": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 2,
                          "cnn_module_kernel": 7}, "ctc_weight": 1.0}


@pytest.fixture(scope="module")
def digits(data_root, tmp_path_factory):
    """24 train / 8 test connected-digit strings from the shipped FSDD recordings."""
    from allinone.data.corpora import fsdd_connected_digits

    out = tmp_path_factory.mktemp("digits")
    fsdd_connected_digits(data_root / "fsdd", out / "train", split="train", num_utts=24, min_digits=1,
                          max_digits=2, seed=0)
    fsdd_connected_digits(data_root / "fsdd", out / "test", split="test", num_utts=8, min_digits=1,
                          max_digits=2, seed=1)
    return out


def tiny_config(digits, exp_dir, **train):
    overrides = [f"exp_dir={exp_dir}", f"data.train={digits}/train", f"data.valid={digits}/test",
                 f"data.feat_cache_dir={digits}/feats", "data.num_workers=1", "tokenizer.kind=char",
                 "train.device=cpu", "train.max_frames=4000", "train.log_every=1", "optim.warmup_steps=5",
                 "optim.lr=2e-3", "train.keep_best=2", "specaug.enabled=false"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(None, overrides)
    cfg.model = TINY_MODEL
    return cfg


def test_warmup_lr_equals_espnet():
    from espnet2.schedulers.warmup_lr import WarmupLR

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupLR(opt, warmup_steps=25)
    for step in range(1, 80):
        assert math.isclose(opt.param_groups[0]["lr"], warmup_lr(step, 25), rel_tol=1e-9)
        opt.step()
        sched.step()


def test_average_checkpoints(tmp_path):
    states = [{"w": torch.randn(3, 4), "n": torch.tensor(i)} for i in range(3)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"e{i}.pt")
        torch.save({"model": s}, paths[-1])
    avg = average_checkpoints(paths)
    torch.testing.assert_close(avg["w"], sum(s["w"] for s in states) / 3)
    assert int(avg["n"]) == 2  # integer buffers (counters) are taken from the last


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="no_such_key"):
        load_config(None, ["train.no_such_key=1"])
    with pytest.raises(ValueError, match="max_epochs"):
        load_config(None, ["train.max_epochs=many"])


def test_train_lowers_loss_resumes_and_decodes(digits, tmp_path):
    exp = tmp_path / "exp"
    cfg = tiny_config(digits, exp, max_epochs=2)
    final = train(cfg)
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["valid_loss"] < history[0]["valid_loss"]
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()

    # A second run in the same directory must not overwrite it by accident ...
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(digits, exp, max_epochs=3))
    # ... and --resume continues from the checkpoint: epochs 1-2 are not trained again.
    train(tiny_config(digits, exp, max_epochs=3), resume=True)
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[2]["step"] > history[1]["step"]
    # the new final/ averages the best epochs of the whole run, the first run's included
    averaged = json.loads((final / "config.json").read_text())["averaged_epochs"]
    assert sorted(averaged) == sorted(h["epoch"] for h in best_epochs(history, 2))

    out = tmp_path / "decode"
    assert cli(["decode", str(final), "--data", str(digits / "test"), "--out", str(out), "--num-workers", "1"]) == 0
    wer = json.loads((out / "wer.json").read_text())
    hyps = dict(line.split(" ", 1) if " " in line else (line, "") for line in (out / "text").read_text().splitlines())
    from allinone.eval.wer import score
    from allinone.data.kaldi import read_data_dir

    refs = {u.utt_id: u.text for u in read_data_dir(digits / "test")}
    assert wer["errors"] == score(refs, {k: hyps.get(k, "") for k in refs}).errors


def test_validation_error_rates_equal_the_decode_command(digits, tmp_path):
    """The per-epoch greedy WER / CER of the validation set are what ``allinone decode`` scores.

    One update (the model still emits many wrong characters, so the rates are far from 0 and
    100), ``keep_best=1``: the final model is that epoch's weights, decoded by the separate
    decode path (its own feature extraction, batching and scoring).
    """
    exp = tmp_path / "exp"
    final = train(tiny_config(digits, exp, max_epochs=1, max_steps=1, keep_best=1))
    (entry,) = json.loads((exp / "history.json").read_text())
    out = tmp_path / "decode"
    assert cli(["decode", str(final), "--data", str(digits / "test"), "--out", str(out), "--num-workers", "1"]) == 0
    wer = json.loads((out / "wer.json").read_text())
    assert 0 < wer["cer"] and 0 < wer["wer"]
    assert entry["valid_wer"] == pytest.approx(wer["wer"], abs=1e-3)
    assert entry["valid_cer"] == pytest.approx(wer["cer"], abs=1e-3)


def test_best_epochs_ranks_by_the_chosen_measure():
    history = [{"epoch": 1, "valid_loss": 3.0, "valid_wer": 90.0},
               {"epoch": 2, "valid_loss": 2.0, "valid_wer": 80.0},
               {"epoch": 3, "valid_loss": 2.5, "valid_wer": 70.0},
               {"epoch": 4, "valid_loss": 2.6, "valid_wer": 70.0}]
    assert [h["epoch"] for h in best_epochs(history, 2)] == [2, 3]
    assert [h["epoch"] for h in best_epochs(history, 2, "valid_wer")] == [3, 4]  # tie: the lower loss first
    assert [h["epoch"] for h in best_epochs(history, 1, "valid_wer")] == [3]
    history[3]["valid_loss"] = 2.4
    assert [h["epoch"] for h in best_epochs(history, 2, "valid_wer")] == [4, 3]
    history[3]["valid_loss"] = 2.5
    assert [h["epoch"] for h in best_epochs(history, 2, "valid_wer")] == [3, 4]  # then: the earlier epoch
    history[2]["valid_wer"] = math.nan  # undefined (references without words): ranked last
    assert [h["epoch"] for h in best_epochs(history, 4, "valid_wer")] == [4, 2, 1, 3]
    with pytest.raises(ValueError, match="valid_cer.*select_by"):
        best_epochs(history, 1, "valid_cer")


def test_best_epochs_of_a_model_that_recognises_nothing_yet_follow_the_loss():
    # A run whose every epoch decodes to nothing (100% WER, as a from-scratch wav2vec2 after
    # 3.5 GPU minutes): the average must take the epochs that learned most, not the first ones.
    losses = [103.0, 88.0, 87.0, 85.0, 86.0, 84.0]
    history = [{"epoch": i + 1, "valid_loss": v, "valid_wer": 100.0, "valid_cer": 100.0} for i, v in enumerate(losses)]
    assert [h["epoch"] for h in best_epochs(history, 3, "valid_wer")] == [6, 4, 5]
    assert [h["epoch"] for h in best_epochs(history, 3, "valid_cer")] == [6, 4, 5]


def test_select_by_picks_the_averaged_epochs(digits, tmp_path):
    exp = tmp_path / "exp"
    final = train(tiny_config(digits, exp, max_epochs=3, keep_best=1, select_by="cer"))
    history = json.loads((exp / "history.json").read_text())
    best = min(history, key=lambda h: (h["valid_cer"], h["epoch"]))["epoch"]
    saved = json.loads((final / "config.json").read_text())
    assert saved["averaged_epochs"] == [best] and saved["selected_by"] == "valid_cer"
    # Only the selected epoch's checkpoint is kept.
    assert sorted(p.name for p in exp.glob("epoch*.pt")) == [f"epoch{best}.pt"]


def test_select_by_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="select_by='accuracy'"):
        train(tiny_config(digits, tmp_path / "a", select_by="accuracy"))
    cfg = tiny_config(digits, tmp_path / "b", select_by="wer", max_steps=1)
    cfg.model = {**TINY_MODEL, "ctc_weight": 0.0, "decoder": {"num_blocks": 1, "linear_units": 32,
                                                                "attention_heads": 2}}
    with pytest.raises(ValueError, match="CTC head"):
        train(cfg)


def test_sortagrad_reaches_the_sampler(digits, tmp_path, monkeypatch):
    """train.sortagrad_epochs: the training batches of the first epochs come shortest first."""
    import allinone.data.dataset as dataset

    with pytest.raises(ValueError, match="sortagrad_epochs=-1 must be >= 0"):
        train(tiny_config(digits, tmp_path / "bad", sortagrad_epochs=-1))
    seen = []
    real_iter = dataset.BucketBatchSampler.__iter__

    def recording_iter(self):
        for batch in real_iter(self):
            if self.shuffle:  # the training loader's
                seen.append((self.epoch, max(self.lengths[i] for i in batch)))
            yield batch

    monkeypatch.setattr(dataset.BucketBatchSampler, "__iter__", recording_iter)
    train(tiny_config(digits, tmp_path / "exp", sortagrad_epochs=1, max_epochs=2, max_frames=500))
    first = [n for e, n in seen if e == 0]
    second = [n for e, n in seen if e == 1]
    assert len(first) > 2 and first == sorted(first), seen
    assert second != sorted(second)  # shuffled again


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["decode", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model directory not found" in err and "Traceback" not in err
    assert cli(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_compiled_training_matches_eager(digits, tmp_path):
    """train.compile: the compiled forward trains the same model as eager (aot_eager: capture
    and autograd through the compiled graph, no code generation, so it runs in seconds)."""
    losses = {}
    for backend in ("null", "aot_eager"):
        exp = tmp_path / backend
        train(tiny_config(digits, exp, max_epochs=1, max_steps=3, compile=backend))
        losses[backend] = json.loads((exp / "history.json").read_text())[0]["valid_loss"]
    assert losses["aot_eager"] == pytest.approx(losses["null"], rel=1e-4)
    assert "compiled with torch.compile(backend='aot_eager')" in (tmp_path / "aot_eager" / "train.log").read_text()
    assert "torch.compile(" not in (tmp_path / "null" / "train.log").read_text()
    with pytest.raises(ValueError, match="train.compile='nvcc' is not a torch.compile backend"):
        train(tiny_config(digits, tmp_path / "bad", max_epochs=1, max_steps=1, compile="nvcc"))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def _specaug_items(n):
    # Identical utterances: any difference between augmented batches comes from the masks.
    feats = torch.randn(50, 80, generator=torch.Generator().manual_seed(0))
    return [("u", feats.clone(), torch.tensor([1, 2])) for _ in range(n)]


def test_augmenting_collate_in_workers_differs_per_worker_and_reproduces():
    """SpecAugment at collation in worker processes: each worker draws its own masks (not
    copies of one generator), and the same main-process seed gives the same batches."""
    from allinone.data.specaug import SpecAugment
    from allinone.train.trainer import AugmentingCollate

    def batches(workers):
        torch.manual_seed(123)
        aug = SpecAugment(num_time_masks=2, time_mask_width=10, time_warp_window=0, seed=0)
        loader = torch.utils.data.DataLoader(_specaug_items(4), batch_size=1, num_workers=workers,
                                             collate_fn=AugmentingCollate(aug))
        return [b["feats"] for b in loader]

    in_workers = batches(2)
    # Batches 0 and 1 come from workers 0 and 1: their first draws must differ.
    assert not torch.equal(in_workers[0], in_workers[1])
    assert all(torch.equal(a, b) for a, b in zip(in_workers, batches(2)))
    # In the main process the module's own seeded generator is used, as before.
    main = batches(0)
    assert not torch.equal(main[0], main[1]) and all(torch.equal(a, b) for a, b in zip(main, batches(0)))
    plain = AugmentingCollate(None)(_specaug_items(2))
    assert torch.equal(plain["feats"][0], _specaug_items(1)[0][1])


def test_non_finite_gradient_skips_the_update_without_a_host_sync(digits, tmp_path, monkeypatch):
    """A step whose gradient norm is not finite leaves the weights and the optimizer state
    as they were (fused AdamW's found_inf), and the log counts it."""
    from allinone.train import strategies

    calls = {"n": 0}
    plain_step = strategies.PlainStrategy.step

    def nan_on_second_step(self, ddp_model, model, batch, **kw):
        calls["n"] += 1
        logs = plain_step(self, ddp_model, model, batch, **kw)
        if calls["n"] == 2:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        return logs

    monkeypatch.setattr(strategies.PlainStrategy, "step", nan_on_second_step)
    exp = tmp_path / "exp"
    train(tiny_config(digits, exp, max_epochs=1, max_steps=3, save_every_steps=1, max_frames=600))
    ckpt = torch.load(exp / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["skipped_steps"] == 1 and ckpt["state"]["step"] == 3
    # Two of the three updates happened: AdamW's step counter says so.
    assert all(int(s["step"]) == 2 for s in ckpt["optim"]["state"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "1 update(s) before step 2 skipped: non-finite gradient norm" in (exp / "train.log").read_text()


def test_training_with_loader_workers_and_specaug(digits, tmp_path):
    exp = tmp_path / "exp"
    cfg = tiny_config(digits, exp, max_epochs=2, loader_workers=2)
    cfg.specaug.enabled = True
    train(cfg)
    history = json.loads((exp / "history.json").read_text())
    assert history[1]["valid_loss"] < history[0]["valid_loss"]


def test_resuming_a_run_without_error_rates_by_wer_is_refused_before_training(digits, tmp_path):
    exp = tmp_path / "exp"
    train(tiny_config(digits, exp, max_epochs=1))
    ckpt = torch.load(exp / "checkpoint.pt", weights_only=False)
    for h in ckpt["state"]["history"]:  # as written before the error rates were recorded
        h.pop("valid_wer"), h.pop("valid_cer")
    torch.save(ckpt, exp / "checkpoint.pt")
    with pytest.raises(ValueError, match="no 'valid_wer'.*select_by"):
        train(tiny_config(digits, exp, max_epochs=2, select_by="wer"), resume=True)
    assert not (exp / "epoch2.pt").exists()  # refused before another epoch was trained
    train(tiny_config(digits, exp, max_epochs=2, select_by="loss"), resume=True)  # by loss it goes on
    assert [h["epoch"] for h in json.loads((exp / "history.json").read_text())] == [1, 2]


def test_intermediate_ctc_trains_and_logs_its_loss(digits, tmp_path):
    """model.interctc_weight with encoder.interctc_layer_idx: the logged loss is ESPnet's mix of
    the last block's CTC and the tapped block's (numerics: tests/test_models_conformer.py)."""
    exp = tmp_path / "exp"
    cfg = tiny_config(digits, exp, max_epochs=1, max_steps=2)
    cfg.model = {**TINY_MODEL, "interctc_weight": 0.4,
                 "encoder": {**TINY_MODEL["encoder"], "interctc_layer_idx": [1]}}
    train(cfg)
    rows = [dict(kv.split("=") for kv in line.split() if "=" in kv and kv.startswith("loss"))
            for line in (exp / "train.log").read_text().splitlines() if " step " in line and "loss=" in line]
    assert rows
    for r in rows:
        want = 0.6 * float(r["loss_ctc"]) + 0.4 * float(r["loss_interctc"])
        assert float(r["loss"]) == pytest.approx(want, rel=2e-3, abs=2e-3)
    assert json.loads((exp / "final" / "config.json").read_text())["model"]["encoder"]["interctc_layer_idx"] == [1]


def test_pruning_ranks_only_the_checkpoints_still_on_disk(tmp_path):
    """A run pruned by another order before (an older tie-break, another keep_best) and then
    resumed: the ranking must not pick epochs whose checkpoint is gone, nor delete the rest."""
    from allinone.train.trainer import prune_epoch_checkpoints, saved_epochs

    history = [{"epoch": e, "valid_loss": loss, "valid_wer": 100.0} for e, loss in ((1, 90.0), (2, 85.0), (3, 80.0))]
    (tmp_path / "epoch1.pt").write_bytes(b"x")  # the old rule (ties: the earlier epoch) kept epoch 1 only
    assert [h["epoch"] for h in best_epochs(saved_epochs(tmp_path, history), 1, "valid_wer")] == [1]
    history.append({"epoch": 4, "valid_loss": 82.0, "valid_wer": 100.0})
    (tmp_path / "epoch4.pt").write_bytes(b"x")
    prune_epoch_checkpoints(tmp_path, history, 1, "valid_wer")
    assert sorted(p.name for p in tmp_path.glob("epoch*.pt")) == ["epoch4.pt"]  # (epoch 3, lower still, is gone)


def test_speed_perturbed_features_have_their_own_cache(digits, tmp_path):
    """Runs with and without speed perturbation side by side keep separate feature caches, so
    neither overwrites the other's (and each run's resume finds its own)."""
    from allinone.train.trainer import prepare_data

    cache = tmp_path / "feats"
    plain = tiny_config(digits, tmp_path / "plain")
    perturbed = tiny_config(digits, tmp_path / "sp")
    for cfg in (plain, perturbed):
        cfg.data.feat_cache_dir = str(cache)
    perturbed.data.speed_perturb = [0.9, 1.0, 1.1]
    _, plain_set, _, _ = prepare_data(plain, tmp_path / "plain")
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    _, sp_set, _, _ = prepare_data(perturbed, tmp_path / "sp")
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(files) == len(first) + 1 and all(files[n] == t for n, t in first.items())
    assert [n for n in files if n not in first][0].endswith("_sp0.9-1-1.1.pt")
    assert len(sp_set) == 3 * len(plain_set)
