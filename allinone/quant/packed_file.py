"""Packed model files: one safetensors file with packed codes, scales, float tensors and metadata.

Layout (docs/quantization.md, "File format"), for a quantized tensor ``NAME``:

- ``NAME:codes``  uint8 [ceil(n * bits / 8)]  codes packed by ``pack.pack_codes``
- ``NAME:scale``  float32 [out, 1, ...] or [1, 1, ...]
- every float tensor under its own name, in its own dtype.

String metadata (safetensors ``__metadata__``): ``format`` = 'allinone-packed',
``format_version`` = '1', ``arch``, ``config`` (JSON), ``quantized`` (JSON: name ->
{bits, shape, scale_shape, mode, packing}) and ``content_sha256``: a SHA-256 over every
tensor's name, dtype, shape and bytes in sorted-name order, so damaged tensor data is
caught on load rather than silently giving wrong weights. No code runs on loading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..utils import atomic_open
from .accounting import ARCH_QUANT_PREFIXES, DEFAULT_QUANT_PREFIXES, SizeReport, size_report
from .pack import pack_codes, packed_nbytes, unpack_codes
from .quantizer import SCALE_MODES, QuantizedTensor, scale_shape

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PackedFileError", "PackedModel", "QuantizedTensor",
           "save_packed", "load_packed", "describe_packed"]

FORMAT_NAME = "allinone-packed"
FORMAT_VERSION = 1
PACKING = "offset-binary-lsb-first"
CODES_SUFFIX = ":codes"
SCALE_SUFFIX = ":scale"


class PackedFileError(ValueError):
    """A packed model file is missing, damaged, of another format or of another architecture."""


@dataclass
class PackedModel:
    """What ``load_packed`` returns.

    state_dict: name -> float tensor (quantized ones dequantized to float32), ready for
        ``model.load_state_dict``.
    bits: name -> bit-width for every tensor (32 for those stored float).
    quantized: name -> the raw ``QuantizedTensor`` (codes int8, scale float32), e.g. for
        ``int8.convert_linears_to_int8``.
    info: name -> the file's metadata entry of each quantized tensor.
    file_bytes / header_bytes: size of the file and of its safetensors header (8-byte
        length + JSON); tensor data = file_bytes - header_bytes.
    """

    path: str
    arch: str
    config: dict
    state_dict: dict[str, torch.Tensor]
    bits: dict[str, int]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    file_bytes: int = 0
    header_bytes: int = 0

    def size_report(self) -> SizeReport:
        """Accounting of this model (every tensor, scales included)."""
        counts = {k: q.scale.numel() for k, q in self.quantized.items()}
        return size_report(self.state_dict, {k: q.bits for k, q in self.quantized.items()}, scale_counts=counts,
                           quant_prefixes=ARCH_QUANT_PREFIXES.get(self.arch, DEFAULT_QUANT_PREFIXES))


def _content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_quantized(name: str, q: QuantizedTensor) -> None:
    if q.mode not in SCALE_MODES:
        raise ValueError(f"{name}: unknown quantization mode {q.mode!r}; expected one of {SCALE_MODES}")
    want = scale_shape(tuple(q.codes.shape), q.mode == "per_channel")
    if tuple(q.scale.shape) != want:
        raise ValueError(f"{name}: scale of shape {tuple(q.scale.shape)} does not fit mode {q.mode} "
                         f"of a weight {tuple(q.codes.shape)} (expected {want})")


def save_packed(path: str | os.PathLike, arch: str, config: dict,
                float_tensors: Mapping[str, torch.Tensor],
                quantized: Mapping[str, QuantizedTensor]) -> None:
    """Write a packed model file atomically (temporary file + rename).

    arch: architecture name, e.g. 'conformer_asr'; config: its JSON-serialisable config dict.
    float_tensors: name -> tensor kept as is (its dtype); quantized: name -> codes + scale.
    """
    clash = set(float_tensors) & set(quantized)
    if clash:
        raise ValueError(f"tensors given both as float and quantized: {sorted(clash)[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, t in float_tensors.items():
        if name.endswith((CODES_SUFFIX, SCALE_SUFFIX)):
            raise ValueError(f"float tensor name {name!r} ends in a reserved suffix")
        tensors[name] = t.detach().cpu().contiguous()
    for name, q in quantized.items():
        _check_quantized(name, q)
        tensors[name + CODES_SUFFIX] = pack_codes(q.codes, q.bits)
        tensors[name + SCALE_SUFFIX] = q.scale.detach().to(torch.float32).cpu().contiguous()
        entries[name] = {"bits": int(q.bits), "shape": list(q.codes.shape),
                         "scale_shape": list(q.scale.shape), "mode": q.mode, "packing": PACKING}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arch": arch,
        "config": json.dumps(config, sort_keys=True),
        "quantized": json.dumps(entries, sort_keys=True),
        "content_sha256": _content_hash(tensors),
    }
    data = st_save(tensors, metadata=metadata)
    with atomic_open(path, "wb") as f:
        f.write(data)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Tensors, string metadata and header size of a safetensors file, or PackedFileError."""
    if not path.is_file():
        raise PackedFileError(f"{path}: no such packed model file")
    data = path.read_bytes()
    if len(data) < 8:
        raise PackedFileError(f"{path}: not a safetensors file (only {len(data)} bytes; truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise PackedFileError(f"{path}: not a safetensors file or truncated: the header claims "
                              f"{header_len} bytes but the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise PackedFileError(f"{path}: not a valid safetensors file (corrupt or truncated): {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise PackedFileError(f"{path}: safetensors file without metadata; not an allinone packed model")
    return tensors, meta, 8 + header_len


def _parse_json(path: Path, meta: dict, key: str) -> Any:
    if key not in meta:
        raise PackedFileError(f"{path}: metadata lacks {key!r}")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise PackedFileError(f"{path}: metadata {key!r} is not valid JSON: {e}") from None


def _check_header(path: Path, meta: dict, expected_arch: str | None) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise PackedFileError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                              f"(this allinone reads version {FORMAT_VERSION})")
    arch = meta.get("arch")
    if expected_arch is not None and arch != expected_arch:
        raise PackedFileError(f"{path}: file holds arch {arch!r}, expected {expected_arch!r}")


def _unpack_entry(path: Path, name: str, entry: dict, tensors: dict) -> QuantizedTensor:
    """Check one quantized tensor's metadata against its stored tensors and unpack it."""
    try:
        bits, shape = int(entry["bits"]), tuple(int(n) for n in entry["shape"])
        sshape, mode = tuple(int(n) for n in entry["scale_shape"]), entry["mode"]
    except (KeyError, TypeError, ValueError):
        raise PackedFileError(f"{path}: metadata of {name!r} lacks bits/shape/scale_shape/mode") from None
    if entry.get("packing", PACKING) != PACKING:
        raise PackedFileError(f"{path}: {name!r} uses unknown packing {entry.get('packing')!r}")
    codes_key, scale_key = name + CODES_SUFFIX, name + SCALE_SUFFIX
    if codes_key not in tensors or scale_key not in tensors:
        raise PackedFileError(f"{path}: quantized tensor {name!r} lacks {codes_key!r} or {scale_key!r}")
    packed, scale = tensors[codes_key], tensors[scale_key]
    if not 1 <= bits <= 8 or mode not in SCALE_MODES:
        raise PackedFileError(f"{path}: {name!r} has bits={bits}, mode={mode!r}; expected 1..8 and "
                              f"one of {SCALE_MODES}")
    want_bytes = packed_nbytes(math.prod(shape), bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (want_bytes,):
        raise PackedFileError(f"{path}: {name!r} metadata says {bits} bits x shape {list(shape)} = "
                              f"{want_bytes} bytes, but {codes_key!r} is {packed.dtype} "
                              f"{list(packed.shape)}")
    if (scale.dtype != torch.float32 or tuple(scale.shape) != sshape
            or sshape != scale_shape(shape, mode == "per_channel")):
        raise PackedFileError(f"{path}: {name!r} scale is {scale.dtype} {list(scale.shape)}; metadata "
                              f"says {list(sshape)} for mode {mode} of shape {list(shape)}")
    try:
        codes = unpack_codes(packed, bits, shape)
    except ValueError as e:
        raise PackedFileError(f"{path}: {name!r}: {e}") from None
    return QuantizedTensor(codes, scale, bits, mode)


def load_packed(path: str | os.PathLike, expected_arch: str | None = None) -> PackedModel:
    """Read, check and dequantize a packed model file.

    Raises ``PackedFileError`` (a ``ValueError``) for a missing file, a file that is not
    safetensors or is truncated / corrupt, another format or version, an architecture
    other than ``expected_arch``, or metadata that does not match the stored tensors.
    """
    path = Path(path)
    tensors, meta, header_bytes = _read_safetensors(path)
    _check_header(path, meta, expected_arch)
    if _content_hash(tensors) != meta.get("content_sha256"):
        raise PackedFileError(f"{path}: tensor data does not match its checksum (corrupt file)")
    config = _parse_json(path, meta, "config")
    entries = _parse_json(path, meta, "quantized")
    if not isinstance(config, dict) or not isinstance(entries, dict):
        raise PackedFileError(f"{path}: metadata 'config' and 'quantized' must be JSON objects")
    quantized = {name: _unpack_entry(path, name, e, tensors) for name, e in entries.items()}
    state_dict: dict[str, torch.Tensor] = {}
    bits: dict[str, int] = {}
    for key, t in tensors.items():
        if key.endswith((CODES_SUFFIX, SCALE_SUFFIX)):
            if key.rsplit(":", 1)[0] not in quantized:
                raise PackedFileError(f"{path}: {key!r} has no metadata entry")
            continue
        state_dict[key], bits[key] = t, 32
    for name, q in quantized.items():
        state_dict[name], bits[name] = q.dequantize(), q.bits
    return PackedModel(str(path), meta.get("arch", ""), config, state_dict, bits, quantized, entries,
                       path.stat().st_size, header_bytes)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_packed(path: str | os.PathLike) -> str:
    """Human-readable summary of a packed model file (``allinone info FILE``)."""
    m = load_packed(path)
    report = m.size_report()
    lines = [f"file: {m.path}", f"architecture: {m.arch}"]
    cfg = ", ".join(f"{k}={v}" for k, v in m.config.items() if not isinstance(v, (dict, list)))
    lines.append(f"config: {cfg}")
    lines.append(f"parameters: {report.total_params:,} ({report.quantized_params:,} quantized in "
                 f"{len(m.quantized)} tensors, {report.float_params:,} float)")
    lines += ["", "| tensor | shape | bits | mode | bytes |", "|---|---|---:|---|---:|"]
    for name in sorted(m.quantized):
        q = m.quantized[name]
        nbytes = packed_nbytes(q.codes.numel(), q.bits) + 4 * q.scale.numel()
        lines.append(f"| {name} | {'x'.join(map(str, q.codes.shape))} | {q.bits} | {q.mode} | {nbytes:,} |")
    lines += ["", "stays float (by category):", "| category | tensors | parameters | bytes |",
              "|---|---:|---:|---:|"]
    for cat, (k, n, b) in sorted(report.float_by_category().items()):
        lines.append(f"| {cat} | {k} | {n:,} | {b:,} |")
    ratio_disk = report.fp32_bytes / m.file_bytes
    lines += [
        "",
        f"average bits of quantized weights: {report.average_bits:.2f}",
        f"bytes on disk: {m.file_bytes:,} ({_fmt_bytes(m.file_bytes)}; header {m.header_bytes:,})",
        f"packed parameter bytes: {report.packed_bytes:,} (codes {report.code_bytes:,} + scales "
        f"{report.scale_bytes:,} + float {report.float_bytes:,})",
        f"equivalent fp32 size: {report.fp32_bytes:,} ({_fmt_bytes(report.fp32_bytes)})",
        f"compression ratio (fp32 / packed parameters, all parameters and scales): "
        f"{report.compression_ratio:.2f}x (fp32 / file on disk: {ratio_disk:.2f}x)",
        f"compression ratio of the quantizable weights alone (as published ratios count): "
        f"{report.weight_ratio:.2f}x",
    ]
    return "\n".join(lines)

