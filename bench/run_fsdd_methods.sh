#!/usr/bin/env bash
# Issue 6's method comparison at CPU scale on the shipped connected digits: uniform QAT,
# two-stage (KL or Hessian-trace sensitivity, or the search on the frozen float model, then
# QAT) and one-stage mixed precision, each from the demo float
# model with the same number of steps, then `allinone.eval.compare` against the float model.
# The GPU experiment on speechocean762 runs the same commands with conf/mixed/so762_conformer.yaml.
# Needs the demo model first: (cd egs/fsdd_digits/asr1 && ./run.sh).   Usage: bench/run_fsdd_methods.sh [STEPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=$root/.venv/bin/python
steps=${1:-150}
cd "$root/egs/fsdd_digits/asr1"
float=exp/fsdd_digits/conformer_demo/final
[ -f $float/config.json ] || { echo "$0: run egs/fsdd_digits/asr1/run.sh first" >&2; exit 1; }
exp=exp/fsdd_digits/methods_s$steps
C="$root/conf/mixed/fsdd_demo.yaml train.max_steps=$steps train.max_epochs=100"
train() { local dir=$1; shift; [ -f $exp/$dir/allocation.json ] || $python -m allinone.cli train $C exp_dir=$exp/$dir "$@"; }
for b in 8 4 3 2; do
  train uniform_b$b supernet.strategy=fixed supernet.subnet=L3_F256_H4_B$b
done
for t in 4 3; do
  train one_stage_b$t supernet.target_bits=$t
  for m in kl hessian; do  # stage 1: KL of outputs, or Hutchinson's Hessian trace x quantization error
    [ -f $exp/s1_${m}_b$t/allocation.json ] || \
      $python -m allinone.cli allocate $C supernet.target_bits=$t --method $m --out $exp/s1_${m}_b$t --num-batches 8 --device cpu
    train two_stage_${m}_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_${m}_b$t/allocation.json
  done
  # stage 1 as the same differentiable search on the frozen float model (only the logits train)
  train s1_search_b$t supernet.target_bits=$t supernet.freeze_weights=true
  train two_stage_search_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_search_b$t/allocation.json
done
runs=""
for b in 8 4 3 2; do runs="$runs uniform/b$b=$exp/uniform_b$b"; done
for t in 4 3; do
  runs="$runs one_stage/b$t=$exp/one_stage_b$t"
  for m in kl hessian search; do runs="$runs two_stage_$m/b$t=$exp/two_stage_${m}_b$t"; done
done
$python -m allinone.cli compare $float $runs --data data/test --out $exp/compare
cat $exp/compare/results.md
