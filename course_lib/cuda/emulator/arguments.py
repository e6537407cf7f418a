"""What a launch may ask of the emulated GPU (registers, shared memory) and the check of each kernel
argument against its C++ parameter (part of the CPU emulator of CUDA C)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# GPU limits (sm_80 / sm_90)
_MAX_SHARED_DEFAULT = 48 * 1024     # shared memory per block (static + dynamic) without opting in
_SHARED_OPTIN = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_87": 163 * 1024, "sm_89": 99 * 1024,
                 "sm_90": 227 * 1024}   # ... with max_dynamic_shared_size_bytes raised
_DEFAULT_ARCH = "sm_90"
_REGS_PER_BLOCK = 65536             # 32-bit registers
_REG_UNIT = 256                     # registers are allocated per warp, in units of 256
_MAX_REGS_PER_THREAD = 255


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
