"""Folders (and files: `atomic_file`) that appear whole or not at all: build under a temporary
sibling name, then rename.

A reader never sees half a folder: `atomic_dir` yields an empty temporary sibling of the target
(``.NAME.tmp-PID``), and only when the block finishes without error does it take the target's
place (`replace_dir`: an existing target is moved aside first and removed after). On any error,
``KeyboardInterrupt`` included, the temporary folder is removed and the target is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_files(folder: Path) -> None:
    """Flush every file below ``folder`` to disk (so a rename after it never exposes empty files)."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed after."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out`` as a whole.

    ``fsync``: flush its files to disk before the rename (checkpoints, adapters).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_files(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``out`` (``.NAME.tmp-PID``); when the block
    finishes without error it is flushed to disk and renamed onto ``out``, else removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
