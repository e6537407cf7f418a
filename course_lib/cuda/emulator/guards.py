"""check_bounds: each array argument copied between PROT_NONE guard pages, so that an access outside it
faults in the kernel and the launch names the array (part of the CPU emulator of CUDA C)."""

from __future__ import annotations

import ctypes
import mmap
from functools import lru_cache

import numpy as np


class _GuardPage(ctypes.Structure):         # prelude.h: struct GuardPage
    _fields_ = [("lo", ctypes.c_ulonglong), ("hi", ctypes.c_ulonglong), ("start", ctypes.c_ulonglong),
                ("nbytes", ctypes.c_ulonglong), ("elem", ctypes.c_ulonglong), ("label", ctypes.c_char_p)]


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
