"""One writer per output folder: an exclusive OS lock on ``FOLDER/.lock`` for the process's life.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on an open file: the kernel releases it when the process
exits, however it exits (``kill -9`` included), so a crash never leaves a stale lock behind that
would block ``--resume``. The file holds the holder's PID, which a refused second writer names.
The file itself is never removed while in use (removing it would let a second process lock a new
file of the same name while the first still holds the old one); after locking, the holder checks
that the path still names the file it locked, and retries otherwise.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from engine.errors import InputError

LOCK_NAME = ".lock"


class FolderLock:
    """``with FolderLock(folder, what="--output"):`` — or `acquire` / `release`."""

    def __init__(self, folder: str | os.PathLike, what: str = "--output"):
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise `InputError` naming the PID that holds it. The folder must exist."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.refuse_if_held()
                continue  # released in between: try again
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was replaced between open and lock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def holder(self) -> int | None:
        """The PID of the process holding the lock now (0 when unknown), or None when it is free;
        nothing is created or changed (a shared probe on the existing file, dropped at once)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        finally:
            os.close(fd)  # closing drops a probe lock we got
        return None

    def refuse_if_held(self) -> None:
        """InputError naming the holder's PID when another process holds the lock."""
        pid = self.holder()
        if pid is not None:
            who = f"PID {pid}" if pid else "another process"
            raise InputError(f"{self.what} {self.path.parent}: in use by another run ({who}); wait for it "
                             "to finish or choose another folder")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
