"""The run folder: atomic writes, one live run per folder, status, checkpoints.

Nothing a run writes is ever half there: a file is written to a temporary
name in the same folder, flushed, fsynced and renamed over its final name; a
folder (a checkpoint, the PEFT adapter) is written beside its final name and
renamed into place. So after ``kill -9`` at any instant, or a full disk, a
reader sees the old complete file or the new complete file, never a mix.

A run folder while running, after a crash and when complete::

    runs/<name>/
      lock                    pid and host of the live run (gone when it ends)
      status.json             {"state": "running" | "interrupted" | "failed"
                               | "complete", "round": last checkpointed round, ...}
      config.yaml, costs.json the resolved settings and the cost model
      metrics.jsonl           one record per step and per round (appended)
      checkpoints/round-0003/ the last ``checkpoint.keep`` complete rounds:
        global_adapter.safetensors, training_state.pt
      adapter/                the PEFT adapter (complete runs only)
      summary.json            (complete runs only)

``splitft run --resume runs/<name>`` continues from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "training_state.pt"
ADAPTER = "global_adapter.safetensors"


class RunError(RuntimeError):
    """The run folder cannot be used as asked (locked, missing, not writable)."""


# ------------------------------------------------------------ atomic writes
def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets us
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, rename.

    If ``write`` fails (a full disk, an interrupt), the temporary file is
    removed and ``path`` keeps its old contents.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``path``; on success it replaces ``path``.

    The old folder (if any) is renamed aside, the new one renamed in, and only
    then is the old one deleted: at every instant one complete folder is
    under ``path`` or, for the instant between the two renames, beside it
    under a ``.old`` name that :func:`recover` puts back.
    """
    path = Path(path)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    )
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb+") as h:
                    os.fsync(h.fileno())
        _fsync_dir(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover(folder: Path) -> None:
    """Tidy what a writer killed mid-write left in ``folder``: put back a
    folder :func:`atomic_folder` had moved aside (``.<name>.old``) if its
    new version never arrived, and remove temporaries (``.*.tmp``)."""
    if not folder.is_dir():
        return
    for old in folder.glob(".*.old"):
        path = old.with_name(old.name[1 : -len(".old")])
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def check_writable(folder: Path, need_bytes: int) -> None:
    """Before anything heavy: can we write here, and is there room?

    Raises:
        RunError: naming the folder, with the space needed and free.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise RunError(f"{folder}: cannot write here ({e.strerror})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise RunError(
            f"{folder}: {free / 1e6:.0f} MB free, but this run needs about "
            f"{need_bytes / 1e6:.0f} MB (checkpoints and the adapter); free some "
            "space or lower checkpoint.keep"
        )


# --------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def alive(holder: dict[str, Any]) -> bool:
    """Is the process a lock file names still running? (Another host: assume so.)"""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    return _pid_alive(pid)


class RunLock:
    """``<run>/lock``: one live run per folder.

    Taken with ``O_EXCL``; a lock whose process is gone (on this host) is
    stale and taken over with a warning.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "lock"
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Raises: RunError naming the process that holds the folder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:  # being written this instant, or garbage
                    time.sleep(0.2)
                    other = self.holder() or {}
                pid, host = other.get("pid"), other.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning(
                        "%s: taking over a stale lock of process %s (no longer "
                        "running)",
                        self.path.parent,
                        pid,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunError(
                    f"{self.path.parent} is in use by process {pid} on {host} "
                    f"(lock file {self.path}); pick another name, or wait for it "
                    "to finish"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RunError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------- status
def write_status(folder: Path, state: str, **extra: Any) -> None:
    """``status.json``: what a reader (or ``splitft status``) needs to know."""
    data = {"state": state, "pid": os.getpid(), "updated": time.time(), **extra}
    old = read_status(folder)
    for key in ("round", "checkpoint"):  # keep what the new status does not say
        if key in old and key not in data:
            data[key] = old[key]
    write_json(Path(folder) / "status.json", data)


def read_status(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------ checkpoints


def open_run_dir(run_dir: Path, lock: RunLock, resume: bool) -> Path | None:
    """Lock a run folder, fresh or as left for a resume; the checkpoint to
    resume from (None: start at round 0).

    A fresh run moves an earlier run of the same name aside (nothing is
    lost) unless that run is still live; a resumed one continues in place
    after :func:`recover` has tidied what a kill mid-write left behind.

    Raises:
        RunError: ``resume`` of a folder that is not a run's, or a live run
            of this name.
    """
    check_writable(run_dir.parent, 0)
    if not resume:
        if run_dir.exists():
            lock.acquire()  # refuses a live run of this name
            lock.release()
            keep_previous(run_dir)
        run_dir.mkdir()
        lock.acquire()
        return None
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: not a run folder (no config.yaml)")
    lock.acquire()
    recover(run_dir)
    recover(run_dir / CHECKPOINTS)
    found = checkpoints(run_dir)
    if not found:
        log.warning("%s: no complete checkpoint yet; starting at round 0", run_dir)
        return None
    log.info("resuming %s from %s", run_dir, found[-1])
    return found[-1]


def keep_previous(run_dir: Path) -> None:
    """Move an earlier run of the same name aside rather than mix or lose it."""
    if not run_dir.exists():
        return
    n = 1
    while (old := run_dir.with_name(f"{run_dir.name}.{n}")).exists():
        n += 1
    run_dir.rename(old)
    log.warning("an earlier run %s was moved to %s", run_dir, old)


def checkpoint_name(rnd: int) -> str:
    return f"round-{rnd:04d}"


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries are never listed)."""
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("round-")
        and (p / STATE).is_file()
        and (p / ADAPTER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    folder: Path,
    rnd: int,
    adapter: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write round ``rnd``'s checkpoint atomically, then keep the newest ``keep``.

    The new checkpoint is complete on disk before any older one is removed,
    so at least one complete checkpoint always exists.
    """
    root = Path(folder) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    path = root / checkpoint_name(rnd)
    with atomic_folder(path) as tmp:
        import torch
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
        save_file(tensors, str(tmp / ADAPTER), metadata={"round": str(rnd)})
        torch.save(state, tmp / STATE)
        fault("checkpoint")
    for old in checkpoints(folder)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(global adapter, training state) of one checkpoint folder."""
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(Path(path) / ADAPTER))
    state = torch.load(Path(path) / STATE, weights_only=True)
    return adapter, state


# ------------------------------------------------------------- fault points
_FAULTS: dict[str, int] = {}
_FAULTS_OFF = [0]  # > 0 inside faults_off()


def fault(point: str) -> None:
    """Signal this process (SIGKILL) at the n-th pass of a named point.

    ``SPLITFT_FAULT=step:5`` kills at the fifth training step,
    ``SPLITFT_FAULT=step:5:SIGTERM`` sends SIGTERM there (and says when, on
    stderr); the crash and stop tests use it to ``kill -9`` or interrupt a
    real run at an exact instant (points: ``step`` (a client's), ``server_step``
    (the server's), ``poll`` (a deployed server holding a client's long poll),
    ``aggregate``, ``eval``, ``checkpoint``, ``export``). Unset, it costs an
    environment lookup.
    """
    spec = os.environ.get("SPLITFT_FAULT")
    if not spec or _FAULTS_OFF[0]:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    n, _, sig = rest.partition(":")
    _FAULTS[point] = _FAULTS.get(point, 0) + 1
    if _FAULTS[point] == int(n or 1):
        if sig:  # the stop tests time the exit from here
            note = f"splitft-fault: {sig} at {spec} t={time.time():.3f}"
            print(note, file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.Signals[sig or "SIGKILL"])


@contextlib.contextmanager
def faults_off() -> Iterator[None]:
    """Fault points pass uncounted inside: the cost probe's server steps are
    not the run's, and a crash test names the run's n-th step."""
    _FAULTS_OFF[0] += 1
    try:
        yield
    finally:
        _FAULTS_OFF[0] -= 1
