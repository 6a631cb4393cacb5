#!/usr/bin/env bash
# local/score.sh DATA DECODE_DIR PYTHON [SCTK_BIN]
# Scores DECODE_DIR/text (hypotheses of `allinone decode`) against DATA/stm:
# * with DATA/glm and SCTK's hubscr.pl: NIST hub5 scoring (GLM mappings, optional deletions),
#   overall and per subset (eval2000: swbd = sw_*, callhome = en_*; RT03: swbd, fisher = fsh_*),
#   into DECODE_DIR/score_hubscr/<subset>/hyp.ctm.filt.{sys,dtl} and results.json;
# * otherwise our approximation (allinone.data.swbd.scoring_filter on both sides) into
#   DECODE_DIR/score_approx/results.json.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 DATA DECODE_DIR PYTHON [SCTK_BIN]" >&2; exit 1; }
data=$1 dir=$2 python=$3 sctk=${4:-/usr/lib/sctk/bin}
swbd() { "$python" -m allinone.data.swbd "$@"; }
[ -f "$dir/text" ] || { echo "$0: error: no hypotheses $dir/text (decode first)" >&2; exit 1; }
if [ -f "$data/glm" ] && [ -f "$data/stm" ] && [ -x "$sctk/hubscr.pl" ] && [ -x "$sctk/sclite" ]; then
  out=$dir/score_hubscr
  rm -rf "$out"; mkdir -p "$out/all"
  swbd ctm --data "$data" --hyp "$dir/text" --out "$out/all/hyp.ctm"
  cp "$data/stm" "$out/all/ref.stm"
  subsets=all
  for p in $(swbd prefixes "$data/stm"); do
    case $p in sw) n=swbd ;; en) n=callhome ;; fsh) n=fisher ;; *) n=$p ;; esac
    mkdir -p "$out/$n"
    swbd split --prefix "$p" "$data/stm" "$out/$n/ref.stm"
    swbd split --prefix "$p" "$out/all/hyp.ctm" "$out/$n/hyp.ctm"
    subsets="$subsets $n"
  done
  echo "{" > "$out/results.json.tmp"; sep=""
  for n in $subsets; do
    (cd "$out/$n" && PATH="$sctk:$PATH" perl "$sctk/hubscr.pl" -p "$sctk" -V -l english -h hub5 -g "$(realpath "$data/glm")" -r ref.stm hyp.ctm > hubscr.log 2>&1) \
      || { echo "$0: error: hubscr failed for $n; see $out/$n/hubscr.log" >&2; exit 1; }
    printf '%s "%s": %s' "$sep" "$n" "$(swbd sys "$out/$n/hyp.ctm.filt.sys")" >> "$out/results.json.tmp"; sep=$',\n'
    echo "$n: $(grep 'Sum/Avg' "$out/$n/hyp.ctm.filt.sys")"
  done
  printf '\n}\n' >> "$out/results.json.tmp"; mv "$out/results.json.tmp" "$out/results.json"
  echo "hubscr (NIST GLM) results: $out/results.json, reports $out/<subset>/hyp.ctm.filt.dtl"
else
  out=$dir/score_approx; mkdir -p "$out"
  swbd approx --data "$data" --hyp "$dir/text" > "$out/results.json.tmp"; mv "$out/results.json.tmp" "$out/results.json"
  cat "$out/results.json"
  echo "APPROXIMATE scoring (no GLM in $data or no SCTK hubscr.pl in $sctk): $out/results.json; not comparable to published hub5 numbers"
fi
