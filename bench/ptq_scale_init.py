"""Post-training quantization of a float Conformer: WER of uniform B-bit weights (no training)
with the quantizer's scales initialised by ``max`` and by ``mse`` (``allinone.elastic.quant``).

Tells whether a scale initialisation, not the training, is what breaks low bit-widths:

    cd egs/fsdd_digits/asr1
    python ../../../bench/ptq_scale_init.py exp/fsdd_digits/conformer_demo/final data/test

Prints one line per (method, bits): greedy-CTC WER on the data directory.
"""

import argparse
import dataclasses

import jiwer
import torch

from allinone.elastic.quant import QuantConfig
from allinone.elastic.subnet import SubnetConfig
from allinone.elastic.supernet import init_supernet
from allinone.eval.bench import BenchOptions, _decode, load_test_set
from allinone.models.asr import ASRModel
from allinone.models.saved import load_model_dir


def ptq_model(float_model: ASRModel, bits: list[int], method: str) -> ASRModel:
    """A copy of ``float_model`` with weight quantizers at ``bits``, scales set by ``method``."""
    cfg = dataclasses.replace(float_model.config, quant=QuantConfig(bits=bits, method=method))
    model = ASRModel(cfg)
    _, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)  # quantizers are new
    if unexpected:
        raise ValueError(f"unexpected weights {unexpected[:3]}: is this a float Conformer?")
    enc = cfg.encoder
    space = {"depth": [enc.num_blocks], "ffn": [enc.linear_units], "heads": [enc.attention_heads],
             "bits": [32, *bits]}
    init_supernet(model, space, None, reorder=False)  # sets every scale from the loaded weights
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="float model directory")
    ap.add_argument("data", help="data directory to decode")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=["max", "mse"])
    args = ap.parse_args()
    loaded = load_model_dir(args.model)
    opts = BenchOptions()
    test = load_test_set(args.data, "test", loaded.fbank, loaded.tokenizer, opts)
    enc = loaded.model.config.encoder
    for method in args.methods:
        model = ptq_model(loaded.model, args.bits, method)
        for b in args.bits:
            subnet = SubnetConfig.uniform(enc.num_blocks, enc.linear_units, enc.attention_heads, b)
            with torch.no_grad():
                hyps = _decode(model, subnet, test, loaded.tokenizer, opts)
            ids = sorted(hyps)
            wer = jiwer.wer([test.refs[u] for u in ids], [hyps[u] for u in ids])
            print(f"{method} {b}-bit: WER {100 * wer:.2f}%", flush=True)


if __name__ == "__main__":
    main()
