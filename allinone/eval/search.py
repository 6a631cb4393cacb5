"""``allinone search``: the best subnet of a supernet under a size / bit / latency budget.

"Best" is judged by a cheap proxy on a sample of dev utterances: the CTC loss (``loss``,
mean per utterance, lower is better) or the greedy-search WER (``wer``).  Ties go to the
smaller system.

Budgets (any combination; every one must hold):

| flag | what is limited |
|---|---|
| ``--max-mb X`` | packed bytes of the extracted model (every tensor, scales included) <= X MiB (2^20 bytes), as ``allinone extract`` prints |
| ``--max-params N`` | parameters of the extracted model |
| ``--max-bits B`` | mean bit-width of the encoder-block weights, weighted by parameters, float ones counting 32 |
| ``--max-latency-ms T`` | measured CPU fp32 latency of the extracted model, median ms per utterance (``allinone.eval.latency``) |

The supernet may be an ``ASRModel`` (Conformer, fbank test sets) or a ``Wav2Vec2CTCModel``
(wav2vec2 / HuBERT, waveform test sets: the model directory's front end says which).

Sizes are computed without extracting: the extracted model's tensor shapes come from a
model built on the ``meta`` device, so a candidate costs no weight copies (tested equal
to ``extracted_size``).

Search: exhaustive over a candidate set when it is small (a grid, or every subnet the
space allows when there are at most ``exhaustive_limit``), otherwise evolutionary over
per-block choices (seeded): the best half of each generation are parents; children come
from uniform crossover of two parents and/or mutation (each choice redrawn with
probability ``mutation_prob``); infeasible children are redrawn.  The result is the best
subnet evaluated.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from allinone.elastic.space import SearchSpace
from allinone.elastic.subnet import FLOAT_BITS, KINDS, SubnetConfig

logger = logging.getLogger("allinone")

__all__ = ["Budget", "SearchOptions", "Candidate", "SearchResult", "subnet_size", "weight_bits",
           "count_subnets", "all_subnets", "ProxyEvaluator", "search_subnet", "run_search", "batch_budget",
           "input_shift_s"]

MIB = 2 ** 20


# --------------------------------------------------------------------------- sizes


def subnet_size(model, subnet: SubnetConfig):
    """``SizeReport`` of the model ``extract(model, subnet)`` would give, without copying weights.

    The extracted config is built on the meta device (shapes only); quantized tensors get
    one scale per output row when the supernet's quantizer is per-channel, else one.
    """
    from allinone.elastic.extract import subnet_model_config
    from allinone.elastic.mixed_precision import BLOCK_PREFIXES, weight_cell
    from allinone.elastic.quant import quant_prefixes_of, quantizable_layers
    from allinone.elastic.subnet import EXTRACTOR_KIND
    from allinone.quant.accounting import size_report

    with torch.device("meta"):
        small = type(model)(subnet_model_config(model.config, subnet))
    position = {c.index: j for j, c in enumerate(subnet.layers)}
    bits, scales = {}, {}
    # As ``extract`` does: the supernet's quantizable layers that the subnet uses, renamed to
    # the extracted model's blocks (or, outside the blocks, a wav2vec2 extractor at its fixed bits).
    for src, layer, kind in quantizable_layers(model):
        cell = weight_cell(src, kind)
        if cell is None:
            name = src
            b = getattr(model.config, "extractor_bits", FLOAT_BITS) if kind == EXTRACTOR_KIND else FLOAT_BITS
        elif cell[0] in position:
            j = position[cell[0]]
            prefix = next(p for p in BLOCK_PREFIXES if src.startswith(p))
            name = f"{prefix}{j}.{src[len(prefix):].split('.', 1)[1]}"
            b = subnet.layers[j].bits(kind)
        else:
            continue  # a block the subnet skips
        if b == FLOAT_BITS:
            continue
        shape = small.get_parameter(name).shape
        bits[name] = b
        scales[name] = shape[0] if getattr(layer.quantizer, "per_channel", False) else 1
    return size_report(small.state_dict(), bits, scale_counts=scales,
                       quant_prefixes=quant_prefixes_of(small))


def weight_bits(report, prefixes: tuple[str, ...] | None = None) -> float:
    """Parameter-weighted mean bit-width of the encoder-block weights (float ones count 32).

    prefixes: state-dict prefixes of the quantizable weights (a model's ``quant_prefixes``;
    default the Conformer blocks').
    """
    from allinone.quant.accounting import DEFAULT_QUANT_PREFIXES, default_quantizable

    prefixes = DEFAULT_QUANT_PREFIXES if prefixes is None else prefixes
    rows = [t for t in report.tensors if t.bits != FLOAT_BITS or default_quantizable(t.name, t.shape, prefixes)]
    n = sum(t.numel for t in rows)
    return sum(t.numel * t.bits for t in rows) / n if n else float(FLOAT_BITS)


# --------------------------------------------------------------------------- the space


def _dims(space: SearchSpace) -> list[str]:
    """Choice groups of one block: ffn, heads and the bits (one group, or one per kind)."""
    return ["ffn", "heads"] + ([f"bits_{k}" for k in KINDS] if space.per_kind_bits else ["bits"])


def _choices(space: SearchSpace, dim: str) -> tuple[int, ...]:
    return space.bits if dim.startswith("bits") else getattr(space, dim)


def _per_layer(space: SearchSpace, dim: str) -> bool:
    return ("bits" if dim.startswith("bits") else dim) in space.per_layer


def _genome(subnet: SubnetConfig, space: SearchSpace) -> tuple[int, dict[str, list[int]]]:
    values = {"ffn": [c.ffn for c in subnet.layers], "heads": [c.heads for c in subnet.layers]}
    for k in KINDS:
        values[f"bits_{k}"] = [c.bits(k) for c in subnet.layers]
    values["bits"] = values["bits_attn"]
    return subnet.depth, values


def _build(space: SearchSpace, depth: int, values: dict[str, list[int]]) -> SubnetConfig:
    bits = ({k: values[f"bits_{k}"] for k in KINDS} if space.per_kind_bits
            else {k: values["bits"] for k in KINDS})
    return SubnetConfig.per_layer(space.layers_for_depth(depth), values["ffn"], values["heads"], bits)


def count_subnets(space: SearchSpace) -> int:
    """How many distinct subnets ``space`` allows (per-block mixtures included)."""
    total = 0
    for d in space.depth:
        n = 1
        for dim in _dims(space):
            n *= len(_choices(space, dim)) ** (d if _per_layer(space, dim) else 1)
        total += n
    return total


def all_subnets(space: SearchSpace) -> list[SubnetConfig]:
    """Every subnet ``space`` allows; use only when ``count_subnets`` is small."""
    out = []
    for d in space.depth:
        groups = []  # one entry per dimension: the possible per-block value lists
        for dim in _dims(space):
            ch = _choices(space, dim)
            if _per_layer(space, dim):
                groups.append([list(v) for v in itertools.product(ch, repeat=d)])
            else:
                groups.append([[v] * d for v in ch])
        for combo in itertools.product(*groups):
            out.append(_build(space, d, dict(zip(_dims(space), combo))))
    return out


# --------------------------------------------------------------------------- budget, candidates


@dataclass
class Budget:
    max_mb: float | None = None
    max_params: int | None = None
    max_bits: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if not given:
            raise ValueError("give a budget: --max-mb, --max-params, --max-bits or --max-latency-ms")
        bad = [k for k, v in given.items() if not v > 0]
        if bad:
            raise ValueError(f"budget {', '.join(bad)} must be positive")

    def describe(self) -> str:
        parts = []
        if self.max_mb is not None:
            parts.append(f"packed size <= {self.max_mb:g} MiB")
        if self.max_params is not None:
            parts.append(f"parameters <= {self.max_params:,}")
        if self.max_bits is not None:
            parts.append(f"mean weight bits <= {self.max_bits:g}")
        if self.max_latency_ms is not None:
            parts.append(f"CPU latency <= {self.max_latency_ms:g} ms/utterance")
        return ", ".join(parts)


@dataclass
class Candidate:
    subnet: str
    params: int
    packed_bytes: int
    bits: float                      # mean weight bits (see weight_bits)
    latency_ms: float | None = None  # measured only for a latency budget
    score: float | None = None       # proxy, lower is better

    def line(self) -> str:
        lat = "" if self.latency_ms is None else f", {self.latency_ms:.1f} ms/utt"
        score = "" if self.score is None else f", proxy {self.score:.4f}"
        return (f"{self.subnet}: {self.params:,} parameters, packed {self.packed_bytes / MIB:.3f} MiB, "
                f"{self.bits:.2f} mean weight bits{lat}{score}")


@dataclass
class SearchOptions:
    proxy: str = "loss"            # loss | wer
    sample: int = 100              # dev utterances (a seeded random sample)
    seed: int = 0
    strategy: str = "auto"         # auto | exhaustive | evolution
    exhaustive_limit: int = 64     # auto: exhaustive when the candidate set has at most this many
    population: int = 16
    generations: int = 10
    mutation_prob: float = 0.25
    crossover_prob: float = 0.5
    device: str = "cpu"
    threads: int | None = None     # CPU threads for a latency budget
    latency_utts: int = 4
    latency_repeats: int = 3
    num_workers: int = 2


@dataclass
class SearchResult:
    best: Candidate
    strategy: str
    evaluated: list[Candidate] = field(default_factory=list)  # scored candidates, best first
    budget: Budget | None = None
    proxy: str = "loss"

    def to_dict(self) -> dict:
        return {"best": asdict(self.best), "strategy": self.strategy, "proxy": self.proxy,
                "budget": asdict(self.budget) if self.budget else None,
                "evaluated": [asdict(c) for c in self.evaluated]}


# --------------------------------------------------------------------------- proxy


class ProxyEvaluator:
    """Proxy score of subnets on a fixed set of dev batches; cached by subnet string.

    batches: collated batches (feats [B, T, F], feat_lens [B], tokens [B, U], token_lens [B],
    utt_ids); refs: utt_id -> reference text (for ``wer``).
    """

    def __init__(self, model, space: SearchSpace, batches: list[dict], refs: dict[str, str], tokenizer,
                 proxy: str = "loss", device: str = "cpu"):
        if proxy not in ("loss", "wer"):
            raise ValueError(f"unknown proxy {proxy!r}; use loss or wer")
        if proxy == "loss" and model.ctc is None:
            raise ValueError("proxy 'loss' needs a CTC head; this model has none")
        self.model, self.space, self.batches, self.refs = model, space, batches, refs
        self.tokenizer, self.proxy, self.device = tokenizer, proxy, torch.device(device)
        self.cache: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, subnet: SubnetConfig) -> float:
        key = self.space.format(subnet)
        if key not in self.cache:
            self.cache[key] = self._loss(subnet) if self.proxy == "loss" else self._wer(subnet)
        return self.cache[key]

    def _loss(self, subnet: SubnetConfig) -> float:
        from allinone.models.asr import ctc_loss

        total, n = 0.0, 0
        for b in self.batches:
            feats, lens = b["feats"].to(self.device), b["feat_lens"].to(self.device)
            enc, enc_lens = self.model.encode(feats, lens, subnet)
            tokens, token_lens = b["tokens"].to(self.device), b["token_lens"].to(self.device)
            loss = ctc_loss(self.model.ctc_log_probs(enc), enc_lens, tokens, token_lens)  # either model family
            total += float(loss) * feats.shape[0]  # the loss is a per-batch mean over utterances
            n += feats.shape[0]
        return total / n

    def _wer(self, subnet: SubnetConfig) -> float:
        from allinone.eval.decode import DecodeOptions, recognize_batch
        from allinone.eval.wer import score

        hyps = {}
        for b in self.batches:
            ids = recognize_batch(self.model, b["feats"].to(self.device), b["feat_lens"].to(self.device),
                                  DecodeOptions(device=str(self.device)), subnet)
            hyps.update({u: self.tokenizer.decode(t) for u, t in zip(b["utt_ids"], ids)})
        return score(self.refs, hyps).wer


# --------------------------------------------------------------------------- search


class _Feasibility:
    """Sizes (and, for a latency budget, CPU latency) of subnets against the budget; cached."""

    def __init__(self, model, space: SearchSpace, budget: Budget, latency_feats: list | None,
                 frame_shift_s: float, opts: SearchOptions):
        self.model, self.space, self.budget, self.opts = model, space, budget, opts
        self.latency_feats, self.frame_shift_s = latency_feats, frame_shift_s
        self.cache: dict[str, Candidate] = {}

    def candidate(self, subnet: SubnetConfig, with_latency: bool = True) -> Candidate:
        key = self.space.format(subnet)
        c = self.cache.get(key)
        if c is None:
            r = subnet_size(self.model, subnet)
            c = self.cache[key] = Candidate(key, r.total_params, r.packed_bytes,
                                            weight_bits(r, getattr(self.model, "quant_prefixes", None)))
        if with_latency and self.budget.max_latency_ms is not None and c.latency_ms is None:
            from allinone.elastic.extract import extract
            from allinone.eval.latency import measure_latency

            small, quantized = extract(self.model, subnet)
            c.latency_ms = measure_latency(small, quantized, self.latency_feats, "cpu-fp32", self.frame_shift_s,
                                           self.opts.latency_repeats, self.opts.threads).ms_per_utt
        return c

    def fits_static(self, c: Candidate) -> bool:
        b = self.budget
        return ((b.max_mb is None or c.packed_bytes <= b.max_mb * MIB)
                and (b.max_params is None or c.params <= b.max_params)
                and (b.max_bits is None or c.bits <= b.max_bits + 1e-9))

    def __call__(self, subnet: SubnetConfig) -> bool:
        # Sizes are free; latency is measured only for subnets that fit the static budgets.
        if not self.fits_static(self.candidate(subnet, with_latency=False)):
            return False
        c = self.candidate(subnet)
        return self.budget.max_latency_ms is None or c.latency_ms <= self.budget.max_latency_ms

    def infeasible_error(self, smallest: SubnetConfig) -> ValueError:
        c = self.candidate(smallest)
        return ValueError(f"no subnet fits the budget ({self.budget.describe()}); the smallest candidate "
                          f"{c.line()}")


def _smallest_of(cands: list[SubnetConfig], feas: _Feasibility) -> SubnetConfig:
    return min(cands, key=lambda s: (feas.candidate(s, False).packed_bytes, feas.candidate(s, False).params))


def _exhaustive(cands: list[SubnetConfig], feas: _Feasibility, proxy: ProxyEvaluator,
                progress: bool) -> list[SubnetConfig]:
    fits = [s for s in cands if feas(s)]
    if not fits:
        raise feas.infeasible_error(_smallest_of(cands, feas))
    for s in tqdm(fits, desc="search", unit="subnet", disable=not progress):
        proxy(s)
    return fits


def _mutate(space: SearchSpace, subnet: SubnetConfig, rng: random.Random, p: float) -> SubnetConfig:
    depth, values = _genome(subnet, space)
    if len(space.depth) > 1 and rng.random() < p:
        new = rng.choice(space.depth)
        # A deeper child repeats the last block's choices; a shallower one drops the tail.
        values = {k: (v + [v[-1]] * new)[:new] for k, v in values.items()}
        depth = new
    for dim in _dims(space):
        ch = _choices(space, dim)
        if _per_layer(space, dim):
            values[dim] = [rng.choice(ch) if rng.random() < p else v for v in values[dim]]
        elif rng.random() < p:
            values[dim] = [rng.choice(ch)] * depth
    return _build(space, depth, values)


def _crossover(space: SearchSpace, a: SubnetConfig, b: SubnetConfig, rng: random.Random) -> SubnetConfig:
    (da, va), (db, vb) = _genome(a, space), _genome(b, space)
    depth = rng.choice([da, db])
    values = {}
    for dim in _dims(space):
        if _per_layer(space, dim):  # uniform crossover, block by block (a parent lacking block j gives way)
            values[dim] = [(va if (rng.random() < 0.5 and j < da) or j >= db else vb)[dim][j] for j in range(depth)]
        else:
            values[dim] = [rng.choice([va, vb])[dim][0]] * depth
    return _build(space, depth, values)


def _canonical(model):
    """subnet -> the same computation written one way: for a model whose blocks lack a module
    kind (a wav2vec2 layer has no ``conv``), that kind's bits are set as the mixed-precision
    code writes them (the block's highest), so subnets differing only there count once."""
    from allinone.elastic.mixed_precision import model_kinds, subnet_with_bits

    kinds = model_kinds(model)
    if not kinds or set(kinds) == set(KINDS):
        return lambda s: s
    return lambda s: subnet_with_bits(s, {(c.index, k): c.bits(k) for c in s.layers for k in kinds}, kinds=kinds)


def _evolution(space: SearchSpace, feas: _Feasibility, proxy: ProxyEvaluator, opts: SearchOptions,
               progress: bool, canon=lambda s: s) -> list[SubnetConfig]:
    rng = random.Random(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    if not feas(space.smallest()):
        raise feas.infeasible_error(space.smallest())
    # Start from the feasible uniform systems closest to the budget (the largest that fit;
    # usually the best ones) and fill up with random feasible subnets.
    uniform = sorted((s for s in dict.fromkeys(map(canon, space.enumerate())) if feas(s)),
                     key=lambda s: -feas.candidate(s, False).packed_bytes)
    pop = uniform[: max(1, opts.population // 2)]
    tries = 0
    while len(pop) < opts.population and tries < 50 * opts.population:
        tries += 1
        s = canon(space.sample(gen))
        if s not in pop and feas(s):
            pop.append(s)
    seen = set(pop)
    n_parents = max(2, opts.population // 2)
    for _ in tqdm(range(opts.generations), desc="search", unit="generation", disable=not progress):
        for s in pop:
            proxy(s)
        pop.sort(key=lambda s: (proxy(s), feas.candidate(s, False).packed_bytes))
        parents = pop[:n_parents]
        children, tries = [], 0
        while len(parents) + len(children) < opts.population and tries < 50 * opts.population:
            tries += 1
            a = rng.choice(parents)
            child = a
            if len(parents) > 1 and rng.random() < opts.crossover_prob:
                child = _crossover(space, a, rng.choice([p for p in parents if p != a]), rng)
            if child == a or rng.random() < opts.mutation_prob:
                child = _mutate(space, child, rng, opts.mutation_prob)
            child = canon(child)
            if child in seen or not feas(child):
                continue
            seen.add(child)
            children.append(child)
        pop = parents + children
    for s in pop:
        proxy(s)
    return list(seen)


def search_subnet(model, space: SearchSpace, budget: Budget, proxy: ProxyEvaluator, opts: SearchOptions,
                  candidates: list[SubnetConfig] | None = None, latency_feats: list | None = None,
                  frame_shift_s: float = 0.01, progress: bool = False) -> SearchResult:
    """Best subnet under ``budget`` by ``proxy`` (lower is better; ties: smaller packed size).

    candidates: a fixed candidate set (a grid); None = the whole space.  Strategy ``auto``
    is exhaustive for a grid or a space of at most ``opts.exhaustive_limit`` subnets.
    Raises ``ValueError`` when no candidate fits.
    """
    if opts.strategy not in ("auto", "exhaustive", "evolution"):
        raise ValueError(f"unknown search strategy {opts.strategy!r}; use auto, exhaustive or evolution")
    if budget.max_latency_ms is not None and not latency_feats:
        raise ValueError("a latency budget needs utterances to time")
    feas = _Feasibility(model, space, budget, latency_feats, frame_shift_s, opts)
    canon = _canonical(model)
    strategy = opts.strategy
    if strategy == "auto":
        small = candidates is not None or count_subnets(space) <= opts.exhaustive_limit
        strategy = "exhaustive" if small else "evolution"
    if strategy == "exhaustive":
        if candidates is None:
            n = count_subnets(space)
            if n > 100_000:
                raise ValueError(f"the space has {n:,} subnets: too many to search exhaustively; "
                                 "use evolution or a grid")
            candidates = all_subnets(space)
        evaluated = _exhaustive(list(dict.fromkeys(map(canon, candidates))), feas, proxy, progress)
    else:
        if candidates is not None:
            raise ValueError("evolution searches the space's per-block choices; a grid is searched exhaustively")
        evaluated = _evolution(space, feas, proxy, opts, progress, canon)
    scored = []
    for s in evaluated:
        c = feas.candidate(s)
        c.score = proxy(s)
        scored.append(c)
    scored.sort(key=lambda c: (c.score, c.packed_bytes, c.subnet))
    return SearchResult(scored[0], strategy, scored, budget, proxy.proxy)


# --------------------------------------------------------------------------- from files


def batch_budget(front_end, max_frames: int = 30000, max_samples: int = 1_600_000) -> int:
    """Padded input steps per decoding batch: ``max_frames`` fbank frames, or for a waveform
    model (``WaveformConfig``) ``max_samples`` samples."""
    from allinone.data.dataset import WaveformConfig

    return max_samples if isinstance(front_end, WaveformConfig) else max_frames


def input_shift_s(front_end) -> float:
    """Seconds of audio per input step: the fbank hop, or one sample of a waveform model."""
    from allinone.data.dataset import WaveformConfig

    if isinstance(front_end, WaveformConfig):
        return 1.0 / front_end.sample_rate
    return front_end.hop_length / front_end.sample_rate


def _sample_batches(data_dir, loaded, n: int, seed: int, num_workers: int):
    """A seeded random sample of ``n`` utterances of ``data_dir``, featurised and batched."""
    from allinone.data.dataset import ASRDataset, BucketBatchSampler, collate, extract_features
    from allinone.data.kaldi import read_data_dir

    utts = read_data_dir(data_dir)
    if n < len(utts):
        keep = set(random.Random(seed).sample([u.utt_id for u in utts], n))
        utts = [u for u in utts if u.utt_id in keep]
    feats = extract_features(utts, loaded.fbank, num_workers, progress=False)
    ds = ASRDataset(feats, utts, loaded.tokenizer)
    budget = batch_budget(loaded.fbank)
    batches = [collate([ds[i] for i in idx]) for idx in BucketBatchSampler(ds.lengths, budget, shuffle=False)]
    refs = {u.utt_id: u.text for u in utts if u.utt_id in feats}
    return batches, refs, feats


def run_search(model_dir: str | os.PathLike, budget: Budget, data_dir: str | os.PathLike,
               opts: SearchOptions = SearchOptions(), grid=None, progress: bool = True) -> SearchResult:
    """``allinone search``: load the supernet, sample the dev set, search (see ``search_subnet``)."""
    from allinone.eval.bench import resolve_grid
    from allinone.models.saved import load_model_dir

    from allinone.eval.decode import check_device

    if opts.sample < 1:
        raise ValueError("--sample must be >= 1")
    for name in ("population", "generations", "latency_utts", "latency_repeats"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {opts.threads}")
    check_device(opts.device)
    loaded = load_model_dir(model_dir, device=opts.device)
    model, space = loaded.model, loaded.model.search_space
    if space is None:
        raise ValueError(f"{model_dir} is not a supernet (its config.json has no search_space)")
    candidates = resolve_grid(grid, space) if grid is not None else None
    if not Path(data_dir).is_dir():
        raise ValueError(f"data directory not found: {data_dir}")
    batches, refs, feats = _sample_batches(data_dir, loaded, opts.sample, opts.seed, opts.num_workers)
    proxy = ProxyEvaluator(model, space, batches, refs, loaded.tokenizer, opts.proxy, opts.device)
    lat_feats = [feats[u] for u in sorted(refs)[: opts.latency_utts]]
    shift = input_shift_s(loaded.fbank)
    # Latency is timed on CPU whatever opts.device is: extract() builds the small model on CPU.
    return search_subnet(model, space, budget, proxy, opts, candidates, lat_feats, shift, progress)
