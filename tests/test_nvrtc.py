"""The NVRTC gate: every CUDA C source of chapter 09 compiles with NVRTC, the compiler inside cupy.RawModule,
for an A100 (sm_80) and an H100/H200 (sm_90), with the exact options the CuPy backend uses, on a machine without
a GPU. `nvcc` and the g++ emulator both accept things NVRTC rejects (they see <math.h>; NVRTC does not), so
only this test catches a chapter that would fail at its first launch on a real GPU. The machine code NVRTC
makes is then read with cuobjdump: no kernel may spill registers to local memory.
"""
import json
import re
from pathlib import Path

import pytest

import course_lib.cuda as cuda
from course_lib.cuda import (NVRTCError, compile_options, cuda_include_dir, cuobjdump_path, decode_source,
                             exercise_source, kernel_resources, nvrtc_compile, nvrtc_library, occupancy,
                             max_threads_per_block, registers_per_block, KernelResources)

ARCHS = ("sm_80", "sm_90")
NOTEBOOKS = [Path(__file__).resolve().parents[1] / "notebooks" / name
             for name in ("09_cuda_kernels.ipynb", "09b_gpu_decoder.ipynb")]
needs_nvrtc = pytest.mark.skipif(nvrtc_library() is None, reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc)")
needs_cuobjdump = pytest.mark.skipif(cuobjdump_path() is None, reason="cuobjdump is not installed")


def notebook_kernel_sources() -> dict:
    "The CUDA C the notebooks' own cells define for the exercises: stubs, buggy versions, the answer functions."
    out = {}
    for cell in [c for notebook in NOTEBOOKS for c in json.loads(notebook.read_text())["cells"]]:
        text = "".join(cell["source"])
        if cell["cell_type"] != "code" or "#| export" in text:
            continue
        for name, body in re.findall(r'^(\w+) = r"""(.*?)"""', text, flags=re.S | re.M):
            if "__global__" in body:
                out[name] = body
        for name, body in re.findall(r'^def (\w+)\(\).*?return r"""(.*?)"""', text, flags=re.S | re.M):
            out[name] = body                                # the appendices' answers (the lab's solutions)
    return out


@pytest.fixture(scope="module")
def cubins():
    if nvrtc_library() is None:
        pytest.skip("NVRTC is not installed")
    return {arch: nvrtc_compile(decode_source(), arch) for arch in ARCHS}


def test_the_options_are_the_cupy_backends_and_find_cuda_fp16():
    assert compile_options()[0] == "--std=c++17"
    include = cuda_include_dir()
    if include is not None:                      # the dev extra's nvidia-cuda-runtime wheel brings the headers
        assert (include / "cuda_fp16.h").is_file() and f"-I{include}" in compile_options()


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_the_whole_decode_source_compiles(cubins, arch):
    assert cubins[arch][:4] == b"\x7fELF"


@needs_nvrtc
def test_the_gate_fails_on_the_infinity_version():
    # the chapter as it was: -INFINITY from <math.h>, which nvcc and g++ accept and NVRTC does not know
    old = decode_source().replace("NEG_INF", "-INFINITY")
    assert "-INFINITY" in old
    with pytest.raises(NVRTCError, match='identifier "INFINITY" is undefined'):
        nvrtc_compile(old, "sm_90")


@needs_nvrtc
def test_every_exercise_and_checker_source_compiles():
    sources = notebook_kernel_sources()
    assert {"my_q4_1", "buggy_q4_1", "my_swiglu", "my_add_rms_norm", "my_softmax", "qmatvec_q4_1_source",
            "qmatvec_swiglu_source", "add_rms_norm_source", "softmax_temperature_source"} <= set(sources), sorted(sources)
    sources["library q4_1 (the appendix's answer)"] = cuda.KERNEL_SOURCES["qmatvec_q4_1"]
    for name, source in sources.items():
        for arch in ARCHS:
            assert nvrtc_compile(exercise_source(source), arch)[:4] == b"\x7fELF", name


@needs_nvrtc
def test_nvrtc_errors_name_the_line_and_bad_arguments():
    with pytest.raises(NVRTCError, match=r"decode\.cu\(2\): error"):
        nvrtc_compile('extern "C" __global__ void k(float* x) {\n  x[0] = undefined_thing;\n}\n', "sm_90")
    with pytest.raises(ValueError, match="arch must look like 'sm_90'"):
        nvrtc_compile("", "hopper")
    with pytest.raises(TypeError, match="source must be a str"):
        nvrtc_compile(b"bytes", "sm_90")


@needs_nvrtc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_spills_and_every_kernel_is_there(cubins, arch):
    res = kernel_resources(cubins[arch], arch)
    names = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(', decode_source()))
    assert set(res) == names
    spilled = {k: r for k, r in res.items() if r.local or r.stack}
    assert not spilled, f"register spills to local memory: {spilled}"
    assert all(0 < r.registers <= 255 for r in res.values())
    assert res["rms_norm"].shared == 32 * 4 and res["argmax_final"].shared == 32 * 8      # the __shared__ arrays


def test_register_and_occupancy_arithmetic():
    # 79 registers: 79 * 32 = 2528 -> 2560 per warp; 65536 / 2560 = 25.6: 25 warps fit, the 26th does not
    assert registers_per_block(79, 800) == 25 * 2560 <= 65536 < registers_per_block(79, 832)
    assert occupancy(KernelResources(79, 0, 0, 0), 128) == 24          # 6 blocks of 4 warps: 24 of 64 warps
    assert occupancy(KernelResources(32, 0, 0, 0), 128) == 64          # not limited by registers
    assert occupancy(KernelResources(16, 40 * 1024, 0, 0), 256) == 40  # 5 blocks by shared memory (228 KiB)
    assert max_threads_per_block(79) == 800 and max_threads_per_block(64) == 1024 and max_threads_per_block(255) == 256


@needs_nvrtc
@needs_cuobjdump
def test_the_machine_code_gives_the_bandwidth_models_inputs(cubins):
    "Step 2 waits for x, then for 18 bytes of weights; step 3 keeps 4 x 16 weight bytes (+ scales) in flight a pass."
    from course_lib.cuda import cuobjdump, load_waves, matvec_model_inputs, predict_product
    sass = lambda name: cuobjdump(cubins["sm_90"], "-sass", "-fun", name)
    waves, carried = load_waves(sass("qmatvec_q4_0"))
    assert waves[0] == [(16, False)] * 8 and waves[1] == [(16, False), (2, False)] and carried == []
    assert matvec_model_inputs(sass("qmatvec_q4_0")) == (18, 2)
    for name in ("qmatvec_dp4a_q4_0_r2_u2", "qmatvec_dp4a_q4_0_r4_u1", "qmatvec_dp4a_q8_0_r4_u1", "qmatvec_dp4a_q4_1_r2_u2"):
        per_lane, trips = matvec_model_inputs(sass(name))
        assert trips == 1 and per_lane >= 4 * 16 + 4 * 2, name
    step2 = predict_product(2, "q4_0", 4096, 11008, cubin=cubins["sm_90"])
    step3 = predict_product(3, "q4_0", 4096, 11008, cubin=cubins["sm_90"])
    assert step2["registers"] == 79 and step2["warps_per_sm"] == 24 and step3["registers"] <= 64
    assert step3["fraction"] >= 0.7 > step2["fraction"]                     # the target, as predicted
