"""Whole SFT steps, not single ops: the Triton kernels (interpreter on a CPU) inside a QLoRA step
with gradient checkpointing, the fused loss and LoRA dropout give the reference path's losses and
adapter; and QLoRA's loss curve is LoRA's on the dequantized base."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import TrainConfig
from engine.recipes import sft
from engine.run.metrics import read_metrics
from kernels.backend import set_kernel_mode
from models import load_model
from models.loading import save_model
from models.quantized import dequantize_linears, quantize_linears
from tests.nf4_counting import counting_dequantizations
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    out.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:4]) + "\n")
    return out


def config(model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    # adam_eps 1e-4: Adam's first step is ~lr·sign(g); a larger eps keeps the update a smooth
    # function of g, so summation-order noise in a near-zero gradient cannot flip a step's sign.
    values = dict(model=str(model), data=str(data), output=str(output), max_steps=2, batch_size=2, max_len=64,
                  lr=1e-2, warmup_steps=0, lora_r=4, lora_alpha=8, lora_dropout=0.1, adam_eps=1e-4, seed=11,
                  grad_checkpointing=True)
    values.update(overrides)
    return TrainConfig(**values)


def losses(output: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train"])


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def test_qlora_steps_through_the_triton_kernels_equal_the_reference_path(tiny_model_dir, qa, tmp_path, monkeypatch):
    """Also: with gradient checkpointing each NF4 weight is dequantized twice per step on the
    kernel path (forward, recompute; the backward reuses the recompute's copy), not three times."""
    runs = {}
    for mode in ("reference", "triton"):
        with set_kernel_mode(mode):
            calls = counting_dequantizations(monkeypatch) if mode == "triton" else Counter()
            sft.train(config(tiny_model_dir, qa, tmp_path / mode, quant="nf4"), progress=False)
        runs[mode] = tmp_path / mode
    assert len(losses(runs["triton"])) == 2
    weights = 2 * 7  # 2 blocks × q, k, v, o, gate, up, down
    assert len(calls) == weights and set(calls.values()) == {2 * 2}, f"dequantizations per weight in 2 steps: {calls}"
    assert_close(losses(runs["triton"]), losses(runs["reference"]), torch.float32, "loss curve")
    ours, ref = adapter(runs["triton"]), adapter(runs["reference"])
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], torch.float32, name)
    assert any(t.abs().sum() > 0 for k, t in ref.items() if "lora_B" in k)  # the steps moved B


def test_qlora_curve_is_lora_on_the_dequantized_base(tiny_model_dir, qa, tmp_path):
    """QLoRA trains LoRA on dequant(quant(W)): the same losses and adapter as LoRA on a dense model
    holding exactly those weights."""
    dense = load_model(tiny_model_dir)
    quantize_linears(dense)
    dequantize_linears(dense, torch.float32)
    dequantized = tmp_path / "dequantized-model"
    save_model(dense, dequantized)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dequantized / name).write_bytes((tiny_model_dir / name).read_bytes())
    sft.train(config(tiny_model_dir, qa, tmp_path / "qlora", quant="nf4", max_steps=4), progress=False)
    sft.train(config(dequantized, qa, tmp_path / "lora", max_steps=4), progress=False)
    qlora, lora = losses(tmp_path / "qlora"), losses(tmp_path / "lora")
    assert len(qlora) == 4 and qlora[-1] < qlora[0]
    assert_close(qlora, lora, torch.float32, "QLoRA vs LoRA on the dequantized base")
    for name, tensor in adapter(tmp_path / "lora").items():
        assert_close(adapter(tmp_path / "qlora")[name], tensor, torch.float32, name)


def test_int8_steps_through_the_triton_kernels_equal_the_reference_path(tiny_model_dir, qa, tmp_path, monkeypatch):
    """--quant int8 on the kernel path (the Triton dequantizer, grouped q/k/v and gate/up) gives the
    reference path's losses and adapter, with two dequantizations per weight per step under
    gradient checkpointing, as NF4."""
    runs = {}
    for mode in ("reference", "triton"):
        with set_kernel_mode(mode):
            calls = counting_dequantizations(monkeypatch, "int8") if mode == "triton" else Counter()
            sft.train(config(tiny_model_dir, qa, tmp_path / mode, quant="int8"), progress=False)
        runs[mode] = tmp_path / mode
    assert len(calls) == 2 * 7 and set(calls.values()) == {2 * 2}, f"dequantizations per weight in 2 steps: {calls}"
    assert_close(losses(runs["triton"]), losses(runs["reference"]), torch.float32, "loss curve")
    ours, ref = adapter(runs["triton"]), adapter(runs["reference"])
    for name in ref:
        assert_close(ours[name], ref[name], torch.float32, name)
