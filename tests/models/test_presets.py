"""Presets carry the published config.json numbers and build the published parameter counts."""

import pytest
import torch
import transformers

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.presets import PRESETS

# name: hub id, (hidden, layers, heads, kv heads, intermediate, vocab, rope theta, max positions), params
PUBLISHED = {
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", (4096, 32, 32, 32, 11008, 32000, 10000.0, 4096), 6_738_415_616),
    "llama2-13b": ("meta-llama/Llama-2-13b-hf", (5120, 40, 40, 40, 13824, 32000, 10000.0, 4096), 13_015_864_320),
    "llama2-70b": ("meta-llama/Llama-2-70b-hf", (8192, 80, 64, 8, 28672, 32000, 10000.0, 4096), 68_976_648_192),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", (4096, 32, 32, 8, 14336, 128256, 500000.0, 8192), 8_030_261_248),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", (4096, 32, 32, 8, 14336, 128256, 500000.0, 131072), 8_030_261_248),
    "llama3.1-70b": ("meta-llama/Llama-3.1-70B", (8192, 80, 64, 8, 28672, 128256, 500000.0, 131072),
                     70_553_706_496),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", (4096, 32, 32, 8, 14336, 32000, 10000.0, 32768), 7_241_732_096),
    "tinyllama-1.1b": ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", (2048, 22, 32, 4, 5632, 32000, 10000.0, 2048),
                       1_100_048_384),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", (576, 30, 9, 3, 1536, 49152, 100000.0, 8192), 134_515_008),
}


def test_every_preset_is_checked():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_numbers_and_parameter_count(name):
    hub_id, numbers, n_params = PUBLISHED[name]
    preset = PRESETS[name]
    c = preset.config
    assert preset.hub_id == hub_id
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.rope_theta, c.max_position_embeddings) == numbers
    assert c.head_dim == c.hidden_size // c.num_attention_heads and c.rms_norm_eps == 1e-5
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_family_specifics():
    llama31 = ("llama3.1-8b", "llama3.1-70b")
    for name in llama31:
        assert PRESETS[name].config.rope_scaling == {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    assert all(PRESETS[n].config.rope_scaling is None for n in PRESETS if n not in llama31)
    assert PRESETS["mistral-7b"].config.sliding_window == 4096
    assert [n for n in PRESETS if PRESETS[n].config.tie_word_embeddings] == ["smollm2-135m"]
    for name in ("llama3-8b", "llama3.1-70b"):
        assert (PRESETS[name].config.bos_token_id, PRESETS[name].config.eos_token_ids) == (128000, (128001,))
    assert (PRESETS["llama2-70b"].config.bos_token_id, PRESETS["llama2-70b"].config.eos_token_ids) == (1, (2,))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_hf_config_round_trip_and_transformers_reads_it(name):
    cfg = PRESETS[name].config
    hf = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(hf) == cfg
    config_cls = transformers.MistralConfig if cfg.sliding_window else transformers.LlamaConfig
    theirs = config_cls(**hf)
    assert (theirs.head_dim, theirs.num_key_value_heads, theirs.rope_parameters["rope_theta"]) == (
        cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta)
    assert theirs.rope_parameters["rope_type"] == cfg.rope_type
