"""Llama-family models: definition (`models.llama`), loading (`models.loading`), tokenizer (`models.tokenizer`)."""

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.loading import load_model, resolve_model_dir
from models.presets import PRESETS
from models.tokenizer import load_tokenizer

__all__ = ["LlamaConfig", "LlamaForCausalLM", "PRESETS", "load_model", "load_tokenizer", "resolve_model_dir"]
