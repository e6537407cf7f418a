"""Transitional, hand-written (issue 15): chapter 08's code now lives in `quant_formats`, `quant_model`,
`evaluation` (notebooks/08_quantization.ipynb), `fast_cpu` and `c_step` (notebooks/08b_fast_cpu.ipynb).
Chapter 09 (`cuda.py`, its tests and benchmarks/cuda_decode.py) and chapter 07d (`cli.py`) still import
these names from here; delete this file once they import from the new modules."""
from .c_step import _C_TYPES, CCompilerError, build_c_step, repack_rows8
from .decoding import check_decode_input
from .fast_cpu import FastQuantModel
from .quant_formats import SCHEMES, _check_scheme, block_bytes, dequantize, quantize
from .quant_model import QuantEmbedding, QuantLinear, quantize_model


def validate_decode_input(decoder, tokens, start_pos: int, batch_hint: str = "") -> None:
    "Transitional name for chapter 09: the one input check of every decoder is decoding.check_decode_input."
    check_decode_input(decoder, tokens, start_pos, one_sequence=True, batch_hint=batch_hint)
