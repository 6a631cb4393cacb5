"""Training-step cost of wav2vec2-base and HuBERT-large as supernets against torchaudio's plain models (issue 7).

For each layout (torchaudio's ``wav2vec2_base`` and ``hubert_large`` architectures with a
32-unit CTC head, random weights), at the same batch (default 8 utterances of 10 s, 16 kHz),
bf16 autocast, AdamW, CTC loss over random labels, CNN feature extractor trained too:

  torchaudio plain          ``torchaudio.models.wav2vec2_model`` (the reference)
  ours plain                ``Wav2Vec2CTCModel`` without quantizers
  supernet largest float    ``Wav2Vec2CTCModel`` with quantizers, subnet=None
  supernet largest 8-bit    the whole model, every transformer weight fake-quantized to 8 bits
  supernet smallest         the space's smallest subnet (conf/space/wav2vec2/*.yaml)

Target (issue 7): supernet step <= 1.15x the plain torchaudio step. Median of --repeats
steps after --warmup, the rows of a layout timed in turn (round robin: a drift of the GPU's
speed spreads over every row instead of landing on the last ones); peak GPU memory per row,
with the other rows' models and optimizer states resident. --profile also counts each row's
operator calls and CUDA kernels (the largest float subnet runs the plain model's ATen operators
one for one: tests/test_wav2vec2_supernet.py).

Run:  python bench/bench_wav2vec2_step.py --device cuda [--profile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchaudio
from bench_train_step import make_step, step_op_counts, timed_round_robin  # (bench/ is on sys.path)

from allinone.elastic.quant import QuantConfig
from allinone.elastic.supernet import init_supernet
from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

LAYOUTS = {
    "wav2vec2-base": dict(),  # Wav2Vec2Config defaults are wav2vec2-base's
    "hubert-large": dict(extractor_mode="layer_norm", extractor_conv_bias=False, encoder_embed_dim=1024,
                         encoder_num_layers=24, encoder_num_heads=16, encoder_ff_interm_features=4096,
                         encoder_layer_norm_first=True),
}
SPACES = {"wav2vec2-base": "conf/space/wav2vec2/base.yaml", "hubert-large": "conf/space/wav2vec2/large.yaml"}
QUANT = {"bits": [8, 4, 2], "per_channel": True, "learn_scale": True, "method": "max", "mode": "independent"}


def torchaudio_kwargs(cfg: Wav2Vec2Config) -> dict:
    """Our config's fields that torchaudio's ``wav2vec2_model`` takes."""
    d = cfg.to_dict()
    keys = ["extractor_mode", "extractor_conv_bias", "encoder_embed_dim", "encoder_projection_dropout",
            "encoder_pos_conv_kernel", "encoder_pos_conv_groups", "encoder_num_layers", "encoder_num_heads",
            "encoder_attention_dropout", "encoder_ff_interm_features", "encoder_ff_interm_dropout",
            "encoder_dropout", "encoder_layer_norm_first", "encoder_layer_drop"]
    out = {k: d[k] for k in keys}
    out["extractor_conv_layer_config"] = [tuple(c) for c in d["extractor_conv_layer_config"]]
    out["aux_num_out"] = cfg.vocab_size
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64: a CPU smoke test")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also count operator calls and CUDA kernels of one step per row")
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)
    samples = int(args.seconds * 16000)
    waves = torch.randn(args.batch, samples, device=dev)
    lens = torch.full((args.batch,), samples, device=dev)

    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"torchaudio {torchaudio.__version__}; batch {args.batch} x {args.seconds:g} s; bf16 autocast\n")
    print("| layout | step | ms | vs torchaudio | peak GiB |")
    print("|---|---|---:|---:|---:|")
    for layout in args.layouts:
        kwargs = dict(LAYOUTS[layout], encoder_layer_drop=0.0)  # layer drop would make steps random
        if args.tiny:
            kwargs.update(encoder_embed_dim=64, encoder_num_layers=2, encoder_num_heads=4,
                          encoder_ff_interm_features=128, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4)
        cfg = Wav2Vec2Config(**kwargs)
        frames = int(cfg.output_lengths(torch.tensor([samples]))[0])
        tokens = torch.randint(1, cfg.vocab_size, (args.batch, frames // 4), device=dev)
        tok_lens = torch.full((args.batch,), tokens.shape[1], device=dev)

        def ctc_step(model, forward):
            """One training step of ``model``: forward() gives (logits, lengths); CTC loss, AdamW."""
            def loss():
                logits, out_lens = forward()
                log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
                return F.ctc_loss(log_probs, tokens, out_lens, tok_lens, zero_infinity=True)

            return make_step(loss, model.parameters(), dev)

        steps = {}
        ta = torchaudio.models.wav2vec2_model(**torchaudio_kwargs(cfg)).to(dev).train()
        steps["torchaudio plain"] = ctc_step(ta, lambda: ta(waves, lens))
        ours = Wav2Vec2CTCModel(cfg).to(dev).train()
        steps["ours plain"] = ctc_step(ours, lambda: ours(waves, lens))
        sup = Wav2Vec2CTCModel(Wav2Vec2Config(**kwargs, quant=QuantConfig.from_dict(QUANT)))
        space = init_supernet(sup, SPACES[layout] if not args.tiny else
                              {"depth": [2, 1], "ffn": [128, 64], "heads": [4, 2], "bits": [32, 8, 4, 2]})
        sup = sup.to(dev).train()
        largest = space.largest()
        b8 = space.parse(space.format(largest).rsplit("_B", 1)[0] + "_B8")
        for name, subnet in (("supernet largest float", None), ("supernet largest 8-bit", b8),
                             ("supernet smallest", space.smallest())):
            steps[name] = ctc_step(sup, lambda s=subnet: sup(waves, lens, subnet=s))
        timings = timed_round_robin(steps, args.warmup, args.repeats, dev)
        base = timings["torchaudio plain"][0]
        for name, (ms, mem) in timings.items():
            print(f"| {layout} | {name} | {ms:.1f} | {ms / base:.2f}x | {mem:.2f} |", flush=True)
        if args.profile:
            print(f"\n{layout}, one step profiled: aten ops (top-level / all) of the forward + backward, "
                  "the optimizer's aten ops, CUDA kernels of the whole step")
            print("| layout | step | aten ops (top-level) | aten ops (all) | optimizer aten ops | CUDA kernels |")
            print("|---|---|---:|---:|---:|---:|")
            for name, step in steps.items():
                c = step_op_counts(step, dev)
                kern = c["cuda_kernels"] if dev == "cuda" else "-"
                print(f"| {layout} | {name} | {c['aten_top']} | {c['aten_all']} | {c['optimizer_aten']} | {kern} |")
            print()
        del ta, ours, sup
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
