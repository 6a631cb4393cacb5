#!/usr/bin/env bash
# decode_model MODEL_DIR OUT_DIR: decode every set of $test_sets ($datadir/<set>) with
# `allinone decode`, writing OUT_DIR/<set>/{wer.json,text,hyp.trn,ref.trn,alignments.txt};
# sets whose wer.json exists are skipped. Uses the recipe's $python $beam $ctc_weight $device $nj,
# and $lm (an ARPA file for shallow fusion, with $lm_weight and $length_bonus) when it is set.
decode_model() {
  local model=$1 out=$2 todo=() s
  for s in $test_sets; do [ -f "$out/$s/wer.json" ] || todo+=("$datadir/$s"); done
  if [ ${#todo[@]} -eq 0 ]; then echo "already decoded: $out"; return 0; fi
  # With several sets allinone decode writes $out/<set>; a single set needs its own --out.
  local dest=$out; [ ${#todo[@]} -gt 1 ] || dest=$out/$(basename "${todo[0]}")
  run_logged "$out/log/decode.log" "$python" -m allinone.cli decode "$model" --data "${todo[@]}" --out "$dest" \
    --beam "$beam" --ctc-weight "$ctc_weight" --device "$device" --num-workers "$nj" \
    ${lm:+--lm "$lm" --lm-weight "$lm_weight" --length-bonus "${length_bonus:-0}"}
}
