"""The CUDA runtime part of the emulator's CuPy API (see cupy_api.py): errors spelled as CuPy spells CUDA's,
stream capture bookkeeping, streams, events, graphs, the device and its properties."""

from __future__ import annotations

import itertools
import threading
import types

# ---- errors, spelled as CuPy spells CUDA's ----------------------------------------------------

# What cudaGetErrorString() says for each error raised here
_MESSAGES = {
    "cudaErrorStreamCaptureUnsupported": "operation not permitted when stream is capturing",
    "cudaErrorStreamCaptureInvalidated": "operation failed due to a previous error during capture",
    "cudaErrorStreamCaptureUnjoined": "capture sequence contains a fork that was not joined to the primary stream",
    "cudaErrorStreamCaptureImplicit": "operation would make the legacy stream depend on a capturing blocking stream",
    "cudaErrorStreamCaptureUnmatched": "the capture was not initiated in this stream",
    "cudaErrorStreamCaptureMerge": "operation would result in a merge of two capture sequences",
    "cudaErrorCapturedEvent": "operation not permitted on an event last recorded in a capturing stream",
    "cudaErrorIllegalState": "the operation cannot be performed in the present state",
    "cudaErrorInvalidDevice": "invalid device ordinal",
}


class CUDARuntimeError(RuntimeError):
    """Like cupy_backends.cuda.api.runtime.CUDARuntimeError: str() is 'cudaErrorX: message',
    here followed by what the emulator saw, in parentheses."""
    def __init__(self, name: str, detail: str = ""):
        self.name = name
        super().__init__(f"{name}: {_MESSAGES[name]}" + (f" ({detail})" if detail else ""))


class CUDADriverError(RuntimeError):
    """Like cupy.cuda.driver.CUDADriverError ('CUDA_ERROR_X: message')."""


_EMULATOR_ONLY = ("CuPy would record this as a kernel of the graph; the emulator records only RawKernel "
                  "launches, so it refuses instead")


# ---- capture bookkeeping ----------------------------------------------------------------------

class _Capture:
    """One capture sequence: begun on `origin`, joined by streams that waited on its events."""
    def __init__(self, origin):
        self.origin, self.thread = origin, threading.get_ident()
        self.nodes = []             # callables, replayed in order by Graph.launch
        self.work = {}              # stream -> how many nodes it had issued (for the join check)
        self.joined = {}            # forked stream -> its work count when the capture last waited on it
        self.invalid = None         # why the capture was invalidated, or None


_ACTIVE: list[_Capture] = []        # captures in progress (any thread)


def _my_captures() -> list[_Capture]:
    # CuPy begins captures in the relaxed mode: only the capturing thread's work is affected.
    me = threading.get_ident()
    return [c for c in _ACTIVE if c.thread == me]


def _invalidate(what: str):
    # CUDA invalidates a capture after an illegal operation: end_capture() then fails, so a
    # half-recorded graph is never used.
    for c in _my_captures():
        c.invalid = c.invalid or what


def _refuse(what: str, error="cudaErrorStreamCaptureUnsupported", emulator_only: bool = False):
    """Raise as CUDA does for an operation illegal during a capture (and invalidate it)."""
    _invalidate(what)
    raise CUDARuntimeError(error, what + ("; " + _EMULATOR_ONLY if emulator_only else ""))


def _refuse_if_capturing(what: str, emulator_only: bool = False):
    if _my_captures():
        _refuse(what, emulator_only=emulator_only)


def _blocking_capture():
    """A capture of this thread on a blocking stream: the legacy default stream implicitly
    waits for blocking streams, which a capturing stream cannot allow."""
    return next((c for c in _my_captures() if not c.origin.non_blocking), None)



# ---- streams, events, graphs -------------------------------------------------------------------

_local = threading.local()              # CuPy's current stream is per thread
_stream_ids = itertools.count(1)


class Stream:
    """cupy.cuda.Stream. `with s:` makes it current (restoring the previous one on exit).
    Launches run when issued, so synchronize() has nothing to wait for; its value is the
    check that it is not called on a capturing stream."""
    null: "Stream"

    def __init__(self, null=False, non_blocking=False, ptds=False):
        if ptds:
            raise NotImplementedError("the per-thread default stream is not emulated")
        # a fake but distinct, nonzero handle per stream (0 is the legacy default stream)
        self.ptr = 0 if null else 0x7E0000000000 + 0x100 * next(_stream_ids)
        self.non_blocking = bool(non_blocking) and not null
        self.device_id = -1 if null else 0
        self._capture: _Capture | None = None

    def __enter__(self):
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(get_current_stream())
        _local.current = self
        return self

    def __exit__(self, *exc):
        _local.current = _local.stack.pop()

    def use(self):
        _local.current = self
        return self

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(self.ptr)

    def __repr__(self):
        return f"<Stream 0x{self.ptr:x} (device {self.device_id}, emulated)>"

    def _check_legacy_sync(self, what):
        if self.ptr == 0 and _blocking_capture() is not None:
            _refuse(what, "cudaErrorStreamCaptureImplicit")

    def synchronize(self):
        if self._capture is not None:
            _refuse("Stream.synchronize() of a capturing stream")
        self._check_legacy_sync("synchronize() of the legacy default stream")

    @property
    def done(self) -> bool:
        if self._capture is not None:
            _refuse("Stream.done queries a capturing stream")
        return True

    def record(self, event=None) -> "Event":
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: "Event"):
        """Wait for `event` (trivial: its work is done). If the event was recorded during a
        capture, this stream joins that capture, as in CUDA (a fork): its launches are recorded
        too, and the capture's origin must wait on it again before end_capture (a join)."""
        cap = event._capture
        if cap is None or cap not in _ACTIVE:
            return
        if self._capture is None:
            self._capture = cap                                # fork
            cap.work.setdefault(self, 0)
        elif self._capture is not cap:
            _refuse("Stream.wait_event() across two captures", "cudaErrorStreamCaptureMerge")
        if event._stream is not self:
            cap.joined[event._stream] = max(cap.joined.get(event._stream, -1), event._work)

    def _record(self, node):
        cap = self._capture
        cap.nodes.append(node)
        cap.work[self] = cap.work.get(self, 0) + 1

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self._capture is not None:
            raise CUDARuntimeError("cudaErrorIllegalState", "begin_capture() on a stream that is already capturing")
        self._capture = _Capture(self)
        _ACTIVE.append(self._capture)

    def end_capture(self) -> "Graph":
        cap = self._capture
        if cap is None:
            raise CUDARuntimeError("cudaErrorIllegalState", "end_capture() on a stream that is not capturing")
        if cap.origin is not self:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnmatched", "end_capture() on a stream forked into a capture")
        _ACTIVE.remove(cap)
        forked = [s for s in cap.work if s is not self]
        for s in forked + [self]:
            s._capture = None                   # the capture ends even when it failed
        if cap.invalid:
            raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated", f"the capture was invalidated by: {cap.invalid}")
        unjoined = [s for s in forked if cap.joined.get(s, -1) < cap.work[s]]
        if unjoined:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnjoined", f"{unjoined[0]!r} joined the capture "
                                   f"but was not waited on after its last work")
        return Graph(cap.nodes)

    def is_capturing(self) -> bool:
        return self._capture is not None


Stream.null = Stream(null=True)


def get_current_stream() -> Stream:
    return getattr(_local, "current", Stream.null)


def _refuse_on_other_stream(what: str, stream: Stream):
    """Work issued on `stream` while another stream of this thread captures."""
    if stream.ptr == 0 and _blocking_capture() is not None:
        _refuse(f"{what} on the legacy default stream", "cudaErrorStreamCaptureImplicit")
    capturing = ", ".join(repr(c.origin) for c in _my_captures())
    _invalidate(f"{what} on {stream!r}")
    # Legal in CUDA (it runs now and is not part of the graph), but almost always a forgotten
    # `with stream:`; the emulator refuses it so that the graph cannot silently miss it.
    raise RuntimeError(f"{what} issued on {stream!r} while {capturing} is capturing in this thread: on a "
                       f"GPU it would run now and not be recorded in the graph. Issue it on the capturing "
                       f"stream (inside `with stream:` or with stream=).")


def _submit(stream, what: str, node):
    """Run `node` now, or record it when `stream` (default: the current one) is capturing."""
    stream = get_current_stream() if stream is None else stream
    if stream._capture is not None:
        stream._record(node)
    elif _my_captures():
        _refuse_on_other_stream(what, stream)
    else:
        node()


class Graph:
    """What Stream.end_capture() returns: the recorded launches, replayed by launch()."""
    def __init__(self, nodes):
        self._nodes = list(nodes)

    def launch(self, stream=None):
        """Replay on `stream` (default: the current one): the launches run now, or are recorded
        when that stream is itself capturing (a graph inside a graph)."""
        for node in self._nodes:
            _submit(stream, "Graph.launch()", node)

    def upload(self, stream=None):
        pass

    def __len__(self):
        return len(self._nodes)


class Event:
    """cupy.cuda.Event. Work is done when issued, so an event is complete once recorded."""
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._capture, self._stream, self._work = None, None, 0

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        cap = stream._capture
        self._capture, self._stream = cap, stream
        self._work = cap.work.get(stream, 0) if cap else 0

    def _check(self, what):
        if self._capture is not None and self._capture in _ACTIVE:
            # an error about the event: the capture itself stays valid
            raise CUDARuntimeError("cudaErrorCapturedEvent", f"Event.{what} of an event recorded in a capture")

    def synchronize(self):
        self._check("synchronize()")

    @property
    def done(self) -> bool:
        self._check("done")
        return True


class Device:
    """cupy.cuda.Device: the one emulated device, 0."""
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice")

    compute_capability = "90"

    def synchronize(self):
        if _my_captures():
            _refuse("Device.synchronize() waits for the capturing stream")
        Stream.null._check_legacy_sync("Device.synchronize()")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id

    def __repr__(self):
        return "<CUDA Device 0 (emulated)>"


def _device_properties(device: int = 0) -> dict:
    """The EMULATED device's nominal properties: an H100-like sm_90, so that code sizing its
    launches from them takes its GPU path. Not a measurement of this machine."""
    Device(device)
    return {"name": b"CPU emulator of CUDA C", "major": 9, "minor": 0,
            "totalGlobalMem": 80 * 2**30, "multiProcessorCount": 132, "l2CacheSize": 50 * 2**20,
            "regsPerBlock": 65536, "regsPerMultiprocessor": 65536, "warpSize": 32,
            "sharedMemPerBlock": 48 * 1024, "sharedMemPerBlockOptin": 232448,
            "sharedMemPerMultiprocessor": 233472, "maxThreadsPerBlock": 1024,
            "maxThreadsPerMultiProcessor": 2048, "maxThreadsDim": (1024, 1024, 64),
            "maxGridSize": (2**31 - 1, 65535, 65535), "totalConstMem": 65536}


def _device_synchronize():
    Device(0).synchronize()


runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1, getDevice=lambda: 0, getDeviceProperties=_device_properties,
    deviceSynchronize=_device_synchronize, CUDARuntimeError=CUDARuntimeError)
driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)
