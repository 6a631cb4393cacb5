"""The training loop, its config and the decode command, on a few real digit recordings."""

import json
import math

import pytest
import torch

from allinone.cli import main as cli
from allinone.train.config import load_config
from allinone.train.trainer import average_checkpoints, train, warmup_lr

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

    out = tmp_path / "decode"
    assert cli(["decode", str(final), "--data", str(digits / "test"), "--out", str(out), "--num-workers", "1"]) == 0
    wer = json.loads((out / "wer.json").read_text())
    hyps = dict(line.split(" ", 1) if " " in line else (line, "") for line in (out / "text").read_text().splitlines())
    from allinone.eval.wer import score
    from allinone.data.kaldi import read_data_dir

    refs = {u.utt_id: u.text for u in read_data_dir(digits / "test")}
    assert wer["errors"] == score(refs, {k: hyps.get(k, "") for k in refs}).errors


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
