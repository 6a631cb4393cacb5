"""Bad input gets a one-line ValueError that names the problem, before any work starts.

Cases found by an audit of the CLI (each raised a traceback from deep inside yaml or torch,
or was silently accepted): YAML syntax errors in configs, grids, spaces and ESPnet configs;
an override without a value; weights of another shape than config.json says; a truncated
ESPnet checkpoint; impossible decoding / search options; an output path that is a file.
"""
import json

import pytest
import torch

from allinone.cli import main
from allinone.elastic.space import SearchSpace, load_grid, load_space
from allinone.eval.decode import DecodeOptions, check_device
from allinone.models.saved import load_model_dir
from allinone.train.config import load_config
from bench_helpers import SMALL_SPACE, make_digits, make_supernet_dir

BROKEN_YAML = "depth: [4, 2\nbits: 8\n"  # an unclosed list


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN_YAML)
    space = SearchSpace(**SMALL_SPACE)
    for call, what in ((lambda: load_config(bad), "config file"), (lambda: load_grid(bad, space), "grid file"),
                       (lambda: load_space(bad), "search space file")):
        with pytest.raises(ValueError, match=rf"{what} .*bad.yaml is not valid YAML \(line 2, column 5\)"):
            call()
    from allinone.interop.espnet import load_espnet_asr

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.yaml").write_text(BROKEN_YAML)
    with pytest.raises(ValueError, match="ESPnet config .*config.yaml is not valid YAML"):
        load_espnet_asr(tmp_path / "exp")


def test_override_without_value():
    with pytest.raises(ValueError, match="train.max_steps lack a value: write key=value"):
        load_config(None, ["train.max_steps"])


def test_config_type_errors_and_broken_override_values_are_one_line():
    for overrides, message in ((["train.max_epochs=abc"], "train.max_epochs: Value 'abc' of type 'str' could not "
                                "be converted to Integer"),
                               (["train.nope=1"], "train.nope: Key 'nope' not in 'TrainSection'"),
                               (["train.max_epochs=3", "optim.lr=[1"], r"override optim.lr=\[1: the value is not "
                                "valid YAML")):
        with pytest.raises(ValueError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)
    assert load_config(None, ["optim.lr=1e-3", "optim.lr=2e-3"]).optim.lr == 2e-3  # the last one wins


def test_truncated_espnet_checkpoint(tmp_path):
    from allinone.interop.espnet import _load_state_dict

    path = tmp_path / "valid.acc.ave.pth"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        _load_state_dict(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"beam": 0}, "beam must be >= 1"),
    ({"ctc_weight": 1.5}, r"ctc_weight must lie in \[0, 1\]"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"device": "gpu9"}, "unknown device 'gpu9'"),
])
def test_decode_options_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu():
    with pytest.raises(ValueError, match="torch sees no GPU"):
        check_device("cuda:0")


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    return make_supernet_dir(tmp_path_factory.mktemp("bad_input") / "sup")


def test_weights_of_another_shape(supernet, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(supernet, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["encoder"]["output_size"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not fit its config.json: \d+ tensor\(s\) of another shape"):
        load_model_dir(other)


def test_bad_cli_options_rejected_before_any_work(supernet, data_root, tmp_path, capsys):
    data = make_digits(data_root, tmp_path / "data", num_utts=2)
    out = tmp_path / "out"
    cases = [
        (["bench", str(supernet), "--grid", "L4_F48_H4_B8", "--data", str(data), "--out", str(out),
          "--threads", "0"], "--threads must be >= 1"),
        (["bench", str(supernet), "--grid", "L4_F48_H4_B8", "--data", str(data), "--out", str(out),
          "--beam", "0"], "beam must be >= 1"),
        (["search", str(supernet), "--data", str(data), "--max-bits", "8", "--strategy", "evolution",
          "--population", "0"], "--population must be >= 1"),
        (["search", str(supernet), "--data", str(data), "--max-bits", "8", "--device", "gpu9"],
         "unknown device 'gpu9'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["decode", str(supernet), "--data", str(data), "--out", str(a_file)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_training_and_stage1_options(tmp_path):
    from allinone.elastic.mixed_stage1 import run_stage1
    from allinone.eval.compare import MethodRun, compare_runs
    from allinone.train.trainer import pick_device

    with pytest.raises(ValueError, match="train.device='gpu9': expected auto, cuda or cpu"):
        pick_device("gpu9")
    with pytest.raises(ValueError, match="--num-batches and --samples must be >= 1"):
        run_stage1(None, "kl", tmp_path / "s1", num_batches=0)
    run = MethodRun("uniform", "b4", tmp_path / "run")
    for kwargs, message in (({"alpha": 0.0}, r"alpha must be in \(0, 1\)"), ({"beam": 0}, "beam must be >= 1")):
        with pytest.raises(ValueError, match=message):
            compare_runs(tmp_path / "ref", [run], [tmp_path / "data"], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_training_without_data_writes_nothing(tmp_path):
    from allinone.train.trainer import train

    cfg = load_config(None, [f"exp_dir={tmp_path / 'exp'}", f"data.train={tmp_path / 'nope'}",
                             f"data.valid={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match=r"data.train=.*nope: not a data directory \(no wav.scp or text\)"):
        train(cfg)
    assert not (tmp_path / "exp").exists()


def test_empty_data_directory(tmp_path):
    from allinone.data.kaldi import DataError, read_data_dir

    (tmp_path / "wav.scp").write_text("")
    (tmp_path / "text").write_text("")
    with pytest.raises(DataError, match="lists no utterances"):
        read_data_dir(tmp_path)


def test_model_config_errors_before_any_data(tmp_path, data_root):
    from allinone.train.trainer import train

    data = make_digits(data_root, tmp_path / "data", num_utts=2)
    cfg = load_config(None, [f"exp_dir={tmp_path / 'exp'}", f"data.train={data}", f"data.valid={data}",
                             "model.encoder.output_size=96", "model.encoder.attention_heads=5"])
    with pytest.raises(ValueError, match="output_size=96 must be divisible by attention_heads=5"):
        train(cfg)
    assert not (tmp_path / "exp").exists()
