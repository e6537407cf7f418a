"""Run CUDA C kernels (CuPy ``RawKernel`` / ``RawModule`` source) on the CPU, for a machine without a GPU.

The same kernel source that chapter 09 launches with CuPy is compiled with g++ against
``prelude.h`` (which turns the CUDA dialect into C++ and supplies threadIdx, __syncthreads,
warp shuffles, __half, __dp4a, atomics ...) and launched through ctypes. Every CUDA thread
of a block is a cooperative fiber; blocks run one after another. See README.md.

    from course_lib.cuda.emulator import EmulatedKernel, emulator_available
    k = EmulatedKernel(source, "rmsnorm")
    k((n_blocks,), (256,), (x, w, out, np.int32(n), np.float32(eps)), shared_mem=1024)

Unlike CuPy, every argument is checked against the kernel's C++ signature (the compiler
reports each parameter's type): Python ints/floats, wrong numpy scalar types, arrays of the
wrong dtype, non-contiguous or misaligned arrays and wrong argument counts are errors.
Inside the kernel, misaligned vector loads fault as on a GPU; with check_bounds, so do
accesses outside the arrays; block_order and run_in_every_block_order expose blocks that
depend on each other; a `resources` dict (registers, static shared memory per kernel, from
NVRTC) makes launches that a GPU would refuse fail here too.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from .arguments import (_DEFAULT_ARCH, _MAX_SHARED_DEFAULT, _REG_UNIT, _REGS_PER_BLOCK, _SHARED_OPTIN, _Param,
                        _check_array, _check_resources, _max_threads_for_registers, _registers_for_block,
                        _scalar_bytes)
from .guards import _GuardPage, _Guards
from .source import _arch, _find_kernels, _mask, _rewrite_shared, _user_flags

__all__ = ["EmulatedModule", "EmulatedKernel", "emulator_available", "run_in_every_block_order"]

_VERSION = "2"          # bump to invalidate cached builds when the generated code changes
_PRELUDE = Path(__file__).with_name("prelude.h")
_FLAGS = ["-O1", "-std=c++17", "-fPIC", "-fno-strict-aliasing"]
# Misaligned loads/stores call prelude.h's own handlers. Compiling and linking are separate
# steps so that g++ does not link libubsan (which may not even be installed).
_ALIGNMENT_FLAGS = ["-fsanitize=alignment", "-D__EMU_CHECK_ALIGNMENT=1"]
_DEFAULT_STACK = 256 * 1024
_ORDERS = {"forward": 0, "reverse": 1, "random": 2}     # thread schedules and block orders
_SEEDS = itertools.count(1)         # block_order="random": a new shuffle per launch, the same
                                    # sequence of shuffles in every process
_LAUNCH_LOCK = threading.Lock()     # a compiled module keeps its launch state in globals
_LIBS: dict[str, ctypes.CDLL] = {}

# CUDA headers that the prelude replaces; their #include lines are blanked (keeping line
# numbers, so g++'s messages point at the right lines of the kernel source).
_CUDA_HEADERS = re.compile(
    r'^[ \t]*#[ \t]*include[ \t]*[<"](?:cuda_fp16\.h|cuda_fp16\.hpp|cuda_runtime\.h|cuda\.h|'
    r'cuda_runtime_api\.h|device_launch_parameters\.h|vector_types\.h|device_functions\.h|'
    r'sm_61_intrinsics\.h)[>"][^\n]*$', re.M)


@lru_cache(maxsize=None)
def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def emulator_available() -> tuple[bool, str]:
    """(True, how) if kernels can be emulated here, else (False, why not)."""
    if not sys.platform.startswith("linux"):
        return False, f"the CUDA emulator needs Linux (ucontext fibers); this is {sys.platform}"
    cxx = _compiler()
    if cxx is None:
        return False, "no C++ compiler found (tried $CXX, g++, c++, clang++)"
    return True, f"CUDA emulator using {cxx}"


def _cache_dir() -> Path:
    d = os.environ.get("COURSE_CUDA_EMULATOR_CACHE")
    return Path(d) if d else Path(tempfile.gettempdir()) / "course_cuda_emulator"


# ---- settings from the environment (so a test suite can switch checks on for everything) ----

def _alignment_check_default() -> bool:
    return os.environ.get("COURSE_CUDA_EMULATOR_ALIGNMENT", "1") != "0"


def _check_bounds_default() -> bool:
    return os.environ.get("COURSE_CUDA_EMULATOR_CHECK_BOUNDS", "") == "1"


def _order(value, env: str, what: str) -> str:
    """A thread schedule or block order: `value`, else $env, else "forward"."""
    source = ""
    if value is None:
        value, source = os.environ.get(env) or "forward", f" (from ${env})"
    if value not in _ORDERS:
        raise ValueError(f"{what} must be one of {sorted(_ORDERS)}, got {value!r}{source}")
    return value


def _tag() -> str:
    """Part of temporary file names, unique per process and thread."""
    return f"{os.getpid()}.{threading.get_ident()}"


def _run_compiler(cmd, cu, *outputs) -> str:
    """Runs a g++ command; returns its messages (with the generated file called kernel.cu), or
    raises with them after removing `outputs`."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = (r.stdout + r.stderr).replace(str(cu), "kernel.cu")
    if r.returncode != 0:
        for f in outputs:
            f.unlink(missing_ok=True)
        raise RuntimeError(f"emulated CUDA compile failed ({Path(cmd[0]).name} exit {r.returncode}; "
                           f"generated source in {cu}):\n{log}")
    return log


def _runtime_object(cxx: str) -> Path:
    """prelude.h's runtime part (scheduler, fault and alignment handlers) compiled once per
    compiler and prelude, without the sanitizer, and cached; every module links it. Kernels
    then compile only the light part of the prelude, which keeps each compile short."""
    key = hashlib.sha256("\0".join([_VERSION, cxx, " ".join(_FLAGS), _PRELUDE.read_text()]).encode()).hexdigest()[:32]
    d = _cache_dir() / "runtime"
    obj = d / f"{key}.o"
    if not obj.exists():
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{key}.{_tag()}.o"
        # -include, not the header as the main file (which would warn about #pragma once)
        _run_compiler([cxx, *_FLAGS, "-D__EMU_RUNTIME", "-c", "-include", str(_PRELUDE), "-x", "c++",
                       os.devnull, "-o", str(tmp)], _PRELUDE, tmp)
        os.replace(tmp, obj)            # atomic
    return obj


# ---- modules and kernels -------------------------------------------------------------------------

class EmulatedModule:
    """Like ``cupy.RawModule(code=source, options=..., name_expressions=...)``, on the CPU.

    Compiles on first use (``get_function`` or ``compile()``); builds are cached on disk,
    keyed by a hash of source, prelude, options and the alignment check setting
    ($COURSE_CUDA_EMULATOR_ALIGNMENT, read here).

    resources: optional {kernel name: {"registers": int, "shared": int, "local": int}}, the
    registers per thread, static __shared__ bytes and local memory bytes NVRTC's cubin
    reports. With an entry, launches a GPU would refuse (too many registers for the block,
    static + dynamic shared memory over the limit) raise here too; the kernel's num_regs,
    shared_size_bytes, local_size_bytes and max_threads_per_block report them."""

    def __init__(self, source: str, options=(), name_expressions=None, resources=None):
        ok, why = emulator_available()
        if not ok:
            raise RuntimeError(why)
        self.source = source
        self.options = tuple(options or ())
        self.name_expressions = list(name_expressions or ())
        self.resources = _check_resources(resources)
        self.arch = _arch(self.options)
        self.check_alignment = _alignment_check_default()
        masked = _mask(source)
        self._kernels = _find_kernels(masked)
        self._exprs = [k.name for k in self._kernels.values() if not k.template]
        self._exprs += [e for e in self.name_expressions if e not in self._exprs]
        text = _CUDA_HEADERS.sub(lambda m: "// (include handled by the CUDA emulator)", source)
        text = _rewrite_shared(text, _mask(text))
        gen = ["", "// ---- launchers generated by course_lib/cuda/emulator ----"]
        for i, e in enumerate(self._exprs):
            gen.append(f'extern "C" int __emu_launch_{i}(const void* c, void** a) '
                       f'{{ return ::__emu::launch(&{e}, (const ::__emu::LaunchConfig*)c, a); }}')
            gen.append(f'extern "C" const char* __emu_sig_{i}() {{ return ::__emu::signature(&{e}); }}')
        self._text = text + "\n" + "\n".join(gen) + "\n"
        self._lib = None
        self.compile_log = ""

    def compile(self):
        if self._lib is not None:
            return self
        cxx = _compiler()
        flags = _FLAGS + (_ALIGNMENT_FLAGS if self.check_alignment else []) + _user_flags(self.options)
        key = hashlib.sha256("\0".join([_VERSION, cxx, " ".join(flags), _PRELUDE.read_text(),
                                        self._text]).encode()).hexdigest()[:32]
        d = _cache_dir() / key
        so = d / "kernel.so"
        if str(so) not in _LIBS:
            if not so.exists():
                runtime = _runtime_object(cxx)
                d.mkdir(parents=True, exist_ok=True)
                # per-process names: parallel test workers never read or load a half-written file
                cu, obj, tmp = (d / f"kernel.{_tag()}.{ext}" for ext in ("cu", "o", "so"))
                cu.write_text(self._text)
                log = _run_compiler([cxx, *flags, "-c", "-include", str(_PRELUDE), "-x", "c++", str(cu),
                                     "-o", str(obj)], cu, obj)
                log += _run_compiler([cxx, "-shared", str(obj), str(runtime), "-o", str(tmp)], cu, obj, tmp)
                self.compile_log = log
                obj.unlink()
                os.replace(tmp, so)     # atomic
                os.replace(cu, d / "kernel.cu")
            _LIBS[str(so)] = ctypes.CDLL(str(so))
        self._lib = _LIBS[str(so)]
        self.so_path = so
        return self

    def get_function(self, name: str, **kwargs) -> "EmulatedKernel":
        """The kernel `name` (an extern "C" kernel's name or one of name_expressions).
        kwargs (check_bounds, schedule, block_order, stack_size) are emulator extras, see
        EmulatedKernel."""
        if name not in self._exprs:
            raise RuntimeError(f"no kernel named {name!r} in the source (found: "
                               f"{', '.join(self._exprs) or 'none'}); templates need name_expressions")
        self.compile()
        return EmulatedKernel._from_module(self, name, **kwargs)


class EmulatedKernel:
    """Like ``cupy.RawKernel(code, name)``: call as ``k(grid, block, args, shared_mem=0)``.

    Emulator extras:
      check_bounds: run on guarded copies of the arrays (see _Guards) and raise if the kernel
        reads past the end of an array, or writes outside one. Exactly aliased arguments
        (same start and size) share one copy; partly overlapping ones are an error. Copies
        cost time. Default from $COURSE_CUDA_EMULATOR_CHECK_BOUNDS ("1": on), else off.
      schedule: "forward" (threads run in index order between barriers), "reverse" or
        "random" (reshuffled every round): running a test under several schedules exposes
        missing __syncthreads(). Default from $COURSE_CUDA_EMULATOR_SCHEDULE, else forward.
      block_order: "forward" (blocks in index order, x fastest), "reverse" or "random" (a
        new shuffle each launch, the same sequence in every process): a kernel whose blocks
        depend on each other gives order-dependent results (see run_in_every_block_order).
        Default from $COURSE_CUDA_EMULATOR_BLOCK_ORDER, else forward.
      stack_size: bytes of stack per CUDA thread (default 256 KiB, virtual until touched).
      resources: as for EmulatedModule, used when this constructor builds the module.

    Like CuPy's RawKernel: num_regs (None when unknown), shared_size_bytes and
    local_size_bytes (0 when unknown), max_threads_per_block, max_dynamic_shared_size_bytes
    (settable; 48 KiB minus the static shared memory by default).
    """

    def __init__(self, source: str, name: str, options=(), name_expressions=None, *,
                 check_bounds: bool | None = None, schedule: str | None = None,
                 block_order: str | None = None, stack_size: int = _DEFAULT_STACK, resources=None):
        mod = EmulatedModule(source, options, name_expressions, resources)
        if name not in mod._exprs and "<" in name:       # a template instance, e.g. "k<float>"
            mod = EmulatedModule(source, options, list(name_expressions or ()) + [name], resources)
        if name not in mod._exprs:
            mod.get_function(name)                       # raises "no kernel named ..."
        self._setup(mod, name, check_bounds, schedule, block_order, stack_size)

    @classmethod
    def _from_module(cls, mod, name, check_bounds=None, schedule=None, block_order=None,
                     stack_size=_DEFAULT_STACK):
        self = cls.__new__(cls)
        self._setup(mod, name, check_bounds, schedule, block_order, stack_size)
        return self

    def _setup(self, mod, name, check_bounds, schedule, block_order, stack_size):
        self.module, self.name = mod, name
        self.check_bounds = _check_bounds_default() if check_bounds is None else bool(check_bounds)
        self.schedule = _order(schedule, "COURSE_CUDA_EMULATOR_SCHEDULE", "schedule")
        self.block_order = _order(block_order, "COURSE_CUDA_EMULATOR_BLOCK_ORDER", "block_order")
        self.stack_size = int(stack_size)
        info = mod._kernels.get(name)
        self.launch_bounds = info.launch_bounds if info else None
        self._written = info.params if info else []
        self._params = None
        res = mod.resources.get(name, {})
        self.num_regs = res.get("registers")
        self.shared_size_bytes = res.get("shared", 0)
        self.local_size_bytes = res.get("local", 0)
        self.max_dynamic_shared_size_bytes = max(_MAX_SHARED_DEFAULT - self.shared_size_bytes, 0)
        self.max_threads_per_block = min(1024, self.launch_bounds or 1024,
                                         _max_threads_for_registers(self.num_regs))

    def _with(self, **changes) -> "EmulatedKernel":
        """A copy with other emulator settings (block_order, schedule, check_bounds)."""
        k = copy.copy(self)
        if "block_order" in changes:
            k.block_order = _order(changes.pop("block_order"), "COURSE_CUDA_EMULATOR_BLOCK_ORDER", "block_order")
        if "schedule" in changes:
            k.schedule = _order(changes.pop("schedule"), "COURSE_CUDA_EMULATOR_SCHEDULE", "schedule")
        if "check_bounds" in changes:
            k.check_bounds = bool(changes.pop("check_bounds"))
        if changes:
            raise TypeError(f"unknown settings: {sorted(changes)}")
        return k

    def _bind(self):
        if self._params is not None:
            return
        lib = self.module.compile()._lib
        i = self.module._exprs.index(self.name)
        sig = getattr(lib, f"__emu_sig_{i}")
        sig.restype = ctypes.c_char_p
        descs = [d.split() for d in sig().decode().split(";") if d]
        written = self._written if len(self._written) == len(descs) else \
            [("", f"#{k}") for k in range(len(descs))]
        self._params = [_Param(k, w[1], w[0], d[0] == "p", d[1], int(d[2]), int(d[3]), d[4] == "1")
                        for k, (d, w) in enumerate(zip(descs, written))]
        fn = getattr(lib, f"__emu_launch_{i}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p]
        self._fn = fn

    @property
    def params(self):
        """[(C type, name)] of the kernel's parameters, as parsed from the source."""
        self._bind()
        return [(p.ctype, p.name) for p in self._params]

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self._bind()
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
        launch = f"{self.name}<<<{grid3}, {block3}>>>"
        shared_mem = int(shared_mem)
        self._check_shape(grid3, block3)
        self._check_registers(block3, launch)
        self._check_shared(shared_mem)
        arrays, slots = self._pack_args(args)
        guards = _Guards(self, arrays) if self.check_bounds else None
        try:
            for i, a in arrays.items():
                ptr = guards.pointer(i) if guards else a.ctypes.data
                slots[16 * i:16 * i + 8] = np.frombuffer(np.uint64(ptr).tobytes(), np.uint8)
            error = self._run(grid3, block3, shared_mem, slots, len(args), guards)
        finally:
            problems = guards.finish() if guards else []
        errors = ([error] if error else []) + problems
        if errors:
            raise RuntimeError(f"{launch}: " + "; ".join(errors))

    # ---- the steps of a launch ----

    def _check_shape(self, grid3, block3):
        nthreads = block3[0] * block3[1] * block3[2]
        if nthreads > 1024 or block3[0] > 1024 or block3[1] > 1024 or block3[2] > 64:
            raise ValueError(f"{self.name}: block {block3} exceeds CUDA's limits (1024 threads, z <= 64)")
        if grid3[0] > 2**31 - 1 or grid3[1] > 65535 or grid3[2] > 65535:
            raise ValueError(f"{self.name}: grid {grid3} exceeds CUDA's limits")
        if self.launch_bounds is not None and nthreads > self.launch_bounds:
            raise ValueError(f"{self.name}: block of {nthreads} threads exceeds "
                             f"__launch_bounds__({self.launch_bounds})")

    def _check_registers(self, block3, launch):
        """A GPU refuses a launch whose block needs more registers than the register file has."""
        if not self.num_regs:
            return
        nthreads = block3[0] * block3[1] * block3[2]
        need = _registers_for_block(self.num_regs, nthreads)
        if need > _REGS_PER_BLOCK:
            raise RuntimeError(
                f"{launch}: too many resources requested for launch: {self.num_regs} registers per thread "
                f"x {nthreads} threads = {need} registers (allocated per warp in units of {_REG_UNIT}) > "
                f"{_REGS_PER_BLOCK} per block; at most {self.max_threads_per_block} threads per block")

    def _check_shared(self, shared_mem):
        static, limit = self.shared_size_bytes, self.max_dynamic_shared_size_bytes
        optin = _SHARED_OPTIN.get(self.module.arch, _SHARED_OPTIN[_DEFAULT_ARCH])
        if static + limit > optin:
            raise ValueError(f"{self.name}: max_dynamic_shared_size_bytes={limit} plus {static} bytes of "
                             f"static __shared__ exceeds the {optin} bytes of shared memory a block can have "
                             f"on {self.module.arch} (cudaFuncSetAttribute fails)")
        if shared_mem < 0 or shared_mem > limit:
            total = f" (static {static} + dynamic {shared_mem} = {static + shared_mem} bytes)" if static else ""
            raise ValueError(f"{self.name}: shared_mem={shared_mem} bytes exceeds "
                             f"max_dynamic_shared_size_bytes={limit}{total}; a block gets "
                             f"{_MAX_SHARED_DEFAULT} bytes of shared memory in all unless you raise "
                             f"k.max_dynamic_shared_size_bytes (up to {optin - static} on {self.module.arch})")

    def _pack_args(self, args):
        """The arrays by argument index, checked, and 16 bytes per argument holding the by-value
        ones (the pointers are filled in later, when it is known where the arrays will be)."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self._params):
            raise TypeError(f"{self.name} takes {len(self._params)} arguments "
                            f"({', '.join(p.name for p in self._params)}), got {len(args)}")
        arrays = {}
        slots = np.zeros(max(len(args), 1) * 16, np.uint8)
        for p, a in zip(self._params, args):
            if p.pointer:
                arrays[p.index] = _check_array(p, self.name, a)
            else:
                b = _scalar_bytes(p, self.name, a)
                if len(b) > 16:
                    raise TypeError(f"{self.name}: {p.label()}: by-value arguments over 16 bytes "
                                    f"are not supported")
                slots[16 * p.index:16 * p.index + len(b)] = np.frombuffer(b, np.uint8)
        return arrays, slots

    def _run(self, grid3, block3, shared_mem, slots, nargs, guards) -> str:
        """Runs the launch; returns "" or the error message."""
        argv = (ctypes.c_void_p * max(nargs, 1))(*[slots.ctypes.data + 16 * i for i in range(max(nargs, 1))])
        err = ctypes.create_string_buffer(4096)
        pages = guards.pages if guards else (_GuardPage * 1)()
        cfg = _LaunchConfig((ctypes.c_uint * 6)(*grid3, *block3), shared_mem, _ORDERS[self.schedule],
                            _ORDERS[self.block_order], next(_SEEDS), self.stack_size,
                            ctypes.cast(pages, ctypes.POINTER(_GuardPage)), guards.pages_used if guards else 0,
                            ctypes.addressof(err), len(err))
        with _LAUNCH_LOCK:
            rc = self._fn(ctypes.byref(cfg), argv)
        return err.value.decode(errors="replace") if rc else ""


class _LaunchConfig(ctypes.Structure):      # prelude.h: struct LaunchConfig
    _fields_ = [("dims", ctypes.c_uint * 6), ("shmem", ctypes.c_ulonglong), ("thread_order", ctypes.c_int),
                ("block_order", ctypes.c_int), ("seed", ctypes.c_ulonglong), ("stack_bytes", ctypes.c_ulonglong),
                ("guards", ctypes.POINTER(_GuardPage)), ("nguards", ctypes.c_int), ("err", ctypes.c_void_p),
                ("errlen", ctypes.c_ulonglong)]


def _dim3(v, what) -> tuple[int, int, int]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in t):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    if min(t) < 1:
        raise ValueError(f"{what} {v!r}: every dimension must be at least 1")
    return t


# ---- block order ----------------------------------------------------------------------------------

def run_in_every_block_order(kernel: EmulatedKernel, grid, block, make_args, read_result, *, shared_mem=0,
                             orders=("forward", "reverse", "random"), rtol=0.0, atol=0.0):
    """Launches `kernel` once per block order, each time on fresh arguments from make_args(),
    and compares read_result(args) (an array, or a tuple/list of arrays) across the orders.
    Returns the result of the first order; raises RuntimeError naming the orders whose
    results differ from it (exactly, or beyond rtol/atol).

    On a GPU the blocks of a launch run in any order and at the same time, so a block must
    not read what another block of the same launch writes. Here blocks run one after another,
    so such a kernel can pass in index order; in other orders its results change."""
    results = {}
    for order in orders:
        args = make_args()
        kernel._with(block_order=order)(grid, block, args, shared_mem=shared_mem)
        results[order] = read_result(args)
    first = orders[0]
    differ = [(o, _difference(results[first], results[o], rtol, atol)) for o in orders[1:]]
    differ = [(o, d) for o, d in differ if d]
    if differ:
        detail = "; ".join(f"{o!r} differs from {first!r}: {d}" for o, d in differ)
        raise RuntimeError(f"{kernel.name}<<<{_dim3(grid, 'grid')}, {_dim3(block, 'block')}>>>: the results "
                           f"depend on the order in which blocks run ({detail}). On a GPU blocks run in any "
                           f"order and at the same time: a block must not depend on what another block of "
                           f"the same launch writes")
    return results[first]


def _difference(a, b, rtol, atol) -> str:
    """"" if a and b agree, else a short description of how they differ."""
    xs = list(a) if isinstance(a, (tuple, list)) else [a]
    ys = list(b) if isinstance(b, (tuple, list)) else [b]
    if len(xs) != len(ys):
        return f"{len(xs)} vs {len(ys)} results"
    for k, (x, y) in enumerate(zip(xs, ys)):
        x, y = np.asarray(x), np.asarray(y)
        which = f"result {k}: " if len(xs) > 1 else ""
        if x.shape != y.shape:
            return f"{which}shape {x.shape} vs {y.shape}"
        close = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        if not close.all():
            first = np.unravel_index(np.flatnonzero(~close)[0], x.shape) if x.ndim else ()
            return (f"{which}{int((~close).sum())} of {x.size} elements, first at index "
                    f"{tuple(int(i) for i in first)}: {x[first]} vs {y[first]}")
    return ""
