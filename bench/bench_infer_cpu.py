"""CPU inference latency of a 12-layer Conformer: fp32 against the int8 path (issue 9, item 3).

Target of issue 9: on CPU the int8 path >= 1.5x faster than fp32 for the 12-layer Conformer.
Measured with exactly what ``allinone bench`` times (``allinone.eval.latency.measure_latency``:
fbank-to-text greedy CTC recognition of one utterance at a time, the ``cpu-fp32`` and
``cpu-int8`` backends), on a model with random weights (latency does not depend on what the
weights learned). ``cpu-int8`` routes every encoder ``nn.Linear`` (attention projections,
both FFNs) and the convolution modules' pointwise Conv1d to fbgemm int8 kernels built from
8-bit per-channel codes (``Int8Linear``); the last column adds the 8-bit front end
(``front_end_to_int8``: Conv2d + ReLU on x86 quantized kernels, calibrated on 3 utterances).

Models (``--preset``): ``swbd`` = 12 x 256, 4 heads, FFN 2048, kernel 31, 2003 units (the
issue's Switchboard size); ``so762`` = 12 x 160, 4 heads, FFN 640, kernel 15, 31 units (the
speechocean762 baseline). Utterances: ``--seconds`` long (random log-mel frames, 100 per s).

Run:  python bench/bench_infer_cpu.py [--preset swbd so762] [--threads 1 2] [--seconds 2 5 10]
      [--profile]: also where one 5 s utterance's encode + CTC time goes (1 thread, torch.profiler
      self time by operator: Linear layers, the Conv2d subsampling front end, the convolution
      modules' Conv1d, the rest), fp32 and int8.
      [--wer MODEL_DIR DATA_DIR [--calib-dir DIR]]: instead, what the int8 path does to the
      WER of a trained float model: its encoder Linear and pointwise weights quantized to 8 bits
      per channel (post-training), greedy CTC decoding of every utterance of DATA_DIR alone,
      with the dequantized weights on float kernels, on the int8 path, and on the int8 path with
      the 8-bit front end calibrated on the first --calib-utts (200) utterances of --calib-dir
      (default DATA_DIR).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from allinone.eval.latency import _backend_model, _is_pointwise_conv1d, front_end_ranges, measure_latency
from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig
from allinone.quant.quantizer import QuantizedTensor

PRESETS = {
    "swbd": (dict(output_size=256, attention_heads=4, linear_units=2048, num_blocks=12, cnn_module_kernel=31), 2003),
    "so762": (dict(output_size=160, attention_heads=4, linear_units=640, num_blocks=12, cnn_module_kernel=15), 31),
}


def model_and_codes(preset: str) -> tuple[ASRModel, dict]:
    """A random float model and the 8-bit codes of its encoder Linear and pointwise weights."""
    enc_kwargs, vocab = PRESETS[preset]
    model = ASRModel(ASRModelConfig(encoder=ConformerConfig(**enc_kwargs), vocab_size=vocab)).eval()
    return model, encoder_codes(model)


def encoder_codes(model) -> dict:
    """8-bit per-channel codes of every encoder block's Linear and pointwise Conv1d weight."""
    return {f"{name}.weight": QuantizedTensor.from_weight(mod.weight.detach(), 8, per_channel=True)
            for name, mod in model.named_modules()
            if name.startswith("encoder.encoders.") and (isinstance(mod, torch.nn.Linear) or _is_pointwise_conv1d(mod))}


_LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "quantized::linear_dynamic")
_CONV_OPS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d",
             "aten::_convolution", "aten::convolution", "quantized::conv2d_relu")


def time_split(model, codes: dict, backend: str, seconds: float = 5.0, ranges=None) -> dict[str, float]:
    """Milliseconds of one utterance's encode + CTC by part (self CPU time of its operators).

    Convolutions on a 4-D input with more than one row are the Conv2d subsampling front end;
    the convolution modules' Conv1d run as 2-D convolutions over one row.
    """
    m = _backend_model(model, backend, codes, ranges)
    x, n = torch.randn(1, int(seconds * 100), 80), torch.tensor([int(seconds * 100)])
    with torch.no_grad():
        for _ in range(2):
            m.ctc_log_probs(m.encode(x, n)[0])
        with torch.profiler.profile(record_shapes=True) as prof:
            m.ctc_log_probs(m.encode(x, n)[0])
    parts = {"Linear layers": 0.0, "front end (Conv2d)": 0.0, "conv modules (Conv1d)": 0.0, "rest": 0.0}
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1000
        if e.key in _LINEAR_OPS:
            parts["Linear layers"] += ms
        elif e.key in _CONV_OPS:
            shape = e.input_shapes[0] if e.input_shapes else []
            front = len(shape) == 4 and shape[2] > 1
            parts["front end (Conv2d)" if front else "conv modules (Conv1d)"] += ms
        else:
            parts["rest"] += ms
    return parts


INT8_SETUPS = (("fp32", "cpu-fp32", False), ("int8", "cpu-int8", False), ("int8 + int8 front end", "cpu-int8-fe", True))


def wer_check(model_dir: str, data_dir: str, calib_dir: str | None, calib_utts: int = 200, num_workers: int = 2) -> None:
    """Greedy WER / CER of a trained model's 8-bit system on each path of INT8_SETUPS."""
    from allinone.data.dataset import extract_features
    from allinone.data.kaldi import read_data_dir
    from allinone.eval.decode import DecodeOptions, recognize_batch
    from allinone.eval.mapsswe import mapsswe
    from allinone.eval.wer import score
    from allinone.models.saved import load_model_dir
    from tqdm import tqdm

    loaded = load_model_dir(model_dir)
    model, tok = loaded.model.eval(), loaded.tokenizer
    codes = encoder_codes(model)
    if not codes:
        raise SystemExit(f"{model_dir}: --wer checks Conformer models (encoder.encoders.* Linear layers); none here")
    with torch.no_grad():  # the 8-bit system's float twin: weights = dequantized codes
        for name, q in codes.items():
            model.get_parameter(name).copy_(q.dequantize().reshape(model.get_parameter(name).shape))
    utts = read_data_dir(data_dir)
    feats = extract_features(utts, loaded.fbank, num_workers)
    calib = list(extract_features((read_data_dir(calib_dir) if calib_dir else utts)[:calib_utts], loaded.fbank,
                                  num_workers).values())
    refs = {u.utt_id: u.text for u in utts if u.utt_id in feats}
    print(f"{model_dir} on {data_dir} ({len(refs)} utterances), 8-bit encoder weights "
          f"({len(codes)} tensors), greedy CTC, one utterance at a time; front end calibrated on the first "
          f"{len(calib)} utterances of {calib_dir or data_dir + ' (the scored set itself: give --calib-dir)'}\n")
    print("| path | WER % | CER % | hypotheses changed vs fp32 | MAPSSWE p vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    first = None
    for label, backend, front in INT8_SETUPS:
        m = _backend_model(model, backend, codes, front_end_ranges(model, calib) if front else None)
        with torch.no_grad():
            hyps = {u: tok.decode(recognize_batch(m, f[None], torch.tensor([f.shape[0]]), DecodeOptions(beam=1))[0])
                    for u, f in tqdm(feats.items(), desc=label, leave=False)}
        first = first or hyps
        res = score(refs, hyps)
        changed = sum(hyps[u] != first[u] for u in hyps)
        p = mapsswe(refs, hyps, first).p_value if changed else 1.0
        print(f"| {label} | {res.wer:.2f} | {res.cer:.2f} | {changed} | {p:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["swbd", "so762"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seconds", nargs="+", type=float, default=[2.0, 5.0, 10.0])
    p.add_argument("--utts", type=int, default=3, help="utterances per pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (median)")
    p.add_argument("--profile", action="store_true", help="also split one 5 s utterance's time by part")
    p.add_argument("--wer", nargs=2, metavar=("MODEL_DIR", "DATA_DIR"), help="the WER check instead of latency")
    p.add_argument("--calib-dir", default=None, help="--wer: data dir whose first utterances calibrate the front end")
    p.add_argument("--calib-utts", type=int, default=200, help="--wer: how many (default 200)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.wer:
        wer_check(*args.wer, args.calib_dir, args.calib_utts)
        return
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"torch {torch.__version__}; quantized engine {torch.backends.quantized.engine}\n")
    print("| model | threads | utterance | fp32 ms/utt (RTF) | int8 ms/utt (RTF) | int8 + int8 front end ms/utt (RTF) "
          "| speed-up int8 / + front end |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    calib = [torch.randn(500, 80) for _ in range(3)]
    for preset in args.preset:
        model, codes = model_and_codes(preset)
        ranges = front_end_ranges(model, calib)
        for threads in args.threads:
            for seconds in args.seconds:
                feats = [torch.randn(int(seconds * 100), 80) for _ in range(args.utts)]
                fp32, int8, int8_fe = (
                    measure_latency(model, codes, feats, backend, repeats=args.repeats, threads=threads,
                                    front_end_ranges=ranges if front else None)
                    for _, backend, front in INT8_SETUPS)
                print(f"| {preset} | {threads} | {seconds:g} s | {fp32.ms_per_utt:.1f} ({fp32.rtf:.3f}) | "
                      f"{int8.ms_per_utt:.1f} ({int8.rtf:.3f}) | {int8_fe.ms_per_utt:.1f} ({int8_fe.rtf:.3f}) | "
                      f"{fp32.ms_per_utt / int8.ms_per_utt:.2f}x / {fp32.ms_per_utt / int8_fe.ms_per_utt:.2f}x |",
                      flush=True)
    if args.profile:
        torch.set_num_threads(1)
        print("\nOne 5 s utterance, encode + CTC, 1 thread, ms of operator self time (share):\n")
        print("| model | backend | total | Linear layers | front end (Conv2d) | conv modules (Conv1d) | rest |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for preset in args.preset:
            model, codes = model_and_codes(preset)
            ranges = front_end_ranges(model, calib)
            for label, backend, front in INT8_SETUPS:
                parts = time_split(model, codes, backend, ranges=ranges if front else None)
                total = sum(parts.values())
                cells = " | ".join(f"{v:.1f} ({100 * v / total:.0f}%)" for v in parts.values())
                print(f"| {preset} | {label} | {total:.1f} | {cells} |")


if __name__ == "__main__":
    main()
