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
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

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

# GPU limits (sm_80 / sm_90)
_MAX_SHARED_DEFAULT = 48 * 1024     # shared memory per block (static + dynamic) without opting in
_SHARED_OPTIN = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_87": 163 * 1024, "sm_89": 99 * 1024,
                 "sm_90": 227 * 1024}   # ... with max_dynamic_shared_size_bytes raised
_DEFAULT_ARCH = "sm_90"
_REGS_PER_BLOCK = 65536             # 32-bit registers
_REG_UNIT = 256                     # registers are allocated per warp, in units of 256
_MAX_REGS_PER_THREAD = 255

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


# ---- reading the source ----------------------------------------------------------------------

def _mask(src: str) -> str:
    """src with comments and string/char literals blanked (same length, newlines kept), so
    that regexes and brace counting only see code."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, min(j, n))        # keep the quotes: `extern "C"` stays recognisable
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _depths(masked: str) -> list[int]:
    """Brace depth before every position."""
    d, out = 0, []
    for ch in masked:
        out.append(d)
        d += (ch == "{") - (ch == "}")
    return out


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    parts = [" ".join(p.split()) for p in parts]
    return [] if parts in ([""], ["void"]) else parts


_KERNEL = re.compile(
    r"\b__global__\s+((?:__launch_bounds__\s*\([^)]*\)\s*)?)void\s+"
    r"((?:__launch_bounds__\s*\([^)]*\)\s*)?)([A-Za-z_]\w*)\s*\(")


@dataclass
class _KernelInfo:
    name: str
    params: list[tuple[str, str]]          # (C type as written, parameter name)
    launch_bounds: int | None
    template: bool


def _find_kernels(masked: str) -> dict[str, _KernelInfo]:
    found: dict[str, _KernelInfo] = {}
    for m in _KERNEL.finditer(masked):
        name = m.group(3)
        # the parameter list runs to the matching parenthesis
        depth, j = 1, m.end()
        while j < len(masked) and depth:
            depth += (masked[j] == "(") - (masked[j] == ")")
            j += 1
        params = []
        for p in _split_params(masked[m.end():j - 1]):
            pm = re.search(r"([A-Za-z_]\w*)\s*(\[\s*\])?\s*$", p)
            pname = pm.group(1) if pm else p
            params.append((p[:pm.start()].strip() if pm else p, pname))
        lb = re.search(r"__launch_bounds__\s*\(\s*(\d+)", m.group(1) + m.group(2))
        before = masked[:m.start()]
        stmt_start = max(before.rfind(";"), before.rfind("}"), before.rfind("{"))
        template = re.search(r"\btemplate\b", before[stmt_start + 1:]) is not None
        found.setdefault(name, _KernelInfo(name, params, int(lb.group(1)) if lb else None, template))
    return found


def _rewrite_shared(src: str, masked: str) -> str:
    """`extern __shared__ T buf[];` -> a reference to the per-launch dynamic buffer;
    simple function-local `__shared__ T name[...];` -> static storage poisoned with 0xFF at
    the start of every block (catches reads of shared memory nobody wrote)."""
    depth = _depths(masked)
    edits = []          # (start, end, replacement); everything stays on its line
    align = r"(?:__align__|alignas)\s*\(\s*\d+\s*\)"
    ext = re.compile(rf"\bextern\s+__shared__\s+((?:{align}|[^;{{}}()])*?)\s*([A-Za-z_]\w*)\s*\[\s*\]\s*;")
    for m in ext.finditer(masked):
        typ = re.sub(r"__align__\s*\(\s*\d+\s*\)|alignas\s*\(\s*\d+\s*\)", " ", m.group(1)).strip()
        edits.append((m.start(), m.end(),
                      f"{typ}* const& {m.group(2)} = reinterpret_cast<{typ}* const&>(::__emu::dyn_smem);"))
    taken = [(a, b) for a, b, _ in edits]
    loc = re.compile(rf"\b(?:static\s+)?__shared__\s+((?:{align}|[^;{{}}()=,])*?)\s*\b([A-Za-z_]\w*)\s*"
                     r"((?:\[[^\]]*\]\s*)*);")
    for m in loc.finditer(masked):
        if any(a <= m.start() < b for a, b in taken):
            continue
        if depth[m.start()] == 0:          # file scope: plain static storage, no poisoning
            edits.append((m.start(), m.end(), f"static {m.group(1)} {m.group(2)}{m.group(3)};"))
            continue
        v, n = m.group(2), len(edits)
        edits.append((m.start(), m.end(),
                      f"static {m.group(1)} {v}{m.group(3)}; static unsigned long long __emu_ep{n} = 0; "
                      f"::__emu::poison_shared((void*)&{v}, sizeof({v}), __emu_ep{n});"))
    for a, b, r in sorted(edits, reverse=True):
        src = src[:a] + r + src[b:]
    # any other `static __shared__` (e.g. with an initialiser, which CUDA rejects anyway)
    return re.sub(r"\bstatic\s+__shared__\b", "__shared__", src)


def _user_flags(options) -> list[str]:
    """CuPy/NVRTC options that mean something to g++: -D, -U, -I. Others (-arch,
    --use_fast_math, -std=...) are ignored; the emulator always uses C++17."""
    flags, opts = [], list(options or ())
    i = 0
    while i < len(opts):
        o = str(opts[i])
        if o in ("-D", "-U", "-I") and i + 1 < len(opts):
            flags.append(o + str(opts[i + 1]))
            i += 1
        elif o.startswith(("-D", "-U", "-I")):
            flags.append(o)
        elif o.startswith(("--define-macro=", "--include-path=")):
            flags.append(("-D" if o.startswith("--d") else "-I") + o.split("=", 1)[1])
        i += 1
    return flags


def _arch(options) -> str:
    """The sm_XX of an -arch / --gpu-architecture option (it sets the shared memory limit),
    else sm_90."""
    opts = [str(o) for o in options or ()]
    for i, o in enumerate(opts):
        value = None
        if o in ("-arch", "--gpu-architecture") and i + 1 < len(opts):
            value = opts[i + 1]
        elif o.startswith(("-arch=", "--gpu-architecture=")):
            value = o.split("=", 1)[1]
        if value:
            m = re.search(r"(\d+)", value)
            if m:
                return f"sm_{m.group(1)}"
    return _DEFAULT_ARCH


# ---- registers and shared memory ----------------------------------------------------------------

def _check_resources(resources) -> dict[str, dict]:
    """{kernel: {"registers": int | None, "shared": int, "local": int}}, validated."""
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise TypeError(f"resources must be a dict {{kernel name: {{'registers': ..., 'shared': ..., "
                        f"'local': ...}}}}, got {type(resources).__name__}")
    out = {}
    for name, r in resources.items():
        if not isinstance(r, dict):
            raise TypeError(f"resources[{name!r}] must be a dict, got {type(r).__name__}")
        entry = {"registers": r.get("registers"), "shared": r.get("shared") or 0, "local": r.get("local") or 0}
        for key, v in entry.items():
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0):
                raise ValueError(f"resources[{name!r}][{key!r}] must be a non-negative int, got {v!r}")
        if entry["registers"] is not None and entry["registers"] > _MAX_REGS_PER_THREAD:
            raise ValueError(f"resources[{name!r}]: {entry['registers']} registers per thread; a GPU has at "
                             f"most {_MAX_REGS_PER_THREAD}")
        out[name] = {k: (None if v is None else int(v)) for k, v in entry.items()}
    return out


def _registers_per_warp(regs: int) -> int:
    return -(-regs * 32 // _REG_UNIT) * _REG_UNIT


def _registers_for_block(regs: int, threads: int) -> int:
    """Registers a block of `threads` needs: whole warps, each allocated in units of 256."""
    return -(-threads // 32) * _registers_per_warp(regs)


def _max_threads_for_registers(regs) -> int:
    """The largest block (a multiple of 32 threads) whose registers fit the register file."""
    if not regs:
        return 1024
    return min(1024, _REGS_PER_BLOCK // _registers_per_warp(regs) * 32)


# ---- argument checking --------------------------------------------------------------------------

_NP = {("f", 4): (np.float32,), ("f", 8): (np.float64,), ("h", 2): (np.float16,),
       ("i", 1): (np.int8,), ("u", 1): (np.uint8,), ("c", 1): (np.int8, np.uint8),
       ("i", 2): (np.int16,), ("u", 2): (np.uint16,), ("i", 4): (np.int32,),
       ("u", 4): (np.uint32,), ("i", 8): (np.int64,), ("u", 8): (np.uint64,),
       ("b", 1): (np.bool_,)}


@dataclass
class _Param:
    index: int
    name: str
    ctype: str
    pointer: bool
    cls: str        # f h i u c b v s p (see prelude.h, describe_param)
    size: int
    align: int
    const: bool

    def label(self):
        return f"argument {self.index} ('{(self.ctype + ' ' + self.name).strip()}')"


def _names(dtypes) -> str:
    return " or ".join(f"np.{np.dtype(t).name}" for t in dtypes)


def _check_array(p: _Param, kernel: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{kernel}: {p.label()} is a pointer, so it needs a numpy array, "
                        f"got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{kernel}: argument {p.index} ('{p.name}') is not C-contiguous; "
                         f"a kernel sees raw memory, pass np.ascontiguousarray(...)")
    allowed = _NP.get((p.cls, p.size))
    if p.cls == "h":
        allowed = (np.float16, np.uint16)        # raw fp16 bits are fine too
    if allowed is not None and a.dtype.type not in allowed:
        raise TypeError(f"{kernel}: {p.label()} points to {p.ctype.replace('*', '').strip()}, "
                        f"which needs an array of {_names(allowed)}, got {a.dtype}")
    if p.cls == "p":
        raise TypeError(f"{kernel}: {p.label()}: pointer-to-pointer parameters are not supported")
    if a.size and a.ctypes.data % max(p.align, 1):
        raise ValueError(f"{kernel}: argument {p.index} ('{p.name}') starts at an address that is not "
                         f"{p.align}-byte aligned (a GPU fails with 'misaligned address')")
    if not p.const and not a.flags.writeable:
        raise ValueError(f"{kernel}: argument {p.index} ('{p.name}') is read-only, but the "
                         f"parameter is a non-const pointer")
    return a


def _scalar_bytes(p: _Param, kernel: str, a) -> bytes:
    allowed = _NP.get((p.cls, p.size))
    if isinstance(a, np.ndarray):
        raise TypeError(f"{kernel}: {p.label()} is passed by value; pass a numpy scalar such as "
                        f"{_names(allowed or (np.int32,))}(...), not an array")
    if not isinstance(a, np.generic):
        hint = f"{_names(allowed)}({a!r})" if allowed else "a numpy scalar"
        raise TypeError(f"{kernel}: {p.label()} got a Python {type(a).__name__}; CuPy would pass "
                        f"it with the wrong C type. Pass {hint}")
    if allowed is None:         # struct by value: any numpy scalar of the right size
        if a.dtype.itemsize != p.size:
            raise TypeError(f"{kernel}: {p.label()} needs a {p.size}-byte value, got {a.dtype}")
    elif a.dtype.type not in allowed:
        raise TypeError(f"{kernel}: {p.label()} needs {_names(allowed)}, got np.{a.dtype.name}")
    return a.tobytes()


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


class _GuardPage(ctypes.Structure):         # prelude.h: struct GuardPage
    _fields_ = [("lo", ctypes.c_ulonglong), ("hi", ctypes.c_ulonglong), ("start", ctypes.c_ulonglong),
                ("nbytes", ctypes.c_ulonglong), ("elem", ctypes.c_ulonglong), ("label", ctypes.c_char_p)]


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


# ---- check_bounds ----------------------------------------------------------------------------------

_PAGE = mmap.PAGESIZE


@lru_cache(maxsize=None)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class _GuardedCopy:
    """The copy of one array that a check_bounds launch runs on, in a mapping of its own:

        | PROT_NONE page | 0xA5 bytes (>= 4 KiB) | data | 0xA5 slack | PROT_NONE page |

    The slack keeps the data start aligned: to 256 bytes (like cudaMalloc) when the size is a
    multiple of 256, else to the largest power of two dividing the size, but at least 16 (the
    widest vector load), so the slack is empty unless the size is not a multiple of 16. A read
    past the end therefore reaches the PROT_NONE page at once (after at most 15 bytes), and
    faults. Reads of the 0xA5 bytes before the start are not detected; changed 0xA5 bytes
    after the launch are out-of-bounds writes."""
    GUARD = 4096
    FILL = 0xA5

    def __init__(self, nbytes: int):
        align = max(16, min(256, nbytes & -nbytes))
        padded = -(-nbytes // align) * align
        self.nbytes = nbytes
        self.rw = -(-(self.GUARD + padded) // _PAGE) * _PAGE        # guard + data + slack
        self.size = self.rw + 2 * _PAGE
        libc = _libc()
        base = libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"check_bounds: mmap of {self.size} bytes failed (errno {ctypes.get_errno()})")
        self.base = base
        libc.mprotect(base, _PAGE, 0)
        libc.mprotect(base + _PAGE + self.rw, _PAGE, 0)
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * self.rw).from_address(base + _PAGE))
        self.view[:] = self.FILL
        self.off = self.rw - padded                       # data offset in view
        self.start = base + _PAGE + self.off

    def data(self) -> np.ndarray:
        return self.view[self.off:self.off + self.nbytes]

    def protected_pages(self):
        """[(lo, hi)] of the two PROT_NONE pages."""
        return [(self.base, self.base + _PAGE), (self.base + _PAGE + self.rw, self.base + self.size)]

    def changed_guard_bytes(self) -> np.ndarray:
        """Offsets from the data start of guard bytes that are no longer 0xA5."""
        outside = np.concatenate([self.view[:self.off], self.view[self.off + self.nbytes:]])
        bad = np.flatnonzero(outside != self.FILL)
        return np.where(bad < self.off, bad - self.off, bad - self.off + self.nbytes)

    def close(self):
        self.view = None
        _libc().munmap(self.base, self.size)


class _Guards:
    """check_bounds: every array argument runs on a _GuardedCopy, and exactly aliased arguments
    (same start, same size; e.g. y passed as output and as residual of an in-place y += W x)
    on the same one. Faults in the PROT_NONE pages are reported by the launch (prelude.h,
    describe_fault); finish() copies the data back and reports changed guard bytes."""

    def __init__(self, kernel, arrays: dict[int, np.ndarray]):
        self.kernel, self.arrays = kernel, arrays
        self.groups = self._alias_groups(kernel, arrays)       # [[argument index, ...]]
        self.copies, self.labels, self.copy_of = [], [], {}
        pages = []
        try:
            for group in self.groups:
                a, p = arrays[group[0]], kernel._params[group[0]]
                c = _GuardedCopy(a.nbytes)
                self.copies.append(c)
                c.data()[:] = a.reshape(-1).view(np.uint8)
                label = self._label(kernel, group, a.nbytes)
                self.labels.append(label)
                for i in group:
                    self.copy_of[i] = c
                for lo, hi in c.protected_pages():
                    pages.append((lo, hi, c.start, a.nbytes, p.size, label.encode()))
        except BaseException:
            self._close()
            raise
        self.pages = (_GuardPage * max(len(pages), 1))(*pages)
        self.pages_used = len(pages)

    @staticmethod
    def _alias_groups(kernel, arrays):
        groups: dict[tuple, list[int]] = {}
        for i, a in arrays.items():
            key = (a.ctypes.data, a.nbytes) if a.nbytes else ("empty", i)
            groups.setdefault(key, []).append(i)
        spans = sorted((k[0], k[0] + k[1], g[0]) for k, g in groups.items() if k[0] != "empty")
        for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                i0, i1 = sorted((i0, i1))
                n0, n1 = kernel._params[i0].name, kernel._params[i1].name
                raise ValueError(f"{kernel.name}: check_bounds needs arrays that are either the same or "
                                 f"do not overlap; arguments {i0} ('{n0}') and {i1} ('{n1}') overlap partly")
        return list(groups.values())

    @staticmethod
    def _label(kernel, group, nbytes) -> str:
        names = [f"{i} ('{kernel._params[i].name}')" for i in group]
        if len(names) == 1:
            return f"argument {group[0]} ('{kernel._params[group[0]].name}', {nbytes} bytes)"
        return f"arguments {', '.join(names[:-1])} and {names[-1]} (the same {nbytes} bytes)"

    def pointer(self, i) -> int:
        return self.copy_of[i].start

    def finish(self) -> list[str]:
        """Copies the results back, unmaps the copies; returns out-of-bounds write reports."""
        problems = []
        for group, c, label in zip(self.groups, self.copies, self.labels):
            writable = [self.arrays[i] for i in group if self.arrays[i].flags.writeable]
            if writable:
                writable[0].reshape(-1).view(np.uint8)[:] = c.data()
            rel = c.changed_guard_bytes()
            if rel.size:
                # whole elements (an element may change in only some of its bytes)
                sz = max(self.kernel._params[group[0]].size, 1)
                lo, hi = int(rel.min()) // sz, int(rel.max()) // sz
                problems.append(f"{label}: out-of-bounds write to elements {lo}..{hi} "
                                f"(byte offsets {lo * sz}..{(hi + 1) * sz - 1})")
        self._close()
        return problems

    def _close(self):
        for c in self.copies:
            c.close()
        self.copies = []


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
