"""egs/speechocean762/asr1/run.sh end to end on CPU (tiny configs, a slice of the shipped corpus),
its input checks, the no-op rerun, and the authors' original corpus layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from allinone.data.audio import load_audio
from allinone.data.kaldi import read_data_dir

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "egs" / "speechocean762" / "asr1" / "run.sh"
TINY = ["--config", "conf/train_tiny.yaml", "--supernet_config", "conf/train_supernet_tiny.yaml",
        "--grid", "conf/grid_tiny.yaml", "--beam", "1", "--nj", "1", "--device", "cpu",
        "--python", sys.executable, "--min_free_gb", "0"]


def run(args, tmp, timeout=300):
    dirs = ["--datadir", str(tmp / "data"), "--expdir", str(tmp / "exp"), "--dumpdir", str(tmp / "dump")]
    return subprocess.run(["bash", str(RUN), *TINY, *dirs, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_end_to_end_and_noop_rerun(data_root, tmp_path):
    corpus = data_root / "speechocean762"
    r = run(["--corpus_root", corpus, "--subset", 12, "--stop_stage", 6], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for split, n in (("train", 12), ("dev", 12), ("test", 12)):
        assert len(read_data_dir(tmp_path / "data" / split)) == n
    asr, sup = tmp_path / "exp" / "asr_train_tiny", tmp_path / "exp" / "supernet_train_supernet_tiny"
    assert (asr / "final" / "config.json").is_file() and (asr / "tokenizer").is_dir()
    assert json.loads((sup / "final" / "config.json").read_text())["search_space"]["depth"] == [2, 1]
    systems = sorted(p.name for p in (sup / "extracted").iterdir() if p.is_dir())
    assert systems == ["L1_F32_H2_B4", "L2_F64_H2_B32", "L2_F64_H2_B8"]
    # The recipe's intermediate CTC (tap after block 1) goes through the supernet into the
    # extracted systems that still have that block; the one-block system has no tap left.
    def model_of(d):
        return json.loads((d / "config.json").read_text())["model"]
    assert model_of(sup / "final")["interctc_weight"] == 0.3
    assert model_of(sup / "extracted" / "L2_F64_H2_B8")["encoder"]["interctc_layer_idx"] == [1]
    assert model_of(sup / "extracted" / "L1_F32_H2_B4")["interctc_weight"] == 0.0
    for s in ("dev", "test"):
        assert json.loads((asr / "decode_beam1" / s / "wer.json").read_text())["sentences"] == 12
        for name in systems:
            assert (sup / "decode_beam1" / name / s / "wer.json").is_file()
    results = (tmp_path / "exp" / "RESULTS.md").read_text()
    assert "|L1_F32_H2_B4/test|12|" in results
    for log in ("stage2_features.log", "stage3_train.log"):
        assert (asr / "log" / log).is_file()
    assert (sup / "log" / "stage4_train.log").is_file() and (tmp_path / "data" / "log" / "stage1_data.log").is_file()
    assert f"float model: {asr}/final" in r.stdout

    # A second run of the finished stages does nothing: no retraining, nothing rewritten.
    mtime = (asr / "final" / "model.safetensors").stat().st_mtime_ns
    again = run(["--corpus_root", corpus, "--subset", 12, "--stop_stage", 6], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") >= 5 and "already decoded" in again.stdout
    assert "epoch 1" not in again.stdout + again.stderr
    assert (asr / "final" / "model.safetensors").stat().st_mtime_ns == mtime

    # Shallow fusion: stage 6 trains the LM of the training transcripts once and decodes the
    # float model and every extracted system with it, into their own decode directories
    # (with the recipe's default length bonus, 1.5, which only the fused score gets).
    fused = run(["--corpus_root", corpus, "--subset", 12, "--stage", 6, "--stop_stage", 6, "--beam", 2,
                 "--lm_weight", 0.5, "--lm_order", 3], tmp_path)
    assert fused.returncode == 0, fused.stdout[-3000:] + fused.stderr[-3000:]
    assert (tmp_path / "exp" / "lm" / "units3.arpa").read_text().startswith("\\data\\")
    for d in [asr / "decode_beam2_lm3w0.5b1.5", *(sup / "decode_beam2_lm3w0.5b1.5" / name for name in systems)]:
        info = json.loads((d / "test" / "decode.json").read_text())
        assert info["beam"] == 2 and info["lm_weight"] == 0.5 and info["lm"].endswith("units3.arpa"), d
        assert info["length_bonus"] == 1.5, d
    # --lm_weight 0 (or 0.0) decodes without the LM; a weight that is not a number is refused
    plain = run(["--corpus_root", corpus, "--subset", 12, "--stage", 6, "--stop_stage", 6, "--beam", 2,
                 "--lm_weight", "0.0"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    info = json.loads((asr / "decode_beam2" / "test" / "decode.json").read_text())
    assert info["beam"] == 2 and info["lm"] is None
    # stage 7 benchmarks the grid decoded as stage 6 decodes (here: beam 2 + the LM)
    bench = run(["--corpus_root", corpus, "--subset", 12, "--stage", 7, "--stop_stage", 7, "--beam", 2,
                 "--lm_weight", 0.5, "--lm_order", 3], tmp_path)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    for name in systems:
        search = json.loads((sup / "bench" / "systems" / name / "system.json").read_text())["settings"]["search"]
        assert search["beam"] == 2 and search["lm_weight"] == 0.5 and search["lm"].endswith("units3.arpa"), name
    checksum = subprocess.run(f"cat {asr}/final/*.safetensors | cksum", shell=True, capture_output=True,
                              text=True).stdout.split()[0]
    assert (sup / "bench" / ".done").read_text().splitlines()[1] == \
        f"grid=conf/grid_tiny.yaml decode_beam2_lm3w0.5b1.5 float={asr}/final:{checksum}"
    # ... judged against the float model it started from, decoded the same way
    res = json.loads((sup / "bench" / "results.json").read_text())
    assert res["significance_reference"] == "float model" and res["float_model"]["path"].endswith(f"{asr.name}/final")
    float_search = json.loads((sup / "bench" / "float_model" / "system.json").read_text())["settings"]["search"]
    assert float_search == search
    bad = run(["--corpus_root", corpus, "--stage", 6, "--stop_stage", 6, "--lm_weight", "high"], tmp_path)
    assert bad.returncode != 0 and "--lm_weight must be a number >= 0, got 'high'" in bad.stderr

    # Other data options than the stamp's are refused rather than silently reused.
    other = run(["--corpus_root", corpus, "--subset", 5, "--stop_stage", 1], tmp_path)
    assert other.returncode != 0 and "was made with other options" in other.stderr
    # The supernet belongs to its float model: another --config in the same exp dir is refused
    # by stages 4-7 (it would reuse, extract and bench this supernet), not by stages 1-3 ...
    checksum = subprocess.run(f"cat {asr}/final/*.safetensors | cksum", shell=True, capture_output=True,
                              text=True).stdout.split()[0]
    assert (sup / ".float_model").read_text().split() == ["asr_train_tiny", checksum]
    for stages in ((4, 4), (7, 7), (2, 7)):
        moved = run(["--corpus_root", corpus, "--subset", 12, "--config", "conf/train_conformer.yaml",
                     "--stage", stages[0], "--stop_stage", stages[1]], tmp_path)
        assert moved.returncode != 0 and "was trained from asr_train_tiny, not from asr_train_conformer" \
            in moved.stderr, stages
    # ... the same exp dir spelled otherwise is the same; a float model retrained since is refused
    same = run(["--corpus_root", corpus, "--subset", 12, "--stage", 4, "--stop_stage", 4,
                "--expdir", f"{tmp_path}/./exp/"], tmp_path)
    assert same.returncode == 0 and "already done" in same.stdout, same.stderr[-2000:]
    weights = next((asr / "final").glob("*.safetensors"))
    kept = weights.read_bytes()
    weights.write_bytes(kept + b" ")
    changed = run(["--corpus_root", corpus, "--subset", 12, "--stage", 5, "--stop_stage", 5], tmp_path)
    assert changed.returncode != 0 and "changed since" in changed.stderr
    weights.write_bytes(kept)
    early = run(["--corpus_root", corpus, "--subset", 12, "--config", "conf/train_conformer.yaml",
                 "--stop_stage", 1], tmp_path)
    assert early.returncode == 0, early.stderr[-3000:]


def test_missing_corpus_root(tmp_path):
    r = run(["--corpus_root", tmp_path / "nowhere", "--stop_stage", 1], tmp_path)
    assert r.returncode != 0
    assert f"speechocean762 corpus root not found: {tmp_path / 'nowhere'} is not a directory" in r.stderr


def test_missing_transcript_file(data_root, tmp_path):
    corpus = tmp_path / "so762"
    for split in ("train", "dev", "test"):
        (corpus / split).mkdir(parents=True)
        (corpus / split / "wav.scp").write_text((data_root / "speechocean762" / split / "wav.scp").read_text())
        if split != "dev":
            (corpus / split / "text").write_text((data_root / "speechocean762" / split / "text").read_text())
    r = run(["--corpus_root", corpus, "--stop_stage", 1], tmp_path)
    assert r.returncode != 0
    assert f"speechocean762 dev list not found: {corpus / 'dev' / 'text'} is missing" in r.stderr


def test_later_stage_without_data_says_what_to_run(tmp_path):
    r = run(["--stage", 3, "--stop_stage", 3], tmp_path)
    assert r.returncode != 0 and "run stage 1 first" in r.stderr


def _original_layout(data_root: Path, root: Path) -> dict[str, list[str]]:
    """A miniature of the authors' release: WAVE/SPEAKERnnnn/*.WAV (16-bit PCM) and Kaldi train/ test/."""
    shipped = data_root / "speechocean762"
    picks = {"train": ("train", "0001", 2), "test": ("dev", "0093", 2)}
    halves: dict[str, list] = {"train": [], "test": []}
    for half, (split, speaker, n) in picks.items():
        halves[half] += [u for u in read_data_dir(shipped / split) if u.speaker == speaker][:n]
    halves["test"] += [u for u in read_data_dir(shipped / "test") if u.speaker == "0003"][:2]
    halves["test"] += [u for u in read_data_dir(shipped / "train") if u.speaker == "0005"][:1]  # unused speaker
    for half, utts in halves.items():
        (root / half).mkdir(parents=True)
        with open(root / half / "text", "w") as t, open(root / half / "utt2spk", "w") as s, \
                open(root / half / "wav.scp", "w") as w:
            for u in utts:
                wav = root / "WAVE" / f"SPEAKER{u.speaker}" / f"{u.utt_id}.WAV"
                wav.parent.mkdir(parents=True, exist_ok=True)
                sf.write(wav, np.clip(load_audio(u.path).numpy(), -1, 1), 16000, subtype="PCM_16", format="WAV")
                t.write(f"{u.utt_id}\t{u.text}\n")
                s.write(f"{u.utt_id}\t{u.speaker}\n")
                w.write(f"{u.utt_id}\tWAVE/SPEAKER{u.speaker}/{u.utt_id}.WAV\n")
    return {h: [u.utt_id for u in us] for h, us in halves.items()}


def test_original_layout_gives_the_shipped_splits(data_root, tmp_path):
    ids = _original_layout(data_root, tmp_path / "release")
    r = run(["--corpus_root", tmp_path / "release", "--corpus_layout", "original", "--stop_stage", 1], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {s: [u.utt_id for u in read_data_dir(tmp_path / "data" / s)] for s in ("train", "dev", "test")}
    assert got["train"] == ids["train"]
    assert got["dev"] == ids["test"][:2] and got["test"] == ids["test"][2:4]  # speaker 0005 is in no split
    assert read_data_dir(tmp_path / "data" / "dev")[0].path.endswith(".WAV")

    # Same layout without its audio folder: the check names what is missing.
    (tmp_path / "release" / "WAVE").rename(tmp_path / "release" / "elsewhere")
    r = run(["--corpus_root", tmp_path / "release", "--corpus_layout", "original", "--stop_stage", 1],
            tmp_path / "second")
    assert r.returncode != 0 and "speechocean762 audio folder not found" in r.stderr


def test_every_training_config_loads_and_sp_do_changes_only_what_it_says():
    """Each of the recipe's training configs passes the trainer's key and type checks; the
    sp_do config is the recipe's float config with speed perturbation, dropout 0.2 and 5800
    updates, and nothing else (docs/benchmarks.md 4l), so the two cannot drift apart."""
    from dataclasses import asdict

    from allinone.train.config import load_config

    conf = RUN.parent / "conf"
    over = {"train_supernet.yaml": "train_conformer.yaml", "train_supernet_targets.yaml": "train_conformer.yaml",
            "train_supernet_tiny.yaml": "train_tiny.yaml",
            "train_wav2vec2_supernet.yaml": "train_wav2vec2_base.yaml"}  # as run.sh and bench/ merge them
    for path in sorted(conf.glob("train_*.yaml")):
        load_config([conf / over[path.name], path] if path.name in over else path)

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    base = flat(asdict(load_config(conf / "train_conformer.yaml")))
    sp_do = flat(asdict(load_config(conf / "train_conformer_sp_do.yaml")))
    changed = {k: (base[k], sp_do[k]) for k in base if base[k] != sp_do[k]}
    assert changed == {
        "exp_dir": ("exp/speechocean762/conformer", "exp/speechocean762/conformer_sp_do"),
        "data.speed_perturb": ([1.0], [0.9, 1.0, 1.1]),
        "model.encoder.dropout_rate": (0.1, 0.2),
        "model.encoder.positional_dropout_rate": (0.1, 0.2),
        "model.encoder.attention_dropout_rate": (0.1, 0.2),
        "train.max_steps": (0, 5800),
    }
    # its supernet (merged over it by stage 4) runs its own epochs, not the float run's 5800 updates
    assert load_config([conf / "train_conformer_sp_do.yaml", conf / "train_supernet.yaml"]).train.max_steps == 0
    # the targets supernet (docs/benchmarks.md 10e) is the sandwich one with the grid's corners
    # as targets and one random system per step, and nothing else
    sandwich = flat(asdict(load_config([conf / "train_conformer.yaml", conf / "train_supernet.yaml"])))
    targets = flat(asdict(load_config([conf / "train_conformer.yaml", conf / "train_supernet_targets.yaml"])))
    corners = ["L12_F640_H4_B32", "L12_F640_H4_B2", "L6_F320_H4_B32", "L6_F320_H4_B2"]
    assert {k: (sandwich.get(k), targets.get(k)) for k in sandwich | targets if sandwich.get(k) != targets.get(k)} == {
        "supernet.strategy": ("sandwich", "targets"), "supernet.targets": (None, corners),
        "supernet.num_random": (2, 1)}
