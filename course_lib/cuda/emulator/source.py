"""Reading a kernel source without compiling it: its kernels and their parameters, __shared__ arrays, and
the options that matter to g++ (part of the CPU emulator of CUDA C)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .arguments import _DEFAULT_ARCH


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
