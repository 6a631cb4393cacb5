#!/usr/bin/env python3
"""prepare_features.py CONFIG.yaml [key=value ...]

The data part of `allinone train`, run on its own: trains the tokenizer into EXP/tokenizer,
extracts (and caches) the features of data.train (speed-perturbed as configured) and
data.valid, and writes EXP/feats_stats.npz. `allinone train` with the same config then
reuses all three.
"""
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from allinone.train.config import config_to_yaml, load_config
    from allinone.train.trainer import prepare_data
    from allinone.utils import atomic_open

    try:
        cfg = load_config(argv[0], argv[1:])
        exp_dir = Path(cfg.exp_dir)
        exp_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, train_set, valid_set, _ = prepare_data(cfg, exp_dir)
    except ValueError as e:
        print(f"prepare_features: error: {e}", file=sys.stderr)
        return 2
    with atomic_open(exp_dir / "config.features.yaml") as f:
        f.write(config_to_yaml(cfg))
    print(f"tokenizer ({cfg.tokenizer.kind}, {tokenizer.vocab_size} tokens): {exp_dir / 'tokenizer'}")
    print(f"features: {len(train_set)} train / {len(valid_set)} valid utterances cached in {cfg.data.feat_cache_dir}")
    print(f"statistics: {exp_dir / 'feats_stats.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
