"""A run's output folder (-o): one run at a time, which run it holds, leftovers of killed writes, signals.

    out = OutputDir(cfg.output_dir)
    out.check()                      # before anything is written: -o is a folder (or can become one)
    identity = out.check_resume(cfg_dict)   # -y 1: the folder's run.json must describe this run
    out.lock()                       # run.lock, held (flock) until release(): a second run is refused
    out.remove_temp_files(log)       # *.tmp<pid> of writes a kill interrupted
    out.claim(cfg_dict, resume, log) # run.json; a fresh run moves an earlier run's files to previous/<id>/

The lock is an fcntl.flock on an open descriptor, so it dies with its process: a lock left by a killed run
is free at once, and the holder's pid, host and start time written into the file only name it in the error.
A multi-process run takes it on rank 0 only. run.json names the run (an id and the flags that make its
checkpoints resumable); `-y 1` resumes only a folder whose run.json matches, and a fresh run never writes
next to another run's checkpoints: it moves them, with their logs, into previous/<their run id>/ first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import threading
import time

from llmpy.data import TMP_SUFFIX, atomic_write
from llmpy.errors import LlmpyError

LOCK_NAME = "run.lock"
RUN_FILE = "run.json"
ARCHIVE_DIR = "previous"
# what a run writes into -o (moved aside as a whole when a fresh run takes the folder over)
RUN_FILES = re.compile(r"^(main\.log|metrics\.jsonl|loss\.png|run\.json|model_\d{8}(\.bin)?|state_\d{8}_\d{5}\.bin"
                       r"|DONE_\d{8})$")   # model_%08d without .bin: a nanochat checkpoint directory
TEMP_FILE = re.compile(r"^(?P<target>.+)" + re.escape(TMP_SUFFIX) + r"\d*$")   # nanochat's: <dir>.tmp
# the flags a checkpoint's state depends on: resuming with other values would not continue that run
IDENTITY = {"model": "-e", "train_data": "-i", "batch_size": "-b", "seq_len": "-t", "total_batch_size": "-d",
            "overfit_single_batch": "-a"}


def os_error(e: OSError, path: str | None = None) -> LlmpyError:
    """One line for an OSError: the path it concerns and the system's reason (ENOSPC, EROFS, ...)."""
    where = path or e.filename or "?"
    reason = e.strerror or str(e)
    hint = {errno.ENOSPC: "; free some space or choose another -o", errno.EROFS: "; choose a writable -o",
            errno.EDQUOT: "; over the disk quota"}.get(e.errno, "")
    return LlmpyError(f"{where}: {reason}{hint}")


class OutputDir:
    def __init__(self, path: str):
        self.path = path
        self._lock_fd: int | None = None

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---- before anything is written ------------------------------------------------------------------

    def check(self) -> None:
        """-o must be a folder, or a path where one can be made (no file in the way)."""
        p = os.path.abspath(self.path)
        if os.path.exists(p) and not os.path.isdir(p):
            raise LlmpyError(f"-o {self.path}: exists and is not a directory")
        parent = p
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise LlmpyError(f"-o {self.path}: {parent} is a file, so no directory can be made there")

    def read_identity(self) -> dict | None:
        """run.json's contents, or None when the folder has none (a fresh folder, llm.c's, or unreadable)."""
        try:
            with open(self._join(RUN_FILE)) as f:
                ident = json.load(f)
        except (OSError, ValueError):
            return None
        return ident if isinstance(ident, dict) and "run_id" in ident else None

    def check_resume(self, config: dict) -> dict | None:
        """-y 1: the folder's run must be this run (same identity flags). Returns its run.json, if any."""
        ident = self.read_identity()
        if ident is None:
            return None
        saved = ident.get("config", {})
        diff = [f"{flag} {saved.get(k)!r} there, {config[k]!r} here" for k, flag in IDENTITY.items()
                if k in saved and saved[k] != config[k]]
        if diff:
            raise LlmpyError(f"-y 1: -o {self.path} holds run {ident['run_id']}, trained with other flags ("
                             + "; ".join(diff) + "): resume it with its own flags, or leave out -y to start a "
                             "new run there (the old one is moved to previous/)")
        return ident

    # ---- the lock ------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Create -o if needed and take run.lock for the life of this process (or until release())."""
        lock_path = self._join(LOCK_NAME)
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that just started"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LlmpyError(f"-o {self.path}: another run is using this folder ({holder}); wait for it "
                                 f"to finish or choose another -o") from None
            raise os_error(e, lock_path) from None
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError as e:
            os.close(fd)
            raise os_error(e, lock_path) from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # closing drops the flock; the file stays (removing it would race)
            self._lock_fd = None

    # ---- with the lock held ----------------------------------------------------------------------------

    def remove_temp_files(self, log=print) -> list[str]:
        """Delete the `<run file>.tmp<pid>` files that killed atomic writes left in -o (only of the files a
        run writes: a user's own files are never touched); returns their names."""
        removed = [n for n in sorted(os.listdir(self.path))
                   if (m := TEMP_FILE.match(n)) and RUN_FILES.match(m.group("target"))]
        for name in removed:
            path = self._join(name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        if removed:
            log(f"removed {len(removed)} unfinished file(s) of an interrupted write in {self.path}: "
                + ", ".join(removed))
        return removed

    def claim(self, config: dict, *, resume: bool, log=print) -> str:
        """Make -o this run's folder and return its run id. Resuming keeps the folder's run (or adopts
        checkpoints without run.json, e.g. llm.c's); a fresh run first moves another run's files into
        previous/<id>/, so two runs' logs and checkpoints never mix and nothing is deleted."""
        ident = self.read_identity()
        if resume and ident is not None:
            return ident["run_id"]
        old_files = [n for n in os.listdir(self.path) if RUN_FILES.match(n)]
        if old_files == [RUN_FILE]:   # a run that stopped before writing anything: nothing worth keeping
            old_files = []
        if not resume and old_files:
            old_id = ident["run_id"] if ident else time.strftime(
                "unknown-%Y%m%d-%H%M%S", time.localtime(max(os.path.getmtime(self._join(n)) for n in old_files)))
            dest = self._unique(os.path.join(self.path, ARCHIVE_DIR, old_id))
            try:
                os.makedirs(dest)
                for name in old_files:
                    os.rename(self._join(name), os.path.join(dest, name))
            except OSError as e:
                raise os_error(e, dest) from None
            log(f"-o {self.path} held an earlier run ({len(old_files)} files): moved to {dest}")
        elif resume and old_files:
            log(f"-y 1: {self.path} has no {RUN_FILE} (llm.c's or an older llmpy's run): adopting it")
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        record = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}
        atomic_write(self._join(RUN_FILE), [json.dumps(record, indent=1).encode() + b"\n"])
        return run_id

    @staticmethod
    def _unique(path: str) -> str:
        candidate, i = path, 1
        while os.path.exists(candidate):
            i += 1
            candidate = f"{path}-{i}"
        return candidate


def config_record(cfg) -> dict:
    """A dataclass config as a JSON-able dict (what run.json stores)."""
    return dataclasses.asdict(cfg)


def new_run_dir(root: str = "runs") -> str:
    """A folder name under root that does not exist yet: root/YYYYmmdd-HHMMSS (-2, -3, ... if taken)."""
    return OutputDir._unique(os.path.join(root, time.strftime("%Y%m%d-%H%M%S")))


# -------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, checkpoint, exit 128 + signum


class Interrupted(LlmpyError):
    """The run stopped on a signal after saving what it had; the CLI exits 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class SignalStop:
    """While active, SIGTERM and SIGINT only set `signum`; the training loop reads it at step boundaries.
    The previous handlers come back at the first signal, so a second one acts at once (atomic writes
    keep the folder consistent even then). Signals the parent set to be ignored stay ignored."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                prev = signal.getsignal(sig)
                if prev is not signal.SIG_IGN:
                    self._previous[sig] = prev
                    signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.pop(signum))

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


# -------------------------------------------------------------------------------------------------
# The end of a run: what it left and what to run next


def report_run(out_dir: str, *, resume_command: str, log=print) -> None:
    """Draw out_dir/loss.png (or say in one line what to install), then list what the run kept and the
    commands to sample from it, plot it and resume it."""
    from llmpy.checkpoint import latest_done_step, saved_model_path
    from llmpy.plot import plot_run_dir
    try:
        png = plot_run_dir(out_dir)
    except LlmpyError as e:
        png = None
        log(f"no loss.png: {e}")
    step = latest_done_step(out_dir)
    model = saved_model_path(out_dir, step) if step is not None else None
    kept = [p for p in (model, os.path.join(out_dir, "main.log"), os.path.join(out_dir, "metrics.jsonl"),
                        png and str(png)) if p and os.path.exists(p)]
    q = shlex.quote
    log(f"run kept in {out_dir}: " + ", ".join(os.path.basename(p) for p in kept)
        + ("" if model else " (no checkpoint: give -n N to keep the model)"))
    log("next:")
    if model:
        log(f"  llmpy sample -e {q(model)} --prompt 'The' -n 64     # text from the trained model")
    log(f"  python scripts/plot_log.py {q(out_dir)} --out loss.png   # the loss curve; add other runs to compare")
    log(f"  {resume_command}     # resume after an interruption (a larger -x trains on)")
