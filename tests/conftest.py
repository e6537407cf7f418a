"""Fixtures shared by the CUDA tests (tests/test_cuda.py, tests/test_cuda_dp4a.py)."""
import os

import pytest

# Under pytest-xdist two workers share the 2 cores: OpenMP threads that spin while they wait (the C decode step
# of chapter 08) would take the other worker's core. Set before any library starts its threads; kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import course_lib.cuda as cuda

GPU_OK, GPU_WHY = cuda.gpu_available()
EMU_OK, EMU_WHY = cuda.emulator_status()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"needs an NVIDIA GPU with CuPy: {GPU_WHY}")]


@pytest.fixture(scope="module")
def bounds_checked():
    "Every emulated launch of the module runs with bounds checking: a read or write outside an array fails."
    old = os.environ.get("COURSE_CUDA_EMULATOR_CHECK_BOUNDS")
    os.environ["COURSE_CUDA_EMULATOR_CHECK_BOUNDS"] = "1"
    yield
    if old is None:
        del os.environ["COURSE_CUDA_EMULATOR_CHECK_BOUNDS"]
    else:
        os.environ["COURSE_CUDA_EMULATOR_CHECK_BOUNDS"] = old


@pytest.fixture(scope="module", params=[
    pytest.param("emulator", marks=pytest.mark.skipif(not EMU_OK, reason=f"CPU emulator unavailable: {EMU_WHY}")),
    pytest.param("cupy", marks=needs_gpu)])
def backend(request, bounds_checked):
    "Where the kernels run: the CPU emulator (bounds-checked) everywhere, CuPy where there is a GPU."
    return cuda.get_backend(request.param)

