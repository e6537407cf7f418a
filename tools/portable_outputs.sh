#!/usr/bin/env bash
# Every stored notebook output must reproduce on any CPU. This re-runs the notebooks under nbval with the
# CPU-specific code switched off: chapter 08's C decode step on its portable loops (no AVX2 / AVX-512 VNNI),
# PyTorch's ATen kernels (the int4 and bf16 paths included) on their non-vectorized defaults, MKL and oneDNN
# limited to AVX2. A cell whose output changes here would change on some student's laptop.
# Slow (the unvectorized int4 kernel): about 15 minutes on 2 cores. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
COURSE_LIB_C_DEFINES=COURSE_PORTABLE ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 \
  ONEDNN_MAX_CPU_ISA=AVX2 exec .venv/bin/python -m pytest notebooks --nbval-cell-timeout=1500 "$@"
