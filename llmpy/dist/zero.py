"""ZeRO stages 0 and 1 (llm.c's `-z`), and DataParallel: what the training loop calls around the model.

Stage 0 (DDP): every rank keeps everything; after the last micro-step the gradients are all-reduced
(averaged), and every rank runs the same AdamW on the same numbers with the same seeds, so the replicas
stay bit-identical (llm.c seeds its rounding with 13371337 + rank, which lets bf16 replicas drift:
multi-gpu-facts.md §A4; llmpy's trainer draws every seed from one rank-independent generator).

Stage 1: the optimizer state (AdamW's m and v, Muon's momentum, and the GPU's fp32 master weights) is
split over the ranks with llm.c's layout (llmc-facts.md §10.3): per parameter tensor and per layer, so
that a layer's gradients can be reduced as soon as its backward is done. For a tensor of `layers`
slices of S elements each (the (L, ...) stacks; the model's `unstacked` tensors, GPT-2's wte, wpe, lnfw
and lnfb or nanochat's wte and lm_head, are one slice), rank r owns elements [r S/N, (r+1) S/N) of
every slice. The gradients are reduce-scattered (averaged) slice by slice, the rank updates its
pieces, and the pieces are all-gathered back into every rank's full parameters. The rank's m, v and
master are flat buffers of num_parameters / N floats ordered tensor, layer, piece (llm.c's state-file
order). The global gradient norm is the sum over ranks of the squares of the own pieces (llm.c PR #524).

Muon orthogonalises whole matrices, so the tensors a model names in `whole_matrix_tensors(optimizer)`
(nanochat's block matrices under Muon) are split by layers instead, as nanochat's DistMuon does: rank r
owns layers r, r + N, r + 2N, ... whole. The same two collectives serve: layers [kN, (k+1)N) are one
contiguous buffer whose reduce-scatter leaves layer kN + r's averaged gradient on rank r, and whose
all-gather brings every rank the N updated layers. The layer count must divide by N.

DataParallel hides which stage runs: reduce_gradients, mean_loss, grad_norm, update, average and the
optimizer state in and out. With one process and stage 0 each is the model's own call (the
collectives are no-ops), so a single-process run is today's run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmpy.dist.comm import Communicator, RankAgreedError
from llmpy.model import GPT

WHOLE_TENSORS = GPT.unstacked    # GPT-2's tensors of one slice each; every other tensor is an (L, ...) stack
F32 = np.dtype(np.float32)
LAYER_SEED_MIX = 0x9E3779B9     # golden-ratio odd constant: spreads layer indices over the 32-bit seed


@dataclass(frozen=True)
class Shard:
    """One parameter tensor's part of a rank's optimizer state."""
    name: str
    layers: int     # slices: L for the per-layer stacks, 1 for the whole tensors
    size: int       # elements per slice (S)
    lo: int         # this rank's piece of every slice it holds: [lo, hi)
    hi: int
    offset: int     # where the tensor's pieces start in the rank's flat m / v / master
    owned: tuple = ()   # sharded by layer: the whole layers this rank owns (r, r + N, ...); () = every layer

    @property
    def piece(self) -> int:
        return self.hi - self.lo

    @property
    def held(self) -> tuple:
        """The layers of which this rank holds a piece (all of them, or the owned whole ones)."""
        return self.owned or tuple(range(self.layers))


def shard_layout(shapes: dict, rank: int, world: int, *, unstacked=WHOLE_TENSORS, by_layer=()) -> list[Shard]:
    """llm.c's per-tensor, per-layer shards of rank `rank` of `world` (tensors named in by_layer: whole
    layers r, r + world, ...); ValueError naming the tensor if a slice, or the layers, do not split evenly
    (llm.c exits there too)."""
    out, offset = [], 0
    for name, shape in shapes.items():
        layers = 1 if name in unstacked else shape[0]
        size = math.prod(shape) // layers
        if name in by_layer:
            if layers % world:
                raise ValueError(f"tensor {name}: {layers} layers of whole matrices (Muon) do not split over "
                                 f"{world} ranks")
            owned = tuple(range(rank, layers, world))
            out.append(Shard(name, layers, size, 0, size, offset, owned))
            offset += len(owned) * size
            continue
        if size % world:
            raise ValueError(f"tensor {name}: a slice of {size} elements does not split over {world} ranks")
        piece = size // world
        out.append(Shard(name, layers, size, rank * piece, (rank + 1) * piece, offset))
        offset += layers * piece
    return out


def rank_layout(shapes: dict, comm: Communicator, *, unstacked, by_layer) -> list[Shard]:
    """shard_layout for this rank, or the one line every rank agrees on when the model does not split."""
    try:
        return shard_layout(shapes, comm.rank, comm.size, unstacked=unstacked, by_layer=by_layer)
    except ValueError as e:
        raise RankAgreedError(f"-z 1 over {comm.size} processes: {e}; use -z 0 or another process count",
                              rank=comm.rank) from None


def check_zero_layout(zero_stage: int, layout: tuple, comm: Communicator) -> None:
    """Before anything is written: under -z 1, the RankAgreedError that ShardedOptimizer would raise.
    layout: (shapes, unstacked, by_layer) of the model family (llmpy.families.zero_layout)."""
    if zero_stage == 1:
        shapes, unstacked, by_layer = layout
        rank_layout(shapes, comm, unstacked=unstacked, by_layer=by_layer)


def _to_host(a) -> np.ndarray:
    """A NumPy or CuPy array as a host NumPy copy (CuPy: raw bytes, so any dtype works)."""
    if isinstance(a, np.ndarray):
        return a.copy()
    return a.reshape(-1).view(np.uint8).get().view(a.dtype).reshape(a.shape)


def _from_host(xp, host: np.ndarray):
    """A host array on the backend of `xp` (a copy)."""
    if xp is np:
        return np.array(host)
    dev = xp.empty(host.shape, dtype=host.dtype)
    dev.reshape(-1).view(np.uint8).set(np.ascontiguousarray(host).reshape(-1).view(np.uint8))
    return dev


class ShardedOptimizer:
    """ZeRO-1: this rank's optimizer state (m, v, and fp32 master weights when the model keeps them), and
    the update of its pieces followed by the all-gather of the parameters. Runs on the model's backend;
    each piece's step is the model's own (`tensor_update`: AdamW, or Muon on whole layers)."""

    def __init__(self, model, comm: Communicator):
        self.model, self.comm = model, comm
        self.shards = rank_layout(model.shapes, comm, unstacked=model.unstacked,
                                  by_layer=model.whole_matrix_tensors(model.optimizer))
        self.numel = sum(len(s.held) * s.piece for s in self.shards)
        xp = model.xp
        self.m = xp.zeros(self.numel, dtype=F32)
        self.v = xp.zeros(self.numel, dtype=F32)
        self.partials = xp.zeros(sum(len(s.held) for s in self.shards), dtype=F32)   # the norm's, one per piece
        self.master = None
        if getattr(model, "master_weights", False):   # the GPU engine in bf16: fp32 copies of the pieces
            self.master = _from_host(xp, self.gather_pieces(_to_host(model.params).astype(np.float32)))

    # ---- where the pieces are ----------------------------------------------------------------------
    @staticmethod
    def _rows(flat_views: dict, shard: Shard):
        return flat_views[shard.name].reshape(shard.layers, shard.size)

    def slices(self, flat_views: dict, shard: Shard):
        """(layer, the whole slice, this rank's piece) of one tensor of a full-size buffer's views."""
        rows = self._rows(flat_views, shard)
        for layer in shard.held:
            yield layer, rows[layer], rows[layer, shard.lo:shard.hi]

    def collective_buffers(self, flat_views: dict, shard: Shard):
        """The buffers one reduce-scatter / all-gather each covers: every slice, or for a tensor sharded
        by layer each run of N consecutive layers (rank r's chunk of run k is layer k N + r)."""
        rows = self._rows(flat_views, shard)
        if not shard.owned:
            yield from rows
            return
        n = self.comm.size
        for k in range(0, shard.layers, n):
            yield rows[k:k + n].reshape(-1)

    def state_piece(self, flat, shard: Shard, layer: int):
        start = shard.offset + (layer // self.comm.size if shard.owned else layer) * shard.piece
        return flat[start:start + shard.piece]

    def gather_pieces(self, full: np.ndarray) -> np.ndarray:
        """This rank's pieces of a full-size host array, in state order."""
        from llmpy.model import carve
        views = carve(full, self.model.shapes)
        return np.concatenate([piece.reshape(-1) for s in self.shards for _, _, piece in self.slices(views, s)])

    # ---- the step ------------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        with self.comm.group():
            for s in self.shards:
                for buf in self.collective_buffers(self.model.g, s):
                    self.comm.reduce_scatter(buf, op="avg")

    def grad_norm(self) -> float:
        """sqrt of the sum over ranks of this rank's pieces' squares: one partial sum per piece on the
        device, one read-back, summed in float64 on the host in a fixed order."""
        model, k = self.model, 0
        for s in self.shards:
            for _, _, piece in self.slices(model.g, s):
                model.ops.global_norm_squared(self.partials[k:k + 1], piece)
                k += 1
        total = float(_to_host(self.partials).astype(np.float64).sum())
        return math.sqrt(self.comm.sum_host(total))

    def update(self, *, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0, seeds=None):
        model = self.model
        for i, s in enumerate(self.shards):
            seed = 0 if seeds is None else int(seeds[i])
            for (layer, _, piece), (_, _, grad) in zip(self.slices(model.p, s), self.slices(model.g, s)):
                master = None if self.master is None else self.state_piece(self.master, s, layer)
                # one launch per piece: the layer enters the seed, or every layer would round with the same
                # noise (the kernels hash the seed with the element's place in its launch only)
                model.tensor_update(s.name, piece, self.state_piece(self.m, s, layer),
                                    self.state_piece(self.v, s, layer), grad, lr=lr, beta1=beta1, beta2=beta2,
                                    eps=eps, t=t, grad_scale=grad_scale, weight_decay=weight_decay,
                                    master=master, seed=seed ^ (layer * LAYER_SEED_MIX) & 0xFFFFFFFF)
        self.gather_params()

    def gather_params(self) -> None:
        with self.comm.group():
            for s in self.shards:
                for buf in self.collective_buffers(self.model.p, s):
                    self.comm.all_gather(buf)

    # ---- state files ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"m": _to_host(self.m), "v": _to_host(self.v),
                "master": None if self.master is None else _to_host(self.master)}

    def load(self, state: dict) -> None:
        """m, v and master from this rank's state file. The parameters come from the model file, which
        holds exactly the all-gathered values, so nothing is regenerated from the master weights."""
        xp = self.model.xp
        self.m = _from_host(xp, np.asarray(state["m"], dtype=F32).reshape(-1))
        self.v = _from_host(xp, np.asarray(state["v"], dtype=F32).reshape(-1))
        if self.master is not None:
            if state.get("master") is None:
                raise RankAgreedError("the state file has no master weights; resume with -w 0 (as llm.c requires)",
                                      rank=self.comm.rank)
            self.master = _from_host(xp, np.asarray(state["master"], dtype=F32).reshape(-1))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.m, self.v, self.master) if a is not None)


class DataParallel:
    """The training loop's view of the model across ranks (see the module docstring).

    forward_backward(..., last=) for each micro-step; reduce_gradients() after the last; mean_loss(n)
    and average(x) are global means; grad_norm() the global norm; update(**adamw) the step (and, under
    stage 1, the all-gather)."""

    def __init__(self, model, comm: Communicator, zero_stage: int = 0, *, overlap: bool = True, log=print):
        self.model, self.comm = model, comm
        if zero_stage in (2, 3):
            log(f"-z {zero_stage}: ZeRO stages 2 and 3 are not implemented; using stage 0 (as llm.c)")
        self.zero_stage = zero_stage = effective_stage(zero_stage)
        self.sharded = ShardedOptimizer(model, comm) if zero_stage == 1 else None
        # the GPU engine reduces each layer's gradients during the last backward (llmpy/dist/overlap.py);
        # one process has nothing to reduce, so it gets no comm stream at all
        self.reducer = None
        if overlap and comm.size > 1 and getattr(model, "reduces_in_backward", False):
            from llmpy.dist.overlap import LayerReducer
            self.reducer = LayerReducer(model, comm, self.sharded)
        self._reduced_in_backward = False
        if comm.size > 1 or self.sharded is not None:
            procs = f"{comm.size} process{'es' if comm.size > 1 else ''}"
            log(f"data parallel: {procs} ({comm.name}), ZeRO stage {zero_stage}"
                + (f"; optimizer state {self.sharded.nbytes() / 2**20:.1f} MiB per rank (1/{comm.size} of "
                   f"{self.sharded.nbytes() * comm.size / 2**20:.1f} MiB)" if self.sharded is not None else ""))

    @property
    def state_numel(self) -> int:
        """Floats per array (m, v, master) in this rank's state file."""
        return self.sharded.numel if self.sharded is not None else self.model.num_parameters

    def forward_backward(self, inp, targets, dloss: float, *, seed: int = 0, last: bool = True) -> None:
        """One micro-step of the model; on the `last` one of a step, with overlap, the layers' gradient
        reductions are issued during the backward (reduce_gradients then only finishes them)."""
        if last and self.reducer is not None:
            self.model.forward_backward(inp, targets, dloss, seed=seed, reducer=self.reducer)
            self._reduced_in_backward = True
        else:
            self.model.forward_backward(inp, targets, dloss, seed=seed)

    def reduce_gradients(self) -> None:
        if self._reduced_in_backward:
            self._reduced_in_backward = False
            self.reducer.finish()
        elif self.sharded is not None:
            self.sharded.reduce_gradients()
        else:
            self.comm.all_reduce(self.model.grads, op="avg")

    def mean_loss(self, num_tokens: int) -> float:
        return self.comm.mean_host(self.model.mean_loss(num_tokens))

    def average(self, x: float) -> float:
        return self.comm.mean_host(x)

    def grad_norm(self) -> float:
        return self.sharded.grad_norm() if self.sharded is not None else self.model.grad_norm()

    def update(self, **adamw) -> None:
        if self.sharded is not None:
            self.sharded.update(**adamw)
        else:
            self.model.update(**adamw)

    def optimizer_state(self) -> dict:
        return self.sharded.state() if self.sharded is not None else self.model.optimizer_state()

    def load_optimizer_state(self, state: dict) -> None:
        if self.sharded is not None:
            self.sharded.load(state)
        else:
            self.model.load_optimizer_state(state)

    def hellaswag(self, B: int, T: int, *, log=print) -> float:
        """HellaSwag acc_norm with the examples split over the ranks (rank r: the r-th block of ceil(n/N),
        as llm.c's eval loader) and the correct counts summed; one process: evaluate_hellaswag."""
        from llmpy import hellaswag
        if self.comm.size == 1:
            return hellaswag.evaluate_hellaswag(self.model, B, T, log=log)
        examples = hellaswag.read_eval_file(hellaswag.DEFAULT_PATH)
        per = -(-len(examples) // self.comm.size)
        mine = examples[self.comm.rank * per:(self.comm.rank + 1) * per]
        correct = 0
        if mine:
            losses, _ = hellaswag.completion_losses(self.model, mine, B, T)
            correct = int((np.argmin(losses, axis=1) == [ex.label for ex in mine]).sum())
        total = round(self.comm.sum_host(correct))
        log(f"HellaSwag: {total}/{len(examples)} = {total / len(examples):.4f} acc_norm ({self.comm.size} ranks)")
        return total / len(examples)

    def memory_report(self) -> str:
        report = self.model.memory_report()
        if self.sharded is not None:
            report += (f"; ZeRO-1 optimizer state {self.sharded.nbytes() / 2**20:.1f} MiB on this rank "
                       f"(saves {(self.comm.size - 1) * self.sharded.nbytes() / 2**20:.1f} MiB)")
        return report


def effective_stage(zero_stage: int) -> int:
    """The stage that runs for -z: 2 and 3 are not implemented and run stage 0 (as llm.c)."""
    return zero_stage if zero_stage in (0, 1) else 0


def check_resume_settings(out_dir: str, step: int, comm: Communicator, *, zero_stage: int, optimizer: str) -> None:
    """What the header of the checkpoint's state file (rank 0's, read by every rank) says -y 1 needs, each
    said in one line by rank 0 naming both values:
      - the number of processes that wrote it (every rank has its own piece of the optimizer state and
        of the data);
      - the --optimizer that wrote it (AdamW's m and v mean something else to Muon, whose tensors also
        shard differently);
      - on several processes, the same -z (stage 1's state files hold each rank's 1/P share of m and v,
        stage 0's all of them; one process keeps everything under either stage, in the same order)."""
    from llmpy import checkpoint
    from llmpy.data import read_header
    header, _ = read_header(checkpoint.state_path(out_dir, step, 0), "state file")
    written = int(header[checkpoint.SLOT_NUM_PROCESSES])
    if written != comm.size:
        raise RankAgreedError(f"-y 1: the checkpoint at step {step} in {out_dir} was written by {written} "
                              f"process{'es' if written != 1 else ''}, this run has {comm.size}; resume with "
                              f"{written} (mpiexec -n {written} or -pn {written})", rank=comm.rank)
    opt = int(header[checkpoint.SLOT_OPTIMIZER]) - 1          # -1: not recorded (llm.c, older llmpy)
    if opt >= 0 and checkpoint.OPTIMIZERS[opt] != optimizer:
        written = checkpoint.OPTIMIZERS[opt]
        raise RankAgreedError(f"--optimizer {optimizer}: the checkpoint's optimizer state was written by {written}; "
                              f"resume with --optimizer {written}", rank=comm.rank)
    written = int(header[checkpoint.SLOT_ZERO_STAGE]) - 1
    zero_stage = effective_stage(zero_stage)
    if comm.size > 1 and written >= 0 and written != zero_stage:
        raise RankAgreedError(f"-y 1: the checkpoint at step {step} in {out_dir} was written with -z {written}, "
                              f"this run has -z {zero_stage}; resume with -z {written} (-z/--zero-stage)",
                              rank=comm.rank)
