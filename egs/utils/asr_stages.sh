#!/usr/bin/env bash
# Stages that every recipe shares, written once (source after stage.sh). They read the
# recipe's variables python, config, asr_exp, common, train_opts, dumpdir, expdir,
# min_free_gb and call the recipe's own check_data.

# features_stage [SIGNATURE]: tokenizer, features and CMVN statistics (stage 2); SIGNATURE
# names the options the features depend on (e.g. "sp=0.9 1.0 1.1").
features_stage() {
  if ! is_done "$asr_exp/.stage2.done" "$@"; then
    check_data
    require_disk "$dumpdir" "$min_free_gb"
    run_logged "$asr_exp/log/stage2_features.log" "$python" ../../utils/prepare_features.py "$config" \
      exp_dir="$asr_exp" $common $train_opts
    mark_done "$asr_exp/.stage2.done" "$@"
  fi
  echo "tokenizer: $asr_exp/tokenizer; features: $dumpdir/feats; statistics: $asr_exp/feats_stats.npz"
}

# train_float_stage: the float baseline (stage 3), resuming an interrupted run.
train_float_stage() {
  if [ -f "$asr_exp/final/config.json" ]; then
    echo "already done ($asr_exp/final exists; delete it and $asr_exp/checkpoint.pt to retrain)"
  else
    check_data
    require_disk "$expdir" 2  # checkpoints and logs
    local resume=""
    [ -f "$asr_exp/checkpoint.pt" ] && { resume=--resume; echo "resuming from $asr_exp/checkpoint.pt"; }
    run_logged "$asr_exp/log/stage3_train.log" "$python" -m allinone.cli train "$config" exp_dir="$asr_exp" \
      $common $train_opts $resume
  fi
  echo "float model: $asr_exp/final (training log: $asr_exp/train.log)"
}
