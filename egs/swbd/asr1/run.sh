#!/usr/bin/env bash
# Switchboard-300 (LDC97S62, ms98 transcripts) with Hub5'00 eval2000 (LDC2002S09 + LDC2002T43)
# and optional RT03 (LDC2007S10): the 12-layer 256-dim 2048-FFN Conformer with 2000 BPE units,
# scored with NIST hubscr (GLM normalisation) per subset: eval2000 swbd / callhome.
#
# Stages: 1 data  2 tokenizer + features  3 float baseline training  4 decode + hubscr scoring
#
#   ./run.sh --swbd /ldc/LDC97S62 --eval2000_speech /ldc/LDC2002S09/hub5e_00 \
#            --eval2000_transcripts /ldc/LDC2002T43 [--rt03 /ldc/LDC2007S10]
# A finished stage is not redone; an interrupted training resumes. Logs: <exp>/log/stageN_*.log.
set -euo pipefail
cd "$(dirname "$0")"

stage=1
stop_stage=4
swbd=                      # LDC97S62 root (swb1_d*/data/sw0NNNN.sph)
swbd_transcripts=          # default: $swbd/swb_ms98_transcriptions (NN/NNNN/swNNNN[AB]-ms98-a-trans.text)
eval2000_speech=           # LDC2002S09 hub5e_00 folder (english/*.sph)
eval2000_transcripts=      # LDC2002T43 root (reference/hub5e00.english.000405.stm, en20000405_hub5.glm)
rt03=                      # optional LDC2007S10 root (*.sph, one *.stm, *.glm)
dev_utts=4000              # train_dev: the first N utterances (Kaldi / ESPnet)
max_dup=300                # train_nodup: at most N copies of one transcript (Kaldi's remove_dup_utts.sh)
max_duration=20            # drop training segments longer than this (seconds; 0 = keep all)
speed_perturb="0.9 1.0 1.1"
config=conf/train_conformer.yaml
train_opts=""
datadir=data
dumpdir=dump
expdir=exp
nj=8
beam=10
ctc_weight=0.3
device=auto
sctk=/usr/lib/sctk/bin     # NIST SCTK (sclite, hubscr.pl)
min_free_gb=60             # features of 300 h x 3 speeds
python=../../../.venv/bin/python
. ../../utils/parse_options.sh
. ../../utils/stage.sh
. ../../utils/asr_stages.sh
. ../../utils/decode.sh

[ -x "$python" ] || python=$(command -v python3)
[ "$device" != auto ] || device=$("$python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
require_file "$config" "training config (--config)"
[ -n "$swbd_transcripts" ] || swbd_transcripts=$swbd/swb_ms98_transcriptions
asr_exp=$expdir/asr_$(basename "$config" .yaml)
sp_list="[$(echo $speed_perturb | tr ' ' ',')]"
common="data.train=$datadir/train_nodup data.valid=$datadir/train_dev data.feat_cache_dir=$dumpdir/feats data.num_workers=$nj data.speed_perturb=$sp_list"
test_sets=eval2000; [ -z "$rt03" ] || test_sets="eval2000 rt03"

if run_stage 1 "data preparation (Switchboard-1, eval2000${rt03:+, RT03} -> $datadir)"; then
  sig="swbd=$swbd trans=$swbd_transcripts eval2000=$eval2000_speech,$eval2000_transcripts rt03=$rt03 dev=$dev_utts dup=$max_dup dur=$max_duration"
  if ! is_done "$datadir/.stage1.done" "$sig"; then
    [ -n "$swbd" ] || die "pass --swbd /path/to/LDC97S62"
    [ -n "$eval2000_speech" ] && [ -n "$eval2000_transcripts" ] || \
      die "pass --eval2000_speech /path/to/LDC2002S09/hub5e_00 and --eval2000_transcripts /path/to/LDC2002T43"
    require_dir "$swbd" "Switchboard-1 audio (--swbd)" "LDC97S62: swb1_d*/data/*.sph"
    require_dir "$swbd_transcripts" "Switchboard ms98 transcripts (--swbd_transcripts)" "swb_ms98_transcriptions/NN/NNNN/*-ms98-a-trans.text"
    [ -n "$(find "$swbd_transcripts" -name '*-ms98-a-trans.text' -print -quit)" ] || \
      die "Switchboard transcript files not found: no *-ms98-a-trans.text under $swbd_transcripts"
    require_dir "$eval2000_speech" "eval2000 speech (--eval2000_speech)" "LDC2002S09 hub5e_00 with english/*.sph"
    require_dir "$eval2000_transcripts" "eval2000 transcripts (--eval2000_transcripts)" "LDC2002T43 with reference/*.stm"
    [ -z "$rt03" ] || require_dir "$rt03" "RT03 corpus (--rt03)"
    require_disk "$datadir" 1
    run_logged "$datadir/log/stage1_data.log" local/data.sh "$swbd" "$swbd_transcripts" "$dev_utts" "$max_dup" "$max_duration" "$datadir" "$python"
    run_logged "$datadir/log/stage1_data.log" local/test_data.sh eval2000 "$eval2000_speech" "$eval2000_transcripts" "$datadir" "$python"
    [ -z "$rt03" ] || run_logged "$datadir/log/stage1_data.log" local/test_data.sh rt03 "$rt03" "$rt03" "$datadir" "$python"
    mark_done "$datadir/.stage1.done" "$sig"
  fi
  echo "data directories: $datadir/{train_nodup,train_dev,${test_sets// /,}}"
fi

check_data() {
  for s in train_nodup train_dev $test_sets; do
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
  dec=$asr_exp/decode_beam$beam
  decode_model "$asr_exp/final" "$dec"
  for s in $test_sets; do
    run_logged "$dec/log/score_$s.log" local/score.sh "$datadir/$s" "$dec/$s" "$python" "$sctk"
  done
  "$python" ../../utils/show_results.py "$dec" > "$expdir/RESULTS.md"
  echo "results: $expdir/RESULTS.md (our WER on normalised text); NIST scoring: $dec/<set>/score_hubscr/results.json"
fi
