#!/usr/bin/env bash
# Pack egs/speechocean762/asr1/exp into $OUT/results.tgz for the trip back from a lent GPU,
# without checkpoints: the float Conformer's final/ is kept, so a lost machine does not cost the
# baseline (carry it back into exp/asr_train_conformer/final), and so is the best variant's; the
# supernets', twins', methods' and other variants' final models and the wav2vec2 models (360 MB
# each) are not packed. Files come back from $OUT at most 16 MiB each: a larger archive is split
# (cat results.tgz.part* | tar -xz).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${OUT:-}" ] || { echo "$0: OUT (the folder to pack into) is not set" >&2; exit 2; }
exp=$root/egs/speechocean762/asr1/exp
# The variant with the lowest dev WER (over its decode dirs: with the LM where it was decoded with
# one) keeps its final model, as exp/best_variant/<name>/final, so a run better than the baseline
# can start the next call's supernet; the other variants' models stay behind.
rm -rf "$exp/best_variant"
best=$(cd "$exp" 2>/dev/null && for f in variants/*/decode_*/dev/wer.json; do
  [ -f "$f" ] && [ -f "${f%%/decode_*}/final/config.json" ] && \
    echo "$("${PYTHON:-python3}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["wer"])' "$f") ${f%%/decode_*}"
done | sort -g | head -1 | cut -d' ' -f2)
[ -z "$best" ] || { mkdir -p "$exp/best_variant/$(basename "$best")" && cp -r "$exp/$best/final" "$exp/best_variant/$(basename "$best")/"; }
tar -C "$root/egs/speechocean762/asr1" -czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.tmp' --exclude='*.packed.safetensors' \
    --exclude=dump --exclude='methods_*/*/final' --exclude='supernet_*/final' --exclude='twins/*/final' \
    --exclude='wav2vec2/*/final' --exclude='variants/*/final' exp 2>/dev/null
rm -rf "$exp/best_variant"  # (a copy)
if [ "$(stat -c %s "$OUT/results.tgz")" -gt $((15 * 1024 * 1024)) ]; then
  split -b 15M "$OUT/results.tgz" "$OUT/results.tgz.part" && rm "$OUT/results.tgz"
fi
echo "packed into \$OUT: $(cd "$OUT" && du -ch results.tgz* | tail -1 | cut -f1) ($(cd "$OUT" && ls results.tgz*))"
