# Two entry points, each doing its own idempotent set-up:
#   make demo   the main job on the data we ship (CPU, a few minutes)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data
STAMP := $(VENV)/.installed

.PHONY: demo test setup sctk clean

# Reinstall only when the package metadata changes; a second run reuses the venv.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# NIST SCTK (sclite, sc_stats) is the independent reference our scoring is tested against.
sctk:
	@{ command -v sc_stats || test -x /usr/lib/sctk/bin/sc_stats; } >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sctk) >/dev/null 2>&1 || \
	  echo "warning: could not install sctk; tests that compare with NIST tools will be skipped"; }

test: $(STAMP) sctk
	$(VENV)/bin/python -m pytest -n 2 -q tests

# The digits recipe gives numbers that mean something on a CPU; then the speechocean762
# recipe's every stage runs once in its CPU configuration (40 utterances a split, a 2-block
# model: its numbers mean nothing; the GPU configuration is the recipe without these options).
demo: $(STAMP)
	bash egs/fsdd_digits/asr1/run.sh --data_root $(abspath $(DATA))
	bash egs/speechocean762/asr1/run.sh --corpus_root $(abspath $(DATA))/speechocean762 \
	  --config conf/train_tiny.yaml --supernet_config conf/train_supernet_tiny.yaml --grid conf/grid_tiny.yaml \
	  --subset 40 --beam 1 --device cpu --datadir data/smoke --dumpdir dump/smoke --expdir exp/smoke

clean:
	rm -rf $(VENV) exp dump
