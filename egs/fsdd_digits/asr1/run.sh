#!/usr/bin/env bash
# The CPU demo: an all-in-one supernet on connected spoken digits (shipped FSDD recordings).
# Stages: 1 data  2 float model  3 decode float  4 supernet  5 extract grid  6 benchmark grid
#         7 (not in `make demo`: ./run.sh --stage 7) twins: every grid system trained alone, against its nested system
set -euo pipefail
cd "$(dirname "$0")"
stage=1
stop_stage=6                        # --stop_stage 7 adds the twins (about 2 minutes per system)
data_root=../../../../shared/data   # the corpora we ship; override with --data_root
float_config=conf/train_demo.yaml
supernet_config=conf/train_supernet_demo.yaml
grid=conf/grid_demo.yaml
num_train=1200
num_test=200
python=../../../.venv/bin/python
. ../../utils/parse_options.sh
. ../../utils/stage.sh

allinone() { $python -m allinone.cli "$@"; }
fsdd="$data_root/fsdd"
float_exp=$(sed -n 's/^exp_dir: *//p' "$float_config")
sup_exp=$(sed -n 's/^exp_dir: *//p' "$supernet_config")
[ -f "$fsdd/manifest.tsv" ] || { echo "$0: FSDD not found at $fsdd (expected manifest.tsv); pass --data_root" >&2; exit 1; }

# train CONFIG EXP: train, resuming an interrupted run; a finished run is left alone.
train() {
  if [ -f "$2/final/config.json" ]; then echo "$2/final exists"; return; fi
  local resume=""; [ -f "$2/checkpoint.pt" ] && resume=--resume
  allinone train "$1" $resume
}

if run_stage 1 "data: synthetic connected digits from FSDD"; then
  if [ -f data/.done ]; then echo "data/ already prepared"; else
    allinone prepare fsdd-digits --src "$fsdd" --out data \
      --num-train $num_train --num-test $num_test --min-digits 2 --max-digits 5
    touch data/.done
  fi
fi
if run_stage 2 "train the float Conformer (log: $float_exp/train.log)"; then
  train "$float_config" "$float_exp"
fi
if run_stage 3 "decode the test set with the float model"; then
  allinone decode "$float_exp/final" --data data/test --out "$float_exp/decode_test"
fi
if run_stage 4 "train the all-in-one supernet from the float model (log: $sup_exp/train.log)"; then
  train "$supernet_config" "$sup_exp"
fi
if run_stage 5 "extract the grid $grid as packed models"; then
  allinone extract "$sup_exp/final" --grid "$grid" --out "$sup_exp/extracted"
fi
if run_stage 6 "benchmark the grid: WER, significance, size, latency"; then
  if allinone bench --help >/dev/null 2>&1; then
    # judged against the float model it started from (method.md's 32-bit model: supernet.init_from)
    init_from=$(sed -n 's/^ *init_from: *//p' "$supernet_config")
    allinone bench "$sup_exp/final" --grid "$grid" --data data/test --out "$sup_exp/bench" --threads 2 \
      ${init_from:+--float-model "$init_from"}
    cat "$sup_exp/bench/results.md"
    echo "Report: $sup_exp/bench/report.md"
  else
    for d in "$sup_exp"/extracted/*/; do allinone decode "$d" --data data/test --out "$d/decode_test"; done
  fi
  echo "Task: connected digits, FSDD recordings concatenated (synthetic), 6 speakers seen in training."
  echo "One supernet training run produced every system above; none was trained on its own."
fi
if run_stage 7 "twins: every grid system trained alone as long as the supernet, against its nested system"; then
  # Each twin: the supernet's config, float starting point and importance ordering, one fixed
  # subnet on labels + KL to the frozen float model (strategy fixed), the supernet's number of
  # updates; then allinone compare tests each nested system of stage 6's bench against its twin
  # (MAPSSWE) and sets the supernet's training time against all the twins'.
  [ -f "$sup_exp/bench/results.json" ] || { echo "$0: stage 7 needs stage 6's bench ($sup_exp/bench)" >&2; exit 1; }
  grep -q '^ *init_from:' "$supernet_config" || \
    { echo "$0: stage 7 needs supernet.init_from in $supernet_config (the float model the twins start from)" >&2; exit 1; }
  steps=$($python -c "import json, sys; print(json.load(open(sys.argv[1]))[-1]['step'])" "$sup_exp/history.json")
  # the bench's reference, its largest float subnet, is not trained alone: its twin is the float model
  ref=$($python -c "import json, sys; print(json.load(open(sys.argv[1]))['reference'])" "$sup_exp/bench/results.json")
  twins=$(dirname "$sup_exp")/twins runs=()
  for s in $(sed -n 's/^- *//p' "$grid"); do
    [ "$s" != "$ref" ] || continue
    [ -f "$twins/$s/allocation.json" ] || allinone train "$supernet_config" exp_dir="$twins/$s" \
      supernet.strategy=fixed supernet.subnet="$s" supernet.label_weight=1.0 train.max_steps="$steps" \
      $([ -f "$twins/$s/checkpoint.pt" ] && echo --resume)
    runs+=("twin/$s=$twins/$s")
  done
  [ ${#runs[@]} -gt 0 ] || { echo "$0: stage 7: the grid $grid has no system but the reference $ref" >&2; exit 1; }
  init_from=$(sed -n 's/^ *init_from: *//p' "$supernet_config")
  allinone compare "$init_from" "${runs[@]}" --data data/test --out "$twins/compare" --nested "$sup_exp/bench"
  echo "Table: $twins/compare/results.md"
fi
