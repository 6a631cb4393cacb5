#!/usr/bin/env python3
"""One markdown table of several training runs: how far each got, when it left the CTC
plateau, and what its averaged model decodes to.

    python bench/runs_table.py exp/asr_train_conformer exp/variants/* [--sets dev test]
        [--decode-dir decode_beam1] [--takeoff 95] [--out summary.md]

Each RUN_DIR is an `allinone train` experiment directory: `history.json` (one entry per epoch
with `step`, `valid_loss` and, with `train.select_by: wer`, `valid_wer`) and, when decoded,
`<decode-dir>/<set>/wer.json`. Columns: epochs (updates), the first epoch whose greedy validation WER
is under `--takeoff` percent (a CTC model first sits on the blank plateau near 100% and
leaves it at an update that varies from seed to seed: docs/benchmarks.md section 4f), the
best single-epoch validation WER, the lowest validation loss, and the WER (CER) of the averaged
model per set. Runs named `<config>_s<seed>` (for example `nosp_s1`, `nosp_s2`) also get a
`<config> (n seeds)` row with mean +- sample standard deviation of each set's WER, which is
how configurations should be ranked when one run's spread is several points.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from allinone.utils import atomic_open

SEED_SUFFIX = re.compile(r"^(?P<config>.+)_s\d+$")


def run_row(run_dir: Path, sets: list[str], decode_dir: str, takeoff: float) -> dict:
    """What the table shows of one run (ValueError naming the file when history.json is missing)."""
    path = run_dir / "history.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no history.json (not an `allinone train` experiment directory)")
    history = json.loads(path.read_text())
    if not history:
        raise ValueError(f"{path}: no epoch finished yet")
    with_wer = [h for h in history if "valid_wer" in h]
    first = next((h for h in with_wer if h["valid_wer"] < takeoff), None)
    best = min(with_wer, key=lambda h: (h["valid_wer"], h["epoch"])) if with_wer else None
    lowest = min(history, key=lambda h: (h["valid_loss"], h["epoch"]))
    decoded = {}
    for s in sets:
        f = run_dir / decode_dir / s / "wer.json"
        if f.is_file():
            w = json.loads(f.read_text())
            decoded[s] = (w["wer"], w.get("cer"))
    return {"name": run_dir.name, "epochs": history[-1]["epoch"], "updates": history[-1]["step"],
            "takeoff": None if first is None else (first["epoch"], first["step"]),
            "best": None if best is None else (best["valid_wer"], best["epoch"]),
            "lowest_loss": (lowest["valid_loss"], lowest["epoch"]), "decoded": decoded}


def seed_groups(rows: list[dict], sets: list[str]) -> list[dict]:
    """Mean and sample standard deviation per set over runs named ``<config>_s<seed>`` (2 or more)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        m = SEED_SUFFIX.match(r["name"])
        if m:
            groups.setdefault(m["config"], []).append(r)
    out = []
    for config, members in groups.items():
        if len(members) < 2:
            continue
        stats = {}
        for s in sets:
            wers = [r["decoded"][s][0] for r in members if s in r["decoded"]]
            if len(wers) >= 2:
                stats[s] = (statistics.mean(wers), statistics.stdev(wers), len(wers))
        out.append({"config": config, "runs": len(members), "stats": stats})
    return out


def markdown(rows: list[dict], groups: list[dict], sets: list[str], takeoff: float) -> str:
    head = ["run", "epochs (updates)", f"first epoch under {takeoff:g}% valid WER (update)",
            "best single-epoch valid WER (epoch)", "lowest valid loss (epoch)"]
    head += [f"{s} WER (CER)" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['epochs']} ({r['updates']})",
                 "never" if r["takeoff"] is None else f"{r['takeoff'][0]} ({r['takeoff'][1]})",
                 "-" if r["best"] is None else f"{r['best'][0]:.1f}% ({r['best'][1]})",
                 f"{r['lowest_loss'][0]:.1f} ({r['lowest_loss'][1]})"]
        for s in sets:
            if s not in r["decoded"]:
                cells.append("-")
            else:
                wer, cer = r["decoded"][s]
                cells.append(f"{wer:.2f}%" + ("" if cer is None else f" ({cer:.1f}%)"))
        lines.append("| " + " | ".join(cells) + " |")
    if groups:
        lines += ["", "| configuration | runs | " + " | ".join(f"{s} WER mean +- sd (n)" for s in sets) + " |",
                  "|---|---|" + "---|" * len(sets)]
        for g in groups:
            cells = [g["config"], str(g["runs"])]
            cells += [f"{g['stats'][s][0]:.2f} +- {g['stats'][s][1]:.2f} ({g['stats'][s][2]})" if s in g["stats"]
                      else "-" for s in sets]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="experiment directories of `allinone train`")
    p.add_argument("--sets", nargs="+", default=["dev", "test"], help="decoded sets to show (default dev test)")
    p.add_argument("--decode-dir", default="decode_beam1", help="decode directory inside each run")
    p.add_argument("--takeoff", type=float, default=95.0, help="validation WER (%%) that counts as off the plateau")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        rows = [run_row(d, args.sets, args.decode_dir, args.takeoff) for d in args.runs]
    except ValueError as e:
        print(f"runs_table: {e}", file=sys.stderr)
        return 2
    text = markdown(rows, seed_groups(rows, args.sets), args.sets, args.takeoff)
    print(text, end="")
    if args.out is not None:
        with atomic_open(args.out) as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
