"""Inference from packed weights: int8 Linear layers on integer kernels.

The reference path is dequantize-on-load (``packed_file.load_packed``): every weight is
``codes * scale`` in float32 and the model runs as usual. This module adds a faster path
for 8-bit ``nn.Linear`` layers:

- CPU (backend 'fbgemm'): ``torch.ops.quantized.linear_dynamic`` with weights prepacked by
  ``torch.ops.quantized.linear_prepack``. The weight is exactly our codes with their
  per-channel scales; the activation is quantized on the fly per tensor to unsigned
  8 bits with a zero point (7 bits, ``reduce_range``, on x86, which keeps fbgemm's 16-bit
  intermediate sums from saturating on AVX2), products are summed in int32.
- CUDA, or a CPU without a quantized engine (backend 'int_mm'): ``torch._int_mm``
  (int8 x int8 -> int32) with each activation row quantized symmetrically to int8.

Both are dynamic activation quantization, so outputs differ from the float reference by
the activation rounding error only (tests bound it exactly).

``Int8Conv2dReLU`` does the same for a Conv2d followed by a ReLU (the subsampling front end)
with x86/fbgemm's quantized convolution. Its output is 8-bit as well, on a range fixed
beforehand (``output_max``, from calibration utterances): torch's *dynamic* quantized
convolution would requantize its output to the input's range instead, which clips whatever
lies outside it, and a float convolution over unfolded patches with the int8 Linear kernel
is slower than the float convolution it replaces (docs/benchmarks.md, section 3b).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import QuantizedTensor

BACKENDS = ("auto", "fbgemm", "int_mm")


def _buffers_key(module: nn.Module) -> tuple:
    """What a cache of prepacked weights depends on: each buffer's storage and its count of
    in-place writes (``load_state_dict`` copies into the same storage)."""
    return tuple((b.data_ptr(), b._version) for b in (module.codes, module.scale, module.bias) if b is not None)


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack"))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def int_mm_linear(x: torch.Tensor, codes_t: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (codes * scale).T + bias`` with int8 activations per row and ``torch._int_mm``.

    x: [M, K] float; codes_t: [K, N] int8 (the transposed codes); scale: [N]; bias: [N].
    ``_int_mm`` wants M > 16 and K, N multiples of 8 (cuBLAS int8), so we pad with zeros,
    which changes no sum. Returns [M, N] float32.
    """
    m, k = x.shape
    n = codes_t.shape[1]
    x = x.float()
    # Symmetric per-row scale: int8 in [-127, 127]; an all-zero row gets scale 1.
    sx = x.abs().amax(dim=1, keepdim=True) / 127.0
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = torch.round(x / sx).clamp_(-127, 127).to(torch.int8)
    mp, kp, np_ = max(17, _round_up(m, 8)), _round_up(k, 8), _round_up(n, 8)
    if (mp, kp) != (m, k):
        xq = F.pad(xq, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        codes_t = F.pad(codes_t, (0, np_ - n, 0, kp - k))
    acc = torch._int_mm(xq, codes_t)[:m, :n]
    y = acc.float() * sx * scale.float()
    return y + bias.float() if bias is not None else y


def _register_codes(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    layout: str) -> None:
    """Check 8-bit weight codes (``layout``, e.g. ``[out, in]``) and their scale (one per output
    channel, or one for all); register them and the bias as ``module``'s buffers."""
    name = type(module).__name__
    if codes.dim() != layout.count(",") + 1 or codes.dtype != torch.int8:
        raise ValueError(f"{name} needs int8 codes {layout}, got {codes.dtype} {tuple(codes.shape)}")
    if int(codes.abs().max()) > 127:  # -128 has no symmetric counterpart
        raise ValueError(f"{name} codes must lie in [-127, 127]")
    out_ch = codes.shape[0]
    scale = scale.detach().float().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(out_ch)
    if scale.numel() != out_ch:
        raise ValueError(f"scale has {scale.numel()} values for {out_ch} output channels")
    module.register_buffer("codes", codes.detach().clone())
    module.register_buffer("scale", scale.clone().contiguous())
    module.register_buffer("bias", None if bias is None else bias.detach().float().clone())


def _per_channel_qweight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The codes as torch's per-channel qint8 tensor (zero points 0), what the prepack ops take."""
    return torch._make_per_channel_quantized_tensor(codes.cpu(), scale.cpu().double(),
                                                    torch.zeros(len(scale), dtype=torch.long), 0)


class Int8Linear(nn.Module):
    """A Linear layer whose weight is 8-bit codes with one float scale per output channel.

    codes: int8 [out, in] in [-127, 127]; scale: float [out], [out, 1] or per-tensor [1, 1];
    bias: [out] or None. ``forward(x [..., in]) -> [..., out]`` (float32).
    backend: 'auto' (fbgemm on CPU, int_mm on CUDA), 'fbgemm' or 'int_mm'.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown int8 backend {backend!r}; expected one of {BACKENDS}")
        _register_codes(self, codes, scale, bias, "[out, in]")
        self.out_features, self.in_features = codes.shape
        self.backend = backend
        self._prepacked = None  # (key, fbgemm packed params), rebuilt when the buffers change

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> "Int8Linear":
        if q.bits != 8:
            raise ValueError(f"Int8Linear needs 8-bit codes, got {q.bits} bits")
        return cls(q.codes, q.scale, bias, backend)

    def dequantized_weight(self) -> torch.Tensor:
        """The float reference weight ``codes * scale``: [out, in]."""
        return self.codes.float() * self.scale[:, None]

    def _backend_for(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "fbgemm" if x.device.type == "cpu" and _fbgemm_available() else "int_mm"

    def _fbgemm_params(self):
        """Prepacked weight for ``linear_dynamic``, cached while the buffers stay the same."""
        key = _buffers_key(self)
        if self._prepacked is None or self._prepacked[0] != key:
            bias = None if self.bias is None else self.bias.cpu()
            self._prepacked = (key, torch.ops.quantized.linear_prepack(_per_channel_qweight(self.codes, self.scale),
                                                                       bias))
        return self._prepacked[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self._backend_for(x) == "fbgemm":
            if x.device.type != "cpu":
                raise ValueError("the fbgemm int8 backend runs on CPU only")
            reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._fbgemm_params(), reduce_range)
        else:
            y = int_mm_linear(x2, self.codes.t(), self.scale, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class Int8Conv2dReLU(nn.Module):
    """``relu(conv2d(x, codes * scale, bias, stride))`` on integer kernels (CPU only).

    codes: int8 [out, in, kh, kw] in [-127, 127]; scale: float [out] (per output channel) or
    one value; bias: [out] or None; stride: the convolution's (no padding, no dilation, as the
    front end's layers); output_max: the largest output kept, > 0 (larger ones saturate).
    The input is quantized per call and per tensor to unsigned 8 bits with a zero point (7
    bits on x86, as ``Int8Linear``), or taken as it is when it is already a quantized tensor;
    the ReLU output is unsigned 8 bits on [0, output_max].
    ``forward(x [B, in, H, W]) -> [B, out, H', W']``: float32, or, with ``quantized_output``
    set, the quantized tensor itself (7 bits on x86), for a next ``Int8Conv2dReLU`` to take
    without a float round trip (the float copy of a front end's first output is the largest
    tensor of the whole model, and writing it costs more than the convolution).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 stride: int | tuple[int, int], output_max: float):
        super().__init__()
        if not output_max > 0:
            raise ValueError(f"output_max must be positive, got {output_max}")
        _register_codes(self, codes, scale, bias, "[out, in, kh, kw]")
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.output_max = float(output_max)
        self.quantized_output = False
        self._prepacked = None  # (key, packed params), rebuilt when the buffers change

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, output_max: float) -> "Int8Conv2dReLU":
        """Post-training 8-bit per-channel codes (max scale) of a float ``nn.Conv2d``."""
        if conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("Int8Conv2dReLU supports unpadded, undilated, ungrouped convolutions only")
        q = QuantizedTensor.from_weight(conv.weight.detach(), 8, per_channel=True)
        return cls(q.codes, q.scale, conv.bias, conv.stride, output_max)

    def dequantized_weight(self) -> torch.Tensor:
        """The float reference weight ``codes * scale``: [out, in, kh, kw]."""
        return self.codes.float() * self.scale[:, None, None, None]

    def _packed(self):
        key = (_buffers_key(self), torch.backends.quantized.engine)
        if self._prepacked is None or self._prepacked[0] != key:
            packed = torch.ops.quantized.conv2d_prepack(_per_channel_qweight(self.codes, self.scale), self.bias,
                                                        list(self.stride), [0, 0], [1, 1], 1)
            self._prepacked = (key, packed)
        return self._prepacked[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _fbgemm_available():
            raise ValueError("Int8Conv2dReLU runs on a CPU with a quantized engine (x86, fbgemm) only")
        reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")
        if x.is_quantized and x.dtype != torch.quint8:
            raise ValueError(f"Int8Conv2dReLU takes a float or quint8 input, got {x.dtype}")
        qx = x if x.is_quantized else torch.quantize_per_tensor_dynamic(x.float().contiguous(), torch.quint8,
                                                                          reduce_range)
        if not self.quantized_output:
            return torch.ops.quantized.conv2d_relu(qx, self._packed(), self.output_max / 255, 0).dequantize()
        # The next layer's input: 7-bit codes where its engine wants them (reduce_range). The
        # kernel writes codes up to 255 whatever the scale, so the clamp keeps to [0, output_max].
        levels = 127 if reduce_range else 255
        qy = torch.ops.quantized.conv2d_relu(qx, self._packed(), self.output_max / levels, 0)
        return torch.clamp(qy, max=self.output_max)

    def extra_repr(self) -> str:
        out_ch, in_ch, kh, kw = self.codes.shape
        return f"{in_ch}, {out_ch}, kernel_size=({kh}, {kw}), stride={self.stride}, output_max={self.output_max:.4g}"


def convert_linears_to_int8(model: nn.Module, bits_per_tensor: Mapping[str, int],
                            quantized: Mapping[str, QuantizedTensor] | None = None,
                            backend: str = "auto") -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose ``<module>.weight`` has 8 bits by ``Int8Linear``.

    bits_per_tensor: state_dict name -> bits (e.g. ``PackedModel.bits``).
    quantized: name -> codes + scale (e.g. ``PackedModel.quantized``); used exactly when
        given, otherwise the current float weight is quantized per channel (max scale).
    Returns the names of the converted modules.
    """
    quantized = quantized or {}
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and bits_per_tensor.get(f"{name}.weight") == 8]
    for name, lin in targets:
        q = quantized.get(f"{name}.weight") or QuantizedTensor.from_weight(lin.weight, 8, per_channel=True)
        new = Int8Linear.from_quantized(q, lin.bias, backend).to(lin.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in targets]
