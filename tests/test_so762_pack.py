"""bench/so762_pack.sh: what comes back from a lent GPU (at most 64 MiB) holds the results first,
then the best variant's model, then the float model, and never more than the limit."""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(d: Path, size: int) -> None:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(os.urandom(size))  # incompressible: sizes stay known


def _tree(tmp: Path) -> tuple[Path, Path]:
    """A repository copy holding the pack script and an exp/ of two variants and a float model."""
    (tmp / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "so762_pack.sh", tmp / "bench")
    exp = tmp / "egs" / "speechocean762" / "asr1" / "exp"
    for name, wer in (("good", 9.5), ("worse", 49.7)):  # (in text order "49.7" comes first)
        v = exp / "variants" / name
        (v / "decode_beam1" / "dev").mkdir(parents=True)
        (v / "decode_beam1" / "dev" / "wer.json").write_text(json.dumps({"wer": wer}))
        (v / "history.json").write_text("[]")
        _model(v / "final", 300_000)
    _model(exp / "asr_train_conformer" / "final", 300_000)
    (exp / "asr_train_conformer" / "checkpoint.pt").write_bytes(b"x" * 1000)
    out = tmp / "out"
    out.mkdir()
    (out / "allinone_baseline.log").write_text("a log already in $OUT\n")
    return tmp / "bench" / "so762_pack.sh", out


def _pack(script: Path, out: Path, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(out), **{k: str(v) for k, v in env.items()}})
    assert r.returncode == 0, r.stderr
    return r


def _members(out: Path, name: str) -> set[str]:
    parts = sorted(out.glob(name + "*"))
    if not parts:
        return set()
    whole = out / (name + ".joined")
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(whole) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    whole.unlink()
    return names


def test_results_then_models_within_the_limit(tmp_path):
    script, out = _tree(tmp_path)
    _pack(script, out)
    results = _members(out, "results.tgz")
    assert "exp/variants/good/decode_beam1/dev/wer.json" in results
    assert not any("/final/" in m or m.endswith(".pt") for m in results)
    assert _members(out, "models.tgz") == {
        "exp/best_variant/good/final/config.json", "exp/best_variant/good/final/model.safetensors",
        "exp/asr_train_conformer/final/config.json", "exp/asr_train_conformer/final/model.safetensors"}
    assert not (script.parent.parent / "egs/speechocean762/asr1/exp/best_variant").exists()


def test_the_float_model_is_left_out_first_and_the_total_stays_under_the_limit(tmp_path):
    script, out = _tree(tmp_path)
    limit = 450_000  # the results and one 300 kB model fit, two do not
    r = _pack(script, out, PACK_LIMIT_BYTES=limit, PACK_PART_BYTES=100_000)
    assert "exp/asr_train_conformer/final left out" in r.stderr
    assert _members(out, "models.tgz") == {"exp/best_variant/good/final/config.json",
                                            "exp/best_variant/good/final/model.safetensors"}
    assert len(list(out.glob("models.tgz.part*"))) == 4  # split into 100 kB parts
    assert sum(p.stat().st_size for p in out.iterdir()) <= limit
    # too small for any model: the results alone, and both models named as left out
    script, out = _tree(tmp_path / "again")
    r = _pack(script, out, PACK_LIMIT_BYTES=100_000)
    assert "exp/asr_train_conformer/final left out" in r.stderr and "exp/best_variant left out" in r.stderr
    assert not _members(out, "models.tgz") and _members(out, "results.tgz")


def test_no_more_files_than_come_back(tmp_path):
    script, out = _tree(tmp_path)
    for i in range(4):  # with the one already there: five phase logs
        (out / f"phase{i}.log").write_text("log\n")
    # results (one file) + the logs = 6; both models in 200 kB parts would be 3 more files, the
    # best variant's alone 2 more: the float model is left out although the bytes would fit
    r = _pack(script, out, PACK_PART_BYTES=200_000)
    assert "exp/asr_train_conformer/final left out" in r.stderr and "8 files" in r.stderr
    assert _members(out, "models.tgz") == {"exp/best_variant/good/final/config.json",
                                            "exp/best_variant/good/final/model.safetensors"}
    assert len(list(out.iterdir())) == 8
