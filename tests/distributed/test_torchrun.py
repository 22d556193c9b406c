"""N ranks train what one process trains (the correctness ladder's last rung), on the CPU with gloo.

Every run is `python -m engine.train` in subprocesses: one process with ``--grad-accum 2g``
against ``torchrun --nproc_per_node 2`` with ``--grad-accum g`` (the same micro-batches per step,
`engine.run.distributed`), on the SmolLM2-135M fixture, 4 steps, LoRA dropout on. The losses of
every step and the final adapters agree to the fp32 table: the ranks only change how the sums
are split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.run.folder import COMPLETE
from tests.distributed.launch import adapter, losses, metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (Path(__file__).resolve().parents[2] / "examples" / "license_qa.jsonl").read_text().splitlines()
    out.write_text("\n".join(lines[:32]) + "\n")
    return out


def flags(**extra) -> dict:
    """4 steps of packed rows of 96 tokens, rank 4, checkpoints every 2 steps.

    ``adam_eps`` 1e-6: LoRA A's gradient is proportional to B, which is 0 at the start and tiny
    for the first steps, so some of its elements are near 1e-8; there AdamW's update
    lr · g / (|g| + eps) is so steep in g that the rounding of a differently ordered sum of
    micro-batch gradients (ranks add theirs in another order) moves it by a few per cent of lr
    (1.7e-5 at lr 5e-4, 1 element of 2,304, with the default eps). A larger eps keeps the
    update proportional to g there, so the adapters compare at the fp32 table."""
    return dict(dict(max_steps=STEPS, batch_size=1, max_len=96, batching="pack", lr=5e-4, warmup_steps=1, lora_r=4,
                     lora_alpha=8, lora_dropout=0.1, seed=3, save_every=2, keep_checkpoints=2, adam_eps=1e-6), **extra)


@pytest.fixture(scope="module")
def runs(smollm2_dir, data, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps three ways: one process (grad-accum 4), DDP and FSDP2 on 2 ranks (2 each)."""
    root = tmp_path_factory.mktemp("runs")
    run_single(train_args(smollm2_dir, data, root / "single", **flags(grad_accum=4)))
    for strategy in ("ddp", "fsdp"):
        run_torchrun(train_args(smollm2_dir, data, root / strategy, **flags(grad_accum=2, distributed=strategy)))
    return {name: root / name for name in ("single", "ddp", "fsdp")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_single_process_losses_and_adapter(runs, strategy):
    single, ranks = runs["single"], runs[strategy]
    assert len(losses(single)) == STEPS
    assert_close(losses(ranks), losses(single), torch.float32, name=f"{strategy} losses")
    tokens = [r["tokens"] for r in metrics(single, "train")]
    assert [r["tokens"] for r in metrics(ranks, "train")] == tokens  # N summed over the ranks, before the backward
    expected = adapter(single)
    got = adapter(ranks)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], torch.float32, name=f"{strategy} {name}")
    assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k)  # it trained
    line, = metrics(ranks, "distributed")
    assert line["strategy"] == strategy and line["world_size"] == 2 and line["micro_batches_per_step"] == 4
    per_rank, total = line["base_bytes_per_rank"], line["base_bytes"]
    if strategy == "fsdp":  # every block's frozen weights sharded: each rank about half
        assert sum(per_rank) == total and all(abs(b - total / 2) < 0.01 * total for b in per_rank)
    else:
        assert per_rank == [total, total]
    assert (ranks / COMPLETE).is_file()


def interrupted_copy(run: Path, at: int, where: Path) -> Path:
    """A run folder as it was right after the checkpoint of step ``at``."""
    where.mkdir()
    shutil.copytree(run / "checkpoints" / f"step-{at:06d}", where / "checkpoints" / f"step-{at:06d}")
    for name in ("config.json", "run.json", "data_report.json"):
        shutil.copy(run / name, where / name)
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if f'"step": {at + 1}' not in line
            and f'"step": {at + 2}' not in line]
    (where / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return where


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back(runs, smollm2_dir, data, tmp_path):
    """Step 2 saved by 2 FSDP2 ranks resumes in one process (grad-accum 4), and step 2 of the one
    process resumes on 2 DDP ranks: steps 3 and 4 are those of the uninterrupted runs."""
    expected = losses(runs["single"])
    from_ranks = interrupted_copy(runs["fsdp"], 2, tmp_path / "from-ranks")
    run_single(train_args(smollm2_dir, data, from_ranks, **flags(grad_accum=4, resume=True)))
    assert_close(losses(from_ranks), expected, torch.float32, name="2 ranks -> 1")
    from_one = interrupted_copy(runs["single"], 2, tmp_path / "from-one")
    run_torchrun(train_args(smollm2_dir, data, from_one, **flags(grad_accum=2, distributed="ddp", resume=True)))
    assert_close(losses(from_one), expected, torch.float32, name="1 -> 2 ranks")
    for name, value in adapter(runs["single"]).items():
        assert_close(adapter(from_one)[name], value, torch.float32, name=name)
        assert_close(adapter(from_ranks)[name], value, torch.float32, name=name)


def test_qlora_under_fsdp_shards_the_nf4_bytes_and_gives_the_single_process_losses(smollm2_dir, data, tmp_path):
    """The NF4 base is sharded as its quantized bytes: each of 2 ranks holds about half of them,
    and the losses are those of one process training the same QLoRA."""
    quick = dict(max_steps=2, save_every=0, quant="nf4")
    run_single(train_args(smollm2_dir, data, tmp_path / "single", **flags(grad_accum=2, **quick)))
    run_torchrun(train_args(smollm2_dir, data, tmp_path / "fsdp", **flags(grad_accum=1, distributed="fsdp", **quick)))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "single"), torch.float32, name="QLoRA losses")
    line, = metrics(tmp_path / "fsdp", "distributed")
    per_rank, total = line["base_bytes_per_rank"], line["base_bytes"]
    nf4_bytes = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3) // 2  # 4-bit codes of every block linear
    assert nf4_bytes < total < 1.1 * nf4_bytes  # NF4 codes + absmax (not a dequantized copy)
    assert all(abs(b - total / 2) < 0.01 * total for b in per_rank), per_rank


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_int8_and_fp8_bases_under_fsdp_shard_their_bytes_and_give_the_single_process_run(tiny_model_dir, data,
                                                                                         tmp_path, fmt):
    """An int8 or FP8 base (the tiny 2-layer model: hidden 32, GQA) on 2 FSDP2 ranks: each rank
    holds half of the codes and row scales, all-gathered as those bytes, and the losses and the
    final adapter are those of one process (FP8 in its CPU emulation)."""
    quick = dict(max_steps=2, save_every=0, quant=fmt)
    run_single(train_args(tiny_model_dir, data, tmp_path / "single", **flags(grad_accum=2, **quick)))
    run_torchrun(train_args(tiny_model_dir, data, tmp_path / "fsdp", **flags(grad_accum=1, distributed="fsdp",
                                                                             **quick)))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "single"), torch.float32, name=f"{fmt} losses")
    expected = adapter(tmp_path / "single")
    for name, value in adapter(tmp_path / "fsdp").items():
        assert_close(value, expected[name], torch.float32, name=f"{fmt} {name}")
    line, = metrics(tmp_path / "fsdp", "distributed")
    per_rank, total = line["base_bytes_per_rank"], line["base_bytes"]
    rows = 32 + 16 + 16 + 32 + 64 + 64 + 32  # output rows of q, k, v, o, gate, up, down
    codes = 32 * rows  # one byte per weight: every linear has 32 inputs but down (64 inputs, 32 rows)
    codes += 32 * 32  # down's second 32 inputs
    quantized = 2 * (codes + 4 * rows)  # 2 blocks: codes and an fp32 scale per row
    assert quantized < total < quantized + 2 * 2 * 32 * 4 + 1, (total, quantized)  # + 2 fp32 norm weights per block
    assert per_rank == [total // 2, total // 2], per_rank
