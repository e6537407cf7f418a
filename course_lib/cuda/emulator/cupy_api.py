"""The part of CuPy's API that chapter 09 uses, on top of the CPU emulator of CUDA C.

    from course_lib.cuda.emulator import cupy_api as xp      # in place of `import cupy as xp`

    x = xp.asarray(np.arange(4, dtype=np.float32))       # "host to device" copy
    k = xp.RawModule(code=SOURCE).get_function("axpy")
    s = xp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        k((1,), (32,), (x, np.float32(2), np.int32(4)))  # recorded, not run
        g = s.end_capture()
    g.launch(s)                                          # now it runs
    y = xp.asnumpy(x)

"Device memory" is ordinary host memory: `ndarray` is a subclass of numpy.ndarray, so the
emulator's kernels take these arrays directly. Every launch runs synchronously on the CPU
when it is issued, so stream order holds trivially and synchronize() has nothing to wait
for. What this module adds is CuPy's *rules*, so that code that would fail on a GPU fails
here too:

* Arrays that this module allocates are C-contiguous and 256-byte aligned, as CuPy's
  allocator gives; `set()` wants the same dtype and shape; mixing host numpy arrays with
  these arrays in arithmetic raises TypeError, as in CuPy.
* Graph capture works as in CUDA: while a stream captures, kernel launches issued on it are
  recorded, not run; `Graph.launch()` replays them in order (arrays by reference, scalars by
  the value they had at capture). Operations CUDA forbids during a capture (synchronizing,
  copies between host and device) raise `cudaErrorStreamCaptureUnsupported`, and, as in
  CUDA, the failed capture is invalidated: `end_capture()` then raises too.

Where this module differs from CuPy on a GPU:

* Memory is host memory and kernels run when launched (synchronously). Events are complete
  once recorded; timings (Event elapsed time) are not emulated.
* __dlpack_device__ is (kDLCPU, 0): torch.from_dlpack gives a CPU tensor sharing the memory.
* numpy functions (np.concatenate, np.testing..., a[i] reads) accept these arrays and run on
  the host; CuPy refuses implicit conversion to numpy. Indexing one element returns a numpy
  scalar (CuPy: a 0-d array). Only ufuncs, astype, copy and this module's functions return
  aligned arrays; other numpy functions and methods that allocate (flatten, ...) need not.
* During a capture the emulator records only RawKernel launches and memsets of zeros/ones/
  full. Array arithmetic, astype, copy, fill, `a[...] = v`, RandomState are refused (CuPy
  would record them as kernels). Launching on another stream of the thread is refused too
  (CUDA runs it eagerly outside the graph). Synchronizing and copies between host and device
  are refused, as CUDA refuses them for pageable host memory (CuPy's asarray() stages through
  pinned memory, which a GPU might capture as a copy from a reused buffer). Any refusal
  invalidates the captures of the thread.
* A captured launch's arguments (except their count) are checked at Graph.launch(), not at
  capture. Joins of a forked capture count when another stream of the capture waits on an
  event the forked stream recorded after its last work.
* Kernel arguments may be plain numpy arrays (CuPy raises TypeError for them). num_regs is
  None unless the module was given resources= (CuPy always reports an int).
* RandomState draws numpy's values (CuPy's cuRAND gives others for the same seed).
* One device (0), with the nominal properties of runtime.getDeviceProperties(0).
"""

from __future__ import annotations

import inspect
import types

import numpy as np
from numpy import (bool_, float16, float32, float64, int8, int16, int32, int64,  # noqa: F401
                   uint8, uint16, uint32, uint64)                               # CuPy's names for them

from . import EmulatedKernel, EmulatedModule
from .cupy_runtime import (CUDADriverError, CUDARuntimeError, Device, Event, Graph, Stream,  # noqa: F401
                           _refuse_if_capturing, _submit, driver, get_current_stream, runtime)

__all__ = ["ndarray", "empty", "zeros", "ones", "full", "asarray", "ascontiguousarray",
           "asnumpy", "RawModule", "RawKernel", "random", "cuda"]

_ALIGN = 256                    # CuPy's memory pool hands out 256-byte aligned blocks
_POISON = 0xFF                  # empty() memory reads as NaN / -1, like the emulator's shared memory


# ---- arrays ------------------------------------------------------------------------------------

class MemoryPointer:
    """What `ndarray.data` is in CuPy: an address (`.ptr`) on a device."""
    def __init__(self, ptr: int):
        self.ptr, self.device_id = ptr, 0

    def __int__(self):
        return self.ptr

    def __repr__(self):
        return f"<MemoryPointer 0x{self.ptr:x} (device 0, emulated)>"


class ndarray(np.ndarray):
    """A CuPy-like array: numpy memory, CuPy's rules (see the module docstring).

    Views and slices stay `ndarray`s (and, as in CuPy, need not be aligned)."""

    def __new__(cls, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None or order != "C":
            raise NotImplementedError("the emulated ndarray(...) only allocates new C-ordered memory")
        return _alloc(shape, dtype)

    # CuPy's `.data` is a MemoryPointer; numpy's is a memoryview (numpy's C code does not read
    # this Python attribute, so overriding it is safe; the buffer protocol still works).
    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self.ctypes.data)

    @property
    def device(self):
        return cuda.Device(0)

    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """A numpy copy (device to host: waits for the stream, so not while capturing)."""
        _refuse_if_capturing("ndarray.get() copies to the host and waits for the stream")
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is None:
            return host
        if not isinstance(out, np.ndarray) or out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError("out must be a numpy.ndarray of the same shape and dtype")
        out[...] = host
        return out

    def set(self, arr, stream=None):
        """Copy a host numpy array of the same dtype and shape into this array (as CuPy)."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        _refuse_if_capturing("ndarray.set() copies from pageable host memory")
        np.copyto(self.view(np.ndarray), arr)

    def copy(self, order="C") -> "ndarray":
        _refuse_if_capturing("ndarray.copy()", emulator_only=True)
        return _from_host(self.view(np.ndarray))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True) -> "ndarray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _refuse_if_capturing("ndarray.astype()", emulator_only=True)
        return _from_host(self.view(np.ndarray).astype(dtype, casting=casting or "unsafe"))

    def fill(self, value):
        _refuse_if_capturing("ndarray.fill()", emulator_only=True)
        self.view(np.ndarray).fill(value)

    def __setitem__(self, key, value):
        # CUDA forbids the host-to-device copy of a numpy value during a capture; CuPy would
        # capture a scalar fill or a device copy as a kernel, which the emulator cannot.
        host = not isinstance(value, (ndarray, np.generic, int, float, complex))
        _refuse_if_capturing("a[...] = v" + (" copies from pageable host memory" if host else ""),
                             emulator_only=not host)
        super().__setitem__(key, value)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        """Arithmetic on these arrays: allowed outside captures, host arrays not mixed in (as
        CuPy), and new results are aligned arrays of this module, like CuPy's."""
        _refuse_if_capturing(f"numpy ufunc {ufunc.__name__}", emulator_only=True)
        for x in inputs + (out or ()):
            if isinstance(x, np.ndarray) and not isinstance(x, ndarray) and x.ndim:
                raise TypeError(f"Unsupported type {type(x)} (a host numpy array mixed with device "
                                f"arrays: copy it with asarray() first)")
        plain = [x.view(np.ndarray) if isinstance(x, ndarray) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in out)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        # CuPy returns arrays (0-d for a reduction to one value), never numpy scalars
        wrap = lambda r: _from_host(r) if isinstance(r, (np.ndarray, np.generic)) else r  # noqa: E731
        return tuple(map(wrap, result)) if isinstance(result, tuple) else wrap(result)

    def __dlpack__(self, *, stream=None, **kwargs):
        """DLPack export (zero copy). A consumer on a GPU passes its stream; CuPy would make
        that stream wait for this one, which is trivial here, so numpy exports without it."""
        return self.view(np.ndarray).__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.view(np.ndarray).__dlpack_device__()      # (kDLCPU, 0): torch makes a CPU tensor


def _shape(shape) -> tuple:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)


def _alloc(shape, dtype) -> ndarray:
    """Uninitialised, C-contiguous, 256-byte aligned: the emulator's 'cudaMalloc'."""
    dtype, shape = np.dtype(dtype), _shape(shape)
    if dtype.kind not in "biufc":
        raise ValueError(f"Unsupported dtype {dtype}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = -raw.ctypes.data % _ALIGN
    raw[off:off + nbytes] = _POISON          # reading memory nobody wrote gives NaN / -1
    return raw[off:off + nbytes].view(dtype).reshape(shape).view(ndarray)


def _from_host(a: np.ndarray, dtype=None) -> ndarray:
    """An aligned copy of host data (no capture check: callers do it)."""
    a = np.asarray(a, dtype=dtype)
    out = _alloc(a.shape, a.dtype)
    np.copyto(out.view(np.ndarray), a)
    return out


def _filled(shape, dtype, value) -> ndarray:
    # Allocation during a capture is allowed (stream-ordered, CUDA 11.2+). The memset is
    # captured like a kernel: the memory is filled at each replay, not now.
    out = _alloc(shape, dtype)
    plain = out.view(np.ndarray)
    _submit(None, "the memset of zeros()/ones()/full()", lambda: plain.fill(value))
    return out


def empty(shape, dtype=float, order="C") -> ndarray:
    """Uninitialised memory (here: 0xFF bytes, so reading it before writing shows as NaN / -1)."""
    return ndarray(shape, dtype, order=order)


def zeros(shape, dtype=float, order="C") -> ndarray:
    return _filled(shape, dtype, 0)


def ones(shape, dtype=float, order="C") -> ndarray:
    return _filled(shape, dtype, 1)


def full(shape, fill_value, dtype=None, order="C") -> ndarray:
    return _filled(shape, np.result_type(fill_value) if dtype is None else dtype, fill_value)


def asarray(a, dtype=None, order=None) -> ndarray:
    """`a` itself when it is already an array of this module with that dtype, else a copy on
    the device (a host-to-device copy for host data, not allowed while capturing)."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    _refuse_if_capturing("asarray() copies from host memory")
    return _from_host(a, dtype)


def ascontiguousarray(a, dtype=None) -> ndarray:
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return a.astype(dtype or a.dtype) if isinstance(a, ndarray) else asarray(a, dtype)


def asnumpy(a, stream=None, order="C", out=None) -> np.ndarray:
    """A numpy copy of device array `a` (device to host: not while capturing); host data is
    returned as numpy.asarray(a), as CuPy does."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    if out is None:
        return np.asarray(a, order=order)
    out[...] = a
    return out


# ---- random ------------------------------------------------------------------------------------

class RandomState:
    """cupy.random.RandomState with numpy's generator underneath: same seed, same values on
    every machine here (CuPy's cuRAND values differ; nothing may depend on exact values)."""
    def __init__(self, seed=None):
        self._rs = np.random.RandomState(seed)

    def seed(self, seed=None):
        self._rs.seed(seed)

    def _make(self, what, host, dtype=None):
        _refuse_if_capturing(f"random.RandomState.{what}()", emulator_only=True)
        return _from_host(np.asarray(host), dtype)

    def randint(self, low, high=None, size=None, dtype="l"):
        return self._make("randint", self._rs.randint(low, high, size=size, dtype=dtype))

    def random_sample(self, size=None, dtype=float):
        return self._make("random_sample", self._rs.random_sample(size), dtype)

    def rand(self, *size, dtype=float):
        return self.random_sample(size or None, dtype)

    def standard_normal(self, size=None, dtype=float):
        return self._make("standard_normal", self._rs.standard_normal(size), dtype)

    def randn(self, *size, dtype=float):
        return self.standard_normal(size or None, dtype)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return self._make("normal", self._rs.normal(loc, scale, size), dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        return self._make("uniform", self._rs.uniform(low, high, size), dtype)


random = types.SimpleNamespace(RandomState=RandomState)


cuda = types.SimpleNamespace(
    Stream=Stream, Event=Event, Device=Device, Graph=Graph, graph=types.SimpleNamespace(Graph=Graph),
    get_current_stream=get_current_stream, runtime=runtime, driver=driver, MemoryPointer=MemoryPointer)


# ---- kernels -----------------------------------------------------------------------------------

# Attributes CuPy's RawKernel / Function report; forwarded when the emulator provides them.
_KERNEL_ATTRS = ("num_regs", "shared_size_bytes", "const_size_bytes", "local_size_bytes",
                 "max_threads_per_block", "ptx_version", "binary_version",
                 "preferred_shared_memory_carveout")
_MAX_SHARED_OPTIN = 232448          # sharedMemPerBlockOptin of the emulated sm_90


class RawKernel:
    """cupy.RawKernel(code, name, options) (also what RawModule.get_function returns).

    Call as k(grid, block, args, shared_mem=0, stream=None): the launch runs now on the CPU,
    or is recorded when the stream (default: the current one) is capturing. Arguments are
    checked by the emulator: arrays (this module's or numpy's) and numpy scalars."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, jitify=False, **emulator_extras):
        if translate_cucomplex or enable_cooperative_groups or jitify:
            raise NotImplementedError("the emulator supports neither cuComplex translation, "
                                      "cooperative groups nor jitify")
        self._init(EmulatedKernel(code, name, options, **emulator_extras), code, name, options)

    @classmethod
    def _of(cls, emulated, code, name, options):
        self = cls.__new__(cls)
        self._init(emulated, code, name, options)
        return self

    def _init(self, emulated, code, name, options):
        self.emulated, self.code, self.name, self.options = emulated, code, name, tuple(options or ())

    def __getattr__(self, attr):
        if attr in _KERNEL_ATTRS:
            if hasattr(self.emulated, attr):
                return getattr(self.emulated, attr)
            if attr == "max_threads_per_block":     # what CuPy reports without register limits
                return min(1024, self.emulated.launch_bounds or 1024)
            raise AttributeError(f"{attr}: the CPU emulator does not report this kernel attribute")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.emulated.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int):
        static = getattr(self.emulated, "shared_size_bytes", 0)
        if not 0 <= int(value) <= _MAX_SHARED_OPTIN - static:     # as cuFuncSetAttribute on sm_90
            raise CUDADriverError("CUDA_ERROR_INVALID_VALUE: invalid argument")
        self.emulated.max_dynamic_shared_size_bytes = int(value)

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if enable_cooperative_groups:
            raise NotImplementedError("cooperative launches are not emulated")
        if isinstance(args, (tuple, list)):
            # the emulator sees plain numpy views of this module's arrays (same memory); a tuple
            # copy keeps the captured scalars as they are now
            args = tuple(a.view(np.ndarray) if isinstance(a, ndarray) else a for a in args)
            if len(args) != len(self.emulated.params):       # an error at capture, as in CuPy
                raise TypeError(f"{self.name} takes {len(self.emulated.params)} arguments, got {len(args)}")
        grid, block = (tuple(g) if isinstance(g, list) else g for g in (grid, block))
        kernel = self.emulated
        _submit(stream, f"the launch of {self.name}",
                lambda: kernel(grid, block, args, shared_mem=shared_mem))

    def __repr__(self):
        return f"<RawKernel {self.name} (emulated)>"


_MODULE_TAKES_RESOURCES = "resources" in inspect.signature(EmulatedModule).parameters


class RawModule:
    """cupy.RawModule(code=..., options=..., name_expressions=...) compiled by the emulator."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False, resources=None):
        if code is None or path is not None:
            raise NotImplementedError("the emulator compiles source code (code=...), not cubin/ptx files")
        if translate_cucomplex or enable_cooperative_groups or jitify:
            raise NotImplementedError("the emulator supports neither cuComplex translation, "
                                      "cooperative groups nor jitify")
        extra = {}
        if resources is not None:
            if not _MODULE_TAKES_RESOURCES:
                raise TypeError("this version of the emulator's EmulatedModule takes no resources=")
            extra["resources"] = resources
        self.code, self.options = code, tuple(options or ())
        self.module = EmulatedModule(code, self.options, name_expressions, **extra)

    def compile(self, log_stream=None):
        self.module.compile()

    def get_function(self, name: str, **emulator_extras) -> RawKernel:
        """The kernel `name`; emulator_extras (check_bounds, schedule, ...) are not CuPy's."""
        return RawKernel._of(self.module.get_function(name, **emulator_extras), self.code, name, self.options)


