"""Tests of course_lib/cuda/emulator/cupy_api.py: the subset of CuPy's API that chapter 09 uses,
run by the CPU emulator. Each test checks a CuPy behaviour (or a CUDA restriction) that the
course's CuPy code path relies on."""

import inspect

import numpy as np
import pytest

from course_lib.cuda.emulator import EmulatedModule, emulator_available

_ok, _why = emulator_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from course_lib.cuda.emulator import cupy_api as xp  # noqa: E402

SOURCE = r"""
extern "C" __global__ void axpy(float a, const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

// Device-side state: each launch appends its step number and advances the counter.
extern "C" __global__ void bump(int* counter, float* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        int c = counter[0];
        out[c] = (float)c;
        counter[0] = c + 1;
    }
}

extern "C" __global__ void __launch_bounds__(256) scale(float* y, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] *= s;
}
"""

UNSUPPORTED = "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"
INVALIDATED = "cudaErrorStreamCaptureInvalidated"


@pytest.fixture(scope="module")
def mod():
    return xp.RawModule(code=SOURCE)


@pytest.fixture
def stream():
    s = xp.cuda.Stream(non_blocking=True)
    yield s
    if s.is_capturing():                  # leave no capture behind for the next test
        try:
            s.end_capture()
        except RuntimeError:
            pass


def axpy(mod, a, x, y, **kw):
    n = y.size
    mod.get_function("axpy")(((n + 63) // 64,), (64,), (np.float32(a), x, y, np.int32(n)), **kw)


def device_arange(n):
    return xp.asarray(np.arange(n, dtype=np.float32))


# ---- arrays ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 33), ()])
def test_created_arrays_are_aligned_contiguous_device_arrays(dtype, shape):
    host = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    made = [xp.zeros(shape, dtype), xp.empty(shape, dtype), xp.ones(shape, dtype),
            xp.full(shape, 3, dtype), xp.asarray(host), xp.ascontiguousarray(host),
            xp.asarray(host).copy(), xp.asarray(host).astype(np.float32), xp.asarray(host) + 1]
    for a in made:
        assert isinstance(a, xp.ndarray) and isinstance(a, np.ndarray)
        assert a.shape == shape and a.flags.c_contiguous
        assert a.data.ptr == a.ctypes.data and a.data.ptr % 256 == 0
    assert [a.dtype for a in made[:6]] == [np.dtype(dtype)] * 6
    assert (made[0].get() == 0).all() and (made[2].get() == 1).all() and (made[3].get() == 3).all()
    np.testing.assert_array_equal(made[4].get(), host)


def test_dtypes_follow_cupy():
    assert xp.zeros(3).dtype == np.float64 and xp.empty((2, 2)).dtype == np.float64   # CuPy's default: float
    assert xp.full(2, 7).dtype == np.result_type(7)
    assert xp.asarray([1.5, 2.5]).dtype == np.float64
    assert xp.asarray(np.arange(3), dtype=np.float16).dtype == np.float16
    assert np.isnan(xp.empty(4, np.float32).get()).all()             # unwritten memory reads as NaN
    with pytest.raises(ValueError, match="Unsupported dtype object"):
        xp.zeros(3, dtype=object)


def test_views_stay_device_arrays_and_share_memory():
    a = device_arange(10)
    v = a[3:7]
    assert isinstance(v, xp.ndarray) and v.data.ptr == a.data.ptr + 12    # views need not be aligned
    assert isinstance(a.reshape(2, 5), xp.ndarray) and isinstance(a.view(np.int32), xp.ndarray)
    v[...] = -1
    np.testing.assert_array_equal(a.get()[3:7], -1)
    assert xp.asarray(a) is a and xp.ascontiguousarray(a) is a              # no copy, as in CuPy
    s = xp.ascontiguousarray(a[::2])
    assert s.flags.c_contiguous and s.data.ptr % 256 == 0 and s.shape == (5,)


def test_set_get_asnumpy_round_trip():
    host = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    a = xp.empty((4, 6), np.float32)
    a.set(host)
    out = a.get()
    assert type(out) is np.ndarray and type(xp.asnumpy(a)) is np.ndarray
    np.testing.assert_array_equal(out, host)
    np.testing.assert_array_equal(xp.asnumpy(a), host)
    assert xp.asnumpy(host) is host                                      # host data: as CuPy, no copy
    out[0, 0] = 99                                                        # a copy, not a view
    assert a.get()[0, 0] == host[0, 0]
    with pytest.raises(TypeError, match="float64 array cannot be set to float32 array"):
        a.set(host.astype(np.float64))
    with pytest.raises(ValueError, match="Shape mismatch"):
        a.set(host[:2])
    with pytest.raises(TypeError, match="Only numpy.ndarray"):
        a.set(host.tolist())


def test_host_arrays_do_not_mix_with_device_arrays():
    a = device_arange(4)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(4, np.float32)
    assert isinstance(a * np.float32(2), xp.ndarray) and (a * 2).get().tolist() == [0, 2, 4, 6]


def test_dlpack_gives_a_torch_tensor_sharing_memory():
    torch = pytest.importorskip("torch")
    a = device_arange(8)
    t = torch.from_dlpack(a)
    assert t.device.type == "cpu" and t.data_ptr() == a.data.ptr and t.dtype == torch.float32
    t[0] = 42
    a[1] = 43
    assert a.get()[0] == 42 and t[1].item() == 43
    # a producer must accept the stream= keyword that DLPack consumers on a GPU pass
    view = a[2:6]
    t2 = torch.utils.dlpack.from_dlpack(view.__dlpack__(stream=1))
    assert t2.data_ptr() == view.data.ptr and t2.tolist() == [2, 3, 4, 5]
    assert a.__dlpack_device__() == (1, 0)                                  # kDLCPU


# ---- kernels, streams -------------------------------------------------------------------------

def test_kernel_runs_on_a_stream(mod, stream):
    x, y = device_arange(100), xp.ones(100, np.float32)
    with stream:
        assert xp.cuda.get_current_stream() == stream
        axpy(mod, 2.0, x, y)
    axpy(mod, 1.0, x, y, stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(y.get(), 3 * np.arange(100) + 1)


def test_streams_and_the_current_stream():
    s1, s2 = xp.cuda.Stream(), xp.cuda.Stream(non_blocking=True)
    assert s1.ptr and s2.ptr and s1.ptr != s2.ptr and xp.cuda.Stream.null.ptr == 0
    assert xp.cuda.get_current_stream() == xp.cuda.Stream.null
    with s1:
        with s2:
            assert xp.cuda.get_current_stream() == s2
        assert xp.cuda.get_current_stream() == s1
    assert xp.cuda.get_current_stream() == xp.cuda.Stream.null
    e = s1.record()
    s2.wait_event(e)
    e.synchronize()
    assert e.done and s1.done


def test_raw_kernel_and_module_functions_agree(mod):
    k = xp.RawKernel(SOURCE, "scale")
    y = device_arange(300)
    k((2,), (256,), (y, np.float32(0.5), np.int32(300)))
    mod.get_function("scale")((2,), (256,), (y, np.float32(4), np.int32(300)))
    np.testing.assert_allclose(y.get(), 2 * np.arange(300))
    with pytest.raises(ValueError, match="launch_bounds"):
        k((1,), (512,), (y, np.float32(1), np.int32(300)))


def test_raw_kernel_attributes(mod):
    k, f = xp.RawKernel(SOURCE, "scale"), mod.get_function("axpy")
    assert k.max_threads_per_block == 256 and f.max_threads_per_block <= 1024
    assert f.max_dynamic_shared_size_bytes == 48 * 1024
    f.max_dynamic_shared_size_bytes = 100_000            # opting in, as on sm_90
    assert f.emulated.max_dynamic_shared_size_bytes == 100_000
    with pytest.raises(xp.cuda.driver.CUDADriverError, match="CUDA_ERROR_INVALID_VALUE"):
        f.max_dynamic_shared_size_bytes = 300_000
    for attr in ("num_regs", "shared_size_bytes", "local_size_bytes", "const_size_bytes"):
        if hasattr(f.emulated, attr):                     # forwarded when the emulator reports it
            assert getattr(f, attr) == getattr(f.emulated, attr)
        else:
            with pytest.raises(AttributeError, match="does not report"):
                getattr(f, attr)


def test_device_properties_are_the_emulated_sm90():
    assert xp.cuda.runtime.getDeviceCount() == 1
    p = xp.cuda.runtime.getDeviceProperties(0)
    assert p["name"] == b"CPU emulator of CUDA C" and (p["major"], p["minor"]) == (9, 0)
    assert p["multiProcessorCount"] == 132 and p["l2CacheSize"] == 50 * 2**20
    assert p["regsPerBlock"] == 65536 and p["sharedMemPerBlock"] == 49152
    assert p["sharedMemPerBlockOptin"] == 232448 and p["maxThreadsPerBlock"] == 1024
    assert p["totalGlobalMem"] > 0
    assert xp.cuda.Device(0).compute_capability == "90"
    xp.cuda.Device(0).synchronize()
    with pytest.raises(RuntimeError, match="cudaErrorInvalidDevice"):
        xp.cuda.runtime.getDeviceProperties(1)


# ---- graph capture ------------------------------------------------------------------------------

def test_capture_records_and_replay_runs(mod, stream):
    x, y = device_arange(50), xp.zeros(50, np.float32)
    with stream:
        stream.begin_capture()
        assert stream.is_capturing()
        axpy(mod, 1.0, x, y)
        axpy(mod, 2.0, x, y)
        graph = stream.end_capture()
    assert not stream.is_capturing() and len(graph) == 2
    assert (y.get() == 0).all()                                  # recorded, not run
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_allclose(y.get(), 3 * np.arange(50))
    with xp.cuda.Stream() as other:                              # any stream can replay it
        graph.launch()
    other.synchronize()
    np.testing.assert_allclose(y.get(), 6 * np.arange(50))


def test_capture_keeps_scalars_by_value_and_arrays_by_reference(mod, stream):
    x, y = device_arange(10), xp.zeros(10, np.float32)
    a = np.float32(2)
    args = [a, x, y, np.int32(10)]
    k = mod.get_function("axpy")
    with stream:
        stream.begin_capture()
        k((1,), (64,), args)
        graph = stream.end_capture()
    a = np.float32(100)                                          # noqa: F841 (rebinding changes nothing)
    args[0] = np.float32(100)                                    # neither does changing the list
    x.set(np.ones(10, np.float32))                               # but the array's contents do
    graph.launch(stream)
    np.testing.assert_array_equal(y.get(), 2 * np.ones(10))


def test_replays_see_device_side_state(mod, stream):
    counter, out = xp.zeros(1, np.int32), xp.full(8, -1, np.float32)
    with stream:
        stream.begin_capture()
        mod.get_function("bump")((1,), (32,), (counter, out))
        graph = stream.end_capture()
    for _ in range(3):
        graph.launch(stream)
    assert counter.get()[0] == 3
    np.testing.assert_array_equal(out.get(), [0, 1, 2, -1, -1, -1, -1, -1])
    counter[...] = 6                                             # the host resets it between replays
    graph.launch(stream)
    assert counter.get()[0] == 7 and out.get()[6] == 6


def test_allocation_during_capture_is_allowed_and_its_memset_is_captured(mod, stream):
    x = device_arange(16)
    with stream:
        stream.begin_capture()
        y = xp.zeros(16, np.float32)                             # stream-ordered allocation
        scratch = xp.empty(4, np.int32)
        axpy(mod, 1.0, x, y)
        assert xp.asarray(y) is y                                # no copy: nothing to refuse
        graph = stream.end_capture()
    assert y.data.ptr % 256 == 0 and scratch.data.ptr % 256 == 0
    assert np.isnan(y.get()).all()                               # the memset runs at replay
    graph.launch(stream)
    graph.launch(stream)                                         # zeroed again, then one axpy
    np.testing.assert_array_equal(y.get(), np.arange(16))


def test_graph_launched_inside_a_capture_is_recorded(mod, stream):
    x, y = device_arange(8), xp.zeros(8, np.float32)
    with stream:
        stream.begin_capture()
        axpy(mod, 1.0, x, y)
        inner = stream.end_capture()
        stream.begin_capture()
        inner.launch()
        inner.launch()
        outer = stream.end_capture()
    assert (y.get() == 0).all() and len(outer) == 2
    outer.launch(stream)
    np.testing.assert_array_equal(y.get(), 2 * np.arange(8))


FORBIDDEN = {
    "synchronize": lambda s, a: s.synchronize(),
    "device synchronize": lambda s, a: xp.cuda.Device(0).synchronize(),
    "get": lambda s, a: a.get(),
    "asnumpy": lambda s, a: xp.asnumpy(a),
    "set": lambda s, a: a.set(np.zeros(a.shape, a.dtype)),
    "asarray from host": lambda s, a: xp.asarray(np.zeros(3, np.float32)),
    "setitem scalar": lambda s, a: a.__setitem__(Ellipsis, 1),
    "setitem host array": lambda s, a: a.__setitem__(slice(0, 2), np.ones(2, np.float32)),
    "fill": lambda s, a: a.fill(0),
    "arithmetic": lambda s, a: a + 1,
    "astype": lambda s, a: a.astype(np.float16),
    "copy": lambda s, a: a.copy(),
    "random": lambda s, a: xp.random.RandomState(0).standard_normal(4),
}


@pytest.mark.parametrize("op", FORBIDDEN)
def test_forbidden_during_capture_raises_and_invalidates(mod, stream, op):
    a = device_arange(4)
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match=UNSUPPORTED):
            FORBIDDEN[op](stream, a)
        assert stream.is_capturing()
        with pytest.raises(RuntimeError, match=INVALIDATED):     # as CUDA: the capture failed
            stream.end_capture()
    assert not stream.is_capturing()
    FORBIDDEN[op](stream, a)                                     # fine outside a capture


def test_capture_state_errors(mod, stream):
    with pytest.raises(RuntimeError, match="cudaErrorIllegalState"):
        stream.end_capture()
    with pytest.raises(RuntimeError, match="cannot capture on the default"):
        xp.cuda.Stream.null.begin_capture()
    stream.begin_capture()
    with pytest.raises(RuntimeError, match="cudaErrorIllegalState"):
        stream.begin_capture()
    with pytest.raises(TypeError, match="takes 4 arguments"):    # argument count: at capture
        mod.get_function("axpy")((1,), (32,), (np.float32(1),), stream=stream)
    assert len(stream.end_capture()) == 0


def test_launch_on_another_stream_during_capture_raises(mod, stream):
    x, y = device_arange(4), xp.zeros(4, np.float32)
    other = xp.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    with pytest.raises(RuntimeError, match="would run now and not be recorded"):
        axpy(mod, 1.0, x, y, stream=other)
    with pytest.raises(RuntimeError, match="would run now and not be recorded"):
        axpy(mod, 1.0, x, y)                                     # the current stream is the null one
    with pytest.raises(RuntimeError, match=INVALIDATED):
        stream.end_capture()
    assert (y.get() == 0).all()
    blocking = xp.cuda.Stream()                                  # the legacy stream waits for it
    blocking.begin_capture()
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureImplicit"):
        axpy(mod, 1.0, x, y, stream=xp.cuda.Stream.null)
    with pytest.raises(RuntimeError, match=INVALIDATED):
        blocking.end_capture()


def test_events_fork_and_join_a_capture(mod, stream):
    x, y, z = device_arange(8), xp.zeros(8, np.float32), xp.zeros(8, np.float32)
    side = xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        axpy(mod, 1.0, x, y)
        fork = stream.record()
        with pytest.raises(RuntimeError, match="cudaErrorCapturedEvent"):
            fork.synchronize()
        side.wait_event(fork)                                    # side joins the capture
        axpy(mod, 2.0, x, z, stream=side)
        assert side.is_capturing()
        stream.wait_event(side.record())                         # ... and is joined back
        graph = stream.end_capture()
    assert not side.is_capturing() and len(graph) == 2 and (z.get() == 0).all()
    graph.launch(stream)
    np.testing.assert_array_equal(z.get(), 2 * np.arange(8))

    stream.begin_capture()
    side.wait_event(stream.record())
    axpy(mod, 1.0, x, y, stream=side)                            # never joined back
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnjoined"):
        stream.end_capture()
    assert not side.is_capturing()


# ---- random, end to end --------------------------------------------------------------------------

def test_random_state_is_reproducible_and_makes_device_arrays():
    r1, r2, r3 = (xp.random.RandomState(s) for s in (7, 7, 8))
    a, b, c = (r.randint(0, 256, size=(16, 32)) for r in (r1, r2, r3))
    assert isinstance(a, xp.ndarray) and a.data.ptr % 256 == 0 and a.dtype == np.int64
    assert (a.get() == b.get()).all() and not (a.get() == c.get()).all()
    assert 0 <= a.get().min() and a.get().max() < 256
    n = r1.standard_normal((1000,))
    assert n.dtype == np.float64 and abs(float(n.get().mean())) < 0.2
    assert r1.standard_normal((3,), dtype=np.float32).dtype == np.float32
    u = r1.random_sample((100,))
    assert (0 <= u.get()).all() and (u.get() < 1).all()
    g = r1.normal(5.0, 0.01, size=(10,))
    assert np.allclose(g.get(), 5.0, atol=0.1)
    q = r2.randint(0, 256, size=(4, 8)).astype(np.uint8).view(np.int8)   # as random_quant_matrix
    assert isinstance(q, xp.ndarray) and q.dtype == np.int8 and q.data.ptr % 256 == 0


def test_end_to_end_kernel_output_through_dlpack(mod, stream):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    hx, hy = rng.standard_normal(200).astype(np.float32), rng.standard_normal(200).astype(np.float32)
    with stream:
        x, y = xp.asarray(hx), xp.asarray(hy)
        stream.begin_capture()
        axpy(mod, 0.5, x, y)
        graph = stream.end_capture()
    graph.launch(stream)
    graph.launch(stream)
    stream.synchronize()
    t = torch.from_dlpack(y).clone()
    np.testing.assert_allclose(t.numpy(), hy + 2 * np.float32(0.5) * hx, rtol=1e-6, atol=1e-6)


def test_resources_reach_the_emulator():
    if "resources" not in inspect.signature(EmulatedModule).parameters:
        with pytest.raises(TypeError, match="takes no resources"):
            xp.RawModule(code=SOURCE, resources={})
        return
    res = {"scale": {"registers": 64, "shared": 1024, "local": 0}}
    f = xp.RawModule(code=SOURCE, resources=res).get_function("scale")
    assert f.num_regs == 64 and f.shared_size_bytes == 1024 and f.local_size_bytes == 0
    f.max_dynamic_shared_size_bytes = 232448 - 1024          # the opt-in limit less the static part
    with pytest.raises(xp.cuda.driver.CUDADriverError):
        f.max_dynamic_shared_size_bytes = 232448 - 1024 + 1
