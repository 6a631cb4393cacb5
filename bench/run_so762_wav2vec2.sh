#!/usr/bin/env bash
# Issue 7's experiment (a) on speechocean762 (one GPU): a wav2vec2-base-shaped CTC model
# trained FROM SCRATCH (no pretrained checkpoint can be fetched here; labelled as such in
# every table), then the path the Conformer experiments take, with the same tables:
#
#   bench/run_so762_wav2vec2.sh float     # float model (time-limited), dev / test WER greedy
#   bench/run_so762_wav2vec2.sh supernet  # all-in-one supernet from it (time-limited), then
#                                         # `allinone bench` of conf/grid_wav2vec2.yaml (16 systems)
#   bench/run_so762_wav2vec2.sh methods   # uniform 4-bit QAT and one-stage mixed precision at 4
#                                         # bits, STEPS updates each, `allinone compare` vs float
#
# Each phase is idempotent (a finished run is skipped, a cut one resumes from its checkpoint)
# and fits a 10-minute slot of a lent GPU with the defaults: FLOAT_MINUTES (4),
# SUPERNET_MINUTES (3), STEPS (300). Environment: DATA (default data: the Kaldi directories
# train, dev, test of egs/speechocean762/asr1), W2V_OPTS (overrides added to every training,
# e.g. "train.device=cpu" for a CPU dry run), DEVICE (decoding device, default cuda).
# Results: egs/speechocean762/asr1/exp/wav2vec2/.
set -euo pipefail
source "$(dirname "$0")/so762_env.sh"  # $root, $python, cli(); cd egs/speechocean762/asr1
phase=${1:?usage: $0 float|supernet|methods}
data=${DATA:-data}
device=${DEVICE:-cuda}
exp=exp/wav2vec2
float=$exp/float/final
sup=$exp/supernet
steps=${STEPS:-300}
common=(data.train=$data/train data.valid=$data/dev data.feat_cache_dir=dump/wav data.num_workers=16 ${W2V_OPTS:-})
need_float() { [ -f $float/config.json ] || { echo "$0: no float model at $float: run the float phase" >&2; exit 1; }; }
mkdir -p $exp

case $phase in
  float)
    if [ ! -f $float/config.json ]; then
      cli train --resume conf/train_wav2vec2_base.yaml exp_dir=$exp/float "${common[@]}" \
        train.time_limit_minutes=${FLOAT_MINUTES:-4}
    fi
    for s in dev test; do
      [ -f $exp/float/decode_greedy/$s/wer.json ] || \
        cli decode $float --data $data/$s --out $exp/float/decode_greedy/$s --device $device --num-workers 16
    done ;;
  supernet)
    need_float
    if [ ! -f $sup/final/config.json ]; then
      "$python" ../../utils/merge_config.py conf/train_wav2vec2_base.yaml conf/train_wav2vec2_supernet.yaml > $exp/supernet.yaml
      cli train --resume $exp/supernet.yaml exp_dir=$sup supernet.init_from=$float "${common[@]}" \
        train.time_limit_minutes=${SUPERNET_MINUTES:-3}
    fi
    [ -f $sup/bench/report.md ] || cli bench $sup/final --grid conf/grid_wav2vec2.yaml --data $data/dev $data/test \
      --out $sup/bench --device $device --no-latency --num-workers 16
    cat $sup/bench/report.md ;;
  methods)
    need_float
    "$python" ../../utils/merge_config.py conf/train_wav2vec2_base.yaml conf/mixed_wav2vec2.yaml > $exp/mixed.yaml
    M=($exp/mixed.yaml supernet.init_from=$float "${common[@]}" train.max_steps=$steps train.max_epochs=1000
       "supernet.anneal_steps=$((steps * 3 / 4))")
    run() { local dir=$exp/methods_s$steps/$1; shift; [ -f $dir/allocation.json ] || cli train --resume "${M[@]}" exp_dir=$dir "$@"; }
    run uniform_b4 supernet.strategy=fixed supernet.subnet=L12_F3072_H12_B4
    run one_stage_b4 supernet.target_bits=4
    cli compare $float uniform/b4=$exp/methods_s$steps/uniform_b4 one_stage/b4=$exp/methods_s$steps/one_stage_b4 \
      --data $data/dev $data/test --out $exp/methods_s$steps/compare --device $device --num-workers 16
    cat $exp/methods_s$steps/compare/results.md ;;
  *) echo "$0: unknown phase $phase (float, supernet or methods)" >&2; exit 1 ;;
esac
