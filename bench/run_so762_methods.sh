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
# conf/mixed/so762_conformer.yaml. FLOAT (default exp/asr_train_conformer/final) is the float
# model every run starts from; METHOD_OPTS adds overrides to every run; JOBS (default 1) trains
# up to that many of a phase's runs at the same time on the one GPU (their wall-clock compression
# times are then not comparable). On an H200, 3 concurrent float trainings each ran at 0.9x
# their speed alone, while 9 concurrent QAT runs stalled (under 81 updates each in 8 minutes,
# each then with torch's default of one thread per core; jobs now split the cores, not yet
# measured on a GPU): keep JOBS at 3 or below. Results: egs/speechocean762/asr1/exp/methods_s$STEPS/.
set -euo pipefail
source "$(dirname "$0")/so762_env.sh"  # $root, $python, cli(); cd egs/speechocean762/asr1
phase=${1:?usage: $0 uniform|one_stage|two_stage|two_stage_search|all|compare}
steps=${STEPS:-600}
float=${FLOAT:-exp/asr_train_conformer/final}
[ -f $float/config.json ] || { echo "$0: no float model at $float: run bench/run_so762_allinone.sh baseline" >&2; exit 1; }
exp=exp/methods_s$steps
C=("$root/conf/mixed/so762_conformer.yaml" supernet.init_from=$float supernet.space=$root/conf/mixed/space_so762.yaml
   data.train=data/train data.valid=data/dev data.feat_cache_dir=dump/feats data.num_workers=16
   train.max_steps=$steps train.max_epochs=100 "supernet.anneal_steps=$((steps * 3 / 4))" ${METHOD_OPTS:-})
# --resume: a run cut off at the end of a device slot continues from its checkpoint next time.
train() { local dir=$1; shift; [ -f $exp/$dir/allocation.json ] || cli train --resume "${C[@]}" exp_dir=$exp/$dir "$@"; }
# job CMD...: one independent run (or chain of runs) of the phase; with JOBS=1 in the
# foreground (the first failure stops the phase), otherwise in the background while fewer than
# JOBS run, a failure recorded in $failed and reported at the end (`set -e` does not act inside
# a `||` list, hence the explicit `|| return` in the chains below).
jobs_max=${JOBS:-1}
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || { echo "$0: JOBS must be a positive integer, got '$jobs_max'" >&2; exit 2; }
failed=$(mktemp)
trap 'rm -f "$failed"' EXIT
# Concurrent runs share the CPU cores: each gets its part as its intra-op thread count (torch's
# default, one thread per core in every process, oversubscribes the CPU JOBS times).
job() {
  if [ "$jobs_max" -le 1 ]; then "$@"; return; fi
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  { OMP_NUM_THREADS=$(( $(nproc) / jobs_max > 0 ? $(nproc) / jobs_max : 1 )) "$@" || echo "$*" >> "$failed"; } &
}
kl_then_qat() {
  local t=$1
  [ -f $exp/s1_kl_b$t/allocation.json ] || \
    cli allocate "${C[@]}" supernet.target_bits=$t --method kl --out $exp/s1_kl_b$t --num-batches 8 --device cuda || return
  train two_stage_kl_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_kl_b$t/allocation.json
}
search_then_qat() {  # stage 1 = the same search on the frozen float model (only the logits train)
  local t=$1
  train s1_search_b$t supernet.target_bits=$t supernet.freeze_weights=true || return
  train two_stage_search_b$t supernet.strategy=fixed supernet.subnet=$exp/s1_search_b$t/allocation.json
}

uniform() { for b in ${UNIFORM_BITS:-8 4 3 2}; do job train uniform_b$b supernet.strategy=fixed supernet.subnet=L12_F640_H4_B$b; done; }
one_stage() { for t in ${TARGETS:-4 3}; do job train one_stage_b$t supernet.target_bits=$t; done; }
two_stage() { for t in ${TARGETS:-4 3}; do job kl_then_qat $t; done; }
two_stage_search() { for t in ${TARGETS:-4 3}; do job search_then_qat $t; done; }

case $phase in
  uniform|one_stage|two_stage|two_stage_search) $phase ;;
  all) uniform; one_stage; two_stage; two_stage_search ;;  # every training phase (JOBS at a time)
  compare)  # every run of $exp, whatever UNIFORM_BITS / TARGETS trained it; unfinished ones named
    runs=""
    for dir in $exp/uniform_b* $exp/one_stage_b* $exp/two_stage_kl_b* $exp/two_stage_search_b*; do
      [ -d "$dir" ] || continue  # a pattern that matched nothing
      run=$(basename $dir)       # e.g. two_stage_kl_b3 -> label two_stage_kl/b3
      if [ -f $dir/allocation.json ]; then runs="$runs ${run%_b*}/b${run##*_b}=$dir"
      else echo "$0: $dir not finished: left out" >&2; fi
    done
    cli compare $float $runs --data data/dev data/test --out $exp/compare --device cuda --num-workers 16 \
      $(lm_decode_opts)  # LM_WEIGHT: LM shallow fusion (bench/so762_env.sh)
    cat $exp/compare/results.md ;;
  *) echo "$0: unknown phase $phase (uniform, one_stage, two_stage, two_stage_search, all or compare)" >&2; exit 1 ;;
esac
wait
if [ -s "$failed" ]; then echo "$0: failed:" >&2; cat "$failed" >&2; exit 1; fi
