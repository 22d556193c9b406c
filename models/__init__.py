"""Llama-family models: definition (`models.llama`), loading (`models.loading`), tokenizer (`models.tokenizer`)."""

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.loading import load_model, resolve_model_dir
from models.presets import PRESETS

__all__ = ["LlamaConfig", "LlamaForCausalLM", "PRESETS", "load_model", "load_tokenizer", "resolve_model_dir"]


def load_tokenizer(name_or_path):
    """`models.tokenizer.load_tokenizer`, imported on first use."""
    from models.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(name_or_path)
