"""The fault suite: every command given hostile or careless input, through its command line.

Each case asserts the exit code, a one-line message on stderr, and that nothing that existed
before is lost or changed (`snapshot` digests every file under a folder). Most cases run the
command in this process (`cli`: the same ``run_cli(main, argv)`` path as ``python -m``, minus the
interpreter start-up); the ones that need a process of their own (locks held by another run,
signals, memory, resource limits) start one (`cli_process`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"train": "engine.train", "eval": "engine.eval", "merge": "engine.merge", "generate": "engine.generate",
           "export": "engine.export"}


@dataclass
class Result:
    code: int
    stderr: str
    stdout: str

    @property
    def message(self) -> str:
        """The one line a failing command prints (asserting there is exactly one)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.stderr}"
        assert "Traceback" not in self.stderr
        return lines[0]


def cli(command: str, *args: str, capfd) -> Result:
    """Run ``python -m engine.<command> args`` in this process; its exit code and output."""
    import importlib

    from engine.errors import run_cli

    main = importlib.import_module(MODULES[command]).main
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in args])
    out, err = capfd.readouterr()
    return Result(exit_info.value.code or 0, _without_progress(err), out)


def cli_process(command: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", MODULES[command], *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, **kwargs)


def _without_progress(text: str) -> str:
    """stderr without the lines the training CLI prints on purpose before it fails (banner, data)."""
    keep = [line for line in text.splitlines()
            if not line.startswith(("model ", "data: ", "step ", "train:", "resume: "))]
    return "\n".join(keep)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (or "dir") of everything under ``folder``: equal snapshots, nothing changed.

    A run folder's ``.lock`` is left out: it is the lock itself, and holds the PID of its last holder.
    """
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if rel == ".lock":
            continue
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-data") / "qa.jsonl"
    out.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:8]) + "\n")
    return out


def train_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """A short, fast run of the tiny model: 2 steps, rank 2, short samples."""
    return ["--model", model, "--data", data, "--output", output, "--max-steps", "2", "--batch-size", "2",
            "--max-len", "96", "--lora-r", "2", *extra]


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, sft_data, tmp_path_factory) -> Path:
    """A finished run (with a checkpoint at step 1), copied by the tests that need a pristine one."""
    out = tmp_path_factory.mktemp("fault-runs") / "finished"
    result = cli_process("train", *train_args(tiny_model_dir, sft_data, out, "--save-every", "1"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def finished_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "finished"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def unfinished_copy(finished_run, tmp_path) -> Path:
    """An unfinished run: its step-1 checkpoint, and no completion marker; ``--resume`` continues it."""
    copy = tmp_path / "unfinished"
    shutil.copytree(finished_run, copy)
    (copy / "run_complete.json").unlink()
    shutil.rmtree(copy / "adapter")
    return copy


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
