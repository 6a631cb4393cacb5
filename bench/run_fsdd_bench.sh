#!/usr/bin/env bash
# The docs/benchmark.md example: fine-tune the FSDD demo Conformer as a supernet, then
# benchmark every uniform subnet of its space on the demo test set and search one subnet.
# Needs the demo model first: (cd egs/fsdd_digits/asr1 && ./run.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=$root/.venv/bin/python
cd "$root/egs/fsdd_digits/asr1"
exp=exp/fsdd_digits/supernet_bench
[ -f exp/fsdd_digits/conformer_demo/final/config.json ] || { echo "$0: run egs/fsdd_digits/asr1/run.sh first" >&2; exit 1; }
if [ ! -f "$exp/final/config.json" ]; then
  mkdir -p "$exp" && cp -r exp/fsdd_digits/conformer_demo/tokenizer "$exp/"   # init_from needs the same tokens
  $python -m allinone.cli train "$root/bench/fsdd_supernet.yaml"
fi
$python -m allinone.cli bench "$exp/final" --grid all --data data/test --out "$exp/bench" \
  --threads 1 --latency-repeats 5 --latency-utts 8
$python -m allinone.cli search "$exp/final" --max-mb 1.3 --data data/train --sample 50 \
  --extract-to "$exp/search_1.3mb"
