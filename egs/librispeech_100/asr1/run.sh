#!/usr/bin/env bash
# LibriSpeech-100: the ESPnet LibriSpeech-100 Conformer as float baseline, trained on
# train-clean-100 (optionally speed-perturbed), evaluated on dev-clean/other, test-clean/other.
#
# Stages: 1 data  2 tokenizer + features  3 float baseline training  4 decode + score
#
#   ./run.sh --librispeech /path/to/LibriSpeech
#   ./run.sh --librispeech /path/to/LibriSpeech --speed_perturb "1.0"     # no perturbation
#   ./run.sh --librispeech ... --init_from /path/to/hubert_or_wav2vec2    # CTC fine-tuning instead
#     (a local Hugging Face Wav2Vec2ForCTC / HubertForCTC directory or a fairseq checkpoint;
#      config conf/finetune_wav2vec2.yaml unless --config is given)
# A finished stage is not redone; an interrupted training resumes. Logs: <exp>/log/stageN_*.log.
set -euo pipefail
cd "$(dirname "$0")"

stage=1
stop_stage=4
librispeech=               # the LibriSpeech folder holding train-clean-100/, dev-clean/, ...
allow_missing_subsets=false  # true: use only the evaluation subsets present (tests)
speed_perturb="0.9 1.0 1.1"
init_from=                 # a local wav2vec2 / HuBERT checkpoint to fine-tune instead of the Conformer
trust_pickle=false         # true: allow a fairseq checkpoint's pickled objects (only for files you trust)
config=                    # default: conf/train_conformer.yaml, or conf/finetune_wav2vec2.yaml with --init_from
train_opts=""              # extra key=value overrides, e.g. "train.max_epochs=35"
datadir=data
dumpdir=dump
expdir=exp
test_sets=                 # default: every evaluation subset prepared in stage 1
nj=8
beam=10
ctc_weight=0.3
device=auto
min_free_gb=20             # features of train-clean-100 x 3 speeds are about 15 GB
python=../../../.venv/bin/python
. ../../utils/parse_options.sh
. ../../utils/stage.sh
. ../../utils/asr_stages.sh
. ../../utils/decode.sh

[ -x "$python" ] || python=$(command -v python3)
[ "$device" != auto ] || device=$("$python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ -n "$init_from" ]; then
  # Checked first: a user asking for a pretrained start must not get a from-scratch model.
  [ -e "$init_from" ] || die "--init_from $init_from does not exist (a Hugging Face model directory or a fairseq checkpoint file)"
  # Load it once now (seconds): a wrong file must fail before hours of data preparation.
  "$python" - "$init_from" "$trust_pickle" <<'EOF' || die "--init_from $init_from is not a usable wav2vec2/HuBERT checkpoint (reason above)"
import sys
from allinone.train.trainer import load_pretrained_wav2vec2
try:
    load_pretrained_wav2vec2(sys.argv[1], vocab_size=2, trust_pickle=sys.argv[2] == "true")
except ValueError as e:
    sys.exit(f"error: {e}")
EOF
  config=${config:-conf/finetune_wav2vec2.yaml}
  train_opts="model.init_from=$(cd "$(dirname "$init_from")" && pwd)/$(basename "$init_from") model.trust_pickle=$trust_pickle $train_opts"
fi
config=${config:-conf/train_conformer.yaml}
require_file "$config" "training config (--config)"
asr_exp=$expdir/asr_$(basename "$config" .yaml)
sp_list="[$(echo $speed_perturb | tr ' ' ',')]"
common="data.train=$datadir/train_clean_100 data.valid=$datadir/dev data.feat_cache_dir=$dumpdir/feats data.num_workers=$nj data.speed_perturb=$sp_list"

if run_stage 1 "data preparation (LibriSpeech: ${librispeech:-unset} -> $datadir)"; then
  sig="librispeech=$librispeech allow_missing=$allow_missing_subsets"
  if ! is_done "$datadir/.stage1.done" "$sig"; then
    [ -n "$librispeech" ] || die "pass --librispeech /path/to/LibriSpeech (the folder holding train-clean-100/, dev-clean/, ...)"
    require_dir "$librispeech" "LibriSpeech root (--librispeech)"
    require_dir "$librispeech/train-clean-100" "LibriSpeech training subset" "download train-clean-100 from openslr.org/12"
    require_dir "$librispeech/dev-clean" "LibriSpeech validation subset" "download dev-clean from openslr.org/12"
    for s in dev-other test-clean test-other; do
      [ -d "$librispeech/$s" ] || [ "$allow_missing_subsets" = true ] || \
        die "LibriSpeech evaluation subset not found: $librispeech/$s (download it from openslr.org/12, or pass --allow_missing_subsets true to use only the subsets present)"
    done
    require_disk "$datadir" 1
    run_logged "$datadir/log/stage1_data.log" local/data.sh "$librispeech" "$datadir" "$python" "$allow_missing_subsets"
    mark_done "$datadir/.stage1.done" "$sig"
  fi
  echo "data directories: $datadir/{$(tr ' ' ',' < "$datadir/subsets"),dev}"
fi

if [ -z "$test_sets" ] && [ -f "$datadir/subsets" ]; then
  test_sets=$(tr ' ' '\n' < "$datadir/subsets" | grep -v '^train' | tr '\n' ' ')
fi
check_data() {
  for s in train_clean_100 dev $test_sets; do
    for f in wav.scp text; do require_file "$datadir/$s/$f" "data list" "run stage 1 first"; done
  done
}

if run_stage 2 "tokenizer and features (config $config, speed perturbation $sp_list)"; then
  features_stage "sp=$sp_list"
fi

if run_stage 3 "float baseline training ($config -> $asr_exp)"; then
  train_float_stage
fi

if run_stage 4 "decode and score ($test_sets)"; then
  check_data
  require_file "$asr_exp/final/config.json" "float model" "run stage 3 first"
  decode_model "$asr_exp/final" "$asr_exp/decode_beam$beam"
  "$python" ../../utils/show_results.py "$asr_exp/decode_beam$beam" > "$expdir/RESULTS.md"
  cat "$expdir/RESULTS.md"
  echo "results: $expdir/RESULTS.md (per set: $asr_exp/decode_beam$beam/<set>/wer.json)"
fi
