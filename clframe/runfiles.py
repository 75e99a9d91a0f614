"""The files a run owns on disk, and the guards around them: write probes made before a run opens,
the lock that lets one process at a time drive a run, cross-process locks for store creation,
and the kill points the tests inject.

Kept free of torch and mlflow imports: ``clframe compare`` and the tracker use it too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from clframe.errors import ClframeError

LOCK_NAME = ".lock"
ENDED = b"ended\n"  # what a lock file says once its run was closed in its store
KILL_ENV = "CLFRAME_TEST_KILL_AT"  # tests only: NAME or NAME@SIGNAL (SIGKILL by default)


def kill_point(name: str) -> None:
    """Let a test stop this process at a named point, deterministically (not by timing luck).

    ``CLFRAME_TEST_KILL_AT=after_task_1@SIGSTOP`` sends SIGSTOP to this process at the point
    ``after_task_1``; without ``@`` the signal is SIGKILL. Unset (always, outside tests): nothing."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, signal_name = wanted.partition("@")
    if point == name:
        os.kill(os.getpid(), signal.Signals[signal_name or "SIGKILL"])


# ----- write probes -----
def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(directory: Path, what: str, fix: str) -> None:
    """Refuse in one line a folder (or the nearest existing folder above it) that cannot take a new
    file: read-only mounts, permissions, a path under a regular file. A real file is created and
    removed, so root, immutable folders and read-only mounts are all caught."""
    existing = nearest_existing(directory)
    if not existing.is_dir():
        raise ClframeError(f"{what} {directory} cannot be created: {existing} is not a folder; {fix}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".clframe-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ClframeError(f"{what} {directory} is not writable ({exc.strerror} in {existing}); {fix}") from None


def check_writable_file(path: Path, what: str, fix: str) -> None:
    """An existing file must open for writing (nothing is written); a missing one needs its folder."""
    if not path.exists():
        check_writable_dir(path.parent, f"the folder of {what}", fix)
        return
    try:
        with path.open("r+b"):
            pass
    except OSError as exc:
        raise ClframeError(f"{what} {path} is not writable ({exc.strerror}); {fix}") from None
    check_writable_dir(path.parent, f"the folder of {what}", fix)  # sqlite writes its journal beside it


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space or quota (an OSError, or sqlite's 'disk is full' from the store)."""
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(item) or "No space left on device" in str(item):
            return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# ----- locks -----
@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``folder`` itself (no lock file is left behind) while the block
    runs: serialises, across processes, what must not happen twice at once in that folder (MLflow
    creating a new store's tables). Where the folder cannot be locked, the block runs unlocked."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


class RunLock:
    """``<run folder>/.lock``: held (flock) by the one process driving a run, for its lifetime.

    The kernel releases a flock when its process dies, however it dies, so a lock left by a
    killed run never blocks a real resume. The file says who holds it (pid, start time, host) for
    the refusal message. Where flock is unsupported (some network file systems) the pid in the
    file decides: a live process on this host holds the run, a dead one's lock is taken over, and
    a process on another host counts as alive (its pid cannot be checked from here).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.handle: int | None = None

    def holder(self) -> tuple[str, str]:
        """(who holds the lock, in words; its pid or 'PID')."""
        try:
            pid, started, host = self.path.read_text().split()[:3]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
            return f"process {pid} on {host}, started {when}", pid
        except (OSError, ValueError):
            return "another process", "PID"

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return False
        except OSError:  # no flock here: fall back to the pid in the file
            if self._pid_alive():
                os.close(handle)
                return False
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()} {time.time():.0f} {socket.gethostname()}\n".encode())
        self.handle = handle
        return True

    def _pid_alive(self) -> bool:
        """Whether the holder named in the file may still live: its pid answers here, or it ran on
        another host (whose pids this one cannot see); this process itself, or no holder, is not."""
        try:
            pid, _, host = self.path.read_text().split()[:3]
            if host != socket.gethostname():
                return True
            if int(pid) == os.getpid():
                return False
            os.kill(int(pid), 0)
            return True
        except PermissionError:  # a live process of another user
            return True
        except (OSError, ValueError):
            return False

    def acquire(self, run_id: str) -> "RunLock":
        if not self.try_acquire():
            who, pid = self.holder()
            raise ClframeError(f"run {run_id} is being driven by {who} (lock {self.path}); wait for it to end, or "
                               f"stop it (kill {pid}: the run is marked KILLED) and resume then")
        return self

    def release(self, ended: bool = True) -> None:
        """Let go; ``ended``: the run was closed in its store (FINISHED, FAILED or KILLED), which the
        file then says, so that no later run takes it for one whose process died."""
        if self.handle is not None:
            if ended:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.handle, 0)
                    os.pwrite(self.handle, ENDED, 0)
            os.close(self.handle)
            self.handle = None

    def ended(self) -> bool:
        try:
            return self.path.read_bytes().startswith(ENDED)
        except OSError:
            return True  # no lock file: nothing to say about that run

    def blank(self) -> bool:
        """The file names no holder yet: ``try_acquire`` creates it before it takes the flock and writes
        its pid, so an empty file may be a run that is starting right now."""
        try:
            return not self.path.read_bytes().strip()
        except OSError:
            return True


def abandoned_runs(checkpoint_dir: Path) -> Iterator[tuple[str, RunLock]]:
    """Run folders of ``checkpoint_dir`` whose process died without closing its run (kill -9, a
    power cut): yields (run id, its lock, now held by this process; release it). A blank lock file
    is skipped: its run may be starting, between creating the file and locking it."""
    if not checkpoint_dir.is_dir():
        return
    for folder in sorted(checkpoint_dir.iterdir()):
        lock = RunLock(folder)
        if not folder.is_dir() or lock.ended() or lock.blank():
            continue
        try:
            if lock.try_acquire():
                yield folder.name, lock
        except OSError:
            continue


def remove_orphan_temporaries(checkpoint_dir: Path, pattern: str = ".tmp-*.pt") -> list[Path]:
    """Delete half-written checkpoint files (a kill during a write) in every run folder of
    ``checkpoint_dir`` whose run no live process holds; returns what was removed."""
    removed: list[Path] = []
    if not checkpoint_dir.is_dir():
        return removed
    for folder in checkpoint_dir.iterdir():
        orphans = list(folder.glob(pattern)) if folder.is_dir() else []
        if not orphans:
            continue
        lock = RunLock(folder)
        ended = lock.ended()
        try:
            if not lock.try_acquire():
                continue  # a live run owns this folder: its temporary file is being written now
        except OSError:
            continue
        try:
            for path in orphans:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
        finally:
            lock.release(ended=ended)
    return removed
