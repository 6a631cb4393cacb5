#!/usr/bin/env bash
# local/data.sh CORPUS_ROOT LAYOUT SUBSET DATADIR PYTHON
# speechocean762 -> DATADIR/{train,dev,test} Kaldi directories (absolute audio paths).
#   LAYOUT shipped:  the copy in shared/data (train/ dev/ test/ + audio/*.opus)
#   LAYOUT original: the authors' release (WAVE/SPEAKERnnnn/*.WAV, Kaldi train/ and test/);
#                    dev/test are the same speakers as in the shipped copy.
#   SUBSET N > 0 keeps N evenly spaced utterances per split (tests).
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: $0 CORPUS_ROOT LAYOUT SUBSET DATADIR PYTHON" >&2; exit 1; }
root=$1 layout=$2 subset=$3 datadir=$4 python=$5
"$python" -m allinone.cli prepare speechocean762 --src "$root" --out "$datadir" --layout "$layout" --subset "$subset"
for split in train dev test; do
  echo "$datadir/$split: $(wc -l < "$datadir/$split/text") utterances, $(wc -l < "$datadir/$split/spk2utt") speakers"
done
