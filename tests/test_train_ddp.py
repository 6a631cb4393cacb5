"""The trainer under torchrun with 2 CPU processes (gloo): DDP end to end, and resuming the
checkpoint of a 2-process run in 1 process (a different device count)."""

import json
import os
import subprocess
import sys

import yaml

from tests.test_train import TINY_MODEL, digits  # noqa: F401  (the shared digits fixture)


def run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_then_resume_in_one(digits, tmp_path):
    exp = tmp_path / "exp"
    config = {
        "exp_dir": str(exp),
        "data": {"train": str(digits / "train"), "valid": str(digits / "test"), "num_workers": 1,
                 "feat_cache_dir": str(digits / "feats")},
        "tokenizer": {"kind": "char"},
        "model": TINY_MODEL,
        "specaug": {"enabled": False},
        "optim": {"lr": 2e-3, "warmup_steps": 3},
        "train": {"device": "cpu", "max_frames": 3000, "max_epochs": 2, "log_every": 1, "keep_best": 1},
    }
    cfg_path = tmp_path / "conf.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "allinone.cli", "train", str(cfg_path)])
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    log = (exp / "train.log").read_text()
    steps_2proc = history[-1]["step"]  # optimizer steps of 2 epochs on 2 ranks
    assert (exp / "final" / "model.safetensors").is_file()

    # Resume the 2-process checkpoint with a single process for one more epoch.
    run([sys.executable, "-m", "allinone.cli", "train", str(cfg_path), "train.max_epochs=3", "--resume"])
    history = json.loads((exp / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    steps_1proc_epoch = history[-1]["step"] - steps_2proc
    # Each rank took half of the batches, so one process needs twice the steps per epoch.
    assert steps_1proc_epoch >= 2 * (steps_2proc // 2) - 1, (steps_2proc, steps_1proc_epoch)
    assert "resumed from" in (exp / "train.log").read_text()
    assert "epoch 1 done" in log
