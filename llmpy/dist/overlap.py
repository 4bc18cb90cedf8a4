"""Gradient reduction overlapped with the backward pass (llm.c's gpt2_backward_and_reduce), GPU only.

On the last micro-step of a step, as soon as layer l's backward has produced its parameter gradients
(after the ln1 layernorm backward), `layer(l)` hands that layer's 12 gradient slices (ln1 w/b, qkv w/b,
attproj w/b, ln2 w/b, fc w/b, fcproj w/b, in parameter order) to a communication stream: an event
recorded on the compute stream, the comm stream waits for it (no host sync), and there, in one NCCL
group, each slice is reduce-scattered (ZeRO-1, llm.c's per-layer shards: llmpy/dist/zero.py) or
all-reduced (ZeRO-0), averaged. The compute stream goes on with layer l-1 meanwhile; nothing below
layer l touches layer l's gradients. `finish()`, after the encoder backward, does the same for wte,
wpe, lnfw and lnfb and then joins: the compute stream waits for an event recorded on the comm stream,
so the grad norm and the update see reduced gradients.

CUDA graphs: the engine captures the last micro-step as its own graph. The per-layer fork (event on
the capturing stream, comm stream waits) pulls the comm stream into the capture, as CUDA allows, and
`join()` at the end of the captured body brings it back before the capture ends (an unjoined fork
invalidates it). Every rank captures the same collectives in the same order, as NCCL requires. Since
the encoder backward runs eagerly after the replay, the graph's join waits for layer 0's reduction
before it (eager runs do not join there).

Each element is reduced by the same collective over the same ranks as in the whole-backward path
(DataParallel.reduce_gradients without overlap), only in another order of calls; for the ZeRO-0
all-reduce the calls are per layer slice instead of one over the whole buffer, so on real NCCL the
bits may depend on how its ring chunks a buffer (every rank still gets the same bits).
"""
from __future__ import annotations


def cuda_module():
    """The CUDA API the streams and events come from (the kernel emulator substitutes its own)."""
    import cupy
    return cupy.cuda


class LayerReducer:
    """Per-layer gradient reduction on a side stream; see the module docstring. `model` is a GPUGPT
    (its `g` views and config), `sharded` the ZeRO-1 ShardedOptimizer or None for ZeRO-0."""

    def __init__(self, model, comm, sharded=None, *, cuda=None):
        self.comm, self.cuda = comm, cuda if cuda is not None else cuda_module()
        self.stream = self.cuda.Stream(non_blocking=True)
        self.forked = self.cuda.Event(disable_timing=True)
        self.joined = self.cuda.Event(disable_timing=True)
        self.model, self.scatter = model, sharded is not None

    def _slices(self, layer):
        """Layer `layer`'s gradient slices in parameter order, or with None wte, wpe, lnfw, lnfb. Made
        per call (no views kept), so the engine's arena goes back to the pool when the model closes."""
        L, whole = self.model.config.num_layers, self.model.unstacked
        if layer is None:
            return [self.model.g[name].reshape(-1) for name in whole]
        return [view.reshape(L, -1)[layer] for name, view in self.model.g.items() if name not in whole]

    def _reduce_on_side_stream(self, bufs) -> None:
        self.forked.record(self.cuda.get_current_stream())
        self.stream.wait_event(self.forked)
        with self.stream, self.comm.group():
            for buf in bufs:
                if self.scatter:
                    self.comm.reduce_scatter(buf, op="avg")
                else:
                    self.comm.all_reduce(buf, op="avg")

    def layer(self, l: int) -> None:
        """Layer l's gradients are complete on the current stream: reduce them on the comm stream."""
        self._reduce_on_side_stream(self._slices(l))

    def join(self) -> None:
        """The current stream waits for everything issued on the comm stream so far."""
        self.joined.record(self.stream)
        self.cuda.get_current_stream().wait_event(self.joined)

    def finish(self) -> None:
        """After the whole backward: reduce wte, wpe, lnfw, lnfb, then join."""
        self._reduce_on_side_stream(self._slices(None))
        self.join()
