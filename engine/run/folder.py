"""The output folder of a training run: how a run folder is recognised, when it may be reused or
replaced, the lock that makes one run its only writer, and the lineage record.

    OUTPUT/
      .lock                the lock file of the run writing here (`engine.run.lock`)
      run.json             written first by a fresh run: marks the folder as a run folder
      config.json          the run's full TrainConfig
      data_report.json     what happened to every data file (kept, truncated, skipped...)
      metrics.jsonl        one JSON line per logged step / eval / skipped step
      checkpoints/         resumable checkpoints (engine.run.checkpoint)
      adapter/             the final PEFT-format adapter (with lineage metadata)
      loss.png             the loss curve
      run_complete.json    written last: the run finished

A run folder is one holding ``run.json`` (or, from runs made before that marker existed, a
``config.json`` that is a TrainConfig of ours beside a ``metrics.jsonl``). A folder holding a
finished run is never reused without ``--overwrite``; one holding an unfinished run needs
``--resume`` (continue) or ``--overwrite`` (start again). ``--overwrite`` removes only the entries
above that a run writes, only in a run folder, and only once the new run has passed its setup
(`RunFolder.begin`); a folder holding a model, or files of the run's names that no run of ours
wrote, is refused whatever the flags say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.run.lock import LOCK_NAME, FolderLock

MARKER = "run.json"
COMPLETE = "run_complete.json"
OWNED = (MARKER, "config.json", "data_report.json", "metrics.jsonl", "checkpoints", "adapter", "loss.png", COMPLETE)
# What a model folder holds (a base, a merged model, an adapter): a run never writes into one.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
               "adapter_config.json", "adapter_model.safetensors")
_LEGACY_CONFIG_KEYS = {"model", "data", "method", "lora_r", "output"}


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run of ours (see the module docstring)."""
    if (folder / MARKER).is_file():
        return True
    config = folder / "config.json"
    if not (config.is_file() and (folder / "metrics.jsonl").is_file()):
        return False
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and _LEGACY_CONFIG_KEYS <= fields.keys()


def model_files_in(folder: Path) -> list[str]:
    """Names of the model files in ``folder`` (empty: it does not look like a model folder)."""
    found = [name for name in MODEL_FILES if (folder / name).exists()]
    return found or sorted(p.name for p in folder.glob("*.safetensors"))


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


class RunFolder:
    """The output folder of one run: `check` (read only), `claim` (create it if needed and lock
    it), `begin` (a fresh run: clear an old run when overwriting, write the marker), and
    `release` (keep what was written) or `abandon` (setup failed: remove what `claim` created)."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.lock = FolderLock(self.path, what="--output")
        self.created = self.lock_created = False

    def check(self, protect: list[Path]) -> None:
        """Raise `InputError` unless the folder may be used as asked; touches nothing.

        ``protect``: files and folders the run reads (model, data, starting adapter); an
        ``--overwrite`` that would delete one of them is refused.
        """
        out = self.path
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other: choose one")
        if out.exists() and not out.is_dir():
            raise InputError(f"--output {out}: exists and is not a folder")
        if not out.exists():
            if self.resume:
                raise InputError(f"--resume: {out} does not exist; there is no run to continue")
            return
        if self.lock.fd is None:
            self.lock.refuse_if_held()  # another run is writing here: say so before anything else
        models = model_files_in(out) if not is_run_folder(out) else []
        if models:
            raise InputError(f"--output {out}: holds a model ({', '.join(models[:3])}), not a run; a run never "
                             "writes into a model folder: choose another --output")
        for path in protect:
            if path.exists() and is_inside(out, path):
                raise InputError(f"--output {out} lies inside {path}, which this run reads; choose another folder")
        if not is_run_folder(out):
            clash = [name for name in OWNED if (out / name).exists()]
            if clash:
                raise InputError(f"--output {out}: holds {', '.join(clash)} but is not a run folder of ours (no "
                                 f"{MARKER}); nothing there is replaced: choose another --output")
            if self.resume:
                raise InputError(f"--resume: {out} holds no run to continue")
            return
        finished = (out / COMPLETE).is_file()
        if self.resume:
            if finished:
                raise InputError(f"--output {out}: the run there already finished; nothing to resume")
            return
        if not self.overwrite:
            what = "a finished run" if finished else "an unfinished run (use --resume to continue it)"
            raise InputError(f"--output {out}: holds {what}; pass --overwrite to replace it")
        for path in protect:
            doomed = [out / name for name in OWNED if (out / name).exists() and is_inside(path, out / name)]
            if doomed:
                raise InputError(f"--overwrite would delete {doomed[0]}, which holds {path} that this run reads; "
                                 "copy it elsewhere first or choose another --output")

    def claim(self, protect: list[Path]) -> None:
        """Create the folder if needed, take its lock, and check it again under the lock."""
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock_created = not (self.path / LOCK_NAME).exists()
        try:
            self.lock.acquire()
            self.check(protect)  # another run may have changed it since the first check
        except BaseException:
            self.abandon()
            raise

    def begin(self, method: str) -> None:
        """A fresh run passed its setup: clear the old run (``--overwrite``), then mark the folder."""
        if self.overwrite and is_run_folder(self.path):
            for name in OWNED:
                remove(self.path / name)
            for stale in self.path.glob(".adapter.*"):  # leftovers of an interrupted adapter save
                remove(stale)
        write_json(self.path / MARKER, {"format": "lora-engine run", "version": 1, "method": method,
                                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """Setup failed before anything was written: remove the lock file and the folder that
        `claim` created (only if nothing else appeared in it), release the lock."""
        if self.lock_created:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        self.lock.release()
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON atomically (a temporary sibling renamed into place, removed on error)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_file_record(path: str | Path) -> dict[str, str]:
    """``{"path": absolute path, "sha256": hex digest}`` of a data file."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def lineage(*, method: str, base_model: str, data: list[dict[str, str]], steps: int,
            parent_adapter: str | None, parent_lineage: dict | None) -> dict[str, Any]:
    """The record stored in an adapter's metadata so a chain of runs can be traced back.

    ``data``: the `data_file_record` of each data file, hashed once when the run started.
    ``parent`` nests the starting adapter's own record (None for a fresh adapter).
    """
    return {
        "method": method,
        "base_model": base_model,
        "data": data,
        "steps": steps,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent_adapter": str(Path(parent_adapter).resolve()) if parent_adapter else None,
        "parent": parent_lineage,
    }
