"""Latency and peak memory of recognising single utterances, per inference backend.

A backend is a way of running an extracted (standalone) model:

| backend | what runs |
|---|---|
| ``cpu-fp32`` | the extracted model on CPU, float32 weights (quantized ones dequantized on load) |
| ``cpu-int8`` | the same with every 8-bit ``nn.Linear`` and pointwise (kernel-1) ``nn.Conv1d`` on integer kernels (``Int8Linear``, fbgemm; see ``int8_model``); only for subnets whose quantized weights are all 8-bit. Depthwise Conv1d layers and the float front end stay float |
| ``cpu-int8-fe`` | ``cpu-int8`` with the Conformer's float Conv2d front end on 8-bit kernels too (``front_end_to_int8``, output ranges from calibration utterances, ``front_end_ranges``: an accuracy decision, its weights are not trained for it) |
| ``cuda-fp32`` | the extracted model on the GPU, float32 |
| ``cuda-bf16`` | the same under bf16 autocast (the float twin an int8 model must not be slower than) |
| ``cuda-int8`` | the extracted model on the GPU with every 8-bit ``nn.Linear`` on ``torch._int_mm`` (int8 weights and per-row int8 activations); only for all-8-bit subnets |
| ``cuda-int4`` | ``cuda-bf16`` with every 2-, 3- or 4-bit ``nn.Linear`` (and pointwise ``nn.Conv1d``) on torch's weight-only int4 kernel (``Int4WeightOnlyLinear``: tinygemm, the weights dequantized inside the GEMM, bf16 activations; lower-bit codes are 4-bit codes too); only for subnets whose quantized weights all have <= 4 bits; layers of shapes the kernel does not take stay on bf16 kernels |

Each utterance is recognised alone (batch of one, as a deployed recogniser would see it):
encoder, CTC log-probabilities, then greedy or beam search, exactly ``recognize_batch``.
One warm-up pass over the sample is excluded; then ``repeats`` timed passes.  We report
the median over repeats of the per-utterance mean, and the real-time factor (compute
seconds / audio seconds) of the median pass.  Timings are measured, never inferred from
bit-widths (docs/quantization.md: int8 is not always faster).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` from before the model is moved to
the device (weights + activations).  On CPU the growth of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows it) over the
resident set before the backend's model copy was built: weights + activations, but memory
the allocator had already freed and now reuses is not counted, so read it as approximate.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BACKENDS = ("cpu-fp32", "cpu-int8", "cpu-int8-fe", "cuda-fp32", "cuda-bf16", "cuda-int8", "cuda-int4")

__all__ = ["BACKENDS", "LatencyResult", "measure_latency", "backends_for", "int8_applicable", "int8_model",
           "int4_applicable", "int4_model", "route_to_kernel", "front_end_ranges", "front_end_to_int8"]


@dataclass
class LatencyResult:
    backend: str
    ms_per_utt: float        # median over repeats of the mean per-utterance milliseconds
    rtf: float               # real-time factor of the median pass (compute s / audio s)
    peak_mem_mb: float       # see the module docstring (MiB)
    threads: int | None      # CPU threads (None on CUDA)
    repeats: int
    utterances: int
    audio_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def int8_applicable(bits: dict[str, int]) -> bool:
    """True when every quantized tensor is 8-bit (and there is at least one)."""
    return bool(bits) and all(b == 8 for b in bits.values())


def int4_applicable(bits: dict[str, int], shapes: dict[str, tuple[int, ...]] | None = None) -> bool:
    """True when every quantized tensor has 2, 3 or 4 bits (and there is at least one) and, given
    the tensors' ``shapes``, at least one is a matrix (or pointwise kernel) the int4 kernel takes."""
    from allinone.quant.int4 import int4_supported_shape

    if not bits or not all(2 <= b <= 4 for b in bits.values()):
        return False
    return shapes is None or any(len(s) >= 2 and all(n == 1 for n in s[2:]) and int4_supported_shape(s[0], s[1])
                                 for s in shapes.values())


def backends_for(bits: dict[str, int], device: str = "cpu", front_end: bool = False,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Backends to time for an extracted model whose quantized tensors have ``bits`` (and,
    when given, ``shapes``: ``cuda-int4`` only where the int4 kernel takes one of them).

    CUDA is timed whenever a GPU is present, whatever ``device`` decoding used;
    ``cpu-int8-fe`` where ``front_end`` (calibration utterances are at hand).
    """
    out = ["cpu-fp32"]
    if int8_applicable(bits):
        out += ["cpu-int8", "cpu-int8-fe"] if front_end else ["cpu-int8"]
    if torch.cuda.is_available():
        out += ["cuda-fp32", "cuda-bf16"]
        if int8_applicable(bits):
            out.append("cuda-int8")
        if int4_applicable(bits, shapes):
            out.append("cuda-int4")
    return out


# --------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _CpuPeak:
    """Peak resident-set growth (bytes) of this process between ``start`` and ``stop``."""

    def start(self) -> None:
        self.ok = _reset_peak_rss()
        self.base = _proc_status_kib("VmRSS")

    def stop(self) -> float:
        peak = _proc_status_kib("VmHWM")
        if not self.ok or peak is None or self.base is None:
            return float("nan")  # no reliable peak without a resettable VmHWM
        return max(0, peak - self.base) * 1024.0


# --------------------------------------------------------------------------- timing


class _RoutedWeight(torch.Tensor):
    """The float weight of a Linear whose ``F.linear`` calls go to a low-bit kernel module
    (``Int8Linear``, ``Int4WeightOnlyLinear``).

    The Conformer computes ``F.linear(x, *subnet_weight(layer, ...))`` rather than
    ``layer(x)`` (so that a supernet can slice and fake-quantize weights), so swapping the
    module as ``convert_linears_to_int8`` does is never called there.  This tensor
    subclass catches ``F.linear`` on the unsliced weight with the layer's own bias and runs
    the low-bit kernel instead; anything else (slices, other ops) sees the plain
    dequantized float weight.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, kernel, bias):
        t = torch.Tensor._make_subclass(cls, data.detach(), False)
        t._kernel, t._bias = kernel, bias
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        own_call = (func in (torch.nn.functional.linear, torch.nn.functional.conv1d) and len(args) >= 2
                    and isinstance(args[1], cls) and not isinstance(args[0], cls)
                    and (args[2] if len(args) > 2 else kwargs.get("bias")) is args[1]._bias)
        if own_call:
            x, w = args[0], args[1]
            if func is torch.nn.functional.linear:
                return w._kernel(x)
            # a pointwise convolution of a batch [B, C, T] is a Linear over channels: routed
            # when called as the Conformer calls it, F.conv1d(x, weight, bias) (anything
            # else, e.g. an explicit stride or padding, stays on the float kernel)
            if x.dim() == 3 and len(args) <= 3 and not kwargs.keys() - {"bias"}:
                return w._kernel(x.transpose(1, 2)).transpose(1, 2)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _is_pointwise_conv1d(layer) -> bool:
    return (isinstance(layer, torch.nn.Conv1d) and layer.kernel_size == (1,) and layer.groups == 1
            and layer.stride == (1,) and layer.padding == (0,) and layer.dilation == (1,))


def route_to_kernel(model, quantized: dict, bits: tuple[int, ...], make_kernel) -> list[str]:
    """Route, in place, every Linear and pointwise Conv1d of an extracted model quantized to one
    of ``bits`` to the module ``make_kernel(codes [out, in], scale, bias)`` builds (None: leave
    the layer float).

    The kernel is built from the exact codes and scales (``quantized``), the layer's bias
    folded in; see ``_RoutedWeight`` for why the layer module itself stays.  Returns the
    names of the routed layers.
    """
    routed = []
    for name, q in quantized.items():
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        if q.bits not in bits or not (isinstance(layer, torch.nn.Linear) or _is_pointwise_conv1d(layer)):
            continue  # depthwise Conv1d layers stay on float kernels
        codes = q.codes.reshape(q.codes.shape[0], -1)  # a pointwise conv's [out, in, 1] -> [out, in]
        kernel = make_kernel(codes, q.scale, layer.bias)
        if kernel is None:
            continue
        kernel = kernel.to(layer.weight.device)
        weight = layer._parameters.pop("weight")
        layer.kernel = kernel  # a child module: moves and is saved with the model
        layer.weight = _RoutedWeight(weight.data, kernel, layer.bias)
        routed.append(name.rsplit(".", 1)[0])
    return routed


def int8_model(model, quantized: dict) -> list[str]:
    """Every 8-bit Linear and pointwise Conv1d of ``model`` on integer kernels (``Int8Linear``);
    returns the routed layers' names."""
    from allinone.quant.int8 import Int8Linear

    return route_to_kernel(model, quantized, (8,), Int8Linear)


def int4_model(model, quantized: dict) -> list[str]:
    """Every 2-, 3- or 4-bit Linear and pointwise Conv1d of ``model`` whose shape the kernels take
    on torch's weight-only int4 kernel (``Int4WeightOnlyLinear``: codes of fewer bits are 4-bit
    codes too); returns the routed layers' names."""
    from allinone.quant.int4 import Int4WeightOnlyLinear, int4_supported_shape

    def make(codes, scale, bias):
        return Int4WeightOnlyLinear(codes, scale, bias) if int4_supported_shape(*codes.shape) else None

    return route_to_kernel(model, quantized, (2, 3, 4), make)


@torch.no_grad()
def _front_end_relu_pairs(model) -> tuple[torch.nn.Module, list[int]]:
    """The Conformer's Conv2d front end and the index of each (Conv2d, ReLU) pair in it."""
    embed = getattr(model.encoder, "embed", None)
    if not hasattr(embed, "conv"):
        raise ValueError(f"an 8-bit front end needs the Conformer's Conv2d subsampling front end, "
                         f"not {type(model.encoder).__name__}'s")
    layers = list(embed.conv)
    pairs = [i for i in range(0, len(layers) - 1, 2)
             if isinstance(layers[i], torch.nn.Conv2d) and isinstance(layers[i + 1], torch.nn.ReLU)]
    if len(pairs) * 2 != len(layers):
        raise ValueError("an 8-bit front end needs the front end as (Conv2d, ReLU) pairs")
    return embed, pairs


@torch.no_grad()
def front_end_ranges(model, calibration: list[torch.Tensor]) -> list[float]:
    """Each front-end ReLU's largest output over ``calibration`` (raw features, each [T, F]).

    Only the front end runs (normalisation as ``encode`` does it, then the convolutions), one
    utterance at a time. A few hundred training utterances: 20 were measured to be too few
    (docs/benchmarks.md, section 3b). The ranges are the same for every subnet of a supernet,
    whose front end is shared.
    """
    if not calibration:
        raise ValueError("calibrating an 8-bit front end needs at least one utterance")
    embed, pairs = _front_end_relu_pairs(model)
    peaks = [0.0] * len(pairs)
    for f in calibration:
        x, n = f.unsqueeze(0), torch.tensor([f.shape[0]])
        if getattr(model, "normalize", None) is not None:
            x, n = model.normalize(x, n)
        h = x.unsqueeze(1)  # [1, 1, T, F]
        for k, i in enumerate(pairs):
            h = embed.conv[i + 1](embed.conv[i](h))
            peaks[k] = max(peaks[k], float(h.max()))
    return peaks


def front_end_to_int8(model, ranges: list[float]) -> list[str]:
    """Put, in place, the float Conv2d subsampling front end of ``model`` on 8-bit kernels.

    Post-training quantization (the supernet keeps the front end float): 8-bit per-channel
    weight codes (max scale) for each Conv2d + ReLU (``Int8Conv2dReLU``), whose output keeps
    to [0, ``ranges[k]``] (``front_end_ranges``; larger values saturate), and for the output
    Linear (``Int8Linear``). CPU only. Returns the names of the replaced layers.
    """
    from allinone.quant.int8 import Int8Conv2dReLU, Int8Linear
    from allinone.quant.quantizer import QuantizedTensor

    embed, pairs = _front_end_relu_pairs(model)
    if len(ranges) != len(pairs):
        raise ValueError(f"{len(ranges)} output ranges for a front end of {len(pairs)} convolutions")
    names = []
    for k, i in enumerate(pairs):
        embed.conv[i] = Int8Conv2dReLU.from_conv(embed.conv[i], max(ranges[k], 1e-6))
        embed.conv[i].quantized_output = k < len(pairs) - 1  # the next convolution takes it as it is
        embed.conv[i + 1] = torch.nn.Identity()  # the ReLU is fused into the integer kernel
        names.append(f"encoder.embed.conv.{i}")
    in_sequential = isinstance(embed.out, torch.nn.Sequential)  # ESPnet's "out.0" (not conv2d8's "out")
    linear = embed.out[0] if in_sequential else embed.out
    int8_out = Int8Linear.from_quantized(QuantizedTensor.from_weight(linear.weight.detach(), 8, per_channel=True),
                                         linear.bias)
    if in_sequential:
        embed.out[0] = int8_out
    else:
        embed.out = int8_out
    return names + ["encoder.embed.out.0" if in_sequential else "encoder.embed.out"]


def _backend_model(model, backend: str, quantized: dict, front_end_ranges: list[float] | None = None):
    """A copy of ``model`` set up for ``backend`` (the original is left as it is)."""
    if (backend == "cpu-int8-fe") != (front_end_ranges is not None):
        raise ValueError("the cpu-int8-fe backend needs front_end_ranges, and no other takes them")
    m = copy.deepcopy(model).eval()
    if backend in ("cpu-int8", "cpu-int8-fe"):
        if backend == "cpu-int8-fe":
            front_end_to_int8(m, front_end_ranges)
        if not int8_model(m, quantized):
            raise ValueError(f"{backend} backend: the model has no 8-bit Linear layers")
    elif backend in ("cuda-fp32", "cuda-bf16"):
        m = m.to("cuda")
    elif backend == "cuda-int8":
        m = m.to("cuda")
        if not int8_model(m, quantized):
            raise ValueError("cuda-int8 backend: the model has no 8-bit Linear layers")
    elif backend == "cuda-int4":
        m = m.to("cuda")
        if not int4_model(m, quantized):
            raise ValueError("cuda-int4 backend: the model has no <= 4-bit Linear layers the int4 kernel takes")
    elif backend != "cpu-fp32":
        raise ValueError(f"unknown latency backend {backend!r}; known: {', '.join(BACKENDS)}")
    return m


@torch.no_grad()
def measure_latency(model, quantized: dict, feats: list[torch.Tensor], backend: str,
                    frame_shift_s: float = 0.01, repeats: int = 5, threads: int | None = None,
                    beam: int = 1, front_end_ranges: list[float] | None = None) -> LatencyResult:
    """Time ``backend`` recognising each utterance of ``feats`` alone.

    model: an extracted standalone ``ASRModel`` (CPU); quantized: its ``QuantizedTensor``s
    (exact 8-bit codes for ``cpu-int8``); feats: utterances, each [T, F] raw log-mel;
    frame_shift_s: seconds of audio per feature frame (hop / sample rate);
    threads: CPU threads (None = leave torch's setting);
    front_end_ranges: for ``cpu-int8-fe`` (only): the output range of each front-end
    convolution (``front_end_ranges``, computed before: calibration is not timed or counted
    in the peak memory).
    """
    from allinone.eval.decode import DecodeOptions, recognize_batch

    if repeats < 1 or not feats:
        raise ValueError("latency needs repeats >= 1 and at least one utterance")
    cuda = backend.startswith("cuda")
    device = torch.device("cuda" if cuda else "cpu")
    old_threads = torch.get_num_threads()
    if threads is not None and not cuda:
        torch.set_num_threads(threads)
    try:
        cpu_peak = _CpuPeak()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            cpu_peak.start()
        m = _backend_model(model, backend, quantized, front_end_ranges)
        inputs = [(f.unsqueeze(0).to(device), torch.tensor([f.shape[0]], device=device)) for f in feats]
        opts = DecodeOptions(beam=beam, device=str(device))

        def one_pass() -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with (torch.autocast("cuda", dtype=torch.bfloat16) if backend in ("cuda-bf16", "cuda-int4")
                  else contextlib.nullcontext()):
                for x, n in inputs:
                    recognize_batch(m, x, n, opts)
            if cuda:
                torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
            return time.perf_counter() - t0

        one_pass()  # warm-up: allocator, kernel selection, fbgemm packing; not counted
        passes = sorted(one_pass() for _ in range(repeats))
        median_s = statistics.median(passes)
        if cuda:
            peak = float(torch.cuda.max_memory_allocated() - base)
        else:
            peak = cpu_peak.stop()
        del m, inputs
    finally:
        torch.set_num_threads(old_threads)
    audio_s = sum(f.shape[0] for f in feats) * frame_shift_s
    return LatencyResult(
        backend=backend,
        ms_per_utt=1000.0 * median_s / len(feats),
        rtf=median_s / audio_s,
        peak_mem_mb=peak / 2 ** 20,
        threads=None if cuda else (threads if threads is not None else old_threads),
        repeats=repeats,
        utterances=len(feats),
        audio_seconds=audio_s,
    )
