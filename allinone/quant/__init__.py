"""Weight quantization: quantizers, bit packing, packed model files, size accounting, int8 inference.

See docs/quantization.md.
"""

from .accounting import SizeReport, TensorSize, default_quantizable, float_category, size_report
from .int8 import Int8Linear, convert_linears_to_int8
from .pack import pack_codes, packed_nbytes, unpack_codes
from .packed_file import PackedFileError, PackedModel, describe_packed, load_packed, save_packed
from .quantizer import (
    SUPPORTED_BITS,
    MultiPrecisionQuantizer,
    NestedQuantizer,
    QuantizedTensor,
    check_bits,
    compute_scale,
    dequantize,
    fake_quant,
    fake_quant_reference,
    nested_codes,
    nested_scale,
    quant_levels,
    quantize_codes,
)

__all__ = [
    "SUPPORTED_BITS", "check_bits", "quant_levels", "compute_scale", "quantize_codes", "dequantize",
    "fake_quant", "fake_quant_reference", "nested_codes", "nested_scale", "QuantizedTensor", "MultiPrecisionQuantizer",
    "NestedQuantizer", "pack_codes", "unpack_codes", "packed_nbytes", "save_packed", "load_packed",
    "describe_packed", "PackedModel", "PackedFileError", "SizeReport", "TensorSize", "size_report",
    "default_quantizable", "float_category", "Int8Linear", "convert_linears_to_int8",
]
