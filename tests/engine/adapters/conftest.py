"""Shared by the adapter tests that compare with HF PEFT: a tiny random HF Llama folder."""

import pytest

from tests.engine.conftest import write_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random HF Llama folder (tied head) written by transformers itself."""
    return write_hf_llama(tmp_path_factory.mktemp("hf_llama"), tie_word_embeddings=True)
