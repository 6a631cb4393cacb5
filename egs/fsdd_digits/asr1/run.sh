#!/usr/bin/env bash
# Connected-digit recognition on the shipped FSDD recordings: the CPU demo.
# Stages: 1 data  2 train  3 decode and score.
set -euo pipefail
cd "$(dirname "$0")"
stage=1
stop_stage=3
data_root=../../../../shared/data   # the corpora we ship; override with --data_root
config=conf/train_demo.yaml
num_train=1200
num_test=200
python=../../../.venv/bin/python
. ../../utils/parse_options.sh
. ../../utils/stage.sh

fsdd="$data_root/fsdd"
exp=$(sed -n 's/^exp_dir: *//p' "$config")
[ -f "$fsdd/manifest.tsv" ] || { echo "$0: FSDD not found at $fsdd (expected manifest.tsv); pass --data_root" >&2; exit 1; }

if run_stage 1 "data: synthetic connected digits from FSDD"; then
  if [ -f data/.done ]; then echo "data/ already prepared"; else
    $python -m allinone.cli prepare fsdd-digits --src "$fsdd" --out data \
      --num-train $num_train --num-test $num_test --min-digits 2 --max-digits 5
    touch data/.done
  fi
fi
if run_stage 2 "train the Conformer (log: $exp/train.log)"; then
  if [ -f "$exp/final/config.json" ]; then echo "$exp/final exists"; else
    resume=""; [ -f "$exp/checkpoint.pt" ] && resume=--resume
    $python -m allinone.cli train "$config" $resume
  fi
fi
if run_stage 3 "decode the test set"; then
  $python -m allinone.cli decode "$exp/final" --data data/test --out "$exp/decode_test"
  echo "Task: connected digits, FSDD recordings concatenated (synthetic), 6 speakers seen in training."
  echo "Model: $(python3 -c "import json;c=json.load(open('$exp/final/config.json'));e=c['model']['encoder'];print(f\"Conformer {e['num_blocks']}x{e['output_size']}, CTC, {c['steps']} steps, {c['train_seconds']:.0f} s on CPU\")")"
  echo "Results: $exp/decode_test/wer.json"
fi
