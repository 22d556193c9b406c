"""The output folder of a training run: what it holds, when it may be reused, and the lineage record.

    OUTPUT/
      config.json          the run's full TrainConfig
      data_report.json     what happened to every data file (kept, truncated, skipped...)
      metrics.jsonl        one JSON line per logged step / eval / skipped step
      checkpoints/         resumable checkpoints (engine.checkpoint)
      adapter/             the final PEFT-format adapter (with lineage metadata)
      loss.png             the loss curve
      run_complete.json    written last: the run finished

A folder holding a finished run is never reused without ``--overwrite``; one holding an
unfinished run needs ``--resume`` (continue) or ``--overwrite`` (start again).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import InputError

COMPLETE = "run_complete.json"
OWNED = ("config.json", "data_report.json", "metrics.jsonl", "checkpoints", "adapter", "loss.png", COMPLETE)


def prepare_output_dir(output: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Check that the folder may be used as asked; with ``overwrite``, remove what a run wrote there.

    Only checks and deletions happen here; nothing is created until the data and model are loaded.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out}: exists and is not a folder")
    finished = (out / COMPLETE).is_file()
    started = any((out / name).exists() for name in OWNED)
    if resume:
        if overwrite:
            raise InputError("--resume and --overwrite contradict each other: choose one")
        if finished:
            raise InputError(f"--output {out}: the run there already finished; nothing to resume")
        return
    if started and not overwrite:
        what = "a finished run" if finished else "an unfinished run (use --resume to continue it)"
        raise InputError(f"--output {out}: holds {what}; pass --overwrite to replace it")
    if overwrite:
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lineage(*, method: str, base_model: str, data_files: list[str], steps: int,
            parent_adapter: str | None, parent_lineage: dict | None) -> dict[str, Any]:
    """The record stored in an adapter's metadata so a chain of runs can be traced back.

    ``parent`` nests the starting adapter's own record (None for a fresh adapter).
    """
    return {
        "method": method,
        "base_model": base_model,
        "data": [{"path": str(Path(f).resolve()), "sha256": file_sha256(f)} for f in data_files],
        "steps": steps,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent_adapter": str(Path(parent_adapter).resolve()) if parent_adapter else None,
        "parent": parent_lineage,
    }
