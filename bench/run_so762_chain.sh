#!/usr/bin/env bash
# Run speechocean762 experiment phases in order within one lent-GPU call, then pack the results.
#
#   bench/run_so762_chain.sh SECONDS PHASE [PHASE ...]
#
# PHASE is `allinone:<baseline|supernet|twins>` (bench/run_so762_allinone.sh),
# `methods:<uniform|one_stage|two_stage|two_stage_search|all|compare>` (bench/run_so762_methods.sh;
# STEPS, UNIFORM_BITS, TARGETS, JOBS, FLOAT and METHOD_OPTS pass through the environment) or `wav2vec2:<float|supernet|methods>`
# (bench/run_so762_wav2vec2.sh). Every phase is idempotent and a cut
# training resumes from its checkpoint, so the same command can be given call after call: each
# call continues where the last one stopped until all phases are done. The phases get SECONDS
# in all (leave the call's limit a minute for the packing); each phase's log goes to
# $OUT/<phase>.log and, when OUT is set, egs/speechocean762/asr1/exp is packed into
# $OUT/results.tgz without checkpoints (the float Conformer's final/ is kept, so a lost machine
# does not cost the baseline: carry it back into exp/asr_train_conformer/final; the wav2vec2
# models, 360 MB each, are not packed and are lost with the machine).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: $0 SECONDS PHASE [PHASE ...]" >&2; exit 2; }
budget=$1; shift
logs=${OUT:-$root/egs/speechocean762/asr1/exp/chain_logs}
mkdir -p "$logs"
for phase in "$@"; do
  case $phase in
    allinone:?*|methods:?*|wav2vec2:?*) ;;
    *) echo "$0: unknown phase $phase (allinone:<phase>, methods:<phase> or wav2vec2:<phase>)" >&2; exit 2 ;;
  esac
done
start=$SECONDS
status=0
for phase in "$@"; do
  left=$((budget - (SECONDS - start)))
  if [ $left -le 0 ]; then echo "$phase: no time left"; status=124; break; fi
  script=run_so762_${phase%%:*}.sh
  echo "$phase: start $(date +%T), ${left}s left"
  timeout "$left" bash "$root/bench/$script" "${phase#*:}" > "$logs/${phase/:/_}.log" 2>&1
  status=$?
  echo "$phase: exit $status $(date +%T)"
  [ $status -eq 0 ] || break
done
if [ -n "${OUT:-}" ]; then
  tar -C "$root/egs/speechocean762/asr1" -czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.packed.safetensors' --exclude=dump \
      --exclude='methods_*/*/final' --exclude='supernet_*/final' --exclude='twins/*/final' \
      --exclude='wav2vec2/*/final' --exclude='variants/*/final' exp 2>/dev/null
  # files come back from $OUT at most 16 MiB each: a larger archive comes back in parts
  # (cat results.tgz.part* | tar -xz)
  if [ "$(stat -c %s "$OUT/results.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M "$OUT/results.tgz" "$OUT/results.tgz.part" && rm "$OUT/results.tgz"
  fi
  echo "packed into \$OUT: $(cd "$OUT" && du -ch results.tgz* | tail -1 | cut -f1) ($(cd "$OUT" && ls results.tgz*))"
fi
exit $status
