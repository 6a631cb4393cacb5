# Sourced by the bench/run_so762_*.sh phase scripts: the repository root ($root), the Python to
# run ($PYTHON, else the repository's .venv, else python3 on the PATH) and a `cli` function for
# `python -m allinone.cli`; the working directory becomes the speechocean762 recipe.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)
cli() { "$python" -m allinone.cli "$@"; }
cd "$root/egs/speechocean762/asr1"
