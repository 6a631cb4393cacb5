"""egs/librispeech_100/asr1/run.sh on the shipped LibriSpeech samples laid out as a miniature
corpus (train-clean-100, dev-clean, test-clean), its input checks and --init_from (CTC fine-tuning of a wav2vec2/HuBERT checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from allinone.data.kaldi import read_data_dir

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "egs" / "librispeech_100" / "asr1" / "run.sh"


@pytest.fixture
def mini_librispeech(data_root, tmp_path) -> Path:
    src = data_root / "librispeech_samples" / "LibriSpeech" / "dev-clean"
    root = tmp_path / "LibriSpeech"
    for subset, speakers in (("train-clean-100", ["1988", "2412"]), ("dev-clean", ["3752"]),
                             ("test-clean", ["3752"])):
        for spk in speakers:
            shutil.copytree(src / spk, root / subset / spk)
    return root


def run(args, tmp, timeout=300):
    dirs = ["--datadir", str(tmp / "data"), "--expdir", str(tmp / "exp"), "--dumpdir", str(tmp / "dump")]
    cmd = ["bash", str(RUN), "--config", "conf/train_tiny.yaml", "--beam", "1", "--nj", "1", "--device", "cpu",
           "--min_free_gb", "0", "--python", sys.executable, *dirs, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_end_to_end_present_subsets(mini_librispeech, tmp_path):
    r = run(["--librispeech", mini_librispeech, "--allow_missing_subsets", "true", "--speed_perturb", "1.0"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = tmp_path / "data"
    assert len(read_data_dir(data / "train_clean_100")) == 7
    assert [u.utt_id for u in read_data_dir(data / "dev")] == [u.utt_id for u in read_data_dir(data / "dev_clean")]
    assert not (data / "dev_other").exists()
    dec = tmp_path / "exp" / "asr_train_tiny" / "decode_beam1"
    assert sorted(p.name for p in dec.iterdir() if p.name != "log") == ["dev_clean", "test_clean"]
    assert json.loads((dec / "test_clean" / "wer.json").read_text())["sentences"] == 3
    assert "|test_clean|3|" in (tmp_path / "exp" / "RESULTS.md").read_text()
    assert "left out (--allow_missing_subsets true)" in r.stdout


def test_speed_perturbation_option(mini_librispeech, tmp_path):
    r = run(["--librispeech", mini_librispeech, "--allow_missing_subsets", "true", "--speed_perturb", "0.9 1.0",
             "--stop_stage", 2], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = (tmp_path / "exp" / "asr_train_tiny" / "config.features.yaml").read_text()
    assert "speed_perturb:\n  - 0.9\n  - 1.0\n" in cfg
    assert "features: 14 train / 3 valid utterances" in r.stdout  # 7 utterances x 2 speeds


def test_missing_subset_is_an_error(mini_librispeech, tmp_path):
    r = run(["--librispeech", mini_librispeech, "--stop_stage", 1], tmp_path)
    assert r.returncode != 0
    assert f"LibriSpeech evaluation subset not found: {mini_librispeech / 'dev-other'}" in r.stderr
    assert not (tmp_path / "data" / "train_clean_100").exists()  # checked before any work


def test_missing_root_and_transcripts(mini_librispeech, tmp_path):
    r = run(["--stop_stage", 1], tmp_path)
    assert r.returncode != 0 and "pass --librispeech /path/to/LibriSpeech" in r.stderr
    r = run(["--librispeech", tmp_path / "none", "--stop_stage", 1], tmp_path)
    assert r.returncode != 0 and f"LibriSpeech root (--librispeech) not found: {tmp_path / 'none'}" in r.stderr
    for t in (mini_librispeech / "dev-clean").rglob("*.trans.txt"):
        t.unlink()
    r = run(["--librispeech", mini_librispeech, "--allow_missing_subsets", "true", "--stop_stage", 1], tmp_path)
    assert r.returncode != 0 and "is not a LibriSpeech subset folder" in r.stdout + r.stderr


def test_init_from_bad_checkpoint_is_a_clear_error(mini_librispeech, tmp_path):
    ckpt = tmp_path / "hubert_base.pt"
    ckpt.write_bytes(b"not really")
    r = run(["--librispeech", mini_librispeech, "--init_from", ckpt], tmp_path)
    assert r.returncode != 0
    assert f"--init_from {ckpt} is not a usable wav2vec2/HuBERT checkpoint" in r.stderr
    assert "error: " in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "data").exists()
    r = run(["--librispeech", mini_librispeech, "--init_from", tmp_path / "none"], tmp_path)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_init_from_hugging_face_fine_tunes_and_decodes(mini_librispeech, tmp_path):
    """--init_from a local Wav2Vec2ForCTC directory: CTC fine-tuning (frozen extractor) replaces
    the Conformer, and stage 4 decodes and scores the fine-tuned model."""
    transformers = pytest.importorskip("transformers")
    import torch

    from allinone.models.saved import load_model_dir

    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        # wav2vec2's real 320x downsampling (20 ms frames): LibriSpeech utterances are up to 35 s, and
        # attention over a finer frame rate would need gigabytes.
        conv_dim=(16, 16, 16), conv_kernel=(10, 8, 8), conv_stride=(5, 8, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4))
    hf.save_pretrained(tmp_path / "hf")
    r = run(["--librispeech", mini_librispeech, "--allow_missing_subsets", "true", "--speed_perturb", "1.0",
             "--init_from", tmp_path / "hf", "--config", "conf/finetune_tiny.yaml"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "exp" / "asr_finetune_tiny"
    loaded = load_model_dir(exp / "final")
    assert type(loaded.model).__name__ == "Wav2Vec2CTCModel"
    # the frozen extractor is the checkpoint's; the head is new, sized for the character tokenizer
    torch.testing.assert_close(loaded.model.feature_extractor.conv_layers[1].conv.weight,
                               hf.wav2vec2.feature_extractor.conv_layers[1].conv.weight)
    assert loaded.model.aux.out_features == loaded.tokenizer.vocab_size != 7
    wer = json.loads((exp / "decode_beam1" / "test_clean" / "wer.json").read_text())
    assert wer["sentences"] == 3
    assert "|test_clean|3|" in (tmp_path / "exp" / "RESULTS.md").read_text()
