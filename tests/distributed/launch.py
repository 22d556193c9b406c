"""Running `engine.train` as the tests of the distributed path need: in one process, or under
torchrun on this machine's CPUs (gloo), one thread per process (CI has two cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def train_args(model: Path, data: Path, output: Path, **flags) -> list[str]:
    """engine.train's flags: ``flag_name=value`` (True: a bare switch)."""
    args = ["--model", str(model), "--data", str(data), "--output", str(output), "--device", "cpu"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def run_single(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return _check(subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=ROOT, env=env(),
                                 capture_output=True, text=True, timeout=timeout))


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "engine.train", *args]
    return _check(subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout))


def start_torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """A torchrun job left running, in a process group of its own (`stop` ends torchrun and its
    workers together; stderr kept for the failure message)."""
    return subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "engine.train", *args],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(job: subprocess.Popen) -> None:
    """SIGKILL to the job's whole process group: killing torchrun alone would leave its workers running."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has already ended
        pass
    job.wait()


def wait_for(job: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Poll until ``ready()``. If the job ends first or the time runs out, stop it (its stderr can
    then be read to the end without waiting on a live process) and fail with its stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        ended = job.poll() is not None
        if ended or time.monotonic() >= deadline:
            stop(job)
            what = f"the job ended (exit {job.returncode})" if ended else f"not ready after {timeout:g} s"
            raise AssertionError(f"{what}\n{job.stderr.read()[-3000:]}")
        time.sleep(0.2)


def _check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    return done


def metrics(output: Path, kind: str) -> list[dict]:
    text = (output / "metrics.jsonl").read_text()
    complete = text[:text.rfind("\n") + 1]  # a line being written by a running job is not read yet
    lines = [json.loads(line) for line in complete.splitlines()]
    return [r for r in lines if r["kind"] == kind]


def losses(output: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in metrics(output, "train")], dtype=torch.float64)


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))
