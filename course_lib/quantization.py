"""Transitional, hand-written (issue 15): chapter 08's code now lives in `quant_formats`, `quant_model`,
`evaluation` (notebooks/08_quantization.ipynb), `fast_cpu` and `c_step` (notebooks/08b_fast_cpu.ipynb).
Chapters 07d (`cli.py`), 09 and 09b (`cuda/`, `checks/cuda.py`, their tests and benchmarks/cuda_decode.py)
still import these names from here; delete this file once they import from the new modules."""
from .c_step import _C_TYPES, CCompilerError, build_c_step, repack_rows8  # noqa: F401
from .fast_cpu import FastQuantModel  # noqa: F401
from .quant_formats import SCHEMES, _check_scheme, block_bytes, dequantize, quantize  # noqa: F401
from .quant_model import QuantEmbedding, QuantLinear, quantize_model  # noqa: F401
