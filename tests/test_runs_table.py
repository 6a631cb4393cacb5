"""bench/runs_table.py: the table of several training runs (plateau takeoff, seed groups)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("runs_table", ROOT / "bench" / "runs_table.py")
runs_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs_table)


def _run(root: Path, name: str, wers: list[float], losses: list[float], decoded: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    history = [{"epoch": i + 1, "step": 30 * (i + 1), "valid_loss": loss, "valid_wer": w, "valid_cer": w / 2}
               for i, (w, loss) in enumerate(zip(wers, losses))]
    (d / "history.json").write_text(json.dumps(history))
    for s, (wer, cer) in (decoded or {}).items():
        (d / "decode_beam1" / s).mkdir(parents=True)
        (d / "decode_beam1" / s / "wer.json").write_text(json.dumps({"wer": wer, "cer": cer}))
    return d


def test_table_rows_and_seed_groups(tmp_path, capsys):
    a1 = _run(tmp_path, "cfg_s1", [100, 99, 93, 88, 90], [80, 75, 70, 60, 62], {"dev": (84.0, 50.0), "test": (85.0, 51.0)})
    a2 = _run(tmp_path, "cfg_s2", [100, 100, 100, 96, 94], [80, 79, 78, 76, 77], {"dev": (90.0, 60.0), "test": (91.0, 62.0)})
    b = _run(tmp_path, "other", [100, 100, 100], [90, 85, 86])
    out = tmp_path / "summary.md"
    assert runs_table.main([str(a1), str(a2), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    lines = text.splitlines()
    # takeoff: first epoch under 95 (cfg_s1: epoch 3 = update 90; cfg_s2: epoch 5; other: never)
    assert "| cfg_s1 | 5 (150) | 3 (90) | 88.0% (4) | 60.0 (4) | 84.00% (50.0%) | 85.00% (51.0%) |" in lines
    assert "| cfg_s2 | 5 (150) | 5 (150) | 94.0% (5) | 76.0 (4) | 90.00% (60.0%) | 91.00% (62.0%) |" in lines
    assert "| other | 3 (90) | never | 100.0% (1) | 85.0 (2) | - | - |" in lines
    # mean and sample sd of 84 and 90: 87 +- 4.24; of 85 and 91: 88 +- 4.24
    assert "| cfg | 2 | 87.00 +- 4.24 (2) | 88.00 +- 4.24 (2) |" in lines
    assert not any(line.startswith("| other |") and "+-" in line for line in lines)


def test_missing_history_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert runs_table.main([str(tmp_path / "empty")]) == 2
    assert "empty: no history.json" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "history.json").write_text("[]")
    with pytest.raises(ValueError, match="no epoch finished yet"):
        runs_table.run_row(tmp_path / "none", ["dev"], "decode_beam1", 95.0)
