"""Chapter 09 (CUDA kernels) and 09b (the GPU decoder): the quantized decode step in CUDA C, with CuPy on a GPU
or the CPU emulator of CUDA (`course_lib.cuda.emulator`) without one.

This file is an index, written by hand: every module it imports is generated from the notebooks
(09_cuda_kernels: bandwidth, compiler, backend, matvec, matvec_dp4a; 09b_gpu_decoder: layers, attention,
model, roofline), except the emulator, which is hand-written infrastructure. `import course_lib.cuda as cuda;
cuda.<name>` reaches every public name of those modules.
"""
from .bandwidth import (GPU_PEAK_BANDWIDTH, peak_bandwidth, matrix_bytes, decode_bytes_per_token,
                        tokens_per_second_bound)
from .compiler import (CUPY_ADDED_OPTIONS, SM_LIMITS, BLOCK_SHARED_DEFAULT, RESERVED_SHARED, KERNEL_SOURCES,
                       NVRTCError, cuda_include_dir, compile_options, nvrtc_library, nvrtc_compile,
                       KernelResources, cuobjdump_path, cuobjdump, kernel_resources, registers_per_block,
                       max_threads_per_block, occupancy, nvcc_path, compile_ptx, ptx_entries, decode_source)
from .backend import (gpu_available, emulator_status, Backend, cupy_backend, emulated_resources,
                      emulator_backend, get_backend, backend_status, Launch, empty, to_device, to_host)
from .matvec import (cuda_qmatvec_plain, repack_blocks, unpack_blocks, QuantMatrix, upload_matrix,
                     cuda_qmatvec)
from .matvec_dp4a import (DP4A_SHAPES, DP4A_MAX_THREADS, H100_SMS, cuda_quantize_x, matvec_launch_shape,
                          matvec_unroll, cuda_qmatvec_dp4a)
from .layers import (cuda_rms_norm, cuda_rope_kv_cache, cuda_swiglu, cuda_add, cuda_embedding, cuda_argmax,
                     cuda_advance_pos)
from .attention import cuda_attention, attention_n_splits, cuda_attention_split
from .model import MATVECS, ATTENTIONS, random_state, random_quant_matrix, CudaQuantModel
from .roofline import (DRAM_LATENCY, MATVEC_INTENSITY, FP32_PEAK_FLOPS, load_waves, show_loads,
                       matvec_model_inputs, predicted_bandwidth, product_plan, predict_product,
                       load_benchmarks, plot_roofline, format_benchmark)

_CHECKS = ("check_qmatvec_q4_1", "check_qmatvec_swiglu", "exercise_source")   # in course_lib.checks.cuda


def __getattr__(name):
    # The exercise checkers live in course_lib.checks.cuda, which imports this package: reach them on first use,
    # so that importing either module first works.
    if name in _CHECKS:
        from ..checks import cuda as checks
        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
