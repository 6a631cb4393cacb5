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
# $OUT/<phase>.log and, when OUT is set, the results are packed into $OUT (bench/so762_pack.sh).
# Two chains can run side by side on a machine of several GPUs, e.g.
#   (CUDA_VISIBLE_DEVICES=3 OUT= bench/run_so762_chain.sh 500 allinone:supernet) &
#   CUDA_VISIBLE_DEVICES=0,1,2 OUT= bench/run_so762_chain.sh 500 allinone:baseline; wait; bench/so762_pack.sh
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
[ -z "${OUT:-}" ] || bash "$root/bench/so762_pack.sh"
exit $status
