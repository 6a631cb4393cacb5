"""Packed size and both compression ratios of subnets, from the training config alone.

A subnet's size depends only on the architecture and the subnet string, not on the weights,
so this builds the supernet of the given configs (merged in order, later ones win) with
untrained weights and extracts each subnet:

    python bench/subnet_sizes.py egs/speechocean762/asr1/conf/train_conformer.yaml \
        egs/speechocean762/asr1/conf/train_supernet.yaml --vocab 31 L12_F640_H4_B4 L6_F320_H4_B2

prints, per subnet, the packed MiB, the average bits, the whole-model ratio against the
largest float subnet (``ratio_vs_ref`` of ``allinone bench``) and the ratio of the
quantizable weights alone (``weights_ratio_vs_ref``: how published ratios count; see
docs/quantization.md, "Size accounting"). Run it from the directory the configs' relative
paths (e.g. ``supernet.space``) start from. Conformer and wav2vec2 configs alike (docs/benchmarks.md
10b has both).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from allinone.elastic.extract import extract, extracted_size
from allinone.train.config import load_config
from allinone.train.trainer import build_model

MIB = 2 ** 20


def build_supernet(configs: list[str], vocab: int):
    """The untrained supernet of ``configs`` (YAML files merged in order; the weights do not
    matter for sizes, so ``supernet.init_from`` is dropped)."""
    cfg = load_config(configs)
    if not cfg.supernet:
        raise ValueError("the merged configs have no supernet section: add the supernet config")
    cfg.supernet["init_from"] = None
    n_mels = cfg.data.fbank.n_mels
    stats = {"count": np.array(1.0), "sum": np.zeros(n_mels), "sum_square": np.ones(n_mels)}
    return build_model(cfg, vocab, stats).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="YAML configs merged in order, then the subnet strings")
    p.add_argument("--vocab", type=int, default=31, help="output units of the CTC layer (default 31)")
    args = p.parse_intermixed_args(argv)  # --vocab may come after the subnets
    configs = [c for c in args.configs if c.endswith((".yaml", ".yml"))]
    subnets = [c for c in args.configs if c not in configs]
    if not configs or not subnets:
        p.error("give at least one YAML config and one subnet string")
    try:
        model = build_supernet(configs, args.vocab)
    except ValueError as e:
        p.error(str(e))
    space = model.search_space
    parsed = []
    for text in subnets:  # every string checked before the table starts
        try:
            parsed.append(space.parse(text))
        except ValueError as e:
            sys.exit(f"{text}: {e}")
    reference = extracted_size(*extract(model, space.largest()))  # the float model's shape
    print("| subnet | packed MiB | avg bits | ratio vs ref | weights ratio vs ref |")
    print("|---|---:|---:|---:|---:|")
    for text, subnet in zip(subnets, parsed):
        r = extracted_size(*extract(model, subnet))
        bits = "32 (float)" if r.quantized_params == 0 else f"{r.average_bits:.2f}"
        print(f"| {text} | {r.packed_bytes / MIB:.3f} | {bits} | {reference.fp32_bytes / r.packed_bytes:.2f}x | "
              f"{reference.weight_fp32_bytes / r.weight_bytes:.2f}x |")


if __name__ == "__main__":
    main()
