"""``allinone bench``: every subnet of a grid on every test set, with the numbers a choice needs.

For each subnet (system) and each data directory: WER with substitutions / deletions /
insertions; MAPSSWE against a reference system (default: the largest float subnet) or,
with ``float_model``, against a separately trained float model such as the one the supernet
started from (the "32-bit model" of method.md section 2), with p-value, verdict at alpha and
whether the system is significantly *worse*; parameters, packed bytes and compression ratios (size
accounting of the extracted model: the numbers ``allinone info`` prints for its file);
latency per backend and peak memory (``allinone.eval.latency``).  Then the lossless
compression ratio of the grid: the largest ``ratio_vs_ref`` among systems not
significantly worse than that system on every test set (sizes are always relative to the
reference subnet).

The supernet is a Conformer ``ASRModel`` (fbank features) or a wav2vec2 / HuBERT
``Wav2Vec2CTCModel`` (raw waveforms; the model directory's front end decides how the
test sets are read, and latency's real-time factor counts samples as audio).

Decoding runs the supernet with the subnet active (``encode(..., subnet)``), which equals
the extracted model (tests/test_supernet_cli.py); latency runs the extracted model, since
that is what is deployed.

Output directory::

    OUT/results.csv, results.json, results.md, pareto.png, report.md
    OUT/systems/<subnet>/system.json          sizes, latency, WER per test set, settings
    OUT/systems/<subnet>/<test set>/          hyp.trn, ref.trn, text, wer.json, alignments.txt
    OUT/float_model/system.json, <test set>/  with ``float_model``: the same for it

``system.json`` is written last, atomically: a system that has it (with the same model,
test sets, beam and latency settings) is not decoded again when the command is re-run,
so an interrupted long grid resumes where it stopped.  Significance, tables and plots
are recomputed from the saved hypotheses every run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from allinone.elastic.space import SearchSpace, load_grid
from allinone.elastic.subnet import FLOAT_BITS, SubnetConfig
from allinone.utils import atomic_open

logger = logging.getLogger("allinone")

__all__ = ["BenchOptions", "TestSet", "default_reference", "resolve_grid", "load_test_set",
           "run_bench", "read_hyps"]

SYSTEM_FILE = "system.json"


@dataclass
class BenchOptions:
    beam: int = 1                 # 1 = CTC greedy
    lm: str | None = None         # ARPA token LM for shallow fusion (beam > 1; allinone lm)
    lm_weight: float = 0.5
    length_bonus: float = 0.0
    device: str = "cpu"           # decoding device
    threads: int | None = None    # CPU threads for latency (None = torch's default)
    latency: bool = True
    latency_repeats: int = 5
    latency_utts: int = 8         # fixed sample: the first N utterances (by id) of the first test set
    alpha: float = 0.05
    reference: str | None = None  # subnet string; None = the largest float subnet
    # A separately trained float model (model dir; e.g. the one the supernet started from): the
    # 32-bit model that significance and "lossless" are judged against instead of the reference
    # subnet (sizes stay relative to the reference subnet).
    float_model: str | None = None
    num_workers: int = 2          # feature extraction workers
    max_frames: int = 30000       # padded frames per decoding batch
    max_samples: int = 1_600_000  # padded samples per decoding batch (waveform models: wav2vec2 / HuBERT)
    # A data dir whose first ``front_end_calib_utts`` utterances (by id) calibrate an 8-bit front
    # end: all-8-bit systems are then also timed on ``cpu-int8-fe`` (Conformer models only).
    front_end_calib: str | None = None
    front_end_calib_utts: int = 200


# --------------------------------------------------------------------------- grid


def default_reference(space: SearchSpace) -> SubnetConfig:
    """The largest float subnet ``L<max>_F<max>_H<max>_B32`` (the largest subnet if 32 is not a choice)."""
    if FLOAT_BITS in space.bits:
        return space.parse(f"L{space.depth[0]}_F{space.ffn[0]}_H{space.heads[0]}_B{FLOAT_BITS}")
    return space.largest()


def _validate_each(items: list, space: SearchSpace, where: str) -> list[SubnetConfig]:
    """Parse every grid entry; one ``ValueError`` lists all the bad ones (before any work)."""
    subnets, bad = [], []
    for item in items:
        try:
            for s in load_grid([item], space):
                if s not in subnets:
                    subnets.append(s)
        except ValueError as e:
            bad.append(f"  {item!r}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} grid entr{'y is' if len(bad) == 1 else 'ies are'} not in the model's "
                         f"search space ({where}):\n" + "\n".join(bad))
    if not subnets:
        raise ValueError(f"the grid ({where}) lists no subnets")
    return subnets


def resolve_grid(grid: str | os.PathLike | list, space: SearchSpace) -> list[SubnetConfig]:
    """Subnets of ``grid``, every one validated against ``space``.

    grid: ``"all"`` (``space.enumerate()``: every uniform subnet), a YAML grid file (a list
    of subnet strings / single-choice mappings, or a mapping of choice lists, see
    ``load_grid``), comma-separated subnet strings, or a list of strings.
    """
    if isinstance(grid, (list, tuple)):
        return _validate_each(list(grid), space, "command line")
    grid = str(grid)
    if grid == "all":
        return space.enumerate()
    path = Path(grid)
    if path.is_file():
        content = yaml.safe_load(path.read_text())
        if isinstance(content, list):
            return _validate_each(content, space, str(path))
        try:
            return load_grid(content, space)  # a mapping of choice lists: one error covers it
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        raise ValueError(f"grid file not found: {path}")
    return _validate_each([s for s in grid.split(",") if s.strip()], space, "command line")


# --------------------------------------------------------------------------- test sets


@dataclass
class TestSet:
    """One data directory, featurised once and shared by every system."""

    name: str                  # unique short name (the directory name)
    path: Path
    refs: dict[str, str]       # utt_id -> reference text
    batches: list[dict]        # collated batches (feats [B, T, F] or waveforms [B, S], feat_lens [B], utt_ids)
    feats: dict                # utt_id -> [T, F] (waveform models: [S])


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    # Two "test" directories of different corpora: prefix the parent folder.
    return [f"{p.resolve().parent.name}_{p.resolve().name}" for p in paths]


def load_test_set(path: str | os.PathLike, name: str, fbank, tokenizer, opts: BenchOptions) -> TestSet:
    from allinone.data.dataset import ASRDataset, BucketBatchSampler, collate, extract_features
    from allinone.data.kaldi import read_data_dir

    from allinone.eval.search import batch_budget

    utts = read_data_dir(path)
    feats = extract_features(utts, fbank, opts.num_workers, progress=False)
    dataset = ASRDataset(feats, utts, tokenizer)
    sampler = BucketBatchSampler(dataset.lengths, batch_budget(fbank, opts.max_frames, opts.max_samples),
                                 shuffle=False)
    batches = [collate([dataset[i] for i in idx]) for idx in sampler]
    refs = {u.utt_id: u.text for u in utts if u.utt_id in feats}
    return TestSet(name, Path(path), refs, batches, feats)


def read_hyps(decode_dir: str | os.PathLike) -> dict[str, str]:
    """Hypotheses from a decode dir's Kaldi ``text`` file (``uttid words``; an empty hypothesis is just ``uttid``)."""
    from allinone.data.kaldi import read_text

    return read_text(Path(decode_dir, "text"), allow_empty=True)


# --------------------------------------------------------------------------- one system


def _settings(model_dir, test_sets: list[TestSet], opts: BenchOptions) -> dict:
    """What a saved system result depends on; a change means decoding it again."""
    latency = None
    if opts.latency:
        latency = {"repeats": opts.latency_repeats, "utts": opts.latency_utts, "threads": opts.threads}
        if opts.front_end_calib:  # (only then: results saved before the option existed stay valid)
            latency["front_end_calib"] = [str(Path(opts.front_end_calib).resolve()), opts.front_end_calib_utts]
    return {
        "model": str(Path(model_dir).resolve()),
        "data": [str(t.path.resolve()) for t in test_sets],
        "beam": opts.beam,
        "latency": latency,
        # the LM and bonus (only when used: results saved before the options existed stay valid)
        **({"search": _decode_options(opts).search_settings()} if opts.lm or opts.length_bonus else {}),
    }


def _decode_options(opts: BenchOptions):
    from allinone.eval.decode import DecodeOptions

    return DecodeOptions(beam=opts.beam, device=opts.device, lm=opts.lm, lm_weight=opts.lm_weight,
                         length_bonus=opts.length_bonus, num_workers=opts.num_workers)


@torch.no_grad()
def _decode(model, subnet: SubnetConfig, ts: TestSet, tokenizer, opts: BenchOptions, lm=None,
            pool=None) -> dict[str, str]:
    from allinone.eval.decode import recognize_batches

    ids = recognize_batches(model, ts.batches, _decode_options(opts), subnet, lm=lm, pool=pool)
    return {utt_id: tokenizer.decode(tokens) for utt_id, tokens in ids.items()}


def _bench_system(name: str, subnet: SubnetConfig, model, dec_model, tokenizer, fbank,
                  test_sets: list[TestSet], latency_feats: list, sys_dir: Path,
                  opts: BenchOptions, settings: dict, front_end_ranges: list[float] | None = None,
                  lm=None, pool=None) -> dict:
    """Decode (with the token LM scorer ``lm`` when given; the beam searches in ``pool``, a
    ``BeamSearchPool``, when given), score, size and time one system; write its files and
    ``system.json``."""
    from allinone.elastic.extract import extract, extracted_size
    from allinone.eval.latency import backends_for, measure_latency
    from allinone.eval.wer import write_results

    small, quantized = extract(model, subnet)
    size = extracted_size(small, quantized)
    bits = {k: q.bits for k, q in quantized.items()}
    wer = {}
    for ts in test_sets:
        hyps = _decode(dec_model, subnet, ts, tokenizer, opts, lm, pool)
        wer[ts.name] = write_results(sys_dir / ts.name, ts.refs, hyps).to_dict()
    latency = {}
    if opts.latency:
        from allinone.eval.search import input_shift_s

        shift = input_shift_s(fbank)
        shapes = {k: tuple(q.codes.shape) for k, q in quantized.items()}
        for backend in backends_for(bits, front_end=front_end_ranges is not None, shapes=shapes):
            latency[backend] = measure_latency(
                small, quantized, latency_feats, backend, shift, opts.latency_repeats, opts.threads, opts.beam,
                front_end_ranges=front_end_ranges if backend == "cpu-int8-fe" else None).to_dict()
    record = {
        "system": name,
        "size": size_record(size),
        "wer": wer,
        "latency": latency,
        "settings": settings,
    }
    _write_record(sys_dir, record)
    return record


FLOAT_DIR = "float_model"  # where the --float-model's hypotheses and record go in the bench dir


def load_float_reference(path: str | os.PathLike, supernet):
    """The float model of ``--float-model``, checked against the supernet (a ``LoadedModel``):
    it must read the same features and write the same tokens, since the test sets are
    featurised once and the hypotheses compared word for word."""
    from allinone.models.saved import load_model_dir

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--float-model {path}: not a model directory (no config.json)")
    loaded = load_model_dir(path)
    ours, theirs = supernet.tokenizer.token_list, loaded.tokenizer.token_list
    if ours != theirs:
        where = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(f"--float-model {path}: its tokenizer is not the supernet's ({len(theirs)} against "
                         f"{len(ours)} units; unit {where} differs first)")
    if loaded.fbank != supernet.fbank:
        raise ValueError(f"--float-model {path}: its front end ({loaded.fbank}) is not the supernet's "
                         f"({supernet.fbank})")
    return loaded


def model_dir_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a model dir's config.json and weight files: tells two models saved at one path apart."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.json")) + sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _bench_float_model(model, test_sets: list[TestSet], tokenizer, out: Path, opts: BenchOptions,
                       settings: dict, lm=None, pool=None) -> dict:
    """Decode and score the ``--float-model`` on every test set; write its hypotheses and record."""
    from allinone.eval.wer import write_results

    dec = model.to(opts.device)  # (loaded for this alone: moved, not copied)
    wer = {ts.name: write_results(out / ts.name, ts.refs, _decode(dec, None, ts, tokenizer, opts, lm, pool)).to_dict()
           for ts in test_sets}
    record = {"system": "float model", "wer": wer, "settings": settings}
    _write_record(out, record)
    return record


def _write_record(sys_dir: Path, record: dict) -> None:
    with atomic_open(sys_dir / SYSTEM_FILE, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def size_record(size) -> dict:
    """The ``size`` entry of ``system.json`` from a ``SizeReport``."""
    return {
        "params": size.total_params,
        "quantized_params": size.quantized_params,
        "avg_bits": None if size.quantized_params == 0 else size.average_bits,
        "packed_bytes": size.packed_bytes,
        "fp32_bytes": size.fp32_bytes,
        "ratio": size.compression_ratio,
        "weight_bytes": size.weight_bytes,
        "weight_fp32_bytes": size.weight_fp32_bytes,
    }


def _load_done(sys_dir: Path, settings: dict, test_sets: list[TestSet]) -> dict | None:
    """A finished system's record, if it was made with the same settings and its files are there."""
    path = sys_dir / SYSTEM_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("settings") != settings:
        logger.info("%s: settings changed since the saved result; decoding it again", sys_dir.name)
        return None
    if not all((sys_dir / ts.name / "text").is_file() for ts in test_sets):
        return None
    return record


# --------------------------------------------------------------------------- the grid


def run_bench(model_dir: str | os.PathLike, grid, data_dirs: list, out_dir: str | os.PathLike,
              opts: BenchOptions = BenchOptions(), command: str | None = None,
              progress: bool = True) -> dict:
    """Benchmark every subnet of ``grid`` on every data dir; write all outputs to ``out_dir``.

    Returns the content of ``results.json``.  Every grid entry (and ``opts.reference``) is
    validated against the model's search space before any decoding starts.
    """
    from allinone.elastic.extract import extract, extracted_size
    from allinone.eval.mapsswe import mapsswe
    from allinone.eval.report import build_results, write_outputs
    from allinone.models.saved import load_model_dir

    if not 0.0 < opts.alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {opts.alpha}")
    if opts.latency and (opts.latency_repeats < 1 or opts.latency_utts < 1):
        raise ValueError("--latency-repeats and the latency sample size must be >= 1")
    if not data_dirs:
        raise ValueError("give at least one data directory (--data DIR ...)")
    loaded = load_model_dir(model_dir)  # CPU: extraction and CPU latency use it
    model, space = loaded.model, loaded.model.search_space
    if space is None:
        raise ValueError(f"{model_dir} is not a supernet (its config.json has no search_space)")
    # ---- everything the user typed is checked before the first utterance is decoded
    subnets = resolve_grid(grid, space)
    reference = space.parse(opts.reference) if opts.reference else default_reference(space)
    missing = [str(d) for d in data_dirs if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"data directories not found: {', '.join(missing)}")
    _decode_options(opts)  # checks the beam, the device and the LM options
    lm = None
    if opts.lm:
        from allinone.eval.decode import load_lm_scorer

        lm = load_lm_scorer(opts.lm, loaded.tokenizer)
    float_loaded = load_float_reference(opts.float_model, loaded) if opts.float_model else None
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"output directory {out_dir} is an existing file")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {opts.threads}")
    ranges = None
    if opts.front_end_calib and opts.latency:  # once: every subnet shares the supernet's front end
        from allinone.data.dataset import extract_features
        from allinone.data.kaldi import read_data_dir
        from allinone.eval.latency import front_end_ranges

        if not Path(opts.front_end_calib).is_dir():
            raise ValueError(f"front-end calibration data directory not found: {opts.front_end_calib}")
        calib_utts = sorted(read_data_dir(opts.front_end_calib), key=lambda u: u.utt_id)[: opts.front_end_calib_utts]
        # (raises for a model without the Conformer's Conv2d front end, or no utterance)
        ranges = front_end_ranges(model, list(extract_features(calib_utts, loaded.fbank, opts.num_workers,
                                                               progress=False).values()))

    ref_name = space.format(reference)
    systems = [(ref_name, reference)] + [(space.format(s), s) for s in subnets if s != reference]
    out_dir = Path(out_dir)
    paths = [Path(d) for d in data_dirs]
    test_sets = [load_test_set(p, n, loaded.fbank, loaded.tokenizer, opts)
                 for p, n in zip(paths, _unique_names(paths))]
    first = test_sets[0]
    latency_feats = [first.feats[u] for u in sorted(first.refs)[: opts.latency_utts]]
    dec_model = model if opts.device == "cpu" else copy.deepcopy(model).to(opts.device)
    settings = _settings(model_dir, test_sets, opts)

    records, skipped = {}, 0
    bar = tqdm(systems, desc="bench", unit="system", disable=not progress)
    from allinone.eval.decode import search_pool

    saved = {name: _load_done(out_dir / "systems" / name, settings, test_sets) for name, _ in systems}
    float_dir = out_dir / FLOAT_DIR
    float_settings = None
    if float_loaded is not None:  # keyed by content too: recipes copy other models into the same path
        float_settings = {**settings, "float_model": str(Path(opts.float_model).resolve()),
                          "float_model_sha256": model_dir_digest(opts.float_model)}
    float_record = _load_done(float_dir, float_settings, test_sets) if float_loaded else None
    todo = any(record is None for record in saved.values()) or (float_loaded is not None and float_record is None)
    num_utts = sum(len(ts.refs) for ts in test_sets) if todo else 0  # no pool when nothing is decoded
    with search_pool(_decode_options(opts), loaded.tokenizer.token_list, num_utts) as pool:
        if float_loaded is not None and float_record is None:
            float_record = _bench_float_model(float_loaded.model, test_sets, loaded.tokenizer, float_dir, opts,
                                              float_settings, lm, pool)
        for name, subnet in bar:
            bar.set_postfix_str(name)
            sys_dir = out_dir / "systems" / name
            record = saved[name]
            if record is None:
                record = _bench_system(name, subnet, model, dec_model, loaded.tokenizer, loaded.fbank,
                                       test_sets, latency_feats, sys_dir, opts, settings, ranges, lm, pool)
            else:
                skipped += 1
                if "weight_bytes" not in record["size"]:
                    # saved before the weights-only ratio existed: sizes depend on the subnet alone,
                    # so they are recomputed rather than the system decoded again
                    record["size"] = size_record(extracted_size(*extract(model, subnet)))
                    _write_record(sys_dir, record)
            records[name] = record
    if skipped:
        logger.info("bench: %d of %d systems were already done in %s (resumed)", skipped, len(systems), out_dir)

    # ---- significance against the float model or the reference subnet, per test set, from the
    # saved hypotheses
    base_dir = float_dir if float_loaded is not None else out_dir / "systems" / ref_name
    significance: dict[str, dict[str, dict]] = {name: {} for name, _ in systems}
    for ts in test_sets:
        base_hyps = read_hyps(base_dir / ts.name)
        for name, _ in systems:
            hyps = read_hyps(out_dir / "systems" / name / ts.name)
            significance[name][ts.name] = mapsswe(ts.refs, base_hyps, hyps, alpha=opts.alpha).to_dict()

    results = build_results(
        systems=[records[name] for name, _ in systems], significance=significance, reference=ref_name,
        test_sets=[{"name": ts.name, "path": str(ts.path), "utterances": len(ts.refs)} for ts in test_sets],
        model_dir=str(model_dir), opts=opts, command=command, skipped=skipped,
        float_model=None if float_record is None else {"path": str(opts.float_model), **float_record})
    write_outputs(results, out_dir)
    return results

