"""Fixtures shared by the training-loop tests (SFT and DPO)."""

import shutil
from pathlib import Path

import pytest

from models.config import LlamaConfig
from models.loading import save_model
from tools.random_checkpoint import random_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (hidden 32, GQA, tied head) with the real SmolLM2 tokenizer and chat template."""
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out = tmp_path_factory.mktemp("tiny-model")
    save_model(random_model(config, seed=0), out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(smollm2_dir) / name, out / name)
    return out


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
