"""Faults that need a process of their own: one writer per output folder, a lock that dies with
its holder, a full disk, a read-only folder, a run that never takes a good step, memory bounded
by --max-len rather than by the size of a record."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.loading import save_model
from tests.faults.conftest import ROOT, cli_process, snapshot, train_args
from tools.random_checkpoint import random_model


def start_long_run(model: Path, data: Path, out: Path) -> subprocess.Popen:
    """A run that takes long enough to be caught in the middle; returns once it holds its lock."""
    args = train_args(model, data, out)
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", *map(str, args)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.2)
    return proc


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith(("model ", "data: "))]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "busy"
    proc = start_long_run(tiny_model_dir, sft_data, out)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            result = cli_process("train", *train_args(tiny_model_dir, sft_data, out), *extra)
            assert result.returncode == 2, result.stderr
            assert f"in use by another run (PID {proc.pid})" in one_line(result)
        assert (out / "config.json").is_file() and (out / "run.json").is_file()  # the holder's files are intact
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 75  # it stopped on its own terms, with a checkpoint


def test_kill_9_leaves_no_lock_behind(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "killed"
    proc = start_long_run(tiny_model_dir, sft_data, out)
    proc.send_signal(signal.SIGTERM)  # first a checkpoint to resume from
    assert proc.wait(timeout=120) == 75
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", *map(str, train_args(tiny_model_dir, sft_data, out)),
                             "--resume", "--max-steps", "100000"], cwd=ROOT, stderr=subprocess.DEVNULL)
    time.sleep(8)
    proc.kill()  # kill -9 while it holds the lock
    proc.wait()
    args = train_args(tiny_model_dir, sft_data, out)
    args[args.index("--max-steps") + 1] = "100000"
    result = cli_process("train", *args, "--resume", "--max-steps", str(_checkpoint_step(out) + 1))
    assert result.returncode == 0, result.stderr
    assert (out / "run_complete.json").is_file()


def _checkpoint_step(out: Path) -> int:
    from engine.run.checkpoint import latest_checkpoint

    return int(json.loads((latest_checkpoint(out) / "state.json").read_text())["step"])


def test_a_run_whose_every_step_is_skipped_fails_with_exit_3(sft_data, smollm2_dir, tmp_path):
    """An fp16 residual stream that overflows: every loss is NaN, no step is taken, no run_complete.json."""
    from models.config import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = random_model(config, seed=0)
    with torch.no_grad():  # finite in fp16, but the MLP's output overflows it: inf, then NaN after the norm
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight.fill_(100.0)
        mlp.up_proj.weight.fill_(100.0)
        mlp.down_proj.weight.fill_(60000.0)
    folder = tmp_path / "overflow"
    save_model(model.to(torch.float16), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / name, folder / name)
    out = tmp_path / "out"
    result = cli_process("train", *train_args(folder, sft_data, out), "--dtype", "fp16")
    assert result.returncode == 3, result.stderr
    assert "no optimizer step succeeded" in one_line_of_stop(result)
    assert not (out / "run_complete.json").exists() and not (out / "adapter").exists()
    kinds = [json.loads(x)["kind"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("skip") == 2 and "train" not in kinds


def one_line_of_stop(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in result.stderr.splitlines() if x.startswith(("stopped:", "error:"))]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_memory_follows_max_len_not_the_record(tiny_model_dir, tmp_path):
    """One 12 MB record with --max-len 96: tokenized only as far as the sample can keep (whole, the
    tokenizer would take gigabytes for it)."""
    small, huge = tmp_path / "small.jsonl", tmp_path / "huge.jsonl"
    small.write_text(json.dumps({"text": "a few words of text " * 20}) + "\n")
    huge.write_text(json.dumps({"text": "many words of license text " * 450_000}) + "\n")  # ~12 MB

    def peak_rss_mb(data: Path) -> float:
        code = ("import resource, sys\nfrom engine.errors import run_cli\nfrom engine.train import main\n"
                "try:\n    run_cli(main, sys.argv[1:])\nexcept SystemExit as e:\n    c = e.code\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, c)\n")
        args = train_args(tiny_model_dir, data, tmp_path / data.stem, "--max-steps", "1")
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
        rss, status = out.stdout.split()[-2:]
        assert status in ("0", "None"), out.stderr
        return int(rss) / 1024

    assert peak_rss_mb(huge) < peak_rss_mb(small) + 100  # the text: ~12 MB, held a few times while parsed


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    """Mount a tmpfs at ``path``. Where mounting is refused (no privilege) the test is skipped,
    except in CI (``.ci/run`` sets ENGINE_TESTS_NO_SKIP=1), where that is a failure: CI must run it."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        why = f"mounting a tmpfs ({options}) is not permitted here: {done.stderr.decode(errors='replace').strip()}"
        if os.environ.get("ENGINE_TESTS_NO_SKIP"):
            pytest.fail(why + " (ENGINE_TESTS_NO_SKIP is set: CI must run this case)")
        pytest.skip(why)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs filled up to 48 kB of free space: setup's small files fit, the checkpoint does not."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tiny_model_dir, sft_data, small_disk):
    out = small_disk / "run"
    result = cli_process("train", *train_args(tiny_model_dir, sft_data, out, "--save-every", "1"))
    assert result.returncode == 74, result.stderr
    line = one_line_of_stop(result)
    assert "No space left on device" in line and str(small_disk) in line
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    assert not (out / "run_complete.json").exists()


def test_a_read_only_output_is_one_line(tiny_model_dir, sft_data, tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "1m", read_only=True)
    try:
        result = cli_process("train", *train_args(tiny_model_dir, sft_data, disk / "run"))
        assert result.returncode == 74, result.stderr
        assert "Read-only file system" in one_line_of_stop(result)
        assert snapshot(disk) == {}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_rlimit_file_size_is_reported_like_a_full_disk(tiny_model_dir, sft_data, tmp_path):
    """Without mounting: RLIMIT_FSIZE makes writes past 20 kB fail (EFBIG), as a full disk would."""
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, "-m", "engine.train",
                             *map(str, train_args(tiny_model_dir, sft_data, out, "--save-every", "1"))],
                            cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    assert result.returncode == 74, result.stderr
    assert "File too large" in one_line_of_stop(result)
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
