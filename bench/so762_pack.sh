#!/usr/bin/env bash
# Pack egs/speechocean762/asr1/exp into $OUT for the trip back from a lent GPU, within what
# comes back from there (at most 8 files of 16 MiB, 64 MiB together, the logs already in $OUT
# included):
#   $OUT/results.tgz  the results without checkpoints or models (tables, decodes, bench records,
#                     histories, logs): always packed, first;
#   $OUT/models.tgz   the best variant's final model (exp/best_variant/<name>/final), then the
#                     float Conformer's (exp/asr_train_conformer/final), each only while the
#                     total stays within the limit, so a lost machine does not cost them; the
#                     float model is the one left out first (it is usually the one carried in).
# The supernets', twins', methods' and other variants' final models and the wav2vec2 models
# (360 MB each) are never packed. An archive over 15 MiB is split (results.tgz.partaa, ...:
# cat results.tgz.part* | tar -xz). PACK_LIMIT_BYTES and PACK_PART_BYTES change the two sizes.
# Exits 0 also when something does not fit (it says what): the results are worth what came back.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${OUT:-}" ] || { echo "$0: OUT (the folder to pack into) is not set" >&2; exit 2; }
limit=${PACK_LIMIT_BYTES:-$((64 * 1024 * 1024))} part=${PACK_PART_BYTES:-$((15 * 1024 * 1024))} max_files=8
recipe=$root/egs/speechocean762/asr1 exp=$root/egs/speechocean762/asr1/exp
mkdir -p "$OUT" && rm -f "$OUT"/results.tgz* "$OUT"/models.tgz*  # (a pack run again replaces its own archives)
used() { find "$OUT" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }
# files that will come back: the archives as the parts they will be split into, the rest as they are
files() { find "$OUT" -type f -printf '%s %f\n' | awk -v p="$part" '
  $2 ~ /^(results|models)\.tgz$/ { n += int(($1 + p - 1) / p); next } { n += 1 } END { print n + 0 }'; }
fits() { [ "$(used)" -le "$limit" ] && [ "$(files)" -le "$max_files" ]; }

# The variant with the lowest dev WER (over its decode dirs: with the LM where it was decoded with
# one) keeps its final model, so a run better than the baseline can start the next call's supernet.
rm -rf "$exp/best_variant"
best=$(cd "$exp" 2>/dev/null && for f in variants/*/decode_*/dev/wer.json; do
  [ -f "$f" ] && [ -f "${f%%/decode_*}/final/config.json" ] && \
    echo "$("${PYTHON:-python3}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["wer"])' "$f") ${f%%/decode_*}"
done | sort -g | head -1 | cut -d' ' -f2)
[ -z "$best" ] || { mkdir -p "$exp/best_variant/$(basename "$best")" && cp -r "$exp/$best/final" "$exp/best_variant/$(basename "$best")/"; }

tar -C "$recipe" -czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.tmp' --exclude='*.packed.safetensors' \
    --exclude=dump --exclude='*/final' --exclude=exp/best_variant exp 2>/dev/null
models=()
[ -z "$best" ] || models+=("exp/best_variant")
[ ! -f "$exp/asr_train_conformer/final/config.json" ] || models+=("exp/asr_train_conformer/final")
while [ ${#models[@]} -gt 0 ]; do  # drop models from the end until the total fits
  tar -C "$recipe" -czf "$OUT/models.tgz" --exclude='*.tmp' "${models[@]}" 2>/dev/null
  ! fits || break
  echo "$0: ${models[-1]} left out: the pack would exceed the $((limit / 1024 / 1024)) MiB or $max_files files that come back" >&2
  unset 'models[-1]'; rm -f "$OUT/models.tgz"
done
rm -rf "$exp/best_variant"  # (a copy)
fits || echo "$0: the results alone exceed $((limit / 1024 / 1024)) MiB or $max_files files: part of them will not come back" >&2

for archive in "$OUT/results.tgz" "$OUT/models.tgz"; do
  if [ -f "$archive" ] && [ "$(stat -c %s "$archive")" -gt "$part" ]; then
    split -b "$part" "$archive" "$archive.part" && rm "$archive"
  fi
done
echo "packed into \$OUT: $(cd "$OUT" && du -ch results.tgz* models.tgz* 2>/dev/null | tail -1 | cut -f1)" \
  "($(cd "$OUT" && ls results.tgz* models.tgz* 2>/dev/null | tr '\n' ' '))${models[*]:+; models: ${models[*]}}"
