# Sourced by the bench/run_so762_*.sh phase scripts: the repository root ($root), the Python to
# run ($PYTHON, else the repository's .venv, else python3 on the PATH) and a `cli` function for
# `python -m allinone.cli`; the working directory becomes the speechocean762 recipe.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)
cli() { "$python" -m allinone.cli "$@"; }
cd "$root/egs/speechocean762/asr1"

# LM_WEIGHT (1.5 chosen on dev; with LM_ORDER, default 12, and LM_BONUS, default 1.5;
# docs/benchmarks.md 4i, 4j): the phases decode with beam 10 and a token n-gram LM of the
# training transcripts fused in.
# lm_decode_opts prints those decode options (nothing without LM_WEIGHT), training the LM
# (exp/lm/units<order>.arpa, with the float model's tokenizer) the first time.
LM_ORDER=${LM_ORDER:-12} LM_BONUS=${LM_BONUS:-1.5}
lm_decode_opts() {
  [ -n "${LM_WEIGHT:-}" ] || return 0
  local lm=exp/lm/units$LM_ORDER.arpa
  [ -f $lm ] || cli lm data/train/text --tokenizer exp/asr_train_conformer/final --order $LM_ORDER \
    --out $lm > /dev/null || return 1
  echo "--beam 10 --lm $lm --lm-weight $LM_WEIGHT --length-bonus $LM_BONUS"
}

# on_gpu N COMMAND...: run COMMAND on the GPU of the N-th of several side-by-side runs (round
# robin over CUDA_VISIBLE_DEVICES, or over every GPU nvidia-smi lists; unchanged without one),
# so that on a machine of several GPUs variants and twins spread over them.
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"  # "" = none
elif command -v nvidia-smi > /dev/null; then
  read -ra gpus <<< "$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ')"
fi
on_gpu() {
  local n=$1; shift
  if [ ${#gpus[@]} -eq 0 ]; then "$@"; else CUDA_VISIBLE_DEVICES=${gpus[$((n % ${#gpus[@]}))]} "$@"; fi
}
