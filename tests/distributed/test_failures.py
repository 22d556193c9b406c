"""What a job of several processes does when one fails, and the multi-node rendezvous, on the tiny
model (2 layers) so that each run takes seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine.run.checkpoint import latest_checkpoint, read_state
from tests.distributed.launch import (
    ROOT,
    TORCHRUN,
    env,
    losses,
    metrics,
    run_single,
    start_torchrun,
    stop,
    train_args,
    wait_for,
)
from tests.tolerances import assert_close


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    out.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:16]) + "\n")
    return out


def flags(**extra) -> dict:
    return dict(dict(max_steps=3, batch_size=1, max_len=128, lr=1e-3, lora_r=4, seed=5, log_every=1), **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_saved_step(out: Path) -> int:
    """The step of the newest complete checkpoint in ``out`` (0 before the first), from the folder
    names: polling for one given step would miss it when it is pruned (--keep-checkpoints 2) within
    two fast steps."""
    folder = out / "checkpoints"
    steps = [int(p.name.removeprefix("step-")) for p in folder.glob("step-*")] if folder.is_dir() else []
    return max(steps, default=0)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` started by ``launcher`` (from /proc: RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_kill_9_of_rank_1_stops_rank_0_and_keeps_the_last_checkpoint(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data, out, **flags(max_steps=100000, save_every=1, epochs=1000))
    launcher = start_torchrun(args)
    try:
        wait_for(launcher, lambda: newest_saved_step(out) >= 3)
        victim = rank_pid(launcher, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=120)  # no hang on a collective
        assert time.monotonic() - killed < 120
    finally:
        stop(launcher)
    assert code != 0
    assert not (out / "run_complete.json").exists()
    last = latest_checkpoint(out)
    step = read_state(last)["step"]
    assert step >= 3
    # the last complete checkpoint loads: one process (grad-accum 2: the same steps) continues it
    resumed = train_args(tiny_model_dir, data, out, **flags(max_steps=step + 1, grad_accum=2, resume=True))
    run_single(resumed)
    assert metrics(out, "train")[-1]["step"] == step + 1


def test_two_nodes_meet_through_the_c10d_rendezvous(tiny_model_dir, data, tmp_path):
    """Two torchrun launchers of one process each (two "nodes" on 127.0.0.1) form one job of 2 ranks:
    its losses are those of one process with --grad-accum 2."""
    port = free_port()
    args = train_args(tiny_model_dir, data, tmp_path / "nodes", **flags(distributed="ddp"))
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-job", "-m", "engine.train",
                               *args], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        errors = [node.communicate(timeout=300)[1] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    line, = metrics(tmp_path / "nodes", "distributed")
    assert line["world_size"] == 2
    run_single(train_args(tiny_model_dir, data, tmp_path / "one", **flags(grad_accum=2)))
    assert_close(losses(tmp_path / "nodes"), losses(tmp_path / "one"), torch.float32, name="2 nodes")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny_model_dir, data, tmp_path):
    """The ranks agree on a stop at each step boundary: SIGTERM to rank 1 alone makes both save one
    checkpoint and exit with EXIT_PREEMPTED (no rank left waiting in a collective)."""
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data, out, **flags(max_steps=100000, epochs=1000, save_every=0))
    launcher = start_torchrun(args)
    try:
        wait_for(launcher, lambda: (out / "metrics.jsonl").is_file() and len(metrics(out, "train")) >= 2)
        os.kill(rank_pid(launcher, 1), signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        stop(launcher)
    assert launcher.returncode != 0
    assert stderr.count("exitcode  : 75") == 2 or ("rank 0: stopped: SIGTERM" in stderr and
                                                   "rank 1: stopped: SIGTERM" in stderr), stderr[-3000:]
    saved = read_state(latest_checkpoint(out))["step"]
    assert metrics(out, "train")[-1]["step"] == saved  # the step both ranks stopped at
