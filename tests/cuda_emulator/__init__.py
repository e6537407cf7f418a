"""Run CUDA C kernels (CuPy ``RawKernel`` / ``RawModule`` source) on the CPU, for tests.

The same kernel source that chapter 09 launches with CuPy is compiled with g++ against
``prelude.h`` (which turns the CUDA dialect into C++ and supplies threadIdx, __syncthreads,
warp shuffles, __half, __dp4a, atomics ...) and launched through ctypes. Every CUDA thread
of a block is a cooperative fiber; blocks run one after another. See README.md.

    from tests.cuda_emulator import EmulatedKernel, emulator_available
    k = EmulatedKernel(source, "rmsnorm")
    k((n_blocks,), (256,), (x, w, out, np.int32(n), np.float32(eps)), shared_mem=1024)

Unlike CuPy, every argument is checked against the kernel's C++ signature (the compiler
reports each parameter's type): Python ints/floats, wrong numpy scalar types, arrays of the
wrong dtype, non-contiguous or misaligned arrays and wrong argument counts are errors.
"""

from __future__ import annotations

import ctypes
import hashlib
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

__all__ = ["EmulatedModule", "EmulatedKernel", "emulator_available"]

_VERSION = "1"          # bump to invalidate cached builds when the generated code changes
_PRELUDE = Path(__file__).with_name("prelude.h")
_FLAGS = ["-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing"]
_DEFAULT_STACK = 256 * 1024
_SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
_MAX_SHARED_DEFAULT = 48 * 1024     # CUDA's dynamic shared memory limit without opting in
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
    keyed by a hash of source, prelude and options."""

    def __init__(self, source: str, options=(), name_expressions=None):
        ok, why = emulator_available()
        if not ok:
            raise RuntimeError(why)
        self.source = source
        self.options = tuple(options or ())
        self.name_expressions = list(name_expressions or ())
        masked = _mask(source)
        self._kernels = _find_kernels(masked)
        self._exprs = [k.name for k in self._kernels.values() if not k.template]
        self._exprs += [e for e in self.name_expressions if e not in self._exprs]
        text = _CUDA_HEADERS.sub(lambda m: "// (include handled by the CUDA emulator)", source)
        text = _rewrite_shared(text, _mask(text))
        gen = ["", "// ---- launchers generated by tests/cuda_emulator ----"]
        for i, e in enumerate(self._exprs):
            gen.append(f'extern "C" int __emu_launch_{i}(const unsigned* d, unsigned long long s, void** a, '
                       f'int o, unsigned long long st, char* e, unsigned long long el) '
                       f'{{ return ::__emu::launch(&{e}, d, s, a, o, st, e, el); }}')
            gen.append(f'extern "C" const char* __emu_sig_{i}() {{ return ::__emu::signature(&{e}); }}')
        self._text = text + "\n" + "\n".join(gen) + "\n"
        self._lib = None
        self.compile_log = ""

    def compile(self):
        if self._lib is not None:
            return self
        cxx = _compiler()
        flags = _FLAGS + _user_flags(self.options)
        key = hashlib.sha256("\0".join([_VERSION, cxx, " ".join(flags), _PRELUDE.read_text(),
                                        self._text]).encode()).hexdigest()[:32]
        d = _cache_dir() / key
        so = d / "kernel.so"
        if str(so) not in _LIBS:
            if not so.exists():
                d.mkdir(parents=True, exist_ok=True)
                # per-process names: parallel test workers never read or load a half-written file
                tag = f"{os.getpid()}.{threading.get_ident()}"
                cu, tmp = d / f"kernel.{tag}.cu", d / f"kernel.{tag}.so"
                cu.write_text(self._text)
                cmd = [cxx, *flags, "-include", str(_PRELUDE), "-x", "c++", str(cu), "-o", str(tmp)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                self.compile_log = (r.stdout + r.stderr).replace(str(cu), "kernel.cu")
                if r.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"emulated CUDA compile failed (g++ exit {r.returncode}; "
                                       f"generated source in {cu}):\n{self.compile_log}")
                os.replace(tmp, so)     # atomic
                os.replace(cu, d / "kernel.cu")
            _LIBS[str(so)] = ctypes.CDLL(str(so))
        self._lib = _LIBS[str(so)]
        self.so_path = so
        return self

    def get_function(self, name: str, **kwargs) -> "EmulatedKernel":
        """The kernel `name` (an extern "C" kernel's name or one of name_expressions).
        kwargs (check_bounds, schedule, stack_size) are emulator extras, see EmulatedKernel."""
        if name not in self._exprs:
            raise RuntimeError(f"no kernel named {name!r} in the source (found: "
                               f"{', '.join(self._exprs) or 'none'}); templates need name_expressions")
        self.compile()
        return EmulatedKernel._from_module(self, name, **kwargs)


class EmulatedKernel:
    """Like ``cupy.RawKernel(code, name)``: call as ``k(grid, block, args, shared_mem=0)``.

    Emulator extras:
      check_bounds: run on padded copies of the arrays and raise if the kernel wrote
        outside them (reads outside return guard bytes instead of crashing). Arrays must
        not overlap. Copies cost time; off by default.
      schedule: "forward" (threads run in index order between barriers), "reverse" or
        "random" (reshuffled every round): running a test under several schedules exposes
        missing __syncthreads(). Default from $COURSE_CUDA_EMULATOR_SCHEDULE, else forward.
      stack_size: bytes of stack per CUDA thread (default 256 KiB, virtual until touched).
    """

    def __init__(self, source: str, name: str, options=(), name_expressions=None, *,
                 check_bounds: bool = False, schedule: str | None = None, stack_size: int = _DEFAULT_STACK):
        mod = EmulatedModule(source, options, name_expressions)
        if name not in mod._exprs and "<" in name:       # a template instance, e.g. "k<float>"
            mod = EmulatedModule(source, options, list(name_expressions or ()) + [name])
        if name not in mod._exprs:
            mod.get_function(name)                       # raises "no kernel named ..."
        self._setup(mod, name, check_bounds, schedule, stack_size)

    @classmethod
    def _from_module(cls, mod, name, check_bounds=False, schedule=None, stack_size=_DEFAULT_STACK):
        self = cls.__new__(cls)
        self._setup(mod, name, check_bounds, schedule, stack_size)
        return self

    def _setup(self, mod, name, check_bounds, schedule, stack_size):
        self.module, self.name = mod, name
        self.check_bounds = check_bounds
        schedule = schedule or os.environ.get("COURSE_CUDA_EMULATOR_SCHEDULE", "forward")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        self.stack_size = int(stack_size)
        self.max_dynamic_shared_size_bytes = _MAX_SHARED_DEFAULT
        info = mod._kernels.get(name)
        self.launch_bounds = info.launch_bounds if info else None
        self._written = info.params if info else []
        self._params = None

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
        fn.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_ulonglong]
        self._fn = fn

    @property
    def params(self):
        """[(C type, name)] of the kernel's parameters, as parsed from the source."""
        self._bind()
        return [(p.ctype, p.name) for p in self._params]

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self._bind()
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
        nthreads = block3[0] * block3[1] * block3[2]
        if nthreads > 1024 or block3[0] > 1024 or block3[1] > 1024 or block3[2] > 64:
            raise ValueError(f"{self.name}: block {block3} exceeds CUDA's limits (1024 threads, z <= 64)")
        if grid3[0] > 2**31 - 1 or grid3[1] > 65535 or grid3[2] > 65535:
            raise ValueError(f"{self.name}: grid {grid3} exceeds CUDA's limits")
        if self.launch_bounds is not None and nthreads > self.launch_bounds:
            raise ValueError(f"{self.name}: block of {nthreads} threads exceeds "
                             f"__launch_bounds__({self.launch_bounds})")
        shared_mem = int(shared_mem)
        if shared_mem < 0 or shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(f"{self.name}: shared_mem={shared_mem} bytes exceeds "
                             f"max_dynamic_shared_size_bytes={self.max_dynamic_shared_size_bytes}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self._params):
            raise TypeError(f"{self.name} takes {len(self._params)} arguments "
                            f"({', '.join(p.name for p in self._params)}), got {len(args)}")
        arrays = {}
        slots = np.zeros(max(len(args), 1) * 16, np.uint8)      # 16 bytes per argument
        for p, a in zip(self._params, args):
            if p.pointer:
                arrays[p.index] = _check_array(p, self.name, a)
            else:
                b = _scalar_bytes(p, self.name, a)
                if len(b) > 16:
                    raise TypeError(f"{self.name}: {p.label()}: by-value arguments over 16 bytes "
                                    f"are not supported")
                slots[16 * p.index:16 * p.index + len(b)] = np.frombuffer(b, np.uint8)
        guarded = _Guards(self, arrays) if self.check_bounds else None
        for i, a in arrays.items():
            ptr = guarded.pointer(i) if guarded else a.ctypes.data
            slots[16 * i:16 * i + 8] = np.frombuffer(np.uint64(ptr).tobytes(), np.uint8)
        argv = (ctypes.c_void_p * max(len(args), 1))(
            *[slots.ctypes.data + 16 * i for i in range(max(len(args), 1))])
        dims = (ctypes.c_uint * 6)(*grid3, *block3)
        err = ctypes.create_string_buffer(4096)
        with _LAUNCH_LOCK:
            rc = self._fn(dims, shared_mem, argv, _SCHEDULES[self.schedule], self.stack_size,
                          err, len(err))
        if guarded:
            guarded.finish()
        if rc != 0:
            raise RuntimeError(f"{self.name}<<<{grid3}, {block3}>>>: {err.value.decode(errors='replace')}")


def _dim3(v, what) -> tuple[int, int, int]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in t):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    if min(t) < 1:
        raise ValueError(f"{what} {v!r}: every dimension must be at least 1")
    return t


class _Guards:
    """check_bounds: each array runs as a copy with GUARD bytes of 0xA5 on both sides; any
    changed guard byte after the launch is an out-of-bounds write."""
    GUARD = 4096

    def __init__(self, kernel, arrays):
        self.kernel, self.arrays, self.bufs = kernel, arrays, {}
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes, i) for i, a in arrays.items() if a.nbytes)
        for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"{kernel.name}: check_bounds needs non-overlapping arrays "
                                 f"(arguments {i0} and {i1} overlap)")
        for i, a in arrays.items():
            raw = np.empty(a.nbytes + 2 * self.GUARD + 256, np.uint8)
            off = self.GUARD + (-(raw.ctypes.data + self.GUARD)) % 256   # interior 256-aligned
            raw[:] = 0xA5
            raw[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
            self.bufs[i] = (raw, off)

    def pointer(self, i):
        raw, off = self.bufs[i]
        return raw.ctypes.data + off

    def finish(self):
        problems = []
        for i, a in self.arrays.items():
            raw, off = self.bufs[i]
            if a.flags.writeable:
                a.reshape(-1).view(np.uint8)[:] = raw[off:off + a.nbytes]
            bad = np.flatnonzero(np.concatenate([raw[:off], raw[off + a.nbytes:]]) != 0xA5)
            if bad.size:
                rel = np.where(bad < off, bad - off, bad - off + a.nbytes)   # bytes from the start
                p = self.kernel._params[i]
                # whole elements (an element may change in only some of its bytes)
                sz = max(p.size, 1)
                lo, hi = int(rel.min()) // sz, int(rel.max()) // sz
                problems.append(f"argument {i} ('{p.name}', {a.nbytes} bytes): out-of-bounds write to "
                                f"elements {lo}..{hi} (byte offsets {lo * sz}..{(hi + 1) * sz - 1})")
        if problems:
            raise RuntimeError(f"{self.kernel.name}: " + "; ".join(problems))
