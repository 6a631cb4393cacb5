"""Weight quantizers: symmetric uniform codes, STE / LSQ gradients, multi-precision scales.

Conventions (docs/quantization.md, method.md section 2):

- weights only, symmetric, no zero point; a ``b``-bit code lies in ``[-L, L]`` with
  ``L = 2^(b-1) - 1`` (so 2-bit is ternary {-1, 0, +1}); 1-bit is the sign, codes {-1, +1};
- 32 bits means "leave the weight in floating point";
- a scale has as many dimensions as its weight: per-tensor ``[1, 1, ...]``, per-output-channel
  ``[out, 1, ...]``; it broadcasts over the weight, and ``weight ~= codes * scale``;
- rounding is ``torch.round`` (round half to even), the same as ``numpy.round``.

Two ways for one latent float weight to serve several bit-widths:

- ``MultiPrecisionQuantizer`` (the default): one independent scale per bit-width;
- ``NestedQuantizer`` (Matryoshka style): only the top bit-width has a scale; a lower
  bit-width's codes are the top codes shifted right with rounding (``nested_codes``) and
  its scale follows from the top scale (``nested_scale``), so lowering precision is a
  bit shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
FLOAT_BITS = 32
SCALE_MODES = ("per_tensor", "per_channel")
# Smallest scale we allow: an all-zero weight (or channel) would otherwise give scale 0
# and a division by zero; with this floor its codes are simply 0.
_MIN_SCALE = 1e-12


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported bit-width, else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bit-width {bits} is outside the supported set {SUPPORTED_BITS} "
            "(1..8 are integer codes, 32 means floating point)"
        )
    return bits


def quant_levels(bits: int) -> int:
    """Largest code magnitude ``L`` of a ``bits``-bit code: ``2^(bits-1) - 1``, and 1 for 1-bit (sign).

    32 bits is floating point and has no levels: ``ValueError``.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        raise ValueError("bit-width 32 is floating point: it has no quantization levels")
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def scale_shape(weight_shape: Sequence[int], per_channel: bool) -> tuple[int, ...]:
    """Shape of a scale for a weight of ``weight_shape``: ``[out, 1, ...]`` or ``[1, 1, ...]``."""
    ones = (1,) * (len(weight_shape) - 1)
    return ((weight_shape[0] if per_channel else 1),) + ones


def _reduce_dims(weight: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    """Dimensions to reduce over so the result has the scale's shape (keepdim=True)."""
    return tuple(range(1, weight.dim())) if per_channel else tuple(range(weight.dim()))


# --------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------

def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``weight``.

    weight: [out, ...] float; scale: broadcastable to weight (``[out, 1, ...]`` or ``[1, ...]``).
    Returns int8 codes of the weight's shape: ``clamp(round(w / s), -L, L)``; for 1-bit
    ``+1`` where ``w >= 0`` and ``-1`` elsewhere (zero counts as positive).
    """
    levels = quant_levels(bits)
    if bits == 1:
        return torch.where(weight >= 0, 1, -1).to(torch.int8)
    return torch.round(weight / scale).clamp_(-levels, levels).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weight ``codes * scale``. codes: [out, ...] int; scale broadcastable. Returns float32.

    ``fake_quant`` and ``load_packed`` both go through this one expression, so a packed
    file reproduces the training-time quantized weight bit for bit.
    """
    return codes.to(torch.float32) * scale.to(torch.float32)


def compute_scale(
    weight: torch.Tensor,
    bits: int,
    per_channel: bool = False,
    method: str = "max",
    grid: int = 50,
) -> torch.Tensor:
    """Initial scale for ``weight`` at ``bits``.

    weight: [out, ...]. Returns float32 of shape ``[out, 1, ...]`` (per-channel) or
    ``[1, 1, ...]`` (per-tensor).

    - 1-bit: ``mean |w|``; it minimises ``||w - s * sign(w)||^2``, so both methods agree.
    - ``method='max'``: ``max |w| / L`` (no clipping).
    - ``method='mse'``: ``r * max |w| / L`` for the clip ratio ``r`` in ``(0, 1]`` (``grid``
      evenly spaced values) that minimises the squared quantization error, chosen separately
      per channel when ``per_channel``. Low bit-widths profit most: for ternary codes the
      best clip is far below the maximum.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        raise ValueError("bit-width 32 is floating point: it has no scale")
    w = weight.detach().to(torch.float32)
    dims = _reduce_dims(w, per_channel)
    if bits == 1:
        return w.abs().mean(dim=dims, keepdim=True).clamp_min(_MIN_SCALE)
    levels = quant_levels(bits)
    max_scale = w.abs().amax(dim=dims, keepdim=True).clamp_min(_MIN_SCALE) / levels
    if method == "max":
        return max_scale
    if method != "mse":
        raise ValueError(f"unknown scale method {method!r}; expected 'max' or 'mse'")
    best_scale, best_err = max_scale, None
    for ratio in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = max_scale * ratio
        err = (dequantize(quantize_codes(w, s, bits), s) - w).pow(2).sum(dim=dims, keepdim=True)
        if best_err is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale = torch.where(better, s, best_scale)
            best_err = torch.where(better, err, best_err)
    return best_scale


class _FakeQuant(torch.autograd.Function):
    """``codes * scale`` forward; STE (weight) and LSQ (scale) backward.

    The codes are computed by the caller (no gradient), so the same function serves the
    direct quantizer and the nested one. With ``v = w / s`` and ``inside = |v| <= L``:

    - d out / d w = 1 inside, 0 outside (LSQ's clipped straight-through estimator);
    - d out / d s = codes - v inside, codes (= +-L) outside  (LSQ, Esser et al. 2020),
      summed over the weights that share each scale and multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, weight, scale, codes, levels: int, grad_scale: float, learn_scale: bool):
        ctx.save_for_backward(weight, scale, codes)
        ctx.levels, ctx.grad_scale, ctx.learn_scale = levels, grad_scale, learn_scale
        return dequantize(codes, scale).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale, codes = ctx.saved_tensors
        v = weight / scale
        inside = v.abs() <= ctx.levels
        grad_weight = grad_out * inside
        grad_scale = None
        if ctx.learn_scale and ctx.needs_input_grad[1]:
            local = torch.where(inside, codes.to(v.dtype) - v, codes.to(v.dtype))
            full = grad_out * local * ctx.grad_scale
            # Sum over every dimension along which the scale was broadcast.
            dims = tuple(d for d in range(full.dim()) if scale.shape[d] == 1)
            grad_scale = full.sum(dim=dims, keepdim=True) if dims else full
            grad_scale = grad_scale.to(scale.dtype)
        return grad_weight, grad_scale, None, None, None, None


def lsq_grad_scale(weight_numel: int, scale_numel: int, levels: int) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N * L)``, ``N`` = number of weights sharing one scale.

    Per-tensor this is LSQ's ``1 / sqrt(numel * Q_P)``; per-channel each scale sees
    ``numel / out`` weights, so ``N`` is that count.
    """
    n = max(1, weight_numel // max(1, scale_numel))
    return 1.0 / math.sqrt(n * levels)


def fake_quant_reference(weight: torch.Tensor, scale: torch.Tensor, bits: int,
                         learn_scale: bool = False) -> torch.Tensor:
    """The original ``fake_quant``: int8 codes first, then ``_FakeQuant`` (kept as the reference).

    Same contract as ``fake_quant``; 18 elementwise operations per call (forward and
    backward, learned scale) against ``fake_quant``'s 9. Tests compare the two.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        return weight
    levels = quant_levels(bits)
    with torch.no_grad():
        codes = quantize_codes(weight, scale, bits)
    g = lsq_grad_scale(weight.numel(), scale.numel(), levels)
    return _FakeQuant.apply(weight, scale, codes, levels, g, learn_scale)


_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _times(a: torch.Tensor, b: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """``value * a * b`` in one operation, with ``+0.0`` where the product is ``-0.0``.

    ``addcmul(0, a, b)`` rounds ``a * b`` once, exactly as ``a * b`` does, and adding the
    zero turns ``-0.0`` (``round(-0.3) * s``) into the ``+0.0`` that int8 codes give.
    """
    if torch.compiler.is_compiling():
        return a * b * value + 0.0
    key = (a.device, a.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        with torch.inference_mode(False):  # usable in and out of inference mode
            zero = _ZEROS[key] = torch.zeros((), device=a.device, dtype=a.dtype)
    return torch.addcmul(zero, a, b, value=value)


class _FakeQuantFast(torch.autograd.Function):
    """``_FakeQuant`` with fewer operations: same values and gradients.

    Per call 4 to 6 elementwise operations forward and 1 to 3 backward (``_FakeQuant``
    with ``quantize_codes``: 7 and 11). How (none changes a value beyond float rounding
    order):

    - the codes are kept as float: ``round(clamp(w / s, -L, L))`` (equal to clamping the
      rounded value: L is an integer), so ``codes * s`` is bit for bit
      ``dequantize(int8 codes, s)`` (computed as ``0 + codes * s`` in one ``addcmul``,
      which also turns the ``-0.0`` of ``round(-0.3)`` into int8's ``+0``); when ``codes``
      is None they are computed here from the ``w / s`` the backward needs anyway;
    - ``inside`` (``|v| <= L``) is ``clamp(v, -L, L) == v``, reusing the clamp;
    - the forward saves what the backward needs (``inside`` and the LSQ factor
      ``codes - v * inside``, which is ``where(inside, codes - v, codes)`` for finite v)
      instead of recomputing ``w / s``, ``|v|``, the comparison and the casts;
    - the scale's gradient is ``sum(g * grad * factor)`` (one ``addcmul`` and one sum),
      ``_FakeQuant`` sums ``grad * factor * g``: the two can differ in the last bit; the
      output and the weight's gradient are identical;
    - nothing is saved, and only the output computed, when no input needs a gradient.

    forward(weight [out, ...], scale (broadcastable), codes (float codes or None), levels L,
    bits, grad_scale g, learn_scale) -> fake-quantized weight (weight's shape and dtype).
    """

    @staticmethod
    def forward(ctx, weight, scale, codes, levels: int, bits: int, grad_scale: float, learn_scale: bool):
        need_w = ctx.needs_input_grad[0]
        need_s = learn_scale and ctx.needs_input_grad[1]
        v = weight / scale
        clipped = v.clamp(-levels, levels) if (need_w or need_s) else None
        if codes is None:
            if bits == 1:
                codes = torch.where(weight >= 0, 1.0, -1.0).to(v.dtype)
            elif clipped is None:
                codes = v.clamp_(-levels, levels).round_()
            else:
                codes = clipped.round()
        elif codes.dtype != v.dtype:
            codes = codes.to(v.dtype)
        # dequantize(): float32 codes times float32 scale, in the weight's dtype.
        c32 = codes if codes.dtype == torch.float32 else codes.to(torch.float32)
        s32 = scale if scale.dtype == torch.float32 else scale.to(torch.float32)
        out = _times(c32, s32)
        if out.dtype != weight.dtype:
            out = out.to(weight.dtype)
        ctx.need_w, ctx.need_s, ctx.grad_scale = need_w, need_s, grad_scale
        if need_w or need_s:
            inside = clipped == v
            if need_s:
                # where(inside, codes - v, codes) in one operation (v is finite).
                local = torch.addcmul(codes, v, inside, value=-1.0)
                ctx.sum_dims = tuple(d for d in range(weight.dim()) if scale.shape[d] == 1)
                ctx.scale_dtype = scale.dtype
                ctx.save_for_backward(inside, local)
            else:
                ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_weight = grad_scale = None
        if ctx.need_s:
            inside, local = ctx.saved_tensors
            full = _times(grad_out, local, ctx.grad_scale)
            grad_scale = full.sum(dim=ctx.sum_dims, keepdim=True) if ctx.sum_dims else full
            if grad_scale.dtype != ctx.scale_dtype:
                grad_scale = grad_scale.to(ctx.scale_dtype)
        elif ctx.need_w:
            (inside,) = ctx.saved_tensors
        if ctx.need_w:
            grad_weight = grad_out * inside
        return grad_weight, grad_scale, None, None, None, None, None


def fake_quant(weight: torch.Tensor, scale: torch.Tensor, bits: int, learn_scale: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``weight`` with a straight-through gradient.

    weight: [out, ...]; scale: ``[out, 1, ...]`` or ``[1, ...]``. Returns the weight's shape
    and dtype. 32 bits returns ``weight`` itself. With ``learn_scale`` the scale gets LSQ's
    gradient (see ``_FakeQuant``); otherwise it gets none.

    Values and gradients are those of ``fake_quant_reference`` (``_FakeQuant``) with fewer
    operations (``_FakeQuantFast``); no host-device synchronisation.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        return weight
    levels = quant_levels(bits)
    g = lsq_grad_scale(weight.numel(), scale.numel(), levels)
    return _FakeQuantFast.apply(weight, scale, None, levels, bits, g, learn_scale)


class _FakeQuantMixture(torch.autograd.Function):
    """``sum_k p_k * fake_quant(w, s_k, b_k)`` for K bit-widths in one set of stacked operations.

    What the one-stage mixed-precision search computes for every weight of every step
    (``allinone.elastic.mixed_precision``). A loop over the candidates costs each one its own
    ``fake_quant`` (4-6 operations forward, 1-3 backward) plus the mixture's multiplies, adds
    and their gradients: about 40 kernels for 3 candidates with learned scales. Here the
    candidates are one stacked tensor ``[K, *w.shape]``: about 20 kernels (forward and
    backward), a count that grows with K only in the per-scale gradient sums.
    Values and gradients are the loop's (``_FakeQuantFast`` per candidate), up to float
    summation order:

    - d out / d p_k = sum(grad * fake_quant_k(w));
    - d out / d w = grad * sum_k p_k * inside_k (each candidate's clipped straight-through
      estimator, weighted);
    - d out / d s_k = g_k * sum over the scale's broadcast dims of p_k * grad * (codes_k - v_k *
      inside_k) (LSQ, scaled by the candidate's weight p_k), when ``learn_scale``.

    forward(weight [out, ...], probs [K], low = -L and high = L [K, 1, ...], grad_scales [K, 1, ...],
    sign_rows ([K, 1, ...] bool: 1-bit candidates, whose code is the sign; or None),
    learn_scale, *scales (K tensors broadcastable to the weight)) -> [out, ...] (weight's dtype).
    """

    @staticmethod
    def forward(ctx, weight, probs, low, high, grad_scales, sign_rows, learn_scale: bool, *scales):
        stacked = torch.stack(scales)  # [K, out or 1, 1 or in, ...]
        v = weight.unsqueeze(0) / stacked  # [K, *w.shape]
        clipped = torch.clamp(v, low, high)
        codes = clipped.round()
        if sign_rows is not None:
            codes = torch.where(sign_rows, torch.where(weight >= 0, 1.0, -1.0).to(codes.dtype), codes)
        quantized = _times(codes, stacked)  # codes * scale, with int8's +0.0 for -0.0
        p = (probs if probs.dtype == quantized.dtype else probs.to(quantized.dtype)).view(-1, *([1] * weight.dim()))
        out = (p * quantized).sum(0)
        if out.dtype != weight.dtype:  # (an unconditional .to aliases its input: under torch.compile
            out = out.to(weight.dtype)  # that returned zero gradients)
        inside = clipped == v
        ctx.learn_scale = learn_scale and any(ctx.needs_input_grad[7:])
        ctx.num_scales = len(scales)
        # Dimensions of [K, *w.shape] that the scales broadcast over: their gradient sums them.
        ctx.sum_dims = tuple(d for d in range(1, v.dim()) if stacked.shape[d] == 1 and v.shape[d] != 1)
        ctx.scale_dtype = stacked.dtype
        if ctx.learn_scale:
            ctx.save_for_backward(p, quantized, inside, torch.addcmul(codes, v, inside, value=-1.0), grad_scales)
        else:
            ctx.save_for_backward(p, quantized, inside)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        p, quantized, inside = ctx.saved_tensors[:3]
        g = (grad_out if grad_out.dtype == quantized.dtype else grad_out.to(quantized.dtype)).unsqueeze(0)
        grad_probs = (quantized * g).flatten(1).sum(1)
        grad_weight = (g * (p * inside).sum(0)).squeeze(0)
        if grad_weight.dtype != grad_out.dtype:
            grad_weight = grad_weight.to(grad_out.dtype)
        grad_scales = [None] * ctx.num_scales
        if ctx.learn_scale:
            local, gscale = ctx.saved_tensors[3:]
            full = g * local * (p * gscale)
            if ctx.sum_dims:  # one reduction for all K scales, then views of its rows
                full = full.sum(dim=ctx.sum_dims, keepdim=True)
            grad_scales = [x if x.dtype == ctx.scale_dtype else x.to(ctx.scale_dtype) for x in full.unbind(0)]
        return (grad_weight, grad_probs, None, None, None, None, None, *grad_scales)


def fake_quant_mixture(weight: torch.Tensor, scales: Sequence[torch.Tensor], bits: Sequence[int],
                       probs: torch.Tensor, learn_scale: bool = False) -> torch.Tensor:
    """``sum_k probs[k] * fake_quant(weight, scales[k], bits[k], learn_scale)``, fused.

    weight: [out, ...]; scales: one per bit-width, each ``[out, 1, ...]`` or ``[1, ...]`` (all
    the same shape); bits: integer bit-widths 1..8; probs: [K] mixture weights (any values:
    a Gumbel-softmax sample, one-hot or soft). Returns the weight's shape and dtype;
    ``probs``, the weight and (with ``learn_scale``) the scales get gradients
    (``_FakeQuantMixture``).
    """
    bits = [check_bits(int(b)) for b in bits]
    if FLOAT_BITS in bits:
        raise ValueError("fake_quant_mixture mixes integer bit-widths; 32 (float) is not one")
    if len(scales) != len(bits) or probs.shape != (len(bits),):
        raise ValueError(f"{len(bits)} bit-widths need as many scales (got {len(scales)}) and probs of "
                         f"shape [{len(bits)}] (got {tuple(probs.shape)})")
    key = (tuple(bits), weight.dim(), weight.numel(), scales[0].numel(), weight.device, scales[0].dtype)
    if torch.compiler.is_compiling():  # (a graph holds its constants itself)
        consts = _mixture_constants(*key)
    else:
        consts = _MIXTURE_CONSTANTS.get(key) or _MIXTURE_CONSTANTS.setdefault(key, _mixture_constants(*key))
    return _FakeQuantMixture.apply(weight, probs, *consts, learn_scale, *scales)


# (bits, weight dims, weight numel, scale numel, device, dtype) -> fake_quant_mixture's constants,
# built once: a host-to-device copy per weight per step would cost as much as the mixture.
_MIXTURE_CONSTANTS: dict[tuple, tuple] = {}


def _mixture_constants(bits: tuple[int, ...], dim: int, numel: int, scale_numel: int, device, dtype):
    """-L and L [K, 1, ...], LSQ gradient scales [K, 1, ...], 1-bit rows ([K, 1, ...] bool or None)."""
    shape = (len(bits),) + (1,) * dim
    with torch.inference_mode(False):  # usable in and out of inference mode
        levels = torch.tensor([quant_levels(b) for b in bits], dtype=dtype).view(shape).to(device)
        low = -levels
        grad_scales = torch.tensor([lsq_grad_scale(numel, scale_numel, quant_levels(b)) for b in bits],
                                   dtype=dtype).view(shape).to(device)
        sign_rows = torch.tensor([b == 1 for b in bits]).view(shape).to(device) if 1 in bits else None
    return low, levels, grad_scales, sign_rows


def _float_nested_codes(top_codes: torch.Tensor, bits_hi: int, bits_lo: int) -> torch.Tensor:
    """``nested_codes`` on float codes (integers in a float tensor), returning float codes.

    Every step is exact in float32 (integers below 2^24, division by a power of two), so the
    values are those of ``nested_codes``. bits_hi > bits_lo >= 1.
    """
    if bits_lo == 1:
        return torch.where(top_codes >= 0, 1.0, -1.0).to(top_codes.dtype)
    d = bits_hi - bits_lo
    # sign(c) * ((|c| + 2^(d-1)) >> d) = trunc((c + sign(c) * 2^(d-1)) / 2^d): 4 operations.
    shifted = torch.add(top_codes, torch.sign(top_codes), alpha=float(1 << (d - 1)))
    lo = quant_levels(bits_lo)
    return shifted.div_(float(1 << d), rounding_mode="trunc").clamp_(-lo, lo)


# --------------------------------------------------------------------------------------
# Nested (Matryoshka) integer codes
# --------------------------------------------------------------------------------------

def nested_codes(codes_hi: torch.Tensor, bits_hi: int, bits_lo: int) -> torch.Tensor:
    """Lower-precision codes as the most significant bits of higher-precision codes.

    codes_hi: int codes in ``[-L_hi, L_hi]`` (any shape). With ``d = bits_hi - bits_lo``:

    - ``bits_lo >= 2``: ``clamp(sign(c) * ((|c| + 2^(d-1)) >> d), -L_lo, L_lo)``, i.e. an
      arithmetic right shift by ``d`` that rounds half away from zero (symmetric, so
      ``-c`` maps to ``-c_lo``), then clamps: ``L_hi / 2^d = L_lo + 1 - 2^-d`` exceeds
      ``L_lo``, so the top few codes saturate;
    - ``bits_lo == 1``: the sign bit, ``+1`` for ``c >= 0``, ``-1`` otherwise;
    - ``bits_lo == bits_hi``: unchanged.

    Always derive from the top codes: rounding twice (8 -> 4 -> 2) can differ from
    rounding once (8 -> 2). Returns int8.
    """
    check_bits(bits_hi)
    check_bits(bits_lo)
    if FLOAT_BITS in (bits_hi, bits_lo) or bits_lo > bits_hi:
        raise ValueError(f"nested codes need integer bits_lo <= bits_hi, got {bits_lo} and {bits_hi}")
    c = codes_hi.to(torch.int32)
    if bits_lo == bits_hi:
        return c.to(torch.int8)
    if bits_lo == 1:
        return torch.where(c >= 0, 1, -1).to(torch.int8)
    d = bits_hi - bits_lo
    magnitude = (c.abs() + (1 << (d - 1))) >> d
    lo = quant_levels(bits_lo)
    return (torch.sign(c) * magnitude).clamp_(-lo, lo).to(torch.int8)


def nested_scale(
    scale_hi: torch.Tensor, bits_hi: int, bits_lo: int, codes_hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale of the nested ``bits_lo`` codes, from the ``bits_hi`` scale (differentiable in ``scale_hi``).

    - ``bits_lo >= 2``: ``scale_hi * 2^(bits_hi - bits_lo)``. A shifted code stands for
      ``2^d`` top codes, so this keeps unsaturated weights unbiased. Because
      ``2^d * L_lo = L_hi + 1 - 2^d``, the low-precision clip range ``L_lo * scale_lo`` is
      ``(L_hi + 1 - 2^d) / L_hi`` of the top one (e.g. 112/127 for 8 -> 4 bits, 64/127 for
      8 -> 2 bits), which is where the level counts enter. (``scale_hi * L_hi / L_lo``
      would keep the clip range but inflate every weight by ``L_hi / (2^d L_lo)``, 2x for
      ternary.)
    - ``bits_lo == 1``: ``scale_hi * mean |codes_hi|`` over each channel (per-channel
      scale) or the whole tensor, the same mean-|w| rule as direct 1-bit quantization;
      needs ``codes_hi``.
    """
    check_bits(bits_lo)
    if bits_lo == bits_hi:
        return scale_hi
    if bits_lo == 1:
        if codes_hi is None:
            raise ValueError("the 1-bit nested scale needs the top codes (mean |code|)")
        per_channel = scale_hi.shape[0] != 1
        dims = _reduce_dims(codes_hi, per_channel)
        mean_code = codes_hi.to(torch.float32).abs().mean(dim=dims, keepdim=True)
        # An all-zero channel would get scale 0 (and divide by zero in the backward).
        return (scale_hi * mean_code).clamp_min(_MIN_SCALE)
    return scale_hi * float(2 ** (bits_hi - bits_lo))


# --------------------------------------------------------------------------------------
# Quantized tensor (what a packed file stores)
# --------------------------------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """Integer codes plus scale of one weight: ``weight ~= codes * scale``.

    codes: int8 [out, ...]; scale: float32 ``[out, 1, ...]`` or ``[1, 1, ...]``;
    bits in 1..8; mode 'per_tensor' or 'per_channel'.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    mode: str = "per_tensor"

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, per_channel: bool = False,
                    method: str = "max") -> "QuantizedTensor":
        """Post-training quantization of ``weight`` with ``compute_scale``."""
        scale = compute_scale(weight, bits, per_channel, method)
        return cls(quantize_codes(weight.detach().float(), scale, bits), scale, bits,
                   "per_channel" if per_channel else "per_tensor")


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------

class _ScaledQuantizerBase(nn.Module):
    """Shared parts: scale Parameters keyed by bit-width, lazy initialisation, slicing."""

    def __init__(self, scale_bits: Iterable[int], weight_shape: Sequence[int], per_channel: bool,
                 learn_scale: bool, method: str):
        super().__init__()
        self.weight_shape = tuple(int(n) for n in weight_shape)
        if len(self.weight_shape) < 1:
            raise ValueError("weight_shape must have at least one dimension")
        self.per_channel = per_channel
        self.learn_scale = learn_scale
        self.method = method
        self.scale_bits = tuple(sorted(set(scale_bits)))
        shape = scale_shape(self.weight_shape, per_channel)
        # Created now (not lazily) so an optimizer built before the first forward sees them;
        # only their values are filled lazily.
        self.scales = nn.ParameterDict({
            f"b{b}": nn.Parameter(torch.ones(shape), requires_grad=learn_scale) for b in self.scale_bits
        })
        # Saved in the state_dict so a resumed run does not re-initialise trained scales.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def mode(self) -> str:
        return "per_channel" if self.per_channel else "per_tensor"

    def scale(self, bits: int) -> nn.Parameter:
        """The full (unsliced) scale Parameter of ``bits``: ``[out, 1, ...]`` or ``[1, ...]``."""
        # ParameterDict's own lookup goes through two Module.__getattr__ calls; this is one
        # (it runs for every quantized weight of every step).
        return self.scales._parameters[f"b{bits}"]

    @torch.no_grad()
    def init_scales(self, weight: torch.Tensor) -> None:
        """Set every scale from the full latent weight ([*weight_shape]) with ``compute_scale``."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"init_scales needs the full latent weight of shape {self.weight_shape}, "
                             f"got {tuple(weight.shape)}")
        for b in self.scale_bits:
            self.scale(b).copy_(compute_scale(weight, b, self.per_channel, self.method))
        self.initialized.fill_(True)
        self._host_initialized = True

    def _initialized_on_host(self) -> bool:
        """``bool(self.initialized)``, read from the device once and then remembered.

        Reading a CUDA buffer synchronises the host with the device; doing it for every
        weight of every step stalled the supernet step. The flag only goes from False to
        True (``init_scales``) except through ``load_state_dict``, which forgets it.
        """
        if not getattr(self, "_host_initialized", False):
            self._host_initialized = bool(self.initialized)
        return self._host_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_initialized = False  # re-read the loaded buffer on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _check_slice(self, weight: torch.Tensor) -> None:
        """The weight must be a leading slice of the latent weight (first rows / columns)."""
        if weight.shape == self.weight_shape and getattr(self, "_host_initialized", False):
            return  # the common case, checked with one tuple comparison
        ok = weight.dim() == len(self.weight_shape) and all(
            n <= m for n, m in zip(weight.shape, self.weight_shape))
        if not ok:
            raise ValueError(f"weight of shape {tuple(weight.shape)} is not a slice of the latent "
                             f"weight {self.weight_shape}")
        if not self._initialized_on_host():
            if tuple(weight.shape) != self.weight_shape:
                raise ValueError("scales are not initialised: call init_scales(latent_weight) or run "
                                 "the full (unsliced) weight through the quantizer first")
            self.init_scales(weight)

    def _sliced_scale(self, bits: int, weight: torch.Tensor) -> torch.Tensor:
        """Scale for a sliced weight: the first ``weight.shape[0]`` channels when per-channel."""
        s = self.scale(bits)
        # No slice (and no slice_backward) when all channels are used.
        return s[: weight.shape[0]] if self.per_channel and weight.shape[0] != s.shape[0] else s

    def extra_repr(self) -> str:
        return (f"bits={self.scale_bits}, weight_shape={self.weight_shape}, mode={self.mode}, "
                f"learn_scale={self.learn_scale}, method={self.method!r}")


class MultiPrecisionQuantizer(_ScaledQuantizerBase):
    """One latent float weight, one independent scale per bit-width (the default mode).

    Args:
        bits: the bit-widths this weight may take (32 = float, needs no scale).
        weight_shape: shape of the full latent weight, [out, in, ...].
        per_channel: one scale per output channel (``[out, 1, ...]``) instead of per tensor.
        learn_scale: train the scales with LSQ's gradient.
        method: scale initialisation, 'max' or 'mse' (``compute_scale``).

    ``forward(weight, bits)`` takes the latent weight or a leading slice of it
    (``latent[:k, :m]`` as the supernet slices it) and returns its fake-quantized value
    of the same shape; per-channel scales are sliced to the first ``k`` channels.
    """

    def __init__(self, bits: Iterable[int], weight_shape: Sequence[int], per_channel: bool = False,
                 learn_scale: bool = True, method: str = "max"):
        bits = tuple(check_bits(b) for b in bits)
        super().__init__([b for b in bits if b != FLOAT_BITS], weight_shape, per_channel, learn_scale, method)
        self.bits = tuple(sorted(set(bits)))

    def _check_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not among this quantizer's bit-widths {self.bits}")

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """weight: [k <= out, m <= in, ...] -> fake-quantized weight of the same shape."""
        self._check_bits(bits)
        if bits == FLOAT_BITS:
            return weight
        self._check_slice(weight)
        return fake_quant(weight, self._sliced_scale(bits, weight), bits, self.learn_scale)

    def forward_reference(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """``forward`` through ``fake_quant_reference`` (the original operations), for tests."""
        self._check_bits(bits)
        if bits == FLOAT_BITS:
            return weight
        self._check_slice(weight)
        return fake_quant_reference(weight, self._sliced_scale(bits, weight), bits, self.learn_scale)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, bits: int) -> QuantizedTensor:
        """Codes and scale of (a slice of) the latent weight for export to a packed file."""
        self._check_bits(bits)
        if bits == FLOAT_BITS:
            raise ValueError("bit-width 32 stays floating point; there is nothing to quantize")
        self._check_slice(weight)
        scale = self._sliced_scale(bits, weight).detach().float().clone()
        return QuantizedTensor(quantize_codes(weight.detach().float(), scale, bits), scale, bits, self.mode)


class NestedQuantizer(_ScaledQuantizerBase):
    """Matryoshka-style: train the top bit-width; lower ones are its codes shifted right.

    Only the top (largest integer) bit-width has a scale Parameter. For a lower
    bit-width ``b`` the codes are ``nested_codes(top_codes, top, b)`` and the scale
    ``nested_scale(top_scale, top, b)``; gradients reach the weight (STE, inside the
    low-precision range) and the top scale (LSQ, through ``nested_scale``). Extracting
    a lower precision from a top-precision packed model is therefore a bit shift.
    Arguments as ``MultiPrecisionQuantizer``.
    """

    def __init__(self, bits: Iterable[int], weight_shape: Sequence[int], per_channel: bool = False,
                 learn_scale: bool = True, method: str = "max"):
        bits = tuple(sorted(set(check_bits(b) for b in bits)))
        int_bits = [b for b in bits if b != FLOAT_BITS]
        if not int_bits:
            raise ValueError("a nested quantizer needs at least one integer bit-width")
        self.top_bits = max(int_bits)
        self.top_bits_levels = quant_levels(self.top_bits)
        super().__init__([self.top_bits], weight_shape, per_channel, learn_scale, method)
        self.bits = bits

    def _codes_and_scale(self, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (no grad) and scale (differentiable in the top scale) of ``weight`` at ``bits``."""
        if bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not among this quantizer's bit-widths {self.bits}")
        top_scale = self._sliced_scale(self.top_bits, weight)
        with torch.no_grad():
            top_codes = quantize_codes(weight, top_scale, self.top_bits)
            codes = nested_codes(top_codes, self.top_bits, bits)
        return codes, nested_scale(top_scale, self.top_bits, bits, top_codes)

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """weight: [k <= out, m <= in, ...] -> fake-quantized weight of the same shape."""
        if bits == FLOAT_BITS and bits in self.bits:
            return weight
        if bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not among this quantizer's bit-widths {self.bits}")
        self._check_slice(weight)
        top_scale = self._sliced_scale(self.top_bits, weight)
        levels = quant_levels(bits)
        if bits == self.top_bits:
            return fake_quant(weight, top_scale, bits, self.learn_scale)  # the top codes: round(w / s)
        # Same values as _codes_and_scale, with the codes kept in float.
        with torch.no_grad():
            top_codes = torch.round(weight / top_scale).clamp_(-self.top_bits_levels, self.top_bits_levels)
            codes = _float_nested_codes(top_codes, self.top_bits, bits)
        scale = nested_scale(top_scale, self.top_bits, bits, top_codes)
        g = lsq_grad_scale(weight.numel(), scale.numel(), levels)
        return _FakeQuantFast.apply(weight, scale, codes, levels, bits, g, self.learn_scale)

    def forward_reference(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """The original forward (int8 codes, ``_FakeQuant``); tests compare ``forward`` to it."""
        if bits == FLOAT_BITS and bits in self.bits:
            return weight
        self._check_slice(weight)
        codes, scale = self._codes_and_scale(weight, bits)
        levels = quant_levels(bits)
        g = lsq_grad_scale(weight.numel(), scale.numel(), levels)
        return _FakeQuant.apply(weight, scale, codes, levels, g, self.learn_scale)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, bits: int) -> QuantizedTensor:
        """Codes and scale at ``bits`` (derived by shifting the top codes)."""
        if bits == FLOAT_BITS:
            raise ValueError("bit-width 32 stays floating point; there is nothing to quantize")
        self._check_slice(weight)
        codes, scale = self._codes_and_scale(weight.detach().float(), bits)
        return QuantizedTensor(codes, scale.detach().float().clone(), bits, self.mode)
