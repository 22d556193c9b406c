"""FSDP2 with a head of its own (not tied to the embedding, as Llama-2 and Llama-3 have): the fused
loss reads the root's all-gathered head weight after ``hidden_states``; 2 ranks train what one
process trains (with the block inputs offloaded too), and the evaluation the ranks share gives one
process's (a 2-layer model, seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.config import LlamaConfig
from models.loading import save_model
from tests.distributed.launch import ROOT, losses, metrics, run_single, run_torchrun, train_args
from tests.tolerances import assert_close
from tools.random_checkpoint import random_model


def test_an_untied_head_under_fsdp_gives_the_single_process_losses(smollm2_dir, tmp_path):
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model_dir = tmp_path / "untied"
    save_model(random_model(config, seed=1), model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / name, model_dir / name)
    data = tmp_path / "train.jsonl"
    lines = (ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:8]) + "\n")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(lines[8:11]) + "\n")  # 3 eval batches: the ranks share them 2 + 1
    flags = dict(max_steps=3, batch_size=1, max_len=128, lr=1e-2, lora_r=4, seed=5, adam_eps=1e-6, eval_data=held_out)
    run_single(train_args(model_dir, data, tmp_path / "one", grad_accum=2, **flags))
    run_torchrun(train_args(model_dir, data, tmp_path / "two", distributed="fsdp", **flags))
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), torch.float32, name="untied losses")
    # with the block inputs offloaded: the recompute's gradients reach FSDP2's shards too
    run_torchrun(train_args(model_dir, data, tmp_path / "offload", distributed="fsdp", offload_activations=True,
                            **flags))
    assert_close(losses(tmp_path / "offload"), losses(tmp_path / "one"), torch.float32, name="offloaded losses")
    evals = {name: metrics(tmp_path / name, "eval") for name in ("one", "two")}
    assert [r["tokens"] for r in evals["two"]] == [r["tokens"] for r in evals["one"]]
    assert_close(torch.tensor([r["loss"] for r in evals["two"]]), torch.tensor([r["loss"] for r in evals["one"]]),
                 torch.float32, name="eval losses")
