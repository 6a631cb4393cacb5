#!/usr/bin/env bash
# Issue 6's experiment on speechocean762 (one GPU): uniform QAT at 8/4/3/2 bits, two-stage
# (KL sensitivity -> allocation, then QAT) and one-stage mixed precision at 4 and 3 average
# bits, every run from the recipe's float model with the same number of updates, then
# `allinone compare` against the float model on dev and test. In phases that each fit a
# 10-minute slot of a lent GPU (each idempotent; run them in order):
#
#   bench/run_so762_allinone.sh baseline    # the float model (recipe stages 2-3), if not there
#   bench/run_so762_methods.sh uniform      # 4 QAT runs
#   bench/run_so762_methods.sh one_stage    # 2 searches trained with the weights
#   bench/run_so762_methods.sh two_stage    # 2 KL allocations + 2 QAT runs
#   bench/run_so762_methods.sh two_stage_search  # 2 searches on the frozen float model + 2 QAT runs
#   bench/run_so762_methods.sh compare      # the table (docs/mixed_precision.md)
#
# STEPS (default 600) is every run's number of updates; UNIFORM_BITS (default "8 4 3 2") and
# TARGETS (default "4 3") choose the uniform bit-widths and mixed-precision targets to train;
# compare tables the runs that finished (and names those that did not); the config is
# conf/mixed/so762_conformer.yaml. Results: egs/speechocean762/asr1/exp/methods_s$STEPS/.
set -euo pipefail
source "$(dirname "$0")/so762_env.sh"  # $root, $python, cli(); cd egs/speechocean762/asr1
phase=${1:?usage: $0 uniform|one_stage|two_stage|two_stage_search|compare}
steps=${STEPS:-600}
float=exp/asr_train_conformer/final
[ -f $float/config.json ] || { echo "$0: no float model at $float: run bench/run_so762_allinone.sh baseline" >&2; exit 1; }
exp=exp/methods_s$steps
C=("$root/conf/mixed/so762_conformer.yaml" supernet.init_from=$float supernet.space=$root/conf/mixed/space_so762.yaml
   data.train=data/train data.valid=data/dev data.feat_cache_dir=dump/feats data.num_workers=16
   train.max_steps=$steps train.max_epochs=100 "supernet.anneal_steps=$((steps * 3 / 4))")
# --resume: a run cut off at the end of a device slot continues from its checkpoint next time.
train() { local dir=$1; shift; [ -f $exp/$dir/allocation.json ] || cli train --resume "${C[@]}" exp_dir=$exp/$dir "$@"; }

case $phase in
  uniform)
    for b in ${UNIFORM_BITS:-8 4 3 2}; do train uniform_b$b supernet.strategy=fixed supernet.subnet=L12_F640_H4_B$b; done ;;
  one_stage)
    for t in ${TARGETS:-4 3}; do train one_stage_b$t supernet.target_bits=$t; done ;;
  two_stage)
    for t in ${TARGETS:-4 3}; do
      [ -f $exp/s1_kl_b$t/allocation.json ] || \
        cli allocate "${C[@]}" supernet.target_bits=$t --method kl --out $exp/s1_kl_b$t --num-batches 8 --device cuda
      train two_stage_kl_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_kl_b$t/allocation.json
    done ;;
  two_stage_search)  # stage 1 = the same search on the frozen float model (only the logits train)
    for t in ${TARGETS:-4 3}; do
      train s1_search_b$t supernet.target_bits=$t supernet.freeze_weights=true
      train two_stage_search_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_search_b$t/allocation.json
    done ;;
  compare)
    runs=""
    add() { if [ -f $exp/$2/allocation.json ]; then runs="$runs $1=$exp/$2"; else echo "$0: $exp/$2 not finished: left out" >&2; fi; }
    for b in 8 4 3 2; do add uniform/b$b uniform_b$b; done
    for t in 4 3; do
      add one_stage/b$t one_stage_b$t; add two_stage_kl/b$t two_stage_kl_b$t; add two_stage_search/b$t two_stage_search_b$t
    done
    cli compare $float $runs --data data/dev data/test --out $exp/compare --device cuda --num-workers 16
    cat $exp/compare/results.md ;;
  *) echo "$0: unknown phase $phase (uniform, one_stage, two_stage, two_stage_search or compare)" >&2; exit 1 ;;
esac
