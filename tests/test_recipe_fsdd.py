"""egs/fsdd_digits/asr1/run.sh (the demo's recipe) end to end on a copy with one-epoch configs,
a two-system grid and a slice of the data, through stage 7: every grid system trained alone
(its twin) and tested against its nested system."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "egs" / "fsdd_digits" / "asr1"
GRID = ["L3_F256_H4_B32", "L2_F128_H2_B4"]


def _recipe_copy(tmp: Path) -> Path:
    """The recipe's script and configs (no data or exp) with one-epoch trainings."""
    shutil.copytree(REPO / "egs" / "utils", tmp / "egs" / "utils")
    recipe = tmp / "egs" / "fsdd_digits" / "asr1"
    (recipe / "conf").mkdir(parents=True)
    shutil.copy(RECIPE / "run.sh", recipe)
    for f in ("train_demo.yaml", "train_supernet_demo.yaml", "space_demo.yaml"):
        text = (RECIPE / "conf" / f).read_text()
        (recipe / "conf" / f).write_text(text.replace("max_epochs: 12", "max_epochs: 1")
                                         .replace("max_epochs: 5", "max_epochs: 1"))
    (recipe / "conf" / "grid_demo.yaml").write_text("".join(f"- {s}\n" for s in GRID))
    return recipe


def _run(recipe: Path, data_root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(recipe / "run.sh"), "--python", sys.executable, "--data_root", str(data_root),
                           "--num_train", "40", "--num_test", "12", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_stages_1_to_7_twins_against_nested(data_root, tmp_path):
    recipe = _recipe_copy(tmp_path)
    r = _run(recipe, data_root, "--stop_stage", 6)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # stage 7 needs stage 6's bench: removed, it says so before training anything
    bench = recipe / "exp" / "fsdd_digits" / "supernet_demo" / "bench"
    shutil.move(bench, tmp_path / "bench")
    r = _run(recipe, data_root, "--stage", 7, "--stop_stage", 7)
    assert r.returncode != 0 and "needs stage 6's bench" in r.stderr
    assert not (recipe / "exp" / "fsdd_digits" / "twins").exists()
    shutil.move(tmp_path / "bench", bench)

    r = _run(recipe, data_root, "--stage", 7, "--stop_stage", 7)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    twins = recipe / "exp" / "fsdd_digits" / "twins"
    sup_steps = json.loads((recipe / "exp/fsdd_digits/supernet_demo/history.json").read_text())[-1]["step"]
    # each twin: the one subnet, as many updates as the supernet; the reference system (the largest
    # float subnet) is not trained alone: its twin is the float model both started from
    assert not (twins / GRID[0]).exists()
    assert json.loads((twins / GRID[1] / "allocation.json").read_text())["subnet"] == GRID[1]
    assert json.loads((twins / GRID[1] / "history.json").read_text())[-1]["step"] == sup_steps
    res = json.loads((twins / "compare" / "results.json").read_text())
    pairs = {p["system"]: p for p in res["nested"]["pairs"]}
    assert set(pairs) == set(GRID)  # the reference pair with the float model
    bench_wer = {s["system"]: s["test_sets"]["test"]["wer"] for s in json.loads((bench / "results.json").read_text())["systems"]}
    for s, p in pairs.items():
        t = p["sets"]["test"]
        assert t["nested_wer"] == pytest.approx(bench_wer[s], abs=1e-3) and 0 <= t["p_value"] <= 1
    assert pairs["L2_F128_H2_B4"]["twin_seconds"] > 0 and res["nested"]["time"]["supernet_seconds"] > 0
    # run again: a no-op for the twins (not retrained)
    stamp = (twins / GRID[1] / "allocation.json").stat().st_mtime_ns
    r = _run(recipe, data_root, "--stage", 7, "--stop_stage", 7)
    assert r.returncode == 0 and (twins / GRID[1] / "allocation.json").stat().st_mtime_ns == stamp
