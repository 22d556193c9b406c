"""Fixtures shared by the engine tests (the tiny SmolLM2-tokenizer model is in tests/conftest.py)."""

from pathlib import Path

import pytest
import torch

from engine.adapters import LoRAConfig, inject_lora, lora_modules


def write_hf_llama(path: Path, tie_word_embeddings: bool) -> Path:
    """A tiny random Llama (vocab 97, hidden 64, GQA 4/2, 2 blocks) saved by transformers itself."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie_word_embeddings)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def inject_random_lora(model, cfg: LoRAConfig, seed: int, b_std: float) -> None:
    """Inject LoRA into ``model`` with A from its default init under ``torch.manual_seed(seed)`` and
    B ~ b_std · N(0, 1) (seeded), so that the adapter changes the model's output."""
    torch.manual_seed(seed)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_std)


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> tuple[Path, Path]:
    """Small slices of the example license Q&A data (variable lengths, real chat template): 24
    training records and 6 held out."""
    out = tmp_path_factory.mktemp("data")
    lines = (Path(__file__).resolve().parents[2] / "examples" / "license_qa.jsonl").read_text().splitlines()
    (out / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (out / "eval.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    return out / "train.jsonl", out / "eval.jsonl"
