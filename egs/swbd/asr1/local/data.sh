#!/usr/bin/env bash
# local/data.sh SWBD SWBD_TRANSCRIPTS DEV_UTTS MAX_DUP MAX_DURATION DATADIR PYTHON
# Switchboard-1 (LDC97S62 + ms98 transcripts) -> DATADIR/train_nodup, DATADIR/train_dev.
set -euo pipefail
[ $# -eq 7 ] || { echo "usage: $0 SWBD SWBD_TRANSCRIPTS DEV_UTTS MAX_DUP MAX_DURATION DATADIR PYTHON" >&2; exit 1; }
swbd=$1 trans=$2 dev_utts=$3 max_dup=$4 max_duration=$5 datadir=$6 python=$7
"$python" -m allinone.data.swbd train --swbd "$swbd" --transcripts "$trans" \
  --train "$datadir/train_nodup" --dev "$datadir/train_dev" \
  --dev-utts "$dev_utts" --max-dup "$max_dup" --max-duration "$max_duration"
