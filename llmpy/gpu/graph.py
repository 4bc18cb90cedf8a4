"""CUDA-graph capture and replay of one training micro-step, for llmpy/gpu/engine.py.

A GPT-2 micro-step is a few hundred kernel launches; replaying them as one captured graph removes the
Python and driver overhead of each launch. The rules that make replay correct (cupy-notes.md §3):

  - warm up first: the first eager run compiles the kernels and builds cuBLASLt's cached plans;
  - capture on a non-blocking side stream (CuPy refuses the legacy null stream), and order it against
    the caller's stream with events before and after every replay;
  - allocate nothing while capturing: a pool block handed out during capture is baked into the graph
    and may be reused by someone else once freed. StepGraph installs an allocator that refuses;
  - a replay re-runs the kernels with the pointers and by-value arguments they were captured with, so
    whatever the work depends on besides buffer contents (batch shape, dloss) goes into the `key`.

If a capture fails (an op allocates, reads the device from the host, or calls an API that cannot be
captured) graphs are switched off for good, the reason is logged once, and the step runs eagerly.
Tests: tests/test_gpu_engine.py (the bookkeeping with fake streams; replay == eager on a GPU).
"""
from __future__ import annotations


class AllocationDuringCapture(RuntimeError):
    """A device allocation was requested while a CUDA graph was being captured."""


def _refuse_allocation(nbytes: int):
    raise AllocationDuringCapture(f"an op asked for {nbytes} bytes of device memory during CUDA-graph "
                                  "capture; captured work must use preallocated (arena) buffers")


class StepGraph:
    """Runs `body()` eagerly `warmup` times per key, then captures it once and replays the capture.

    cuda: the `cupy.cuda` module (tests pass a fake with Stream, Event, get_current_stream and
    using_allocator). Counters `eager_runs`, `captures` and `replays` say what happened; `disabled`
    holds the reason once a capture has failed (None while graphs are on).
    """

    def __init__(self, *, warmup: int = 1, log=print, cuda=None):
        if cuda is None:
            import cupy
            cuda = cupy.cuda
        self._cuda, self.warmup, self.log = cuda, warmup, log
        self.key, self.graph, self.disabled = None, None, None
        self.eager_runs = self.captures = self.replays = 0
        self._seen = 0                 # eager runs for the current key
        self._stream = None            # side stream: created on first capture
        self._ready = self._done = None  # events ordering the side stream against the caller's

    def run(self, key, body) -> None:
        """Do the work of body() once: eagerly (warm-up, or graphs off) or by replaying its capture."""
        if self.disabled is not None:
            body()
            return
        if key != self.key:            # different by-value arguments: the old capture is useless
            self.graph, self.key, self._seen = None, key, 0
        if self.graph is None and self._seen < self.warmup:
            self._seen += 1
            self.eager_runs += 1
            body()
            return
        if self.graph is None:
            try:
                self.graph = self._capture(body)
            except Exception as e:     # capture only records work: nothing ran, so run it eagerly
                self.disabled = f"{type(e).__name__}: {e}"
                self.log(f"cuda graph: off, capture failed ({self.disabled}); running eagerly")
                self.eager_runs += 1
                body()
                return
        self._replay()

    def _capture(self, body):
        cuda = self._cuda
        if self._stream is None:
            self._stream = cuda.Stream(non_blocking=True)
            self._ready = cuda.Event(disable_timing=True)
            self._done = cuda.Event(disable_timing=True)
        stream = self._stream
        with stream, cuda.using_allocator(_refuse_allocation):
            stream.begin_capture()
            try:
                body()
            except BaseException:
                _end_capture_quietly(stream)   # leave capture mode, keep the original error
                raise
            graph = stream.end_capture()
        self.captures += 1
        return graph

    def _replay(self) -> None:
        caller = self._cuda.get_current_stream()
        self._ready.record(caller)             # inputs staged on the caller's stream come first
        self._stream.wait_event(self._ready)
        self.graph.launch(stream=self._stream)
        self._done.record(self._stream)        # and the caller's later work waits for the replay
        caller.wait_event(self._done)
        self.replays += 1

    def close(self) -> None:
        """Wait for the last replay and drop the graph and the side stream."""
        if self._stream is not None:
            self._stream.synchronize()
        self.graph = self._stream = self._ready = self._done = None
        self.key, self._seen = None, 0


def _end_capture_quietly(stream) -> None:
    try:
        stream.end_capture()
    except Exception:   # an invalidated capture ends with an error; the body's error matters more
        pass
