#!/usr/bin/env bash
# Issue 5's experiment on speechocean762 (one GPU or several): one all-in-one supernet run against
# individually trained twins of the grid's corners, in three phases that each fit a
# 10-minute slot of a lent GPU (run them in order; each is idempotent):
#
#   bench/run_so762_allinone.sh baseline   # recipe stages 2-3: tokenizer, features, float model;
#                                          # stage 6: its dev / test WER (greedy)
#   bench/run_so762_allinone.sh supernet   # recipe stage 4 (time-limited) + bench of grid24
#   bench/run_so762_allinone.sh twins      # each corner trained alone for the supernet's number
#                                          # of updates, then compared with its nested twin
#
# The data directories must be in egs/speechocean762/asr1/data/{train,dev,test} (recipe
# stage 1, or the shipped lists copied there with audio/ beside them).  Environment:
# BASELINE_OPTS adds overrides to the float model's training (e.g. train.max_epochs=30) and
# DECODE_SETS (default "dev test") chooses the sets the baseline phase decodes, VARIANTS
# (e.g. "tm10:specaug.num_time_masks=10;do2:model.encoder.dropout_rate=0.2") adds variants of
# the float config trained alongside it into exp/variants/<name> (name them <config>_s<seed> to
# get mean +- sd over seeds in exp/runs_table.md, bench/runs_table.py);
# LM_WEIGHT (with LM_ORDER, LM_BONUS; bench/so762_env.sh) decodes with LM shallow fusion: the
# baseline phase decodes every run again with it, supernet and twins decode only with it;
# SUPERNET_CONFIG (default conf/train_supernet.yaml, with one random subnet a step instead of its
# two, as measured; conf/train_supernet_targets.yaml trains the grid's corners every step) chooses
# the supernet, into exp/supernet_<its name>; SUPERNET_OPTS adds overrides to its training (e.g.
# train.max_steps=700) and SUPERNET_MINUTES (default 5) bounds its training time (over resumed
# calls too). The twins (one exp/twins for every supernet: one set of twins at a time) train for
# the supernet's number of updates, or TWIN_STEPS (to train them beside it; checked against the
# supernet's before the comparison), with TWIN_OPTS added (e.g. train.seed=1); their comparison
# goes to exp/twins/compare (the default supernet's) or exp/twins/compare_<its name>.
# TRAIN_BASELINE=0 trains the variants but not the float model (brought from another run). On a
# machine of several GPUs the variants and the twins spread over them (CUDA_VISIBLE_DEVICES picks
# which). Results land in egs/speechocean762/asr1/exp/ (bench: supernet_<name>/bench).
set -euo pipefail
source "$(dirname "$0")/so762_env.sh"  # $root, $python, cli(); cd egs/speechocean762/asr1
phase=${1:?usage: $0 baseline|supernet|twins}
asr_exp=exp/asr_train_conformer
supernet_config=${SUPERNET_CONFIG:-conf/train_supernet.yaml}
sup_name=$(basename "$supernet_config" .yaml)
sup_exp=exp/supernet_$sup_name
twins_compare=exp/twins/compare; [ "$sup_name" = train_supernet ] || twins_compare=exp/twins/compare_$sup_name
corners="L12_F640_H4_B2 L6_F320_H4_B32 L6_F320_H4_B2"  # the fourth corner, L12_F640_H4_B32, is the float model

case $phase in
  baseline)
    # VARIANTS="name:overrides;name:overrides": variants of the float config trained at the same
    # time as the baseline (on one GPU they share it: the step is launch-bound, so concurrent runs
    # slow each other little), into exp/variants/<name>, with the baseline's tokenizer, features
    # and statistics.
    pids=() names=()
    IFS=';' read -ra variants <<< "${VARIANTS:-}"
    for v in "${variants[@]}"; do  # every entry checked before any work
      [[ $v == *:* && -n $(echo ${v%%:*}) ]] || { echo "$0: VARIANTS entry '$v' is not name:overrides" >&2; exit 2; }
    done
    ./run.sh --stage 2 --stop_stage 2 --nj 16 --python "$python" ${BASELINE_OPTS:+--train_opts "$BASELINE_OPTS"}
    for i in "${!variants[@]}"; do
      v=${variants[$i]} name=$(echo ${variants[$i]%%:*}) dir=exp/variants/$name
      mkdir -p $dir && cp -rn $asr_exp/tokenizer $asr_exp/feats_stats.npz $dir/
      # the variant's own overrides last: they win over BASELINE_OPTS; with several GPUs the
      # variants go round robin over them (the baseline itself trains on the first)
      [ -f $dir/final/config.json ] || on_gpu $((i + 1)) cli train --resume conf/train_conformer.yaml exp_dir=$dir \
        data.train=data/train data.valid=data/dev data.feat_cache_dir=dump/feats ${BASELINE_OPTS:-} ${v#*:} \
        > $dir/stdout.log 2>&1 &
      pids+=($!) names+=("$name")
    done
    # TRAIN_BASELINE=0: the variants alone (the float model comes from another run, copied into
    # $asr_exp later; the phase run again with it decodes it and tabulates it with them)
    [ "${TRAIN_BASELINE:-1}" = 0 ] || \
      on_gpu 0 ./run.sh --stage 3 --stop_stage 3 --nj 16 --python "$python" ${BASELINE_OPTS:+--train_opts "$BASELINE_OPTS"}
    for i in "${!pids[@]}"; do wait ${pids[$i]} || echo "$0: variant ${names[$i]} failed: see exp/variants/${names[$i]}/stdout.log" >&2; done
    # dev and test WER of the float model, greedy (the baseline's number for issue 2);
    # DECODE_SETS=dev where the test audio is not there yet (a lent GPU's 64 MiB carry limit)
    [ ! -f $asr_exp/final/config.json ] || \
      ./run.sh --stage 6 --stop_stage 6 --beam 1 --python "$python" --device cuda --test_sets "${DECODE_SETS:-dev test}"
    for name in "${names[@]}"; do
      for s in ${DECODE_SETS:-dev test}; do
        d=exp/variants/$name
        [ ! -f $d/final/config.json ] || [ -f $d/decode_beam1/$s/wer.json ] || \
          cli decode $d/final --data data/$s --out $d/decode_beam1/$s --beam 1 --device cuda --num-workers 16
      done
    done
    # one table of the baseline and its variants (plateau takeoff, seed groups of <name>_s<N>)
    # (a variant that failed before its first epoch has no history and is left out)
    runs=$(for d in $asr_exp ${names[@]/#/exp/variants/}; do [ ! -f $d/history.json ] || echo $d; done)
    "$python" "$root/bench/runs_table.py" $runs --out exp/runs_table.md
    # LM_WEIGHT (so762_env.sh): every run decoded again with the LM fused in (CPU-bound: one
    # process per run and set, side by side), then a second table
    if [ -n "${LM_WEIGHT:-}" ]; then
      opts=$(lm_decode_opts) dec=decode_beam10_lm${LM_ORDER}w${LM_WEIGHT}b${LM_BONUS}
      lm_pids=()
      for d in $runs; do
        for s in ${DECODE_SETS:-dev test}; do
          [ ! -f $d/final/config.json ] || [ -f $d/$dec/$s/wer.json ] || {
            OMP_NUM_THREADS=1 cli decode $d/final --data data/$s --out $d/$dec/$s $opts --num-workers 1 \
              > /dev/null 2>&1 & lm_pids+=($!); }
        done
      done
      for p in "${lm_pids[@]}"; do wait $p || echo "$0: an LM decode failed (see the runs' $dec)" >&2; done
      "$python" "$root/bench/runs_table.py" $runs --decode-dir $dec --out exp/runs_table_lm.md
    fi
    ;;
  supernet)
    # Fine-tuning from the float model for a fixed time: a short warmup and half the
    # baseline's peak lr; the default config with one random subnet per step besides the
    # largest and smallest (the setting of docs/benchmarks.md 10-10d); another config as it is.
    one_random=supernet.num_random=1; [ -z "${SUPERNET_CONFIG:-}" ] || one_random=""
    ./run.sh --stage 4 --stop_stage 4 --nj 16 --python "$python" --supernet_config "$supernet_config" --train_opts \
      "train.time_limit_minutes=${SUPERNET_MINUTES:-5} optim.warmup_steps=200 optim.lr=5e-4 $one_random ${SUPERNET_OPTS:-}"
    cli bench "$sup_exp/final" --grid conf/grid24.yaml --data data/dev data/test --out "$sup_exp/bench" \
      --device cuda --no-latency --num-workers "$(nproc)" --float-model "$asr_exp/final" $(lm_decode_opts)
    ;;
  twins)
    # Each twin: the same float starting point, importance ordering, loss (labels + KL to the
    # float model) and number of optimizer updates as the supernet, one system per run.
    # (TWIN_STEPS: that many updates without waiting for the supernet, e.g. side by side with it
    # on another GPU; the twins are then checked against the supernet's own count when compared)
    last_step() { "$python" -c "import json; print(json.load(open('$1/history.json'))[-1]['step'])"; }
    steps=${TWIN_STEPS:-$(last_step "$sup_exp")}
    [[ $steps =~ ^[1-9][0-9]*$ ]] || { echo "$0: the twins' number of updates must be a positive integer, got '$steps'" >&2; exit 2; }
    # the supernet's own config (run.sh stage 4 merges the same two files), so the twins need
    # nothing of its run until the comparison
    mkdir -p exp/twins
    "$python" ../../utils/merge_config.py conf/train_conformer.yaml "$supernet_config" > exp/twins/config.in.yaml
    train_twin() {  # SUBNET GPU_INDEX
      [ -f "exp/twins/$1/allocation.json" ] || on_gpu $2 cli train exp/twins/config.in.yaml exp_dir="exp/twins/$1" \
        data.train=data/train data.valid=data/dev data.feat_cache_dir=dump/feats data.num_workers=16 \
        supernet.init_from="$asr_exp/final" supernet.strategy=fixed supernet.subnet="$1" \
        supernet.label_weight=1.0 optim.warmup_steps=200 optim.lr=5e-4 train.max_steps="$steps" ${TWIN_OPTS:-}
    }
    # one twin after another on one GPU; side by side, round robin over the GPUs, where there
    # are several
    runs="" i=0 pids=() failed=0
    for s in $corners; do
      if [ ${#gpus[@]} -gt 1 ]; then train_twin $s $i > exp/twins/$s.stdout.log 2>&1 & pids+=($!); else train_twin $s $i; fi
      runs="$runs twin/$s=exp/twins/$s" i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait $p || failed=1; done
    [ $failed = 0 ] || { echo "$0: a twin failed (see exp/twins/*.stdout.log)" >&2; exit 1; }
    # every twin (trained now or before) and the supernet: the same number of updates
    for s in $corners; do
      had=$(last_step exp/twins/$s 2>/dev/null) || had=no
      [ "$had" = "$steps" ] || { echo "$0: exp/twins/$s ran $had updates, not $steps: move exp/twins away" >&2; exit 1; }
    done
    had=$(last_step "$sup_exp" 2>/dev/null) || had=no
    [ "$had" = "$steps" ] || \
      { echo "$0: the twins ran $steps updates (TWIN_STEPS or an earlier run), $sup_exp ran $had updates" >&2; exit 1; }
    cli compare "$asr_exp/final" $runs --data data/dev data/test --out "$twins_compare" --device cuda \
      --num-workers "$(nproc)" --nested "$sup_exp/bench" $(lm_decode_opts)
    ;;
  *) echo "$0: unknown phase $phase (baseline, supernet or twins)" >&2; exit 1 ;;
esac
