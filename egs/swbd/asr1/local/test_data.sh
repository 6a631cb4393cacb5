#!/usr/bin/env bash
# local/test_data.sh NAME SPEECH_ROOT TRANSCRIPT_ROOT DATADIR PYTHON
# eval2000 (LDC2002S09 + LDC2002T43) or RT03 -> DATADIR/NAME with segments, stm and glm.
# The STM is reference/hub5e00.english.000405.stm for eval2000, else the one *.stm found;
# the GLM (NIST's word mappings for hubscr) is the one *.glm found, if any.
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: $0 NAME SPEECH_ROOT TRANSCRIPT_ROOT DATADIR PYTHON" >&2; exit 1; }
name=$1 speech=$2 trans=$3 datadir=$4 python=$5
stm=$trans/reference/hub5e00.english.000405.stm
if [ ! -f "$stm" ]; then
  mapfile -t stms < <(find "$trans" -name '*.stm' | sort)
  [ ${#stms[@]} -ge 1 ] || { echo "$0: error: no reference *.stm under $trans (eval2000: LDC2002T43 reference/hub5e00.english.000405.stm)" >&2; exit 1; }
  [ ${#stms[@]} -eq 1 ] || { echo "$0: error: several *.stm under $trans: ${stms[*]}" >&2; exit 1; }
  stm=${stms[0]}
fi
glm=$(find "$trans" -name '*.glm' | sort | head -1)
[ -n "$glm" ] || echo "note: no *.glm under $trans: eval scoring will use our approximate normalisation, not hubscr"
"$python" -m allinone.data.swbd stm --speech "$speech" --stm "$stm" ${glm:+--glm "$glm"} --out "$datadir/$name"
