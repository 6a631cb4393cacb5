"""Command line: ``allinone <command> ...``. Each command is documented in docs/cli.md."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_train(args) -> None:
    from allinone.train.config import load_config
    from allinone.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    final = train(cfg, resume=args.resume)
    print(f"final model: {final}")


def cmd_decode(args) -> None:
    from allinone.eval.decode import DecodeOptions, decode_data_dir

    opts = DecodeOptions(beam=args.beam, ctc_weight=args.ctc_weight, device=args.device,
                         num_workers=args.num_workers, skip_bad=args.skip_bad, lm=args.lm,
                         lm_weight=args.lm_weight, length_bonus=args.length_bonus)
    for data in args.data:
        out = args.out if len(args.data) == 1 else f"{args.out}/{_name(data)}"
        summary = decode_data_dir(args.model, data, out, opts)
        print(f"{data}: WER {summary['wer']:.2f}% (sub {summary['sub']} del {summary['del']} "
              f"ins {summary['ins']} / {summary['words']} words), CER {summary['cer']:.2f}% -> {out}")


def cmd_lm(args) -> None:
    from pathlib import Path

    from allinone.data.tokenizer import load_tokenizer
    from allinone.eval.ngram_lm import train_token_lm

    tok_dir = Path(args.tokenizer)
    if (tok_dir / "tokenizer").is_dir():  # a model directory: its tokenizer
        tok_dir = tok_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer} is not a model or tokenizer directory")
    tokenizer = load_tokenizer(tok_dir)
    lm = train_token_lm(args.text, tokenizer, args.order, args.out)
    counts = ", ".join(f"{n}-grams {sum(1 for ng in lm.logp if len(ng) == n)}" for n in range(1, lm.order + 1))
    print(f"{args.order}-gram Kneser-Ney LM over {len(lm.vocab)} units ({counts}) -> {args.out}")


def cmd_mapsswe(args) -> None:
    import json

    from allinone.eval.mapsswe import compare_transcripts
    from allinone.utils import atomic_open

    res = compare_transcripts(args.ref, args.system_a, args.system_b, alpha=args.alpha)
    verdict = {"a": f"system a ({args.system_a})", "b": f"system b ({args.system_b})", None: "neither"}[res.better]
    print(f"MAPSSWE over {res.num_segments} segments: system a {res.errors_a} errors, system b "
          f"{res.errors_b} errors; W = {res.statistic:.3f}, p = {res.p_value:.3g}")
    print(f"significantly better at alpha {res.alpha}: {verdict}")
    if args.out:
        with atomic_open(args.out) as f:
            json.dump({"ref": args.ref, "system_a": args.system_a, "system_b": args.system_b, **res.to_dict()},
                      f, indent=1)


def _name(path: str) -> str:
    from pathlib import Path

    return Path(path).resolve().name


def cmd_info(args) -> None:
    from pathlib import Path

    from allinone.quant.packed_file import describe_packed

    path = Path(args.file)
    if path.is_dir():
        from allinone.models.saved import FLOAT_WEIGHTS, PACKED_WEIGHTS, read_model_config

        config = read_model_config(path)
        if (path / PACKED_WEIGHTS).is_file():
            path = path / PACKED_WEIGHTS
        else:
            print(json.dumps(config, indent=2))
            from allinone.models.saved import load_model_dir

            model = load_model_dir(path).model
            n = sum(p.numel() for p in model.parameters())
            size = (path / FLOAT_WEIGHTS).stat().st_size
            print(f"float model: {n:,} parameters, {size:,} bytes on disk (fp32), compression ratio 1.00")
            return
    print(describe_packed(path))


def cmd_prepare(args) -> None:
    from allinone.data import corpora

    if args.corpus == "fsdd-digits":
        for split, n in (("train", args.num_train), ("test", args.num_test)):
            corpora.fsdd_connected_digits(args.src, f"{args.out}/{split}", split=split, num_utts=n,
                                          min_digits=args.min_digits, max_digits=args.max_digits,
                                          seed=args.seed)
    elif args.corpus == "librispeech":
        corpora.librispeech_to_data_dir(args.src, args.out)
    elif args.corpus == "speechocean762":
        counts = corpora.speechocean762_data_dirs(args.src, args.out, layout=args.layout, subset=args.subset)
        print(f"speechocean762 ({args.layout} layout): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"data directories written under {args.out}")


def cmd_import_espnet(args) -> None:
    from pathlib import Path

    from allinone.data.features import FbankConfig
    from allinone.data.tokenizer import CharTokenizer, SentencePieceTokenizer
    from allinone.interop.espnet import load_espnet_asr
    from allinone.models.saved import save_model_dir

    model, info = load_espnet_asr(args.exp_dir, args.checkpoint)
    token_list = info["token_list"]
    bpemodel = info["espnet_config"].get("bpemodel")
    if info["espnet_config"].get("token_type", "bpe") == "char" or not bpemodel:
        tokenizer = CharTokenizer(token_list)
    else:
        path = Path(bpemodel)
        if not path.is_file():  # recipes store it relative to the recipe directory
            path = Path(args.exp_dir).resolve().parent.parent / bpemodel
        if not path.is_file():
            raise ValueError(f"sentencepiece model {bpemodel} named in config.yaml was not found")
        tokenizer = SentencePieceTokenizer(path.read_bytes(), token_list=token_list)
    save_model_dir(args.out, model, FbankConfig(**info["fbank"]), tokenizer,
                   extra={"imported_from": str(args.exp_dir)})
    print(f"imported {args.exp_dir} -> {args.out}")


def cmd_export_espnet(args) -> None:
    from allinone.interop.espnet import export_espnet_asr

    out = export_espnet_asr(args.model, args.out, subnet=args.subnet)
    what = f"subnet {args.subnet} of {args.model}" if args.subnet else str(args.model)
    print(f"exported {what} -> {out} (config.yaml, valid.acc.ave.pth)")


def cmd_extract(args) -> None:
    from pathlib import Path

    from allinone.elastic.extract import extract_to_dirs

    # A --subnet value that names a file is a grid file (list or choices of subnets).
    strings = [s for s in args.subnet if not Path(s).is_file()]
    grids = [s for s in args.subnet if Path(s).is_file()] + list(args.grid)
    for r in extract_to_dirs(args.model, strings, args.out, grids=grids, space=args.space):
        print(r.line())


def _bench_command(args) -> str:
    """The bench command line, spelled out with every setting (for report.md)."""
    import shlex

    words = ["allinone", "bench", args.model, "--grid", args.grid, "--data", *args.data, "--out", args.out,
             "--beam", str(args.beam), "--device", args.device, "--latency-repeats", str(args.latency_repeats),
             "--latency-utts", str(args.latency_utts), "--alpha", str(args.alpha)]
    if args.reference:
        words += ["--reference", args.reference]
    if args.float_model:
        words += ["--float-model", args.float_model]
    if args.lm:
        words += ["--lm", args.lm, "--lm-weight", str(args.lm_weight), "--length-bonus", str(args.length_bonus)]
    elif args.length_bonus:
        words += ["--length-bonus", str(args.length_bonus)]
    words += ["--num-workers", str(args.num_workers)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.no_latency:
        words.append("--no-latency")
    if args.int8_front_end_calib:
        words += ["--int8-front-end-calib", args.int8_front_end_calib]
    return shlex.join(words)


def cmd_bench(args) -> None:
    from allinone.eval.bench import BenchOptions, run_bench
    from allinone.eval.report import lossless_summary, significance_reference

    opts = BenchOptions(beam=args.beam, device=args.device, threads=args.threads, latency=not args.no_latency,
                        latency_repeats=args.latency_repeats, latency_utts=args.latency_utts,
                        alpha=args.alpha, reference=args.reference, num_workers=args.num_workers,
                        front_end_calib=args.int8_front_end_calib, lm=args.lm, lm_weight=args.lm_weight,
                        length_bonus=args.length_bonus, float_model=args.float_model)
    res = run_bench(args.model, args.grid, args.data, args.out, opts, command=_bench_command(args))
    print(f"{len(res['systems'])} systems x {len(res['test_sets'])} test sets -> {args.out}/results.md, "
          f"report.md, pareto.png ({res['resumed_systems']} resumed)")
    print(f"{lossless_summary(res)} (against {significance_reference(res)}, MAPSSWE alpha {res['alpha']})")
    _warn_reference(res)


def cmd_compare(args) -> None:
    from allinone.eval.compare import compare_runs, parse_run

    res = compare_runs(args.reference, [parse_run(r) for r in args.runs], args.data, args.out, alpha=args.alpha,
                       beam=args.beam, device=args.device, num_workers=args.num_workers, nested=args.nested,
                       lm=args.lm, lm_weight=args.lm_weight, length_bonus=args.length_bonus)
    print(f"{len(res['systems'])} systems against {args.reference} -> {args.out}/results.md, results.json")
    if "nested" in res:
        worse = [p["system"] for p in res["nested"]["pairs"] if p["worse"]]
        print(f"{len(res['nested']['pairs'])} nested systems against their twins; significantly worse: "
              + (", ".join(worse) or "none"))
    for method, best in res["lossless"].items():
        print(f"lossless compression ratio of {method}: "
              + ("none" if best is None else f"{best['ratio_vs_ref']:.2f}x ({best['label']}, {best['subnet']}); "
                                             f"of the quantizable weights alone {best['weights_ratio_vs_ref']:.2f}x "
                                             f"({best['weights_label']})"))
    _warn_reference(res)


def _warn_reference(results: dict) -> None:
    if results.get("reference_warning"):
        print(f"warning: {results['reference_warning']}", file=sys.stderr)


def cmd_search(args) -> None:
    from allinone.eval.search import Budget, SearchOptions, run_search

    budget = Budget(args.max_mb, args.max_params, args.max_bits, args.max_latency_ms)
    opts = SearchOptions(proxy=args.proxy, sample=args.sample, seed=args.seed, strategy=args.strategy,
                         exhaustive_limit=args.exhaustive_limit, population=args.population,
                         generations=args.generations, device=args.device, threads=args.threads,
                         num_workers=args.num_workers)
    res = run_search(args.model, budget, args.data, opts, grid=args.grid)
    best = res.best
    print(f"best subnet under {budget.describe()} ({res.strategy} search, {len(res.evaluated)} evaluated, "
          f"proxy: dev {res.proxy} on {args.sample} utterances):")
    print(best.subnet)
    print(best.line())
    if args.extract_to:
        from allinone.elastic.extract import extract_to_dirs

        for r in extract_to_dirs(args.model, [best.subnet], args.extract_to):
            print(r.line())


def cmd_allocate(args) -> None:
    from allinone.elastic.mixed_stage1 import run_stage1
    from allinone.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    r = run_stage1(cfg, args.method, args.out, num_batches=args.num_batches, n_samples=args.samples,
                   device=args.device)
    print(f"{r['subnet']}: {r['average_bits']:.3f} average bits (target {r['target_bits']}), "
          f"stage 1 {r['timing']['total_seconds']:.1f} s -> {args.out}/allocation.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="allinone", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="experiment YAML (see conf/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_epochs=10")
    t.add_argument("--resume", action="store_true", help="continue from exp_dir/checkpoint.pt")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("decode", help="decode data directories and score them")
    d.add_argument("model", help="model directory (exp/.../final or an extracted model)")
    d.add_argument("--data", nargs="+", required=True, help="Kaldi data directories")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--beam", type=int, default=1, help="1 = CTC greedy; >1 = prefix beam search (+ rescoring)")
    d.add_argument("--ctc-weight", type=float, default=0.3, help="CTC weight in attention rescoring")
    d.add_argument("--device", default="cpu")
    d.add_argument("--num-workers", type=int, default=2,
                   help="processes for feature extraction and (beam > 1) the beam search")
    d.add_argument("--skip-bad", action="store_true", help="log and skip unusable utterances")
    d.add_argument("--lm", help="ARPA n-gram LM over the model's units (allinone lm) for shallow fusion")
    d.add_argument("--lm-weight", type=float, default=0.5, help="weight of the LM's log-probabilities")
    d.add_argument("--length-bonus", type=float, default=0.0, help="score added per output token (beam search)")
    d.set_defaults(func=cmd_decode)

    lm = sub.add_parser("lm", help="train a token n-gram LM (Kneser-Ney, ARPA) for shallow fusion (docs/cli.md)")
    lm.add_argument("text", nargs="+", help="Kaldi text files (utt_id words...), e.g. data/train/text")
    lm.add_argument("--tokenizer", required=True, help="model directory or its tokenizer/ directory: the LM's units")
    lm.add_argument("--order", type=int, default=6, help="n-gram order (default 6)")
    lm.add_argument("--out", required=True, help="ARPA file to write")
    lm.set_defaults(func=cmd_lm)

    i = sub.add_parser("info", help="describe a model directory or packed model file")
    i.add_argument("file")
    i.set_defaults(func=cmd_info)

    pr = sub.add_parser("prepare", help="make Kaldi data directories from a corpus layout")
    pr.add_argument("corpus", choices=["fsdd-digits", "librispeech", "speechocean762"])
    pr.add_argument("--src", required=True, help="corpus root (FSDD folder, LibriSpeech subset folder, "
                    "or speechocean762 root)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--num-train", type=int, default=1000)
    pr.add_argument("--num-test", type=int, default=200)
    pr.add_argument("--min-digits", type=int, default=2)
    pr.add_argument("--max-digits", type=int, default=5)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--layout", choices=["shipped", "original"], default="shipped",
                    help="speechocean762: our copy (train/dev/test) or the authors' release (WAVE/, train/, test/)")
    pr.add_argument("--subset", type=int, default=0,
                    help="speechocean762: keep N evenly spaced utterances per split (0 = all; for tests)")
    pr.set_defaults(func=cmd_prepare)

    ms = sub.add_parser("mapsswe", help="significance of the difference between two systems' hypotheses "
                                       "(NIST MAPSSWE; docs/scoring.md)")
    ms.add_argument("system_a", help="decode directory (allinone decode --out) or Kaldi text file")
    ms.add_argument("system_b", help="decode directory or Kaldi text file, same utterances")
    ms.add_argument("--ref", required=True, help="data directory (its text) or Kaldi text file of the references")
    ms.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    ms.add_argument("--out", default=None, help="also write the result as JSON here")
    ms.set_defaults(func=cmd_mapsswe)

    e = sub.add_parser("import-espnet", help="convert an ESPnet2 ASR experiment into an allinone model")
    e.add_argument("exp_dir")
    e.add_argument("--checkpoint", default=None, help="a .pth inside exp_dir (default: the averaged one)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_import_espnet)

    ee = sub.add_parser("export-espnet", help="write a float model or float subnet as an ESPnet2 ASR experiment")
    ee.add_argument("model", help="model directory (a float model, a supernet, or an extracted float subnet)")
    ee.add_argument("--out", required=True, help="ESPnet experiment directory to write")
    ee.add_argument("--subnet", default=None, help="float, uniform-width subnet of a supernet (e.g. L6_F1024_H4_B32)")
    ee.set_defaults(func=cmd_export_espnet)

    x = sub.add_parser("extract", help="extract subnets of a supernet as standalone packed models")
    x.add_argument("model", help="supernet model directory (exp/.../final)")
    x.add_argument("--subnet", nargs="+", default=[], help="subnet strings (e.g. L6_F1024_H4_B4) or grid files")
    x.add_argument("--grid", nargs="+", default=[], help="grid YAML files (lists or choices of subnets)")
    x.add_argument("--space", default=None, help="search space YAML (default: the one in the model's config.json)")
    x.add_argument("--out", required=True, help="output model dir (one subnet) or parent dir (several)")
    x.set_defaults(func=cmd_extract)

    bn = sub.add_parser("bench", help="WER, significance, size and latency of a grid of subnets (docs/benchmark.md)")
    bn.add_argument("model", help="supernet model directory (exp/.../final)")
    bn.add_argument("--grid", required=True,
                    help="grid YAML file, comma-separated subnet strings, or 'all' (every uniform subnet)")
    bn.add_argument("--data", nargs="+", required=True, help="Kaldi data directories (test sets)")
    bn.add_argument("--out", required=True, help="output directory (re-running resumes)")
    bn.add_argument("--reference", default=None, help="reference subnet (default: the largest float one)")
    bn.add_argument("--float-model", default=None, metavar="MODEL_DIR",
                    help="a separately trained float model (e.g. the one the supernet started from): "
                         "significance and 'lossless' are judged against it instead of the reference subnet")
    bn.add_argument("--alpha", type=float, default=0.05, help="MAPSSWE significance level")
    bn.add_argument("--beam", type=int, default=1, help="1 = CTC greedy; >1 = prefix beam search")
    bn.add_argument("--lm", help="ARPA token LM (allinone lm) fused into the beam search of every system")
    bn.add_argument("--lm-weight", type=float, default=0.5, help="weight of the LM's log-probabilities")
    bn.add_argument("--length-bonus", type=float, default=0.0, help="score added per output token (beam search)")
    bn.add_argument("--device", default="cpu", help="decoding device (cpu or cuda)")
    bn.add_argument("--threads", type=int, default=None, help="CPU threads for latency (default: torch's)")
    bn.add_argument("--latency-repeats", type=int, default=5, help="timed passes (median reported)")
    bn.add_argument("--latency-utts", type=int, default=8, help="utterances timed (first N of the first test set)")
    bn.add_argument("--no-latency", action="store_true", help="skip latency and memory measurements")
    bn.add_argument("--int8-front-end-calib", default=None, metavar="DATA_DIR",
                    help="also time all-8-bit systems with an 8-bit front end (cpu-int8-fe), calibrated on the "
                         "first 200 utterances of this data dir (e.g. the training set)")
    bn.add_argument("--num-workers", type=int, default=2,
                    help="processes for feature extraction and (beam > 1) the beam search")
    bn.set_defaults(func=cmd_bench)

    cm = sub.add_parser("compare", help="separately trained compression runs against a float model "
                                        "(docs/mixed_precision.md)")
    cm.add_argument("reference", help="float model directory (exp/.../final)")
    cm.add_argument("runs", nargs="+", help="METHOD/LABEL=RUN_DIR, each run dir holding allocation.json, "
                                            "timing.json and final/")
    cm.add_argument("--data", nargs="+", required=True, help="Kaldi data directories (test sets)")
    cm.add_argument("--out", required=True, help="output directory (re-running reuses decodes)")
    cm.add_argument("--alpha", type=float, default=0.05, help="MAPSSWE significance level")
    cm.add_argument("--beam", type=int, default=1, help="1 = CTC greedy; >1 = prefix beam search")
    cm.add_argument("--lm", help="ARPA token LM (allinone lm) fused into the beam search of every system")
    cm.add_argument("--lm-weight", type=float, default=0.5, help="weight of the LM's log-probabilities")
    cm.add_argument("--length-bonus", type=float, default=0.0, help="score added per output token (beam search)")
    cm.add_argument("--device", default="cpu")
    cm.add_argument("--num-workers", type=int, default=2,
                    help="processes for feature extraction and (beam > 1) the beam search")
    cm.add_argument("--nested", default=None, help="an `allinone bench` directory of a supernet: test its "
                    "nested systems against the runs of the same subnet (their individually trained twins)")
    cm.set_defaults(func=cmd_compare)

    se = sub.add_parser("search", help="best subnet under a size / bits / latency budget (docs/benchmark.md)")
    se.add_argument("model", help="supernet model directory (exp/.../final)")
    se.add_argument("--data", required=True, help="dev data directory (a sample is used)")
    se.add_argument("--max-mb", type=float, default=None, help="packed size limit in MiB (2^20 bytes)")
    se.add_argument("--max-params", type=int, default=None, help="parameter limit")
    se.add_argument("--max-bits", type=float, default=None, help="limit on the mean bit-width of block weights")
    se.add_argument("--max-latency-ms", type=float, default=None, help="CPU fp32 latency limit, ms per utterance")
    se.add_argument("--proxy", choices=["loss", "wer"], default="loss", help="dev CTC loss or greedy WER")
    se.add_argument("--sample", type=int, default=100, help="dev utterances in the proxy sample")
    se.add_argument("--grid", default=None, help="search only these subnets (grid file, strings, or 'all')")
    se.add_argument("--strategy", choices=["auto", "exhaustive", "evolution"], default="auto")
    se.add_argument("--exhaustive-limit", type=int, default=64,
                    help="auto: exhaustive when the space has at most this many subnets")
    se.add_argument("--population", type=int, default=16)
    se.add_argument("--generations", type=int, default=10)
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--device", default="cpu")
    se.add_argument("--threads", type=int, default=None, help="CPU threads for a latency budget")
    se.add_argument("--num-workers", type=int, default=2)
    se.add_argument("--extract-to", default=None, help="extract the best subnet into this model directory")
    se.set_defaults(func=cmd_search)

    al = sub.add_parser("allocate", help="stage 1 of two-stage mixed precision: sensitivity -> allocation.json "
                                         "(docs/mixed_precision.md)")
    al.add_argument("config", help="experiment YAML whose supernet section gives quant, init_from, candidate_bits, "
                                   "target_bits, granularity, allocation_method")
    al.add_argument("overrides", nargs="*", help="key=value overrides, e.g. supernet.target_bits=3")
    al.add_argument("--method", choices=["kl", "hessian"], required=True,
                    help="kl: KL of CTC posteriors with one group quantized; hessian: Hutchinson trace x error")
    al.add_argument("--out", required=True, help="directory for allocation.json and timing.json")
    al.add_argument("--num-batches", type=int, default=8, help="training batches to measure on")
    al.add_argument("--samples", type=int, default=8, help="Hutchinson samples (hessian)")
    al.add_argument("--device", default="auto")
    al.set_defaults(func=cmd_allocate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # bad input of any kind: a clear message, no traceback
        print(f"allinone {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
