"""Import of ESPnet2 experiments, checked against models built by ESPnet's own ASRTask.

Each test writes an experiment directory as ESPnet's training does: ``config.yaml``
(``yaml.safe_dump`` of the argument dict) and ``valid.acc.ave.pth``
(``torch.save(model.state_dict())``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import time

import numpy as np
import pytest
import torch
import yaml

from allinone.interop.espnet import ESPNET_CONFORMER_DEFAULTS, find_checkpoint, load_espnet_asr

asr_task = pytest.importorskip("espnet2.tasks.asr")

TOKENS = ["<blank>", "<unk>"] + [f"tok{i}" for i in range(17)] + ["<sos/eos>"]  # 20 tokens


def write_stats(path, dim=80, seed=0):
    rng = np.random.default_rng(seed)
    count = 500
    mean = rng.normal(size=dim) - 5
    var = rng.uniform(0.5, 4.0, size=dim)
    np.savez(path, count=np.array(count), sum=mean * count, sum_square=(var + mean**2) * count)
    return str(path)


def espnet_args(stats_file: str) -> dict:
    """A small conformer CTC + attention experiment, in config.yaml form."""
    return {
        # a few of the training keys a real config.yaml holds: the importer ignores them
        "output_dir": "exp/asr_tiny", "optim": "adam", "optim_conf": {"lr": 0.002}, "max_epoch": 70,
        "batch_type": "numel", "seed": 0,
        "token_list": list(TOKENS),
        "input_size": None,
        "init": None,
        "frontend": "default",
        "frontend_conf": {"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80},
        "specaug": "specaug",
        "specaug_conf": {"apply_time_warp": True, "time_mask_width_range": [0, 5], "num_time_mask": 2},
        "normalize": "global_mvn",
        "normalize_conf": {"stats_file": stats_file},
        "preencoder": None, "preencoder_conf": {},
        "encoder": "conformer",
        "encoder_conf": {
            "output_size": 32, "attention_heads": 4, "linear_units": 64, "num_blocks": 2,
            "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
            "input_layer": "conv2d", "normalize_before": True, "macaron_style": True,
            "rel_pos_type": "latest", "pos_enc_layer_type": "rel_pos",
            "selfattention_layer_type": "rel_selfattn", "activation_type": "swish",
            "use_cnn_module": True, "cnn_module_kernel": 7,
        },
        "postencoder": None, "postencoder_conf": {},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1, "dropout_rate": 0.1,
                         "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
                         "src_attention_dropout_rate": 0.1},
        "ctc_conf": {},
        "model": "espnet",
        "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False},
    }


def build_espnet(args: dict):
    torch.manual_seed(0)
    model = asr_task.ASRTask.build_model(argparse.Namespace(**copy.deepcopy(args)))
    # Non-trivial BatchNorm statistics, as after training.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_exp(exp_dir, args: dict, state_dict, name="valid.acc.ave.pth"):
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(args, f)
    torch.save(state_dict, exp_dir / name)
    return exp_dir


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("espnet_exp")
    args = espnet_args(write_stats(root / "feats_stats.npz"))
    model = build_espnet(args)
    write_exp(root / "exp", args, model.state_dict())
    return root, args, model


def test_import_espnet_command(experiment, tmp_path):
    """``allinone import-espnet`` writes a model dir that decodes like the imported model."""
    from allinone.cli import main
    from allinone.models.saved import load_model_dir

    root, _, _ = experiment
    assert main(["import-espnet", str(root / "exp"), "--out", str(tmp_path / "imported")]) == 0
    loaded = load_model_dir(tmp_path / "imported")
    ours, _ = load_espnet_asr(root / "exp")
    feats, lens = torch.randn(2, 60, 80), torch.tensor([60, 41])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(feats, lens)[0], ours.encode(feats, lens)[0])
    assert loaded.tokenizer.vocab_size == len(TOKENS)


def test_import_matches_espnet(experiment):
    root, args, ref = experiment
    ours, info = load_espnet_asr(root / "exp")

    assert not ours.training
    assert info["token_list"] == TOKENS
    assert info["fbank"] == {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80}
    assert info["ignored_keys"] == ["frontend.logmel.melmat"]
    assert info["checkpoint"].endswith("valid.acc.ave.pth")
    assert any("specaug" in n for n in info["notes"])
    cfg = info["config"]
    assert (cfg.vocab_size, cfg.ctc_weight, cfg.lsm_weight, cfg.encoder.num_blocks) == (20, 0.3, 0.1, 2)

    # ESPnet's encode() gets raw speech and runs its own frontend; ours gets that
    # frontend's log-mel features (allinone.data computes the same ones), so this
    # checks normalize + encoder + CTC head end to end on real front-end output.
    g = torch.Generator().manual_seed(0)
    speech = torch.randn(2, 8000, generator=g)
    speech_lens = torch.tensor([8000, 5600])
    with torch.no_grad():
        enc_ref, enc_lens_ref = ref.encode(speech, speech_lens)
        feats, feat_lens = ref.frontend(speech, speech_lens)
        enc, enc_lens = ours.encode(feats, feat_lens)
        assert torch.equal(enc_lens, enc_lens_ref)
        assert (enc - enc_ref).abs().max().item() <= 1e-5
        logp = ours.ctc_log_probs(enc)
        assert (logp - ref.ctc.log_softmax(enc_ref)).abs().max().item() <= 1e-5

        # Losses too (same features path), on padded token targets.
        tokens = torch.tensor([[3, 4, 5, 6], [7, 8, -1, -1]])
        token_lens = torch.tensor([4, 2])
        _, stats, _ = ref(speech, speech_lens, tokens.clone(), token_lens)
        out = ours(feats, feat_lens, tokens, token_lens)
    assert abs(out["loss_ctc"].item() - stats["loss_ctc"].item()) <= 1e-4
    assert abs(out["loss_att"].item() - stats["loss_att"].item()) <= 1e-4


def test_ctc_only_and_stats_from_file(experiment, tmp_path):
    root, args, _ = experiment
    args = copy.deepcopy(args)
    args["model_conf"]["ctc_weight"] = 1.0  # ESPnet then drops the decoder
    ref = build_espnet(args)
    assert ref.decoder is None
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("normalize.")}
    write_exp(tmp_path / "exp", args, state, name="3epoch.pth")
    ours, info = load_espnet_asr(tmp_path / "exp" / "config.yaml")
    assert ours.decoder is None
    assert any("stats read from" in n for n in info["notes"])
    # ESPnet keeps the stats in float64 until its first forward; ours are float32.
    assert torch.allclose(ours.normalize.std, ref.normalize.std.float())
    speech, speech_lens = torch.randn(1, 6400), torch.tensor([6400])
    with torch.no_grad():
        enc_ref, _ = ref.encode(speech, speech_lens)
        enc, _ = ours.encode(*ref.frontend(speech, speech_lens))
        assert (ours.ctc_log_probs(enc) - ref.ctc.log_softmax(enc_ref)).abs().max().item() <= 1e-5


def test_intermediate_ctc_experiment_keeps_its_loss(tmp_path, experiment):
    """An experiment trained with intermediate CTC imports with it: same total loss."""
    root, args, _ = experiment
    args = copy.deepcopy(args)
    args["encoder_conf"]["interctc_layer_idx"] = [1]
    args["model_conf"]["interctc_weight"] = 0.3
    ref = build_espnet(args)
    write_exp(tmp_path / "exp", args, ref.state_dict())
    ours, info = load_espnet_asr(tmp_path / "exp")
    assert info["config"].interctc_weight == 0.3 and info["config"].encoder.interctc_layer_idx == [1]
    speech, speech_lens = torch.randn(2, 8000), torch.tensor([8000, 5600])
    tokens, token_lens = torch.tensor([[3, 4, 5, 6], [7, 8, -1, -1]]), torch.tensor([4, 2])
    with torch.no_grad():
        loss_ref, stats, _ = ref(speech, speech_lens, tokens.clone(), token_lens)
        out = ours(*ref.frontend(speech, speech_lens), tokens, token_lens)
    assert abs(out["loss"].item() - loss_ref.item()) <= 1e-4
    assert abs(out["loss_interctc"].item() - stats["loss_interctc_layer1"].item()) <= 1e-4
    # ESPnet takes the weight without taps and computes nothing: imported, with a note.
    args["encoder_conf"].pop("interctc_layer_idx")
    write_exp(tmp_path / "exp2", args, build_espnet(args).state_dict())
    ours, info = load_espnet_asr(tmp_path / "exp2")
    assert info["config"].interctc_weight == 0.0
    assert any("interctc_weight=0.3 ignored: no encoder_conf.interctc_layer_idx" in n for n in info["notes"])


def test_self_conditioned_ctc_experiment_imports_to_the_same_function(tmp_path, experiment):
    """An ESPnet experiment with self-conditioned CTC (``interctc_use_conditioning``): the
    conditioning layer loads and the encoder output and loss equal ESPnet's."""
    root, args, _ = experiment
    args = copy.deepcopy(args)
    args["encoder_conf"].update(interctc_layer_idx=[1], interctc_use_conditioning=True)
    args["model_conf"]["interctc_weight"] = 0.3
    ref = build_espnet(args).eval()
    write_exp(tmp_path / "exp", args, ref.state_dict())
    ours, info = load_espnet_asr(tmp_path / "exp")
    assert info["config"].encoder.interctc_use_conditioning and ours.encoder.conditioning_layer is not None
    ours.eval()
    speech, speech_lens = torch.randn(2, 8000), torch.tensor([8000, 5600])
    tokens, token_lens = torch.tensor([[3, 4, 5, 6], [7, 8, -1, -1]]), torch.tensor([4, 2])
    with torch.no_grad():
        (enc_ref, _), lens_ref = ref.encode(speech, speech_lens)
        feats, feat_lens = ref.frontend(speech, speech_lens)
        enc, lens = ours.encode(feats, feat_lens)
        loss_ref = ref(speech, speech_lens, tokens.clone(), token_lens)[0]
        out = ours(feats, feat_lens, tokens, token_lens)
    assert torch.equal(lens, lens_ref) and (enc - enc_ref).abs().max().item() <= 1e-4
    assert abs(out["loss"].item() - loss_ref.item()) <= 1e-4


def test_espnet_defaults_table_matches_installed_espnet():
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    params = inspect.signature(ConformerEncoder.__init__).parameters
    for name, value in ESPNET_CONFORMER_DEFAULTS.items():
        assert params[name].default == value, name


def test_mismatched_checkpoint(experiment, tmp_path):
    root, args, _ = experiment
    other = copy.deepcopy(args)
    other["encoder_conf"]["linear_units"] = 48
    write_exp(tmp_path / "exp", args, build_espnet(other).state_dict())
    with pytest.raises(ValueError, match=r"does not fit.*shape mismatch: encoder\.encoders\.0\.feed_forward\.w_1"):
        load_espnet_asr(tmp_path / "exp")


def test_missing_keys_named(experiment, tmp_path):
    root, args, ref = experiment
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("decoder.")}
    write_exp(tmp_path / "exp", args, state)
    with pytest.raises(ValueError, match=r"missing: decoder\.embed\.0\.weight"):
        load_espnet_asr(tmp_path / "exp")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"encoder": "e_branchformer"}, "'e_branchformer' is not supported; only 'conformer'"),
        ({"preencoder": "sinc"}, "preencoder"),
        ({"normalize": "utterance_mvn"}, "utterance_mvn"),
        ({"decoder": "rnn"}, "decoder: 'rnn'"),
        ({"frontend": "s3prl"}, "frontend"),
        ({"encoder_conf": {"rel_pos_type": "legacy"}}, "rel_pos_type"),  # ESPnet's own default
        ({"encoder_conf": {"concat_after": True}}, "concat_after"),
    ],
)
def test_unsupported_settings(experiment, tmp_path, change, match):
    root, args, ref = experiment
    args = copy.deepcopy(args)
    for key, value in change.items():
        if isinstance(value, dict):
            args[key].update(value)
        else:
            args[key] = value
    write_exp(tmp_path / "exp", args, ref.state_dict())
    with pytest.raises(ValueError, match=match):
        load_espnet_asr(tmp_path / "exp")


def test_missing_files(tmp_path, experiment):
    root, args, _ = experiment
    with pytest.raises(ValueError, match="config not found"):
        load_espnet_asr(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(args))
    with pytest.raises(ValueError, match="no checkpoint"):
        load_espnet_asr(tmp_path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_espnet_asr(tmp_path, checkpoint="10epoch.pth")


def test_find_checkpoint_order(tmp_path):
    for name in ("checkpoint.pth", "1epoch.pth", "2epoch.pth"):
        (tmp_path / name).write_bytes(b"")
    now = time.time()
    os.utime(tmp_path / "1epoch.pth", (now, now))
    os.utime(tmp_path / "2epoch.pth", (now - 10, now - 10))
    os.utime(tmp_path / "checkpoint.pth", (now + 10, now + 10))
    assert find_checkpoint(tmp_path).name == "1epoch.pth"  # newest, resume file last
    (tmp_path / "valid.acc.best.pth").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "valid.acc.best.pth"
    (tmp_path / "valid.acc.ave.pth").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "valid.acc.ave.pth"
    assert find_checkpoint(tmp_path, "2epoch.pth").name == "2epoch.pth"


def test_training_checkpoint_model_entry(experiment, tmp_path):
    root, args, ref = experiment
    write_exp(tmp_path / "exp", args, {"model": ref.state_dict(), "epoch": torch.tensor(3)}, name="checkpoint.pth")
    ours, info = load_espnet_asr(tmp_path / "exp")
    assert any("training checkpoint" in n for n in info["notes"])
