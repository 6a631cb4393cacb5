"""Compare compression methods: separately trained runs against one float model (issue 6's tables).

``allinone bench`` compares subnets of *one* supernet. Compression methods (uniform QAT,
two-stage and one-stage mixed precision) give *separate* runs, each a run directory with
``allocation.json`` (the chosen subnet and its average bits), ``timing.json`` (seconds and
GPU-seconds of every stage) and ``final/`` (the trained supernet). ``compare_runs`` extracts
each run's allocation as a packed model, decodes every test set, tests it against the float
reference with MAPSSWE, and writes one table with WER, significance, average bits, packed
size, compression ratio and compression time, plus each method's lossless compression ratio:
the largest ratio (reference fp32 bytes / packed bytes) among the method's systems that no
test set finds significantly worse than the reference, and the largest ratio of the quantizable
weights alone among them (``SizeReport.weight_bytes``, the way published ratios count).

With ``nested=BENCH_DIR`` (an ``allinone bench`` output of a supernet) the runs are also the
*individually trained twins* of that supernet's nested systems (issue 5's experiment): every
nested system whose subnet string equals a run's subnet (and the bench's reference system,
whose twin is the float reference model) is tested against its twin with MAPSSWE, and the
supernet's one training run is set against training every benchmarked system alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from allinone.eval.report import significance_mark
from allinone.utils import atomic_open

logger = logging.getLogger("allinone")

__all__ = ["MethodRun", "parse_run", "compare_runs", "lossless_ratios", "nested_twins", "reference_weight_bytes"]


@dataclass(frozen=True)
class MethodRun:
    """One compressed system: ``method`` groups systems (e.g. ``one_stage``), ``label`` names this one."""

    method: str
    label: str
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.method}/{self.label}"


def parse_run(text: str) -> MethodRun:
    """``METHOD/LABEL=RUN_DIR`` (e.g. ``one_stage/b3=exp/mixed/one_stage_b3``) -> ``MethodRun``."""
    name, sep, path = text.partition("=")
    method, slash, label = name.partition("/")
    if not sep or not slash or not method or not label or not path:
        raise ValueError(f"run {text!r}: expected METHOD/LABEL=RUN_DIR, e.g. one_stage/b3=exp/mixed/one_stage_b3")
    return MethodRun(method, label, Path(path))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def _check_run(run: MethodRun) -> tuple[dict, dict]:
    """allocation.json and timing.json of a run, after checking the run directory is complete."""
    if not run.run_dir.is_dir():
        raise ValueError(f"run {run.name}: directory not found: {run.run_dir}")
    alloc = _read_json(run.run_dir / "allocation.json", f"run {run.name}: allocation")
    timing = _read_json(run.run_dir / "timing.json", f"run {run.name}: timing")
    if "subnet" not in alloc:
        raise ValueError(f"run {run.name}: {run.run_dir / 'allocation.json'} has no 'subnet'")
    if not (run.run_dir / "final" / "config.json").is_file():
        raise ValueError(f"run {run.name}: no trained model at {run.run_dir / 'final'}")
    return alloc, timing


def _saved_search(decode_json: Path) -> dict:
    """The ``search_settings`` a saved decode was made with."""
    from allinone.eval.decode import search_settings

    d = json.loads(decode_json.read_text())
    return search_settings(d.get("beam", 1), d.get("lm"), d.get("lm_weight"), d.get("length_bonus", 0.0))


def _decode(model_dir: Path, data_dirs: list[Path], out_dir: Path, opts) -> dict[str, dict]:
    """Decode each test set once with ``opts`` (a ``DecodeOptions``; reused when its wer.json
    exists and was decoded the same way); returns {set: {wer, hyps}}."""
    from allinone.eval.bench import read_hyps
    from allinone.eval.decode import decode_data_dir

    want = opts.search_settings()
    out = {}
    for data in data_dirs:
        dest = out_dir / data.name
        done = (dest / "wer.json").is_file() and (dest / "decode.json").is_file()
        if not done or _saved_search(dest / "decode.json") != want:
            decode_data_dir(model_dir, data, dest, opts)
        out[data.name] = {"wer": json.loads((dest / "wer.json").read_text()), "hyps": read_hyps(dest)}
    return out


def lossless_ratios(rows: list[dict], key: str = "ratio_vs_ref") -> dict[str, dict | None]:
    """Per method: its system with the largest ``key`` (``ratio_vs_ref``, or ``weights_ratio_vs_ref``)
    among those ``lossless`` on every set (None when it has none)."""
    best: dict[str, dict | None] = {}
    for row in rows:
        best.setdefault(row["method"], None)
        if row["lossless"] and (best[row["method"]] is None or row[key] > best[row["method"]][key]):
            best[row["method"]] = row
    return best


def reference_weight_bytes(ref_size, packed) -> int:
    """The float reference's quantizable weights at 32 bits, over the same tensors a system counts:
    the reference's own (``ref_size``) plus the system's quantized tensors outside them (a wav2vec2
    feature extractor quantized at ``extractor_bits``, which the float reference does not count)."""
    counted = set(ref_size.weight_names)
    extra = [q for name, q in packed.quantized.items() if name not in counted]
    return ref_size.weight_fp32_bytes + 4 * sum(q.codes.numel() for q in extra)


def nested_twins(bench_dir: str | Path, twins: dict[str, dict[str, dict[str, str]]],
                 twin_seconds: dict[str, float | None], refs_of: dict[str, dict[str, str]], alpha: float,
                 reference: tuple[dict[str, dict[str, str]], int] | None = None) -> dict:
    """Nested systems of a supernet bench against their individually trained twins.

    bench_dir: an ``allinone bench`` output (``results.json``, ``systems/<name>/<set>/text``).
    twins: subnet string -> test set -> the twin's hypotheses; twin_seconds: subnet string ->
    the twin's training seconds.  refs_of: test set -> reference transcripts.  reference:
    (test set -> hypotheses, fp32 bytes) of the float model both started from, the twin of
    the bench's reference system (its largest float subnet) when the sizes agree.  Returns ``{"pairs": [...], "time": {...}}``:
    per pair and set both WERs, the MAPSSWE p-value, ``worse`` and ``better`` (the nested
    system significantly worse / better than its twin); ``time``: the supernet run's training seconds (from
    its ``final/config.json``) against the mean twin's seconds times the number of
    benchmarked systems other than the reference (each would need its own run).
    """
    from allinone.eval.bench import read_hyps
    from allinone.eval.mapsswe import mapsswe
    from allinone.eval.wer import score

    bench_dir = Path(bench_dir)
    bench = _read_json(bench_dir / "results.json", "bench results (--nested)")
    names = {s["system"] for s in bench["systems"]}
    twins, twin_seconds = dict(twins), dict(twin_seconds)
    if reference is not None:
        ref_system = next(s for s in bench["systems"] if s["system"] == bench["reference"])
        if ref_system["fp32_bytes"] == reference[1]:
            twins[ref_system["system"]], twin_seconds[ref_system["system"]] = reference[0], None
        else:
            logger.warning("--nested: the float reference (%d fp32 bytes) is not the supernet's largest float "
                           "subnet %s (%d bytes); that pair is left out", reference[1], ref_system["system"],
                           ref_system["fp32_bytes"])
    sets = _bench_sets(bench_dir, bench, list(refs_of))
    pairs = []
    for subnet, twin_hyps in twins.items():
        if subnet not in names:
            continue
        row = {"system": subnet, "twin_seconds": twin_seconds.get(subnet), "sets": {}}
        for t in sets:
            nested = read_hyps(bench_dir / "systems" / subnet / t)
            refs = {u: r for u, r in refs_of[t].items() if u in nested and u in twin_hyps[t]}
            test = mapsswe(refs, twin_hyps[t], nested, alpha=alpha)
            row["sets"][t] = {"nested_wer": score(refs, nested).wer, "twin_wer": score(refs, twin_hyps[t]).wer,
                              "p_value": test.p_value, **verdict(test, "b")}  # (a = the twin)
        row["worse"] = any(x["worse"] for x in row["sets"].values())
        pairs.append(row)
    model_config = Path(bench["model"]) / "config.json"
    supernet_s = json.loads(model_config.read_text()).get("train_seconds") if model_config.is_file() else None
    # only the runs that are twins of a benchmarked system (another run's seconds, e.g. a mixed-precision
    # search, say nothing about training one of these systems alone)
    alone = [s for subnet, s in twin_seconds.items() if subnet in names and s is not None]
    n_alone = len(names) - 1  # the reference system's twin is the float model itself
    alone_total = sum(alone) / len(alone) * n_alone if alone else None
    return {"bench": str(bench_dir), "pairs": pairs, "time": {
        "supernet_seconds": supernet_s, "twin_seconds_mean": sum(alone) / len(alone) if alone else None,
        "systems_alone": n_alone, "alone_seconds": alone_total,
        "speedup": alone_total / supernet_s if alone_total and supernet_s else None}}


def _bench_sets(bench_dir: Path, bench: dict, compared: list[str]) -> list[str]:
    """The test set names of a bench's results; ``ValueError`` unless they are the ``compared`` ones."""
    sets = [t["name"] for t in bench["test_sets"]]
    if set(sets) != set(compared):
        raise ValueError(f"--nested {bench_dir}: benchmarked on test sets {sets}, compared on {sorted(compared)}; "
                         "use the same data directories")
    return sets


def compare_runs(reference: str | Path, runs: list[MethodRun], data_dirs: list[str | Path], out_dir: str | Path,
                 alpha: float = 0.05, beam: int = 1, device: str = "cpu", num_workers: int = 2,
                 nested: str | Path | None = None, lm: str | None = None, lm_weight: float = 0.5,
                 length_bonus: float = 0.0) -> dict:
    """Extract, decode and test every run against the float ``reference`` model directory.

    beam, lm, lm_weight, length_bonus: how every system is decoded (``DecodeOptions``); a
    saved decode made otherwise is decoded again.

    Writes ``out_dir/results.json`` and ``results.md``; returns the results dict. Every input
    is checked before any decoding starts (a missing run file is an error naming it).
    nested: an ``allinone bench`` directory whose nested systems the runs are twins of
    (``nested_twins``; adds ``results["nested"]``).
    """
    from allinone.data.kaldi import read_data_dir
    from allinone.elastic.extract import extract_to_dirs, extracted_size
    from allinone.eval.mapsswe import mapsswe
    from allinone.eval.report import reference_warning
    from allinone.models.saved import PACKED_WEIGHTS, load_model_dir
    from allinone.quant.packed_file import load_packed

    reference, out_dir = Path(reference), Path(out_dir)
    data_dirs = [Path(d) for d in data_dirs]
    if not runs:
        raise ValueError("compare: give at least one run (METHOD/LABEL=RUN_DIR)")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    from allinone.eval.decode import DecodeOptions, search_settings

    # checked before any decoding
    dopts = DecodeOptions(beam=beam, device=device, num_workers=num_workers, lm=lm, lm_weight=lm_weight,
                          length_bonus=length_bonus)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: run names must be unique, got {names}")
    if not (reference / "config.json").is_file():
        raise ValueError(f"reference model not found: {reference} (a model directory with config.json)")
    for d in data_dirs:
        if not (d / "text").is_file() or not (d / "wav.scp").is_file():
            raise ValueError(f"test set {d}: not a data directory (needs wav.scp and text)")
    checked = {r.name: _check_run(r) for r in runs}
    if nested is not None:
        if not (Path(nested) / "results.json").is_file():
            raise ValueError(f"--nested {nested}: no results.json (an `allinone bench` output directory)")
        bench = _read_json(Path(nested) / "results.json", "bench results (--nested)")
        _bench_sets(Path(nested), bench, [d.name for d in data_dirs])
        # a nested system and its twin must be decoded alike (beam, LM), or the test compares decoders
        settings = _read_json(Path(nested) / "systems" / bench["reference"] / "system.json", "bench system")["settings"]
        theirs, ours = settings.get("search") or search_settings(settings.get("beam", 1)), dopts.search_settings()
        if theirs != ours:
            raise ValueError(f"--nested {nested}: benchmarked with {theirs}, compared with {ours}; "
                             "decode both the same way (--beam, --lm, --lm-weight, --length-bonus)")

    ref_loaded = load_model_dir(reference)
    ref_size = extracted_size(ref_loaded.model, {})
    ref_fp32 = ref_size.fp32_bytes
    ref_dec = _decode(reference, data_dirs, out_dir / "reference", dopts)
    refs_of = {d.name: {u.utt_id: u.text for u in read_data_dir(d)} for d in data_dirs}
    rows = []
    for run in runs:
        alloc, timing = checked[run.name]
        sys_dir = out_dir / "systems" / run.method / run.label
        model_dir = sys_dir / "model"
        if not (model_dir / "config.json").is_file():
            extract_to_dirs(run.run_dir / "final", [alloc["subnet"]], model_dir)
        packed = load_packed(model_dir / PACKED_WEIGHTS)
        report = packed.size_report()  # what `allinone info` prints
        dec = _decode(model_dir, data_dirs, sys_dir, dopts)
        per_set = {}
        for name, d in dec.items():
            refs = {u: t for u, t in refs_of[name].items() if u in d["hyps"]}
            test = mapsswe(refs, d["hyps"], {u: ref_dec[name]["hyps"][u] for u in refs}, alpha=alpha)
            per_set[name] = {"wer": d["wer"]["wer"], "sub": d["wer"]["sub"], "del": d["wer"]["del"],
                             "ins": d["wer"]["ins"], "p_value": test.p_value,
                             **verdict(test, "a")}  # (a = the system, b = the reference)
        rows.append({
            "method": run.method, "label": run.label, "run_dir": str(run.run_dir), "subnet": alloc["subnet"],
            "average_bits": report.average_bits, "target_bits": alloc.get("target_bits"),
            "allocation_method": alloc.get("method"), "params": report.total_params,
            "packed_bytes": report.packed_bytes, "ratio_vs_ref": ref_fp32 / report.packed_bytes,
            "weights_ratio_vs_ref": reference_weight_bytes(ref_size, packed) / report.weight_bytes,
            "compression_seconds": timing.get("total_seconds"), "compression_gpu_seconds": timing.get("total_gpu_seconds"),
            "devices": sorted({s.get("device", "?") for s in timing.get("stages", [])}),
            "sets": per_set, "lossless": not any(s["worse"] for s in per_set.values()),
        })
    best, best_weights = lossless_ratios(rows), lossless_ratios(rows, "weights_ratio_vs_ref")
    nested_result = None
    if nested is not None:
        from allinone.eval.bench import read_hyps

        twins = {row["subnet"]: {t: read_hyps(out_dir / "systems" / row["method"] / row["label"] / t)
                                 for t in row["sets"]} for row in rows}
        seconds = {row["subnet"]: row["compression_seconds"] for row in rows}
        nested_result = nested_twins(nested, twins, seconds, refs_of, alpha,
                                     reference=({n: d["hyps"] for n, d in ref_dec.items()}, ref_fp32))
    results = {
        "reference": str(reference), "reference_fp32_bytes": ref_fp32, "alpha": alpha, **dopts.search_settings(),
        "reference_wer": {n: d["wer"]["wer"] for n, d in ref_dec.items()},
        "reference_warning": reference_warning({n: d["wer"] for n, d in ref_dec.items()}), "systems": rows,
        # per method, as allinone bench: the largest whole-model ratio and, maybe of another system,
        # the largest weights-only ratio among its lossless systems
        "lossless": {m: (None if r is None else {"label": r["label"], "subnet": r["subnet"],
                                                 "ratio_vs_ref": r["ratio_vs_ref"],
                                                 "weights_ratio_vs_ref": best_weights[m]["weights_ratio_vs_ref"],
                                                 "weights_label": best_weights[m]["label"]})
                     for m, r in best.items()},
    }
    if nested_result is not None:
        results["nested"] = nested_result
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "results.json") as f:
        json.dump(results, f, indent=1)
    with atomic_open(out_dir / "results.md") as f:
        f.write(format_markdown(results))
    return results


def format_markdown(results: dict) -> str:
    """The comparison table and the per-method lossless compression ratios."""
    sets = list(results["reference_wer"])
    head = ["method", "system", "subnet", "avg bits", "packed MiB", "ratio vs ref", "weights ratio vs ref"]
    head += [f"WER {s} (S/D/I)" for s in sets] + [f"p {s}" for s in sets]
    head += ["lossless", "compression s (GPU-s)"]
    lines = [f"Reference: {results['reference']} (fp32 {results['reference_fp32_bytes'] / 2**20:.3f} MiB; WER "
             + ", ".join(f"{s} {w:.2f}" for s, w in results["reference_wer"].items())
             + f"). MAPSSWE at alpha = {results['alpha']}; ▲ = significantly worse than the reference, "
             "▼ = significantly better.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["systems"]:
        cells = [r["method"], r["label"], r["subnet"], f"{r['average_bits']:.2f}", f"{r['packed_bytes'] / 2**20:.3f}",
                 f"{r['ratio_vs_ref']:.2f}x", f"{r['weights_ratio_vs_ref']:.2f}x"]
        for s in sets:
            x = r["sets"][s]
            cells.append(f"{x['wer']:.2f}{significance_mark(x['worse'], x.get('better', False))} "
                         f"({x['sub']}/{x['del']}/{x['ins']})")
        cells += [f"{r['sets'][s]['p_value']:.3f}" for s in sets]
        secs, gpu = r["compression_seconds"], r["compression_gpu_seconds"]
        cells += ["yes" if r["lossless"] else "no",
                  "-" if secs is None else f"{secs:.0f} ({gpu:.0f})" if gpu is not None else f"{secs:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Lossless compression ratio per method (largest ratio vs the reference with no significant "
              "WER increase on any test set; then the same counting the quantizable weights alone, as "
              "published ratios do):", ""]
    for method, best in results["lossless"].items():
        lines.append(f"- {method}: " + ("none of its systems is lossless" if best is None else
                                        f"{best['ratio_vs_ref']:.2f}x ({best['label']}, {best['subnet']}); "
                                        f"weights {best['weights_ratio_vs_ref']:.2f}x ({best['weights_label']})"))
    if results.get("reference_warning"):
        lines += ["", f"**Warning:** {results['reference_warning']}."]
    if "nested" in results:
        lines += ["", *format_nested(results["nested"], sets)]
    return "\n".join(lines) + "\n"


def verdict(test, system: str) -> dict:
    """``worse`` / ``better`` of ``system`` (``"a"`` or ``"b"``, its place in the MAPSSWE call)
    against the other system, from a ``MapsswResult``."""
    other = "b" if system == "a" else "a"
    return {"worse": bool(test.significant and test.better == other),
            "better": bool(test.significant and test.better == system)}


def format_nested(nested: dict, sets: list[str]) -> list[str]:
    """Markdown lines: nested systems against their twins, and the training-time accounting."""
    head = ["nested system"] + [f"WER {s} nested / twin" for s in sets] + [f"p {s}" for s in sets]
    head += ["nested worse", "twin training s"]
    lines = [f"Nested systems of {nested['bench']} against their individually trained twins "
             "(MAPSSWE; ▲ = nested significantly worse than its twin, ▼ = better):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in nested["pairs"]:
        cells = [p["system"]]
        marks = {s: significance_mark(x["worse"], x.get("better", False)) for s, x in p["sets"].items()}
        cells += [f"{p['sets'][s]['nested_wer']:.2f}{marks[s]} / {p['sets'][s]['twin_wer']:.2f}" for s in sets]
        cells += [f"{p['sets'][s]['p_value']:.3f}" for s in sets]
        cells += ["yes" if p["worse"] else "no",
                  "(float model)" if p["twin_seconds"] is None else f"{p['twin_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = nested["time"]
    if t["speedup"] is not None:
        lines += ["", f"Training time: one supernet run {t['supernet_seconds']:.0f} s against "
                      f"{t['systems_alone']} systems x {t['twin_seconds_mean']:.0f} s (mean twin) = "
                      f"{t['alone_seconds']:.0f} s alone: {t['speedup']:.2f}x less."]
    return lines
