"""Named presets: the published ``config.json`` values of the models we support, and their hub ids.

A preset name works wherever a model folder does (`models.resolve_model_dir` downloads its hub id),
and `tools.random_checkpoint` builds any preset's exact shapes with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import LlamaConfig


@dataclass(frozen=True)
class Preset:
    hub_id: str
    config: LlamaConfig


_LLAMA2_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
_LLAMA3_COMMON = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
                      eos_token_id=128001)
_LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, **_LLAMA3_COMMON)
_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8)
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

PRESETS: dict[str, Preset] = {
    "llama2-7b": Preset("meta-llama/Llama-2-7b-hf", LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, **_LLAMA2_COMMON)),
    "llama2-13b": Preset("meta-llama/Llama-2-13b-hf", LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, **_LLAMA2_COMMON)),
    "llama2-70b": Preset("meta-llama/Llama-2-70b-hf", LlamaConfig(**_70B, **_LLAMA2_COMMON)),
    "llama3-8b": Preset("meta-llama/Meta-Llama-3-8B", LlamaConfig(max_position_embeddings=8192, **_LLAMA3_8B)),
    "llama3.1-8b": Preset("meta-llama/Llama-3.1-8B", LlamaConfig(
        max_position_embeddings=131072, rope_scaling=dict(_LLAMA31_ROPE), **_LLAMA3_8B)),
    "llama3.1-70b": Preset("meta-llama/Llama-3.1-70B", LlamaConfig(
        max_position_embeddings=131072, rope_scaling=dict(_LLAMA31_ROPE), **_70B, **_LLAMA3_COMMON)),
    "mistral-7b": Preset("mistralai/Mistral-7B-v0.1", LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2)),
    "tinyllama-1.1b": Preset("TinyLlama/TinyLlama-1.1B-Chat-v1.0", LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2)),
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
}
