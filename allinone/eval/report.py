"""Tables, plot and report of ``allinone bench`` (``results.{csv,json,md}``, ``pareto.png``, ``report.md``).

``build_results`` turns the per-system records (sizes, WER, latency) and the MAPSSWE
results into one JSON-ready dict; ``write_outputs`` writes every file from that dict, so
the CSV, the JSON, the markdown table and the plot always show the same numbers.

Definitions (method.md section 2):

* ``ratio`` = the system's fp32 bytes / its packed bytes: what ``allinone info`` prints
  for the extracted file (only quantization counts);
* ``ratio_vs_ref`` = the reference's fp32 bytes / the system's packed bytes: compression
  against the 32-bit model (depth and width count too). The lossless compression ratio
  uses this one;
* ``weights_ratio_vs_ref`` = the reference's quantizable weights at 32 bits / the system's
  (``SizeReport.weight_bytes``): the same without the parts every system keeps float (front
  end, norms, biases, CTC layer), as the published ratios count; ``lossless_weights_ratio``
  is its largest value among the lossless systems;
* ``worse``: MAPSSWE (system a = the reference subnet, or the separately trained float model
  of ``--float-model``) finds a significant difference at alpha and system a is the better
  one; ``lossless`` = not worse on *every* test set;
* ``pooled WER`` = 100 * all errors / all reference words over the test sets (the plot's
  y axis and the size-bracket choice when there are several test sets).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
from pathlib import Path

import torch

from allinone.utils import atomic_open

__all__ = ["build_results", "write_outputs", "pareto_front", "size_brackets", "ROW_FIELDS",
           "csv_value", "provenance", "reference_warning", "significance_mark", "lossless_summary",
           "significance_reference"]

MIB = 2 ** 20

# One CSV / JSON row per (system, test set); latency columns follow, per backend.
SIZE_FIELDS = ["params", "quantized_params", "avg_bits", "packed_bytes", "fp32_bytes", "ratio", "ratio_vs_ref",
               "weight_bytes", "weights_ratio_vs_ref"]
ROW_FIELDS = [
    "system", "reference", "data", "wer", "sub", "del", "ins", "errors", "words", "sentences",
    "ser", "p_value", "statistic", "significant", "worse", "lossless", "lossless_all",
] + SIZE_FIELDS
LATENCY_FIELDS = ("ms_per_utt", "rtf", "peak_mem_mb")


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def provenance(command: str | None) -> dict:
    """Command, versions, date and machine, for the report."""
    import allinone

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "command": command,
        "allinone": allinone.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu},
    }


def reference_warning(wer_of_set: dict[str, dict], what: str = "the reference") -> str | None:
    """Why the significance test cannot judge compression against this reference, or None.

    wer_of_set: test set name -> the reference's ``wer.json`` counts (``words``, ``sub``,
    ``del``). A reference that gets no word of a test set right (an untrained model that
    outputs nothing: every word deleted) cannot be beaten at losing words, so every system
    comes out "lossless" and the lossless compression ratio is just the smallest system's.
    """
    blind = [name for name, w in wer_of_set.items() if w["words"] and w["sub"] + w["del"] >= w["words"]]
    if not blind:
        return None
    return (f"{what} recognises no word of {', '.join(blind)} (every reference word substituted or "
            "deleted): no system can be significantly worse by losing words, so 'lossless' and the lossless "
            "compression ratio say nothing about the compression; train it further")


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the systems no other system beats on both size and WER.

    points: (name, size, wer). A system is on the front when every smaller-or-equal system
    has a strictly higher WER (ties in size: the lower WER wins).
    """
    front, best = [], math.inf
    for name, size, wer in sorted(points, key=lambda p: (p[1], p[2])):
        if wer < best:
            front.append(name)
            best = wer
    return front


def size_brackets(systems: list[dict], ref_bytes: int) -> list[dict]:
    """Best system (lowest pooled WER, then smallest) with packed size <= ref_bytes / k, k = 1, 2, 4, ...

    Brackets stop at the first one below the smallest system.
    """
    out, k = [], 1
    smallest = min(s["packed_bytes"] for s in systems)
    while ref_bytes / k >= smallest:
        limit = ref_bytes / k
        fits = [s for s in systems if s["packed_bytes"] <= limit]
        best = min(fits, key=lambda s: (s["pooled_wer"], s["packed_bytes"]))
        out.append({"max_ratio": k, "max_bytes": limit, "system": best["system"],
                    "packed_bytes": best["packed_bytes"], "ratio_vs_ref": best["ratio_vs_ref"],
                    "pooled_wer": best["pooled_wer"], "lossless": best["lossless"]})
        k *= 2
    return out


def build_results(systems: list[dict], significance: dict, reference: str, test_sets: list[dict],
                  model_dir: str, opts, command: str | None, skipped: int = 0,
                  float_model: dict | None = None) -> dict:
    """The content of results.json.

    systems: ``system.json`` records (reference first); significance: system -> test set ->
    ``MapsswResult.to_dict()`` with the reference (or the float model) as system a;
    float_model: ``{"path", "wer": {set: wer.json}}`` of a separately trained float model when
    significance was measured against it (``--float-model``) rather than the reference subnet.
    Sizes and ratios are always relative to the reference subnet.
    """
    ref_record = next(s for s in systems if s["system"] == reference)
    ref_bytes = ref_record["size"]["fp32_bytes"]
    ref_weight_bytes = ref_record["size"]["weight_fp32_bytes"]
    names = [t["name"] for t in test_sets]
    backends = sorted({b for s in systems for b in s["latency"]})
    out_systems, rows = [], []
    for rec in systems:
        name, size = rec["system"], rec["size"]
        per_set = {}
        for t in names:
            w, sig = rec["wer"][t], significance[name][t]
            worse = bool(sig["significant"] and sig["better"] == "a")
            per_set[t] = {
                "wer": w["wer"], "sub": w["sub"], "del": w["del"], "ins": w["ins"], "errors": w["errors"],
                "words": w["words"], "sentences": w["sentences"], "ser": w["ser"],
                "p_value": sig["p_value"], "statistic": sig["statistic"],
                "significant": bool(sig["significant"]), "worse": worse, "lossless": not worse,
            }
        errors = sum(per_set[t]["errors"] for t in names)
        words = sum(per_set[t]["words"] for t in names)
        sysd = {
            "system": name, "reference": name == reference,
            "params": size["params"], "quantized_params": size["quantized_params"],
            "avg_bits": _finite(size["avg_bits"]), "packed_bytes": size["packed_bytes"],
            "fp32_bytes": size["fp32_bytes"], "ratio": size["ratio"],
            "ratio_vs_ref": ref_bytes / size["packed_bytes"],
            "weight_bytes": size["weight_bytes"], "weights_ratio_vs_ref": ref_weight_bytes / size["weight_bytes"],
            "pooled_wer": 100.0 * errors / words,
            "lossless": all(per_set[t]["lossless"] for t in names),
            "test_sets": per_set,
            "latency": {b: {k: _finite(v) for k, v in lat.items()} for b, lat in rec["latency"].items()},
        }
        out_systems.append(sysd)
        for t in names:
            row = {"system": name, "reference": sysd["reference"], "data": t, **per_set[t],
                   "lossless_all": sysd["lossless"]}
            row.update({k: sysd[k] for k in SIZE_FIELDS})
            for b in backends:
                lat = sysd["latency"].get(b, {})
                row.update({f"{b}_{k}": lat.get(k) for k in LATENCY_FIELDS})
            rows.append(row)
    # The reference subnet is always lossless against itself; against a float model none may be.
    lossless = [s for s in out_systems if s["lossless"]]
    best = max(lossless, key=lambda s: (s["ratio_vs_ref"], -s["pooled_wer"]), default=None)
    best_weights = max(lossless, key=lambda s: (s["weights_ratio_vs_ref"], -s["pooled_wer"]), default=None)
    float_summary = None
    if float_model is not None:
        counts = [float_model["wer"][t] for t in names]
        float_summary = {"path": float_model["path"],
                         "wer": {t: float_model["wer"][t]["wer"] for t in names},
                         "pooled_wer": 100.0 * sum(c["errors"] for c in counts) / sum(c["words"] for c in counts)}
    return {
        "model": model_dir,
        "reference": reference,
        "reference_fp32_bytes": ref_bytes,
        # what significance (and so "lossless") was measured against
        "significance_reference": "float model" if float_model is not None else "reference subnet",
        "float_model": float_summary,
        "alpha": opts.alpha,
        "beam": opts.beam,
        "test_sets": test_sets,
        "backends": backends,
        "lossless_compression_ratio": best and best["ratio_vs_ref"],
        "lossless_system": best and best["system"],
        "lossless_weights_ratio": best_weights and best_weights["weights_ratio_vs_ref"],
        "lossless_weights_system": best_weights and best_weights["system"],
        "reference_warning": (reference_warning(float_model["wer"], "the float model") if float_model is not None
                              else reference_warning(ref_record["wer"])),
        "pareto_front": pareto_front([(s["system"], s["packed_bytes"], s["pooled_wer"]) for s in out_systems]),
        "size_brackets": size_brackets(out_systems, ref_bytes),
        "systems": out_systems,
        "rows": rows,
        "row_fields": ROW_FIELDS + [f"{b}_{k}" for b in backends for k in LATENCY_FIELDS],
        "resumed_systems": skipped,
        "provenance": provenance(command),
    }


# --------------------------------------------------------------------------- writers


def csv_value(v) -> str:
    """How a JSON value is written in results.csv (None -> empty; floats at full precision)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = results["row_fields"]
    w.writerow(fields)
    for row in results["rows"]:
        w.writerow([csv_value(row.get(k)) for k in fields])
    return buf.getvalue()


def _fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None else format(x, spec)


def results_table(results: dict) -> str:
    """The markdown table of results.md: one line per system."""
    sets = [t["name"] for t in results["test_sets"]]
    head = ["system", "params", "packed MiB", "ratio", "ratio vs ref", "weights ratio vs ref", "avg bits"]
    for t in sets:
        head += [f"WER {t} (S/D/I)", f"p {t}"]
    head += ["lossless"] + [f"{b} ms/utt (RTF)" for b in results["backends"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in results["systems"]:
        name = f"**{s['system']}** (ref)" if s["reference"] else s["system"]
        cells = [name, f"{s['params']:,}", f"{s['packed_bytes'] / MIB:.3f}", f"{s['ratio']:.2f}x",
                 f"{s['ratio_vs_ref']:.2f}x", f"{s['weights_ratio_vs_ref']:.2f}x",
                 _fmt(s["avg_bits"], ".2f", "32 (float)")]
        for t in sets:
            r = s["test_sets"][t]
            mark = significance_mark(r["worse"], r["significant"] and not r["worse"])
            cells += [f"{r['wer']:.2f}{mark} ({r['sub']}/{r['del']}/{r['ins']})", f"{r['p_value']:.3f}"]
        cells.append("yes" if s["lossless"] else "no")
        for b in results["backends"]:
            lat = s["latency"].get(b)
            cells.append("-" if not lat else f"{lat['ms_per_utt']:.1f} ({lat['rtf']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significance_mark(worse: bool, better: bool) -> str:
    """" ▲" after a WER significantly worse than what it is judged against, " ▼" after one
    significantly better, else nothing (bench and compare tables)."""
    return " ▲" if worse else " ▼" if better else ""


def lossless_summary(results: dict) -> str:
    """One line: the lossless compression ratio and system, whole-model and weights-only."""
    if results["lossless_system"] is None:
        return "no system is lossless"
    return (f"lossless compression ratio {results['lossless_compression_ratio']:.2f}x ({results['lossless_system']}); "
            f"of the quantizable weights alone {results['lossless_weights_ratio']:.2f}x "
            f"({results['lossless_weights_system']})")


def significance_reference(results: dict) -> str:
    """What the systems' significance was measured against, in words."""
    fm = results.get("float_model")
    return f"the float model {fm['path']}" if fm else f"the reference {results['reference']}"


def _results_md(results: dict) -> str:
    sets = ", ".join(f"{t['name']} ({t['utterances']} utts)" for t in results["test_sets"])
    fm = results.get("float_model")
    float_line = ("Float model: WER " + ", ".join(f"{t} {w:.2f}" for t, w in fm["wer"].items()) + ".\n" if fm else "")
    judge = significance_reference(results)
    summary = lossless_summary(results)
    return (
        f"# Benchmark of {results['model']}\n\n"
        f"Test sets: {sets}. Reference (sizes): {results['reference']}. MAPSSWE at alpha = {results['alpha']}; "
        f"▲ = significantly worse than {judge}, ▼ = significantly better; p = two-tailed p-value against it.\n"
        + float_line +
        "ratio = the system's fp32 size / its packed size (as `allinone info`); ratio vs ref = the "
        "reference's fp32 size / the packed size; weights ratio vs ref = the same for the quantizable weights "
        "alone (no front end, norms, biases or CTC layer: how published ratios count). "
        "Latency: median over repeats, per utterance, warm-up excluded.\n\n"
        + results_table(results)
        + f"\n{summary[0].upper()}{summary[1:]} (against {judge}).\n"
        + _warning_md(results)
    )


def _warning_md(results: dict) -> str:
    return f"\n**Warning:** {results['reference_warning']}.\n" if results.get("reference_warning") else ""


def plot_pareto(results: dict, path: Path) -> None:
    """WER (pooled over test sets) against packed size (log axis): lossless systems filled,
    lossy hollow, the reference a star, the Pareto front a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    systems = results["systems"]
    front = set(results["pareto_front"])
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for lossless, style in ((True, dict(color="tab:green", label="lossless (not significantly worse)")),
                            (False, dict(facecolors="none", edgecolors="tab:red", label="significantly worse"))):
        pts = [s for s in systems if s["lossless"] == lossless and not s["reference"]]
        if pts:
            ax.scatter([s["packed_bytes"] / MIB for s in pts], [s["pooled_wer"] for s in pts], s=36,
                       zorder=3, **style)
    ref = next(s for s in systems if s["reference"])
    ax.scatter([ref["packed_bytes"] / MIB], [ref["pooled_wer"]], marker="*", s=220, color="gold",
               edgecolors="black", zorder=4, label=f"reference {ref['system']}")
    fm = results.get("float_model")  # the dashed line: the WER significance is judged against
    ax.axhline(fm["pooled_wer"] if fm else ref["pooled_wer"], color="gray", lw=0.8, ls="--", zorder=1,
               label="float model" if fm else None)
    fs = sorted((s for s in systems if s["system"] in front), key=lambda s: s["packed_bytes"])
    ax.plot([s["packed_bytes"] / MIB for s in fs], [s["pooled_wer"] for s in fs], color="tab:blue",
            lw=1, drawstyle="steps-post", zorder=2, label="Pareto front")
    for s in fs:
        ax.annotate(s["system"], (s["packed_bytes"] / MIB, s["pooled_wer"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    # Plain numbers on the size axis: a grid often spans less than a decade, where the
    # default log labels would read "2 x 10^0".
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("packed size (MiB, log scale)")
    sets = [t["name"] for t in results["test_sets"]]
    ax.set_ylabel("WER (%)" + (f", pooled over {', '.join(sets)}" if len(sets) > 1 else f", {sets[0]}"))
    ax.set_title(lossless_summary(results), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _report_md(results: dict) -> str:
    p = results["provenance"]
    m = p["machine"]
    ref = next(s for s in results["systems"] if s["reference"])
    n_lossless = sum(s["lossless"] for s in results["systems"])
    fm = results.get("float_model")
    judge = (f"the float model {fm['path']} at pooled WER {fm['pooled_wer']:.2f}%" if fm else
             f"the reference at pooled WER {ref['pooled_wer']:.2f}%")
    if results["lossless_system"] is None:
        headline = (f"**No system is lossless**: every one is significantly worse than {judge} on some test set "
                    f"(MAPSSWE, alpha = {results['alpha']}).")
    else:
        headline = (f"**Lossless compression ratio: {results['lossless_compression_ratio']:.2f}x** "
                    f"({results['lossless_system']}): the largest compression against the reference "
                    f"{results['reference']} ({results['reference_fp32_bytes'] / MIB:.3f} MiB fp32) among the "
                    f"{n_lossless} of {len(results['systems'])} systems that no test set finds significantly worse "
                    f"than {judge} (MAPSSWE, alpha = {results['alpha']}). Counting the quantizable weights alone "
                    f"(as published ratios do): {results['lossless_weights_ratio']:.2f}x "
                    f"({results['lossless_weights_system']}).")
    lines = [
        f"# Benchmark report: {results['model']}",
        "",
        f"![WER against packed size](pareto.png)",
        "",
        headline,
        _warning_md(results),
        "## Best system per size bracket",
        "",
        "| packed size <= | best system | packed MiB | ratio vs ref | WER (pooled) | lossless |",
        "|---|---|---:|---:|---:|---|",
    ]
    for b in results["size_brackets"]:
        lines.append(f"| ref / {b['max_ratio']} ({b['max_bytes'] / MIB:.3f} MiB) | {b['system']} | "
                     f"{b['packed_bytes'] / MIB:.3f} | {b['ratio_vs_ref']:.2f}x | {b['pooled_wer']:.2f} | "
                     f"{'yes' if b['lossless'] else 'no'} |")
    lines += [
        "",
        f"Pareto front (smallest first): {', '.join(results['pareto_front'])}.",
        "",
        "Full table: [results.md](results.md) (also results.csv, results.json); per-system "
        "hypotheses and wer.json under systems/.",
        "",
        "## How this was made",
        "",
        "```",
        p["command"] or "(run from Python: allinone.eval.bench.run_bench)",
        "```",
        "",
        f"allinone {p['allinone']}, torch {p['torch']}, Python {p['python']}; {p['date']}; "
        f"{m['platform']}, {m['cpu']} ({m['cpu_count']} CPUs)" + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"; beam {results['beam']}.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    """results.json, results.csv, results.md, pareto.png and report.md in ``out_dir``, each atomic."""
    out = Path(out_dir)
    with atomic_open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, allow_nan=False)
        f.write("\n")
    with atomic_open(out / "results.csv", "w", encoding="utf-8", newline="") as f:
        f.write(_csv(results))
    with atomic_open(out / "results.md", "w", encoding="utf-8") as f:
        f.write(_results_md(results))
    plot_pareto(results, out / "pareto.png")
    with atomic_open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(_report_md(results))
