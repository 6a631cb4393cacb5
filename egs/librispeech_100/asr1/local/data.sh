#!/usr/bin/env bash
# local/data.sh LIBRISPEECH DATADIR PYTHON ALLOW_MISSING
# LibriSpeech subsets -> DATADIR/{train_clean_100,dev_clean,dev_other,test_clean,test_other}
# (absolute FLAC paths) and DATADIR/dev = dev_clean + dev_other (the validation set, as ESPnet).
# A missing subset is an error unless ALLOW_MISSING is true (then only present ones are used;
# train-clean-100 and dev-clean are always required).
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 LIBRISPEECH DATADIR PYTHON ALLOW_MISSING" >&2; exit 1; }
ls_root=$1 datadir=$2 python=$3 allow_missing=$4
present=()
for subset in train-clean-100 dev-clean dev-other test-clean test-other; do
  name=${subset//-/_}
  if [ ! -d "$ls_root/$subset" ]; then
    case "$subset" in train-clean-100|dev-clean) ;; *) if [ "$allow_missing" = true ]; then
      echo "note: $ls_root/$subset not found; left out (--allow_missing_subsets true)"; continue; fi ;; esac
    echo "$0: error: LibriSpeech subset not found: $ls_root/$subset (expected <subset>/<speaker>/<chapter>/*.trans.txt + *.flac;" \
         "pass --allow_missing_subsets true to use only the subsets present)" >&2
    exit 1
  fi
  "$python" -m allinone.cli prepare librispeech --src "$ls_root/$subset" --out "$datadir/$name"
  present+=("$name")
  echo "$datadir/$name: $(wc -l < "$datadir/$name/text") utterances"
done
mkdir -p "$datadir/dev"
for f in wav.scp text utt2spk spk2utt; do
  for d in dev_clean dev_other; do [ ! -f "$datadir/$d/$f" ] || cat "$datadir/$d/$f"; done | LC_ALL=C sort > "$datadir/dev/$f.tmp"
  mv "$datadir/dev/$f.tmp" "$datadir/dev/$f"
done
echo "$datadir/dev (validation: dev_clean + dev_other present): $(wc -l < "$datadir/dev/text") utterances"
echo "${present[*]}" > "$datadir/subsets"
