"""Extraction: supernet + subnet -> a standalone model (a pure function) and its files.

The extracted model is a plain model of the supernet's class, ``ASRModel`` or
``Wav2Vec2CTCModel``, of another config (fewer blocks, per-block FFN units / heads, the
supernet's head width), so it loads without the supernet.  Every tensor is the leading
slice of the supernet tensor it comes from (first rows / columns: the same views the
supernet computes with); blocks are renumbered.
Quantized weights are the codes and scales of the supernet's quantizer at the subnet's
bit-width, and the extracted model holds their dequantized values, which is what the
supernet's fake quantization computes, bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from allinone.elastic.quant import quant_prefixes_of, quantizable_layers
from allinone.elastic.space import SearchSpace, load_grid, load_space
from allinone.elastic.subnet import EXTRACTOR_KIND, FLOAT_BITS, SubnetConfig
from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel
from allinone.quant.accounting import SizeReport, size_report
from allinone.quant.quantizer import QuantizedTensor

__all__ = ["subnet_model_config", "extract", "extracted_size", "extract_to_dirs", "ExtractResult"]


def subnet_model_config(config: ASRModelConfig | Wav2Vec2Config,
                        subnet: SubnetConfig) -> ASRModelConfig | Wav2Vec2Config:
    """The config of the standalone model of ``subnet`` (no quantizers).

    Uniform widths stay uniform fields (for an ``ASRModelConfig``, an ESPnet-expressible
    config when the head width is ``output_size / heads``); mixed ones become per-block lists.
    """
    if isinstance(config, Wav2Vec2Config):
        return _wav2vec2_subnet_config(config, subnet)
    enc = config.encoder
    d_k = enc.attention_head_dim
    units = [c.ffn for c in subnet.layers]
    heads = [c.heads for c in subnet.layers]
    uniform_units, uniform_heads = len(set(units)) == 1, len(set(heads)) == 1
    taps = [i for i in enc.interctc_layer_idx if i < subnet.depth]
    new_enc = dataclasses.replace(
        enc,
        num_blocks=subnet.depth,
        linear_units=max(units),
        attention_heads=max(heads),
        layer_linear_units=None if uniform_units else units,
        layer_attention_heads=None if uniform_heads else heads,
        # Keep the supernet's head width; write it only where ESPnet's rule would differ.
        head_dim=None if max(heads) * d_k == enc.output_size else d_k,
        # Intermediate-CTC taps the subnet has (as it trains: counted along its blocks); a
        # self-conditioned subnet shallower than every tap is a plain encoder (as it runs).
        interctc_layer_idx=taps,
        interctc_use_conditioning=enc.interctc_use_conditioning and bool(taps),
    )
    interctc_weight = config.interctc_weight if taps else 0.0
    return dataclasses.replace(config, encoder=new_enc, quant=None, interctc_weight=interctc_weight)


def _wav2vec2_subnet_config(config: Wav2Vec2Config, subnet: SubnetConfig) -> Wav2Vec2Config:
    """``subnet_model_config`` of a wav2vec2 / HuBERT supernet: a published-layout config when
    the widths are uniform and ``heads * head_dim = embed_dim``, else per-layer lists and
    ``encoder_head_dim``.  The extractor is float in the config (its weights, when quantized,
    hold the dequantized values)."""
    d_k = config.head_dim
    units = [c.ffn for c in subnet.layers]
    heads = [c.heads for c in subnet.layers]
    return dataclasses.replace(
        config,
        encoder_num_layers=subnet.depth,
        encoder_ff_interm_features=max(units),
        encoder_num_heads=max(heads),
        encoder_layer_ff_interm_features=None if len(set(units)) == 1 else units,
        encoder_layer_num_heads=None if len(set(heads)) == 1 else heads,
        encoder_head_dim=None if max(heads) * d_k == config.encoder_embed_dim else d_k,
        quant=None,
        extractor_bits=FLOAT_BITS,
    )


def _check_subnet(model: ASRModel | Wav2Vec2CTCModel, subnet: SubnetConfig) -> str:
    """Check ``subnet`` against ``model``; returns the state-dict prefix of its elastic blocks."""
    if isinstance(model, Wav2Vec2CTCModel):
        model.check_subnet(subnet)
        return "encoder.transformer.layers."
    model.encoder.check_subnet(subnet)
    return "encoder.encoders."


def source_name(model: ASRModel | Wav2Vec2CTCModel, name: str, subnet: SubnetConfig) -> str:
    """Supernet state-dict key of an extracted model's key ``name`` (block j -> the j-th used block)."""
    prefix = "encoder.transformer.layers." if isinstance(model, Wav2Vec2CTCModel) else "encoder.encoders."
    m = re.match("^" + re.escape(prefix) + r"(\d+)\.", name)
    return name if m is None else f"{prefix}{subnet.layers[int(m.group(1))].index}.{name[m.end():]}"


@torch.no_grad()
def extract(model: ASRModel | Wav2Vec2CTCModel,
            subnet: SubnetConfig) -> tuple[ASRModel | Wav2Vec2CTCModel, dict[str, QuantizedTensor]]:
    """Standalone model of ``subnet`` and its quantized weights (name -> codes + scale).

    Pure: ``model`` is not modified.  The returned model (same class as ``model``) is in
    eval mode; its quantized weights hold ``codes * scale``.
    """
    prefix = _check_subnet(model, subnet)
    small = type(model)(subnet_model_config(model.config, subnet))
    block = re.compile("^" + re.escape(prefix) + r"(\d+)\.")

    source = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, target in small.state_dict().items():
        t = source[source_name(model, name, subnet)]
        # Leading slice to the target's shape: first rows (FFN input layer, q/k/v/pos,
        # pos_bias_u/v) and first columns (FFN output layer, attention output); everything
        # else has the same shape.
        state[name] = t[tuple(slice(0, n) for n in target.shape)].clone()
    # Which weights are quantized, at which bits: the supernet's quantizable layers that the
    # subnet uses (its blocks at the subnet's bits; the wav2vec2 extractor at its fixed bits).
    position = {c.index: j for j, c in enumerate(subnet.layers)}
    quantized: dict[str, QuantizedTensor] = {}
    for src, layer, kind in quantizable_layers(model):
        m = block.match(src)
        if m is None:
            name, bits = src, (model.config.extractor_bits if kind == EXTRACTOR_KIND else FLOAT_BITS)
        elif int(m.group(1)) in position:
            j = position[int(m.group(1))]
            name, bits = f"{prefix}{j}.{src[m.end():]}", subnet.layers[j].bits(kind)
        else:
            continue  # a block the subnet skips
        if bits == FLOAT_BITS:
            continue
        quantizer = getattr(layer, "quantizer", None)
        if quantizer is None:
            raise ValueError(f"subnet asks for {bits}-bit {name}, but the model has no quantizers "
                             "(it was built without a 'quant' section)")
        q = quantizer.quantize(state[name], bits)
        quantized[name] = q
        state[name] = q.dequantize().to(state[name].dtype)
    small.load_state_dict(state, strict=True)
    return small.eval(), quantized


def extracted_size(model: ASRModel | Wav2Vec2CTCModel, quantized: dict[str, QuantizedTensor]) -> SizeReport:
    """Size accounting of an extracted model: every tensor, codes and scales included."""
    return size_report(model.state_dict(), {k: q.bits for k, q in quantized.items()},
                       scale_counts={k: q.scale.numel() for k, q in quantized.items()},
                       quant_prefixes=quant_prefixes_of(model))


@dataclass
class ExtractResult:
    subnet: str
    out_dir: Path
    report: SizeReport
    file_bytes: int

    def line(self) -> str:
        r, mib = self.report, 2 ** 20
        bits = "float" if r.quantized_params == 0 else f"avg {r.average_bits:.2f} bits"
        return (f"{self.subnet}: {r.total_params:,} parameters, {bits}, "
                f"packed {r.packed_bytes / mib:.2f} MiB (ratio {r.compression_ratio:.2f}x vs fp32 "
                f"{r.fp32_bytes / mib:.2f} MiB), file {self.file_bytes / mib:.2f} MiB -> {self.out_dir}")


def _space_of(loaded, space: str | dict | SearchSpace | None) -> SearchSpace:
    if space is not None:
        return load_space(space).for_model(loaded.model.config)
    if loaded.model.search_space is None:
        raise ValueError("the model directory has no search space (config.json 'search_space'); "
                         "pass one with --space FILE")
    return loaded.model.search_space


def extract_to_dirs(model_dir: str | Path, subnets: list[str] = (), out: str | Path = ".",
                    grids: list[str | Path] = (), space: str | dict | SearchSpace | None = None
                    ) -> list[ExtractResult]:
    """Extract subnets of a saved supernet into model directories.

    subnets: subnet strings; grids: grid files (``load_grid``).  One subnet is written to
    ``out``; several go to ``out/<canonical subnet string>/``.  Returns one result each.
    """
    from allinone.models.saved import PACKED_WEIGHTS, load_model_dir, save_extracted

    loaded = load_model_dir(model_dir)
    sp = _space_of(loaded, space)
    chosen = [sp.parse(s) for s in subnets]
    for g in grids:
        chosen += [s for s in load_grid(g, sp) if s not in chosen]
    if not chosen:
        raise ValueError("nothing to extract: give --subnet STRING ... or --grid FILE")
    out = Path(out)
    results = []
    for subnet in chosen:
        name = sp.format(subnet)
        target = out if len(chosen) == 1 else out / name
        small, quantized = extract(loaded.model, subnet)
        path = save_extracted(target, small, quantized, loaded.fbank, loaded.tokenizer,
                              extra={"subnet": name, "extracted_from": str(model_dir)})
        results.append(ExtractResult(name, path, extracted_size(small, quantized),
                                     (path / PACKED_WEIGHTS).stat().st_size))
    return results
