"""llm.c model and training-state files, checkpoint naming, resume and retention.

Model file (llmc-facts.md §1): 256 int32 header (magic 20240326, version 3 = fp32 or 5 = bf16,
maxT, V, L, NH, C, Vp), then every parameter back to back in `model.param_shapes` order.
State file (§2.2): 256 int32 header (magic 20240527, version 1, step, rng states, loader position),
then AdamW m and v, the optional fp32 master weights and, when the train loader shuffles, its
permutations and Mersenne-Twister state. Files are written atomically and a `DONE_%08d` marker is
written last, so a directory never advertises a half-written checkpoint (§2.1, §2.3, §2.4). Files holding
NaN/Inf are neither written nor loaded; `-y 1` resumes from the newest DONE_ step whose files load
(find_resume_point), skipping damaged ones.
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
from dataclasses import dataclass

import numpy as np

from llmpy.data import HEADER_BYTES, atomic_write, read_header
from llmpy.dist.comm import RankAgreedError
from llmpy.errors import LlmpyError
from llmpy.model import GPTConfig, num_parameters
from llmpy.rng import MT_STATE_BYTES

MODEL_MAGIC = 20240326
MODEL_VERSIONS = {3: "fp32", 5: "bf16"}          # header version -> payload dtype
STATE_MAGIC = 20240527
STATE_VERSION = 1
CONVERT_CHUNK = 1 << 24                          # elements per bf16 conversion chunk (bounded memory)

# -------------------------------------------------------------------------------------------------
# bfloat16 <-> float32 (bit patterns; bf16 is the upper half of an fp32)


def f32_to_bf16_bits(a) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the uint16 bit patterns.

    Overflow rounds to +-inf as in hardware; NaNs stay NaN (quieted, sign kept).
    """
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))   # NaN may wrap; fixed below
    out = (rounded >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_bits_to_f32(u) -> np.ndarray:
    """Widen uint16 bfloat16 bit patterns to float32 (exact)."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def count_nonfinite(a) -> int:
    """How many NaN/Inf values `a` holds (in chunks, so a 124M-parameter check needs no big temporary)."""
    flat = np.asarray(a).reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + CONVERT_CHUNK])))
               for i in range(0, flat.size, CONVERT_CHUNK))


def require_finite(what: str, **arrays) -> None:
    """LlmpyError when any of the named arrays (None skipped) holds NaN or Inf."""
    bad = {name: n for name, a in arrays.items() if a is not None and (n := count_nonfinite(a))}
    if bad:
        raise LlmpyError(f"{what}: " + ", ".join(f"{n:,} non-finite values (NaN/Inf) in {name}"
                                                for name, n in bad.items()))


# -------------------------------------------------------------------------------------------------
# Model files


def read_model_header(path: str) -> tuple[GPTConfig, int]:
    """Validate an llm.c model file's header and size; return (config, version 3 or 5)."""
    h, size = read_header(path, "model file")
    if h[0] != MODEL_MAGIC:
        raise LlmpyError(f"{path}: bad magic {h[0]} (expected {MODEL_MAGIC}); not an llm.c model file")
    version = int(h[1])
    if version not in MODEL_VERSIONS:
        raise LlmpyError(f"{path}: model version {version} is not supported (3 = fp32 or 5 = bf16; "
                         f"re-export older files with llm.c's train_gpt2.py)")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    try:
        cfg = GPTConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L,
                        num_heads=NH, channels=C)
    except ValueError as e:
        raise LlmpyError(f"{path}: invalid model header: {e}") from None
    itemsize = 4 if version == 3 else 2
    expected = HEADER_BYTES + num_parameters(cfg) * itemsize
    if size != expected:
        raise LlmpyError(f"{path}: file is {size} bytes but its header describes {num_parameters(cfg)} "
                         f"{MODEL_VERSIONS[version]} parameters ({expected} bytes); truncated or corrupt")
    return cfg, version


def model_file_size(cfg: GPTConfig, dtype: str = "fp32") -> int:
    """Bytes of a model file: header + N parameters of 4 (fp32) or 2 (bf16) bytes."""
    return HEADER_BYTES + num_parameters(cfg) * {"fp32": 4, "bf16": 2}[dtype]


def load_model(path: str) -> tuple[GPTConfig, np.ndarray]:
    """Read an fp32 (v3) or bf16 (v5) model file; return (config, flat float32 parameters)."""
    cfg, version = read_model_header(path)
    n = num_parameters(cfg)
    if version == 3:
        params = np.fromfile(path, dtype="<f4", count=n, offset=HEADER_BYTES)
    else:
        raw = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
        params = np.empty(n, dtype=np.float32)
        for i in range(0, n, CONVERT_CHUNK):
            params[i:i + CONVERT_CHUNK] = bf16_bits_to_f32(raw[i:i + CONVERT_CHUNK])
    require_finite(f"{path}: refusing a damaged model", parameters=params)
    return cfg, params.astype(np.float32, copy=False)


def model_header(cfg: GPTConfig, version: int) -> np.ndarray:
    """The 256-slot int32 header llm.c writes: slots 0..7 filled, the rest zero."""
    h = np.zeros(256, dtype="<i4")
    h[:8] = (MODEL_MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads,
             cfg.channels, cfg.padded_vocab_size)
    return h


def save_model(path: str, cfg: GPTConfig, flat_params, *, dtype: str = "fp32") -> None:
    """Write an llm.c model file (dtype "fp32" -> version 3, "bf16" -> version 5), atomically."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    params = np.ascontiguousarray(flat_params, dtype=np.float32).reshape(-1)
    if params.size != num_parameters(cfg):
        raise ValueError(f"{path}: {params.size} parameters given, config needs {num_parameters(cfg)}")
    if dtype == "fp32":
        chunks = [model_header(cfg, 3), params]
    else:
        chunks = [model_header(cfg, 5)]
        chunks += (f32_to_bf16_bits(params[i:i + CONVERT_CHUNK]) for i in range(0, params.size, CONVERT_CHUNK))
    atomic_write(path, chunks)


# -------------------------------------------------------------------------------------------------
# State files: slot numbers of the int32 header (uint64 values take two slots)

SLOT_NUM_PROCESSES, SLOT_RANK, SLOT_MASTER, SLOT_SHUFFLE, SLOT_STEP = 2, 3, 4, 5, 10
SLOT_ZERO_STAGE = 6    # llmpy's: ZeRO stage + 1 (0: not recorded, as in llm.c's files); llm.c leaves it zero
SLOT_OPTIMIZER = 7     # llmpy's: 1 + the index in OPTIMIZERS (0: not recorded); llm.c leaves it zero
OPTIMIZERS = ("adamw", "muon")
SLOT_RNG, SLOT_RNG_LAST_UPDATE, SLOT_SHARD_IDX, SLOT_SAMPLE_IDX = 20, 22, 30, 32


def save_state(path: str, *, step: int, m, v, master=None, rng_state: int, rng_state_last_update: int,
               loader_state: dict | None = None, num_processes: int = 1, rank: int = 0,
               zero_stage: int | None = None, optimizer: str | None = None) -> None:
    """Write an llm.c state file (optimizer moments, master weights, rng and loader state) atomically.
    zero_stage (0 or 1, if given) is recorded in slot 6 as stage + 1 and optimizer ('adamw' or 'muon') in
    slot 7, so `-y 1` can say which -z and --optimizer wrote it.

    `loader_state` is `DataLoader.state_dict()`; its permutations and generator are stored only
    when the loader shuffles (llm.c writes the shuffle section only then).
    """
    m = np.ascontiguousarray(m, dtype=np.float32).reshape(-1)
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if m.size != v.size or (master is not None and np.size(master) != m.size):
        raise ValueError(f"{path}: m, v and master must have the same size")
    ls = loader_state or {"current_shard_idx": 0, "current_sample_idx": 0, "shuffle": False}
    shuffle = bool(ls["shuffle"])
    header = bytearray(HEADER_BYTES)
    for slot, value in ((0, STATE_MAGIC), (1, STATE_VERSION), (SLOT_NUM_PROCESSES, num_processes),
                        (SLOT_RANK, rank), (SLOT_MASTER, int(master is not None)),
                        (SLOT_SHUFFLE, int(shuffle)), (SLOT_STEP, step),
                        (SLOT_ZERO_STAGE, 0 if zero_stage is None else zero_stage + 1),
                        (SLOT_OPTIMIZER, 0 if optimizer is None else OPTIMIZERS.index(optimizer) + 1)):
        struct.pack_into("<i", header, 4 * slot, value)
    for slot, value in ((SLOT_RNG, rng_state), (SLOT_RNG_LAST_UPDATE, rng_state_last_update),
                        (SLOT_SHARD_IDX, ls["current_shard_idx"]), (SLOT_SAMPLE_IDX, ls["current_sample_idx"])):
        struct.pack_into("<Q", header, 4 * slot, value)
    chunks = [header, m, v]
    if master is not None:
        chunks.append(np.ascontiguousarray(master, dtype=np.float32).reshape(-1))
    if shuffle:
        shard_perm = np.ascontiguousarray(ls["shard_perm"], dtype="<i4")
        intra_perm = np.ascontiguousarray(ls["intra_perm"], dtype="<i4")
        if len(ls["rng"]) != MT_STATE_BYTES:
            raise ValueError(f"{path}: loader rng state must be {MT_STATE_BYTES} bytes")
        chunks += [struct.pack("<Q", shard_perm.size), shard_perm,
                   struct.pack("<Q", intra_perm.size), intra_perm, ls["rng"]]
    atomic_write(path, chunks)


def load_state(path: str, *, num_parameters: int, num_processes: int | None = None,
               rank: int | None = None) -> dict:
    """Read and validate a state file written by `save_state` or llm.c.

    Returns a dict with the keys of `save_state` plus num_processes and rank; `loader_state` is
    always a dict (position zero if none was saved). Pass num_processes/rank to require a match.
    """
    h, size = read_header(path, "state file")
    if h[0] != STATE_MAGIC:
        raise LlmpyError(f"{path}: bad magic {h[0]} (expected {STATE_MAGIC}); not an llm.c state file")
    if h[1] != STATE_VERSION:
        raise LlmpyError(f"{path}: state version {h[1]} is not supported (expected {STATE_VERSION})")
    for slot, want, name in ((SLOT_NUM_PROCESSES, num_processes, "num_processes"), (SLOT_RANK, rank, "rank")):
        if want is not None and h[slot] != want:
            raise LlmpyError(f"{path}: written with {name}={h[slot]}, this run has {name}={want}")
    hb = h.tobytes()
    u64 = lambda slot: struct.unpack_from("<Q", hb, 4 * slot)[0]  # noqa: E731
    has_master, shuffle = bool(h[SLOT_MASTER]), bool(h[SLOT_SHUFFLE])
    n_arrays = 3 if has_master else 2
    offset = HEADER_BYTES + 4 * num_parameters * n_arrays
    if size < offset or (not shuffle and size != offset):
        raise LlmpyError(f"{path}: file is {size} bytes, expected {offset} for {num_parameters} "
                         f"parameters ({'m, v, master' if has_master else 'm, v'}"
                         f"{' + shuffle state' if shuffle else ''}); truncated or wrong model")
    arrays = [np.fromfile(path, dtype="<f4", count=num_parameters, offset=HEADER_BYTES + 4 * num_parameters * i)
              for i in range(n_arrays)]
    loader_state = {"current_shard_idx": u64(SLOT_SHARD_IDX), "current_sample_idx": u64(SLOT_SAMPLE_IDX),
                    "shuffle": shuffle, "shard_perm": None, "intra_perm": None, "rng": None}
    if shuffle:
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        try:
            (n_shards,) = struct.unpack_from("<Q", tail, 0)
            pos = 8 + 4 * n_shards
            shard_perm = np.frombuffer(tail, dtype="<i4", count=n_shards, offset=8)
            (n_samples,) = struct.unpack_from("<Q", tail, pos)
            intra_perm = np.frombuffer(tail, dtype="<i4", count=n_samples, offset=pos + 8)
            pos += 8 + 4 * n_samples
        except (struct.error, ValueError):
            raise LlmpyError(f"{path}: shuffle section is truncated") from None
        if len(tail) != pos + MT_STATE_BYTES:
            raise LlmpyError(f"{path}: shuffle section is {len(tail)} bytes, expected {pos + MT_STATE_BYTES} "
                             f"for {n_shards} shards and {n_samples} samples; truncated or corrupt")
        loader_state.update(shard_perm=shard_perm.astype(np.int32), intra_perm=intra_perm.astype(np.int32),
                            rng=bytes(tail[pos:]))
    require_finite(f"{path}: refusing a damaged state file", m=arrays[0], v=arrays[1],
                   master=arrays[2] if has_master else None)
    return {"step": int(h[SLOT_STEP]), "m": arrays[0], "v": arrays[1],
            "master": arrays[2] if has_master else None,
            "rng_state": u64(SLOT_RNG), "rng_state_last_update": u64(SLOT_RNG_LAST_UPDATE),
            "loader_state": loader_state, "num_processes": int(h[SLOT_NUM_PROCESSES]), "rank": int(h[SLOT_RANK])}


# -------------------------------------------------------------------------------------------------
# Checkpoint directory: names, DONE markers, retention


def model_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"model_{step:08d}.bin")


def model_dir_path(out_dir: str, step: int) -> str:
    """The checkpoint directory of model families other than GPT-2 (llmpy/families.py)."""
    return os.path.join(out_dir, f"model_{step:08d}")


def saved_model_path(out_dir: str, step: int) -> str:
    """Where step's model was written: its directory if there is one, else the .bin file."""
    path = model_dir_path(out_dir, step)
    return path if os.path.isdir(path) else model_path(out_dir, step)


def state_path(out_dir: str, step: int, rank: int = 0) -> str:
    return os.path.join(out_dir, f"state_{step:08d}_{rank:05d}.bin")


def done_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"DONE_{step:08d}")


def done_steps(out_dir: str) -> list[int]:
    """The steps with a DONE marker in out_dir, newest first (where `-y 1` looks)."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    return sorted((int(n[5:]) for n in names if n.startswith("DONE_") and n[5:].isdigit()), reverse=True)


def latest_done_step(out_dir: str) -> int | None:
    """The largest step with a DONE marker in out_dir, or None."""
    return next(iter(done_steps(out_dir)), None)


def mark_done(out_dir: str, step: int) -> None:
    """Write the empty DONE marker of `step` (after every file of that step is on disk)."""
    atomic_write(done_path(out_dir, step), [])


def write_checkpoint(out_dir: str, step: int, cfg: GPTConfig, params, *, dtype: str = "fp32",
                     rank: int = 0, num_processes: int = 1, done: bool = True, **state) -> None:
    """Write model (rank 0), this rank's state file, then the DONE marker (rank 0, if `done`).

    `state` holds the keyword arguments of `save_state` (m, v, master, rng_state, ...). With
    several processes pass done=False and call `mark_done` on rank 0 after a barrier, as llm.c does.
    A model or state holding NaN/Inf is refused (LlmpyError) before anything is written.
    """
    require_finite(f"step {step}: not writing a checkpoint", parameters=params if rank == 0 else None,
                   m=state.get("m"), v=state.get("v"), master=state.get("master"))
    os.makedirs(out_dir, exist_ok=True)
    if rank == 0 and not isinstance(cfg, GPTConfig):    # another family's directory format
        from llmpy.families import save_model_dir
        save_model_dir(model_dir_path(out_dir, step), cfg, params)
    elif rank == 0:
        save_model(model_path(out_dir, step), cfg, params, dtype=dtype)
    save_state(state_path(out_dir, step, rank), step=step, num_processes=num_processes, rank=rank, **state)
    if rank == 0 and done:
        mark_done(out_dir, step)


def prune_checkpoints(out_dir: str, step: int, every: int, keep: int, major_every: int = 0, *,
                      rank: int = 0) -> int | None:
    """After writing `step`, delete the checkpoint at step - keep*every (llm.c `-nk`), if any.

    Nothing is deleted when keep or every is 0, when the old step is <= 0, or when major_every > 0
    divides it (a major checkpoint). Removes DONE first, then the model and this rank's state file.
    Returns the deleted step or None.
    """
    if keep <= 0 or every <= 0:
        return None
    old = step - keep * every
    if old <= 0 or (major_every > 0 and old % major_every == 0):
        return None
    paths = [done_path(out_dir, old), model_path(out_dir, old)] if rank == 0 else []
    for p in paths + [state_path(out_dir, old, rank)]:
        if os.path.exists(p):
            os.remove(p)
    if rank == 0 and os.path.isdir(model_dir_path(out_dir, old)):
        shutil.rmtree(model_dir_path(out_dir, old))
    return old


# -------------------------------------------------------------------------------------------------
# Resume: the newest checkpoint that loads


@dataclass
class ResumePoint:
    """What `-y 1` resumes from: the step, the model (config, host fp32 parameters) and this rank's state."""
    step: int
    gpt_cfg: GPTConfig
    params: np.ndarray
    state: dict


def find_resume_point(out_dir: str, comm, *, load=None, zero_stage: int = 0, optimizer: str = "adamw",
                      log=print) -> ResumePoint | None:
    """The newest checkpoint in -o whose model and state files (this rank's) load on every rank; a damaged
    one is skipped with a line saying why. None, with a line, when there is none yet. A checkpoint of
    another number of processes is an error, not damage. load(path) -> (config, params) reads the model
    (default: load_model; the trainer passes llmpy.families' loader, which also reads nanochat directories)."""
    load = load or load_model
    from llmpy.dist.zero import check_resume_settings
    steps = done_steps(out_dir)
    if not steps:
        log(f"-y 1: no checkpoint in {out_dir} yet: starting at step 0")
        return None
    for step in steps:
        path, problem = saved_model_path(out_dir, step), None
        try:
            gpt_cfg, params = load(path)
            check_resume_settings(out_dir, step, comm, zero_stage=zero_stage, optimizer=optimizer)
            # floats per array in this rank's state: all of them, or under ZeRO-1 its 1/P share
            numel = params.size // comm.size if zero_stage == 1 else params.size
            state = load_state(state_path(out_dir, step, comm.rank), num_parameters=numel,
                               num_processes=comm.size, rank=comm.rank)
        except RankAgreedError:
            raise
        except LlmpyError as e:
            problem = str(e)
            if comm.rank > 0:   # the log is rank 0's: this rank names its own file
                print(f"llmpy train: rank {comm.rank}: -y 1: skipping the checkpoint of step {step}: {problem}",
                      file=sys.stderr)
        if comm.sum_host(1.0 if problem else 0.0) > 0:    # every rank skips it when one rank cannot read it
            log(f"-y 1: skipping the checkpoint of step {step}: {problem or 'damaged on another rank'}")
            continue
        log(f"resuming from {path} (step {step})")
        return ResumePoint(step, gpt_cfg, params, state)
    raise RankAgreedError(f"-y 1: none of the {len(steps)} checkpoints in {out_dir} can be read (see above)",
                          rank=comm.rank)
