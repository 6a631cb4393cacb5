#!/usr/bin/env python3
"""merge_config.py BASE.yaml OVER.yaml [key=value ...] > OUT.yaml

Writes BASE with OVER (and dotted overrides) merged on top, interpolations left as they are.
The recipes use it to build a supernet config from the float baseline's config, so the two
share one architecture by construction.
"""
import sys

from omegaconf import OmegaConf


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 1
    parts = [OmegaConf.load(argv[0]), OmegaConf.load(argv[1]), OmegaConf.from_dotlist(argv[2:])]
    sys.stdout.write(OmegaConf.to_yaml(OmegaConf.merge(*parts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
