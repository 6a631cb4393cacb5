"""bench/subnet_sizes.py: both compression ratios of subnets from the configs alone."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "egs" / "speechocean762" / "asr1"
CONFIGS = ["conf/train_tiny.yaml", "conf/train_supernet_tiny.yaml"]


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "subnet_sizes.py"), *args], cwd=RECIPE,
                          capture_output=True, text=True, env=env)


def test_table_against_brute_force(monkeypatch):
    # --vocab after the subnets, as the docstring writes it
    r = run(*CONFIGS, "L2_F64_H2_B32", "L1_F32_H1_B8", "--vocab", "7")
    assert r.returncode == 0, r.stderr
    # subnet -> [packed MiB, avg bits, ratio vs ref, weights ratio vs ref]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in r.stdout.splitlines()[2:])}
    assert rows["L2_F64_H2_B32"][2:] == ["1.00x", "1.00x"]  # the largest float subnet is the reference
    # by hand: the reference's block weights at 4 bytes each against the one 8-bit block's codes
    # (one byte per weight) and per-channel scales, as read from the extracted tensors
    spec = importlib.util.spec_from_file_location("subnet_sizes", ROOT / "bench" / "subnet_sizes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(RECIPE)
    model = script.build_supernet(CONFIGS, 7)
    ref_weights = sum(t.numel() for k, t in model.state_dict().items()
                      if k.startswith("encoder.encoders.") and k.endswith(".weight") and t.dim() in (2, 3)
                      and "norm" not in k)
    _, quantized = script.extract(model, model.search_space.parse("L1_F32_H1_B8"))
    stored = sum(q.codes.numel() + 4 * q.scale.numel() for q in quantized.values())
    assert rows["L1_F32_H1_B8"][1] == "8.00"
    assert rows["L1_F32_H1_B8"][3] == f"{4 * ref_weights / stored:.2f}x"
    # the whole model shrinks less: the front end and CTC layer stay float
    assert 1.0 < float(rows["L1_F32_H1_B8"][2].rstrip("x")) < 4 * ref_weights / stored


def test_bad_input_is_named_before_any_table():
    r = run(*CONFIGS, "L2_F64_H2_B32", "L9_F64_H2_B4")
    assert r.returncode != 0 and "L9_F64_H2_B4" in r.stderr and r.stdout == ""
    r = run(CONFIGS[0], "L2_F64_H2_B4")
    assert r.returncode != 0 and "no supernet section" in r.stderr
