#!/usr/bin/env python3
"""show_results.py DECODE_ROOT [...] > RESULTS.md

Collects every <system>/<test set>/wer.json under the given decode folders into ESPnet's
results table (|dataset|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|, percentages), one row per
system and test set, sorted by path.
"""
import json
import sys
from pathlib import Path


def rows(root: Path):
    for wer in sorted(root.rglob("wer.json")):
        r = json.loads(wer.read_text())
        n = max(r["words"], 1)
        corr = 100.0 * (r["words"] - r["sub"] - r["del"]) / n
        name = wer.parent.relative_to(root)
        yield (f"|{name}|{r['sentences']}|{r['words']}|{corr:.1f}|{100 * r['sub'] / n:.1f}|"
               f"{100 * r['del'] / n:.1f}|{100 * r['ins'] / n:.1f}|{r['wer']:.1f}|{r['ser']:.1f}|")


def main(argv: list[str]) -> int:
    for arg in argv:
        root = Path(arg)
        lines = list(rows(root)) if root.is_dir() else []
        if not lines:
            continue
        print(f"### WER: {root}\n")
        print("|dataset|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
