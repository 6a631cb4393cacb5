#!/usr/bin/env bash
# speechocean762 (non-native read English, 2.9 h train): float Conformer baseline, all-in-one
# supernet, extraction of a grid of nested systems, decoding, benchmark.
#
# Stages: 1 data  2 tokenizer + features  3 float baseline  4 supernet  5 extract grid
#         6 decode + score  7 benchmark + report
#
#   ./run.sh                                            # everything, GPU configuration
#   ./run.sh --config conf/train_tiny.yaml --supernet_config conf/train_supernet_tiny.yaml \
#            --grid conf/grid_tiny.yaml --beam 1        # minutes on a CPU
#   ./run.sh --stage 6 --stop_stage 6                   # one stage
#   ./run.sh --stage 6 --lm_weight 0                    # decode without the n-gram LM
# A finished stage is not redone (stamp files, or the final model's existence); an interrupted
# training resumes from its checkpoint. Logs: <exp>/log/stageN_*.log.
set -euo pipefail
cd "$(dirname "$0")"

stage=1
stop_stage=7
corpus_root=${ALLINONE_DATA:-../../../../shared/data}/speechocean762
corpus_layout=shipped      # shipped (our copy) | original (the authors' WAVE/ train/ test/)
subset=0                   # >0: that many utterances per split (tests)
config=conf/train_conformer.yaml
supernet_config=conf/train_supernet.yaml
grid=conf/grid24.yaml
train_opts=""              # extra key=value overrides for both trainings, e.g. "train.device=cpu"
datadir=data
dumpdir=dump
expdir=exp
test_sets="dev test"
nj=4                       # feature-extraction / decoding worker processes
beam=10                    # 1 = CTC greedy; >1 = CTC prefix beam search + attention rescoring
ctc_weight=0.3
lm_weight=1.5              # > 0 (with beam > 1): shallow fusion of a token n-gram LM of the
lm_order=12                #   training transcripts (allinone lm), trained in stage 6; 0 = none
length_bonus=1.5           # added to the fused score per output token (with the LM only)
                           # (weight, order and bonus chosen on dev: docs/benchmarks.md 4i, 4j)
device=auto                # decoding and benchmark device: auto | cpu | cuda
min_free_gb=2
python=../../../.venv/bin/python
. ../../utils/parse_options.sh
. ../../utils/stage.sh
. ../../utils/asr_stages.sh
. ../../utils/decode.sh

[ -x "$python" ] || python=$(command -v python3)
[[ $lm_weight =~ ^([0-9]+([.][0-9]*)?|[.][0-9]+)$ ]] || { echo "$0: --lm_weight must be a number >= 0, got '$lm_weight'" >&2; exit 1; }
[ "$device" != auto ] || device=$("$python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
require_file "$config" "training config (--config)"
require_file "$supernet_config" "supernet config (--supernet_config)"
asr_exp=$expdir/asr_$(basename "$config" .yaml)
sup_exp=$expdir/supernet_$(basename "$supernet_config" .yaml)
common="data.train=$datadir/train data.valid=$datadir/dev data.feat_cache_dir=$dumpdir/feats data.num_workers=$nj"
cli() { "$python" -m allinone.cli "$@"; }
# A supernet belongs to the float model it started from: stage 4 writes that model's run name and
# weights checksum here, and stages 4-7 stop rather than reuse, extract or bench a supernet of
# another --config in the same --expdir, or of a float model retrained since.
sup_origin=$sup_exp/.float_model
float_checksum() { cat "$asr_exp"/final/*.safetensors 2>/dev/null | cksum | cut -d' ' -f1; }  # (also stage 7's stamp)
float_origin() { echo "$(basename "$asr_exp") $(float_checksum)"; }
if [ "$stop_stage" -ge 4 ] && [ "$stage" -le 7 ] && [ -f "$sup_origin" ]; then
  read -r origin_run origin_sum < "$sup_origin"
  [ "$origin_run" = "$(basename "$asr_exp")" ] || \
    die "$sup_exp was trained from $origin_run, not from $(basename "$asr_exp") (--config $config): use another --expdir"
  [ ! -f "$asr_exp/final/config.json" ] || [ "$(float_origin)" = "$origin_run $origin_sum" ] || \
    die "$asr_exp/final changed since $sup_exp was trained from it: delete $sup_exp to train it again, or use another --expdir"
fi

if run_stage 1 "data preparation ($corpus_layout layout: $corpus_root -> $datadir)"; then
  sig="root=$corpus_root layout=$corpus_layout subset=$subset"
  if ! is_done "$datadir/.stage1.done" "$sig"; then
    require_dir "$corpus_root" "speechocean762 corpus root" "pass --corpus_root, or set ALLINONE_DATA"
    if [ "$corpus_layout" = original ]; then
      require_dir "$corpus_root/WAVE" "speechocean762 audio folder" "the authors' layout has WAVE/SPEAKERnnnn/*.WAV"
      for f in train/text train/utt2spk test/text test/utt2spk; do require_file "$corpus_root/$f" "speechocean762 transcript file"; done
    else
      for s in train dev test; do for f in wav.scp text; do require_file "$corpus_root/$s/$f" "speechocean762 $s list"; done; done
    fi
    run_logged "$datadir/log/stage1_data.log" local/data.sh "$corpus_root" "$corpus_layout" "$subset" "$datadir" "$python"
    mark_done "$datadir/.stage1.done" "$sig"
  fi
  echo "data directories: $datadir/{train,dev,test}"
fi

check_data() {
  for s in train $test_sets; do
    for f in wav.scp text; do require_file "$datadir/$s/$f" "data list" "run stage 1 first"; done
  done
}

if run_stage 2 "tokenizer and features (config $config)"; then
  features_stage
fi

if run_stage 3 "float baseline training ($config -> $asr_exp)"; then
  train_float_stage
fi

if run_stage 4 "all-in-one supernet training ($supernet_config over $config -> $sup_exp)"; then
  if [ -f "$sup_exp/final/config.json" ]; then
    echo "already done ($sup_exp/final exists; delete it and $sup_exp/checkpoint.pt to retrain)"
  else
    check_data
    require_file "$asr_exp/final/config.json" "float baseline model" "run stage 3 first"
    require_disk "$expdir" "$min_free_gb"
    mkdir -p "$sup_exp" && float_origin > "$sup_origin"
    # The supernet starts from the float model, so it must use the float model's tokenizer.
    [ -d "$sup_exp/tokenizer" ] || cp -r "$asr_exp/final/tokenizer" "$sup_exp/tokenizer"
    "$python" ../../utils/merge_config.py "$config" "$supernet_config" > "$sup_exp/config.in.yaml"
    resume=""; [ -f "$sup_exp/checkpoint.pt" ] && { resume=--resume; echo "resuming from $sup_exp/checkpoint.pt"; }
    run_logged "$sup_exp/log/stage4_train.log" cli train "$sup_exp/config.in.yaml" exp_dir="$sup_exp" \
      supernet.init_from="$asr_exp/final" $common $train_opts $resume
  fi
  echo "supernet: $sup_exp/final (training log: $sup_exp/train.log)"
fi

if run_stage 5 "extract the grid $grid"; then
  if ! is_done "$sup_exp/extracted/.done" "grid=$grid"; then
    require_file "$grid" "grid file (--grid)"
    require_file "$sup_exp/final/config.json" "supernet model" "run stage 4 first"
    rm -rf "$sup_exp/extracted"
    run_logged "$sup_exp/log/stage5_extract.log" cli extract "$sup_exp/final" --grid "$grid" --out "$sup_exp/extracted"
    mark_done "$sup_exp/extracted/.done" "grid=$grid"
  fi
  echo "extracted systems: $sup_exp/extracted/<subnet>"
fi

# setup_lm: what stages 6 and 7 decode with. With --lm_weight > 0 and --beam > 1, the n-gram LM
# of the training transcripts (trained once, over the float model's units: the supernet and its
# systems share its tokenizer) in $lm; $decode_dir names the decoding settings.
setup_lm() {
  decode_dir=decode_beam$beam lm=""
  awk -v w="$lm_weight" 'BEGIN { exit !(w + 0 != 0) }' && [ "$beam" -gt 1 ] || return 0  # 0, 0.0: no LM
  require_file "$asr_exp/final/config.json" "float model (its tokenizer gives the LM's units)" "run stage 3 first"
  lm=$expdir/lm/units${lm_order}.arpa
  [ -f "$lm" ] || run_logged "$expdir/lm/log/lm.log" cli lm "$datadir/train/text" --tokenizer "$asr_exp/final" \
    --order "$lm_order" --out "$lm"
  decode_dir=${decode_dir}_lm${lm_order}w${lm_weight}b${length_bonus}
}

if run_stage 6 "decode and score ($test_sets)"; then
  check_data
  setup_lm
  if [ -f "$asr_exp/final/config.json" ]; then decode_model "$asr_exp/final" "$asr_exp/$decode_dir"; fi
  if [ -d "$sup_exp/extracted" ]; then
    for m in "$sup_exp"/extracted/*/; do
      [ -f "$m/config.json" ] || continue
      decode_model "${m%/}" "$sup_exp/$decode_dir/$(basename "$m")"
    done
  fi
  "$python" ../../utils/show_results.py "$asr_exp/$decode_dir" "$sup_exp/$decode_dir" > "$expdir/RESULTS.md"
  cat "$expdir/RESULTS.md"
  echo "results: $expdir/RESULTS.md (per system: <decode dir>/<set>/wer.json, alignments.txt, hyp.trn)"
fi

if run_stage 7 "benchmark and report (allinone bench)"; then
  if ! cli bench --help >/dev/null 2>&1; then
    echo "skipped: this allinone has no 'bench' command yet"
  else
    setup_lm  # the systems are decoded as stage 6 decodes them
    # Significance against the float model the supernet started from (method.md's 32-bit model),
    # not the supernet's own largest subnet, which its training changed too. (The stamp names the
    # float model by its weights' checksum: another model copied into $asr_exp is benched again.)
    float_sig="float=$asr_exp/final:$(float_checksum)"
    if ! is_done "$sup_exp/bench/.done" "grid=$grid $decode_dir $float_sig"; then
      require_file "$sup_exp/final/config.json" "supernet model" "run stage 4 first"
      check_data
      sets=(); for s in $test_sets; do sets+=("$datadir/$s"); done
      run_logged "$sup_exp/log/stage7_bench.log" cli bench "$sup_exp/final" --grid "$grid" --data "${sets[@]}" \
        --out "$sup_exp/bench" --beam "$beam" --device "$device" --num-workers "$nj" --float-model "$asr_exp/final" \
        ${lm:+--lm "$lm" --lm-weight "$lm_weight" --length-bonus "$length_bonus"}
      mark_done "$sup_exp/bench/.done" "grid=$grid $decode_dir $float_sig"
    fi
  fi
  [ ! -d "$sup_exp/bench" ] || echo "benchmark: $sup_exp/bench (report.md first)"
fi
